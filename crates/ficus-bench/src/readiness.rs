//! `ficus-bench readiness [--comparisons N] [--mismatches M] [--classes K]
//! [--tenants T] [--runs R]`: how long `ficus readiness TENANT` takes on a
//! PostgreSQL store holding a busy parallel run.
//!
//! One cluster with durable commits holds the store. Evidence is written the
//! way proxies write it (`record_comparisons`, one report per hour of a day):
//! the judged tenant gets N comparisons over 20 endpoints and two versions of
//! new, and M mismatches spread over K classes (a sample kept for each, pruned
//! as the store prunes them); a quarter of the classes are resolved and a tenth
//! accepted, so every epoch and state is read. T-1 other tenants get a hundredth
//! of that each, so the tables are not the tenant's alone.
//!
//! Then R runs of the release binary `ficus readiness TENANT --json` (process
//! start, store open, every query, the verdict), next to R runs of `ficus tenant
//! show TENANT --json` in the same go: the floor of any command on this store.

use std::process::Command;
use std::time::Instant;

use ficus_core::latency::{Histogram, format_micros};
use ficus_core::reconcile::ClassState;
use ficus_core::{Actor, Stage, TenantId, Timestamp};
use ficus_store::{
    ClassChange, ClassCount, ComparisonCount, Evidence, MismatchSample, NewTenant, OpenMode,
    StoreUrl,
};

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    comparisons: u64,
    mismatches: u64,
    classes: u64,
    tenants: u64,
    runs: usize,
}

const ENDPOINTS: u64 = 20;
const HOURS: i64 = 24;

