//! The routing table: every tenant's stage and custom domains at one change-log
//! position, and the task that keeps it current.
//!
//! A table is immutable. The follower builds a new one for every change and swaps it
//! in whole (`ArcSwapOption`), so a request reads one consistent table from start to
//! finish and never sees a half-applied change. When the store is unreachable the
//! last table stays in place (fail static) and the follower retries; a full reload
//! follows every reconnection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use ficus_core::reconcile::ClassState;
use ficus_core::{Domain, RouteStages, Stage, Tenant, TenantId};
use ficus_diff::Kind;
use ficus_diff::class::{Accepted, ClassKey};
use ficus_store::{ConfigVersion, ControlStore, FeedEvent, OpenMode, StoreUrl};
use tokio::sync::watch;

use crate::FastMap;
use crate::served_config::{self, Served, ServedConfig};
use ficus_core::config::Platform;

#[derive(Debug, Clone)]
struct Entry {
    stage: Stage,
    domains: Vec<Arc<str>>,
    name: Arc<str>,
    suspended: bool,
    /// The tenant's id as the header value the proxy sends upstream, made
    /// once: cloning it is a reference count, making it per request was two
    /// allocations.
    header: Option<http::HeaderValue>,
}

impl Entry {
    fn known(&self) -> Known {
        Known {
            stage: self.stage,
            suspended: self.suspended,
            header: self.header.clone(),
        }
    }
}

/// What a request needs of a tenant the table knows, from one lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    pub stage: Stage,
    pub suspended: bool,
    /// The tenant's id as a header value (`None` only if it could not be one,
    /// which a valid tenant id always can).
    pub header: Option<http::HeaderValue>,
}

/// One immutable view of the control plane, as the proxy routes by it.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    pub seq: u64,
    pub legacy_retired: bool,
    tenants: FastMap<TenantId, Entry>,
    domains: FastMap<Arc<str>, TenantId>,
    /// Written configurations, rendered; a tenant without one is served its
    /// initial configuration, rendered on demand.
    configs: FastMap<TenantId, Arc<ServedConfig>>,
    /// When this table was built; for the snapshot-age metric.
    pub built_at: SystemTime,
    /// Mismatch classes accepted as intended: comparison rules every replica
    /// applies from the change that accepted them.
    pub accepted: Arc<Accepted>,
    /// Every route stage and per-tenant override.
    pub routes: Arc<RouteStages>,
}

impl RoutingTable {
    pub fn from_snapshot(seq: u64, legacy_retired: bool, tenants: Vec<Tenant>) -> RoutingTable {
        let mut table = RoutingTable {
            seq,
            legacy_retired,
            tenants: FastMap::with_capacity_and_hasher(tenants.len(), Default::default()),
            domains: FastMap::default(),
            configs: FastMap::default(),
            built_at: SystemTime::now(),
            accepted: Arc::new(Accepted::default()),
            routes: Arc::new(RouteStages::default()),
        };
        for t in tenants {
            table.upsert(t);
        }
        table
    }

    /// The tenant's stage, suspension and header value, if the table knows it.
    pub fn known(&self, tenant: &TenantId) -> Option<Known> {
        self.tenants.get(tenant).map(Entry::known)
    }

    /// The tenant named `raw`, if the table knows it: its id, shared with the
    /// table (no parse, no copy), and what [`RoutingTable::known`] gives.
    pub fn known_by_name(&self, raw: &str) -> Option<(TenantId, Known)> {
        self.tenants
            .get_key_value(raw)
            .map(|(id, e)| (id.clone(), e.known()))
    }

