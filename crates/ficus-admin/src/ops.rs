//! The control plane's operations, once: the CLI calls them directly on a store,
//! the HTTP API calls them for its callers, and the CLI's `--api` mode calls the
//! API. Each validates its input with the domain's rules, reads and writes the
//! store, and answers with the documented JSON shapes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use ficus_core::config::TenantConfig;
use ficus_core::readiness::{EndpointEvidence, LatencyEvidence, Readiness, judge};
use ficus_core::reconcile::{
    ClassEvidence, ClassIndex, ClassState, MismatchClass, given_version, index, tally, tally_in,
};
use ficus_core::{
    Actor, Blocker, Domain, Route, RouteStages, Stage, TenantId, Timestamp, Transition,
    tenant::parse_name,
};
use ficus_store::{
    AuditQuery, ClassChange, ComparisonCount, ConfigChange, ControlStore, JobState, NewTenant,
    RouteChange, RouteCount, StageChange, StoreError,
};
use serde::{Deserialize, Serialize};

use crate::api::{
    AddRequest, ClassChangeRequest, ClassEnvelope, ClassEventJson, ClassJson, ClassesJson,
    ComparisonsJson, ConfigHistoryJson, ConfigJson, ConfigRequest, CriterionJson, EventJson,
    EventsJson, GateJson, GateRequest, HeldRouteJson, JobJson, JobsJson, LegacyTrafficJson,
    MismatchJson, MismatchesJson, PromoteRequest, ReadinessAllJson, ReadinessJson, RestoreRequest,
    RetireJson, RetireRequest, RollbackRequest, RouteCountJson, RouteJson, RouteMarkRequest,
    RouteOverrideJson, RouteReleaseRequest, RouteStageJson, RouteStageRequest, RoutesJson,
    ShowJson, StageRequest, StatusJson, TenantEnvelope, TenantJson, TenantsJson, VersionJson,
    WriteDefaultRequest, retire_version,
};
use crate::config;
use crate::gate::{self, Gate};
use crate::provision::{self, Hooks};
use crate::{Error, Result};

/// Per-call changes to the stored gate, for exploring "what if" with `ficus
/// readiness`; promotion always judges with the stored gate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_comparisons: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_mismatches: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_per_endpoint: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f64>,
    /// Judge only the evidence recorded on this version of new; `current` is the
    /// version of the newest evidence. Promotion judges every version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// Which audit events to read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditFilter {
    pub tenant: Option<TenantId>,
    pub since: Option<Timestamp>,
    /// Only events before this time.
    pub until: Option<Timestamp>,
    /// Only events of this actor (`guard`, `cli`, `token:NAME`, …).
    pub actor: Option<String>,
    /// Only events that moved a tenant to this stage.
    pub to: Option<Stage>,
    pub limit: Option<u64>,
}

/// The control plane, reached directly through a store or remotely through the API.
#[async_trait]
pub trait Control: Send + Sync {
    /// Where the control plane is, for messages.
    fn location(&self) -> String;
    async fn tenants(&self, stage: Option<Stage>) -> Result<TenantsJson>;
    async fn show(&self, id: &TenantId, events: u64) -> Result<ShowJson>;
    async fn add(&self, request: AddRequest) -> Result<TenantEnvelope>;
    /// Low level: checks the stage machine, not readiness. `if_version` makes it a
    /// compare-and-set.
    async fn stage(
        &self,
        id: &TenantId,
        request: StageRequest,
        if_version: Option<u64>,
    ) -> Result<TenantEnvelope>;
    /// One stage forward; shadow → migrated only through the readiness gate.
    async fn promote(
        &self,
        id: &TenantId,
        request: PromoteRequest,
        if_version: Option<u64>,
    ) -> Result<TenantEnvelope>;
    /// One stage back, or to `request.to`.
    async fn rollback(
        &self,
        id: &TenantId,
        request: RollbackRequest,
        if_version: Option<u64>,
    ) -> Result<TenantEnvelope>;
    async fn readiness(&self, id: &TenantId, overrides: &GateOverrides) -> Result<ReadinessJson>;
    /// Every tenant in shadow, most ready first.
    async fn readiness_all(&self, overrides: &GateOverrides) -> Result<ReadinessAllJson>;
    async fn mismatches(
        &self,
        id: &TenantId,
        endpoint: Option<&str>,
        limit: u64,
    ) -> Result<MismatchesJson>;
    /// Mismatch classes with their counts over the gate's window: one tenant's
    /// evidence, or every tenant's; `state` keeps open, resolved or accepted ones.
    async fn mismatch_classes(
        &self,
        tenant: Option<&TenantId>,
        state: Option<&str>,
    ) -> Result<ClassesJson>;
    /// Routes: their stages, overrides, destructive marks and census over the
    /// gate's window (one tenant's, or everyone's).
    async fn routes(&self, tenant: Option<&TenantId>) -> Result<RoutesJson>;
    /// Sets a route's stage, low level; `if_version` makes it a compare-and-set.
    async fn route_stage(
        &self,
        request: RouteStageRequest,
        if_version: Option<u64>,
    ) -> Result<RouteStageJson>;
    /// Releases a held write route for every tenant or one; a destructive one
    /// only with `destructive`.
    async fn release_route(&self, request: RouteReleaseRequest) -> Result<RouteStageJson>;
    /// Holds a write route on legacy again, for every tenant or one.
    async fn hold_route(&self, request: RouteReleaseRequest) -> Result<RouteStageJson>;
    /// Marks a route destructive, or not.
    async fn mark_route(&self, request: RouteMarkRequest) -> Result<RouteJson>;
    /// Whether write routes nobody staged are held on legacy (the default) or
    /// follow their tenant's stage.
    async fn write_default(&self, request: WriteDefaultRequest) -> Result<RoutesJson>;
    /// One class (by id or a unique prefix) with its lifecycle history, its
    /// counts over every tenant's evidence in the gate's window.
    async fn mismatch_class(&self, id: &str) -> Result<ClassEnvelope>;
    /// Resolves, accepts or reopens the class `id` (or a unique prefix of it):
    /// `action` is `resolve`, `accept` or `reopen`.
    async fn change_class(
        &self,
        id: &str,
        action: &str,
        request: ClassChangeRequest,
    ) -> Result<ClassEnvelope>;
    async fn audit(&self, filter: AuditFilter) -> Result<EventsJson>;
    async fn status(&self) -> Result<StatusJson>;
    /// Retires legacy (or undoes it). `if_version` is the status `version` the
    /// caller saw.
    async fn retire(&self, request: RetireRequest, if_version: Option<&str>) -> Result<RetireJson>;
    async fn gate(&self) -> Result<GateJson>;
    async fn set_gate(&self, request: GateRequest) -> Result<GateJson>;
    /// A tenant's configuration: the latest, or `version`.
    async fn config(&self, id: &TenantId, version: Option<u64>) -> Result<ConfigJson>;
    /// Writes the next version; `if_version` makes it a compare-and-set.
    async fn set_config(
        &self,
        id: &TenantId,
        request: ConfigRequest,
        if_version: Option<u64>,
    ) -> Result<ConfigJson>;
    async fn config_history(&self, id: &TenantId) -> Result<ConfigHistoryJson>;
    /// Makes an earlier version's document the next version.
    async fn restore_config(
        &self,
        id: &TenantId,
        request: RestoreRequest,
        if_version: Option<u64>,
    ) -> Result<ConfigJson>;
    /// Provisioning jobs, oldest first (`state`: pending, done or failed).
    async fn jobs(&self, state: Option<&str>) -> Result<JobsJson>;
    async fn job(&self, event: &str) -> Result<JobJson>;
    /// Runs a pending job's remaining steps now.
    async fn retry_job(&self, event: &str) -> Result<JobJson>;
}

