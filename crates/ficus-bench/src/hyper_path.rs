//! `ficus-bench hyper-ficus LISTEN UPSTREAM [--threads N] [--tenants N]`:
//! Ficus's request path for the plain forwarding case, on hyper 1.x instead of
//! pingora, to measure what moving the data plane would buy before moving it
//! (issue 22).
//!
//! It does per request what `ficus proxy` does for a tenant served by one
//! backend, with the proxy's own code wherever that code is not tied to
//! pingora: the settings are parsed from a proxy config by `Config::parse`,
//! the tenant is resolved by `resolve::resolve` against a `RoutingTable` of
//! `--tenants` tenants, the route is named by the shadow templates and staged by
//! the table's route stages, the decision is `ficus_core::decide`, and the
//! request is counted in the same `Metrics`, `Census` and `LegacyTraffic`. The
//! checks that need the raw header bytes (a bare LF, both framings) are not
//! made: hyper does not expose those bytes, which a real port would have to
//! solve first. Shadow comparison, fail-over, timeouts per route, the tenant
//! config endpoint and draining are not here either; those requests are not
//! on the plain path this measures.
//!
//! [`serve`] is the hyper server and pooled client the hyper floor runs on
//! too, so the two rows differ only in the per-request work.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ficus_core::{Backend, Decision, Stage, Tenant, TenantId, Timestamp};
use ficus_proxy::census::{self, Census};
use ficus_proxy::config::{Config, Settings};
use ficus_proxy::metrics::{LegacyTraffic, Metrics};
use ficus_proxy::resolve::{RequestParts, resolve};
use ficus_proxy::table::RoutingTable;
use http::{HeaderValue, header};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::{Error, flag};

/// What every connection shares.
struct Shared {
    settings: Settings,
    table: arc_swap::ArcSwap<RoutingTable>,
    metrics: Metrics,
    census: Census,
    traffic: LegacyTraffic,
    next_id: AtomicU64,
    id_hasher: std::hash::RandomState,
    legacy: Arc<str>,
    new: Arc<str>,
}

/// An answer: the upstream's, streamed, or one the proxy makes itself.
pub type Answer = hyper::Response<http_body_util::Either<Incoming, String>>;

pub fn run(args: &[String]) -> Result<(), Error> {
    let listen: SocketAddr = args
        .first()
        .ok_or("hyper-ficus needs LISTEN and UPSTREAM")?
        .parse()?;
    let upstream: SocketAddr = args
        .get(1)
        .ok_or("hyper-ficus needs LISTEN and UPSTREAM")?
        .parse()?;
    let threads: usize = flag(args, "--threads").unwrap_or("1").parse()?;
    let tenants: usize = flag(args, "--tenants").unwrap_or("10").parse()?;
    let text = format!(
        "[proxy]\nlisten = [\"{listen}\"]\nadmin_listen = \"127.0.0.1:0\"\nstore = \"sqlite::memory:\"\nthreads = {threads}\n\
         [backends.legacy]\nupstreams = [\"{upstream}\"]\n[backends.new]\nupstreams = [\"{upstream}\"]\n\
         [[tenant_from]]\nheader = \"X-Tenant-Id\"\n"
    );
    let config = Config::parse(std::path::Path::new("hyper-ficus.toml"), &text, &|_| None)?;
    let at = Timestamp::from_unix_millis(0);
    let table = RoutingTable::from_snapshot(
        1,
        false,
        (0..tenants)
            .map(|i| Tenant {
                id: TenantId::parse(&format!("t{i}")).expect("a valid tenant id"),
                name: format!("Tenant {i}"),
                stage: Stage::Legacy,
                version: 1,
                domains: Vec::new(),
                suspended: false,
                created_at: at,
                updated_at: at,
            })
            .collect(),
    );
    let shared = Arc::new(Shared {
        metrics: Metrics::new(config.settings.tenant_label_cap),
        settings: config.settings,
        table: arc_swap::ArcSwap::from_pointee(table),
        census: Census::default(),
        traffic: LegacyTraffic::default(),
        next_id: AtomicU64::new(0),
        id_hasher: std::hash::RandomState::new(),
        legacy: Arc::from("legacy"),
        new: Arc::from("new"),
    });
    serve(listen, upstream, threads, move |client, base, peer, req| {
        let shared = Arc::clone(&shared);
        async move { handle(&shared, &client, &base, peer, req).await }
    })
}

/// The pooled client both hyper proxies forward with.
pub type Upstream = Client<hyper_util::client::legacy::connect::HttpConnector, Incoming>;

