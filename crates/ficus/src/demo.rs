//! `ficus demo`: a whole migration on one machine, narrated. A throwaway
//! PostgreSQL holds a single-tenant homeowner portal; its legacy backend and the
//! rebuilt one run in this process; `ficus proxy` (a child process) stands in
//! front of them; a load generator plays clients for the whole run. Then, under
//! that load: the database is retrofitted and row level security enforced table
//! by table; tenant zero goes into shadow, where the rebuilt backend's
//! deliberate bug is caught, fixed, and the tenant promoted; three tenants are
//! born from signed billing events; the guard rolls a tenant back when the new
//! backend slows down for it; legacy is retired. The summary counts client
//! requests and failures (the run fails if any request failed).

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ficus_admin::api::{
    AddRequest, ClassChangeRequest, GateJson, GateRequest, PromoteRequest, RetireRequest,
    RouteReleaseRequest, StageRequest,
};
use ficus_admin::provision::{Mapping, SIGNATURE_HEADER, sign};
use ficus_admin::{Control, Direct, token};
use ficus_core::{Actor, Stage, TenantId};
use ficus_demo::backend::{Faults, Flavor};
use ficus_retrofit::apply::{self, Options};
use ficus_retrofit::plan::{IdType, Plan};
use ficus_store::{ControlStore, OpenMode, StoreUrl};

use crate::cli::DemoArgs;

mod dashboard;

const ZERO: &str = "acme-homes";
/// How slow (ms) the rebuilt backend becomes for tenant zero in the guard's step.
const SLOWDOWN_MS: u64 = 1000;
const SECRET: &str = "whsec_ficus_demo";

/// Client traffic and what became of it.
#[derive(Default)]
struct Load {
    sent: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
    /// Tenants the clients play, with a home of theirs to read.
    tenants: RwLock<Vec<(String, i64)>>,
    stop: AtomicBool,
}

/// What the migration's steps act on, whoever takes them: the script, or a
/// person in the dashboard.
struct Demo<'a> {
    store: Arc<dyn ControlStore>,
    control: &'a Direct,
    faults: &'a Faults,
    load: &'a Arc<Load>,
    proxy: &'a Proxy,
    zero: TenantId,
}

/// Phase timings for the summary.
struct Clock {
    phases: Vec<(String, Duration)>,
    at: Instant,
}

impl Clock {
    fn lap(&mut self, name: &str) {
        self.phases.push((name.to_string(), self.at.elapsed()));
        self.at = Instant::now();
    }
}

