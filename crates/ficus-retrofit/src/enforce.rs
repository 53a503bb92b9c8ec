//! `ficus db enforce` / `unenforce`: row level security turned on one table and
//! one phase at a time, each phase proved before it commits.
//!
//! Phases: *off* → *enabled* (RLS on, plus a pass-through policy for the live
//! app's roles, so the app sees no change while the tenant roles are already
//! isolated) → *enforced* (the pass-through is replaced by the single-tenant
//! policy: the live app, which knows nothing of tenants, sees tenant zero's rows
//! — the customer it was written for — and what it inserts is stamped with
//! tenant zero, while every other tenant's rows become invisible to it; `FORCE`
//! when an app role owns the table, because owners bypass row level security).
//! Roles with `BYPASSRLS` and superusers see every row in every phase; the
//! pre-checks say so.
//!
//! Each phase is one short transaction under the lock timeout; before it
//! commits, the same transaction switches to each tenant role and each app role
//! and counts: in tenant zero's context a tenant role must see every row that
//! belongs to no other tenant — the table's whole row count while tenant zero is
//! the only one, so a row stamped with nobody or with an unknown tenant fails the
//! proof — and in another tenant's context exactly that tenant's rows; an app
//! role must see what its phase promises. If anything differs, the transaction
//! is rolled back and the error says what was seen. The phase is recorded in
//! `tenancy_private.enforcement` in the same transaction.

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::apply::{Backoff, Options, blockers};
use crate::ident::{Table, literal, quote};
use crate::inspect::Inventory;
use crate::plan::{POLICY, Plan, TenantContext, key};
use crate::{Error, Result, describe, sql};

/// The policy that lets the live app see every row while a table is *enabled*.
pub const PASSTHROUGH: &str = "ficus_passthrough";

/// The policy that confines the live app to tenant zero (or its transaction's
/// tenant, if it names one) once a table is *enforced*.
pub const SINGLE_TENANT: &str = "ficus_single_tenant";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Off,
    Enabled,
    Enforced,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Off => "off",
            Phase::Enabled => "enabled",
            Phase::Enforced => "enforced",
        }
    }

    fn parse(raw: &str) -> Phase {
        match raw {
            "enabled" => Phase::Enabled,
            "enforced" => Phase::Enforced,
            _ => Phase::Off,
        }
    }
}

/// What a phase change found and did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub table: String,
    pub from: Phase,
    pub to: Phase,
    /// Pre-check findings, in words.
    pub checks: Vec<String>,
    /// The proof: what the tenant role saw.
    pub verified: Vec<String>,
    pub executed: bool,
}

/// Every table's phase (`off` when never enforced).
pub async fn phase(client: &Client, table: &Table) -> Result<Phase> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('tenancy_private.enforcement') IS NOT NULL",
            &[],
        )
        .await
        .map_err(sql("reading enforcement phases"))?
        .get(0);
    if !exists {
        return Ok(Phase::Off);
    }
    Ok(client
        .query_opt(
            "SELECT phase FROM tenancy_private.enforcement WHERE table_name = $1",
            &[&key(table)],
        )
        .await
        .map_err(sql("reading enforcement phases"))?
        .map_or(Phase::Off, |r| Phase::parse(r.get(0))))
}

/// The table `--next` means: the first tenant-owned table not yet enforced.
pub async fn next_table(client: &Client, plan: &Plan) -> Result<Option<Table>> {
    for p in plan.owned() {
        let t = Table::new(&p.schema, &p.name);
        if phase(client, &t).await? != Phase::Enforced {
            return Ok(Some(t));
        }
    }
    Ok(None)
}

