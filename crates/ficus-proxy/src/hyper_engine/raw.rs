//! An upstream HTTP/1 client of the engine's own, for the request most
//! traffic is: a read (`GET`, `HEAD`) without a body, to an HTTP/1 upstream.
//! The request's own task writes the head to a pooled connection, reads the
//! answer's head into the connection's buffer and parses it (httparse, as
//! hyper does), and the answer's body reads on from the same buffer. hyper's
//! client runs a task per connection and hands each request to it, and its
//! answer back, over channels: measured against this path on the connection
//! floor (`ficus-bench raw-floor`, BENCHMARKS.md), hyper's client cost some
//! 8.9 k instructions a request of the floor's 25.2 k (issue 22).
//!
//! Every other request (a body, an upgrade, h2c, preserved header case) goes
//! through hyper's client, which stays the general path: only reads take this
//! one, because only a request without a body can be sent again whole when a
//! reused connection turns out to have closed while idle (nothing watches an
//! idle connection here; its first read says so, and the read goes again on
//! a new connection, as on hyper's path).
//!
//! The answer is framed by RFC 9112 section 6.3: no body for `HEAD`, 1xx,
//! 204 and 304; `Transfer-Encoding` ending in `chunked` (trailers become a
//! trailers frame); any other transfer coding, or no length at all, reads to
//! the connection's close; else `Content-Length`, every copy of which must
//! agree. Interim answers (1xx but 101) are read past.

use std::io;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;

use super::*;

/// The longest answer head read; hyper's client reads up to about 400 KiB.
const MAX_ANSWER_HEAD: usize = 400 * 1024;
/// The most header fields an answer head may have (hyper's client: 100).
const MAX_FIELDS: usize = 100;
/// The longest chunk-size line, with its extensions, or trailer section.
const MAX_CHUNK_LINE: usize = 4096;

/// Whether an attempt goes by this path: a bodiless read, to an HTTP/1
/// upstream, with the header case hyper would write anyway.
pub(super) fn takes(
    parts: &http::request::Parts,
    conf: &BackendConfig,
    preserve_case: bool,
    upgrading: bool,
    bodiless: bool,
) -> bool {
    bodiless
        && !conf.h2c
        && !preserve_case
        && !upgrading
        && (parts.method == Method::GET || parts.method == Method::HEAD)
        && !parts.headers.contains_key(header::TRANSFER_ENCODING)
}

/// An upstream HTTP/1 connection this path reads and writes itself.
pub(super) struct RawConn {
    io: Upstream,
    /// Bytes read from the upstream and not handed on yet.
    buf: BytesMut,
    /// The request head as written; its allocation is reused.
    head: Vec<u8>,
    /// The wait for an answer's head, one timer for all the connection's
    /// requests (as [`Conn1`]'s).
    timer: Pin<Box<tokio::time::Sleep>>,
}

/// How an attempt on this path ended.
pub(super) enum RawSent {
    Answered(Response<RawBody>),
    NotConnected(Failure),
    /// No answer within the read timeout, or the upstream took nothing for
    /// the write timeout.
    Timeout,
    /// Failed once sent; `reused` when it went on a pooled connection.
    Failed {
        reused: bool,
        error: BoxError,
    },
}

/// Where an answer's body is.
enum Framing {
    Length(u64),
    Chunked(Chunk),
    /// Read to the connection's close.
    Close,
    /// Ended: the connection went back, or was let go.
    Ended,
}

/// Where a chunked body's reader is.
enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

