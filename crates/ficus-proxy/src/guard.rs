//! The guard: automatic rollback of a migrated tenant when the new backend
//! misbehaves for it.
//!
//! Every answer the new backend gives a `migrated` tenant is counted in a sliding
//! window of one-second buckets: good, or bad (a 5xx, which includes the 502 and 504
//! the proxy makes itself when new cannot be reached or times out). When the window
//! holds at least `min_requests` answers and the bad share reaches `max_error_rate`,
//! the guard trips: the tenant is rolled back to `shadow` through the store, so every
//! replica follows, with `actor=guard` and the numbers in the reason. The guard never
//! promotes anything back; a person does, after a fix. The minimum sample keeps a
//! handful of errors from tripping it, and a cooldown keeps it from acting on the
//! same tenant again while its rollback propagates.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ficus_core::TenantId;

use crate::config::GuardConfig;

/// Why the guard tripped, in numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct Trip {
    pub total: u64,
    pub bad: u64,
    pub window: Duration,
}

impl Trip {
    pub fn reason(&self, config: &GuardConfig) -> String {
        format!(
            "guard: {} of {} answers from new were errors (5xx, timeouts, unreachable) in the last {} s, {:.0}% against a threshold of {:.0}% with at least {} answers",
            self.bad,
            self.total,
            self.window.as_secs(),
            self.bad as f64 * 100.0 / self.total.max(1) as f64,
            config.max_error_rate * 100.0,
            config.min_requests
        )
    }
}

#[derive(Default)]
struct Window {
    /// (second, total, bad), oldest first.
    buckets: VecDeque<(u64, u64, u64)>,
}

pub struct Guard {
    started: Instant,
    windows: Mutex<HashMap<TenantId, Window>>,
    /// When each tenant last tripped.
    tripped: Mutex<HashMap<TenantId, Instant>>,
}

impl Default for Guard {
    fn default() -> Guard {
        Guard {
            started: Instant::now(),
            windows: Mutex::default(),
            tripped: Mutex::default(),
        }
    }
}

impl Guard {
    /// Counts one answer of new to a migrated tenant; returns a trip when this
    /// answer crosses the threshold.
    pub fn record(&self, tenant: &TenantId, bad: bool, config: &GuardConfig) -> Option<Trip> {
        if !config.enabled {
            return None;
        }
        let now = Instant::now();
        if let Some(at) = self
            .tripped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            && now.duration_since(*at) < config.cooldown
        {
            return None;
        }
        let second = now.duration_since(self.started).as_secs();
        let span = config.window.as_secs().max(1);
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let w = match windows.get_mut(tenant) {
            Some(w) => w,
            None => windows.entry(tenant.clone()).or_default(),
        };
        while w
            .buckets
            .front()
            .is_some_and(|(s, _, _)| s + span <= second)
        {
            w.buckets.pop_front();
        }
        match w.buckets.back_mut() {
            Some((s, total, b)) if *s == second => {
                *total += 1;
                *b += u64::from(bad);
            }
            _ => w.buckets.push_back((second, 1, u64::from(bad))),
        }
        let (total, bad_total) = w
            .buckets
            .iter()
            .fold((0, 0), |(t, b), (_, tt, bb)| (t + tt, b + bb));
        if total < config.min_requests
            || (bad_total as f64) < config.max_error_rate * total as f64
            || bad_total == 0
        {
            return None;
        }
        windows.remove(tenant);
        self.tripped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.clone(), now);
        Some(Trip {
            total,
            bad: bad_total,
            window: config.window,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> GuardConfig {
        GuardConfig {
            enabled: true,
            window: Duration::from_secs(10),
            min_requests: 20,
            max_error_rate: 0.2,
            cooldown: Duration::from_secs(60),
        }
    }

    #[test]
    fn trips_only_with_enough_samples_and_errors_and_then_holds_off() {
        let g = Guard::default();
        let acme = TenantId::parse("acme").unwrap();
        let c = config();
        // 3 errors among 10 answers: too few samples, whatever the rate.
        for i in 0..10 {
            assert_eq!(g.record(&acme, i < 3, &c), None);
        }
        // 10 more good ones: 3 of 20 is 15%, under 20%.
        for _ in 0..10 {
            assert_eq!(g.record(&acme, false, &c), None);
        }
        // The next error makes 4 of 21 = 19%; one more, 5 of 22 = 23%: trip.
        assert_eq!(g.record(&acme, true, &c), None);
        let trip = g.record(&acme, true, &c).expect("trips");
        assert_eq!((trip.total, trip.bad), (22, 5));
        assert!(
            trip.reason(&c)
                .starts_with("guard: 5 of 22 answers from new were errors")
        );
        // Cooldown: more errors do not trip again at once.
        for _ in 0..50 {
            assert_eq!(g.record(&acme, true, &c), None);
        }
        // Other tenants are judged on their own.
        let globex = TenantId::parse("globex").unwrap();
        for _ in 0..30 {
            assert_eq!(g.record(&globex, false, &c), None);
        }
        let off = GuardConfig {
            enabled: false,
            ..c
        };
        for _ in 0..50 {
            assert_eq!(g.record(&globex, true, &off), None);
        }
    }
}
