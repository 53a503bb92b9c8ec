//! Tenants born from billing events: a signed webhook, a job per event id, and
//! steps that are each safe to run again.
//!
//! A delivery is checked first (HMAC-SHA256 over `timestamp.body` in the
//! `t=…,v1=…` header form, within a tolerance, compared in constant time), then
//! recorded as a job keyed by the event's id — of any number of deliveries of one
//! event, concurrent or not, exactly one creates the job — and only then carried
//! out, step by step, each step's completion written to the job. A step that
//! fails leaves the job pending with its error; the resumer (and `ficus provision
//! retry`) runs pending jobs again, so a crash between steps is finished later.
//! Every step is idempotent: the tenant's id is written to the job before the
//! tenant is created, the configuration is written only over version 0, and the
//! database step is an upsert.

use std::sync::Arc;
use std::time::Duration;

use ficus_core::{Actor, Domain, Stage, TenantId};
use ficus_store::{
    ConfigChange, ControlStore, JobState, NewTenant, ProvisionJob, StoreError, SuspendChange,
};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::config;
use crate::{Error, Result};

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "ficus-signature";

/// How old a signed timestamp may be (either way) before a delivery is refused
/// as a replay.
pub const TOLERANCE_SECS: i64 = 300;

/// The setting the event mapping is stored under.
pub const SETTING: &str = "provisioning";

/// Where the secret and the tenant database come from.
#[derive(Clone, Default)]
pub struct Hooks {
    /// The shared secret of the billing webhook; without one the hook answers
    /// 503 (not configured).
    pub secret: Option<Arc<[u8]>>,
    /// The tenant database (`ficus db tenant add`); without one that step is
    /// skipped.
    pub database_url: Option<String>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("secret", &self.secret.as_ref().map(|_| "(set)"))
            .field(
                "database_url",
                &self.database_url.as_deref().map(ficus_retrofit::location),
            )
            .finish()
    }
}

impl Hooks {
    /// `FICUS_BILLING_SECRET` and `FICUS_TENANT_DB_URL`.
    pub fn from_env() -> Hooks {
        Hooks {
            secret: std::env::var("FICUS_BILLING_SECRET")
                .ok()
                .filter(|s| !s.is_empty())
                .map(|s| Arc::from(s.into_bytes())),
            database_url: std::env::var("FICUS_TENANT_DB_URL")
                .ok()
                .filter(|s| !s.is_empty()),
        }
    }
}

/// Why a delivery's signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the {SIGNATURE_HEADER} header is missing")]
    Missing,
    #[error("the {SIGNATURE_HEADER} header is not t=TIMESTAMP,v1=HEX")]
    Malformed,
    #[error(
        "the signature's timestamp is {0} s away from now (at most {TOLERANCE_SECS} s): a replay or a wrong clock"
    )]
    Stale(i64),
    #[error("the signature does not match the body")]
    Mismatch,
}

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts a key of any length; this cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("hmac takes any key length");
    m.update(timestamp.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m
}

/// The header value a sender puts on `body` at `timestamp`.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let tag = mac(secret, timestamp, body).finalize().into_bytes();
    let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={timestamp},v1={hex}")
}

/// Checks a delivery: the header's timestamp within the tolerance of `now`, and
/// one of its `v1` signatures matching (in constant time).
pub fn verify(
    header: Option<&str>,
    body: &[u8],
    secret: &[u8],
    now: i64,
) -> std::result::Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => {
                timestamp = Some(v.parse::<i64>().map_err(|_| SignatureError::Malformed)?);
            }
            Some(("v1", v)) => signatures.push(unhex(v).ok_or(SignatureError::Malformed)?),
            Some(_) => {}
            None => return Err(SignatureError::Malformed),
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    let age = (now - timestamp).abs();
    if age > TOLERANCE_SECS {
        return Err(SignatureError::Stale(age));
    }
    if signatures
        .iter()
        .any(|s| mac(secret, timestamp, body).verify_slice(s).is_ok())
    {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// How billing events map onto tenants: the event types that create and cancel,
/// where each field is (dotted paths into the event), how new tenants start,
/// and the configuration template they get.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mapping {
    pub created: Vec<String>,
    pub cancelled: Vec<String>,
    pub event_id: String,
    pub event_type: String,
    /// Where the tenant's id is; without it (or when the event has none) the
    /// id is the name, slugified, made unique.
    pub tenant_id: Option<String>,
    pub name: String,
    pub domain: Option<String>,
    /// New tenants start on the new backend (they always do once legacy is
    /// retired).
    pub start_on_new: bool,
    /// Configuration every new tenant starts from; the event's name and domain
    /// are written over it.
    pub template: Value,
}

