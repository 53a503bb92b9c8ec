//! The data plane on hyper 1.x. It replaced pingora (issue 22): pingora's
//! HTTP/1 path cost about 1.7 times hyper's instructions per request on this
//! machine, and this engine passed every test and the soak pingora's did.
//!
//! Every decision about a request is [`crate::request`]'s; this module reads
//! and writes bytes:
//!
//! - Client connections: hyper's server (HTTP/1 and h2c by preface, upgrades).
//!   The two refusals that need a request's head as it was sent (a bare LF,
//!   both framings) are found by hyper's own parser, patched
//!   (`vendor/hyper/FICUS-PATCH.md`), which hands such a request over marked
//!   with a [`hyper::ext::RawHeadRefusal`] and does not keep its connection.
//! - Reads (`GET`, `HEAD`, no body) to an HTTP/1 upstream go by the engine's
//!   own HTTP/1 path ([`raw`]), which the request's task drives itself.
//! - Upstream connections: a pool of HTTP/1 connections per upstream address,
//!   and one multiplexed connection per h2c upstream. A connection is taken
//!   from the pool before the request is handed over, so a failed connect
//!   leaves the request whole for the next upstream.
//! - The request body streams upstream through [`Limited`], which refuses a
//!   body past `max_body_bytes` (413) however it is framed. A request that may
//!   fail over (a safe read, a keyed write) keeps its body, up to
//!   [`REPLAY_LIMIT`], to send again.
//! - The answer streams back through [`ClientBody`], which tees it for a
//!   comparison and ends the request (metrics, census, guard, in-flight) when
//!   its last byte is written or the client goes away.
//! - Shutdown: the first SIGTERM/SIGINT drains (`/readyz` 503,
//!   `Connection: close` on every answer, listeners open for `drain_delay`);
//!   then the listeners close and [`Drain`] tells each connection to close
//!   once what is in flight finishes (hyper's graceful shutdown of it), up to
//!   `drain_timeout`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use ficus_core::Backend;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri, Version, header};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

use crate::config::{BackendConfig, HeaderCase};
use crate::drain::Drain;
use crate::request::{
    AddedHeaders, BODY_TOO_LARGE, Ctx, Failure, Next, Refusal, Shared, UpstreamHead, error_answer,
};
use crate::tape::Tape;

mod raw;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The longest request head hyper reads; pingora's limit.
pub(crate) const MAX_HEAD: usize = 1024 * 1024;
/// The request body kept to send again when a request fails over; pingora's
/// retry buffer. A longer body is not sent twice.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// One client connection, as its requests see it.
struct Client {
    engine: Arc<Engine>,
    /// The client's address as `X-Forwarded-For` gives it.
    peer_ip: Option<HeaderValue>,
}

/// What every connection shares.
pub struct Engine {
    shared: Arc<Shared>,
    pool: Arc<Pool>,
}

impl Engine {
    pub fn new(shared: Arc<Shared>, pool_size: usize, header_case: HeaderCase) -> Engine {
        Engine {
            shared,
            pool: Arc::new(Pool {
                idle: Mutex::default(),
                raw: Mutex::default(),
                h2c: Mutex::default(),
                max_idle: pool_size,
                preserve_case: header_case == HeaderCase::Preserve,
            }),
        }
    }

