//! Live updates: the change feed as server-sent events.
//!
//! Each open page holds one `EventSource` on `/ui/events?from=SEQ`, SEQ being
//! the change-log position read before the page read anything, so a change
//! made while the page was rendering or the stream was opening is still sent.
//! The stream follows the store's change feed from there and sends, for every tenant
//! a change touched, its current stage and version (`event: tenant`); when the
//! feed cannot list the tenants (an import, a gap), `event: resync` tells the
//! page to reload; when the store is lost or back, `event: store`. A comment is
//! sent every 15 seconds so that proxies in between keep the connection open.
//! When the browser cannot keep the stream, the page's script falls back to
//! reloading on a timer.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use ficus_store::FeedEvent;
use futures_util::stream::{self, Stream};
use serde_json::json;

use super::{UiError, Viewer};
use crate::server::StoreSlot;

/// How often a quiet stream sends a keep-alive comment.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(serde::Deserialize)]
pub struct From {
    /// The position the page was rendered at; the stream replays every change
    /// after it. Without it, the stream starts at the position the request was
    /// authenticated at.
    from: Option<u64>,
}

pub async fn events(
    State(slot): State<StoreSlot>,
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
    let feed = store.subscribe(Some(from));
    // Events waiting to be sent: one change can touch many tenants.
    let pending: std::collections::VecDeque<Event> = Default::default();
    let stream = stream::unfold(
        (feed, pending, store),
        |(mut feed, mut pending, store)| async move {
            loop {
                if let Some(event) = pending.pop_front() {
                    return Some((Ok::<Event, Infallible>(event), (feed, pending, store)));
                }
                match feed.recv().await? {
                    FeedEvent::Changed(set) if set.resync => {
                        pending
                            .push_back(Event::default().event("resync").data(set.seq.to_string()));
                    }
                    FeedEvent::Changed(set) => {
                        for id in &set.tenants {
                            let data = match store.tenant(id).await {
                                Ok(Some(t)) => json!({
                                    "id": t.id.as_str(),
                                    "stage": t.stage.as_str(),
                                    "version": t.version,
                                    "updated_at": ficus_store::format_time(t.updated_at),
                                    "seq": set.seq,
                                }),
                                Ok(None) => {
                                    json!({ "id": id.as_str(), "gone": true, "seq": set.seq })
                                }
                                // The page learns of the gap and reloads.
                                Err(_) => {
                                    pending.push_back(
                                        Event::default().event("resync").data(set.seq.to_string()),
                                    );
                                    continue;
                                }
                            };
                            pending
                                .push_back(Event::default().event("tenant").data(data.to_string()));
                        }
                    }
                    FeedEvent::Lost { .. } => {
                        pending.push_back(Event::default().event("store").data("lost"));
                    }
                    FeedEvent::Restored => {
                        pending.push_back(Event::default().event("store").data("restored"));
                    }
                }
            }
        },
    );
    Ok(sse(stream).into_response())
}

fn sse<S>(stream: S) -> Sse<axum::response::sse::KeepAliveStream<S>>
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive"))
}
