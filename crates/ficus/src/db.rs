//! `ficus db`: the retrofit commands. They talk to the application's database,
//! never to the control store, and print tables for people or JSON for machines
//! (progress as JSON lines when stdout is not a terminal).

use std::io::{IsTerminal, Write};

use anyhow::{Context, Result, bail};
use ficus_retrofit::apply::{self, Event, Options};
use ficus_retrofit::ident::Table;
use ficus_retrofit::plan::{IdType, Plan, StepKind};
use ficus_retrofit::{Inventory, backfill, connect, enforce, inspect};
use serde_json::json;

use crate::cli::{
    DbApplyArgs, DbCommand, DbDistributeArgs, DbDistributeCommand, DbEnforceArgs, DbPlanFile,
    DbRehearseArgs, DbRevertArgs, DbTenantCommand,
};
use crate::output;

pub async fn run(command: DbCommand, json: bool, out: &mut impl Write) -> Result<()> {
    match command {
        DbCommand::Inspect(db) => {
            let client = connect(&db.url).await?;
            let inv = inspect(&client).await?;
            if json {
                output::json(out, &inv)?;
            } else {
                print_inventory(&inv, out)?;
            }
            Ok(())
        }
        DbCommand::Plan(args) => {
            let id_type = match args.id_type.as_str() {
                "uuid" => IdType::Uuid,
                "bigint" => IdType::Bigint,
                other => bail!("--id-type {other:?} must be uuid or bigint"),
            };
            let client = connect(&args.db.url).await?;
            let inv = inspect(&client).await?;
            let plan = Plan::draft(&inv, &args.tenant_zero, id_type)?;
            let text = plan.to_toml_explained(&inv)?;
            if json {
                output::json(out, &json!({ "plan": plan, "steps": plan.steps(&inv) }))?;
            } else {
                print_steps(&plan, &inv, out)?;
            }
            match &args.out {
                Some(path) => {
                    std::fs::write(path, &text)
                        .with_context(|| format!("cannot write the plan to {}", path.display()))?;
                    if !json {
                        writeln!(
                            out,
                            "\nplan written to {}: review it, then ficus db apply --plan {} (add --execute to run)",
                            path.display(),
                            path.display()
                        )?;
                    }
                }
                None if !json => write!(out, "\n{text}")?,
                None => {}
            }
            Ok(())
        }
        DbCommand::Apply(args) => apply_cmd(args, None, json, out).await,
        DbCommand::Backfill(args) => apply_cmd(args, Some(StepKind::Backfill), json, out).await,
        DbCommand::Status(target) => {
            let (plan, inv, client) = load(&target).await?;
            let rows = apply::status(&client, &plan, &inv).await?;
            if json {
                output::json(out, &json!({ "tables": rows }))?;
                return Ok(());
            }
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|s| {
                    vec![
                        s.table.clone(),
                        s.column.clone().unwrap_or_else(|| "-".into()),
                        if s.default { "yes" } else { "no" }.into(),
                        format!("{:.1}% ({} rows)", s.backfill_percent, s.rows),
                        s.index.into(),
                        if s.tightened { "yes" } else { "no" }.into(),
                        s.rls.into(),
                        s.next_step.clone().unwrap_or_else(|| "(done)".into()),
                    ]
                })
                .collect();
            output::table(
                out,
                &[
                    "TABLE",
                    "TENANT_ID",
                    "DEFAULT",
                    "BACKFILL",
                    "INDEX",
                    "NOT NULL+FK",
                    "RLS",
                    "NEXT STEP",
                ],
                &table,
            )?;
            Ok(())
        }
        DbCommand::Revert(args) => revert_cmd(args, json, out).await,
        DbCommand::Enforce(args) => enforce_cmd(args, true, json, out).await,
        DbCommand::Unenforce(args) => enforce_cmd(args, false, json, out).await,
        DbCommand::Probe(target) => {
            let (plan, _inv, mut client) = load(&target).await?;
            let result = ficus_retrofit::probe::probe(&mut client, &plan).await?;
            if json {
                output::json(out, &result)?;
            } else {
                let rows: Vec<Vec<String>> = result
                    .findings
                    .iter()
                    .map(|f| {
                        vec![
                            f.table.clone(),
                            f.role.clone(),
                            f.attack.clone(),
                            if f.leak { "LEAK" } else { "blocked" }.to_string(),
                            f.detail.clone(),
                        ]
                    })
                    .collect();
                output::table(out, &["TABLE", "ROLE", "ATTACK", "RESULT", "SEEN"], &rows)?;
            }
            let leaks = result.leaks();
            if leaks > 0 {
                bail!(
                    "the probe found {leaks} leak{}",
                    if leaks == 1 { "" } else { "s" }
                );
            }
            Ok(())
        }
        DbCommand::Rehearse(args) => rehearse_cmd(args, json, out).await,
        DbCommand::Lint(db) => {
            let client = connect(&db.url).await?;
            let report = ficus_retrofit::lint::lint(&client).await?;
            if json {
                output::json(out, &report)?;
            } else if report.findings.is_empty() {
                writeln!(out, "no findings")?;
            } else {
                let rows: Vec<Vec<String>> = report
                    .findings
                    .iter()
                    .map(|f| {
                        vec![
                            f.severity.as_str().to_string(),
                            f.check.to_string(),
                            f.object.clone(),
                            f.message.clone(),
                            f.fix.clone(),
                        ]
                    })
                    .collect();
                output::table(
                    out,
                    &["SEVERITY", "CHECK", "OBJECT", "PROBLEM", "FIX"],
                    &rows,
                )?;
            }
            let errors = report.count(ficus_retrofit::lint::Severity::Error);
            if errors > 0 {
                bail!(
                    "lint found {errors} error{}",
                    if errors == 1 { "" } else { "s" }
                );
            }
            Ok(())
        }
        DbCommand::Distribute(DbDistributeCommand::Plan(target)) => {
            let (plan, _inv, client) = load(&target).await?;
            let facts = ficus_retrofit::distribute::read(&client, &plan).await?;
            let d = ficus_retrofit::distribute::decide(&plan, &facts);
            if json {
                output::json(out, &d)?;
            } else {
                print_distribution(&d, out)?;
            }
            let manual = d.blockers().filter(|(_, b)| !b.automatic).count();
            if manual > 0 {
                bail!("{manual} blockers need the operator's decision before distribute apply");
            }
            Ok(())
        }
        DbCommand::Distribute(DbDistributeCommand::Status(db)) => {
            let client = connect(&db.url).await?;
            let status = ficus_retrofit::distribute::status::read(&client).await?;
            if json {
                output::json(out, &status)?;
            } else {
                print_distribution_status(&status, out)?;
            }
            Ok(())
        }
        DbCommand::Distribute(DbDistributeCommand::AddNode(args)) => {
            use ficus_retrofit::distribute::scale;
            let node: scale::NodeAddress = args.node.parse()?;
            let client = connect(&args.db.url).await?;
            let id = scale::add_node(&client, &args.db.url, &node).await?;
            if json {
                output::json(out, &json!({ "node": node.to_string(), "node_id": id }))?;
            } else {
                writeln!(
                    out,
                    "node {node} added (node {id}); ficus db distribute rebalance moves shards onto it"
                )?;
            }
            Ok(())
        }
        DbCommand::Distribute(DbDistributeCommand::Apply(args)) => {
            distribute_cmd(args, true, json, out).await
        }
        DbCommand::Distribute(DbDistributeCommand::Revert(args)) => {
            distribute_cmd(args, false, json, out).await
        }
        DbCommand::Distribute(DbDistributeCommand::Rebalance(db)) => {
            use ficus_retrofit::distribute::scale;
            let client = connect(&db.url).await?;
            let mut last: Option<(usize, usize)> = None;
            let done = scale::rebalance(
                &client,
                &db.url,
                std::time::Duration::from_millis(500),
                &mut |moves| {
                    // One line per change in the number of finished moves, so
                    // a long rebalance shows it is alive without flooding.
                    let finished = moves.iter().filter(|m| m.progress == 2).count();
                    if last != Some((finished, moves.len())) {
                        last = Some((finished, moves.len()));
                        let line = if json {
                            json!({"event": "rebalance", "moved": finished, "moves": moves.len()})
                                .to_string()
                        } else {
                            format!(
                                "rebalancing: {finished} of {} shard moves done",
                                moves.len()
                            )
                        };
                        let _ = writeln!(std::io::stderr(), "{line}");
                    }
                },
            )
            .await?;
            if json {
                output::json(out, &done)?;
            } else {
                writeln!(
                    out,
                    "rebalanced: {} shard moves in {:.1} s",
                    done.moves.len(),
                    done.elapsed_ms as f64 / 1000.0
                )?;
            }
            Ok(())
        }
        DbCommand::Distribute(DbDistributeCommand::Isolate(args)) => {
            use ficus_retrofit::distribute::scale;
            let client = connect(&args.db.url).await?;
            let done = scale::isolate(&client, &args.db.url, &args.tenant).await?;
            if json {
                output::json(out, &done)?;
            } else {
                writeln!(
                    out,
                    "tenant {} isolated: shard {} on {}",
                    done.tenant,
                    done.shard,
                    done.nodes.join(", ")
                )?;
            }
            Ok(())
        }
        DbCommand::Tenant(DbTenantCommand::Add(args)) => {
            let client = connect(&args.db.url).await?;
            let id = apply::add_tenant(&client, &args.id, &args.name).await?;
            if json {
                output::json(out, &json!({ "tenant": args.id, "organization_id": id }))?;
            } else {
                writeln!(
                    out,
                    "tenant {} is organization {id} in the database",
                    args.id
                )?;
            }
            Ok(())
        }
    }
}

