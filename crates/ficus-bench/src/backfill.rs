//! `ficus-bench backfill [--rows N] [--secs S]`: the `ficus db` numbers.
//!
//! On a fresh PostgreSQL cluster with durable commits:
//! 1. backfill speed: Ficus's batched backfill of N rows next to one naive
//!    `UPDATE … SET tenant_id = …` of an identical table, each while an OLTP
//!    workload (point reads and updates on the same table and on another one) runs;
//!    rows/s of each, WAL per row, and the workload's p99 (during Ficus's backfill
//!    step) as a ratio to its idle baseline; plus the naive update of a table the
//!    workload does not touch, the server's own floor for that p99;
//! 2. the lock queue: a reader holds the table for 4 s; a plain `ALTER TABLE` then
//!    queues behind it and every point query queues behind the `ALTER`, while Ficus
//!    gives up after its lock timeout and retries; the worst point-query wait of each;
//! 3. `instant` vs batched: time and table size after.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ficus_core::latency::{Histogram, format_micros};
use ficus_retrofit::apply::{self, Event, Options};
use ficus_retrofit::inspect::Class;
use ficus_retrofit::plan::{Backfill, IdType, Plan, StepKind};
use ficus_retrofit::{backfill, connect, inspect};

type Error = Box<dyn std::error::Error + Send + Sync>;

const ZERO: &str = "7a1c0e2e-1111-4a4a-8b8b-000000000000";

/// `--rows N` (default 10 million) and `--secs S`, the flags of the
/// PostgreSQL benchmarks.
pub fn rows_and_secs(argv: &[String], default_secs: u64) -> Result<(i64, u64), Error> {
    let mut rows: i64 = 10_000_000;
    let mut secs = default_secs;
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--rows" => rows = value.parse()?,
            "--secs" => secs = value.parse()?,
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    Ok((rows, secs))
}

pub fn run(argv: &[String]) -> Result<(), Error> {
    // `--batch-time MS` is this benchmark's own flag: the backfill's target.
    let mut rest = Vec::new();
    let mut batch = backfill::Options::default().target_batch;
    let mut ceiling = None;
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        if a == "--batch-time" {
            let ms: u64 = it
                .next()
                .ok_or("--batch-time needs milliseconds")?
                .parse()?;
            batch = Duration::from_millis(ms);
        } else if a == "--max-rows-per-sec" {
            ceiling = Some(
                it.next()
                    .ok_or("--max-rows-per-sec needs a number")?
                    .parse()?,
            );
        } else {
            rest.push(a.clone());
        }
    }
    let (rows, secs) = rows_and_secs(&rest, 10)?;
    let cluster = ficus_testkit::PgCluster::start_with(&[
        ("shared_buffers", "1GB"),
        ("max_wal_size", "8GB"),
        ("checkpoint_timeout", "30min"),
    ])?;
    let url = cluster.fresh_database("bench")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bench(&url, rows, Duration::from_secs(secs), batch, ceiling))
}

async fn setup(url: &str, rows: i64) -> Result<(), Error> {
    let c = connect(url).await?;
    for t in ["bench_ficus", "bench_naive", "bench_floor", "bench_instant"] {
        let n = if t == "bench_instant" {
            rows / 10
        } else {
            rows
        };
        c.batch_execute(&format!(
            "CREATE TABLE {t} (id bigint PRIMARY KEY, account int NOT NULL, payload text NOT NULL, amount numeric(12,2));
             INSERT INTO {t} SELECT g, g % 100000, md5(g::text), g % 1000 FROM generate_series(1, {n}) g;"
        ))
        .await?;
        c.batch_execute(&format!("VACUUM ANALYZE {t}")).await?;
    }
    c.batch_execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
         INSERT INTO accounts SELECT g, 0 FROM generate_series(1, 100000) g;",
    )
    .await?;
    c.batch_execute("VACUUM ANALYZE accounts").await?;
    // A server in service recycles its WAL segments; a fresh one has to create
    // and zero-fill each new one while holding the WAL write lock, which every
    // commit then waits for. A checkpoint after the load recycles what the load
    // wrote, so the runs below see a server in its steady state.
    c.batch_execute("CHECKPOINT").await?;
    Ok(())
}

