//! The request path, as pingora's phases, top to bottom:
//!
//! 1. `early_request_filter`: count the request in flight.
//! 2. `request_filter`: give it a request id, refuse what is malformed or too large,
//!    resolve its tenant against the routing table, and decide its backend.
//! 3. `upstream_peer`: pick an upstream of that backend, round robin, with that
//!    backend's timeouts (and the route's, if one matches).
//! 4. `upstream_request_filter`: replace any `X-Ficus-*` headers the client sent with
//!    the real tenant and backend, add forwarding headers, strip a path prefix.
//! 5. `response_filter`: hand the request id back to the client.
//! 6. `fail_to_proxy`: the one place where an error becomes a response (JSON, with
//!    the request id): 502 when the upstream cannot be reached, 504 on a timeout.
//! 7. `logging`: metrics, legacy-traffic counting, and the end of in-flight.
//!
//! The shadow leg (issue 4) slots in after step 5: the decision made in step 2 is in
//! the context, and the response body passes through `response_body_filter`.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use async_trait::async_trait;
use bytes::Bytes;
use ficus_core::config::Platform;
use ficus_core::{Backend, Decision, Stage, TenantId, Timestamp};
use http::header;
use pingora_core::modules::http::HttpModules;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::census::{self, Census};
use crate::config::{BackendConfig, Settings};
use crate::guard::{Guard, Signal, Watch};
use crate::head_guard;
use crate::metrics::{LegacyTraffic, Metrics};
use crate::resolve::{RequestParts, resolve};
use crate::shadow::{Pending, Plan, SafeRequest, Shadow};
use crate::table::{RoutingTable, StoreHealth};

/// Everything the request path shares across requests.
pub struct Shared {
    pub settings: ArcSwap<Settings>,
    pub table: Arc<ArcSwapOption<RoutingTable>>,
    /// Woken when a routing table is loaded: requests that arrived before the
    /// first one wait for it.
    pub table_loaded: Arc<tokio::sync::Notify>,
    pub health: Arc<StoreHealth>,
    pub metrics: Metrics,
    pub traffic: LegacyTraffic,
    pub census: Census,
    /// The backends' names as the census counts them, made once.
    names: Names,
    pub shadow: Arc<Shadow>,
    pub guard: Arc<Guard>,
    /// The store, once the routing-table follower has opened it.
    pub store: Arc<std::sync::OnceLock<Arc<dyn ficus_store::ControlStore>>>,
    pub in_flight: AtomicUsize,
    /// Set by the first SIGTERM/SIGINT: `/readyz` says 503 and every HTTP/1
    /// response closes its connection, while the listeners still accept
    /// (`drain_delay`).
    pub draining: AtomicBool,
    next_legacy: AtomicUsize,
    next_new: AtomicUsize,
    next_id: AtomicU64,
    id_hasher: RandomState,
}

impl Shared {
    pub fn new(settings: Settings) -> Shared {
        let metrics = Metrics::new(settings.tenant_label_cap);
        let store: Arc<std::sync::OnceLock<_>> = Arc::default();
        let guard = Arc::new(Guard::new(
            Arc::clone(&store),
            metrics.guard_rollbacks.clone(),
        ));
        Shared {
            metrics,
            shadow: Arc::new(Shadow::new(&settings.shadow, Arc::clone(&guard))),
            guard,
            store,
            settings: ArcSwap::from_pointee(settings),
            table: Arc::new(ArcSwapOption::empty()),
            table_loaded: Arc::default(),
            health: Arc::new(StoreHealth::default()),
            traffic: LegacyTraffic::default(),
            census: Census::default(),
            names: Names {
                legacy: Arc::from("legacy"),
                new: Arc::from("new"),
            },
            in_flight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            next_legacy: AtomicUsize::new(0),
            next_new: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            id_hasher: RandomState::new(),
        }
    }

    fn request_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}", self.id_hasher.hash_one(n))
    }
}

struct Names {
    legacy: Arc<str>,
    new: Arc<str>,
}

/// The proxy, as pingora sees it.
pub struct Ficus {
    pub shared: Arc<Shared>,
}