impl Default for Mapping {
    fn default() -> Mapping {
        Mapping {
            created: vec!["subscription.created".into()],
            cancelled: vec![
                "subscription.cancelled".into(),
                "subscription.deleted".into(),
            ],
            event_id: "id".into(),
            event_type: "type".into(),
            tenant_id: Some("data.tenant_id".into()),
            name: "data.customer.name".into(),
            domain: Some("data.domain".into()),
            start_on_new: false,
            template: json!({"locale": "en", "features": {}}),
        }
    }
}

impl Mapping {
    pub async fn load(store: &dyn ControlStore) -> Result<Mapping> {
        match store.setting(SETTING).await? {
            None => Ok(Mapping::default()),
            Some(text) => serde_json::from_str(&text)
                .map_err(|e| Error::Store(StoreError::Corrupt(format!("setting {SETTING}: {e}")))),
        }
    }
}

fn field<'a>(event: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(event, |v, key| v.get(key))
}

fn text(event: &Value, path: &str) -> Option<String> {
    field(event, path)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// What a delivery turned out to be: its job, new or found for an event
/// delivered before (`duplicate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub job: ProvisionJob,
    pub duplicate: bool,
}

/// Why a delivery was refused before anything was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the body is not JSON: {0}")]
    Malformed(String),
    #[error("the event has no {0:?} (a non-empty string of at most 200 characters)")]
    MissingField(String),
    #[error("event type {0:?} is neither a creation nor a cancellation")]
    UnknownType(String),
}

/// Records a verified delivery as a job (once per event id) and, if this call
/// created it, carries it out.
pub async fn receive(
    store: &Arc<dyn ControlStore>,
    hooks: &Hooks,
    body: &[u8],
) -> Result<std::result::Result<Received, Refusal>> {
    let event: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return Ok(Err(Refusal::Malformed("not an object".into()))),
        Err(e) => return Ok(Err(Refusal::Malformed(e.to_string()))),
    };
    let mapping = Mapping::load(&**store).await?;
    let Some(id) = text(&event, &mapping.event_id).filter(|i| i.chars().count() <= 200) else {
        return Ok(Err(Refusal::MissingField(mapping.event_id)));
    };
    let Some(kind) = text(&event, &mapping.event_type) else {
        return Ok(Err(Refusal::MissingField(mapping.event_type)));
    };
    let kind = if mapping.created.contains(&kind) {
        "create"
    } else if mapping.cancelled.contains(&kind) {
        "cancel"
    } else {
        return Ok(Err(Refusal::UnknownType(kind)));
    };
    let payload = String::from_utf8_lossy(body);
    let (job, created) = store.claim_provision_job(&id, kind, &payload).await?;
    if !created {
        return Ok(Ok(Received {
            job,
            duplicate: true,
        }));
    }
    let job = run_with(store, hooks, &mapping, job).await?;
    Ok(Ok(Received {
        job,
        duplicate: false,
    }))
}

/// The steps of a job's kind, in order.
fn steps(kind: &str) -> &'static [&'static str] {
    match kind {
        "create" => &["tenant", "config", "database"],
        _ => &["suspend"],
    }
}