fn say(out: &mut impl Write, text: &str) {
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

/// Polls `f` every 200 ms until it is true, or fails after `limit` naming `what`.
async fn until<F, Fut>(limit: Duration, what: &str, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let started = Instant::now();
    loop {
        if f().await? {
            return Ok(());
        }
        if started.elapsed() > limit {
            bail!("the demo waited {limit:?} for {what}, in vain");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn run(args: DemoArgs, out: &mut impl Write) -> Result<()> {
    let fast = args.fast;
    let homes: u32 = if fast { 300 } else { 20_000 };
    let work = tempfile::Builder::new().prefix("ficus-demo-").tempdir()?;
    let mut clock = Clock {
        phases: Vec::new(),
        at: Instant::now(),
    };
    let started = Instant::now();
    say(
        out,
        "== Ficus demo: a single-tenant portal becomes multi-tenant and moves to a rebuilt backend, with clients using it throughout",
    );
    say(out, "-- starting a throwaway PostgreSQL");
    let cluster = tokio::task::spawn_blocking(ficus_testkit::PgCluster::start)
        .await?
        .map_err(|e| {
            anyhow::anyhow!(
                "{e}\nficus demo needs PostgreSQL's server binaries (initdb, pg_ctl): on Debian, apt-get install postgresql"
            )
        })?;
    let cluster = Arc::new(cluster);
    let db_url = {
        let c = Arc::clone(&cluster);
        tokio::task::spawn_blocking(move || c.fresh_database("portal")).await??
    };
    let as_role =
        |role: &str| db_url.replace("postgres://postgres@", &format!("postgres://{role}@"));
    let admin = ficus_retrofit::connect(&db_url).await?;
    admin
        .batch_execute(
            "DO $$ BEGIN CREATE ROLE portal_legacy LOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
             DO $$ BEGIN CREATE ROLE portal_tenant LOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
             GRANT CREATE, USAGE ON SCHEMA public TO portal_legacy;",
        )
        .await?;
    let legacy_db = ficus_retrofit::connect(&as_role("portal_legacy")).await?;
    ficus_demo::schema::load(&legacy_db, homes)
        .await
        .context("loading the sample data")?;
    say(
        out,
        &format!(
            "   the legacy portal's database: {homes} homes with valuations, saved searches and notifications, one customer (Acme Homes), no notion of a tenant"
        ),
    );

    // The two backends.
    let faults = Arc::new(Faults::default());
    faults.bug.store(true, Ordering::Relaxed);
    let legacy = serve_backend(&as_role("portal_legacy"), Flavor::Legacy).await?;
    let new = serve_backend(
        &as_role("portal_tenant"),
        Flavor::New {
            faults: Arc::clone(&faults),
        },
    )
    .await?;
    say(
        out,
        &format!(
            "   legacy backend on {legacy} (connects as the tables' owner); rebuilt backend on {new} (a tenant role; ships with a bug on GET /homes/{{id}})"
        ),
    );

    // The control plane and the proxy.
    let store_url = format!("sqlite:{}", work.path().join("ficus.db").display());
    let store = ficus_store::open(&StoreUrl::parse(&store_url)?, OpenMode::Create).await?;
    let api_token = token::ensure(&*store, Actor::Cli)
        .await?
        .unwrap_or_default();
    let control = Direct::new(Arc::clone(&store), Actor::Cli);
    let gate = GateJson {
        window: "1h".into(),
        min_comparisons: if fast { 40 } else { 300 },
        max_mismatches: 0,
        min_per_endpoint: 3,
        max_error_rate: 0.01,
        max_latency_ratio: 3.0,
        latency_slack_ms: 50,
        quiet_window: "3s".into(),
    };
    control
        .set_gate(GateRequest {
            gate: gate.clone(),
            reason: "demo thresholds: a short run".into(),
        })
        .await?;
    let mapping = Mapping {
        start_on_new: true,
        ..Mapping::default()
    };
    store
        .set_setting(
            ficus_admin::provision::SETTING,
            &serde_json::to_string(&mapping)?,
            "(demo mapping)",
            Actor::Cli,
            "new tenants start on the rebuilt backend",
        )
        .await?;
    control
        .add(AddRequest {
            id: ZERO.into(),
            name: Some("Acme Homes".into()),
            domains: vec![],
            stage: None,
            reason: "the customer the portal serves today".into(),
        })
        .await?;
    let proxy = Proxy::start(work.path(), &store_url, &legacy, &new, &db_url).await?;
    say(
        out,
        &format!(
            "   ficus proxy on {} (clients use it instead of legacy), admin API and metrics on {}",
            proxy.addr, proxy.admin
        ),
    );

    // The clients.
    let load = Arc::new(Load::default());
    load.tenants
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .push((ZERO.to_string(), 7));
    let mut workers = Vec::new();
    for w in 0..4u64 {
        workers.push(tokio::spawn(client(
            Arc::clone(&load),
            proxy.addr.clone(),
            w,
            homes,
        )));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    clock.lap("setup");

    // 1. The retrofit, under load.
    say(
        out,
        "\n-- 1. retrofitting the database under load: plan, apply (spine, tenant_id, default, backfill, index, NOT NULL; the isolation policies come with enforcement)",
    );
    let mut c = ficus_retrofit::connect(&db_url).await?;
    let inv = ficus_retrofit::inspect(&c).await?;
    let mut plan = Plan::draft(&inv, "Acme Homes", IdType::Uuid)?;
    plan.app_roles = vec!["portal_legacy".into()];
    plan.tenant_roles = vec!["portal_tenant".into()];
    let owned: Vec<String> = plan.owned().map(|t| t.name.clone()).collect();
    say(
        out,
        &format!(
            "   tenant-owned: {}; excluded: schema_migrations",
            owned.join(", ")
        ),
    );
    let rows = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&rows);
    apply::apply(&mut c, &plan, &inv, &Options::default(), &mut move |e| {
        if let apply::Event::Backfill(p) = e {
            counted.fetch_max(p.rows as u64, Ordering::Relaxed);
        }
    })
    .await?;
    c.batch_execute(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO portal_tenant;
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO portal_tenant;
         GRANT USAGE ON SCHEMA tenancy TO portal_tenant;
         GRANT SELECT ON tenancy.organizations TO portal_tenant;",
    )
    .await?;
    say(
        out,
        &format!(
            "   every existing row now belongs to tenant zero (Acme Homes); client requests so far: {}, failed: {}",
            load.sent.load(Ordering::Relaxed),
            load.failed.load(Ordering::Relaxed)
        ),
    );
    clock.lap("1. retrofit");

    // 2. Row level security, table by table, each phase proved.
    say(
        out,
        "\n-- 2. enforcing row level security one table at a time, each phase proved before it commits",
    );
    for p in plan.owned() {
        let t = ficus_retrofit::ident::Table::new(&p.schema, &p.name);
        for _ in 0..2 {
            let r = ficus_retrofit::enforce::step(
                &mut c,
                &plan,
                &inv,
                &t,
                true,
                true,
                &Options::default(),
            )
            .await?;
            say(
                out,
                &format!(
                    "   {:<16} {:<8} {}",
                    p.name,
                    r.to.as_str(),
                    r.verified.first().map_or("", String::as_str)
                ),
            );
        }
    }
    clock.lap("2. enforce");

    let demo = Demo {
        store: Arc::clone(&store),
        control: &control,
        faults: &faults,
        load: &load,
        proxy: &proxy,
        zero: TenantId::parse(ZERO)?,
    };
    // The viewer's token for the dashboard, when the run leaves one up.
    let viewer = if args.keep || args.dashboard {
        dashboard::viewer_token(&*store).await?
    } else {
        String::new()
    };
    if args.dashboard {
        dashboard::run(&demo, &viewer, out, &mut clock).await?;
    } else {
        scripted(&demo, out, &mut clock).await?;
    }
    drop(demo);
    let zero = TenantId::parse(ZERO)?;

    load.stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let (sent, failed) = (
        load.sent.load(Ordering::Relaxed),
        load.failed.load(Ordering::Relaxed),
    );
    say(out, "\n== summary");
    say(
        out,
        &format!("   client requests served: {sent}, failed: {failed}"),
    );
    let mut by_path: std::collections::BTreeMap<String, usize> = Default::default();
    for m in control.mismatches(&zero, None, 1_000).await?.mismatches {
        for p in difference_paths(&m.differences) {
            *by_path.entry(p).or_default() += 1;
        }
    }
    say(
        out,
        &format!(
            "   mismatches caught by the parallel run: {} (in the samples kept: {})",
            mismatched(&*store, &zero).await?,
            by_path
                .iter()
                .map(|(p, n)| format!("{p} ×{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    for (name, d) in &clock.phases {
        say(out, &format!("   {name:<22} {:>6.1} s", d.as_secs_f64()));
    }
    say(
        out,
        &format!(
            "   total                  {:>6.1} s",
            started.elapsed().as_secs_f64()
        ),
    );
    if args.keep {
        say(
            out,
            &format!(
                "\n   still running: proxy http://{} (try: curl -H 'Host: acme-homes.portal.test' http://{}/homes/7),\n   dashboard http://{}/ui/ (log in with the viewer token {viewer}, or the operator token below to act),\n   metrics http://{}/metrics, store {store_url} (FICUS_STORE={store_url} ficus audit), database {db_url}\n   FICUS_API=http://{} FICUS_TOKEN={api_token} ficus status\n   press Ctrl-C to stop and remove everything",
                proxy.addr, proxy.addr, proxy.admin, proxy.admin, proxy.admin
            ),
        );
        let _ = tokio::signal::ctrl_c().await;
    } else {
        say(
            out,
            "\n   next: ficus demo --keep leaves it all running to explore (the proxy, its /metrics, the store, the database); README.md has the guide to your own system",
        );
    }
    drop(proxy);
    drop(cluster);
    let errors = load
        .errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if failed > 0 {
        bail!(
            "{failed} client requests failed, first: {}",
            errors.first().cloned().unwrap_or_default()
        );
    }
    Ok(())
}

/// The migration as the demo narrates it by itself: every decision the
/// operator would make, made by the script.
async fn scripted(d: &Demo<'_>, out: &mut impl Write, clock: &mut Clock) -> Result<()> {
    let (store, control, faults) = (&d.store, d.control, d.faults);
    // 3. The parallel run catches the bug; fixed; readiness passes; promoted.
    say(
        out,
        "\n-- 3. tenant zero into shadow: every safe read also goes to the rebuilt backend and the answers are compared",
    );
    let zero = d.zero.clone();
    control
        .stage(
            &zero,
            StageRequest {
                stage: "shadow".into(),
                reason: "parallel run".into(),
            },
            None,
        )
        .await?;
    until(Duration::from_secs(60), "the first mismatch", || async {
        Ok(!control
            .mismatches(&zero, None, 1)
            .await?
            .mismatches
            .is_empty())
    })
    .await?;
    if let Some(first) = control.mismatches(&zero, None, 1).await?.mismatches.first() {
        say(
            out,
            &format!(
                "   MISMATCH on {} {}: {}",
                first.method, first.path, first.differences
            ),
        );
    }
    faults.bug.store(false, Ordering::Relaxed);
    say(
        out,
        "   the bug is fixed in the rebuilt backend (price_per_bedroom divided by the right number of bedrooms)",
    );
    // Reads compared before the fix may still be on their way to the store: the
    // bug's class is resolved once forty more comparisons have come in without
    // a new mismatch, however long that takes on this machine. The gate keeps
    // `max_mismatches = 0`; only evidence from after the resolution counts.
    settled_mismatches(&**store, &zero).await?;
    let classes = control.mismatch_classes(Some(&zero), Some("open")).await?;
    for k in classes.classes.iter().filter(|k| k.compat == "breaking") {
        // The bug's class was fixed in 2.0.1. A read raced by the demo's own
        // writes (a search saved between the two backends' reads) is counted
        // as raced, not as a mismatch, so any other class is a difference
        // nobody planted: the demo stops and names it.
        if k.path != "$.price_per_bedroom" {
            bail!(
                "the parallel run found a difference the demo did not plant: class {} ({} {} {}, {} mismatched); see `ficus mismatches {zero}`",
                k.id,
                k.endpoint,
                k.path,
                k.kind,
                k.counted
            );
        }
        control
            .change_class(
                &k.id,
                "resolve",
                ClassChangeRequest {
                    reason: "price_per_bedroom divides by the right number of bedrooms again"
                        .into(),
                    fixed_in: Some("2.0.1".to_string()),
                    whole_endpoint: false,
                },
            )
            .await?;
        say(
            out,
            &format!(
                "   class {} ({} {} {}, {} mismatched) resolved as fixed in 2.0.1: its evidence stops counting; a recurrence reopens it as a regression",
                k.id, k.endpoint, k.path, k.kind, k.counted
            ),
        );
    }
    let waited = until(Duration::from_secs(120), "readiness", || async {
        Ok(control.readiness(&zero, &Default::default()).await?.ready)
    })
    .await;
    if let Err(e) = waited {
        // Say which criterion held it back, not only that time ran out.
        let r = control.readiness(&zero, &Default::default()).await?;
        let failing: Vec<String> = r
            .criteria
            .iter()
            .filter(|c| !c.passed)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect();
        bail!("{e}; failing: {}", failing.join("; "));
    }
    let r = control.readiness(&zero, &Default::default()).await?;
    for c in &r.criteria {
        say(out, &format!("   readiness {:<12} {}", c.name, c.detail));
    }
    for k in &r.additive {
        say(
            out,
            &format!(
                "   readiness additive     {} {}: only the rebuilt backend has it ({} seen); legacy clients never read it, so it does not count",
                k.endpoint, k.path, k.counted
            ),
        );
    }
    control
        .promote(
            &zero,
            PromoteRequest {
                reason: "readiness passed".into(),
                force: false,
            },
            None,
        )
        .await?;
    say(
        out,
        "   tenant zero promoted: the rebuilt backend serves Acme Homes",
    );
    clock.lap("3. shadow and promote");

    // 3b. The write surface: writes stayed on legacy, held, until released.
    say(
        out,
        "\n-- 3b. the write surface: every write route is held on legacy until released on purpose",
    );
    let held = |routes: &ficus_admin::api::RoutesJson| -> Vec<String> {
        routes
            .routes
            .iter()
            .filter(|r| r.held && r.census.iter().any(|c| c.backend == "legacy"))
            .map(|r| r.route.clone())
            .collect()
    };
    until(
        Duration::from_secs(60),
        "tenant zero's writes in the census",
        || async {
            let r = control.routes(Some(&zero)).await?;
            Ok(held(&r).len() >= 3)
        },
    )
    .await?;
    let routes = control.routes(Some(&zero)).await?;
    say(
        out,
        &format!(
            "   tenant zero is migrated, and its writes still go to legacy: {}",
            held(&routes).join(", ")
        ),
    );
    let release = |route: &str, tenant: Option<&str>, reason: &str| RouteReleaseRequest {
        route: route.into(),
        tenant: tenant.map(str::to_string),
        destructive: false,
        reason: reason.into(),
    };
    control
        .release_route(release(
            "POST /searches",
            Some(ZERO),
            "canary: tenant zero saves its searches on the rebuilt backend first",
        ))
        .await?;
    say(
        out,
        "   POST /searches released for tenant zero alone (a canary; the guard watches the route for it)",
    );
    for route in [
        "POST /searches",
        "POST /homes/{id}/valuations",
        "POST /homes",
    ] {
        control
            .release_route(release(
                route,
                None,
                "the rebuilt backend writes it for every tenant",
            ))
            .await?;
    }
    say(
        out,
        "   POST /searches, POST /homes/{id}/valuations and POST /homes released for every tenant",
    );
    match control
        .release_route(release("DELETE /searches/{id}", None, "tidy up"))
        .await
    {
        Err(ficus_admin::Error::Refused(why)) => say(out, &format!("   refused: {why}")),
        Err(e) => return Err(e.into()),
        Ok(_) => bail!("a destructive route was released without its confirmation"),
    }
    clock.lap("3b. write surface");

    provision(d, out).await?;
    clock.lap("4. provision");

    // 5. The guard.
    say(
        out,
        "\n-- 5. the rebuilt backend slows down for Acme Homes; the guard rolls the tenant back to legacy by itself",
    );
    // A second per answer: slow beyond the guard's ratio even when the
    // machine was busy while the baseline (legacy's p99) was measured, and
    // still enough answers in its window (regression: at 300 ms, a busy CI's
    // baseline made the slow answers look normal and the guard never acted).
    *faults.slow.lock().unwrap_or_else(|p| p.into_inner()) = Some((ZERO.to_string(), SLOWDOWN_MS));
    until(Duration::from_secs(60), "the guard's rollback", || async {
        Ok(store
            .tenant(&zero)
            .await?
            .is_some_and(|t| t.stage == Stage::Shadow))
    })
    .await?;
    let events = control
        .audit(ficus_admin::ops::AuditFilter {
            tenant: Some(zero.clone()),
            since: None,
            limit: Some(1),
            ..Default::default()
        })
        .await?;
    if let Some(e) = events.events.last() {
        say(
            out,
            &format!("   audit: {} by {}: {}", e.to, e.actor, e.reason),
        );
    }
    *faults.slow.lock().unwrap_or_else(|p| p.into_inner()) = None;
    say(
        out,
        "   the slowdown is fixed; tenant zero's reads are compared again in shadow",
    );
    // Fresh evidence after the fix: a few seconds of comparisons.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = control.readiness(&zero, &Default::default()).await?;
    let failing: Vec<String> = r
        .criteria
        .iter()
        .filter(|c| !c.passed)
        .map(|c| format!("{} ({})", c.name, c.detail))
        .collect();
    // The gate judges this hour's evidence, which may now hold the incident's
    // slow answers and the shadow reads that timed out behind them (the new
    // backend was answering 300 ms late). The operator reads what is new, and
    // re-promotes with --force; the audit log keeps the reason. Anything else
    // (a mismatch, too few comparisons) was not the incident: the demo stops.
    let incident = |name: &str| name == "latency" || name == "shadow errors";
    if let Some(c) = r.criteria.iter().find(|c| !c.passed && !incident(&c.name)) {
        bail!(
            "readiness fails after the slowdown for a reason the incident does not explain: {} ({})",
            c.name,
            c.detail
        );
    }
    let force = !failing.is_empty();
    if force {
        say(
            out,
            &format!(
                "   readiness fails on this hour's evidence: {}",
                failing.join("; ")
            ),
        );
        // The gate explains itself: what counted, with an example of each.
        for k in &r.open_classes {
            say(
                out,
                &format!(
                    "   open class {}{}: {} {} {}, {} mismatched{}",
                    k.id,
                    if k.regression { " (REGRESSION)" } else { "" },
                    k.endpoint,
                    k.path,
                    k.kind,
                    k.counted,
                    k.example
                        .as_ref()
                        .map(|e| format!(", e.g. {}", e.request))
                        .unwrap_or_default()
                ),
            );
        }
        say(
            out,
            "   reviewed (what is new came from the incident: slow answers, shadow reads that timed out behind them); re-promoting with --force, the reason on record",
        );
    }
    control
        .promote(
            &zero,
            PromoteRequest {
                reason: if force {
                    "the slowdown is fixed; the slow answers in this hour's evidence are the incident itself".into()
                } else {
                    "the slowdown is fixed".into()
                },
                force,
            },
            None,
        )
        .await?;
    say(out, "   tenant zero is back on the rebuilt backend");
    clock.lap("5. guard");

    // 6. Legacy retired.
    say(
        out,
        "\n-- 6. every tenant is on the rebuilt backend; once legacy has been idle for the quiet window, it is retired",
    );
    // Not while a write route is still held on legacy.
    match control
        .retire(
            RetireRequest {
                reason: "legacy is empty".into(),
                undo: false,
                quiet_window: None,
            },
            None,
        )
        .await
    {
        Err(ficus_admin::Error::Refused(why)) => say(out, &format!("   refused: {why}")),
        Err(e) => return Err(e.into()),
        Ok(_) => bail!("legacy was retired while DELETE /searches/{{id}} was held"),
    }
    for (tenant, reason) in [
        (
            Some(ZERO),
            "canary: tenant zero deletes on the rebuilt backend first; reviewed, confirmed",
        ),
        (
            None,
            "deletes verified on the canary; confirmed for every tenant",
        ),
    ] {
        control
            .release_route(RouteReleaseRequest {
                route: "DELETE /searches/{id}".into(),
                tenant: tenant.map(str::to_string),
                destructive: true,
                reason: reason.into(),
            })
            .await?;
    }
    say(
        out,
        "   DELETE /searches/{id} released with its second confirmation: for tenant zero, then for every tenant",
    );
    until(Duration::from_secs(60), "legacy's quiet window", || async {
        match control
            .retire(
                RetireRequest {
                    reason: "legacy is empty and quiet".into(),
                    undo: false,
                    quiet_window: None,
                },
                None,
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(ficus_admin::Error::Refused(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    })
    .await?;
    say(out, "   legacy retired: no request will reach it again");
    clock.lap("6. retire legacy");

    Ok(())
}

/// Three tenants sold: signed billing events provision them, born on the
/// rebuilt backend; the clients start playing each.
async fn provision(d: &Demo<'_>, out: &mut impl Write) -> Result<()> {
    let (load, proxy) = (d.load, d.proxy);
    say(
        out,
        "\n-- 4. three tenants sold: signed billing events provision them, born on the rebuilt backend",
    );
    let http = reqwest::Client::builder().no_proxy().build()?;
    for (i, (name, domain)) in [
        ("Globex Realty", "homes.globex.test"),
        ("Initech Living", "homes.initech.test"),
        ("Umbrella Estates", "homes.umbrella.test"),
    ]
    .iter()
    .enumerate()
    {
        let body = serde_json::json!({
            "id": format!("evt_demo_{i}"),
            "type": "subscription.created",
            "data": {"customer": {"name": name}, "domain": domain}
        })
        .to_string();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs() as i64;
        let r = http
            .post(format!("http://{}/v1/hooks/billing", proxy.admin))
            .header("content-type", "application/json")
            .header(
                SIGNATURE_HEADER,
                sign(SECRET.as_bytes(), now, body.as_bytes()),
            )
            .body(body)
            .send()
            .await?;
        let job: serde_json::Value = r.json().await?;
        let slug = job["tenant"].as_str().unwrap_or_default().to_string();
        // The proxy learns of the new tenant through the change feed: wait
        // until its domain is served rather than print a miss.
        let url = format!("http://{}/.well-known/tenant-config", proxy.addr);
        until(
            Duration::from_secs(10),
            "the new tenant's configuration",
            || async {
                let r = http.get(&url).header("host", *domain).send().await?;
                Ok(r.status().is_success())
            },
        )
        .await?;
        let config: serde_json::Value = http
            .get(&url)
            .header("host", *domain)
            .send()
            .await?
            .json()
            .await?;
        say(
            out,
            &format!(
                "   {name}: tenant {slug} ({}), config served at {domain}: app \"{}\"",
                job["state"].as_str().unwrap_or("?"),
                config["app_name"].as_str().unwrap_or("?")
            ),
        );
        let home: serde_json::Value = http
            .post(format!("http://{}/homes", proxy.addr))
            .header("host", format!("{slug}.portal.test"))
            .json(&serde_json::json!({"address": format!("1 {name} Way"), "city": "Lyon", "price": 250000, "bedrooms": 2}))
            .send()
            .await?
            .json()
            .await?;
        let id = home["id"].as_i64().unwrap_or(1);
        load.tenants
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push((slug, id));
    }
    Ok(())
}

/// The JSON paths a mismatch sample's differences name, array indexes folded
/// to `[*]`, each once.
/// The generalized paths of a sample's breaking differences (additive ones
/// never count, so the summary leaves them out).
fn difference_paths(differences: &serde_json::Value) -> Vec<String> {
    let mut paths: Vec<String> = differences
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|d| d["compat"] != "additive")
                .filter_map(|d| d["path"].as_str().map(fold_indexes))
                .collect()
        })
        .unwrap_or_default();
    paths.dedup();
    paths
}

fn fold_indexes(path: &str) -> String {
    let mut out = String::new();
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push_str("[*]");
            }
            ']' if in_index => in_index = false,
            _ if in_index => {}
            c => out.push(c),
        }
    }
    out
}

/// The tenant's mismatch count once it has stood still over forty further
/// comparisons.
async fn settled_mismatches(store: &dyn ControlStore, tenant: &TenantId) -> Result<u64> {
    let since = ficus_core::Timestamp::from_unix_millis(0);
    let totals = || async {
        let stats = store.comparison_stats(tenant, since).await?;
        Ok::<_, anyhow::Error>((
            stats.iter().map(|c| c.compared).sum::<u64>(),
            stats.iter().map(|c| c.mismatched).sum::<u64>(),
        ))
    };
    let (mut base, mut known) = totals().await?;
    let started = Instant::now();
    loop {
        let (compared, mismatched) = totals().await?;
        if mismatched != known {
            (base, known) = (compared, mismatched);
        }
        if compared >= base + 40 {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the demo waited 120 s for the mismatch count to settle, in vain");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(known)
}

async fn mismatched(store: &dyn ControlStore, tenant: &TenantId) -> Result<u64> {
    let since = ficus_core::Timestamp::from_unix_millis(0);
    Ok(store
        .comparison_stats(tenant, since)
        .await?
        .iter()
        .map(|c| c.mismatched)
        .sum())
}

async fn serve_backend(url: &str, flavor: Flavor) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let app = ficus_demo::backend::router(
        ficus_demo::backend::pool(url, 8).map_err(anyhow::Error::msg)?,
        flavor,
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// One client: reads and writes as the tenants in play, round robin.
async fn client(load: Arc<Load>, proxy: String, worker: u64, homes: u32) {
    let http = match reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(h) => h,
        Err(_) => return,
    };
    let mut i: u64 = worker;
    // Tenant zero's clients delete the saved search they made last: the demo's
    // destructive route.
    let mut last_search: Option<i64> = None;
    while !load.stop.load(Ordering::Relaxed) {
        i += 4;
        let tenants = load
            .tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (slug, home) = &tenants[(i as usize / 4) % tenants.len()];
        let home = if slug == ZERO {
            1 + (i % u64::from(homes)) as i64
        } else {
            *home
        };
        let host = format!("{slug}.portal.test");
        let base = format!("http://{proxy}");
        let saving = i % 10 == 7;
        let request = match i % 10 {
            0..=3 => http.get(format!("{base}/homes/{home}")),
            4..=5 => http.get(format!("{base}/homes")),
            6 => http.get(format!("{base}/searches")),
            7 => http.post(format!("{base}/searches")).json(&serde_json::json!({"owner": format!("client-{worker}"), "city": "Porto", "max_price": 300000})),
            8 => http.post(format!("{base}/homes/{home}/valuations")).json(&serde_json::json!({"value": 300000 + i as i64})),
            _ => match last_search.take().filter(|_| slug == ZERO) {
                Some(id) => http.delete(format!("{base}/searches/{id}")),
                None => http.get(format!("{base}/notifications")),
            },
        };
        load.sent.fetch_add(1, Ordering::Relaxed);
        match request.header("host", host).send().await {
            Ok(r) if saving && r.status().is_success() => {
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                last_search = body["id"].as_i64();
            }
            Ok(r) if r.status().is_server_error() => {
                load.failed.fetch_add(1, Ordering::Relaxed);
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                load.errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("{slug}: {status} {body}"));
            }
            Ok(_) => {}
            Err(e) => {
                load.failed.fetch_add(1, Ordering::Relaxed);
                load.errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("{slug}: {e}"));
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `ficus proxy` child process.
struct Proxy {
    child: std::process::Child,
    addr: String,
    admin: String,
}

impl Proxy {
    async fn start(
        dir: &Path,
        store: &str,
        legacy: &str,
        new: &str,
        db_url: &str,
    ) -> Result<Proxy> {
        let free = || -> Result<String> {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            Ok(l.local_addr()?.to_string())
        };
        let (addr, admin) = (free()?, free()?);
        let config = dir.join("ficus.toml");
        std::fs::write(
            &config,
            format!(
                "[proxy]\nlisten = [\"{addr}\"]\nadmin_listen = \"{admin}\"\nstore = \"{store}\"\ntraffic_flush_ms = 200\ndrain_delay_ms = 0\n\n\
                 [backends.legacy]\nupstreams = [\"{legacy}\"]\nread_timeout_ms = 5000\n\n\
                 [backends.new]\nupstreams = [\"{new}\"]\nread_timeout_ms = 5000\n\n\
                 [[tenant_from]]\nhost = \"{{tenant}}.portal.test\"\n\n\
                 [shadow]\nsample_rate = 1.0\nflush_ms = 200\nmax_per_second = 10000\nversion_header = \"x-app-version\"\n\n\
                 [guard]\nenabled = true\nwindow_ms = 5000\nmin_requests = 10\nmax_latency_ratio = 3.0\nmax_slow_rate = 0.2\n"
            ),
        )?;
        let log = std::fs::File::create(dir.join("proxy.log"))?;
        let child = std::process::Command::new(std::env::current_exe()?)
            .args(["proxy", "--config"])
            .arg(&config)
            .env("FICUS_BILLING_SECRET", SECRET)
            .env("FICUS_TENANT_DB_URL", db_url)
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting ficus proxy")?;
        let proxy = Proxy { child, addr, admin };
        let http = reqwest::Client::builder().no_proxy().build()?;
        let started = Instant::now();
        loop {
            if let Ok(r) = http
                .get(format!("http://{}/readyz", proxy.admin))
                .send()
                .await
                && r.status().is_success()
            {
                return Ok(proxy);
            }
            if started.elapsed() > Duration::from_secs(30) {
                // Dropping the proxy stops it.
                bail!(
                    "ficus proxy did not become ready; see {}",
                    dir.join("proxy.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A phase that fails returns early with `?`; the proxy must not outlive the
/// demo (regression: a failed run left `ficus proxy` running).
impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}
