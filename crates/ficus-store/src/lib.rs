//! The control store: the source of truth for tenants, their stages and the audit log.
//!
//! One trait, [`ControlStore`], with two real implementations: embedded SQLite (the
//! default, one file, no server) and PostgreSQL (when several proxy replicas must
//! share one store). Both keep the same schema shape, enforce the same rules and pass
//! the same behavioural test suite.
//!
//! Every write runs in one transaction that also appends to the audit log and to the
//! change log. The change log is what the [`feed`] serves: a subscriber learns the
//! sequence number of every committed change and which tenants it touched, then reads
//! their current state. Sequence numbers are handed out under a row lock held until
//! commit, so they are assigned in commit order and a subscriber that has seen `n` has
//! seen everything before `n`.

pub mod feed;
mod postgres;
mod rules;
mod sqlite;
mod url;

use std::sync::Arc;

use async_trait::async_trait;
use ficus_core::latency::Histogram;
use ficus_core::readiness::LatencyEvidence;
use ficus_core::reconcile::{
    ClassError, ClassEvent, ClassEvidence, ClassExample, ClassState, MismatchClass,
};
use ficus_core::routing::RouteError;
use ficus_core::{
    Actor, AuditEvent, Backend, Domain, Progress, Route, Stage, Tenant, TenantId, Timestamp,
    TransitionError,
};

pub use crate::feed::{ChangeSet, FeedEvent, Subscription};
pub use crate::postgres::PgStore;
pub use crate::sqlite::SqliteStore;
pub use crate::url::StoreUrl;

/// The schema version this build writes. A store with a higher version was written by
/// a newer Ficus and is refused rather than misread.
pub const SCHEMA_VERSION: i64 = 9;

/// A tenant to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTenant {
    pub id: TenantId,
    pub name: String,
    pub stage: Stage,
    pub domains: Vec<Domain>,
}

/// A request to move one tenant to another stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageChange {
    pub tenant: TenantId,
    pub to: Stage,
    /// The version the caller based its decision on; `None` checks the transition
    /// against whatever the store holds at commit time.
    pub expected_version: Option<u64>,
    pub actor: Actor,
    pub reason: String,
}

/// Which audit events to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    pub tenant: Option<TenantId>,
    pub since: Option<Timestamp>,
    /// Only events before this time.
    pub until: Option<Timestamp>,
    /// Only events recorded by this actor (its stored spelling: `guard`,
    /// `token:NAME`).
    pub actor: Option<String>,
    /// Only events that moved a tenant to this stage.
    pub to: Option<Stage>,
    /// Keep only the most recent `limit` events (still returned oldest first).
    pub limit: Option<u64>,
}

/// Every tenant at one change-log position: what a subscriber loads before following
/// the feed from `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub seq: u64,
    pub tenants: Vec<Tenant>,
    /// Set once legacy is retired: nothing may be routed to it any more.
    pub legacy_retired: bool,
}

/// Requests a proxy routed to legacy for one tenant (or for requests whose tenant
/// was unknown), aggregated between two reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficCount {
    /// `None` for requests whose tenant could not be resolved or is unknown.
    pub tenant: Option<TenantId>,
    pub requests: u64,
    pub last_at: Timestamp,
}

/// Comparison counts for one tenant and endpoint, as proxies report them and as
/// readiness reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComparisonCount {
    pub tenant: TenantId,
    /// `GET /homes/{id}`.
    pub endpoint: String,
    /// The version of new that answered (`""`: not known). Readiness can count
    /// one version's evidence only.
    pub version: String,
    /// When the last of these was counted.
    pub last_at: Timestamp,
    /// Requests of this endpoint answered for the tenant (compared or not).
    pub requests: u64,
    pub compared: u64,
    pub matched: u64,
    pub mismatched: u64,
    /// Differences that were all learned noise.
    pub noise_only: u64,
    /// The shadow side failed or timed out.
    pub errors: u64,
    /// Not shadowed because the bound was reached or the sample said no.
    pub shed: u64,
    /// Both answers came back, but a write of the same tenant was in flight
    /// while they were read, so either may show it: not judged, and not in
    /// `compared`.
    pub raced: u64,
}

