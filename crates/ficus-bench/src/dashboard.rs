//! `ficus-bench dashboard [--tenants N] [--comparisons M] [--loads L] [--changes C]`:
//! the dashboard on a PostgreSQL store of a large migration.
//!
//! One cluster with durable commits holds the store: N tenants (a fifth on
//! legacy, three fifths in shadow, a fifth migrated, imported in one go, plus a
//! stage change for every tenth so the audit log is not only the import), M
//! comparisons over the shadow tenants (four endpoints, four hours, written
//! through `record_comparisons` as proxies write them), 200 mismatch classes
//! seen on a thousand tenants with a sample each, and an hour of latencies of
//! both backends for every shadow tenant.
//!
//! The admin router is served on loopback as `ficus serve` serves it. Each page
//! is loaded L times in turn with a viewer's token: the tenant board's first
//! page (closest to ready first), a tenant's page, the overview; next to the
//! API's `GET /v1/tenants/ID` in the same go, the floor of any request there.
//! Times are measured at the client on loopback, so they bound the server's.
//! Then C stage changes are committed one at a time with a live event stream
//! open (`/ui/events`): the time from the commit returning to the stream
//! carrying the tenant's new stage.

use std::time::Instant;

use crate::readiness::now_ms;
use ficus_admin::token::{self, Scope};
use ficus_core::latency::{Histogram, format_micros};
use ficus_core::{Actor, Backend, Stage, TenantId, Timestamp};
use ficus_store::{
    ClassCount, ComparisonCount, ControlStore, Evidence, LatencyReport, MismatchSample, NewTenant,
    OpenMode, StageChange, StoreUrl,
};

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    tenants: u64,
    comparisons: u64,
    loads: usize,
    changes: usize,
}

const ENDPOINTS: u64 = 4;
const HOURS: i64 = 4;
const CLASSES: u64 = 200;