/// What earlier phases learned about one request.
pub struct Ctx {
    request_id: String,
    started: Instant,
    settings: Arc<Settings>,
    tenant: Option<TenantId>,
    stage: Option<Stage>,
    /// The least advanced of the tenant's stage and its route's.
    effective: Option<Stage>,
    backend: Option<Backend>,
    /// The new side's service for this request's route (`None`: `new`).
    service: Option<Arc<str>>,
    /// `METHOD /template`, what route stages and the census name it by.
    route: String,
    /// A write route released for this tenant alone: the guard watches the
    /// route, not the tenant.
    canary: bool,
    rewritten_path: Option<String>,
    read_timeout: Option<Duration>,
    body_bytes: u64,
    connect_failures: usize,
    /// The upstream (index into the backend's peers) this attempt went to.
    upstream: Option<usize>,
    /// Upstreams this request has been sent to or refused by, as bits (the
    /// 64th and later all share the last bit).
    tried: u64,
    /// A safe read without a body on a route without side effects, or a write
    /// with the key its backend applies once by: an answer of 5xx, or none in
    /// time, from one upstream may be asked of the next.
    may_fail_over: bool,
    /// It was, once: a request fails over at most once.
    failed_over: bool,
    in_flight: bool,
    /// A shadow comparison admitted in `request_filter`, started in
    /// `upstream_request_filter` once the forwarded headers are final.
    admitted: Option<Admitted>,
    /// The primary answer being captured for a started comparison.
    pending: Option<Pending>,
}

struct Admitted {
    permit: tokio::sync::OwnedSemaphorePermit,
    served_by: Backend,
    compare_with: Backend,
    endpoint: String,
    /// The accepted mismatch classes of the table this request was routed by.
    accepted: Arc<ficus_diff::class::Accepted>,
}

/// The largest request id accepted from a client; longer ones are replaced.
const MAX_CLIENT_REQUEST_ID: usize = 128;

fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp::from_unix_millis(d.as_millis() as i64)
}

/// An upstream's bit in [`Ctx::tried`].
fn bit(upstream: usize) -> u64 {
    1 << upstream.min(63)
}

/// An error the proxy answers itself, with its status and a message for the body.
fn refuse(status: u16, message: &'static str) -> Box<Error> {
    Error::explain(ErrorType::HTTPStatus(status), message)
}

/// Whether a raw HTTP/1 request head (after the request line) names both
/// `Content-Length` and `Transfer-Encoding`; read in one pass, allocating
/// nothing, as it runs on every request.
fn both_framings(raw: &[u8]) -> bool {
    let (mut length, mut chunked) = (false, false);
    for line in raw.split(|&b| b == b'\n').skip(1) {
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            let name = &line[..colon];
            length |= name.eq_ignore_ascii_case(b"content-length");
            chunked |= name.eq_ignore_ascii_case(b"transfer-encoding");
        }
    }
    length && chunked
}

fn valid_host(host: &[u8]) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host.iter().all(|&b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_')
        })
}

impl Ficus {
    /// Whether this attempt may fail over to the backend's next upstream, and
    /// if so, marks it as having done so and tells the guard and the metrics
    /// about the failed attempt: the client is spared the failure, the guard
    /// must not be.
    fn fail_over(&self, ctx: &mut Ctx) -> bool {
        let Some(backend) = ctx.backend else {
            return false;
        };
        let upstreams = Ficus::backend_config(&ctx.settings, backend, ctx.service.as_deref())
            .peers
            .len();
        // Only to an upstream this request has not been to yet.
        let untried = (0..upstreams).any(|k| ctx.tried & bit(k) == 0);
        if !ctx.may_fail_over || ctx.failed_over || !untried {
            return false;
        }
        ctx.failed_over = true;
        self.shared.metrics.upstream_error(backend, "failover");
        self.observe_for_guard(ctx, true);
        true
    }

