//! One function per subcommand: validate arguments with the domain's rules, call the
//! store, print the result.

use std::io::{self, Write};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result, bail};
use ficus_core::{Actor, Domain, Stage, TenantId, Timestamp, Transition, tenant::parse_name};
use ficus_store::{
    AuditQuery, ControlStore, FeedEvent, InitOutcome, NewTenant, OpenMode, StageChange, StoreError,
    StoreUrl,
};
use serde_json::json;

use crate::cli::{
    AddArgs, AuditArgs, Cli, Command, GateArgs, ImportArgs, ListArgs, MismatchesArgs, PromoteArgs,
    ProxyArgs, ReadinessArgs, RetireArgs, RollbackArgs, ShowArgs, StageArgs, TenantCommand,
    WatchArgs,
};
use crate::import;
use crate::output::{self, EVENT_HEADER, EventJson, StatusJson, TENANT_HEADER, TenantJson};

/// The quiet window the finish line asks of legacy until the proxy makes it
/// configurable: a full day without a request.
const QUIET_WINDOW_MS: i64 = 24 * 60 * 60 * 1000;

pub async fn run(cli: Cli) -> Result<()> {
    let url = StoreUrl::parse(&cli.store)?;
    let mode = if matches!(cli.command, Command::Init) {
        OpenMode::Create
    } else {
        OpenMode::Existing
    };
    let store = ficus_store::open(&url, mode).await?;
    let out = &mut io::stdout().lock();
    let json = cli.json;
    match cli.command {
        Command::Init => init(&*store, json, out),
        Command::Tenant(cmd) => match cmd {
            TenantCommand::Add(args) => add(&*store, args, json, out).await,
            TenantCommand::List(args) => list(&*store, args, json, out).await,
            TenantCommand::Show(args) => show(&*store, args, json, out).await,
            TenantCommand::Stage(args) => stage(&*store, args, json, out).await,
            TenantCommand::Rollback(args) => rollback(&*store, args, json, out).await,
            TenantCommand::Import(args) => import_file(&*store, args, json, out).await,
            TenantCommand::Promote(args) => promote(&*store, args, json, out).await,
        },
        Command::Audit(args) => audit(&*store, args, json, out).await,
        Command::Status => status(&*store, json, out).await,
        Command::Watch(args) => watch(store, args, json, out).await,
        Command::Proxy(_) => bail!("ficus proxy is started before the async runtime"),
        Command::Mismatches(args) => mismatches(&*store, args, json, out).await,
        Command::Noise => noise(&*store, json, out).await,
        Command::Readiness(args) => readiness(&*store, args, json, out).await,
        Command::RetireLegacy(args) => retire_legacy(&*store, args, json, out).await,
    }
}

/// `ficus proxy`: validate the config, and run unless `--check`.
pub fn proxy(args: &ProxyArgs) -> Result<()> {
    if args.check {
        let config = ficus_proxy::Config::load(&args.config)?;
        println!(
            "{}: ok ({} listen address{}, {} tenant rule{})",
            args.config.display(),
            config.listen.len(),
            if config.listen.len() == 1 { "" } else { "es" },
            config.settings.rules.len(),
            if config.settings.rules.len() == 1 {
                ""
            } else {
                "s"
            },
        );
        return Ok(());
    }
    ficus_proxy::run(&args.config)?;
    Ok(())
}

fn init(store: &dyn ControlStore, json: bool, out: &mut impl Write) -> Result<()> {
    let outcome = match store.init_outcome() {
        InitOutcome::Created => "created".to_string(),
        InitOutcome::AlreadyInitialized => "already-initialized".to_string(),
        InitOutcome::Upgraded { from } => format!("upgraded-from-{from}"),
    };
    if json {
        output::json(
            out,
            &json!({ "store": store.location(), "outcome": outcome }),
        )?;
    } else {
        let what = match store.init_outcome() {
            InitOutcome::Created => "created".to_string(),
            InitOutcome::AlreadyInitialized => "already initialized; nothing to do".to_string(),
            InitOutcome::Upgraded { from } => format!("upgraded from schema version {from}"),
        };
        writeln!(out, "store {}: {what}", store.location())?;
    }
    Ok(())
}