/// The OLTP workload: 4 clients, each a point read and a point update on `table`
/// and an update on `accounts` per transaction, every latency recorded in the
/// histogram of the phase the run was in when the transaction started.
async fn workload(
    url: &str,
    table: &str,
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicUsize>,
    rows: i64,
) -> [Histogram; 3] {
    let mut tasks = Vec::new();
    for w in 0..4i64 {
        let (url, table, stop) = (url.to_string(), table.to_string(), Arc::clone(&stop));
        let phase = Arc::clone(&phase);
        tasks.push(tokio::spawn(async move {
            let c = connect(&url).await.expect("the workload connects");
            let read = c
                .prepare(&format!("SELECT amount FROM {table} WHERE id = $1"))
                .await
                .expect("prepares");
            let write = c
                .prepare(&format!(
                    "UPDATE {table} SET amount = amount + 1 WHERE id = $1"
                ))
                .await
                .expect("prepares");
            let acct = c
                .prepare("UPDATE accounts SET balance = balance + 1 WHERE id = $1")
                .await
                .expect("prepares");
            let mut h: [Histogram; 3] = Default::default();
            let mut x: i64 = 7919 * (w + 1);
            while !stop.load(Ordering::Relaxed) {
                x = (x * 48271) % 2_147_483_647;
                let id = 1 + x % rows;
                let p = phase.load(Ordering::Relaxed).min(2);
                let t = Instant::now();
                let _ = c.query_opt(&read, &[&id]).await;
                let _ = c.execute(&write, &[&id]).await;
                let _ = c.execute(&acct, &[&((1 + x % 100_000) as i32)]).await;
                h[p].record(t.elapsed().as_micros() as u64);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            h
        }));
    }
    let mut all: [Histogram; 3] = Default::default();
    for t in tasks {
        if let Ok(h) = t.await {
            for (a, h) in all.iter_mut().zip(&h) {
                a.merge(h);
            }
        }
    }
    all
}

/// Runs `work` with the workload going; `phase` moves the workload's records
/// from one histogram to the next (0 when `work` does not set it).
async fn with_workload<F, T>(
    url: &str,
    table: &str,
    rows: i64,
    phase: Arc<AtomicUsize>,
    work: F,
) -> Result<(T, [Histogram; 3]), Error>
where
    F: std::future::Future<Output = Result<T, Error>>,
{
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let (url, table, stop) = (url.to_string(), table.to_string(), Arc::clone(&stop));
        let phase = Arc::clone(&phase);
        async move { workload(&url, &table, stop, phase, rows).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = work.await;
    stop.store(true, Ordering::Relaxed);
    let h = load.await?;
    Ok((out?, h))
}

/// The server's WAL position, to count the WAL a run wrote.
struct Lsn<'a>(&'a tokio_postgres::Client);

impl Lsn<'_> {
    async fn now(&self) -> Result<String, Error> {
        Ok(self
            .0
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?
            .get(0))
    }

    /// Bytes of WAL written since `from`.
    async fn since(&self, from: String) -> Result<i64, Error> {
        Ok(self
            .0
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::int8",
                &[&from],
            )
            .await?
            .get(0))
    }
}

fn p99(h: &Histogram) -> u64 {
    h.quantile_micros(0.99).unwrap_or(0)
}