impl Pool {
    /// Sends a bodiless read to `addr` on a pooled connection of this path
    /// unless `fresh`, and reads the answer's head within `read_timeout`.
    pub(super) async fn send_raw(
        self: &Arc<Self>,
        addr: SocketAddr,
        conf: &BackendConfig,
        parts: &http::request::Parts,
        read_timeout: Duration,
        fresh: bool,
        flags: &BodyFlags,
    ) -> RawSent {
        let pooled = if fresh {
            None
        } else {
            self.take_raw(addr, conf)
        };
        let reused = pooled.is_some();
        let mut conn = match pooled {
            Some(c) => c,
            // Boxed once for the connection's life: the answer's body, which
            // hyper moves, and the pool hold a pointer.
            None => match connect(addr, conf, None).await {
                Ok(io) => Box::new(RawConn {
                    io: io.into_inner(),
                    buf: BytesMut::with_capacity(8 * 1024),
                    head: Vec::with_capacity(512),
                    timer: Box::pin(tokio::time::sleep_until(tokio::time::Instant::now())),
                }),
                Err(failure) => return RawSent::NotConnected(failure),
            },
        };
        write_head(&mut conn.head, parts);
        if let Err(e) = conn.io.write_all(&conn.head).await {
            if e.get_ref().is_some_and(|inner| inner.is::<WriteTimedOut>()) {
                return RawSent::Timeout;
            }
            return RawSent::Failed {
                reused,
                error: e.into(),
            };
        }
        let head_only = parts.method == Method::HEAD;
        let RawConn { io, buf, timer, .. } = &mut *conn;
        let read = read_head(io, buf, head_only);
        let head = match answer_within(timer.as_mut(), read_timeout, flags, read).await {
            None => return RawSent::Timeout,
            Some(Err(error)) => return RawSent::Failed { reused, error },
            Some(Ok(head)) => head,
        };
        let mut body = RawBody {
            conn: Some(conn),
            framing: head.framing,
            keep: head.keep,
            pool: Arc::clone(self),
            addr,
            idle_timeout: conf.idle_timeout,
        };
        if matches!(body.framing, Framing::Length(0)) {
            body.finish();
        }
        let mut resp = Response::new(body);
        *resp.status_mut() = head.status;
        *resp.headers_mut() = head.headers;
        RawSent::Answered(resp)
    }

    fn take_raw(&self, addr: SocketAddr, conf: &BackendConfig) -> Option<Box<RawConn>> {
        take_idle(&self.raw, addr, conf.idle_timeout, |c| !stirred(c))
    }

    fn keep_raw(&self, addr: SocketAddr, idle_timeout: Duration, conn: Box<RawConn>) {
        keep_idle(&self.raw, addr, idle_timeout, self.max_idle, conn, |_| true);
    }
}

/// Whether the upstream has sent anything on an idle connection since its
/// last answer: its close, or an answer nobody asked for (a 408 before it
/// closes), which the next request would read as its own. Such a connection
/// is let go. Asked of the runtime's readiness, which the last read left
/// clear (a read that did not fill the buffer tells tokio the socket is
/// drained), so without a system call.
fn stirred(conn: &RawConn) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    conn.io.stream.poll_read_ready(&mut cx).is_ready()
}