    /// The server side of one client connection, as a future that ends with
    /// the connection; when `drain` closes, the connection closes once its
    /// in-flight request ends.
    pub fn serve(
        self: &Arc<Engine>,
        builder: &Arc<auto::Builder<TokioExecutor>>,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        drain: &Drain,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        // What every request of the connection shares, made once: one
        // reference to clone per request, and the client's address written
        // once for `X-Forwarded-For`.
        let client = Arc::new(Client {
            engine: Arc::clone(self),
            peer_ip: HeaderValue::try_from(peer.ip().to_string()).ok(),
        });
        let service = hyper::service::service_fn(move |req| {
            let client = Arc::clone(&client);
            async move { Ok::<_, Infallible>(client.engine.handle(&client, req).await) }
        });
        let conn = builder
            .serve_connection_with_upgrades(io, service)
            .into_owned();
        let watch = drain.watch();
        async move {
            let ended = watch.serve(conn, |conn| conn.graceful_shutdown()).await;
            if let Err(e) = ended {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        }
    }

    /// One request, start to answer; the answer's body ends it.
    async fn handle(&self, client: &Client, mut req: Request<Incoming>) -> Response<ClientBody> {
        let mut done = Done {
            shared: Arc::clone(&self.shared),
            ctx: Some(Box::new(self.shared.ctx())),
            status: 0,
            failed: false,
        };
        let ctx = done.ctx.as_mut().expect("a ctx until the request ends");
        let draining = self.shared.begin(ctx);
        let http1 = req.version() <= Version::HTTP_11;
        // What hyper's parser saw in the head as it was sent (a bare LF, both
        // framings): refused, and hyper does not keep the connection.
        if let Some(refusal) = req.extensions().get::<hyper::ext::RawHeadRefusal>() {
            // Routing gives a request its id; this refusal comes before it,
            // and names the request as the client does all the same.
            let message = refusal.0;
            self.shared.identify(ctx, req.headers());
            return self.fail(done, &Failure::Refused(Refusal::new(400, message)), true);
        }
        #[cfg(test)]
        if req.uri().path() == tests::PANIC_PATH {
            panic!("a bug in one request's path");
        }
        let routed = self
            .shared
            .route(ctx, req.method(), req.uri(), req.headers())
            .await;
        match routed {
            Ok(Next::Forward) => {}
            Ok(Next::Answer(answer)) => {
                let mut resp = Response::new(ClientBody::full(if answer.head_only {
                    Bytes::new()
                } else {
                    answer.body
                }));
                *resp.status_mut() = status(answer.status);
                resp.headers_mut().extend(answer.headers);
                if (answer.close || draining) && http1 {
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                return done.answer(resp);
            }
            Err(refusal) => return self.fail(done, &Failure::Refused(refusal), http1),
        }
        if *req.method() == Method::CONNECT {
            return self.fail(
                done,
                &Failure::Refused(Refusal::new(405, "CONNECT is not proxied")),
                http1,
            );
        }
        // The client's side of an upgrade, taken before the head moves on;
        // routing's pass over the headers saw whether there is an `Upgrade`.
        let asked = done.ctx.as_ref().is_some_and(|c| c.upgrade_header);
        let upgrade =
            (http1 && asked && is_upgrade(req.headers())).then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        // Before the rewrite: a header the client names in `Connection` must
        // not take away one the proxy sets.
        strip_hop_by_hop(&mut parts.headers, upgrade.is_some());
        let ctx = done.ctx.as_mut().expect("a ctx until the request ends");
        if let Err(refusal) = self
            .shared
            .rewrite_upstream(ctx, &mut parts, client.peer_ip.as_ref())
        {
            return self.fail(done, &Failure::Refused(refusal), http1);
        }
        let flags = Arc::new(BodyFlags::default());
        let mut body = Limited {
            inner: body,
            seen: 0,
            max: ctx.settings.max_body_bytes,
            flags: Arc::clone(&flags),
        };
        let wait = ctx
            .settings
            .backend(
                ctx.backend.unwrap_or(Backend::Legacy),
                ctx.service.as_deref(),
            )
            .read_timeout;
        // What is sent again if the attempt must be repeated: nothing for a
        // request without a body (a stale pooled connection may take any
        // idempotent one down with it), and, for a request that may fail over,
        // its body while it fits the replay buffer.
        let (replay, first) = if body.is_end_stream() {
            (Some(Bytes::new()), UpBody::full(Bytes::new(), &flags))
        } else if !ctx.may_fail_over() {
            (None, UpBody::stream(None, body, &flags))
        } else {
            match body.read_up_to(REPLAY_LIMIT, wait).await {
                Ok(Ok(whole)) => (Some(whole.clone()), UpBody::full(whole, &flags)),
                // Too long to keep: streamed after what was read, once.
                Ok(Err(prefix)) => (None, UpBody::stream(Some(prefix), body, &flags)),
                Err(e) => {
                    tracing::debug!(error = %e, "the client's body could not be read");
                    let failure = if flags.any() {
                        flags.failure()
                    } else {
                        Failure::Refused(Refusal::new(
                            408,
                            "the request body did not arrive in time",
                        ))
                    };
                    return self.fail(done, &failure, http1);
                }
            }
        };
        let request = Forwarded {
            parts,
            replay,
            flags,
            upgrade,
            draining,
            http1,
        };
        self.forward(done, request, first).await
    }

    /// Sends the request upstream, to the next upstream when an attempt may be
    /// retried, and answers the client with what comes back.
    async fn forward(
        &self,
        mut done: Done,
        mut request: Forwarded,
        first: UpBody,
    ) -> Response<ClientBody> {
        let http1 = request.http1;
        let mut body = Some(first);
        // Sent again, once, on a new connection to the same upstream: a reused
        // connection closed under an idempotent request, or a pooled one that
        // handed the request back unsent.
        let mut again_on: Option<usize> = None;
        let mut fresh_used = false;
        let (answer, read_timeout) = loop {
            let ctx = done.ctx.as_mut().expect("a ctx until the request ends");
            let Some(this) = body.take().or_else(|| {
                request
                    .replay
                    .clone()
                    .map(|b| UpBody::full(b, &request.flags))
            }) else {
                return self.fail(done, &request.flags.or(Failure::Upstream), http1);
            };
            let fresh = again_on.is_some();
            let picked = match again_on.take() {
                Some(i) => i,
                None => match self.shared.pick_upstream(ctx) {
                    Ok(i) => i,
                    Err(r) => return self.fail(done, &Failure::Refused(r), http1),
                },
            };
            let backend = ctx.backend.unwrap_or(Backend::Legacy);
            let settings = Arc::clone(&ctx.settings);
            let conf = settings.backend(backend, ctx.service.as_deref());
            let addr = conf.upstreams[picked];
            let read_timeout = ctx.read_timeout.unwrap_or(conf.read_timeout);
            // Whether the request may be sent again: its body is kept whole.
            let again = request.replay.is_some();
            // A bodiless read goes by the engine's own HTTP/1 path; its head
            // stays here, written from the parts.
            if raw::takes(
                &request.parts,
                conf,
                self.pool.preserve_case,
                request.upgrade.is_some(),
                this.is_end_stream(),
            ) {
                drop(this);
                match self
                    .pool
                    .send_raw(
                        addr,
                        conf,
                        &request.parts,
                        read_timeout,
                        fresh,
                        &request.flags,
                    )
                    .await
                {
                    raw::RawSent::Answered(resp) => {
                        if resp.status().is_server_error() && again && self.shared.fail_over(ctx) {
                            // Asked of the next upstream; this answer is
                            // dropped with its connection.
                            continue;
                        }
                        break (Answer::Raw(resp), read_timeout);
                    }
                    raw::RawSent::NotConnected(failure) => {
                        if self.shared.retry_connect(ctx) {
                            continue;
                        }
                        return self.fail(done, &failure, http1);
                    }
                    raw::RawSent::Timeout => {
                        if again && self.shared.fail_over(ctx) {
                            continue;
                        }
                        return self.fail(done, &request.flags.or(Failure::Timeout), http1);
                    }
                    raw::RawSent::Failed { reused, error } => {
                        // pingora's rule, as below: a read whose reused
                        // connection had closed goes again, once, on a new one.
                        if reused && !fresh_used && again && !request.flags.any() {
                            fresh_used = true;
                            again_on = Some(picked);
                            continue;
                        }
                        tracing::debug!(error = %error, %addr, "upstream request failed");
                        return self.fail(done, &request.flags.or(Failure::Upstream), http1);
                    }
                }
            }
            // The head is moved into the attempt. One that may be repeated
            // keeps it: an HTTP/1 connection records the bytes hyper writes
            // (`Tape`), parsed back only for a second attempt; an h2c one,
            // whose head is not bytes on the wire, is sent a copy.
            let upstream =
                upstream_request(&mut request.parts, this, conf, addr, again && conf.h2c);
            match self
                .pool
                .send(
                    addr,
                    conf,
                    upstream,
                    read_timeout,
                    fresh,
                    &request.flags,
                    again,
                )
                .await
            {
                Ok((resp, checkin)) => {
                    if resp.status().is_server_error() && again && self.shared.fail_over(ctx) {
                        if request
                            .parts
                            .restore(checkin.as_ref().map(|c| &*c.conn.tape))
                        {
                            // Asked of the next upstream; this answer is
                            // dropped with its connection.
                            continue;
                        }
                        tracing::debug!(%addr, "a head to send again was not recorded");
                    }
                    break (Answer::Hyper(resp, checkin), read_timeout);
                }
                Err(Sent::Unsent(upstream)) if !fresh_used => {
                    // A pooled connection closed before taking the request:
                    // nothing was sent, so it goes on a new connection.
                    fresh_used = true;
                    again_on = Some(picked);
                    body = Some(request.parts.take_back(*upstream));
                }
                Err(Sent::NotConnected(failure, upstream)) => {
                    body = Some(request.parts.take_back(*upstream));
                    if self.shared.retry_connect(ctx) {
                        // Nothing was sent: the body goes to the next one.
                        continue;
                    }
                    return self.fail(done, &failure, http1);
                }
                Err(Sent::Unsent(upstream)) => {
                    body = Some(request.parts.take_back(*upstream));
                    if self.shared.retry_connect(ctx) {
                        continue;
                    }
                    return self.fail(done, &Failure::Connect, http1);
                }
                Err(Sent::Timeout(tape)) => {
                    if again && self.shared.fail_over(ctx) && request.parts.restore(tape.as_deref())
                    {
                        continue;
                    }
                    return self.fail(done, &request.flags.or(Failure::Timeout), http1);
                }
                Err(Sent::Failed {
                    reused,
                    error,
                    tape,
                }) => {
                    // pingora's rule: an idempotent request whose reused
                    // connection closed under it is sent again, once, on a
                    // new connection to the same upstream.
                    if reused
                        && !fresh_used
                        && again
                        && request.parts.method.is_idempotent()
                        && !request.flags.any()
                        && request.parts.restore(tape.as_deref())
                    {
                        fresh_used = true;
                        again_on = Some(picked);
                        continue;
                    }
                    tracing::debug!(error = %error, %addr, "upstream request failed");
                    return self.fail(done, &request.flags.or(Failure::Upstream), http1);
                }
            }
        };
        let ctx = done.ctx.as_mut().expect("a ctx until the request ends");
        let (mut head, inner, checkin) = match answer {
            Answer::Hyper(resp, checkin) => {
                let (head, incoming) = resp.into_parts();
                (head, Inner::Hyper(incoming), checkin)
            }
            Answer::Raw(resp) => {
                let (head, body) = resp.into_parts();
                (head, Inner::Raw(body), None)
            }
        };
        ctx.capture_head(head.status.as_u16(), &head.headers);
        let switching = head.status == http::StatusCode::SWITCHING_PROTOCOLS;
        strip_hop_by_hop(&mut head.headers, switching);
        if let Some(id) = ctx.request_id_value() {
            head.headers
                .insert(ctx.settings.request_id_header.clone(), id);
        }
        if request.draining && http1 && !switching {
            head.headers
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        head.version = Version::HTTP_11;
        if switching {
            let (Some(client), Inner::Hyper(incoming)) = (request.upgrade, inner) else {
                // An upstream that switched protocols unasked: nothing to join.
                return self.fail(done, &Failure::Upstream, http1);
            };
            let mut upstream_resp = Response::from_parts(head.clone(), incoming);
            let upstream = hyper::upgrade::on(&mut upstream_resp);
            // The request lasts as long as its tunnel: in flight, and drained.
            done.status = 101;
            tokio::spawn(tunnel(client, upstream, done));
            return Response::from_parts(head, ClientBody::full(Bytes::new()));
        }
        let body = Answering::new(inner, read_timeout, checkin);
        done.answer(Response::from_parts(head, ClientBody::upstream(body)))
    }

    /// Answers a failure: the one table names its status, `error_answer` its
    /// body; status 0 means nobody is there to answer. A failed request is
    /// not compared.
    fn fail(&self, mut done: Done, failure: &Failure, http1: bool) -> Response<ClientBody> {
        done.failed = true;
        let ctx = done.ctx.as_mut().expect("a ctx until the request ends");
        let (code, message) = self.shared.failure(ctx, failure);
        // Status 0: the client went away. Something must still be returned to
        // hyper, which will fail to write it; the request ends as unanswered.
        let answer = error_answer(ctx, code.max(400), &message);
        let mut resp = Response::new(ClientBody::full(answer.body));
        *resp.status_mut() = status(answer.status);
        resp.headers_mut().extend(answer.headers);
        if http1 {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let mut resp = done.answer(resp);
        if code == 0
            && let Some(done) = resp.body_mut().done.as_mut()
        {
            done.status = 0;
        }
        resp
    }
}

/// The request's head as the request path edits it. The proxy's own
/// headers are written out once, as header lines hyper's HTTP/1 client sends
/// after the map's ([`hyper::ext::RawHeaderLines`], an extension: it moves
/// with the head from attempt to attempt as the header case does): hashing
/// the six into the map cost some 1,500 instructions a request (issue 22).
/// An h2c request takes them into its map ([`upstream_request`]).
impl UpstreamHead for http::request::Parts {
    fn method(&self) -> &Method {
        &self.method
    }
    fn uri(&self) -> &Uri {
        &self.uri
    }
    fn headers(&self) -> &HeaderMap {
        &self.headers
    }
    fn remove_header(&mut self, name: &HeaderName) {
        self.headers.remove(name);
    }
    fn add_headers(&mut self, added: AddedHeaders) {
        self.extensions
            .insert(hyper::ext::RawHeaderLines(added.into_lines()));
    }
    fn set_uri(&mut self, uri: Uri) {
        self.uri = uri;
    }
}

/// The head of a request an attempt handed back unsent, and its body; or,
/// for one sent, the head it was sent with.
trait TakeBack {
    fn take_back(&mut self, unsent: Request<UpBody>) -> UpBody;
    /// Whether the headers are here again for another attempt: still here
    /// (copied into the last), or parsed back from what its connection
    /// recorded.
    fn restore(&mut self, tape: Option<&Tape>) -> bool;
}

impl TakeBack for http::request::Parts {
    fn restore(&mut self, tape: Option<&Tape>) -> bool {
        if !self.headers.is_empty() {
            return true;
        }
        match tape.and_then(Tape::replay) {
            Some(headers) => {
                self.headers = headers;
                true
            }
            None => false,
        }
    }

    fn take_back(&mut self, unsent: Request<UpBody>) -> UpBody {
        let (mut head, body) = unsent.into_parts();
        // A moved head comes back; a copied one is still here.
        if self.headers.is_empty() {
            self.headers = std::mem::take(&mut head.headers);
        }
        if self.extensions.is_empty() {
            self.extensions = std::mem::take(&mut head.extensions);
        }
        body
    }
}

/// A request on its way upstream: what every attempt reuses.
struct Forwarded {
    parts: http::request::Parts,
    /// The body to send again if the request fails over.
    replay: Option<Bytes>,
    flags: Arc<BodyFlags>,
    /// The client's side of an upgrade.
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    draining: bool,
    http1: bool,
}

fn status(code: u16) -> http::StatusCode {
    http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR)
}

/// An HTTP/1 upgrade request (`Connection: upgrade` with an `Upgrade`).
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

/// Whether a `Connection` header names `token` (case aside).
fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Removes the hop-by-hop headers (RFC 9110 section 7.6.1): they are about one
/// connection, the client's or the upstream's, not the other. An upgrade keeps
/// `Connection: upgrade` and `Upgrade`, except to h2c: a client that upgraded
/// a connection to HTTP/2 at the upstream would talk to it past the proxy.
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) {
    // Most messages carry none of these, or only `Connection`: one pass over
    // the names (no hashing) leaves them untouched.
    let mut connection = false;
    let mut others = false;
    for name in headers.keys() {
        if *name == header::CONNECTION {
            connection = true;
        } else if *name == header::TE
            || *name == header::UPGRADE
            || *name == KEEP_ALIVE
            || *name == PROXY_CONNECTION
        {
            others = true;
        }
    }
    if !others && !connection {
        return;
    }
    if !others && connection_names_nothing(headers) {
        headers.remove(header::CONNECTION);
        return;
    }
    if let Some(upgrade) = headers.get(header::UPGRADE)
        && upgrade
            .to_str()
            .is_ok_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("h2c")))
    {
        headers.remove(header::UPGRADE);
    }
    let upgrading = upgrading && headers.contains_key(header::UPGRADE);
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            // Never the headers that frame the message or name its host: a
            // client must not make the upstream read a request another way.
            .filter(|n| {
                !(upgrading && *n == header::UPGRADE)
                    && *n != header::HOST
                    && *n != header::CONTENT_LENGTH
                    && *n != header::TRANSFER_ENCODING
            })
            .collect();
        for name in named {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
        if upgrading {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
    // `TE: trailers` may pass (HTTP/2 allows it, gRPC needs it); any other
    // transfer coding is about this hop only.
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
    if !upgrading {
        headers.remove(header::UPGRADE);
    }
}

/// Whether every `Connection` value is only `keep-alive` or `close` (or
/// empty): the common case, which names no header to remove.
fn connection_names_nothing(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONNECTION).iter().all(|v| {
        v.as_bytes().split(|b| *b == b',').all(|t| {
            let t = t.trim_ascii();
            t.is_empty()
                || t.eq_ignore_ascii_case(b"keep-alive")
                || t.eq_ignore_ascii_case(b"close")
        })
    })
}

/// The request as the upstream is sent it: its head as rewritten (headers,
/// their case, the path), in the upstream's protocol.
fn upstream_request(
    parts: &mut http::request::Parts,
    body: UpBody,
    conf: &BackendConfig,
    addr: SocketAddr,
    keep: bool,
) -> Request<UpBody> {
    if conf.h2c
        && let Some(lines) = parts.extensions.remove::<hyper::ext::RawHeaderLines>()
    {
        // HTTP/2 has no header lines: the proxy's headers go into the map,
        // which a repeated attempt is sent a copy of.
        parts
            .headers
            .extend(AddedHeaders::from_lines(lines.0).iter());
    }
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.headers_mut() = if keep {
        parts.headers.clone()
    } else {
        std::mem::take(&mut parts.headers)
    };
    // The headers' case as the client sent them, which hyper keeps beside the
    // map in the extensions: moved to the first attempt (a retry is sent them
    // in hyper's lower case, which HTTP allows).
    *req.extensions_mut() = std::mem::take(&mut parts.extensions);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    if conf.h2c {
        *req.version_mut() = Version::HTTP_2;
        // The authority the client named (an HTTP/2 upstream reads it in
        // place of `Host`), else the upstream's address.
        let named = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            });
        let authority = named.unwrap_or_else(|| addr.to_string());
        *req.uri_mut() = format!("http://{authority}{path}")
            .parse()
            .or_else(|_| format!("http://{addr}{path}").parse())
            .unwrap_or_else(|_| Uri::from_static("/"));
    } else {
        *req.version_mut() = Version::HTTP_11;
        *req.uri_mut() = if parts.uri.scheme().is_some() {
            path.parse().unwrap_or_else(|_| Uri::from_static("/"))
        } else {
            parts.uri.clone()
        };
        // An HTTP/2 client names the host in the target; HTTP/1 needs the header.
        if !req.headers().contains_key(header::HOST)
            && let Some(authority) = parts.uri.authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            req.headers_mut().insert(header::HOST, host);
        }
    }
    req
}

