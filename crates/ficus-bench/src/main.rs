//! Benchmark drivers for BENCHMARKS.md, run by `scripts/bench/*.sh`:
//!
//! - `ficus-bench store`: the control store's numbers (below);
//! - `ficus-bench rate URL --rps N --secs S [--header K:V] [--also URL2]`: a
//!   fixed-rate (open-loop) load: each request is sent at its turn whatever the
//!   others are doing, so a slow server cannot hide its queueing (no coordinated
//!   omission), and timed from its send, so the client's timer does not add its
//!   own lateness. With `--also`, `URL2` is sent the same load in the same
//!   seconds, each of its requests half a turn after one to `URL`, and a second
//!   line reports it: a stall of the host falls on both, where two runs one
//!   after the other each meet their own;
//! - `ficus-bench backend LISTEN --delay-ms N --name NAME`: a JSON backend that
//!   answers every request after a fixed delay, for runs that need a backend of known
//!   latency (the shadow benchmark's "new backend 10× slower");
//! - `ficus-bench pingora-floor LISTEN UPSTREAM [--threads N] [--allocs FILE]`: the
//!   smallest proxy pingora can be (the upstream fixed, no filters, no modules), so
//!   the cost of the framework and the cost of Ficus's own request path can be
//!   told apart;
//! - `ficus-bench hyper-floor LISTEN UPSTREAM [--threads N] [--allocs FILE]`: the
//!   same with hyper 1.x (server and pooled client), the other Rust HTTP/1 stack a
//!   data plane could stand on;
//! - `ficus-bench conn-floor LISTEN UPSTREAM [--threads N] [--allocs FILE]`: the
//!   smallest proxy on hyper's connection API (a pool and runtime per worker, a
//!   task per upstream connection, as Ficus's engine has), without hyper-util's
//!   pooled client;
//! - `ficus-bench raw-floor LISTEN UPSTREAM [--threads N] [--allocs FILE]`: the
//!   connection floor's server with a hand-written upstream client in the
//!   request's own task (bodiless requests, `Content-Length` answers only): what
//!   an upstream path of Ficus's own could save at most against hyper's client;
//! - `ficus-bench proxy CONFIG [--allocs FILE]`: `ficus proxy` itself, in this
//!   process, so that its allocations are counted;
//! - `ficus-bench propagation --legacy ADDR --new ADDR [--flips N] [--routes]
//!   [--sqlite]`: starts a PostgreSQL store (with `--sqlite`, a SQLite one) and
//!   a `ficus proxy` on it, then measures the time from a committed stage
//!   change (a tenant's, or with `--routes` a route's) to the proxy routing by
//!   it;
//! - `ficus-bench backfill [--rows N] [--secs S]`: the `ficus db` numbers (see
//!   `backfill.rs`);
//! - `ficus-bench rls [--rows N] [--secs S]`: the cost of enforced row level
//!   security for a tenant role's queries (see `rls.rs`);
//! - `ficus-bench distribute [--rows N] [--secs S]`: `ficus db distribute
//!   apply` on the demo database scaled to N rows under the live app (see
//!   `distribute.rs`);
//! - `ficus-bench provision [--events N] [--clients C]`: signed billing events
//!   to ready tenants on PostgreSQL (see `provision.rs`);
//! - `ficus-bench readiness [--comparisons N] [--mismatches M] [--classes K]`:
//!   `ficus readiness` on a PostgreSQL store holding a busy parallel run (see
//!   `readiness.rs`);
//! - `ficus-bench dashboard [--tenants N] [--comparisons M] [--loads L]`: the
//!   dashboard's pages and live updates on a PostgreSQL store of a large
//!   migration (see `dashboard.rs`);
//! - `ficus-bench seed-configs --store URL --tenants N`: tenants with written
//!   configurations and custom domains, for `scripts/bench/tenant_config.sh`.
//!
//! `ficus-bench store`:
//! Measures, on SQLite and on a PostgreSQL cluster with durable commits:
//! - `ficus tenant import` of 100,000 tenants (the release binary, as an operator runs
//!   it), next to a raw bulk load of the same rows in the same run (prepared inserts
//!   in one SQLite transaction; `COPY` on PostgreSQL), as a ratio;
//! - change-feed latency: from the start of a committed stage change to a `ficus
//!   watch --json` process seeing it, p50/p99 over 1,000 changes.
//!
//! Prints a Markdown table. Usage: `ficus-bench store [--tenants N] [--changes N]`.

