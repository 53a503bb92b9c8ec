//! The plan: a file the operator reviews and edits (which tables are
//! tenant-owned, tenant zero's identity, the id type, batched or instant
//! backfill), and the steps derived from it. The file holds decisions, never SQL:
//! every statement is generated here from catalog names and quoted, so editing
//! the plan cannot inject SQL, and a name that is not in the database is refused.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::ident::{Table, literal, quote, safe_do};
use crate::inspect::{Class, Inventory, TableInfo, ViewInfo};
use crate::{Error, Result};

/// The name of the tenant isolation policy on every tenant-owned table.
pub const POLICY: &str = "ficus_tenant_isolation";

/// The role that owns the helper functions: no login, no other privilege.
pub const HELPERS_OWNER: &str = "ficus_tenancy";

/// The plan file format this build writes and reads.
pub const PLAN_VERSION: u32 = 1;

/// Where the helpers read a transaction's tenant from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantContext {
    /// The transaction-local setting `ficus.tenant_id` names the tenant; safe
    /// behind a transaction-mode pooler because `SET LOCAL` ends with the
    /// transaction.
    #[default]
    Setting,
    /// The transaction-local setting `ficus.member` names a member identity,
    /// looked up in `tenancy.members`: the tenant is the one organization it
    /// belongs to, or, when it belongs to several, the one `ficus.tenant_id`
    /// names (and only if the member belongs to it).
    Member,
}

impl TenantContext {
    pub fn as_str(self) -> &'static str {
        match self {
            TenantContext::Setting => "setting",
            TenantContext::Member => "member",
        }
    }
}

/// The tenant id's type, the same everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdType {
    Uuid,
    Bigint,
}

impl IdType {
    /// A regular expression an id's text must match before it is cast.
    pub fn shape(self) -> &'static str {
        match self {
            IdType::Uuid => {
                "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
            }
            IdType::Bigint => "^[0-9]{1,18}$",
        }
    }

    pub fn sql(self) -> &'static str {
        match self {
            IdType::Uuid => "uuid",
            IdType::Bigint => "bigint",
        }
    }
}

/// How existing rows get tenant zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backfill {
    /// Keyset batches that write every row, a few hundred milliseconds at a time.
    Batched,
    /// `ADD COLUMN … DEFAULT <tenant zero>`: catalog-only, no row is written; the
    /// value lives in the catalog until a row is next updated.
    Instant,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantZero {
    /// A UUID, or a positive whole number for `bigint`.
    pub id: String,
    pub slug: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannedTable {
    pub schema: String,
    pub name: String,
    pub class: Class,
    pub reason: String,
    #[serde(default = "batched")]
    pub backfill: Backfill,
}

fn batched() -> Backfill {
    Backfill::Batched
}

/// What happens to a view over tenant-owned tables before its tables are
/// enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ViewAction {
    /// A view: it runs as whoever reads it (`security_invoker = true`), so row
    /// level security applies to them; every role that reads it today is first
    /// granted the columns it reads, so none gets an error.
    Invoker,
    /// A materialized view (it holds every tenant's rows, and row level
    /// security cannot apply to it): the tenant roles lose SELECT on it, while
    /// every other role that reads it keeps doing so.
    Revoke,
    /// Left as it is, by the operator's choice; enforcing its tables is refused
    /// while it would let a tenant role read every tenant's rows.
    Keep,
}

impl ViewAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ViewAction::Invoker => "invoker",
            ViewAction::Revoke => "revoke",
            ViewAction::Keep => "keep",
        }
    }
}

/// A view or materialized view over tenant-owned tables, and its decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannedView {
    pub schema: String,
    pub name: String,
    pub materialized: bool,
    pub action: ViewAction,
}

/// The plan file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub version: u32,
    /// The database this plan was made for; `apply` refuses any other.
    pub database: String,
    pub system_identifier: String,
    pub id_type: IdType,
    /// Where a transaction's tenant comes from.
    #[serde(default)]
    pub tenant_context: TenantContext,
    pub tenant_zero: TenantZero,
    /// Roles the live application connects as: they may call the helpers.
    pub app_roles: Vec<String>,
    /// Roles the tenant-aware backend connects as: the isolation policies are
    /// made for them (inert until row level security is enforced).
    #[serde(default)]
    pub tenant_roles: Vec<String>,
    pub tables: Vec<PlannedTable>,
    /// The views and materialized views that read tenant-owned tables,
    /// directly or through other views.
    #[serde(default)]
    pub views: Vec<PlannedView>,
}

/// What a step risks, in the words of the issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hazard {
    /// Takes an exclusive lock for a moment (catalog-only change).
    BriefExclusiveLock,
    /// Reads the whole table, without blocking reads or writes.
    Scan,
    /// Rewrites the table.
    Rewrite,
    /// Changes what some role can see.
    VisibilityChange,
    /// Loses data.
    Destructive,
    /// Writes rows in small batches; no long lock.
    Batches,
    /// Creates things beside the application's, touching none of its tables.
    None,
}

impl Hazard {
    pub fn as_str(self) -> &'static str {
        match self {
            Hazard::BriefExclusiveLock => "brief-exclusive-lock",
            Hazard::Scan => "scan",
            Hazard::Rewrite => "rewrite",
            Hazard::VisibilityChange => "visibility-change",
            Hazard::Destructive => "destructive",
            Hazard::Batches => "batches",
            Hazard::None => "none",
        }
    }
}

/// One SQL statement of a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Statement {
    pub sql: String,
    /// Runs outside a transaction (`CREATE INDEX CONCURRENTLY`).
    pub concurrent: bool,
    /// A query answering whether the statement's effect is already there, so that
    /// running a step twice changes nothing the second time.
    pub done_if: Option<String>,
}

pub(crate) fn stmt(sql: impl Into<String>) -> Statement {
    Statement {
        sql: sql.into(),
        concurrent: false,
        done_if: None,
    }
}

fn stmt_unless(sql: impl Into<String>, done_if: impl Into<String>) -> Statement {
    Statement {
        sql: sql.into(),
        concurrent: false,
        done_if: Some(done_if.into()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepKind {
    /// A step of `ficus db distribute apply`.
    Distribute,
    Spine,
    Column,
    Default,
    Backfill,
    Index,
    Tighten,
    View,
}

impl StepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Distribute => "distribute",
            StepKind::Spine => "spine",
            StepKind::Column => "column",
            StepKind::Default => "default",
            StepKind::Backfill => "backfill",
            StepKind::Index => "index",
            StepKind::Tighten => "tighten",
            StepKind::View => "view",
        }
    }
}