async fn bench(
    url: &str,
    rows: i64,
    idle: Duration,
    batch: Duration,
    ceiling: Option<u64>,
) -> Result<(), Error> {
    let options = Options {
        backfill: backfill::Options {
            target_batch: batch,
            max_rows_per_sec: ceiling,
            ..backfill::Options::default()
        },
        ..Options::default()
    };
    eprintln!("loading {rows} rows into each table…");
    setup(url, rows).await?;
    // The idle baseline.
    let no_phases = || Arc::new(AtomicUsize::new(0));
    let (_, [base, _, _]) = with_workload(url, "bench_naive", rows, no_phases(), async {
        tokio::time::sleep(idle).await;
        Ok(())
    })
    .await?;
    // The naive update, as one statement; then the same update of a table the
    // workload does not touch, which is what the server alone (its WAL, its
    // CPU) does to the workload at full speed, with no row lock in the way.
    eprintln!("naive UPDATE…");
    let naive = |table: &'static str| async move {
        let c = connect(url).await?;
        c.batch_execute(&format!("ALTER TABLE {table} ADD COLUMN tenant_id uuid"))
            .await?;
        let lsn = Lsn(&c);
        let (t, from) = (Instant::now(), lsn.now().await?);
        c.batch_execute(&format!("UPDATE {table} SET tenant_id = '{ZERO}'"))
            .await?;
        let secs = t.elapsed().as_secs_f64();
        Ok((secs, lsn.since(from).await?))
    };
    let ((naive_secs, naive_wal), [naive_h, _, _]) =
        with_workload(url, "bench_naive", rows, no_phases(), naive("bench_naive")).await?;
    // Each update left a dead copy of every row; autovacuum would clean it up
    // during the next run and its WAL would be counted against that run. Vacuum
    // now, outside the measurements, and checkpoint as after the load.
    let settle = |table: &'static str| async move {
        let c = connect(url).await?;
        c.batch_execute(&format!("VACUUM {table}")).await?;
        c.batch_execute("CHECKPOINT").await?;
        Ok::<(), Error>(())
    };
    settle("bench_naive").await?;
    eprintln!("naive UPDATE of a table the workload does not touch…");
    let ((floor_secs, _), [floor_h, _, _]) =
        with_workload(url, "bench_ficus", rows, no_phases(), naive("bench_floor")).await?;
    settle("bench_floor").await?;
    // Ficus: the plan's steps for bench_ficus only; the workload's phase 1 is
    // the backfill step itself, 0 and 2 the steps before and after.
    eprintln!("ficus db apply…");
    let phase = Arc::new(AtomicUsize::new(0));
    let ((ficus_secs, ficus_wal), ficus_phases) =
        with_workload(url, "bench_ficus", rows, Arc::clone(&phase), async {
            let mut c = connect(url).await?;
            let inv = inspect(&c).await?;
            let mut plan = Plan::draft(&inv, "Bench", IdType::Uuid)?;
            plan.tenant_zero.id = ZERO.into();
            for t in &mut plan.tables {
                if t.name != "bench_ficus" {
                    t.class = Class::Shared;
                }
            }
            let only = |kind| Options {
                only: Some(kind),
                ..options.clone()
            };
            for kind in [StepKind::Spine, StepKind::Column, StepKind::Default] {
                apply::apply(&mut c, &plan, &inv, &only(kind), &mut |_: &Event| {}).await?;
            }
            phase.store(1, Ordering::Relaxed);
            let from = Lsn(&c).now().await?;
            let t = Instant::now();
            let mut keyset_secs = 0.0;
            let mut on = |e: &Event| {
                if let Event::Backfill(p) = e
                    && p.phase == "keyset"
                {
                    keyset_secs = t.elapsed().as_secs_f64();
                }
            };
            apply::apply(&mut c, &plan, &inv, &only(StepKind::Backfill), &mut on).await?;
            let secs = t.elapsed().as_secs_f64();
            eprintln!(
                "backfill: keyset pass {keyset_secs:.1} s, catch-up {:.1} s",
                secs - keyset_secs
            );
            let wal = Lsn(&c).since(from).await?;
            phase.store(2, Ordering::Relaxed);
            apply::apply(&mut c, &plan, &inv, &options, &mut |_: &Event| {}).await?;
            Ok((secs, wal))
        })
        .await?;
    println!("### Backfill of {rows} rows under an OLTP workload\n");
    println!(
        "| run | time | rows/s | vs naive | WAL per row | workload p99 | p99 vs idle | workload max | workload transactions/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let max = |h: &Histogram| format_micros(h.quantile_micros(1.0).unwrap_or(0));
    let tps = |h: &Histogram, secs: f64| h.total() as f64 / (secs + 0.5);
    println!(
        "| idle workload (no backfill) | | | | | {} | 1.00× | {} | {:.0} |",
        format_micros(p99(&base)),
        max(&base),
        tps(&base, idle.as_secs_f64())
    );
    let ratio = |h: &Histogram| p99(h) as f64 / p99(&base).max(1) as f64;
    let ficus_h = &ficus_phases[1];
    let mut whole = Histogram::default();
    for h in &ficus_phases {
        whole.merge(h);
    }
    println!(
        "| naive `UPDATE … SET tenant_id` | {naive_secs:.1} s | {:.0} | 1.00× | {} B | {} | {:.2}× | {} | {:.0} |",
        rows as f64 / naive_secs,
        naive_wal / rows,
        format_micros(p99(&naive_h)),
        ratio(&naive_h),
        max(&naive_h),
        tps(&naive_h, naive_secs)
    );
    println!(
        "| the same naive `UPDATE` of a table the workload does not touch | {floor_secs:.1} s | {:.0} | {:.2}× | | {} | {:.2}× | {} | {:.0} |",
        rows as f64 / floor_secs,
        naive_secs / floor_secs,
        format_micros(p99(&floor_h)),
        ratio(&floor_h),
        max(&floor_h),
        tps(&floor_h, floor_secs)
    );
    println!(
        "| ficus batched backfill | {ficus_secs:.1} s | {:.0} | {:.2}× | {} B | {} | {:.2}× | {} | {:.0} |",
        rows as f64 / ficus_secs,
        naive_secs / ficus_secs,
        ficus_wal / rows,
        format_micros(p99(ficus_h)),
        ratio(ficus_h),
        max(ficus_h),
        tps(ficus_h, ficus_secs)
    );
    println!(
        "| (the whole `ficus db apply`, spine to tighten) | | | | | {} | {:.2}× | {} | |",
        format_micros(p99(&whole)),
        ratio(&whole),
        max(&whole),
    );
    lock_queue(url).await?;
    instant(url, rows / 10).await?;
    Ok(())
}

