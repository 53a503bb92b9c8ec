//! The decisions both store implementations make the same way, kept in one place so
//! that SQLite and PostgreSQL cannot drift apart: stage-change checks, import
//! conflict detection, and turning stored rows back into domain values.

use std::collections::{BTreeMap, HashMap};

use ficus_core::readiness::LatencyEvidence;
use ficus_core::{
    Actor, AuditEvent, Backend, Domain, Stage, Tenant, TenantId, Timestamp, Transition,
};

use ficus_core::reconcile::{
    ClassEvent, ClassExample, ClassState, MismatchClass, check_change, place,
};

use crate::{
    ClassChange, ClassCount, ConfigChange, ConfigVersion, ConflictKind, ImportConflict, JobState,
    NewTenant, ProvisionJob, RouteChange, RouteEvent, RouteStage, StageChange, StoreError,
    SuspendChange, format_time,
};

/// One audit event about to be appended, as both stores write it.
pub(crate) struct NewEvent<'a> {
    pub at: i64,
    pub tenant: &'a str,
    pub from: Option<Stage>,
    pub to: Stage,
    pub version: u64,
    pub actor: Actor,
    pub reason: &'a str,
}

/// Trims a reason and refuses an empty one: every change must say why.
pub(crate) fn reason(raw: &str) -> Result<&str, StoreError> {
    let r = raw.trim();
    if r.is_empty() {
        Err(StoreError::MissingReason)
    } else {
        Ok(r)
    }
}

/// Refuses setting names that are not plain words, and the ones with their own
/// methods (whose changes must go through their own checks).
pub(crate) fn setting_key(key: &str) -> Result<&str, StoreError> {
    let plain = !key.is_empty()
        && key.len() <= 64
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.');
    if !plain || key == "legacy_retired" || key == WRITE_DEFAULT {
        return Err(StoreError::BadSetting(key.to_string()));
    }
    Ok(key)
}

/// The stored name of a backend in latency rows.
pub(crate) fn backend_key(backend: Backend) -> &'static str {
    backend.as_str()
}

/// Adds one stored latency row to the evidence; rows of unknown backends (written
/// by a newer Ficus) are skipped rather than misread.
pub(crate) fn add_latency(evidence: &mut LatencyEvidence, backend: &str, bucket: i64, count: i64) {
    let bucket = bucket.clamp(0, i64::from(u16::MAX)) as u16;
    let count = count.max(0) as u64;
    match backend {
        "legacy" => evidence.legacy.add(bucket, count),
        "new" => evidence.new.add(bucket, count),
        _ => {}
    }
}

/// Checks a stage change against the tenant's state read inside the writing
/// transaction. `last_event` is consulted only to explain a stale write.
pub(crate) fn check_stage_change(
    current: &Tenant,
    change: &StageChange,
    last_event: impl FnOnce() -> Result<Option<AuditEvent>, StoreError>,
) -> Result<(), StoreError> {
    if let Some(expected) = change.expected_version
        && expected != current.version
    {
        let last = last_event()?;
        return Err(StoreError::Stale {
            tenant: current.id.clone(),
            expected,
            actual: current.version,
            changed_by: last
                .as_ref()
                .map_or(Actor::Cli, |e| e.actor)
                .as_str()
                .to_string(),
            changed_at: last
                .as_ref()
                .map_or_else(|| format_time(current.updated_at), |e| format_time(e.at)),
            reason: last.map(|e| e.reason).unwrap_or_default(),
        });
    }
    Transition::between(current.stage, change.to).map_err(|error| StoreError::Transition {
        tenant: current.id.clone(),
        from: current.stage,
        to: change.to,
        error,
    })?;
    Ok(())
}

/// Refuses a tenant that names one domain twice.
pub(crate) fn check_own_domains(tenant: &NewTenant) -> Result<(), StoreError> {
    let mut seen = std::collections::HashSet::new();
    for d in &tenant.domains {
        if !seen.insert(d) {
            return Err(StoreError::DuplicateDomain(d.clone()));
        }
    }
    Ok(())
}

