//! Prometheus metrics and the legacy-traffic counter.
//!
//! Per-tenant series are capped: the first `cap` tenants seen get their own label
//! value, the rest are counted as `other`, so a SaaS with 100,000 tenants cannot blow
//! up the metrics backend.

use std::sync::{Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use ficus_core::{Backend, TenantId, Timestamp};
use ficus_store::TrafficCount;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::FastMap;
use crate::table::RoutingTable;

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    upstream_errors: IntCounterVec,
    tenant_requests: IntCounterVec,
    rejected: IntCounterVec,
    pub guard_rollbacks: IntCounter,
    pub in_flight: IntGauge,
    pub client_connections: IntGauge,
    table_seq: IntGauge,
    table_age_ms: IntGauge,
    table_tenants: IntGauge,
    store_reachable: IntGauge,
    /// Series resolved once per label combination: `with_label_values` hashes its
    /// labels on every call, which is too much for every request.
    request_series: [OnceLock<IntCounter>; BACKENDS * STAGES * CLASSES],
    latency_series: [OnceLock<Histogram>; BACKENDS * STAGES],
    tenant_series: RwLock<FastMap<TenantId, [OnceLock<IntCounter>; BACKENDS]>>,
    other_series: [OnceLock<IntCounter>; BACKENDS],
    cap: usize,
}

const BACKENDS: usize = 3;
const STAGES: usize = 4;
const CLASSES: usize = 6;
const BACKEND_LABELS: [&str; BACKENDS] = ["legacy", "new", "none"];
const STAGE_LABELS: [&str; STAGES] = ["legacy", "shadow", "migrated", "unknown"];
const CLASS_LABELS: [&str; CLASSES] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

