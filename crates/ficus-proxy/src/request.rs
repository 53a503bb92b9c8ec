//! The request path without its engine: every decision `ficus proxy` makes
//! about one request, as functions of the request's parsed head and of what
//! the proxy shares, so that the engine that reads and writes the bytes
//! ([`crate::hyper_engine`]) is glue, and the decisions are tested without
//! sockets.
//!
//! In order, an engine calls:
//!
//! 1. [`Shared::begin`]: count the request in flight.
//! 2. [`Shared::route`]: give it a request id, refuse what is malformed or too
//!    large, resolve its tenant against the routing table, and decide its
//!    backend, or answer it here ([`Next::Answer`]: the tenant-config
//!    endpoint, a suspended tenant).
//! 3. [`Shared::count_body`] as the request body streams in (413).
//! 4. [`Shared::pick_upstream`]: one upstream of the backend, round robin.
//! 5. [`Shared::rewrite_upstream`]: replace any `X-Ficus-*` headers the client
//!    sent with the real tenant and backend, add forwarding headers, strip a
//!    path prefix, and start the shadow comparison, if one was admitted.
//! 6. [`Shared::fail_over`] when an attempt failed in a way that may be
//!    retried on the backend's next upstream.
//! 7. [`Ctx::capture_head`] and [`Ctx::capture_body`] as the answer passes.
//! 8. [`Shared::failure`] when the request failed: the one table that turns a
//!    failure into a status and a message, and [`Shared::error_answer`], the
//!    one place an error becomes a body.
//! 9. [`Shared::finish`]: metrics, legacy-traffic counting, the census, the
//!    guard, and the end of in-flight.

use std::borrow::Cow;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use ficus_core::config::Platform;
use ficus_core::{Backend, Decision, Stage, TenantId};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, header};

use crate::census::{self, Census};
use crate::config::Settings;
use crate::guard::{Guard, Signal, Watch};
use crate::metrics::{LegacyTraffic, Metrics};
use crate::resolve::{RequestParts, resolve};
use crate::shadow::{Pending, Plan, SafeRequest, Shadow};
use crate::shared_value;
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
    /// Random per process: another replica's ids are other numbers.
    id_seed: u64,
}

struct Names {
    legacy: Arc<str>,
    new: Arc<str>,
}

/// What the request path learned about one request so far.
pub struct Ctx {
    /// The request id as a header value, made once: it goes upstream and
    /// back to the client ([`Ctx::request_id_value`]), and is read as text
    /// from it ([`Ctx::request_id`]): an id is visible ASCII, by
    /// construction or by [`Shared::identify`]'s check.
    request_id_value: Option<HeaderValue>,
    started: Instant,
    pub settings: Arc<Settings>,
    pub tenant: Option<TenantId>,
    /// The tenant's id as a header value, lent by the routing table.
    tenant_header: Option<HeaderValue>,
    pub stage: Option<Stage>,
    /// The least advanced of the tenant's stage and its route's.
    pub effective: Option<Stage>,
    pub backend: Option<Backend>,
    /// The new side's service for this request's route (`None`: `new`).
    pub service: Option<Arc<str>>,
    /// `METHOD /template`, what route stages and the census name it by.
    pub route: String,
    /// A write route released for this tenant alone: the guard watches the
    /// route, not the tenant.
    canary: bool,
    rewritten_path: Option<String>,
    /// The route's read timeout, where it has its own.
    pub read_timeout: Option<Duration>,
    body_bytes: u64,
    /// Attempts that could not connect.
    pub connect_failures: usize,
    /// The upstream (index into the backend's upstreams) this attempt went to.
    upstream: Option<usize>,
    /// Upstreams this request has been sent to or refused by, as bits (the
    /// 64th and later all share the last bit).
    tried: u64,
    /// A safe read without a body on a route without side effects, or a write
    /// with the key its backend applies once by: an answer of 5xx, or none in
    /// time, from one upstream may be asked of the next.
    may_fail_over: bool,
    /// It was, once: a request fails over at most once.
    pub failed_over: bool,
    in_flight: bool,
    /// The header the census reads the client's version from (and whether it
    /// is the User-Agent), kept from the request's head.
    client: Option<(HeaderValue, bool)>,
    /// A shadow comparison admitted by `route`, started by `rewrite_upstream`
    /// once the forwarded headers are final.
    admitted: Option<Admitted>,
    /// The primary answer being captured for a started comparison.
    pending: Option<Pending>,
    /// A write of a known tenant, counted in [`Shadow::writes`] until
    /// [`Shared::finish`].
    writing: bool,
    /// The request carries an `Upgrade` header (seen by `route`'s one pass
    /// over the headers): only then can it be an upgrade.
    pub upgrade_header: bool,
}

struct Admitted {
    permit: tokio::sync::OwnedSemaphorePermit,
    served_by: Backend,
    compare_with: Backend,
    endpoint: String,
    /// The accepted mismatch classes of the table this request was routed by.
    accepted: Arc<ficus_diff::class::Accepted>,
}

/// What to do with a request once it is routed.
#[derive(Debug)]
pub enum Next {
    /// Send it to `ctx.backend`.
    Forward,
    /// Answer it here.
    Answer(Answer),
}

/// A response the proxy makes itself.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
    /// The body is not sent (HEAD, 304), though `Content-Length` says its size.
    pub head_only: bool,
    /// The client's connection is closed after it: an unread request body (or
    /// framing that can no longer be trusted, after an error) would be taken
    /// for the next request.
    pub close: bool,
}

/// A request the proxy answers itself with an error: its status and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: Cow<'static, str>,
}

impl Refusal {
    pub fn new(status: u16, message: &'static str) -> Refusal {
        Refusal {
            status,
            message: Cow::Borrowed(message),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.message)
    }
}

/// What went wrong with a request, as every engine names it: the rows of the
/// one table ([`Shared::failure`]) that turns a failure into an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Refused by the proxy (or an upstream's status kept as the error).
    Refused(Refusal),
    ConnectTimeout,
    /// The upstream did not answer (or take the request) in time.
    Timeout,
    /// The upstream could not be reached.
    Connect,
    /// The upstream failed under way: a reset, a malformed answer.
    Upstream,
    /// The client went away: nobody to answer.
    ClientGone,
    /// The client sent something the engine could not read.
    ClientMalformed,
    /// A bug in the proxy.
    Internal,
}

/// A header map the request path edits on the way upstream. Edits go through
/// it rather than through the map, so that a head that keeps headers beside
/// the map (pingora kept their case; hyper keeps it in an extension, and
/// takes the proxy's own headers written out) sees every edit.
pub trait UpstreamHead {
    fn method(&self) -> &Method;
    fn uri(&self) -> &Uri;
    fn headers(&self) -> &HeaderMap;
    fn remove_header(&mut self, name: &HeaderName);
    /// Adds the proxy's own headers, none of which the head carries (any the
    /// client sent were removed first).
    fn add_headers(&mut self, added: AddedHeaders);
    fn set_uri(&mut self, uri: Uri);
}