    /// What the tenant-config endpoint serves for a tenant and platform
    /// (`None`: unknown tenant).
    /// A written configuration is lent from the table (no copy on the hot
    /// path); an initial one is rendered.
    pub fn config(
        &self,
        tenant: &TenantId,
        platform: Option<Platform>,
    ) -> Option<std::borrow::Cow<'_, Served>> {
        if let Some(c) = self.configs.get(tenant) {
            return Some(std::borrow::Cow::Borrowed(c.get(platform)));
        }
        let e = self.tenants.get(tenant)?;
        let domains: Vec<Domain> = e
            .domains
            .iter()
            .filter_map(|d| Domain::parse(d).ok())
            .collect();
        Some(std::borrow::Cow::Owned(served_config::initial(
            tenant, &e.name, &domains, platform,
        )))
    }

    /// Sets (or, with `None`, forgets) a tenant's written configuration.
    pub fn set_config(&mut self, tenant: &TenantId, written: Option<&ConfigVersion>) {
        let served = written
            .filter(|_| self.tenants.contains_key(tenant))
            .and_then(|v| ServedConfig::build(tenant, v));
        match served {
            Some(c) => {
                self.configs.insert(tenant.clone(), Arc::new(c));
            }
            None => {
                self.configs.remove(tenant);
            }
        }
    }

    pub fn tenant_by_domain(&self, host: &str) -> Option<&TenantId> {
        self.domains.get(host)
    }

    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    fn upsert(&mut self, t: Tenant) {
        self.remove(&t.id);
        let domains: Vec<Arc<str>> = t.domains.iter().map(|d| Arc::from(d.as_str())).collect();
        for d in &domains {
            self.domains.insert(Arc::clone(d), t.id.clone());
        }
        let header = crate::shared_value(t.id.as_str().to_owned());
        self.tenants.insert(
            t.id,
            Entry {
                stage: t.stage,
                domains,
                name: Arc::from(t.name.as_str()),
                suspended: t.suspended,
                header,
            },
        );
    }

    fn remove(&mut self, id: &TenantId) {
        if let Some(old) = self.tenants.remove(id) {
            for d in old.domains {
                if self.domains.get(&d) == Some(id) {
                    self.domains.remove(&d);
                }
            }
        }
    }
}

/// What the admin listener reports about the store and the table.
#[derive(Debug, Default)]
pub struct StoreHealth {
    pub reachable: AtomicBool,
    /// Consecutive failed attempts since the store was last reachable.
    pub failures: AtomicU64,
}

