//! The hyper floor's server: the smallest proxy hyper 1.x can be (a pooled
//! client, one HTTP/1 server per connection), the row that separates what the
//! framework costs from what Ficus on its hyper engine adds (issue 22).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::Error;

/// An answer: the upstream's, streamed, or one the proxy makes itself.
pub type Answer = hyper::Response<http_body_util::Either<Incoming, String>>;

/// The pooled client the hyper floor forwards with.
pub type Upstream = Client<hyper_util::client::legacy::connect::HttpConnector, Incoming>;

/// Serves HTTP/1 with hyper on `listen` (`threads` workers), each request handed
/// to `handle` with the pooled client, the upstream's base URL and the client's
/// address.
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
    // As `ficus proxy` runs: one one-thread runtime per worker, each accepting
    // on its own copy of the listener with its own pooled client, so the floor
    // has no work stealing and no cross-thread wake-ups either (with tokio's
    // work-stealing runtime it ran about 10% behind Ficus itself).
    on_workers(listen, threads, move || {
        let client: Upstream = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(256)
            .build_http();
        let base: Arc<str> = Arc::from(format!("http://{upstream}"));
        let handle = handle.clone();
        move |stream, peer| {
            let (client, base, handle) = (client.clone(), Arc::clone(&base), handle.clone());
            async move {
                let service = hyper::service::service_fn(move |req| {
                    let answer = handle(client.clone(), Arc::clone(&base), peer, req);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        }
    })
}

/// Accepts on `listen` with `threads` workers until the process ends, each a
/// one-thread runtime with its own copy of the listener: `worker` is called
/// once on each, in its runtime, and what it returns serves each connection
/// the worker accepts, as a task of its own.
pub fn on_workers<W, C, Fut>(listen: SocketAddr, threads: usize, worker: W) -> Result<(), Error>
where
    W: Fn() -> C + Clone + Send + 'static,
    C: Fn(tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let mut workers = Vec::new();
    for _ in 0..threads.max(1) {
        let (listener, worker) = (listener.try_clone()?, worker.clone());
        workers.push(std::thread::spawn(move || -> Result<(), Error> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let serve = worker();
                let listener = tokio::net::TcpListener::from_std(listener)?;
                loop {
                    let (stream, peer) = listener.accept().await?;
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve(stream, peer));
                }
            })
        }));
    }
    for worker in workers {
        worker.join().map_err(|_| "a worker panicked")??;
    }
    Ok(())
}

/// An answer the proxy makes itself.
pub fn refuse(status: u16, message: &str) -> Answer {
    let mut r = hyper::Response::new(http_body_util::Either::Right(format!("{message}\n")));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::BAD_REQUEST);
    r
}
