//! The parallel run end to end: shadow reads compared and their evidence in the
//! store, writes that reach exactly one backend, and a misbehaving new backend that
//! never changes what the client gets.

use crate::support::{
    Backend, PATIENCE, Proxy, Rig, client, dead_address, eventually, ficus, get_as,
};

/// GETs `path` through the proxy as acme with the request id `id`, which the
/// proxy keeps and passes on to both legs; returns the status.
async fn get_with_id(c: &reqwest::Client, proxy: &Proxy, path: &str, id: &str) -> u16 {
    c.get(proxy.url(path))
        .header("x-tenant-id", "acme")
        .header("x-request-id", id)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Whether `backend` has received a shadow leg of the request with the id `id`.
fn shadowed_id(backend: &Backend, id: &str) -> bool {
    backend
        .seen
        .lock()
        .unwrap()
        .iter()
        .any(|s| s.is_shadow() && s.headers.get("x-request-id").is_some_and(|v| v == id))
}

/// Waits until `ficus mismatches TENANT --json` lists at least `n` samples.
async fn mismatches(store: &str, tenant: &str, n: usize) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    eventually(PATIENCE, || {
        let out = ficus(store, &["mismatches", tenant, "--json", "--limit", "50"]);
        last = serde_json::from_str(&out).unwrap();
        let ok = last["mismatches"].as_array().is_some_and(|m| m.len() >= n);
        async move { ok }
    })
    .await;
    last
}