/// Joins the client's and the upstream's upgraded connections until either
/// side closes; the request ends with its tunnel.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    mut done: Done,
) {
    match tokio::try_join!(client, upstream) {
        Ok((client, upstream)) => {
            let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(error = %e, "an upgraded connection ended with an error");
            }
            done.end(false);
        }
        Err(e) => tracing::debug!(error = %e, "an upgrade did not complete"),
    }
}

/// The request in flight: ends it ([`Shared::finish`]) exactly once, when its
/// answer's body ends or is dropped, or when the handler unwinds.
struct Done {
    shared: Arc<Shared>,
    /// Boxed: `Done` moves with the request (into `forward`, into the
    /// answer's body, which hyper moves again), and a pointer moves for less
    /// than the whole context.
    ctx: Option<Box<Ctx>>,
    status: u16,
    /// Answered with a failure: not compared, whatever becomes of its body.
    failed: bool,
}

impl Done {
    /// Hands the request's end to the answer's body.
    fn answer(mut self, mut resp: Response<ClientBody>) -> Response<ClientBody> {
        self.status = resp.status().as_u16();
        resp.body_mut().done = Some(self);
        resp
    }

    fn end(&mut self, failed: bool) {
        if let Some(mut ctx) = self.ctx.take() {
            if !failed && !self.failed {
                ctx.capture_body(None, true);
            }
            self.shared
                .finish(&mut ctx, self.status, failed || self.failed);
        }
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        // Dropped before its body ended: the client went away, or the handler
        // unwound; either way not an answer to compare.
        self.end(true);
    }
}

/// What the client is sent: the upstream's answer, or one made here.
pub struct ClientBody {
    kind: Kind,
    done: Option<Done>,
}

enum Kind {
    Full(Option<Bytes>),
    Upstream(Answering),
}

impl ClientBody {
    fn full(bytes: Bytes) -> ClientBody {
        ClientBody {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
            done: None,
        }
    }

    fn upstream(body: Answering) -> ClientBody {
        ClientBody {
            kind: Kind::Upstream(body),
            done: None,
        }
    }

    fn ended(&mut self) {
        if let Some(mut done) = self.done.take() {
            done.end(false);
        }
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        // A body with nothing left (HEAD, 204, 304: hyper never polls it) ended
        // whole; any other was cut.
        if self.is_end_stream() {
            self.ended();
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match &mut this.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(body) => Pin::new(body).poll_frame(cx),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(ctx)) = (
                    frame.data_ref(),
                    this.done.as_mut().and_then(|d| d.ctx.as_mut()),
                ) {
                    ctx.capture_body(Some(data), false);
                }
            }
            Poll::Ready(None) => this.ended(),
            Poll::Ready(Some(Err(_))) => {
                // Cut under way: the client sees a cut answer, which is the
                // honest outcome of an upstream failing mid-body.
                if let Some(mut done) = this.done.take() {
                    done.end(true);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream(body) => body.size_hint(),
        }
    }
}

/// An upstream's answer body on its way to the client: each wait for the next
/// piece is bounded by the read timeout, and the connection goes back to the
/// pool once the body ended whole (hyper stops polling a body that says it
/// ended, so that is checked after every piece, and when it is dropped).
struct Answering {
    inner: Inner,
    read_timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    checkin: Option<Checkin>,
}

impl Answering {
    fn new(inner: Inner, read_timeout: Duration, checkin: Option<Checkin>) -> Answering {
        let mut body = Answering {
            inner,
            read_timeout,
            sleep: None,
            checkin,
        };
        body.check_in_if_ended();
        body
    }

