//! The guard: automatic rollback of a migrated tenant when the new backend
//! misbehaves for it.
//!
//! Three signals are counted per tenant in a sliding window of one-second buckets:
//! - every answer the new backend gives a `migrated` tenant: bad (a 5xx, which
//!   includes the 502 and 504 the proxy makes itself when new cannot be reached or
//!   times out) or not, and slow or not (slower than `max_latency_ratio` times that
//!   tenant's legacy p99, the baseline measured during its parallel run);
//! - every reverse-shadow comparison (new served, legacy asked too): mismatched or not.
//!
//! A write route released for one tenant (a canary) is watched on its own: its
//! answers count for `(tenant, route)`, not for the tenant, and a trip holds the
//! route again for that tenant alone (its override goes back to `legacy`),
//! leaving the tenant and every other route where they are.
//!
//! When the window holds enough samples (`min_requests` answers, `min_compared`
//! comparisons) and a share reaches its threshold, the guard trips: the tenant is
//! rolled back to `shadow` through the store, so every replica follows, with
//! `actor=guard` and the numbers in the reason. The guard never promotes anything
//! back; a person does, after a fix. The minimum samples keep a handful of bad
//! answers from tripping it, and a cooldown keeps it from acting on the same tenant
//! again while its rollback propagates.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ficus_core::latency::format_micros;
use ficus_core::{Actor, Route, Stage, TenantId};
use ficus_store::{ControlStore, RouteChange, StageChange};
use prometheus::IntCounter;

use crate::FastMap;
use crate::config::GuardConfig;

/// What the guard watches: a migrated tenant, or one write route released for
/// one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Watch {
    Tenant(TenantId),
    /// `(tenant, "POST /homes")`.
    Route(TenantId, String),
}

impl Watch {
    fn tenant(&self) -> &TenantId {
        match self {
            Watch::Tenant(t) | Watch::Route(t, _) => t,
        }
    }
}

/// What the guard is told about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// New answered a migrated tenant, in this many microseconds.
    Answer { bad: bool, micros: u64 },
    /// A reverse-shadow comparison finished.
    Compared { mismatched: bool },
}

/// Which threshold was crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TripKind {
    Errors,
    Latency { baseline_micros: u64 },
    Mismatches,
}

/// Why the guard tripped, in numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct Trip {
    pub kind: TripKind,
    /// Samples in the window (answers, or comparisons for mismatches).
    pub total: u64,
    /// Of which bad, slow or mismatched.
    pub hits: u64,
    pub window: Duration,
}

impl Trip {
    pub fn reason(&self, c: &GuardConfig) -> String {
        let share = self.hits as f64 * 100.0 / self.total.max(1) as f64;
        let secs = self.window.as_secs();
        match self.kind {
            TripKind::Errors => format!(
                "guard: {} of {} answers from new were errors (5xx, timeouts, unreachable) in the last {secs} s, {share:.0}% against a threshold of {:.0}% with at least {} answers",
                self.hits,
                self.total,
                c.max_error_rate * 100.0,
                c.min_requests
            ),
            TripKind::Latency { baseline_micros } => format!(
                "guard: {} of {} answers from new were slower than {} ({}× the tenant's legacy p99 of {}) in the last {secs} s, {share:.0}% against a threshold of {:.0}% with at least {} answers",
                self.hits,
                self.total,
                format_micros(slow_above(baseline_micros, c)),
                c.max_latency_ratio,
                format_micros(baseline_micros),
                c.max_slow_rate * 100.0,
                c.min_requests
            ),
            TripKind::Mismatches => format!(
                "guard: {} of {} reverse-shadow comparisons found new disagreeing with legacy in the last {secs} s, {share:.0}% against a threshold of {:.0}% with at least {} comparisons",
                self.hits,
                self.total,
                c.max_mismatch_rate * 100.0,
                c.min_compared
            ),
        }
    }
}

fn slow_above(baseline_micros: u64, c: &GuardConfig) -> u64 {
    (baseline_micros as f64 * c.max_latency_ratio) as u64
}

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    answers: u64,
    bad: u64,
    slow: u64,
    compared: u64,
    mismatched: u64,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.answers += o.answers;
        self.bad += o.bad;
        self.slow += o.slow;
        self.compared += o.compared;
        self.mismatched += o.mismatched;
    }
}

#[derive(Default)]
struct Window {
    /// (second, tally), oldest first.
    buckets: VecDeque<(u64, Tally)>,
}

pub struct Guard {
    started: Instant,
    windows: Mutex<FastMap<Watch, Window>>,
    /// When each watch last tripped.
    tripped: Mutex<FastMap<Watch, Instant>>,
    /// Each active tenant's legacy p99 in microseconds, from its parallel run.
    baselines: Mutex<FastMap<TenantId, u64>>,
    store: Arc<OnceLock<Arc<dyn ControlStore>>>,
    rollbacks: IntCounter,
}