fn tenant_id(raw: &str) -> Result<TenantId> {
    Ok(TenantId::parse(raw)?)
}

async fn existing(store: &dyn ControlStore, id: &TenantId) -> Result<ficus_core::Tenant> {
    store
        .tenant(id)
        .await?
        .ok_or_else(|| StoreError::UnknownTenant(id.clone()).into())
}

async fn add(
    store: &dyn ControlStore,
    args: AddArgs,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let id = tenant_id(&args.id)?;
    let name = match &args.name {
        Some(n) => parse_name(n)?,
        None => id.to_string(),
    };
    let stage = Stage::parse(&args.stage)?;
    let domains = args
        .domains
        .iter()
        .map(|d| Domain::parse(d))
        .collect::<Result<Vec<_>, _>>()?;
    let tenant = store
        .add_tenant(
            NewTenant {
                id,
                name,
                stage,
                domains,
            },
            Actor::Cli,
            &args.reason,
        )
        .await?;
    if json {
        output::json(out, &json!({ "tenant": TenantJson::from(&tenant) }))?;
    } else {
        writeln!(
            out,
            "added tenant {} in stage {} (version {})",
            tenant.id, tenant.stage, tenant.version
        )?;
    }
    Ok(())
}

async fn list(
    store: &dyn ControlStore,
    args: ListArgs,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let stage = args.stage.as_deref().map(Stage::parse).transpose()?;
    let tenants = store.tenants(stage).await?;
    if json {
        let tenants: Vec<TenantJson> = tenants.iter().map(TenantJson::from).collect();
        output::json(out, &json!({ "tenants": tenants }))?;
    } else if tenants.is_empty() {
        writeln!(
            out,
            "no tenants{}",
            stage.map_or(String::new(), |s| format!(" in stage {s}"))
        )?;
    } else {
        output::table(out, &TENANT_HEADER, &output::tenant_rows(&tenants))?;
    }
    Ok(())
}