/// `distribute apply` and `distribute revert`: the steps without --execute;
/// with it, the run, and after an apply the proof (one shard per tenant
/// query, the probe's matrix on the distributed tables).
async fn distribute_cmd(
    args: DbDistributeArgs,
    forward: bool,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    use ficus_retrofit::distribute::apply as dist;
    let (plan, _inv, mut client) = load(&args.target).await?;
    let opts = Options {
        lock_timeout: args.lock.lock_timeout,
        attempts: args.lock.attempts.max(1),
        ..Options::default()
    };
    if !args.execute {
        let moves = if forward {
            dist::planned(&client, &plan).await?
        } else {
            dist::begun(&client).await?
        };
        let mut shown: Vec<&dist::Move> = moves
            .iter()
            .filter(|(_, done)| *done != forward)
            .map(|(m, _)| m)
            .collect();
        if !forward {
            shown.reverse();
        }
        if json {
            output::json(out, &json!({ "dry_run": true, "steps": shown }))?;
            return Ok(());
        }
        writeln!(
            out,
            "dry run: nothing is changed without --execute
"
        )?;
        if shown.is_empty() {
            writeln!(
                out,
                "{}",
                if forward {
                    "every step is done"
                } else {
                    "nothing to undo"
                }
            )?;
        }
        for m in shown {
            writeln!(
                out,
                "-- {}
-- {}",
                m.id, m.note
            )?;
            for st in if forward { &m.forward } else { &m.undo } {
                writeln!(out, "{};", st.sql)?;
            }
            writeln!(out)?;
        }
        return Ok(());
    }
    let mut report = reporter(json);
    if !forward {
        dist::revert(&mut client, &opts, &mut report).await?;
        if !json {
            writeln!(out, "reverted: every table is back on the coordinator")?;
        }
        return Ok(());
    }
    dist::apply(&mut client, &args.target.db.url, &plan, &opts, &mut report).await?;
    let routing = dist::routing(&client, &plan).await?;
    let probe = ficus_retrofit::probe::probe(&mut client, &plan).await?;
    let scattered: Vec<String> = routing
        .iter()
        .filter(|(_, tasks)| *tasks != 1)
        .map(|(t, tasks)| format!("{t} ({tasks} shards)"))
        .collect();
    if json {
        // One line, like the step events before it.
        writeln!(
            out,
            "{}",
            json!({
                "event": "proof",
                "routing": routing.iter().map(|(t, n)| json!({ "table": t.to_string(), "shards": n })).collect::<Vec<_>>(),
                "probe": { "attacks": probe.findings.len(), "leaks": probe.leaks() },
            })
        )?;
    } else {
        for (t, n) in &routing {
            writeln!(
                out,
                "proved: a one-tenant query on {t} reaches {n} shard{}",
                if *n == 1 { "" } else { "s" }
            )?;
        }
        writeln!(
            out,
            "probe: {} attacks on the distributed tables, {} leaks",
            probe.findings.len(),
            probe.leaks()
        )?;
    }
    if !scattered.is_empty() {
        bail!(
            "a one-tenant query reaches more than one shard: {}",
            scattered.join(", ")
        );
    }
    if probe.leaks() > 0 {
        bail!(
            "the probe found {} leaks on the distributed tables",
            probe.leaks()
        );
    }
    Ok(())
}

