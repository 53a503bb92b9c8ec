//! `ficus db probe`: attacks on the isolation, run as the tenant roles against
//! every table whose row level security is on, each inside a transaction that is
//! always rolled back. The victim is tenant zero (whose rows exist); the attacker
//! is a probe organization created inside the same transaction. A result is
//! `blocked` or `LEAK`; the run fails on any leak.

use tokio_postgres::{Client, Transaction};

use crate::enforce::{Phase, phase};
use crate::ident::{Table, literal, quote};
use crate::plan::Plan;
use crate::{Result, sql};

/// Every attack, by name, in the order they run.
pub const ATTACKS: &[&str] = &[
    "read other tenant",
    "update other tenant",
    "delete other tenant",
    "move row to other tenant",
    "no tenant context",
    "empty context",
    "malformed context",
    "sql text as context",
];

/// One cell of the matrix.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub table: String,
    pub role: String,
    pub attack: String,
    pub leak: bool,
    /// What happened, in words.
    pub detail: String,
}

/// The matrix, plus the checks on the helpers themselves.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Probe {
    pub findings: Vec<Finding>,
}

impl Probe {
    pub fn leaks(&self) -> usize {
        self.findings.iter().filter(|f| f.leak).count()
    }
}

/// An attack's outcome: rows it got at (a leak when above zero), or an error
/// from the database (blocked).
async fn attempt(tx: &Transaction<'_>, statement: &str) -> std::result::Result<u64, String> {
    tx.batch_execute("SAVEPOINT probe")
        .await
        .map_err(|e| e.to_string())?;
    let outcome = match tx.query_opt(statement, &[]).await {
        Ok(Some(row)) => Ok(row.get::<_, i64>(0).max(0) as u64),
        Ok(None) => Ok(0),
        Err(e) => Err(crate::describe(&e)),
    };
    tx.batch_execute("ROLLBACK TO SAVEPOINT probe")
        .await
        .map_err(|e| e.to_string())?;
    outcome
}