/// The control plane on a store this process opened.
pub struct Direct {
    store: Arc<dyn ControlStore>,
    actor: Actor,
    hooks: Hooks,
}

impl Direct {
    /// Operations on `store`, recorded in the audit log as done by `actor`.
    pub fn new(store: Arc<dyn ControlStore>, actor: Actor) -> Direct {
        Direct {
            store,
            actor,
            hooks: Hooks::from_env(),
        }
    }

    /// The same, with the provisioning pipeline's secret and database given
    /// rather than read from the environment.
    pub fn with_hooks(store: Arc<dyn ControlStore>, actor: Actor, hooks: Hooks) -> Direct {
        Direct {
            store,
            actor,
            hooks,
        }
    }

    pub fn store(&self) -> &Arc<dyn ControlStore> {
        &self.store
    }

    async fn existing(&self, id: &TenantId) -> Result<ficus_core::Tenant> {
        self.store
            .tenant(id)
            .await?
            .ok_or_else(|| StoreError::UnknownTenant(id.clone()).into())
    }

    async fn change(&self, change: StageChange) -> Result<TenantEnvelope> {
        let tenant = self.store.change_stage(change).await?;
        Ok(TenantEnvelope {
            tenant: TenantJson::from(&tenant),
        })
    }

    /// Judges one tenant's evidence with `gate`: all of it, or with `version`
    /// (`current` or a version) only what one version of new answered.
    async fn judge(&self, id: &TenantId, gate: &Gate, version: Option<&str>) -> Result<Judged> {
        let since = ago(gate.window);
        let stats = self.store.comparison_stats(id, since).await?;
        let classes = self.store.mismatch_classes(None).await?;
        let class_evidence = self.store.class_evidence(Some(id), since).await?;
        let latency = self.store.latencies(id, since).await?;
        let stages = self.stages().await?;
        let census = self.store.route_census(Some(id), since).await?;
        judged(
            id,
            gate,
            version,
            Evidence {
                stats: &stats,
                classes: &index(&classes),
                class_evidence: &class_evidence,
                latency: &latency,
                stages: &stages,
                census: &census,
            },
        )
    }

    /// Every route stage as the proxies route by them.
    async fn stages(&self) -> Result<RouteStages> {
        let rows = self.store.route_stages().await?;
        Ok(stages_of(&rows, self.store.write_default().await?))
    }

    /// Write routes that still go to legacy: those seen in the census over
    /// `window` or given a stage, held for every tenant (`None`) or for some.
    async fn held_routes(&self, window: Duration) -> Result<Vec<(String, Option<Vec<String>>)>> {
        let rows = self.store.route_stages().await?;
        let census = self.store.route_census(None, ago(window)).await?;
        let write_default = self.store.write_default().await?;
        let mut routes: Vec<String> = rows
            .iter()
            .map(|r| r.route.clone())
            // Requests of no known tenant (bots probing paths) hold nothing up.
            .chain(
                census
                    .iter()
                    .filter(|c| c.tenant.is_some())
                    .map(|c| c.route.clone()),
            )
            .filter(|r| route_writes(r))
            .collect();
        routes.sort();
        routes.dedup();
        let mut held = Vec::new();
        for route in routes {
            let own = rows
                .iter()
                .find(|r| r.route == route && r.tenant.is_none())
                .map_or(write_default, |r| r.stage);
            let released: Vec<&ficus_store::RouteStage> = rows
                .iter()
                .filter(|r| r.route == route && r.tenant.is_some())
                .collect();
            if own < Stage::Migrated {
                held.push((route, None));
            } else {
                let mut tenants: Vec<String> = released
                    .iter()
                    .filter(|r| r.stage < Stage::Migrated)
                    .filter_map(|r| r.tenant.as_ref().map(ToString::to_string))
                    .collect();
                if !tenants.is_empty() {
                    tenants.sort();
                    held.push((route, Some(tenants)));
                }
            }
        }
        Ok(held)
    }

    /// A route as a caller names it, refused with the reason when it is not
    /// `METHOD /template`.
    fn parse_route(raw: &str) -> Result<Route> {
        let route = Route::parse(raw).map_err(|e| Error::Invalid(e.to_string()))?;
        // The proxy names a request's route by its own method: a stage or a
        // mark on `*` would never apply to anything.
        if route.method() == "*" {
            return Err(Error::Invalid(format!(
                "route {route}: a stage or a mark names one method (such as POST); * only maps routes to a service in the proxy's configuration"
            )));
        }
        Ok(route)
    }

