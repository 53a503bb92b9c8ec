//! The data plane on hyper 1.x (issue 22: pingora's HTTP/1 path costs about
//! twice hyper's per request on this machine). `proxy.engine = "hyper"` selects
//! it; pingora stays the default until this engine passes every test the
//! pingora one does.
//!
//! Every decision about a request is [`crate::request`]'s; this module reads
//! and writes bytes:
//!
//! - Client connections: hyper's server (HTTP/1 and h2c by preface, upgrades)
//!   over [`HeadGuard`], whose framer judges each HTTP/1 head as it was sent
//!   (a bare LF, both framings) and queues one verdict per request; a request
//!   with no verdict, or another request's, is refused and its connection
//!   closed, so a framer that lost the thread fails closed.
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
//! - Shutdown: the first SIGTERM/SIGINT drains as on pingora (`/readyz` 503,
//!   `Connection: close` on every answer, listeners open for `drain_delay`);
//!   then the listeners close and hyper's graceful shutdown lets what is in
//!   flight finish, up to `drain_timeout`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ficus_core::Backend;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version, header};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

use crate::config::BackendConfig;
use crate::head_guard::{Framer, HeadGuard};
use crate::request::{Ctx, Failure, Next, Refusal, Shared, error_answer};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The longest request head hyper reads, and the framer follows; pingora's
/// limit.
const MAX_HEAD: usize = 1024 * 1024;
/// The most headers one request may have; pingora's limit.
const MAX_HEADERS: usize = 256;
/// The request body kept to send again when a request fails over; pingora's
/// retry buffer. A longer body is not sent twice.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// What every connection shares.
pub struct Engine {
    shared: Arc<Shared>,
    pool: Arc<Pool>,
}

impl Engine {
    pub fn new(shared: Arc<Shared>, pool_size: usize) -> Engine {
        Engine {
            shared,
            pool: Arc::new(Pool {
                idle: Mutex::default(),
                h2c: Mutex::default(),
                max_idle: pool_size,
            }),
        }
    }