/// One mismatch kept as evidence. `differences` is the diff engine's JSON; the
/// store keeps it as text and never looks inside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MismatchSample {
    pub tenant: TenantId,
    pub endpoint: String,
    pub at: Timestamp,
    pub method: String,
    pub path: String,
    /// The backend that answered the client, and the one compared against it.
    pub served_by: String,
    pub compared_with: String,
    pub served_status: u16,
    pub compared_status: u16,
    /// The diff engine's differences, legacy's answer first whichever served.
    pub differences: String,
    /// The version of new that answered, when known.
    pub version: Option<String>,
}

/// How often one mismatch class showed up for one tenant in one proxy's report:
/// the number of comparisons that had at least one difference of the class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassCount {
    pub tenant: TenantId,
    /// The class's id, as the diff engine computes it from the next three.
    pub id: String,
    pub endpoint: String,
    pub path: String,
    pub kind: String,
    pub additive: bool,
    /// The version of new that answered (`""`: not known).
    pub version: String,
    pub count: u64,
    pub first_at: Timestamp,
    /// The latest observation; it decides whether the evidence came before or
    /// after the class was resolved.
    pub last_at: Timestamp,
    pub example: Option<ClassExample>,
}

/// One endpoint's parallel run across every tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointCount {
    pub endpoint: String,
    /// Tenants that called it.
    pub tenants: u64,
    pub requests: u64,
    pub compared: u64,
    pub mismatched: u64,
    pub errors: u64,
}

/// The readiness gate's evidence for every tenant: comparison counts (each
/// names its tenant), mismatch evidence per tenant and class, and latencies per
/// tenant. Tenants with no evidence are absent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GateEvidence {
    pub stats: Vec<ComparisonCount>,
    pub classes: Vec<(TenantId, ClassEvidence)>,
    pub latencies: Vec<(TenantId, LatencyEvidence)>,
}

/// A route's stage for all tenants (`tenant: None`) or one tenant's override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteStage {
    /// `POST /homes/{id}`.
    pub route: String,
    pub tenant: Option<TenantId>,
    pub stage: Stage,
    /// Starts at 1 with the first change; 0 means "never set" to a
    /// compare-and-set.
    pub version: u64,
    pub updated_at: Timestamp,
}

/// A change of a route's stage, for all tenants or one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteChange {
    pub route: Route,
    pub tenant: Option<TenantId>,
    pub to: Stage,
    /// The version the caller decided on (0: never set); `None` checks nothing.
    pub expected_version: Option<u64>,
    pub actor: Actor,
    pub reason: String,
}

/// One entry of the routes' append-only audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEvent {
    pub seq: u64,
    pub at: Timestamp,
    pub route: String,
    pub tenant: Option<TenantId>,
    /// `stage`, or `destructive` (marked) / `not destructive` (unmarked).
    pub action: String,
    pub from: Option<Stage>,
    pub to: Option<Stage>,
    pub version: u64,
    pub actor: Actor,
    pub reason: String,
}

/// Requests of one route a proxy served, per tenant, backend and client version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteCount {
    /// `None` for requests whose tenant was not resolved or is unknown.
    pub tenant: Option<TenantId>,
    pub route: String,
    /// `legacy`, or the name of the new side's service that served it.
    pub backend: String,
    /// The client's version (a configured header, else the User-Agent's first
    /// product token), `""` when none, `other` beyond the proxy's cardinality cap.
    pub client: String,
    pub count: u64,
    pub last_at: Timestamp,
    /// A `[[routes]]` entry of the proxy's configuration names this route; a
    /// route served by the new side that none names is one nobody mapped yet.
    pub configured: bool,
}

/// Everything one proxy report carries about comparisons.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evidence {
    pub counts: Vec<ComparisonCount>,
    pub samples: Vec<MismatchSample>,
    pub noise: Vec<NoiseEntry>,
    pub classes: Vec<ClassCount>,
}

