//! A watch on the bytes an HTTP/1 server reads from a client, for the checks
//! that need a request's head as it was sent rather than as it was parsed.
//!
//! Two requests must be refused that a parsed request no longer shows: a head
//! with a bare LF (a line end to an RFC 9112 parser, but possibly part of a
//! header value to a proxy in front of Ficus, so one request is read two ways),
//! and a request with both `Content-Length` and `Transfer-Encoding` (hyper, like
//! pingora, drops the length and reads the body as chunked). pingora hands the
//! raw head to its filters; hyper does not, and its parser (httparse) accepts a
//! bare LF at every line end with no option to refuse it. So the data plane
//! reads the client through
//! [`HeadGuard`], which feeds every byte hyper reads to a [`Framer`]: the framer
//! follows the messages as hyper does (the same httparse head parse, the same
//! body framing, hyper's chunked decoder state by state), judges each head and
//! queues a [`Verdict`] per request. The request handler takes one verdict per
//! request and checks it names the same method and target; if the queue is
//! empty or names another request, the framer has lost the thread and the
//! handler must refuse and close, so a framing mistake fails closed.
//!
//! Pipelining is why verdicts queue: hyper may read request k+1's head before
//! its handler sees request k. The framer stops following (and queues nothing
//! more) where hyper stops reading messages: both framings (hyper closes after
//! the request), a head or chunk that hyper would refuse, or an HTTP/2 preface.
//! An upgrade or CONNECT is followed like any request, since hyper reads on
//! when the answer does not switch protocols; the handler that answers 101 (or
//! 2xx to CONNECT) calls [`Framer::tunnel`], as the bytes after it are the
//! tunnel's.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The judgement of one request's head, in the order the requests were sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub method: http::Method,
    /// The request target as sent (`/path?query`, or absolute form).
    pub target: String,
    /// Why the request must be refused with 400, if it must.
    pub refusal: Option<&'static str>,
}

pub const BARE_LF: &str = "a header line ends in a bare LF";
pub const BOTH_FRAMINGS: &str = "a request may not carry both content-length and transfer-encoding";

/// hyper's bound on chunk extension bytes in one body, all chunks together
/// (`CHUNKED_EXTENSIONS_LIMIT`).
const EXTENSIONS_LIMIT: u64 = 16 * 1024;

/// Where in the byte stream the framer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before or inside a request head.
    Head,
    /// Inside a body of known length: this many bytes to go.
    Body(u64),
    /// Inside a chunked body, in hyper's decoder state of the same name.
    Chunked(Chunk),
    /// No longer following: hyper reads no further message on this
    /// connection, or reads bytes that are not messages.
    Off,
}

/// hyper's `ChunkedState`, with the chunk size and extension count it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Start,
    Size(u64),
    SizeLws(u64),
    Extension(u64),
    SizeLf(u64),
    Body(u64),
    BodyCr,
    BodyLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
}

/// Follows the requests in a client's byte stream and judges each head.
#[derive(Debug)]
pub struct Framer {
    state: State,
    /// The head read so far (after any empty lines before it).
    head: Vec<u8>,
    /// A bare LF among the empty lines before the head.
    bare_lf_before: bool,
    /// Whether the last empty-line byte before the head was a CR.
    after_cr: bool,
    /// Chunk extension bytes in the current body.
    extensions: u64,
    max_head: usize,
    max_headers: usize,
    verdicts: VecDeque<Verdict>,
}

impl Framer {
    /// A framer that gives up (as hyper refuses) on heads longer than
    /// `max_head` bytes or with more than `max_headers` headers.
    pub fn new(max_head: usize, max_headers: usize) -> Framer {
        Framer {
            state: State::Head,
            head: Vec::new(),
            bare_lf_before: false,
            after_cr: false,
            extensions: 0,
            max_head,
            max_headers,
            verdicts: VecDeque::new(),
        }
    }

    /// The next request's verdict, in the order the requests were sent.
    pub fn next_verdict(&mut self) -> Option<Verdict> {
        self.verdicts.pop_front()
    }

    /// The connection became a tunnel (a 101 answer, or 2xx to CONNECT): what
    /// follows is not HTTP, and no further verdict is wanted.
    pub fn tunnel(&mut self) {
        self.state = State::Off;
        self.head.clear();
        self.verdicts.clear();
    }

