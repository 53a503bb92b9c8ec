//! The admin listener: `/metrics` (Prometheus), `/healthz` (the process is up),
//! `/readyz` (a routing table is loaded and the proxy is not draining), and the
//! control plane's API under `/v1` (bearer token; see `ficus_admin::server`) and
//! the operator dashboard under `/ui/` (see `ficus_admin::ui`).
//! Bound to localhost by default.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::ShutdownWatch;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::request::Shared;

/// The admin routes, separate from serving so tests can call them in-process.
pub fn app(shared: Arc<Shared>, closing: ficus_admin::server::Closing) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(Arc::clone(&shared))
        .merge(ficus_admin::server::router(
            Arc::clone(&shared.store),
            closing,
        ))
}

async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    match shared.table.load_full() {
        Some(t) => (
            StatusCode::OK,
            format!(
                "ready: routing table at change {} with {} tenants\n",
                t.seq,
                t.len()
            ),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the routing table is not loaded yet\n",
        )
            .into_response(),
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let table = shared.table.load_full();
    let body = shared.metrics.render(
        table.as_deref(),
        shared.health.reachable.load(Ordering::Relaxed),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// Serves the admin routes on `listener` until shutdown; `/readyz` turns 503 as
/// soon as shutdown begins so load balancers stop sending new requests.
pub async fn serve(listener: std::net::TcpListener, shared: Arc<Shared>, shutdown: ShutdownWatch) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve the admin listener");
            return;
        }
    };
    // The admin listener keeps answering until the process ends, so that during a
    // drain `/readyz` says 503 instead of refusing connections.
    let (signalled, draining) = (Arc::clone(&shared), shutdown.clone());
    let app = app(Arc::clone(&shared), shutdown).layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let draining = signalled.draining.load(Ordering::SeqCst) || *draining.borrow();
            async move {
                if draining && req.uri().path() == "/readyz" {
                    return (StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n")
                        .into_response();
                }
                next.run(req).await
            }
        },
    ));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "admin listener stopped");
    }
}