    /// The server side of one client connection, as a future that ends with
    /// the connection; `graceful` closes it once its in-flight requests end.
    pub fn serve(
        self: &Arc<Engine>,
        builder: &Arc<auto::Builder<TokioExecutor>>,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        graceful: &hyper_util::server::graceful::GracefulShutdown,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let _ = stream.set_nodelay(true);
        let framer = Arc::new(Mutex::new(Framer::new(MAX_HEAD, MAX_HEADERS)));
        let io = TokioIo::new(HeadGuard::new(stream, Arc::clone(&framer)));
        let engine = Arc::clone(self);
        let service = hyper::service::service_fn(move |req| {
            let (engine, framer) = (Arc::clone(&engine), Arc::clone(&framer));
            async move { Ok::<_, Infallible>(engine.handle(&framer, peer, req).await) }
        });
        let conn = builder
            .serve_connection_with_upgrades(io, service)
            .into_owned();
        let conn = graceful.watch(conn);
        async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        }
    }

    /// One request, start to answer; the answer's body ends it.
    async fn handle(
        &self,
        framer: &Mutex<Framer>,
        peer: SocketAddr,
        mut req: Request<Incoming>,
    ) -> Response<ClientBody> {
        let mut done = Done {
            shared: Arc::clone(&self.shared),
            ctx: Some(self.shared.ctx()),
            status: 0,
        };
        let ctx = done.ctx.as_mut().expect("a ctx until the request ends");
        let draining = self.shared.begin(ctx);
        self.shared.identify(ctx, req.headers());
        let http1 = req.version() <= Version::HTTP_11;
        // One verdict per HTTP/1 request, in order; none, or another
        // request's, means the framer lost the thread: refuse and close.
        if http1 {
            let verdict = framer
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .next_verdict();
            let refusal = match verdict {
                Some(v) if v.method == *req.method() && same_target(&v.target, req.uri()) => {
                    v.refusal
                }
                _ => Some("the request could not be read as it was sent"),
            };
            if let Some(message) = refusal {
                return self.fail(done, &Failure::Refused(Refusal::new(400, message)), true);
            }
        }
        let (mut parts, body) = {
            let ctx = done.ctx.as_mut().expect("a ctx until the request ends");
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
            // The client's side of an upgrade, taken before the head moves on.
            let upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
            let (parts, body) = req.into_parts();
            ((parts, upgrade), body)
        };
        let upgrade = parts.1.take();
        let mut parts = parts.0;
        let ctx = done.ctx.as_mut().expect("a ctx until the request ends");
        if let Err(refusal) = self
            .shared
            .rewrite_upstream(ctx, &mut parts, Some(peer.ip()))
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
        // What is sent again if the request fails over: nothing for a request
        // without a body, the body itself while it fits the replay buffer.
        let replay: Option<Bytes> = if !ctx.may_fail_over() {
            None
        } else if body.is_end_stream() {
            Some(Bytes::new())
        } else {
            match body.read_up_to(REPLAY_LIMIT).await {
                Ok(Ok(whole)) => Some(whole),
                Ok(Err(prefix)) => {
                    // Too long to keep: streamed after what was read, once.
                    return self
                        .forward(
                            done,
                            parts,
                            UpBody::stream(Some(prefix), body),
                            None,
                            &flags,
                            upgrade,
                            draining,
                            http1,
                        )
                        .await;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "the client's body could not be read");
                    return self.fail(done, &flags.failure(), http1);
                }
            }
        };
        let first = match &replay {
            Some(b) => UpBody::full(b.clone()),
            None => UpBody::stream(None, body),
        };
        self.forward(done, parts, first, replay, &flags, upgrade, draining, http1)
            .await
    }

    /// Sends the request upstream, to the next upstream when an attempt may be
    /// retried, and answers the client with what comes back.
    #[allow(
        clippy::too_many_arguments,
        reason = "one request's parts, each used once, kept apart so that the body moves and the head is reused"
    )]
    async fn forward(
        &self,
        mut done: Done,
        mut parts: http::request::Parts,
        first: UpBody,
        replay: Option<Bytes>,
        flags: &BodyFlags,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        draining: bool,
        http1: bool,
    ) -> Response<ClientBody> {
        let mut body = Some(first);
        let mut fresh_after_reuse = false;
        // The upstream to send to again, on a new connection.
        let mut again_on: Option<usize> = None;
        let (resp, checkin) = loop {
            let ctx = done.ctx.as_mut().expect("a ctx until the request ends");
            let Some(this) = body.take().or_else(|| replay.clone().map(UpBody::full)) else {
                return self.fail(done, &Failure::Upstream, http1);
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
            let conf = ctx
                .settings
                .backend(backend, ctx.service.as_deref())
                .clone();
            let addr = conf.upstreams[picked];
            let read_timeout = ctx.read_timeout.unwrap_or(conf.read_timeout);
            let request = upstream_request(&mut parts, this, &conf, addr);
            match self
                .pool
                .send(addr, &conf, request, read_timeout, fresh)
                .await
            {
                Ok((resp, checkin)) => {
                    if resp.status().is_server_error()
                        && replay.is_some()
                        && self.shared.fail_over(ctx)
                    {
                        // Asked of the next upstream; this answer is dropped
                        // with its connection.
                        continue;
                    }
                    break (resp, checkin);
                }
                Err(Sent::NotConnected(failure, request)) => {
                    if self.shared.retry_connect(ctx) {
                        // Nothing was sent: the body goes to the next one.
                        body = Some(request.into_body());
                        continue;
                    }
                    return self.fail(done, &failure, http1);
                }
                Err(Sent::Timeout) => {
                    if replay.is_some() && self.shared.fail_over(ctx) {
                        continue;
                    }
                    return self.fail(done, &flags.or(Failure::Timeout), http1);
                }
                Err(Sent::Failed { reused, error }) => {
                    // pingora's rule: an idempotent request whose reused
                    // connection closed under it is sent again, once, on a
                    // new connection to the same upstream.
                    if reused
                        && !fresh_after_reuse
                        && replay.is_some()
                        && parts.method.is_idempotent()
                        && !flags.any()
                    {
                        fresh_after_reuse = true;
                        again_on = Some(picked);
                        continue;
                    }
                    tracing::debug!(error = %error, %addr, "upstream request failed");
                    return self.fail(done, &flags.or(Failure::Upstream), http1);
                }
            }
        };
        let ctx = done.ctx.as_mut().expect("a ctx until the request ends");
        let (mut head, incoming) = resp.into_parts();
        ctx.capture_head(head.status.as_u16(), &head.headers);
        let switching = head.status == http::StatusCode::SWITCHING_PROTOCOLS;
        if !switching {
            strip_hop_by_hop(&mut head.headers);
        }
        if let Ok(id) = HeaderValue::from_str(&ctx.request_id) {
            head.headers
                .insert(ctx.settings.request_id_header.clone(), id);
        }
        if draining && http1 && !switching {
            head.headers
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let read_timeout = ctx.read_timeout.unwrap_or_else(|| {
            ctx.settings
                .backend(
                    ctx.backend.unwrap_or(Backend::Legacy),
                    ctx.service.as_deref(),
                )
                .read_timeout
        });
        if switching {
            if let Some(client) = client_upgrade {
                let mut upstream_resp = Response::from_parts(head.clone(), incoming);
                let upstream = hyper::upgrade::on(&mut upstream_resp);
                tokio::spawn(tunnel(client, upstream));
                head.version = Version::HTTP_11;
                return done.answer(Response::from_parts(head, ClientBody::full(Bytes::new())));
            }
            // An upstream that switched protocols unasked: nothing to join.
            return self.fail(done, &Failure::Upstream, http1);
        }
        head.version = Version::HTTP_11;
        let body = Answering {
            inner: incoming,
            read_timeout,
            sleep: None,
            checkin,
        };
        done.answer(Response::from_parts(head, ClientBody::upstream(body)))
    }

    /// Answers a failure: the one table names its status, `error_answer` its
    /// body; status 0 means nobody is there to answer.
    fn fail(&self, mut done: Done, failure: &Failure, http1: bool) -> Response<ClientBody> {
        let ctx = done.ctx.as_mut().expect("a ctx until the request ends");
        let (code, message) = self.shared.failure(ctx, failure);
        let answer = error_answer(ctx, code.max(400), &message);
        let mut resp = Response::new(ClientBody::full(answer.body));
        *resp.status_mut() = status(answer.status);
        resp.headers_mut().extend(answer.headers);
        if http1 {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        done.answer(resp)
    }
}

fn status(code: u16) -> http::StatusCode {
    http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR)
}

/// Whether the request target the framer saw is the one hyper parsed: the
/// same text for the origin form every client sends, compared without
/// allocating; any other form through the parsed URI's text.
fn same_target(raw: &str, uri: &Uri) -> bool {
    if raw.starts_with('/') {
        return uri.scheme().is_none() && uri.path_and_query().is_some_and(|p| p.as_str() == raw);
    }
    *uri == *raw || raw.parse::<Uri>().is_ok_and(|u| u == *uri)
}

/// An HTTP/1 upgrade request (`Connection: upgrade` with an `Upgrade`).
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// The hop-by-hop headers of an upstream's answer: they were about the
/// connection between the proxy and the upstream, not the client's.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        headers.remove(header::CONNECTION);
        headers.remove("keep-alive");
        headers.remove("proxy-connection");
    }
}