/// One step: idempotent forward SQL, its undo, the lock it takes and its hazard.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// `spine`, `column:public.order`… the journal's key.
    pub id: String,
    pub kind: StepKind,
    pub table: Option<Table>,
    pub forward: Vec<Statement>,
    pub undo: Vec<Statement>,
    pub lock: String,
    pub hazard: Hazard,
    pub undo_hazard: Hazard,
    pub note: String,
}

impl Plan {
    /// A first plan from an inventory: every table with its class and reason, tenant
    /// zero with a fresh id, the roles connected now (other than owners and
    /// superusers) as the application's roles.
    pub fn draft(inv: &Inventory, tenant_zero: &str, id_type: IdType) -> Result<Plan> {
        let slug = slugify(tenant_zero);
        if slug.is_empty() {
            return Err(Error::Refused(format!(
                "tenant zero's name {tenant_zero:?} has no letters or digits to make an id from"
            )));
        }
        let id = match id_type {
            IdType::Uuid => random_uuid()?,
            IdType::Bigint => "1".to_string(),
        };
        let app_roles: Vec<String> = app_role_reasons(inv).into_keys().collect();
        Ok(Plan {
            version: PLAN_VERSION,
            database: inv.database.clone(),
            system_identifier: inv.system_identifier.clone(),
            id_type,
            tenant_context: TenantContext::Setting,
            tenant_zero: TenantZero {
                id,
                slug,
                name: tenant_zero.to_string(),
            },
            app_roles,
            tenant_roles: Vec::new(),
            tables: inv
                .tables
                .iter()
                .map(|t| PlannedTable {
                    schema: t.table.schema.clone(),
                    name: t.table.name.clone(),
                    class: t.class,
                    reason: t.reason.clone(),
                    backfill: Backfill::Batched,
                })
                .collect(),
            views: tenant_views(inv, |t| {
                inv.table(t).is_some_and(|i| i.class == Class::TenantOwned)
            })
            .into_iter()
            .filter(|v| v.materialized || !v.security_invoker)
            .map(|v| PlannedView {
                schema: v.view.schema.clone(),
                name: v.view.name.clone(),
                materialized: v.materialized,
                action: if v.materialized {
                    ViewAction::Revoke
                } else {
                    ViewAction::Invoker
                },
            })
            .collect(),
        })
    }