async fn show(
    store: &dyn ControlStore,
    args: ShowArgs,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let id = tenant_id(&args.id)?;
    let tenant = existing(store, &id).await?;
    let events = store
        .audit(AuditQuery {
            tenant: Some(id.clone()),
            since: None,
            limit: Some(args.events),
        })
        .await?;
    let day_ago = Timestamp::from_unix_millis(now().unix_millis() - 24 * 60 * 60 * 1000);
    let stats = store.comparison_stats(&id, day_ago).await?;
    let total = |f: fn(&ficus_store::ComparisonCount) -> u64| stats.iter().map(f).sum::<u64>();
    let (compared, matched, mismatched) = (
        total(|c| c.compared),
        total(|c| c.matched),
        total(|c| c.mismatched),
    );
    let (noise_only, errors, shed) = (
        total(|c| c.noise_only),
        total(|c| c.errors),
        total(|c| c.shed),
    );
    if json {
        let events: Vec<EventJson> = events.iter().map(EventJson::from).collect();
        let comparisons = json!({
            "window": "24h", "endpoints": stats.len(), "compared": compared, "matched": matched,
            "mismatched": mismatched, "noise_only": noise_only, "errors": errors, "shed": shed,
        });
        output::json(
            out,
            &json!({ "tenant": TenantJson::from(&tenant), "audit": events, "comparisons": comparisons }),
        )?;
        return Ok(());
    }
    let domains = if tenant.domains.is_empty() {
        "(none)".to_string()
    } else {
        tenant
            .domains
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    writeln!(out, "tenant   {}", tenant.id)?;
    writeln!(out, "name     {}", tenant.name)?;
    writeln!(out, "stage    {}", tenant.stage)?;
    writeln!(out, "version  {}", tenant.version)?;
    writeln!(out, "domains  {domains}")?;
    writeln!(
        out,
        "created  {}",
        ficus_store::format_time(tenant.created_at)
    )?;
    writeln!(
        out,
        "updated  {}",
        ficus_store::format_time(tenant.updated_at)
    )?;
    writeln!(
        out,
        "compared {compared} reads in the last 24 h on {} endpoints: {matched} matched, {mismatched} mismatched, \
         {noise_only} noise only, {errors} shadow errors, {shed} not shadowed",
        stats.len()
    )?;
    writeln!(out)?;
    writeln!(out, "latest audit events:")?;
    output::table(out, &EVENT_HEADER, &output::event_rows(&events))?;
    Ok(())
}

async fn change(
    store: &dyn ControlStore,
    change: StageChange,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let tenant = store.change_stage(change).await?;
    if json {
        output::json(out, &json!({ "tenant": TenantJson::from(&tenant) }))?;
    } else {
        writeln!(
            out,
            "tenant {} is now in stage {} (version {})",
            tenant.id, tenant.stage, tenant.version
        )?;
    }
    Ok(())
}

async fn stage(
    store: &dyn ControlStore,
    args: StageArgs,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let tenant = tenant_id(&args.id)?;
    let to = Stage::parse(&args.stage)?;
    let request = StageChange {
        tenant,
        to,
        expected_version: args.if_version,
        actor: Actor::Cli,
        reason: args.reason,
    };
    change(store, request, json, out).await
}

async fn rollback(
    store: &dyn ControlStore,
    args: RollbackArgs,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let id = tenant_id(&args.id)?;
    let current = existing(store, &id).await?;
    let to = match args.to.as_deref() {
        Some(raw) => Stage::parse(raw)?,
        None => match current.stage {
            Stage::Migrated => Stage::Shadow,
            Stage::Shadow => Stage::Legacy,
            Stage::Legacy => {
                bail!("tenant {id} is on legacy already; there is nothing to roll back")
            }
        },
    };
    if Transition::between(current.stage, to) == Ok(Transition::Promote) {
        bail!(
            "a rollback only moves backward; {} → {to} for tenant {id} is a promotion",
            current.stage
        );
    }
    // Based on the version just read: if someone else moves the tenant between the
    // read and the write, the rollback is refused instead of applied to a state the
    // operator never saw.
    let request = StageChange {
        tenant: id,
        to,
        expected_version: Some(current.version),
        actor: Actor::Cli,
        reason: args.reason,
    };
    change(store, request, json, out).await
}

async fn import_file(
    store: &dyn ControlStore,
    args: ImportArgs,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let file = match import::read(&args.file) {
        Ok(f) => f,
        Err(import::BadLines(lines)) => bail!(
            "import refused, nothing was added: {} problem{} in {}:\n  {}",
            lines.len(),
            if lines.len() == 1 { "" } else { "s" },
            args.file.display(),
            lines.join("\n  ")
        ),
    };
    let lines = file.lines;
    let count = match store
        .import_tenants(file.tenants, Actor::Cli, &args.reason)
        .await
    {
        Ok(n) => n,
        Err(StoreError::ImportConflicts(conflicts)) => {
            let line = |i: usize| format!("line {}", lines.get(i).copied().unwrap_or(0));
            let listed: Vec<String> = conflicts
                .iter()
                .map(|c| format!("{}: {}", line(c.index), c.describe(line)))
                .collect();
            bail!(
                "import refused, nothing was added: {} conflict{} with {}:\n  {}",
                listed.len(),
                if listed.len() == 1 { "" } else { "s" },
                store.location(),
                listed.join("\n  ")
            );
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        output::json(out, &json!({ "imported": count }))?;
    } else {
        writeln!(out, "imported {count} tenants from {}", args.file.display())?;
    }
    Ok(())
}

async fn audit(
    store: &dyn ControlStore,
    args: AuditArgs,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let tenant = args.id.as_deref().map(tenant_id).transpose()?;
    if let Some(id) = &tenant {
        existing(store, id).await?;
    }
    let since = args
        .since
        .map(|t| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| Timestamp::from_unix_millis(d.as_millis() as i64))
        })
        .transpose()
        .context("--since is before the Unix epoch")?;
    let events = store
        .audit(AuditQuery {
            tenant,
            since,
            limit: args.limit,
        })
        .await?;
    if json {
        let events: Vec<EventJson> = events.iter().map(EventJson::from).collect();
        output::json(out, &json!({ "events": events }))?;
    } else if events.is_empty() {
        writeln!(out, "no audit events")?;
    } else {
        output::table(out, &EVENT_HEADER, &output::event_rows(&events))?;
    }
    Ok(())
}