/// What must hold before a table's RLS changes, and which app roles own it.
async fn pre_checks(
    client: &Client,
    plan: &Plan,
    inv: &Inventory,
    t: &Table,
) -> Result<(Vec<String>, Vec<String>)> {
    let info = inv
        .table(t)
        .ok_or_else(|| Error::Refused(format!("{t} is not a table of this database")))?;
    let mut checks = Vec::new();
    let mut problems = Vec::new();
    if plan.tenant_roles.is_empty() {
        problems.push(
            "the plan names no tenant_roles, so there is no isolation policy to enforce"
                .to_string(),
        );
    }
    let not_null: Option<bool> = client
        .query_opt(
            "SELECT attnotnull FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = 'tenant_id' AND NOT attisdropped",
            &[&t.sql()],
        )
        .await
        .map_err(sql(format!("reading {t}")))?
        .map(|r| r.get(0));
    match not_null {
        None => problems.push(format!("{t} has no tenant_id column; run ficus db apply")),
        Some(false) => {
            let nulls: i64 = client
                .query_one(
                    &format!("SELECT count(*) FROM {} WHERE tenant_id IS NULL", t.sql()),
                    &[],
                )
                .await
                .map_err(sql(format!("counting {t}")))?
                .get(0);
            problems.push(format!(
                "tenant_id is not proved NOT NULL ({nulls} row{} without a tenant right now); finish ficus db apply (backfill and tighten) first",
                if nulls == 1 { "" } else { "s" }
            ));
        }
        Some(true) => checks.push("tenant_id is NOT NULL (validated)".to_string()),
    }
    let index: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
               WHERE i.indrelid = to_regclass($1) AND c.relname = $2 AND i.indisvalid)",
            &[&t.sql(), &t.object_name("tenant_id_idx")],
        )
        .await
        .map_err(sql(format!("reading {t}'s indexes")))?
        .get(0);
    if index {
        checks.push("tenant_id is indexed".to_string());
    } else {
        problems.push("no valid index on tenant_id; run ficus db apply".to_string());
    }
    // Views over the table run as their owner unless they are security_invoker:
    // the apply step the plan holds for each makes them so. A materialized view
    // holds every tenant's rows and no policy applies to it: a tenant role must
    // not read it. Views that read the table through other views count too.
    for v in crate::plan::tenant_views(inv, |x| x == t) {
        let planned = plan
            .views
            .iter()
            .find(|p| p.schema == v.view.schema && p.name == v.view.name)
            .map(|p| p.action.as_str());
        if v.materialized {
            for role in &plan.tenant_roles {
                let reads: bool = client
                    .query_one(
                        "SELECT has_table_privilege($1, to_regclass($2), 'SELECT')",
                        &[role, &v.view.sql()],
                    )
                    .await
                    .map_err(sql(format!("reading {role}'s privileges")))?
                    .get(0);
                if reads {
                    problems.push(format!(
                        "tenant role {role} may read materialized view {}, which holds every tenant's rows of {t} and no row level security applies to: {}",
                        v.view,
                        match planned {
                            Some("revoke") => "run ficus db apply (its view step revokes it)".to_string(),
                            _ => format!("REVOKE SELECT ON {} FROM {}, or give it action = \"revoke\" in the plan and run ficus db apply", v.view.sql(), quote(role)),
                        }
                    ));
                }
            }
        } else {
            let invoker: bool = client
                .query_one(
                    "SELECT coalesce(reloptions::text[] && ARRAY['security_invoker=true', 'security_invoker=on', 'security_invoker=1'], false)
                     FROM pg_class WHERE oid = to_regclass($1)",
                    &[&v.view.sql()],
                )
                .await
                .map_err(sql(format!("reading view {}", v.view)))?
                .get(0);
            if !invoker {
                problems.push(format!(
                    "view {} runs as its owner over {t} and would show whoever reads it every tenant's rows: {}",
                    v.view,
                    match planned {
                        Some("invoker") => "run ficus db apply (its view step makes it security_invoker)".to_string(),
                        _ => format!("give it action = \"invoker\" in the plan and run ficus db apply, or ALTER VIEW {} SET (security_invoker = true) once its readers may read its tables", v.view.sql()),
                    }
                ));
            }
        }
    }
    for role in &plan.tenant_roles {
        let can: bool = client
            .query_one(
                "SELECT has_table_privilege($1, to_regclass($2), 'SELECT')",
                &[role, &t.sql()],
            )
            .await
            .map_err(sql(format!("reading {role}'s privileges")))?
            .get(0);
        if !can {
            problems.push(format!(
                "tenant role {role} cannot SELECT from {t}; grant it the privileges the tenant-aware backend needs"
            ));
        }
    }
    // A role that may use the table today but is in neither list would see no
    // row at all once row level security is on, or, if it owns the table, every
    // tenant's rows (an owner bypasses row level security unless the table is
    // FORCEd, which happens when an app role owns it): the operator decides
    // where it goes, Ficus never moves it quietly.
    for r in inv.roles.iter().filter(|r| {
        r.can_login
            && !r.superuser
            && !r.bypass_rls
            && !plan.app_roles.contains(&r.name)
            && !plan.tenant_roles.contains(&r.name)
    }) {
        match r.access.iter().find(|a| &a.table == t) {
            Some(a) if a.via == "owner" => problems.push(format!(
                "role {} owns {t} but is in neither app_roles nor tenant_roles: an owner bypasses row level security, so once other tenants have rows it would read and change them all; add it to app_roles (it is then confined to tenant zero, as the live app) or to tenant_roles (it is isolated)",
                r.name
            )),
            Some(a) => problems.push(format!(
                "role {} {} but is in neither app_roles nor tenant_roles, so row level security would hide every row from it; add it to app_roles (it keeps working as today) or to tenant_roles (it is isolated)",
                r.name,
                a.describe()
            )),
            None => {}
        }
    }
    let mut owners = Vec::new();
    for r in inv
        .roles
        .iter()
        .filter(|r| plan.app_roles.contains(&r.name))
    {
        if r.superuser || r.bypass_rls {
            checks.push(format!(
                "app role {} bypasses row level security ({}): it keeps seeing every row in every phase",
                r.name,
                if r.superuser { "superuser" } else { "BYPASSRLS" }
            ));
        } else if r.name == info.owner {
            checks.push(format!(
                "app role {} owns {t}: owners bypass row level security unless it is FORCEd, so the enforced phase FORCEs it",
                r.name
            ));
            owners.push(r.name.clone());
        } else {
            checks.push(format!(
                "app role {} is subject to row level security: the pass-through policy keeps its view unchanged while enabled; once enforced it sees tenant zero's rows only",
                r.name
            ));
        }
    }
    if !problems.is_empty() {
        return Err(Error::Refused(format!(
            "{t} cannot change phase, nothing was changed: {}",
            problems.join("; ")
        )));
    }
    Ok((checks, owners))
}

