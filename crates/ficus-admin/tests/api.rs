//! The admin API on a real listener over a real SQLite store: authentication on
//! every route, bad bodies, versions, and an operator's whole path from legacy to
//! migrated and back through the remote client.

use std::sync::{Arc, Mutex};

use ficus_admin::api::{AddRequest, PromoteRequest, RetireRequest, RollbackRequest};
use ficus_admin::client::Remote;
use ficus_admin::ops::{AuditFilter, GateOverrides};
use ficus_admin::server::{self, ROUTES};
use ficus_admin::{Control, Error, token};
use ficus_core::latency::Histogram;
use ficus_core::{Actor, Backend, TenantId, Timestamp};
use ficus_store::{ComparisonCount, ControlStore, LatencyReport, OpenMode, StoreUrl};

#[path = "api/browser.rs"]
mod browser;
#[path = "api/ui.rs"]
mod ui;

struct Api {
    base: String,
    token: String,
    store: Arc<dyn ControlStore>,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn start() -> Api {
    let dir = tempfile::tempdir().unwrap();
    let url = StoreUrl::parse(&format!("sqlite:{}", dir.path().join("f.db").display())).unwrap();
    let store = ficus_store::open(&url, OpenMode::Create).await.unwrap();
    let token = token::ensure(&*store, Actor::Cli).await.unwrap().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let served = Arc::clone(&store);
    tokio::spawn(async move {
        server::serve(listener, served, std::future::pending())
            .await
            .unwrap();
    });
    Api {
        base,
        token,
        store,
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
        _dir: dir,
    }
}

fn id(s: &str) -> TenantId {
    TenantId::parse(s).unwrap()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Records evidence that passes the default gate, the way a proxy reports it.
async fn ready_evidence(store: &dyn ControlStore, tenant: &str) {
    let at = Timestamp::from_unix_millis(now_ms());
    let count = ComparisonCount {
        tenant: id(tenant),
        endpoint: "GET /homes/{id}".into(),
        version: String::new(),
        last_at: at,
        requests: 600,
        compared: 600,
        matched: 600,
        mismatched: 0,
        noise_only: 0,
        errors: 0,
        shed: 0,
        raced: 0,
    };
    store
        .record_comparisons(&ficus_store::Evidence {
            counts: vec![count],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut h = Histogram::default();
    for _ in 0..600 {
        h.record(4_000);
    }
    let reports: Vec<LatencyReport> = [Backend::Legacy, Backend::New]
        .into_iter()
        .map(|backend| LatencyReport {
            tenant: id(tenant),
            backend,
            at,
            histogram: h.clone(),
        })
        .collect();
    store.record_latencies(&reports).await.unwrap();
}

/// Records `count` mismatches of `$.price` on `GET /homes/{id}` for `tenant`, as
/// class `class`, a second ago.
async fn price_mismatches(store: &dyn ControlStore, tenant: &str, class: &str, count: u64) {
    let at = Timestamp::from_unix_millis(now_ms() - 1_000);
    store
        .record_comparisons(&ficus_store::Evidence {
            classes: vec![ficus_store::ClassCount {
                tenant: id(tenant),
                id: class.into(),
                endpoint: "GET /homes/{id}".into(),
                path: "$.price".into(),
                kind: "value".into(),
                additive: false,
                version: String::new(),
                count,
                first_at: at,
                last_at: at,
                example: None,
            }],
            ..Default::default()
        })
        .await
        .unwrap();
}

/// A concrete path and a body for each route, so each can be called for real.
fn concrete(path: &str) -> String {
    path.replace("{id}", "acme")
}

#[tokio::test]
async fn every_route_refuses_no_token_a_wrong_token_and_a_token_in_the_query() {
    let logs = Arc::new(Mutex::new(Vec::<u8>::new()));
    let writer = {
        let logs = Arc::clone(&logs);
        move || LogWriter(Arc::clone(&logs))
    };
    let subscriber = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(false)
        .finish();
    // Global, not scoped to this thread: tracing caches each call site's interest,
    // and a thread-scoped subscriber can miss events whose site another test's
    // thread registered first. No other test here sets one.
    tracing::subscriber::set_global_default(subscriber).unwrap();
    let api = start().await;
    for (method, path) in ROUTES {
        let url = format!("{}{}", api.base, concrete(path));
        let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let cases: Vec<(&str, reqwest::RequestBuilder)> = vec![
            ("none", api.http.request(method.clone(), &url)),
            (
                "wrong",
                api.http
                    .request(method.clone(), &url)
                    .bearer_auth("ficus_0000"),
            ),
            (
                "query",
                api.http
                    .request(method.clone(), format!("{url}?access_token={}", api.token)),
            ),
            (
                "query even with the header",
                api.http
                    .request(method.clone(), format!("{url}?token={}", api.token))
                    .bearer_auth(&api.token),
            ),
        ];
        for (case, request) in cases {
            let response = request
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 401, "{method} {path}: {case}");
            assert_eq!(
                response.headers()["www-authenticate"],
                "Bearer",
                "{method} {path}"
            );
            let body: serde_json::Value = response.json().await.unwrap();
            assert!(body["error"].is_string(), "{method} {path}: {body}");
        }
    }
    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("api: request refused"), "{logs}");
    assert!(
        !logs.contains(&api.token) && !logs.contains("ficus_0000"),
        "a token reached the log:\n{logs}"
    );
    // With the token, the document describes exactly the routes served.
    let doc: serde_json::Value = api
        .http
        .get(format!("{}/v1/openapi.json", api.base))
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut documented: Vec<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(|m| (m.clone(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    documented.sort();
    let mut served: Vec<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    served.sort();
    assert_eq!(documented, served);
}

#[derive(Clone)]
struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn bad_bodies_and_versions_are_refused_with_a_reason_and_change_nothing() {
    let api = start().await;
    let remote = Remote::new(&api.base, &api.token).unwrap();
    remote
        .add(AddRequest {
            id: "acme".into(),
            name: None,
            domains: vec![],
            stage: None,
            reason: "first".into(),
        })
        .await
        .unwrap();
    let post = |path: &str, body: Vec<u8>, content_type: &str, if_match: Option<&str>| {
        let mut r = api
            .http
            .post(format!("{}{path}", api.base))
            .bearer_auth(&api.token)
            .header("content-type", content_type.to_string())
            .body(body);
        if let Some(v) = if_match {
            r = r.header("if-match", v.to_string());
        }
        r.send()
    };
    let check = |status: u16, error: &str| (status, error.to_string());
    let answer = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.unwrap();
        (status, body["error"].as_str().unwrap().to_string())
    };
    let cases = vec![
        (
            post(
                "/v1/tenants",
                b"{\"id\": \"globex\",".to_vec(),
                "application/json",
                None,
            ),
            check(
                400,
                "malformed JSON body: EOF while parsing a value at line 1 column 16",
            ),
        ),
        (
            post(
                "/v1/tenants",
                b"{\"id\": \"globex\"}".to_vec(),
                "text/plain",
                None,
            ),
            check(
                415,
                "the body must be JSON (Content-Type: application/json)",
            ),
        ),
        (
            post(
                "/v1/tenants",
                vec![b' '; 100 * 1024],
                "application/json",
                None,
            ),
            check(413, "the body is larger than 65536 bytes"),
        ),
        (
            post(
                "/v1/tenants",
                b"{\"id\": \"globex\", \"reason\": \"x\", \"colour\": 1}".to_vec(),
                "application/json",
                None,
            ),
            check(
                400,
                "malformed JSON body: unknown field `colour`, expected one of `id`, `name`, `domains`, `stage`, `reason` at line 1 column 40",
            ),
        ),
        (
            post(
                "/v1/tenants",
                b"{\"id\": \"Globex!\", \"reason\": \"x\"}".to_vec(),
                "application/json",
                None,
            ),
            check(
                400,
                "invalid tenant id \"Globex!\": it starts with 'G'; the first character must be a lowercase letter or a digit",
            ),
        ),
        (
            post(
                "/v1/tenants",
                b"{\"id\": \"globex\", \"reason\": \" \"}".to_vec(),
                "application/json",
                None,
            ),
            check(400, "a reason is required and must not be empty"),
        ),
        (
            post(
                "/v1/tenants/acme/promote",
                b"{\"reason\": \"go\"}".to_vec(),
                "application/json",
                None,
            ),
            check(
                428,
                "If-Match with the version this change was decided on is required",
            ),
        ),
        (
            post(
                "/v1/tenants/acme/promote",
                b"{\"reason\": \"go\"}".to_vec(),
                "application/json",
                Some("\"7\""),
            ),
            check(412, ""),
        ),
        (
            post(
                "/v1/tenants/acme/promote",
                b"{\"reason\": \"go\"}".to_vec(),
                "application/json",
                Some("seven"),
            ),
            check(
                400,
                "If-Match \"seven\" is not a tenant version (a whole number)",
            ),
        ),
        (
            post(
                "/v1/tenants/nobody/rollback",
                b"{\"reason\": \"go\"}".to_vec(),
                "application/json",
                Some("1"),
            ),
            check(404, "no tenant nobody"),
        ),
        (
            post(
                "/v1/retire",
                b"{\"reason\": \"done\"}".to_vec(),
                "application/json",
                Some("legacy:retired"),
            ),
            check(
                412,
                "legacy changed since version \"legacy:retired\": it is now \"legacy:active\"; nothing was changed",
            ),
        ),
    ];
    for (request, (status, error)) in cases {
        let (got_status, got_error) = answer(request.await.unwrap()).await;
        if error.is_empty() {
            assert_eq!(got_status, status, "{got_error}");
            assert!(
                got_error.starts_with("tenant acme changed since version 7"),
                "{got_error}"
            );
        } else {
            assert_eq!((got_status, got_error.as_str()), (status, error.as_str()));
        }
    }
    // Nothing above changed the store: one tenant, one event.
    let events = remote.audit(AuditFilter::default()).await.unwrap();
    assert_eq!(events.events.len(), 1);
    assert_eq!(events.events[0].actor, "api");
    assert_eq!(remote.tenants(None).await.unwrap().tenants.len(), 1);
    let unknown_route = api
        .http
        .get(format!("{}/v1/nothing", api.base))
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown_route.status(), 404);
}

#[tokio::test]
async fn an_operator_moves_a_tenant_through_the_gate_using_only_the_api() {
    let api = start().await;
    let remote = Remote::new(&api.base, &api.token).unwrap();
    let add = |name: &str| AddRequest {
        id: name.into(),
        name: None,
        domains: vec![],
        stage: None,
        reason: "onboarding".into(),
    };
    remote.add(add("acme")).await.unwrap();
    remote.add(add("globex")).await.unwrap();
    let promote = |reason: &str, force| PromoteRequest {
        reason: reason.into(),
        force,
    };
    let shadow = remote
        .promote(&id("acme"), promote("parallel run", false), None)
        .await
        .unwrap();
    assert_eq!(
        (shadow.tenant.stage.as_str(), shadow.tenant.version),
        ("shadow", 2)
    );
    // Not ready: refused, naming every failing criterion.
    let Err(Error::Remote { status, message }) = remote
        .promote(&id("acme"), promote("go", false), None)
        .await
    else {
        panic!("promotion without evidence must be refused")
    };
    assert_eq!(status, 409);
    assert!(
        message.starts_with("tenant acme is not ready, nothing was changed: comparisons (0 compared; at least 500 needed); coverage (no traffic seen in the window); latency (no latency measured in the window)"),
        "{message}"
    );
    // A stale version: refused.
    let Err(Error::Remote { status, .. }) = remote
        .promote(&id("acme"), promote("go", false), Some(1))
        .await
    else {
        panic!("a stale version must be refused")
    };
    assert_eq!(status, 412);
    ready_evidence(&*api.store, "acme").await;
    let r = remote
        .readiness(&id("acme"), &GateOverrides::default())
        .await
        .unwrap();
    assert!(r.ready, "{r:?}");
    assert_eq!(r.criteria.len(), 5);
    let migrated = remote
        .promote(
            &id("acme"),
            promote("readiness passed in review", false),
            None,
        )
        .await
        .unwrap();
    assert_eq!(migrated.tenant.stage, "migrated");
    // The finish line: globex is still on legacy.
    let status = remote.status().await.unwrap();
    assert_eq!(status.stages.migrated, 1);
    assert!(!status.finish_line.reached);
    let Err(Error::Remote {
        status: code,
        message,
    }) = remote
        .retire(
            RetireRequest {
                reason: "done".into(),
                undo: false,
                quiet_window: None,
            },
            None,
        )
        .await
    else {
        panic!("retiring with a tenant on legacy must be refused")
    };
    assert_eq!(code, 409);
    assert!(message.contains("1 tenant not migrated"), "{message}");
    let back = remote
        .rollback(
            &id("acme"),
            RollbackRequest {
                reason: "support tickets".into(),
                to: None,
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(back.tenant.stage, "shadow");
    let events = remote
        .audit(AuditFilter {
            tenant: Some(id("acme")),
            ..AuditFilter::default()
        })
        .await
        .unwrap()
        .events;
    let trail: Vec<(String, String, String)> = events
        .iter()
        .map(|e| (e.to.clone(), e.actor.clone(), e.reason.clone()))
        .collect();
    assert_eq!(
        trail,
        vec![
            ("legacy".into(), "api".into(), "onboarding".into()),
            (
                "shadow".into(),
                "api".into(),
                "promoted to shadow: parallel run starts; parallel run".into()
            ),
            (
                "migrated".into(),
                "api".into(),
                "promoted: readiness passed; readiness passed in review".into()
            ),
            ("shadow".into(), "api".into(), "support tickets".into()),
        ]
    );
    // Rotating the token locks the old one out at once.
    let fresh = token::rotate(&*api.store, Actor::Cli, "rotation drill")
        .await
        .unwrap();
    let Err(Error::Remote { status, .. }) = remote.status().await else {
        panic!("the old token must stop working")
    };
    assert_eq!(status, 401);
    let rotated = Remote::new(&api.base, &fresh).unwrap();
    assert_eq!(rotated.status().await.unwrap().tenants, 2);
}

/// Tenant configuration through the API: the initial one, a write, refusals that
/// name the field, versions, a domain of another tenant, history and restore,
/// and the schema.
#[tokio::test]
async fn tenant_configuration_is_versioned_validated_and_restorable() {
    use ficus_admin::api::{ConfigRequest, RestoreRequest};
    use serde_json::json;
    let api = start().await;
    let remote = Remote::new(&api.base, &api.token).unwrap();
    for (tenant, domain) in [("acme", "acme.test"), ("globex", "globex.test")] {
        remote
            .add(AddRequest {
                id: tenant.into(),
                name: Some(format!("{tenant} inc")),
                domains: vec![domain.into()],
                stage: None,
                reason: "onboarding".into(),
            })
            .await
            .unwrap();
    }
    // Added by hand, a tenant gets its configuration the way a billing event
    // gives one: the template with its name and domains, by provisioning.
    let initial = remote.config(&id("acme"), None).await.unwrap();
    assert_eq!(
        (initial.version, initial.actor.as_deref()),
        (1, Some("provisioning"))
    );
    assert_eq!(initial.config["display_name"], "acme inc");
    assert_eq!(initial.config["domains"], json!(["acme.test"]));

    let put = |body: serde_json::Value, if_match: Option<&str>| {
        let mut r = api
            .http
            .put(format!("{}/v1/tenants/acme/config", api.base))
            .bearer_auth(&api.token)
            .json(&body);
        if let Some(v) = if_match {
            r = r.header("if-match", v.to_string());
        }
        async move {
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap();
            (status, body)
        }
    };
    let doc = json!({
        "display_name": "Acme Homes",
        "app_name": "Acme",
        "branding": {"primary_color": "#0a7f5a", "logo_url": "https://cdn.acme.test/logo.svg"},
        "domains": ["homes.acme.test"],
        "locale": "en-GB",
        "features": {"dark_mode": {"default": false, "ios": true}}
    });
    let with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut d = doc.clone();
        edit(&mut d);
        json!({"config": d, "reason": "rebrand"})
    };
    let refusals = [
        (
            with(&|d| d["branding"]["primary_color"] = json!("teal")),
            Some("1"),
            400,
            "config.branding.primary_color: \"teal\" is not a colour: use #rgb or #rrggbb",
        ),
        (
            with(&|d| d["colour"] = json!("#fff")),
            Some("1"),
            400,
            "config.colour: unknown key; expected one of display_name, app_name, branding, domains, locale, features",
        ),
        (
            with(&|d| d["domains"] = json!(["globex.test"])),
            Some("1"),
            409,
            "domain globex.test already belongs to tenant globex",
        ),
        (
            with(&|_| {}),
            None,
            428,
            "If-Match with the version this change was decided on is required",
        ),
        (
            with(&|_| {}),
            Some("3"),
            412,
            "tenant acme's configuration changed since version 3: it is at version 1; nothing was written",
        ),
        (
            json!({"config": doc, "reason": " "}),
            Some("1"),
            400,
            "a reason is required and must not be empty",
        ),
    ];
    for (body, if_match, status, error) in refusals {
        let got = put(body, if_match).await;
        assert_eq!(got, (status, json!({ "error": error })));
    }
    assert_eq!(remote.config(&id("acme"), None).await.unwrap().version, 1);

    let (status, v1) = put(with(&|_| {}), Some("1")).await;
    assert_eq!(status, 200, "{v1}");
    assert_eq!(
        (v1["version"].clone(), v1["actor"].clone()),
        (json!(2), json!("api"))
    );
    // The domains moved with it.
    let show = remote.show(&id("acme"), 0).await.unwrap();
    assert_eq!(show.tenant.domains, ["homes.acme.test"]);
    let v2 = remote
        .set_config(
            &id("acme"),
            ConfigRequest {
                config: with(&|d| d["app_name"] = json!("Acme Next"))["config"].clone(),
                reason: "new app name".into(),
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(v2.version, 3);
    let restored = remote
        .restore_config(
            &id("acme"),
            RestoreRequest {
                version: 2,
                reason: "the old name tested better".into(),
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(restored.version, 4);
    assert_eq!(restored.config["app_name"], "Acme");
    let history = remote.config_history(&id("acme")).await.unwrap();
    let lines: Vec<(u64, String)> = history
        .versions
        .iter()
        .map(|v| (v.version, v.reason.clone().unwrap()))
        .collect();
    assert_eq!(
        lines,
        [
            (
                4,
                "restore version 2: the old name tested better".to_string()
            ),
            (3, "new app name".to_string()),
            (2, "rebrand".to_string()),
            (
                1,
                "initial configuration from the tenant's addition by an operator".to_string()
            ),
        ]
    );
    assert_eq!(
        remote.config(&id("acme"), Some(3)).await.unwrap().config["app_name"],
        "Acme Next"
    );
    let schema: serde_json::Value = api
        .http
        .get(format!("{}/v1/tenant-config.schema.json", api.base))
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(schema["title"], "Ficus tenant configuration");
}

/// The billing webhook on a real listener: every bad delivery refused with its
/// status and nothing written; one good event delivered ten times, five of them
/// at once, makes exactly one tenant with its configuration; cancellation
/// suspends it and deletes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_events_provision_exactly_once_and_bad_deliveries_write_nothing() {
    use ficus_admin::provision::{Hooks, SIGNATURE_HEADER, sign};
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    let url = StoreUrl::parse(&format!("sqlite:{}", dir.path().join("f.db").display())).unwrap();
    let store = ficus_store::open(&url, OpenMode::Create).await.unwrap();
    let token = token::ensure(&*store, Actor::Cli).await.unwrap().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let hooks = Hooks {
        secret: Some(std::sync::Arc::from(b"whsec_test".to_vec())),
        database_url: None,
    };
    tokio::spawn(server::serve_with(
        listener,
        Arc::clone(&store),
        hooks,
        std::future::pending(),
    ));
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let now = now_ms() / 1000;
    let deliver = |body: Vec<u8>, signature: Option<String>, content_type: &'static str| {
        let mut r = http
            .post(format!("{base}/v1/hooks/billing"))
            .header("content-type", content_type)
            .body(body);
        if let Some(s) = signature {
            r = r.header(SIGNATURE_HEADER, s);
        }
        async move {
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap_or(serde_json::Value::Null);
            (status, body)
        }
    };
    let event = json!({
        "id": "evt_1001",
        "type": "subscription.created",
        "data": {"customer": {"name": "Initech Homes"}, "domain": "portal.initech.test"}
    })
    .to_string()
    .into_bytes();
    let signed = |body: &[u8], at: i64| Some(sign(b"whsec_test", at, body));
    let err = |v: &serde_json::Value| v["error"].as_str().unwrap_or("").to_string();

    let bad = vec![
        (
            deliver(event.clone(), None, "application/json").await,
            401,
            "the ficus-signature header is missing",
        ),
        (
            deliver(
                event.clone(),
                Some(sign(b"wrong", now, &event)),
                "application/json",
            )
            .await,
            401,
            "the signature does not match the body",
        ),
        (
            deliver(event.clone(), signed(&event, now - 600), "application/json").await,
            401,
            "the signature's timestamp is 600 s away from now (at most 300 s): a replay or a wrong clock",
        ),
        (
            deliver(
                b"{\"id\": ".to_vec(),
                signed(b"{\"id\": ", now),
                "application/json",
            )
            .await,
            400,
            "the body is not JSON: EOF while parsing a value at line 1 column 7",
        ),
        (
            deliver(event.clone(), signed(&event, now), "text/plain").await,
            415,
            "send the event as application/json",
        ),
    ];
    for ((status, body), want_status, want) in bad {
        // The stale signature's age is counted on the server a moment after
        // `now` was read here: a second may have turned in between.
        let said = err(&body).replace("is 601 s away", "is 600 s away");
        assert_eq!((status, said.as_str()), (want_status, want));
    }
    let unknown = json!({"id": "evt_x", "type": "invoice.paid"})
        .to_string()
        .into_bytes();
    let (status, body) = deliver(unknown.clone(), signed(&unknown, now), "application/json").await;
    assert_eq!(
        (status, err(&body).as_str()),
        (
            422,
            "event type \"invoice.paid\" is neither a creation nor a cancellation"
        )
    );
    let big = vec![b' '; 100 * 1024];
    let (status, _) = deliver(big.clone(), signed(&big, now), "application/json").await;
    assert_eq!(status, 413);
    assert!(
        store.tenants(None).await.unwrap().is_empty(),
        "a refused delivery wrote a tenant"
    );
    assert!(
        store.provision_jobs(None, 10).await.unwrap().is_empty(),
        "a refused delivery wrote a job"
    );

    // Ten deliveries of one event, five of them at once: one tenant.
    let mut answers = Vec::new();
    let mut concurrent = Vec::new();
    for _ in 0..5 {
        concurrent.push(deliver(
            event.clone(),
            signed(&event, now),
            "application/json",
        ));
    }
    for a in futures_join(concurrent).await {
        answers.push(a);
    }
    for _ in 0..5 {
        answers.push(deliver(event.clone(), signed(&event, now), "application/json").await);
    }
    // A delivery that arrives while the first is still at work is told so
    // (202, pending, duplicate); the later ones see it done.
    let statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 202),
        "{answers:?}"
    );
    assert!(statuses[5..].iter().all(|s| *s == 200), "{answers:?}");
    let firsts = answers
        .iter()
        .filter(|(_, b)| b["duplicate"].is_null())
        .count();
    assert_eq!(
        firsts, 1,
        "exactly one delivery carried the event out: {answers:?}"
    );
    let tenants = store.tenants(None).await.unwrap();
    assert_eq!(tenants.len(), 1);
    let t = &tenants[0];
    assert_eq!(
        (t.id.as_str(), t.name.as_str(), t.stage.as_str()),
        ("initech-homes", "Initech Homes", "legacy")
    );
    assert_eq!(
        t.domains.iter().map(|d| d.as_str()).collect::<Vec<_>>(),
        ["portal.initech.test"]
    );
    let config = store.tenant_config(&t.id, None).await.unwrap().unwrap();
    assert_eq!((config.version, config.actor), (1, Actor::Provisioning));
    let jobs = store.provision_jobs(None, 10).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].steps, ["tenant", "config", "database"]);

    // Cancellation suspends; nothing is deleted; a repeat changes nothing.
    let cancel = json!({"id": "evt_1002", "type": "subscription.cancelled", "data": {"customer": {"name": "Initech Homes"}}})
        .to_string()
        .into_bytes();
    let (status, body) = deliver(cancel.clone(), signed(&cancel, now), "application/json").await;
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("done")),
        "{body}"
    );
    let t = store.tenant(&t.id).await.unwrap().unwrap();
    assert!(t.suspended);
    assert_eq!(
        store
            .tenant_config(&t.id, None)
            .await
            .unwrap()
            .unwrap()
            .version,
        1
    );
    let audit = store
        .audit(ficus_store::AuditQuery {
            tenant: Some(t.id.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let lines: Vec<String> = audit
        .iter()
        .map(|e| format!("{} {}", e.actor, e.reason))
        .collect();
    assert_eq!(
        lines,
        [
            "provisioning provisioned from billing event evt_1001",
            "provisioning provisioning: initial configuration written, from billing event evt_1001",
            "provisioning suspended: subscription ended, billing event evt_1002"
        ]
    );
    // The jobs, through the API.
    let remote = Remote::new(&base, &token).unwrap();
    let listed = remote.jobs(Some("done")).await.unwrap();
    assert_eq!(listed.jobs.len(), 2);
    let Err(Error::Remote { status, .. }) = remote.retry_job("evt_1001").await else {
        panic!("a done job is not run again")
    };
    assert_eq!(status, 409);
}

/// Regression (the soak's seed 1: a tenant born twice from one event
/// delivered twice to two replicas): the resumer had read the job while the
/// delivery that created it was still at its first step, chose the tenant's id
/// after the delivery had made the tenant, found `name` taken, and made
/// `name-2`. A runner holding the job as it was before its tenant was bound now
/// learns the bound tenant and makes nothing twice, nor notes anything twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_runner_of_a_billing_job_read_before_its_tenant_was_bound_makes_no_second_tenant()
{
    use ficus_admin::provision::{self, Hooks};
    use ficus_store::JobState;
    let dir = tempfile::tempdir().unwrap();
    let url = StoreUrl::parse(&format!("sqlite:{}", dir.path().join("f.db").display())).unwrap();
    let store = ficus_store::open(&url, OpenMode::Create).await.unwrap();
    let hooks = Hooks::default();
    let event = serde_json::json!({
        "id": "evt_twice",
        "type": "subscription.created",
        "data": {"customer": {"name": "Initech Homes"}, "domain": "portal.initech.test"}
    })
    .to_string();
    let (read_early, created) = store
        .claim_provision_job("evt_twice", "create", &event)
        .await
        .unwrap();
    assert!(created);
    let first = provision::run(&store, &hooks, read_early.clone())
        .await
        .unwrap();
    assert_eq!(first.state, JobState::Done);
    let second = provision::run(&store, &hooks, read_early).await.unwrap();
    assert_eq!(
        (second.state, second.tenant.as_ref().map(TenantId::as_str)),
        (JobState::Done, Some("initech-homes"))
    );
    let ids: Vec<String> = store
        .tenants(None)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id.to_string())
        .collect();
    assert_eq!(ids, ["initech-homes"]);
    let job = store.provision_job("evt_twice").await.unwrap().unwrap();
    assert_eq!(
        (job.state, job.tenant.map(|t| t.to_string()), job.steps),
        (
            JobState::Done,
            Some("initech-homes".to_string()),
            vec!["tenant".into(), "config".into(), "database".into()]
        )
    );
    let audit: Vec<String> = store
        .audit(ficus_store::AuditQuery::default())
        .await
        .unwrap()
        .into_iter()
        .map(|e| format!("{} {}", e.actor, e.reason))
        .collect();
    assert_eq!(
        audit,
        [
            "provisioning provisioned from billing event evt_twice",
            "provisioning provisioning: initial configuration written, from billing event evt_twice"
        ]
    );
}

/// Awaits every future, in order.
async fn futures_join<F>(fs: Vec<F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// Mismatch classes through the API: listed with their counts, resolved,
/// accepted and reopened with the same refusals as the CLI, each one a status
/// of its own, and the change in the class's history.
#[tokio::test]
async fn mismatch_classes_are_listed_resolved_accepted_and_reopened_over_http() {
    use ficus_admin::api::ClassChangeRequest;
    use ficus_store::{ClassCount, Evidence};
    let api = start().await;
    let remote = Remote::new(&api.base, &api.token).unwrap();
    remote
        .add(AddRequest {
            id: "acme".into(),
            name: None,
            domains: vec![],
            stage: Some("shadow".into()),
            reason: "onboarding".into(),
        })
        .await
        .unwrap();
    let at = Timestamp::from_unix_millis(now_ms() - 1_000);
    let class = |path: &str, n: u64| {
        let key = ficus_diff::class::ClassKey {
            endpoint: "GET /homes/{id}".into(),
            path: path.into(),
            kind: ficus_diff::Kind::Value,
        };
        ClassCount {
            tenant: id("acme"),
            id: key.id(),
            endpoint: key.endpoint,
            path: key.path,
            kind: "value".into(),
            additive: false,
            version: "3.1".into(),
            count: n,
            first_at: at,
            last_at: at,
            example: None,
        }
    };
    let (price, body) = (class("$.price", 7), class("$", 2));
    api.store
        .record_comparisons(&Evidence {
            classes: vec![price.clone(), body.clone()],
            ..Evidence::default()
        })
        .await
        .unwrap();
    let listed = remote
        .mismatch_classes(Some(&id("acme")), Some("open"))
        .await
        .unwrap();
    let counted: Vec<(&str, u64)> = listed
        .classes
        .iter()
        .map(|c| (c.path.as_str(), c.counted))
        .collect();
    assert_eq!(counted, [("$.price", 7), ("$", 2)]);
    let post = |path: String, body: serde_json::Value| {
        api.http
            .post(format!("{}{path}", api.base))
            .bearer_auth(&api.token)
            .json(&body)
            .send()
    };
    let cases = [
        (
            format!("/v1/mismatch-classes/{}/resolve", price.id),
            serde_json::json!({"reason": ""}),
            400,
            "a reason is required",
        ),
        (
            format!("/v1/mismatch-classes/{}/resolve", price.id),
            serde_json::json!({"reason": "x", "fixed_in": "\u{7}"}),
            400,
            "fixed_in must be at most 128 printable characters",
        ),
        (
            format!("/v1/mismatch-classes/{}/undo", price.id),
            serde_json::json!({"reason": "x"}),
            400,
            "undo\\\" is not resolve, accept or reopen",
        ),
        (
            "/v1/mismatch-classes/abcdef/resolve".to_string(),
            serde_json::json!({"reason": "x"}),
            404,
            "no mismatch class abcdef",
        ),
        (
            format!("/v1/mismatch-classes/{}/accept", body.id),
            serde_json::json!({"reason": "x"}),
            409,
            "would hide every body difference",
        ),
        (
            format!("/v1/mismatch-classes/{}/reopen", price.id),
            serde_json::json!({"reason": "x"}),
            409,
            "is open; only a resolved or accepted class can be reopened",
        ),
    ];
    for (path, body, status, expected) in cases {
        let r = post(path.clone(), body).await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{path}");
        let text = r.text().await.unwrap();
        assert!(text.contains(expected), "{path}: {text}");
    }
    let resolved = remote
        .change_class(
            &price.id,
            "resolve",
            ClassChangeRequest {
                reason: "fixed".into(),
                fixed_in: Some("3.2".into()),
                whole_endpoint: false,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (
            resolved.class.state.as_str(),
            resolved.class.fixed_in.as_deref()
        ),
        ("resolved", Some("3.2"))
    );
    assert_eq!(resolved.history[0].actor, "api");
    let accepted = remote
        .change_class(
            &body.id[..8],
            "accept",
            ClassChangeRequest {
                reason: "the export is binary now".into(),
                fixed_in: None,
                whole_endpoint: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(accepted.class.state, "accepted");
    // Both set aside: nothing counts for acme any more.
    let r = remote
        .readiness(&id("acme"), &GateOverrides::default())
        .await
        .unwrap();
    assert!(r.open_classes.is_empty(), "{r:?}");
    assert_eq!(
        r.criteria
            .iter()
            .find(|c| c.name == "mismatches")
            .unwrap()
            .detail,
        "0 mismatched; at most 0 allowed"
    );
    let reopened = remote
        .change_class(
            &price.id,
            "reopen",
            ClassChangeRequest {
                reason: "not fixed after all".into(),
                ..ClassChangeRequest::default()
            },
        )
        .await
        .unwrap();
    let actions: Vec<&str> = reopened.history.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["resolved", "reopened"]);
    let r = remote
        .readiness(&id("acme"), &GateOverrides::default())
        .await
        .unwrap();
    assert_eq!(
        r.open_classes[0].counted, 7,
        "the withdrawn resolution's evidence counts again"
    );
}

/// Routes over HTTP: a stage set against its version (If-Match), a release, a
/// refusal of each kind with its status, and the held route on the status page.
#[tokio::test]
async fn routes_are_staged_released_and_held_over_http() {
    use ficus_admin::api::{RouteMarkRequest, RouteReleaseRequest, RouteStageRequest};
    let api = start().await;
    let remote = Remote::new(&api.base, &api.token).unwrap();
    remote
        .add(AddRequest {
            id: "acme".into(),
            name: None,
            domains: vec![],
            stage: Some("migrated".into()),
            reason: "onboarding".into(),
        })
        .await
        .unwrap();
    let release = |route: &str, tenant: Option<&str>, destructive| RouteReleaseRequest {
        route: route.into(),
        tenant: tenant.map(str::to_string),
        destructive,
        reason: "canary".into(),
    };
    let done = remote
        .release_route(release("POST /homes", Some("acme"), false))
        .await
        .unwrap();
    assert_eq!((done.stage.as_str(), done.version), ("migrated", 1));
    let staged = remote
        .route_stage(
            RouteStageRequest {
                route: "POST /homes".into(),
                stage: "shadow".into(),
                tenant: None,
                destructive: false,
                reason: "look first".into(),
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(staged.version, 1);
    remote
        .mark_route(RouteMarkRequest {
            route: "POST /homes/{id}/purge".into(),
            destructive: true,
            reason: "drops a home's history".into(),
        })
        .await
        .unwrap();
    let put = |version: &str, body: serde_json::Value| {
        let mut r = api
            .http
            .put(format!("{}/v1/routes/stage", api.base))
            .bearer_auth(&api.token)
            .json(&body);
        if !version.is_empty() {
            r = r.header("If-Match", version);
        }
        r.send()
    };
    let post = |path: &str, body: serde_json::Value| {
        api.http
            .post(format!("{}{path}", api.base))
            .bearer_auth(&api.token)
            .json(&body)
            .send()
    };
    let stage = serde_json::json!({"route": "POST /homes", "stage": "legacy", "reason": "x"});
    for (r, status, expected) in [
        (put("", stage.clone()).await.unwrap(), 428, "If-Match"),
        (
            put("\"0\"", stage.clone()).await.unwrap(),
            412,
            "changed since version 0: it is at version 1",
        ),
        (
            put(
                "\"1\"",
                serde_json::json!({"route": "POST homes", "stage": "legacy", "reason": "x"}),
            )
            .await
            .unwrap(),
            400,
            "is not \\\"METHOD /template\\\"",
        ),
        (
            post(
                "/v1/routes/release",
                serde_json::json!({"route": "GET /homes", "reason": "x"}),
            )
            .await
            .unwrap(),
            409,
            "is not held",
        ),
        (
            post(
                "/v1/routes/release",
                serde_json::json!({"route": "POST /homes/{id}/purge", "reason": "x"}),
            )
            .await
            .unwrap(),
            409,
            "is destructive",
        ),
        (
            post(
                "/v1/routes/release",
                serde_json::json!({"route": "POST /homes", "tenant": "nobody", "reason": "x"}),
            )
            .await
            .unwrap(),
            404,
            "no tenant nobody",
        ),
        (
            post(
                "/v1/routes/hold",
                serde_json::json!({"route": "POST /homes", "tenant": "acme", "reason": ""}),
            )
            .await
            .unwrap(),
            400,
            "a reason is required",
        ),
        (
            put(
                "\"0\"",
                serde_json::json!({"route": "DELETE /homes/{id}", "stage": "migrated", "reason": "x"}),
            )
            .await
            .unwrap(),
            409,
            "needs a second confirmation",
        ),
        (
            post(
                "/v1/routes/hold",
                serde_json::json!({"route": "* /homes", "reason": "x"}),
            )
            .await
            .unwrap(),
            400,
            "a stage or a mark names one method",
        ),
    ] {
        assert_eq!(r.status().as_u16(), status, "{expected}");
        let text = r.text().await.unwrap();
        assert!(text.contains(expected), "{expected}: {text}");
    }
    let destructive = remote
        .release_route(release("POST /homes/{id}/purge", Some("acme"), true))
        .await
        .unwrap();
    assert_eq!(destructive.tenant.as_deref(), Some("acme"));
    let routes = remote.routes(None).await.unwrap();
    let homes = routes
        .routes
        .iter()
        .find(|r| r.route == "POST /homes")
        .unwrap();
    assert_eq!(
        (homes.stage.as_str(), homes.held, homes.overrides.len()),
        ("shadow", true, 1)
    );
    let status = remote.status().await.unwrap();
    let held: Vec<(&str, Option<usize>)> = status
        .held_routes
        .iter()
        .map(|h| (h.route.as_str(), h.tenants.as_ref().map(Vec::len)))
        .collect();
    // The purge route is released for its canary only: still held for the rest.
    assert_eq!(
        held,
        [("POST /homes", None), ("POST /homes/{id}/purge", None)]
    );
    assert!(
        status
            .finish_line
            .blockers
            .contains(&"route POST /homes is held on legacy".to_string())
    );
    // Held for every tenant means the canaries too.
    let held = remote
        .hold_route(release("POST /homes", None, false))
        .await
        .unwrap();
    assert_eq!((held.stage.as_str(), held.version), ("legacy", 2));
    let routes = remote.routes(None).await.unwrap();
    let homes = routes
        .routes
        .iter()
        .find(|r| r.route == "POST /homes")
        .unwrap();
    let overrides: Vec<(&str, &str)> = homes
        .overrides
        .iter()
        .map(|o| (o.tenant.as_str(), o.stage.as_str()))
        .collect();
    assert_eq!(overrides, [("acme", "legacy")]);
}

/// `readiness_all` judges every tenant from one bulk read; each verdict must be
/// the one `readiness` gives the tenant alone.
#[tokio::test]
async fn judging_every_tenant_at_once_agrees_with_judging_each_alone() {
    let api = start().await;
    let c = ficus_admin::Direct::new(api.store.clone(), Actor::Cli);
    for tenant in ["acme", "beta", "gamma"] {
        c.add(AddRequest {
            id: tenant.into(),
            name: None,
            domains: vec![],
            stage: Some("shadow".into()),
            reason: "onboarding".into(),
        })
        .await
        .unwrap();
    }
    ready_evidence(&*api.store, "acme").await;
    ready_evidence(&*api.store, "beta").await;
    price_mismatches(&*api.store, "beta", "0123456789abcdef", 4).await;
    let all = c.readiness_all(&GateOverrides::default()).await.unwrap();
    let order: Vec<&str> = all.tenants.iter().map(|r| r.tenant.as_str()).collect();
    assert_eq!(order, ["acme", "beta", "gamma"]);
    let ready: Vec<bool> = all.tenants.iter().map(|r| r.ready).collect();
    assert_eq!(ready, [true, false, false]);
    for r in &all.tenants {
        let alone = c
            .readiness(&id(&r.tenant), &GateOverrides::default())
            .await
            .unwrap();
        assert_eq!(*r, alone, "{}", r.tenant);
    }
}