async fn status(store: &dyn ControlStore, json: bool, out: &mut impl Write) -> Result<()> {
    let progress = store.progress().await?;
    let now = now();
    let blockers = progress.blockers(now, QUIET_WINDOW_MS);
    let retired = store.legacy_retired().await?;
    let ago = |ms: i64| Timestamp::from_unix_millis(now.unix_millis() - ms);
    let day = store.legacy_traffic(ago(24 * 60 * 60 * 1000)).await?;
    let hour = store.legacy_traffic(ago(60 * 60 * 1000)).await?;
    let traffic = output::LegacyTrafficJson::new(&day, &hour);
    if json {
        output::json(
            out,
            &StatusJson::new(store.location(), &progress, &blockers, retired, traffic),
        )?;
        return Ok(());
    }
    let total = progress.total();
    writeln!(out, "store     {}", store.location())?;
    writeln!(out, "tenants   {total}")?;
    for stage in Stage::ALL {
        let n = progress.of(stage);
        let fraction = if total == 0 {
            0.0
        } else {
            n as f64 / total as f64
        };
        writeln!(out, "  {stage:<9} {n:>8}  {}", output::bar(fraction, 30))?;
    }
    writeln!(
        out,
        "migrated  {:.1}%  {}",
        progress.percent_migrated(),
        output::bar(progress.percent_migrated() / 100.0, 30)
    )?;
    if retired {
        writeln!(out, "legacy    retired: proxies send everything to new")?;
    } else {
        writeln!(
            out,
            "legacy    {} requests in the last hour, {} in the last day",
            traffic.last_hour, traffic.last_day
        )?;
        let rows: Vec<Vec<String>> = traffic
            .tenants
            .iter()
            .take(10)
            .map(|t| {
                vec![
                    format!("  {}", t.tenant.as_deref().unwrap_or("(unknown tenant)")),
                    t.last_hour.to_string(),
                    t.last_day.to_string(),
                    t.last_at.clone(),
                ]
            })
            .collect();
        if !rows.is_empty() {
            output::table(
                out,
                &["  TENANT", "LAST HOUR", "LAST DAY", "LAST REQUEST"],
                &rows,
            )?;
            if traffic.tenants.len() > 10 {
                writeln!(out, "  … and {} more tenants", traffic.tenants.len() - 10)?;
            }
        }
    }
    if blockers.is_empty() {
        let next = if retired {
            "legacy is retired"
        } else {
            "legacy can be retired (ficus retire-legacy)"
        };
        writeln!(out, "finish line: reached; {next}")?;
    } else {
        writeln!(out, "finish line: not reached")?;
        for b in &blockers {
            writeln!(out, "  - {b}")?;
        }
    }
    Ok(())
}

