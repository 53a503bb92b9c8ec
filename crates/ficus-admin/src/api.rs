//! The JSON shapes of the control plane: what the HTTP API sends and receives and
//! what `ficus --json` prints (they are the same documents, described in
//! docs/cli-json.md and served as OpenAPI at `/v1/openapi.json`). Domain types stay
//! free of serde; these are built from them here, at the edge, so a change to the
//! domain cannot change the wire format by accident.

use ficus_core::{AuditEvent, Blocker, Progress, Stage, Tenant};
use ficus_store::{TrafficCount, format_time};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantJson {
    pub id: String,
    pub name: String,
    pub stage: String,
    pub version: u64,
    pub domains: Vec<String>,
    /// Present, and true, only for a suspended tenant.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspended: bool,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&Tenant> for TenantJson {
    fn from(t: &Tenant) -> TenantJson {
        TenantJson {
            id: t.id.to_string(),
            name: t.name.clone(),
            suspended: t.suspended,
            stage: t.stage.as_str().to_string(),
            version: t.version,
            domains: t.domains.iter().map(ToString::to_string).collect(),
            created_at: format_time(t.created_at),
            updated_at: format_time(t.updated_at),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventJson {
    pub seq: u64,
    pub at: String,
    pub tenant: String,
    pub from: Option<String>,
    pub to: String,
    pub version: u64,
    pub actor: String,
    pub reason: String,
}

impl From<&AuditEvent> for EventJson {
    fn from(e: &AuditEvent) -> EventJson {
        EventJson {
            seq: e.seq,
            at: format_time(e.at),
            tenant: e.tenant.to_string(),
            from: e.from.map(|s| s.as_str().to_string()),
            to: e.to.as_str().to_string(),
            version: e.version,
            actor: e.actor.as_str().to_string(),
            reason: e.reason.clone(),
        }
    }
}

/// `{"tenant": …}`: the answer to every call that returns one tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantEnvelope {
    pub tenant: TenantJson,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantsJson {
    pub tenants: Vec<TenantJson>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsJson {
    pub events: Vec<EventJson>,
}

/// A tenant's parallel run over the last day, summed over endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComparisonsJson {
    pub window: String,
    pub endpoints: u64,
    pub compared: u64,
    pub matched: u64,
    pub mismatched: u64,
    pub noise_only: u64,
    pub errors: u64,
    pub shed: u64,
    /// Compared while a write of the tenant was in flight: not judged, and
    /// not in `compared`.
    #[serde(default)]
    pub raced: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShowJson {
    pub tenant: TenantJson,
    pub audit: Vec<EventJson>,
    pub comparisons: ComparisonsJson,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CriterionJson {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadinessJson {
    pub tenant: String,
    pub ready: bool,
    pub score: f64,
    pub criteria: Vec<CriterionJson>,
    pub uncovered: Vec<String>,
    /// The version of new whose evidence alone was judged; `null`: every version.
    #[serde(default)]
    pub version: Option<String>,
    /// Evidence per version of new (`""`: not known), newest first.
    #[serde(default)]
    pub versions: Vec<VersionJson>,
    /// The classes whose mismatches counted, most first.
    #[serde(default)]
    pub open_classes: Vec<ClassJson>,
    /// Write routes the tenant called in the window that still go to legacy.
    #[serde(default)]
    pub held_routes: Vec<String>,
    /// Additive differences seen: shown, not counted.
    #[serde(default)]
    pub additive: Vec<ClassJson>,
}

/// Evidence recorded on one version of new.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionJson {
    pub version: String,
    pub compared: u64,
    pub mismatched: u64,
    pub last_at: String,
}

/// A mismatch class: what differs, where it stands, and how much of it counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassJson {
    pub id: String,
    pub endpoint: String,
    pub path: String,
    pub kind: String,
    /// `breaking` or `additive`.
    pub compat: String,
    /// `open`, `resolved` or `accepted`.
    pub state: String,
    /// Reopened by a mismatch recorded after it was resolved.
    pub regression: bool,
    /// Mismatches that count (for the tenant asked about, or every tenant).
    pub counted: u64,
    /// Mismatches set aside by a resolution, or of an accepted class.
    pub discounted: u64,
    /// First and last counted mismatch.
    pub first_at: Option<String>,
    pub last_at: Option<String>,
    /// Counted mismatches per version of new.
    pub versions: std::collections::BTreeMap<String, u64>,
    pub first_seen: String,
    pub last_seen: String,
    pub fixed_in: Option<String>,
    pub last_change: Option<ClassEventJson>,
    pub example: Option<ClassExampleJson>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassEventJson {
    pub at: String,
    pub action: String,
    pub actor: String,
    pub reason: String,
    pub version: Option<String>,
}

/// The latest mismatch of a class, redacted as the diff engine wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassExampleJson {
    pub at: String,
    pub request: String,
    pub version: Option<String>,
    pub difference: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassesJson {
    /// The tenant whose evidence is counted; `null`: every tenant.
    pub tenant: Option<String>,
    pub window: String,
    pub classes: Vec<ClassJson>,
}

/// One class with its lifecycle history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassEnvelope {
    pub class: ClassJson,
    pub history: Vec<ClassEventJson>,
}

/// Resolving, accepting or reopening a class.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassChangeRequest {
    pub reason: String,
    /// For a resolution: the version of new that fixed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed_in: Option<String>,
    /// For an acceptance of a whole-body class (`$`): yes, hide every body
    /// difference of the endpoint.
    #[serde(default)]
    pub whole_endpoint: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadinessAllJson {
    pub window: String,
    pub tenants: Vec<ReadinessJson>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MismatchJson {
    pub at: String,
    pub endpoint: String,
    pub method: String,
    pub path: String,
    pub served_by: String,
    pub compared_with: String,
    /// The served and the compared status.
    pub status: [u16; 2],
    /// The diff engine's differences, as it writes them: `left` is legacy's
    /// answer and `right` new's, whichever served.
    pub differences: serde_json::Value,
    /// The version of new that answered, when known.
    #[serde(default)]
    pub version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MismatchesJson {
    pub tenant: String,
    pub mismatches: Vec<MismatchJson>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetireJson {
    pub legacy_retired: bool,
    pub changed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusJson {
    pub store: String,
    /// The version a retirement must name in `If-Match`: `legacy:active` or
    /// `legacy:retired`.
    pub version: String,
    pub tenants: u64,
    pub stages: StagesJson,
    pub percent_migrated: f64,
    pub legacy_retired: bool,
    pub legacy_traffic: LegacyTrafficJson,
    pub finish_line: FinishLineJson,
    /// Write routes still on legacy, for every tenant or some (tenant ids).
    #[serde(default)]
    pub held_routes: Vec<HeldRouteJson>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldRouteJson {
    pub route: String,
    /// `null`: held for every tenant without a release of its own; else the
    /// tenants it is held for.
    pub tenants: Option<Vec<String>>,
}

/// Requests routed to legacy, served or shadow, as proxies reported them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LegacyTrafficJson {
    pub last_hour: u64,
    pub last_day: u64,
    /// Per tenant, most requests in the last day first; `tenant` is null for
    /// requests whose tenant was unknown.
    pub tenants: Vec<TenantTrafficJson>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantTrafficJson {
    pub tenant: Option<String>,
    pub last_hour: u64,
    pub last_day: u64,
    pub last_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagesJson {
    pub legacy: u64,
    pub shadow: u64,
    pub migrated: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinishLineJson {
    pub reached: bool,
    pub quiet_window: String,
    pub blockers: Vec<String>,
}

/// A time as the API prints it (`format_time`) or a person types it: RFC 3339,
/// with or without `T`, `Z` and fractional seconds, always UTC.
pub fn parse_time(raw: &str) -> Option<ficus_core::Timestamp> {
    humantime::parse_rfc3339_weak(raw)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| ficus_core::Timestamp::from_unix_millis(d.as_millis() as i64))
}

/// The retirement version for a flag value.
pub fn retire_version(retired: bool) -> &'static str {
    if retired {
        "legacy:retired"
    } else {
        "legacy:active"
    }
}

impl StatusJson {
    pub fn new(
        store: &str,
        p: &Progress,
        blockers: &[Blocker],
        quiet_window: String,
        legacy_retired: bool,
        legacy_traffic: LegacyTrafficJson,
    ) -> StatusJson {
        StatusJson {
            store: store.to_string(),
            version: retire_version(legacy_retired).to_string(),
            tenants: p.total(),
            stages: StagesJson {
                legacy: p.of(Stage::Legacy),
                shadow: p.of(Stage::Shadow),
                migrated: p.of(Stage::Migrated),
            },
            percent_migrated: (p.percent_migrated() * 10.0).round() / 10.0,
            legacy_retired,
            legacy_traffic,
            finish_line: FinishLineJson {
                reached: blockers.is_empty(),
                quiet_window,
                blockers: blockers.iter().map(ToString::to_string).collect(),
            },
            held_routes: Vec::new(),
        }
    }
}

impl LegacyTrafficJson {
    /// Joins the last day's and the last hour's per-tenant counts.
    pub fn new(day: &[TrafficCount], hour: &[TrafficCount]) -> LegacyTrafficJson {
        let mut tenants: Vec<TenantTrafficJson> = day
            .iter()
            .map(|d| TenantTrafficJson {
                tenant: d.tenant.as_ref().map(ToString::to_string),
                last_day: d.requests,
                last_hour: hour
                    .iter()
                    .find(|h| h.tenant == d.tenant)
                    .map_or(0, |h| h.requests),
                last_at: format_time(d.last_at),
            })
            .collect();
        tenants.sort_by(|a, b| {
            b.last_day
                .cmp(&a.last_day)
                .then_with(|| a.tenant.cmp(&b.tenant))
        });
        LegacyTrafficJson {
            last_hour: hour.iter().map(|h| h.requests).sum(),
            last_day: day.iter().map(|d| d.requests).sum(),
            tenants,
        }
    }
}

/// The readiness gate's settings, kept in the control store so that the CLI, the
/// API and every operator judge with the same thresholds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateJson {
    /// The evidence window, as an age such as `24h`.
    pub window: String,
    pub min_comparisons: u64,
    pub max_mismatches: u64,
    pub min_per_endpoint: u64,
    pub max_error_rate: f64,
    pub max_latency_ratio: f64,
    pub latency_slack_ms: u64,
    /// How long legacy must be idle before it may be retired.
    pub quiet_window: String,
}

/// An error as the API answers it: `{"error": "…"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorJson {
    pub error: String,
}

/// `POST /v1/tenants`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddRequest {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub domains: Vec<String>,
    #[serde(default)]
    pub stage: Option<String>,
    pub reason: String,
}

/// `PUT /v1/tenants/{id}/stage`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageRequest {
    pub stage: String,
    pub reason: String,
}

/// `POST /v1/tenants/{id}/promote`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    pub reason: String,
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/tenants/{id}/rollback`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    pub reason: String,
    #[serde(default)]
    pub to: Option<String>,
}

/// `POST /v1/retire`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetireRequest {
    pub reason: String,
    #[serde(default)]
    pub undo: bool,
    /// A quiet window for this call instead of the gate's, such as `1h`; the
    /// audit entry says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiet_window: Option<String>,
}

/// `PUT /v1/gate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateRequest {
    pub gate: GateJson,
    pub reason: String,
}

/// A provisioning job: one billing event and how far it has come.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobJson {
    pub event: String,
    pub kind: String,
    pub state: String,
    pub tenant: Option<String>,
    pub steps: Vec<String>,
    pub attempts: u64,
    pub last_error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    /// Set on a webhook answer when the event had been delivered before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

impl From<&ficus_store::ProvisionJob> for JobJson {
    fn from(j: &ficus_store::ProvisionJob) -> JobJson {
        JobJson {
            event: j.event_id.clone(),
            kind: j.kind.clone(),
            state: j.state.as_str().to_string(),
            tenant: j.tenant.as_ref().map(|t| t.to_string()),
            steps: j.steps.clone(),
            attempts: j.attempts,
            last_error: j.last_error.clone(),
            created_at: format_time(j.created_at),
            updated_at: format_time(j.updated_at),
            duplicate: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobsJson {
    pub jobs: Vec<JobJson>,
}

/// One version of a tenant's configuration. Version 0 is the configuration a
/// tenant has before anyone wrote one (its name and domains).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigJson {
    pub tenant: String,
    pub version: u64,
    pub config: serde_json::Value,
    pub actor: Option<String>,
    pub reason: Option<String>,
    pub at: Option<String>,
}

impl ConfigJson {
    pub fn from_version(v: &ficus_store::ConfigVersion, config: serde_json::Value) -> ConfigJson {
        ConfigJson {
            tenant: v.tenant.to_string(),
            version: v.version,
            config,
            actor: Some(v.actor.as_str().to_string()),
            reason: Some(v.reason.clone()),
            at: Some(format_time(v.at)),
        }
    }
}

/// Every version, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigHistoryJson {
    pub tenant: String,
    pub versions: Vec<ConfigJson>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigRequest {
    /// The whole document (see `/v1/tenant-config.schema.json`).
    pub config: serde_json::Value,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// The version whose document becomes the next version.
    pub version: u64,
    pub reason: String,
}

impl From<&ficus_core::reconcile::ClassEvent> for ClassEventJson {
    fn from(e: &ficus_core::reconcile::ClassEvent) -> ClassEventJson {
        ClassEventJson {
            at: format_time(e.at),
            action: e.action.clone(),
            actor: e.actor.to_string(),
            reason: e.reason.clone(),
            version: e.version.clone(),
        }
    }
}

impl ClassJson {
    /// A class with how much of it counts.
    pub fn from_tally(t: &ficus_core::reconcile::ClassTally) -> ClassJson {
        let c = &t.class;
        ClassJson {
            id: c.id.clone(),
            endpoint: c.endpoint.clone(),
            path: c.path.clone(),
            kind: c.kind.clone(),
            compat: if c.additive { "additive" } else { "breaking" }.to_string(),
            state: c.state.to_string(),
            regression: c.regression,
            counted: t.counted,
            discounted: t.discounted,
            first_at: t.first_at.map(format_time),
            last_at: t.last_at.map(format_time),
            versions: t.by_version.clone(),
            first_seen: format_time(c.first_seen),
            last_seen: format_time(c.last_seen),
            fixed_in: c.fixed_in.clone(),
            last_change: c.last_change.as_ref().map(ClassEventJson::from),
            example: c.example.as_ref().map(|e| ClassExampleJson {
                at: format_time(e.at),
                request: e.request.clone(),
                version: e.version.clone(),
                // Written by this build from a serialized difference; if it was
                // edited into something else, it is shown as the text it is.
                difference: serde_json::from_str(&e.difference)
                    .unwrap_or_else(|_| serde_json::Value::String(e.difference.clone())),
            }),
        }
    }

    /// A class without evidence in the window.
    pub fn from_class(c: &ficus_core::reconcile::MismatchClass) -> ClassJson {
        ClassJson::from_tally(&ficus_core::reconcile::ClassTally {
            class: c.clone(),
            counted: 0,
            discounted: 0,
            first_at: None,
            last_at: None,
            by_version: Default::default(),
        })
    }
}

/// A route as the control plane knows it: its stages, whether it writes and is
/// destructive, and who called it lately.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteJson {
    /// `POST /homes/{id}`.
    pub route: String,
    pub writes: bool,
    pub destructive: bool,
    /// The route's own stage (for every tenant without an override).
    pub stage: String,
    /// Its version for a compare-and-set (0: never set).
    pub version: u64,
    /// A write route whose stage keeps it on legacy.
    pub held: bool,
    /// Served by the new side while no `[[routes]]` entry names it: a route
    /// nobody mapped to a service yet.
    pub unmapped: bool,
    pub overrides: Vec<RouteOverrideJson>,
    /// Requests over the census window, per tenant, backend and client version.
    pub census: Vec<RouteCountJson>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteOverrideJson {
    pub tenant: String,
    pub stage: String,
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteCountJson {
    /// `null` for requests whose tenant was not resolved.
    pub tenant: Option<String>,
    /// `legacy` or the new side's service that served them.
    pub backend: String,
    pub client: String,
    pub requests: u64,
    pub last_at: String,
    /// A `[[routes]]` entry of the proxy's configuration names the route.
    pub configured: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutesJson {
    pub window: String,
    /// Write routes nobody staged are held on legacy (true, the default) or
    /// follow their tenant's stage (a store upgraded with migrated tenants).
    #[serde(default)]
    pub writes_held_by_default: bool,
    pub routes: Vec<RouteJson>,
}

/// Holds write routes nobody staged on legacy by default, or lets them follow
/// their tenant's stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteDefaultRequest {
    pub held: bool,
    pub reason: String,
}

/// Sets a route's stage: for every tenant, or (`tenant`) one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteStageRequest {
    pub route: String,
    pub stage: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The second confirmation a destructive route needs to leave `legacy`.
    #[serde(default)]
    pub destructive: bool,
    pub reason: String,
}

/// Releases a held write route (or holds it again): for every tenant, or one
/// canary tenant. A destructive route needs `destructive: true` to be released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteReleaseRequest {
    pub route: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default)]
    pub destructive: bool,
    pub reason: String,
}

/// Marks a route destructive (or, with `destructive: false`, not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMarkRequest {
    pub route: String,
    pub destructive: bool,
    pub reason: String,
}

/// A route stage as changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteStageJson {
    pub route: String,
    pub tenant: Option<String>,
    pub stage: String,
    pub version: u64,
}