/// Carries out a job's remaining steps, writing each one's completion; a
/// failing step leaves the job pending with the error (or failed, when the
/// event itself cannot be carried out).
pub async fn run(
    store: &Arc<dyn ControlStore>,
    hooks: &Hooks,
    job: ProvisionJob,
) -> Result<ProvisionJob> {
    if job.state != JobState::Pending {
        return Ok(job);
    }
    let mapping = Mapping::load(&**store).await?;
    run_with(store, hooks, &mapping, job).await
}

/// [`run`] with the mapping its caller has already read.
async fn run_with(
    store: &Arc<dyn ControlStore>,
    hooks: &Hooks,
    mapping: &Mapping,
    mut job: ProvisionJob,
) -> Result<ProvisionJob> {
    if job.state != JobState::Pending {
        return Ok(job);
    }
    let event: Value = serde_json::from_str(&job.payload).unwrap_or(Value::Null);
    job.attempts += 1;
    for step in steps(&job.kind) {
        if job.steps.iter().any(|s| s == step) {
            continue;
        }
        match run_step(store, hooks, mapping, &event, &mut job, step).await {
            Ok(done) => {
                // The tenant's creation and suspension are audited by the store
                // as they happen; the other steps of a billing event get a note
                // of their own (an operator's addition is audited as such, and
                // its configuration is in the configuration's history). A step
                // another runner had done already says nothing again.
                let billing = !job.event_id.starts_with(MANUAL);
                if let (true, Done::Now, Some(tenant), Some(what)) =
                    (billing, done, &job.tenant, step_note(step, hooks))
                {
                    store
                        .note(
                            tenant,
                            Actor::Provisioning,
                            &format!("{what}, from {}", job_source(&job)),
                        )
                        .await?;
                }
                job.steps.push(step.to_string());
                job.last_error = None;
                store.update_provision_job(&job).await?;
            }
            Err(StepError::Retry(e)) => {
                job.last_error = Some(format!("{step}: {e}"));
                store.update_provision_job(&job).await?;
                return Ok(job);
            }
            Err(StepError::GiveUp(e)) => {
                job.last_error = Some(format!("{step}: {e}"));
                job.state = JobState::Failed;
                store.update_provision_job(&job).await?;
                return Ok(job);
            }
        }
    }
    job.state = JobState::Done;
    store.update_provision_job(&job).await?;
    Ok(job)
}

/// Where a job came from, for audit reasons.
fn job_source(job: &ProvisionJob) -> String {
    if job.event_id.starts_with(MANUAL) {
        "the tenant's addition by an operator".to_string()
    } else {
        format!("billing event {}", job.event_id)
    }
}

/// The audit note of a finished step, for the steps the store does not audit
/// by itself.
fn step_note(step: &str, hooks: &Hooks) -> Option<&'static str> {
    match step {
        "config" => Some("provisioning: initial configuration written"),
        "database" if hooks.database_url.is_some() => {
            Some("provisioning: organization added to the tenant database")
        }
        // Without a tenant database the step does nothing, and says nothing.
        _ => None,
    }
}

/// Whether a step changed anything, or found its work done (by an earlier,
/// interrupted run, or by another runner of the same job).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    Now,
    Before,
}

enum StepError {
    /// Worth another attempt (the store or the database was unavailable).
    Retry(String),
    /// The event cannot be carried out as it is.
    GiveUp(String),
}

impl From<StoreError> for StepError {
    fn from(e: StoreError) -> StepError {
        StepError::Retry(e.to_string())
    }
}

