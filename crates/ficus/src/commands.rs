//! One function per subcommand. The control-plane commands go through
//! [`Control`]: directly on the store, or through a remote API with `--api`; both
//! answer with the same JSON documents, which `--json` prints and the functions
//! here turn into text. Commands that need the store itself (init, import, watch,
//! noise, token, serve) refuse `--api`.

use std::io::{self, Write};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result, bail};
use ficus_admin::api::{
    AddRequest, ClassChangeRequest, ConfigJson, ConfigRequest, GateJson, GateRequest, JobJson,
    PromoteRequest, ReadinessJson, RestoreRequest, RetireRequest, RollbackRequest,
    RouteMarkRequest, RouteReleaseRequest, RouteStageRequest, StageRequest, StatusJson,
    TenantEnvelope,
};
use ficus_admin::client::Remote;
use ficus_admin::ops::{self, AuditFilter, GateOverrides};
use ficus_admin::{Control, Direct, token};
use ficus_core::{Actor, Stage, TenantId, Timestamp};
use ficus_store::{ControlStore, FeedEvent, InitOutcome, OpenMode, StoreError, StoreUrl};
use serde_json::json;

use crate::cli::{
    AddArgs, AuditArgs, ClassCommand, Cli, Command, ConfigCommand, GateArgs, GateCommand,
    GateSetArgs, ImportArgs, ListArgs, MismatchesArgs, PromoteArgs, ProvisionCommand, ProxyArgs,
    ReadinessArgs, RetireArgs, RollbackArgs, RouteCommand, RoutesArgs, ServeArgs, ShowArgs,
    StageArgs, TenantCommand, TokenCommand, WatchArgs,
};
use crate::import;
use crate::output::{self, EVENT_HEADER, TENANT_HEADER};

/// Whether a command works through the API, or needs the store itself.
fn remote_capable(command: &Command) -> bool {
    match command {
        Command::Tenant(TenantCommand::Import(_))
        | Command::Init
        | Command::Watch(_)
        | Command::Proxy(_)
        | Command::Noise
        | Command::Token(_)
        | Command::Serve(_)
        | Command::Demo(_)
        | Command::Provision(ProvisionCommand::Mapping { .. })
        | Command::Db(_) => false,
        Command::Tenant(_)
        | Command::Audit(_)
        | Command::Status
        | Command::Mismatches(_)
        | Command::Routes(_)
        | Command::Route(_)
        | Command::Readiness(_)
        | Command::RetireLegacy(_)
        | Command::Gate(_)
        | Command::Provision(_) => true,
    }
}

pub async fn run(cli: Cli) -> Result<()> {
    let out = &mut io::stdout().lock();
    let json = cli.json;
    if let Command::Demo(args) = cli.command {
        // The demo makes its own store, database and proxy.
        return crate::demo::run(args, out).await;
    }
    if let Some(api) = &cli.api {
        if !remote_capable(&cli.command) {
            bail!(
                "this command works on the store itself; drop --api (and FICUS_API) to use --store"
            );
        }
        let token = std::env::var("FICUS_TOKEN").unwrap_or_default();
        let remote = Remote::new(api, &token)?;
        return control_command(&remote, cli.command, json, out).await;
    }
    // `ficus db` works on the application's database, not on the control store.
    let command = cli.command;
    if let Command::Db(db) = command {
        return crate::db::run(db, json, out).await;
    }
    let cli = Cli { command, ..cli };
    let url = StoreUrl::parse(&cli.store)?;
    let mode = if matches!(cli.command, Command::Init) {
        OpenMode::Create
    } else {
        OpenMode::Existing
    };
    let store = ficus_store::open(&url, mode).await?;
    match cli.command {
        Command::Init => init(&*store, json, out).await,
        Command::Tenant(TenantCommand::Import(args)) => import_file(&*store, args, json, out).await,
        Command::Watch(args) => watch(store, args, json, out).await,
        Command::Noise => noise(&*store, json, out).await,
        Command::Token(TokenCommand::Rotate { reason }) => {
            let token = token::rotate(&*store, Actor::Cli, &reason).await?;
            if json {
                output::json(out, &json!({ "api_token": token }))?;
            } else {
                writeln!(
                    out,
                    "new api token (shown once; the old one no longer works):"
                )?;
                writeln!(out, "{token}")?;
            }
            Ok(())
        }
        Command::Token(TokenCommand::Create {
            name,
            scope,
            reason,
        }) => {
            let scope = token::Scope::parse(&scope)?;
            let made = token::create(&*store, &name, scope, Actor::Cli, &reason).await?;
            if json {
                output::json(
                    out,
                    &json!({ "name": name, "scope": scope.as_str(), "token": made }),
                )?;
            } else {
                writeln!(out, "new {scope} token {name} (shown once):")?;
                writeln!(out, "{made}")?;
            }
            Ok(())
        }
        Command::Token(TokenCommand::List) => {
            let tokens = token::list(&*store).await?;
            if json {
                let rows: Vec<_> = tokens
                    .iter()
                    .map(|t| json!({ "name": t.name, "scope": t.scope.as_str(), "revoked": t.revoked }))
                    .collect();
                output::json(out, &json!({ "tokens": rows }))?;
            } else if tokens.is_empty() {
                writeln!(out, "no named tokens")?;
            } else {
                let rows: Vec<Vec<String>> = tokens
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            t.scope.to_string(),
                            if t.revoked { "revoked" } else { "live" }.to_string(),
                        ]
                    })
                    .collect();
                output::table(out, &["NAME", "SCOPE", "STATE"], &rows)?;
            }
            Ok(())
        }
        Command::Token(TokenCommand::Revoke { name, reason }) => {
            token::revoke(&*store, &name, Actor::Cli, &reason).await?;
            if json {
                output::json(out, &json!({ "name": name, "revoked": true }))?;
            } else {
                writeln!(out, "token {name} revoked")?;
            }
            Ok(())
        }
        Command::Serve(args) => serve(store, args, out).await,
        Command::Provision(ProvisionCommand::Mapping { file, reason }) => {
            use ficus_admin::provision::{Mapping, SETTING};
            if let Some(path) = file {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let mapping: Mapping = serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a provisioning mapping", path.display()))?;
                if !mapping.template.is_object() {
                    bail!(
                        "{}: template must be a JSON object (a partial tenant configuration)",
                        path.display()
                    );
                }
                let stored = serde_json::to_string(&mapping)?;
                store
                    .set_setting(
                        SETTING,
                        &stored,
                        &stored,
                        Actor::Cli,
                        reason.as_deref().unwrap_or(""),
                    )
                    .await?;
            }
            let mapping = Mapping::load(&*store).await?;
            output::json(out, &mapping)?;
            Ok(())
        }
        Command::Proxy(_) => bail!("ficus proxy is started before the async runtime"),
        command => {
            let direct = Direct::new(store, Actor::Cli);
            control_command(&direct, command, json, out).await
        }
    }
}