    fn check_in_if_ended(&mut self) {
        if self.inner.is_end_stream()
            && let Some(c) = self.checkin.take()
        {
            c.put_back();
        }
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.check_in_if_ended();
    }
}

impl Body for Answering {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.sleep = None;
                match frame {
                    Some(Err(e)) => {
                        this.checkin = None;
                        Poll::Ready(Some(Err(e)))
                    }
                    Some(Ok(frame)) => {
                        this.check_in_if_ended();
                        Poll::Ready(Some(Ok(frame)))
                    }
                    None => {
                        if let Some(c) = this.checkin.take() {
                            c.put_back();
                        }
                        Poll::Ready(None)
                    }
                }
            }
            Poll::Pending => {
                ready!(stalled_for(&mut this.sleep, this.read_timeout, cx));
                this.sleep = None;
                this.checkin = None;
                Poll::Ready(Some(Err(
                    "the backend did not send the rest of its answer in time".into(),
                )))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An answer's body as it comes from upstream: read by hyper's client, or by
/// the engine's own HTTP/1 path ([`raw`]).
enum Inner {
    Hyper(Incoming),
    Raw(raw::RawBody),
}

impl Inner {
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Inner::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Inner::Raw(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Inner::Hyper(body) => body.is_end_stream(),
            Inner::Raw(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Inner::Hyper(body) => body.size_hint(),
            Inner::Raw(body) => body.size_hint(),
        }
    }
}

/// An upstream's answer, with the hyper connection to pool once it is read.
enum Answer {
    Hyper(Response<Incoming>, Option<Checkin>),
    Raw(Response<raw::RawBody>),
}

/// What the client's body did, for the handler to name a failed attempt and
/// to tell an upload under way from an upstream that does not answer.
#[derive(Default)]
struct BodyFlags {
    too_large: AtomicBool,
    /// The client sent a body hyper could not read (bad chunking).
    client_failed: AtomicBool,
    /// The client went away before its body was whole.
    client_gone: AtomicBool,
    /// Body bytes handed upstream so far, by every attempt.
    sent: AtomicU64,
}

impl BodyFlags {
    fn any(&self) -> bool {
        self.too_large.load(Ordering::Relaxed)
            || self.client_failed.load(Ordering::Relaxed)
            || self.client_gone.load(Ordering::Relaxed)
    }

    /// The failure the client's body caused, if it caused one, else `other`.
    fn or(&self, other: Failure) -> Failure {
        if self.too_large.load(Ordering::Relaxed) {
            Failure::Refused(Refusal::new(413, BODY_TOO_LARGE))
        } else if self.client_gone.load(Ordering::Relaxed) {
            Failure::ClientGone
        } else if self.client_failed.load(Ordering::Relaxed) {
            Failure::ClientMalformed
        } else {
            other
        }
    }

    fn failure(&self) -> Failure {
        self.or(Failure::ClientMalformed)
    }
}

/// The client's request body, refused past `max` bytes however it is framed.
struct Limited {
    inner: Incoming,
    seen: u64,
    max: u64,
    flags: Arc<BodyFlags>,
}

impl Limited {
    /// Reads the whole body if it is at most `limit` bytes (`Ok`); else what
    /// was read when it passed the limit (`Err`), the rest left to stream.
    /// Each wait for the next piece is bounded by `wait` (408).
    async fn read_up_to(
        &mut self,
        limit: usize,
        wait: Duration,
    ) -> Result<Result<Bytes, Bytes>, BoxError> {
        let mut kept = bytes::BytesMut::new();
        loop {
            let next = std::future::poll_fn(|cx| Pin::new(&mut *self).poll_frame(cx));
            let Ok(frame) = tokio::time::timeout(wait, next).await else {
                return Err("the request body did not arrive in time".into());
            };
            let Some(frame) = frame else {
                return Ok(Ok(kept.freeze()));
            };
            if let Ok(data) = frame?.into_data() {
                kept.extend_from_slice(&data);
                if kept.len() > limit {
                    return Ok(Err(kept.freeze()));
                }
            }
        }
    }
}

impl Body for Limited {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.max {
                        this.flags.too_large.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(BODY_TOO_LARGE.into())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                let flag = if e.is_incomplete_message() {
                    &this.flags.client_gone
                } else {
                    &this.flags.client_failed
                };
                flag.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(e.into())))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body on its way upstream: kept whole (sent again if it must be),
/// or streamed from the client once, after any part already read.
pub struct UpBody {
    kept: Option<Bytes>,
    rest: Option<Limited>,
    flags: Arc<BodyFlags>,
}

impl UpBody {
    fn full(bytes: Bytes, flags: &Arc<BodyFlags>) -> UpBody {
        UpBody {
            kept: (!bytes.is_empty()).then_some(bytes),
            rest: None,
            flags: Arc::clone(flags),
        }
    }

    fn stream(prefix: Option<Bytes>, rest: Limited, flags: &Arc<BodyFlags>) -> UpBody {
        UpBody {
            kept: prefix.filter(|b| !b.is_empty()),
            rest: Some(rest),
            flags: Arc::clone(flags),
        }
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = match self.kept.take() {
            Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
            None => match &mut self.rest {
                Some(rest) => Pin::new(rest).poll_frame(cx),
                None => Poll::Ready(None),
            },
        };
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.flags
                .sent
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.kept.is_none() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let kept = self.kept.as_ref().map_or(0, |b| b.len() as u64);
        match &self.rest {
            None => SizeHint::with_exact(kept),
            Some(rest) => {
                let r = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(r.lower() + kept);
                if let Some(upper) = r.upper() {
                    hint.set_upper(upper + kept);
                }
                hint
            }
        }
    }
}

/// How an attempt to send a request upstream failed.
enum Sent {
    /// No connection: the request comes back untouched.
    NotConnected(Failure, Box<Request<UpBody>>),
    /// A pooled (or shared h2c) connection closed before it took the request,
    /// which comes back untouched.
    Unsent(Box<Request<UpBody>>),
    /// No answer in time; the tape of its HTTP/1 connection.
    Timeout(Option<Arc<Tape>>),
    /// Failed once sent; `reused` when it went on a pooled connection.
    Failed {
        reused: bool,
        error: hyper::Error,
        tape: Option<Arc<Tape>>,
    },
}

impl Sent {
    /// A request that failed once sent: a timeout when the upstream stopped
    /// taking its bytes for the write timeout ([`Upstream`]), else a failure.
    fn failed(reused: bool, error: hyper::Error, tape: Option<Arc<Tape>>) -> Sent {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
        while let Some(e) = source {
            if e.downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .is_some_and(|inner| inner.is::<WriteTimedOut>())
            {
                return Sent::Timeout(tape);
            }
            source = e.source();
        }
        Sent::Failed {
            reused,
            error,
            tape,
        }
    }
}

/// Idle HTTP/1 connections per upstream, and one HTTP/2 connection per h2c
/// upstream.
struct Pool {
    idle: IdleLists<Conn1>,
    /// Idle connections of the engine's own HTTP/1 path ([`raw`]).
    raw: IdleLists<Box<raw::RawConn>>,
    h2c: Mutex<crate::FastMap<SocketAddr, client2::SendRequest<UpBody>>>,
    max_idle: usize,
    /// `header_case = "preserve"`: requests go upstream with their names'
    /// case as the client wrote them.
    preserve_case: bool,
}

/// An HTTP/1 connection to an upstream, as the pool keeps it.
struct Conn1 {
    sender: client1::SendRequest<UpBody>,
    /// What the connection wrote of its request's head, for a second attempt.
    tape: Arc<Tape>,
    /// The wait for an answer's head, one timer for all the connection's
    /// requests: moving a registered timer's deadline later is an atomic
    /// store, where a timer a request registers and drops takes the runtime's
    /// timer lock twice (callgrind: some 400 instructions a request).
    timer: Pin<Box<tokio::time::Sleep>>,
}

struct Idle<C> {
    conn: C,
    /// When it was pooled, by the coarse clock (idle timeouts are seconds).
    since: Duration,
}

/// Idle connections of one kind per upstream address: hyper's, or the
/// engine's own HTTP/1 path's.
type IdleLists<C> = Mutex<crate::FastMap<SocketAddr, Vec<Idle<C>>>>;

/// Pools `conn` in `lists`, unless `max` are there still alive (young enough
/// and `alive`).
fn keep_idle<C>(
    lists: &IdleLists<C>,
    addr: SocketAddr,
    idle_timeout: Duration,
    max: usize,
    conn: C,
    alive: impl Fn(&C) -> bool,
) {
    // Read before the lock: another thread may have pooled a connection
    // stamped later meanwhile, hence the saturating ages.
    let now = crate::clock::coarse_monotonic();
    let mut idle = lists.lock().unwrap_or_else(PoisonError::into_inner);
    let list = idle.entry(addr).or_default();
    if list.len() >= max {
        // Full: the oldest ones are the likeliest to have gone stale.
        list.retain(|i| now.saturating_sub(i.since) < idle_timeout && alive(&i.conn));
    }
    if list.len() < max {
        list.push(Idle { conn, since: now });
    }
}

/// The newest idle connection to `addr` young enough and `usable`; the ones
/// passed over are closed.
fn take_idle<C>(
    lists: &IdleLists<C>,
    addr: SocketAddr,
    idle_timeout: Duration,
    usable: impl Fn(&C) -> bool,
) -> Option<C> {
    let now = crate::clock::coarse_monotonic();
    let mut idle = lists.lock().unwrap_or_else(PoisonError::into_inner);
    let list = idle.get_mut(&addr)?;
    while let Some(i) = list.pop() {
        if now.saturating_sub(i.since) < idle_timeout && usable(&i.conn) {
            return Some(i.conn);
        }
    }
    None
}

/// An HTTP/1 connection to put back in the pool once its answer is read.
struct Checkin {
    pool: Arc<Pool>,
    addr: SocketAddr,
    idle_timeout: Duration,
    conn: Conn1,
}

impl Checkin {
    /// Pools the connection once it is ready for another request: at once if
    /// it is, else when hyper has finished with the last one (a request body
    /// still being sent after an early answer), within the idle timeout.
    fn put_back(self) {
        if self.conn.sender.is_closed() {
            return;
        }
        if self.conn.sender.is_ready() {
            self.pool.keep(self.addr, self.idle_timeout, self.conn);
            return;
        }
        let Checkin {
            pool,
            addr,
            idle_timeout,
            mut conn,
        } = self;
        tokio::spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(idle_timeout, conn.sender.ready()).await {
                pool.keep(addr, idle_timeout, conn);
            }
        });
    }
}