/// A lifecycle change of a mismatch class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassChange {
    /// The class's full id.
    pub id: String,
    pub to: ClassState,
    pub actor: Actor,
    pub reason: String,
    /// For a resolution: the version of new that fixed it.
    pub fixed_in: Option<String>,
}

/// A response path learned as noise on an endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseEntry {
    pub endpoint: String,
    pub path: String,
    pub score: f64,
    pub observations: u64,
    pub updated_at: Timestamp,
}

/// Latencies one proxy measured for one tenant's compared reads on one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyReport {
    pub tenant: TenantId,
    pub backend: Backend,
    /// When the last of these was measured; it picks the hour they are summed in.
    pub at: Timestamp,
    pub histogram: Histogram,
}

/// How many mismatch samples are kept per tenant and endpoint; older ones go.
pub const SAMPLES_KEPT: i64 = 20;

/// Whether opening a store may create it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Create the store (or finish creating it) if it is missing; `ficus init`.
    Create,
    /// The store must exist already; every other command.
    Existing,
}

/// Suspends a tenant (its subscription ended) or lets it back in.
#[derive(Debug, Clone)]
pub struct SuspendChange {
    pub tenant: TenantId,
    pub suspended: bool,
    pub actor: Actor,
    pub reason: String,
}

/// Where a provisioning job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Received, not finished: a step is still to run (or failed and will be
    /// retried).
    Pending,
    Done,
    /// Given up on: the event cannot be carried out (it names nothing usable).
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Done => "done",
            JobState::Failed => "failed",
        }
    }

    pub fn parse(raw: &str) -> Option<JobState> {
        match raw {
            "pending" => Some(JobState::Pending),
            "done" => Some(JobState::Done),
            "failed" => Some(JobState::Failed),
            _ => None,
        }
    }
}

/// One billing event and how far carrying it out has come. The event id is
/// the key: a delivery of an event already recorded finds its job instead of
/// starting another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionJob {
    pub event_id: String,
    /// What the event asks for: `create` or `cancel`.
    pub kind: String,
    /// The event as received.
    pub payload: String,
    pub tenant: Option<TenantId>,
    pub state: JobState,
    /// The steps done, in order.
    pub steps: Vec<String>,
    pub attempts: u64,
    pub last_error: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// One version of a tenant's configuration: the document as written (JSON,
/// which the store keeps as text and never reads) and who wrote it, when, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigVersion {
    pub tenant: TenantId,
    pub version: u64,
    pub document: String,
    pub actor: Actor,
    pub reason: String,
    pub at: Timestamp,
}

/// A new version of a tenant's configuration.
#[derive(Debug, Clone)]
pub struct ConfigChange {
    pub tenant: TenantId,
    pub document: String,
    /// The custom domains the document names.
    pub domains: Vec<Domain>,
    /// The version the change was decided on (0: the tenant had none).
    pub expected_version: u64,
    pub actor: Actor,
    pub reason: String,
}

/// What happened when a store was opened with [`OpenMode::Create`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitOutcome {
    Created,
    AlreadyInitialized,
    Upgraded { from: i64 },
}

