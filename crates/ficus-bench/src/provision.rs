//! `ficus-bench provision [--events N] [--clients C]`: billing events to ready
//! tenants, on PostgreSQL.
//!
//! One PostgreSQL cluster with durable commits holds the control store and the
//! tenant database (spine applied with Ficus's own plan). The admin API with its
//! webhook runs in this process on a real listener; C clients send N signed
//! `subscription.created` events over HTTP, each timed from sending to the
//! webhook's answer, which comes once the tenant, its configuration and its
//! organization in the tenant database are written. Then a proxy-style routing
//! table is loaded from the store to check every tenant's configuration is there
//! to be served.

use std::sync::Arc;
use std::time::Instant;

use ficus_admin::provision::{Hooks, SIGNATURE_HEADER, sign};
use ficus_core::latency::{Histogram, format_micros};
use ficus_store::{OpenMode, StoreUrl};

type Error = Box<dyn std::error::Error + Send + Sync>;

pub fn run(argv: &[String]) -> Result<(), Error> {
    let (mut events, mut clients) = (1_000usize, 8usize);
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let value: usize = it.next().ok_or(format!("{flag} needs a value"))?.parse()?;
        match flag.as_str() {
            "--events" => events = value,
            "--clients" => clients = value.max(1),
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    let cluster = ficus_testkit::PgCluster::start_with(&[])?;
    let store_url = cluster.fresh_database("store")?;
    let tenant_db = cluster.fresh_database("tenants")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bench(&store_url, &tenant_db, events, clients))
}

async fn bench(
    store_url: &str,
    tenant_db: &str,
    events: usize,
    clients: usize,
) -> Result<(), Error> {
    let store = ficus_store::open(&StoreUrl::parse(store_url)?, OpenMode::Create).await?;
    {
        let mut c = ficus_retrofit::connect(tenant_db).await?;
        let inv = ficus_retrofit::inspect(&c).await?;
        let plan = ficus_retrofit::Plan::draft(&inv, "Acme", ficus_retrofit::plan::IdType::Uuid)?;
        let only = ficus_retrofit::apply::Options {
            only: Some(ficus_retrofit::plan::StepKind::Spine),
            ..Default::default()
        };
        ficus_retrofit::apply::apply(&mut c, &plan, &inv, &only, &mut |_| {}).await?;
    }
    let secret = b"whsec_bench".to_vec();
    let hooks = Hooks {
        secret: Some(Arc::from(secret.clone())),
        database_url: Some(tenant_db.to_string()),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/hooks/billing", listener.local_addr()?);
    tokio::spawn(ficus_admin::server::serve_with(
        listener,
        Arc::clone(&store),
        hooks,
        std::future::pending(),
    ));
    let http = reqwest::Client::builder().no_proxy().build()?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..clients {
        let (http, url, secret) = (http.clone(), url.clone(), secret.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::default();
            let mut failures = 0u64;
            for i in (client..events).step_by(clients) {
                let body = serde_json::json!({
                    "id": format!("evt_{i}"),
                    "type": "subscription.created",
                    "data": {
                        "customer": {"name": format!("Bench Homes {i}")},
                        "domain": format!("t{i}.bench.test"),
                    }
                })
                .to_string();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs() as i64;
                let signature = sign(&secret, now, body.as_bytes());
                let t = Instant::now();
                let answer = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .header(SIGNATURE_HEADER, signature)
                    .body(body)
                    .send()
                    .await;
                match answer {
                    Ok(r) if r.status().as_u16() == 200 => {
                        h.record(t.elapsed().as_micros() as u64);
                    }
                    _ => failures += 1,
                }
            }
            (h, failures)
        }));
    }
    let mut all = Histogram::default();
    let mut failures = 0;
    for t in tasks {
        let (h, f) = t.await?;
        all.merge(&h);
        failures += f;
    }
    let total = started.elapsed();
    let tenants = store.tenants(None).await?.len();
    let configs = store.latest_tenant_configs().await?.len();
    let c = ficus_retrofit::connect(tenant_db).await?;
    let orgs: i64 = c
        .query_one("SELECT count(*) FROM tenancy.organizations", &[])
        .await?
        .get(0);
    println!(
        "{events} signed events from {clients} clients over HTTP; control store and tenant database on one PostgreSQL 15 cluster (durable commits), 2 cores"
    );
    println!();
    println!(
        "| events | total | events/s | p50 per tenant | p99 per tenant | max | failed | tenants | configs | organizations |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {events} | {:.2} s | {:.0} | {} | {} | {} | {failures} | {tenants} | {configs} | {} |",
        total.as_secs_f64(),
        events as f64 / total.as_secs_f64(),
        format_micros(all.quantile_micros(0.50).unwrap_or(0)),
        format_micros(all.quantile_micros(0.99).unwrap_or(0)),
        format_micros(all.quantile_micros(1.0).unwrap_or(0)),
        orgs - 1,
    );
    Ok(())
}

/// `ficus-bench seed-configs --store URL --tenants N`: N tenants (`t0`…), each
/// with a written configuration naming the custom domain `tI.brand.test`, for
/// the tenant-config endpoint's benchmark.
pub fn seed_configs(argv: &[String]) -> Result<(), Error> {
    let (mut store_url, mut tenants) = (None, 10_000usize);
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--store" => store_url = Some(value.clone()),
            "--tenants" => tenants = value.parse()?,
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    let store_url = store_url.ok_or("--store URL is required")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store = ficus_store::open(&StoreUrl::parse(&store_url)?, OpenMode::Create).await?;
        let new: Vec<ficus_store::NewTenant> = (0..tenants)
            .map(|i| {
                Ok(ficus_store::NewTenant {
                    id: ficus_core::TenantId::parse(&format!("t{i}"))?,
                    name: format!("Brand {i}"),
                    stage: ficus_core::Stage::Migrated,
                    domains: Vec::new(),
                })
            })
            .collect::<Result<_, Error>>()?;
        store
            .import_tenants(new, ficus_core::Actor::Cli, "benchmark tenants")
            .await?;
        for i in 0..tenants {
            let domain = format!("t{i}.brand.test");
            let doc = serde_json::json!({
                "display_name": format!("Brand {i} Homes"),
                "app_name": format!("Brand {i}"),
                "branding": {"primary_color": "#0a7f5a", "accent_color": "#ffb000",
                             "logo_url": format!("https://cdn.brand.test/{i}/logo.svg"),
                             "icon_url": format!("https://cdn.brand.test/{i}/icon.png")},
                "domains": [domain],
                "locale": "en-GB",
                "features": {"dark_mode": {"default": false, "ios": true},
                             "max_saved_searches": 10, "support_email": format!("help@t{i}.brand.test")}
            });
            store
                .set_tenant_config(ficus_store::ConfigChange {
                    tenant: ficus_core::TenantId::parse(&format!("t{i}"))?,
                    document: doc.to_string(),
                    domains: vec![ficus_core::Domain::parse(&domain)?],
                    expected_version: 0,
                    actor: ficus_core::Actor::Cli,
                    reason: "benchmark configuration".into(),
                })
                .await?;
        }
        Ok::<(), Error>(())
    })
}