/// Runs every attack on every enabled or enforced tenant-owned table.
pub async fn probe(client: &mut Client, plan: &Plan) -> Result<Probe> {
    let mut findings = Vec::new();
    // The helpers: never callable by PUBLIC; a helper that runs with its owner's
    // rights never with a mutable search_path (one that runs with its caller's,
    // the setting mode's, gives a caller nothing it does not have).
    for f in ["current_tenant_id", "default_tenant_id"] {
        let row = client
            .query_opt(
                "SELECT has_function_privilege('public', p.oid, 'EXECUTE'),
                        coalesce(p.proconfig, '{}') @> ARRAY['search_path=\"\"'],
                        p.prosecdef
                 FROM pg_proc p WHERE p.pronamespace = to_regnamespace('tenancy_private') AND p.proname = $1",
                &[&f],
            )
            .await
            .map_err(sql("reading the helpers"))?;
        let (public, pinned, definer) =
            row.map_or((false, true, true), |r| (r.get(0), r.get(1), r.get(2)));
        findings.push(Finding {
            table: format!("tenancy_private.{f}()"),
            role: "public".into(),
            attack: "call the helper from PUBLIC".into(),
            leak: public,
            detail: if public {
                "PUBLIC may execute it".into()
            } else {
                "EXECUTE is not granted to PUBLIC".into()
            },
        });
        findings.push(Finding {
            table: format!("tenancy_private.{f}()"),
            role: "any".into(),
            attack: "change search_path before calling".into(),
            leak: definer && !pinned,
            detail: if !definer {
                "it runs with its caller's rights, every name in it schema-qualified".into()
            } else if pinned {
                "its search_path is pinned to ''".into()
            } else {
                "it runs with the owner's rights and the caller's search_path".into()
            },
        });
    }
    for p in plan.owned() {
        let t = Table::new(&p.schema, &p.name);
        if phase(client, &t).await? == Phase::Off {
            continue;
        }
        for role in &plan.tenant_roles {
            let tx = client
                .transaction()
                .await
                .map_err(sql("starting a probe"))?;
            let attacker: String = tx
                .query_one(
                    "INSERT INTO tenancy.organizations (slug, name) VALUES ('ficus-probe-' || txid_current(), 'probe') RETURNING id::text",
                    &[],
                )
                .await
                .map_err(sql("creating the probe's attacker tenant"))?
                .get(0);
            let zero = literal(&plan.tenant_zero.id);
            let victim_rows: i64 = tx
                .query_one(
                    &format!(
                        "SELECT count(*) FROM {} WHERE tenant_id::text = {zero}",
                        t.sql()
                    ),
                    &[],
                )
                .await
                .map_err(sql(format!("counting {t}")))?
                .get(0);
            tx.batch_execute(&format!("SET LOCAL ROLE {}", quote(role)))
                .await
                .map_err(sql(format!("becoming {role}")))?;
            // `SET LOCAL`, each its own statement, rather than `set_config`:
            // on tables distributed by Citus only a `SET LOCAL` reaches the
            // workers (with `citus.propagate_set_commands = 'local'`), and the
            // probe must attack the tables as the application reaches them.
            let set = |ctx: &str| format!("SET LOCAL ficus.tenant_id = {}", literal(ctx));
            let table = t.sql();
            let cases: Vec<(&str, Option<String>, String)> = vec![
                (
                    "read other tenant",
                    Some(attacker.clone()),
                    format!("SELECT count(*) FROM {table} WHERE tenant_id::text = {zero}"),
                ),
                (
                    "update other tenant",
                    Some(attacker.clone()),
                    format!(
                        "WITH u AS (UPDATE {table} SET tenant_id = tenant_id WHERE tenant_id::text = {zero} RETURNING 1) SELECT count(*) FROM u"
                    ),
                ),
                (
                    "delete other tenant",
                    Some(attacker.clone()),
                    format!(
                        "WITH d AS (DELETE FROM {table} WHERE tenant_id::text = {zero} RETURNING 1) SELECT count(*) FROM d"
                    ),
                ),
                (
                    "move row to other tenant",
                    Some(plan.tenant_zero.id.clone()),
                    format!(
                        "WITH u AS (UPDATE {table} SET tenant_id = {}::{} WHERE ctid = (SELECT ctid FROM {table} LIMIT 1) RETURNING 1) SELECT count(*) FROM u",
                        literal(&attacker),
                        plan.id_type.sql()
                    ),
                ),
                (
                    "no tenant context",
                    None,
                    format!("SELECT count(*) FROM {table}"),
                ),
                (
                    "empty context",
                    Some(String::new()),
                    format!("SELECT count(*) FROM {table}"),
                ),
                (
                    "malformed context",
                    Some("not-a-tenant".into()),
                    format!("SELECT count(*) FROM {table}"),
                ),
                (
                    "sql text as context",
                    Some("' OR true --".into()),
                    format!("SELECT count(*) FROM {table}"),
                ),
            ];
            for (attack, ctx, statement) in cases {
                if let Some(c) = &ctx {
                    tx.batch_execute(&set(c))
                        .await
                        .map_err(sql("setting the probe's context"))?;
                } else {
                    tx.batch_execute("SET LOCAL ficus.tenant_id TO DEFAULT")
                        .await
                        .map_err(sql("clearing the probe's context"))?;
                }
                let (leak, detail) = match attempt(&tx, &statement).await {
                    Ok(0) => (false, "0 rows".to_string()),
                    Ok(n) => (true, format!("{n} of tenant zero's {victim_rows} rows")),
                    Err(e) => (false, format!("refused: {e}")),
                };
                findings.push(Finding {
                    table: t.to_string(),
                    role: role.clone(),
                    attack: attack.to_string(),
                    leak,
                    detail,
                });
            }
            // Whatever happened, nothing stays: the attacker tenant included.
            tx.rollback().await.map_err(sql("rolling the probe back"))?;
        }
    }
    Ok(Probe { findings })
}