/// Moves `t` one phase forward (`forward`) or back, proving the result first.
pub async fn step(
    client: &mut Client,
    plan: &Plan,
    inv: &Inventory,
    t: &Table,
    forward: bool,
    execute: bool,
    opts: &Options,
) -> Result<Report> {
    let from = phase(client, t).await?;
    let to = match (from, forward) {
        (Phase::Off, true) => Phase::Enabled,
        (Phase::Enabled, true) => Phase::Enforced,
        (Phase::Enforced, false) => Phase::Enabled,
        (Phase::Enabled, false) => Phase::Off,
        (Phase::Enforced, true) => {
            return Err(Error::Refused(format!("{t} is enforced already")));
        }
        (Phase::Off, false) => {
            return Err(Error::Refused(format!(
                "{t} has row level security off already"
            )));
        }
    };
    let (checks, owners) = if forward {
        pre_checks(client, plan, inv, t).await?
    } else {
        (Vec::new(), Vec::new())
    };
    // A partition queried by name is not subject to its parent's policies, so
    // every partition goes through the same phases, with the isolation policy
    // of its own.
    let partitions = inv
        .table(t)
        .map(|i| i.partitions.clone())
        .unwrap_or_default();
    let mut statements = phase_statements(plan, t, from, to, !owners.is_empty());
    for p in &partitions {
        statements.extend(phase_statements(plan, p, from, to, !owners.is_empty()));
    }
    let mut report = Report {
        table: t.to_string(),
        from,
        to,
        checks,
        verified: Vec::new(),
        executed: false,
    };
    if !execute {
        report.verified = statements;
        return Ok(report);
    }
    let mut backoff = Backoff::new();
    for attempt in 1..=opts.attempts {
        match run_phase(client, plan, inv, t, to, &statements, opts).await {
            Ok(verified) => {
                report.verified = verified;
                report.executed = true;
                return Ok(report);
            }
            Err(PhaseError::Lock) if attempt < opts.attempts => {
                tokio::time::sleep(backoff.next_wait()).await;
            }
            Err(PhaseError::Lock) => {
                return Err(Error::LockTimeout {
                    step: format!("{} {}", to.as_str(), key(t)),
                    timeout_ms: opts.lock_timeout.as_millis() as u64,
                    attempts: attempt,
                    blockers: blockers(client, Some(t)).await,
                });
            }
            Err(PhaseError::Other(e)) => return Err(e),
        }
    }
    unreachable!("the loop returns on its last attempt")
}