impl Metrics {
    pub fn new(cap: usize) -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "ficus_requests_total",
                "Requests answered, by backend, tenant stage and status class",
            ),
            &["backend", "stage", "status"],
        )
        .expect("static metric definition");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "ficus_request_duration_seconds",
                "Time from request start to the end of the response, by backend and stage",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["backend", "stage"],
        )
        .expect("static metric definition");
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "ficus_upstream_errors_total",
                "Requests that failed at the upstream, by backend and kind",
            ),
            &["backend", "kind"],
        )
        .expect("static metric definition");
        let tenant_requests = IntCounterVec::new(
            Opts::new(
                "ficus_tenant_requests_total",
                "Requests per tenant (capped label set; the rest are `other`)",
            ),
            &["tenant", "backend"],
        )
        .expect("static metric definition");
        let rejected = IntCounterVec::new(
            Opts::new(
                "ficus_rejected_requests_total",
                "Requests the proxy answered itself with an error, by reason",
            ),
            &["reason"],
        )
        .expect("static metric definition");
        let guard_rollbacks = IntCounter::new(
            "ficus_guard_rollbacks_total",
            "Tenants the guard rolled back to shadow",
        )
        .expect("static metric definition");
        registry
            .register(Box::new(guard_rollbacks.clone()))
            .expect("unique metric names");
        let gauge =
            |name: &str, help: &str| IntGauge::new(name, help).expect("static metric definition");
        let in_flight = gauge("ficus_in_flight_requests", "Requests being served now");
        let client_connections = gauge("ficus_client_connections", "Client connections open");
        let table_seq = gauge(
            "ficus_routing_snapshot_seq",
            "Change-log position of the routing table in use",
        );
        let table_age_ms = gauge(
            "ficus_routing_snapshot_age_ms",
            "Milliseconds since the routing table in use was built",
        );
        let table_tenants = gauge(
            "ficus_routing_snapshot_tenants",
            "Tenants in the routing table in use",
        );
        let store_reachable = gauge(
            "ficus_store_reachable",
            "1 when the control store answered last time, 0 when serving from the last table",
        );
        for c in [&requests, &upstream_errors, &tenant_requests, &rejected] {
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric names");
        }
        registry
            .register(Box::new(latency.clone()))
            .expect("unique metric names");
        for g in [
            &in_flight,
            &client_connections,
            &table_seq,
            &table_age_ms,
            &table_tenants,
            &store_reachable,
        ] {
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric names");
        }
        Metrics {
            registry,
            requests,
            latency,
            upstream_errors,
            tenant_requests,
            rejected,
            guard_rollbacks,
            in_flight,
            client_connections,
            table_seq,
            table_age_ms,
            table_tenants,
            store_reachable,
            request_series: std::array::from_fn(|_| OnceLock::new()),
            latency_series: std::array::from_fn(|_| OnceLock::new()),
            tenant_series: RwLock::new(FastMap::default()),
            other_series: std::array::from_fn(|_| OnceLock::new()),
            cap,
        }
    }

    /// Records one answered request. `stage` is `None` for an unknown tenant.
    pub fn observe(
        &self,
        backend: Option<Backend>,
        stage: Option<ficus_core::Stage>,
        status: u16,
        elapsed: Duration,
        tenant: Option<&TenantId>,
    ) {
        let b = match backend {
            Some(Backend::Legacy) => 0,
            Some(Backend::New) => 1,
            None => 2,
        };
        let st = match stage {
            Some(ficus_core::Stage::Legacy) => 0,
            Some(ficus_core::Stage::Shadow) => 1,
            Some(ficus_core::Stage::Migrated) => 2,
            None => 3,
        };
        let class = match status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            500..=599 => 4,
            _ => 5,
        };
        self.request_series[(b * STAGES + st) * CLASSES + class]
            .get_or_init(|| {
                self.requests.with_label_values(&[
                    BACKEND_LABELS[b],
                    STAGE_LABELS[st],
                    CLASS_LABELS[class],
                ])
            })
            .inc();
        self.latency_series[b * STAGES + st]
            .get_or_init(|| {
                self.latency
                    .with_label_values(&[BACKEND_LABELS[b], STAGE_LABELS[st]])
            })
            .observe(elapsed.as_secs_f64());
        if let Some(t) = tenant {
            self.count_tenant(t, b);
        }
    }

    /// Counts a request in the tenant's own series while fewer than `cap`
    /// tenants have one, else in the shared `other` series. Counted under the
    /// read lock, not through a clone of the counter (two atomic operations
    /// a request fewer).
    fn count_tenant(&self, tenant: &TenantId, b: usize) {
        let make = || {
            self.tenant_requests
                .with_label_values(&[tenant.as_str(), BACKEND_LABELS[b]])
        };
        if let Some(slots) = self
            .tenant_series
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
        {
            slots[b].get_or_init(make).inc();
            return;
        }
        let mut series = self
            .tenant_series
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if series.len() < self.cap || series.contains_key(tenant) {
            let slots = series
                .entry(tenant.clone())
                .or_insert_with(|| std::array::from_fn(|_| OnceLock::new()));
            slots[b].get_or_init(make).inc();
            return;
        }
        self.other_series[b]
            .get_or_init(|| {
                self.tenant_requests
                    .with_label_values(&["other", BACKEND_LABELS[b]])
            })
            .inc();
    }

    pub fn upstream_error(&self, backend: Backend, kind: &str) {
        self.upstream_errors
            .with_label_values(&[backend.as_str(), kind])
            .inc();
    }

    pub fn rejected(&self, reason: &str) {
        self.rejected.with_label_values(&[reason]).inc();
    }

    /// Renders every metric in Prometheus's text format, refreshing the gauges that
    /// describe the routing table first.
    pub fn render(&self, table: Option<&RoutingTable>, store_reachable: bool) -> String {
        if let Some(t) = table {
            self.table_seq.set(t.seq as i64);
            self.table_tenants.set(t.len() as i64);
            let age = SystemTime::now()
                .duration_since(t.built_at)
                .unwrap_or_default();
            self.table_age_ms.set(age.as_millis() as i64);
        }
        self.store_reachable.set(i64::from(store_reachable));
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Requests routed to legacy since the last flush, per tenant (`None` for requests
/// with no known tenant). The finish line needs "no traffic to legacy for N hours";
/// counting here and flushing in aggregate keeps the store off the request path.
#[derive(Default)]
pub struct LegacyTraffic {
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    known: FastMap<TenantId, (u64, Timestamp)>,
    unknown: Option<(u64, Timestamp)>,
}

fn bump(entry: &mut (u64, Timestamp), n: u64, at: Timestamp) {
    entry.0 += n;
    entry.1 = entry.1.max(at);
}

impl LegacyTraffic {
    pub fn record(&self, tenant: Option<&TenantId>, at: Timestamp) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        match tenant {
            // Look up before inserting, so the hot path does not clone the id.
            Some(t) => match counts.known.get_mut(t) {
                Some(entry) => bump(entry, 1, at),
                None => {
                    counts.known.insert(t.clone(), (1, at));
                }
            },
            None => bump(counts.unknown.get_or_insert((0, at)), 1, at),
        }
    }

    /// Takes everything counted so far.
    pub fn take(&self) -> Vec<TrafficCount> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let unknown = counts
            .unknown
            .take()
            .map(|(requests, last_at)| TrafficCount {
                tenant: None,
                requests,
                last_at,
            });
        counts
            .known
            .drain()
            .map(|(t, (requests, last_at))| TrafficCount {
                tenant: Some(t),
                requests,
                last_at,
            })
            .chain(unknown)
            .collect()
    }

    /// Puts back counts whose flush failed, so the next flush carries them.
    pub fn restore(&self, counts: Vec<TrafficCount>) {
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        for c in counts {
            match c.tenant {
                Some(t) => bump(
                    map.known.entry(t).or_insert((0, c.last_at)),
                    c.requests,
                    c.last_at,
                ),
                None => bump(
                    map.unknown.get_or_insert((0, c.last_at)),
                    c.requests,
                    c.last_at,
                ),
            }
        }
    }
}