    /// Whether the framer still follows the stream's messages.
    pub fn following(&self) -> bool {
        self.state != State::Off
    }

    /// Takes the next bytes of the stream, as the server read them.
    pub fn feed(&mut self, mut input: &[u8]) {
        while !input.is_empty() {
            match self.state {
                State::Off => return,
                State::Head => {
                    let used = self.head_bytes(input);
                    input = &input[used..];
                }
                State::Body(left) => {
                    let k = left.min(input.len() as u64);
                    input = &input[k as usize..];
                    self.state = if left == k {
                        State::Head
                    } else {
                        State::Body(left - k)
                    };
                }
                State::Chunked(Chunk::Body(left)) => {
                    let k = left.min(input.len() as u64);
                    input = &input[k as usize..];
                    self.state = State::Chunked(if left == k {
                        Chunk::BodyCr
                    } else {
                        Chunk::Body(left - k)
                    });
                }
                State::Chunked(c) => {
                    let step = chunk_byte(c, input[0], &mut self.extensions);
                    self.state = step.map_or(State::Off, |c| match c {
                        None => State::Head,
                        Some(c) => State::Chunked(c),
                    });
                    input = &input[1..];
                }
            }
        }
    }

    /// Takes bytes of a head; returns how many it used (all, unless the head
    /// ended inside `input`).
    fn head_bytes(&mut self, input: &[u8]) -> usize {
        let mut skipped = 0;
        if self.head.is_empty() {
            // hyper skips empty lines before a request, as RFC 9112 allows.
            for &b in input {
                match b {
                    b'\r' => self.after_cr = true,
                    b'\n' => {
                        self.bare_lf_before |= !self.after_cr;
                        self.after_cr = false;
                    }
                    _ => break,
                }
                skipped += 1;
            }
        }
        // A head that arrives in one read (nearly all) is parsed where it lies;
        // only one that arrives in pieces is gathered.
        let before = self.head.len();
        if before > 0 {
            self.head.extend_from_slice(&input[skipped..]);
        }
        let data: &[u8] = if before > 0 {
            // Parsing again only once a head's end may have arrived keeps a head
            // trickled in byte by byte linear, as hyper's own check does.
            let tail = &self.head[before.saturating_sub(2)..];
            if memchr::memmem::find(tail, b"\n\n").is_none()
                && memchr::memmem::find(tail, b"\n\r\n").is_none()
            {
                if self.head.len() > self.max_head {
                    self.state = State::Off;
                }
                return input.len();
            }
            &self.head
        } else {
            &input[skipped..]
        };
        // Room for as many headers as hyper allows, on the stack up to 128 and
        // left uninitialised, as hyper does: filling 128 empty headers per head
        // cost more than the parse.
        let mut stack = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
        let mut heap = Vec::new();
        let headers = if self.max_headers <= stack.len() {
            &mut stack[..self.max_headers]
        } else {
            heap.resize_with(self.max_headers, std::mem::MaybeUninit::uninit);
            &mut heap[..]
        };
        let mut req = httparse::Request::new(&mut []);
        match req.parse_with_uninit_headers(data, headers) {
            // hyper refuses a head longer than its buffer, however it came.
            Ok(httparse::Status::Complete(n)) if n > self.max_head => {
                self.state = State::Off;
                input.len()
            }
            Ok(httparse::Status::Complete(n)) => {
                let (verdict, next) = judge(&req, &data[..n], self.bare_lf_before);
                self.extensions = 0;
                self.verdicts.push_back(verdict);
                self.head.clear();
                self.bare_lf_before = false;
                self.after_cr = false;
                self.state = next;
                // The head ended `n - before` bytes into what was added.
                skipped + (n - before)
            }
            Ok(httparse::Status::Partial) => {
                if before == 0 {
                    self.head.extend_from_slice(&input[skipped..]);
                }
                if self.head.len() > self.max_head {
                    self.state = State::Off;
                }
                input.len()
            }
            Err(_) => {
                self.state = State::Off;
                input.len()
            }
        }
    }
}

/// Whether `raw` holds an LF not preceded by a CR: the check both data planes
/// make on a request's head as it was sent.
pub fn has_bare_lf(raw: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', raw).any(|i| i == 0 || raw[i - 1] != b'\r')
}