/// Finds every conflict in an import: ids and domains repeated inside the list, and
/// ids and domains the store already holds (`existing_ids`, `domain_owners`).
pub(crate) fn import_conflicts(
    tenants: &[NewTenant],
    existing_ids: &std::collections::HashSet<String>,
    domain_owners: &HashMap<String, String>,
) -> Vec<ImportConflict> {
    let mut out = Vec::new();
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut domains: HashMap<&str, usize> = HashMap::new();
    for (index, t) in tenants.iter().enumerate() {
        let mut problem = |kind| out.push(ImportConflict { index, kind });
        if existing_ids.contains(t.id.as_str()) {
            problem(ConflictKind::TenantExists(t.id.clone()));
        } else if let Some(first) = ids.insert(t.id.as_str(), index) {
            ids.insert(t.id.as_str(), first);
            problem(ConflictKind::RepeatedId {
                id: t.id.clone(),
                first,
            });
        }
        for d in &t.domains {
            if let Some(owner) = domain_owners.get(d.as_str()) {
                problem(ConflictKind::DomainTaken {
                    domain: d.clone(),
                    owner: owner.clone(),
                });
            } else if let Some(first) = domains.insert(d.as_str(), index) {
                domains.insert(d.as_str(), first);
                problem(ConflictKind::RepeatedDomain {
                    domain: d.clone(),
                    first,
                });
            }
        }
    }
    out
}

/// A tenant row as stored, before its values are checked.
pub(crate) struct TenantRow {
    pub id: String,
    pub name: String,
    pub stage: String,
    pub version: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub suspended: bool,
}

pub(crate) fn tenant_from_row(row: TenantRow, domains: Vec<String>) -> Result<Tenant, StoreError> {
    let corrupt =
        |e: &dyn std::fmt::Display| StoreError::Corrupt(format!("tenant {:?}: {e}", row.id));
    Ok(Tenant {
        id: TenantId::parse(&row.id).map_err(|e| corrupt(&e))?,
        stage: Stage::parse(&row.stage).map_err(|e| corrupt(&e))?,
        version: u64::try_from(row.version).map_err(|e| corrupt(&e))?,
        domains: domains
            .iter()
            .map(|d| Domain::parse(d))
            .collect::<Result<_, _>>()
            .map_err(|e| corrupt(&e))?,
        created_at: Timestamp::from_unix_millis(row.created_at),
        updated_at: Timestamp::from_unix_millis(row.updated_at),
        name: row.name,
        suspended: row.suspended,
    })
}

/// Joins tenant rows with their domains (given as `(tenant, domain)` pairs in any
/// order), keeping the rows' order.
pub(crate) fn assemble(
    rows: Vec<TenantRow>,
    domain_pairs: Vec<(String, String)>,
) -> Result<Vec<Tenant>, StoreError> {
    let mut by_tenant: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (tenant, domain) in domain_pairs {
        by_tenant.entry(tenant).or_default().push(domain);
    }
    rows.into_iter()
        .map(|row| {
            let mut domains = by_tenant.remove(&row.id).unwrap_or_default();
            domains.sort();
            tenant_from_row(row, domains)
        })
        .collect()
}

/// An audit row as stored, before its values are checked.
pub(crate) struct AuditRow {
    pub seq: i64,
    pub at: i64,
    pub tenant: String,
    pub from: Option<String>,
    pub to: String,
    pub version: i64,
    pub actor: String,
    pub reason: String,
}

pub(crate) fn audit_from_row(row: AuditRow) -> Result<AuditEvent, StoreError> {
    let corrupt =
        |e: &dyn std::fmt::Display| StoreError::Corrupt(format!("audit event {}: {e}", row.seq));
    Ok(AuditEvent {
        seq: u64::try_from(row.seq).map_err(|e| corrupt(&e))?,
        at: Timestamp::from_unix_millis(row.at),
        tenant: TenantId::parse(&row.tenant).map_err(|e| corrupt(&e))?,
        from: row
            .from
            .as_deref()
            .map(Stage::parse)
            .transpose()
            .map_err(|e| corrupt(&e))?,
        to: Stage::parse(&row.to).map_err(|e| corrupt(&e))?,
        version: u64::try_from(row.version).map_err(|e| corrupt(&e))?,
        actor: Actor::parse(&row.actor).map_err(|e| corrupt(&e))?,
        reason: row.reason,
    })
}