/// Point queries on `accounts` while `ddl` runs behind a 4 s reader; the worst wait.
async fn worst_wait_behind_reader(
    url: &str,
    ddl: impl std::future::Future<Output = Result<(), Error>>,
) -> Result<Duration, Error> {
    let reader = connect(url).await?;
    reader
        .batch_execute("BEGIN; SELECT count(*) FROM accounts;")
        .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let probe = tokio::spawn({
        let (url, stop) = (url.to_string(), Arc::clone(&stop));
        async move {
            let c = connect(&url).await.expect("the probe connects");
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let _ = c
                    .query_opt("SELECT balance FROM accounts WHERE id = 42", &[])
                    .await;
                worst = worst.max(t.elapsed());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            worst
        }
    });
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let _ = reader.batch_execute("COMMIT").await;
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = ddl.await;
    release.await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    Ok(probe.await?)
}

async fn lock_queue(url: &str) -> Result<(), Error> {
    let plain = worst_wait_behind_reader(url, async {
        let c = connect(url).await?;
        c.batch_execute("ALTER TABLE accounts ADD COLUMN plain_col int")
            .await?;
        Ok(())
    })
    .await?;
    let ficus = worst_wait_behind_reader(url, async {
        let mut c = connect(url).await?;
        let inv = inspect(&c).await?;
        let mut plan = Plan::draft(&inv, "Bench", IdType::Uuid)?;
        plan.tenant_zero.id = ZERO.into();
        for t in &mut plan.tables {
            if t.name != "accounts" {
                t.class = Class::Shared;
            }
        }
        let opts = Options {
            attempts: 20,
            ..Options::default()
        };
        apply::apply(&mut c, &plan, &inv, &opts, &mut |_: &Event| {}).await?;
        Ok(())
    })
    .await?;
    println!("\n### The lock queue: point queries behind a 4 s reader\n");
    println!("| DDL issued while a reader holds the table for 4 s | worst point-query wait |");
    println!("|---|---|");
    println!(
        "| plain `ALTER TABLE … ADD COLUMN` | {} |",
        format_micros(plain.as_micros() as u64)
    );
    println!(
        "| `ficus db apply` (lock_timeout 500 ms, retries) | {} |",
        format_micros(ficus.as_micros() as u64)
    );
    Ok(())
}

async fn instant(url: &str, rows: i64) -> Result<(), Error> {
    let c = connect(url).await?;
    c.batch_execute(
        "CREATE TABLE bench_batched AS SELECT * FROM bench_instant; ALTER TABLE bench_batched ADD PRIMARY KEY (id);",
    )
    .await?;
    c.batch_execute("VACUUM ANALYZE bench_batched").await?;
    let size = |t: &'static str| {
        let c = &c;
        async move {
            c.query_one(&format!("SELECT pg_total_relation_size('{t}')"), &[])
                .await
                .map(|r| r.get::<_, i64>(0))
        }
    };
    let before = size("bench_batched").await?;
    let mut results = Vec::new();
    for (table, mode) in [
        ("bench_batched", Backfill::Batched),
        ("bench_instant", Backfill::Instant),
    ] {
        let mut c = connect(url).await?;
        let inv = inspect(&c).await?;
        let mut plan = Plan::draft(&inv, "Bench", IdType::Uuid)?;
        plan.tenant_zero.id = ZERO.into();
        for t in &mut plan.tables {
            if t.name != table {
                t.class = Class::Shared;
            }
            t.backfill = mode;
        }
        let mut column_and_backfill = 0u64;
        let mut on = |e: &Event| {
            if let Event::Step { step, ms, .. } = e
                && (step.starts_with("backfill:") || step.starts_with("column:"))
            {
                column_and_backfill += *ms;
            }
        };
        let opts = Options {
            backfill: backfill::Options::default(),
            ..Options::default()
        };
        apply::apply(&mut c, &plan, &inv, &opts, &mut on).await?;
        results.push((table, column_and_backfill, size(table).await?));
    }
    println!("\n### `instant` vs batched backfill, {rows} rows\n");
    println!(
        "| mode | column + backfill time | table size after (before: {} MB) |",
        before / 1_048_576
    );
    println!("|---|---|---|");
    for (table, ms, bytes) in results {
        println!(
            "| {} | {:.2} s | {} MB |",
            if table == "bench_instant" {
                "instant (`ADD COLUMN … DEFAULT`)"
            } else {
                "batched"
            },
            ms as f64 / 1000.0,
            bytes / 1_048_576
        );
    }
    Ok(())
}