    /// The plan file, with a comment above `app_roles` saying why each of them
    /// is there, from `inv`.
    pub fn to_toml_explained(&self, inv: &Inventory) -> Result<String> {
        let text = self.to_toml()?;
        let reasons = app_role_reasons(inv);
        let mut note = String::from(
            "# app_roles, from the catalogs: every role that may use a tenant-owned table\n\
             # (owner, own grant, role membership or PUBLIC) or is connected now. Keep\n\
             # each one the live app may connect as; a role moved to tenant_roles is\n\
             # isolated once its tables are enforced.\n",
        );
        for role in &self.app_roles {
            let why = reasons.get(role).map_or("named by hand", String::as_str);
            note.push_str(&comment(&format!("#   {role}: {why}")));
        }
        let text = text.replacen("\napp_roles = ", &format!("\n{note}app_roles = "), 1);
        if self.views.is_empty() {
            return Ok(text);
        }
        let mut note = String::from(
            "# views: every view and materialized view that reads tenant-owned tables,\n\
             # and who reads it today. action: invoker (a view runs as its reader, whose\n\
             # row level security then applies; its readers are granted the columns it\n\
             # reads), revoke (a materialized view holds every tenant's rows: the tenant\n\
             # roles lose SELECT on it, every other reader keeps it), keep (left as it\n\
             # is; enforcing its tables is then refused).\n",
        );
        for v in &self.views {
            let t = Table::new(&v.schema, &v.name);
            let readers = inv
                .views
                .iter()
                .find(|i| i.view == t)
                .map(|i| i.readers.join(", "))
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| "no role but superusers".into());
            let kind = if v.materialized {
                " (materialized)"
            } else {
                ""
            };
            note.push_str(&comment(&format!("#   {t}{kind}: read by {readers}")));
        }
        Ok(text.replacen("\n[[views]]", &format!("\n{note}[[views]]"), 1))
    }

    /// The plan as the file the operator edits, with a header that explains it.
    pub fn to_toml(&self) -> Result<String> {
        let body = toml::to_string_pretty(self).map_err(|e| Error::BadPlan {
            path: "(new plan)".into(),
            detail: e.to_string(),
        })?;
        Ok(format!(
            "# ficus db plan for database {:?}. Review it, edit it, then:\n\
             #   ficus db apply --url URL --plan THIS_FILE            (dry run: SQL and hazards)\n\
             #   ficus db apply --url URL --plan THIS_FILE --execute\n\
             # class: tenant-owned (gets tenant_id), shared (lookup data, no tenant_id),\n\
             #        excluded (not application data). backfill: batched, or instant\n\
             #        (ADD COLUMN ... DEFAULT tenant zero: catalog-only, no row written,\n\
             #        the value lives in the catalog until each row is next updated).\n\
             # tenant_context: setting (ficus.tenant_id, set with SET LOCAL per transaction)\n\
             #        or member (ficus.member, an identity looked up in tenancy.members).\n\
             # app_roles: the roles the live app connects as (they may call the helpers).\n\
             # tenant_roles: the roles the tenant-aware backend connects as; the\n\
             #        isolation policies, made when a table is enforced, are for them.\n\
             # The file holds decisions only; every statement is generated from it.\n\n{body}",
            self.database
        ))
    }

    /// Reads and checks a plan file; `path` names it in errors.
    pub fn from_toml(text: &str, path: &str) -> Result<Plan> {
        let bad = |detail: String| Error::BadPlan {
            path: path.to_string(),
            detail,
        };
        let plan: Plan = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if plan.version != PLAN_VERSION {
            return Err(bad(format!(
                "version {} is not one this build reads ({PLAN_VERSION})",
                plan.version
            )));
        }
        match plan.id_type {
            IdType::Uuid if !is_uuid(&plan.tenant_zero.id) => {
                return Err(bad(format!(
                    "tenant_zero.id {:?} is not a UUID",
                    plan.tenant_zero.id
                )));
            }
            IdType::Bigint if plan.tenant_zero.id.parse::<i64>().map_or(true, |n| n <= 0) => {
                return Err(bad(format!(
                    "tenant_zero.id {:?} is not a positive whole number",
                    plan.tenant_zero.id
                )));
            }
            _ => {}
        }
        if slugify(&plan.tenant_zero.slug) != plan.tenant_zero.slug {
            return Err(bad(format!(
                "tenant_zero.slug {:?} must be lowercase letters, digits and '-'",
                plan.tenant_zero.slug
            )));
        }
        let mut seen_views = BTreeSet::new();
        for v in &plan.views {
            if !seen_views.insert((v.schema.clone(), v.name.clone())) {
                return Err(bad(format!("view {}.{} is listed twice", v.schema, v.name)));
            }
        }
        let mut seen = BTreeSet::new();
        for t in &plan.tables {
            if !seen.insert((t.schema.clone(), t.name.clone())) {
                return Err(bad(format!(
                    "table {}.{} is listed twice",
                    t.schema, t.name
                )));
            }
        }
        Ok(plan)
    }

    /// Checks the plan against the database it is about to change: the same
    /// database, every table present, every role present.
    pub fn check_against(&self, inv: &Inventory, path: &str) -> Result<()> {
        let bad = |detail: String| Error::BadPlan {
            path: path.to_string(),
            detail,
        };
        if inv.database != self.database || inv.system_identifier != self.system_identifier {
            return Err(bad(format!(
                "it was made for database {:?} (system {}), but this is {:?} (system {}); nothing was changed",
                self.database, self.system_identifier, inv.database, inv.system_identifier
            )));
        }
        for t in &self.tables {
            if inv.table(&Table::new(&t.schema, &t.name)).is_none() {
                return Err(bad(format!(
                    "table {:?}.{:?} is not in the database; nothing was changed",
                    t.schema, t.name
                )));
            }
        }
        for r in &self.app_roles {
            if !inv.roles.iter().any(|x| &x.name == r) {
                return Err(bad(format!(
                    "app role {r:?} does not exist; nothing was changed"
                )));
            }
        }
        for r in &self.tenant_roles {
            if !inv.roles.iter().any(|x| &x.name == r) {
                return Err(bad(format!(
                    "tenant role {r:?} does not exist; nothing was changed"
                )));
            }
        }
        for v in &self.views {
            let t = Table::new(&v.schema, &v.name);
            let Some(info) = inv.views.iter().find(|i| i.view == t) else {
                return Err(bad(format!(
                    "view {:?}.{:?} is not in the database; nothing was changed",
                    v.schema, v.name
                )));
            };
            let fits = match v.action {
                ViewAction::Invoker => !info.materialized,
                ViewAction::Revoke => info.materialized,
                ViewAction::Keep => true,
            };
            if !fits {
                return Err(bad(format!(
                    "view {t}: action {:?} is for {}; a {} takes {}",
                    v.action.as_str(),
                    if info.materialized {
                        "views"
                    } else {
                        "materialized views"
                    },
                    if info.materialized {
                        "materialized view"
                    } else {
                        "view"
                    },
                    if info.materialized {
                        "\"revoke\" or \"keep\""
                    } else {
                        "\"invoker\" or \"keep\""
                    },
                )));
            }
        }
        Ok(())
    }

    fn zero_literal(&self) -> String {
        format!("{}::{}", literal(&self.tenant_zero.id), self.id_type.sql())
    }

    /// The tenant-owned tables, in plan order.
    pub fn owned(&self) -> impl Iterator<Item = &PlannedTable> {
        self.tables.iter().filter(|t| t.class == Class::TenantOwned)
    }

    /// Every step, in the order they run.
    pub fn steps(&self, inv: &Inventory) -> Vec<Step> {
        let mut steps = vec![self.spine()];
        let owned: Vec<(&PlannedTable, &TableInfo)> = self
            .owned()
            .filter_map(|p| inv.table(&Table::new(&p.schema, &p.name)).map(|i| (p, i)))
            .collect();
        for (p, info) in &owned {
            steps.push(self.column(p, info));
        }
        for (p, info) in &owned {
            steps.push(self.default(p, info));
        }
        for (p, info) in &owned {
            steps.push(self.backfill(p, info));
        }
        for (p, info) in &owned {
            steps.push(self.index(p, info));
        }
        for (p, info) in &owned {
            steps.push(self.tighten(p, info));
        }
        // Views that read other planned views first, so that the readers a view
        // step grants are readers of the inner view when its own step runs.
        let mut views: Vec<(usize, &PlannedView)> = self
            .views
            .iter()
            // Without tenant roles there is nobody to take a materialized view
            // from; the step comes once the plan names them.
            .filter(|v| {
                v.action == ViewAction::Invoker
                    || (v.action == ViewAction::Revoke && !self.tenant_roles.is_empty())
            })
            .map(|v| (view_depth(inv, &Table::new(&v.schema, &v.name), 0), v))
            .collect();
        views.sort_by_key(|v| std::cmp::Reverse(v.0));
        for (_, v) in views {
            steps.push(match v.action {
                ViewAction::Revoke => self.revoke_view(v),
                _ => self.invoker_view(v),
            });
        }
        steps
    }

    /// `CREATE TABLE` for the record of grants made by view steps, which their
    /// undo reverses.
    fn grants_table() -> Statement {
        stmt(
            "CREATE TABLE IF NOT EXISTS tenancy_private.grants (id bigserial PRIMARY KEY, step text NOT NULL, undo text NOT NULL)",
        )
    }

    /// Undoes what a view step granted or revoked, newest first.
    fn undo_grants(step: &str) -> Statement {
        let step = literal(step);
        stmt(safe_do(
            &format!(
            "DO $undo$
DECLARE
    r record;
BEGIN
    IF pg_catalog.to_regclass('tenancy_private.grants') IS NULL THEN
        RETURN;
    END IF;
    FOR r IN SELECT g.undo FROM tenancy_private.grants g WHERE g.step = {step} ORDER BY g.id DESC LOOP
        EXECUTE r.undo;
    END LOOP;
    DELETE FROM tenancy_private.grants WHERE step = {step};
END $undo$"
            ),
            "undo",
        ))
    }

    /// A view made `security_invoker`, after every role that reads it today was
    /// granted each column it reads (recorded, so revert takes them back), and
    /// checked, in the same statement.
    fn invoker_view(&self, v: &PlannedView) -> Step {
        let t = Table::new(&v.schema, &v.name);
        let id = format!("view:{}", key(&t));
        let view = format!("{}::pg_catalog.regclass", literal(&t.sql()));
        let step = literal(&id);
        // What each reader would lack: a column the view reads, or, for a
        // relation it reads no column of (count(*)), any column at all.
        let lacking = format!(
            "SELECT ro.rolname, pg_catalog.quote_ident(bn.nspname) || '.' || pg_catalog.quote_ident(b.relname) AS base, a.attname
        FROM pg_catalog.pg_rewrite rw
        JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass AND d.objid = rw.oid
             AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid <> rw.ev_class
        JOIN pg_catalog.pg_class b ON b.oid = d.refobjid AND b.relkind IN ('r', 'p', 'v', 'm', 'f')
        JOIN pg_catalog.pg_namespace bn ON bn.oid = b.relnamespace
        JOIN pg_catalog.pg_attribute a ON a.attrelid = b.oid AND NOT a.attisdropped AND a.attnum > 0
             AND (a.attnum = d.refobjsubid
                  OR (d.refobjsubid = 0 AND a.attnum = (SELECT pg_catalog.min(x.attnum) FROM pg_catalog.pg_attribute x
                                                        WHERE x.attrelid = b.oid AND x.attnum > 0 AND NOT x.attisdropped)
                      AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d2 WHERE d2.objid = rw.oid AND d2.refobjid = b.oid AND d2.refobjsubid > 0)))
        CROSS JOIN pg_catalog.pg_roles ro
        WHERE rw.ev_class = {view}
          AND NOT ro.rolsuper AND ro.rolname OPERATOR(pg_catalog.!~) '^pg_'
          AND pg_catalog.has_any_column_privilege(ro.oid, {view}, 'SELECT')
          AND NOT pg_catalog.has_column_privilege(ro.oid, b.oid, a.attnum, 'SELECT')"
        );
        let forward = format!(
            "DO $view$
DECLARE
    r record;
BEGIN
    IF pg_catalog.current_setting('server_version_num')::int < 150000 THEN
        RAISE EXCEPTION 'view % runs as its owner and security_invoker views need PostgreSQL 15 or later; nothing was changed. Fix: set action = \"keep\" for it in the plan and revoke the tenant roles'' access to it', {name};
    END IF;
    FOR r IN {lacking} LOOP
        EXECUTE pg_catalog.format('GRANT SELECT (%I) ON %s TO %I', r.attname, r.base, r.rolname);
        INSERT INTO tenancy_private.grants (step, undo)
        VALUES ({step}, pg_catalog.format('REVOKE SELECT (%I) ON %s FROM %I', r.attname, r.base, r.rolname));
    END LOOP;
    FOR r IN {lacking} LOOP
        RAISE EXCEPTION 'role % may read view % but not column % of %, so it would get an error once the view runs as its reader; nothing was changed. Fix: GRANT SELECT (%) ON % TO %',
            r.rolname, {name}, r.attname, r.base, pg_catalog.quote_ident(r.attname), r.base, pg_catalog.quote_ident(r.rolname);
    END LOOP;
    ALTER VIEW {sql} SET (security_invoker = true);
END $view$",
            name = literal(&t.to_string()),
            sql = t.sql(),
        );
        let forward = safe_do(&forward, "view");
        Step {
            id: id.clone(),
            kind: StepKind::View,
            table: Some(t.clone()),
            forward: vec![Plan::grants_table(), stmt(forward)],
            undo: vec![
                stmt(format!("ALTER VIEW {} RESET (security_invoker)", t.sql())),
                Plan::undo_grants(&id),
            ],
            lock: "ACCESS EXCLUSIVE on the view, for a moment".into(),
            hazard: Hazard::VisibilityChange,
            undo_hazard: Hazard::VisibilityChange,
            note: format!(
                "runs as its reader (security_invoker), so row level security applies to whoever reads {t}; its readers are granted the columns it reads first"
            ),
        }
    }

    /// The tenant roles lose SELECT on a materialized view, which holds every
    /// tenant's rows; a role that reads it through PUBLIC and is no tenant role
    /// is granted SELECT by name first, so it keeps reading it. Recorded for
    /// revert; checked in the same statement.
    fn revoke_view(&self, v: &PlannedView) -> Step {
        let t = Table::new(&v.schema, &v.name);
        let id = format!("view:{}", key(&t));
        let mv = format!("{}::pg_catalog.regclass", literal(&t.sql()));
        let step = literal(&id);
        let tenants: Vec<String> = self.tenant_roles.iter().map(|r| literal(r)).collect();
        let tenants = format!("ARRAY[{}]::text[]", tenants.join(", "));
        // The name as written in the grants and their undo: qualified and
        // quoted, whatever the search_path of the session that reverts.
        let qual = literal(&t.sql());
        let forward = format!(
            "DO $revoke$
DECLARE
    r record;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
               WHERE c.oid = {mv} AND a.grantee = 0 AND a.privilege_type = 'SELECT') THEN
        FOR r IN SELECT ro.rolname FROM pg_catalog.pg_roles ro
                 WHERE NOT ro.rolsuper AND ro.rolname OPERATOR(pg_catalog.!~) '^pg_'
                   AND ro.rolname::text <> ALL ({tenants})
                   AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
                                   WHERE c.oid = {mv} AND a.grantee = ro.oid AND a.privilege_type = 'SELECT')
                   AND ro.oid <> (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = {mv}) LOOP
            EXECUTE pg_catalog.format('GRANT SELECT ON %s TO %I', {qual}, r.rolname);
            INSERT INTO tenancy_private.grants (step, undo)
            VALUES ({step}, pg_catalog.format('REVOKE SELECT ON %s FROM %I', {qual}, r.rolname));
        END LOOP;
        EXECUTE pg_catalog.format('REVOKE SELECT ON %s FROM PUBLIC', {qual});
        INSERT INTO tenancy_private.grants (step, undo)
        VALUES ({step}, pg_catalog.format('GRANT SELECT ON %s TO PUBLIC', {qual}));
    END IF;
    FOR r IN SELECT ro.rolname FROM pg_catalog.pg_roles ro
             WHERE ro.rolname::text = ANY ({tenants})
               AND EXISTS (SELECT 1 FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
                           WHERE c.oid = {mv} AND a.grantee = ro.oid AND a.privilege_type = 'SELECT') LOOP
        EXECUTE pg_catalog.format('REVOKE SELECT ON %s FROM %I', {qual}, r.rolname);
        INSERT INTO tenancy_private.grants (step, undo)
        VALUES ({step}, pg_catalog.format('GRANT SELECT ON %s TO %I', {qual}, r.rolname));
    END LOOP;
    FOR r IN SELECT ro.rolname FROM pg_catalog.pg_roles ro
             WHERE ro.rolname::text = ANY ({tenants}) AND pg_catalog.has_table_privilege(ro.oid, {mv}, 'SELECT') LOOP
        RAISE EXCEPTION 'tenant role % may still read materialized view %, which holds every tenant''s rows, through a role it belongs to; nothing was changed. Fix: revoke SELECT on it from that role, or set action = \"keep\" for it in the plan',
            r.rolname, {name};
    END LOOP;
