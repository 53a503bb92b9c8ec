//! The soak itself: the topology brought up, the migration run under client
//! load, the seed's faults injected at their points, and everything handed to
//! the verdict.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ficus_admin::api::{
    AddRequest, GateJson, GateRequest, PromoteRequest, RetireRequest, RouteReleaseRequest,
    StageRequest,
};
use ficus_admin::provision::{Mapping, SIGNATURE_HEADER, sign};
use ficus_admin::{Control, Direct};
use ficus_core::{Actor, TenantId};
use ficus_demo::backend::{Faults, Flavor};
use ficus_retrofit::plan::{IdType, Plan};
use ficus_store::{ControlStore, OpenMode, StoreUrl};
use ficus_testkit::PgCluster;
use tokio::io::AsyncBufReadExt;

use crate::chaos::{Chaos, Mode};
use crate::client::{Record, now_ms};
use crate::schedule::{Fault, Rng, Schedule};
use crate::verdict::{self, FaultRecord, Verdict};
use crate::world::{Client, Haproxy, Replica, Upstreams};

pub const ZERO: &str = "acme-homes";
const SECRET: &str = "whsec_ficus_soak";

pub struct Args {
    pub minutes: f64,
    pub seed: u64,
    pub out: PathBuf,
    pub ficus: PathBuf,
    pub homes: u32,
    pub rate: u32,
}

/// Prints a line of the soak's narrative, with the seconds since it began.
struct Say(Instant);

impl Say {
    fn line(&self, text: &str) {
        println!("[{:>6.1} s] {text}", self.0.elapsed().as_secs_f64());
    }
}

/// One backend on a loopback port, with the soak's switchboard in front.
async fn serve_backend(url: &str, flavor: Flavor, chaos: Arc<Chaos>) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let app = ficus_demo::backend::router(
        ficus_demo::backend::pool(url, 16).map_err(anyhow::Error::msg)?,
        flavor,
    )
    .layer(axum::middleware::from_fn_with_state(chaos, Chaos::layer));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// Polls `f` every 100 ms until it is true, or fails after `limit` naming `what`.
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
            bail!("the soak waited {limit:?} for {what}, in vain");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Everything the soak started, torn down in reverse when dropped.
struct Topology {
    /// Kept for its lifetime: dropping it stops the application's cluster.
    _data: Arc<PgCluster>,
    control: Arc<Mutex<PgCluster>>,
    db_url: String,
    store: Arc<dyn ControlStore>,
    direct: Direct,
    legacy: Arc<Chaos>,
    new: [Arc<Chaos>; 2],
    replicas: Vec<Replica>,
    haproxy: Haproxy,
    clients: Vec<Client>,
}

impl Topology {
    /// A client process for each of these tenants (born from billing events,
    /// so not tenant zero), reading and saving through HAProxy from now on.
    fn add_clients(&mut self, dir: &Path, args: &Args, tenants: &[String]) -> Result<()> {
        for slug in tenants {
            self.clients.push(Client::start(
                dir,
                &self.haproxy.addr,
                slug,
                false,
                args.rate,
                args.homes,
            )?);
        }
        Ok(())
    }
}