impl Guard {
    /// A guard that rolls back through `store` once it is open, counting its
    /// rollbacks in `rollbacks`.
    pub fn new(store: Arc<OnceLock<Arc<dyn ControlStore>>>, rollbacks: IntCounter) -> Guard {
        Guard {
            started: Instant::now(),
            windows: Mutex::default(),
            tripped: Mutex::default(),
            baselines: Mutex::default(),
            store,
            rollbacks,
        }
    }

    /// Counts one signal and, when it crosses a threshold, acts (on the current
    /// runtime): rolls a tenant back to `shadow`, or holds a canary route again
    /// for its tenant. Returns the trip.
    pub fn observe(&self, watch: &Watch, signal: Signal, config: &GuardConfig) -> Option<Trip> {
        let trip = self.record(watch, signal, config)?;
        let reason = trip.reason(config);
        self.rollbacks.inc();
        let store = self.store.get().cloned();
        let watch = watch.clone();
        match &watch {
            Watch::Tenant(tenant) => {
                tracing::warn!(%tenant, reason, "guard: rolling the tenant back to shadow")
            }
            Watch::Route(tenant, route) => {
                tracing::warn!(%tenant, route, reason, "guard: holding the route again for the tenant")
            }
        }
        tokio::spawn(async move {
            let Some(store) = store else {
                tracing::error!(tenant = %watch.tenant(), "guard: the store is not open, cannot act");
                return;
            };
            let done = match &watch {
                Watch::Tenant(tenant) => store
                    .change_stage(StageChange {
                        tenant: tenant.clone(),
                        to: Stage::Shadow,
                        expected_version: None,
                        actor: Actor::Guard,
                        reason,
                    })
                    .await
                    .map(drop),
                Watch::Route(tenant, route) => match Route::parse(route) {
                    Ok(route) => store
                        .change_route(RouteChange {
                            route,
                            tenant: Some(tenant.clone()),
                            to: Stage::Legacy,
                            expected_version: None,
                            actor: Actor::Guard,
                            reason: format!("route held again for this tenant; {reason}"),
                        })
                        .await
                        .map(drop),
                    Err(e) => Err(e.into()),
                },
            };
            if let Err(e) = done {
                tracing::error!(tenant = %watch.tenant(), error = %e, "guard: could not act");
            }
        });
        Some(trip)
    }

    /// Tenants the guard has counted recently (the ones whose baselines matter);
    /// with `missing_only`, just those without a baseline yet.
    pub fn active(&self, missing_only: bool) -> Vec<TenantId> {
        let known = self.baselines.lock().unwrap_or_else(|p| p.into_inner());
        let mut tenants: Vec<TenantId> = self
            .windows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .map(Watch::tenant)
            .filter(|t| !missing_only || !known.contains_key(*t))
            .cloned()
            .collect();
        tenants.sort();
        tenants.dedup();
        tenants
    }

    /// Sets the legacy p99 baselines of tenants; a tenant without one is never
    /// judged slow.
    pub fn set_baselines(&self, baselines: impl IntoIterator<Item = (TenantId, u64)>) {
        let mut map = self.baselines.lock().unwrap_or_else(|p| p.into_inner());
        for (tenant, micros) in baselines {
            map.insert(tenant, micros);
        }
    }