/// The control store's operations. Both implementations are safe to share between
/// tasks and processes: every write is one transaction, checked against the current
/// state inside it.
#[async_trait]
pub trait ControlStore: Send + Sync + 'static {
    /// Where the store lives, for messages (never includes a password).
    fn location(&self) -> &str;

    /// What opening did, for `ficus init` to report.
    fn init_outcome(&self) -> InitOutcome;

    async fn add_tenant(&self, tenant: NewTenant, actor: Actor, reason: &str) -> Result<Tenant>;

    /// Adds every tenant or none. Problems with individual tenants (ids or domains
    /// that exist already) are all reported together, by position in `tenants`.
    async fn import_tenants(
        &self,
        tenants: Vec<NewTenant>,
        actor: Actor,
        reason: &str,
    ) -> Result<u64>;

    async fn tenant(&self, id: &TenantId) -> Result<Option<Tenant>>;

    async fn tenants(&self, stage: Option<Stage>) -> Result<Vec<Tenant>>;

    /// Tenants with these ids, in id order; ids that do not exist are skipped.
    async fn tenants_by_id(&self, ids: &[TenantId]) -> Result<Vec<Tenant>>;

    async fn change_stage(&self, change: StageChange) -> Result<Tenant>;

    async fn audit(&self, query: AuditQuery) -> Result<Vec<AuditEvent>>;

    /// Tenant counts per stage and what proxies have reported of legacy's traffic.
    async fn progress(&self) -> Result<Progress>;

    /// Whether legacy is retired.
    async fn legacy_retired(&self) -> Result<bool>;

    /// Sets or clears the global "legacy retired" flag, with an audit entry.
    /// Returns whether the flag changed.
    async fn set_legacy_retired(&self, retired: bool, actor: Actor, reason: &str) -> Result<bool>;

    /// Adds a proxy's aggregated legacy-traffic counts. An empty report still
    /// records that a proxy was reporting at `reported_at`, which is what lets the
    /// finish line say "no traffic since".
    async fn record_legacy_traffic(
        &self,
        counts: &[TrafficCount],
        reported_at: Timestamp,
    ) -> Result<()>;

    /// Legacy traffic per tenant since `since`, summed over proxies.
    async fn legacy_traffic(&self, since: Timestamp) -> Result<Vec<TrafficCount>>;

    /// Adds a proxy's comparison evidence: counts (summed per tenant, endpoint,
    /// version and hour), mismatch samples (the newest `SAMPLES_KEPT` per tenant
    /// and endpoint are kept), its current noise paths (replacing what was known of
    /// them) and its mismatch classes. A class seen for the first time is created
    /// open; evidence observed after a class was resolved reopens it as a
    /// regression, in the same transaction.
    async fn record_comparisons(&self, evidence: &Evidence) -> Result<()>;

    /// Every mismatch class, or those in `state`, by endpoint and path.
    async fn mismatch_classes(&self, state: Option<ClassState>) -> Result<Vec<MismatchClass>>;

    /// Mismatch evidence since `since` per class, epoch and version: one
    /// tenant's, or every tenant's summed.
    async fn class_evidence(
        &self,
        tenant: Option<&TenantId>,
        since: Timestamp,
    ) -> Result<Vec<ClassEvidence>>;

    /// Resolves, accepts or reopens a class, with its audit entry; the change
    /// feed tells every proxy (an accepted class is a comparison rule).
    async fn change_class(&self, change: ClassChange) -> Result<MismatchClass>;

    /// A class's lifecycle changes, oldest first.
    async fn class_history(&self, id: &str) -> Result<Vec<ClassEvent>>;

    /// Every route stage: the routes' own and the tenants' overrides.
    async fn route_stages(&self) -> Result<Vec<RouteStage>>;

    /// Sets a route's stage for all tenants or one (which must exist), checked
    /// against `expected_version`, with its audit entry; the change feed tells
    /// every proxy.
    async fn change_route(&self, change: RouteChange) -> Result<RouteStage>;

    /// Marks a route destructive (or not): releasing it then needs a second
    /// confirmation. Returns whether anything changed.
    async fn mark_route(
        &self,
        route: &Route,
        destructive: bool,
        actor: Actor,
        reason: &str,
    ) -> Result<bool>;

    /// The routes marked destructive.
    async fn route_marks(&self) -> Result<Vec<String>>;

    /// Where a write route nobody staged goes: `legacy` (held, the default), or
    /// `migrated` (writes follow their tenant; what an upgraded store with
    /// migrated tenants starts with, so that their writes do not move).
    async fn write_default(&self) -> Result<Stage>;

    /// Changes that default, with an audit entry; every proxy follows. Returns
    /// whether it changed.
    async fn set_write_default(&self, stage: Stage, actor: Actor, reason: &str) -> Result<bool>;

    /// The routes' audit log (one route's, or all), the newest `limit`, oldest
    /// first.
    async fn route_events(&self, route: Option<&str>, limit: u64) -> Result<Vec<RouteEvent>>;

    /// Adds a proxy's route census (summed per tenant, route, backend, client
    /// and hour).
    async fn record_route_census(&self, counts: &[RouteCount]) -> Result<()>;

    /// The census since `since` (one tenant's, or everyone's), summed over hours.
    async fn route_census(
        &self,
        tenant: Option<&TenantId>,
        since: Timestamp,
    ) -> Result<Vec<RouteCount>>;

    /// A tenant's comparison counts per endpoint and version since `since`.
    async fn comparison_stats(
        &self,
        tenant: &TenantId,
        since: Timestamp,
    ) -> Result<Vec<ComparisonCount>>;

    /// A tenant's newest mismatch samples, newest first.
    async fn mismatch_samples(
        &self,
        tenant: &TenantId,
        endpoint: Option<&str>,
        limit: u64,
    ) -> Result<Vec<MismatchSample>>;

    /// The newest audit event of each of `tenants` (those that have one), in
    /// one query: the tenant board's "last change and who".
    async fn last_events(&self, tenants: &[TenantId]) -> Result<Vec<AuditEvent>>;

    /// The newest provisioning job that made or changed `tenant`.
    async fn provision_job_of(&self, tenant: &TenantId) -> Result<Option<ProvisionJob>>;

    /// Every learned noise path, by endpoint and path.
    async fn noise(&self) -> Result<Vec<NoiseEntry>>;

    /// Adds a proxy's latency histograms of compared reads, summed per tenant,
    /// backend and hour.
    async fn record_latencies(&self, reports: &[LatencyReport]) -> Result<()>;

    /// A tenant's latencies of compared reads since `since`, per backend.
    async fn latencies(&self, tenant: &TenantId, since: Timestamp) -> Result<LatencyEvidence>;

    /// Requests legacy served per hour since `since` (the hour's start), from
    /// the route census, oldest first: the overview's legacy traffic chart.
    async fn legacy_hours(&self, since: Timestamp) -> Result<Vec<(Timestamp, u64)>>;

    /// Every endpoint's comparisons across all tenants since `since`, by
    /// endpoint: the dashboard's endpoints page.
    async fn endpoint_counts(&self, since: Timestamp) -> Result<Vec<EndpointCount>>;

    /// A tenant's latencies of compared reads per hour since `since` (the
    /// hour's start), per backend, oldest first: the tenant page's chart.
    async fn latency_hours(
        &self,
        tenant: &TenantId,
        since: Timestamp,
    ) -> Result<Vec<(Timestamp, LatencyEvidence)>>;

    /// Everything the readiness gate judges, for every tenant at once, since
    /// `since`: three queries however many tenants there are, for the tenant
    /// board and `promote --next`.
    async fn gate_evidence(&self, since: Timestamp) -> Result<GateEvidence>;

    /// A named setting's value (gate thresholds, the API token's hash).
    async fn setting(&self, key: &str) -> Result<Option<String>>;

    /// Every setting whose key starts with `prefix`, in key order (the admin
    /// tokens, `token.NAME`).
    async fn settings_under(&self, prefix: &str) -> Result<Vec<(String, String)>>;

    /// Sets a named setting, with an audit entry that records `shown` (not the
    /// value, which may be a secret's hash) and the reason.
    async fn set_setting(
        &self,
        key: &str,
        value: &str,
        shown: &str,
        actor: Actor,
        reason: &str,
    ) -> Result<()>;

    async fn snapshot(&self) -> Result<Snapshot>;

    /// The change-log position the store is at: what a page rendered now has
    /// seen, and where its live updates must start.
    async fn position(&self) -> Result<u64>;

    /// What changed after `seq`, or a resync when the change log no longer reaches
    /// back that far.
    async fn changes_since(&self, seq: u64) -> Result<ChangeSet>;

    /// Follows committed changes after `from_seq` (after the current position when
    /// `None`). The feed stops when the subscription is dropped.
    fn subscribe(&self, from_seq: Option<u64>) -> Subscription;

    /// One version of a tenant's configuration (the latest when `version` is
    /// `None`); `None` when the tenant has none (yet, or of that number).
    async fn tenant_config(
        &self,
        tenant: &TenantId,
        version: Option<u64>,
    ) -> Result<Option<ConfigVersion>>;

    /// Appends a note to a tenant's audit log — something done for it that is
    /// not a change of its stage (a provisioning step) — at its current stage
    /// and version, which do not change.
    async fn note(&self, tenant: &TenantId, actor: Actor, reason: &str) -> Result<()>;

    /// Suspends a tenant or lets it back in: its version goes up, the audit log
    /// says why (`suspended: …` / `resumed: …`), and the proxies follow.
    /// Setting the state it already has changes nothing.
    async fn set_suspended(&self, change: SuspendChange) -> Result<Tenant>;

    /// Records a provisioning job for `event_id` unless one exists. Returns the
    /// job and whether this call created it: of any number of concurrent
    /// deliveries of one event, exactly one creates it.
    async fn claim_provision_job(
        &self,
        event_id: &str,
        kind: &str,
        payload: &str,
    ) -> Result<(ProvisionJob, bool)>;

    /// Writes a job's progress (tenant, state, steps, attempts, last error).
    /// A job's tenant, once written, is kept: a runner that read the job
    /// before another bound it (the resumer beside the delivery that created
    /// it) cannot replace it with a tenant of its own, and reads the job again
    /// to learn which tenant is the job's.
    async fn update_provision_job(&self, job: &ProvisionJob) -> Result<()>;

    async fn provision_job(&self, event_id: &str) -> Result<Option<ProvisionJob>>;

    /// Jobs, oldest first, optionally only those in one state.
    async fn provision_jobs(
        &self,
        state: Option<JobState>,
        limit: u64,
    ) -> Result<Vec<ProvisionJob>>;

    /// Every tenant's latest configuration (tenants that have one), for a
    /// proxy loading its table.
    async fn latest_tenant_configs(&self) -> Result<Vec<ConfigVersion>>;

    /// Every version of a tenant's configuration, newest first.
    async fn tenant_config_history(&self, tenant: &TenantId) -> Result<Vec<ConfigVersion>>;

    /// Writes the next version of a tenant's configuration, if the latest is
    /// still `change.expected_version` (0: none yet). The tenant's custom
    /// domains become `change.domains` in the same transaction, so that routing
    /// follows at once through the change feed; a domain of another tenant is
    /// refused.
    async fn set_tenant_config(&self, change: ConfigChange) -> Result<ConfigVersion>;
}