END $revoke$",
            name = literal(&t.to_string()),
        );
        let forward = safe_do(&forward, "revoke");
        Step {
            id: id.clone(),
            kind: StepKind::View,
            table: Some(t.clone()),
            forward: vec![Plan::grants_table(), stmt(forward)],
            undo: vec![Plan::undo_grants(&id)],
            lock: "none that blocks readers".into(),
            hazard: Hazard::VisibilityChange,
            undo_hazard: Hazard::VisibilityChange,
            note: if self.tenant_roles.is_empty() {
                format!(
                    "materialized, so it holds every tenant's rows: the tenant roles lose SELECT on {t} (the plan names none yet); every other reader keeps it"
                )
            } else {
                format!(
                    "materialized, so it holds every tenant's rows: the tenant roles ({}) lose SELECT on {t}; every other reader keeps it",
                    self.tenant_roles.join(", ")
                )
            },
        }
    }

    fn spine(&self) -> Step {
        let ty = self.id_type.sql();
        let owner = quote(HELPERS_OWNER);
        let owner_lit = literal(HELPERS_OWNER);
        let zero = self.zero_literal();
        let id_default = match self.id_type {
            IdType::Uuid => "gen_random_uuid()",
            IdType::Bigint => "nextval('tenancy.organization_ids')",
        };
        let mut forward = vec![
            stmt("CREATE SCHEMA IF NOT EXISTS tenancy"),
            stmt("CREATE SCHEMA IF NOT EXISTS tenancy_private"),
        ];
        if self.id_type == IdType::Bigint {
            forward.push(stmt(format!(
                "CREATE SEQUENCE IF NOT EXISTS tenancy.organization_ids START {}",
                self.tenant_zero.id.parse::<i64>().unwrap_or(1) + 1
            )));
        }
        forward.extend([
            stmt(format!(
                "CREATE TABLE IF NOT EXISTS tenancy.organizations (
    id {ty} PRIMARY KEY DEFAULT {id_default},
    slug text NOT NULL UNIQUE,
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)"
            )),
            stmt(format!(
                "CREATE TABLE IF NOT EXISTS tenancy.units (
    id bigserial PRIMARY KEY,
    organization_id {ty} NOT NULL REFERENCES tenancy.organizations (id),
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (organization_id, name)
)"
            )),
            stmt(format!(
                "CREATE TABLE IF NOT EXISTS tenancy.members (
    organization_id {ty} NOT NULL REFERENCES tenancy.organizations (id),
    unit_id bigint REFERENCES tenancy.units (id),
    identity text NOT NULL,
    role text NOT NULL DEFAULT 'member',
    PRIMARY KEY (organization_id, identity)
)"
            )),
            // Every foreign key of the spine has an index, as linters expect.
            stmt("CREATE INDEX IF NOT EXISTS members_unit_id_idx ON tenancy.members (unit_id)"),
            stmt(
                "CREATE TABLE IF NOT EXISTS tenancy_private.settings (key text PRIMARY KEY, value text NOT NULL)",
            ),
            stmt(
                "CREATE TABLE IF NOT EXISTS tenancy_private.journal (
    step text PRIMARY KEY,
    done_at timestamptz NOT NULL DEFAULT now()
)",
            ),
            stmt(
                "CREATE TABLE IF NOT EXISTS tenancy_private.backfill (
    table_name text PRIMARY KEY,
    upper_key text[],
    last_key text[],
    rows_done bigint NOT NULL DEFAULT 0,
    keyset_done boolean NOT NULL DEFAULT false,
    done boolean NOT NULL DEFAULT false
)",
            ),
            stmt(format!(
                "INSERT INTO tenancy.organizations (id, slug, name) VALUES ({zero}, {}, {}) ON CONFLICT DO NOTHING",
                literal(&self.tenant_zero.slug),
                literal(&self.tenant_zero.name)
            )),
            stmt(format!(
                "INSERT INTO tenancy.units (organization_id, name) VALUES ({zero}, 'main') ON CONFLICT DO NOTHING"
            )),
            stmt(format!(
                "INSERT INTO tenancy_private.settings (key, value) VALUES ('tenant_zero', {}), ('single_tenant_mode', 'on'), ('tenant_context', {}) ON CONFLICT (key) DO NOTHING",
                literal(&self.tenant_zero.id),
                literal(self.tenant_context.as_str())
            )),
            // The tenant of the current transaction: the transaction-local
            // setting (checked against the id's shape before the cast, so a
            // malformed value is no tenant rather than an error), or in member
            // mode the one organization the member identity belongs to. An
            // unknown tenant matches no row, and the foreign key refuses rows
            // written for it; the setting mode reads no table, because this runs
            // for every query on an enforced table. See `current_tenant_function`
            // for why the two modes are different kinds of function.
            stmt(self.current_tenant_function()),
            // What a new row's tenant_id defaults to: the transaction's tenant, or
            // tenant zero while the database is in single-tenant compatibility
            // mode, or NULL.
            stmt(format!(
                "CREATE OR REPLACE FUNCTION tenancy_private.default_tenant_id() RETURNS {ty}
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
AS $fn$
DECLARE
    v_found {ty} := tenancy_private.current_tenant_id();
BEGIN
    IF v_found IS NULL THEN
        SELECT s.value::{ty} INTO v_found
        FROM tenancy_private.settings AS t0, tenancy_private.settings AS s
        WHERE t0.key = 'single_tenant_mode' AND t0.value = 'on' AND s.key = 'tenant_zero';
    END IF;
    RETURN v_found;
END
$fn$"
            )),
            stmt("REVOKE ALL ON FUNCTION tenancy_private.current_tenant_id() FROM PUBLIC"),
            stmt("REVOKE ALL ON FUNCTION tenancy_private.default_tenant_id() FROM PUBLIC"),
            // The helpers belong to a role nobody can log in as, holding only
            // what they read, so SECURITY DEFINER grants nothing more.
            stmt(format!(
                "DO $role$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = {owner_lit}) THEN
        CREATE ROLE {owner} NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $role$"
            )),
            stmt(format!("GRANT USAGE ON SCHEMA tenancy, tenancy_private TO {owner}")),
            stmt(format!(
                "GRANT SELECT ON tenancy.organizations, tenancy.members, tenancy_private.settings TO {owner}"
            )),
            stmt(format!(
                "ALTER FUNCTION tenancy_private.current_tenant_id() OWNER TO {owner}"
            )),
            stmt(format!(
                "ALTER FUNCTION tenancy_private.default_tenant_id() OWNER TO {owner}"
            )),
        ]);
        for role in self.app_roles.iter().chain(&self.tenant_roles) {
            forward.push(stmt(format!(
                "GRANT USAGE ON SCHEMA tenancy_private TO {}",
                quote(role)
            )));
            forward.push(stmt(format!(
                "GRANT EXECUTE ON FUNCTION tenancy_private.default_tenant_id(), tenancy_private.current_tenant_id() TO {}",
                quote(role)
            )));
        }
        Step {
            id: "spine".into(),
            kind: StepKind::Spine,
            table: None,
            forward,
            undo: vec![
                stmt("DROP SCHEMA IF EXISTS tenancy_private CASCADE"),
                stmt("DROP SCHEMA IF EXISTS tenancy CASCADE"),
            ],
            lock: "none on application tables".into(),
            hazard: Hazard::None,
            undo_hazard: Hazard::Destructive,
            note: format!(
                "schemas tenancy and tenancy_private, tenant zero {:?} ({}) and its first unit, the helper functions",
                self.tenant_zero.name, self.tenant_zero.id
            ),
        }
    }

    /// `tenancy_private.current_tenant_id()`, for the plan's tenant context.
    ///
    /// The setting mode's helper reads no table, so it needs no rights of its
    /// own: it is plain SQL, run with its caller's rights, which PostgreSQL
    /// inlines into the policy (issue 21 measured a point lookup at 1.39× the cost
    /// of no RLS with a `SECURITY DEFINER` PL/pgSQL helper: one call, with its
    /// `search_path` switch, per query). Every name in it is schema-qualified, and
    /// a caller that changes its `search_path` gains nothing it does not already
    /// have: the setting is its to set.
    ///
    /// The member mode's helper reads `tenancy.members`, which tenant roles may
    /// not read: it stays hidden, `SECURITY DEFINER` with a pinned `search_path`,
    /// owned by a role that can read only the spine. PL/pgSQL, not SQL: a
    /// `SECURITY DEFINER` SQL function is never inlined, and PostgreSQL before 18
    /// plans its body again for every query that calls it (measured: 7× the cost
    /// of a point lookup), while PL/pgSQL keeps its plans for the session.
    fn current_tenant_function(&self) -> String {
        let ty = self.id_type.sql();
        let shape = literal(self.id_type.shape());
        let body = match self.tenant_context {
            TenantContext::Setting => {
                let setting = "pg_catalog.current_setting('ficus.tenant_id', true)";
                let qualified = match self.id_type {
                    IdType::Bigint => "pg_catalog.int8",
                    IdType::Uuid => "pg_catalog.uuid",
                };
                return format!(
                    "CREATE OR REPLACE FUNCTION tenancy_private.current_tenant_id() RETURNS {ty}
    LANGUAGE sql STABLE PARALLEL SAFE
AS $fn$
SELECT CASE WHEN {setting} OPERATOR(pg_catalog.~) {shape}
    THEN {setting}::{qualified} END
$fn$"
                );
            }
            TenantContext::Member => "BEGIN
    SELECT (pg_catalog.array_agg(m.organization_id))[1] INTO v_found
    FROM tenancy.members AS m
    WHERE m.identity = pg_catalog.current_setting('ficus.member', true)
      AND coalesce(v_wanted, '') IN ('', m.organization_id::text)
    HAVING pg_catalog.count(*) = 1;
    RETURN v_found;
END"
            .to_string(),
        };
        format!(
            "CREATE OR REPLACE FUNCTION tenancy_private.current_tenant_id() RETURNS {ty}
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
AS $fn$
DECLARE
    v_wanted text := pg_catalog.current_setting('ficus.tenant_id', true);
    v_found {ty};
{body}
$fn$"
        )
    }

    fn column(&self, p: &PlannedTable, info: &TableInfo) -> Step {
        let t = &info.table;
        let ty = self.id_type.sql();
        let (sql, note) = match p.backfill {
            Backfill::Batched => (
                format!(
                    "ALTER TABLE {} ADD COLUMN IF NOT EXISTS tenant_id {ty}",
                    t.sql()
                ),
                "nullable, no default, no constraint: catalog-only".to_string(),
            ),
            Backfill::Instant => (
                format!(
                    "ALTER TABLE {} ADD COLUMN IF NOT EXISTS tenant_id {ty} DEFAULT {}",
                    t.sql(),
                    self.zero_literal()
                ),
                "with tenant zero as default: catalog-only, stamps every existing row without writing it".to_string(),
            ),
        };
        Step {
            id: format!("column:{}", key(t)),
            kind: StepKind::Column,
            table: Some(t.clone()),
            forward: vec![stmt(sql)],
            // An isolation policy made by an earlier build's apply step, on a
            // table never enforced, would hold the column.
            undo: vec![
                stmt(format!("DROP POLICY IF EXISTS {POLICY} ON {}", t.sql())),
                stmt(format!(
                    "ALTER TABLE {} DROP COLUMN IF EXISTS tenant_id",
                    t.sql()
                )),
            ],
            lock: "ACCESS EXCLUSIVE, for a moment".into(),
            hazard: Hazard::BriefExclusiveLock,
            undo_hazard: Hazard::Destructive,
            note,
        }
    }

    fn default(&self, _p: &PlannedTable, info: &TableInfo) -> Step {
        let t = &info.table;
        let rel = format!("{}::regclass", literal(&t.sql()));
        // Every role that may insert into the table evaluates the new default,
        // so each gets what that takes before the default is set: the owner, a
        // role's own grant, a role whose membership gives it the privilege, and
        // PUBLIC when PUBLIC may insert (then every role may). Decided when the
        // step runs, from the catalogs as they are then; revert drops the schema
        // and the function, and the grants with them. Regression: the owner, not
        // connected when the plan was made, lost every INSERT of the live app.
        let may_insert = format!(
            "SELECT ro.rolname FROM pg_catalog.pg_roles ro
        WHERE ro.rolname OPERATOR(pg_catalog.!~) '^pg_' AND NOT ro.rolsuper
          AND pg_catalog.has_any_column_privilege(ro.oid, {rel}, 'INSERT')
          AND NOT (pg_catalog.has_schema_privilege(ro.oid, 'tenancy_private', 'USAGE')
                   AND pg_catalog.has_function_privilege(ro.oid, 'tenancy_private.default_tenant_id()', 'EXECUTE'))"
        );
        // One statement, so that a refusal leaves nothing behind: the grants,
        // then the invariant checked (no role that may insert today would get
        // an error from the default), then the default.
        let forward = format!(
            "DO $default$
DECLARE
    r record;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
               WHERE c.oid = {rel} AND a.grantee = 0 AND a.privilege_type = 'INSERT')
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_attribute at, pg_catalog.aclexplode(at.attacl) a
                  WHERE at.attrelid = {rel} AND a.grantee = 0 AND a.privilege_type = 'INSERT') THEN
        GRANT USAGE ON SCHEMA tenancy_private TO PUBLIC;
        GRANT EXECUTE ON FUNCTION tenancy_private.default_tenant_id() TO PUBLIC;
    END IF;
    FOR r IN {may_insert} LOOP
        EXECUTE pg_catalog.format('GRANT USAGE ON SCHEMA tenancy_private TO %I', r.rolname);
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION tenancy_private.default_tenant_id() TO %I', r.rolname);
    END LOOP;
    FOR r IN {may_insert} LOOP
        RAISE EXCEPTION 'role % may INSERT into % today but could not evaluate tenancy_private.default_tenant_id(), so the default would break its inserts; nothing was changed. Fix: GRANT USAGE ON SCHEMA tenancy_private TO %; GRANT EXECUTE ON FUNCTION tenancy_private.default_tenant_id() TO %',
            pg_catalog.quote_ident(r.rolname), {name}, pg_catalog.quote_ident(r.rolname), pg_catalog.quote_ident(r.rolname);
    END LOOP;
    ALTER TABLE {table} ALTER COLUMN tenant_id SET DEFAULT tenancy_private.default_tenant_id();
