//! The request path on pingora: its phases, each a call into the
//! engine-neutral request path ([`crate::request`]) plus what only pingora
//! knows (its session, its peers, its errors), top to bottom:
//!
//! 1. `early_request_filter`: count the request in flight.
//! 2. `request_filter`: refuse a raw head with a bare LF or both framings, then
//!    route the request ([`Shared::route`]) or answer it here.
//! 3. `upstream_peer`: the pingora peer of the upstream picked, with the
//!    route's read timeout.
//! 4. `upstream_request_filter`: the forwarded head ([`Shared::rewrite_upstream`]).
//! 5. `response_filter`: hand the request id back to the client; capture the
//!    answer for a comparison.
//! 6. `fail_to_proxy`: pingora's errors named as a [`Failure`], answered by
//!    [`Shared::failure`] and [`error_answer`].
//! 7. `logging`: [`Shared::finish`].

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use pingora_core::modules::http::HttpModules;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::head_guard;
pub use crate::request::Shared;
use crate::request::{Answer, Ctx, Failure, Next, Refusal, UpstreamHead, error_answer};

/// The proxy, as pingora sees it.
pub struct Ficus {
    pub shared: Arc<Shared>,
}

/// A refusal as pingora carries it: an error whose type is the status.
fn refused(r: Refusal) -> Box<Error> {
    let message: pingora_error::ImmutStr = match r.message {
        Cow::Borrowed(m) => m.into(),
        Cow::Owned(m) => m.into(),
    };
    Error::explain(ErrorType::HTTPStatus(r.status), message)
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

/// A pingora error named as the request path names failures.
fn failure(e: &Error) -> Failure {
    use ErrorType::*;
    match e.etype() {
        HTTPStatus(code) => Failure::Refused(Refusal {
            status: *code,
            message: e
                .context
                .as_ref()
                .map_or(Cow::Borrowed("request refused"), |c| {
                    Cow::Owned(c.as_str().to_string())
                }),
        }),
        ConnectTimedout => Failure::ConnectTimeout,
        ReadTimedout | WriteTimedout => Failure::Timeout,
        ConnectRefused | ConnectNoRoute | ConnectError | SocketError | BindError => {
            Failure::Connect
        }
        _ if e.esource() == &ErrorSource::Upstream => Failure::Upstream,
        ReadError | WriteError | ConnectionClosed if e.esource() == &ErrorSource::Downstream => {
            Failure::ClientGone
        }
        _ if e.esource() == &ErrorSource::Downstream => Failure::ClientMalformed,
        _ => Failure::Internal,
    }
}

/// Pingora's request head keeps each header's case beside the map; its own
/// methods keep the two in step.
impl UpstreamHead for RequestHeader {
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
        RequestHeader::remove_header(self, name);
    }
    fn insert_header(&mut self, name: HeaderName, value: HeaderValue) -> Result<(), Refusal> {
        RequestHeader::insert_header(self, name, value)
            .map_err(|_| Refusal::new(400, "invalid header"))
    }
    fn set_uri(&mut self, uri: Uri) {
        RequestHeader::set_uri(self, uri);
    }
}

impl Ficus {
    /// Writes an answer the proxy makes itself.
    async fn write_answer(&self, session: &mut Session, answer: Answer) -> Result<()> {
        let mut resp = ResponseHeader::build(answer.status, Some(answer.headers.len()))?;
        for (name, value) in answer.headers {
            resp.insert_header(name, value)?;
        }
        if answer.close {
            session.set_keepalive(None);
        }
        let no_body = answer.head_only || answer.body.is_empty();
        session
            .write_response_header(Box::new(resp), no_body)
            .await?;
        if !no_body {
            session.write_response_body(Some(answer.body), true).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl ProxyHttp for Ficus {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        self.shared.ctx()
    }

    /// None: pingora's default adds a response-compression module, disabled,
    /// whose context is still built and called on every request. Ficus forwards
    /// bodies as the backend encoded them.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn early_request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        if self.shared.begin(ctx) {
            session.set_keepalive(None);
        }
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        self.shared.identify(ctx, &session.req_header().headers);
        // A lone LF is a line end to us (RFC 9112 allows that) but may be part of a
        // header value to a proxy in front of us; reading one request two ways is
        // how headers get smuggled, so such a request is refused.
        if let Some(h1) = session.as_downstream().as_http1() {
            let raw = h1.get_headers_raw_bytes();
            if head_guard::has_bare_lf(&raw) {
                return Err(refused(Refusal::new(400, head_guard::BARE_LF)));
            }
            // The parsed headers no longer show this: pingora drops Content-Length
            // when Transfer-Encoding is present. Two framings in one request are
            // how requests get smuggled past a proxy, so it is refused outright.
            if both_framings(&raw) {
                return Err(refused(Refusal::new(400, head_guard::BOTH_FRAMINGS)));
            }
        }
        let req = session.req_header();
        let next = self
            .shared
            .route(ctx, &req.method, &req.uri, &req.headers)
            .await
            .map_err(refused)?;
        match next {
            Next::Forward => Ok(false),
            Next::Answer(answer) => {
                self.write_answer(session, answer).await?;
                Ok(true)
            }
        }
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(chunk) = body {
            self.shared.count_body(ctx, chunk.len()).map_err(refused)?;
        }
        Ok(())
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let i = self.shared.pick_upstream(ctx).map_err(refused)?;
        let backend = ctx
            .backend
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no backend chosen"))?;
        let conf = ctx.settings.backend(backend, ctx.service.as_deref());
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
        if self.shared.retry_connect(ctx) {
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
            && self.shared.fail_over(ctx)
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
            && self.shared.fail_over(ctx)
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
        let client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        self.shared
            .rewrite_upstream(ctx, upstream, client_ip)
            .map_err(refused)
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.capture_head(resp.status.as_u16(), &resp.headers);
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
        ctx.capture_body(body.as_deref(), end_of_stream);
        Ok(None)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let (status, message) = self.shared.failure(ctx, &failure(e));
        // Only answer if nothing was sent yet; otherwise the client sees a cut
        // response, which is the honest outcome of an upstream failing mid-body.
        if status != 0 && session.response_written().is_none() {
            let answer = error_answer(ctx, status, &message);
            if let Err(write) = self.write_answer(session, answer).await {
                tracing::debug!(error = %write, "could not send an error response");
            }
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        self.shared.finish(ctx, status, e.is_some());
    }
}
