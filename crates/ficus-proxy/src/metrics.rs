//! Prometheus metrics and the legacy-traffic counter.
//!
//! Per-tenant series are capped: the first `cap` tenants seen get their own label
//! value, the rest are counted as `other`, so a SaaS with 100,000 tenants cannot blow
//! up the metrics backend.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use ficus_core::{Backend, TenantId, Timestamp};
use ficus_store::TrafficCount;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use crate::table::RoutingTable;

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    upstream_errors: IntCounterVec,
    tenant_requests: IntCounterVec,
    rejected: IntCounterVec,
    pub in_flight: IntGauge,
    table_seq: IntGauge,
    table_age_ms: IntGauge,
    table_tenants: IntGauge,
    store_reachable: IntGauge,
    tenant_labels: Mutex<HashSet<TenantId>>,
    cap: usize,
}

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
        let gauge =
            |name: &str, help: &str| IntGauge::new(name, help).expect("static metric definition");
        let in_flight = gauge("ficus_in_flight_requests", "Requests being served now");
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
            in_flight,
            table_seq,
            table_age_ms,
            table_tenants,
            store_reachable,
            tenant_labels: Mutex::new(HashSet::new()),
            cap,
        }
    }

    pub fn observe(
        &self,
        backend: Option<Backend>,
        stage: &str,
        status: u16,
        elapsed: Duration,
        tenant: Option<&TenantId>,
    ) {
        let backend = backend.map_or("none", Backend::as_str);
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "none",
        };
        self.requests
            .with_label_values(&[backend, stage, class])
            .inc();
        self.latency
            .with_label_values(&[backend, stage])
            .observe(elapsed.as_secs_f64());
        if let Some(t) = tenant {
            let label = self.tenant_label(t);
            self.tenant_requests
                .with_label_values(&[label.as_str(), backend])
                .inc();
        }
    }

    pub fn upstream_error(&self, backend: Backend, kind: &str) {
        self.upstream_errors
            .with_label_values(&[backend.as_str(), kind])
            .inc();
    }

    pub fn rejected(&self, reason: &str) {
        self.rejected.with_label_values(&[reason]).inc();
    }

    fn tenant_label(&self, tenant: &TenantId) -> String {
        let mut labels = self.tenant_labels.lock().unwrap_or_else(|p| p.into_inner());
        if labels.contains(tenant) {
            return tenant.to_string();
        }
        if labels.len() < self.cap {
            labels.insert(tenant.clone());
            return tenant.to_string();
        }
        "other".to_string()
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
    counts: Mutex<HashMap<Option<TenantId>, (u64, Timestamp)>>,
}

impl LegacyTraffic {
    pub fn record(&self, tenant: Option<&TenantId>, at: Timestamp) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let entry = counts.entry(tenant.cloned()).or_insert((0, at));
        entry.0 += 1;
        entry.1 = entry.1.max(at);
    }

    /// Takes everything counted so far.
    pub fn take(&self) -> Vec<TrafficCount> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts
            .drain()
            .map(|(tenant, (requests, last_at))| TrafficCount {
                tenant,
                requests,
                last_at,
            })
            .collect()
    }

    /// Puts back counts whose flush failed, so the next flush carries them.
    pub fn restore(&self, counts: Vec<TrafficCount>) {
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        for c in counts {
            let entry = map.entry(c.tenant).or_insert((0, c.last_at));
            entry.0 += c.requests;
            entry.1 = entry.1.max(c.last_at);
        }
    }
}