/// The headers the proxy adds to a request on its way upstream, kept as the
/// HTTP/1 field lines they are sent as (`name: value\r\n` each): hyper's
/// HTTP/1 client sends them as written (`hyper::ext::RawHeaderLines`), which
/// costs less than hashing each into the request's map. A name is a token
/// and a value holds no CR or LF (both checked when they were made), so
/// every line is whole.
pub struct AddedHeaders {
    lines: Vec<u8>,
}

impl AddedHeaders {
    fn new() -> AddedHeaders {
        // Room for the six a request usually gets.
        AddedHeaders {
            lines: Vec::with_capacity(256),
        }
    }

    fn push(&mut self, name: &HeaderName, value: &HeaderValue) {
        let (name, value) = (name.as_str().as_bytes(), value.as_bytes());
        self.lines.reserve(name.len() + value.len() + 4);
        self.lines.extend_from_slice(name);
        self.lines.extend_from_slice(b": ");
        self.lines.extend_from_slice(value);
        self.lines.extend_from_slice(b"\r\n");
    }

    /// The headers, as a map takes them (an HTTP/2 request, a shadow read).
    pub fn iter(&self) -> impl Iterator<Item = (HeaderName, HeaderValue)> + '_ {
        self.lines
            .split(|b| *b == b'\n')
            .filter_map(|line| line.strip_suffix(b"\r"))
            .filter_map(|line| {
                let colon = line.iter().position(|b| *b == b':')?;
                let name = HeaderName::from_bytes(&line[..colon]).ok()?;
                let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii_start()).ok()?;
                Some((name, value))
            })
    }

    /// The lines, as HTTP/1 sends them.
    pub fn into_lines(self) -> Vec<u8> {
        self.lines
    }

    /// Lines [`AddedHeaders::into_lines`] gave, back.
    pub fn from_lines(lines: Vec<u8>) -> AddedHeaders {
        AddedHeaders { lines }
    }
}

/// Why a request body past `max_body_bytes` is refused (413), whether its
/// length said so up front or its stream grew past it, on either engine.
pub const BODY_TOO_LARGE: &str = "request body is too large";

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The largest request id accepted from a client; longer ones are replaced.
const MAX_CLIENT_REQUEST_ID: usize = 128;

/// The `n`th request id of a process seeded `seed`: every step is a
/// bijection of `u64` (an odd multiple, an offset, splitmix64's finalizer), so
/// a process never repeats an id, and the ids do not read as a sequence. A
/// keyed SipHash did the same in about ten times the instructions, and could
/// repeat.
fn request_id_bits(seed: u64, n: u64) -> u64 {
    let mut z = seed.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// An upstream's bit in [`Ctx::tried`].
fn bit(upstream: usize) -> u64 {
    1 << upstream.min(63)
}

fn valid_host(host: &[u8]) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host.iter().all(|&b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_')
        })
}

/// What routing reads of a request's standard headers, found in the one pass
/// that sums their size: comparing a standard name is a comparison of two
/// small integers, where each `HeaderMap::get` hashed the name and probed the
/// map (five of them a request).
struct Scan<'h> {
    /// The size of the head's headers, as `max_header_bytes` counts it.
    bytes: usize,
    /// The first `Host` and the first `Content-Length`, as `get` finds them.
    host: Option<&'h HeaderValue>,
    content_length: Option<&'h HeaderValue>,
    /// The first `User-Agent`, which the census reads a client's version
    /// from when no header is configured for it.
    user_agent: Option<&'h HeaderValue>,
    /// The first value of the request id header.
    request_id: Option<&'h HeaderValue>,
    transfer_encoding: bool,
    upgrade: bool,
}