/// Opens the store at `url`.
pub async fn open(url: &StoreUrl, mode: OpenMode) -> Result<Arc<dyn ControlStore>> {
    Ok(match url {
        StoreUrl::Sqlite(path) => Arc::new(SqliteStore::open(path, mode).await?),
        StoreUrl::Postgres { .. } => Arc::new(PgStore::open(url, mode).await?),
    })
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Why a store operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store url {url:?}: {why}")]
    BadUrl { url: String, why: String },
    #[error("no ficus store at {location}: run `ficus init` first")]
    NotInitialized { location: String },
    #[error("{location} is not a ficus store ({detail}); it was not modified")]
    NotAFicusStore { location: String, detail: String },
    #[error(
        "{location} was written by a newer ficus (schema version {found}; this build supports up to {supported}); upgrade ficus, the store was not modified"
    )]
    NewerSchema {
        location: String,
        found: i64,
        supported: i64,
    },
    #[error("{location} is read-only; ficus needs to write to its store")]
    ReadOnly { location: String },
    #[error("cannot reach the PostgreSQL store at {location}: {detail}")]
    Unreachable { location: String, detail: String },
    #[error("{0:?} is not a setting ficus can change this way")]
    BadSetting(String),
    #[error("tenant {0} already exists")]
    TenantExists(TenantId),
    #[error("no tenant {0}")]
    UnknownTenant(TenantId),
    #[error("domain {domain} already belongs to tenant {owner}")]
    DomainTaken { domain: Domain, owner: TenantId },
    #[error("domain {0} is given twice")]
    DuplicateDomain(Domain),
    #[error("cannot move tenant {tenant} from {from} to {to}: {error}")]
    Transition {
        tenant: TenantId,
        from: Stage,
        to: Stage,
        error: TransitionError,
    },
    #[error(
        "tenant {tenant} changed since version {expected}: it is at version {actual}, last changed by {changed_by} at {changed_at} ({reason:?}); nothing was written"
    )]
    Stale {
        tenant: TenantId,
        expected: u64,
        actual: u64,
        /// The actor's stored spelling (`cli`, `guard`, `token:NAME`).
        changed_by: String,
        changed_at: String,
        reason: String,
    },
    #[error(
        "tenant {tenant}'s configuration changed since version {expected}: it is at version {actual}; nothing was written"
    )]
    ConfigStale {
        tenant: TenantId,
        expected: u64,
        actual: u64,
    },
    #[error("a reason is required and must not be empty")]
    MissingReason,
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(
        "route {route}{} changed since version {expected}: it is at version {actual}; nothing was written",
        .tenant.as_ref().map(|t| format!(" for tenant {t}")).unwrap_or_default()
    )]
    RouteStale {
        route: String,
        tenant: Option<TenantId>,
        expected: u64,
        actual: u64,
    },
    #[error(
        "route {route}{} is {stage} already; nothing was changed",
        .tenant.as_ref().map(|t| format!(" for tenant {t}")).unwrap_or_default()
    )]
    RouteAlready {
        route: String,
        tenant: Option<TenantId>,
        stage: Stage,
    },
    #[error("no mismatch class {0}; `ficus mismatches --classes` lists them")]
    UnknownClass(String),
    #[error(transparent)]
    Class(#[from] ClassError),
    #[error("import refused, nothing was added: {}", .0.iter().map(|c| format!("entry {}: {}", c.index + 1, c.describe(|i| format!("entry {}", i + 1)))).collect::<Vec<_>>().join("; "))]
    ImportConflicts(Vec<ImportConflict>),
    #[error("the store holds a value ficus cannot read ({0}); was it edited by hand?")]
    Corrupt(String),
    #[error("{context}: {detail}")]
    Backend { context: String, detail: String },
}