pub async fn run(args: Args) -> Result<Verdict> {
    let say = Say(Instant::now());
    let schedule = Schedule::draw(args.seed);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let dir = args.out.clone();
    // The burst's records are appended to this file; a run must not judge an
    // earlier run's (regression: a rerun with the same seed counted both).
    std::fs::File::create(dir.join("burst.jsonl"))?;
    say.line(&format!(
        "soak seed {}: {} minutes, faults in this order: {}",
        args.seed,
        args.minutes,
        schedule
            .faults
            .iter()
            .map(|(_, f)| f.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    ));
    if !args.ficus.exists() {
        bail!(
            "the ficus binary is not at {} (build it with cargo build -p ficus, or pass --ficus)",
            args.ficus.display()
        );
    }
    let mut faults: Vec<FaultRecord> = Vec::new();
    let mut topo = bring_up(&args, &dir, &say).await?;
    // Whatever happens, the control store's tenants, audit log and
    // provisioning jobs are written beside the logs before the throwaway
    // clusters go, so that a failed run can be diagnosed afterwards.
    let outcome: Result<Verdict> = async {
        let started = Instant::now();

        // The migration's first half: retrofit (with the backfill killed), enforce.
        retrofit(&args, &dir, &topo, &schedule, &say, &mut faults).await?;
        // Tenant zero: shadow, then promoted through the gate.
        let zero = TenantId::parse(ZERO)?;
        shadow_and_promote(&topo, &zero, &say).await?;
        topo.direct
            .release_route(RouteReleaseRequest {
                route: "POST /homes".into(),
                tenant: None,
                destructive: false,
                reason: "soak: the rebuilt backend saves homes for every tenant".into(),
            })
            .await?;
        say.line("POST /homes released for every tenant");
        let mut rng = Rng::new(args.seed ^ 0x5eed);
        let first = provision(&topo, &args, &mut rng, 0, 2, false, &say).await?;
        topo.add_clients(&dir, &args, &first)?;
        let mut provisioned = first;

        // The fault window: whatever is left of the soak's time, at least enough
        // for every fault and its recovery.
        let total = Duration::from_secs_f64(args.minutes * 60.0);
        let window = total
            .saturating_sub(started.elapsed())
            .saturating_sub(Duration::from_secs(15))
            .max(Duration::from_secs(120));
        say.line(&format!(
            "fault window: {:.0} s, {} faults",
            window.as_secs_f64(),
            schedule.faults.len()
        ));
        let window_start = Instant::now();
        for (at, fault) in &schedule.faults {
            let due = window.mul_f64(*at);
            let now = window_start.elapsed();
            if due > now {
                tokio::time::sleep(due - now).await;
            }
            say.line(&format!("fault: {fault}"));
            let record = match fault {
                Fault::KillReplica => kill_replica(&mut topo, schedule.killed_replica, &say).await?,
                Fault::TermReplica => {
                    term_replica(&mut topo, 1 - schedule.killed_replica, &say).await?
                }
                Fault::RestartStore => restart_store(&topo, &zero, &say).await?,
                Fault::BreakNewForTenant => break_new(&topo, &zero, &say).await?,
                Fault::FlipUnderLoad => flip_under_load(&topo, &zero, &dir, args.homes, &say).await?,
                Fault::DuplicateEvents => {
                    let start = now_ms();
                    let born =
                        provision(&topo, &args, &mut rng, 2, schedule.new_tenants, true, &say).await?;
                    topo.add_clients(&dir, &args, &born)?;
                    provisioned.extend(born.iter().cloned());
                    FaultRecord::new(
                        *fault,
                        start,
                        format!(
                            "{} events, each delivered twice to both replicas in a shuffled order: tenants {}",
                            schedule.new_tenants,
                            born.join(", ")
                        ),
                    )
                }
            };
            say.line(&format!("   {}", record.what));
            faults.push(record);
        }
        let left = window.saturating_sub(window_start.elapsed());
        tokio::time::sleep(left).await;

        // The finish line.
        retire(&topo, &say).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;

        // Stop the clients (each finishes what it has in flight), then the rest.
        say.line("stopping the clients");
        let mut logs = Vec::new();
        for c in std::mem::take(&mut topo.clients) {
            logs.push(c.stop().await?);
        }
        logs.push(dir.join("burst.jsonl"));
        topo.haproxy.stop().await;
        for r in &mut topo.replicas {
            if let Some(p) = r.proc.as_mut() {
                let _ = p.signal("TERM");
                let _ = p.wait_exit(Duration::from_secs(30)).await;
            }
        }
        say.line("judging");
        let records = verdict::read_records(&logs)?;
        let lb = verdict::read_haproxy_log(&topo.haproxy.log)?;
        let db = ficus_retrofit::connect(&topo.db_url).await?;
        let mut expected_tenants: Vec<String> = vec![ZERO.to_string()];
        expected_tenants.extend(provisioned);
        let v = verdict::judge(
            &schedule,
            &records,
            &lb,
            &faults,
            &db,
            &*topo.store,
            &expected_tenants,
            started.elapsed(),
        )
        .await?;
        Ok(v)
    }
    .await;
    if let Err(e) = dump_control(&*topo.store, &dir.join("control.json")).await {
        say.line(&format!(
            "the control store could not be written out: {e:#}"
        ));
    }
    drop(topo);
    outcome
}

/// The control store as the soak left it: every tenant, the whole audit log and
/// every provisioning job, as JSON.
async fn dump_control(store: &dyn ficus_store::ControlStore, path: &Path) -> Result<()> {
    let tenants: Vec<_> = store
        .tenants(None)
        .await?
        .iter()
        .map(|t| serde_json::json!({"id": t.id.as_str(), "stage": t.stage.as_str(), "version": t.version}))
        .collect();
    let audit: Vec<_> = store
        .audit(ficus_store::AuditQuery {
            limit: Some(100_000),
            ..Default::default()
        })
        .await?
        .iter()
        .map(|e| serde_json::json!({"seq": e.seq, "at": e.at.unix_millis(), "tenant": e.tenant.as_str(), "from": e.from.map(|f| f.as_str()), "to": e.to.as_str(), "actor": e.actor.to_string(), "reason": e.reason}))
        .collect();
    let jobs: Vec<_> = store
        .provision_jobs(None, 100_000)
        .await?
        .iter()
        .map(|j| serde_json::json!({"event": j.event_id, "tenant": j.tenant.as_ref().map(|t| t.as_str()), "state": j.state.as_str(), "steps": j.steps, "attempts": j.attempts, "last_error": j.last_error, "created_at": j.created_at.unix_millis(), "updated_at": j.updated_at.unix_millis()}))
        .collect();
    let doc = serde_json::json!({"tenants": tenants, "audit": audit, "provision_jobs": jobs});
    std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

async fn bring_up(args: &Args, dir: &Path, say: &Say) -> Result<Topology> {
    say.line(
        "starting two throwaway PostgreSQL clusters: the application's data, and the control store",
    );
    let data = tokio::task::spawn_blocking(PgCluster::start).await??;
    let control = tokio::task::spawn_blocking(PgCluster::start).await??;
    let data = Arc::new(data);
    let db_url = {
        let c = Arc::clone(&data);
        tokio::task::spawn_blocking(move || c.fresh_database("portal")).await??
    };
    let store_url = control.fresh_database("control")?;
    let control = Arc::new(Mutex::new(control));
    let as_role =
        |role: &str| db_url.replace("postgres://postgres@", &format!("postgres://{role}@"));
    let admin = ficus_retrofit::connect(&db_url).await?;
    admin
        .batch_execute(
            "CREATE ROLE portal_legacy LOGIN; CREATE ROLE portal_tenant LOGIN;
             GRANT CREATE, USAGE ON SCHEMA public TO portal_legacy;",
        )
        .await?;
    let legacy_db = ficus_retrofit::connect(&as_role("portal_legacy")).await?;
    ficus_demo::schema::load(&legacy_db, args.homes).await?;
    say.line(&format!(
        "the portal's database: {} homes, single-tenant",
        args.homes
    ));

    let legacy_chaos = Arc::new(Chaos::default());
    let new_chaos = [Arc::new(Chaos::default()), Arc::new(Chaos::default())];
    let legacy = serve_backend(
        &as_role("portal_legacy"),
        Flavor::Legacy,
        Arc::clone(&legacy_chaos),
    )
    .await?;
    let mut new = Vec::new();
    for c in &new_chaos {
        let flavor = Flavor::New {
            faults: Arc::new(Faults::default()),
        };
        new.push(serve_backend(&as_role("portal_tenant"), flavor, Arc::clone(c)).await?);
    }

    let store = ficus_store::open(&StoreUrl::parse(&store_url)?, OpenMode::Create).await?;
    let direct = Direct::new(Arc::clone(&store), Actor::Cli);
    direct
        .set_gate(GateRequest {
            gate: GateJson {
                window: "1h".into(),
                min_comparisons: 40,
                max_mismatches: 0,
                min_per_endpoint: 3,
                max_error_rate: 0.01,
                max_latency_ratio: 3.0,
                latency_slack_ms: 50,
                quiet_window: "3s".into(),
            },
            reason: "soak thresholds".into(),
        })
        .await?;
    store
        .set_setting(
            ficus_admin::provision::SETTING,
            &serde_json::to_string(&Mapping {
                start_on_new: true,
                ..Mapping::default()
            })?,
            "(soak mapping)",
            Actor::Cli,
            "the legacy portal serves one customer: new tenants start on the rebuilt backend",
        )
        .await?;
    direct
        .add(AddRequest {
            id: ZERO.into(),
            name: Some("Acme Homes".into()),
            domains: vec![],
            stage: None,
            reason: "the customer the portal serves today".into(),
        })
        .await?;

    let up = Upstreams {
        store: store_url,
        legacy,
        new,
        tenant_db: db_url.clone(),
        secret: SECRET.into(),
    };
    let mut replicas = vec![
        Replica::new(dir, "replica-a", &args.ficus, &up)?,
        Replica::new(dir, "replica-b", &args.ficus, &up)?,
    ];
    for r in &mut replicas {
        r.start().await?;
    }
    let haproxy = Haproxy::start(dir, &replicas.iter().collect::<Vec<_>>()).await?;
    say.line(&format!(
        "two ficus proxy replicas ({}, {}) on the PostgreSQL store, HAProxy on {} in front",
        replicas[0].addr, replicas[1].addr, haproxy.addr
    ));
    let clients = vec![Client::start(
        dir,
        &haproxy.addr,
        ZERO,
        true,
        args.rate,
        args.homes,
    )?];
    // The first answers through the whole chain before anything changes.
    let http = reqwest::Client::builder().no_proxy().build()?;
    until(
        Duration::from_secs(30),
        "a first answer through HAProxy",
        || async {
            Ok(http
                .get(format!("http://{}/homes/1", haproxy.addr))
                .header("host", format!("{ZERO}.portal.test"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success()))
        },
    )
    .await?;
    say.line("tenant zero's client reads and saves homes through HAProxy");
    Ok(Topology {
        _data: data,
        control,
        db_url,
        store,
        direct,
        legacy: legacy_chaos,
        new: new_chaos,
        replicas,
        haproxy,
        clients,
    })
}

/// `ficus db apply`, killed with SIGKILL at the schedule's backfill batch and
/// run again to completion; then every table enforced, one proved phase at a
/// time, and the probe.
async fn retrofit(
    args: &Args,
    dir: &Path,
    topo: &Topology,
    schedule: &Schedule,
    say: &Say,
    faults: &mut Vec<FaultRecord>,
) -> Result<()> {
    let c = ficus_retrofit::connect(&topo.db_url).await?;
    let inv = ficus_retrofit::inspect(&c).await?;
    let mut plan = Plan::draft(&inv, "Acme Homes", IdType::Uuid)?;
    plan.app_roles = vec!["portal_legacy".into()];
    plan.tenant_roles = vec!["portal_tenant".into()];
    let plan_path = dir.join("plan.toml");
    std::fs::write(&plan_path, plan.to_toml_explained(&inv)?)?;
    let owned = plan.owned().count();
    let apply = |dir: &Path| {
        let mut cmd = tokio::process::Command::new(&args.ficus);
        cmd.args(["db", "apply", "--json", "--execute", "--batch-time", "20ms"])
            .args(["--url", &topo.db_url])
            .arg("--plan")
            .arg(&plan_path)
            .stdout(std::process::Stdio::piped())
            .stderr(
                std::fs::File::create(dir.join("apply.err"))
                    .map_or_else(|_| std::process::Stdio::null(), std::process::Stdio::from),
            )
            .kill_on_drop(true);
        cmd
    };
    say.line(&format!(
        "ficus db apply, to be killed with SIGKILL after backfill batch {}",
        schedule.kill_backfill_after_batch
    ));
    let mut child = apply(dir).spawn().context("starting ficus db apply")?;
    let stdout = child.stdout.take().context("apply's output")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut batches = 0;
    let mut killed_at = None;
    while let Some(line) = lines.next_line().await? {
        let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if event["event"] == "backfill" && event["batch"].as_i64().is_some_and(|b| b > 0) {
            batches += 1;
            if batches == schedule.kill_backfill_after_batch {
                child.start_kill()?;
                killed_at = Some(now_ms());
                break;
            }
        }
    }
    let status = child.wait().await?;
    let Some(at) = killed_at else {
        bail!(
            "ficus db apply finished ({status}) after {batches} backfill batches, before the schedule's batch {}: give the soak more homes",
            schedule.kill_backfill_after_batch
        );
    };
    faults.push(FaultRecord::new_fixed(
        "kill -9 of ficus db apply during the backfill",
        at,
        format!("killed after backfill batch {batches} ({status})"),
    ));
    say.line(&format!(
        "   killed after backfill batch {batches}; resuming"
    ));
    let status = apply(dir).status().await?;
    if !status.success() {
        bail!(
            "the resumed ficus db apply failed ({status}); see {}",
            dir.join("apply.err").display()
        );
    }
    if let Some(f) = faults.last_mut() {
        f.what.push_str("; the second run resumed and finished");
    }
    c.batch_execute(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO portal_tenant;
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO portal_tenant;
         GRANT USAGE ON SCHEMA tenancy TO portal_tenant;
         GRANT SELECT ON tenancy.organizations TO portal_tenant;",
    )
    .await?;
    say.line("retrofit applied; enforcing row level security one table and phase at a time");
    for _ in 0..owned * 2 {
        let out = tokio::process::Command::new(&args.ficus)
            .args([
                "db",
                "enforce",
                "--next",
                "--execute",
                "--url",
                &topo.db_url,
            ])
            .arg("--plan")
            .arg(&plan_path)
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "ficus db enforce --next failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    let probe = tokio::process::Command::new(&args.ficus)
        .args(["db", "probe", "--url", &topo.db_url])
        .arg("--plan")
        .arg(&plan_path)
        .output()
        .await?;
    if !probe.status.success() {
        bail!(
            "ficus db probe found a leak: {}",
            String::from_utf8_lossy(&probe.stdout).trim()
        );
    }
    say.line("every tenant-owned table enforced; the probe finds no leak");
    Ok(())
}

async fn shadow_and_promote(topo: &Topology, zero: &TenantId, say: &Say) -> Result<()> {
    topo.direct
        .stage(
            zero,
            StageRequest {
                stage: "shadow".into(),
                reason: "soak: the parallel run".into(),
            },
            None,
        )
        .await?;
    say.line("tenant zero in shadow; waiting for the readiness gate");
    until(
        Duration::from_secs(300),
        "tenant zero's readiness",
        || async {
            Ok(topo
                .direct
                .readiness(zero, &Default::default())
                .await?
                .ready)
        },
    )
    .await?;
    topo.direct
        .promote(
            zero,
            PromoteRequest {
                reason: "soak: readiness passed".into(),
                force: false,
            },
            None,
        )
        .await?;
    say.line("tenant zero promoted through the gate");
    Ok(())
}

/// Billing events for `count` tenants numbered from `from`; with `twice`, each
/// is delivered twice, the deliveries shuffled and sent at once, alternately
/// to either replica. Returns the tenants born, once each.
#[allow(
    clippy::too_many_arguments,
    reason = "the soak's one provisioning step, called twice"
)]
async fn provision(
    topo: &Topology,
    args: &Args,
    rng: &mut Rng,
    from: usize,
    count: usize,
    twice: bool,
    say: &Say,
) -> Result<Vec<String>> {
    let http = reqwest::Client::builder().no_proxy().build()?;
    let mut deliveries = Vec::new();
    for i in from..from + count {
        let body = serde_json::json!({
            "id": format!("evt_soak_{}_{i}", args.seed),
            "type": "subscription.created",
            "data": {"customer": {"name": format!("Soak Tenant {i}")}, "domain": format!("homes.soak{i}.test")}
        })
        .to_string();
        deliveries.push(body.clone());
        if twice {
            deliveries.push(body);
        }
    }
    if twice {
        rng.shuffle(&mut deliveries);
    }
    let sends = deliveries.into_iter().enumerate().map(|(k, body)| {
        let admin = topo.replicas[k % 2].admin.clone();
        let http = http.clone();
        async move {
            let now = (now_ms() / 1000) as i64;
            let r = http
                .post(format!("http://{admin}/v1/hooks/billing"))
                .header("content-type", "application/json")
                .header(
                    SIGNATURE_HEADER,
                    sign(SECRET.as_bytes(), now, body.as_bytes()),
                )
                .body(body)
                .send()
                .await?;
            let status = r.status();
            let job: serde_json::Value = r.json().await?;
            if !status.is_success() {
                bail!("a billing event was refused: {status} {job}");
            }
            Ok::<_, anyhow::Error>(job)
        }
    });
    let jobs = futures_util::future::join_all(sends).await;
    let mut born = Vec::new();
    for job in jobs {
        let job = job?;
        if let Some(slug) = job["tenant"].as_str()
            && !born.iter().any(|b| b == slug)
        {
            born.push(slug.to_string());
        }
    }
    born.sort();
    // A tenant is usable once its organization exists in the tenant database
    // (the job's last step) and the replicas know it.
    for slug in &born {
        let url = format!("http://{}/homes", topo.haproxy.addr);
        until(
            Duration::from_secs(60),
            "a provisioned tenant's first answer",
            || async {
                Ok(http
                    .get(&url)
                    .header("host", format!("{slug}.portal.test"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success()))
            },
        )
        .await?;
    }
    say.line(&format!(
        "provisioned from billing events: {}",
        born.join(", ")
    ));
    Ok(born)
}

async fn kill_replica(topo: &mut Topology, which: usize, say: &Say) -> Result<FaultRecord> {
    let r = &mut topo.replicas[which];
    let at = now_ms();
    if let Some(p) = r.proc.as_mut() {
        p.kill9();
    }
    // Reaped: its sockets are closed from here on.
    let dead = now_ms();
    say.line(&format!("   {} killed with SIGKILL", r.name));
    tokio::time::sleep(Duration::from_secs(3)).await;
    r.start().await?;
    let mut f = FaultRecord::new(
        Fault::KillReplica,
        at,
        format!("{} killed with SIGKILL, restarted after 3 s", r.name),
    );
    f.replica = Some(r.name.clone());
    f.until_ms = Some(dead);
    Ok(f)
}

async fn term_replica(topo: &mut Topology, which: usize, say: &Say) -> Result<FaultRecord> {
    let r = &mut topo.replicas[which];
    let at = now_ms();
    let status = match r.proc.as_mut() {
        Some(p) => {
            p.signal("TERM")?;
            let p_name = p.name.clone();
            let mut taken = r.proc.take().context("the replica's process")?;
            let status = taken
                .wait_exit(Duration::from_secs(40))
                .await
                .with_context(|| format!("{p_name} did not drain"))?;
            Some(status)
        }
        None => None,
    };
    let exited = now_ms();
    let drained = status.is_some_and(|s| s.success());
    say.line(&format!("   {} drained and exited ({status:?})", r.name));
    r.start().await?;
    if !drained {
        bail!("{} did not exit 0 after SIGTERM: {status:?}", r.name);
    }
    let mut f = FaultRecord::new(
        Fault::TermReplica,
        at,
        format!(
            "{} drained in {} ms and exited 0; restarted",
            r.name,
            exited - at
        ),
    );
    f.replica = Some(r.name.clone());
    f.until_ms = Some(exited);
    Ok(f)
}

/// Stage changes every 200 ms, retried until they land, while the control
/// store's PostgreSQL stops (fast) and starts again. Each change moves tenant
/// zero from the stage the store says it is in (the guard may have rolled it
/// back since the last fault: regression, seed 2 asked shadow → shadow for a
/// minute), and the flips end with the tenant migrated.
async fn restart_store(topo: &Topology, zero: &TenantId, say: &Say) -> Result<FaultRecord> {
    let at = now_ms();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let landed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let last_refusal = Arc::new(std::sync::Mutex::new(String::new()));
    let flips = {
        let (stop, landed, refused, last_refusal) = (
            Arc::clone(&stop),
            Arc::clone(&landed),
            Arc::clone(&refused),
            Arc::clone(&last_refusal),
        );
        let store = Arc::clone(&topo.store);
        let zero = zero.clone();
        tokio::spawn(async move {
            let direct = Direct::new(Arc::clone(&store), Actor::Cli);
            loop {
                let attempt = async {
                    let Some(now) = store.tenant(&zero).await? else {
                        bail!("tenant zero is gone");
                    };
                    if stop.load(Ordering::Relaxed) && now.stage == ficus_core::Stage::Migrated {
                        return Ok(None);
                    }
                    let to = if now.stage == ficus_core::Stage::Shadow {
                        "migrated"
                    } else {
                        "shadow"
                    };
                    direct
                        .stage(
                            &zero,
                            StageRequest {
                                stage: to.into(),
                                reason: "soak: stage changes while the store restarts".into(),
                            },
                            None,
                        )
                        .await?;
                    Ok(Some(()))
                };
                match attempt.await {
                    Ok(None) => return,
                    Ok(Some(())) => {
                        landed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        *last_refusal.lock().unwrap_or_else(|p| p.into_inner()) = e.to_string();
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let control = Arc::clone(&topo.control);
    tokio::task::spawn_blocking(move || control.lock().unwrap_or_else(|p| p.into_inner()).stop())
        .await??;
    say.line("   the control store's PostgreSQL is down");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let control = Arc::clone(&topo.control);
    tokio::task::spawn_blocking(move || {
        control.lock().unwrap_or_else(|p| p.into_inner()).restart()
    })
    .await??;
    say.line("   and up again");
    let before = landed.load(Ordering::Relaxed);
    let waited = until(
        Duration::from_secs(60),
        "stage changes landing after the restart",
        || {
            let landed = Arc::clone(&landed);
            async move { Ok(landed.load(Ordering::Relaxed) >= before + 4) }
        },
    )
    .await;
    if let Err(e) = waited {
        let last = last_refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        bail!("{e}; the last refusal: {last}");
    }
    stop.store(true, Ordering::Relaxed);
    flips.await?;
    Ok(FaultRecord::new(
        Fault::RestartStore,
        at,
        format!(
            "stopped for 3 s; {} stage changes landed, {} attempts refused while it was down and retried",
            landed.load(Ordering::Relaxed),
            refused.load(Ordering::Relaxed)
        ),
    ))
}

/// One instance of the new backend answers 500 for tenant zero until the guard
/// rolls the tenant back, then hangs for 5 s; then it is mended and the tenant
/// promoted again.
async fn break_new(topo: &Topology, zero: &TenantId, say: &Say) -> Result<FaultRecord> {
    let others: Vec<(String, String)> = topo
        .direct
        .tenants(None)
        .await?
        .tenants
        .into_iter()
        .filter(|t| t.id != zero.as_str())
        .map(|t| (t.id, t.stage))
        .collect();
    // The tenant must be migrated when the fault begins: the guard may have
    // rolled it back already for an earlier fault (held requests are slow).
    let migrated =
        |t: Option<ficus_core::Tenant>| t.is_some_and(|t| t.stage == ficus_core::Stage::Migrated);
    if !migrated(topo.store.tenant(zero).await?) {
        topo.direct
            .promote(
                zero,
                PromoteRequest {
                    reason: "soak: migrated again before the next fault".into(),
                    force: true,
                },
                None,
            )
            .await?;
    }
    let last_seq =
        |events: &ficus_admin::api::EventsJson| events.events.last().map_or(0, |e| e.seq);
    let audit = |limit| {
        topo.direct.audit(ficus_admin::ops::AuditFilter {
            tenant: Some(zero.clone()),
            since: None,
            limit: Some(limit),
            ..Default::default()
        })
    };
    let before = last_seq(&audit(1).await?);
    let at = now_ms();
    topo.new[1].set(ZERO, Mode::Fail);
    // The guard's own rollback, recorded after the fault began.
    let by = loop {
        let events = audit(20).await?;
        if let Some(e) = events
            .events
            .iter()
            .find(|e| e.seq > before && e.to == "shadow")
        {
            break e.actor.clone();
        }
        if now_ms() - at > 120_000 {
            bail!("the soak waited 120 s for the guard's rollback, in vain");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let reaction = now_ms() - at;
    say.line(&format!(
        "   rolled back to shadow by {by} after {reaction} ms (seen within 100 ms)"
    ));
    topo.new[1].set(ZERO, Mode::Hang);
    tokio::time::sleep(Duration::from_secs(5)).await;
    topo.new[1].clear();
    let after: Vec<(String, String)> = topo
        .direct
        .tenants(None)
        .await?
        .tenants
        .into_iter()
        .filter(|t| t.id != zero.as_str())
        .map(|t| (t.id, t.stage))
        .collect();
    let alone = others == after;
    topo.direct
        .promote(
            zero,
            PromoteRequest {
                reason: "soak: the injected fault is over; its errors are in this hour's evidence"
                    .into(),
                force: true,
            },
            None,
        )
        .await?;
    let mut f = FaultRecord::new(
        Fault::BreakNewForTenant,
        at,
        format!(
            "new backend instance 2 answered 500 for {ZERO}; rolled back by {by} after {reaction} ms; then hung 5 s; other tenants {}; promoted again",
            if alone { "untouched" } else { "CHANGED" }
        ),
    );
    f.guard_reaction_ms = Some(reaction);
    f.tenant = Some(ZERO.into());
    f.ok = by == "guard" && alone;
    f.until_ms = Some(now_ms());
    Ok(f)
}

/// 1,000 of tenant zero's reads held in flight at the backends, the tenant's
/// stage flipped under them, then released: every one must be answered.
async fn flip_under_load(
    topo: &Topology,
    zero: &TenantId,
    dir: &Path,
    homes: u32,
    say: &Say,
) -> Result<FaultRecord> {
    const BURST: usize = 1000;
    let audit = |limit| {
        topo.direct.audit(ficus_admin::ops::AuditFilter {
            tenant: Some(zero.clone()),
            since: None,
            limit: Some(limit),
            ..Default::default()
        })
    };
    let before = audit(1).await?.events.last().map_or(0, |e| e.seq);
    let at = now_ms();
    for c in [&topo.legacy, &topo.new[0], &topo.new[1]] {
        c.set(ZERO, Mode::Hold);
    }
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(BURST)
        .build()?;
    let sends = (0..BURST).map(|i| {
        let http = http.clone();
        let url = format!(
            "http://{}/homes/{}",
            topo.haproxy.addr,
            1 + i as u32 % homes
        );
        async move {
            let id = format!("soak-burst-{at}-{i}");
            let sent_ms = now_ms();
            let r = http
                .get(&url)
                .header("host", format!("{ZERO}.portal.test"))
                .header("x-request-id", &id)
                .send()
                .await;
            let (status, error) = match r {
                Ok(r) => {
                    let s = r.status();
                    let body = r.text().await.unwrap_or_default();
                    (
                        Some(s.as_u16()),
                        (!s.is_success()).then(|| format!("{s}: {body}")),
                    )
                }
                Err(e) => (None, Some(e.to_string())),
            };
            Record {
                id,
                tenant: ZERO.into(),
                method: "GET".into(),
                path: url,
                sent_ms,
                done_ms: now_ms(),
                status,
                error,
                ack: None,
                leak: None,
            }
        }
    });
    let burst = tokio::spawn(futures_util::future::join_all(sends));
    let waiting = || -> u64 {
        [&topo.legacy, &topo.new[0], &topo.new[1]]
            .iter()
            .map(|c| c.waiting.load(Ordering::Relaxed))
            .sum()
    };
    until(
        Duration::from_secs(120),
        "1,000 requests held at the backends",
        || async { Ok(waiting() >= BURST as u64) },
    )
    .await?;
    let held = waiting();
    topo.direct
        .stage(
            zero,
            StageRequest {
                stage: "shadow".into(),
                reason: "soak: a flip under 1,000 in-flight requests".into(),
            },
            None,
        )
        .await?;
    // The replicas have followed once a new request of the tenant reaches legacy.
    let legacy_before = topo.legacy.waiting.load(Ordering::Relaxed);
    until(
        Duration::from_secs(30),
        "the replicas following the flip",
        || async { Ok(topo.legacy.waiting.load(Ordering::Relaxed) > legacy_before) },
    )
    .await?;
    for c in [&topo.legacy, &topo.new[0], &topo.new[1]] {
        c.clear();
    }
    let records = burst.await?;
    let failed = records.iter().filter(|r| !r.ok()).count();
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("burst.jsonl"))?,
        );
        for r in &records {
            writeln!(f, "{}", serde_json::to_string(r)?)?;
        }
        f.flush()?;
    }
    topo.direct
        .stage(
            zero,
            StageRequest {
                stage: "migrated".into(),
                reason: "soak: back after the flip".into(),
            },
            None,
        )
        .await?;
    // Held requests are slow answers: the guard may well have acted on them,
    // which the record says.
    let guard = audit(50)
        .await?
        .events
        .iter()
        .filter(|e| e.seq > before && e.actor == "guard")
        .count();
    say.line(&format!(
        "   {held} requests held in flight, stage flipped, released: {failed} of {BURST} failed; guard rollbacks meanwhile: {guard}"
    ));
    let mut f = FaultRecord::new(
        Fault::FlipUnderLoad,
        at,
        format!(
            "{held} requests of {ZERO} in flight when its stage flipped migrated → shadow; {failed} of the {BURST} burst failed; guard rollbacks meanwhile: {guard}"
        ),
    );
    f.ok = failed == 0;
    Ok(f)
}

/// Legacy retired once every tenant is migrated and legacy is quiet.
async fn retire(topo: &Topology, say: &Say) -> Result<()> {
    until(Duration::from_secs(120), "legacy's retirement", || async {
        match topo
            .direct
            .retire(
                RetireRequest {
                    reason: "soak: every tenant migrated, legacy quiet".into(),
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
    say.line("legacy retired");
    Ok(())
}
