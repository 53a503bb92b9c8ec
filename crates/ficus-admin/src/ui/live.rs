//! Live updates: the change feed as server-sent events.
//!
//! Each open page holds one `EventSource` on `/ui/events?from=SEQ`, SEQ being
//! the change-log position read before the page read anything, so a change
//! made while the page was rendering or the stream was opening is still sent.
//! For every tenant a change touched, the stream sends its current stage and
//! version (`event: tenant`); when the changes cannot be listed tenant by tenant
//! (an import, a gap, a page too far behind), `event: resync` tells the page to
//! reload; when the store is lost or back, `event: store`. A comment is sent
//! every 15 seconds so that proxies in between keep the connection open. A
//! stream checks that its session or token still grants access before it sends
//! a change and every 15 seconds, and ends when it does not: revoking a token
//! or letting a session expire closes its open pages' streams too. When
//! the browser cannot keep the stream, the page's script falls back to
//! reloading on a timer.
//!
//! One subscription to the store's feed serves every open page of the process
//! ([`Hub`]): a feed holds a database connection (PostgreSQL) or a thread
//! (SQLite), and pages are many. A stream first catches up from its page's
//! position with one read of the change log, then follows the shared feed,
//! skipping what it already sent. At most [`MAX_STREAMS`] streams are open at
//! once, and [`MAX_STREAMS_PER_TOKEN`] for one token; beyond that a page is told
//! to poll instead (503).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use ficus_store::{ChangeSet, ControlStore, FeedEvent};
use futures_util::stream::{self, Stream};
use serde_json::json;
use tokio::sync::{Mutex, broadcast};

use super::{UiError, Viewer};
use crate::server::{Closing, StoreSlot};

/// How often a quiet stream sends a keep-alive comment.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How many event streams one process serves at once.
pub const MAX_STREAMS: usize = 256;
/// How many of them one token may hold.
pub const MAX_STREAMS_PER_TOKEN: usize = 16;
/// Feed events a slow stream may fall behind by before it is told to resync.
const BACKLOG: usize = 1_024;
/// A catch-up that touched more tenants than this is a resync: the page reloads
/// once rather than the stream reading every one of them.
const CATCH_UP_TENANTS: usize = 500;
/// How often a stream checks that its session or token still grants access.
pub const RECHECK: Duration = Duration::from_secs(15);

/// The process's one subscription to the change feed, shared by every stream.
pub struct Hub {
    feed: Arc<Mutex<Option<broadcast::Sender<FeedEvent>>>>,
    open: Arc<Counts>,
    /// Shutdown: every stream and the feed's forwarding task end when it turns
    /// true, and no new stream starts.
    closing: Closing,
}

/// Open streams, in all and per token.
#[derive(Default)]
struct Counts {
    by_token: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    all: AtomicUsize,
}

impl Counts {
    /// Counts a stream for `token`, or says which limit refused it.
    fn take(self: &Arc<Self>, token: &str) -> Result<Open, String> {
        let mut by = self.by_token.lock().unwrap_or_else(|p| p.into_inner());
        let mine = by.get(token).copied().unwrap_or(0);
        if mine >= MAX_STREAMS_PER_TOKEN {
            return Err(format!(
                "the token {token} has {MAX_STREAMS_PER_TOKEN} live streams open already; the page reloads on a timer instead"
            ));
        }
        if self.all.load(Ordering::Acquire) >= MAX_STREAMS {
            return Err(format!(
                "{MAX_STREAMS} live streams are open already; the page reloads on a timer instead"
            ));
        }
        by.insert(token.to_string(), mine + 1);
        self.all.fetch_add(1, Ordering::AcqRel);
        Ok(Open {
            counts: Arc::clone(self),
            token: token.to_string(),
        })
    }
}

impl Hub {
    pub fn new(closing: Closing) -> Hub {
        Hub {
            feed: Arc::default(),
            open: Arc::default(),
            closing,
        }
    }

    /// The shared feed, subscribed on first use. The forwarding task lives as
    /// long as the store's feed does, like a proxy's own subscription; if the
    /// feed ever ends, its streams end (their pages reconnect) and the next
    /// stream subscribes anew.
    async fn feed(&self, store: &Arc<dyn ControlStore>) -> broadcast::Receiver<FeedEvent> {
        let mut slot = self.feed.lock().await;
        if let Some(tx) = slot.as_ref() {
            return tx.subscribe();
        }
        let (tx, rx) = broadcast::channel(BACKLOG);
        // From a position read now, not from wherever the feed happens to
        // start: the first stream's catch-up read ends after this.
        let mut sub = store.subscribe(store.position().await.ok());
        let out = tx.clone();
        let shared = Arc::clone(&self.feed);
        let mut closing = self.closing.clone();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    event = sub.recv() => event,
                    () = closed(&mut closing) => None,
                };
                let Some(event) = event else { break };
                // No stream open is not an error: the feed keeps going.
                let _ = out.send(event);
            }
            let _ = out.send(FeedEvent::Lost {
                error: "the change feed ended".to_string(),
            });
            // Dropping the last sender closes every stream's receiver.
            shared.lock().await.take();
        });
        *slot = Some(tx);
        rx
    }
}

