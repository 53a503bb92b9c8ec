//! Each tenant's writes as this proxy sees them, so that a compared read that
//! a write of the same tenant may have changed between the two backends'
//! answers is known as raced.
//!
//! A shadow comparison reads the same thing twice, from two backends, at two
//! moments. When a write of the tenant commits between them, the answers
//! differ although neither backend is wrong: a saved search that one answer
//! lists and the other does not. Counted as a mismatch, that is a false
//! alarm the operator cannot tell from a bug, and it comes back each time the
//! client writes. The proxy sees every write it forwards, so it knows: a read
//! opens a [`Window`] before either backend is asked, and when both answers
//! are in, the window was raced if a write of the tenant was in flight when it
//! opened, or started or ended while it was open. A raced comparison is
//! counted as such and not judged.
//!
//! What this cannot see: writes sent through another proxy replica, or made
//! by the backends themselves (a background job). Those still show as
//! mismatches, as before.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ficus_core::TenantId;

/// A window open longer than this is taken as raced: a tenant whose writes
/// have been quiet this long may be forgotten (see [`Writes::forget_idle`]).
pub const LONGEST_WINDOW: Duration = Duration::from_secs(120);

/// One tenant's writes.
#[derive(Debug, Clone, Copy)]
struct Mark {
    in_flight: u32,
    /// The sequence number of the last start or end.
    last: u64,
    /// When that was.
    at: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    /// Bumped at every start and end, under the same lock as the marks, so a
    /// window's number and the marks it is compared with agree.
    seq: u64,
    tenants: HashMap<TenantId, Mark>,
}

/// Writes in flight and the last change, per tenant.
#[derive(Debug, Default)]
pub struct Writes {
    inner: Mutex<Inner>,
}

/// What a compared read saw of its tenant's writes when it began.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    seq: u64,
    busy: bool,
    opened: Instant,
}

impl Writes {
    /// A write of `tenant` leaves for its backend.
    pub fn start(&self, tenant: &TenantId) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.seq += 1;
        let seq = inner.seq;
        let at = Instant::now();
        match inner.tenants.get_mut(tenant) {
            Some(m) => {
                m.in_flight += 1;
                m.last = seq;
                m.at = at;
            }
            None => {
                inner.tenants.insert(
                    tenant.clone(),
                    Mark {
                        in_flight: 1,
                        last: seq,
                        at,
                    },
                );
            }
        }
    }

    /// A write of `tenant` ended: answered, failed or abandoned.
    pub fn end(&self, tenant: &TenantId) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.seq += 1;
        let seq = inner.seq;
        if let Some(m) = inner.tenants.get_mut(tenant) {
            m.in_flight = m.in_flight.saturating_sub(1);
            m.last = seq;
            m.at = Instant::now();
        }
    }

    /// Opens a compared read's window, before either backend is asked.
    pub fn open(&self, tenant: &TenantId) -> Window {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Window {
            seq: inner.seq,
            busy: inner.tenants.get(tenant).is_some_and(|m| m.in_flight > 0),
            opened: Instant::now(),
        }
    }

    /// Whether a write of `tenant` may have changed what the read saw: one
    /// was in flight when the window opened, or one started or ended since.
    pub fn raced(&self, tenant: &TenantId, window: &Window) -> bool {
        if window.busy || window.opened.elapsed() > LONGEST_WINDOW {
            return true;
        }
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .tenants
            .get(tenant)
            .is_some_and(|m| m.last > window.seq)
    }

    /// Forgets tenants with no write in flight and none for the longest
    /// window before `now`, so that the map holds the tenants writing lately,
    /// not every tenant ever seen. A window open longer than that is raced
    /// anyway, so forgetting such a tenant cannot hide a write from one.
    pub fn forget_idle(&self, now: Instant) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.tenants.retain(|_, m| {
            m.in_flight > 0 || now.saturating_duration_since(m.at) <= LONGEST_WINDOW
        });
    }

    /// Tenants remembered, for tests.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .tenants
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TenantId {
        TenantId::parse(s).unwrap()
    }

    /// Each script is a sequence of events on one `Writes`; `check` says, for
    /// the window opened at `open`, whether it is raced at `close`.
    fn check(script: &[&str], expect: bool) {
        let writes = Writes::default();
        let mut window = None;
        let mut raced = None;
        for step in script {
            let (what, tenant) = step.split_once(' ').unwrap();
            let tenant = t(tenant);
            match what {
                "start" => writes.start(&tenant),
                "end" => writes.end(&tenant),
                "open" => window = Some(writes.open(&tenant)),
                "close" => raced = Some(writes.raced(&tenant, window.as_ref().unwrap())),
                other => panic!("unknown step {other}"),
            }
        }
        assert_eq!(raced, Some(expect), "{script:?}");
    }

    #[test]
    fn a_read_is_raced_only_by_a_write_of_its_tenant_that_overlaps_it() {
        // No write at all.
        check(&["open acme", "close acme"], false);
        // A write that ended before the read began.
        check(
            &["start acme", "end acme", "open acme", "close acme"],
            false,
        );
        // One in flight when the read began, ending after or before it.
        check(&["start acme", "open acme", "close acme", "end acme"], true);
        check(&["start acme", "open acme", "end acme", "close acme"], true);
        // One that began while the read was open, whether it ended or not.
        check(&["open acme", "start acme", "close acme"], true);
        check(&["open acme", "start acme", "end acme", "close acme"], true);
        // One that began after the read was over.
        check(&["open acme", "close acme", "start acme"], false);
        // Another tenant's writes, overlapping or not.
        check(
            &["start globex", "open acme", "end globex", "close acme"],
            false,
        );
        check(&["open acme", "start globex", "close acme"], false);
    }

    #[test]
    fn idle_tenants_are_forgotten_and_writing_ones_kept() {
        let writes = Writes::default();
        writes.start(&t("acme"));
        writes.start(&t("globex"));
        writes.end(&t("globex"));
        writes.forget_idle(Instant::now());
        assert_eq!(writes.len(), 2, "nothing idle for the longest window yet");
        writes.forget_idle(Instant::now() + LONGEST_WINDOW + Duration::from_secs(1));
        assert_eq!(writes.len(), 1, "acme's write is still in flight");
        // A window that outlived the longest is raced whatever happened.
        let mut window = writes.open(&t("initech"));
        window.opened = window
            .opened
            .checked_sub(LONGEST_WINDOW + Duration::from_secs(1))
            .expect("the clock has run longer than the longest window");
        assert!(writes.raced(&t("initech"), &window));
    }
}
