//! `ficus-bench distribute [--rows N] [--secs S]`: `ficus db distribute apply`
//! on the demo database scaled to N rows (default 1,000,000: a third homes, two
//! valuations each), on a Citus cluster of a coordinator and two workers on
//! this machine.
//!
//! The demo portal's two applications write all the time, as in the test
//! `citus::the_demo_database_is_distributed_scaled_out…`: the legacy app on one
//! session (a home and its valuation per save), the tenant-aware backend on a
//! fresh session per save in globex's context. Each save's latency is kept
//! with its start, so that the saves can be told apart by the step that was
//! running: first S seconds with nothing running (the idle baseline), then
//! every step of the apply, then S seconds distributed and idle, then a third
//! worker added and the shards rebalanced onto it (`ficus db distribute
//! rebalance`'s code), then the largest tenant isolated (`isolate`'s code;
//! the apps do not retry, so an error at the split's switch-over is counted).
//! Then pgbench measures a one-tenant point query, as the tenant role in its
//! own context, on the retrofitted single node before the apply and on the
//! distributed table at the end, in the same run.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ficus_retrofit::apply::{self, Event, Options};
use ficus_retrofit::plan::{IdType, Plan};
use ficus_retrofit::{connect, enforce, inspect};
use ficus_testkit::citus::CitusCluster;

use crate::rls::field;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// One save: when it started, how long it took, whether it failed.
struct Save {
    at: Instant,
    took: Duration,
    ok: bool,
}