/// mimalloc, as in `ficus`, counted: `--allocs FILE` reports the count for the
/// per-request allocation table (`scripts/bench/per_request.sh`). Counting is
/// two uncontended atomic additions per allocation.
#[global_allocator]
static ALLOCATOR: stats_alloc::StatsAlloc<mimalloc::MiMalloc> =
    stats_alloc::StatsAlloc::new(mimalloc::MiMalloc);

/// With `--allocs FILE`, writes the number of allocations so far (reallocations
/// included) to FILE every 100 ms, for as long as the process runs.
fn report_allocations(args: &[String]) {
    let Some(path) = flag(args, "--allocs").map(PathBuf::from) else {
        return;
    };
    std::thread::spawn(move || {
        loop {
            let stats = ALLOCATOR.stats();
            let _ = std::fs::write(&path, (stats.allocations + stats.reallocations).to_string());
            #[allow(
                clippy::disallowed_methods,
                reason = "a dedicated reporting thread, outside any runtime"
            )]
            std::thread::sleep(Duration::from_millis(100));
        }
    });
}

mod backfill;
mod conn_floor;
mod corpus;
mod dashboard;
mod distribute;
mod hyper_floor;
mod provision;
mod raw_floor;
mod readiness;
mod rls;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ficus_core::{Actor, Stage, TenantId};
use ficus_store::{ControlStore, NewTenant, OpenMode, StageChange, StoreUrl};

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    tenants: usize,
    changes: usize,
}

