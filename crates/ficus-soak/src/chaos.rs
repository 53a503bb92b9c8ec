//! What the soak does to a backend: a layer in front of the sample backend's
//! routes that, for one tenant (by the `X-Ficus-Tenant` header the proxy
//! sends), answers 500, hangs, or holds requests until released, and counts
//! the requests it holds so the soak can act once they are all in flight.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;

/// What happens to one tenant's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Served as usual.
    Serve,
    /// Answered 500 without touching the database.
    Fail,
    /// Never answered while the mode lasts (the proxy's read timeout ends it).
    Hang,
    /// Held until the mode changes, then served.
    Hold,
}

/// One backend's switchboard.
#[derive(Debug)]
pub struct Chaos {
    tenant: Mutex<Option<String>>,
    mode: watch::Sender<Mode>,
    /// Requests currently held or hanging.
    pub waiting: AtomicU64,
    /// Requests answered 500 by [`Mode::Fail`].
    pub failed: AtomicU64,
}

impl Default for Chaos {
    fn default() -> Chaos {
        Chaos {
            tenant: Mutex::new(None),
            mode: watch::channel(Mode::Serve).0,
            waiting: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }
}

impl Chaos {
    /// From now on, `tenant`'s requests get `mode` (and held ones go on).
    pub fn set(&self, tenant: &str, mode: Mode) {
        *self.tenant.lock().unwrap_or_else(|p| p.into_inner()) = Some(tenant.to_string());
        self.mode.send_replace(mode);
    }

    pub fn clear(&self) {
        self.mode.send_replace(Mode::Serve);
    }

    fn mode_for(&self, tenant: Option<&str>) -> Mode {
        let mode = *self.mode.borrow();
        let target = self.tenant.lock().unwrap_or_else(|p| p.into_inner());
        match (target.as_deref(), tenant) {
            (Some(t), Some(u)) if t == u => mode,
            _ => Mode::Serve,
        }
    }

    /// The layer itself, for `axum::middleware::from_fn_with_state`.
    pub async fn layer(
        chaos: axum::extract::State<Arc<Chaos>>,
        req: Request,
        next: Next,
    ) -> Response {
        let tenant = req
            .headers()
            .get(ficus_demo::backend::TENANT_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut changes = chaos.mode.subscribe();
        loop {
            match chaos.mode_for(tenant.as_deref()) {
                Mode::Serve => return next.run(req).await,
                Mode::Fail => {
                    chaos.failed.fetch_add(1, Ordering::Relaxed);
                    return (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        axum::Json(serde_json::json!({"error": "injected by the soak"})),
                    )
                        .into_response();
                }
                Mode::Hang | Mode::Hold => {
                    // Counted while it waits, also when the proxy gives up on
                    // it and the request is dropped mid-wait.
                    let _counted = Waiting::new(&chaos.waiting);
                    // A request is never held for good: the soak lifts every
                    // mode well within this bound.
                    let _ = tokio::time::timeout(Duration::from_secs(120), changes.changed()).await;
                    changes.borrow_and_update();
                }
            }
        }
    }
}

/// One waiting request in a count, for as long as it lives.
struct Waiting<'a>(&'a AtomicU64);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicU64) -> Waiting<'a> {
        count.fetch_add(1, Ordering::Relaxed);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