    /// What the guard watches: what new answers migrated tenants (a write
    /// route released for one tenant, a canary, on its own; the rest by tenant).
    fn observe_for_guard(&self, ctx: &Ctx, bad: bool) {
        if let (Some(tenant), Some(Backend::New), Some(Stage::Migrated)) =
            (&ctx.tenant, ctx.backend, ctx.effective)
        {
            let signal = Signal::Answer {
                bad,
                micros: ctx.started.elapsed().as_micros() as u64,
            };
            let watch = if ctx.canary {
                Watch::Route(tenant.clone(), ctx.route.clone())
            } else {
                Watch::Tenant(tenant.clone())
            };
            self.shared
                .guard
                .observe(&watch, signal, &ctx.settings.guard);
        }
    }

    /// The routing table; a request that arrives before the first one is
    /// loaded (a replica that has just started and is already reachable, by
    /// a load balancer that never saw it down) waits for it, up to `wait`,
    /// instead of being refused at once.
    async fn first_table(&self, wait: Duration) -> Option<Arc<RoutingTable>> {
        if let Some(t) = self.shared.table.load_full() {
            return Some(t);
        }
        let loaded = self.shared.table_loaded.notified();
        tokio::pin!(loaded);
        // Registered before the second look, so a table stored in between
        // cannot be missed.
        loaded.as_mut().enable();
        if let Some(t) = self.shared.table.load_full() {
            return Some(t);
        }
        let _ = tokio::time::timeout(wait, loaded).await;
        self.shared.table.load_full()
    }

    /// The backend a side stands for: legacy, or the new side's `service`
    /// (`new` when `None`, or when it is not configured any more after a reload).
    fn backend_config<'s>(
        settings: &'s Settings,
        backend: Backend,
        service: Option<&str>,
    ) -> &'s BackendConfig {
        match backend {
            Backend::Legacy => &settings.legacy,
            Backend::New => service
                .and_then(|s| settings.services.get(s))
                .unwrap_or(&settings.new),
        }
    }

    /// Writes a short JSON error. Every error response the proxy makes goes through here.
    async fn respond(
        &self,
        session: &mut Session,
        ctx: &Ctx,
        status: u16,
        message: &str,
    ) -> Result<()> {
        let body =
            serde_json::json!({ "error": message, "status": status, "request_id": ctx.request_id })
                .to_string();
        let mut resp = ResponseHeader::build(status, Some(4))?;
        resp.insert_header(header::CONTENT_TYPE, "application/json")?;
        resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
        resp.insert_header(
            ctx.settings.request_id_header.clone(),
            ctx.request_id.as_str(),
        )?;
        // After an error the proxy does not reuse the client's connection (an unread
        // request body, or framing that can no longer be trusted, would poison
        // it), so the response must say so; otherwise the client sends its next
        // request into a connection that is being closed.
        session.set_keepalive(None);
        session.write_response_header(Box::new(resp), false).await?;
        session
            .write_response_body(Some(Bytes::from(body)), true)
            .await
    }
}

/// What the tenant-config endpoint needs of a request.
struct ConfigRequest {
    head: bool,
    other_method: bool,
    query: String,
    if_none_match: Option<String>,
    has_body: bool,
}

