//! The raw floor: the connection floor's server side with hyper's HTTP/1
//! client replaced by the least an upstream client can be (issue 22). The
//! request's own task writes the head to a pooled upstream socket, reads the
//! answer's head and its `Content-Length` body into the connection's buffer,
//! parses the head with httparse, and answers. No task per upstream
//! connection, no channel between the request and its connection, no body
//! streaming. It is not a proxy anyone should run (a request body, a chunked
//! or close-delimited answer, an upgrade and every timeout are refused or
//! missing); it measures what a hand-written upstream path could save at most
//! against hyper's client, so that writing one is decided by a number.

use std::cell::RefCell;
use std::io::Write as _;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body_util::Full;
use hyper::body::{Body, Incoming};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Error;

/// An idle upstream connection and what it keeps between requests.
struct Upstream {
    stream: TcpStream,
    /// Bytes read from the upstream and not yet answered.
    buf: BytesMut,
    /// The request head as written, reused from request to request.
    head: Vec<u8>,
}

thread_local! {
    /// The worker's idle upstream connections: a worker has one runtime.
    static IDLE: RefCell<Vec<Upstream>> = const { RefCell::new(Vec::new()) };
}

/// The most headers an answer may have here.
const MAX_HEADERS: usize = 64;

/// Serves on `listen` with `threads` workers until the process ends.
pub fn serve(listen: SocketAddr, upstream: SocketAddr, threads: usize) -> Result<(), Error> {
    crate::conn_floor::serve_with(listen, upstream, threads, forward)
}

/// Sends `req` on an idle connection, or a new one, and answers with the
/// upstream's answer once all of it has been read.
async fn forward(
    upstream: SocketAddr,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Error> {
    if !req.body().is_end_stream() {
        return Err("the raw floor forwards no request body".into());
    }
    let mut conn = match IDLE.with(|p| p.borrow_mut().pop()) {
        Some(c) => c,
        None => {
            let stream = TcpStream::connect(upstream).await?;
            let _ = stream.set_nodelay(true);
            Upstream {
                stream,
                buf: BytesMut::with_capacity(8192),
                head: Vec::with_capacity(1024),
            }
        }
    };
    conn.head.clear();
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    write!(conn.head, "{} {target} HTTP/1.1\r\n", req.method())?;
    for (name, value) in req.headers() {
        conn.head.extend_from_slice(name.as_str().as_bytes());
        conn.head.extend_from_slice(b": ");
        conn.head.extend_from_slice(value.as_bytes());
        conn.head.extend_from_slice(b"\r\n");
    }
    conn.head.extend_from_slice(b"\r\n");
    conn.stream.write_all(&conn.head).await?;
    // The answer's head: read until httparse has all of it.
    let (status, head_len, names, length, keep) = loop {
        if !conn.buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(n) = parsed.parse(&conn.buf)? {
                let status = parsed.code.unwrap_or(502);
                let mut length = None;
                let mut keep = true;
                // Where each header's name and value are in the buffer: the
                // values are taken from the frozen head without a copy.
                let mut names = Vec::with_capacity(parsed.headers.len());
                let base = conn.buf.as_ptr() as usize;
                for h in parsed.headers.iter() {
                    let name = HeaderName::from_bytes(h.name.as_bytes())?;
                    if name == header::CONTENT_LENGTH {
                        length = Some(std::str::from_utf8(h.value)?.trim().parse::<usize>()?);
                    }
                    if name == header::CONNECTION {
                        keep = !h.value.eq_ignore_ascii_case(b"close");
                        continue;
                    }
                    let at = h.value.as_ptr() as usize - base;
                    names.push((name, at, h.value.len()));
                }
                break (status, n, names, length, keep);
            }
        }
        if conn.stream.read_buf(&mut conn.buf).await? == 0 {
            return Err("the upstream closed before answering".into());
        }
    };
    let Some(length) = length else {
        return Err("the raw floor reads only Content-Length answers".into());
    };
    while conn.buf.len() < head_len + length {
        if conn.stream.read_buf(&mut conn.buf).await? == 0 {
            return Err("the upstream closed within an answer".into());
        }
    }
    let head = conn.buf.split_to(head_len).freeze();
    let body = conn.buf.split_to(length).freeze();
    let mut headers = HeaderMap::with_capacity(names.len());
    for (name, at, len) in names {
        headers.append(
            name,
            HeaderValue::from_maybe_shared(head.slice(at..at + len))?,
        );
    }
    if keep {
        IDLE.with(|p| p.borrow_mut().push(conn));
    }
    let mut answer = hyper::Response::new(Full::new(body));
    *answer.status_mut() = hyper::StatusCode::from_u16(status)?;
    *answer.headers_mut() = headers;
    Ok(answer)
}