/// Reads the plan file and checks it against the live database.
async fn rehearse_cmd(args: DbRehearseArgs, json: bool, out: &mut impl Write) -> Result<()> {
    use ficus_retrofit::rehearse::{self, Event};
    if args.rows < 1 {
        bail!("--rows {} must be at least 1", args.rows);
    }
    let plan = match &args.plan {
        Some(path) => {
            let shown = path.display().to_string();
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the plan {shown}"))?;
            Some(Plan::from_toml(&text, &shown)?)
        }
        None => None,
    };
    let opts = rehearse::Options {
        rows: args.rows,
        scratch_url: args.scratch_url.clone(),
        keep: args.keep,
        bin_dir: None,
    };
    let terminal = std::io::stdout().is_terminal() && !json;
    let mut on = move |e: &Event| {
        let mut o = std::io::stdout().lock();
        if !terminal {
            let _ = writeln!(o, "{}", serde_json::to_string(e).unwrap_or_default());
            return;
        }
        let _ = match e {
            Event::Scratch { database, created } => writeln!(
                o,
                "rehearsing in {database}{}",
                if *created { " (made for this run)" } else { "" }
            ),
            Event::Copied {
                table,
                rows,
                source_rows,
            } => {
                writeln!(o, "  copied {table}: {rows} rows (source ~{source_rows})")
            }
            Event::Step {
                step, ok: true, ms, ..
            } => writeln!(o, "  {step}: done ({ms} ms)"),
            Event::Step {
                step, detail, ms, ..
            } => writeln!(
                o,
                "  {step}: BLOCKED after {ms} ms: {}",
                detail.as_deref().unwrap_or("")
            ),
            Event::WorkloadFailure { step, failure } => {
                writeln!(o, "  workload error during {step}: {failure}")
            }
        };
    };
    let report = rehearse::rehearse(&args.db.url, plan, &opts, &mut on).await?;
    if json {
        output::json(out, &json!({ "report": report, "passed": report.passed() }))?;
    } else {
        writeln!(
            out,
            "\nrehearsal in {}{}",
            report.scratch,
            if report.kept { " (kept)" } else { " (dropped)" }
        )?;
        writeln!(
            out,
            "  workload: {} rounds, {} app errors, {} tenant-role errors{}",
            report.workload_rounds,
            report.app_failures.len(),
            report.tenant_failures.len(),
            if report.workload_skipped.is_empty() {
                String::new()
            } else {
                format!(
                    "; no insert derived for {}",
                    report.workload_skipped.join("; ")
                )
            }
        )?;
        for r in &report.roles_not_rehearsed {
            writeln!(out, "  not rehearsed: {r}")?;
        }
        for s in &report.steps {
            match &s.blocker {
                None => writeln!(out, "  {}: {} ms", s.step, s.ms)?,
                Some(b) => writeln!(out, "  {}: BLOCKED: {b}", s.step)?,
            }
        }
        writeln!(out, "  leaks: {}", report.leaks)?;
        for l in &report.lint_errors {
            writeln!(out, "  lint error: {l}")?;
        }
        writeln!(
            out,
            "  revert restored the schema exactly: {}",
            match report.revert_exact {
                Some(true) => "yes".to_string(),
                Some(false) => format!("NO\n    {}", report.revert_difference.join("\n    ")),
                None => "not checked".to_string(),
            }
        )?;
    }
    if report.app_saw_errors() {
        bail!(
            "the application would have seen {} error{} (first: {})",
            report.app_failures.len(),
            if report.app_failures.len() == 1 {
                ""
            } else {
                "s"
            },
            report.app_failures[0]
        );
    }
    if !report.passed() {
        bail!(
            "the rehearsal did not pass: see the blocked steps, leaks, tenant-role errors or revert above"
        );
    }
    Ok(())
}