pub fn run(argv: &[String]) -> Result<(), Error> {
    let mut a = Args {
        comparisons: 1_000_000,
        mismatches: 10_000,
        classes: 200,
        tenants: 100,
        runs: 30,
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let value: u64 = it.next().ok_or(format!("{flag} needs a value"))?.parse()?;
        match flag.as_str() {
            "--comparisons" => a.comparisons = value,
            "--mismatches" => a.mismatches = value,
            "--classes" => a.classes = value.max(1),
            "--tenants" => a.tenants = value.max(1),
            "--runs" => a.runs = value.max(1) as usize,
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    let ficus = super::ficus_binary();
    if !ficus.is_file() {
        return Err(format!(
            "{} not found; build it with `cargo build --release -p ficus`",
            ficus.display()
        )
        .into());
    }
    let cluster = ficus_testkit::PgCluster::start_with(&[])?;
    let store_url = cluster.fresh_database("store")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let seeded = Instant::now();
    rt.block_on(seed(&store_url, &a))?;
    eprintln!("seeded in {:.1} s", seeded.elapsed().as_secs_f64());

    let time = |args: &[&str]| -> Result<(Histogram, String), Error> {
        let mut h = Histogram::default();
        let mut last = String::new();
        for _ in 0..a.runs {
            let started = Instant::now();
            let out = Command::new(&ficus)
                .args(args)
                .env("FICUS_STORE", &store_url)
                .output()?;
            h.record(started.elapsed().as_micros() as u64);
            if !out.status.success() {
                return Err(
                    format!("ficus {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into(),
                );
            }
            last = String::from_utf8(out.stdout)?;
        }
        Ok((h, last))
    };
    let (readiness, verdict) = time(&["readiness", "t0000", "--json"])?;
    let (show, _) = time(&["tenant", "show", "t0000", "--json"])?;
    let verdict: serde_json::Value = serde_json::from_str(&verdict)?;
    let detail = |name: &str| {
        verdict["criteria"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == name))
            .map(|c| c["detail"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    let q = |h: &Histogram, p: f64| h.quantile_micros(p).unwrap_or(0);
    println!(
        "| command | runs | p50 | p99 | max | vs `tenant show` p50 |\n|---|---|---|---|---|---|"
    );
    for (name, h) in [
        ("`ficus readiness t0000 --json`", &readiness),
        ("`ficus tenant show t0000 --json`", &show),
    ] {
        println!(
            "| {name} | {} | {} | {} | {} | {:.2}× |",
            a.runs,
            format_micros(q(h, 0.5)),
            format_micros(q(h, 0.99)),
            format_micros(q(h, 1.0)),
            q(h, 0.5) as f64 / q(&show, 0.5).max(1) as f64
        );
    }
    println!(
        "\nverdict: {}; {}; {} open classes counted, {} additive shown",
        detail("comparisons"),
        detail("mismatches"),
        verdict["open_classes"].as_array().map_or(0, Vec::len),
        verdict["additive"].as_array().map_or(0, Vec::len)
    );
    Ok(())
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Splits `total` into `parts` near-equal whole shares.
fn share(total: u64, parts: u64, i: u64) -> u64 {
    total / parts + u64::from(i < total % parts)
}

async fn seed(store_url: &str, a: &Args) -> Result<(), Error> {
    let store = ficus_store::open(&StoreUrl::parse(store_url)?, OpenMode::Create).await?;
    let ids: Vec<TenantId> = (0..a.tenants)
        .map(|i| TenantId::parse(&format!("t{i:04}")))
        .collect::<Result<_, _>>()?;
    store
        .import_tenants(
            ids.iter()
                .map(|id| NewTenant {
                    id: id.clone(),
                    name: id.to_string(),
                    stage: Stage::Shadow,
                    domains: vec![],
                })
                .collect(),
            Actor::Cli,
            "benchmark tenants",
        )
        .await?;
    let start = now_ms() - (HOURS - 1) * 3_600_000;
    let key = |c: u64| {
        let endpoint = format!("GET /e{}/{{id}}", c % ENDPOINTS);
        let path = format!("$.items[*].f{c}");
        let id = ficus_diff::class::ClassKey {
            endpoint: endpoint.clone(),
            path: path.clone(),
            kind: ficus_diff::Kind::Value,
        }
        .id();
        (id, endpoint, path)
    };
    for (t, tenant) in ids.iter().enumerate() {
        // The judged tenant has it all; the others a hundredth each.
        let scale = if t == 0 { 1 } else { 100 };
        let (comparisons, mismatches) = (a.comparisons / scale, a.mismatches / scale);
        for h in 0..HOURS {
            let at = Timestamp::from_unix_millis(start + h * 3_600_000);
            let version = if h < HOURS / 2 { "1.0" } else { "1.1" };
            let hour = h as u64;
            let in_hour = share(comparisons, HOURS as u64, hour);
            let wrong_in_hour = share(mismatches, HOURS as u64, hour);
            let mut evidence = Evidence::default();
            for e in 0..ENDPOINTS {
                let compared = share(in_hour, ENDPOINTS, e);
                let mismatched = share(wrong_in_hour, ENDPOINTS, e);
                evidence.counts.push(ComparisonCount {
                    tenant: tenant.clone(),
                    endpoint: format!("GET /e{e}/{{id}}"),
                    version: version.into(),
                    last_at: at,
                    requests: compared,
                    compared,
                    matched: compared.saturating_sub(mismatched),
                    mismatched,
                    noise_only: 0,
                    errors: 0,
                    shed: 0,
                    raced: 0,
                });
            }
            for c in 0..a.classes {
                let n = share(wrong_in_hour, a.classes, c);
                if n == 0 {
                    continue;
                }
                let (id, endpoint, path) = key(c);
                evidence.classes.push(ClassCount {
                    tenant: tenant.clone(),
                    id,
                    endpoint: endpoint.clone(),
                    path,
                    kind: "value".into(),
                    additive: c % 17 == 0,
                    version: version.into(),
                    count: n,
                    first_at: at,
                    last_at: at,
                    example: None,
                });
                if t == 0 {
                    for k in 0..n {
                        evidence.samples.push(MismatchSample {
                            tenant: tenant.clone(),
                            endpoint: endpoint.clone(),
                            at,
                            method: "GET".into(),
                            path: format!("/e{}/{k}", c % ENDPOINTS),
                            served_by: "legacy".into(),
                            compared_with: "new".into(),
                            served_status: 200,
                            compared_status: 200,
                            differences: "[]".into(),
                            version: Some(version.into()),
                        });
                    }
                }
            }
            store.record_comparisons(&evidence).await?;
        }
    }
    // A quarter resolved, a tenth accepted: every epoch and state is read.
    for c in 0..a.classes {
        let to = match c % 20 {
            0..=4 => ClassState::Resolved,
            5 | 6 => ClassState::Accepted,
            _ => continue,
        };
        store
            .change_class(ClassChange {
                id: key(c).0,
                to,
                actor: Actor::Cli,
                reason: "benchmark".into(),
                fixed_in: None,
            })
            .await?;
    }
    Ok(())
}