impl Pool {
    fn keep(&self, addr: SocketAddr, idle_timeout: Duration, conn: Conn1) {
        keep_idle(&self.idle, addr, idle_timeout, self.max_idle, conn, |c| {
            !c.sender.is_closed()
        });
    }

    /// Sends `req` to `addr`, on a pooled connection unless `fresh`. The
    /// answer's head must come within `read_timeout` of the last body byte
    /// handed upstream: an upload under way is not a silent upstream. A
    /// request that may be sent `again` has its head recorded by an HTTP/1
    /// connection.
    #[expect(
        clippy::too_many_arguments,
        reason = "one attempt's parts, each from a different owner"
    )]
    async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        conf: &BackendConfig,
        req: Request<UpBody>,
        read_timeout: Duration,
        fresh: bool,
        flags: &BodyFlags,
        again: bool,
    ) -> Result<(Response<Incoming>, Option<Checkin>), Sent> {
        // The paths that are not a pooled HTTP/1 connection are boxed: their
        // futures are large, and this one is moved with every request
        // (callgrind: a smaller future is fewer bytes copied per request).
        if conf.h2c {
            return Box::pin(self.send_h2c(addr, conf, req, read_timeout, fresh, flags)).await;
        }
        let pooled = if fresh {
            None
        } else {
            self.take_idle(addr, conf)
        };
        let reused = pooled.is_some();
        let mut conn = match pooled {
            Some(s) => s,
            None => match Box::pin(self.open(addr, conf)).await {
                Ok(opened) => opened,
                Err(failure) => return Err(Sent::NotConnected(failure, Box::new(req))),
            },
        };
        conn.tape.arm(again);
        let answer = conn.sender.try_send_request(req);
        match answer_within(conn.timer.as_mut(), read_timeout, flags, answer).await {
            None => Err(Sent::Timeout(Some(conn.tape))),
            Some(Ok(resp)) => Ok((
                resp,
                Some(Checkin {
                    pool: Arc::clone(self),
                    addr,
                    idle_timeout: conf.idle_timeout,
                    conn,
                }),
            )),
            Some(Err(mut e)) => match e.take_message() {
                Some(req) => Err(Sent::Unsent(Box::new(req))),
                None => Err(Sent::failed(reused, e.into_error(), Some(conn.tape))),
            },
        }
    }

    /// A new HTTP/1 connection to `addr`, its driver spawned, and its tape.
    async fn open(&self, addr: SocketAddr, conf: &BackendConfig) -> Result<Conn1, Failure> {
        let tape = Arc::new(Tape::default());
        let io = connect(addr, conf, Some(Arc::clone(&tape))).await?;
        let (sender, conn) = client1::Builder::new()
            .preserve_header_case(self.preserve_case)
            .handshake(io)
            .await
            .map_err(|_| Failure::Connect)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(Conn1 {
            sender,
            tape,
            // Registered with the runtime's timer when first awaited.
            timer: Box::pin(tokio::time::sleep_until(tokio::time::Instant::now())),
        })
    }

    /// An idle connection to `addr` ready for a request; stale ones, and ones
    /// not ready, are closed.
    fn take_idle(&self, addr: SocketAddr, conf: &BackendConfig) -> Option<Conn1> {
        take_idle(&self.idle, addr, conf.idle_timeout, |c| c.sender.is_ready())
    }

    async fn send_h2c(
        &self,
        addr: SocketAddr,
        conf: &BackendConfig,
        req: Request<UpBody>,
        read_timeout: Duration,
        fresh: bool,
        flags: &BodyFlags,
    ) -> Result<(Response<Incoming>, Option<Checkin>), Sent> {
        let shared = {
            let mut h2c = self.h2c.lock().unwrap_or_else(PoisonError::into_inner);
            if fresh {
                h2c.remove(&addr);
            }
            h2c.get(&addr).filter(|s| !s.is_closed()).cloned()
        };
        let reused = shared.is_some();
        let mut sender = match shared {
            Some(s) => s,
            None => {
                let io = match connect(addr, conf, None).await {
                    Ok(io) => io,
                    Err(failure) => return Err(Sent::NotConnected(failure, Box::new(req))),
                };
                match client2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    // Pings on an idle connection find an upstream that went
                    // away without closing it.
                    .keep_alive_interval(conf.idle_timeout.min(Duration::from_secs(30)))
                    .keep_alive_timeout(conf.read_timeout)
                    .handshake(io)
                    .await
                {
                    Ok((sender, conn)) => {
                        tokio::spawn(async move {
                            if let Err(e) = conn.await {
                                tracing::debug!(error = %e, "h2c upstream connection ended with an error");
                            }
                        });
                        self.h2c
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .insert(addr, sender.clone());
                        sender
                    }
                    Err(_) => return Err(Sent::NotConnected(Failure::Connect, Box::new(req))),
                }
            }
        };
        if sender.ready().await.is_err() {
            return Err(Sent::Unsent(Box::new(req)));
        }
        let timer = std::pin::pin!(tokio::time::sleep_until(tokio::time::Instant::now()));
        match answer_within(timer, read_timeout, flags, sender.try_send_request(req)).await {
            None => {
                // An upstream gone silent leaves the connection open: the next
                // request starts a new one rather than wait on this one.
                self.h2c
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&addr);
                Err(Sent::Timeout(None))
            }
            Some(Ok(resp)) => Ok((resp, None)),
            Some(Err(mut e)) => match e.take_message() {
                Some(req) => Err(Sent::Unsent(Box::new(req))),
                None => Err(Sent::failed(reused, e.into_error(), None)),
            },
        }
    }
}

/// Waits for an answer's head, giving up after `read_timeout` with no body
/// byte handed upstream in it (`None`); `timer` is set for each wait.
async fn answer_within<F: std::future::Future>(
    mut timer: Pin<&mut tokio::time::Sleep>,
    read_timeout: Duration,
    flags: &BodyFlags,
    answer: F,
) -> Option<F::Output> {
    tokio::pin!(answer);
    let mut sent = flags.sent.load(Ordering::Relaxed);
    loop {
        let now = tokio::time::Instant::now();
        // A deadline past what the clock can hold is as good as none.
        let deadline = now
            .checked_add(read_timeout)
            .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30));
        timer.as_mut().reset(deadline);
        // The answer first, as `tokio::time::timeout` asks: one that is
        // ready when the time is up still counts.
        let out = std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = answer.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            ready!(timer.as_mut().poll(cx));
            Poll::Ready(None)
        })
        .await;
        match out {
            Some(out) => return Some(out),
            None => {
                let now = flags.sent.load(Ordering::Relaxed);
                if now == sent {
                    return None;
                }
                sent = now;
            }
        }
    }
}

/// A new TCP connection to an upstream, within its connect timeout, whose
/// writes are bounded by the backend's write timeout, and recorded on `tape`
/// (HTTP/1 only).
async fn connect(
    addr: SocketAddr,
    conf: &BackendConfig,
    tape: Option<Arc<Tape>>,
) -> Result<TokioIo<Upstream>, Failure> {
    match tokio::time::timeout(conf.connect_timeout, tokio::net::TcpStream::connect(addr)).await {
        Err(_) => Err(Failure::ConnectTimeout),
        Ok(Err(_)) => Err(Failure::Connect),
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(TokioIo::new(Upstream {
                stream,
                write_timeout: conf.write_timeout,
                stalled: None,
                tape,
            }))
        }
    }
}