END $default$",
            name = literal(&t.to_string()),
            table = t.sql(),
        );
        Step {
            id: format!("default:{}", key(t)),
            kind: StepKind::Default,
            table: Some(t.clone()),
            forward: vec![stmt(safe_do(&forward, "default"))],
            undo: vec![stmt(format!(
                "ALTER TABLE {} ALTER COLUMN tenant_id DROP DEFAULT",
                t.sql()
            ))],
            lock: "ACCESS EXCLUSIVE, for a moment".into(),
            hazard: Hazard::BriefExclusiveLock,
            undo_hazard: Hazard::BriefExclusiveLock,
            note: "rows written from now on are stamped: the transaction's tenant, or tenant zero"
                .into(),
        }
    }

    fn backfill(&self, p: &PlannedTable, info: &TableInfo) -> Step {
        let t = &info.table;
        Step {
            id: format!("backfill:{}", key(t)),
            kind: StepKind::Backfill,
            table: Some(t.clone()),
            forward: Vec::new(),
            undo: Vec::new(),
            lock: "row locks on one batch at a time (FOR NO KEY UPDATE SKIP LOCKED)".into(),
            hazard: Hazard::Batches,
            undo_hazard: Hazard::None,
            note: match (p.backfill, info.primary_key.is_empty()) {
                (Backfill::Instant, _) => {
                    "instant: checks that no row lacks tenant zero".to_string()
                }
                (Backfill::Batched, false) => format!(
                    "keyset batches on ({}) up to the key at start, then a catch-up pass; about {} rows",
                    info.primary_key
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    info.row_estimate
                ),
                (Backfill::Batched, true) => format!(
                    "batches by ctid (no primary key); about {} rows",
                    info.row_estimate
                ),
            },
        }
    }

    fn index(&self, _p: &PlannedTable, info: &TableInfo) -> Step {
        let t = &info.table;
        let name = t.object_name("tenant_id_idx");
        let exists = |table: &Table, index: &str| {
            format!(
                "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                   WHERE i.indrelid = to_regclass({}) AND c.relname = {} AND i.indisvalid)",
                literal(&table.sql()),
                literal(index)
            )
        };
        let mut forward = Vec::new();
        let mut undo = Vec::new();
        if info.partitioned {
            forward.push(stmt_unless(
                format!(
                    "CREATE INDEX IF NOT EXISTS {} ON ONLY {} (tenant_id)",
                    quote(&name),
                    t.sql()
                ),
                format!(
                    "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = {} AND c.relname = {})",
                    literal(&t.schema),
                    literal(&name)
                ),
            ));
            for part in &info.partitions {
                let pname = part.object_name("tenant_id_idx");
                forward.push(Statement {
                    sql: format!(
                        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} (tenant_id)",
                        quote(&pname),
                        part.sql()
                    ),
                    concurrent: true,
                    done_if: Some(exists(part, &pname)),
                });
                forward.push(stmt_unless(
                    format!(
                        "ALTER INDEX {}.{} ATTACH PARTITION {}.{}",
                        quote(&t.schema),
                        quote(&name),
                        quote(&part.schema),
                        quote(&pname)
                    ),
                    format!(
                        "SELECT EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
                           WHERE c.relname = {} AND p.relname = {})",
                        literal(&pname),
                        literal(&name)
                    ),
                ));
            }
            undo.push(stmt(format!(
                "DROP INDEX IF EXISTS {}.{}",
                quote(&t.schema),
                quote(&name)
            )));
        } else {
            forward.push(Statement {
                sql: format!(
                    "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} (tenant_id)",
                    quote(&name),
                    t.sql()
                ),
                concurrent: true,
                done_if: Some(exists(t, &name)),
            });
            undo.push(Statement {
                sql: format!(
                    "DROP INDEX CONCURRENTLY IF EXISTS {}.{}",
                    quote(&t.schema),
                    quote(&name)
                ),
                concurrent: true,
                done_if: None,
            });
        }
        Step {
            id: format!("index:{}", key(t)),
            kind: StepKind::Index,
            table: Some(t.clone()),
            forward,
            undo,
            lock: "SHARE UPDATE EXCLUSIVE (reads and writes continue)".into(),
            hazard: Hazard::Scan,
            undo_hazard: Hazard::None,
            note: format!(
                "CREATE INDEX CONCURRENTLY {name}{}; an invalid index left by a failed build is dropped and rebuilt",
                if info.partitioned {
                    ", one per partition, attached to the parent's"
                } else {
                    ""
                }
            ),
        }
    }

    fn tighten(&self, _p: &PlannedTable, info: &TableInfo) -> Step {
        let t = &info.table;
        let check = t.object_name("tenant_id_not_null");
        let fk = t.object_name("tenant_id_fkey");
        let has = |name: &str| {
            format!(
                "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = to_regclass({}) AND conname = {})",
                literal(&t.sql()),
                literal(name)
            )
        };
        let not_null = format!(
            "SELECT attnotnull FROM pg_attribute WHERE attrelid = to_regclass({}) AND attname = 'tenant_id'",
            literal(&t.sql())
        );
        let mut forward = Vec::new();
        if info.partitioned {
            // PostgreSQL cannot add NOT VALID constraints to a partitioned table:
            // these check every partition under lock (hazard: scan).
            forward.push(stmt_unless(
                format!(
                    "ALTER TABLE {} ALTER COLUMN tenant_id SET NOT NULL",
                    t.sql()
                ),
                not_null,
            ));
            forward.push(stmt_unless(
                format!(
                    "ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY (tenant_id) REFERENCES tenancy.organizations (id)",
                    t.sql(),
                    quote(&fk)
                ),
                has(&fk),
            ));
        } else {
            forward.extend([
                stmt_unless(
                    format!(
                        "ALTER TABLE {} ADD CONSTRAINT {} CHECK (tenant_id IS NOT NULL) NOT VALID",
                        t.sql(),
                        quote(&check)
                    ),
                    format!("SELECT ({}) OR ({})", has(&check), not_null),
                ),
                stmt_unless(
                    format!("ALTER TABLE {} VALIDATE CONSTRAINT {}", t.sql(), quote(&check)),
                    format!(
                        "SELECT coalesce((SELECT convalidated FROM pg_constraint WHERE conrelid = to_regclass({}) AND conname = {}), true)",
                        literal(&t.sql()),
                        literal(&check)
                    ),
                ),
                stmt_unless(
                    format!("ALTER TABLE {} ALTER COLUMN tenant_id SET NOT NULL", t.sql()),
                    not_null,
                ),
                stmt(format!(
                    "ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}",
                    t.sql(),
                    quote(&check)
                )),
                stmt_unless(
                    format!(
                        "ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY (tenant_id) REFERENCES tenancy.organizations (id) NOT VALID",
                        t.sql(),
                        quote(&fk)
                    ),
                    has(&fk),
                ),
                stmt_unless(
                    format!("ALTER TABLE {} VALIDATE CONSTRAINT {}", t.sql(), quote(&fk)),
                    format!(
                        "SELECT coalesce((SELECT convalidated FROM pg_constraint WHERE conrelid = to_regclass({}) AND conname = {}), true)",
                        literal(&t.sql()),
                        literal(&fk)
                    ),
                ),
            ]);
        }
        Step {
            id: format!("tighten:{}", key(t)),
            kind: StepKind::Tighten,
            table: Some(t.clone()),
            forward,
            undo: vec![
                stmt(format!(
                    "ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}",
                    t.sql(),
                    quote(&fk)
                )),
                stmt(format!(
                    "ALTER TABLE {} ALTER COLUMN tenant_id DROP NOT NULL",
                    t.sql()
                )),
                stmt(format!(
                    "ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}",
                    t.sql(),
                    quote(&check)
                )),
            ],
            lock: if info.partitioned {
                "ACCESS EXCLUSIVE while every partition is checked".into()
            } else {
                "ACCESS EXCLUSIVE for moments; validation under SHARE UPDATE EXCLUSIVE".into()
            },
            hazard: if info.partitioned {
                Hazard::Scan
            } else {
                Hazard::BriefExclusiveLock
            },
            undo_hazard: Hazard::BriefExclusiveLock,
            note: "CHECK NOT VALID → VALIDATE → SET NOT NULL; foreign key to tenancy.organizations NOT VALID → VALIDATE".into(),
        }
    }
}

