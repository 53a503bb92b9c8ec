//! The connection floor: the smallest proxy hyper 1.x's connection API makes
//! (issue 22). Each worker thread runs its own one-thread runtime with its own
//! pool of upstream HTTP/1 connections, each driven by a task of its own, as
//! Ficus's engine does; a request goes upstream with the head it came with
//! and its answer streams back. Beside the hyper floor, which sends through
//! hyper-util's pooled `Client` (a shared pool, a URI built per request), it
//! shows what hyper itself costs, so that what Ficus's request path adds is
//! measured against the least a hyper proxy can do.

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Either;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1 as client1;
use hyper_util::rt::TokioIo;

use crate::Error;

thread_local! {
    /// The worker's idle upstream connections: a worker has one runtime, so a
    /// connection is only ever used by the thread whose runtime drives it.
    static IDLE: RefCell<Vec<client1::SendRequest<Incoming>>> = const { RefCell::new(Vec::new()) };
}

/// Serves on `listen` with `threads` workers until the process ends.
pub fn serve(listen: SocketAddr, upstream: SocketAddr, threads: usize) -> Result<(), Error> {
    serve_with(listen, upstream, threads, forward)
}

/// Serves on `listen` with `threads` workers, each request answered by
/// `forward` (a 502 naming its error when it fails): the server side every
/// floor on hyper's connection API shares.
pub fn serve_with<F, Fut, B>(
    listen: SocketAddr,
    upstream: SocketAddr,
    threads: usize,
    forward: F,
) -> Result<(), Error>
where
    F: Fn(SocketAddr, hyper::Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<hyper::Response<B>, Error>> + Send + 'static,
    B: Body<Data = Bytes, Error: Into<Error>> + Send + 'static,
{
    crate::hyper_floor::on_workers(listen, threads, move || {
        move |stream, _| async move {
            let service = hyper::service::service_fn(move |req| async move {
                Ok::<_, Infallible>(match forward(upstream, req).await {
                    Ok(answer) => answer.map(Either::Left),
                    Err(e) => {
                        let mut r = hyper::Response::new(Either::Right(format!("{e}\n")));
                        *r.status_mut() = hyper::StatusCode::BAD_GATEWAY;
                        r
                    }
                })
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    })
}

/// Sends `req` on an idle connection, or a new one, and answers with its
/// answer, whose body puts the connection back once it has ended.
async fn forward(
    upstream: SocketAddr,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Pooled>, Error> {
    let mut sender = None;
    while let Some(mut idle) = IDLE.with(|p| p.borrow_mut().pop()) {
        if poll_fn(|cx| idle.poll_ready(cx)).await.is_ok() {
            sender = Some(idle);
            break;
        }
    }
    let mut sender = match sender {
        Some(s) => s,
        None => {
            let stream = tokio::net::TcpStream::connect(upstream).await?;
            let _ = stream.set_nodelay(true);
            let (mut sender, conn) = client1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            poll_fn(|cx| sender.poll_ready(cx)).await?;
            sender
        }
    };
    let answer = sender.send_request(req).await?;
    Ok(answer.map(|inner| Pooled {
        inner,
        sender: Some(sender),
    }))
}

/// An answer's body, and the connection it came on until it has ended.
struct Pooled {
    inner: Incoming,
    sender: Option<client1::SendRequest<Incoming>>,
}

impl Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        // hyper stops polling a body that says it ended: the connection goes
        // back as soon as it has.
        if this.inner.is_end_stream()
            && let Some(sender) = this.sender.take()
        {
            IDLE.with(|p| p.borrow_mut().push(sender));
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