async fn control_command(
    c: &dyn Control,
    command: Command,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    match command {
        Command::Tenant(cmd) => match cmd {
            TenantCommand::Add(args) => add(c, args, json, out).await,
            TenantCommand::List(args) => list(c, args, json, out).await,
            TenantCommand::Show(args) => show(c, args, json, out).await,
            TenantCommand::Stage(args) => stage(c, args, json, out).await,
            TenantCommand::Rollback(args) => rollback(c, args, json, out).await,
            TenantCommand::Promote(args) => promote(c, args, json, out).await,
            TenantCommand::Import(_) => bail!("ficus tenant import works on the store itself"),
            TenantCommand::Config(command) => tenant_config(c, command, json, out).await,
        },
        Command::Audit(args) => audit(c, args, json, out).await,
        Command::Status => status(c, json, out).await,
        Command::Mismatches(args) => mismatches(c, args, json, out).await,
        Command::Routes(args) => routes(c, args, json, out).await,
        Command::Route(command) => route(c, command, json, out).await,
        Command::Readiness(args) => readiness(c, args, json, out).await,
        Command::RetireLegacy(args) => retire_legacy(c, args, json, out).await,
        Command::Gate(GateCommand::Show) => {
            let gate = c.gate().await?;
            print_gate(&gate, json, out)
        }
        Command::Gate(GateCommand::Set(args)) => set_gate(c, args, json, out).await,
        Command::Provision(command) => {
            let jobs = match command {
                ProvisionCommand::List { state } => c.jobs(state.as_deref()).await?.jobs,
                ProvisionCommand::Show { event } => vec![c.job(&event).await?],
                ProvisionCommand::Retry { event } => vec![c.retry_job(&event).await?],
                ProvisionCommand::Mapping { .. } => {
                    bail!("ficus provision mapping works on the store itself")
                }
            };
            print_jobs(&jobs, json, out)
        }
        _ => bail!("this command works on the store itself"),
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

async fn init(store: &dyn ControlStore, json: bool, out: &mut impl Write) -> Result<()> {
    let outcome = match store.init_outcome() {
        InitOutcome::Created => "created".to_string(),
        InitOutcome::AlreadyInitialized => "already-initialized".to_string(),
        InitOutcome::Upgraded { from } => format!("upgraded-from-{from}"),
    };
    // The API token is made once, by the first init that finds none, and shown
    // only then: the store keeps its hash.
    let token = token::ensure(store, Actor::Cli).await?;
    if json {
        let mut doc = json!({ "store": store.location(), "outcome": outcome });
        if let Some(t) = &token {
            doc["api_token"] = json!(t);
        }
        output::json(out, &doc)?;
    } else {
        let what = match store.init_outcome() {
            InitOutcome::Created => "created".to_string(),
            InitOutcome::AlreadyInitialized => "already initialized; nothing to do".to_string(),
            InitOutcome::Upgraded { from } => format!("upgraded from schema version {from}"),
        };
        writeln!(out, "store {}: {what}", store.location())?;
        if let Some(t) = token {
            writeln!(
                out,
                "admin API token (shown once; keep it in FICUS_TOKEN, replace it with `ficus token rotate`):"
            )?;
            writeln!(out, "{t}")?;
        }
    }
    Ok(())
}

async fn serve(store: Arc<dyn ControlStore>, args: ServeArgs, out: &mut impl Write) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    writeln!(
        out,
        "serving the control-plane API of {} on http://{} (Ctrl-C to stop)",
        store.location(),
        listener.local_addr()?
    )?;
    out.flush()?;
    ficus_admin::server::serve(listener, store, async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail at startup");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    })
    .await?;
    Ok(())
}

fn tenant_id(raw: &str) -> Result<TenantId> {
    Ok(ops::tenant_id(raw)?)
}

async fn add(c: &dyn Control, args: AddArgs, json: bool, out: &mut impl Write) -> Result<()> {
    let request = AddRequest {
        id: args.id,
        name: args.name,
        domains: args.domains,
        stage: Some(args.stage),
        reason: args.reason,
    };
    let t = c.add(request).await?.tenant;
    if json {
        output::json(out, &json!({ "tenant": t }))?;
    } else {
        writeln!(
            out,
            "added tenant {} in stage {} (version {})",
            t.id, t.stage, t.version
        )?;
    }
    Ok(())
}

async fn list(c: &dyn Control, args: ListArgs, json: bool, out: &mut impl Write) -> Result<()> {
    let stage = args.stage.as_deref().map(ops::stage).transpose()?;
    let tenants = c.tenants(stage).await?;
    if json {
        output::json(out, &tenants)?;
    } else if tenants.tenants.is_empty() {
        writeln!(
            out,
            "no tenants{}",
            stage.map_or(String::new(), |s| format!(" in stage {s}"))
        )?;
    } else {
        output::table(out, &TENANT_HEADER, &output::tenant_rows(&tenants.tenants))?;
    }
    Ok(())
}

async fn show(c: &dyn Control, args: ShowArgs, json: bool, out: &mut impl Write) -> Result<()> {
    let id = tenant_id(&args.id)?;
    let shown = c.show(&id, args.events).await?;
    if json {
        output::json(out, &shown)?;
        return Ok(());
    }
    let t = &shown.tenant;
    let domains = if t.domains.is_empty() {
        "(none)".to_string()
    } else {
        t.domains.join(", ")
    };
    writeln!(out, "tenant   {}", t.id)?;
    writeln!(out, "name     {}", t.name)?;
    writeln!(out, "stage    {}", t.stage)?;
    writeln!(out, "version  {}", t.version)?;
    writeln!(out, "domains  {domains}")?;
    writeln!(out, "created  {}", t.created_at)?;
    writeln!(out, "updated  {}", t.updated_at)?;
    let k = &shown.comparisons;
    writeln!(
        out,
        "compared {} reads in the last 24 h on {} endpoints: {} matched, {} mismatched, \
         {} noise only, {} shadow errors, {} not shadowed, {} raced by the tenant's own writes (not judged)",
        k.compared, k.endpoints, k.matched, k.mismatched, k.noise_only, k.errors, k.shed, k.raced
    )?;
    writeln!(out)?;
    writeln!(out, "latest audit events:")?;
    output::table(out, &EVENT_HEADER, &output::event_rows(&shown.audit))?;
    Ok(())
}

fn print_tenant(moved: &TenantEnvelope, json: bool, out: &mut impl Write) -> Result<()> {
    let t = &moved.tenant;
    if json {
        output::json(out, moved)?;
    } else {
        writeln!(
            out,
            "tenant {} is now in stage {} (version {})",
            t.id, t.stage, t.version
        )?;
    }
    Ok(())
}

async fn stage(c: &dyn Control, args: StageArgs, json: bool, out: &mut impl Write) -> Result<()> {
    let id = tenant_id(&args.id)?;
    // The stage is checked here too, so that a bad one is named before any call.
    ops::stage(&args.stage)?;
    let request = StageRequest {
        stage: args.stage,
        reason: args.reason,
    };
    let moved = c.stage(&id, request, args.if_version).await?;
    print_tenant(&moved, json, out)
}

async fn tenant_config(
    c: &dyn Control,
    command: ConfigCommand,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let written = match command {
        ConfigCommand::Get(args) => {
            let config = c.config(&tenant_id(&args.id)?, args.version).await?;
            return print_config(&config, json, out);
        }
        ConfigCommand::History(args) => {
            let history = c.config_history(&tenant_id(&args.id)?).await?;
            if json {
                return Ok(output::json(out, &history)?);
            }
            if history.versions.is_empty() {
                writeln!(
                    out,
                    "tenant {} has no written configuration yet",
                    history.tenant
                )?;
                return Ok(());
            }
            let rows: Vec<Vec<String>> = history
                .versions
                .iter()
                .map(|v| {
                    vec![
                        v.version.to_string(),
                        v.at.clone().unwrap_or_default(),
                        v.actor.clone().unwrap_or_default(),
                        v.reason.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            return Ok(output::table(
                out,
                &["VERSION", "AT", "ACTOR", "REASON"],
                &rows,
            )?);
        }
        ConfigCommand::Set(args) => {
            let id = tenant_id(&args.id)?;
            let current = c.config(&id, None).await?;
            let document = match &args.file {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    serde_json::from_str(&text)
                        .with_context(|| format!("{} is not JSON", path.display()))?
                }
                None if args.set.is_empty() => {
                    bail!("give --file FILE or at least one --set KEY=VALUE")
                }
                None => {
                    let mut doc = current.config.clone();
                    for edit in &args.set {
                        ficus_admin::config::set(&mut doc, edit)?;
                    }
                    doc
                }
            };
            let request = ConfigRequest {
                config: document,
                reason: args.reason,
            };
            c.set_config(&id, request, Some(current.version)).await?
        }
        ConfigCommand::Restore(args) => {
            let request = RestoreRequest {
                version: args.version,
                reason: args.reason,
            };
            c.restore_config(&tenant_id(&args.id)?, request, None)
                .await?
        }
    };
    print_config(&written, json, out)
}

fn print_jobs(jobs: &[JobJson], json: bool, out: &mut impl Write) -> Result<()> {
    if json {
        return Ok(output::json(out, &serde_json::json!({ "jobs": jobs }))?);
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.event.clone(),
                j.kind.clone(),
                j.state.clone(),
                j.tenant.clone().unwrap_or_else(|| "-".into()),
                if j.steps.is_empty() {
                    "-".into()
                } else {
                    j.steps.join(",")
                },
                j.attempts.to_string(),
                j.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    Ok(output::table(
        out,
        &[
            "EVENT",
            "KIND",
            "STATE",
            "TENANT",
            "STEPS DONE",
            "ATTEMPTS",
            "LAST ERROR",
        ],
        &rows,
    )?)
}

fn print_config(config: &ConfigJson, json: bool, out: &mut impl Write) -> Result<()> {
    if json {
        return Ok(output::json(out, config)?);
    }
    match (&config.actor, &config.at) {
        (Some(actor), Some(at)) => writeln!(
            out,
            "tenant {} configuration version {} (by {actor} at {at}: {})",
            config.tenant,
            config.version,
            config.reason.as_deref().unwrap_or("")
        )?,
        _ => writeln!(
            out,
            "tenant {} configuration version 0 (none written yet: from the registry)",
            config.tenant
        )?,
    }
    writeln!(out, "{}", serde_json::to_string_pretty(&config.config)?)?;
    Ok(())
}

async fn rollback(
    c: &dyn Control,
    args: RollbackArgs,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let id = tenant_id(&args.id)?;
    let request = RollbackRequest {
        reason: args.reason,
        to: args.to,
    };
    let moved = c.rollback(&id, request, None).await?;
    print_tenant(&moved, json, out)
}

async fn promote(
    c: &dyn Control,
    args: PromoteArgs,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    if let Some(n) = args.next {
        return promote_next(c, n, &args, json, out).await;
    }
    let Some(raw) = &args.id else {
        bail!("name a tenant, or give --next N");
    };
    let id = tenant_id(raw)?;
    if args.force && args.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
        bail!(
            "--force needs --reason: the audit log must say why the readiness gate was overridden"
        );
    }
    // The API asks every change for a reason; the gate's verdict is the main one,
    // and this says who asked.
    let request = PromoteRequest {
        reason: args
            .reason
            .clone()
            .unwrap_or_else(|| "requested with ficus tenant promote".to_string()),
        force: args.force,
    };
    let moved = c.promote(&id, request, args.if_version).await;
    // The operations speak of forcing in general; at the command line that is a flag.
    let moved = match moved {
        Err(ficus_admin::Error::Refused(m) | ficus_admin::Error::Remote { message: m, .. })
            if m.contains("force it with a reason") =>
        {
            bail!(
                "{}",
                m.replace("force it with a reason", "use --force --reason")
            )
        }
        other => other?,
    };
    print_tenant(&moved, json, out)
}

/// `promote --next N`: the most ready tenants in shadow, one at a time. Each must
/// pass the gate when its turn comes, and stay migrated through the soak (the
/// guard may roll it back meanwhile); the first that does not stops the run.
async fn promote_next(
    c: &dyn Control,
    n: u64,
    args: &PromoteArgs,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let mut promoted: Vec<String> = Vec::new();
    let mut stopped: Option<String> = None;
    while (promoted.len() as u64) < n {
        let ranked = c.readiness_all(&GateOverrides::default()).await?;
        let Some(next) = ranked
            .tenants
            .iter()
            .find(|r| r.ready && !promoted.contains(&r.tenant))
        else {
            let waiting = ranked.tenants.len();
            stopped = Some(if waiting == 0 {
                "no tenant is in shadow".to_string()
            } else {
                format!("none of the {waiting} tenants in shadow is ready")
            });
            break;
        };
        let id = tenant_id(&next.tenant)?;
        let reason = args
            .reason
            .clone()
            .unwrap_or_else(|| format!("promoted with --next {n}"));
        let moved = match c
            .promote(
                &id,
                PromoteRequest {
                    reason,
                    force: false,
                },
                None,
            )
            .await
        {
            Ok(m) => m,
            Err(e) => {
                stopped = Some(format!("promoting {id} failed: {e}"));
                break;
            }
        };
        promoted.push(moved.tenant.id.clone());
        if !json {
            writeln!(
                out,
                "tenant {} is now in stage {} (version {}); soaking for {}",
                moved.tenant.id,
                moved.tenant.stage,
                moved.tenant.version,
                humantime::format_duration(args.soak)
            )?;
            out.flush()?;
        }
        tokio::time::sleep(args.soak).await;
        let after = c.show(&id, 1).await?.tenant;
        if after.stage != Stage::Migrated.as_str() {
            stopped = Some(format!(
                "tenant {id} did not hold through the soak: it is in stage {} (version {}); see `ficus audit {id}`",
                after.stage, after.version
            ));
            break;
        }
    }
    if json {
        output::json(out, &json!({ "promoted": promoted, "stopped": stopped }))?;
    } else {
        writeln!(
            out,
            "promoted {} of {n}: {}",
            promoted.len(),
            if promoted.is_empty() {
                "none".to_string()
            } else {
                promoted.join(", ")
            }
        )?;
    }
    match stopped {
        Some(why) if (promoted.len() as u64) < n => bail!("stopped: {why}"),
        _ => Ok(()),
    }
}

async fn audit(c: &dyn Control, args: AuditArgs, json: bool, out: &mut impl Write) -> Result<()> {
    let tenant = args.id.as_deref().map(tenant_id).transpose()?;
    let since = args
        .since
        .map(|t| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| Timestamp::from_unix_millis(d.as_millis() as i64))
        })
        .transpose()
        .context("--since is before the Unix epoch")?;
    let events = c
        .audit(AuditFilter {
            tenant,
            since,
            limit: args.limit,
            ..Default::default()
        })
        .await?;
    if json {
        output::json(out, &events)?;
    } else if events.events.is_empty() {
        writeln!(out, "no audit events")?;
    } else {
        output::table(out, &EVENT_HEADER, &output::event_rows(&events.events))?;
    }
    Ok(())
}

async fn status(c: &dyn Control, json: bool, out: &mut impl Write) -> Result<()> {
    let s = c.status().await?;
    if json {
        output::json(out, &s)?;
        return Ok(());
    }
    print_status(&s, out)
}

fn print_status(s: &StatusJson, out: &mut impl Write) -> Result<()> {
    let total = s.tenants;
    writeln!(out, "store     {}", s.store)?;
    writeln!(out, "tenants   {total}")?;
    for (stage, n) in [
        ("legacy", s.stages.legacy),
        ("shadow", s.stages.shadow),
        ("migrated", s.stages.migrated),
    ] {
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
        s.percent_migrated,
        output::bar(s.percent_migrated / 100.0, 30)
    )?;
    let traffic = &s.legacy_traffic;
    if s.legacy_retired {
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
    if s.finish_line.reached {
        let next = if s.legacy_retired {
            "legacy is retired"
        } else {
            "legacy can be retired (ficus retire-legacy)"
        };
        writeln!(out, "finish line: reached; {next}")?;
    } else {
        writeln!(
            out,
            "finish line: not reached (quiet window {})",
            s.finish_line.quiet_window
        )?;
        for b in &s.finish_line.blockers {
            writeln!(out, "  - {b}")?;
        }
    }
    for h in &s.held_routes {
        match &h.tenants {
            None => writeln!(out, "held      {} goes to legacy for every tenant", h.route)?,
            Some(t) => writeln!(
                out,
                "held      {} goes to legacy for {}",
                h.route,
                t.join(", ")
            )?,
        }
    }
    Ok(())
}

async fn routes(c: &dyn Control, args: RoutesArgs, json: bool, out: &mut impl Write) -> Result<()> {
    let tenant = args.tenant.as_deref().map(tenant_id).transpose()?;
    let found = c.routes(tenant.as_ref()).await?;
    if json {
        output::json(out, &found)?;
        return Ok(());
    }
    if found.routes.is_empty() {
        writeln!(
            out,
            "no routes seen in the last {} and none given a stage",
            found.window
        )?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = found
        .routes
        .iter()
        .map(|r| {
            let requests: u64 = r.census.iter().map(|c| c.requests).sum();
            let mut by: Vec<String> = r.census.iter().map(|c| c.backend.clone()).collect();
            by.sort();
            by.dedup();
            let mut clients: Vec<String> = r
                .census
                .iter()
                .map(|c| {
                    if c.client.is_empty() {
                        "-".to_string()
                    } else {
                        c.client.clone()
                    }
                })
                .collect();
            clients.sort();
            clients.dedup();
            let released: Vec<String> = r
                .overrides
                .iter()
                .map(|o| format!("{}={}", o.tenant, o.stage))
                .collect();
            vec![
                r.route.clone(),
                if r.held {
                    "HELD on legacy".to_string()
                } else {
                    r.stage.clone()
                },
                format!(
                    "{}{}",
                    if r.destructive {
                        "destructive"
                    } else if r.writes {
                        "writes"
                    } else {
                        "reads"
                    },
                    if r.unmapped { ", unmapped" } else { "" }
                ),
                if released.is_empty() {
                    "-".to_string()
                } else {
                    released.join(" ")
                },
                requests.to_string(),
                by.join(", "),
                clients.join(", "),
                r.census
                    .iter()
                    .map(|c| c.last_at.as_str())
                    .max()
                    .unwrap_or("-")
                    .to_string(),
            ]
        })
        .collect();
    writeln!(out, "routes seen in the last {}:", found.window)?;
    output::table(
        out,
        &[
            "ROUTE",
            "STAGE",
            "KIND",
            "PER TENANT",
            "REQUESTS",
            "SERVED BY",
            "CLIENTS",
            "LAST SEEN",
        ],
        &rows,
    )?;
    Ok(())
}

async fn route(
    c: &dyn Control,
    command: RouteCommand,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let done = match command {
        RouteCommand::Stage {
            route,
            stage,
            tenant,
            if_version,
            destructive,
            reason,
        } => {
            c.route_stage(
                RouteStageRequest {
                    route,
                    stage,
                    tenant,
                    destructive,
                    reason,
                },
                if_version,
            )
            .await?
        }
        RouteCommand::Release {
            route,
            tenant,
            destructive,
            reason,
        } => {
            c.release_route(RouteReleaseRequest {
                route,
                tenant,
                destructive,
                reason,
            })
            .await?
        }
        RouteCommand::Hold {
            route,
            tenant,
            reason,
        } => {
            c.hold_route(RouteReleaseRequest {
                route,
                tenant,
                destructive: false,
                reason,
            })
            .await?
        }
        RouteCommand::Default { default, reason } => {
            let held = match default.as_str() {
                "held" => true,
                "released" => false,
                other => bail!("{other:?} is not held or released"),
            };
            let r = c
                .write_default(ficus_admin::api::WriteDefaultRequest { held, reason })
                .await?;
            if json {
                output::json(out, &r)?;
            } else if r.writes_held_by_default {
                writeln!(out, "write routes nobody staged are held on legacy")?;
            } else {
                writeln!(
                    out,
                    "write routes nobody staged follow their tenant's stage"
                )?;
            }
            return Ok(());
        }
        RouteCommand::Protect {
            route,
            undo,
            reason,
        } => {
            let r = c
                .mark_route(RouteMarkRequest {
                    route,
                    destructive: !undo,
                    reason,
                })
                .await?;
            if json {
                output::json(out, &r)?;
            } else if r.destructive {
                writeln!(
                    out,
                    "route {} is destructive: releasing it needs --destructive",
                    r.route
                )?;
            } else {
                writeln!(out, "route {} is not marked destructive", r.route)?;
            }
            return Ok(());
        }
    };
    if json {
        output::json(out, &done)?;
        return Ok(());
    }
    let whom = done.tenant.as_ref().map_or(
        "every tenant without an override of its own".to_string(),
        |t| format!("tenant {t}"),
    );
    let what = match done.stage.as_str() {
        "migrated" => "goes where the tenant's stage says (the new side for migrated tenants)",
        "shadow" => "goes to legacy; its reads are compared with the new side",
        _ => "is held on legacy",
    };
    writeln!(
        out,
        "route {} {what} for {whom} (version {})",
        done.route, done.version
    )?;
    Ok(())
}

fn overrides(g: &GateArgs) -> GateOverrides {
    GateOverrides {
        window: g.window.clone(),
        min_comparisons: g.min_comparisons,
        max_mismatches: g.max_mismatches,
        min_per_endpoint: g.min_per_endpoint,
        max_error_rate: g.max_error_rate,
        version: None,
    }
}

async fn readiness(
    c: &dyn Control,
    args: ReadinessArgs,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let o = GateOverrides {
        version: args.version.clone(),
        ..overrides(&args.gate)
    };
    match (&args.id, args.all) {
        (Some(raw), false) => {
            let id = tenant_id(raw)?;
            let r = c.readiness(&id, &o).await?;
            if json {
                output::json(out, &r)?;
                return Ok(());
            }
            let window = match &o.window {
                Some(w) => w.clone(),
                None => c.gate().await?.window,
            };
            print_readiness(&r, &window, out)
        }
        (None, true) => {
            let all = c.readiness_all(&o).await?;
            if json {
                output::json(out, &all)?;
                return Ok(());
            }
            if all.tenants.is_empty() {
                writeln!(out, "no tenants in shadow")?;
                return Ok(());
            }
            let rows: Vec<Vec<String>> = all
                .tenants
                .iter()
                .map(|r| {
                    let failing: Vec<&str> = r
                        .criteria
                        .iter()
                        .filter(|c| !c.passed)
                        .map(|c| c.name.as_str())
                        .collect();
                    vec![
                        r.tenant.clone(),
                        if r.ready { "ready" } else { "not ready" }.to_string(),
                        format!("{:.0}%", r.score * 100.0),
                        failing.join(", "),
                    ]
                })
                .collect();
            output::table(out, &["TENANT", "VERDICT", "SCORE", "FAILING"], &rows)?;
            Ok(())
        }
        _ => bail!("name a tenant, or give --all"),
    }
}

fn print_readiness(r: &ReadinessJson, window: &str, out: &mut impl Write) -> Result<()> {
    writeln!(
        out,
        "tenant {}: {} (window {window})",
        r.tenant,
        if r.ready { "ready" } else { "not ready" },
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
    if let Some(v) = &r.version {
        writeln!(out, "  judged on version {v} of new only")?;
    }
    let known: Vec<String> = r
        .versions
        .iter()
        .map(|v| {
            format!(
                "{} ({} compared, {} mismatched)",
                if v.version.is_empty() {
                    "unknown"
                } else {
                    &v.version
                },
                v.compared,
                v.mismatched
            )
        })
        .collect();
    if r.versions.iter().any(|v| !v.version.is_empty()) {
        writeln!(
            out,
            "  evidence per version of new, newest first: {}",
            known.join(", ")
        )?;
    }
    if !r.held_routes.is_empty() {
        writeln!(
            out,
            "  write routes still held on legacy for this tenant: {}",
            r.held_routes.join(", ")
        )?;
    }
    if !r.open_classes.is_empty() {
        writeln!(out, "  open mismatch classes (these count):")?;
        for k in &r.open_classes {
            print_class(k, out)?;
        }
    }
    if !r.additive.is_empty() {
        writeln!(out, "  additive differences (new has more; not counted):")?;
        for k in &r.additive {
            writeln!(
                out,
                "    {}  {} {}  {} seen",
                k.id, k.endpoint, k.path, k.counted
            )?;
        }
    }
    Ok(())
}

/// One counted class: what, how many, since when, and one redacted example.
fn print_class(k: &ficus_admin::api::ClassJson, out: &mut impl Write) -> Result<()> {
    writeln!(
        out,
        "    {}{}  {} {} {}  {} mismatched, first {} last {}",
        k.id,
        if k.regression { " REGRESSION" } else { "" },
        k.endpoint,
        k.path,
        k.kind,
        k.counted,
        k.first_at.as_deref().unwrap_or("-"),
        k.last_at.as_deref().unwrap_or("-"),
    )?;
    if let Some(c) = k.last_change.as_ref().filter(|_| k.regression) {
        writeln!(out, "      {}", c.reason)?;
    }
    if let Some(e) = &k.example {
        let shown = serde_json::from_value::<ficus_diff::Difference>(e.difference.clone())
            .map(|d| d.to_string())
            .unwrap_or_else(|_| e.difference.to_string());
        writeln!(
            out,
            "      e.g. {}{}: {shown}",
            e.request,
            e.version
                .as_ref()
                .map(|v| format!(" (new {v})"))
                .unwrap_or_default()
        )?;
    }
    Ok(())
}

async fn retire_legacy(
    c: &dyn Control,
    args: RetireArgs,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let request = RetireRequest {
        reason: args.reason,
        undo: args.undo,
        quiet_window: args.quiet_window,
    };
    let done = c.retire(request, None).await?;
    if json {
        output::json(out, &done)?;
        return Ok(());
    }
    let text = match (args.undo, done.changed) {
        (true, true) => {
            "legacy is no longer retired; tenants on legacy or in shadow are routed to it again"
        }
        (true, false) => "legacy was not retired; nothing to undo",
        (false, true) => {
            "legacy is retired: every proxy now sends all traffic to new (undo with --undo)"
        }
        (false, false) => "legacy was retired already",
    };
    writeln!(out, "{text}")?;
    Ok(())
}

fn print_gate(g: &GateJson, json: bool, out: &mut impl Write) -> Result<()> {
    if json {
        output::json(out, g)?;
        return Ok(());
    }
    writeln!(out, "window             {}", g.window)?;
    writeln!(out, "min_comparisons    {}", g.min_comparisons)?;
    writeln!(out, "max_mismatches     {}", g.max_mismatches)?;
    writeln!(out, "min_per_endpoint   {}", g.min_per_endpoint)?;
    writeln!(out, "max_error_rate     {}", g.max_error_rate)?;
    writeln!(out, "max_latency_ratio  {}", g.max_latency_ratio)?;
    writeln!(out, "latency_slack_ms   {}", g.latency_slack_ms)?;
    writeln!(out, "quiet_window       {}", g.quiet_window)?;
    Ok(())
}

async fn set_gate(
    c: &dyn Control,
    args: GateSetArgs,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let mut g = c.gate().await?;
    let shared = args.gate;
    if let Some(v) = shared.window {
        g.window = v;
    }
    if let Some(v) = shared.min_comparisons {
        g.min_comparisons = v;
    }
    if let Some(v) = shared.max_mismatches {
        g.max_mismatches = v;
    }
    if let Some(v) = shared.min_per_endpoint {
        g.min_per_endpoint = v;
    }
    if let Some(v) = shared.max_error_rate {
        g.max_error_rate = v;
    }
    if let Some(v) = args.max_latency_ratio {
        g.max_latency_ratio = v;
    }
    if let Some(v) = args.latency_slack_ms {
        g.latency_slack_ms = v;
    }
    if let Some(v) = args.quiet_window {
        g.quiet_window = v;
    }
    let stored = c
        .set_gate(GateRequest {
            gate: g,
            reason: args.reason,
        })
        .await?;
    print_gate(&stored, json, out)
}

async fn mismatches(
    c: &dyn Control,
    args: MismatchesArgs,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    if let Some(command) = args.command {
        let (class, action, request) = match command {
            ClassCommand::Show { class } => {
                let found = c.mismatch_class(&class).await?;
                if json {
                    output::json(out, &found)?;
                    return Ok(());
                }
                let k = &found.class;
                writeln!(
                    out,
                    "class {}: {} {} {} ({}), {}{}",
                    k.id,
                    k.endpoint,
                    k.path,
                    k.kind,
                    k.compat,
                    k.state,
                    if k.regression { " (REGRESSION)" } else { "" }
                )?;
                writeln!(
                    out,
                    "  {} counted, {} set aside in the gate's window; first seen {}, last seen {}",
                    k.counted, k.discounted, k.first_seen, k.last_seen
                )?;
                if let Some(v) = &k.fixed_in {
                    writeln!(out, "  resolved as fixed in {v}")?;
                }
                for e in &found.history {
                    writeln!(
                        out,
                        "  {}  {} by {}: {}{}",
                        e.at,
                        e.action,
                        e.actor,
                        e.reason,
                        e.version
                            .as_ref()
                            .map(|v| format!(" (version {v})"))
                            .unwrap_or_default()
                    )?;
                }
                return Ok(());
            }
            ClassCommand::Resolve {
                class,
                reason,
                fixed_in,
            } => (
                class,
                "resolve",
                ClassChangeRequest {
                    reason,
                    fixed_in,
                    whole_endpoint: false,
                },
            ),
            ClassCommand::Accept {
                class,
                reason,
                whole_endpoint,
            } => (
                class,
                "accept",
                ClassChangeRequest {
                    reason,
                    fixed_in: None,
                    whole_endpoint,
                },
            ),
            ClassCommand::Reopen { class, reason } => (
                class,
                "reopen",
                ClassChangeRequest {
                    reason,
                    ..ClassChangeRequest::default()
                },
            ),
        };
        let done = c.change_class(&class, action, request).await?;
        if json {
            output::json(out, &done)?;
            return Ok(());
        }
        let k = &done.class;
        writeln!(
            out,
            "class {} ({} {} {}) is {} now",
            k.id, k.endpoint, k.path, k.kind, k.state
        )?;
        let effect = match action {
            "resolve" => {
                "its evidence so far no longer counts; a mismatch of it from now on reopens it as a regression"
            }
            "accept" => "every proxy now treats it as intended; it never counts",
            _ => "its evidence counts again",
        };
        writeln!(out, "  {effect}")?;
        return Ok(());
    }
    let tenant = args.id.as_deref().map(tenant_id).transpose()?;
    if args.classes {
        let found = c
            .mismatch_classes(tenant.as_ref(), args.state.as_deref())
            .await?;
        if json {
            output::json(out, &found)?;
            return Ok(());
        }
        let whose = match &found.tenant {
            Some(t) => format!("tenant {t}"),
            None => "every tenant".to_string(),
        };
        if found.classes.is_empty() {
            writeln!(
                out,
                "no mismatch classes for {whose} in the last {}",
                found.window
            )?;
            return Ok(());
        }
        let rows: Vec<Vec<String>> = found
            .classes
            .iter()
            .map(|k| {
                vec![
                    k.id.clone(),
                    if k.regression {
                        format!("{} (REGRESSION)", k.state)
                    } else {
                        k.state.clone()
                    },
                    k.compat.clone(),
                    k.counted.to_string(),
                    k.discounted.to_string(),
                    format!("{} {} {}", k.endpoint, k.path, k.kind),
                    k.last_at.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        writeln!(
            out,
            "mismatch classes, counting {whose} over the last {}:",
            found.window
        )?;
        output::table(
            out,
            &[
                "CLASS",
                "STATE",
                "COMPAT",
                "COUNTED",
                "SET ASIDE",
                "WHAT",
                "LAST COUNTED",
            ],
            &rows,
        )?;
        return Ok(());
    }
    let id = tenant.context("give a tenant, or --classes")?;
    let found = c
        .mismatches(&id, args.endpoint.as_deref(), args.limit)
        .await?;
    if json {
        output::json(out, &found)?;
        return Ok(());
    }
    if found.mismatches.is_empty() {
        writeln!(out, "no mismatches recorded for tenant {id}")?;
        return Ok(());
    }
    for m in &found.mismatches {
        writeln!(
            out,
            "{}  {}  ({} {})  {} {} vs {} {}{}",
            m.at,
            m.endpoint,
            m.method,
            m.path,
            m.served_by,
            m.status[0],
            m.compared_with,
            m.status[1],
            m.version
                .as_ref()
                .map(|v| format!("  (new {v})"))
                .unwrap_or_default()
        )?;
        let diffs: Vec<ficus_diff::Difference> = serde_json::from_value(m.differences.clone())
            .context("a mismatch sample is not readable")?;
        for d in diffs {
            writeln!(out, "    {d}")?;
        }
    }
    Ok(())
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
