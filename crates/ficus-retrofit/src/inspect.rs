//! `ficus db inspect`: what is in the database, from its catalogs, and what each
//! table is to tenancy. Read-only: every query here is a `SELECT`.

use std::collections::BTreeMap;

use serde::Serialize;
use tokio_postgres::Client;

use crate::ident::Table;
use crate::{Result, sql};

/// Tables that belong to a schema-migration tool, never to a tenant.
const BOOKKEEPING: &[&str] = &[
    "schema_migrations",
    "_prisma_migrations",
    "flyway_schema_history",
    "__diesel_schema_migrations",
    "knex_migrations",
    "knex_migrations_lock",
    "ar_internal_metadata",
    "goose_db_version",
    "alembic_version",
    "_sqlx_migrations",
    "seaql_migrations",
    "refinery_schema_history",
];

/// Names that usually mean shared lookup data.
const REFERENCE_NAMES: &[&str] = &[
    "countries",
    "currencies",
    "languages",
    "locales",
    "timezones",
    "time_zones",
    "units_of_measure",
    "postal_codes",
];

/// What a table is to tenancy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// Rows belong to a tenant: the table gets `tenant_id`.
    TenantOwned,
    /// Lookup data every tenant shares: no `tenant_id`.
    Shared,
    /// Not the application's data (a migration tool's bookkeeping).
    Excluded,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::TenantOwned => "tenant-owned",
            Class::Shared => "shared",
            Class::Excluded => "excluded",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Column {
    pub name: String,
    pub sql_type: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ForeignKey {
    pub name: String,
    pub references: Table,
    pub definition: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TableInfo {
    pub table: Table,
    pub owner: String,
    pub partitioned: bool,
    pub partitions: Vec<Table>,
    pub columns: u32,
    pub primary_key: Vec<Column>,
    pub row_estimate: i64,
    pub bytes: i64,
    pub rls_enabled: bool,
    pub rls_forced: bool,
    pub policies: Vec<String>,
    pub triggers: Vec<String>,
    pub foreign_keys: Vec<ForeignKey>,
    pub referenced_by: Vec<Table>,
    pub views: Vec<View>,
    /// The type of an existing `tenant_id` column, if there is one.
    pub tenant_id_type: Option<String>,
    pub class: Class,
    pub reason: String,
    pub hazards: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct View {
    pub view: Table,
    pub security_invoker: bool,
    pub materialized: bool,
}

/// A view or materialized view of the application's, with what it reads and
/// who reads it.
#[derive(Debug, Clone, Serialize)]
pub struct ViewInfo {
    pub view: Table,
    pub materialized: bool,
    pub security_invoker: bool,
    pub owner: String,
    /// The tables and views its query reads.
    pub bases: Vec<Table>,
    /// The roles that may read it today: login roles other than superusers,
    /// and `PUBLIC` when it is granted to everyone.
    pub readers: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Role {
    pub name: String,
    pub superuser: bool,
    pub bypass_rls: bool,
    pub can_login: bool,
    /// Tables of the inventory it owns.
    pub owns: u32,
    /// Connected to this database right now.
    pub connected: bool,
    /// What it may do to the inventory's tables, and through what: its own
    /// grants, a role it is a member of, `PUBLIC`, or ownership. Superusers
    /// may do everything and have none listed.
    pub access: Vec<Access>,
}

/// One role's use of one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Access {
    pub table: Table,
    /// Of `SELECT`, `INSERT`, `UPDATE`, `DELETE`, in that order.
    pub privileges: Vec<String>,
    /// `owner`, `granted`, `PUBLIC`, or `member of ROLE`.
    pub via: String,
}

impl Access {
    /// `may SELECT, INSERT public.film (member of writers)`.
    pub fn describe(&self) -> String {
        if self.via == "owner" {
            return format!("owns {}", self.table);
        }
        format!(
            "may {} {} ({})",
            self.privileges.join(", "),
            self.table,
            self.via
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LongTransaction {
    pub pid: i32,
    pub user: String,
    pub application: String,
    pub seconds: f64,
    pub query: String,
}

/// Everything `inspect` found.
#[derive(Debug, Clone, Serialize)]
pub struct Inventory {
    pub database: String,
    pub system_identifier: String,
    pub server_version: String,
    pub tables: Vec<TableInfo>,
    pub views: Vec<ViewInfo>,
    pub roles: Vec<Role>,
    pub long_transactions: Vec<LongTransaction>,
}

impl Inventory {
    pub fn table(&self, t: &Table) -> Option<&TableInfo> {
        self.tables.iter().find(|i| &i.table == t)
    }
}

/// Reads the catalog of the database `client` is connected to.
pub async fn inspect(client: &Client) -> Result<Inventory> {
    let head = client
        .query_one(
            "SELECT current_database()::text, (SELECT system_identifier::text FROM pg_control_system()),
                    current_setting('server_version')",
            &[],
        )
        .await
        .map_err(sql("reading the database's identity"))?;
    let rows = client
        .query(
            "SELECT c.oid::bigint, n.nspname::text, c.relname::text, c.relkind = 'p',
                    greatest(c.reltuples, 0)::bigint, pg_total_relation_size(c.oid),
                    c.relrowsecurity, c.relforcerowsecurity, pg_get_userbyid(c.relowner)::text,
                    c.relnatts::int
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'tenancy', 'tenancy_private')
               AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
             ORDER BY 2, 3",
            &[],
        )
        .await
        .map_err(sql("listing tables"))?;
    let mut tables: BTreeMap<i64, TableInfo> = BTreeMap::new();
    let mut names: BTreeMap<i64, Table> = BTreeMap::new();
    for r in &rows {
        let oid: i64 = r.get(0);
        let table = Table::new(r.get(1), r.get(2));
        names.insert(oid, table.clone());
        tables.insert(
            oid,
            TableInfo {
                table,
                owner: r.get(8),
                partitioned: r.get(3),
                partitions: Vec::new(),
                columns: r.get::<_, i32>(9).max(0) as u32,
                primary_key: Vec::new(),
                row_estimate: r.get(4),
                bytes: r.get(5),
                rls_enabled: r.get(6),
                rls_forced: r.get(7),
                policies: Vec::new(),
                triggers: Vec::new(),
                foreign_keys: Vec::new(),
                referenced_by: Vec::new(),
                views: Vec::new(),
                tenant_id_type: None,
                class: Class::TenantOwned,
                reason: String::new(),
                hazards: Vec::new(),
            },
        );
    }
    // Every table name known to the catalog, partitions included, for references.
    let all = client
        .query(
            "SELECT c.oid::bigint, n.nspname::text, c.relname::text, c.relispartition,
                    coalesce((SELECT i.inhparent::bigint FROM pg_inherits i WHERE i.inhrelid = c.oid LIMIT 1), 0)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p')",
            &[],
        )
        .await
        .map_err(sql("listing partitions"))?;
    let mut any_name: BTreeMap<i64, Table> = BTreeMap::new();
    for r in &all {
        let oid: i64 = r.get(0);
        let t = Table::new(r.get(1), r.get(2));
        any_name.insert(oid, t.clone());
        let parent: i64 = r.get(4);
        if r.get::<_, bool>(3)
            && let Some(p) = tables.get_mut(&parent)
        {
            p.partitions.push(t);
        }
    }
    for r in client
        .query(
            "SELECT con.conrelid::bigint, a.attname::text, format_type(a.atttypid, a.atttypmod)
             FROM pg_constraint con
             CROSS JOIN LATERAL unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum
             WHERE con.contype = 'p' ORDER BY con.conrelid, k.ord",
            &[],
        )
        .await
        .map_err(sql("reading primary keys"))?
    {
        if let Some(t) = tables.get_mut(&r.get::<_, i64>(0)) {
            t.primary_key.push(Column {
                name: r.get(1),
                sql_type: r.get(2),
            });
        }
    }
    for r in client
        .query(
            "SELECT conrelid::bigint, confrelid::bigint, conname::text, pg_get_constraintdef(oid)
             FROM pg_constraint WHERE contype = 'f' AND conparentid = 0 ORDER BY conname",
            &[],
        )
        .await
        .map_err(sql("reading foreign keys"))?
    {
        let (from, to): (i64, i64) = (r.get(0), r.get(1));
        let Some(target) = any_name.get(&to).cloned() else {
            continue;
        };
        if let Some(source) = names.get(&from).cloned()
            && let Some(t) = tables.get_mut(&to)
            && source != t.table
        {
            t.referenced_by.push(source);
        }
        if let Some(t) = tables.get_mut(&from) {
            t.foreign_keys.push(ForeignKey {
                name: r.get(2),
                references: target,
                definition: r.get(3),
            });
        }
    }
    for r in client
        .query(
            "SELECT polrelid::bigint, polname::text FROM pg_policy ORDER BY polname",
            &[],
        )
        .await
        .map_err(sql("reading policies"))?
    {
        if let Some(t) = tables.get_mut(&r.get::<_, i64>(0)) {
            t.policies.push(r.get(1));
        }
    }
    for r in client
        .query(
            "SELECT tgrelid::bigint, tgname::text FROM pg_trigger WHERE NOT tgisinternal ORDER BY tgname",
            &[],
        )
        .await
        .map_err(sql("reading triggers"))?
    {
        if let Some(t) = tables.get_mut(&r.get::<_, i64>(0)) {
            t.triggers.push(r.get(1));
        }
    }
    for r in client
        .query(
            "SELECT DISTINCT d.refobjid::bigint, vn.nspname::text, v.relname::text,
                    coalesce(v.reloptions::text[] && ARRAY['security_invoker=true', 'security_invoker=on', 'security_invoker=1'], false),
                    v.relkind = 'm'
             FROM pg_depend d
             JOIN pg_rewrite r ON r.oid = d.objid
             JOIN pg_class v ON v.oid = r.ev_class
             JOIN pg_namespace vn ON vn.oid = v.relnamespace
             WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
               AND v.relkind IN ('v', 'm') AND d.refobjid <> v.oid
             ORDER BY 2, 3",
            &[],
        )
        .await
        .map_err(sql("reading views"))?
    {
        if let Some(t) = tables.get_mut(&r.get::<_, i64>(0)) {
            t.views.push(View {
                view: Table::new(r.get(1), r.get(2)),
                security_invoker: r.get(3),
                materialized: r.get(4),
            });
        }
    }
    let views = views(client).await?;
    for r in client
        .query(
            "SELECT attrelid::bigint, format_type(atttypid, atttypmod) FROM pg_attribute
             WHERE attname = 'tenant_id' AND attnum > 0 AND NOT attisdropped",
            &[],
        )
        .await
        .map_err(sql("reading columns"))?
    {
        if let Some(t) = tables.get_mut(&r.get::<_, i64>(0)) {
            t.tenant_id_type = Some(r.get(1));
        }
    }
    let connected: Vec<String> = client
        .query(
            "SELECT DISTINCT usename::text FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid() AND usename IS NOT NULL
               AND coalesce(application_name, '') <> 'ficus-db'",
            &[],
        )
        .await
        .map_err(sql("reading sessions"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut roles: Vec<Role> = client
        .query(
            "SELECT rolname::text, rolsuper, rolbypassrls, rolcanlogin FROM pg_roles
             WHERE rolname !~ '^pg_' ORDER BY rolname",
            &[],
        )
        .await
        .map_err(sql("reading roles"))?
        .iter()
        .map(|r| Role {
            name: r.get(0),
            superuser: r.get(1),
            bypass_rls: r.get(2),
            can_login: r.get(3),
            owns: 0,
            connected: false,
            access: Vec::new(),
        })
        .collect();
    // Who may use each table, however the privilege reaches them: a role's own
    // grant, a role it belongs to, PUBLIC, or owning the table. Column-level
    // grants count, because an INSERT through them evaluates every default.
    let oids: Vec<i64> = names.keys().copied().collect();
    for r in client
        .query(
            "SELECT c.oid::bigint, r.rolname::text,
                    array_remove(ARRAY[
                        CASE WHEN has_any_column_privilege(r.oid, c.oid, 'SELECT') THEN 'SELECT' END,
                        CASE WHEN has_any_column_privilege(r.oid, c.oid, 'INSERT') THEN 'INSERT' END,
                        CASE WHEN has_any_column_privilege(r.oid, c.oid, 'UPDATE') THEN 'UPDATE' END,
                        CASE WHEN has_table_privilege(r.oid, c.oid, 'DELETE') THEN 'DELETE' END], NULL),
                    CASE
                        WHEN c.relowner = r.oid THEN 'owner'
                        WHEN EXISTS (SELECT 1 FROM aclexplode(c.relacl) a WHERE a.grantee = r.oid)
                          OR EXISTS (SELECT 1 FROM pg_attribute at, aclexplode(at.attacl) a
                                     WHERE at.attrelid = c.oid AND a.grantee = r.oid) THEN 'granted'
                        WHEN EXISTS (SELECT 1 FROM aclexplode(c.relacl) a WHERE a.grantee = 0)
                          OR EXISTS (SELECT 1 FROM pg_attribute at, aclexplode(at.attacl) a
                                     WHERE at.attrelid = c.oid AND a.grantee = 0) THEN 'PUBLIC'
                        ELSE coalesce('member of ' || (
                            SELECT string_agg(g.rolname, ', ' ORDER BY g.rolname)
                            FROM pg_roles g
                            WHERE g.oid <> r.oid AND pg_has_role(r.oid, g.oid, 'USAGE')
                              AND (c.relowner = g.oid
                                   OR EXISTS (SELECT 1 FROM aclexplode(c.relacl) a WHERE a.grantee = g.oid)
                                   OR EXISTS (SELECT 1 FROM pg_attribute at, aclexplode(at.attacl) a
                                              WHERE at.attrelid = c.oid AND a.grantee = g.oid))), 'a predefined role')
                    END
             FROM pg_class c CROSS JOIN pg_roles r
             WHERE c.oid = ANY($1::bigint[]::oid[]) AND r.rolname !~ '^pg_' AND NOT r.rolsuper
               AND (has_any_column_privilege(r.oid, c.oid, 'SELECT') OR has_any_column_privilege(r.oid, c.oid, 'INSERT')
                    OR has_any_column_privilege(r.oid, c.oid, 'UPDATE') OR has_table_privilege(r.oid, c.oid, 'DELETE'))
             ORDER BY 2, 1",
            &[&oids],
        )
        .await
        .map_err(sql("reading table privileges"))?
    {
        let Some(table) = names.get(&r.get::<_, i64>(0)) else {
            continue;
        };
        let name: String = r.get(1);
        if let Some(role) = roles.iter_mut().find(|x| x.name == name) {
            role.access.push(Access {
                table: table.clone(),
                privileges: r.get(2),
                via: r.get(3),
            });
        }
    }
    for role in &mut roles {
        role.owns = tables.values().filter(|t| t.owner == role.name).count() as u32;
        role.connected = connected.contains(&role.name);
    }
    let long_transactions = client
        .query(
            "SELECT pid, coalesce(usename::text, ''), coalesce(application_name, ''),
                    extract(epoch FROM now() - xact_start)::float8, left(coalesce(query, ''), 200)
             FROM pg_stat_activity
             WHERE xact_start < now() - interval '30 seconds' AND pid <> pg_backend_pid()
             ORDER BY xact_start",
            &[],
        )
        .await
        .map_err(sql("reading sessions"))?
        .iter()
        .map(|r| LongTransaction {
            pid: r.get(0),
            user: r.get(1),
            application: r.get(2),
            seconds: r.get(3),
            query: r.get(4),
        })
        .collect();
    let mut tables: Vec<TableInfo> = tables.into_values().collect();
    for t in &mut tables {
        classify(t);
    }
    Ok(Inventory {
        database: head.get(0),
        system_identifier: head.get::<_, Option<String>>(1).unwrap_or_default(),
        server_version: head.get(2),
        tables,
        views,
        roles,
        long_transactions,
    })
}

/// Every view and materialized view outside the system and tenancy schemas,
/// with the relations it reads and the roles that may read it.
async fn views(client: &Client) -> Result<Vec<ViewInfo>> {
    let rows = client
        .query(
            "SELECT vn.nspname::text, v.relname::text, v.relkind = 'm',
                    coalesce(v.reloptions::text[] && ARRAY['security_invoker=true', 'security_invoker=on', 'security_invoker=1'], false),
                    pg_get_userbyid(v.relowner)::text,
                    coalesce(bases.nsps, '{}'), coalesce(bases.rels, '{}'),
                    coalesce((SELECT array_agg(ro.rolname::text ORDER BY ro.rolname) FROM pg_roles ro
                              WHERE ro.rolcanlogin AND NOT ro.rolsuper AND ro.rolname !~ '^pg_'
                                AND has_any_column_privilege(ro.oid, v.oid, 'SELECT')), '{}'),
                    EXISTS (SELECT 1 FROM aclexplode(v.relacl) a WHERE a.grantee = 0 AND a.privilege_type = 'SELECT')
             FROM pg_class v JOIN pg_namespace vn ON vn.oid = v.relnamespace
             LEFT JOIN LATERAL (
                 SELECT array_agg(x.nsp ORDER BY x.nsp, x.rel) AS nsps, array_agg(x.rel ORDER BY x.nsp, x.rel) AS rels
                 FROM (SELECT DISTINCT bn.nspname::text AS nsp, b.relname::text AS rel
                       FROM pg_rewrite rw
                       JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = rw.oid
                                       AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> v.oid
                       JOIN pg_class b ON b.oid = d.refobjid
                       JOIN pg_namespace bn ON bn.oid = b.relnamespace
                       WHERE rw.ev_class = v.oid AND b.relkind IN ('r', 'p', 'v', 'm', 'f')) x
             ) bases ON true
             WHERE v.relkind IN ('v', 'm')
               AND vn.nspname NOT IN ('pg_catalog', 'information_schema', 'tenancy', 'tenancy_private')
               AND vn.nspname NOT LIKE 'pg\\_%'
             ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(sql("reading views"))?;
    Ok(rows
        .iter()
        .map(|r| {
            let (nsps, rels): (Vec<String>, Vec<String>) = (r.get(5), r.get(6));
            let bases: Vec<Table> = nsps
                .iter()
                .zip(&rels)
                .map(|(n, t)| Table::new(n, t))
                .collect();
            let mut readers: Vec<String> = r.get(7);
            if r.get::<_, bool>(8) {
                readers.insert(0, "PUBLIC".to_string());
            }
            ViewInfo {
                view: Table::new(r.get(0), r.get(1)),
                materialized: r.get(2),
                security_invoker: r.get(3),
                owner: r.get(4),
                bases,
                readers,
            }
        })
        .collect())
}

/// Decides what a table is to tenancy, with the reason, and lists its hazards.
fn classify(t: &mut TableInfo) {
    let name = t.table.name.to_ascii_lowercase();
    let (class, reason) = if BOOKKEEPING.contains(&name.as_str()) {
        (
            Class::Excluded,
            "a schema-migration tool's bookkeeping table".to_string(),
        )
    } else if REFERENCE_NAMES.contains(&name.as_str()) {
        (
            Class::Shared,
            format!("{name} is lookup data every tenant shares"),
        )
    } else if t.foreign_keys.is_empty() && !t.referenced_by.is_empty() && t.columns <= 3 {
        (
            Class::Shared,
            format!(
                "a small lookup table ({} columns, no foreign keys) referenced by {}",
                t.columns,
                t.referenced_by
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    } else {
        (
            Class::TenantOwned,
            "application data: every row belongs to the customer the database serves today"
                .to_string(),
        )
    };
    t.class = class;
    t.reason = reason;
    let mut hazards = Vec::new();
    if t.primary_key.is_empty() {
        hazards.push("no primary key: backfilled by ctid, which rescans the table".to_string());
    }
    if t.partitioned {
        hazards.push(format!(
            "partitioned ({} partitions): index built per partition; NOT NULL and the foreign key are checked with a scan under lock",
            t.partitions.len()
        ));
    }
    if let Some(ty) = &t.tenant_id_type {
        hazards.push(format!("already has a tenant_id column ({ty})"));
    }
    if t.rls_enabled {
        hazards.push("row level security is already enabled".to_string());
    }
    if t.views.iter().any(|v| !v.security_invoker) {
        hazards.push(
            "views over it run as their owner (not security_invoker) and would bypass row level security".to_string(),
        );
    }
    if t.row_estimate > 10_000_000 {
        hazards.push(format!(
            "about {} rows: consider backfill = \"instant\"",
            t.row_estimate
        ));
    }
    t.hazards = hazards;
}
