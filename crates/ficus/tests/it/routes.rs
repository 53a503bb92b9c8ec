//! Routes end to end: writes held on legacy until released, a canary release the
//! guard takes back for its tenant alone, reads of a capability served by their
//! own service, the census, and the finish line that waits for held routes.

use serde_json::Value;

use crate::support::{
    Backend, HEADER_RULE, PATIENCE, Proxy, ProxySetup, Rig, client, eventually, ficus, ficus_fails,
    ficus_json,
};

/// Runs a `ficus route …` change and waits until the proxy routes by it.
async fn changed(proxy: &Proxy, store: &str, args: &[&str]) {
    let before = proxy.routing_seq().await;
    ficus(store, args);
    eventually(PATIENCE, || async { proxy.routing_seq().await > before }).await;
}

async fn send(
    c: &reqwest::Client,
    proxy: &Proxy,
    method: &str,
    tenant: &str,
    path: &str,
    agent: &str,
) -> (u16, Value) {
    let mut request = c
        .request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            proxy.url(path),
        )
        .header("x-tenant-id", tenant)
        .header("user-agent", agent);
    // A read with a body is never shadowed; only writes carry one.
    if method != "GET" {
        request = request.body("{}");
    }
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn route<'a>(routes: &'a Value, name: &str) -> &'a Value {
    routes["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == name)
        .unwrap_or_else(|| panic!("no route {name} in {routes:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_write_route_is_taken_back_by_the_guard_for_its_tenant_alone() {
    let guard = "[guard]\nwindow_ms = 3600000\nmin_requests = 5\nmax_error_rate = 0.5\n";
    let Rig {
        store,
        legacy,
        new,
        proxy,
        dir: _dir,
    } = Rig::start_with(
        &[("acme", "migrated"), ("globex", "migrated")],
        "destructive_routes = [\"POST /purge/{id}\"]",
        guard,
        Backend::start("new").await,
    )
    .await;
    // The configuration's destructive routes are marked in the store, where
    // every release is checked.
    eventually(PATIENCE, || {
        let routes = ficus_json(&store, &["routes"]);
        let marked = routes["routes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["route"] == "POST /purge/{id}" && r["destructive"] == true);
        async move { marked }
    })
    .await;
    let err = ficus_fails(
        &store,
        &["route", "release", "POST /purge/{id}", "--reason", "x"],
    );
    assert!(
        err.contains("route POST /purge/{id} is destructive"),
        "{err}"
    );
    let c = client();
    // Migrated, and still every write goes to legacy: held.
    for tenant in ["acme", "globex"] {
        let (_, body) = send(&c, &proxy, "POST", tenant, "/orders/1", "Homes/4.1").await;
        assert_eq!(body["backend"], "legacy", "{tenant}");
    }
    let (_, body) = send(&c, &proxy, "GET", "acme", "/orders/1", "Homes/4.1").await;
    assert_eq!(body["backend"], "new", "reads follow the tenant");
    // Not releasable by mistake.
    for (args, expected) in [
        (
            vec!["route", "release", "GET /orders/{id}", "--reason", "x"],
            "route GET /orders/{id} is not held",
        ),
        (
            vec!["route", "release", "DELETE /orders/{id}", "--reason", "x"],
            "route DELETE /orders/{id} is destructive: releasing it needs a second confirmation (--destructive)",
        ),
        (
            vec!["route", "release", "POST orders", "--reason", "x"],
            "route \"POST orders\" is not \"METHOD /template\"",
        ),
        (
            vec![
                "route",
                "release",
                "POST /orders/{id}",
                "--tenant",
                "nobody",
                "--reason",
                "x",
            ],
            "no tenant nobody",
        ),
        (
            vec!["route", "release", "POST /orders/{id}", "--reason", " "],
            "a reason is required",
        ),
    ] {
        let err = ficus_fails(&store, &args);
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    // A status route: new answers POST /status/500 with a 500.
    changed(
        &proxy,
        &store,
        &[
            "route",
            "release",
            "POST /status/{id}",
            "--tenant",
            "acme",
            "--reason",
            "canary",
        ],
    )
    .await;
    let served_before = new.served("ANY");
    for _ in 0..5 {
        let (status, _) = send(&c, &proxy, "POST", "acme", "/status/500", "Homes/4.2").await;
        assert_eq!(status, 500);
    }
    assert_eq!(
        new.served("ANY"),
        served_before + 5,
        "the canary's writes went to new"
    );
    // The guard holds the route again for acme, and only that.
    eventually(PATIENCE, || {
        let routes = ficus_json(&store, &["routes"]);
        let held = route(&routes, "POST /status/{id}")["overrides"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["tenant"] == "acme" && o["stage"] == "legacy");
        async move { held }
    })
    .await;
    let legacy_before = legacy.served("ANY");
    changed(
        &proxy,
        &store,
        &["route", "release", "POST /orders/{id}", "--reason", "all"],
    )
    .await;
    let (status, _) = send(&c, &proxy, "POST", "acme", "/status/500", "Homes/4.2").await;
    assert_eq!((status, legacy.served("ANY")), (500, legacy_before + 1));
    let shown = ficus_json(&store, &["tenant", "show", "acme"]);
    assert_eq!(
        shown["tenant"]["stage"], "migrated",
        "the tenant stays where it was"
    );
    let (_, body) = send(&c, &proxy, "POST", "globex", "/orders/2", "Homes/4.2").await;
    assert_eq!(body["backend"], "new", "a route released for all");
    // The audit says who held it again and why.
    let routes = ficus_json(&store, &["routes", "--tenant", "acme"]);
    let status_route = route(&routes, "POST /status/{id}");
    assert_eq!(status_route["held"], true);
    // The census: per tenant, backend and client version.
    eventually(PATIENCE, || {
        let routes = ficus_json(&store, &["routes", "--tenant", "acme"]);
        let seen: Vec<(String, String)> = route(&routes, "POST /orders/{id}")["census"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["backend"].as_str().unwrap().to_string(),
                    c["client"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        async move { seen == [("legacy".to_string(), "Homes/4.1".to_string())] }
    })
    .await;
    // Legacy cannot be retired while a write route is held for anyone.
    let err = ficus_fails(&store, &["retire-legacy", "--reason", "done"]);
    assert!(
        err.contains("route POST /status/{id} is held on legacy"),
        "{err}"
    );
    // Readiness lists the write routes the tenant called that stay held: it
    // reads them from the census, which the proxy writes on its next flush.
    eventually(PATIENCE, || {
        let r = ficus_json(&store, &["readiness", "acme"]);
        async move { r["held_routes"] == serde_json::json!(["POST /status/{id}"]) }
    })
    .await;
    let status = ficus(&store, &["status"]);
    assert!(
        status.contains("held      POST /status/{id} goes to legacy for every tenant"),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_a_capability_go_to_their_own_service() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        crate::support::sqlite_store(dir.path(), &[("acme", "shadow"), ("globex", "migrated")]);
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let valuations = Backend::start("valuations").await;
    let extra = format!(
        "{HEADER_RULE}[shadow]\nflush_ms = 100\ntimeout_ms = 60000\n\
         [backends.valuations]\nupstreams = [\"{}\"]\n\
         [[routes]]\nmatch = \"GET /homes/{{id}}/valuation\"\nservice = \"valuations\"\n",
        valuations.addr
    );
    let proxy = Proxy::start(ProxySetup {
        store: &store,
        legacy: vec![legacy.addr],
        new: vec![new.addr],
        extra: &extra,
        ..Default::default()
    })
    .await;
    let c = client();
    let (_, body) = send(&c, &proxy, "GET", "globex", "/homes/7/valuation", "web").await;
    assert_eq!(body["backend"], "valuations");
    let (_, body) = send(&c, &proxy, "GET", "globex", "/homes/7", "web").await;
    assert_eq!(body["backend"], "new");
    // In shadow, legacy answers and the route's service is the one compared.
    let (_, body) = send(&c, &proxy, "GET", "acme", "/homes/7/valuation", "web").await;
    assert_eq!(body["backend"], "legacy");
    eventually(PATIENCE, || {
        let done = valuations.shadowed() >= 1;
        async move { done }
    })
    .await;
    assert_eq!(new.shadowed(), 0, "new never saw the valuation read");
    eventually(PATIENCE, || {
        let routes = ficus_json(&store, &["routes", "--tenant", "globex"]);
        let backends: Vec<String> = routes["routes"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r["census"].as_array().unwrap().clone())
            .map(|c| c["backend"].as_str().unwrap().to_string())
            .collect();
        async move { backends.contains(&"valuations".to_string()) }
    })
    .await;
    // What the new side serves without a [[routes]] entry shows as unmapped
    // (once both reads are in the census: a flush may fall between them).
    eventually(PATIENCE, || {
        let routes = ficus_json(&store, &["routes", "--tenant", "globex"]);
        let unmapped: Vec<(String, bool)> = routes["routes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["route"].as_str().unwrap().to_string(),
                    r["unmapped"].as_bool().unwrap(),
                )
            })
            .collect();
        async move {
            unmapped
                == [
                    ("GET /homes/{id}".to_string(), true),
                    ("GET /homes/{id}/valuation".to_string(), false),
                ]
        }
    })
    .await;
    // Writes held by default; released by default, they follow the tenant.
    let (_, body) = send(&c, &proxy, "POST", "globex", "/orders/1", "web").await;
    assert_eq!(body["backend"], "legacy");
    let before = proxy.routing_seq().await;
    let out = ficus(
        &store,
        &[
            "route",
            "default",
            "released",
            "--reason",
            "writes follow tenants",
        ],
    );
    assert!(out.contains("follow their tenant's stage"), "{out}");
    eventually(PATIENCE, || async { proxy.routing_seq().await > before }).await;
    let (_, body) = send(&c, &proxy, "POST", "globex", "/orders/1", "web").await;
    assert_eq!(body["backend"], "new");
    let (_, body) = send(&c, &proxy, "POST", "acme", "/orders/1", "web").await;
    assert_eq!(
        body["backend"], "legacy",
        "a shadow tenant writes to legacy"
    );
}