pub fn run(argv: &[String]) -> Result<(), Error> {
    let (rows, secs) = crate::backfill::rows_and_secs(
        &if argv.is_empty() {
            vec!["--rows".into(), "1000000".into()]
        } else {
            argv.to_vec()
        },
        20,
    )?;
    let cluster = CitusCluster::start(2, 1)?;
    let url = cluster.fresh_database("distribute")?;
    let db = url.rsplit('/').next().unwrap_or("distribute").to_string();
    let port = cluster.coordinator.port();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let (plan, zero, globex) = rt.block_on(setup(&url, port, &db, rows))?;
    eprintln!("retrofitted and enforced in {:.0?}", started.elapsed());

    let dir = tempfile::tempdir()?;
    let homes = rows / 3;
    std::fs::write(
        dir.path().join("point.sql"),
        format!(
            "\\set id random(1, {homes})\nBEGIN;\nSET LOCAL ficus.tenant_id = '{zero}';\nSELECT * FROM homes WHERE tenant_id = '{zero}' AND id = :id;\nCOMMIT;\n"
        ),
    )?;
    let pgbench = |label: &str| -> Result<(f64, f64), Error> {
        let out = Command::new(cluster.coordinator.bin_dir().join("pgbench"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "portal_tenant",
            ])
            .args([
                "-n",
                "-M",
                "prepared",
                "-c",
                "4",
                "-j",
                "2",
                "-T",
                &secs.to_string(),
            ])
            .arg("-f")
            .arg(dir.path().join("point.sql"))
            .arg(&db)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() || text.contains("aborted") {
            return Err(format!(
                "pgbench {label} failed: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        let tps = field(&text, "tps = ")?;
        let latency = field(&text, "latency average = ")?;
        eprintln!("point query {label}: {tps:.0} tps, {latency:.3} ms");
        Ok((tps, latency))
    };
    let single = pgbench("on one node")?;

    let stop = Arc::new(AtomicBool::new(false));
    let saves: Arc<Mutex<Vec<Save>>> = Arc::default();
    let app = {
        let (stop, saves, db, globex) = (stop.clone(), saves.clone(), db.clone(), globex.clone());
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .map(|rt| rt.block_on(live_app(port, db, globex, stop, saves)))
        })
    };
    let idle_from = Instant::now();
    rt.block_on(async { tokio::time::sleep(Duration::from_secs(secs)).await });
    let idle_to = Instant::now();
    let mut marks: Vec<(String, Instant, u64)> = Vec::new();
    let apply_started = Instant::now();
    rt.block_on(async {
        let mut client = connect(&url).await?;
        let mut on_event = |e: &Event| {
            if let Event::Step { step, ms, .. } = e {
                marks.push((step.clone(), Instant::now(), *ms));
            }
        };
        ficus_retrofit::distribute::apply::apply(
            &mut client,
            &url,
            &plan,
            &Options::default(),
            &mut on_event,
        )
        .await?;
        Ok::<(), Error>(())
    })?;
    let apply_took = apply_started.elapsed();
    // A third worker, then the shards rebalanced onto it while the apps go on.
    let spare = ficus_retrofit::distribute::scale::NodeAddress {
        host: "127.0.0.1".into(),
        port: cluster.spares[0].port(),
    };
    let settle_from = Instant::now();
    rt.block_on(async { tokio::time::sleep(Duration::from_secs(secs)).await });
    let settle_to = Instant::now();
    let rebalance_started = Instant::now();
    let rebalanced = rt.block_on(async {
        let c = connect(&url).await?;
        ficus_retrofit::distribute::scale::add_node(&c, &url, &spare).await?;
        Ok::<_, Error>(
            ficus_retrofit::distribute::scale::rebalance(
                &c,
                &url,
                Duration::from_millis(200),
                &mut |_| {},
            )
            .await?,
        )
    })?;
    let rebalance_took = rebalance_started.elapsed();
    // Then the largest tenant (tenant zero, which holds every loaded row) given
    // shards of its own, the apps still writing.
    let isolate_started = Instant::now();
    let isolated = rt.block_on(async {
        let c = connect(&url).await?;
        let slug: String = c
            .query_one(
                "SELECT slug FROM tenancy.organizations WHERE id::text = $1",
                &[&zero],
            )
            .await?
            .get(0);
        Ok::<_, Error>(ficus_retrofit::distribute::scale::isolate(&c, &url, &slug).await?)
    })?;
    let isolate_took = isolate_started.elapsed();
    stop.store(true, Ordering::SeqCst);
    app.join().map_err(|_| "the live app panicked")???;
    let distributed = pgbench("distributed")?;
    let routing = rt.block_on(async {
        let c = connect(&url).await?;
        Ok::<_, Error>(ficus_retrofit::distribute::apply::routing(&c, &plan).await?)
    })?;

    let saves = std::mem::take(&mut *saves.lock().map_err(|_| "poisoned")?);
    let window = |from: Instant, to: Instant| {
        let mut took: Vec<Duration> = Vec::new();
        let mut errors = 0;
        for s in saves.iter().filter(|s| s.at >= from && s.at < to) {
            if s.ok {
                took.push(s.took);
            } else {
                errors += 1;
            }
        }
        took.sort();
        let p99 = took
            .get((took.len() * 99).div_ceil(100).saturating_sub(1))
            .copied()
            .unwrap_or_default();
        (took.len(), errors, p99)
    };
    println!(
        "{rows} rows (homes {homes}, valuations {}), Citus 13.2.2, a coordinator and 2 workers on this machine (a third added for the rebalance); the live app: the legacy app on one session and the tenant-aware backend on a session per save, writing throughout\n",
        homes * 2
    );
    println!("| step | time | saves | errors | save p99 | p99 vs idle |");
    println!("|---|---|---|---|---|---|");
    let (n, e, idle_p99) = window(idle_from, idle_to);
    println!(
        "| idle baseline ({secs} s, nothing running) | | {n} | {e} | {:.1} ms | 1.00× |",
        ms(idle_p99)
    );
    // Steps under 100 ms are summed into one row.
    let mut from = apply_started;
    let (mut small_n, mut small_e, mut small_ms, mut small_steps) = (0, 0, 0u64, 0);
    for (step, at, took) in &marks {
        let (n, e, p99) = window(from, *at);
        if *took >= 100 {
            println!(
                "| `{step}` | {:.1} s | {n} | {e} | {:.1} ms | {:.2}× |",
                *took as f64 / 1000.0,
                ms(p99),
                ms(p99) / ms(idle_p99).max(0.001)
            );
        } else {
            small_n += n;
            small_e += e;
            small_ms += took;
            small_steps += 1;
        }
        from = *at;
    }
    println!(
        "| {small_steps} other steps (each under 0.1 s) | {:.1} s | {small_n} | {small_e} | | |",
        small_ms as f64 / 1000.0
    );
    let (n, e, p99) = window(apply_started, apply_started + apply_took);
    println!(
        "| **whole apply** | **{:.1} s** | {n} | **{e}** | {:.1} ms | {:.2}× |",
        apply_took.as_secs_f64(),
        ms(p99),
        ms(p99) / ms(idle_p99).max(0.001)
    );
    let (n, e, settled_p99) = window(settle_from, settle_to);
    println!(
        "| distributed, idle ({secs} s, nothing running) | | {n} | {e} | {:.1} ms | {:.2}× |",
        ms(settled_p99),
        ms(settled_p99) / ms(idle_p99).max(0.001)
    );
    let (n, e, p99) = window(rebalance_started, rebalance_started + rebalance_took);
    println!(
        "| **add a third worker and rebalance** ({} shard moves) | **{:.1} s** | {n} | **{e}** | {:.1} ms | {:.2}× ({:.2}× distributed idle) |",
        rebalanced.moves.len(),
        rebalance_took.as_secs_f64(),
        ms(p99),
        ms(p99) / ms(idle_p99).max(0.001),
        ms(p99) / ms(settled_p99).max(0.001)
    );
    let (n, e, p99) = window(isolate_started, isolate_started + isolate_took);
    println!(
        "| **isolate the largest tenant** ({}, every loaded row; shard {} on {}) | **{:.1} s** | {n} | **{e}** | {:.1} ms | {:.2}× ({:.2}× distributed idle) |",
        isolated.tenant,
        isolated.shard,
        isolated.nodes.join(", "),
        isolate_took.as_secs_f64(),
        ms(p99),
        ms(p99) / ms(idle_p99).max(0.001),
        ms(p99) / ms(settled_p99).max(0.001)
    );
    println!(
        "\n| one-tenant point query (pgbench -c 4 -j 2 -T {secs}, tenant role, SET LOCAL context) | tps | latency | ratio |"
    );
    println!("|---|---|---|---|");
    println!(
        "| one node (retrofitted, enforced) | {:.0} | {:.3} ms | 1.00× |",
        single.0, single.1
    );
    println!(
        "| distributed (coordinator + 3 workers, after the rebalance and the isolation) | {:.0} | {:.3} ms | {:.2}× the latency |",
        distributed.0,
        distributed.1,
        distributed.1 / single.1
    );
    println!(
        "\nrouting: {}",
        routing
            .iter()
            .map(|(t, n)| format!("{t} {n} shard{}", if *n == 1 { "" } else { "s" }))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The demo database at `rows` rows, retrofitted, enforced, with a second
/// tenant; returns the plan, tenant zero's id and globex's.
async fn setup(url: &str, port: u16, db: &str, rows: i64) -> Result<(Plan, String, String), Error> {
    let admin = connect(url).await?;
    admin
        .batch_execute(
            "CREATE ROLE portal_legacy LOGIN; CREATE ROLE portal_tenant LOGIN;
             GRANT ALL ON SCHEMA public TO portal_legacy;",
        )
        .await?;
    let legacy = connect(&format!("postgres://portal_legacy@127.0.0.1:{port}/{db}")).await?;
    ficus_demo::schema::load(&legacy, (rows / 3) as u32).await?;
    let mut c = admin;
    let inv = inspect(&c).await?;
    let mut plan = Plan::draft(&inv, "Acme Homes", IdType::Uuid)?;
    plan.app_roles = vec!["portal_legacy".into()];
    plan.tenant_roles = vec!["portal_tenant".into()];
    legacy
        .batch_execute(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO portal_tenant;
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO portal_tenant;",
        )
        .await?;
    apply::apply(&mut c, &plan, &inv, &Options::default(), &mut |_| {}).await?;
    let inv = inspect(&c).await?;
    while let Some(t) = enforce::next_table(&c, &plan).await? {
        enforce::step(&mut c, &plan, &inv, &t, true, true, &Options::default()).await?;
    }
    let globex = apply::add_tenant(&c, "globex", "Globex").await?;
    c.batch_execute("VACUUM ANALYZE").await?;
    Ok((plan.clone(), plan.tenant_zero.id.clone(), globex))
}

/// The two applications, saving until `stop`.
async fn live_app(
    port: u16,
    db: String,
    globex: String,
    stop: Arc<AtomicBool>,
    saves: Arc<Mutex<Vec<Save>>>,
) -> Result<(), Error> {
    let url = move |role: &str| format!("postgres://{role}@127.0.0.1:{port}/{db}");
    let legacy = {
        let (stop, saves, url) = (stop.clone(), saves.clone(), url("portal_legacy"));
        tokio::spawn(async move {
            let client = connect(&url).await?;
            while !stop.load(Ordering::SeqCst) {
                let at = Instant::now();
                let r = async {
                    let id: i64 = client
                        .query_one(
                            "INSERT INTO homes (address, city, price, bedrooms) VALUES ('1 Bench Street', 'Lyon', 200000, 2) RETURNING id",
                            &[],
                        )
                        .await?
                        .get(0);
                    client
                        .execute("INSERT INTO valuations (home_id, value) VALUES ($1, 1)", &[&id])
                        .await
                }
                .await;
                push(&saves, at, r.is_ok());
            }
            Ok::<(), Error>(())
        })
    };
    let tenant_url = url("portal_tenant");
    let tenant = tokio::spawn(async move {
        while !stop.load(Ordering::SeqCst) {
            let at = Instant::now();
            let r = async {
                let mut client = connect(&tenant_url).await.map_err(|e| e.to_string())?;
                let tx = client.transaction().await.map_err(|e| e.to_string())?;
                tx.batch_execute(&format!("SET LOCAL ficus.tenant_id = '{globex}'"))
                    .await
                    .map_err(|e| e.to_string())?;
                tx.execute(
                    "INSERT INTO homes (address, city, price, bedrooms) VALUES ('2 Bench Street', 'Porto', 300000, 3)",
                    &[],
                )
                .await
                .map_err(|e| e.to_string())?;
                tx.commit().await.map_err(|e| e.to_string())
            }
            .await;
            if let Err(e) = &r {
                eprintln!("tenant save failed: {e}");
            }
            push(&saves, at, r.is_ok());
        }
        Ok::<(), Error>(())
    });
    legacy.await??;
    tenant.await??;
    Ok(())
}

fn push(saves: &Mutex<Vec<Save>>, at: Instant, ok: bool) {
    if let Ok(mut s) = saves.lock() {
        s.push(Save {
            at,
            took: at.elapsed(),
            ok,
        });
    }
}