pub fn run(argv: &[String]) -> Result<(), Error> {
    let mut a = Args {
        tenants: 10_000,
        comparisons: 1_000_000,
        loads: 100,
        changes: 100,
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let value: u64 = it.next().ok_or(format!("{flag} needs a value"))?.parse()?;
        match flag.as_str() {
            "--tenants" => a.tenants = value.max(10),
            "--comparisons" => a.comparisons = value,
            "--loads" => a.loads = value.max(1) as usize,
            "--changes" => a.changes = value.max(1) as usize,
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    let cluster = ficus_testkit::PgCluster::start_with(&[])?;
    let store_url = cluster.fresh_database("store")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(measure(&store_url, &a))
}

fn tenant(i: u64) -> TenantId {
    TenantId::parse(&format!("t{i:05}")).unwrap_or_else(|_| unreachable!("a valid id"))
}

fn stage_of(i: u64, n: u64) -> Stage {
    match i * 5 / n {
        0 => Stage::Legacy,
        4 => Stage::Migrated,
        _ => Stage::Shadow,
    }
}

async fn seed(store: &dyn ControlStore, a: &Args) -> Result<Vec<TenantId>, Error> {
    let started = Instant::now();
    store
        .import_tenants(
            (0..a.tenants)
                .map(|i| NewTenant {
                    id: tenant(i),
                    name: format!("Tenant {i}"),
                    stage: stage_of(i, a.tenants),
                    domains: vec![],
                })
                .collect(),
            Actor::Cli,
            "benchmark tenants",
        )
        .await?;
    // Some history beyond the import: every tenth tenant moved once.
    for i in (0..a.tenants).step_by(10) {
        let to = match stage_of(i, a.tenants) {
            Stage::Legacy => Stage::Shadow,
            Stage::Shadow => Stage::Legacy,
            Stage::Migrated => Stage::Shadow,
        };
        store
            .change_stage(StageChange {
                tenant: tenant(i),
                to,
                expected_version: None,
                actor: Actor::Cli,
                reason: "benchmark history".into(),
            })
            .await?;
    }
    let shadow: Vec<TenantId> = store
        .tenants(Some(Stage::Shadow))
        .await?
        .into_iter()
        .map(|t| t.id)
        .collect();
    let per_row = a
        .comparisons
        .div_ceil(shadow.len() as u64 * ENDPOINTS * HOURS as u64)
        .max(1);
    let start = now_ms() - (HOURS - 1) * 3_600_000;
    for h in 0..HOURS {
        let at = Timestamp::from_unix_millis(start + h * 3_600_000);
        for chunk in shadow.chunks(500) {
            let mut evidence = Evidence::default();
            for t in chunk {
                for e in 0..ENDPOINTS {
                    evidence.counts.push(ComparisonCount {
                        tenant: t.clone(),
                        endpoint: format!("GET /e{e}/{{id}}"),
                        version: "2.0".into(),
                        last_at: at,
                        requests: per_row,
                        compared: per_row,
                        matched: per_row,
                        mismatched: 0,
                        noise_only: 0,
                        errors: 0,
                        shed: 0,
                        raced: 0,
                    });
                }
            }
            store.record_comparisons(&evidence).await?;
        }
    }
    // Mismatches on a thousand tenants, spread over 200 classes.
    let at = Timestamp::from_unix_millis(now_ms() - 60_000);
    for chunk in shadow.iter().take(1_000).collect::<Vec<_>>().chunks(200) {
        let mut evidence = Evidence::default();
        for (k, t) in chunk.iter().enumerate() {
            let c = k as u64 % CLASSES;
            let key = ficus_diff::class::ClassKey {
                endpoint: format!("GET /e{}/{{id}}", c % ENDPOINTS),
                path: format!("$.f{c}"),
                kind: ficus_diff::Kind::Value,
            };
            let difference = format!(
                r#"{{"path":"$.f{c}","kind":"value","compat":"breaking","left":{{"type":"number","len":3,"hash":"aa"}},"right":{{"type":"number","len":3,"hash":"bb"}}}}"#
            );
            evidence.classes.push(ClassCount {
                tenant: (*t).clone(),
                id: key.id(),
                endpoint: key.endpoint.clone(),
                path: key.path.clone(),
                kind: "value".into(),
                additive: false,
                version: "2.0".into(),
                count: 3,
                first_at: at,
                last_at: at,
                example: None,
            });
            evidence.samples.push(MismatchSample {
                tenant: (*t).clone(),
                endpoint: key.endpoint,
                at,
                method: "GET".into(),
                path: format!("/e{}/7", c % ENDPOINTS),
                served_by: "legacy".into(),
                compared_with: "new".into(),
                served_status: 200,
                compared_status: 200,
                differences: format!("[{difference}]"),
                version: Some("2.0".into()),
            });
        }
        store.record_comparisons(&evidence).await?;
    }
    let mut h = Histogram::default();
    for us in [2_000, 3_000, 4_000, 6_000, 9_000] {
        h.record(us);
    }
    for chunk in shadow.chunks(1_000) {
        let reports: Vec<LatencyReport> = chunk
            .iter()
            .flat_map(|t| {
                [Backend::Legacy, Backend::New].map(|backend| LatencyReport {
                    tenant: t.clone(),
                    backend,
                    at,
                    histogram: h.clone(),
                })
            })
            .collect();
        store.record_latencies(&reports).await?;
    }
    eprintln!(
        "seeded {} tenants ({} in shadow), {} comparisons, in {:.1} s",
        a.tenants,
        shadow.len(),
        per_row * shadow.len() as u64 * ENDPOINTS * HOURS as u64,
        started.elapsed().as_secs_f64()
    );
    Ok(shadow)
}

async fn measure(store_url: &str, a: &Args) -> Result<(), Error> {
    let store = ficus_store::open(&StoreUrl::parse(store_url)?, OpenMode::Create).await?;
    let shadow = seed(&*store, a).await?;
    let viewer = token::create(&*store, "bench", Scope::Viewer, Actor::Cli, "benchmark").await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let served = store.clone();
    tokio::spawn(async move {
        let _ = ficus_admin::server::serve(listener, served, std::future::pending()).await;
    });
    let http = reqwest::Client::builder().no_proxy().build()?;
    // The tenant page of one with mismatches, as an operator would open it.
    let judged = shadow.first().ok_or("no tenant in shadow")?.clone();
    let pages = [
        ("tenant board, first page", "/ui/tenants".to_string()),
        ("tenant page", format!("/ui/tenants/{judged}")),
        ("overview", "/ui/".to_string()),
        (
            "peer: `GET /v1/tenants/ID`",
            format!("/v1/tenants/{judged}"),
        ),
    ];
    let mut times: Vec<Histogram> = vec![Histogram::default(); pages.len()];
    // The board's own account of its time (its Server-Timing header), summed.
    let mut parts: Vec<(String, f64)> = Vec::new();
    let mut first = vec![0u64; pages.len()];
    let mut judged = String::new();
    // One warm-up load each, then the loads in turn.
    for round in 0..=a.loads {
        for (k, (_, path)) in pages.iter().enumerate() {
            let started = Instant::now();
            let r = http
                .get(format!("{base}{path}"))
                .bearer_auth(&viewer)
                .send()
                .await?;
            let status = r.status();
            if round > 0
                && let Some(t) = r
                    .headers()
                    .get("server-timing")
                    .and_then(|v| v.to_str().ok())
            {
                for part in t.split(", ") {
                    if let Some((name, ms)) = part.split_once(";dur=") {
                        let ms: f64 = ms.parse().unwrap_or(0.0);
                        match parts.iter_mut().find(|(n, _)| n == name) {
                            Some((_, sum)) => *sum += ms,
                            None => parts.push((name.to_string(), ms)),
                        }
                    }
                }
            }
            let body = r.bytes().await?;
            let took = started.elapsed();
            if !status.is_success() {
                return Err(format!("{path}: {status}: {}", String::from_utf8_lossy(&body)).into());
            }
            if round > 0 {
                times[k].record(took.as_micros() as u64);
            } else {
                first[k] = took.as_micros() as u64;
            }
            let body = String::from_utf8_lossy(&body);
            if let Some(at) = body.find("Gate verdicts judged") {
                judged = body[at..].split('<').next().unwrap_or("").to_string();
            }
        }
    }
    let q = |h: &Histogram, p: f64| h.quantile_micros(p).unwrap_or(0);
    let floor = q(&times[3], 0.5).max(1) as f64;
    println!(
        "| page | first load | loads | p50 | p99 | max | p50 vs the API's tenant read |\n|---|---|---|---|---|---|---|"
    );
    for (((name, _), h), cold) in pages.iter().zip(&times).zip(&first) {
        println!(
            "| {name} | {} | {} | {} | {} | {} | {:.1}× |",
            format_micros(*cold),
            a.loads,
            format_micros(q(h, 0.5)),
            format_micros(q(h, 0.99)),
            format_micros(q(h, 1.0)),
            q(h, 0.5) as f64 / floor
        );
    }
    println!("\nthe board said, last: {judged}");
    println!(
        "the board's server time by part (mean of its Server-Timing): {}",
        parts
            .iter()
            .map(|(n, ms)| format!("{n} {:.1} ms", ms / a.loads as f64))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Live updates: commit, then wait for the stream to carry it.
    let position = store.position().await?;
    let mut stream = http
        .get(format!("{base}/ui/events?from={position}"))
        .bearer_auth(&viewer)
        .send()
        .await?;
    let mut live = Histogram::default();
    let mut buffer = String::new();
    let moved = tenant(1);
    let mut stage = store.tenant(&moved).await?.ok_or("no tenant t00001")?.stage;
    for _ in 0..a.changes {
        stage = if stage == Stage::Shadow {
            Stage::Legacy
        } else {
            Stage::Shadow
        };
        store
            .change_stage(StageChange {
                tenant: moved.clone(),
                to: stage,
                expected_version: None,
                actor: Actor::Cli,
                reason: "benchmark".into(),
            })
            .await?;
        let committed = Instant::now();
        let want = format!(r#""id":"{moved}","stage":"{stage}""#);
        loop {
            if let Some(at) = buffer.find(&want) {
                buffer.drain(..at + want.len());
                break;
            }
            let chunk = stream.chunk().await?.ok_or("the event stream ended")?;
            buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
        live.record(committed.elapsed().as_micros() as u64);
    }
    println!(
        "\nlive update, commit to event on an open `/ui/events` stream: {} changes, p50 {}, p99 {}, max {}",
        a.changes,
        format_micros(q(&live, 0.5)),
        format_micros(q(&live, 0.99)),
        format_micros(q(&live, 1.0))
    );
    Ok(())
}
