//! `ficus-bench store`: the control store's numbers for BENCHMARKS.md.
//!
//! Measures, on SQLite and on a PostgreSQL cluster with durable commits:
//! - `ficus tenant import` of 100,000 tenants (the release binary, as an operator runs
//!   it), next to a raw bulk load of the same rows in the same run (prepared inserts
//!   in one SQLite transaction; `COPY` on PostgreSQL), as a ratio;
//! - change-feed latency: from the start of a committed stage change to a `ficus
//!   watch --json` process seeing it, p50/p99 over 1,000 changes.
//!
//! Prints a Markdown table. Usage: `ficus-bench store [--tenants N] [--changes N]`.

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
