//! The dashboard in a real browser: Debian's headless Chromium, driven through
//! ChromeDriver. A person logs in, watches a tenant's row change when the
//! command line moves it (over server-sent events, no reload), clicks through a
//! mismatch to its sample pair, promotes a tenant from its page and finds the
//! audit entry under their token's name. Each page is saved as a screenshot in
//! the test's output directory (`target/tmp/ui-screenshots`).
//!
//! It visits more than six pages on purpose: Chrome kept pages in its
//! back-forward cache with their event streams open, six of them used up its
//! connections to the host, and the seventh page hung for a minute (fixed in
//! `assets/app.js`, which closes the stream on `pagehide`).
//!
//! `.ci/run` installs `chromium` and `chromium-driver`; without them this test
//! fails and says so.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use ficus_admin::api::AddRequest;
use ficus_admin::token::{self, Scope};
use ficus_admin::{Control, Direct};
use ficus_core::{Actor, Stage, Timestamp};
use ficus_store::{ClassCount, Evidence, MismatchSample, StageChange};

use super::{id, now_ms, ready_evidence, start};

/// A ChromeDriver on a free loopback port, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn driver() -> (Driver, Client) {
    let binary = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("chromedriver is missing: apt-get install chromium chromium-driver (.ci/run does)");
    let port = free_port();
    let child = Command::new(binary)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".to_string(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            // Tests run as root in CI, where Chromium's sandbox cannot start.
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"]
        }),
    );
    // ChromeDriver accepts sessions once it listens; ask until it does.
    let mut last = None;
    for _ in 0..200 {
        match ClientBuilder::rustls()
            .unwrap()
            .capabilities(caps.clone())
            .connect(&driver.url)
            .await
        {
            Ok(c) => return (driver, c),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("chromedriver never accepted a session: {last:?}");
}

fn shots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(shots().join(format!("{name}.png")), png).unwrap();
}