fn parse_args() -> Result<Args, Error> {
    let mut args = Args {
        tenants: 100_000,
        changes: 1_000,
    };
    let mut it = std::env::args().skip(1);
    match it.next().as_deref() {
        Some("store") => {}
        other => {
            return Err(format!(
                "usage: ficus-bench store [--tenants N] [--changes N] (got {other:?})"
            )
            .into());
        }
    }
    while let Some(flag) = it.next() {
        let value: usize = it.next().ok_or(format!("{flag} needs a value"))?.parse()?;
        match flag.as_str() {
            "--tenants" => args.tenants = value,
            "--changes" => args.changes = value,
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    Ok(args)
}

fn ficus_binary() -> PathBuf {
    let me = std::env::current_exe().expect("the benchmark knows where it runs from");
    me.with_file_name("ficus")
}

fn main() -> Result<(), Error> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match argv.first().map(String::as_str) {
        Some("rate") => return rate(&argv[1..]),
        Some("propagation") => return propagation(&argv[1..]),
        Some("pingora-floor") => return pingora_floor(&argv[1..]),
        Some("hyper-floor") => return hyper_floor(&argv[1..]),
        Some(which @ ("conn-floor" | "raw-floor")) => {
            return connection_floor(which, &argv[1..]);
        }
        Some("proxy") => return proxy(&argv[1..]),
        Some("backend") => return backend(&argv[1..]),
        Some("backfill") => return backfill::run(&argv[1..]),
        Some("dashboard") => return dashboard::run(&argv[1..]),
        Some("rls") => return rls::run(&argv[1..]),
        Some("distribute") => return distribute::run(&argv[1..]),
        Some("corpus") => return corpus::run(&argv[1..]),
        Some("provision") => return provision::run(&argv[1..]),
        Some("readiness") => return readiness::run(&argv[1..]),
        Some("seed-configs") => return provision::seed_configs(&argv[1..]),
        _ => {}
    }
    let args = parse_args()?;
    let ficus = ficus_binary();
    if !ficus.is_file() {
        return Err(format!(
            "{} not found; build it with `cargo build --release -p ficus`",
            ficus.display()
        )
        .into());
    }
    let dir = tempfile::tempdir()?;
    let csv = dir.path().join("tenants.csv");
    write_csv(&csv, args.tenants)?;
    // Durable commits: the numbers an operator would see in production.
    let cluster = ficus_testkit::PgCluster::start_with(&[])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    println!(
        "| store | import {} tenants (ficus) | raw bulk load, same rows | ratio | feed p50 | feed p99 | feed max | changes seen |",
        args.tenants
    );
    println!("|---|---|---|---|---|---|---|---|");
    for kind in ["sqlite", "postgres"] {
        let (store_url, peer) = match kind {
            "sqlite" => {
                let path = dir.path().join("bench.db");
                let peer_path = dir.path().join("peer.db");
                (
                    format!("sqlite:{}", path.display()),
                    sqlite_bulk_load(&peer_path, args.tenants)?,
                )
            }
            _ => {
                let url = cluster.fresh_database("bench")?;
                (url, pg_copy(&cluster, &csv)?)
            }
        };
        run(&ficus, &store_url, &["init"])?;
        let started = Instant::now();
        run(
            &ficus,
            &store_url,
            &["tenant", "import", csv.to_str().unwrap()],
        )?;
        let import = started.elapsed();
        let latencies = rt.block_on(feed_latency(&ficus, &store_url, args.changes))?;
        let seen = latencies.len();
        let (p50, p99, max) = percentiles(latencies);
        println!(
            "| {kind} | {:.2} s | {:.2} s | {:.2}× | {:.1} ms | {:.1} ms | {:.1} ms | {seen}/{} |",
            import.as_secs_f64(),
            peer.as_secs_f64(),
            import.as_secs_f64() / peer.as_secs_f64(),
            p50,
            p99,
            max,
            args.changes
        );
    }
    Ok(())
}

fn write_csv(path: &Path, n: usize) -> Result<(), Error> {
    let mut csv = String::from("id,name,stage,domains\n");
    for i in 0..n {
        let stage = ["legacy", "shadow", "migrated"][i % 3];
        csv.push_str(&format!(
            "tenant-{i:06},Tenant {i},{stage},t{i}.example.test\n"
        ));
    }
    std::fs::write(path, csv)?;
    Ok(())
}

fn run(ficus: &Path, store: &str, args: &[&str]) -> Result<(), Error> {
    let out = Command::new(ficus)
        .args(args)
        .env("FICUS_STORE", store)
        .output()?;
    if !out.status.success() {
        return Err(format!("ficus {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

/// The floor for SQLite: the same rows through one prepared statement in one
/// transaction, no validation, no audit log, no domains table.
fn sqlite_bulk_load(path: &Path, n: usize) -> Result<Duration, Error> {
    let started = Instant::now();
    let mut c = rusqlite::Connection::open(path)?;
    c.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE tenants (id TEXT PRIMARY KEY, name TEXT NOT NULL, stage TEXT NOT NULL, domain TEXT);",
    )?;
    let tx = c.transaction()?;
    {
        let mut stmt = tx.prepare("INSERT INTO tenants VALUES (?1, ?2, ?3, ?4)")?;
        for i in 0..n {
            let stage = ["legacy", "shadow", "migrated"][i % 3];
            stmt.execute(rusqlite::params![
                format!("tenant-{i:06}"),
                format!("Tenant {i}"),
                stage,
                format!("t{i}.example.test")
            ])?;
        }
    }
    tx.commit()?;
    Ok(started.elapsed())
}

/// The floor for PostgreSQL: `COPY` of the same CSV into a plain table.
fn pg_copy(cluster: &ficus_testkit::PgCluster, csv: &Path) -> Result<Duration, Error> {
    let url = cluster.fresh_database("peer")?;
    let db = url.rsplit('/').next().unwrap_or("postgres").to_string();
    cluster.psql(&db, "CREATE TABLE tenants (id text PRIMARY KEY, name text NOT NULL, stage text NOT NULL, domain text)")?;
    let started = Instant::now();
    cluster.psql(
        &db,
        &format!(
            "\\copy tenants FROM '{}' WITH (FORMAT csv, HEADER true)",
            csv.display()
        ),
    )?;
    Ok(started.elapsed())
}

/// Runs `ficus watch --json` in its own process, makes `changes` stage changes at a
/// steady pace, and returns the latency of every change the watcher reported.
async fn feed_latency(ficus: &Path, store_url: &str, changes: usize) -> Result<Vec<f64>, Error> {
    let store: Arc<dyn ControlStore> =
        ficus_store::open(&StoreUrl::parse(store_url)?, OpenMode::Existing).await?;
    let id = TenantId::parse("feed-probe")?;
    store
        .add_tenant(
            NewTenant {
                id: id.clone(),
                name: "probe".into(),
                stage: Stage::Legacy,
                domains: vec![],
            },
            Actor::Cli,
            "bench",
        )
        .await?;
    let mut watcher = Command::new(ficus)
        .args(["watch", "--json"])
        .env("FICUS_STORE", store_url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = watcher.stdout.take().ok_or("no watcher stdout")?;
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && let (Some(at), Some(version)) = (
                    v["received_at_us"].as_u64(),
                    v["tenants"][0]["version"].as_u64(),
                )
            {
                seen.push((version, at));
            }
        }
        seen
    });
    // Let the watcher open the store and take its starting position.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut started_at = Vec::with_capacity(changes);
    let mut stage = Stage::Shadow;
    for _ in 0..changes {
        let before = now_us();
        let t = store
            .change_stage(StageChange {
                tenant: id.clone(),
                to: stage,
                expected_version: None,
                actor: Actor::Cli,
                reason: "bench".into(),
            })
            .await?;
        started_at.push((t.version, before));
        stage = if stage == Stage::Shadow {
            Stage::Legacy
        } else {
            Stage::Shadow
        };
        // Paced so that consecutive changes are not coalesced into one event.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    watcher.kill()?;
    watcher.wait()?;
    let seen = reader.join().map_err(|_| "watcher reader panicked")?;
    let seen: std::collections::HashMap<u64, u64> = seen.into_iter().collect();
    Ok(started_at
        .iter()
        .filter_map(|(version, before)| {
            seen.get(version)
                .map(|at| at.saturating_sub(*before) as f64 / 1000.0)
        })
        .collect())
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let at = |p: f64| {
        v[((v.len() as f64 * p).ceil() as usize)
            .saturating_sub(1)
            .min(v.len() - 1)]
    };
    (at(0.50), at(0.99), v[v.len() - 1])
}

/// Reads `--name value` pairs after positional arguments.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.windows(2)
        .find(|w| w[0] == name)
        .map(|w| w[1].as_str())
}

/// Fixed-rate load: one request every 1/rps seconds for `secs`, each on its own task,
/// latency measured from its send. Prints one JSON line per URL: its latencies,
/// and its failures counted by kind, with the first message of each.
fn rate(args: &[String]) -> Result<(), Error> {
    let url = args.first().ok_or("rate needs a URL")?.clone();
    let rps: u64 = flag(args, "--rps").unwrap_or("1000").parse()?;
    let secs: u64 = flag(args, "--secs").unwrap_or("10").parse()?;
    let header = flag(args, "--header").map(|h| {
        h.split_once(':')
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
    });
    let urls: Vec<String> = std::iter::once(url)
        .chain(flag(args, "--also").map(str::to_string))
        .collect();
    // One thread paces and sends: no cross-thread wake-up between a request's
    // turn and its send.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let client = reqwest::Client::builder().pool_max_idle_per_host(512).timeout(Duration::from_secs(10)).build()?;
        let total = rps * secs * urls.len() as u64;
        // Each URL is sent `rps` a second, their turns taken in order.
        let interval = Duration::from_nanos(1_000_000_000 / (rps.max(1) * urls.len() as u64));
        let start = tokio::time::Instant::now();
        let mut tasks = Vec::with_capacity(total as usize);
        for i in 0..total {
            let scheduled = start + interval * i as u32;
            tokio::time::sleep_until(scheduled).await;
            let which = i as usize % urls.len();
            let mut req = client.get(&urls[which]);
            if let Some(Some((k, v))) = &header {
                req = req.header(k.as_str(), v.as_str());
            }
            // Timed from the send, not from the turn: tokio's timer wakes up
            // to a millisecond late, which timed from the turn put about a
            // millisecond into every row's p50, direct's too, and hid what a
            // proxy adds. The load stays open-loop all the same: each request
            // is sent at its turn on a connection of its own choosing, and
            // none waits for another's answer.
            let sent = std::time::Instant::now();
            tasks.push(tokio::spawn(async move {
                // A failure is told by its kind, and the first of each kind
                // by its message: a count alone does not say whose it was.
                let failed = match req.send().await {
                    Ok(r) if r.status().is_success() => None,
                    Ok(r) => Some((format!("status {}", r.status().as_u16()), String::new())),
                    Err(e) => {
                        let kind = if e.is_timeout() {
                            "timeout"
                        } else if e.is_connect() {
                            "connect"
                        } else if e.is_request() {
                            "request"
                        } else if e.is_body() {
                            "body"
                        } else {
                            "other"
                        };
                        // The error and its causes, each as it tells itself:
                        // anyhow's alternate form writes `error: cause: cause`.
                        Some((kind.to_string(), format!("{:#}", anyhow::Error::new(e))))
                    }
                };
                (which, failed, sent.elapsed().as_secs_f64() * 1000.0)
            }));
        }
        let mut latencies = vec![Vec::with_capacity(tasks.len() / urls.len()); urls.len()];
        let mut errors = vec![std::collections::BTreeMap::<String, (u64, String)>::new(); urls.len()];
        for t in tasks {
            let (which, failed, ms) = t.await?;
            if let Some((kind, message)) = failed {
                errors[which].entry(kind).or_insert((0, message)).0 += 1;
            }
            latencies[which].push(ms);
        }
        for (mut latencies, errors) in latencies.into_iter().zip(errors) {
            latencies.sort_by(f64::total_cmp);
            let at = |p: f64| latencies[((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1).min(latencies.len() - 1)];
            let total: u64 = errors.values().map(|(n, _)| n).sum();
            let kinds: serde_json::Map<String, serde_json::Value> = errors
                .into_iter()
                .map(|(kind, (n, first))| (kind, serde_json::json!({"count": n, "first": first})))
                .collect();
            println!(
                "{}",
                serde_json::json!({"requests": latencies.len(), "errors": total, "error_kinds": kinds, "p50_ms": at(0.50), "p99_ms": at(0.99), "p999_ms": at(0.999), "max_ms": latencies[latencies.len() - 1]})
            );
        }
        Ok::<(), Error>(())
    })
}

/// Flips a tenant between legacy and migrated `flips` times and measures how long
/// a running proxy takes to route by each change. Prints one JSON line.
fn propagation(args: &[String]) -> Result<(), Error> {
    let legacy = flag(args, "--legacy").ok_or("--legacy ADDR is required")?;
    let new = flag(args, "--new").ok_or("--new ADDR is required")?;
    let flips: usize = flag(args, "--flips").unwrap_or("100").parse()?;
    // With --routes, the tenant is migrated and the stage that flips is the
    // route `POST /`'s: released, then held again.
    let routes = args.iter().any(|a| a == "--routes");
    let dir = tempfile::tempdir()?;
    // Kept until the end: the cluster stops when it is dropped.
    let mut cluster = None;
    let store_url = if args.iter().any(|a| a == "--sqlite") {
        format!("sqlite:{}", dir.path().join("ficus.db").display())
    } else {
        cluster
            .insert(ficus_testkit::PgCluster::start_with(&[])?)
            .url("postgres")
    };
    let ficus = ficus_binary();
    run(&ficus, &store_url, &["init"])?;
    let stage = if routes { "migrated" } else { "legacy" };
    run(
        &ficus,
        &store_url,
        &["tenant", "add", "flip", "--stage", stage],
    )?;
    let port = |l: std::net::TcpListener| l.local_addr().map(|a| a.port());
    let (listen, admin) = (
        port(std::net::TcpListener::bind("127.0.0.1:0")?)?,
        port(std::net::TcpListener::bind("127.0.0.1:0")?)?,
    );
    let config = dir.path().join("ficus.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = [\"127.0.0.1:{listen}\"]\nadmin_listen = \"127.0.0.1:{admin}\"\nstore = \"{store_url}\"\nthreads = 1\ndrain_delay_ms = 0\n\
             [backends.legacy]\nupstreams = [\"{legacy}\"]\n[backends.new]\nupstreams = [\"{new}\"]\n[[tenant_from]]\nheader = \"X-Tenant-Id\"\n"
        ),
    )?;
    let mut child = Command::new(&ficus)
        .args(["proxy", "--config"])
        .arg(&config)
        .stderr(Stdio::null())
        .spawn()?;
    let proxy = format!("http://127.0.0.1:{listen}");
    let result = propagation_flips(
        &proxy,
        &format!("http://127.0.0.1:{admin}/readyz"),
        &store_url,
        flips,
        routes,
    );
    let _ = child.kill();
    let _ = child.wait();
    drop(cluster);
    result
}