/// An upstream connection whose writes fail with `TimedOut` once the upstream
/// has taken no byte for `write_timeout` (`write_timeout_ms`): an upstream that
/// stops reading a request body, or a tunnel's bytes, does not hold the
/// request and its connection for ever. The timer is armed only when a write
/// would block, so a write that goes through at once costs nothing.
struct Upstream {
    stream: tokio::net::TcpStream,
    write_timeout: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The head of a request that may be sent again, as written.
    tape: Option<Arc<Tape>>,
}

/// Polls the timer of a wait that made no progress, armed for `timeout` when
/// the wait began; the caller clears `timer` on progress, so the time counts
/// from the last byte that moved. The answer's body ([`Answering`]) and the
/// upstream's writes ([`Upstream`]) bound their stalls with it.
fn stalled_for(
    timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    timeout: Duration,
    cx: &mut Context<'_>,
) -> Poll<()> {
    timer
        .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)))
        .as_mut()
        .poll(cx)
}

impl Upstream {
    /// Records what a write handed on: the bytes it took, or, when it failed,
    /// all it was given (hyper meant them for the upstream; a request sent
    /// again is sent them whole). Nothing while it waits.
    fn record(&self, bufs: &[std::io::IoSlice<'_>], write: &Poll<std::io::Result<usize>>) {
        if let Some(tape) = &self.tape {
            match write {
                Poll::Ready(Ok(n)) => tape.record(bufs, *n),
                Poll::Ready(Err(_)) => tape.record(bufs, usize::MAX),
                Poll::Pending => {}
            }
        }
    }

    /// `write`'s answer, or `TimedOut` when the upstream has taken nothing
    /// for the write timeout.
    fn bounded<T>(
        &mut self,
        cx: &mut Context<'_>,
        write: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        match write {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                ready!(stalled_for(&mut self.stalled, self.write_timeout, cx));
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    WriteTimedOut,
                )))
            }
        }
    }
}

/// The error [`Upstream`] fails a stalled write with, told apart from the
/// kernel's own `ETIMEDOUT` (a connection the network lost, which stays a
/// failure and keeps its retry on a new connection).
#[derive(Debug)]
struct WriteTimedOut;

impl std::fmt::Display for WriteTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the upstream took no byte within the write timeout")
    }
}

impl std::error::Error for WriteTimedOut {}

impl tokio::io::AsyncRead for Upstream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Upstream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let write = Pin::new(&mut self.stream).poll_write(cx, buf);
        let write = self.bounded(cx, write);
        self.record(&[std::io::IoSlice::new(buf)], &write);
        write
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let write = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        let write = self.bounded(cx, write);
        self.record(bufs, &write);
        write
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let flush = Pin::new(&mut self.stream).poll_flush(cx);
        self.bounded(cx, flush)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The client side's server settings, made once.
pub fn server_builder(header_case: HeaderCase) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .preserve_header_case(header_case == HeaderCase::Preserve)
        .max_buf_size(MAX_HEAD)
        // An idle keep-alive connection stays open, as on pingora (hyper's
        // default closes it after 30 s, racing load balancers' own idle
        // timeouts), and no timer is armed per request.
        .header_read_timeout(None)
        .timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    builder
}

