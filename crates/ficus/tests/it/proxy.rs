//! `ficus proxy` end to end: a real proxy process between real backends, routing by
//! the stages in a real store. Faults are real too: dead and resetting upstreams,
//! malformed bytes on the wire, a PostgreSQL store stopped under load, signals.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};

use crate::support::{
    Backend, HEADER_RULE, PATIENCE, Proxy, ProxySetup, Rig, client, closing_backend, dead_address,
    eventually, ficus, get_as, recording_backend, resetting_backend, sqlite_store,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_stage_and_follows_a_stage_change() {
    let Rig {
        store,
        legacy,
        new: _new,
        proxy,
        dir: _dir,
    } = Rig::start(&[("acme", "legacy"), ("globex", "migrated")], "").await;
    let c = client();

    let (status, body) = get_as(&c, &proxy, "acme", "/homes/1?x=2").await;
    assert_eq!((status, body["backend"].as_str()), (200, Some("legacy")));
    assert_eq!(body["path"], "/homes/1?x=2");
    assert_eq!(get_as(&c, &proxy, "globex", "/").await.1["backend"], "new");
    assert_eq!(
        get_as(&c, &proxy, "nobody", "/").await.1["backend"],
        "legacy",
        "unknown tenants go to legacy by default"
    );
    assert_eq!(
        c.get(proxy.url("/")).send().await.unwrap().status(),
        200,
        "no tenant at all also goes to legacy"
    );

    // What the backend is told, and what a client cannot forge.
    let r = c
        .get(proxy.url("/h"))
        .header("x-tenant-id", "acme")
        .header("x-ficus-tenant", "globex")
        .header("x-ficus-backend", "new")
        .header("x-forwarded-for", "10.9.9.9")
        .send()
        .await
        .unwrap();
    let request_id = r
        .headers()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(request_id.len(), 16);
    let seen = legacy.last().unwrap();
    assert_eq!(seen.headers["x-ficus-tenant"], "acme");
    assert_eq!(seen.headers["x-ficus-backend"], "legacy");
    assert_eq!(seen.headers["x-request-id"], request_id);
    assert_eq!(seen.headers["x-forwarded-for"], "10.9.9.9, 127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["via"], "1.1 ficus");
    // A client's own request id and proxies before it: each sent once, as
    // the proxy's (the proxy writes its headers out itself, after the map).
    let r = c
        .get(proxy.url("/h"))
        .header("x-tenant-id", "acme")
        .header("x-request-id", "client-id-1")
        .header("via", "1.0 edge")
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "client-id-1");
    let seen = legacy.last().unwrap();
    assert_eq!(seen.headers["x-request-id"], "client-id-1");
    assert_eq!(seen.headers["via"], "1.0 edge, 1.1 ficus");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-ficus-tenant"], "acme");
    let r = c
        .get(proxy.url("/"))
        .header("x-request-id", "client-chosen-id")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "client-chosen-id");
    let unknown = legacy.last().unwrap();
    assert!(
        !unknown.headers.contains_key("x-ficus-tenant"),
        "no tenant header for an unresolved request"
    );

    // A stage change reaches the running proxy. How fast is for the benchmarks
    // to say; this test waits for it however busy the machine is.
    ficus(
        &store,
        &["tenant", "stage", "acme", "shadow", "--reason", "canary"],
    );
    ficus(
        &store,
        &["tenant", "stage", "acme", "migrated", "--reason", "clean"],
    );
    let took = eventually(PATIENCE, || {
        let c = c.clone();
        let proxy = &proxy;
        async move { get_as(&c, proxy, "acme", "/").await.1["backend"] == "new" }
    })
    .await;
    eprintln!("stage change visible after {took:?}");
    ficus(&store, &["tenant", "rollback", "acme", "--reason", "undo"]);
    eventually(PATIENCE, || {
        let c = c.clone();
        let proxy = &proxy;
        async move { get_as(&c, proxy, "acme", "/").await.1["backend"] == "legacy" }
    })
    .await;

    let metrics = proxy.metrics().await;
    assert!(
        metrics
            .contains("ficus_requests_total{backend=\"legacy\",stage=\"legacy\",status=\"2xx\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ficus_tenant_requests_total{backend=\"new\",tenant=\"globex\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("ficus_store_reachable 1"));
    assert!(metrics.contains("ficus_routing_snapshot_seq "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolves_tenants_by_host_domain_path_and_verified_jwt() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path(), &[("acme", "migrated"), ("globex", "migrated")]);
    ficus(
        &store,
        &[
            "tenant",
            "add",
            "initech",
            "--stage",
            "migrated",
            "--domain",
            "portal.initech.test",
        ],
    );
    let (legacy, new) = (Backend::start("legacy").await, Backend::start("new").await);
    let rules = "[[tenant_from]]\nhost = \"{tenant}.example.test\"\n\
                 [[tenant_from]]\npath_prefix = \"/t/{tenant}\"\nstrip = true\n\
                 [[tenant_from]]\njwt_claim = \"tenant\"\nhs256_secret_env = \"FICUS_TEST_JWT\"\n";
    let proxy = Proxy::start(ProxySetup {
        store: &store,
        legacy: vec![legacy.addr],
        new: vec![new.addr],
        extra: rules,
        env: vec![("FICUS_TEST_JWT", "jwt-secret-for-tests")],
        ..Default::default()
    })
    .await;
    let c = client();
    let tenant_of = |r: serde_json::Value| {
        (
            r["backend"].as_str().unwrap_or("").to_string(),
            r["tenant"].as_str().unwrap_or("").to_string(),
            r["path"].as_str().unwrap_or("").to_string(),
        )
    };
    let body = |r: reqwest::Response| async move { r.json::<serde_json::Value>().await.unwrap() };

    // (request path, Host header, backend, tenant, path the backend received)
    let cases = [
        ("/a", Some("acme.example.test"), ("new", "acme", "/a")),
        ("/b", Some("portal.initech.test"), ("new", "initech", "/b")),
        (
            "/t/globex/homes/7?q=1",
            None,
            ("new", "globex", "/homes/7?q=1"),
        ),
    ];
    for (path, host, (backend, tenant, forwarded)) in cases {
        let mut request = c.get(proxy.url(path));
        if let Some(h) = host {
            request = request.header("host", h);
        }
        let got = tenant_of(body(request.send().await.unwrap()).await);
        assert_eq!(
            got,
            (backend.into(), tenant.into(), forwarded.into()),
            "{path} with host {host:?}"
        );
    }

    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 60;
    let token = hs256(
        &format!("{{\"tenant\":\"globex\",\"exp\":{exp}}}"),
        b"jwt-secret-for-tests",
    );
    let r = c
        .get(proxy.url("/c"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        tenant_of(body(r).await),
        ("new".into(), "globex".into(), "/c".into())
    );
    let forged = hs256(
        &format!("{{\"tenant\":\"globex\",\"exp\":{exp}}}"),
        b"guessed-secret",
    );
    let r = c
        .get(proxy.url("/d"))
        .bearer_auth(&forged)
        .send()
        .await
        .unwrap();
    assert_eq!(
        tenant_of(body(r).await),
        ("legacy".into(), "".into(), "/d".into()),
        "a forged token selects no tenant"
    );
    assert!(
        !proxy.log_text().contains("jwt-secret-for-tests"),
        "the secret must never be logged"
    );
}

/// A compact HS256 JWT, built by hand so the test does not share the proxy's code.
fn hs256(claims: &str, secret: &[u8]) -> String {
    use base64_url as b64;
    let header = b64::encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = b64::encode(claims.as_bytes());
    let signing_input = format!("{header}.{payload}");
    let sig = hmac_sha256(secret, signing_input.as_bytes());
    format!("{signing_input}.{}", b64::encode(&sig))
}

/// Base64url without padding (RFC 7515), enough for test tokens.
mod base64_url {
    pub fn encode(data: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}

/// HMAC-SHA256 (RFC 2104) over a small SHA-256 (FIPS 180-4), for test tokens only.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    k[..key.len()].copy_from_slice(key);
    let inner: Vec<u8> = k
        .iter()
        .map(|b| b ^ 0x36)
        .chain(msg.iter().copied())
        .collect();
    let inner = sha256(&inner);
    let outer: Vec<u8> = k
        .iter()
        .map(|b| b ^ 0x5c)
        .chain(inner.iter().copied())
        .collect();
    sha256(&outer)
}

fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 64];
        for i in 0..16 {
            w[i] = u32::from_be_bytes([
                block[4 * i],
                block[4 * i + 1],
                block[4 * i + 2],
                block[4 * i + 3],
            ]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let mut v = h;
        for i in 0..64 {
            let s1 = v[4].rotate_right(6) ^ v[4].rotate_right(11) ^ v[4].rotate_right(25);
            let ch = (v[4] & v[5]) ^ (!v[4] & v[6]);
            let t1 = v[7]
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = v[0].rotate_right(2) ^ v[0].rotate_right(13) ^ v[0].rotate_right(22);
            let maj = (v[0] & v[1]) ^ (v[0] & v[2]) ^ (v[1] & v[2]);
            let t2 = s0.wrapping_add(maj);
            v = [
                t1.wrapping_add(t2),
                v[0],
                v[1],
                v[2],
                v[3].wrapping_add(t1),
                v[4],
                v[5],
                v[6],
            ];
        }
        for (a, b) in h.iter_mut().zip(v) {
            *a = a.wrapping_add(b);
        }
    }
    let mut out = [0u8; 32];
    for (i, word) in h.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&word.to_be_bytes());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tenants_can_be_rejected_and_retirement_sends_everything_to_new() {
    // A tenant still at legacy, the one retirement moves: at shadow, a
    // comparison started before retirement may re-ask legacy (to learn the
    // endpoint's noise) on its own task after the count below was taken
    // (regression: it failed so once in CI, 4 against 3). The decision that a
    // retired legacy is neither served nor compared is the core's routing
    // table test.
    let Rig {
        store,
        legacy,
        new,
        proxy,
        dir: _dir,
    } = Rig::start(&[("acme", "legacy")], "unknown_tenant = \"reject\"").await;
    let c = client();
    let (status, body) = get_as(&c, &proxy, "nobody", "/").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "unknown tenant");
    assert_eq!(body["request_id"].as_str().unwrap().len(), 16);
    assert_eq!(
        legacy.count() + new.count(),
        0,
        "a rejected request reaches no backend"
    );
    assert_eq!(get_as(&c, &proxy, "acme", "/").await.1["backend"], "legacy");

    // Retirement is a global flag in the store; the proxy never contacts legacy after it.
    let url = ficus_store::StoreUrl::parse(&store).unwrap();
    let s = ficus_store::open(&url, ficus_store::OpenMode::Existing)
        .await
        .unwrap();
    s.set_legacy_retired(true, ficus_core::Actor::Cli, "legacy is empty")
        .await
        .unwrap();
    eventually(PATIENCE, || {
        let c = c.clone();
        let proxy = &proxy;
        async move { get_as(&c, proxy, "acme", "/").await.1["backend"] == "new" }
    })
    .await;
    let before = legacy.count();
    for _ in 0..20 {
        assert_eq!(get_as(&c, &proxy, "acme", "/").await.1["backend"], "new");
    }
    assert_eq!(
        legacy.count(),
        before,
        "legacy is never contacted once retired"
    );
}

/// A pooled upstream connection the upstream closes under a request: a safe
/// read is sent again, once, on a new connection, with the head it was first
/// sent with; a write without an idempotency key is not, and fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_reused_connection_closes_is_sent_again_with_the_same_head_a_write_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path(), &[("acme", "legacy")]);
    let (legacy, heads) = closing_backend().await;
    let proxy = Proxy::start(ProxySetup {
        store: &store,
        legacy: vec![legacy],
        new: vec![dead_address()],
        extra: HEADER_RULE,
        ..Default::default()
    })
    .await;
    let c = client();
    // Whether a request goes on a pooled connection depends on whether the
    // last one was back in the pool when it came, so reads go until one has
    // met a closing connection (the second request on one), and every one of
    // them must be answered.
    let mut closed_under = None;
    for i in 0..50 {
        let r = c
            .get(proxy.url(&format!("/read/{i}?page=2")))
            .header("x-tenant-id", "acme")
            .header("x-custom", "Some Value")
            .header("accept", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "read {i}");
        let seen = heads.lock().unwrap().clone();
        if let Some(conn) = seen.iter().position(|heads| heads.len() == 2) {
            closed_under = Some((i, conn));
            break;
        }
    }
    let (i, conn) = closed_under.expect("a read met a closing connection");
    let seen = heads.lock().unwrap().clone();
    let first = &seen[conn][1];
    assert!(
        first.starts_with(&format!("GET /read/{i}?page=2 HTTP/1.1\r\n")),
        "{seen:?}"
    );
    assert!(
        first.to_ascii_lowercase().contains("x-custom: some value"),
        "{first}"
    );
    assert!(first.contains("x-forwarded-for"), "{first}");
    // Sent again once, as the first request of a new connection, with the
    // same head whatever the case of its names.
    let again: Vec<&String> = seen
        .iter()
        .skip(conn + 1)
        .flatten()
        .filter(|h| h.starts_with(&format!("GET /read/{i}?")))
        .collect();
    assert_eq!(again.len(), 1, "{seen:?}");
    let lines = |head: &str| {
        let mut lines: Vec<String> = head
            .lines()
            .map(|l| match l.split_once(':') {
                Some((name, value)) => format!("{}:{value}", name.to_ascii_lowercase()),
                None => l.to_string(),
            })
            .collect();
        lines.sort();
        lines
    };
    assert_eq!(lines(first), lines(again[0]));

    // A write closed under may have been applied: it is not sent again.
    let mut failed = None;
    for i in 0..50 {
        let r = c
            .post(proxy.url(&format!("/write/{i}")))
            .header("x-tenant-id", "acme")
            .body("{}")
            .send()
            .await
            .unwrap();
        if r.status() == 502 {
            failed = Some(i);
            break;
        }
        assert_eq!(r.status(), 200, "write {i}");
    }
    let i = failed.expect("a write met a closing connection");
    let seen = heads.lock().unwrap().clone();
    let sent = seen
        .iter()
        .flatten()
        .filter(|h| h.starts_with(&format!("POST /write/{i} ")))
        .count();
    assert_eq!(sent, 1, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speaks_http2_and_websocket_and_h2c_upstreams() {
    let Rig {
        store,
        legacy,
        new,
        proxy,
        dir: _dir,
    } = Rig::start(&[("acme", "legacy"), ("globex", "migrated")], "").await;
    // HTTP/2 from the client (prior knowledge, cleartext).
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .get(proxy.url("/over-h2"))
        .header("x-tenant-id", "globex")
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (body["backend"].as_str(), body["path"].as_str()),
        (Some("new"), Some("/over-h2"))
    );

    // WebSocket upgrade passes through to the tenant's backend. The backends'
    // read timeout also bounds each wait for a message on the upgraded
    // connection, so the rig's is generous (regression: with 2 s, an echo that
    // took longer to come back on a busy machine was cut, and the client saw
    // ResetWithoutClosingHandshake).
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{}/ws",
            proxy.addr
        ))
        .unwrap();
    request
        .headers_mut()
        .insert("x-tenant-id", "acme".parse().unwrap());
    let (mut socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.status(), 101);
    socket
        .send(tokio_tungstenite::tungstenite::Message::text("hello"))
        .await
        .unwrap();
    let reply = socket.next().await.unwrap().unwrap();
    assert_eq!(reply.into_text().unwrap().as_str(), "legacy: hello");
    drop(socket);
    drop(proxy);

    // h2c to an upstream that speaks HTTP/2 with prior knowledge.
    let proxy = Proxy::start(ProxySetup {
        store: &store,
        legacy: vec![legacy.addr],
        new: vec![new.addr],
        extra: HEADER_RULE,
        ..Default::default()
    })
    .await;
    let text = std::fs::read_to_string(&proxy.config).unwrap().replacen(
        "[backends.new]\n",
        "[backends.new]\nprotocol = \"h2c\"\n",
        1,
    );
    std::fs::write(&proxy.config, text).unwrap();
    proxy.signal("HUP");
    let c = client();
    eventually(PATIENCE, || {
        let log = proxy.log_text();
        async move { log.contains("configuration reloaded") }
    })
    .await;
    let (status, body) = get_as(&c, &proxy, "globex", "/via-h2c").await;
    assert_eq!((status, body["backend"].as_str()), (200, Some("new")));
    // An HTTP/2 upstream is told what an HTTP/1 one is, in its header map.
    let seen = new.last().unwrap();
    assert_eq!(seen.headers["x-ficus-tenant"], "globex");
    assert_eq!(seen.headers["x-ficus-backend"], "new");
    assert_eq!(seen.headers["via"], "1.1 ficus");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_become_502_and_504_and_the_proxy_stays_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(
        dir.path(),
        &[
            ("down", "legacy"),
            ("reset", "migrated"),
            ("slow", "legacy"),
        ],
    );
    let (reset_addr, _reset) = resetting_backend().await;
    let slow = Backend::start("legacy").await;
    // Legacy has a dead upstream first and a live one second: connect failures move on.
    // The backends' read timeout is 2 s, but only `/slow/60000` keeps it (a route
    // without its own timeout); every other path gets 60 s from the catch-all
    // route, so that only the request meant to time out can, however busy the
    // machine is.
    let routes = format!(
        "{HEADER_RULE}[[routes]]\npath_prefix = \"/slow/60000\"\n\
         [[routes]]\npath_prefix = \"/\"\nread_timeout_ms = 60000\n"
    );
    let proxy = Proxy::start(ProxySetup {
        store: &store,
        legacy: vec![dead_address(), slow.addr],
        new: vec![reset_addr],
        extra: &routes,
        read_timeout_ms: Some(2000),
        ..Default::default()
    })
    .await;
    let c = client();
    for _ in 0..4 {
        assert_eq!(
            get_as(&c, &proxy, "down", "/").await.0,
            200,
            "a dead upstream is skipped for the next one"
        );
    }
    let (status, body) = get_as(&c, &proxy, "reset", "/").await;
    assert_eq!(status, 502, "{body}");
    // Whether the reset lands during connect or during the exchange decides the
    // wording; either way it is the backend's failure, reported as 502.
    let error = body["error"].as_str().unwrap();
    assert!(
        error == "the backend failed to answer" || error == "the backend could not be reached",
        "{error}"
    );
    assert_eq!(body["request_id"].as_str().unwrap().len(), 16);

    // A backend that takes a minute meets the 2 s read timeout. Only a lower
    // bound is asserted: a busy machine may take longer to say so, never less.
    let started = Instant::now();
    let (status, body) = get_as(&c, &proxy, "slow", "/slow/60000").await;
    let took = started.elapsed();
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"], "the backend did not answer in time");
    assert!(
        took >= Duration::from_millis(1900),
        "504 before the 2 s read timeout, after {took:?}"
    );
    let (status, _) = get_as(&c, &proxy, "slow", "/slow/2500").await;
    assert_eq!(status, 200, "a per-route timeout extends the backend's");

    let only_dead = dead_address();
    drop(proxy);
    let proxy = Proxy::start(ProxySetup {
        store: &store,
        legacy: vec![only_dead],
        new: vec![reset_addr],
        extra: HEADER_RULE,
        ..Default::default()
    })
    .await;
    let (status, body) = get_as(&c, &proxy, "down", "/").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("the backend could not be reached"))
    );
    assert_eq!(
        reqwest::get(proxy.admin_url("/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("ficus_upstream_errors_total{backend=\"legacy\",kind=\"connect\"}"),
        "{metrics}"
    );
}

/// Sends raw bytes to the proxy and returns the status line of the answer, or
/// "closed" if the proxy closed the connection without one.
fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    ask_raw(&mut TcpStream::connect(addr).unwrap(), bytes)
}