async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Waits until the element's text satisfies `ok`: an event on the page, with a
/// generous bound so a slow machine only waits longer.
async fn until_text(c: &Client, css: &str, ok: impl Fn(&str) -> bool) -> String {
    let mut seen = String::new();
    for _ in 0..600 {
        if let Ok(e) = c.find(Locator::Css(css)).await
            && let Ok(t) = e.text().await
        {
            if ok(&t) {
                return t;
            }
            seen = t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{css} never changed as expected; last seen {seen:?}");
}

#[tokio::test]
async fn an_operator_runs_the_dashboard_in_a_real_browser() {
    let api = start().await;
    let control = Direct::new(api.store.clone(), Actor::Cli);
    for (tenant, name) in [
        ("acme", "Acme Homes"),
        ("beta", "Beta Lettings"),
        ("gamma", "Gamma Estates"),
    ] {
        control
            .add(AddRequest {
                id: tenant.into(),
                name: Some(name.into()),
                domains: vec![format!("{tenant}.portal.test")],
                stage: Some("shadow".into()),
                reason: "onboarding".into(),
            })
            .await
            .unwrap();
    }
    ready_evidence(&*api.store, "acme").await;
    // Beta's new backend gets a price wrong: a counted class and a sample pair.
    let at = Timestamp::from_unix_millis(now_ms() - 1_000);
    let key = ficus_diff::class::ClassKey {
        endpoint: "GET /homes/{id}".into(),
        path: "$.price".into(),
        kind: ficus_diff::Kind::Value,
    };
    let difference = serde_json::json!({
        "path": "$.price", "kind": "value", "compat": "breaking",
        "left": {"type": "number", "len": 6, "hash": "9f2c", "value": "450000"},
        "right": {"type": "number", "len": 6, "hash": "1a7e", "value": "225000"}
    });
    api.store
        .record_comparisons(&Evidence {
            classes: vec![ClassCount {
                tenant: id("beta"),
                id: key.id(),
                endpoint: key.endpoint.clone(),
                path: key.path.clone(),
                kind: "value".into(),
                additive: false,
                version: "2.0".into(),
                count: 3,
                first_at: at,
                last_at: at,
                example: Some(ficus_core::reconcile::ClassExample {
                    at,
                    request: "GET /homes/7".into(),
                    version: Some("2.0".into()),
                    difference: difference.to_string(),
                }),
            }],
            samples: vec![MismatchSample {
                tenant: id("beta"),
                endpoint: key.endpoint.clone(),
                at,
                method: "GET".into(),
                path: "/homes/7".into(),
                served_by: "legacy".into(),
                compared_with: "new".into(),
                served_status: 200,
                compared_status: 200,
                differences: serde_json::json!([difference]).to_string(),
                version: Some("2.0".into()),
            }],
            ..Evidence::default()
        })
        .await
        .unwrap();
    // Six hours of beta's parallel run: two endpoints compared, and both
    // backends' latency, new slower in the last hours.
    for hour in 0..6i64 {
        let at = Timestamp::from_unix_millis(now_ms() - hour * 3_600_000);
        let counts = ["GET /homes/{id}", "GET /homes"]
            .into_iter()
            .map(|endpoint| ficus_store::ComparisonCount {
                tenant: id("beta"),
                endpoint: endpoint.into(),
                version: "2.0".into(),
                last_at: at,
                requests: 40,
                compared: 40,
                matched: 40,
                mismatched: 0,
                noise_only: 0,
                errors: 0,
                shed: 0,
            })
            .collect();
        api.store
            .record_comparisons(&Evidence {
                counts,
                ..Evidence::default()
            })
            .await
            .unwrap();
        let histogram = |base: u64| {
            let mut h = ficus_core::latency::Histogram::default();
            for k in 0..50 {
                h.record(base + k * 100);
            }
            h
        };
        // Legacy serves less each hour as tenants move.
        api.store
            .record_route_census(&[ficus_store::RouteCount {
                tenant: Some(id("beta")),
                route: "GET /homes/{id}".into(),
                backend: "legacy".into(),
                client: String::new(),
                count: 100 + 150 * hour as u64,
                last_at: at,
                configured: true,
            }])
            .await
            .unwrap();
        let slow = if hour < 2 { 9_000 } else { 3_000 };
        api.store
            .record_latencies(&[
                ficus_store::LatencyReport {
                    tenant: id("beta"),
                    backend: ficus_core::Backend::Legacy,
                    at,
                    histogram: histogram(3_000),
                },
                ficus_store::LatencyReport {
                    tenant: id("beta"),
                    backend: ficus_core::Backend::New,
                    at,
                    histogram: histogram(slow),
                },
            ])
            .await
            .unwrap();
    }
    let operator = token::create(&*api.store, "ana", Scope::Operator, Actor::Cli, "on call")
        .await
        .unwrap();

    let (_driver, c) = driver().await;
    // Log in: the board sends the person to the login page and back.
    c.goto(&format!("{}/ui/tenants", api.base)).await.unwrap();
    assert!(c.current_url().await.unwrap().path().ends_with("/ui/login"));
    shot(&c, "login").await;
    c.find(Locator::Css("input[name=token]"))
        .await
        .unwrap()
        .send_keys(&operator)
        .await
        .unwrap();
    c.find(Locator::Css("form#login button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until_text(&c, "h1", |t| t.starts_with("Tenants")).await;
    assert_eq!(c.current_url().await.unwrap().path(), "/ui/tenants");
    // The row of gamma changes when the command line moves it, without a reload.
    until_text(&c, "header .who", |t| t.contains("ana")).await;
    let live = c.find(Locator::Css("#live")).await.unwrap();
    for _ in 0..600 {
        if live
            .attr("class")
            .await
            .unwrap()
            .unwrap_or_default()
            .contains("on")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gamma = r#"tr[data-tenant="gamma"] [data-field="stage"]"#;
    assert_eq!(text(&c, gamma).await, "shadow");
    api.store
        .change_stage(StageChange {
            tenant: id("gamma"),
            to: Stage::Legacy,
            expected_version: None,
            actor: Actor::Cli,
            reason: "rolled back from the command line".into(),
        })
        .await
        .unwrap();
    until_text(&c, gamma, |t| t == "legacy").await;
    assert!(
        c.find(Locator::Css(r#"tr[data-tenant="gamma"].changed"#))
            .await
            .is_ok(),
        "the changed row is marked"
    );
    shot(&c, "board").await;
    // From beta's page to the mismatch class and its sample pair.
    c.goto(&format!("{}/ui/tenants/beta", api.base))
        .await
        .unwrap();
    until_text(&c, "#verdict", |t| t == "not ready").await;
    let coverage = text(&c, "table#coverage").await;
    assert!(coverage.contains("GET /homes"), "{coverage}");
    shot(&c, "tenant").await;
    c.find(Locator::Css("table#classes a"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let pair = until_text(&c, "table#pair", |t| t.contains("$.price")).await;
    assert!(pair.contains("450000") && pair.contains("225000"), "{pair}");
    shot(&c, "class").await;
    // Promote acme from its page; the audit log names the token.
    c.goto(&format!("{}/ui/tenants/acme", api.base))
        .await
        .unwrap();
    until_text(&c, "#verdict", |t| t == "ready").await;
    c.find(Locator::Css("form#promote input[name=reason]"))
        .await
        .unwrap()
        .send_keys("ready on the board")
        .await
        .unwrap();
    c.find(Locator::Css("form#promote button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until_text(&c, r#"#tenant [data-field="stage"]"#, |t| t == "migrated").await;
    c.goto(&format!("{}/ui/audit?tenant=acme", api.base))
        .await
        .unwrap();
    let log = until_text(&c, "table#audit", |t| t.contains("migrated")).await;
    assert!(
        log.contains("token:ana") && log.contains("ready on the board"),
        "{log}"
    );
    shot(&c, "audit").await;
    // The guard takes gamma back; the overview shows it among its actions.
    for (to, actor, reason) in [
        (Stage::Shadow, Actor::Cli, "promoted again"),
        (Stage::Migrated, Actor::Cli, "promoted again"),
        (
            Stage::Shadow,
            Actor::Guard,
            "new answered 5xx to 12 of 40 requests in 5 s",
        ),
    ] {
        api.store
            .change_stage(StageChange {
                tenant: id("gamma"),
                to,
                expected_version: None,
                actor,
                reason: reason.into(),
            })
            .await
            .unwrap();
    }
    c.goto(&format!("{}/ui/", api.base)).await.unwrap();
    until_text(&c, "h1", |t| t == "The finish line").await;
    let guard = text(&c, "table#guard").await;
    assert!(guard.contains("gamma") && guard.contains("5xx"), "{guard}");
    shot(&c, "overview").await;
    c.goto(&format!("{}/ui/endpoints", api.base)).await.unwrap();
    until_text(&c, "table#endpoints", |t| t.contains("GET /homes/{id}")).await;
    shot(&c, "endpoints").await;
    c.close().await.unwrap();
    assert_eq!(
        api.store.tenant(&id("acme")).await.unwrap().unwrap().stage,
        Stage::Migrated
    );
}