async fn load(target: &DbPlanFile) -> Result<(Plan, Inventory, tokio_postgres::Client)> {
    let path = target.plan.display().to_string();
    let text = std::fs::read_to_string(&target.plan)
        .with_context(|| format!("cannot read the plan {path}"))?;
    let plan = Plan::from_toml(&text, &path)?;
    let client = connect(&target.db.url).await?;
    let inv = inspect(&client).await?;
    plan.check_against(&inv, &path)?;
    Ok((plan, inv, client))
}

fn print_distribution(
    d: &ficus_retrofit::distribute::Distribution,
    out: &mut impl Write,
) -> Result<()> {
    use ficus_retrofit::distribute::Placement;
    let rows: Vec<Vec<String>> = d
        .tables
        .iter()
        .map(|t| {
            let (placement, by) = match &t.placement {
                Placement::Distributed {
                    column,
                    colocate_with,
                } => (
                    "distributed".to_string(),
                    match colocate_with {
                        Some(w) => format!("{column}, with {w}"),
                        None => column.clone(),
                    },
                ),
                Placement::Reference => ("reference".to_string(), String::new()),
                Placement::Local => ("local".to_string(), String::new()),
            };
            vec![
                t.table.to_string(),
                t.class.to_string(),
                placement,
                by,
                t.blockers.len().to_string(),
            ]
        })
        .collect();
    output::table(out, &["TABLE", "CLASS", "AS", "BY", "BLOCKERS"], &rows)?;
    let blockers: Vec<Vec<String>> = d
        .blockers()
        .map(|(t, b)| {
            vec![
                t.to_string(),
                b.kind.to_string(),
                b.object.clone(),
                if b.automatic { "ficus" } else { "operator" }.to_string(),
                b.fix.clone(),
            ]
        })
        .collect();
    if !blockers.is_empty() {
        writeln!(out)?;
        output::table(
            out,
            &["TABLE", "BLOCKER", "OBJECT", "FIXED BY", "FIX"],
            &blockers,
        )?;
    }
    if !d.propagate.is_empty() {
        writeln!(out, "\nto propagate to the workers:")?;
        for p in &d.propagate {
            writeln!(out, "  {p}")?;
        }
    }
    Ok(())
}