/// The statements that move one relation (a table or one of its partitions)
/// from `from` to `to`.
fn phase_statements(plan: &Plan, rel: &Table, from: Phase, to: Phase, force: bool) -> Vec<String> {
    let t = rel.sql();
    let app: Vec<String> = plan.app_roles.iter().map(|r| quote(r)).collect();
    let tenants: Vec<String> = plan.tenant_roles.iter().map(|r| quote(r)).collect();
    let policy = |name: &str, roles: &[String], rule: &str| {
        (!roles.is_empty()).then(|| {
            format!(
                "CREATE POLICY {name} ON {t} AS PERMISSIVE FOR ALL TO {} USING ({rule}) WITH CHECK ({rule})",
                roles.join(", ")
            )
        })
    };
    let passthrough = policy(PASSTHROUGH, &app, "true");
    let single_tenant = policy(
        SINGLE_TENANT,
        &app,
        "tenant_id = (SELECT tenancy_private.default_tenant_id())",
    );
    let isolation = policy(
        POLICY,
        &tenants,
        "tenant_id = (SELECT tenancy_private.current_tenant_id())",
    );
    let drop = |name: &str| format!("DROP POLICY IF EXISTS {name} ON {t}");
    let mut out = Vec::new();
    match (from, to) {
        (Phase::Off, Phase::Enabled) => {
            // The isolation policy is made in the transaction that turns row
            // level security on, never before: a policy on a table without row
            // level security is an error to the ecosystem's linters (Supabase's
            // policy_exists_rls_disabled), and until this moment it would change
            // nothing anyway.
            out.push(drop(POLICY));
            out.extend(isolation);
            // A role added to the plan after the spine was made calls the
            // helpers from the policies too; the grants are idempotent.
            for role in app.iter().chain(&tenants) {
                out.push(format!("GRANT USAGE ON SCHEMA tenancy_private TO {role}"));
                out.push(format!(
                    "GRANT EXECUTE ON FUNCTION tenancy_private.default_tenant_id(), tenancy_private.current_tenant_id() TO {role}"
                ));
            }
            out.push(drop(PASSTHROUGH));
            out.extend(passthrough);
            out.push(format!("ALTER TABLE {t} ENABLE ROW LEVEL SECURITY"));
        }
        (Phase::Enabled, Phase::Enforced) => {
            out.push(drop(PASSTHROUGH));
            out.push(drop(SINGLE_TENANT));
            out.extend(single_tenant);
            if force {
                out.push(format!("ALTER TABLE {t} FORCE ROW LEVEL SECURITY"));
            }
        }
        (Phase::Enforced, Phase::Enabled) => {
            out.push(format!("ALTER TABLE {t} NO FORCE ROW LEVEL SECURITY"));
            out.push(drop(SINGLE_TENANT));
            out.push(drop(PASSTHROUGH));
            out.extend(passthrough);
        }
        (Phase::Enabled, Phase::Off) => {
            out.push(format!("ALTER TABLE {t} NO FORCE ROW LEVEL SECURITY"));
            out.push(format!("ALTER TABLE {t} DISABLE ROW LEVEL SECURITY"));
            out.push(drop(PASSTHROUGH));
            out.push(drop(SINGLE_TENANT));
            out.push(drop(POLICY));
        }
        _ => unreachable!("the phase pairs are decided by the caller"),
    }
    out
}

enum PhaseError {
    Lock,
    Other(Error),
}

impl From<tokio_postgres::Error> for PhaseError {
    fn from(e: tokio_postgres::Error) -> PhaseError {
        if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) {
            PhaseError::Lock
        } else {
            PhaseError::Other(Error::Sql {
                context: "changing the row level security phase".to_string(),
                detail: describe(&e),
            })
        }
    }
}