async fn run_step(
    store: &Arc<dyn ControlStore>,
    hooks: &Hooks,
    mapping: &Mapping,
    event: &Value,
    job: &mut ProvisionJob,
    step: &str,
) -> std::result::Result<Done, StepError> {
    let name = text(event, &mapping.name);
    let reason = job_source(job);
    match step {
        "tenant" => {
            if job.tenant.is_none() {
                let id = choose_id(store, mapping, event, name.as_deref()).await?;
                // The id is the job's before the tenant exists, so that a run
                // interrupted after creating it knows the tenant is its own.
                // The store keeps the first id bound to the job: a second
                // runner (the resumer, on this replica or another, beside the
                // delivery that created the job) that read the job before the
                // first bound it, and so chose `name-2` for the tenant the
                // first had just made, reads back the first's id and makes no
                // second tenant (regression: the soak's seed 1).
                job.tenant = Some(id.clone());
                store.update_provision_job(job).await?;
                let bound = store
                    .provision_job(&job.event_id)
                    .await?
                    .and_then(|j| j.tenant);
                job.tenant = Some(bound.unwrap_or(id));
            }
            let Some(id) = job.tenant.clone() else {
                return Err(StepError::GiveUp("no tenant".into()));
            };
            if store.tenant(&id).await?.is_some() {
                return Ok(Done::Before);
            }
            let stage = if mapping.start_on_new || store.legacy_retired().await? {
                Stage::Migrated
            } else {
                Stage::Legacy
            };
            let tenant = NewTenant {
                id: id.clone(),
                name: name.clone().unwrap_or_else(|| id.to_string()),
                stage,
                domains: Vec::new(),
            };
            match store
                .add_tenant(
                    tenant,
                    Actor::Provisioning,
                    &format!("provisioned from {reason}"),
                )
                .await
            {
                Ok(_) => Ok(Done::Now),
                Err(StoreError::TenantExists(_)) => Ok(Done::Before),
                Err(e) => Err(e.into()),
            }
        }
        "config" => {
            let id = job
                .tenant
                .clone()
                .ok_or_else(|| StepError::GiveUp("no tenant".into()))?;
            if store.tenant_config(&id, None).await?.is_some() {
                return Ok(Done::Before);
            }
            let mut doc = if mapping.template.is_object() {
                mapping.template.clone()
            } else {
                json!({})
            };
            let display = name.clone().unwrap_or_else(|| id.to_string());
            doc["display_name"] = json!(display);
            if doc.get("app_name").is_none_or(Value::is_null) {
                doc["app_name"] = json!(display.chars().take(50).collect::<String>());
            }
            // One domain from a billing event, or every domain of a tenant
            // added by hand.
            let domains: Vec<String> = match mapping.domain.as_deref().and_then(|p| field(event, p))
            {
                Some(Value::String(d)) => vec![d.clone()],
                Some(Value::Array(items)) => items
                    .iter()
                    .filter_map(|d| d.as_str().map(str::to_string))
                    .collect(),
                _ => Vec::new(),
            };
            for d in &domains {
                Domain::parse(d).map_err(|e| StepError::GiveUp(e.to_string()))?;
            }
            if !domains.is_empty() {
                doc["domains"] = json!(domains);
            }
            let parsed = config::parse(&doc).map_err(|e| StepError::GiveUp(e.to_string()))?;
            let change = ConfigChange {
                tenant: id,
                document: config::to_json(&parsed).to_string(),
                domains: parsed.domains.clone(),
                expected_version: 0,
                actor: Actor::Provisioning,
                reason: format!("initial configuration from {reason}"),
            };
            match store.set_tenant_config(change).await {
                Ok(_) => Ok(Done::Now),
                Err(StoreError::ConfigStale { .. }) => Ok(Done::Before),
                Err(e @ StoreError::DomainTaken { .. }) => Err(StepError::GiveUp(e.to_string())),
                Err(e) => Err(e.into()),
            }
        }
        "database" => {
            let Some(url) = &hooks.database_url else {
                return Ok(Done::Before);
            };
            let id = job
                .tenant
                .clone()
                .ok_or_else(|| StepError::GiveUp("no tenant".into()))?;
            let display = name.unwrap_or_else(|| id.to_string());
            let client = ficus_retrofit::connect(url)
                .await
                .map_err(|e| StepError::Retry(e.to_string()))?;
            // An upsert: done again, it changes nothing, and is noted again
            // only when two runners of one job overlap (the resumer leaves a
            // job its runner touched within RUNNER_GRACE alone).
            ficus_retrofit::apply::add_tenant(&client, id.as_str(), &display)
                .await
                .map_err(|e| StepError::Retry(e.to_string()))?;
            Ok(Done::Now)
        }
        "suspend" => {
            let id = match (&job.tenant, &mapping.tenant_id) {
                (Some(id), _) => id.clone(),
                (None, Some(path)) if text(event, path).is_some() => {
                    let raw = text(event, path).expect("checked");
                    TenantId::parse(&raw).map_err(|e| StepError::GiveUp(e.to_string()))?
                }
                _ => {
                    let name = name.ok_or_else(|| {
                        StepError::GiveUp(format!("the event names no tenant ({})", mapping.name))
                    })?;
                    TenantId::parse(&slug(&name)).map_err(|e| StepError::GiveUp(e.to_string()))?
                }
            };
            job.tenant = Some(id.clone());
            let change = SuspendChange {
                tenant: id,
                suspended: true,
                actor: Actor::Provisioning,
                reason: format!("subscription ended, {reason}"),
            };
            match store.set_suspended(change).await {
                Ok(_) => Ok(Done::Now),
                Err(e @ StoreError::UnknownTenant(_)) => Err(StepError::GiveUp(e.to_string())),
                Err(e) => Err(e.into()),
            }
        }
        other => Err(StepError::GiveUp(format!("unknown step {other}"))),
    }
}

