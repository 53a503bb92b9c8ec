//! Spreads client connections evenly over the workers.
//!
//! Every worker accepts on its own copy of the same listening socket, and the
//! kernel wakes all of them for a new connection. The first to run took every
//! connection waiting: a load balancer opening 32 keep-alive connections at
//! once found 30 of them on one worker and 2 on the other (counted with
//! `strace -e accept4`), and a two-thread proxy ran on one core.
//!
//! So a worker with more open connections than another leaves new ones to the
//! others, which the kernel woke too. It takes one anyway if the others have
//! left it waiting for [`RECHECK`]: a worker that is stuck must not stop the
//! proxy from accepting.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::Notify;

use crate::metrics::Metrics;

/// How long a worker ahead of the others leaves a waiting connection to them
/// before it takes it itself. While ahead, it looks this often: twenty
/// wake-ups a second, on a worker that already wakes four times a second to
/// keep a timer ahead.
pub const RECHECK: Duration = Duration::from_millis(50);

/// The open client connections of every worker.
pub struct Balance {
    open: Box<[AtomicUsize]>,
    gauges: Box<[IntGauge]>,
    /// Workers waiting in [`Balance::changed`]: a count changes on every
    /// connection, and wakes them only when one waits.
    waiting: AtomicUsize,
    changed: Notify,
}

impl Balance {
    pub fn new(workers: usize, metrics: &Metrics) -> Balance {
        let workers = workers.max(1);
        Balance {
            open: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
            gauges: (0..workers)
                .map(|w| metrics.worker_connections(w))
                .collect(),
            waiting: AtomicUsize::new(0),
            changed: Notify::new(),
        }
    }

    /// Whether `worker` has more open connections than some other worker.
    pub fn ahead(&self, worker: usize) -> bool {
        let mine = self.open[worker].load(Ordering::SeqCst);
        self.open
            .iter()
            .enumerate()
            .any(|(w, open)| w != worker && open.load(Ordering::SeqCst) < mine)
    }

    /// The open connections of each worker.
    pub fn open(&self) -> Vec<usize> {
        self.open.iter().map(|o| o.load(Ordering::SeqCst)).collect()
    }

    /// Counts a connection `worker` accepted until the returned guard drops.
    pub fn opened(self: &Arc<Self>, worker: usize) -> Open {
        self.open[worker].fetch_add(1, Ordering::SeqCst);
        self.gauges[worker].inc();
        self.wake();
        Open {
            balance: Arc::clone(self),
            worker,
        }
    }

    /// Waits while `worker` is ahead, until some count changes.
    pub async fn changed(&self, worker: usize) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waited = Waited(&self.waiting);
        let changed = self.changed.notified();
        tokio::pin!(changed);
        // Registered before the counts are read again, so a change made after
        // that read wakes it.
        changed.as_mut().enable();
        if self.ahead(worker) {
            changed.await;
        }
    }

    fn wake(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }
}

/// Counts a worker out of the waiting ones however its wait ends.
struct Waited<'a>(&'a AtomicUsize);

impl Drop for Waited<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One open connection of a worker; dropping it closes it in the count.
pub struct Open {
    balance: Arc<Balance>,
    worker: usize,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.balance.open[self.worker].fetch_sub(1, Ordering::SeqCst);
        self.balance.gauges[self.worker].dec();
        self.balance.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(open: &[usize], expect: &[bool]) {
        let balance = Arc::new(Balance::new(open.len(), &Metrics::new(10)));
        let mut guards = Vec::new();
        for (w, n) in open.iter().enumerate() {
            for _ in 0..*n {
                guards.push(balance.opened(w));
            }
        }
        let ahead: Vec<bool> = (0..open.len()).map(|w| balance.ahead(w)).collect();
        assert_eq!(ahead, expect, "open connections {open:?}");
        drop(guards);
        assert!(balance.open().iter().all(|n| *n == 0));
    }

    #[test]
    fn a_worker_is_ahead_only_of_a_worker_with_fewer_connections() {
        check(&[0], &[false]);
        check(&[5], &[false]);
        check(&[0, 0], &[false, false]);
        check(&[1, 0], &[true, false]);
        check(&[3, 3], &[false, false]);
        check(&[2, 3, 2], &[false, true, false]);
        check(&[4, 1, 2], &[true, false, true]);
    }
}