/// One phase change in one transaction, verified before it commits.
async fn run_phase(
    client: &mut Client,
    plan: &Plan,
    inv: &Inventory,
    t: &Table,
    to: Phase,
    statements: &[String],
    opts: &Options,
) -> Result<Vec<String>, PhaseError> {
    let tx = client.transaction().await?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        opts.lock_timeout.as_millis()
    ))
    .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS tenancy_private.enforcement (table_name text PRIMARY KEY, phase text NOT NULL)",
    )
    .await?;
    // The lock every phase change takes anyway, taken first so that the counts
    // below and the proof after the change see the same rows while the live
    // app's writes wait (for no longer than the proof takes).
    tx.batch_execute(&format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", t.sql()))
        .await?;
    // What each tenant owns, counted as the migrator before the change: the
    // total, the rows of the organizations other than tenant zero, and the
    // rows of one of them (the one the proof looks through).
    let other: Option<String> = tx
        .query_opt(
            "SELECT id::text FROM tenancy.organizations WHERE id::text <> $1 ORDER BY created_at, id LIMIT 1",
            &[&plan.tenant_zero.id],
        )
        .await?
        .map(|r| r.get(0));
    let row = tx
        .query_one(
            &format!(
                "SELECT count(*),
                        count(*) FILTER (WHERE tenant_id::text = $1),
                        count(*) FILTER (WHERE tenant_id IN (SELECT id FROM tenancy.organizations WHERE id::text <> $1)),
                        count(*) FILTER (WHERE tenant_id::text = $2)
                 FROM {}",
                t.sql()
            ),
            &[&plan.tenant_zero.id, &other],
        )
        .await?;
    let (total, zero_rows, other_tenants_rows, other_rows): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    for s in statements {
        tx.batch_execute(s).await?;
    }
    // In member mode the helpers find the tenant through a member identity, so
    // the proof makes one, belonging to the tenants it looks through, and
    // removes it before the commit.
    let proof_member = "ficus-proof";
    if plan.tenant_context == TenantContext::Member {
        tx.execute(
            "INSERT INTO tenancy.members (organization_id, identity)
             SELECT id, $2 FROM tenancy.organizations WHERE id::text = $1 OR id::text = $3
             ON CONFLICT DO NOTHING",
            &[&plan.tenant_zero.id, &proof_member, &other],
        )
        .await?;
    }
    let mut verified = Vec::new();
    let mut failed = Vec::new();
    if to != Phase::Off {
        let count = |role: String, ctx: Option<String>| {
            let tx = &tx;
            async move {
                tx.batch_execute(&format!("SET LOCAL ROLE {}", quote(&role)))
                    .await?;
                // The tenant as `SET LOCAL`, its own statement: the one form
                // that also reaches Citus's workers (see `probe`).
                tx.batch_execute(&format!(
                    "SET LOCAL ficus.tenant_id = {}",
                    literal(ctx.as_deref().unwrap_or(""))
                ))
                .await?;
                tx.batch_execute(&format!(
                    "SELECT set_config('ficus.member', {}, true)",
                    literal(if ctx.is_some() { proof_member } else { "" })
                ))
                .await?;
                let n = tx
                    .query_one(&format!("SELECT count(*) FROM {}", t.sql()), &[])
                    .await
                    .map(|r| r.get::<_, i64>(0));
                tx.batch_execute("RESET ROLE").await?;
                n
            }
        };
        let other_ctx = other
            .clone()
            .unwrap_or_else(|| "00000000-0000-4000-8000-000000000000".to_string());
        for role in &plan.tenant_roles {
            let zero = count(role.clone(), Some(plan.tenant_zero.id.clone())).await?;
            let others = count(role.clone(), Some(other_ctx.clone())).await?;
            let line = format!(
                "as {role}: tenant zero sees {zero} of {total} rows, another tenant sees {others}"
            );
            let expect_zero = total - other_tenants_rows;
            if zero != expect_zero || others != other_rows {
                failed.push(format!("{line} (expected {expect_zero} and {other_rows})"));
            } else {
                verified.push(line);
            }
        }
        for role in &plan.app_roles {
            let bypass = inv
                .roles
                .iter()
                .any(|r| &r.name == role && (r.superuser || r.bypass_rls));
            // A role that may not read the table does not see its rows change;
            // counting as it would only fail the proof's transaction.
            let reads: bool = tx
                .query_one(
                    "SELECT has_table_privilege($1, to_regclass($2), 'SELECT')",
                    &[role, &t.sql()],
                )
                .await?
                .get(0);
            if !reads {
                verified.push(format!(
                    "as {role} (live app): may not read {t}, nothing to see"
                ));
                continue;
            }
            let seen = count(role.clone(), None).await?;
            // While enabled, the pass-through shows the live app everything; once
            // enforced, tenant zero's rows, unless the role bypasses RLS.
            let expect = if to == Phase::Enforced && !bypass {
                zero_rows
            } else {
                total
            };
            let line =
                format!("as {role} (live app, no tenant context): sees {seen} of {total} rows");
            if seen != expect {
                failed.push(format!("{line} (expected {expect})"));
            } else {
                verified.push(line);
            }
        }
    }
    if plan.tenant_context == TenantContext::Member {
        tx.execute(
            "DELETE FROM tenancy.members WHERE identity = $1",
            &[&proof_member],
        )
        .await?;
    }
    if !failed.is_empty() {
        // Dropping the transaction rolls the phase back.
        return Err(PhaseError::Other(Error::Refused(format!(
            "verification failed, the phase change was rolled back: {}",
            failed.join("; ")
        ))));
    }
    tx.execute(
        "INSERT INTO tenancy_private.enforcement (table_name, phase) VALUES ($1, $2)
         ON CONFLICT (table_name) DO UPDATE SET phase = excluded.phase",
        &[&key(t), &to.as_str()],
    )
    .await?;
    tx.commit().await?;
    Ok(verified)
}