/// The request head as hyper's client writes it for a bodiless read: the
/// request line, the map's fields in lower case, the proxy's own lines
/// ([`hyper::ext::RawHeaderLines`]), and `Host` from the target when the
/// client (HTTP/2) named the host there alone.
fn write_head(out: &mut Vec<u8>, parts: &http::request::Parts) {
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !parts.headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority()
        && HeaderValue::from_str(authority.as_str()).is_ok()
    {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(authority.as_str().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(lines) = parts.extensions.get::<hyper::ext::RawHeaderLines>() {
        out.extend_from_slice(&lines.0);
    }
    out.extend_from_slice(b"\r\n");
}

/// An answer's head, parsed.
struct Head {
    status: http::StatusCode,
    headers: HeaderMap,
    framing: Framing,
    keep: bool,
}

/// Reads until an answer's final head is whole, and parses it.
async fn read_head(
    io: &mut Upstream,
    buf: &mut BytesMut,
    head_only: bool,
) -> Result<Head, BoxError> {
    loop {
        if !buf.is_empty() {
            match parse_head(buf, head_only)? {
                Some(Some(head)) => return Ok(head),
                // An interim answer, read past: parse what follows it.
                Some(None) => continue,
                None => {}
            }
        }
        if buf.len() > MAX_ANSWER_HEAD {
            return Err("the upstream's answer head is too long".into());
        }
        if std::future::poll_fn(|cx| fill(io, buf, cx)).await? == 0 {
            return Err("the upstream closed the connection before answering".into());
        }
    }
}

/// The answer head at the start of `buf`, taken off it: `None` while it is
/// not whole, `Some(None)` for an interim answer.
fn parse_head(buf: &mut BytesMut, head_only: bool) -> Result<Option<Option<Head>>, BoxError> {
    // Where each field is in the buffer, so that the values are taken from
    // the frozen head without a copy.
    let mut at = [(0u32, 0u32, 0u32, 0u32); MAX_FIELDS];
    let (len, code, version, fields) = {
        let mut headers = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut parsed = httparse::Response::new(&mut headers);
        let len = match parsed.parse(buf)? {
            httparse::Status::Complete(len) => len,
            httparse::Status::Partial => return Ok(None),
        };
        let base = buf.as_ptr() as usize;
        let offset = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
        for (slot, h) in at.iter_mut().zip(parsed.headers.iter()) {
            *slot = (
                offset(h.name.as_bytes()),
                h.name.len() as u32,
                offset(h.value),
                h.value.len() as u32,
            );
        }
        (
            len,
            parsed.code.unwrap_or(0),
            parsed.version.unwrap_or(1),
            parsed.headers.len(),
        )
    };
    let head = buf.split_to(len).freeze();
    if (100..200).contains(&code) && code != 101 {
        return Ok(Some(None));
    }
    let status = http::StatusCode::from_u16(code)?;
    let mut headers = HeaderMap::with_capacity(fields);
    for &(ns, nl, vs, vl) in &at[..fields] {
        let (ns, nl, vs, vl) = (ns as usize, nl as usize, vs as usize, vl as usize);
        let name = HeaderName::from_bytes(&head[ns..ns + nl])?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs..vs + vl))?;
        headers.append(name, value);
    }
    let mut keep = match version {
        // HTTP/1.0 keeps a connection only when asked to.
        0 => connection_has(&headers, "keep-alive"),
        _ => !connection_has(&headers, "close"),
    };
    if code == 101 {
        // The connection speaks another protocol now (the proxy refuses an
        // upgrade nobody asked for): never pooled.
        keep = false;
    }
    let framing = if head_only || code == 101 || code == 204 || code == 304 {
        Framing::Length(0)
    } else if headers.contains_key(header::TRANSFER_ENCODING) {
        // A length beside a transfer coding is not to be trusted, nor the
        // connection after it.
        if headers.contains_key(header::CONTENT_LENGTH) {
            keep = false;
        }
        if last_coding_is_chunked(&headers) {
            Framing::Chunked(Chunk::Size)
        } else {
            keep = false;
            Framing::Close
        }
    } else if headers.contains_key(header::CONTENT_LENGTH) {
        Framing::Length(content_length(&headers)?)
    } else {
        keep = false;
        Framing::Close
    };
    Ok(Some(Some(Head {
        status,
        headers,
        framing,
        keep,
    })))
}

fn last_coding_is_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
}

/// The answer's length: every `Content-Length` (and every value of a list)
/// the same number, else the answer cannot be framed.
fn content_length(headers: &HeaderMap) -> Result<u64, BoxError> {
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.to_str()?.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err("the upstream's Content-Length is not a number".into());
            }
            let n: u64 = part.parse()?;
            if length.is_some_and(|l| l != n) {
                return Err("the upstream's Content-Length values differ".into());
            }
            length = Some(n);
        }
    }
    length.ok_or_else(|| "the upstream's Content-Length is empty".into())
}