    /// The class `raw` names: its full id or a unique prefix of four or more
    /// hex digits.
    async fn find_class(&self, raw: &str) -> Result<MismatchClass> {
        let raw = raw.trim().to_ascii_lowercase();
        if raw.len() < 4 || !raw.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::Invalid(format!(
                "{raw:?} is not a class id: give its 16 hex digits, or at least the first 4"
            )));
        }
        let classes = self.store.mismatch_classes(None).await?;
        let found: Vec<&MismatchClass> =
            classes.iter().filter(|c| c.id.starts_with(&raw)).collect();
        match found.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(StoreError::UnknownClass(raw).into()),
            many => Err(Error::Invalid(format!(
                "{raw} is the start of {} classes ({}); give more digits",
                many.len(),
                many.iter()
                    .map(|c| c.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    async fn gate_with(&self, overrides: &GateOverrides) -> Result<Gate> {
        gate::load(&*self.store).await?.with(overrides)
    }
}

/// What one tenant is judged on, read once (for one tenant) or in bulk (for
/// every tenant in shadow).
struct Evidence<'a> {
    stats: &'a [ComparisonCount],
    classes: &'a ClassIndex<'a>,
    class_evidence: &'a [ClassEvidence],
    latency: &'a LatencyEvidence,
    stages: &'a RouteStages,
    census: &'a [RouteCount],
}

/// Judges one tenant on its evidence: no IO, so the single-tenant and the bulk
/// paths give the same verdict by construction.
fn judged(id: &TenantId, gate: &Gate, version: Option<&str>, ev: Evidence<'_>) -> Result<Judged> {
    // One order whatever the store's collation sorted by, so that the bulk
    // and the single-tenant paths list endpoints and versions alike.
    let mut sorted: Vec<&ComparisonCount> = ev.stats.iter().collect();
    sorted.sort_by(|a, b| (&a.endpoint, &a.version).cmp(&(&b.endpoint, &b.version)));
    let stats = &sorted;
    let mut versions: Vec<VersionJson> = Vec::new();
    let mut latest: Vec<(ficus_core::Timestamp, String)> = Vec::new();
    for c in stats {
        if c.compared == 0 && c.errors == 0 {
            continue;
        }
        match versions.iter_mut().find(|v| v.version == c.version) {
            Some(v) => {
                v.compared += c.compared;
                v.mismatched += c.mismatched;
            }
            None => versions.push(VersionJson {
                version: c.version.clone(),
                compared: c.compared,
                mismatched: c.mismatched,
                last_at: String::new(),
            }),
        }
        latest.push((c.last_at, c.version.clone()));
    }
    latest.sort();
    for v in &mut versions {
        if let Some((at, _)) = latest.iter().rev().find(|(_, name)| *name == v.version) {
            v.last_at = ficus_store::format_time(*at);
        }
    }
    versions.sort_by(|a, b| b.last_at.cmp(&a.last_at));
    let version = match version {
            None => None,
            Some("current") => Some(
                latest
                    .iter()
                    .rev()
                    .map(|(_, v)| v)
                    .find(|v| !v.is_empty())
                    .cloned()
                    .ok_or_else(|| {
                        Error::Invalid(format!(
                            "no version of new is recorded for tenant {id} in the last {}; set [shadow] version_header or backends.new.version in the proxy's configuration",
                            humantime::format_duration(gate.window)
                        ))
                    })?,
            ),
            Some(v) => Some(v.to_string()),
        };
    // Requests are counted before any answer, without a version: an
    // endpoint's use is every version's, its comparisons only the judged one's.
    let mut evidence: Vec<EndpointEvidence> = Vec::new();
    for c in stats {
        let counted = version.as_deref().is_none_or(|v| v == c.version);
        let e = match evidence.iter_mut().find(|e| e.endpoint == c.endpoint) {
            Some(e) => e,
            None => {
                evidence.push(EndpointEvidence {
                    endpoint: c.endpoint.clone(),
                    requests: 0,
                    compared: 0,
                    errors: 0,
                    raced: 0,
                });
                evidence.last_mut().expect("just pushed")
            }
        };
        // Raced reads are not judged, whichever version answered them.
        e.requests += c.requests;
        e.raced += c.raced;
        if counted {
            e.compared += c.compared;
            e.errors += c.errors;
        }
    }
    let tallies = tally_in(ev.classes, ev.class_evidence, version.as_deref());
    let mut held_routes: Vec<String> = ev
        .census
        .iter()
        .filter(|c| c.tenant.as_ref() == Some(id))
        .map(|c| c.route.clone())
        .filter(|r| route_writes(r) && ev.stages.stage(Some(id), r, true) < Stage::Migrated)
        .collect();
    held_routes.sort();
    held_routes.dedup();
    Ok(Judged {
        readiness: judge(&evidence, &tallies, ev.latency, &gate.thresholds),
        version,
        versions,
        held_routes,
    })
}

/// A verdict with what it was judged on.
struct Judged {
    readiness: Readiness,
    version: Option<String>,
    versions: Vec<VersionJson>,
    held_routes: Vec<String>,
}

fn readiness_json(id: &TenantId, j: &Judged) -> ReadinessJson {
    let r = &j.readiness;
    ReadinessJson {
        version: j.version.clone(),
        versions: j.versions.clone(),
        open_classes: r.blocking.iter().map(ClassJson::from_tally).collect(),
        held_routes: j.held_routes.clone(),
        additive: r.additive.iter().map(ClassJson::from_tally).collect(),
        tenant: id.to_string(),
        ready: r.is_ready(),
        score: (r.score * 100.0).round() / 100.0,
        criteria: r
            .criteria
            .iter()
            .map(|c| CriterionJson {
                name: c.name.to_string(),
                passed: c.passed,
                detail: c.detail.clone(),
            })
            .collect(),
        uncovered: r.uncovered.clone(),
    }
}

/// Parses a tenant id from a caller.
pub fn tenant_id(raw: &str) -> Result<TenantId> {
    TenantId::parse(raw).map_err(|e| Error::Invalid(e.to_string()))
}

/// Parses a stage name from a caller.
pub fn stage(raw: &str) -> Result<Stage> {
    Stage::parse(raw).map_err(|e| Error::Invalid(e.to_string()))
}

#[async_trait]
impl Control for Direct {
    fn location(&self) -> String {
        self.store.location().to_string()
    }

    async fn tenants(&self, stage: Option<Stage>) -> Result<TenantsJson> {
        let tenants = self.store.tenants(stage).await?;
        Ok(TenantsJson {
            tenants: tenants.iter().map(TenantJson::from).collect(),
        })
    }

    async fn show(&self, id: &TenantId, events: u64) -> Result<ShowJson> {
        let tenant = self.existing(id).await?;
        let audit = self
            .store
            .audit(AuditQuery {
                tenant: Some(id.clone()),
                limit: Some(events),
                ..AuditQuery::default()
            })
            .await?;
        let stats = self
            .store
            .comparison_stats(id, ago(Duration::from_secs(24 * 60 * 60)))
            .await?;
        let total = |f: fn(&ficus_store::ComparisonCount) -> u64| stats.iter().map(f).sum::<u64>();
        Ok(ShowJson {
            tenant: TenantJson::from(&tenant),
            audit: audit.iter().map(EventJson::from).collect(),
            comparisons: ComparisonsJson {
                window: "24h".to_string(),
                endpoints: stats.len() as u64,
                compared: total(|c| c.compared),
                matched: total(|c| c.matched),
                mismatched: total(|c| c.mismatched),
                noise_only: total(|c| c.noise_only),
                errors: total(|c| c.errors),
                shed: total(|c| c.shed),
                raced: total(|c| c.raced),
            },
        })
    }

    async fn add(&self, request: AddRequest) -> Result<TenantEnvelope> {
        let id = tenant_id(&request.id)?;
        let name = match &request.name {
            Some(n) => parse_name(n).map_err(|e| Error::Invalid(e.to_string()))?,
            None => id.to_string(),
        };
        let stage = stage(request.stage.as_deref().unwrap_or("legacy"))?;
        let domains = request
            .domains
            .iter()
            .map(|d| Domain::parse(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let tenant = self
            .store
            .add_tenant(
                NewTenant {
                    id,
                    name,
                    stage,
                    domains,
                },
                self.actor,
                &request.reason,
            )
            .await?;
        // The same pipeline as a billing event: configuration and tenant
        // database. A step that fails leaves the job pending (the resumer and
        // `ficus provision retry` finish it); the tenant is added either way.
        let job = provision::finish_manual(&self.store, &self.hooks, &tenant).await?;
        if let Some(e) = &job.last_error {
            tracing::warn!(tenant = %tenant.id, error = %e, "tenant added, a provisioning step is pending");
        }
        Ok(TenantEnvelope {
            tenant: TenantJson::from(&tenant),
        })
    }

    async fn stage(
        &self,
        id: &TenantId,
        request: StageRequest,
        if_version: Option<u64>,
    ) -> Result<TenantEnvelope> {
        let to = stage(&request.stage)?;
        self.change(StageChange {
            tenant: id.clone(),
            to,
            expected_version: if_version,
            actor: self.actor,
            reason: request.reason,
        })
        .await
    }

    async fn promote(
        &self,
        id: &TenantId,
        request: PromoteRequest,
        if_version: Option<u64>,
    ) -> Result<TenantEnvelope> {
        let current = self.existing(id).await?;
        if let Some(v) = if_version
            && v != current.version
        {
            // Let the store explain who moved it: a compare-and-set on the stale
            // version fails with the last change's actor, time and reason.
            return self
                .change(StageChange {
                    tenant: id.clone(),
                    to: current.stage,
                    expected_version: Some(v),
                    actor: self.actor,
                    reason: "promotion".to_string(),
                })
                .await;
        }
        let given = request.reason.trim().to_string();
        let (to, reason) = match current.stage {
            Stage::Legacy => (
                Stage::Shadow,
                if given.is_empty() {
                    "promoted to shadow: parallel run starts".to_string()
                } else {
                    format!("promoted to shadow: parallel run starts; {given}")
                },
            ),
            Stage::Shadow => {
                let gate = gate::load(&*self.store).await?;
                let r = self.judge(id, &gate, None).await?.readiness;
                if r.is_ready() {
                    (
                        Stage::Migrated,
                        if given.is_empty() {
                            "promoted: readiness passed".to_string()
                        } else {
                            format!("promoted: readiness passed; {given}")
                        },
                    )
                } else {
                    let failing: Vec<String> = r
                        .failing()
                        .iter()
                        .map(|c| format!("{} ({})", c.name, c.detail))
                        .collect();
                    if !request.force {
                        return Err(Error::Refused(format!(
                            "tenant {id} is not ready, nothing was changed: {}; force it with a reason to override",
                            failing.join("; ")
                        )));
                    }
                    if given.is_empty() {
                        return Err(Error::Invalid(
                            "forcing a promotion needs a reason: the audit log must say why the readiness gate was overridden".to_string(),
                        ));
                    }
                    (
                        Stage::Migrated,
                        format!(
                            "forced past the readiness gate: {given} (failing: {})",
                            failing.join("; ")
                        ),
                    )
                }
            }
            Stage::Migrated => {
                return Err(Error::Refused(format!(
                    "tenant {id} is migrated already; there is no stage after it"
                )));
            }
        };
        // Based on the version the decision was made on: if the tenant moved
        // meanwhile the promotion is refused rather than applied to a state nobody
        // judged.
        self.change(StageChange {
            tenant: id.clone(),
            to,
            expected_version: Some(current.version),
            actor: self.actor,
            reason,
        })
        .await
    }

    async fn rollback(
        &self,
        id: &TenantId,
        request: RollbackRequest,
        if_version: Option<u64>,
    ) -> Result<TenantEnvelope> {
        let current = self.existing(id).await?;
        let to = match request.to.as_deref() {
            Some(raw) => stage(raw)?,
            None => match current.stage {
                Stage::Migrated => Stage::Shadow,
                Stage::Shadow => Stage::Legacy,
                Stage::Legacy => {
                    return Err(Error::Refused(format!(
                        "tenant {id} is on legacy already; there is nothing to roll back"
                    )));
                }
            },
        };
        if Transition::between(current.stage, to) == Ok(Transition::Promote) {
            return Err(Error::Refused(format!(
                "a rollback only moves backward; {} → {to} for tenant {id} is a promotion",
                current.stage
            )));
        }
        // Based on the version the caller saw, or else the one just read: if
        // someone else moves the tenant meanwhile, the rollback is refused instead
        // of applied to a state the operator never saw.
        self.change(StageChange {
            tenant: id.clone(),
            to,
            expected_version: Some(if_version.unwrap_or(current.version)),
            actor: self.actor,
            reason: request.reason,
        })
        .await
    }

    async fn readiness(&self, id: &TenantId, overrides: &GateOverrides) -> Result<ReadinessJson> {
        self.existing(id).await?;
        let gate = self.gate_with(overrides).await?;
        let j = self.judge(id, &gate, overrides.version.as_deref()).await?;
        Ok(readiness_json(id, &j))
    }

    async fn readiness_all(&self, overrides: &GateOverrides) -> Result<ReadinessAllJson> {
        let gate = self.gate_with(overrides).await?;
        let since = ago(gate.window);
        // Every tenant's evidence in a handful of queries, then each judged in
        // memory: a query per tenant took seconds at ten thousand tenants.
        let shadow = self.store.tenants(Some(Stage::Shadow)).await?;
        let bulk = self.store.gate_evidence(since).await?;
        let classes = self.store.mismatch_classes(None).await?;
        let by_id = index(&classes);
        let stages = self.stages().await?;
        let census = self.store.route_census(None, since).await?;
        let mut stats: HashMap<TenantId, Vec<ComparisonCount>> = HashMap::new();
        for c in bulk.stats {
            stats.entry(c.tenant.clone()).or_default().push(c);
        }
        let mut class_evidence: HashMap<TenantId, Vec<ClassEvidence>> = HashMap::new();
        for (t, e) in bulk.classes {
            class_evidence.entry(t).or_default().push(e);
        }
        let latencies: HashMap<TenantId, LatencyEvidence> = bulk.latencies.into_iter().collect();
        let mut census_of: HashMap<TenantId, Vec<RouteCount>> = HashMap::new();
        for c in census {
            if let Some(t) = c.tenant.clone() {
                census_of.entry(t).or_default().push(c);
            }
        }
        let none = LatencyEvidence::default();
        let mut judged = Vec::new();
        for t in shadow {
            let j = self::judged(
                &t.id,
                &gate,
                overrides.version.as_deref(),
                Evidence {
                    stats: stats.get(&t.id).map_or(&[], Vec::as_slice),
                    classes: &by_id,
                    class_evidence: class_evidence.get(&t.id).map_or(&[], Vec::as_slice),
                    latency: latencies.get(&t.id).unwrap_or(&none),
                    stages: &stages,
                    census: census_of.get(&t.id).map_or(&[], Vec::as_slice),
                },
            )?;
            judged.push((t.id, j));
        }
        judged.sort_by(|a, b| {
            b.1.readiness
                .score
                .total_cmp(&a.1.readiness.score)
                .then_with(|| a.0.cmp(&b.0))
        });
        Ok(ReadinessAllJson {
            window: humantime::format_duration(gate.window).to_string(),
            tenants: judged.iter().map(|(id, r)| readiness_json(id, r)).collect(),
        })
    }

    async fn mismatches(
        &self,
        id: &TenantId,
        endpoint: Option<&str>,
        limit: u64,
    ) -> Result<MismatchesJson> {
        self.existing(id).await?;
        let samples = self.store.mismatch_samples(id, endpoint, limit).await?;
        let mut items = Vec::with_capacity(samples.len());
        for s in samples {
            let differences: serde_json::Value =
                serde_json::from_str(&s.differences).map_err(|e| {
                    Error::Store(StoreError::Corrupt(format!(
                        "a stored mismatch sample is not readable: {e}"
                    )))
                })?;
            items.push(MismatchJson {
                at: ficus_store::format_time(s.at),
                endpoint: s.endpoint,
                method: s.method,
                path: s.path,
                served_by: s.served_by,
                compared_with: s.compared_with,
                status: [s.served_status, s.compared_status],
                differences,
                version: s.version,
            });
        }
        Ok(MismatchesJson {
            tenant: id.to_string(),
            mismatches: items,
        })
    }

    async fn routes(&self, tenant: Option<&TenantId>) -> Result<RoutesJson> {
        if let Some(id) = tenant {
            self.existing(id).await?;
        }
        let gate = gate::load(&*self.store).await?;
        let rows = self.store.route_stages().await?;
        let marks = self.store.route_marks().await?;
        let stages = stages_of(&rows, self.store.write_default().await?);
        let census = self.store.route_census(tenant, ago(gate.window)).await?;
        let mut names: Vec<String> = rows
            .iter()
            .map(|r| r.route.clone())
            .chain(census.iter().map(|c| c.route.clone()))
            .chain(marks.iter().cloned())
            .collect();
        names.sort();
        names.dedup();
        let routes = names
            .into_iter()
            .map(|route| {
                let writes = route_writes(&route);
                let own = rows.iter().find(|r| r.route == route && r.tenant.is_none());
                let stage = own.map_or(ficus_core::routing::default_route_stage(writes), |r| {
                    r.stage
                });
                let overrides: Vec<RouteOverrideJson> = rows
                    .iter()
                    .filter(|r| r.route == route)
                    .filter_map(|r| {
                        Some(RouteOverrideJson {
                            tenant: r.tenant.as_ref()?.to_string(),
                            stage: r.stage.to_string(),
                            version: r.version,
                        })
                    })
                    .collect();
                let marked = marks.contains(&route);
                RouteJson {
                    writes,
                    destructive: marked || route.starts_with("DELETE "),
                    stage: stage.to_string(),
                    version: own.map_or(0, |r| r.version),
                    held: writes && stage < Stage::Migrated,
                    overrides,
                    census: census
                        .iter()
                        .filter(|c| c.route == route)
                        .map(|c| RouteCountJson {
                            tenant: c.tenant.as_ref().map(ToString::to_string),
                            backend: c.backend.clone(),
                            client: c.client.clone(),
                            requests: c.count,
                            last_at: ficus_store::format_time(c.last_at),
                            configured: c.configured,
                        })
                        .collect(),
                    unmapped: census
                        .iter()
                        .any(|c| c.route == route && c.backend != "legacy" && !c.configured),
                    route,
                }
            })
            .collect();
        Ok(RoutesJson {
            window: humantime::format_duration(gate.window).to_string(),
            writes_held_by_default: stages.default_for(true) == Stage::Legacy,
            routes,
        })
    }

    async fn route_stage(
        &self,
        request: RouteStageRequest,
        if_version: Option<u64>,
    ) -> Result<RouteStageJson> {
        let route = Direct::parse_route(&request.route)?;
        let to = stage(&request.stage)?;
        let tenant = request.tenant.as_deref().map(tenant_id).transpose()?;
        let marked = self.store.route_marks().await?.contains(&route.to_string());
        if to > Stage::Legacy && route.destructive(marked) && !request.destructive {
            return Err(Error::Refused(format!(
                "route {route} is destructive: moving it to {to} needs a second confirmation (--destructive); nothing was changed"
            )));
        }
        let done = self
            .store
            .change_route(RouteChange {
                route,
                tenant,
                to,
                expected_version: if_version,
                actor: self.actor,
                reason: request.reason,
            })
            .await?;
        Ok(route_stage_json(&done))
    }

    async fn release_route(&self, request: RouteReleaseRequest) -> Result<RouteStageJson> {
        let route = Direct::parse_route(&request.route)?;
        let tenant = request.tenant.as_deref().map(tenant_id).transpose()?;
        if let Some(t) = &tenant {
            self.existing(t).await?;
        }
        let scope = tenant
            .as_ref()
            .map(|t| format!(" for tenant {t}"))
            .unwrap_or_default();
        let now_at =
            self.stages()
                .await?
                .stage(tenant.as_ref(), &route.to_string(), route.writes());
        if !route.writes() || now_at == Stage::Migrated {
            return Err(Error::Refused(format!(
                "route {route} is not held{scope} (it goes where the tenant's stage says); nothing was changed"
            )));
        }
        let marked = self.store.route_marks().await?.contains(&route.to_string());
        if route.destructive(marked) && !request.destructive {
            return Err(Error::Refused(format!(
                "route {route} is destructive: releasing it{scope} needs a second confirmation (--destructive); release it for one canary tenant first with --tenant; nothing was changed"
            )));
        }
        let done = self
            .store
            .change_route(RouteChange {
                route,
                tenant,
                to: Stage::Migrated,
                expected_version: None,
                actor: self.actor,
                reason: request.reason,
            })
            .await?;
        Ok(route_stage_json(&done))
    }

    async fn hold_route(&self, request: RouteReleaseRequest) -> Result<RouteStageJson> {
        let route = Direct::parse_route(&request.route)?;
        let tenant = request.tenant.as_deref().map(tenant_id).transpose()?;
        let hold = |tenant: Option<TenantId>| RouteChange {
            route: route.clone(),
            tenant,
            to: Stage::Legacy,
            expected_version: None,
            actor: self.actor,
            reason: request.reason.clone(),
        };
        if tenant.is_some() {
            let done = self.store.change_route(hold(tenant)).await?;
            return Ok(route_stage_json(&done));
        }
        // Held for every tenant means every tenant: the canaries released on
        // their own are held again too, each with its audit entry.
        let name = route.to_string();
        let rows = self.store.route_stages().await?;
        let mut canaries = 0;
        for r in rows
            .iter()
            .filter(|r| r.route == name && r.tenant.is_some() && r.stage > Stage::Legacy)
        {
            self.store.change_route(hold(r.tenant.clone())).await?;
            canaries += 1;
        }
        match self.store.change_route(hold(None)).await {
            Ok(done) => Ok(route_stage_json(&done)),
            Err(StoreError::RouteAlready { .. }) if canaries > 0 => Ok(RouteStageJson {
                route: name.clone(),
                tenant: None,
                stage: Stage::Legacy.to_string(),
                version: rows
                    .iter()
                    .find(|r| r.route == name && r.tenant.is_none())
                    .map_or(0, |r| r.version),
            }),
            Err(e) => Err(e.into()),
        }
    }

    async fn write_default(&self, request: WriteDefaultRequest) -> Result<RoutesJson> {
        if request.reason.trim().is_empty() {
            return Err(StoreError::MissingReason.into());
        }
        let to = if request.held {
            Stage::Legacy
        } else {
            Stage::Migrated
        };
        self.store
            .set_write_default(to, self.actor, &request.reason)
            .await?;
        self.routes(None).await
    }

    async fn mark_route(&self, request: RouteMarkRequest) -> Result<RouteJson> {
        let route = Direct::parse_route(&request.route)?;
        if request.reason.trim().is_empty() {
            return Err(StoreError::MissingReason.into());
        }
        self.store
            .mark_route(&route, request.destructive, self.actor, &request.reason)
            .await?;
        let name = route.to_string();
        let found = self
            .routes(None)
            .await?
            .routes
            .into_iter()
            .find(|r| r.route == name);
        // Unmarked and never seen nor staged, the route is listed nowhere: it is
        // still answered, as the change committed.
        let stage = self.stages().await?.default_for(route.writes());
        Ok(found.unwrap_or_else(|| RouteJson {
            writes: route.writes(),
            destructive: route.destructive(false),
            stage: stage.to_string(),
            version: 0,
            held: route.writes() && stage < Stage::Migrated,
            unmapped: false,
            overrides: Vec::new(),
            census: Vec::new(),
            route: name,
        }))
    }

    async fn mismatch_classes(
        &self,
        tenant: Option<&TenantId>,
        state: Option<&str>,
    ) -> Result<ClassesJson> {
        if let Some(id) = tenant {
            self.existing(id).await?;
        }
        let state = state
            .map(|s| {
                ClassState::parse(s).ok_or_else(|| {
                    Error::Invalid(format!("state {s:?} is not open, resolved or accepted"))
                })
            })
            .transpose()?;
        let gate = gate::load(&*self.store).await?;
        let classes = self.store.mismatch_classes(None).await?;
        let evidence = self.store.class_evidence(tenant, ago(gate.window)).await?;
        let tallies = tally(&classes, &evidence, None);
        let mut out: Vec<ClassJson> = tallies
            .iter()
            .filter(|t| state.is_none_or(|s| t.class.state == s))
            .map(ClassJson::from_tally)
            .collect();
        if tenant.is_none() {
            // Every class, also those without evidence in the window.
            out.extend(
                classes
                    .iter()
                    .filter(|c| state.is_none_or(|s| c.state == s))
                    .filter(|c| !tallies.iter().any(|t| t.class.id == c.id))
                    .map(ClassJson::from_class),
            );
        }
        Ok(ClassesJson {
            tenant: tenant.map(ToString::to_string),
            window: humantime::format_duration(gate.window).to_string(),
            classes: out,
        })
    }

    async fn mismatch_class(&self, id: &str) -> Result<ClassEnvelope> {
        let class = self.find_class(id).await?;
        let gate = gate::load(&*self.store).await?;
        let evidence = self.store.class_evidence(None, ago(gate.window)).await?;
        let json = tally(std::slice::from_ref(&class), &evidence, None)
            .first()
            .map_or_else(|| ClassJson::from_class(&class), ClassJson::from_tally);
        let history = self.store.class_history(&class.id).await?;
        Ok(ClassEnvelope {
            class: json,
            history: history.iter().map(ClassEventJson::from).collect(),
        })
    }

    async fn change_class(
        &self,
        id: &str,
        action: &str,
        request: ClassChangeRequest,
    ) -> Result<ClassEnvelope> {
        let to = match action {
            "resolve" => ClassState::Resolved,
            "accept" => ClassState::Accepted,
            "reopen" => ClassState::Open,
            other => {
                return Err(Error::Invalid(format!(
                    "{other:?} is not resolve, accept or reopen"
                )));
            }
        };
        let class = self.find_class(id).await?;
        if request.reason.trim().is_empty() {
            return Err(StoreError::MissingReason.into());
        }
        if to == ClassState::Accepted && class.path == "$" && !request.whole_endpoint {
            return Err(Error::Refused(format!(
                "accepting class {} ({} {} {}) would hide every body difference of {}; nothing was changed; pass --whole-endpoint (API: whole_endpoint) if that is what you mean",
                class.id, class.endpoint, class.path, class.kind, class.endpoint
            )));
        }
        let fixed_in = match &request.fixed_in {
            Some(_) if to != ClassState::Resolved => {
                return Err(Error::Invalid(
                    "fixed_in names the version that fixed a class; it goes with resolve only"
                        .to_string(),
                ));
            }
            Some(v) => match given_version(v) {
                Some(label) => Some(label),
                None => {
                    return Err(Error::Invalid(format!(
                        "fixed_in must be at most {} printable characters",
                        ficus_core::reconcile::VERSION_MAX
                    )));
                }
            },
            None => None,
        };
        let changed = self
            .store
            .change_class(ClassChange {
                id: class.id.clone(),
                to,
                actor: self.actor,
                reason: request.reason,
                fixed_in,
            })
            .await?;
        let history = self.store.class_history(&changed.id).await?;
        Ok(ClassEnvelope {
            class: ClassJson::from_class(&changed),
            history: history.iter().map(ClassEventJson::from).collect(),
        })
    }

    async fn audit(&self, filter: AuditFilter) -> Result<EventsJson> {
        if let Some(id) = &filter.tenant {
            self.existing(id).await?;
        }
        let events = self
            .store
            .audit(AuditQuery {
                tenant: filter.tenant,
                since: filter.since,
                until: filter.until,
                actor: filter.actor,
                to: filter.to,
                limit: filter.limit,
            })
            .await?;
        Ok(EventsJson {
            events: events.iter().map(EventJson::from).collect(),
        })
    }

    async fn status(&self) -> Result<StatusJson> {
        let gate = gate::load(&*self.store).await?;
        let progress = self.store.progress().await?;
        let mut blockers = progress.blockers(now(), gate.quiet_window.as_millis() as i64);
        let held = self.held_routes(gate.quiet_window.max(gate.window)).await?;
        blockers.extend(held.iter().map(|(route, tenants)| Blocker::HeldRoute {
            route: route.clone(),
            tenants: tenants.as_ref().map(|t| t.len() as u64),
        }));
        let retired = self.store.legacy_retired().await?;
        let day = self
            .store
            .legacy_traffic(ago(Duration::from_secs(24 * 60 * 60)))
            .await?;
        let hour = self
            .store
            .legacy_traffic(ago(Duration::from_secs(60 * 60)))
            .await?;
        let mut status = StatusJson::new(
            self.store.location(),
            &progress,
            &blockers,
            humantime::format_duration(gate.quiet_window).to_string(),
            retired,
            LegacyTrafficJson::new(&day, &hour),
        );
        status.held_routes = held
            .into_iter()
            .map(|(route, tenants)| HeldRouteJson { route, tenants })
            .collect();
        Ok(status)
    }

    async fn retire(&self, request: RetireRequest, if_version: Option<&str>) -> Result<RetireJson> {
        let retired = self.store.legacy_retired().await?;
        if let Some(v) = if_version
            && v != retire_version(retired)
        {
            return Err(Error::PreconditionFailed(format!(
                "legacy changed since version {v:?}: it is now {:?}; nothing was changed",
                retire_version(retired)
            )));
        }
        if request.undo {
            let changed = self
                .store
                .set_legacy_retired(false, self.actor, &request.reason)
                .await?;
            return Ok(RetireJson {
                legacy_retired: false,
                changed,
            });
        }
        let mut gate = gate::load(&*self.store).await?;
        let mut reason = request.reason.clone();
        if let Some(raw) = &request.quiet_window {
            gate.quiet_window = gate::span(raw, "quiet_window")?;
            reason = format!(
                "{reason} (quiet window {} for this retirement)",
                humantime::format_duration(gate.quiet_window)
            );
        }
        let progress = self.store.progress().await?;
        let mut blockers = progress.blockers(now(), gate.quiet_window.as_millis() as i64);
        // A held write route still sends writes to legacy: retiring it would
        // send them to new without anyone releasing them.
        for (route, tenants) in self.held_routes(gate.quiet_window.max(gate.window)).await? {
            blockers.push(Blocker::HeldRoute {
                route,
                tenants: tenants.map(|t| t.len() as u64),
            });
        }
        if !blockers.is_empty() {
            let listed: Vec<String> = blockers.iter().map(ToString::to_string).collect();
            return Err(Error::Refused(format!(
                "legacy cannot be retired yet, nothing was changed: {}",
                listed.join("; ")
            )));
        }
        let changed = self
            .store
            .set_legacy_retired(true, self.actor, &reason)
            .await?;
        Ok(RetireJson {
            legacy_retired: true,
            changed,
        })
    }

    async fn gate(&self) -> Result<GateJson> {
        Ok(gate::load(&*self.store).await?.to_json())
    }

    async fn config(&self, id: &TenantId, version: Option<u64>) -> Result<ConfigJson> {
        let tenant = self.existing(id).await?;
        match self.store.tenant_config(id, version).await? {
            Some(v) => Ok(ConfigJson::from_version(&v, stored_document(&v)?)),
            None if version.is_none_or(|v| v == 0) => {
                let initial = TenantConfig::initial(&tenant.name, &tenant.domains);
                Ok(ConfigJson {
                    tenant: id.to_string(),
                    version: 0,
                    config: config::to_json(&initial),
                    actor: None,
                    reason: None,
                    at: None,
                })
            }
            None => Err(Error::Invalid(format!(
                "tenant {id} has no configuration version {}",
                version.unwrap_or_default()
            ))),
        }
    }

    async fn set_config(
        &self,
        id: &TenantId,
        request: ConfigRequest,
        if_version: Option<u64>,
    ) -> Result<ConfigJson> {
        let parsed = config::parse(&request.config).map_err(|e| {
            Error::Invalid(if e.field == "(document)" {
                format!("config: {}", e.why)
            } else {
                format!("config.{e}")
            })
        })?;
        let expected = match if_version {
            Some(v) => v,
            None => self.config(id, None).await?.version,
        };
        let document = config::to_json(&parsed);
        let written = self
            .store
            .set_tenant_config(ConfigChange {
                tenant: id.clone(),
                document: document.to_string(),
                domains: parsed.domains.clone(),
                expected_version: expected,
                actor: self.actor,
                reason: request.reason,
            })
            .await?;
        Ok(ConfigJson::from_version(&written, document))
    }

    async fn config_history(&self, id: &TenantId) -> Result<ConfigHistoryJson> {
        self.existing(id).await?;
        let versions = self
            .store
            .tenant_config_history(id)
            .await?
            .iter()
            .map(|v| Ok(ConfigJson::from_version(v, stored_document(v)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(ConfigHistoryJson {
            tenant: id.to_string(),
            versions,
        })
    }

    async fn restore_config(
        &self,
        id: &TenantId,
        request: RestoreRequest,
        if_version: Option<u64>,
    ) -> Result<ConfigJson> {
        let old = self.config(id, Some(request.version)).await?;
        self.set_config(
            id,
            ConfigRequest {
                config: old.config,
                reason: format!("restore version {}: {}", request.version, request.reason),
            },
            if_version,
        )
        .await
    }

    async fn jobs(&self, state: Option<&str>) -> Result<JobsJson> {
        let state = state
            .map(|s| {
                JobState::parse(s).ok_or_else(|| {
                    Error::Invalid(format!("state {s:?} is not pending, done or failed"))
                })
            })
            .transpose()?;
        let jobs = self.store.provision_jobs(state, 1_000).await?;
        Ok(JobsJson {
            jobs: jobs.iter().map(JobJson::from).collect(),
        })
    }

    async fn job(&self, event: &str) -> Result<JobJson> {
        self.store
            .provision_job(event)
            .await?
            .map(|j| JobJson::from(&j))
            .ok_or_else(|| Error::Invalid(format!("no provisioning job for event {event:?}")))
    }

    async fn retry_job(&self, event: &str) -> Result<JobJson> {
        let job =
            self.store.provision_job(event).await?.ok_or_else(|| {
                Error::Invalid(format!("no provisioning job for event {event:?}"))
            })?;
        if job.state != JobState::Pending {
            return Err(Error::Refused(format!(
                "the job for event {event:?} is {}, not pending; nothing was run",
                job.state.as_str()
            )));
        }
        let job = provision::run(&self.store, &self.hooks, job).await?;
        Ok(JobJson::from(&job))
    }

    async fn set_gate(&self, request: GateRequest) -> Result<GateJson> {
        let gate = Gate::from_json(&request.gate)?;
        let json = gate.to_json();
        let text = serde_json::to_string(&json).map_err(|e| Error::Invalid(e.to_string()))?;
        self.store
            .set_setting(gate::KEY, &text, &text, self.actor, &request.reason)
            .await?;
        Ok(json)
    }
}

/// Route stages as the proxies route by them, from the store's rows.
fn stages_of(rows: &[ficus_store::RouteStage], write_default: Stage) -> RouteStages {
    let mut stages = RouteStages::default();
    stages.set_write_default(write_default);
    for r in rows {
        stages.set(&r.route, r.tenant.as_ref(), r.stage);
    }
    stages
}

/// Whether a route name (`POST /homes`) is of a method that may write.
fn route_writes(route: &str) -> bool {
    route
        .split_once(' ')
        .is_some_and(|(m, _)| !ficus_core::routing::is_safe_method(m))
}

fn route_stage_json(r: &ficus_store::RouteStage) -> RouteStageJson {
    RouteStageJson {
        route: r.route.clone(),
        tenant: r.tenant.as_ref().map(ToString::to_string),
        stage: r.stage.to_string(),
        version: r.version,
    }
}

pub(crate) fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp::from_unix_millis(d.as_millis() as i64)
}

pub(crate) fn ago(span: Duration) -> Timestamp {
    Timestamp::from_unix_millis(now().unix_millis() - span.as_millis() as i64)
}

/// A stored document, which this build wrote; unreadable means hand-edited.
fn stored_document(v: &ficus_store::ConfigVersion) -> Result<serde_json::Value> {
    serde_json::from_str(&v.document).map_err(|e| {
        Error::Store(StoreError::Corrupt(format!(
            "configuration {} of {}: {e}",
            v.version, v.tenant
        )))
    })
}