/// The verdict on a complete head `raw`, and how its body is framed, as
/// hyper's `Server::parse` decides.
fn judge(req: &httparse::Request<'_, '_>, raw: &[u8], bare_lf_before: bool) -> (Verdict, State) {
    let bare_lf = bare_lf_before || has_bare_lf(raw);
    let method = req.method.unwrap_or_default();
    let (mut lengths, mut codings) = (Vec::new(), Vec::new());
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            lengths.push(h.value);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            codings.push(h.value);
        }
    }
    let both = !lengths.is_empty() && !codings.is_empty();
    let refusal = if bare_lf {
        Some(BARE_LF)
    } else if both {
        Some(BOTH_FRAMINGS)
    } else {
        None
    };
    let verdict = Verdict {
        // httparse has checked the method is a token, which is all `Method`
        // asks; the fallback is never taken.
        method: http::Method::from_bytes(method.as_bytes()).unwrap_or_default(),
        target: req.path.unwrap_or_default().to_string(),
        refusal,
    };
    let framing = if both {
        State::Off
    } else if !codings.is_empty() {
        // hyper reads a chunked body when the last coding is chunked (on
        // HTTP/1.1) and refuses the request otherwise.
        let last = codings
            .last()
            .and_then(|v| v.rsplit(|&b| b == b',').next())
            .map(|c| c.trim_ascii());
        if req.version == Some(1) && last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")) {
            State::Chunked(Chunk::Start)
        } else {
            State::Off
        }
    } else {
        match content_length(&lengths) {
            Some(0) => State::Head,
            Some(len) => State::Body(len),
            None => State::Off,
        }
    };
    (verdict, framing)
}

/// The body length the `Content-Length` headers say (0 with none), or none
/// when hyper's server refuses them: a value that is not digits alone (a list,
/// even of equal values, is refused), or headers that differ.
fn content_length(values: &[&[u8]]) -> Option<u64> {
    let mut length = None;
    for value in values {
        let value = value.trim_ascii();
        if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n: u64 = std::str::from_utf8(value).ok()?.parse().ok()?;
        if length.is_some_and(|l| l != n) {
            return None;
        }
        length = Some(n);
    }
    Some(length.unwrap_or(0))
}

/// One byte of a chunked body outside chunk data, as hyper's decoder takes it:
/// the next state, `Ok(None)` at the body's end, or `Err` where hyper fails.
fn chunk_byte(state: Chunk, b: u8, extensions: &mut u64) -> Result<Option<Chunk>, ()> {
    let hex = |b: u8| (b as char).to_digit(16).map(u64::from);
    let grow = |size: u64, d: u64| {
        size.checked_mul(16)
            .and_then(|s| s.checked_add(d))
            .ok_or(())
    };
    Ok(Some(match state {
        Chunk::Start => Chunk::Size(grow(0, hex(b).ok_or(())?)?),
        Chunk::Size(size) => match (b, hex(b)) {
            (_, Some(d)) => Chunk::Size(grow(size, d)?),
            (b'\t' | b' ', _) => Chunk::SizeLws(size),
            (b';', _) => Chunk::Extension(size),
            (b'\r', _) => Chunk::SizeLf(size),
            _ => return Err(()),
        },
        Chunk::SizeLws(size) => match b {
            b'\t' | b' ' => Chunk::SizeLws(size),
            b';' => Chunk::Extension(size),
            b'\r' => Chunk::SizeLf(size),
            _ => return Err(()),
        },
        Chunk::Extension(size) => match b {
            b'\r' => Chunk::SizeLf(size),
            b'\n' => return Err(()),
            _ => {
                *extensions += 1;
                if *extensions >= EXTENSIONS_LIMIT {
                    return Err(());
                }
                Chunk::Extension(size)
            }
        },
        Chunk::SizeLf(0) if b == b'\n' => Chunk::EndCr,
        Chunk::SizeLf(size) if b == b'\n' => Chunk::Body(size),
        Chunk::SizeLf(_) => return Err(()),
        // Chunk data is skipped in bulk by `feed`; a zero-length rest is done.
        Chunk::Body(_) => return chunk_byte(Chunk::BodyCr, b, extensions),
        Chunk::BodyCr if b == b'\r' => Chunk::BodyLf,
        Chunk::BodyLf if b == b'\n' => Chunk::Start,
        Chunk::BodyCr | Chunk::BodyLf => return Err(()),
        Chunk::Trailer if b == b'\r' => Chunk::TrailerLf,
        Chunk::Trailer => Chunk::Trailer,
        Chunk::TrailerLf if b == b'\n' => Chunk::EndCr,
        Chunk::TrailerLf => return Err(()),
        Chunk::EndCr if b == b'\r' => Chunk::EndLf,
        Chunk::EndCr => Chunk::Trailer,
        Chunk::EndLf if b == b'\n' => return Ok(None),
        Chunk::EndLf => return Err(()),
    }))
}