/// Accepts client connections on `listener` until `stop` turns true, each
/// served as a task of its own (on whichever worker thread is free), and
/// returns the watch on the connections it accepted, for the drain
/// ([`Drain`]).
pub async fn accept(
    listener: tokio::net::TcpListener,
    engine: Arc<Engine>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Drain {
    let drain = Drain::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let open = Counted::new(&engine.shared.metrics.client_connections);
                let serve = engine.serve(&builder, stream, peer, &drain);
                tokio::spawn(async move {
                    serve.await;
                    drop(open);
                });
            }
            Err(e) => {
                // Out of file descriptors, most likely: the connections
                // being served close and free some.
                tracing::warn!(error = %e, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drain
}

/// One in a gauge until dropped, however the task holding it ends.
struct Counted(prometheus::IntGauge);

impl Counted {
    fn new(gauge: &prometheus::IntGauge) -> Counted {
        gauge.inc();
        Counted(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ficus_core::{Stage, Tenant, TenantId, Timestamp};
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A request to this path panics in the handler, as a bug would.
    pub(crate) const PANIC_PATH: &str = "/__ficus_test_panic";

    /// A backend that answers `ok`, counting the connections it accepts and
    /// holding requests to `/held` until `release` is notified.
    async fn backend(
        connections: Arc<AtomicUsize>,
        release: Arc<tokio::sync::Notify>,
    ) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                connections.fetch_add(1, Ordering::SeqCst);
                let release = Arc::clone(&release);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let release = Arc::clone(&release);
                        async move {
                            if req.uri().path() == "/held" {
                                release.notified().await;
                            }
                            let status = if req.uri().path() == "/empty" {
                                204
                            } else {
                                200
                            };
                            let mut resp =
                                Response::new(http_body_util::Full::new(if status == 204 {
                                    Bytes::new()
                                } else {
                                    Bytes::from_static(b"ok")
                                }));
                            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    /// The engine in front of `upstream`, serving tenant `acme` from legacy.
    async fn proxy(upstream: SocketAddr) -> (SocketAddr, Arc<Shared>) {
        proxy_with(upstream, "", "").await
    }

    /// [`proxy`] with more lines in the `[proxy]` table and in legacy's.
    async fn proxy_with(
        upstream: SocketAddr,
        proxy_extra: &str,
        legacy_extra: &str,
    ) -> (SocketAddr, Arc<Shared>) {
        let text = format!(
            "[proxy]\nlisten = [\"127.0.0.1:1\"]\nadmin_listen = \"127.0.0.1:2\"\nstore = \"sqlite::memory:\"\n{proxy_extra}\
             [backends.legacy]\nupstreams = [\"{upstream}\"]\n{legacy_extra}[backends.new]\nupstreams = [\"{upstream}\"]\n\
             [[tenant_from]]\nheader = \"X-Tenant-Id\"\n"
        );
        let config = crate::Config::parse(std::path::Path::new("test.toml"), &text, &|_| None)
            .expect("the test config parses");
        let header_case = config.header_case;
        let shared = Arc::new(Shared::new(config.settings));
        let at = Timestamp::from_unix_millis(0);
        shared
            .table
            .store(Some(Arc::new(crate::table::RoutingTable::from_snapshot(
                1,
                false,
                vec![Tenant {
                    id: TenantId::parse("acme").unwrap(),
                    name: "acme".into(),
                    stage: Stage::Legacy,
                    version: 1,
                    domains: Vec::new(),
                    suspended: false,
                    created_at: at,
                    updated_at: at,
                }],
            ))));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let engine = Arc::new(Engine::new(Arc::clone(&shared), 16, header_case));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        // Kept open for the test's life.
        std::mem::forget(stop);
        tokio::spawn(accept(
            listener,
            engine,
            Arc::new(server_builder(header_case)),
            stopped,
        ));
        (addr, shared)
    }

    /// Regression: each worker thread was a runtime of its own and served only
    /// the connections it had accepted, so a thread held up (its core shared
    /// with other work) held up its connections while the other thread had a
    /// core free. On the workers' runtime a connection is served by whichever
    /// thread is free: every connection of a burst is answered while one of
    /// the two threads is stuck.
    #[test]
    fn connections_are_served_while_one_worker_thread_is_stuck() {
        let runtime = crate::worker_runtime(2).unwrap();
        let (stuck, release) = std::sync::mpsc::channel::<()>();
        let (started, on_a_thread) = std::sync::mpsc::channel::<()>();
        // Holds one worker thread in a poll until the test ends.
        runtime.spawn(async move {
            started.send(()).unwrap();
            let _ = release.recv();
        });
        on_a_thread
            .recv_timeout(Duration::from_secs(60))
            .expect("the runtime runs no task beside the caller's");
        runtime.block_on(async {
            let upstream = backend(Arc::default(), Arc::default()).await;
            let (addr, shared) = proxy(upstream).await;
            let mut burst = Vec::new();
            for _ in 0..16 {
                burst.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            }
            for conn in &mut burst {
                // Bounded only so that a regression fails rather than hangs.
                let answer = tokio::time::timeout(Duration::from_secs(60), ask(conn, "GET", "/"))
                    .await
                    .expect("a connection was left to the stuck thread");
                assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            }
            assert_eq!(shared.metrics.client_connections.get(), 16);
        });
        drop(stuck);
        runtime.shutdown_timeout(Duration::from_secs(1));
    }

    /// Sends one request on `conn` and reads its answer whole (a body of
    /// `ok`, or none).
    async fn ask(conn: &mut tokio::net::TcpStream, method: &str, path: &str) -> String {
        let request = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nX-Tenant-Id: acme\r\n\r\n");
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = conn.read(&mut buf).await.unwrap_or(0);
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer);
            let whole = text.ends_with("\r\n\r\nok")
                || (text.contains("\r\n\r\n")
                    && (method == "HEAD" || text.starts_with("HTTP/1.1 204")));
            if n == 0 || whole {
                return text.into_owned();
            }
        }
    }

    /// Sends `input` on one connection, pipelined, and lists the answers read
    /// until the proxy closes: each status, whether it says `Connection:
    /// close`, and its error, if any.
    async fn check_raw(input: &str, expect: expect_test::Expect) {
        let upstream = backend(Arc::default(), Arc::default()).await;
        let (addr, _) = proxy(upstream).await;
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(input.as_bytes()).await.unwrap();
        let mut read = Vec::new();
        // Bounded only so that a regression fails rather than hangs.
        tokio::time::timeout(Duration::from_secs(60), conn.read_to_end(&mut read))
            .await
            .expect("the proxy kept the connection open")
            .unwrap();
        let text = String::from_utf8_lossy(&read);
        let answers: Vec<String> = text
            .split("HTTP/1.1 ")
            .skip(1)
            .map(|a| {
                let close = a.to_ascii_lowercase().contains("\r\nconnection: close\r\n");
                let error = a
                    .split("\"error\":\"")
                    .nth(1)
                    .and_then(|e| e.split('"').next())
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                format!("{}{}{error}", &a[..3], if close { " close" } else { "" })
            })
            .collect();
        expect.assert_eq(&answers.join("\n"));
    }

    /// The heads hyper's parser (patched, `vendor/hyper/FICUS-PATCH.md`)
    /// refuses for their bytes as sent: each is answered 400 with the reason
    /// and ends its connection, so a request pipelined behind it is never
    /// read; a clean pipeline is answered whole (its last request asks to
    /// close).
    #[tokio::test]
    async fn heads_refused_for_their_bytes_as_sent_end_the_connection() {
        let get =
            |path: &str| format!("GET {path} HTTP/1.1\r\nHost: t\r\nX-Tenant-Id: acme\r\n\r\n");
        let last = "GET /z HTTP/1.1\r\nHost: t\r\nX-Tenant-Id: acme\r\nConnection: close\r\n\r\n";
        check_raw(
            &format!("{}POST /p HTTP/1.1\r\nHost: t\r\nX-Tenant-Id: acme\r\nContent-Length: 2\r\n\r\nhi{}{last}", get("/a"), get("/b")),
            expect_test::expect![[r#"
                200
                200
                200
                200 close"#]],
        )
        .await;
        check_raw(
            &format!(
                "{}GET /b HTTP/1.1\r\nHost: t\nX-Tenant-Id: acme\r\n\r\n{last}",
                get("/a")
            ),
            expect_test::expect![[r#"
                200
                400 close (a header line ends in a bare LF)"#]],
        )
        .await;
        check_raw(
            &format!("\n{}{last}", get("/a")),
            expect_test::expect![[r#"
                400 close (a header line ends in a bare LF)"#]],
        )
        .await;
        check_raw(
            &format!("GET /a HTTP/1.1\r\nHost: t\r\nX-Tenant-Id: acme\r\n\n{last}"),
            expect_test::expect![[r#"
                400 close (a header line ends in a bare LF)"#]],
        )
        .await;
        for framings in [
            "Content-Length: 5\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: chunked\r\nContent-Length: 5",
        ] {
            check_raw(
                &format!("POST /p HTTP/1.1\r\nHost: t\r\nX-Tenant-Id: acme\r\n{framings}\r\n\r\n0\r\n\r\n{last}"),
                expect_test::expect![[r#"
                    400 close (a request may not carry both content-length and transfer-encoding)"#]],
            )
            .await;
        }
    }

    /// Regression (review of the first version): a connection went back to
    /// the pool only when an answer body was polled to its end, which hyper
    /// never does for a body that says it ended, so nearly every request
    /// opened a new upstream connection.
    #[tokio::test]
    async fn answers_of_every_kind_reuse_one_upstream_connection() {
        let connections = Arc::new(AtomicUsize::new(0));
        let upstream = backend(Arc::clone(&connections), Arc::default()).await;
        let (addr, shared) = proxy(upstream).await;
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        for (method, path) in [
            ("GET", "/a"),
            ("HEAD", "/b"),
            ("GET", "/empty"),
            ("GET", "/c"),
        ]
        .iter()
        .cycle()
        .take(20)
        {
            let answer = ask(&mut conn, method, path).await;
            assert!(
                answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.1 204"),
                "{method} {path}: {answer:?}"
            );
        }
        // One connection, give or take a check-in that raced the next request
        // (a connection goes back once hyper is done with it, which may come
        // a moment after the client has its answer); the bug opened twenty.
        let opened = connections.load(Ordering::SeqCst);
        assert!(opened <= 3, "{opened} upstream connections for 20 requests");
        settled(&shared).await;
    }

    /// A pooled connection keeps one timer for the waits of all its requests
    /// (moved later for each, not made anew): a request on a connection whose
    /// earlier requests were answered still meets its read timeout, whether
    /// the timer is still counting down from the last one or has gone off
    /// while the connection was idle.
    #[tokio::test]
    async fn a_reused_upstream_connection_still_meets_the_read_timeout() {
        let connections = Arc::new(AtomicUsize::new(0));
        let upstream = backend(Arc::clone(&connections), Arc::default()).await;
        let (addr, shared) = proxy_with(upstream, "", "read_timeout_ms = 100\n").await;
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        for round in 0..3 {
            for _ in 0..5 {
                let answer = ask(&mut conn, "GET", "/a").await;
                assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            }
            // Never answered: the upstream holds it. Bounded only so that a
            // regression fails rather than hangs.
            let answer =
                tokio::time::timeout(Duration::from_secs(60), ask(&mut conn, "GET", "/held"))
                    .await
                    .expect("the read timeout never came");
            assert!(
                answer.starts_with("HTTP/1.1 504"),
                "round {round}: {answer}"
            );
            // The 504 closes the client's connection (a failed answer says
            // `Connection: close`): the next round opens another.
            conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        }
        // Most of the fast requests went on a pooled connection.
        let opened = connections.load(Ordering::SeqCst);
        assert!(opened <= 9, "{opened} upstream connections for 18 requests");
        settled(&shared).await;
    }

    /// Waits until no request is in flight: a request ends when hyper drops
    /// its answer's body, which may come just after the client read it.
    async fn settled(shared: &Shared) {
        let waited = tokio::time::timeout(Duration::from_secs(30), async {
            while shared.in_flight.load(Ordering::SeqCst) != 0 {
                tokio::task::yield_now().await;
            }
        });
        assert!(waited.await.is_ok(), "a request stayed in flight");
    }

    /// A panic in one request's path ends that connection only: a request in
    /// flight on another connection is answered, the next one is served, and
    /// the panicked request does not stay counted in flight (which would hold
    /// up a drain until its deadline). Issue 22 weighed `panic = "abort"` for
    /// the release profile and kept unwinding for this; the test also checks
    /// the profile has not been switched to abort since.
    #[tokio::test]
    async fn a_panic_in_one_request_ends_its_connection_only() {
        let manifest =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.toml"))
                .unwrap();
        let manifest: toml::Table = manifest.parse().unwrap();
        let release_panic = manifest
            .get("profile")
            .and_then(|p| p.get("release"))
            .and_then(|r| r.get("panic"))
            .and_then(|p| p.as_str());
        assert_ne!(
            release_panic,
            Some("abort"),
            "the release profile must unwind"
        );
        let release = Arc::new(tokio::sync::Notify::new());
        let upstream = backend(Arc::default(), Arc::clone(&release)).await;
        let (addr, shared) = proxy(upstream).await;
        let held = tokio::spawn(async move {
            let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
            ask(&mut conn, "GET", "/held").await
        });
        while shared.in_flight.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let panicked = ask(&mut conn, "GET", PANIC_PATH).await;
        assert_eq!(
            panicked, "",
            "the panicking request's connection closed unanswered"
        );
        release.notify_one();
        assert!(held.await.unwrap().starts_with("HTTP/1.1 200"));
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(
            ask(&mut conn, "GET", "/after")
                .await
                .starts_with("HTTP/1.1 200")
        );
        settled(&shared).await;
    }

    /// `write_timeout_ms` bounds an upstream that stops taking a request's
    /// bytes: the request ends in 504 although its read timeout is an hour,
    /// and does not stay in flight. (On hyper the timeout was first not used
    /// at all: a stalled upload held its request until the read timeout.)
    #[tokio::test]
    async fn an_upstream_that_stops_reading_a_body_meets_the_write_timeout() {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        // A small receive buffer, so the kernel holds little of the body for
        // an upstream that never reads.
        socket.set_recv_buffer_size(4096).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let upstream = socket.local_addr().unwrap();
        let listener = socket.listen(16).unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let (addr, shared) = proxy_with(
            upstream,
            "max_body_bytes = 67108864\n",
            "write_timeout_ms = 100\nread_timeout_ms = 3600000\n",
        )
        .await;
        let conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut from, mut to) = conn.into_split();
        const BODY: usize = 32 * 1024 * 1024;
        tokio::spawn(async move {
            let head = format!(
                "POST /upload HTTP/1.1\r\nHost: t\r\nX-Tenant-Id: acme\r\nContent-Length: {BODY}\r\n\r\n"
            );
            to.write_all(head.as_bytes()).await.unwrap();
            let chunk = vec![0u8; 64 * 1024];
            for _ in 0..BODY / chunk.len() {
                if to.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = from.read(&mut buf).await.unwrap();
            assert!(n > 0, "the proxy closed without an answer");
            answer.extend_from_slice(&buf[..n]);
        }
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
        while shared.in_flight.load(Ordering::SeqCst) != 0 {
            tokio::task::yield_now().await;
        }
    }

    /// An upstream that records each request head it reads and answers it
    /// with a header written in mixed case.
    async fn recording_upstream() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (heads, seen) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let heads = heads.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = stream.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        head.extend_from_slice(&buf[..n]);
                        if head.windows(4).any(|w| w == b"\r\n\r\n") {
                            let _ = heads.send(String::from_utf8_lossy(&head).into_owned());
                            head.clear();
                            let answer = "HTTP/1.1 200 OK\r\nX-Answer-Case: 1\r\nContent-Length: 2\r\n\r\nok";
                            if stream.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    fn check_header_case(header_case: &str, expect: expect_test::Expect) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let seen = runtime.block_on(async {
            let (upstream, mut heads) = recording_upstream().await;
            let (addr, _) = proxy_with(upstream, header_case, "").await;
            let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
            conn.write_all(
                b"GET /case HTTP/1.1\r\nHost: t\r\nX-Tenant-Id: acme\r\nX-Custom-Case: a\r\n\r\n",
            )
            .await
            .unwrap();
            let mut answer = Vec::new();
            let mut buf = [0u8; 4096];
            while !answer.ends_with(b"\r\n\r\nok") {
                let n = conn.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed before the answer ended");
                answer.extend_from_slice(&buf[..n]);
            }
            let head = heads.recv().await.unwrap();
            let names = |text: &str| {
                text.lines()
                    .filter_map(|l| l.split_once(':').map(|(n, _)| n.to_string()))
                    .filter(|n| {
                        n.eq_ignore_ascii_case("x-custom-case")
                            || n.eq_ignore_ascii_case("x-answer-case")
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            format!(
                "upstream saw: {}\nclient saw: {}",
                names(&head),
                names(&String::from_utf8_lossy(&answer))
            )
        });
        expect.assert_eq(&seen);
    }

    /// Header names go out in lower case unless `header_case = "preserve"`,
    /// in both directions.
    #[test]
    fn header_names_keep_their_case_only_when_asked() {
        check_header_case(
            "",
            expect_test::expect![[r#"
                upstream saw: x-custom-case
                client saw: x-answer-case"#]],
        );
        check_header_case(
            "header_case = \"preserve\"\n",
            expect_test::expect![[r#"
                upstream saw: X-Custom-Case
                client saw: X-Answer-Case"#]],
        );
    }

    /// An upstream that answers every request head it reads with `answer`,
    /// as bytes, in pieces of `piece` bytes, and closes the connection after
    /// it when `close`; counting the connections it accepts.
    async fn scripted(
        answer: &'static [u8],
        piece: usize,
        close: bool,
        connections: Arc<AtomicUsize>,
    ) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = stream.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            for part in answer.chunks(piece) {
                                if stream.write_all(part).await.is_err() {
                                    return;
                                }
                                stream.flush().await.unwrap();
                            }
                            if close {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    /// Sends `method /` twice through the proxy to an upstream answering
    /// `answer` (see [`scripted`]), each on a new client connection, and lists
    /// what the client got (status, body, trailers) and how many upstream
    /// connections the two took.
    async fn check_answer(
        method: &str,
        answer: &'static [u8],
        piece: usize,
        close: bool,
        expect: expect_test::Expect,
    ) {
        use http_body_util::BodyExt;
        let connections = Arc::new(AtomicUsize::new(0));
        let upstream = scripted(answer, piece, close, Arc::clone(&connections)).await;
        let (addr, _) = proxy(upstream).await;
        let mut lines = Vec::new();
        for _ in 0..2 {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut sender, conn) = client1::handshake(TokioIo::new(stream)).await.unwrap();
            tokio::spawn(conn);
            let req = Request::builder()
                .method(method)
                .uri("/")
                .header("host", "t")
                .header("x-tenant-id", "acme")
                // hyper's server sends trailers only to a client that asks.
                .header("te", "trailers")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            let resp = match sender.send_request(req).await {
                Ok(resp) => resp,
                Err(e) => {
                    lines.push(format!("cut: {e}"));
                    continue;
                }
            };
            let status = resp.status().as_u16();
            let line = match resp.into_body().collect().await {
                Ok(all) => {
                    let trailers = all
                        .trailers()
                        .map(|t| format!(" trailers {t:?}"))
                        .unwrap_or_default();
                    let body = all.to_bytes();
                    let body = String::from_utf8_lossy(&body);
                    // The proxy's own answers carry a request id of their own.
                    let body = match body.split("\"error\":\"").nth(1) {
                        Some(e) => e.split('"').next().unwrap_or_default().to_string(),
                        None => body.into_owned(),
                    };
                    format!("{status} {body:?}{trailers}")
                }
                Err(e) => format!("{status} cut: {e}"),
            };
            lines.push(line);
        }
        lines.push(format!(
            "upstream connections: {}",
            connections.load(Ordering::SeqCst)
        ));
        expect.assert_eq(&lines.join("\n"));
    }

    /// The engine's own HTTP/1 path (`raw`) frames an answer as RFC 9112
    /// section 6.3 says, and pools a connection only after an answer that
    /// ended whole on a connection that stays open.
    #[tokio::test]
    async fn reads_frame_their_answers_as_http_1_says() {
        let cases: Vec<(&str, &'static [u8], usize, bool, expect_test::Expect)> = vec![
            (
                "GET",
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                1_000,
                false,
                expect_test::expect![[r#"
                    200 "hello"
                    200 "hello"
                    upstream connections: 1"#]],
            ),
            (
                "GET",
                b"HTTP/1.1 200 OK\r\nTrailer: X-Sum\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n",
                // Every byte its own write: each part of the answer (head,
                // chunk sizes, data, the CRLFs, trailers) is read in pieces.
                1,
                false,
                expect_test::expect![[r#"
                    200 "hello world" trailers {"x-sum": "11"}
                    200 "hello world" trailers {"x-sum": "11"}
                    upstream connections: 1"#]],
            ),
            // No length: the body runs to the close, and the connection is spent.
            (
                "GET",
                b"HTTP/1.1 200 OK\r\n\r\nto the end",
                1_000,
                true,
                expect_test::expect![[r#"
                    200 "to the end"
                    200 "to the end"
                    upstream connections: 2"#]],
            ),
            // HTTP/1.0 keeps a connection only when asked.
            (
                "GET",
                b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
                1_000,
                false,
                expect_test::expect![[r#"
                    200 "ok"
                    200 "ok"
                    upstream connections: 2"#]],
            ),
            (
                "GET",
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
                1_000,
                false,
                expect_test::expect![[r#"
                    200 "ok"
                    200 "ok"
                    upstream connections: 2"#]],
            ),
            // An interim answer is read past.
            (
                "GET",
                b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                1_000,
                false,
                expect_test::expect![[r#"
                    200 "ok"
                    200 "ok"
                    upstream connections: 1"#]],
            ),
            (
                "GET",
                b"HTTP/1.1 204 No Content\r\n\r\n",
                1_000,
                false,
                expect_test::expect![[r#"
                    204 ""
                    204 ""
                    upstream connections: 1"#]],
            ),
            (
                "HEAD",
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                1_000,
                false,
                expect_test::expect![[r#"
                    200 ""
                    200 ""
                    upstream connections: 1"#]],
            ),
            // Lengths that disagree frame nothing: the upstream failed.
            (
                "GET",
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
                1_000,
                false,
                expect_test::expect![[r#"
                    502 "the backend failed to answer"
                    502 "the backend failed to answer"
                    upstream connections: 2"#]],
            ),
            // A bad chunk cuts the answer under way; the connection is not kept.
            (
                "GET",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
                1_000,
                false,
                expect_test::expect![[r#"
                    cut: connection closed before message completed
                    cut: connection closed before message completed
                    upstream connections: 2"#]],
            ),
            // A switch nobody asked for: refused, and the connection, which
            // speaks another protocol now, is let go.
            (
                "GET",
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
                1_000,
                false,
                expect_test::expect![[r#"
                    502 "the backend failed to answer"
                    502 "the backend failed to answer"
                    upstream connections: 2"#]],
            ),
            // An answer nobody asked for behind the one asked for: the
            // connection is not used again, and the next read is answered by its
            // own answer.
            (
                "GET",
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n",
                1_000,
                false,
                expect_test::expect![[r#"
                    200 "ok"
                    200 "ok"
                    upstream connections: 2"#]],
            ),
            // An upstream that closes a connection after each answer without
            // saying so: the pooled connection is found closed when reused, and
            // the read goes again on a new one.
            (
                "GET",
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                1_000,
                true,
                expect_test::expect![[r#"
                    200 "ok"
                    200 "ok"
                    upstream connections: 2"#]],
            ),
        ];
        for (method, answer, piece, close, expect) in cases {
            check_answer(method, answer, piece, close, expect).await;
        }
    }
}
