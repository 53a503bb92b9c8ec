//! The change feed: how a subscriber (a proxy replica, `ficus watch`) learns of every
//! committed change without polling the whole store.
//!
//! A feed delivers change-log positions and the tenants each change touched; the
//! subscriber reads those tenants' current state itself. Delivering ids rather than
//! rows keeps the feed small and makes a missed or repeated event harmless: reading
//! current state is idempotent. When the change log no longer reaches back to the
//! subscriber's position, or a change touched many tenants at once (an import), the
//! feed says `resync` and the subscriber reloads everything.

use std::collections::BTreeSet;

use ficus_core::TenantId;
use tokio::sync::mpsc;

/// What changed between the subscriber's last position and `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeSet {
    /// The change-log position this set brings the subscriber up to.
    pub seq: u64,
    /// Tenants whose state changed; meaningless when `resync` is set.
    pub tenants: BTreeSet<TenantId>,
    /// Reload everything: the changes cannot be listed tenant by tenant.
    pub resync: bool,
    /// A route's stage changed: reload the route stages (they are few).
    pub routes: bool,
}

impl ChangeSet {
    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty() && !self.resync && !self.routes
    }
}

/// What the change log records for a change to route stages: not a tenant id
/// (`~` is never in one), so older readers of the log would refuse it rather
/// than misread it.
pub(crate) const ROUTES_MARK: &str = "~routes";

/// One event of a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedEvent {
    /// Changes were committed.
    Changed(ChangeSet),
    /// The store cannot be reached; the subscriber should keep serving what it has.
    /// Sent once per outage.
    Lost { error: String },
    /// The store is reachable again; any changes missed meanwhile follow at once.
    Restored,
}

/// A live subscription to a store's change feed. Dropping it stops the feed.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::Receiver<FeedEvent>,
}

impl Subscription {
    pub(crate) fn channel() -> (mpsc::Sender<FeedEvent>, Subscription) {
        // A small buffer is enough: events are coalescible positions, and a slow
        // subscriber only delays the producer's next read of the change log.
        let (tx, rx) = mpsc::channel(64);
        (tx, Subscription { rx })
    }

    /// The next event, or `None` once the feed has stopped.
    pub async fn recv(&mut self) -> Option<FeedEvent> {
        self.rx.recv().await
    }
}