/// A client connection whose reads also go to a shared [`Framer`].
pub struct HeadGuard<IO> {
    io: IO,
    framer: Arc<Mutex<Framer>>,
}

impl<IO> HeadGuard<IO> {
    pub fn new(io: IO, framer: Arc<Mutex<Framer>>) -> HeadGuard<IO> {
        HeadGuard { io, framer }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for HeadGuard<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let read = &buf.filled()[before..];
            if !read.is_empty() {
                // A framer poisoned by a panic elsewhere is still a framer: its
                // state is only ever advanced whole, byte run by byte run.
                let mut framer = self.framer.lock().unwrap_or_else(PoisonError::into_inner);
                framer.feed(read);
            }
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for HeadGuard<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;

    /// Feeds `input` whole and byte by byte (the two must agree) and shows the
    /// verdicts and whether the framer still follows the stream.
    fn check(input: &str, expect: Expect) {
        let shown = |f: &mut Framer| {
            let mut out = String::new();
            while let Some(v) = f.next_verdict() {
                out.push_str(&format!(
                    "{} {} {}\n",
                    v.method,
                    v.target,
                    v.refusal.unwrap_or("ok")
                ));
            }
            out.push_str(if f.following() { "following" } else { "off" });
            out
        };
        let mut whole = Framer::new(64 * 1024, 100);
        whole.feed(input.as_bytes());
        let mut bytewise = Framer::new(64 * 1024, 100);
        for b in input.as_bytes() {
            bytewise.feed(std::slice::from_ref(b));
        }
        let (a, b) = (shown(&mut whole), shown(&mut bytewise));
        assert_eq!(a, b, "fed whole and byte by byte");
        expect.assert_eq(&a);
    }

    #[test]
    fn heads_and_bodies_are_followed_request_by_request() {
        check(
            "GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b?q=1 HTTP/1.1\r\nHost: x\r\n\r\n",
            expect![[r#"
                GET /a ok
                GET /b?q=1 ok
                following"#]],
        );
        // A body that looks like a request is skipped by its length.
        check(
            "POST /a HTTP/1.1\r\nContent-Length: 26\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
            expect![[r#"
                POST /a ok
                GET /b ok
                following"#]],
        );
        check(
            "POST /a HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n\r\n",
            expect![[r#"
                POST /a ok
                GET /b ok
                following"#]],
        );
        // Empty lines before a request are skipped, as hyper skips them.
        check(
            "\r\n\r\nGET /a HTTP/1.1\r\n\r\n",
            expect![[r#"
                GET /a ok
                following"#]],
        );
        // A head still arriving has no verdict yet.
        check("GET /a HTTP/1.1\r\nHost:", expect!["following"]);
    }

    #[test]
    fn chunked_bodies_are_followed_as_hyper_decodes_them() {
        check(
            "POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
             5;name=v\r\nhello\r\nA \r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n\
             GET /b HTTP/1.1\r\n\r\n",
            expect![[r#"
                POST /a ok
                GET /b ok
                following"#]],
        );
        check(
            "POST /a HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
            expect![[r#"
                POST /a ok
                GET /b ok
                following"#]],
        );
        // hyper fails these bodies, and the connection with them.
        check(
            "POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
            expect![[r#"
                POST /a ok
                off"#]],
        );
        check(
            "POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloX\r\n0\r\n\r\n",
            expect![[r#"
                POST /a ok
                off"#]],
        );
        check(
            "POST /a HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
            expect![[r#"
                POST /a ok
                off"#]],
        );
    }

    #[test]
    fn heads_the_parsed_request_no_longer_shows_are_refused() {
        check(
            "GET /a HTTP/1.1\nHost: x\r\n\r\n",
            expect![[r#"
                GET /a a header line ends in a bare LF
                following"#]],
        );
        check(
            "GET /a HTTP/1.1\r\nX-A: b\nX-Tenant-Id: acme\r\n\r\n",
            expect![[r#"
                GET /a a header line ends in a bare LF
                following"#]],
        );
        check(
            "\nGET /a HTTP/1.1\r\n\r\n",
            expect![[r#"
                GET /a a header line ends in a bare LF
                following"#]],
        );
        check(
            "POST /a HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            expect![[r#"
                POST /a a request may not carry both content-length and transfer-encoding
                off"#]],
        );
    }

    #[test]
    fn the_framer_stops_where_hyper_stops_reading_messages() {
        // An upgrade not answered with 101 leaves the connection HTTP, as
        // hyper reads on; a CONNECT too (hyper's method match is exact).
        check(
            "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
            expect![[r#"
                GET /ws ok
                GET /b ok
                following"#]],
        );
        check(
            "CONNECT example.com:443 HTTP/1.1\r\n\r\nconnect a:443 HTTP/1.1\r\n\r\n",
            expect![[r#"
                CONNECT example.com:443 ok
                connect a:443 ok
                following"#]],
        );
        check("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", expect!["off"]);
        // hyper refuses a list of lengths, equal or not, and lengths that differ.
        check(
            "POST /a HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\nabc",
            expect![[r#"
                POST /a ok
                off"#]],
        );
        check(
            "POST /a HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            expect![[r#"
                POST /a ok
                off"#]],
        );
        check(
            "POST /a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            expect![[r#"
                POST /a ok
                off"#]],
        );
    }

    #[test]
    fn a_head_longer_than_the_limit_stops_the_framer_however_it_arrives() {
        let head = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(100));
        let mut whole = Framer::new(64, 100);
        whole.feed(head.as_bytes());
        let mut pieces = Framer::new(64, 100);
        for b in head.as_bytes() {
            pieces.feed(std::slice::from_ref(b));
        }
        for f in [&mut whole, &mut pieces] {
            assert!(!f.following());
            assert_eq!(f.next_verdict(), None);
        }
    }

    #[test]
    fn a_tunnel_ends_the_framing_and_its_bytes_earn_no_verdicts() {
        let mut f = Framer::new(64 * 1024, 100);
        f.feed(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n");
        assert!(f.next_verdict().is_some());
        f.tunnel();
        f.feed(b"GET /inside-the-tunnel HTTP/1.1\r\n\r\n");
        assert_eq!(f.next_verdict(), None);
        assert!(!f.following());
    }

    #[test]
    fn chunk_extensions_are_bounded_per_body_as_hyper_bounds_them() {
        let ext = "e".repeat(9 * 1024);
        let mut f = Framer::new(64 * 1024, 100);
        f.feed(
            format!(
                "POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;{ext}\r\nx\r\n1;{ext}\r\n"
            )
            .as_bytes(),
        );
        assert!(!f.following(), "18 KiB of extensions in one body");
    }

    /// One request of a generated stream: its target, its bytes, and the
    /// refusal its head earns.
    fn request(kind: u64, n: u64) -> (String, String, Option<&'static str>) {
        let target = format!("/r{n}?k={kind}");
        // A body that is itself a request: skipped by its framing, never read as one.
        let inner = format!("GET /inner{n} HTTP/1.1\r\nHost: x\r\n\r\n");
        let text = match kind % 8 {
            0 => format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n"),
            1 => format!(
                "POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{inner}",
                inner.len()
            ),
            2 => format!(
                "POST {target} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
                 {:x};ext=1\r\n{inner}\r\n3 \r\nabc\r\n0\r\n\r\n",
                inner.len()
            ),
            3 => format!(
                "PUT {target} HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n\r\n\
                 {:X}\r\n{inner}\r\n0\r\nX-Trailer: t\r\n\r\n",
                inner.len()
            ),
            4 => format!("\r\nDELETE {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"),
            5 => format!(
                "PATCH {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\nxyz"
            ),
            // An upgrade answered 200, not 101: hyper reads on.
            6 => format!(
                "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
            ),
            // hyper reads a bare LF as a line end and serves on; the framer
            // refuses this request and follows on too.
            _ => format!("POST {target} HTTP/1.1\r\nHost: x\nContent-Length: 2\r\n\r\nok"),
        };
        let refusal = (kind % 8 == 7).then_some(BARE_LF);
        (target, text, refusal)
    }

    /// The framer against hyper itself: streams of pipelined requests of every
    /// framing, sent in pieces of random sizes, served by hyper through the
    /// guard. Every request hyper hands its service has the framer's verdict
    /// for that very request waiting, and nothing else is queued.
    #[tokio::test]
    async fn the_framer_agrees_with_hyper_on_every_request_of_pipelined_streams() {
        use http_body_util::BodyExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for stream in 0..200 {
            let count = 1 + next() % 8;
            let (mut targets, mut refusals, mut bytes) = (Vec::new(), Vec::new(), String::new());
            for n in 0..count {
                let (target, text, refusal) = request(next(), stream * 100 + n);
                targets.push(target);
                refusals.push(refusal);
                bytes.push_str(&text);
            }
            let (mut client, server) = tokio::io::duplex(1 << 20);
            let framer = Arc::new(Mutex::new(Framer::new(64 * 1024, 100)));
            let seen = Arc::new(Mutex::new(Vec::new()));
            let service = {
                let (framer, seen) = (Arc::clone(&framer), Arc::clone(&seen));
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (framer, seen) = (Arc::clone(&framer), Arc::clone(&seen));
                    async move {
                        let verdict = framer.lock().unwrap().next_verdict();
                        let target = req.uri().to_string();
                        let method = req.method().to_string();
                        // Read the body, as a proxy forwarding it would.
                        let body = req.into_body().collect().await.map(|b| b.to_bytes().len());
                        seen.lock()
                            .unwrap()
                            .push((method, target, verdict, body.is_ok()));
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(String::new()))
                    }
                })
            };
            let serve = tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                hyper_util::rt::TokioIo::new(HeadGuard::new(server, Arc::clone(&framer))),
                service,
            ));
            let mut rest = bytes.as_bytes();
            while !rest.is_empty() {
                let k = (1 + next() % 97).min(rest.len() as u64) as usize;
                if let Err(e) = client.write_all(&rest[..k]).await {
                    let served = serve.await.unwrap();
                    panic!(
                        "stream {stream}: {e}; hyper: {served:?}; {:?}; sent {bytes:?}",
                        seen.lock().unwrap()
                    );
                }
                rest = &rest[k..];
                tokio::task::yield_now().await;
            }
            client.shutdown().await.unwrap();
            let mut answers = Vec::new();
            client.read_to_end(&mut answers).await.unwrap();
            let _ = serve.await.unwrap();
            let seen = seen.lock().unwrap();
            let served: Vec<&str> = seen.iter().map(|s| s.1.as_str()).collect();
            assert_eq!(
                served, targets,
                "hyper served every request of stream {stream}"
            );
            for ((method, target, verdict, body_ok), refusal) in seen.iter().zip(&refusals) {
                assert!(body_ok, "stream {stream}: {target}'s body was read whole");
                let verdict = verdict.as_ref().unwrap_or_else(|| {
                    panic!("stream {stream}: no verdict waiting for {method} {target}")
                });
                assert_eq!(
                    (&verdict.method, &verdict.target, verdict.refusal),
                    (&method.parse::<http::Method>().unwrap(), target, *refusal),
                    "stream {stream}"
                );
            }
            assert_eq!(
                framer.lock().unwrap().next_verdict(),
                None,
                "stream {stream}"
            );
        }
    }

    #[tokio::test]
    async fn the_guard_feeds_the_framer_what_the_server_reads() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(64);
        let framer = Arc::new(Mutex::new(Framer::new(64 * 1024, 100)));
        let mut guarded = HeadGuard::new(server, Arc::clone(&framer));
        let sent = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\nX: y\r\n\r\n";
        client.write_all(sent).await.unwrap();
        drop(client);
        let mut read = Vec::new();
        guarded.read_to_end(&mut read).await.unwrap();
        assert_eq!(read, sent, "the bytes pass unchanged");
        let mut f = framer.lock().unwrap();
        assert_eq!(f.next_verdict().map(|v| v.refusal), Some(None));
        assert_eq!(f.next_verdict().map(|v| v.refusal), Some(Some(BARE_LF)));
        assert_eq!(f.next_verdict(), None);
    }
}