fn shown(store: &str, tenant: &str) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(&ficus(store, &["tenant", "show", tenant, "--json"]))
        .unwrap()["comparisons"]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deliberate_difference_is_caught_with_its_path_and_a_timestamp_is_noise() {
    // The echo endpoint names the backend in its body; a compare rule says that
    // field is expected to differ. The shadow timeout is generous, so that every
    // comparison completes on a busy machine and can be counted.
    let shadow = "[shadow]\nflush_ms = 100\ntimeout_ms = 60000\nnoise_rate = 0.0\n\
                  [[compare]]\nendpoint = \"GET /echo/{id}\"\nignore = [\"$.backend\"]\n";
    let Rig {
        store,
        legacy,
        new,
        proxy,
        dir: _dir,
    } = Rig::start_with(
        &[("acme", "shadow")],
        "",
        shadow,
        Backend::start("new").await,
    )
    .await;
    let c = client();
    for i in 0..20 {
        let (status, body) = get_as(&c, &proxy, "acme", &format!("/priced/{i}")).await;
        assert_eq!(
            (status, body["price"].as_i64()),
            (200, Some(100)),
            "the client always gets legacy's answer"
        );
        assert_eq!(
            get_as(&c, &proxy, "acme", &format!("/echo/{i}")).await.1["backend"],
            "legacy"
        );
    }
    let found = mismatches(&store, "acme", 1).await;
    let all = found["mismatches"].as_array().unwrap();
    for m in all {
        assert_eq!(m["endpoint"], "GET /priced/{id}", "{m}");
        let paths: Vec<&str> = m["differences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["path"].as_str().unwrap())
            .collect();
        assert_eq!(
            paths,
            ["$.price"],
            "only the real difference is reported, never the timestamp: {m}"
        );
        assert_eq!(
            (m["served_by"].as_str(), m["compared_with"].as_str()),
            (Some("legacy"), Some("new"))
        );
    }
    let noise: serde_json::Value =
        serde_json::from_str(&ficus(&store, &["noise", "--json"])).unwrap();
    let learned: Vec<(String, String)> = noise["noise"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["endpoint"].as_str().unwrap().to_string(),
                n["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        learned.contains(&("GET /priced/{id}".to_string(), "$.at".to_string())),
        "{learned:?}"
    );
    eventually(PATIENCE, || {
        let s = shown(&store, "acme");
        async move { s["compared"].as_u64() == Some(40) }
    })
    .await;
    let s = shown(&store, "acme");
    assert_eq!(
        (s["mismatched"].as_u64(), s["endpoints"].as_u64()),
        (Some(20), Some(2)),
        "{s}"
    );
    assert_eq!(new.shadowed(), 40);
    assert_eq!(
        legacy.served("GET"),
        40,
        "legacy served every client request once"
    );
    // The readable form names the path too.
    let text = ficus(&store, &["mismatches", "acme", "--limit", "1"]);
    assert!(
        text.contains("GET /priced/{id}") && text.contains("$.price"),
        "{text}"
    );
}

/// Regression test for the demo's flaky readiness: a read whose two answers
/// differed because the tenant's own write committed between them was
/// counted as a mismatch (and, once its class was resolved, as a regression).
/// A write that overlaps a compared read now makes it raced: shown, not
/// judged. The same read without a write is still a mismatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_raced_by_its_tenants_own_write_is_shown_raced_not_mismatched() {
    let shadow = "[shadow]\nflush_ms = 100\ntimeout_ms = 60000\nnoise_rate = 0.0\n";
    let Rig {
        store,
        legacy,
        new,
        proxy,
        dir: _dir,
    } = Rig::start_with(
        &[("acme", "shadow"), ("globex", "shadow")],
        "",
        shadow,
        Backend::start("new").await,
    )
    .await;
    let c = client();
    // Both backends hold `/held` until released; their answers differ in
    // `$.backend`.
    let read = tokio::spawn({
        let (c, url) = (c.clone(), proxy.url("/held"));
        async move {
            c.get(url)
                .header("x-tenant-id", "acme")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    // The read reached legacy, so its window is open; another tenant's write
    // does not race it, acme's own does.
    eventually(PATIENCE, || {
        let n = legacy.served("GET");
        async move { n == 1 }
    })
    .await;
    for tenant in ["globex", "acme"] {
        let status = c
            .post(proxy.url("/echo/searches"))
            .header("x-tenant-id", tenant)
            .body("{}")
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{tenant}'s write");
    }
    legacy.release();
    new.release();
    assert_eq!(read.await.unwrap(), 200);
    eventually(PATIENCE, || {
        let s = shown(&store, "acme");
        async move { s["raced"].as_u64() == Some(1) }
    })
    .await;
    // With no write in its window, the same read is a mismatch.
    assert_eq!(get_as(&c, &proxy, "acme", "/held").await.0, 200);
    eventually(PATIENCE, || {
        let s = shown(&store, "acme");
        async move { s["compared"].as_u64() == Some(1) }
    })
    .await;
    let s = shown(&store, "acme");
    assert_eq!(
        (
            s["compared"].as_u64(),
            s["mismatched"].as_u64(),
            s["raced"].as_u64()
        ),
        (Some(1), Some(1), Some(1)),
        "{s}"
    );
    let found = mismatches(&store, "acme", 1).await;
    assert_eq!(found["mismatches"].as_array().unwrap().len(), 1, "{found}");
    assert_eq!(new.shadowed(), 2, "both reads were shadowed");
    let text = ficus(&store, &["tenant", "show", "acme"]);
    assert!(
        text.contains("1 raced by the tenant's own writes (not judged)"),
        "{text}"
    );
}

/// Every tenant stage × route stage × method, against both backends' request
/// logs: each request reaches exactly one backend, the least advanced of its
/// tenant's and its route's stage decides which, and a second backend only ever
/// sees a safe read of an effective `shadow` (forward) or `migrated` (reverse).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tenant_stage_route_stage_and_method_reaches_exactly_one_backend() {
    let shadow = "[shadow]\nreverse = true\nflush_ms = 100\ntimeout_ms = 60000\n";
    let Rig {
        legacy,
        new,
        proxy,
        store,
        dir: _dir,
    } = Rig::start_with(
        &[
            ("initech", "legacy"),
            ("acme", "shadow"),
            ("globex", "migrated"),
        ],
        "",
        shadow,
        Backend::start("new").await,
    )
    .await;
    let c = client();
    let tenants = [("initech", 0), ("acme", 1), ("globex", 2)];
    let stages = ["legacy", "shadow", "migrated"];
    let methods = ["GET", "POST", "PUT", "PATCH", "DELETE"];
    let mut expected: std::collections::HashMap<&str, (usize, usize)> = Default::default();
    let mut legs: Vec<(String, &str)> = Vec::new();
    // A write route starts held at legacy, a read route at migrated.
    let mut at: std::collections::HashMap<&str, usize> = methods
        .iter()
        .map(|m| (*m, if *m == "GET" { 2 } else { 0 }))
        .collect();
    for (r, route_stage) in stages.iter().enumerate() {
        for method in methods {
            if at.insert(method, r) != Some(r) {
                let before = proxy.routing_seq().await;
                ficus(
                    &store,
                    &[
                        "route",
                        "stage",
                        &format!("{method} /homes/{{id}}"),
                        route_stage,
                        // DELETE is destructive: the second confirmation.
                        "--destructive",
                        "--reason",
                        "every combination",
                    ],
                );
                eventually(PATIENCE, || async { proxy.routing_seq().await > before }).await;
            }
            for (tenant, t) in tenants {
                let id = format!("{method}-{route_stage}-{tenant}");
                let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
                let mut request = c
                    .request(m, proxy.url("/homes/1"))
                    .header("x-tenant-id", tenant)
                    .header("x-request-id", &id);
                if method != "GET" {
                    request = request.body("{\"x\":1}");
                }
                let response = request.send().await.unwrap();
                assert!(
                    response.status().is_success(),
                    "{id}: {}",
                    response.status()
                );
                let effective = t.min(r);
                let e = expected.entry(method).or_default();
                if effective == 2 {
                    e.1 += 1;
                } else {
                    e.0 += 1;
                }
                match (method, effective) {
                    ("GET", 1) => legs.push((id, "new")),
                    ("GET", 2) => legs.push((id, "legacy")),
                    _ => {}
                }
            }
            assert_eq!(
                (legacy.served(method), new.served(method)),
                expected[method],
                "{method} with the route at {route_stage}"
            );
        }
    }
    // Every expected shadow leg arrives, on the other backend; then a marker's,
    // after which a leg started wrongly would have arrived too.
    eventually(PATIENCE, || {
        let all = legs
            .iter()
            .all(|(id, to)| shadowed_id(if *to == "new" { &new } else { &legacy }, id));
        async move { all }
    })
    .await;
    let marker = c
        .get(proxy.url("/a"))
        .header("x-tenant-id", "acme")
        .header("x-request-id", "marker-acme")
        .send()
        .await
        .unwrap();
    assert_eq!(marker.status(), 200);
    eventually(PATIENCE, || {
        let done = shadowed_id(&new, "marker-acme");
        async move { done }
    })
    .await;
    let mut shadowed: Vec<(String, String)> = legacy
        .seen
        .lock()
        .unwrap()
        .iter()
        .chain(new.seen.lock().unwrap().iter())
        .filter(|s| s.is_shadow())
        .map(|s| {
            let id = s.headers.get("x-request-id").cloned().unwrap_or_default();
            (s.method.clone(), id)
        })
        .filter(|(_, id)| !id.starts_with("marker-"))
        .collect();
    // The first reads of an endpoint also ask the serving backend again, to
    // learn noise: the same read, twice.
    shadowed.sort();
    shadowed.dedup();
    let mut wanted: Vec<(String, String)> = legs
        .iter()
        .map(|(id, _)| ("GET".to_string(), id.clone()))
        .collect();
    wanted.sort();
    assert_eq!(
        shadowed, wanted,
        "only safe reads are shadowed, and only those"
    );

    // A read with a body is not shadowed either.
    let r = c
        .get(proxy.url("/search"))
        .header("x-tenant-id", "acme")
        .header("x-request-id", "read-with-body")
        .body("{\"q\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let marker = c
        .get(proxy.url("/b"))
        .header("x-tenant-id", "acme")
        .header("x-request-id", "marker-2")
        .send()
        .await
        .unwrap();
    assert_eq!(marker.status(), 200);
    eventually(PATIENCE, || {
        let done = shadowed_id(&new, "marker-2");
        async move { done }
    })
    .await;
    assert!(!shadowed_id(&new, "read-with-body"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_dead_new_backend_never_changes_the_clients_answer() {
    // New holds every request it gets for as long as the test runs: slower than
    // any timeout, on any machine. A shadow leg gives up after 10 s, and at most
    // 4 run at once.
    let shadow = "[shadow]\ntimeout_ms = 10000\nflush_ms = 100\nmax_in_flight = 4\nunsafe_routes = [\"GET /export\"]\n";
    let Rig {
        store,
        legacy,
        new,
        proxy,
        dir: _dir,
    } = Rig::start_with(
        &[("acme", "shadow")],
        "",
        shadow,
        Backend::start_held("new").await,
    )
    .await;
    let c = client();
    // An unsafe route is never shadowed: once the shadow leg of a read sent after
    // it has reached new, new has still seen nothing of the export.
    assert_eq!(get_with_id(&c, &proxy, "/export/all", "export").await, 200);
    assert_eq!(get_with_id(&c, &proxy, "/echo/marker", "marker").await, 200);
    eventually(PATIENCE, || {
        let arrived = shadowed_id(&new, "marker");
        async move { arrived }
    })
    .await;
    assert!(!shadowed_id(&new, "export"), "an unsafe route was shadowed");
    // New answers none of the shadow legs it holds, yet every client gets
    // legacy's answer: no client waits for the shadow leg.
    for i in 0..40 {
        let (status, body) = get_as(&c, &proxy, "acme", &format!("/echo/{i}")).await;
        assert_eq!((status, body["backend"].as_str()), (200, Some("legacy")));
    }
    // The legs held by new fill the 4 slots, so later reads are shed; each held
    // leg then times out, an error.
    eventually(PATIENCE, || {
        let s = shown(&store, "acme");
        async move { s["errors"].as_u64().unwrap_or(0) >= 1 && s["shed"].as_u64().unwrap_or(0) >= 1 }
    })
    .await;
    let s = shown(&store, "acme");
    eprintln!("held new backend: {s}");
    assert_eq!(s["compared"].as_u64(), Some(0));
    assert!(legacy.served("GET") >= 42);
    drop(proxy);

    // A dead new backend: shadow errors, clients unaffected. The shadow timeout
    // is generous, so that every comparison ends as an error to count, however
    // long a busy machine takes to answer the client.
    let shadow = "[shadow]\nflush_ms = 100\ntimeout_ms = 60000\n";
    let mut dead = Backend::start("new").await;
    dead.addr = dead_address();
    let Rig {
        store,
        proxy,
        dir: _dir2,
        legacy: _legacy2,
        new: _new2,
    } = Rig::start_with(&[("acme", "shadow")], "", shadow, dead).await;
    for _ in 0..10 {
        assert_eq!(get_as(&c, &proxy, "acme", "/x").await.0, 200);
    }
    eventually(PATIENCE, || {
        let s = shown(&store, "acme");
        async move { s["errors"].as_u64() == Some(10) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_huge_answers_from_new_are_evidence_not_failures() {
    // A generous shadow timeout: 10 MB from new must be read to the cap and
    // shed, not cut short by a busy machine and counted as an error.
    let shadow = "[shadow]\nflush_ms = 100\ntimeout_ms = 60000\nbody_cap_bytes = 1048576\n";
    let Rig {
        store,
        proxy,
        dir: _dir,
        legacy: _legacy,
        new: _new,
    } = Rig::start_with(
        &[("acme", "shadow")],
        "",
        shadow,
        Backend::start("new").await,
    )
    .await;
    let c = client();
    let (status, body) = get_as(&c, &proxy, "acme", "/garbage").await;
    assert_eq!((status, body["id"].as_i64()), (200, Some(1)));
    let (status, body) = get_as(&c, &proxy, "acme", "/big").await;
    assert_eq!((status, body["blob"].as_str()), (200, Some("x")));
    let found = mismatches(&store, "acme", 1).await;
    let m = &found["mismatches"][0];
    assert_eq!(
        m["endpoint"], "GET /garbage",
        "invalid JSON from new is a mismatch on the whole body: {m}"
    );
    assert_eq!(m["differences"][0]["path"], "$");
    eventually(PATIENCE, || {
        let s = shown(&store, "acme");
        async move { s["shed"].as_u64() == Some(1) && s["mismatched"].as_u64() == Some(1) }
    })
    .await;
}