/// How many tenants the text status lists; JSON has them all.
const STATUS_TENANTS: usize = 20;

fn print_distribution_status(
    s: &ficus_retrofit::distribute::status::Status,
    out: &mut impl Write,
) -> Result<()> {
    writeln!(out, "{}", s.citus_version)?;
    let nodes: Vec<Vec<String>> = s
        .nodes
        .iter()
        .map(|n| {
            vec![
                format!("{}:{}", n.host, n.port),
                n.role.to_string(),
                if !n.active {
                    "inactive"
                } else if n.should_have_shards {
                    "active"
                } else {
                    "active, no new shards"
                }
                .to_string(),
                n.shards.to_string(),
                format!("{} kB", n.bytes / 1024),
            ]
        })
        .collect();
    output::table(out, &["NODE", "ROLE", "STATE", "SHARDS", "SIZE"], &nodes)?;
    writeln!(out)?;
    if s.tables.is_empty() {
        writeln!(out, "no table is distributed yet")?;
    } else {
        let tables: Vec<Vec<String>> = s
            .tables
            .iter()
            .map(|t| {
                vec![
                    t.table.clone(),
                    t.kind.clone(),
                    t.column.clone().unwrap_or_default(),
                    t.colocation_id.to_string(),
                    t.shards.to_string(),
                    format!("{} kB", t.bytes / 1024),
                ]
            })
            .collect();
        output::table(
            out,
            &["TABLE", "KIND", "BY", "COLOCATION", "SHARDS", "SIZE"],
            &tables,
        )?;
    }
    if !s.tenants.is_empty() {
        writeln!(
            out,
            "\n{} tenants; the {} with the most rows:",
            s.tenants.len(),
            STATUS_TENANTS.min(s.tenants.len())
        )?;
        let tenants: Vec<Vec<String>> = s
            .tenants
            .iter()
            .take(STATUS_TENANTS)
            .map(|t| {
                vec![
                    t.tenant.clone(),
                    t.rows.to_string(),
                    t.shard.to_string(),
                    t.nodes.join(", "),
                    if t.alone { "alone" } else { "shared" }.to_string(),
                ]
            })
            .collect();
        output::table(
            out,
            &["TENANT", "ROWS", "SHARD", "NODE", "SHARD IS"],
            &tenants,
        )?;
    }
    if let Some(state) = &s.rebalance {
        writeln!(out, "\nrebalance: {state}")?;
    }
    if !s.moves.is_empty() {
        let moves: Vec<Vec<String>> = s
            .moves
            .iter()
            .map(|m| {
                vec![
                    m.table.clone(),
                    m.shard.to_string(),
                    format!("{} → {}", m.from, m.to),
                    match m.progress {
                        0 => "waiting",
                        1 => "moving",
                        2 => "moved",
                        _ => "unknown",
                    }
                    .to_string(),
                    format!("{} / {} kB", m.target_bytes / 1024, m.source_bytes / 1024),
                ]
            })
            .collect();
        output::table(out, &["TABLE", "SHARD", "MOVE", "STATE", "COPIED"], &moves)?;
    }
    Ok(())
}