impl Ficus {
    /// Answers the tenant-config path: the resolved tenant's configuration
    /// (optionally for one platform), 304 when the client's copy is current, a
    /// 404 that says nothing about other tenants when the host has none.
    async fn serve_config(
        &self,
        session: &mut Session,
        ctx: &Ctx,
        table: &RoutingTable,
        request: ConfigRequest,
    ) -> Result<()> {
        if request.other_method {
            return self
                .respond(
                    session,
                    ctx,
                    405,
                    "the tenant configuration is read with GET",
                )
                .await;
        }
        let mut platform = None;
        for pair in request.query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("platform", value)) => match Platform::parse(value) {
                    Some(p) => platform = Some(p),
                    None => {
                        return self
                            .respond(session, ctx, 400, "platform must be web, ios or android")
                            .await;
                    }
                },
                _ => {
                    return self
                        .respond(session, ctx, 400, "the only query parameter is platform")
                        .await;
                }
            }
        }
        let Some(served) = ctx.tenant.as_ref().and_then(|t| table.config(t, platform)) else {
            return self
                .respond(
                    session,
                    ctx,
                    404,
                    "no tenant configuration for this request",
                )
                .await;
        };
        let etag: &str = &served.etag;
        let fresh = request.if_none_match.as_deref().is_some_and(|v| {
            v.split(',')
                .map(|t| t.trim().trim_start_matches("W/"))
                .any(|t| t == etag || t == "*")
        });
        let status = if fresh { 304 } else { 200 };
        let body = served.body.clone();
        let mut resp = ResponseHeader::build(status, Some(6))?;
        resp.insert_header(header::CONTENT_TYPE, "application/json")?;
        resp.insert_header(header::ETAG, etag)?;
        resp.insert_header(
            header::CACHE_CONTROL,
            format!(
                "public, max-age={}",
                ctx.settings.tenant_config_max_age.as_secs()
            ),
        )?;
        resp.insert_header(
            ctx.settings.request_id_header.clone(),
            ctx.request_id.as_str(),
        )?;
        if status == 200 {
            resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
        }
        if request.has_body {
            // An unread request body would be taken for the next request.
            session.set_keepalive(None);
        }
        let no_body = fresh || request.head;
        session
            .write_response_header(Box::new(resp), no_body)
            .await?;
        if !no_body {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl ProxyHttp for Ficus {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            request_id: String::new(),
            started: Instant::now(),
            settings: self.shared.settings.load_full(),
            tenant: None,
            stage: None,
            effective: None,
            service: None,
            route: String::new(),
            canary: false,
            backend: None,
            rewritten_path: None,
            read_timeout: None,
            body_bytes: 0,
            connect_failures: 0,
            upstream: None,
            tried: 0,
            may_fail_over: false,
            failed_over: false,
            in_flight: false,
            admitted: None,
            pending: None,
        }
    }

    /// None: pingora's default adds a response-compression module, disabled,
    /// whose context is still built and called on every request. Ficus forwards
    /// bodies as the backend encoded them.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn early_request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        self.shared.in_flight.fetch_add(1, Ordering::SeqCst);
        self.shared.metrics.in_flight.inc();
        ctx.in_flight = true;
        // A draining proxy answers what it is sent but keeps no connection: a
        // client (or load balancer) that pools connections to it opens its next
        // one elsewhere instead of finding this one closed under a request.
        if self.shared.draining.load(Ordering::Relaxed) {
            session.set_keepalive(None);
        }
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let settings = Arc::clone(&ctx.settings);
        let req = session.req_header();
        ctx.request_id = req
            .headers
            .get(&settings.request_id_header)
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                !v.is_empty()
                    && v.len() <= MAX_CLIENT_REQUEST_ID
                    && v.bytes().all(|b| b.is_ascii_graphic())
            })
            .map_or_else(|| self.shared.request_id(), str::to_string);

        // A lone LF is a line end to us (RFC 9112 allows that) but may be part of a
        // header value to a proxy in front of us; reading one request two ways is
        // how headers get smuggled, so such a request is refused.
        if let Some(h1) = session.as_downstream().as_http1() {
            let raw = h1.get_headers_raw_bytes();
            if head_guard::has_bare_lf(&raw) {
                return Err(refuse(400, head_guard::BARE_LF));
            }
            // The parsed headers no longer show this: pingora drops Content-Length
            // when Transfer-Encoding is present. Two framings in one request are
            // how requests get smuggled past a proxy, so it is refused outright.
            if both_framings(&raw) {
                return Err(refuse(400, head_guard::BOTH_FRAMINGS));
            }
        }
        let req = session.req_header();
        let header_bytes: usize = req
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        if header_bytes > settings.max_header_bytes {
            return Err(refuse(431, "request headers are too large"));
        }
        let host = req
            .headers
            .get(header::HOST)
            .map(|h| h.as_bytes())
            .or(req.uri.authority().map(|a| a.as_str().as_bytes()));
        if host.is_some_and(|h| !valid_host(h)) {
            return Err(refuse(400, "invalid host header"));
        }
        if let Some(len) = req.headers.get(header::CONTENT_LENGTH) {
            match len.to_str().ok().and_then(|l| l.parse::<u64>().ok()) {
                Some(n) if n > settings.max_body_bytes => {
                    return Err(refuse(413, "request body is too large"));
                }
                Some(_) => {}
                None => return Err(refuse(400, "invalid content-length")),
            }
        }

        let Some(table) = self.first_table(settings.first_table_wait).await else {
            return Err(refuse(503, "the routing table is not loaded yet"));
        };
        let path_and_query = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let host = host.and_then(|h| std::str::from_utf8(h).ok());
        let parts = RequestParts {
            host,
            path_and_query,
            headers: &req.headers,
        };
        let resolved = resolve(&settings.rules, &parts, &table);
        let stage = resolved
            .as_ref()
            .filter(|r| r.known)
            .and_then(|r| table.stage(&r.tenant));
        if let Some(r) = resolved {
            ctx.rewritten_path = r.rewritten_path;
            ctx.tenant = r.known.then_some(r.tenant);
        }
        ctx.stage = stage;
        // The tenant's configuration is the proxy's own to answer, resolved
        // exactly as a request is routed.
        let effective_path = ctx
            .rewritten_path
            .as_deref()
            .map_or(req.uri.path(), |p| p.split('?').next().unwrap_or(p));
        if effective_path == settings.tenant_config_path {
            let request = ConfigRequest {
                head: req.method == http::Method::HEAD,
                other_method: !matches!(req.method, http::Method::GET | http::Method::HEAD),
                query: req.uri.query().unwrap_or("").to_string(),
                if_none_match: req
                    .headers
                    .get(header::IF_NONE_MATCH)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
                has_body: req.headers.contains_key(header::TRANSFER_ENCODING)
                    || req
                        .headers
                        .get(header::CONTENT_LENGTH)
                        .is_some_and(|l| l.as_bytes() != b"0"),
            };
            self.serve_config(session, ctx, &table, request).await?;
            return Ok(true);
        }
        // A suspended tenant keeps its data and its stage; its requests are
        // answered here and reach no backend.
        if ctx.tenant.as_ref().is_some_and(|t| table.suspended(t)) {
            let status = settings.suspended_status;
            let message = settings.suspended_message.clone();
            self.respond(session, ctx, status, &message).await?;
            return Ok(true);
        }
        let method = req.method.as_str();
        let path = req.uri.path();
        let forwarded = ctx
            .rewritten_path
            .as_deref()
            .map_or(path, |p| p.split('?').next().unwrap_or(p));
        // The route: its stage (a write starts held at legacy), its service on
        // the new side, and its name in the census.
        // A route holds by its method, as the control plane judges it (the
        // proxy's `unsafe_routes` are known to no one else): a safe-method
        // route with side effects is never shadowed, and follows its tenant.
        let writes = !ficus_core::routing::is_safe_method(method);
        let side_effects = writes || settings.shadow.is_unsafe(method, forwarded);
        ctx.route = settings.shadow.templates.endpoint(method, forwarded);
        let route_stage = table.routes.stage(ctx.tenant.as_ref(), &ctx.route, writes);
        let effective = ficus_core::routing::effective(stage, route_stage);
        ctx.effective = effective;
        match ficus_core::decide(effective, table.legacy_retired, settings.unknown_tenant) {
            Decision::Serve(b) => ctx.backend = Some(b),
            Decision::Reject => return Err(refuse(404, "unknown tenant")),
        }
        let template = ctx.route.split_once(' ').map_or("", |(_, t)| t);
        let service = settings.service_routes.get(method, template);
        ctx.service = service.map(|(name, _)| Arc::clone(name));
        ctx.canary = writes
            && ctx.backend == Some(Backend::New)
            && ctx
                .tenant
                .as_ref()
                .is_some_and(|t| table.routes.overridden(t, &ctx.route));
        ctx.read_timeout = service.and_then(|(_, t)| *t).or_else(|| {
            settings
                .routes
                .iter()
                .find(|r| r.matches(method, path))
                .and_then(|r| r.read_timeout)
        });

        // The parallel run: which backend's answer, if any, this one is compared with.
        let pair = match (effective, ctx.backend) {
            (Some(Stage::Shadow), Some(Backend::Legacy)) => Some((Backend::Legacy, Backend::New)),
            (Some(Stage::Migrated), Some(Backend::New))
                if settings.shadow.reverse && !table.legacy_retired =>
            {
                Some((Backend::New, Backend::Legacy))
            }
            _ => None,
        };
        let has_body = req.headers.contains_key(header::TRANSFER_ENCODING)
            || req
                .headers
                .get(header::CONTENT_LENGTH)
                .is_some_and(|l| l.as_bytes() != b"0");
        let safe_method = matches!(
            req.method,
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
        );
        // A write fails over only when its backend applies it once however often
        // it is sent, by a key the client gave (`idempotency_header`): sending
        // it again can then not apply it twice.
        let keyed_write = side_effects
            && ctx.backend.is_some_and(|b| {
                Ficus::backend_config(&ctx.settings, b, ctx.service.as_deref())
                    .idempotency_header
                    .as_ref()
                    .is_some_and(|h| req.headers.get(h).is_some_and(|v| !v.is_empty()))
            });
        ctx.may_fail_over = (safe_method && !has_body && !side_effects) || keyed_write;
        // Only a safe read without a body, on a route with no side effects.
        if let (Some((served_by, compare_with)), Some(tenant), true, false, false) =
            (pair, &ctx.tenant, safe_method, has_body, side_effects)
        {
            let endpoint = ctx.route.clone();
            if let Some(permit) = self
                .shared
                .shadow
                .admit(tenant, &endpoint, &settings.shadow)
            {
                ctx.admitted = Some(Admitted {
                    permit,
                    served_by,
                    compare_with,
                    endpoint,
                    accepted: Arc::clone(&table.accepted),
                });
            }
        }
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(chunk) = body {
            ctx.body_bytes += chunk.len() as u64;
            if ctx.body_bytes > ctx.settings.max_body_bytes {
                return Err(refuse(413, "request body is too large"));
            }
        }
        Ok(())
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let backend = ctx
            .backend
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no backend chosen"))?;
        let conf = Ficus::backend_config(&ctx.settings, backend, ctx.service.as_deref());
        let next = match backend {
            Backend::Legacy => &self.shared.next_legacy,
            Backend::New => &self.shared.next_new,
        };
        let n = conf.peers.len();
        // A retry (a refused connection, a failed-over read) goes to the
        // upstream after the one that failed, not wherever the shared counter
        // has got to meanwhile, which may be the same one.
        let i = match ctx.upstream {
            Some(failed) => (1..=n)
                .map(|k| (failed + k) % n)
                .find(|&k| ctx.tried & bit(k) == 0)
                .unwrap_or((failed + 1) % n),
            None => next.fetch_add(1, Ordering::Relaxed) % n,
        };
        ctx.upstream = Some(i);
        ctx.tried |= bit(i);
        let mut peer = conf.peers[i].clone();
        if let Some(t) = ctx.read_timeout {
            peer.options.read_timeout = Some(t);
        }
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing was sent, so any request may go to the backend's next upstream.
        ctx.connect_failures += 1;
        let upstreams = ctx.backend.map_or(1, |b| {
            Ficus::backend_config(&ctx.settings, b, ctx.service.as_deref())
                .upstreams
                .len()
        });
        if ctx.connect_failures < upstreams {
            e.set_retry(true);
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        // A 5xx answer `upstream_response_filter` chose to fail over (a safe
        // read, or a keyed write) keeps that decision: the method rule below
        // is about requests cut under way, which a keyed write never relies on.
        let failing_over = ctx.failed_over
            && e.retry()
            && matches!(e.etype(), ErrorType::HTTPStatus(_))
            && !session.as_ref().retry_buffer_truncated();
        // pingora's own rule first: an idempotent request whose connection was
        // reused and closed under it may be sent again.
        let mut e = e.more_context(format!("peer: {peer}"));
        if failing_over {
            return e;
        }
        if !session.req_header().method.is_idempotent() || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        // Then Ficus's: a safe read one upstream did not answer in time is
        // asked of the next, once, if nothing of an answer was sent yet.
        if matches!(e.etype(), ErrorType::ReadTimedout)
            && session.response_written().is_none()
            && !session.as_ref().retry_buffer_truncated()
            && self.fail_over(ctx)
        {
            e.set_retry(true);
        }
        e
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // A safe read (or a keyed write) one upstream answered with a server
        // error is asked of the next, once: the client gets the answer of an
        // upstream that can give one. Nothing has been sent to the client yet
        // at this point; a body is sent again from pingora's retry buffer, and
        // never when it outgrew it.
        if upstream_response.status.is_server_error()
            && !session.as_ref().retry_buffer_truncated()
            && self.fail_over(ctx)
        {
            let mut e = Error::explain(
                ErrorType::HTTPStatus(upstream_response.status.as_u16()),
                "the upstream answered with a server error; asking the next one",
            );
            e.set_retry(true);
            return Err(e.into_up());
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let s = &ctx.settings;
        // Whatever a client says about its tenant or backend is not forwarded: the
        // backends trust these headers, so only the proxy may set them.
        let spoofable: Vec<http::HeaderName> = upstream
            .headers
            .keys()
            .filter(|k| {
                k.as_str().starts_with("x-ficus-")
                    || **k == s.tenant_header
                    || **k == s.backend_header
            })
            .cloned()
            .collect();
        for name in spoofable {
            upstream.remove_header(&name);
        }
        if let Some(t) = &ctx.tenant {
            upstream.insert_header(s.tenant_header.clone(), t.as_str())?;
        }
        if let Some(b) = ctx.backend {
            upstream.insert_header(
                s.backend_header.clone(),
                http::HeaderValue::from_static(b.as_str()),
            )?;
        }
        upstream.insert_header(s.request_id_header.clone(), ctx.request_id.as_str())?;
        if let Some(addr) = session.client_addr().and_then(|a| a.as_inet()) {
            let forwarded = match upstream
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
            {
                Some(prior) => format!("{prior}, {}", addr.ip()),
                None => addr.ip().to_string(),
            };
            upstream.insert_header("x-forwarded-for", forwarded)?;
        }
        upstream.insert_header("x-forwarded-proto", http::HeaderValue::from_static("http"))?;
        let via = match upstream
            .headers
            .get(header::VIA)
            .and_then(|v| v.to_str().ok())
        {
            Some(prior) => http::HeaderValue::try_from(format!("{prior}, 1.1 ficus"))
                .map_err(|_| refuse(400, "invalid via header"))?,
            None => http::HeaderValue::from_static("1.1 ficus"),
        };
        upstream.insert_header(header::VIA, via)?;
        if let Some(path) = &ctx.rewritten_path {
            let uri: http::Uri = path.parse().map_err(|_| refuse(400, "invalid path"))?;
            upstream.set_uri(uri);
        }
        // Taken, so a retried upstream attempt does not start a second comparison.
        if let (Some(admitted), Some(tenant)) = (ctx.admitted.take(), &ctx.tenant) {
            let path_and_query = upstream.uri.path_and_query().map_or("/", |p| p.as_str());
            if let Some(request) =
                SafeRequest::new(&upstream.method, path_and_query, &upstream.headers)
            {
                let sh = &s.shadow;
                let ask_again = self
                    .shared
                    .shadow
                    .sample_noise(&admitted.endpoint, sh)
                    .then(|| {
                        Ficus::backend_config(s, admitted.served_by, ctx.service.as_deref()).clone()
                    });
                let plan = Plan {
                    tenant: tenant.clone(),
                    rules: sh.rules_for(&admitted.endpoint).clone(),
                    endpoint: admitted.endpoint,
                    served_by: admitted.served_by,
                    compare_with: admitted.compare_with,
                    compare_backend: Ficus::backend_config(
                        s,
                        admitted.compare_with,
                        ctx.service.as_deref(),
                    )
                    .clone(),
                    ask_again,
                    timeout: sh.timeout,
                    cap: sh.body_cap,
                    // Reverse shadow: legacy checks what new serves a migrated
                    // tenant, and the guard hears about disagreements.
                    guard: (ctx.stage == Some(Stage::Migrated)
                        && admitted.served_by == Backend::New)
                        .then_some(s.guard),
                    accepted: admitted.accepted,
                    // The version of the service this route's new side is.
                    new_version: Ficus::backend_config(s, Backend::New, ctx.service.as_deref())
                        .version
                        .clone(),
                    version_header: sh.version_header.clone(),
                };
                let done = self.shared.shadow.spawn(admitted.permit, request, plan);
                ctx.pending = Some(Pending {
                    started: Instant::now(),
                    captured: Default::default(),
                    cap: sh.body_cap,
                    done: Some(done),
                });
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(p) = &mut ctx.pending {
            p.captured.status = resp.status.as_u16();
            p.captured.headers = resp
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            p.captured.encoded = resp
                .headers
                .get(header::CONTENT_ENCODING)
                .is_some_and(|e| e.as_bytes() != b"identity");
        }
        resp.insert_header(
            ctx.settings.request_id_header.clone(),
            ctx.request_id.as_str(),
        )?;
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        // Teed for the comparison up to the cap; the client's stream is never held.
        if let Some(p) = &mut ctx.pending {
            if let Some(chunk) = body.as_ref()
                && !p.captured.overflow
            {
                if p.captured.body.len() + chunk.len() > p.cap {
                    p.captured.overflow = true;
                    p.captured.body = Vec::new();
                } else {
                    p.captured.body.extend_from_slice(chunk);
                }
            }
            if end_of_stream {
                p.finish();
            }
        }
        Ok(None)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        use ErrorType::*;
        if ctx.request_id.is_empty() {
            ctx.request_id = self.shared.request_id();
        }
        let (status, message, kind): (u16, &str, Option<&str>) = match e.etype() {
            HTTPStatus(code) => (
                *code,
                e.context.as_ref().map_or("request refused", |c| c.as_str()),
                None,
            ),
            ConnectTimedout => (
                504,
                "timed out connecting to the backend",
                Some("connect_timeout"),
            ),
            ReadTimedout | WriteTimedout => {
                (504, "the backend did not answer in time", Some("timeout"))
            }
            ConnectRefused | ConnectNoRoute | ConnectError | SocketError | BindError => {
                (502, "the backend could not be reached", Some("connect"))
            }
            _ if e.esource() == &ErrorSource::Upstream => {
                (502, "the backend failed to answer", Some("upstream"))
            }
            ReadError | WriteError | ConnectionClosed
                if e.esource() == &ErrorSource::Downstream =>
            {
                (0, "", None)
            }
            _ if e.esource() == &ErrorSource::Downstream => (400, "malformed request", None),
            _ => (500, "internal proxy error", None),
        };
        if let (Some(kind), Some(backend)) = (kind, ctx.backend) {
            self.shared.metrics.upstream_error(backend, kind);
        }
        if kind.is_none() && status != 0 {
            self.shared.metrics.rejected(&status.to_string());
        }
        // Only answer if nothing was sent yet; otherwise the client sees a cut
        // response, which is the honest outcome of an upstream failing mid-body.
        if status != 0
            && session.response_written().is_none()
            && let Err(write) = self.respond(session, ctx, status, message).await
        {
            tracing::debug!(error = %write, "could not send an error response");
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        // A response with no body (HEAD, 204) never reaches the body filter's end;
        // a failed one is not compared (dropping the sender tells the comparison).
        if let Some(mut p) = ctx.pending.take()
            && e.is_none()
            && session.response_written().is_some()
        {
            p.finish();
        }
        if ctx.in_flight {
            self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.shared.metrics.in_flight.dec();
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        self.shared.metrics.observe(
            ctx.backend,
            ctx.stage,
            status,
            ctx.started.elapsed(),
            ctx.tenant.as_ref(),
        );
        self.observe_for_guard(ctx, status >= 500);
        // One clock read for both counts below.
        let at = now();
        if let Some(b) = ctx.backend
            && !ctx.route.is_empty()
        {
            let name: &Arc<str> = match (b, &ctx.service) {
                (Backend::New, Some(s)) => s,
                (Backend::New, None) => &self.shared.names.new,
                (Backend::Legacy, _) => &self.shared.names.legacy,
            };
            self.shared.census.record(
                ctx.tenant.as_ref(),
                &ctx.route,
                name,
                &census::client_version(
                    &session.req_header().headers,
                    ctx.settings.client_version_header.as_ref(),
                ),
                at,
                ctx.service.is_some(),
            );
        }
        if ctx.backend == Some(Backend::Legacy) {
            self.shared.traffic.record(ctx.tenant.as_ref(), at);
        }
    }
}