impl<'h> Scan<'h> {
    fn of(headers: &'h HeaderMap, request_id: &HeaderName) -> Scan<'h> {
        let mut scan = Scan {
            bytes: 0,
            host: None,
            content_length: None,
            user_agent: None,
            request_id: None,
            transfer_encoding: false,
            upgrade: false,
        };
        for (name, value) in headers {
            scan.bytes += name.as_str().len() + value.len() + 4;
            if *name == header::HOST {
                scan.host.get_or_insert(value);
            } else if *name == header::CONTENT_LENGTH {
                scan.content_length.get_or_insert(value);
            } else if *name == header::TRANSFER_ENCODING {
                scan.transfer_encoding = true;
            } else if *name == header::UPGRADE {
                scan.upgrade = true;
            } else if *name == header::USER_AGENT {
                scan.user_agent.get_or_insert(value);
            } else if name == request_id {
                scan.request_id.get_or_insert(value);
            }
        }
        scan
    }

    /// Whether the request announces a body: chunked, or a length other than 0.
    fn has_body(&self) -> bool {
        self.transfer_encoding || self.content_length.is_some_and(|l| l.as_bytes() != b"0")
    }
}

/// What the tenant-config endpoint needs of a request.
struct ConfigRequest<'r> {
    head: bool,
    other_method: bool,
    query: &'r str,
    if_none_match: Option<&'r str>,
    has_body: bool,
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
            id_seed: RandomState::new().hash_one(std::process::id()),
        }
    }

    /// Gives the request a new id: 16 hex digits, written by hand into one
    /// buffer (`format!` cost about 550 instructions a request, collecting
    /// the digits into a `String` one by one about 220), and its header value
    /// made at once from a buffer its clones share (one made from a copy is
    /// copied again, into a new allocation, the first time it is cloned).
    fn new_request_id(&self, ctx: &mut Ctx) {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let h = request_id_bits(self.id_seed, n);
        let mut digits = [0u8; 16];
        for (i, d) in digits.iter_mut().enumerate() {
            *d = b"0123456789abcdef"[((h >> ((15 - i) * 4)) & 0xf) as usize];
        }
        ctx.request_id_value = shared_value(digits);
    }

    /// A request's context, with the settings it is served by from start to end.
    pub fn ctx(&self) -> Ctx {
        Ctx {
            request_id_value: None,
            started: Instant::now(),
            settings: self.settings.load_full(),
            tenant: None,
            tenant_header: None,
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
            client: None,
            admitted: None,
            pending: None,
            writing: false,
            upgrade_header: false,
        }
    }

    /// Counts the request in flight until [`Shared::finish`]. Returns whether
    /// the proxy is draining: it answers what it is sent but keeps no
    /// connection, so a client (or load balancer) that pools connections to it
    /// opens its next one elsewhere instead of finding this one closed under a
    /// request.
    pub fn begin(&self, ctx: &mut Ctx) -> bool {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.metrics.in_flight.inc();
        ctx.in_flight = true;
        self.draining.load(Ordering::Relaxed)
    }

    /// Gives the request its id: the client's, when it sent a usable one,
    /// else a new one. [`Shared::route`] does this first; an engine that
    /// refuses a request before routing it calls it itself, so that the
    /// refusal names the request as the client does.
    pub fn identify(&self, ctx: &mut Ctx, headers: &HeaderMap) {
        let sent = headers.get(&ctx.settings.request_id_header);
        self.identify_as(ctx, sent);
    }

    /// [`Shared::identify`] with the client's request id header, if it sent
    /// one, already found.
    fn identify_as(&self, ctx: &mut Ctx, sent: Option<&HeaderValue>) {
        let sent = sent.filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_CLIENT_REQUEST_ID
                && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
        });
        match sent {
            Some(value) => ctx.request_id_value = Some(value.clone()),
            None => self.new_request_id(ctx),
        }
    }

    /// The routing table; a request that arrives before the first one is
    /// loaded (a replica that has just started and is already reachable, by
    /// a load balancer that never saw it down) waits for it, up to `wait`,
    /// instead of being refused at once.
    async fn first_table(&self, wait: Duration) -> Option<Arc<RoutingTable>> {
        if let Some(t) = self.table.load_full() {
            return Some(t);
        }
        let loaded = self.table_loaded.notified();
        tokio::pin!(loaded);
        // Registered before the second look, so a table stored in between
        // cannot be missed.
        loaded.as_mut().enable();
        if let Some(t) = self.table.load_full() {
            return Some(t);
        }
        let _ = tokio::time::timeout(wait, loaded).await;
        self.table.load_full()
    }

    /// Routes a request by its head: its request id, the checks every request
    /// passes, its tenant, its route and their stages, its backend, whether it
    /// may fail over, and whether it is compared. The checks that need the raw
    /// bytes of an HTTP/1 head (a bare LF, both framings) are the engine's,
    /// made before this.
    pub async fn route(
        &self,
        ctx: &mut Ctx,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<Next, Refusal> {
        let settings = Arc::clone(&ctx.settings);
        let scan = Scan::of(headers, &settings.request_id_header);
        if ctx.request_id_value.is_none() {
            self.identify_as(ctx, scan.request_id);
        }

        if scan.bytes > settings.max_header_bytes {
            return Err(Refusal::new(431, "request headers are too large"));
        }
        let host = scan
            .host
            .map(|h| h.as_bytes())
            .or(uri.authority().map(|a| a.as_str().as_bytes()));
        if host.is_some_and(|h| !valid_host(h)) {
            return Err(Refusal::new(400, "invalid host header"));
        }
        if let Some(len) = scan.content_length {
            match len.to_str().ok().and_then(|l| l.parse::<u64>().ok()) {
                Some(n) if n > settings.max_body_bytes => {
                    return Err(Refusal::new(413, BODY_TOO_LARGE));
                }
                Some(_) => {}
                None => return Err(Refusal::new(400, "invalid content-length")),
            }
        }

        let Some(table) = self.first_table(settings.first_table_wait).await else {
            return Err(Refusal::new(503, "the routing table is not loaded yet"));
        };
        let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
        let host = host.and_then(|h| std::str::from_utf8(h).ok());
        let parts = RequestParts {
            host,
            path_and_query,
            headers,
        };
        // One lookup of the tenant in the table: its stage, its suspension
        // and its header value.
        let mut suspended = false;
        if let Some(r) = resolve(&settings.rules, &parts, &table) {
            ctx.rewritten_path = r.rewritten_path;
            if let Some(known) = r.known {
                ctx.stage = Some(known.stage);
                suspended = known.suspended;
                ctx.tenant_header = known.header;
                ctx.tenant = Some(r.tenant);
            }
        }
        // The User-Agent as the scan found it (a look-up hashes a name).
        ctx.client = census::client_header(
            headers,
            settings.client_version_header.as_ref(),
            scan.user_agent,
        )
        .map(|(v, ua)| (v.clone(), ua));
        let path = uri.path();
        // The path the backend is sent, which routes and the census name.
        let forwarded = ctx
            .rewritten_path
            .as_deref()
            .map_or(path, |p| p.split('?').next().unwrap_or(p));
        // The tenant's configuration is the proxy's own to answer, resolved
        // exactly as a request is routed.
        if forwarded == settings.tenant_config_path {
            let request = ConfigRequest {
                head: method == Method::HEAD,
                other_method: !matches!(*method, Method::GET | Method::HEAD),
                query: uri.query().unwrap_or(""),
                if_none_match: headers
                    .get(header::IF_NONE_MATCH)
                    .and_then(|v| v.to_str().ok()),
                has_body: scan.has_body(),
            };
            return Ok(Next::Answer(config_answer(ctx, &table, request)));
        }
        // A suspended tenant keeps its data and its stage; its requests are
        // answered here and reach no backend.
        if suspended {
            return Ok(Next::Answer(error_answer(
                ctx,
                settings.suspended_status,
                &settings.suspended_message,
            )));
        }
        let method_name = method.as_str();
        // The route: its stage (a write starts held at legacy), its service on
        // the new side, and its name in the census.
        // A route holds by its method, as the control plane judges it (the
        // proxy's `unsafe_routes` are known to no one else): a safe-method
        // route with side effects is never shadowed, and follows its tenant.
        let writes = !ficus_core::routing::is_safe_method(method_name);
        let side_effects = writes || settings.shadow.is_unsafe(method_name, forwarded);
        ctx.route = settings.shadow.templates.endpoint(method_name, forwarded);
        let route_stage = table.routes.stage(ctx.tenant.as_ref(), &ctx.route, writes);
        let effective = ficus_core::routing::effective(ctx.stage, route_stage);
        ctx.effective = effective;
        match ficus_core::decide(effective, table.legacy_retired, settings.unknown_tenant) {
            Decision::Serve(b) => ctx.backend = Some(b),
            Decision::Reject => return Err(Refusal::new(404, "unknown tenant")),
        }
        let template = ctx.route.split_once(' ').map_or("", |(_, t)| t);
        let service = settings.service_routes.get(method_name, template);
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
                .find(|r| r.matches(method_name, path))
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
        let has_body = scan.has_body();
        let safe_method = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        // A write fails over only when its backend applies it once however often
        // it is sent, by a key the client gave (`idempotency_header`): sending
        // it again can then not apply it twice.
        let keyed_write = side_effects
            && ctx.backend.is_some_and(|b| {
                settings
                    .backend(b, ctx.service.as_deref())
                    .idempotency_header
                    .as_ref()
                    .is_some_and(|h| headers.get(h).is_some_and(|v| !v.is_empty()))
            });
        ctx.may_fail_over = (safe_method && !has_body && !side_effects) || keyed_write;
        // Only a safe read without a body, on a route with no side effects, and
        // not an upgrade (its answer is a tunnel, not a body to compare).
        let upgrade = scan.upgrade;
        ctx.upgrade_header = upgrade;
        if let (Some((served_by, compare_with)), Some(tenant), true, false, false, false) = (
            pair,
            &ctx.tenant,
            safe_method,
            has_body,
            side_effects,
            upgrade,
        ) {
            let endpoint = ctx.route.clone();
            if let Some(permit) = self.shadow.admit(tenant, &endpoint, &settings.shadow) {
                ctx.admitted = Some(Admitted {
                    permit,
                    served_by,
                    compare_with,
                    endpoint,
                    accepted: Arc::clone(&table.accepted),
                });
            }
        }
        // Whatever its stage, a write may change what a compared read of its
        // tenant sees, on any route: it is counted until it ends.
        if side_effects && let Some(tenant) = &ctx.tenant {
            self.shadow.writes.start(tenant);
            ctx.writing = true;
        }
        Ok(Next::Forward)
    }

    /// Counts a piece of the request body; past `max_body_bytes` the request
    /// is refused, whatever its framing announced.
    pub fn count_body(&self, ctx: &mut Ctx, len: usize) -> Result<(), Refusal> {
        ctx.body_bytes += len as u64;
        if ctx.body_bytes > ctx.settings.max_body_bytes {
            return Err(Refusal::new(413, BODY_TOO_LARGE));
        }
        Ok(())
    }

    /// The upstream (index into its backend's `upstreams`) this attempt goes
    /// to: round robin, and a retry (a refused connection, a failed-over
    /// read) to the upstream after the one that failed, not wherever the
    /// shared counter has got to meanwhile, which may be the same one.
    pub fn pick_upstream(&self, ctx: &mut Ctx) -> Result<usize, Refusal> {
        let backend = ctx
            .backend
            .ok_or_else(|| Refusal::new(500, "no backend chosen"))?;
        let n = ctx
            .settings
            .backend(backend, ctx.service.as_deref())
            .upstreams
            .len();
        if n == 0 {
            return Err(Refusal::new(500, "the backend has no upstreams"));
        }
        let next = match backend {
            Backend::Legacy => &self.next_legacy,
            Backend::New => &self.next_new,
        };
        let i = match ctx.upstream {
            Some(failed) => (1..=n)
                .map(|k| (failed + k) % n)
                .find(|&k| ctx.tried & bit(k) == 0)
                .unwrap_or((failed + 1) % n),
            None => next.fetch_add(1, Ordering::Relaxed) % n,
        };
        ctx.upstream = Some(i);
        ctx.tried |= bit(i);
        Ok(i)
    }

    /// After an attempt that could not connect (nothing was sent, so any
    /// request may go to the backend's next upstream): whether to try again.
    pub fn retry_connect(&self, ctx: &mut Ctx) -> bool {
        ctx.connect_failures += 1;
        let upstreams = ctx.backend.map_or(1, |b| {
            ctx.settings
                .backend(b, ctx.service.as_deref())
                .upstreams
                .len()
        });
        ctx.connect_failures < upstreams
    }

    /// Whether this attempt may fail over to the backend's next upstream, and
    /// if so, marks it as having done so and tells the guard and the metrics
    /// about the failed attempt: the client is spared the failure, the guard
    /// must not be.
    pub fn fail_over(&self, ctx: &mut Ctx) -> bool {
        let Some(backend) = ctx.backend else {
            return false;
        };
        let upstreams = ctx
            .settings
            .backend(backend, ctx.service.as_deref())
            .upstreams
            .len();
        // Only to an upstream this request has not been to yet.
        let untried = (0..upstreams).any(|k| ctx.tried & bit(k) == 0);
        if !ctx.may_fail_over || ctx.failed_over || !untried {
            return false;
        }
        ctx.failed_over = true;
        self.metrics.upstream_error(backend, "failover");
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
            self.guard.observe(&watch, signal, &ctx.settings.guard);
        }
    }

    /// Edits the request head on its way upstream. Whatever a client says
    /// about its tenant or backend is not forwarded: the backends trust these
    /// headers, so only the proxy may set them. Then starts the comparison
    /// admitted by [`Shared::route`], once per request (a retried attempt does
    /// not start a second one), with the head as the backend sees it.
    pub fn rewrite_upstream(
        &self,
        ctx: &mut Ctx,
        upstream: &mut impl UpstreamHead,
        client_ip: Option<&HeaderValue>,
    ) -> Result<(), Refusal> {
        let s = Arc::clone(&ctx.settings);
        // One pass over the names finds the client's headers the proxy
        // replaces (a client must not set the proxy's own, and its request id
        // and scheme are sent as the proxy's, once) and whether there are
        // forwarding headers to add to; most requests carry none of them, and
        // a look-up by name hashes it.
        let mut replaced: Vec<HeaderName> = Vec::new();
        let (mut forwarded_for, mut via) = (false, false);
        for k in upstream.headers().keys() {
            if k.as_str().starts_with("x-ficus-")
                || *k == s.tenant_header
                || *k == s.backend_header
                || *k == s.request_id_header
                || *k == X_FORWARDED_PROTO
            {
                replaced.push(k.clone());
            } else if *k == X_FORWARDED_FOR {
                forwarded_for = true;
            } else if *k == header::VIA {
                via = true;
            }
        }
        for name in &replaced {
            upstream.remove_header(name);
        }
        // The headers the proxy sets, written out together now that the
        // client's own are out of the way, rather than each hashed into the
        // map (the engine hands the lines to hyper).
        let mut added = AddedHeaders::new();
        if let Some(t) = &ctx.tenant {
            let value = match ctx.tenant_header.take() {
                Some(v) => v,
                None => shared_value(t.as_str().to_owned())
                    .ok_or_else(|| Refusal::new(400, "invalid tenant id"))?,
            };
            added.push(&s.tenant_header, &value);
        }
        if let Some(b) = ctx.backend {
            added.push(&s.backend_header, &HeaderValue::from_static(b.as_str()));
        }
        let id = ctx
            .request_id_value()
            .ok_or_else(|| Refusal::new(400, "invalid request id"))?;
        // The client's id, when it gave one, is the request's (read before
        // the rewrite): sent as the proxy's.
        added.push(&s.request_id_header, &id);
        if let Some(ip) = client_ip {
            let prior = if forwarded_for {
                upstream.headers().get(&X_FORWARDED_FOR)
            } else {
                None
            };
            let forwarded = match prior {
                Some(prior) => {
                    let mut joined = Vec::with_capacity(prior.len() + 2 + ip.len());
                    joined.extend_from_slice(prior.as_bytes());
                    joined.extend_from_slice(b", ");
                    joined.extend_from_slice(ip.as_bytes());
                    HeaderValue::from_bytes(&joined)
                        .map_err(|_| Refusal::new(400, "invalid x-forwarded-for header"))?
                }
                None => ip.clone(),
            };
            if forwarded_for {
                upstream.remove_header(&X_FORWARDED_FOR);
            }
            added.push(&X_FORWARDED_FOR, &forwarded);
        }
        // The scheme the proxy was asked in, whatever a client claims.
        added.push(&X_FORWARDED_PROTO, &HeaderValue::from_static("http"));
        let prior = if via {
            upstream.headers().get(header::VIA)
        } else {
            None
        };
        let via_value = match prior.and_then(|v| v.to_str().ok()) {
            Some(prior) => HeaderValue::try_from(format!("{prior}, 1.1 ficus"))
                .map_err(|_| Refusal::new(400, "invalid via header"))?,
            None => HeaderValue::from_static("1.1 ficus"),
        };
        if via {
            upstream.remove_header(&header::VIA);
        }
        added.push(&header::VIA, &via_value);
        if let Some(path) = &ctx.rewritten_path {
            let uri: Uri = path
                .parse()
                .map_err(|_| Refusal::new(400, "invalid path"))?;
            upstream.set_uri(uri);
        }
        if let (Some(admitted), Some(tenant)) = (ctx.admitted.take(), &ctx.tenant) {
            let path_and_query = upstream.uri().path_and_query().map_or("/", |p| p.as_str());
            if let Some(request) = SafeRequest::new(
                upstream.method(),
                path_and_query,
                upstream
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .chain(added.iter()),
            ) {
                let sh = &s.shadow;
                let ask_again = self.shadow.sample_noise(&admitted.endpoint, sh).then(|| {
                    s.backend(admitted.served_by, ctx.service.as_deref())
                        .clone()
                });
                let plan = Plan {
                    tenant: tenant.clone(),
                    rules: sh.rules_for(&admitted.endpoint).clone(),
                    endpoint: admitted.endpoint,
                    served_by: admitted.served_by,
                    compare_with: admitted.compare_with,
                    compare_backend: s
                        .backend(admitted.compare_with, ctx.service.as_deref())
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
                    new_version: s
                        .backend(Backend::New, ctx.service.as_deref())
                        .version
                        .clone(),
                    version_header: sh.version_header.clone(),
                    window: self.shadow.writes.open(tenant),
                };
                let done = self.shadow.spawn(admitted.permit, request, plan);
                ctx.pending = Some(Pending {
                    started: Instant::now(),
                    captured: Default::default(),
                    cap: sh.body_cap,
                    done: Some(done),
                });
            }
        }
        upstream.add_headers(added);
        Ok(())
    }

    /// The one table that turns a failure into the status and message the
    /// client is answered with (status 0: nobody to answer), counting it in
    /// the metrics.
    pub fn failure(&self, ctx: &mut Ctx, failure: &Failure) -> (u16, Cow<'static, str>) {
        if ctx.request_id_value.is_none() {
            self.new_request_id(ctx);
        }
        let (status, message, kind): (u16, Cow<'static, str>, Option<&str>) = match failure {
            Failure::Refused(r) => (r.status, r.message.clone(), None),
            Failure::ConnectTimeout => (
                504,
                "timed out connecting to the backend".into(),
                Some("connect_timeout"),
            ),
            Failure::Timeout => (
                504,
                "the backend did not answer in time".into(),
                Some("timeout"),
            ),
            Failure::Connect => (
                502,
                "the backend could not be reached".into(),
                Some("connect"),
            ),
            Failure::Upstream => (502, "the backend failed to answer".into(), Some("upstream")),
            Failure::ClientGone => (0, "".into(), None),
            Failure::ClientMalformed => (400, "malformed request".into(), None),
            Failure::Internal => (500, "internal proxy error".into(), None),
        };
        if let (Some(kind), Some(backend)) = (kind, ctx.backend) {
            self.metrics.upstream_error(backend, kind);
        }
        if kind.is_none() && status != 0 {
            self.metrics.rejected(&status.to_string());
        }
        (status, message)
    }

    /// The end of a request, answered with `status` (0: none) or failed:
    /// metrics, the guard, the census, legacy traffic, and the end of
    /// in-flight.
    pub fn finish(&self, ctx: &mut Ctx, status: u16, failed: bool) {
        // A response with no body (HEAD, 204) never reaches the body's end; a
        // failed one is not compared (dropping the sender tells the comparison).
        if let Some(mut p) = ctx.pending.take()
            && !failed
            && status != 0
        {
            p.finish();
        }
        if ctx.writing
            && let Some(tenant) = &ctx.tenant
        {
            ctx.writing = false;
            self.shadow.writes.end(tenant);
        }
        if ctx.in_flight {
            ctx.in_flight = false;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.metrics.in_flight.dec();
        }
        self.metrics.observe(
            ctx.backend,
            ctx.stage,
            status,
            ctx.started.elapsed(),
            ctx.tenant.as_ref(),
        );
        self.observe_for_guard(ctx, status >= 500);
        // One clock read for both counts below, a coarse one: they keep
        // when a tenant, a route or legacy was last seen, to the millisecond.
        let at = crate::clock::coarse_now();
        if let Some(b) = ctx.backend
            && !ctx.route.is_empty()
        {
            let name: &Arc<str> = match (b, &ctx.service) {
                (Backend::New, Some(s)) => s,
                (Backend::New, None) => &self.names.new,
                (Backend::Legacy, _) => &self.names.legacy,
            };
            self.census.record(
                ctx.tenant.as_ref(),
                &ctx.route,
                name,
                census::client_version_of(ctx.client.as_ref().map(|(v, ua)| (v, *ua))),
                at,
                ctx.service.is_some(),
            );
        }
        if ctx.backend == Some(Backend::Legacy) {
            self.traffic.record(ctx.tenant.as_ref(), at);
        }
    }
}