/// The request as the upstream is sent it: its head as rewritten (headers,
/// their case, the path), in the upstream's protocol.
fn upstream_request(
    parts: &mut http::request::Parts,
    body: UpBody,
    conf: &BackendConfig,
    addr: SocketAddr,
) -> Request<UpBody> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.headers_mut() = parts.headers.clone();
    // The headers' case as the client sent them, which hyper keeps beside the
    // map in the extensions: moved to the first attempt (a retry is sent them
    // in hyper's lower case, which HTTP allows).
    *req.extensions_mut() = std::mem::take(&mut parts.extensions);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    if conf.h2c {
        *req.version_mut() = Version::HTTP_2;
        *req.uri_mut() = format!("http://{addr}{path}")
            .parse()
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
/// side closes.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    match tokio::try_join!(client, upstream) {
        Ok((client, upstream)) => {
            let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(error = %e, "an upgraded connection ended with an error");
            }
        }
        Err(e) => tracing::debug!(error = %e, "an upgrade did not complete"),
    }
}

/// The request in flight: ends it ([`Shared::finish`]) exactly once, when its
/// answer's body ends or is dropped, or when the handler unwinds.
struct Done {
    shared: Arc<Shared>,
    ctx: Option<Ctx>,
    status: u16,
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
            self.shared.finish(&mut ctx, self.status, failed);
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
            if let Some(ctx) = done.ctx.as_mut() {
                ctx.capture_body(None, true);
            }
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
/// pool once the body ended whole.
struct Answering {
    inner: Incoming,
    read_timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    checkin: Option<Checkin>,
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
                if frame.is_none()
                    && let Some(c) = this.checkin.take()
                {
                    c.put_back();
                }
                Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
            }
            Poll::Pending => {
                let timeout = this.read_timeout;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                ready!(sleep.as_mut().poll(cx));
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

/// What the client's body did, for the handler to name a failed attempt.
#[derive(Default)]
struct BodyFlags {
    too_large: AtomicBool,
    client_failed: AtomicBool,
}

impl BodyFlags {
    fn any(&self) -> bool {
        self.too_large.load(Ordering::Relaxed) || self.client_failed.load(Ordering::Relaxed)
    }

    /// The failure the client's body caused, if it caused one, else `other`.
    fn or(&self, other: Failure) -> Failure {
        if self.too_large.load(Ordering::Relaxed) {
            Failure::Refused(Refusal::new(413, "request body is too large"))
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
    async fn read_up_to(&mut self, limit: usize) -> Result<Result<Bytes, Bytes>, BoxError> {
        let mut kept = bytes::BytesMut::new();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut *self).poll_frame(cx)).await
        {
            if let Ok(data) = frame?.into_data() {
                kept.extend_from_slice(&data);
                if kept.len() > limit {
                    return Ok(Err(kept.freeze()));
                }
            }
        }
        Ok(Ok(kept.freeze()))
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
                        return Poll::Ready(Some(Err("request body is too large".into())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.flags.client_failed.store(true, Ordering::Relaxed);
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
}

impl UpBody {
    fn full(bytes: Bytes) -> UpBody {
        UpBody {
            kept: (!bytes.is_empty()).then_some(bytes),
            rest: None,
        }
    }

    fn stream(prefix: Option<Bytes>, rest: Limited) -> UpBody {
        UpBody {
            kept: prefix.filter(|b| !b.is_empty()),
            rest: Some(rest),
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
        if let Some(bytes) = self.kept.take() {
            return Poll::Ready(Some(Ok(Frame::data(bytes))));
        }
        match &mut self.rest {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
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
    /// No answer in time.
    Timeout,
    /// Failed once sent; `reused` when it went on a pooled connection.
    Failed { reused: bool, error: hyper::Error },
}

/// Idle HTTP/1 connections per upstream, and one HTTP/2 connection per h2c
/// upstream.
struct Pool {
    idle: Mutex<std::collections::HashMap<SocketAddr, Vec<Idle>>>,
    h2c: Mutex<std::collections::HashMap<SocketAddr, client2::SendRequest<UpBody>>>,
    max_idle: usize,
}

struct Idle {
    sender: client1::SendRequest<UpBody>,
    since: Instant,
}

/// An HTTP/1 connection to put back in the pool once its answer is read.
struct Checkin {
    pool: Arc<Pool>,
    addr: SocketAddr,
    sender: client1::SendRequest<UpBody>,
}

impl Checkin {
    fn put_back(self) {
        if self.sender.is_closed() {
            return;
        }
        let pool = &self.pool;
        let mut idle = pool.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.entry(self.addr).or_default();
        if list.len() < pool.max_idle {
            list.push(Idle {
                sender: self.sender,
                since: Instant::now(),
            });
        }
    }
}

impl Pool {
    /// Sends `req` to `addr`, on a pooled connection unless `fresh`.
    async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        conf: &BackendConfig,
        req: Request<UpBody>,
        read_timeout: Duration,
        fresh: bool,
    ) -> Result<(Response<Incoming>, Option<Checkin>), Sent> {
        if conf.h2c {
            return self.send_h2c(addr, conf, req, read_timeout).await;
        }
        let pooled = if fresh {
            None
        } else {
            self.take_idle(addr, conf).await
        };
        let reused = pooled.is_some();
        let mut sender = match pooled {
            Some(s) => s,
            None => match connect(addr, conf).await {
                Ok(io) => {
                    let handshake = client1::Builder::new()
                        .preserve_header_case(true)
                        .max_headers(MAX_HEADERS)
                        .handshake(io)
                        .await;
                    match handshake {
                        Ok((sender, conn)) => {
                            tokio::spawn(async move {
                                if let Err(e) = conn.with_upgrades().await {
                                    tracing::debug!(error = %e, "upstream connection ended with an error");
                                }
                            });
                            sender
                        }
                        Err(_) => return Err(Sent::NotConnected(Failure::Connect, Box::new(req))),
                    }
                }
                Err(failure) => return Err(Sent::NotConnected(failure, Box::new(req))),
            },
        };
        match tokio::time::timeout(read_timeout, sender.try_send_request(req)).await {
            Err(_) => Err(Sent::Timeout),
            Ok(Ok(resp)) => Ok((
                resp,
                // Checked in by the answer body, once read whole.
                Some(Checkin {
                    pool: Arc::clone(self),
                    addr,
                    sender,
                }),
            )),
            Ok(Err(mut e)) => match e.take_message() {
                // Never written: the connection had closed; a new one takes it.
                Some(req) => Err(Sent::NotConnected(Failure::Connect, Box::new(req))),
                None => Err(Sent::Failed {
                    reused,
                    error: e.into_error(),
                }),
            },
        }
    }

    /// An idle connection to `addr` that is ready for a request.
    async fn take_idle(
        &self,
        addr: SocketAddr,
        conf: &BackendConfig,
    ) -> Option<client1::SendRequest<UpBody>> {
        loop {
            let idle = {
                let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
                idle.get_mut(&addr).and_then(Vec::pop)?
            };
            if idle.since.elapsed() >= conf.idle_timeout || idle.sender.is_closed() {
                continue;
            }
            let mut sender = idle.sender;
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    async fn send_h2c(
        &self,
        addr: SocketAddr,
        conf: &BackendConfig,
        req: Request<UpBody>,
        read_timeout: Duration,
    ) -> Result<(Response<Incoming>, Option<Checkin>), Sent> {
        let shared = {
            let h2c = self.h2c.lock().unwrap_or_else(PoisonError::into_inner);
            h2c.get(&addr).filter(|s| !s.is_closed()).cloned()
        };
        let mut sender = match shared {
            Some(s) => s,
            None => {
                let io = match connect(addr, conf).await {
                    Ok(io) => io,
                    Err(failure) => return Err(Sent::NotConnected(failure, Box::new(req))),
                };
                match client2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
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
            return Err(Sent::NotConnected(Failure::Connect, Box::new(req)));
        }
        match tokio::time::timeout(read_timeout, sender.try_send_request(req)).await {
            Err(_) => Err(Sent::Timeout),
            Ok(Ok(resp)) => Ok((resp, None)),
            Ok(Err(mut e)) => match e.take_message() {
                Some(req) => Err(Sent::NotConnected(Failure::Connect, Box::new(req))),
                None => Err(Sent::Failed {
                    reused: true,
                    error: e.into_error(),
                }),
            },
        }
    }
}

/// A new TCP connection to an upstream, within its connect timeout.
async fn connect(
    addr: SocketAddr,
    conf: &BackendConfig,
) -> Result<TokioIo<tokio::net::TcpStream>, Failure> {
    match tokio::time::timeout(conf.connect_timeout, tokio::net::TcpStream::connect(addr)).await {
        Err(_) => Err(Failure::ConnectTimeout),
        Ok(Err(_)) => Err(Failure::Connect),
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(TokioIo::new(stream))
        }
    }
}

/// The client side's server settings, made once.
pub fn server_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .preserve_header_case(true)
        .max_headers(MAX_HEADERS)
        .max_buf_size(MAX_HEAD)
        .timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    builder
}

/// Accepts client connections on `listener` until `stop` turns true, and
/// returns the watch on the connections it accepted, for the drain.
pub async fn accept(
    listener: tokio::net::TcpListener,
    engine: Arc<Engine>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> hyper_util::server::graceful::GracefulShutdown {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(engine.serve(&builder, stream, peer, &graceful));
                }
                Err(e) => {
                    // Out of file descriptors, most likely: the connections
                    // being served close and free some.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => break,
        }
    }
    graceful
}