/// Reads what the upstream has sent into `buf`, waiting for it; the number of
/// bytes read, 0 once the upstream has closed.
fn fill(io: &mut Upstream, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(8 * 1024);
    }
    // tokio's read, not `try_read_buf`: a read that leaves room in the
    // buffer tells tokio the socket is drained, so the next wait does not
    // begin with a read that finds nothing (a system call a request).
    tokio_util::io::poll_read_buf(Pin::new(&mut io.stream), cx, buf)
}

/// An answer's body read from this path's connection, which goes back to the
/// pool once the body has ended whole on a connection that stays open.
pub(super) struct RawBody {
    conn: Option<Box<RawConn>>,
    framing: Framing,
    keep: bool,
    pool: Arc<Pool>,
    addr: SocketAddr,
    idle_timeout: Duration,
}

impl RawBody {
    /// The body ended whole: the connection goes back if nothing past the
    /// answer came on it.
    fn finish(&mut self) {
        self.framing = Framing::Ended;
        if let Some(conn) = self.conn.take()
            && self.keep
            && conn.buf.is_empty()
        {
            self.pool.keep_raw(self.addr, self.idle_timeout, conn);
        }
    }

    fn cut(&mut self, why: &'static str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.framing = Framing::Ended;
        self.conn = None;
        Poll::Ready(Some(Err(why.into())))
    }
}

impl Body for RawBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let buf = &mut conn.buf;
            match &mut this.framing {
                Framing::Ended => return Poll::Ready(None),
                Framing::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(left) => {
                    if !buf.is_empty() {
                        let n = (*left).min(buf.len() as u64);
                        let data = buf.split_to(n as usize).freeze();
                        *left -= n;
                        if *left == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Close => {
                    if !buf.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(buf.split().freeze()))));
                    }
                }
                Framing::Chunked(Chunk::Data(left)) => {
                    if !buf.is_empty() {
                        let n = (*left).min(buf.len() as u64);
                        let data = buf.split_to(n as usize).freeze();
                        *left -= n;
                        if *left == 0 {
                            this.framing = Framing::Chunked(Chunk::DataEnd);
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Chunked(Chunk::DataEnd) => {
                    if buf.len() >= 2 {
                        if &buf[..2] != b"\r\n" {
                            return this.cut("the upstream's chunk did not end with CRLF");
                        }
                        buf.advance(2);
                        this.framing = Framing::Chunked(Chunk::Size);
                        continue;
                    }
                }
                Framing::Chunked(Chunk::Size) => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.advance(used);
                        this.framing = Framing::Chunked(if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        });
                        continue;
                    }
                    Ok(httparse::Status::Partial) if buf.len() <= MAX_CHUNK_LINE => {}
                    _ => return this.cut("the upstream's chunk size line is invalid"),
                },
                Framing::Chunked(Chunk::Trailers) => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        this.finish();
                        return Poll::Ready(None);
                    }
                    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
                    match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((used, fields))) => {
                            let mut trailers = HeaderMap::with_capacity(fields.len());
                            for f in fields.iter() {
                                if let (Ok(name), Ok(value)) = (
                                    HeaderName::from_bytes(f.name.as_bytes()),
                                    HeaderValue::from_bytes(f.value),
                                ) {
                                    trailers.append(name, value);
                                }
                            }
                            buf.advance(used);
                            this.finish();
                            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                        }
                        Ok(httparse::Status::Partial) if buf.len() <= MAX_CHUNK_LINE => {}
                        _ => return this.cut("the upstream's trailers are invalid"),
                    }
                }
            }
            match ready!(fill(&mut conn.io, &mut conn.buf, cx)) {
                Ok(0) if matches!(this.framing, Framing::Close) => {
                    // The close that ends this body; the connection is spent.
                    this.framing = Framing::Ended;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.cut("the upstream closed the connection within its answer"),
                Ok(_) => {}
                Err(e) => {
                    this.framing = Framing::Ended;
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Ended | Framing::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Ended => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}
