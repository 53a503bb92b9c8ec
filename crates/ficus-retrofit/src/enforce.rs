//! `ficus db enforce` / `unenforce`: row level security turned on one table and
//! one phase at a time, each phase proved before it commits.
//!
//! Phases: *off* → *enabled* (RLS on, plus a pass-through policy for the live
//! app's roles, so the app sees no change while the tenant roles are already
//! isolated) → *enforced* (pass-through gone; `FORCE` when an app role owns the
//! table). Each phase is one short transaction under the lock timeout; before it
//! commits, the same transaction switches to a tenant role and counts: in tenant
//! zero's context it must see exactly the table's total row count, in another
//! tenant's context none. If it does not, the transaction is rolled back and the
//! error says what was seen. The phase is recorded in
//! `tenancy_private.enforcement` in the same transaction.

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::apply::{Backoff, Options, blockers};
use crate::ident::{Table, literal, quote};
use crate::inspect::Inventory;
use crate::plan::{POLICY, Plan, key};
use crate::{Error, Result, describe, sql};

/// The policy that lets the live app see every row while a table is *enabled*.
pub const PASSTHROUGH: &str = "ficus_passthrough";

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
    let policy: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = to_regclass($1) AND polname = $2)",
            &[&t.sql(), &POLICY],
        )
        .await
        .map_err(sql(format!("reading {t}'s policies")))?
        .get(0);
    if policy {
        checks.push(format!("policy {POLICY} is present"));
    } else if !plan.tenant_roles.is_empty() {
        problems.push(format!("policy {POLICY} is missing; run ficus db apply"));
    }
    let definer_views: Vec<String> = info
        .views
        .iter()
        .filter(|v| !v.security_invoker)
        .map(|v| v.view.to_string())
        .collect();
    if !definer_views.is_empty() {
        problems.push(format!(
            "views over {t} run as their owner and would bypass row level security: {}; ALTER VIEW … SET (security_invoker = true) first",
            definer_views.join(", ")
        ));
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
                "app role {} owns {t}: owners bypass row level security unless it is FORCEd, which the enforced phase does",
                r.name
            ));
            owners.push(r.name.clone());
        } else {
            checks.push(format!(
                "app role {} is subject to row level security: the pass-through policy keeps its view unchanged while enabled",
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
    let app: Vec<String> = plan.app_roles.iter().map(|r| quote(r)).collect();
    let passthrough = if app.is_empty() {
        None
    } else {
        Some(format!(
            "CREATE POLICY {PASSTHROUGH} ON {} AS PERMISSIVE FOR ALL TO {} USING (true) WITH CHECK (true)",
            t.sql(),
            app.join(", ")
        ))
    };
    let drop_passthrough = format!("DROP POLICY IF EXISTS {PASSTHROUGH} ON {}", t.sql());
    let mut statements: Vec<String> = Vec::new();
    match (from, to) {
        (Phase::Off, Phase::Enabled) => {
            statements.push(drop_passthrough.clone());
            statements.extend(passthrough.clone());
            statements.push(format!("ALTER TABLE {} ENABLE ROW LEVEL SECURITY", t.sql()));
        }
        (Phase::Enabled, Phase::Enforced) => {
            statements.push(drop_passthrough.clone());
            if !owners.is_empty() {
                statements.push(format!("ALTER TABLE {} FORCE ROW LEVEL SECURITY", t.sql()));
            }
        }
        (Phase::Enforced, Phase::Enabled) => {
            statements.push(format!(
                "ALTER TABLE {} NO FORCE ROW LEVEL SECURITY",
                t.sql()
            ));
            statements.push(drop_passthrough.clone());
            statements.extend(passthrough.clone());
        }
        (Phase::Enabled, Phase::Off) => {
            statements.push(format!(
                "ALTER TABLE {} NO FORCE ROW LEVEL SECURITY",
                t.sql()
            ));
            statements.push(format!(
                "ALTER TABLE {} DISABLE ROW LEVEL SECURITY",
                t.sql()
            ));
            statements.push(drop_passthrough.clone());
        }
        _ => unreachable!("the phase pairs are decided above"),
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
        match run_phase(client, plan, t, to, &statements, opts).await {
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
    // The total, counted as the migrator before the change.
    let total: i64 = tx
        .query_one(&format!("SELECT count(*) FROM {}", t.sql()), &[])
        .await?
        .get(0);
    for s in statements {
        tx.batch_execute(s).await?;
    }
    let mut verified = Vec::new();
    if to != Phase::Off {
        let other: Option<String> = tx
            .query_opt(
                "SELECT id::text FROM tenancy.organizations WHERE id::text <> $1 ORDER BY created_at LIMIT 1",
                &[&plan.tenant_zero.id],
            )
            .await?
            .map(|r| r.get(0));
        for role in &plan.tenant_roles {
            tx.batch_execute(&format!("SET LOCAL ROLE {}", quote(role)))
                .await?;
            let count = |ctx: String| {
                let tx = &tx;
                async move {
                    tx.batch_execute(&format!(
                        "SELECT set_config('ficus.tenant_id', {}, true)",
                        literal(&ctx)
                    ))
                    .await?;
                    tx.query_one(&format!("SELECT count(*) FROM {}", t.sql()), &[])
                        .await
                        .map(|r| r.get::<_, i64>(0))
                }
            };
            let zero = count(plan.tenant_zero.id.clone()).await?;
            let other_ctx = other
                .clone()
                .unwrap_or_else(|| "00000000-0000-4000-8000-000000000000".to_string());
            let others = count(other_ctx).await?;
            tx.batch_execute("RESET ROLE").await?;
            let line = format!(
                "as {role}: tenant zero sees {zero} of {total} rows, another tenant sees {others}"
            );
            if zero != total || others != 0 {
                // Dropping the transaction rolls the phase back.
                return Err(PhaseError::Other(Error::Refused(format!(
                    "verification failed, the phase change was rolled back: {line}"
                ))));
            }
            verified.push(line);
        }
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