async fn watch(
    store: Arc<dyn ControlStore>,
    args: WatchArgs,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let mut sub = store.subscribe(Some(store.snapshot().await?.seq));
    if !json {
        writeln!(
            out,
            "following changes to {} (Ctrl-C to stop)",
            store.location()
        )?;
        out.flush()?;
    }
    let mut seen = 0u64;
    while args.count.is_none_or(|n| seen < n) {
        let event = tokio::select! {
            e = sub.recv() => e,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Some(event) = event else {
            bail!("the change feed stopped")
        };
        let received = now();
        let received_us = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as u64;
        match event {
            FeedEvent::Changed(set) => {
                seen += 1;
                let ids: Vec<TenantId> = set.tenants.iter().cloned().collect();
                let tenants = if set.resync {
                    Vec::new()
                } else {
                    store.tenants_by_id(&ids).await?
                };
                if json {
                    let tenants: Vec<_> = tenants
                        .iter()
                        .map(|t| json!({ "id": t.id.as_str(), "stage": t.stage.as_str(), "version": t.version }))
                        .collect();
                    let line = json!({
                        "event": "changed", "seq": set.seq, "resync": set.resync,
                        "received_at_us": received_us, "tenants": tenants,
                    });
                    writeln!(out, "{line}")?;
                } else if set.resync {
                    writeln!(
                        out,
                        "{} #{} many tenants changed (bulk change); reload",
                        ficus_store::format_time(received),
                        set.seq
                    )?;
                } else {
                    for t in &tenants {
                        writeln!(
                            out,
                            "{} #{} {} is {} (version {})",
                            ficus_store::format_time(received),
                            set.seq,
                            t.id,
                            t.stage,
                            t.version
                        )?;
                    }
                }
            }
            FeedEvent::Lost { error } => {
                if json {
                    writeln!(out, "{}", json!({ "event": "lost", "error": error }))?;
                } else {
                    writeln!(out, "store unreachable, waiting for it to return: {error}")?;
                }
            }
            FeedEvent::Restored => {
                if json {
                    writeln!(out, "{}", json!({ "event": "restored" }))?;
                } else {
                    writeln!(out, "store reachable again")?;
                }
            }
        }
        out.flush()?;
    }
    Ok(())
}

/// Judges one tenant's evidence over the gate's window.
async fn judge(
    store: &dyn ControlStore,
    id: &TenantId,
    gate: &GateArgs,
) -> Result<ficus_core::readiness::Readiness> {
    use ficus_core::readiness::{EndpointEvidence, Thresholds, judge};
    if !(0.0..=1.0).contains(&gate.max_error_rate) {
        bail!(
            "--max-error-rate must be between 0.0 and 1.0, got {}",
            gate.max_error_rate
        );
    }
    let since = Timestamp::from_unix_millis(now().unix_millis() - gate.window.as_millis() as i64);
    let evidence: Vec<EndpointEvidence> = store
        .comparison_stats(id, since)
        .await?
        .into_iter()
        .map(|c| EndpointEvidence {
            endpoint: c.endpoint,
            requests: c.requests,
            compared: c.compared,
            mismatched: c.mismatched,
            errors: c.errors,
        })
        .collect();
    let thresholds = Thresholds {
        min_comparisons: gate.min_comparisons,
        max_mismatches: gate.max_mismatches,
        min_per_endpoint: gate.min_per_endpoint,
        max_error_rate: gate.max_error_rate,
    };
    Ok(judge(&evidence, &thresholds))
}

fn readiness_json(id: &TenantId, r: &ficus_core::readiness::Readiness) -> serde_json::Value {
    let criteria: Vec<_> = r
        .criteria
        .iter()
        .map(|c| json!({ "name": c.name, "passed": c.passed, "detail": c.detail }))
        .collect();
    json!({ "tenant": id.as_str(), "ready": r.is_ready(), "score": (r.score * 100.0).round() / 100.0, "criteria": criteria, "uncovered": r.uncovered })
}

async fn readiness(
    store: &dyn ControlStore,
    args: ReadinessArgs,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let ids: Vec<TenantId> = match (&args.id, args.all) {
        (Some(raw), false) => {
            let id = tenant_id(raw)?;
            existing(store, &id).await?;
            vec![id]
        }
        (None, true) => store
            .tenants(Some(Stage::Shadow))
            .await?
            .into_iter()
            .map(|t| t.id)
            .collect(),
        _ => bail!("name a tenant, or give --all"),
    };
    let mut judged = Vec::with_capacity(ids.len());
    for id in ids {
        let r = judge(store, &id, &args.gate).await?;
        judged.push((id, r));
    }
    judged.sort_by(|a, b| b.1.score.total_cmp(&a.1.score).then_with(|| a.0.cmp(&b.0)));
    if json {
        let items: Vec<_> = judged.iter().map(|(id, r)| readiness_json(id, r)).collect();
        if args.all {
            output::json(
                out,
                &json!({ "window": humantime::format_duration(args.gate.window).to_string(), "tenants": items }),
            )?;
        } else {
            output::json(out, &items[0])?;
        }
        return Ok(());
    }
    if args.all {
        if judged.is_empty() {
            writeln!(out, "no tenants in shadow")?;
            return Ok(());
        }
        let rows: Vec<Vec<String>> = judged
            .iter()
            .map(|(id, r)| {
                let failing: Vec<&str> = r.failing().iter().map(|c| c.name).collect();
                vec![
                    id.to_string(),
                    if r.is_ready() {
                        "ready".into()
                    } else {
                        "not ready".into()
                    },
                    format!("{:.0}%", r.score * 100.0),
                    failing.join(", "),
                ]
            })
            .collect();
        output::table(out, &["TENANT", "VERDICT", "SCORE", "FAILING"], &rows)?;
        return Ok(());
    }
    let (id, r) = &judged[0];
    writeln!(
        out,
        "tenant {id}: {} (window {})",
        if r.is_ready() { "ready" } else { "not ready" },
        humantime::format_duration(args.gate.window)
    )?;
    for c in &r.criteria {
        writeln!(
            out,
            "  {}  {:<14} {}",
            if c.passed { "pass" } else { "FAIL" },
            c.name,
            c.detail
        )?;
    }
    if !r.uncovered.is_empty() {
        writeln!(out, "  uncovered endpoints: {}", r.uncovered.join(", "))?;
    }
    Ok(())
}

async fn promote(
    store: &dyn ControlStore,
    args: PromoteArgs,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let id = tenant_id(&args.id)?;
    let current = existing(store, &id).await?;
    let (to, reason) = match current.stage {
        Stage::Legacy => (
            Stage::Shadow,
            args.reason
                .clone()
                .unwrap_or_else(|| "promoted to shadow: parallel run starts".into()),
        ),
        Stage::Shadow => {
            let r = judge(store, &id, &args.gate).await?;
            if r.is_ready() {
                (
                    Stage::Migrated,
                    args.reason
                        .clone()
                        .unwrap_or_else(|| "promoted: readiness passed".into()),
                )
            } else {
                let failing: Vec<String> = r
                    .failing()
                    .iter()
                    .map(|c| format!("{} ({})", c.name, c.detail))
                    .collect();
                if !args.force {
                    bail!(
                        "tenant {id} is not ready, nothing was changed: {}; use --force --reason to override",
                        failing.join("; ")
                    );
                }
                let Some(why) = args.reason.as_deref().filter(|r| !r.trim().is_empty()) else {
                    bail!(
                        "--force needs --reason: the audit log must say why the readiness gate was overridden"
                    );
                };
                (
                    Stage::Migrated,
                    format!(
                        "forced past the readiness gate: {why} (failing: {})",
                        failing.join("; ")
                    ),
                )
            }
        }
        Stage::Migrated => bail!("tenant {id} is migrated already; there is no stage after it"),
    };
    // Based on the version the decision was made on: if the tenant moved meanwhile
    // the promotion is refused rather than applied to a state nobody judged.
    let request = StageChange {
        tenant: id,
        to,
        expected_version: Some(current.version),
        actor: Actor::Cli,
        reason,
    };
    change(store, request, json, out).await
}

async fn retire_legacy(
    store: &dyn ControlStore,
    args: RetireArgs,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    if args.undo {
        let changed = store
            .set_legacy_retired(false, Actor::Cli, &args.reason)
            .await?;
        if json {
            output::json(out, &json!({ "legacy_retired": false, "changed": changed }))?;
        } else if changed {
            writeln!(
                out,
                "legacy is no longer retired; tenants on legacy or in shadow are routed to it again"
            )?;
        } else {
            writeln!(out, "legacy was not retired; nothing to undo")?;
        }
        return Ok(());
    }
    let progress = store.progress().await?;
    let blockers = progress.blockers(now(), args.quiet_window.as_millis() as i64);
    if !blockers.is_empty() {
        let listed: Vec<String> = blockers.iter().map(ToString::to_string).collect();
        bail!(
            "legacy cannot be retired yet, nothing was changed: {}",
            listed.join("; ")
        );
    }
    let changed = store
        .set_legacy_retired(true, Actor::Cli, &args.reason)
        .await?;
    if json {
        output::json(out, &json!({ "legacy_retired": true, "changed": changed }))?;
    } else if changed {
        writeln!(
            out,
            "legacy is retired: every proxy now sends all traffic to new (undo with --undo)"
        )?;
    } else {
        writeln!(out, "legacy was retired already")?;
    }
    Ok(())
}

async fn mismatches(
    store: &dyn ControlStore,
    args: MismatchesArgs,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let id = tenant_id(&args.id)?;
    existing(store, &id).await?;
    let samples = store
        .mismatch_samples(&id, args.endpoint.as_deref(), args.limit)
        .await?;
    let parsed: Vec<Vec<ficus_diff::Difference>> = samples
        .iter()
        .map(|s| {
            serde_json::from_str(&s.differences).context("a stored mismatch sample is not readable")
        })
        .collect::<Result<_>>()?;
    if json {
        let items: Vec<_> = samples
            .iter()
            .zip(&parsed)
            .map(|(s, d)| {
                json!({
                    "at": ficus_store::format_time(s.at), "endpoint": s.endpoint, "method": s.method, "path": s.path,
                    "served_by": s.served_by, "compared_with": s.compared_with,
                    "status": [s.served_status, s.compared_status], "differences": d,
                })
            })
            .collect();
        output::json(out, &json!({ "tenant": id.as_str(), "mismatches": items }))?;
        return Ok(());
    }
    if samples.is_empty() {
        writeln!(out, "no mismatches recorded for tenant {id}")?;
        return Ok(());
    }
    for (s, diffs) in samples.iter().zip(&parsed) {
        writeln!(
            out,
            "{}  {}  ({} {})  {} {} vs {} {}",
            ficus_store::format_time(s.at),
            s.endpoint,
            s.method,
            s.path,
            s.served_by,
            s.served_status,
            s.compared_with,
            s.compared_status
        )?;
        for d in diffs {
            writeln!(out, "    {d}")?;
        }
    }
    Ok(())
}

async fn noise(store: &dyn ControlStore, json: bool, out: &mut impl Write) -> Result<()> {
    let entries = store.noise().await?;
    if json {
        let items: Vec<_> = entries
            .iter()
            .map(|n| json!({ "endpoint": n.endpoint, "path": n.path, "score": n.score, "observations": n.observations, "updated_at": ficus_store::format_time(n.updated_at) }))
            .collect();
        output::json(out, &json!({ "noise": items }))?;
    } else if entries.is_empty() {
        writeln!(out, "no noise learned yet")?;
    } else {
        let rows: Vec<Vec<String>> = entries
            .iter()
            .map(|n| {
                vec![
                    n.endpoint.clone(),
                    n.path.clone(),
                    format!("{:.2}", n.score),
                    n.observations.to_string(),
                ]
            })
            .collect();
        output::table(out, &["ENDPOINT", "PATH", "SCORE", "DOUBLE-ASKS"], &rows)?;
    }
    Ok(())
}

fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp::from_unix_millis(d.as_millis() as i64)
}