/// A table's key in the journal: `schema.name` with the raw names.
pub fn key(t: &Table) -> String {
    format!("{}.{}", t.schema, t.name)
}

/// One comment line of the plan file: a name holding a line break (names may)
/// must not write TOML of its own into the file.
fn comment(line: &str) -> String {
    let mut out: String = line
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    out.push('\n');
    out
}

/// The views and materialized views that read a table `owned` says yes to,
/// directly or through other views (and partitions of such tables).
pub fn tenant_views(inv: &Inventory, owned: impl Fn(&Table) -> bool) -> Vec<&ViewInfo> {
    let mut tenant: BTreeSet<Table> = inv
        .tables
        .iter()
        .filter(|t| owned(&t.table))
        .flat_map(|t| std::iter::once(t.table.clone()).chain(t.partitions.iter().cloned()))
        .collect();
    loop {
        let before = tenant.len();
        for v in &inv.views {
            if v.bases.iter().any(|b| tenant.contains(b)) {
                tenant.insert(v.view.clone());
            }
        }
        if tenant.len() == before {
            break;
        }
    }
    inv.views
        .iter()
        .filter(|v| tenant.contains(&v.view))
        .collect()
}

/// How many views deep `t` is (0 for a table), bounded against cycles.
fn view_depth(inv: &Inventory, t: &Table, seen: usize) -> usize {
    match inv.views.iter().find(|v| &v.view == t) {
        Some(v) if seen < 64 => {
            1 + v
                .bases
                .iter()
                .map(|b| view_depth(inv, b, seen + 1))
                .max()
                .unwrap_or(0)
        }
        _ => 0,
    }
}