impl Ctx {
    /// The request id as a header value, set with the id; `None` before it
    /// is known.
    pub fn request_id_value(&self) -> Option<HeaderValue> {
        self.request_id_value.clone()
    }

    /// The request id as text (`""` before it is known).
    pub fn request_id(&self) -> &str {
        self.request_id_value
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// Captures the answer's head for a started comparison.
    pub fn capture_head(&mut self, status: u16, headers: &HeaderMap) {
        if let Some(p) = &mut self.pending {
            p.captured.status = status;
            p.captured.headers = headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            p.captured.encoded = headers
                .get(header::CONTENT_ENCODING)
                .is_some_and(|e| e.as_bytes() != b"identity");
        }
    }

    /// Tees a piece of the answer's body for a started comparison, up to its
    /// cap; the client's stream is never held.
    pub fn capture_body(&mut self, chunk: Option<&[u8]>, end_of_stream: bool) {
        if let Some(p) = &mut self.pending {
            if let Some(chunk) = chunk
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
    }

    /// Whether the attempt under way may still fail over (a safe read, or a
    /// keyed write, that has not yet).
    pub fn may_fail_over(&self) -> bool {
        self.may_fail_over && !self.failed_over
    }
}

/// A short JSON error with the request id. Every error answer the proxy makes
/// is made here.
pub fn error_answer(ctx: &Ctx, status: u16, message: &str) -> Answer {
    let body =
        serde_json::json!({ "error": message, "status": status, "request_id": ctx.request_id() })
            .to_string();
    let mut headers = vec![(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    )];
    headers.push((header::CONTENT_LENGTH, HeaderValue::from(body.len())));
    if let Some(id) = ctx.request_id_value() {
        headers.push((ctx.settings.request_id_header.clone(), id));
    }
    Answer {
        status,
        headers,
        body: Bytes::from(body),
        head_only: false,
        // After an error the proxy does not reuse the client's connection (an
        // unread request body, or framing that can no longer be trusted, would
        // poison it), so the answer must say so; otherwise the client sends its
        // next request into a connection that is being closed.
        close: true,
    }
}

/// Answers the tenant-config path: the resolved tenant's configuration
/// (optionally for one platform), 304 when the client's copy is current, a
/// 404 that says nothing about other tenants when the host has none.
fn config_answer(ctx: &Ctx, table: &RoutingTable, request: ConfigRequest<'_>) -> Answer {
    if request.other_method {
        return error_answer(ctx, 405, "the tenant configuration is read with GET");
    }
    let mut platform = None;
    for pair in request.query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("platform", value)) => match Platform::parse(value) {
                Some(p) => platform = Some(p),
                None => return error_answer(ctx, 400, "platform must be web, ios or android"),
            },
            _ => return error_answer(ctx, 400, "the only query parameter is platform"),
        }
    }
    let Some(served) = ctx.tenant.as_ref().and_then(|t| table.config(t, platform)) else {
        return error_answer(ctx, 404, "no tenant configuration for this request");
    };
    let etag: &str = &served.etag;
    let fresh = request.if_none_match.is_some_and(|v| {
        v.split(',')
            .map(|t| t.trim().trim_start_matches("W/"))
            .any(|t| t == etag || t == "*")
    });
    let status = if fresh { 304 } else { 200 };
    let mut headers = vec![(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    )];
    if let Ok(v) = HeaderValue::from_str(etag) {
        headers.push((header::ETAG, v));
    }
    headers.push((
        header::CACHE_CONTROL,
        HeaderValue::try_from(format!(
            "public, max-age={}",
            ctx.settings.tenant_config_max_age.as_secs()
        ))
        .unwrap_or(HeaderValue::from_static("no-cache")),
    ));
    if let Some(id) = ctx.request_id_value() {
        headers.push((ctx.settings.request_id_header.clone(), id));
    }
    if status == 200 {
        headers.push((header::CONTENT_LENGTH, HeaderValue::from(served.body.len())));
    }
    Answer {
        status,
        headers,
        body: served.body.clone(),
        head_only: fresh || request.head,
        // An unread request body would be taken for the next request.
        close: request.has_body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{Expect, expect};
    use ficus_core::Tenant;

    #[test]
    fn request_ids_never_repeat_and_do_not_count() {
        let seed = 0x1234_5678_9abc_def0;
        let ids: std::collections::HashSet<u64> =
            (0..100_000).map(|n| request_id_bits(seed, n)).collect();
        assert_eq!(ids.len(), 100_000);
        let steps: std::collections::HashSet<u64> = (0..100)
            .map(|n| request_id_bits(seed, n + 1).wrapping_sub(request_id_bits(seed, n)))
            .collect();
        assert_eq!(steps.len(), 100, "consecutive ids are no fixed step apart");
        assert_ne!(request_id_bits(seed, 7), request_id_bits(seed ^ 1, 7));
    }

    const CONFIG: &str = r#"
[proxy]
listen = ["127.0.0.1:1"]
admin_listen = "127.0.0.1:2"
store = "sqlite::memory:"
unknown_tenant = "reject"
[backends.legacy]
upstreams = ["127.0.0.1:3", "127.0.0.1:4"]
idempotency_header = "Idempotency-Key"
[backends.new]
upstreams = ["127.0.0.1:5"]
[shadow]
sample_rate = 1.0
[[tenant_from]]
path_prefix = "/t/{tenant}"
strip = true
[[tenant_from]]
header = "X-Tenant-Id"
"#;

    /// The request path's shared state over a table of one tenant per stage
    /// (`legacy`, `shadow`, `migrated`) and a suspended one.
    fn shared() -> Shared {
        let config = crate::Config::parse(std::path::Path::new("test.toml"), CONFIG, &|_| None)
            .expect("the test config parses");
        let shared = Shared::new(config.settings);
        let at = ficus_core::Timestamp::from_unix_millis(0);
        let tenant = |id: &str, stage, suspended| Tenant {
            id: TenantId::parse(id).expect("a valid tenant id"),
            name: id.to_string(),
            stage,
            version: 1,
            domains: Vec::new(),
            suspended,
            created_at: at,
            updated_at: at,
        };
        shared
            .table
            .store(Some(Arc::new(RoutingTable::from_snapshot(
                1,
                false,
                vec![
                    tenant("legacy", Stage::Legacy, false),
                    tenant("shadow", Stage::Shadow, false),
                    tenant("migrated", Stage::Migrated, false),
                    tenant("paused", Stage::Migrated, true),
                ],
            ))));
        shared
    }

    /// Routes a request written as its request line and header lines, and
    /// describes what the request path decided and, when it forwards, the
    /// head the upstream is sent.
    async fn check(request: &str, expect: Expect) {
        let shared = shared();
        let mut lines = request.lines();
        let (method, target) = lines
            .next()
            .and_then(|l| l.split_once(' '))
            .expect("a request line");
        let mut builder = http::Request::builder().method(method).uri(target);
        for line in lines {
            let (name, value) = line.split_once(": ").expect("a header line");
            builder = builder.header(name, value);
        }
        let (mut parts, ()) = builder.body(()).expect("a valid request").into_parts();
        let mut ctx = shared.ctx();
        shared.begin(&mut ctx);
        let routed = shared
            .route(&mut ctx, &parts.method, &parts.uri, &parts.headers)
            .await;
        // A generated id is random; a client's is shown as it was kept.
        let generated =
            ctx.request_id().len() == 16 && ctx.request_id().bytes().all(|b| b.is_ascii_hexdigit());
        let id = if generated { "<id>" } else { "<client's id>" };
        let mut out = String::new();
        match routed {
            Err(r) => out += &format!("refused {r}\n"),
            Ok(Next::Answer(a)) => {
                out += &format!(
                    "answered {} close={} head_only={}\n",
                    a.status, a.close, a.head_only
                );
                for (k, v) in &a.headers {
                    if *k != shared.settings.load().request_id_header {
                        out += &format!("  {k}: {}\n", v.to_str().unwrap_or("?"));
                    }
                }
                out += &format!("  {}\n", String::from_utf8_lossy(&a.body))
                    .replace(ctx.request_id(), id);
            }
            Ok(Next::Forward) => {
                out += &format!(
                    "forward to {:?} tenant={} stage={:?} effective={:?} route={:?} may_fail_over={} compared={}\n",
                    ctx.backend,
                    ctx.tenant.as_ref().map_or("-", |t| t.as_str()),
                    ctx.stage,
                    ctx.effective,
                    ctx.route,
                    ctx.may_fail_over(),
                    ctx.admitted.is_some(),
                );
                let upstream = shared.pick_upstream(&mut ctx);
                out += &format!("  upstream {upstream:?}\n");
                match shared.rewrite_upstream(
                    &mut ctx,
                    &mut parts,
                    Some(&HeaderValue::from_static("10.0.0.9")),
                ) {
                    Err(r) => out += &format!("  refused {r}\n"),
                    Ok(()) => {
                        out += &format!("  {} {}\n", parts.method, parts.uri);
                        // The map's headers and the lines the proxy wrote.
                        let lines = parts
                            .extensions
                            .get::<hyper::ext::RawHeaderLines>()
                            .map_or(&[][..], |l| &l.0[..]);
                        let mut headers: Vec<String> = parts
                            .headers
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .chain(
                                AddedHeaders::from_lines(lines.to_vec())
                                    .iter()
                                    .collect::<Vec<_>>(),
                            )
                            .map(|(k, v)| format!("  {k}: {}\n", v.to_str().unwrap_or("?")))
                            .collect();
                        headers.sort();
                        out += &headers.concat().replace(ctx.request_id(), id);
                    }
                }
                // An answer of 5xx, or none in time: the request goes to the
                // next upstream if it may, once.
                let again = shared.fail_over(&mut ctx);
                out += &format!("  fails over: {again}");
                if again {
                    out += &format!(" to upstream {:?}", shared.pick_upstream(&mut ctx));
                    out += &format!(", and again: {}", shared.fail_over(&mut ctx));
                }
                out += "\n";
            }
        }
        shared.finish(&mut ctx, 200, false);
        assert_eq!(shared.in_flight.load(Ordering::SeqCst), 0);
        expect.assert_eq(&out);
    }

    #[test]
    fn added_headers_are_whole_lines_and_read_back_as_they_were_added() {
        let mut added = AddedHeaders::new();
        added.push(
            &HeaderName::from_static("x-ficus-tenant"),
            &HeaderValue::from_static("acme"),
        );
        added.push(
            &header::VIA,
            &HeaderValue::from_static("1.0 edge, 1.1 ficus"),
        );
        // A value may hold a colon and leading spaces that are not its own.
        added.push(
            &HeaderName::from_static("x-note"),
            &HeaderValue::from_static("a: b"),
        );
        let back: Vec<String> = added.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        expect![[
            r#"["x-ficus-tenant=\"acme\"", "via=\"1.0 edge, 1.1 ficus\"", "x-note=\"a: b\""]"#
        ]]
        .assert_eq(&format!("{back:?}"));
        expect![[r#""x-ficus-tenant: acme\r\nvia: 1.0 edge, 1.1 ficus\r\nx-note: a: b\r\n""#]]
            .assert_eq(&format!(
                "{:?}",
                String::from_utf8(added.into_lines()).unwrap()
            ));
    }

    #[tokio::test]
    async fn routes_by_stage_and_rewrites_the_forwarded_head() {
        check(
            "GET /t/legacy/homes/7?x=1\nhost: app.example\nx-ficus-tenant: spoofed\nx-forwarded-for: 1.2.3.4\nvia: 1.0 edge\nx-forwarded-proto: https",
            expect![[r#"
                forward to Some(Legacy) tenant=legacy stage=Some(Legacy) effective=Some(Legacy) route="GET /homes/{id}" may_fail_over=true compared=false
                  upstream Ok(0)
                  GET /homes/7?x=1
                  host: app.example
                  via: 1.0 edge, 1.1 ficus
                  x-ficus-backend: legacy
                  x-ficus-tenant: legacy
                  x-forwarded-for: 1.2.3.4, 10.0.0.9
                  x-forwarded-proto: http
                  x-request-id: <id>
                  fails over: true to upstream Ok(1), and again: false
            "#]],
        )
        .await;
        check(
            "GET /homes\nx-tenant-id: shadow",
            expect![[r#"
                forward to Some(Legacy) tenant=shadow stage=Some(Shadow) effective=Some(Shadow) route="GET /homes" may_fail_over=true compared=true
                  upstream Ok(0)
                  GET /homes
                  via: 1.1 ficus
                  x-ficus-backend: legacy
                  x-ficus-tenant: shadow
                  x-forwarded-for: 10.0.0.9
                  x-forwarded-proto: http
                  x-request-id: <id>
                  x-tenant-id: shadow
                  fails over: true to upstream Ok(1), and again: false
            "#]],
        )
        .await;
    }

    #[tokio::test]
    async fn a_write_holds_at_legacy_and_fails_over_only_with_its_key() {
        check(
            "POST /homes\nx-tenant-id: migrated\ncontent-length: 2",
            expect![[r#"
                forward to Some(Legacy) tenant=migrated stage=Some(Migrated) effective=Some(Legacy) route="POST /homes" may_fail_over=false compared=false
                  upstream Ok(0)
                  POST /homes
                  content-length: 2
                  via: 1.1 ficus
                  x-ficus-backend: legacy
                  x-ficus-tenant: migrated
                  x-forwarded-for: 10.0.0.9
                  x-forwarded-proto: http
                  x-request-id: <id>
                  x-tenant-id: migrated
                  fails over: false
            "#]],
        )
        .await;
        check(
            "POST /homes\nx-tenant-id: legacy\ncontent-length: 2\nidempotency-key: k1",
            expect![[r#"
                forward to Some(Legacy) tenant=legacy stage=Some(Legacy) effective=Some(Legacy) route="POST /homes" may_fail_over=true compared=false
                  upstream Ok(0)
                  POST /homes
                  content-length: 2
                  idempotency-key: k1
                  via: 1.1 ficus
                  x-ficus-backend: legacy
                  x-ficus-tenant: legacy
                  x-forwarded-for: 10.0.0.9
                  x-forwarded-proto: http
                  x-request-id: <id>
                  x-tenant-id: legacy
                  fails over: true to upstream Ok(1), and again: false
            "#]],
        )
        .await;
        check(
            "GET /homes\nx-tenant-id: migrated\nx-request-id: client-7",
            expect![[r#"
                forward to Some(New) tenant=migrated stage=Some(Migrated) effective=Some(Migrated) route="GET /homes" may_fail_over=true compared=false
                  upstream Ok(0)
                  GET /homes
                  via: 1.1 ficus
                  x-ficus-backend: new
                  x-ficus-tenant: migrated
                  x-forwarded-for: 10.0.0.9
                  x-forwarded-proto: http
                  x-request-id: <client's id>
                  x-tenant-id: migrated
                  fails over: false
            "#]],
        )
        .await;
    }

    #[tokio::test]
    async fn refusals_and_answers_made_here() {
        check(
            "GET /homes\nx-tenant-id: nobody",
            expect![[r#"
            refused 404 unknown tenant
        "#]],
        )
        .await;
        check(
            "GET /homes\nhost: bad host",
            expect![[r#"
            refused 400 invalid host header
        "#]],
        )
        .await;
        check(
            "POST /homes\nx-tenant-id: legacy\ncontent-length: 99999999999",
            expect![[r#"
                refused 413 request body is too large
            "#]],
        )
        .await;
        check(
            "POST /homes\nx-tenant-id: legacy\ncontent-length: 1, 1",
            expect![[r#"
                refused 400 invalid content-length
            "#]],
        )
        .await;
        check(
            "GET /homes\nx-tenant-id: paused",
            expect![[r#"
            answered 403 close=true head_only=false
              content-type: application/json
              content-length: 82
              {"error":"this account is suspended","status":403,"request_id":"<id>"}
        "#]],
        )
        .await;
        check(
            "GET /.well-known/tenant-config?platform=ios\nx-tenant-id: legacy",
            expect![[r#"
                answered 200 close=false head_only=false
                  content-type: application/json
                  etag: "0-fde5578f6be16aa3"
                  cache-control: public, max-age=60
                  content-length: 219
                  {"display_name":"legacy","app_name":"legacy","branding":{"primary_color":null,"accent_color":null,"logo_url":null,"icon_url":null},"domains":[],"locale":"en","features":{},"platform":"ios","tenant":"legacy","version":0}
            "#]],
        )
        .await;
        check(
            "GET /.well-known/tenant-config?platform=vax\nx-tenant-id: legacy",
            expect![[r#"
                answered 400 close=true head_only=false
                  content-type: application/json
                  content-length: 93
                  {"error":"platform must be web, ios or android","status":400,"request_id":"<id>"}
            "#]],
        )
        .await;
        check(
            "DELETE /.well-known/tenant-config\nx-tenant-id: legacy",
            expect![[r#"
                answered 405 close=true head_only=false
                  content-type: application/json
                  content-length: 98
                  {"error":"the tenant configuration is read with GET","status":405,"request_id":"<id>"}
            "#]],
        )
        .await;
    }

    #[test]
    fn failures_map_to_one_status_each() {
        let shared = shared();
        let mut ctx = shared.ctx();
        let rows: Vec<String> = [
            Failure::Refused(Refusal::new(413, "request body is too large")),
            Failure::ConnectTimeout,
            Failure::Timeout,
            Failure::Connect,
            Failure::Upstream,
            Failure::ClientGone,
            Failure::ClientMalformed,
            Failure::Internal,
        ]
        .iter()
        .map(|f| {
            let (status, message) = shared.failure(&mut ctx, f);
            format!("{f:?} -> {status} {message}\n")
        })
        .collect();
        expect![[r#"
            Refused(Refusal { status: 413, message: "request body is too large" }) -> 413 request body is too large
            ConnectTimeout -> 504 timed out connecting to the backend
            Timeout -> 504 the backend did not answer in time
            Connect -> 502 the backend could not be reached
            Upstream -> 502 the backend failed to answer
            ClientGone -> 0 
            ClientMalformed -> 400 malformed request
            Internal -> 500 internal proxy error
        "#]].assert_eq(&rows.concat());
    }

    #[test]
    fn one_pass_over_the_headers_finds_what_routing_reads() {
        let check = |head: &[(&str, &str)], expect: Expect| {
            let mut headers = HeaderMap::new();
            for (k, v) in head {
                headers.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            let id = HeaderName::from_static("x-request-id");
            let scan = Scan::of(&headers, &id);
            // What `get` and `contains_key` answer, which the scan replaced.
            assert_eq!(scan.host, headers.get(header::HOST));
            assert_eq!(scan.content_length, headers.get(header::CONTENT_LENGTH));
            assert_eq!(scan.user_agent, headers.get(header::USER_AGENT));
            assert_eq!(scan.request_id, headers.get(&id));
            let text = |v: Option<&HeaderValue>| v.map(|v| v.to_str().unwrap().to_owned());
            expect.assert_eq(&format!(
                "bytes {} host {:?} length {:?} te {} upgrade {} body {}",
                scan.bytes,
                text(scan.host),
                text(scan.content_length),
                scan.transfer_encoding,
                scan.upgrade,
                scan.has_body(),
            ));
        };
        check(
            &[],
            expect!["bytes 0 host None length None te false upgrade false body false"],
        );
        check(
            &[
                ("host", "a.example"),
                ("x-tenant-id", "t5"),
                ("content-length", "0"),
            ],
            expect![[
                r#"bytes 53 host Some("a.example") length Some("0") te false upgrade false body false"#
            ]],
        );
        // The first of two hosts, as `get` gives it; a length other than 0 or
        // any transfer-encoding is a body.
        check(
            &[
                ("host", "a.example"),
                ("host", "b.example"),
                ("content-length", "7"),
            ],
            expect![[
                r#"bytes 53 host Some("a.example") length Some("7") te false upgrade false body true"#
            ]],
        );
        // The first User-Agent and request id, as `get` gives them (asserted
        // above).
        check(
            &[
                ("x-request-id", "a"),
                ("user-agent", "U/1"),
                ("x-request-id", "b"),
                ("user-agent", "V/2"),
            ],
            expect!["bytes 68 host None length None te false upgrade false body false"],
        );
        check(
            &[("transfer-encoding", "chunked"), ("upgrade", "websocket")],
            expect!["bytes 48 host None length None te true upgrade true body true"],
        );
    }
}