/// Serves HTTP/1 with hyper on `listen` (`threads` workers), each request handed
/// to `handle` with the pooled client, the upstream's base URL and the client's
/// address. The hyper floor and `hyper-ficus` both run on it, so that their rows
/// differ only in what `handle` does.
pub fn serve<H, Fut>(
    listen: SocketAddr,
    upstream: SocketAddr,
    threads: usize,
    handle: H,
) -> Result<(), Error>
where
    H: Fn(Upstream, Arc<str>, SocketAddr, hyper::Request<Incoming>) -> Fut
        + Clone
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = Answer> + Send + 'static,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let client: Upstream = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(256)
            .build_http();
        let base: Arc<str> = Arc::from(format!("http://{upstream}"));
        let listener = tokio::net::TcpListener::bind(listen).await?;
        loop {
            let (stream, peer) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let (client, base, handle) = (client.clone(), Arc::clone(&base), handle.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let answer = handle(client.clone(), Arc::clone(&base), peer, req);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

/// An answer the proxy makes itself.
pub fn refuse(status: u16, message: &str) -> Answer {
    let mut r = hyper::Response::new(http_body_util::Either::Right(format!("{message}\n")));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::BAD_REQUEST);
    r
}

async fn handle(
    shared: &Shared,
    client: &Upstream,
    base: &str,
    peer: SocketAddr,
    mut req: hyper::Request<hyper::body::Incoming>,
) -> Answer {
    let started = Instant::now();
    let s = &shared.settings;
    let request_id = req
        .headers()
        .get(&s.request_id_header)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(
            || {
                let n = shared.next_id.fetch_add(1, Ordering::Relaxed);
                format!(
                    "{:016x}",
                    std::hash::BuildHasher::hash_one(&shared.id_hasher, n)
                )
            },
            str::to_string,
        );
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if header_bytes > s.max_header_bytes {
        return refuse(431, "request headers are too large");
    }
    let host = req
        .headers()
        .get(header::HOST)
        .map(|h| h.as_bytes())
        .or(req.uri().authority().map(|a| a.as_str().as_bytes()));
    if host.is_some_and(|h| {
        h.is_empty()
            || h.len() > 255
            || !h.iter().all(|&b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_')
            })
    }) {
        return refuse(400, "invalid host header");
    }
    if let Some(len) = req.headers().get(header::CONTENT_LENGTH) {
        match len.to_str().ok().and_then(|l| l.parse::<u64>().ok()) {
            Some(n) if n > s.max_body_bytes => return refuse(413, "request body is too large"),
            Some(_) => {}
            None => return refuse(400, "invalid content-length"),
        }
    }
    let table = shared.table.load();
    let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let parts = RequestParts {
        host: host.and_then(|h| std::str::from_utf8(h).ok()),
        path_and_query,
        headers: req.headers(),
    };
    let resolved = resolve(&s.rules, &parts, &table);
    let stage = resolved
        .as_ref()
        .filter(|r| r.known)
        .and_then(|r| table.stage(&r.tenant));
    let tenant = resolved.and_then(|r| r.known.then_some(r.tenant));
    if tenant.as_ref().is_some_and(|t| table.suspended(t)) {
        return refuse(s.suspended_status, &s.suspended_message);
    }
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let writes = !ficus_core::routing::is_safe_method(&method);
    let route = s.shadow.templates.endpoint(&method, &path);
    let route_stage = table.routes.stage(tenant.as_ref(), &route, writes);
    let effective = ficus_core::routing::effective(stage, route_stage);
    let backend = match ficus_core::decide(effective, table.legacy_retired, s.unknown_tenant) {
        Decision::Serve(b) => b,
        Decision::Reject => return refuse(404, "unknown tenant"),
    };
    let template = route.split_once(' ').map_or("", |(_, t)| t);
    let service = s
        .service_routes
        .get(&method, template)
        .map(|(n, _)| Arc::clone(n));

    let Ok(uri) = format!("{base}{path_and_query}").parse::<hyper::Uri>() else {
        return refuse(400, "invalid path");
    };
    // Upstream headers, as `upstream_request_filter` sets them.
    let headers = req.headers_mut();
    let spoofable: Vec<http::HeaderName> = headers
        .keys()
        .filter(|k| {
            k.as_str().starts_with("x-ficus-") || **k == s.tenant_header || **k == s.backend_header
        })
        .cloned()
        .collect();
    for name in spoofable {
        headers.remove(&name);
    }
    if let Some(t) = &tenant
        && let Ok(v) = HeaderValue::from_str(t.as_str())
    {
        headers.insert(s.tenant_header.clone(), v);
    }
    headers.insert(
        s.backend_header.clone(),
        HeaderValue::from_static(backend.as_str()),
    );
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        headers.insert(s.request_id_header.clone(), v);
    }
    let forwarded = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    let via = match headers.get(header::VIA).and_then(|v| v.to_str().ok()) {
        Some(prior) => HeaderValue::try_from(format!("{prior}, 1.1 ficus")).ok(),
        None => Some(HeaderValue::from_static("1.1 ficus")),
    };
    let Some(via) = via else {
        return refuse(400, "invalid via header");
    };
    headers.insert(header::VIA, via);
    let client_version =
        census::client_version(headers, s.client_version_header.as_ref()).into_owned();
    *req.uri_mut() = uri;

    let mut answer = match client.request(req).await {
        Ok(r) => r.map(http_body_util::Either::Left),
        Err(_) => refuse(502, "the backend did not answer"),
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        answer.headers_mut().insert(s.request_id_header.clone(), v);
    }
    shared.metrics.observe(
        Some(backend),
        stage,
        answer.status().as_u16(),
        started.elapsed(),
        tenant.as_ref(),
    );
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let at = Timestamp::from_unix_millis(d.as_millis() as i64);
    let name = match (backend, &service) {
        (Backend::New, Some(n)) => n,
        (Backend::New, None) => &shared.new,
        (Backend::Legacy, _) => &shared.legacy,
    };
    shared.census.record(
        tenant.as_ref(),
        &route,
        name,
        &client_version,
        at,
        service.is_some(),
    );
    if backend == Backend::Legacy {
        shared.traffic.record(tenant.as_ref(), at);
    }
    answer
}