/// Keeps `table` current until `shutdown` turns true, waking `loaded_signal`
/// each time a table is loaded. Opens the store itself,
/// retrying until it can, so a proxy started while the store is down still starts
/// (not ready) and becomes ready when the store appears.
pub async fn follow(
    url: StoreUrl,
    table: Arc<ArcSwapOption<RoutingTable>>,
    loaded_signal: Arc<tokio::sync::Notify>,
    health: Arc<StoreHealth>,
    store_slot: Arc<std::sync::OnceLock<Arc<dyn ControlStore>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut last_log: Option<Instant> = None;
    let mut note_failure = |error: &str, health: &StoreHealth| {
        health.reachable.store(false, Ordering::Relaxed);
        health.failures.fetch_add(1, Ordering::Relaxed);
        // Once a minute at most: an outage must not flood the log.
        if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            last_log = Some(Instant::now());
            tracing::warn!(
                error,
                "control store unreachable; serving with the last routing table"
            );
        }
    };
    let store: Arc<dyn ControlStore> = loop {
        match ficus_store::open(&url, OpenMode::Existing).await {
            Ok(s) => {
                // Shared with the request path, which writes through it rarely (the guard).
                let _ = store_slot.set(Arc::clone(&s));
                break s;
            }
            Err(e) => note_failure(&e.to_string(), &health),
        }
        if sleep_or_shutdown(backoff, &mut shutdown).await {
            return;
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    };
    'reload: loop {
        let snapshot = match store.snapshot().await {
            Ok(s) => s,
            Err(e) => {
                note_failure(&e.to_string(), &health);
                if sleep_or_shutdown(backoff, &mut shutdown).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue 'reload;
            }
        };
        backoff = Duration::from_millis(100);
        health.reachable.store(true, Ordering::Relaxed);
        health.failures.store(0, Ordering::Relaxed);
        let seq = snapshot.seq;
        let mut loaded =
            RoutingTable::from_snapshot(seq, snapshot.legacy_retired, snapshot.tenants);
        match store.latest_tenant_configs().await {
            Ok(configs) => {
                for c in &configs {
                    loaded.set_config(&c.tenant, Some(c));
                }
            }
            Err(e) => {
                note_failure(&e.to_string(), &health);
                continue 'reload;
            }
        }
        match load_routes(&*store).await {
            Ok(routes) => loaded.routes = Arc::new(routes),
            Err(e) => {
                note_failure(&e.to_string(), &health);
                if sleep_or_shutdown(backoff, &mut shutdown).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue 'reload;
            }
        }
        match store.mismatch_classes(Some(ClassState::Accepted)).await {
            Ok(classes) => {
                loaded.accepted = Arc::new(Accepted::new(classes.into_iter().filter_map(|c| {
                    Some(ClassKey {
                        kind: Kind::parse(&c.kind)?,
                        endpoint: c.endpoint,
                        path: c.path,
                    })
                })));
            }
            Err(e) => {
                note_failure(&e.to_string(), &health);
                if sleep_or_shutdown(backoff, &mut shutdown).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue 'reload;
            }
        }
        table.store(Some(Arc::new(loaded)));
        loaded_signal.notify_waiters();
        tracing::info!(seq, "routing table loaded");
        let mut feed = store.subscribe(Some(seq));
        loop {
            let event = tokio::select! {
                e = feed.recv() => e,
                _ = shutdown.changed() => return,
            };
            match event {
                None => continue 'reload,
                Some(FeedEvent::Lost { error }) => note_failure(&error, &health),
                // Anything may have changed meanwhile; start over from a snapshot.
                Some(FeedEvent::Restored) => continue 'reload,
                Some(FeedEvent::Changed(set)) if set.resync => continue 'reload,
                Some(FeedEvent::Changed(set)) => {
                    // Route stages are few: a change to any reloads them all.
                    let routes = if set.routes {
                        match load_routes(&*store).await {
                            Ok(r) => Some(Arc::new(r)),
                            Err(e) => {
                                note_failure(&e.to_string(), &health);
                                continue 'reload;
                            }
                        }
                    } else {
                        None
                    };
                    let ids: Vec<TenantId> = set.tenants.iter().cloned().collect();
                    match store.tenants_by_id(&ids).await {
                        Ok(changed) => {
                            health.reachable.store(true, Ordering::Relaxed);
                            let current = table.load_full();
                            let mut next = current
                                .as_deref()
                                .cloned()
                                .unwrap_or_else(|| RoutingTable::from_snapshot(0, false, vec![]));
                            for id in &ids {
                                next.remove(id);
                            }
                            for t in changed {
                                next.upsert(t);
                            }
                            // A change to a tenant may be a new configuration.
                            for id in &ids {
                                match store.tenant_config(id, None).await {
                                    Ok(c) => next.set_config(id, c.as_ref()),
                                    Err(e) => {
                                        note_failure(&e.to_string(), &health);
                                        continue 'reload;
                                    }
                                }
                            }
                            if let Some(r) = routes {
                                next.routes = r;
                            }
                            next.seq = set.seq;
                            next.built_at = SystemTime::now();
                            table.store(Some(Arc::new(next)));
                        }
                        Err(e) => {
                            note_failure(&e.to_string(), &health);
                            continue 'reload;
                        }
                    }
                }
            }
        }
    }
}

/// Every route stage from the store, as the request path reads them.
async fn load_routes(store: &dyn ControlStore) -> Result<RouteStages, ficus_store::StoreError> {
    let mut stages = RouteStages::default();
    stages.set_write_default(store.write_default().await?);
    for r in store.route_stages().await? {
        stages.set(&r.route, r.tenant.as_ref(), r.stage);
    }
    Ok(stages)
}

/// Sleeps, or returns `true` early when shutdown is signalled.
async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => *shutdown.borrow(),
        r = shutdown.changed() => r.is_err() || *shutdown.borrow(),
    }
}