fn propagation_flips(
    proxy: &str,
    readyz: &str,
    store_url: &str,
    flips: usize,
    routes: bool,
) -> Result<(), Error> {
    let (proxy, readyz, store_url) = (proxy.to_string(), readyz.to_string(), store_url.to_string());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let store = ficus_store::open(&StoreUrl::parse(&store_url)?, OpenMode::Existing).await?;
        let id = TenantId::parse("flip")?;
        let client = reqwest::Client::new();
        let ready_by = Instant::now() + Duration::from_secs(30);
        while !matches!(client.get(&readyz).send().await, Ok(r) if r.status() == 200) {
            if Instant::now() > ready_by {
                return Err("the proxy did not become ready".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let backend_now = |client: reqwest::Client, proxy: String| async move {
            let url = format!("{proxy}/");
            let request = if routes { client.post(url) } else { client.get(url) };
            let r = request.header("x-tenant-id", "flip").send().await.ok()?;
            r.text().await.ok()
        };
        let route = ficus_core::Route::parse("POST /")?;
        let mut latencies = Vec::with_capacity(flips);
        for i in 0..flips {
            // legacy -> shadow is routed the same; go through shadow to reach migrated.
            let (to, want) = if i % 2 == 0 {
                (vec![Stage::Shadow, Stage::Migrated], "new")
            } else {
                (vec![Stage::Legacy], "legacy")
            };
            let mut started = Instant::now();
            if routes {
                store
                    .change_route(ficus_store::RouteChange {
                        route: route.clone(),
                        tenant: None,
                        to: if want == "new" { Stage::Migrated } else { Stage::Legacy },
                        expected_version: None,
                        actor: Actor::Cli,
                        reason: "bench".into(),
                    })
                    .await?;
            } else {
                for (n, stage) in to.iter().enumerate() {
                    if n + 1 == to.len() {
                        started = Instant::now();
                    }
                    store
                        .change_stage(StageChange {
                            tenant: id.clone(),
                            to: *stage,
                            expected_version: None,
                            actor: Actor::Cli,
                            reason: "bench".into(),
                        })
                        .await?;
                }
            }
            loop {
                if backend_now(client.clone(), proxy.clone())
                    .await
                    .is_some_and(|b| b.contains(want))
                {
                    latencies.push(started.elapsed().as_secs_f64() * 1000.0);
                    break;
                }
                if started.elapsed() > Duration::from_secs(10) {
                    return Err("a stage change did not reach the proxy within 10 s".into());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (p50, p99, max) = percentiles(latencies);
        println!(
            "{}",
            serde_json::json!({"what": if routes { "route stage" } else { "tenant stage" }, "flips": flips, "p50_ms": p50, "p99_ms": p99, "max_ms": max})
        );
        Ok::<(), Error>(())
    })
}

/// A proxy that forwards everything to one upstream and does nothing else.
struct Floor {
    upstream: std::net::SocketAddr,
}

#[async_trait::async_trait]
impl pingora_proxy::ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    /// None: the default's disabled compression module is work a floor skips.
    fn init_downstream_modules(&self, _modules: &mut pingora_core::modules::http::HttpModules) {}

    async fn upstream_peer(
        &self,
        _session: &mut pingora_proxy::Session,
        _ctx: &mut (),
    ) -> pingora_error::Result<Box<pingora_core::upstreams::peer::HttpPeer>> {
        Ok(Box::new(pingora_core::upstreams::peer::HttpPeer::new(
            self.upstream,
            false,
            String::new(),
        )))
    }
}

fn pingora_floor(args: &[String]) -> Result<(), Error> {
    let listen = args
        .first()
        .ok_or("pingora-floor needs LISTEN and UPSTREAM")?;
    let upstream: std::net::SocketAddr = args
        .get(1)
        .ok_or("pingora-floor needs LISTEN and UPSTREAM")?
        .parse()?;
    let conf = pingora_core::server::configuration::ServerConf {
        threads: flag(args, "--threads").unwrap_or("1").parse()?,
        // A benchmark's floor stops at once: pingora otherwise waits five
        // minutes on SIGTERM for connections to end, and `proxy.sh` with it.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    report_allocations(args);
    let mut server = pingora_core::server::Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = pingora_proxy::http_proxy_service(&server.configuration, Floor { upstream });
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever();
}

/// The smallest HTTP/1 proxy hyper 1.x makes: a server connection per client
/// connection, each request sent on through one pooled client to a fixed
/// upstream, the answer streamed back. No filters, no timeouts beyond hyper's.
fn hyper_floor(args: &[String]) -> Result<(), Error> {
    let listen: std::net::SocketAddr = args
        .first()
        .ok_or("hyper-floor needs LISTEN and UPSTREAM")?
        .parse()?;
    let upstream: std::net::SocketAddr = args
        .get(1)
        .ok_or("hyper-floor needs LISTEN and UPSTREAM")?
        .parse()?;
    let threads: usize = flag(args, "--threads").unwrap_or("1").parse()?;
    report_allocations(args);
    hyper_floor::serve(listen, upstream, threads, |client, base, _, mut req| {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let uri: Result<hyper::Uri, _> = format!("{base}{path}").parse();
        async move {
            let Ok(uri) = uri else {
                return hyper_floor::refuse(400, "invalid path");
            };
            *req.uri_mut() = uri;
            match client.request(req).await {
                Ok(r) => r.map(http_body_util::Either::Left),
                Err(e) => hyper_floor::refuse(502, &e.to_string()),
            }
        }
    })
}

/// The smallest proxies on hyper's connection API: with hyper's client
/// ([`conn_floor`]), or with an upstream client of its own ([`raw_floor`]).
fn connection_floor(which: &str, args: &[String]) -> Result<(), Error> {
    let (Some(listen), Some(upstream)) = (args.first(), args.get(1)) else {
        return Err(format!("{which} needs LISTEN and UPSTREAM").into());
    };
    let threads: usize = flag(args, "--threads").unwrap_or("1").parse()?;
    report_allocations(args);
    let (listen, upstream) = (listen.parse()?, upstream.parse()?);
    if which == "raw-floor" {
        raw_floor::serve(listen, upstream, threads)
    } else {
        conn_floor::serve(listen, upstream, threads)
    }
}

/// `ficus proxy` in this process, with its allocations counted.
fn proxy(args: &[String]) -> Result<(), Error> {
    let config = args.first().ok_or("proxy needs CONFIG")?;
    report_allocations(args);
    ficus_proxy::run(Path::new(config))?;
    Ok(())
}

fn backend(args: &[String]) -> Result<(), Error> {
    let listen: std::net::SocketAddr = args.first().ok_or("backend needs LISTEN")?.parse()?;
    let delay = Duration::from_millis(flag(args, "--delay-ms").unwrap_or("0").parse()?);
    let name = flag(args, "--name").unwrap_or("backend").to_string();
    let body =
        format!(r#"{{"backend":"{name}","homes":[{{"id":1,"city":"Lisbon","price":420000}}]}}"#);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let app = axum::Router::new().fallback(move || {
            let body = body.clone();
            async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    body,
                )
            }
        });
        let listener = tokio::net::TcpListener::bind(listen).await?;
        axum::serve(listener, app).await?;
        Ok::<(), Error>(())
    })
}