/// The roles the live app may connect as, each with why: every login role
/// (superusers aside: they bypass everything Ficus adds) that may use a
/// tenant-owned table, by owning it, by its own grant, through a role it belongs
/// to or through PUBLIC, and every role connected now. Read from the catalogs,
/// because the app need not be connected when the plan is made.
pub fn app_role_reasons(inv: &Inventory) -> BTreeMap<String, String> {
    let owned: BTreeSet<&Table> = inv
        .tables
        .iter()
        .filter(|t| t.class == Class::TenantOwned)
        .map(|t| &t.table)
        .collect();
    let views = tenant_views(inv, |t| owned.contains(t));
    let mut out = BTreeMap::new();
    for r in inv.roles.iter().filter(|r| r.can_login && !r.superuser) {
        let uses: Vec<&crate::inspect::Access> = r
            .access
            .iter()
            .filter(|a| owned.contains(&a.table))
            .collect();
        // A role that reads a view over tenant-owned tables reads those tables
        // once the view runs as its reader: it is the live app too.
        let reads_view = views
            .iter()
            .find(|v| v.readers.iter().any(|x| x == &r.name));
        let why = match uses.as_slice() {
            [] if reads_view.is_some() => format!(
                "reads {} {} (over tenant-owned tables)",
                if reads_view.is_some_and(|v| v.materialized) {
                    "materialized view"
                } else {
                    "view"
                },
                reads_view.map(|v| v.view.to_string()).unwrap_or_default()
            ),
            [] if r.connected => "connected now".to_string(),
            [] => continue,
            [one] => one.describe(),
            [first, rest @ ..] => format!(
                "{} and {} more tenant-owned table{}",
                first.describe(),
                rest.len(),
                if rest.len() == 1 { "" } else { "s" }
            ),
        };
        out.insert(r.name.clone(), why);
    }
    out
}

/// Lowercase letters, digits and single '-'.
pub fn slugify(raw: &str) -> String {
    let mut out = String::new();
    for c in raw.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.trim_end_matches('-').chars().take(63).collect()
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && [8, 4, 4, 4, 12]
            .iter()
            .zip(&parts)
            .all(|(n, p)| p.len() == *n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn random_uuid() -> Result<String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b)
        .map_err(|e| Error::Refused(format!("no randomness for tenant zero's id: {e}")))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_and_uuids() {
        assert_eq!(slugify("Acme Homes, Inc."), "acme-homes-inc");
        assert_eq!(slugify("  --  "), "");
        let u = random_uuid().unwrap();
        assert!(is_uuid(&u), "{u}");
        assert!(!is_uuid("not-a-uuid"));
    }
}