/// [`raw`] on a connection already open, which stays open.
fn ask_raw(s: &mut TcpStream, bytes: &[u8]) -> String {
    let head = ask_raw_head(s, bytes);
    head.lines()
        .next()
        .filter(|l| !l.is_empty())
        .map_or("closed".to_string(), str::to_string)
}

/// The head of the answer to `bytes` sent raw, as text (empty when the
/// connection closed first).
fn ask_raw_head(s: &mut TcpStream, bytes: &[u8]) -> String {
    // Generous, so that a proxy slow to answer on a busy machine is not taken
    // for one that closed the connection.
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let _ = s.write_all(bytes);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = s.read(&mut chunk) {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Regression: the raw-head refusals (made by a framer beside hyper when this
/// broke, by hyper's patched parser since) come before routing, which gives a
/// request its id; they still name the request as the client did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_the_framer_refuses_is_answered_with_the_clients_request_id() {
    let Rig {
        legacy,
        proxy,
        dir: _dir,
        ..
    } = Rig::start(&[("acme", "legacy")], "").await;
    let addr = proxy.addr;
    let head = tokio::task::spawn_blocking(move || {
        ask_raw_head(
            &mut TcpStream::connect(addr).unwrap(),
            b"POST / HTTP/1.1\r\nHost: a\r\nX-Request-Id: client-id-7\r\nX-Tenant-Id: acme\r\n\
              Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
    })
    .await
    .unwrap();
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-request-id: client-id-7\r\n"),
        "{head}"
    );
    assert_eq!(legacy.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_a_4xx_and_are_never_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path(), &[("acme", "legacy"), ("globex", "migrated")]);
    let (legacy, wire, _task) = recording_backend().await;
    let new = Backend::start("new").await;
    let proxy = Proxy::start(ProxySetup {
        store: &store,
        legacy: vec![legacy],
        new: vec![new.addr],
        extra: HEADER_RULE,
        proxy_extra: "max_body_bytes = 1024",
        ..Default::default()
    })
    .await;
    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "x".repeat(100_000)
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("invalid host", b"GET / HTTP/1.1\r\nHost: exa mple.test\r\nX-Tenant-Id: acme\r\n\r\n".to_vec()),
        ("bare CR in a header", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rX-Injected: 1\r\nX-Tenant-Id: acme\r\n\r\n".to_vec()),
        ("bare LF splitting a header", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\nX-Tenant-Id: acme\r\n\r\n".to_vec()),
        ("oversized headers", big_header.into_bytes()),
        ("oversized body", b"POST / HTTP/1.1\r\nHost: a\r\nX-Tenant-Id: acme\r\nContent-Length: 5000\r\n\r\n".to_vec()),
        ("oversized chunked body", {
            let mut v = b"POST / HTTP/1.1\r\nHost: a\r\nX-Tenant-Id: acme\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n".to_vec();
            v.extend(std::iter::repeat_n(b'x', 0x800));
            v.extend_from_slice(b"\r\n0\r\n\r\n");
            v
        }),
        ("content-length and transfer-encoding", b"POST / HTTP/1.1\r\nHost: a\r\nX-Tenant-Id: acme\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
        ("invalid chunked encoding", b"POST / HTTP/1.1\r\nHost: a\r\nX-Tenant-Id: acme\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("two content-lengths", b"POST / HTTP/1.1\r\nHost: a\r\nX-Tenant-Id: acme\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".to_vec()),
        ("garbage request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n".to_vec()),
    ];
    let mut report = Vec::new();
    for (name, bytes) in &cases {
        let (addr, bytes) = (proxy.addr, bytes.clone());
        let status = tokio::task::spawn_blocking(move || raw(addr, &bytes))
            .await
            .unwrap();
        report.push(format!("{name}: {status}"));
        let code: Option<u16> = status.split(' ').nth(1).and_then(|c| c.parse().ok());
        assert!(
            status == "closed" || code.is_some_and(|c| (400..500).contains(&c)),
            "{name}: expected a 4xx or a closed connection, got {status:?}"
        );
    }
    eprintln!("{}", report.join("\n"));
    // Streamed bodies (chunked) go upstream as they arrive; one that turns out too
    // large or malformed is cut off, so the backend may see the head of a request
    // but never a complete one: no terminating chunk, and nothing else at all.
    // What the backend received is final once the proxy has closed every
    // connection it opened to it.
    eventually(PATIENCE, || {
        let closed = wire.all_closed();
        async move { closed }
    })
    .await;
    for conn in wire.connections() {
        let text = String::from_utf8_lossy(&conn);
        let head_end = text.find("\r\n\r\n").map_or(text.len(), |i| i + 4);
        assert!(
            text.is_empty()
                || (text.contains("Transfer-Encoding: chunked")
                    && !text[head_end..].contains("0\r\n\r\n")),
            "a malformed request reached the backend whole: {text:?}"
        );
    }
    // The proxy is still healthy and serves the next good request.
    let c = client();
    assert_eq!(get_as(&c, &proxy, "globex", "/after").await.0, 200);
    assert_eq!(new.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_flipped_under_1000_in_flight_requests_loses_none() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path(), &[("acme", "shadow")]);
    let (legacy, new) = (Backend::start("legacy").await, Backend::start("new").await);
    // Only legacy holds requests; new answers its shadow reads, and after the
    // flip the tenant's requests, at once.
    new.release();
    let proxy = Arc::new(
        Proxy::start(ProxySetup {
            store: &store,
            legacy: vec![legacy.addr],
            new: vec![new.addr],
            extra: HEADER_RULE,
            ..Default::default()
        })
        .await,
    );
    let c = client();
    // Sends one request as acme after `pause`; gives back its status, the
    // backend that answered and the request id.
    let send = |pause: Duration| {
        let (c, proxy) = (c.clone(), Arc::clone(&proxy));
        tokio::spawn(async move {
            tokio::time::sleep(pause).await;
            let (status, body) = get_as(&c, &proxy, "acme", "/held").await;
            (
                status,
                body["backend"].as_str().unwrap_or("?").to_string(),
                body["request_id"].as_str().unwrap_or("").to_string(),
            )
        })
    };

    // 200 requests routed before the flip, which legacy holds until the proxy
    // has followed it: in flight during the flip, however fast the machine is.
    let before: Vec<_> = (0..200).map(|_| send(Duration::ZERO)).collect();
    eventually(PATIENCE, || {
        let arrived = legacy.served_total();
        async move { arrived == 200 }
    })
    .await;
    // 100 more race the flip, spread over about 200 ms: either backend may
    // answer each of them, but exactly one does.
    let racing: Vec<_> = (0..100u64)
        .map(|i| send(Duration::from_millis(i * 2)))
        .collect();
    let flip = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            ficus(
                &store,
                &[
                    "tenant",
                    "stage",
                    "acme",
                    "migrated",
                    "--reason",
                    "flip under load",
                ],
            )
        })
    };
    flip.await.unwrap();
    let flipped = open_store(&store).await.snapshot().await.unwrap().seq;
    eventually(PATIENCE, || {
        let proxy = Arc::clone(&proxy);
        async move { proxy.routing_seq().await >= flipped }
    })
    .await;
    let in_flight_at_flip = proxy
        .metrics()
        .await
        .lines()
        .find(|l| l.starts_with("ficus_in_flight_requests "))
        .unwrap_or("")
        .to_string();
    legacy.release();
    // 700 more, sent once the proxy routes by the flipped table: all to new.
    let after: Vec<_> = (0..700u64)
        .map(|i| send(Duration::from_millis(i * 2)))
        .collect();

    let mut by_backend = std::collections::HashMap::new();
    let mut ids = std::collections::HashSet::new();
    for (wave, tasks, must) in [
        ("before", before, Some("legacy")),
        ("during", racing, None),
        ("after", after, Some("new")),
    ] {
        for t in tasks {
            let (status, backend, id) = t.await.unwrap();
            assert_eq!(
                status, 200,
                "every request is answered (sent {wave} the flip, backend {backend})"
            );
            assert!(ids.insert(id.clone()), "request id {id} answered twice");
            if let Some(want) = must {
                assert_eq!(
                    backend, want,
                    "a request sent {wave} the flip went to {backend}"
                );
            }
            *by_backend.entry(backend).or_insert(0) += 1;
        }
    }
    eprintln!("{in_flight_at_flip}; answered by {by_backend:?}");
    assert_eq!(by_backend.values().sum::<i32>(), 1000);
    // The tenant starts in shadow, so new also got shadow reads; what was served
    // reached exactly one backend.
    assert_eq!(
        legacy.served_total() + new.served_total(),
        1000,
        "each request was served by exactly one backend"
    );
}

/// Regression (found by the soak, seed 1): a replica restarted behind a load
/// balancer that had not yet seen it go down was sent requests before its
/// routing table was loaded, and refused them with 503. Such a request now waits
/// for the first table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_arrives_before_the_first_routing_table_waits_for_it() {
    let (legacy, new) = (Backend::start("legacy").await, Backend::start("new").await);
    let dir = tempfile::tempdir().unwrap();
    // No store yet: the proxy starts, is not ready, and keeps trying to open it.
    let store = format!("sqlite:{}", dir.path().join("ficus.db").display());
    let proxy = Proxy::start_unready(ProxySetup {
        store: &store,
        legacy: vec![legacy.addr],
        new: vec![new.addr],
        extra: HEADER_RULE,
        proxy_extra: "first_table_wait_ms = 600000",
        ..Default::default()
    })
    .await;
    let ready = reqwest::get(proxy.admin_url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503, "no routing table can be loaded yet");
    let (c, url) = (client(), proxy.url("/homes"));
    let request = tokio::spawn(async move {
        c.get(url)
            .header("x-tenant-id", "acme")
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    eventually(PATIENCE, || {
        let proxy = &proxy;
        async move { proxy.metrics().await.contains("ficus_in_flight_requests 1") }
    })
    .await;
    sqlite_store(dir.path(), &[("acme", "legacy")]);
    assert_eq!(request.await.unwrap().unwrap(), 200);
    assert_eq!(legacy.count(), 1);
    assert_eq!(new.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_every_in_flight_request_and_exits_0() {
    // No drain delay: the listeners close while all 100 requests are in flight.
    let Rig {
        store,
        legacy,
        new: _new,
        mut proxy,
        dir: _dir,
    } = Rig::start(&[("acme", "legacy")], "drain_delay_ms = 0").await;
    let c = client();
    // 100 requests that legacy holds until the proxy is draining: all of them are
    // in flight when the signal arrives, however fast the machine is.
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (c, url) = (c.clone(), proxy.url("/held"));
        tasks.push(tokio::spawn(async move {
            c.get(url)
                .header("x-tenant-id", "acme")
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    eventually(PATIENCE, || {
        let proxy = &proxy;
        async move {
            proxy
                .metrics()
                .await
                .contains("ficus_in_flight_requests 100")
        }
    })
    .await;
    let signalled = Instant::now();
    proxy.signal("TERM");
    eventually(PATIENCE, || {
        let ready = proxy.admin_url("/readyz");
        async move { reqwest::get(ready).await.is_ok_and(|r| r.status() == 503) }
    })
    .await;
    legacy.release();
    let statuses: Vec<_> = futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .map(|t| t.unwrap())
        .collect();
    let failed: Vec<_> = statuses.iter().filter(|s| !matches!(s, Ok(200))).collect();
    assert!(
        failed.is_empty(),
        "{} of 100 in-flight requests failed: {failed:?}",
        failed.len()
    );
    let status = proxy.wait_exit(PATIENCE).await;
    assert!(
        status.success(),
        "exit status {status}: {}",
        proxy.log_text()
    );
    eprintln!(
        "drained 100 in-flight requests and exited {:?} after SIGTERM",
        signalled.elapsed()
    );
    assert!(
        TcpStream::connect(proxy.addr).is_err(),
        "the proxy no longer accepts connections"
    );
    // The last legacy-traffic counts were written on the way out.
    let traffic = ficus(&store, &["status", "--json"]);
    assert!(
        traffic.contains("legacy received traffic within the quiet window"),
        "{traffic}"
    );
}

/// Regression (CI's soak, seed 7): SIGTERM closed the listeners at once, and a
/// POST HAProxy had just sent on a new connection to the draining replica was
/// reset unanswered; HAProxy may not retry a write, so the client lost it. Now
/// `/readyz` turns 503 first and the proxy goes on serving, new connections
/// included, until the drain delay ends (here: a second signal), each answer
/// closing its connection so pooled clients move elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_proxy_serves_new_connections_until_its_drain_delay_ends() {
    let Rig {
        store: _store,
        legacy,
        new: _new,
        mut proxy,
        dir: _dir,
    } = Rig::start(&[("acme", "legacy")], "drain_delay_ms = 600000").await;
    // A pooled connection from before the signal, idle when it arrives.
    let pooled = client();
    let r = pooled
        .post(proxy.url("/homes"))
        .header("x-tenant-id", "acme")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    proxy.signal("TERM");
    eventually(PATIENCE, || {
        let ready = proxy.admin_url("/readyz");
        async move { reqwest::get(ready).await.is_ok_and(|r| r.status() == 503) }
    })
    .await;
    for c in [pooled, client()] {
        let r = c
            .post(proxy.url("/homes"))
            .header("x-tenant-id", "acme")
            .body("{}")
            .send()
            .await
            .expect("a draining proxy still answers");
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers().get("connection").and_then(|v| v.to_str().ok()),
            Some("close"),
            "a draining proxy keeps no connection"
        );
    }
    assert_eq!(legacy.count(), 3, "every write reached legacy once");
    assert!(
        TcpStream::connect(proxy.addr).is_ok(),
        "the listener is open during the drain delay"
    );
    proxy.signal("TERM");
    let status = proxy.wait_exit(PATIENCE).await;
    assert!(
        status.success(),
        "exit status {status}: {}",
        proxy.log_text()
    );
    assert!(
        TcpStream::connect(proxy.addr).is_err(),
        "the proxy no longer accepts connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_applies_a_good_config_and_refuses_a_bad_one() {
    let Rig {
        store: _store,
        legacy,
        new,
        proxy,
        dir: _dir,
    } = Rig::start(&[("acme", "legacy")], "").await;
    let c = client();
    let good = std::fs::read_to_string(&proxy.config).unwrap();
    std::fs::write(
        &proxy.config,
        format!("{good}\n[[tenant_from]]\nheadr = \"typo\"\n"),
    )
    .unwrap();
    proxy.signal("HUP");
    eventually(PATIENCE, || {
        let log = proxy.log_text();
        async move { log.contains("configuration reload refused") }
    })
    .await;
    assert!(proxy.log_text().contains("unknown field `headr`"));
    assert_eq!(
        get_as(&c, &proxy, "acme", "/").await.1["backend"],
        "legacy",
        "the old config keeps serving"
    );
    // Swap the backends through a reload: acme's requests now land on the other server.
    let swapped = good
        .replacen(&legacy.addr.to_string(), "LEGACY", 1)
        .replacen(&new.addr.to_string(), &legacy.addr.to_string(), 1)
        .replacen("LEGACY", &new.addr.to_string(), 1);
    std::fs::write(&proxy.config, swapped).unwrap();
    proxy.signal("HUP");
    eventually(PATIENCE, || {
        let (c, proxy) = (c.clone(), &proxy);
        async move { get_as(&c, proxy, "acme", "/").await.1["backend"] == "new" }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_stopped_for_60_s_under_load_fails_no_request() {
    // Reads and writes, the writes by a route stage: acme's released to new,
    // globex's (a legacy tenant) on legacy.
    let mut cluster = tokio::task::spawn_blocking(|| ficus_testkit::PgCluster::start().unwrap())
        .await
        .unwrap();
    let store = cluster.url("postgres");
    ficus(&store, &["init"]);
    ficus(&store, &["tenant", "add", "acme", "--stage", "migrated"]);
    ficus(&store, &["tenant", "add", "globex"]);
    // A write route released for acme: route stages are kept through the
    // outage like tenant stages (fail static).
    ficus(
        &store,
        &[
            "route", "release", "POST /", "--tenant", "acme", "--reason", "canary",
        ],
    );
    let (legacy, new) = (Backend::start("legacy").await, Backend::start("new").await);
    let proxy = Arc::new(
        Proxy::start(ProxySetup {
            store: &store,
            legacy: vec![legacy.addr],
            new: vec![new.addr],
            extra: HEADER_RULE,
            ..Default::default()
        })
        .await,
    );
    let c = client();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for worker in 0..8 {
        let (c, proxy, stop, ok, failed) = (
            c.clone(),
            Arc::clone(&proxy),
            Arc::clone(&stop),
            Arc::clone(&ok),
            Arc::clone(&failed),
        );
        load.push(tokio::spawn(async move {
            let tenant = if worker % 2 == 0 { "acme" } else { "globex" };
            let want = if tenant == "acme" { "new" } else { "legacy" };
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let (status, body) = if i.is_multiple_of(2) {
                    get_as(&c, &proxy, tenant, "/").await
                } else {
                    let r = c
                        .post(proxy.url("/"))
                        .header("x-tenant-id", tenant)
                        .body("{}")
                        .send()
                        .await
                        .unwrap();
                    (r.status().as_u16(), r.json().await.unwrap_or_default())
                };
                if status == 200 && body["backend"] == want {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    // The load is running before the store goes away.
    eventually(PATIENCE, || {
        let served = ok.load(Ordering::Relaxed);
        async move { served >= 100 }
    })
    .await;
    let stopping_at = Instant::now();
    cluster = tokio::task::spawn_blocking(move || {
        cluster.stop().unwrap();
        cluster
    })
    .await
    .unwrap();
    let stopped_at = Instant::now();
    eventually(PATIENCE, || {
        let proxy = Arc::clone(&proxy);
        async move { proxy.metrics().await.contains("ficus_store_reachable 0") }
    })
    .await;
    // From here on every request is served without the store. The outage lasts
    // 60 s, and however few requests a busy machine gets through in that time,
    // at least 100 are answered before it ends, so the load did run during it.
    let served_before = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(stopped_at.elapsed())).await;
    eventually(PATIENCE, || {
        let served = ok.load(Ordering::Relaxed);
        async move { served >= served_before + 100 }
    })
    .await;
    let during = ok.load(Ordering::Relaxed) - served_before;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.restart().unwrap();
        cluster
    })
    .await
    .unwrap();
    eventually(PATIENCE, || {
        let proxy = Arc::clone(&proxy);
        async move { proxy.metrics().await.contains("ficus_store_reachable 1") }
    })
    .await;
    let outage = stopping_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    // After the store returns, changes flow again.
    ficus(
        &store,
        &[
            "tenant",
            "stage",
            "globex",
            "shadow",
            "--reason",
            "after the outage",
        ],
    );
    ficus(
        &store,
        &[
            "tenant",
            "stage",
            "globex",
            "migrated",
            "--reason",
            "after the outage",
        ],
    );
    eventually(PATIENCE, || {
        let (c, proxy) = (c.clone(), Arc::clone(&proxy));
        async move { get_as(&c, &proxy, "globex", "/").await.1["backend"] == "new" }
    })
    .await;
    let log = proxy.log_text();
    let warnings = log.matches("control store unreachable").count() as u64;
    eprintln!(
        "{during} requests served while the store was down; {warnings} outage warnings logged in {outage:?}"
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed while the store was away"
    );
    // Once when it starts and at most once a minute after: the bound follows
    // how long the outage really lasted, which a busy machine stretches.
    let allowed = 1 + outage.as_secs() / 60;
    assert!(
        warnings <= allowed,
        "the outage ({outage:?}) is logged at most once a minute, got {warnings}"
    );
    drop(cluster);
}

/// An upstream that fails every request: `/hang…` is never answered, anything
/// else gets a 500. Counts what it got, by method.
async fn broken_upstream() -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    let got: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let seen = Arc::clone(&got);
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let seen = Arc::clone(&seen);
        async move {
            seen.lock()
                .unwrap()
                .push(format!("{} {}", req.method(), req.uri().path()));
            if req.uri().path().starts_with("/hang") {
                std::future::pending::<()>().await;
            }
            axum::http::StatusCode::INTERNAL_SERVER_ERROR
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, got)
}

/// A store with tenant acme migrated and every write route following its
/// tenant to the new backend.
fn migrated_with_writes_released(dir: &std::path::Path) -> String {
    let store = sqlite_store(dir, &[("acme", "shadow")]);
    ficus(
        &store,
        &["tenant", "stage", "acme", "migrated", "--reason", "moved"],
    );
    ficus(
        &store,
        &[
            "route",
            "default",
            "released",
            "--reason",
            "writes move too",
        ],
    );
    store
}

/// Found by the soak: with one of two instances of the new backend failing a
/// tenant, every request sent to it failed at the client, although the other
/// could answer. A safe read that one upstream answers with a 5xx, or not in
/// time, is now asked of the next, once; a write never is (it may have been
/// applied); and the guard still counts the failed attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_one_upstream_fails_is_answered_by_the_next_a_write_never_retried_and_the_guard_sees_both()
 {
    let dir = tempfile::tempdir().unwrap();
    let store = migrated_with_writes_released(dir.path());
    let (legacy, good) = (Backend::start("legacy").await, Backend::start("new").await);
    let (broken, got) = broken_upstream().await;
    // The guard's sample is large enough that the reads and writes below do
    // not trip it; the last step does.
    let extra = format!(
        "{HEADER_RULE}[guard]\nwindow_ms = 3600000\nmin_requests = 60\nmax_error_rate = 0.2\n"
    );
    let proxy = Proxy::start(ProxySetup {
        store: &store,
        legacy: vec![legacy.addr],
        new: vec![broken, good.addr],
        extra: &extra,
        read_timeout_ms: Some(5_000),
        ..Default::default()
    })
    .await;
    let c = client();
    let count = |prefix: &str| {
        got.lock()
            .unwrap()
            .iter()
            .filter(|r| r.starts_with(prefix))
            .count()
    };
    for i in 0..10 {
        let (status, body) = get_as(&c, &proxy, "acme", &format!("/homes/{i}")).await;
        assert_eq!((status, body["backend"].as_str()), (200, Some("new")));
    }
    assert_eq!(
        good.served("GET"),
        10,
        "every read answered by the good upstream"
    );
    assert!(
        count("GET") >= 1,
        "the broken upstream was asked first at least once"
    );
    // One that the broken upstream never answers: the read timeout moves it on.
    let (status, _) = get_as(&c, &proxy, "acme", "/hang/1").await;
    assert_eq!(status, 200);
    assert_eq!(good.served("GET"), 11);
    // Writes: each goes to exactly one upstream, and a 500 reaches the client.
    let mut client_500 = 0;
    for i in 0..10 {
        let r = c
            .post(proxy.url(&format!("/homes/{i}")))
            .header("x-tenant-id", "acme")
            .body("{}")
            .send()
            .await
            .unwrap();
        client_500 += usize::from(r.status() == 500);
    }
    assert_eq!(
        good.served("POST") + count("POST"),
        10,
        "no write sent twice"
    );
    assert_eq!(client_500, count("POST"));
    assert!(count("POST") >= 1);
    // The failed attempts count for the guard: reads that the client saw
    // succeed still roll the tenant back once enough have failed over.
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("kind=\"failover\""),
        "failovers are counted: {metrics}"
    );
    eventually(PATIENCE, || {
        let (c, proxy) = (c.clone(), &proxy);
        async move { get_as(&c, proxy, "acme", "/ok").await.1["backend"] == "legacy" }
    })
    .await;
    let audit: serde_json::Value =
        serde_json::from_str(&ficus(&store, &["audit", "acme", "--json"])).unwrap();
    let last = audit["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["actor"].as_str(), last["to"].as_str()),
        (Some("guard"), Some("shadow"))
    );
}

/// Found by the soak: with one of two instances of the new backend failing a
/// tenant, the writes it was sent failed at the client (2 to 4 per run) before
/// the guard rolled the tenant back. A write carrying the key its backend
/// applies once by (`idempotency_header`) is now sent to the next upstream,
/// once, like a safe read, with its body; a write without it never is; and the
/// guard still counts the failed attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_write_one_upstream_fails_is_sent_to_the_next_once_an_unkeyed_one_never() {
    let dir = tempfile::tempdir().unwrap();
    let store = migrated_with_writes_released(dir.path());
    let (legacy, good) = (Backend::start("legacy").await, Backend::start("new").await);
    let (broken, got) = broken_upstream().await;
    let extra = format!(
        "{HEADER_RULE}[guard]\nwindow_ms = 3600000\nmin_requests = 1000\nmax_error_rate = 0.2\n"
    );
    let proxy = Proxy::start(ProxySetup {
        store: &store,
        legacy: vec![legacy.addr],
        new: vec![broken, good.addr],
        new_extra: "idempotency_header = \"Idempotency-Key\"",
        extra: &extra,
        read_timeout_ms: Some(5_000),
        ..Default::default()
    })
    .await;
    let c = client();
    let to_broken = |prefix: &str| {
        got.lock()
            .unwrap()
            .iter()
            .filter(|r| r.starts_with(prefix))
            .count()
    };
    let body = r#"{"address": "1 Harbour Street", "price": 250000}"#;
    // Keyed: every one answered, by the good upstream, with its whole body.
    for i in 0..10 {
        let r = c
            .post(proxy.url("/homes"))
            .header("x-tenant-id", "acme")
            .header("idempotency-key", format!("save-{i}"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "keyed write {i}");
        let answer: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            answer["body_len"],
            body.len(),
            "the body was sent again whole"
        );
    }
    let failed_over = to_broken("POST");
    assert!(
        failed_over >= 1,
        "the broken upstream was tried first at least once"
    );
    assert_eq!(good.served("POST"), 10);
    let keys: Vec<String> = good
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.method == "POST")
        .filter_map(|s| s.headers.get("idempotency-key").cloned())
        .collect();
    assert_eq!(
        keys.len(),
        10,
        "each write reached the good upstream with its key"
    );
    // One the broken upstream never answers: the read timeout moves it on (the
    // good upstream is asked whichever one the round robin starts at).
    let before = good.served("POST");
    let r = c
        .post(proxy.url("/hang/save"))
        .header("x-tenant-id", "acme")
        .header("idempotency-key", "save-hang")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(good.served("POST"), before + 1);
    let failed_over = to_broken("POST");
    // Unkeyed: never sent twice; the broken upstream's 500 reaches the client.
    let mut client_500 = 0;
    for _ in 0..10 {
        let r = c
            .post(proxy.url("/homes"))
            .header("x-tenant-id", "acme")
            .body(body)
            .send()
            .await
            .unwrap();
        client_500 += usize::from(r.status() == 500);
    }
    let unkeyed_to_broken = to_broken("POST") - failed_over;
    assert_eq!(
        good.served("POST") - 11 + unkeyed_to_broken,
        10,
        "no write sent twice"
    );
    assert_eq!(client_500, unkeyed_to_broken);
    // Every failed attempt was counted for the guard.
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("kind=\"failover\""),
        "failovers are counted: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_rolls_back_only_the_failing_tenant_on_every_replica() {
    let store =
        tokio::task::spawn_blocking(|| ficus_testkit::shared().fresh_database("guard").unwrap())
            .await
            .unwrap();
    ficus(&store, &["init"]);
    for t in ["acme", "globex", "initech"] {
        ficus(&store, &["tenant", "add", t, "--stage", "shadow"]);
        ficus(
            &store,
            &["tenant", "stage", t, "migrated", "--reason", "moved"],
        );
    }
    let (legacy, new) = (Backend::start("legacy").await, Backend::start("new").await);
    // A window of an hour: the guard judges the answers it counted, not how many
    // of them a busy machine got through in ten seconds.
    let extra = format!(
        "{HEADER_RULE}[guard]\nwindow_ms = 3600000\nmin_requests = 20\nmax_error_rate = 0.2\n"
    );
    let setup = || ProxySetup {
        store: &store,
        legacy: vec![legacy.addr],
        new: vec![new.addr],
        extra: &extra,
        ..Default::default()
    };
    let (a, b) = (Proxy::start(setup()).await, Proxy::start(setup()).await);
    let c = client();

    // A burst of 3 errors among 10 answers is below the minimum sample: no rollback.
    for i in 0..10 {
        let path = if i < 3 { "/status/500" } else { "/ok" };
        get_as(&c, &a, "initech", path).await;
    }
    // New fails every request of acme, until the rollback reaches the first
    // replica; the guard trips on the 20th error.
    let first_bad = Instant::now();
    let sent = AtomicUsize::new(0);
    let on_a = eventually(PATIENCE, || {
        let (c, a, sent) = (c.clone(), &a, &sent);
        async move {
            sent.fetch_add(1, Ordering::Relaxed);
            get_as(&c, a, "acme", "/status/500").await.1["backend"] == "legacy"
        }
    })
    .await;
    let sent = sent.into_inner();
    assert!(sent > 20, "legacy served acme after only {sent} requests");
    eventually(PATIENCE, || {
        let (c, b) = (c.clone(), &b);
        async move { get_as(&c, b, "acme", "/ok").await.1["backend"] == "legacy" }
    })
    .await;
    let on_both = first_bad.elapsed();
    eprintln!(
        "guard: acme served by legacy on the first replica after {sent} requests ({on_a:?}), on both after {on_both:?}"
    );
    for proxy in [&a, &b] {
        assert_eq!(
            get_as(&c, proxy, "globex", "/ok").await.1["backend"],
            "new",
            "other tenants stay migrated"
        );
        assert_eq!(
            get_as(&c, proxy, "initech", "/ok").await.1["backend"],
            "new",
            "a short burst does not trip the guard"
        );
    }
    let audit: serde_json::Value =
        serde_json::from_str(&ficus(&store, &["audit", "acme", "--json"])).unwrap();
    let last = audit["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (
            last["actor"].as_str(),
            last["from"].as_str(),
            last["to"].as_str()
        ),
        (Some("guard"), Some("migrated"), Some("shadow"))
    );
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .starts_with("guard: 20 of 20 answers from new were errors"),
        "{last}"
    );
    assert!(a.metrics().await.contains("ficus_guard_rollbacks_total 1"));
    // The guard never promotes back, whatever it sees next.
    for proxy in [&a, &b] {
        for _ in 0..20 {
            assert_eq!(
                get_as(&c, proxy, "acme", "/ok").await.1["backend"],
                "legacy"
            );
        }
    }
    let shown: serde_json::Value =
        serde_json::from_str(&ficus(&store, &["tenant", "show", "acme", "--json"])).unwrap();
    assert_eq!(shown["tenant"]["stage"], "shadow");
}

/// Opens the test's store in-process, to plant evidence the way proxies report it.
async fn open_store(store: &str) -> std::sync::Arc<dyn ficus_store::ControlStore> {
    ficus_store::open(
        &ficus_store::StoreUrl::parse(store).unwrap(),
        ficus_store::OpenMode::Existing,
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_rolls_back_on_slow_answers_and_on_reverse_shadow_mismatches() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path(), &[("acme", "shadow"), ("globex", "shadow")]);
    for t in ["acme", "globex"] {
        ficus(
            &store,
            &["tenant", "stage", t, "migrated", "--reason", "moved"],
        );
    }
    // Acme's parallel run measured legacy at about 2 ms, over many reads: the
    // reverse shadow below adds legacy samples of 40 ms to the same hour, and a
    // baseline of only a few reads would let the guard's next refresh take its
    // p99 from those (regression: the guard then never saw new as slow).
    // Globex's measured 20 s, so that no answer of new's is ever slow for it:
    // on a busy machine even a trivial answer can take over 3× 2 ms, and globex
    // must be rolled back for its mismatches, not for the machine's speed.
    let s = open_store(&store).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let reports: Vec<ficus_store::LatencyReport> = [("acme", 2_000), ("globex", 20_000_000)]
        .into_iter()
        .map(|(t, micros)| {
            let mut baseline = ficus_core::latency::Histogram::default();
            for _ in 0..100_000 {
                baseline.record(micros);
            }
            ficus_store::LatencyReport {
                tenant: ficus_core::TenantId::parse(t).unwrap(),
                backend: ficus_core::Backend::Legacy,
                at: ficus_core::Timestamp::from_unix_millis(now),
                histogram: baseline,
            }
        })
        .collect();
    s.record_latencies(&reports).await.unwrap();
    let (legacy, new) = (Backend::start("legacy").await, Backend::start("new").await);
    // A window of an hour: the guard judges the answers and comparisons it
    // counted, not how many a busy machine got through in ten seconds. The
    // shadow timeout is as generous, so every comparison completes.
    let extra = format!(
        "{HEADER_RULE}[shadow]\nreverse = true\nflush_ms = 100\ntimeout_ms = 60000\n\
         [guard]\nwindow_ms = 3600000\nmin_requests = 20\nmin_compared = 10\n\
         [[compare]]\nendpoint = \"GET /slow/{{id}}\"\nignore = [\"$.backend\"]\n\
         [[compare]]\nendpoint = \"GET /ok\"\nignore = [\"$.backend\"]\n"
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

    // New answers acme in 40 ms or more: beyond 3× its 2 ms legacy p99, on any
    // machine. Acme's requests go on until the rollback reaches the proxy.
    let sent = AtomicUsize::new(0);
    let took = eventually(PATIENCE, || {
        let (c, proxy, sent) = (c.clone(), &proxy, &sent);
        async move {
            sent.fetch_add(1, Ordering::Relaxed);
            let (status, body) = get_as(&c, proxy, "acme", "/slow/40").await;
            assert_eq!(status, 200, "slowness alone never fails a client request");
            body["backend"] == "legacy"
        }
    })
    .await;
    eprintln!(
        "guard (latency): acme back on legacy after {} requests, {took:?}",
        sent.load(Ordering::Relaxed)
    );
    // New disagrees with legacy on globex's prices, found by reverse shadow.
    let sent = AtomicUsize::new(0);
    eventually(PATIENCE, || {
        let (c, proxy, sent) = (c.clone(), &proxy, &sent);
        async move {
            let n = sent.fetch_add(1, Ordering::Relaxed);
            get_as(&c, proxy, "globex", &format!("/priced/{n}")).await;
            get_as(&c, proxy, "globex", "/ok").await.1["backend"] == "legacy"
        }
    })
    .await;
    let reasons: Vec<String> = ["acme", "globex"]
        .iter()
        .map(|t| {
            let audit: serde_json::Value =
                serde_json::from_str(&ficus(&store, &["audit", t, "--json"])).unwrap();
            let last = audit["events"].as_array().unwrap().last().unwrap().clone();
            assert_eq!(last["actor"], "guard", "{last}");
            assert_eq!(last["to"], "shadow", "{last}");
            last["reason"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(
        reasons[0].contains("answers from new were slower than")
            && reasons[0].contains("(3× the tenant's legacy p99 of 2.0 ms)"),
        "{}",
        reasons[0]
    );
    assert!(
        reasons[1].contains("reverse-shadow comparisons found new disagreeing with legacy"),
        "{}",
        reasons[1]
    );
    // The compared reads' latencies reached the store, for both backends (legacy's
    // on top of the planted baseline).
    eventually(PATIENCE, || {
        let s = std::sync::Arc::clone(&s);
        async move {
            let l = s
                .latencies(
                    &ficus_core::TenantId::parse("globex").unwrap(),
                    ficus_core::Timestamp::from_unix_millis(0),
                )
                .await
                .unwrap();
            !l.new.is_empty() && l.legacy.total() > 100_000
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_serves_the_control_plane_api_behind_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path(), &[("acme", "legacy")]);
    let token: serde_json::Value =
        serde_json::from_str(&ficus(&store, &["token", "rotate", "--json"])).unwrap();
    let token = token["api_token"].as_str().unwrap().to_string();
    let backend = Backend::start("legacy").await;
    let proxy = Proxy::start(ProxySetup {
        store: &store,
        legacy: vec![backend.addr],
        new: vec![backend.addr],
        extra: HEADER_RULE,
        ..Default::default()
    })
    .await;
    let c = client();
    let refused = c.get(proxy.admin_url("/v1/status")).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let status: serde_json::Value = c
        .get(proxy.admin_url("/v1/status"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["stages"]["legacy"], 1);
    // The operational routes stay open, as load balancers and Prometheus expect.
    let health = c.get(proxy.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(!proxy.log_text().contains(&token));
}

/// The guard's reaction time as a distribution, for `scripts/bench/guard.sh`:
/// `FICUS_GUARD_TRIALS` tenants (default 5) each start failing on new while
/// requests arrive at `FICUS_GUARD_RATE` per second (0, the default: back to back),
/// and the time from the first bad answer to legacy serving that tenant on both
/// replicas is measured. Default guard thresholds, two replicas on PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run by scripts/bench/guard.sh"]
async fn guard_reaction_time() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (trials, rate) = (env("FICUS_GUARD_TRIALS", 5), env("FICUS_GUARD_RATE", 0));
    let store = tokio::task::spawn_blocking(|| {
        ficus_testkit::shared()
            .fresh_database("guardbench")
            .unwrap()
    })
    .await
    .unwrap();
    ficus(&store, &["init"]);
    let tenants: Vec<String> = (0..trials).map(|i| format!("t{i}")).collect();
    for t in &tenants {
        ficus(&store, &["tenant", "add", t, "--stage", "shadow"]);
        ficus(
            &store,
            &["tenant", "stage", t, "migrated", "--reason", "moved"],
        );
    }
    let (legacy, new) = (Backend::start("legacy").await, Backend::start("new").await);
    let setup = || ProxySetup {
        store: &store,
        legacy: vec![legacy.addr],
        new: vec![new.addr],
        extra: HEADER_RULE,
        ..Default::default()
    };
    let (a, b) = (Proxy::start(setup()).await, Proxy::start(setup()).await);
    let c = client();
    let pace = (rate > 0).then(|| Duration::from_secs_f64(1.0 / rate as f64));
    let mut times = Vec::new();
    for t in &tenants {
        let first_bad = Instant::now();
        let mut sent = 0u64;
        loop {
            if let Some(p) = pace {
                let due = first_bad + p * sent as u32;
                tokio::time::sleep_until(due.into()).await;
            }
            sent += 1;
            let (_, body) = get_as(&c, &a, t, "/status/500").await;
            if body["backend"] == "legacy" {
                break;
            }
            assert!(
                first_bad.elapsed() < Duration::from_secs(120),
                "never tripped"
            );
        }
        eventually(Duration::from_secs(5), || {
            let (c, b) = (c.clone(), &b);
            async move { get_as(&c, b, t, "/ok").await.1["backend"] == "legacy" }
        })
        .await;
        let took = first_bad.elapsed();
        eprintln!("trial {t}: {sent} requests, legacy on both replicas after {took:?}");
        times.push(took);
    }
    times.sort();
    let at = |q: f64| times[((q * times.len() as f64).ceil() as usize).clamp(1, times.len()) - 1];
    println!(
        "guard rate={} trials={} p50={:?} p99={:?} max={:?}",
        if rate == 0 {
            "back-to-back".to_string()
        } else {
            format!("{rate}/s")
        },
        times.len(),
        at(0.5),
        at(0.99),
        times[times.len() - 1]
    );
}

/// The proxy answers the tenant-config path itself, resolving the tenant as it
/// routes: by custom domain, with ETag/304, per platform; a written change is
/// served, and its new domain routed, as soon as the change feed brings it (the
/// time is printed, not asserted: BENCHMARKS.md quotes it); an unknown host
/// learns nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serves_each_tenants_configuration_and_follows_a_change_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path(), &[("globex", "migrated")]);
    ficus(
        &store,
        &[
            "tenant",
            "add",
            "acme",
            "--name",
            "Acme Homes",
            "--stage",
            "migrated",
            "--domain",
            "portal.acme.test",
        ],
    );
    let (legacy, new) = (Backend::start("legacy").await, Backend::start("new").await);
    let proxy = Proxy::start(ProxySetup {
        store: &store,
        legacy: vec![legacy.addr],
        new: vec![new.addr],
        extra: "[[tenant_from]]\nhost = \"{tenant}.example.test\"\n",
        ..Default::default()
    })
    .await;
    let c = client();
    let get = |host: &'static str, query: &'static str, etag: Option<String>| {
        let mut r = c
            .get(proxy.url(&format!("/.well-known/tenant-config{query}")))
            .header("host", host);
        if let Some(e) = etag {
            r = r.header("if-none-match", e);
        }
        async move {
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            let etag = r
                .headers()
                .get("etag")
                .map(|v| v.to_str().unwrap().to_string());
            let cache = r
                .headers()
                .get("cache-control")
                .map(|v| v.to_str().unwrap().to_string());
            let body = r.text().await.unwrap();
            (status, etag, cache, body)
        }
    };
    let json = |body: &str| serde_json::from_str::<serde_json::Value>(body).unwrap();

    // Added by hand: the template with the registry's name and domain, version 1.
    let (status, etag, cache, body) = get("portal.acme.test", "", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(cache.as_deref(), Some("public, max-age=60"));
    let doc = json(&body);
    assert_eq!(
        (
            doc["tenant"].clone(),
            doc["version"].clone(),
            doc["display_name"].clone()
        ),
        (
            serde_json::json!("acme"),
            serde_json::json!(1),
            serde_json::json!("Acme Homes")
        )
    );
    let (status, _, _, body) = get("portal.acme.test", "", etag.clone()).await;
    assert_eq!((status, body.as_str()), (304, ""));
    // The same tenant by its host pattern.
    let (status, _, _, body) = get("globex.example.test", "", None).await;
    assert_eq!(
        (status, json(&body)["tenant"].clone()),
        (200, serde_json::json!("globex"))
    );

    // A written configuration with a new domain: served and routed once the
    // change feed brings it.
    let written = std::time::Instant::now();
    ficus(
        &store,
        &[
            "tenant",
            "config",
            "set",
            "acme",
            "--set",
            "domains=homes.acme.test",
            "--set",
            "branding.primary_color=#0a7f5a",
            "--set",
            "features.dark_mode.ios=true",
            "--set",
            "features.dark_mode.default=false",
            "--reason",
            "rebrand",
        ],
    );
    let waited = eventually(PATIENCE, || async {
        get("homes.acme.test", "", None).await.0 == 200
    })
    .await;
    let seen = written.elapsed();
    let (_, etag_v1, _, body) = get("homes.acme.test", "", None).await;
    let doc = json(&body);
    assert_eq!(doc["version"], 2);
    assert_eq!(doc["branding"]["primary_color"], "#0a7f5a");
    assert_ne!(etag_v1, etag);
    let routed: serde_json::Value = c
        .get(proxy.url("/homes/1"))
        .header("host", "homes.acme.test")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (routed["backend"].as_str(), routed["tenant"].as_str()),
        (Some("new"), Some("acme"))
    );
    eprintln!("config change visible after {waited:?} of polling, {seen:?} after the write began");
    // The old domain went with the old configuration.
    assert_eq!(get("portal.acme.test", "", None).await.0, 404);
    // Per platform: features resolved to values.
    let (_, etag_ios, _, ios) = get("homes.acme.test", "?platform=ios", None).await;
    let (_, _, _, web) = get("homes.acme.test", "?platform=web", None).await;
    assert_eq!(json(&ios)["features"]["dark_mode"], true);
    assert_eq!(json(&web)["features"]["dark_mode"], false);
    assert_ne!(etag_ios, etag_v1);
    assert_eq!(
        get("homes.acme.test", "?platform=ios", etag_ios).await.0,
        304
    );

    // Unknown host, bad platform, other method: JSON errors, nothing about others.
    let (status, _, _, body) = get("nobody.test", "", None).await;
    assert_eq!(status, 404);
    let err = json(&body);
    assert_eq!(err["error"], "no tenant configuration for this request");
    assert!(!body.contains("acme") && !body.contains("globex"), "{body}");
    let (status, _, _, body) = get("homes.acme.test", "?platform=tv", None).await;
    assert_eq!(
        (status, json(&body)["error"].clone()),
        (
            400,
            serde_json::json!("platform must be web, ios or android")
        )
    );
    let post = c
        .post(proxy.url("/.well-known/tenant-config"))
        .header("host", "homes.acme.test")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status().as_u16(), 405);

    // A suspended tenant (its subscription ended) is answered by the proxy,
    // on every path, until it is let back in; nothing of it is deleted.
    let control = open_store(&store).await;
    let suspend = |suspended: bool| ficus_store::SuspendChange {
        tenant: ficus_core::TenantId::parse("acme").unwrap(),
        suspended,
        actor: ficus_core::Actor::Provisioning,
        reason: "subscription cancelled".into(),
    };
    control.set_suspended(suspend(true)).await.unwrap();
    let homes = || {
        let c = c.clone();
        let url = proxy.url("/homes/1");
        async move {
            let r = c
                .get(url)
                .header("host", "homes.acme.test")
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    eventually(PATIENCE, || async { homes().await.0 == 403 }).await;
    let served_before = new.served_total();
    let (_, body) = homes().await;
    assert_eq!(body["error"], "this account is suspended");
    assert_eq!(
        new.served_total(),
        served_before,
        "a suspended tenant's request reached a backend"
    );
    control.set_suspended(suspend(false)).await.unwrap();
    eventually(PATIENCE, || async { homes().await.0 == 200 }).await;
}

/// Found by the soak: two replicas were given one port; the second could not
/// listen (pingora retries the bind in the background for 30 s) yet its
/// `/readyz` said ready, so the load balancer's traffic for it went to the
/// first, and both of its servers failed when the first was killed. A proxy
/// that cannot listen now exits at once, naming the address.
#[test]
fn a_proxy_whose_listen_address_is_taken_exits_at_once_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_store(dir.path(), &[]);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = dir.path().join("ficus.toml");
    std::fs::write(
        &config,
        Proxy::config_text(
            &ProxySetup {
                store: &store,
                legacy: vec![dead_address()],
                new: vec![dead_address()],
                extra: HEADER_RULE,
                ..Default::default()
            },
            addr,
            admin,
        ),
    )
    .unwrap();
    let out = std::process::Command::new(crate::support::FICUS)
        .args(["proxy", "--config"])
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    // Nothing answers on the admin address either: no replica pretends to be
    // ready.
    assert!(std::net::TcpStream::connect(admin).is_err());
    drop(taken);
}

/// The client connections open, from `/metrics`.
async fn client_connections(proxy: &Proxy) -> usize {
    let metrics = proxy.metrics().await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("ficus_client_connections "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A two-thread proxy serves connections opened one after another and a burst
/// opened at once, as a load balancer fills its pool, and counts them open
/// until they close. (Regression, from when each thread served only the
/// connections it accepted: the first thread awake took 30 of a burst of 32,
/// and two threads served on one core. The connections' sharing of the
/// threads is `connections_are_served_while_one_worker_thread_is_stuck`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_thread_proxy_serves_and_counts_a_burst_of_connections() {
    let Rig {
        store: _store,
        legacy: _legacy,
        new: _new,
        proxy,
        dir: _dir,
    } = Rig::start(&[("acme", "legacy")], "threads = 2").await;
    // The readiness probe's connections close first.
    eventually(PATIENCE, || async { client_connections(&proxy).await == 0 }).await;

    // Opened one after another, each asked once before the next opens.
    const ASK: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\nX-Tenant-Id: acme\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..16 {
        let mut conn = TcpStream::connect(proxy.addr).unwrap();
        assert_eq!(ask_raw(&mut conn, ASK), "HTTP/1.1 200 OK");
        held.push(conn);
    }
    assert_eq!(client_connections(&proxy).await, 16);

    // Opened all at once, then asked.
    let mut burst: Vec<TcpStream> = (0..32)
        .map(|_| TcpStream::connect(proxy.addr).unwrap())
        .collect();
    for conn in &mut burst {
        assert_eq!(ask_raw(conn, ASK), "HTTP/1.1 200 OK");
    }
    assert_eq!(client_connections(&proxy).await, 48);

    drop((held, burst));
    eventually(PATIENCE, || async { client_connections(&proxy).await == 0 }).await;
}