/// The event id prefix of a tenant added by hand.
pub const MANUAL: &str = "manual:";

/// Finishes a tenant an operator added (`ficus tenant add`, `POST /v1/tenants`)
/// the way a billing event finishes one, so that the two are alike: its
/// configuration from the template and its organization in the tenant
/// database, as the job `manual:<id>` (which the resumer retries if a step
/// fails). The tenant itself already exists.
pub async fn finish_manual(
    store: &Arc<dyn ControlStore>,
    hooks: &Hooks,
    tenant: &ficus_core::Tenant,
) -> Result<ProvisionJob> {
    let mapping = Mapping::load(&**store).await?;
    let event_id = format!("{MANUAL}{}", tenant.id);
    let mut event = json!({});
    set_path(&mut event, &mapping.event_id, json!(event_id));
    if let Some(kind) = mapping.created.first() {
        set_path(&mut event, &mapping.event_type, json!(kind));
    }
    set_path(&mut event, &mapping.name, json!(tenant.name));
    if let Some(path) = &mapping.tenant_id {
        set_path(&mut event, path, json!(tenant.id.as_str()));
    }
    if let Some(path) = &mapping.domain {
        let domains: Vec<&str> = tenant.domains.iter().map(Domain::as_str).collect();
        set_path(&mut event, path, json!(domains));
    }
    let (mut job, created) = store
        .claim_provision_job(&event_id, "create", &event.to_string())
        .await?;
    if created {
        job.tenant = Some(tenant.id.clone());
        job.steps = vec!["tenant".to_string()];
        store.update_provision_job(&job).await?;
    }
    run_with(store, hooks, &mapping, job).await
}

/// Sets a dotted path in a JSON object, making the objects on the way.
fn set_path(doc: &mut Value, path: &str, value: Value) {
    let mut at = doc;
    let parts: Vec<&str> = path.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        if !at.get(*p).is_some_and(Value::is_object) {
            at[*p] = json!({});
        }
        at = &mut at[*p];
    }
    at[parts[parts.len() - 1]] = value;
}