fn print_inventory(inv: &Inventory, out: &mut impl Write) -> Result<()> {
    writeln!(
        out,
        "database {} (PostgreSQL {}), {} tables",
        inv.database,
        inv.server_version,
        inv.tables.len()
    )?;
    let rows: Vec<Vec<String>> = inv
        .tables
        .iter()
        .map(|t| {
            vec![
                t.table.to_string(),
                t.class.as_str().to_string(),
                t.row_estimate.to_string(),
                format!("{} kB", t.bytes / 1024),
                if t.primary_key.is_empty() {
                    "-".to_string()
                } else {
                    t.primary_key
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                },
                t.foreign_keys
                    .iter()
                    .map(|f| f.references.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                t.reason.clone(),
            ]
        })
        .collect();
    output::table(
        out,
        &[
            "TABLE",
            "CLASS",
            "ROWS~",
            "SIZE",
            "KEY",
            "REFERENCES",
            "WHY",
        ],
        &rows,
    )?;
    let hazards: Vec<String> = inv
        .tables
        .iter()
        .flat_map(|t| t.hazards.iter().map(move |h| format!("  {}: {h}", t.table)))
        .collect();
    writeln!(
        out,
        "\nhazards:{}",
        if hazards.is_empty() { " none" } else { "" }
    )?;
    for h in hazards {
        writeln!(out, "{h}")?;
    }
    writeln!(out, "\nroles:")?;
    let reasons = ficus_retrofit::plan::app_role_reasons(inv);
    let roles: Vec<Vec<String>> = inv
        .roles
        .iter()
        .filter(|r| r.can_login || r.owns > 0)
        .map(|r| {
            vec![
                format!("  {}", r.name),
                r.superuser.to_string(),
                r.bypass_rls.to_string(),
                r.owns.to_string(),
                r.connected.to_string(),
                reasons.get(&r.name).cloned().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    output::table(
        out,
        &[
            "  ROLE",
            "SUPERUSER",
            "BYPASSRLS",
            "OWNS TABLES",
            "CONNECTED NOW",
            "APP ROLE BECAUSE",
        ],
        &roles,
    )?;
    if inv.long_transactions.is_empty() {
        writeln!(out, "\nlong transactions: none")?;
    } else {
        writeln!(out, "\nlong transactions (they would hold up DDL):")?;
        for l in &inv.long_transactions {
            writeln!(
                out,
                "  pid {} ({}, {}) open {:.0} s: {}",
                l.pid, l.user, l.application, l.seconds, l.query
            )?;
        }
    }
    Ok(())
}

fn print_steps(plan: &Plan, inv: &Inventory, out: &mut impl Write) -> Result<()> {
    writeln!(
        out,
        "tenant zero: {} ({}, {} id {})",
        plan.tenant_zero.name,
        plan.tenant_zero.slug,
        plan.id_type.sql(),
        plan.tenant_zero.id
    )?;
    let rows: Vec<Vec<String>> = plan
        .steps(inv)
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                s.hazard.as_str().to_string(),
                s.lock.clone(),
                s.undo_hazard.as_str().to_string(),
                s.note.clone(),
            ]
        })
        .collect();
    output::table(out, &["STEP", "HAZARD", "LOCK", "UNDO", "WHAT"], &rows)?;
    Ok(())
}

fn options(args: &DbApplyArgs, only: Option<StepKind>) -> Options {
    Options {
        lock_timeout: args.lock.lock_timeout,
        attempts: args.lock.attempts.max(1),
        allow_destructive: false,
        backfill: backfill::Options {
            target_batch: args.batch_time,
            max_rows_per_sec: args.max_rows_per_sec,
            max_replica_lag: args.max_replica_lag,
            lock_timeout: args.lock.lock_timeout,
            attempts: args.lock.attempts.max(1),
            ..backfill::Options::default()
        },
        only,
    }
}

/// Prints events: for people on a terminal, JSON lines otherwise.
fn reporter(json: bool) -> impl FnMut(&Event) + Send {
    let terminal = std::io::stdout().is_terminal() && !json;
    move |e: &Event| {
        let mut out = std::io::stdout().lock();
        if !terminal {
            let _ = writeln!(out, "{}", serde_json::to_string(e).unwrap_or_default());
            return;
        }
        let _ = match e {
            Event::Step { step, status, ms } => writeln!(out, "\r{step}: {status} ({ms} ms)\x1b[K"),
            Event::Retry {
                step,
                attempt,
                wait_ms,
                blockers,
            } => writeln!(
                out,
                "\r{step}: lock not available (attempt {attempt}), retrying in {wait_ms} ms; held by {blockers}\x1b[K"
            ),
            Event::Backfill(p) if p.replica_lag_secs.is_some() => write!(
                out,
                "\r{}: waiting for replicas: replay lag {:.1} s\x1b[K",
                p.table,
                p.replica_lag_secs.unwrap_or_default()
            ),
            Event::Backfill(p) => write!(
                out,
                "\r{}: {} {} / ~{} rows, {:.0} rows/s{}\x1b[K",
                p.table,
                p.phase,
                p.rows,
                p.estimate,
                p.rows_per_sec,
                p.eta_secs
                    .map(|s| format!(", ETA {s:.0} s"))
                    .unwrap_or_default()
            ),
        };
        let _ = out.flush();
    }
}

async fn apply_cmd(
    args: DbApplyArgs,
    only: Option<StepKind>,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let (plan, inv, mut client) = load(&args.target).await?;
    if !args.execute {
        let steps: Vec<_> = plan
            .steps(&inv)
            .into_iter()
            .filter(|s| only.is_none_or(|k| s.kind == k))
            .collect();
        if json {
            output::json(out, &json!({ "dry_run": true, "steps": steps }))?;
            return Ok(());
        }
        let done = apply::journal(&client).await?;
        writeln!(out, "dry run: nothing is changed without --execute\n")?;
        for s in &steps {
            writeln!(
                out,
                "-- {} [{}; lock: {}]{}",
                s.id,
                s.hazard.as_str(),
                s.lock,
                if done.contains(&s.id) { " (done)" } else { "" }
            )?;
            writeln!(out, "-- {}", s.note)?;
            for st in &s.forward {
                writeln!(out, "{};", st.sql)?;
            }
            writeln!(out)?;
        }
        return Ok(());
    }
    let opts = options(&args, only);
    let mut report = reporter(json);
    apply::apply(&mut client, &plan, &inv, &opts, &mut report).await?;
    if !json {
        writeln!(
            out,
            "done: ficus db status --plan {} shows each table",
            args.target.plan.display()
        )?;
    }
    Ok(())
}

async fn enforce_cmd(
    args: DbEnforceArgs,
    forward: bool,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let (plan, inv, mut client) = load(&args.target).await?;
    let table = match (&args.table, args.next) {
        (Some(raw), _) => {
            let (schema, name) = raw.split_once('.').unwrap_or(("public", raw.as_str()));
            Table::new(schema, name)
        }
        (None, _) => match enforce::next_table(&client, &plan).await? {
            Some(t) => t,
            None => {
                writeln!(out, "every tenant-owned table is enforced")?;
                return Ok(());
            }
        },
    };
    if !plan
        .owned()
        .any(|p| p.schema == table.schema && p.name == table.name)
    {
        bail!("{table} is not a tenant-owned table of the plan");
    }
    let report = enforce::step(
        &mut client,
        &plan,
        &inv,
        &table,
        forward,
        args.execute,
        &Options::default(),
    )
    .await?;
    if json {
        output::json(out, &report)?;
        return Ok(());
    }
    writeln!(
        out,
        "{}: {} → {}{}",
        report.table,
        report.from.as_str(),
        report.to.as_str(),
        if report.executed {
            ""
        } else {
            " (dry run: add --execute)"
        }
    )?;
    for c in &report.checks {
        writeln!(out, "  check: {c}")?;
    }
    for v in &report.verified {
        writeln!(
            out,
            "  {}: {v}",
            if report.executed {
                "proved"
            } else {
                "would run"
            }
        )?;
    }
    Ok(())
}

async fn revert_cmd(args: DbRevertArgs, json: bool, out: &mut impl Write) -> Result<()> {
    let (plan, inv, mut client) = load(&args.target).await?;
    if !args.execute {
        let done = apply::journal(&client).await?;
        writeln!(out, "dry run: nothing is changed without --execute\n")?;
        for s in plan.steps(&inv).iter().rev() {
            if Some(s.id.as_str()) == args.to.as_deref() {
                break;
            }
            if !done.contains(&s.id) {
                continue;
            }
            writeln!(out, "-- undo {} [{}]", s.id, s.undo_hazard.as_str())?;
            for st in &s.undo {
                writeln!(out, "{};", st.sql)?;
            }
            writeln!(out)?;
        }
        return Ok(());
    }
    let opts = Options {
        allow_destructive: args.allow_destructive,
        ..Options::default()
    };
    let mut report = reporter(json);
    apply::revert(
        &mut client,
        &plan,
        &inv,
        args.to.as_deref(),
        &opts,
        &mut report,
    )
    .await?;
    Ok(())
}