    /// Counts one signal; returns a trip when this one crosses a threshold.
    pub fn record(&self, watch: &Watch, signal: Signal, config: &GuardConfig) -> Option<Trip> {
        let tenant = watch.tenant();
        if !config.enabled {
            return None;
        }
        let now = Instant::now();
        if let Some(at) = self
            .tripped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(watch)
            && now.duration_since(*at) < config.cooldown
        {
            return None;
        }
        let baseline = self
            .baselines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .copied();
        let mut one = Tally::default();
        match signal {
            Signal::Answer { bad, micros } => {
                one.answers = 1;
                one.bad = u64::from(bad);
                one.slow = u64::from(baseline.is_some_and(|b| micros > slow_above(b, config)));
            }
            Signal::Compared { mismatched } => {
                one.compared = 1;
                one.mismatched = u64::from(mismatched);
            }
        }
        let second = now.duration_since(self.started).as_secs();
        let span = config.window.as_secs().max(1);
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let w = match windows.get_mut(watch) {
            Some(w) => w,
            None => windows.entry(watch.clone()).or_default(),
        };
        while w.buckets.front().is_some_and(|(s, _)| s + span <= second) {
            w.buckets.pop_front();
        }
        match w.buckets.back_mut() {
            Some((s, t)) if *s == second => t.add(&one),
            _ => w.buckets.push_back((second, one)),
        }
        let mut sum = Tally::default();
        for (_, t) in &w.buckets {
            sum.add(t);
        }
        let crossed = |hits: u64, total: u64, min: u64, rate: f64| {
            hits > 0 && total >= min && hits as f64 >= rate * total as f64
        };
        let trip = |kind, total, hits| Trip {
            kind,
            total,
            hits,
            window: config.window,
        };
        let found = if crossed(
            sum.bad,
            sum.answers,
            config.min_requests,
            config.max_error_rate,
        ) {
            trip(TripKind::Errors, sum.answers, sum.bad)
        } else if let Some(b) = baseline
            && crossed(
                sum.slow,
                sum.answers,
                config.min_requests,
                config.max_slow_rate,
            )
        {
            trip(
                TripKind::Latency { baseline_micros: b },
                sum.answers,
                sum.slow,
            )
        } else if crossed(
            sum.mismatched,
            sum.compared,
            config.min_compared,
            config.max_mismatch_rate,
        ) {
            trip(TripKind::Mismatches, sum.compared, sum.mismatched)
        } else {
            return None;
        };
        windows.remove(watch);
        self.tripped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(watch.clone(), now);
        Some(found)
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
            max_latency_ratio: 3.0,
            max_slow_rate: 0.2,
            min_compared: 20,
            max_mismatch_rate: 0.2,
        }
    }

    fn guard() -> Guard {
        Guard::new(Arc::default(), IntCounter::new("t", "t").unwrap())
    }

    fn answer(bad: bool) -> Signal {
        Signal::Answer { bad, micros: 1_000 }
    }

    #[test]
    fn trips_only_with_enough_samples_and_errors_and_then_holds_off() {
        let g = guard();
        let acme = Watch::Tenant(TenantId::parse("acme").unwrap());
        let c = config();
        // 3 errors among 10 answers: too few samples, whatever the rate.
        for i in 0..10 {
            assert_eq!(g.record(&acme, answer(i < 3), &c), None);
        }
        // 10 more good ones: 3 of 20 is 15%, under 20%.
        for _ in 0..10 {
            assert_eq!(g.record(&acme, answer(false), &c), None);
        }
        // The next error makes 4 of 21 = 19%; one more, 5 of 22 = 23%: trip.
        assert_eq!(g.record(&acme, answer(true), &c), None);
        let trip = g.record(&acme, answer(true), &c).expect("trips");
        assert_eq!(
            (trip.kind, trip.total, trip.hits),
            (TripKind::Errors, 22, 5)
        );
        assert!(
            trip.reason(&c)
                .starts_with("guard: 5 of 22 answers from new were errors")
        );
        // Cooldown: more errors do not trip again at once.
        for _ in 0..50 {
            assert_eq!(g.record(&acme, answer(true), &c), None);
        }
        // Other tenants are judged on their own.
        let globex = Watch::Tenant(TenantId::parse("globex").unwrap());
        for _ in 0..30 {
            assert_eq!(g.record(&globex, answer(false), &c), None);
        }
        let off = GuardConfig {
            enabled: false,
            ..c
        };
        for _ in 0..50 {
            assert_eq!(g.record(&globex, answer(true), &off), None);
        }
    }

    #[test]
    fn trips_on_slow_answers_only_against_a_known_baseline() {
        let g = guard();
        let c = config();
        let acme = Watch::Tenant(TenantId::parse("acme").unwrap());
        let slow = Signal::Answer {
            bad: false,
            micros: 50_000,
        };
        // No baseline: slowness cannot be judged.
        for _ in 0..40 {
            assert_eq!(g.record(&acme, slow, &c), None);
        }
        // A 10 ms legacy p99: 50 ms is beyond 3×, and every answer is slow.
        let globex = Watch::Tenant(TenantId::parse("globex").unwrap());
        g.set_baselines([(globex.tenant().clone(), 10_000)]);
        for _ in 0..19 {
            assert_eq!(g.record(&globex, slow, &c), None);
        }
        let trip = g.record(&globex, slow, &c).expect("trips");
        assert_eq!(
            trip.kind,
            TripKind::Latency {
                baseline_micros: 10_000
            }
        );
        assert!(
            trip.reason(&c).contains("slower than 30.0 ms"),
            "{}",
            trip.reason(&c)
        );
    }

    #[test]
    fn trips_on_reverse_shadow_mismatches_with_enough_comparisons() {
        let g = guard();
        let c = config();
        let acme = Watch::Tenant(TenantId::parse("acme").unwrap());
        for i in 0..19 {
            assert_eq!(
                g.record(
                    &acme,
                    Signal::Compared {
                        mismatched: i % 2 == 0
                    },
                    &c
                ),
                None
            );
        }
        let trip = g
            .record(&acme, Signal::Compared { mismatched: false }, &c)
            .expect("trips");
        assert_eq!(
            (trip.kind, trip.total, trip.hits),
            (TripKind::Mismatches, 20, 10)
        );
    }

    #[test]
    fn a_canary_route_is_watched_apart_from_its_tenant() {
        let g = guard();
        let c = config();
        let acme = TenantId::parse("acme").unwrap();
        let tenant = Watch::Tenant(acme.clone());
        let canary = Watch::Route(acme, "POST /homes".into());
        // The route's errors trip the route's watch, not the tenant's.
        for i in 0..19 {
            assert_eq!(g.record(&canary, answer(i % 2 == 0), &c), None);
            assert_eq!(g.record(&tenant, answer(false), &c), None);
        }
        let trip = g.record(&canary, answer(true), &c).unwrap();
        assert_eq!(
            (trip.kind, trip.total, trip.hits),
            (TripKind::Errors, 20, 11)
        );
        assert_eq!(g.record(&tenant, answer(false), &c), None);
        assert_eq!(g.active(false), [TenantId::parse("acme").unwrap()]);
    }
}