/// Resolves once shutdown has begun. A sender dropped without saying so means
/// no shutdown will be signalled, so that waits for ever.
async fn closed(closing: &mut Closing) {
    // The guard `wait_for` returns is dropped here, not held across an await.
    if closing.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Counts an open stream; dropping it (the stream ends) uncounts it.
struct Open {
    counts: Arc<Counts>,
    token: String,
}

impl Drop for Open {
    fn drop(&mut self) {
        let mut by = self
            .counts
            .by_token
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = by.get_mut(&self.token) {
            *n -= 1;
            if *n == 0 {
                by.remove(&self.token);
            }
        }
        self.counts.all.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(serde::Deserialize)]
pub struct From {
    /// The position the page was rendered at; the stream replays every change
    /// after it. Without it, the stream starts at the position the request was
    /// authenticated at.
    from: Option<u64>,
}

/// The events one change set makes for a page: each tenant's current state.
async fn tenant_events(store: &dyn ControlStore, set: &ChangeSet, out: &mut VecDeque<Event>) {
    if set.resync || set.tenants.len() > CATCH_UP_TENANTS {
        out.push_back(Event::default().event("resync").data(set.seq.to_string()));
        return;
    }
    for id in &set.tenants {
        let data = match store.tenant(id).await {
            Ok(Some(t)) => json!({
                "id": t.id.as_str(),
                "stage": t.stage.as_str(),
                "version": t.version,
                "updated_at": ficus_store::format_time(t.updated_at),
                "seq": set.seq,
            }),
            Ok(None) => json!({ "id": id.as_str(), "gone": true, "seq": set.seq }),
            // The page learns of the gap and reloads.
            Err(_) => {
                out.push_back(Event::default().event("resync").data(set.seq.to_string()));
                continue;
            }
        };
        out.push_back(Event::default().event("tenant").data(data.to_string()));
    }
}

pub async fn events(
    State(slot): State<StoreSlot>,
    State(hub): State<Arc<Hub>>,
    viewer: Viewer,
    q: Result<axum::extract::Query<From>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, UiError> {
    let from = match q {
        Ok(axum::extract::Query(f)) => f.from.unwrap_or(viewer.seq),
        Err(e) => {
            return Err(UiError(
                axum::http::StatusCode::BAD_REQUEST,
                format!("bad query string: {}", e.body_text()),
            ));
        }
    };
    let store = slot.get().cloned().ok_or_else(|| {
        UiError(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "the control store is not open yet".to_string(),
        )
    })?;
    if *hub.closing.borrow() {
        return Err(UiError(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down".to_string(),
        ));
    }
    // Per token, so that one person's many tabs cannot take every slot.
    let open = hub
        .open
        .take(viewer.who.actor.as_str())
        .map_err(|why| UiError(axum::http::StatusCode::SERVICE_UNAVAILABLE, why))?;
    // Follow the shared feed first, then catch up: a change committed between
    // the two is in both, and sent once.
    let feed = hub.feed(&store).await;
    let mut pending: VecDeque<Event> = VecDeque::new();
    let caught_up = match store.changes_since(from).await {
        Ok(set) => {
            tenant_events(&*store, &set, &mut pending).await;
            set.seq.max(from)
        }
        Err(_) => {
            pending.push_back(Event::default().event("resync").data(from.to_string()));
            from
        }
    };
    let mut recheck = tokio::time::interval(RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = Following {
        feed,
        pending,
        store,
        last: caught_up,
        viewer,
        recheck,
        closing: hub.closing.clone(),
        _open: open,
    };
    let stream = stream::unfold(state, |mut s| async move {
        loop {
            if let Some(event) = s.pending.pop_front() {
                return Some((Ok::<Event, Infallible>(event), s));
            }
            let next = tokio::select! {
                next = s.feed.recv() => next,
                // Shutdown ends the stream, so the server's drain does not wait
                // on an open page.
                () = closed(&mut s.closing) => return None,
                _ = s.recheck.tick() => {
                    // A revoked token, a rotated one or an expired session
                    // ends the stream; the page's reconnect then goes to login.
                    if !s.viewer.still_valid(&*s.store).await {
                        return None;
                    }
                    continue;
                }
            };
            // Nothing more is sent to a credential that no longer grants it.
            if matches!(next, Ok(FeedEvent::Changed(_))) && !s.viewer.still_valid(&*s.store).await {
                return None;
            }
            let (store, pending, last) = (&s.store, &mut s.pending, &mut s.last);
            {
                match next {
                    Ok(FeedEvent::Changed(set)) if set.seq > *last => {
                        *last = set.seq;
                        tenant_events(&**store, &set, pending).await;
                    }
                    Ok(FeedEvent::Changed(_)) => {}
                    Ok(FeedEvent::Lost { .. }) => {
                        pending.push_back(Event::default().event("store").data("lost"));
                    }
                    Ok(FeedEvent::Restored) => {
                        pending.push_back(Event::default().event("store").data("restored"));
                    }
                    // Too far behind the shared feed: the page reloads.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        pending.push_back(Event::default().event("resync").data(last.to_string()));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    Ok(sse(stream).into_response())
}

/// One stream's state between events.
struct Following {
    feed: broadcast::Receiver<FeedEvent>,
    pending: VecDeque<Event>,
    store: Arc<dyn ControlStore>,
    /// The change-log position sent up to.
    last: u64,
    viewer: Viewer,
    recheck: tokio::time::Interval,
    closing: Closing,
    _open: Open,
}

fn sse<S>(stream: S) -> Sse<axum::response::sse::KeepAliveStream<S>>
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive"))
}