/// One tenant of an import that cannot be added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportConflict {
    /// Zero-based position in the imported list.
    pub index: usize,
    pub kind: ConflictKind,
}

/// Why one tenant of an import cannot be added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConflictKind {
    TenantExists(TenantId),
    DomainTaken {
        domain: Domain,
        owner: String,
    },
    /// The id appears earlier in the same import, at position `first`.
    RepeatedId {
        id: TenantId,
        first: usize,
    },
    /// The domain appears earlier in the same import, at position `first`.
    RepeatedDomain {
        domain: Domain,
        first: usize,
    },
}

impl ImportConflict {
    /// Describes the conflict, naming other positions with `position` (the CLI
    /// speaks of file lines, the library of list entries).
    pub fn describe(&self, position: impl Fn(usize) -> String) -> String {
        match &self.kind {
            ConflictKind::TenantExists(id) => format!("tenant {id} already exists"),
            ConflictKind::DomainTaken { domain, owner } => {
                format!("domain {domain} already belongs to tenant {owner}")
            }
            ConflictKind::RepeatedId { id, first } => {
                format!("tenant {id} is also at {}", position(*first))
            }
            ConflictKind::RepeatedDomain { domain, first } => {
                format!("domain {domain} is also used at {}", position(*first))
            }
        }
    }
}

/// Formats a timestamp as RFC 3339 UTC, the way every message and output shows time.
pub fn format_time(t: Timestamp) -> String {
    match u64::try_from(t.unix_millis()) {
        Ok(ms) => humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
        )
        .to_string(),
        Err(_) => format!("{}ms", t.unix_millis()),
    }
}

/// The current time, read in one place so every store stamps events alike.
pub(crate) fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp::from_unix_millis(d.as_millis() as i64)
}