/// A configuration version as a backend reads it.
pub(crate) struct ConfigRow {
    pub tenant: String,
    pub version: i64,
    pub document: String,
    pub at: i64,
    pub actor: String,
    pub reason: String,
}

pub(crate) fn config_from_row(row: ConfigRow) -> Result<ConfigVersion, StoreError> {
    let corrupt = |e: &dyn std::fmt::Display| {
        StoreError::Corrupt(format!(
            "configuration {} of {}: {e}",
            row.version, row.tenant
        ))
    };
    Ok(ConfigVersion {
        tenant: TenantId::parse(&row.tenant).map_err(|e| corrupt(&e))?,
        version: u64::try_from(row.version).map_err(|e| corrupt(&e))?,
        document: row.document,
        actor: Actor::parse(&row.actor).map_err(|e| corrupt(&e))?,
        reason: row.reason,
        at: Timestamp::from_unix_millis(row.at),
    })
}

/// A provisioning job as a backend reads it.
pub(crate) struct JobRow {
    pub event_id: String,
    pub kind: String,
    pub payload: String,
    pub tenant: Option<String>,
    pub state: String,
    pub steps: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

pub(crate) const JOB_COLUMNS: &str = "event_id, kind, payload, tenant_id, state, steps, attempts, last_error, created_at, updated_at";

pub(crate) fn job_from_row(row: JobRow) -> Result<ProvisionJob, StoreError> {
    let corrupt = |e: &dyn std::fmt::Display| {
        StoreError::Corrupt(format!("provisioning job {:?}: {e}", row.event_id))
    };
    Ok(ProvisionJob {
        tenant: row
            .tenant
            .as_deref()
            .map(TenantId::parse)
            .transpose()
            .map_err(|e| corrupt(&e))?,
        state: JobState::parse(&row.state).ok_or_else(|| corrupt(&row.state))?,
        steps: row
            .steps
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        attempts: u64::try_from(row.attempts).map_err(|e| corrupt(&e))?,
        last_error: row.last_error,
        created_at: Timestamp::from_unix_millis(row.created_at),
        updated_at: Timestamp::from_unix_millis(row.updated_at),
        event_id: row.event_id,
        kind: row.kind,
        payload: row.payload,
    })
}

/// The audit reason of a suspension or its end.
pub(crate) fn suspend_reason(change: &SuspendChange) -> Result<String, StoreError> {
    let why = reason(&change.reason)?;
    Ok(format!(
        "{}: {why}",
        if change.suspended {
            "suspended"
        } else {
            "resumed"
        }
    ))
}

/// Checks a configuration change before any backend writes it: a reason, and
/// no domain twice.
pub(crate) fn config_change(change: &ConfigChange) -> Result<(), StoreError> {
    reason(&change.reason)?;
    for (i, d) in change.domains.iter().enumerate() {
        if change.domains[..i].contains(d) {
            return Err(StoreError::DuplicateDomain(d.clone()));
        }
    }
    Ok(())
}

/// The key a traffic count is stored under: the tenant id, or "" for requests
/// whose tenant was unknown (no tenant id is empty).
pub(crate) fn traffic_key(tenant: Option<&TenantId>) -> &str {
    tenant.map_or("", TenantId::as_str)
}

pub(crate) fn traffic_from_row(
    key: String,
    requests: i64,
    last_at: i64,
) -> Result<crate::TrafficCount, StoreError> {
    let tenant = if key.is_empty() {
        None
    } else {
        Some(TenantId::parse(&key).map_err(|e| StoreError::Corrupt(e.to_string()))?)
    };
    Ok(crate::TrafficCount {
        tenant,
        requests: requests.max(0) as u64,
        last_at: Timestamp::from_unix_millis(last_at),
    })
}

/// The start of the hour `at` falls in; legacy traffic is kept per tenant per hour.
/// Latency rows `(hour, backend, bucket, count)`, ordered by hour, as one
/// evidence per hour.
pub(crate) fn latency_hours(
    rows: Vec<(i64, String, i64, i64)>,
) -> Vec<(Timestamp, LatencyEvidence)> {
    let mut out: Vec<(Timestamp, LatencyEvidence)> = Vec::new();
    for (hour, backend, bucket, count) in rows {
        let at = Timestamp::from_unix_millis(hour);
        if out.last().is_none_or(|(last, _)| *last != at) {
            out.push((at, LatencyEvidence::default()));
        }
        if let Some((_, evidence)) = out.last_mut() {
            add_latency(evidence, &backend, bucket, count);
        }
    }
    out
}

pub(crate) fn hour_of(at: Timestamp) -> i64 {
    let ms = at.unix_millis();
    ms - ms.rem_euclid(3_600_000)
}

/// What proxies have reported of legacy: the last request routed to it, or, if
/// none was ever reported, since when proxies have been reporting.
pub(crate) fn legacy_last_request(
    last_request: Option<i64>,
    first_report: Option<i64>,
) -> Option<ficus_core::LegacyTraffic> {
    use ficus_core::LegacyTraffic;
    match (last_request, first_report) {
        (Some(at), _) => Some(LegacyTraffic::LastAt(Timestamp::from_unix_millis(at))),
        (None, Some(since)) => Some(LegacyTraffic::NoneSince(Timestamp::from_unix_millis(since))),
        (None, None) => None,
    }
}

pub(crate) fn tenant(key: &str) -> Result<TenantId, StoreError> {
    TenantId::parse(key).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The columns a class is read from, in [`ClassRow`]'s order.
pub(crate) const CLASS_COLUMNS: &str = "id, endpoint, path, kind, additive, state, epoch, first_seen, last_seen, \
     resolved_at, fixed_in, regression, example_at, example_request, example_version, example_difference, \
     change_at, change_action, change_actor, change_reason, change_version";

/// A mismatch class as a backend reads it.
pub(crate) struct ClassRow {
    pub id: String,
    pub endpoint: String,
    pub path: String,
    pub kind: String,
    pub additive: bool,
    pub state: String,
    pub epoch: i64,
    pub first_seen: i64,
    pub last_seen: i64,
    pub resolved_at: Option<i64>,
    pub fixed_in: Option<String>,
    pub regression: bool,
    pub example_at: Option<i64>,
    pub example_request: Option<String>,
    pub example_version: Option<String>,
    pub example_difference: Option<String>,
    pub change_at: Option<i64>,
    pub change_action: Option<String>,
    pub change_actor: Option<String>,
    pub change_reason: Option<String>,
    pub change_version: Option<String>,
}

pub(crate) fn class_from_row(row: ClassRow) -> Result<MismatchClass, StoreError> {
    let id = row.id.clone();
    let corrupt =
        |e: &dyn std::fmt::Display| StoreError::Corrupt(format!("mismatch class {id}: {e}"));
    let state = ClassState::parse(&row.state)
        .ok_or_else(|| corrupt(&format!("unknown state {:?}", row.state)))?;
    let last_change = match (row.change_at, row.change_action, row.change_actor) {
        (Some(at), Some(action), Some(actor)) => Some(ClassEvent {
            at: Timestamp::from_unix_millis(at),
            action,
            actor: Actor::parse(&actor).map_err(|e| corrupt(&e))?,
            reason: row.change_reason.unwrap_or_default(),
            version: row.change_version,
        }),
        _ => None,
    };
    let example = match (row.example_at, row.example_request, row.example_difference) {
        (Some(at), Some(request), Some(difference)) => Some(ClassExample {
            at: Timestamp::from_unix_millis(at),
            request,
            version: row.example_version,
            difference,
        }),
        _ => None,
    };
    Ok(MismatchClass {
        id: row.id,
        endpoint: row.endpoint,
        path: row.path,
        kind: row.kind,
        additive: row.additive,
        state,
        epoch: u64::try_from(row.epoch).map_err(|e| corrupt(&e))?,
        first_seen: Timestamp::from_unix_millis(row.first_seen),
        last_seen: Timestamp::from_unix_millis(row.last_seen),
        resolved_at: row.resolved_at.map(Timestamp::from_unix_millis),
        fixed_in: row.fixed_in,
        regression: row.regression,
        last_change: last_change.clone(),
        example,
    })
}

/// A class after an operator's change, checked against where it stands.
pub(crate) fn changed_class(
    mut class: MismatchClass,
    change: &ClassChange,
    at: Timestamp,
) -> Result<(MismatchClass, ClassEvent), StoreError> {
    let reason = reason(&change.reason)?.to_string();
    check_change(&class.id, class.state, change.to)?;
    let action = match change.to {
        ClassState::Resolved => {
            class.epoch += 1;
            class.resolved_at = Some(at);
            class.fixed_in = change.fixed_in.clone();
            "resolved"
        }
        ClassState::Accepted => "accepted",
        ClassState::Open => {
            // Reopening withdraws the resolution: the evidence it set aside
            // counts again.
            if class.state == ClassState::Resolved {
                class.epoch = class.epoch.saturating_sub(1);
                class.resolved_at = None;
                class.fixed_in = None;
            }
            "reopened"
        }
    };
    class.state = change.to;
    class.regression = false;
    let event = ClassEvent {
        at,
        action: action.to_string(),
        actor: change.actor,
        reason,
        version: change
            .fixed_in
            .clone()
            .filter(|_| change.to == ClassState::Resolved),
    };
    class.last_change = Some(event.clone());
    Ok((class, event))
}

/// Where a reported count of a class belongs; for evidence that arrives after the
/// class was resolved, the class reopened as a regression and why.
pub(crate) fn place_evidence(
    class: &MismatchClass,
    c: &ClassCount,
    at: Timestamp,
) -> (i64, Option<(MismatchClass, ClassEvent)>) {
    let (epoch, reopens) = place(class, c.last_at);
    let epoch = i64::try_from(epoch).unwrap_or(i64::MAX);
    if !reopens {
        return (epoch, None);
    }
    let seen_on = if c.version.is_empty() {
        String::new()
    } else {
        format!(" on version {}", c.version)
    };
    let reason = match &class.fixed_in {
        Some(v) if *v == c.version => format!(
            "regression: tenant {} saw this class again on version {v}, the version it was resolved as fixed in",
            c.tenant
        ),
        Some(v) => format!(
            "regression: tenant {} saw this class again{seen_on} after it was resolved as fixed in {v}",
            c.tenant
        ),
        None => format!(
            "regression: tenant {} saw this class again{seen_on} after it was resolved",
            c.tenant
        ),
    };
    let mut reopened = class.clone();
    reopened.state = ClassState::Open;
    reopened.regression = true;
    let event = ClassEvent {
        at,
        action: "regression".to_string(),
        actor: Actor::Proxy,
        reason,
        version: (!c.version.is_empty()).then(|| c.version.clone()),
    };
    reopened.last_change = Some(event.clone());
    (epoch, Some((reopened, event)))
}

/// The setting that says where write routes nobody staged go.
pub(crate) const WRITE_DEFAULT: &str = "route_write_default";

/// Reads that setting's stored value: absent is held at legacy.
pub(crate) fn write_default(value: Option<&str>) -> Result<Stage, StoreError> {
    match value {
        None => Ok(ficus_core::routing::default_route_stage(true)),
        Some(v) => {
            Stage::parse(v).map_err(|e| StoreError::Corrupt(format!("{WRITE_DEFAULT}: {e}")))
        }
    }
}

/// The default stage of `route`, knowing where writes go by default.
pub(crate) fn route_default(route: &ficus_core::Route, write_default: Stage) -> Stage {
    if route.writes() {
        write_default
    } else {
        ficus_core::routing::default_route_stage(false)
    }
}

/// Checks a route change against what is stored: `own` is the row the change
/// writes (the route's, or the tenant's override), `inherited` the stage that
/// applies without it (the route's row for an override, else the default).
/// Returns the new version.
pub(crate) fn check_route_change(
    change: &RouteChange,
    own: Option<(Stage, u64)>,
    inherited: Option<Stage>,
    write_default: Stage,
) -> Result<u64, StoreError> {
    let version = own.map_or(0, |(_, v)| v);
    if let Some(expected) = change.expected_version
        && expected != version
    {
        return Err(StoreError::RouteStale {
            route: change.route.to_string(),
            tenant: change.tenant.clone(),
            expected,
            actual: version,
        });
    }
    let now = own
        .map(|(s, _)| s)
        .or(inherited)
        .unwrap_or_else(|| route_default(&change.route, write_default));
    if now == change.to {
        return Err(StoreError::RouteAlready {
            route: change.route.to_string(),
            tenant: change.tenant.clone(),
            stage: now,
        });
    }
    Ok(version + 1)
}

/// A route stage row as a backend reads it: tenant `""` is the route's own.
pub(crate) fn route_stage_from_row(
    route: String,
    tenant: String,
    stage: String,
    version: i64,
    updated_at: i64,
) -> Result<RouteStage, StoreError> {
    let corrupt =
        |e: &dyn std::fmt::Display| StoreError::Corrupt(format!("route stage {route}: {e}"));
    Ok(RouteStage {
        tenant: (!tenant.is_empty())
            .then(|| TenantId::parse(&tenant))
            .transpose()
            .map_err(|e| corrupt(&e))?,
        stage: Stage::parse(&stage).map_err(|e| corrupt(&e))?,
        version: u64::try_from(version).map_err(|e| corrupt(&e))?,
        updated_at: Timestamp::from_unix_millis(updated_at),
        route,
    })
}

/// A route audit row as a backend reads it.
pub(crate) struct RouteEventRow {
    pub seq: i64,
    pub at: i64,
    pub route: String,
    pub tenant: String,
    pub action: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub version: i64,
    pub actor: String,
    pub reason: String,
}

pub(crate) fn route_event_from_row(r: RouteEventRow) -> Result<RouteEvent, StoreError> {
    let corrupt =
        |e: &dyn std::fmt::Display| StoreError::Corrupt(format!("route event {}: {e}", r.seq));
    let stage = |s: Option<String>| s.as_deref().map(Stage::parse).transpose();
    Ok(RouteEvent {
        seq: u64::try_from(r.seq).map_err(|e| corrupt(&e))?,
        at: Timestamp::from_unix_millis(r.at),
        tenant: (!r.tenant.is_empty())
            .then(|| TenantId::parse(&r.tenant))
            .transpose()
            .map_err(|e| corrupt(&e))?,
        from: stage(r.from).map_err(|e| corrupt(&e))?,
        to: stage(r.to).map_err(|e| corrupt(&e))?,
        version: u64::try_from(r.version).map_err(|e| corrupt(&e))?,
        actor: Actor::parse(&r.actor).map_err(|e| corrupt(&e))?,
        route: r.route,
        action: r.action,
        reason: r.reason,
    })
}

/// A census row as a backend reads it: tenant key `""` is "not resolved".
pub(crate) fn census_from_row(
    key: String,
    route: String,
    backend: String,
    client: String,
    count: i64,
    last_at: i64,
    configured: bool,
) -> Result<crate::RouteCount, StoreError> {
    Ok(crate::RouteCount {
        tenant: (!key.is_empty())
            .then(|| TenantId::parse(&key))
            .transpose()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
        route,
        backend,
        client,
        count: count.max(0) as u64,
        last_at: Timestamp::from_unix_millis(last_at),
        configured,
    })
}