/// The new tenant's id: the event's, or its name slugified, with `-2`, `-3`…
/// until it is free.
async fn choose_id(
    store: &Arc<dyn ControlStore>,
    mapping: &Mapping,
    event: &Value,
    name: Option<&str>,
) -> std::result::Result<TenantId, StepError> {
    if let Some(raw) = mapping.tenant_id.as_deref().and_then(|p| text(event, p)) {
        return TenantId::parse(&raw).map_err(|e| StepError::GiveUp(e.to_string()));
    }
    let name = name
        .ok_or_else(|| StepError::GiveUp(format!("the event has no name at {}", mapping.name)))?;
    let base = slug(name);
    if base.is_empty() {
        return Err(StepError::GiveUp(format!(
            "the name {name:?} has no letters or digits to make an id from"
        )));
    }
    for n in 1..1000 {
        let candidate = if n == 1 {
            base.clone()
        } else {
            format!("{base}-{n}")
        };
        let id = TenantId::parse(&candidate).map_err(|e| StepError::GiveUp(e.to_string()))?;
        if store.tenant(&id).await?.is_none() {
            return Ok(id);
        }
    }
    Err(StepError::GiveUp(format!("no free id for {name:?}")))
}

/// Lowercase letters, digits and single hyphens, at most 40 characters.
fn slug(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    out.truncate(40);
    out.trim_end_matches('-').to_string()
}

/// How long the resumer leaves a pending job alone after it was last written:
/// a job written more recently than this is taken to be in the hands of the
/// runner that wrote it (the delivery that created it, or another replica's
/// resumer), and running it beside that runner would only do its steps twice.
pub const RUNNER_GRACE: Duration = Duration::from_secs(10);

/// Runs every pending job now and then, so that a job interrupted by a crash
/// or held up by an unavailable database is finished. Stops at `shutdown`.
/// A job is left to its runner for [`RUNNER_GRACE`] after its last write;
/// were two runners to overlap all the same, every step is safe to run twice
/// and the job's tenant is the one bound to it first.
pub async fn resume(
    store: Arc<dyn ControlStore>,
    hooks: Hooks,
    every: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        match store.provision_jobs(Some(JobState::Pending), 100).await {
            Ok(jobs) => {
                let idle_since = crate::ops::now().unix_millis() - RUNNER_GRACE.as_millis() as i64;
                for job in jobs
                    .into_iter()
                    .filter(|j| j.updated_at.unix_millis() <= idle_since)
                {
                    let id = job.event_id.clone();
                    if let Err(e) = run(&store, &hooks, job).await {
                        tracing::warn!(event = %id, error = %e, "provisioning: a job could not be run");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "provisioning: cannot list pending jobs"),
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_checked_for_time_shape_and_content() {
        let body = br#"{"id":"evt_1"}"#;
        let good = sign(b"whsec", 1_000, body);
        let check = |header: Option<&str>, body: &[u8], now: i64| {
            verify(header, body, b"whsec", now).map_err(|e| e.to_string())
        };
        assert_eq!(check(Some(&good), body, 1_000), Ok(()));
        assert_eq!(check(Some(&good), body, 1_300), Ok(()));
        assert_eq!(
            check(Some(&good), body, 1_301),
            Err("the signature's timestamp is 301 s away from now (at most 300 s): a replay or a wrong clock".into())
        );
        assert_eq!(
            check(Some(&good), br#"{"id":"evt_2"}"#, 1_000),
            Err("the signature does not match the body".into())
        );
        assert_eq!(
            check(None, body, 1_000),
            Err("the ficus-signature header is missing".into())
        );
        assert_eq!(
            check(Some("v1=abcd"), body, 1_000),
            Err("the ficus-signature header is not t=TIMESTAMP,v1=HEX".into())
        );
        assert_eq!(
            check(Some("t=1000,v1=zz"), body, 1_000),
            Err("the ficus-signature header is not t=TIMESTAMP,v1=HEX".into())
        );
        // A rotated secret: the sender signs with both, either matches.
        let old = sign(b"old", 1_000, body);
        let both = format!("{good},{}", old.split(',').nth(1).unwrap());
        assert_eq!(check(Some(&both), body, 1_000), Ok(()));
        assert_eq!(
            verify(Some(&old), body, b"whsec", 1_000),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn names_become_ids() {
        assert_eq!(slug("Acme Homes, Inc."), "acme-homes-inc");
        assert_eq!(slug("  Ümlaut & Co "), "mlaut-co");
        assert_eq!(slug("!!!"), "");
    }
}
