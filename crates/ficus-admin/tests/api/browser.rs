//! The dashboard in a real browser: Debian's headless Chromium, driven through
//! ChromeDriver. A person logs in, watches a tenant's row change when the
//! command line moves it (over server-sent events, no reload), clicks through a
//! mismatch to its sample pair, accepts and reopens its class, promotes that
//! tenant past the gate, promotes a ready one from its page and finds the
//! audit entry under their token's name, rolls another back, holds a write
//! route on legacy again and logs out. Each page is saved as a screenshot in
//! the test's output directory
//! (`target/tmp/ui-screenshots`). The whole demo migration, run from the pages
//! alone, is `crates/ficus/tests/it/dashboard.rs`.
//!
//! It visits more than six pages on purpose: Chrome kept pages in its
//! back-forward cache with their event streams open, six of them used up its
//! connections to the host, and the seventh page hung for a minute (fixed in
//! `assets/app.js`, which closes the stream on `pagehide`).
//!
//! `.ci/run` installs `chromium` and `chromium-driver`; without them this test
//! fails and says so.

use std::path::PathBuf;
use std::time::Duration;

use ficus_admin::api::AddRequest;
use ficus_admin::token::{self, Scope};
use ficus_admin::{Control, Direct};
use ficus_core::{Actor, Stage, Timestamp};
use ficus_store::{ClassCount, Evidence, MismatchSample, StageChange};
use ficus_testkit::browser::{Client, Locator, click, driver, fill, text, until_text};

use super::{id, now_ms, ready_evidence, start};

fn shots() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots")
}

async fn shot(c: &Client, name: &str) {
    ficus_testkit::browser::shot(c, &shots(), name).await;
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
                raced: 0,
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
    // Accepted as intended, then reopened: each from the class page.
    fill(
        &c,
        "form#accept input[name=reason]",
        "the new price is right",
    )
    .await;
    click(&c, "form#accept button").await;
    until_text(&c, "#class-state", |t| t == "accepted").await;
    fill(
        &c,
        "form#reopen input[name=reason]",
        "no: legacy's price is the contract",
    )
    .await;
    click(&c, "form#reopen button").await;
    until_text(&c, "#class-state", |t| t == "open").await;
    let history = text(&c, "main").await;
    assert!(
        history.contains("accepted by token:ana") && history.contains("reopened by token:ana"),
        "{history}"
    );
    // Beta is not ready (its class is open again); the operator promotes it
    // past the gate, box ticked, and the audit entry says so.
    c.goto(&format!("{}/ui/tenants/beta", api.base))
        .await
        .unwrap();
    until_text(&c, "#verdict", |t| t == "not ready").await;
    fill(
        &c,
        "form#promote input[name=reason]",
        "the price change is the contract now",
    )
    .await;
    click(&c, "form#promote input[name=force]").await;
    click(&c, "form#promote button").await;
    until_text(&c, r#"#tenant [data-field="stage"]"#, |t| t == "migrated").await;
    let log = text(&c, "table#audit").await;
    assert!(
        log.contains("forced past the readiness gate") && log.contains("token:ana"),
        "{log}"
    );
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
    // Regression (the demo's browser test in CI: a live reload emptied a form
    // between typing and the click): a change that arrives while the operator
    // is typing holds the overview's reload and keeps the words.
    fill(
        &c,
        "form#promote-next input[name=reason]",
        "half-typed reason",
    )
    .await;
    for to in [Stage::Shadow, Stage::Migrated] {
        api.store
            .change_stage(StageChange {
                tenant: id("beta"),
                to,
                expected_version: None,
                actor: Actor::Cli,
                reason: "moved while the operator types".into(),
            })
            .await
            .unwrap();
    }
    until_text(&c, "#held", |t| t.contains("while you were typing")).await;
    let kept = c
        .find(Locator::Css("form#promote-next input[name=reason]"))
        .await
        .unwrap()
        .prop("value")
        .await
        .unwrap();
    assert_eq!(kept.as_deref(), Some("half-typed reason"));
    // The operator takes gamma back to legacy from its page.
    c.goto(&format!("{}/ui/tenants/gamma", api.base))
        .await
        .unwrap();
    fill(
        &c,
        "form#rollback input[name=reason]",
        "its customers report slow pages",
    )
    .await;
    click(&c, "form#rollback button").await;
    until_text(&c, r#"#tenant [data-field="stage"]"#, |t| t == "legacy").await;
    let log = text(&c, "table#audit").await;
    assert!(
        log.contains("token:ana") && log.contains("its customers report slow pages"),
        "{log}"
    );
    c.goto(&format!("{}/ui/endpoints", api.base)).await.unwrap();
    until_text(&c, "table#endpoints", |t| t.contains("GET /homes/{id}")).await;
    shot(&c, "endpoints").await;
    // A write route released from the command line is held again from the
    // routes page.
    control
        .release_route(ficus_admin::api::RouteReleaseRequest {
            route: "POST /homes".into(),
            tenant: None,
            destructive: false,
            reason: "the rebuilt backend writes homes".into(),
        })
        .await
        .unwrap();
    c.goto(&format!("{}/ui/routes", api.base)).await.unwrap();
    let row = r#"tr[data-route="POST /homes"]"#;
    until_text(&c, &format!("{row} [data-field=route-stage]"), |t| {
        t == "migrated"
    })
    .await;
    fill(
        &c,
        &format!("{row} input[name=reason]"),
        "new writes fail for beta",
    )
    .await;
    fill(&c, &format!("{row} input[name=tenant]"), "").await;
    click(&c, &format!("{row} button")).await;
    until_text(&c, &format!("{row} [data-field=route-stage]"), |t| {
        t == "held on legacy"
    })
    .await;
    shot(&c, "routes").await;
    // Logging out ends the session: the next page asks for a token again.
    click(&c, "form.inline button").await;
    until_text(&c, "h1", |t| t == "Ficus").await;
    c.goto(&format!("{}/ui/tenants", api.base)).await.unwrap();
    assert!(c.current_url().await.unwrap().path().ends_with("/ui/login"));
    c.close().await.unwrap();
    assert_eq!(
        api.store.tenant(&id("acme")).await.unwrap().unwrap().stage,
        Stage::Migrated
    );
}
