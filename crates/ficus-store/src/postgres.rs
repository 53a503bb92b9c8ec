//! The shared store: PostgreSQL, for several proxy replicas and operators at once.
//!
//! Every write transaction starts by advancing the one-row change counter, whose row
//! lock is held until commit. That serializes writers (the control plane writes
//! rarely, so this costs nothing that matters) and makes change positions and audit
//! sequence numbers follow commit order. Each write ends with `pg_notify`, which
//! PostgreSQL delivers only once the transaction commits.
//!
//! The feed listens on its own connection (LISTEN cannot go through a pool) and also
//! re-reads the change log on a timer, so a notification lost with a dropped
//! connection heals within [`RESYNC_EVERY`].

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod};
use ficus_core::readiness::LatencyEvidence;
use ficus_core::reconcile::{ClassEvent, ClassEvidence, ClassState, MismatchClass};
use ficus_core::{Actor, AuditEvent, Domain, Progress, Route, Stage, Tenant, TenantId, Timestamp};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, GenericClient, NoTls, Row};

use crate::feed::{ChangeSet, FeedEvent, Subscription};
use crate::rules::{self, AuditRow, ConfigRow, JOB_COLUMNS, JobRow, NewEvent, TenantRow};
use crate::{
    AuditQuery, ClassChange, ClassCount, ComparisonCount, ConfigChange, ConfigVersion,
    ControlStore, EndpointCount, Evidence, GateEvidence, InitOutcome, JobState, LatencyReport,
    MismatchSample, NewTenant, NoiseEntry, OpenMode, ProvisionJob, Result, RouteChange, RouteCount,
    RouteEvent, RouteStage, SAMPLES_KEPT, SCHEMA_VERSION, Snapshot, StageChange, StoreError,
    StoreUrl, SuspendChange, TrafficCount, now,
};

/// How often the feed re-reads the change log even without a notification.
const RESYNC_EVERY: Duration = Duration::from_secs(5);
/// How many change-log entries are kept; a subscriber further behind resyncs.
const CHANGES_KEPT: i64 = 10_000;

/// An audit row as `SELECT seq, at, tenant_id, from_stage, to_stage, version,
/// actor, reason` returns it.
fn pg_audit_row(r: &tokio_postgres::Row) -> AuditRow {
    AuditRow {
        seq: r.get(0),
        at: r.get(1),
        tenant: r.get(2),
        from: r.get(3),
        to: r.get(4),
        version: r.get(5),
        actor: r.get(6),
        reason: r.get(7),
    }
}

/// Schema migrations; entry `i` brings the store from version `i` to `i + 1`. `{s}`
/// stands for the quoted schema name.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE {s}.meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE {s}.tenants (
    id         text PRIMARY KEY,
    name       text NOT NULL,
    stage      text NOT NULL CHECK (stage IN ('legacy', 'shadow', 'migrated')),
    version    bigint NOT NULL CHECK (version > 0),
    created_at bigint NOT NULL,
    updated_at bigint NOT NULL
);
CREATE TABLE {s}.tenant_domains (
    domain    text PRIMARY KEY,
    tenant_id text NOT NULL REFERENCES {s}.tenants (id)
);
CREATE INDEX tenant_domains_tenant ON {s}.tenant_domains (tenant_id);
CREATE TABLE {s}.audit_log (
    seq        bigserial PRIMARY KEY,
    at         bigint NOT NULL,
    tenant_id  text NOT NULL,
    from_stage text,
    to_stage   text NOT NULL,
    version    bigint NOT NULL,
    actor      text NOT NULL,
    reason     text NOT NULL
);
CREATE INDEX audit_log_tenant ON {s}.audit_log (tenant_id, seq);
CREATE INDEX audit_log_at ON {s}.audit_log (at);
CREATE FUNCTION {s}.audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {s}.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.audit_log_append_only();
CREATE TABLE {s}.change_counter (
    id    int PRIMARY KEY CHECK (id = 1),
    seq   bigint NOT NULL,
    floor bigint NOT NULL
);
INSERT INTO {s}.change_counter (id, seq, floor) VALUES (1, 0, 0);
CREATE TABLE {s}.changes (
    seq       bigint NOT NULL,
    tenant_id text
);
CREATE INDEX changes_seq ON {s}.changes (seq);
INSERT INTO {s}.meta (key, value) VALUES ('app', 'ficus');
"#,
    r#"
CREATE TABLE {s}.settings (
    key   text PRIMARY KEY,
    value text NOT NULL
);
INSERT INTO {s}.settings (key, value) VALUES ('legacy_retired', 'false');
CREATE TABLE {s}.global_audit (
    seq     bigserial PRIMARY KEY,
    at      bigint NOT NULL,
    setting text NOT NULL,
    value   text NOT NULL,
    actor   text NOT NULL,
    reason  text NOT NULL
);
CREATE TRIGGER global_audit_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {s}.global_audit
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.audit_log_append_only();
CREATE TABLE {s}.legacy_traffic (
    tenant_key text NOT NULL,
    hour       bigint NOT NULL,
    requests   bigint NOT NULL,
    last_at    bigint NOT NULL,
    PRIMARY KEY (tenant_key, hour)
);
CREATE INDEX legacy_traffic_last_at ON {s}.legacy_traffic (last_at);
CREATE TABLE {s}.traffic_reports (
    id       int PRIMARY KEY CHECK (id = 1),
    first_at bigint NOT NULL,
    last_at  bigint NOT NULL
);
"#,
    r#"
CREATE TABLE {s}.comparisons (
    tenant_id  text NOT NULL,
    endpoint   text NOT NULL,
    hour       bigint NOT NULL,
    last_at    bigint NOT NULL,
    requests   bigint NOT NULL,
    compared   bigint NOT NULL,
    matched    bigint NOT NULL,
    mismatched bigint NOT NULL,
    noise_only bigint NOT NULL,
    errors     bigint NOT NULL,
    shed       bigint NOT NULL,
    PRIMARY KEY (tenant_id, endpoint, hour)
);
CREATE TABLE {s}.mismatch_samples (
    seq             bigserial PRIMARY KEY,
    tenant_id       text NOT NULL,
    endpoint        text NOT NULL,
    at              bigint NOT NULL,
    method          text NOT NULL,
    path            text NOT NULL,
    served_by       text NOT NULL,
    compared_with   text NOT NULL,
    served_status   int NOT NULL,
    compared_status int NOT NULL,
    differences     text NOT NULL
);
CREATE INDEX mismatch_samples_tenant ON {s}.mismatch_samples (tenant_id, endpoint, seq);
CREATE TABLE {s}.noise_paths (
    endpoint     text NOT NULL,
    path         text NOT NULL,
    score        double precision NOT NULL,
    observations bigint NOT NULL,
    updated_at   bigint NOT NULL,
    PRIMARY KEY (endpoint, path)
);
"#,
    r#"
CREATE TABLE {s}.latencies (
    tenant_id text NOT NULL,
    backend   text NOT NULL,
    hour      bigint NOT NULL,
    bucket    int NOT NULL,
    count     bigint NOT NULL,
    PRIMARY KEY (tenant_id, backend, hour, bucket)
);
"#,
    r#"
CREATE TABLE {s}.tenant_configs (
    tenant_id text NOT NULL REFERENCES {s}.tenants (id),
    version   bigint NOT NULL CHECK (version > 0),
    document  text NOT NULL,
    at        bigint NOT NULL,
    actor     text NOT NULL,
    reason    text NOT NULL,
    PRIMARY KEY (tenant_id, version)
);
CREATE TRIGGER tenant_configs_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {s}.tenant_configs
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.audit_log_append_only();
"#,
    r#"
ALTER TABLE {s}.tenants ADD COLUMN suspended boolean NOT NULL DEFAULT false;
CREATE TABLE {s}.provision_jobs (
    event_id   text PRIMARY KEY,
    kind       text NOT NULL,
    payload    text NOT NULL,
    tenant_id  text,
    state      text NOT NULL CHECK (state IN ('pending', 'done', 'failed')),
    steps      text NOT NULL DEFAULT '',
    attempts   bigint NOT NULL DEFAULT 0,
    last_error text,
    created_at bigint NOT NULL,
    updated_at bigint NOT NULL
);
CREATE INDEX provision_jobs_state ON {s}.provision_jobs (state, created_at);
"#,
    r#"
ALTER TABLE {s}.comparisons ADD COLUMN version text NOT NULL DEFAULT '';
ALTER TABLE {s}.comparisons DROP CONSTRAINT comparisons_pkey;
ALTER TABLE {s}.comparisons ADD PRIMARY KEY (tenant_id, endpoint, version, hour);
ALTER TABLE {s}.mismatch_samples ADD COLUMN version text;
CREATE TABLE {s}.mismatch_classes (
    id                 text PRIMARY KEY,
    endpoint           text NOT NULL,
    path               text NOT NULL,
    kind               text NOT NULL,
    additive           boolean NOT NULL,
    state              text NOT NULL CHECK (state IN ('open', 'resolved', 'accepted')),
    epoch              bigint NOT NULL CHECK (epoch >= 0),
    first_seen         bigint NOT NULL,
    last_seen          bigint NOT NULL,
    resolved_at        bigint,
    fixed_in           text,
    regression         boolean NOT NULL DEFAULT false,
    example_at         bigint,
    example_request    text,
    example_version    text,
    example_difference text,
    change_at          bigint,
    change_action      text,
    change_actor       text,
    change_reason      text,
    change_version     text
);
CREATE TABLE {s}.mismatch_class_counts (
    tenant_id text NOT NULL,
    class_id  text NOT NULL,
    epoch     bigint NOT NULL,
    version   text NOT NULL,
    hour      bigint NOT NULL,
    count     bigint NOT NULL,
    first_at  bigint NOT NULL,
    last_at   bigint NOT NULL,
    PRIMARY KEY (tenant_id, hour, class_id, epoch, version)
);
CREATE INDEX mismatch_class_counts_hour ON {s}.mismatch_class_counts (hour);
CREATE TABLE {s}.mismatch_class_events (
    seq      bigserial PRIMARY KEY,
    at       bigint NOT NULL,
    class_id text NOT NULL,
    action   text NOT NULL,
    actor    text NOT NULL,
    reason   text NOT NULL,
    version  text
);
CREATE INDEX mismatch_class_events_class ON {s}.mismatch_class_events (class_id, seq);
CREATE TRIGGER mismatch_class_events_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {s}.mismatch_class_events
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.audit_log_append_only();
"#,
    r#"
CREATE TABLE {s}.route_stages (
    route      text NOT NULL,
    tenant_id  text NOT NULL,
    stage      text NOT NULL CHECK (stage IN ('legacy', 'shadow', 'migrated')),
    version    bigint NOT NULL CHECK (version > 0),
    updated_at bigint NOT NULL,
    PRIMARY KEY (route, tenant_id)
);
CREATE TABLE {s}.route_marks (
    route text PRIMARY KEY
);
CREATE TABLE {s}.route_events (
    seq        bigserial PRIMARY KEY,
    at         bigint NOT NULL,
    route      text NOT NULL,
    tenant_id  text NOT NULL,
    action     text NOT NULL,
    from_stage text,
    to_stage   text,
    version    bigint NOT NULL,
    actor      text NOT NULL,
    reason     text NOT NULL
);
CREATE INDEX route_events_route ON {s}.route_events (route, seq);
CREATE TRIGGER route_events_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {s}.route_events
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.audit_log_append_only();
CREATE TABLE {s}.route_census (
    tenant_key text NOT NULL,
    route      text NOT NULL,
    backend    text NOT NULL,
    client     text NOT NULL,
    hour       bigint NOT NULL,
    count      bigint NOT NULL,
    last_at    bigint NOT NULL,
    configured boolean NOT NULL,
    PRIMARY KEY (tenant_key, route, backend, client, hour)
);
CREATE INDEX route_census_hour ON {s}.route_census (hour);
-- A store that already has migrated tenants sent their writes to new before
-- routes had stages: they keep doing so until someone holds them on purpose.
INSERT INTO {s}.settings (key, value)
    SELECT 'route_write_default', 'migrated' WHERE EXISTS (SELECT 1 FROM {s}.tenants WHERE stage = 'migrated');
"#,
    r#"
-- Compared reads a write of the same tenant raced: counted, not judged.
ALTER TABLE {s}.comparisons ADD COLUMN raced bigint NOT NULL DEFAULT 0;
"#,
];

/// The PostgreSQL control store.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    config: tokio_postgres::Config,
    /// The schema name, already quoted as an identifier.
    schema: String,
    schema_name: String,
    /// The NOTIFY channel, unquoted (it is passed to `pg_notify` as a value).
    channel: String,
    location: String,
    outcome: InitOutcome,
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl PgStore {
    pub async fn open(url: &StoreUrl, mode: OpenMode) -> Result<PgStore> {
        let StoreUrl::Postgres {
            config,
            schema,
            location,
        } = url
        else {
            return Err(StoreError::BadUrl {
                url: format!("{url:?}"),
                why: "not a PostgreSQL url".into(),
            });
        };
        let mut config = (**config).clone();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config.application_name("ficus");
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(8)
            .build()
            .map_err(|e| StoreError::Backend {
                context: "building the connection pool".into(),
                detail: e.to_string(),
            })?;
        let mut inner = Inner {
            pool,
            config,
            schema: quote_ident(schema),
            schema_name: schema.clone(),
            channel: format!("ficus_changes_{schema}"),
            location: location.clone(),
            outcome: InitOutcome::AlreadyInitialized,
        };
        inner.outcome = inner.prepare(mode).await?;
        Ok(PgStore {
            inner: Arc::new(inner),
        })
    }
}

fn pg_detail(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

impl Inner {
    fn q(&self, sql: &str) -> String {
        sql.replace("{s}", &self.schema)
    }

    /// Writes a global setting and its audit entry (`shown` in place of the
    /// value, which may be a secret's hash), in the caller's transaction.
    async fn put_setting(
        &self,
        tx: &impl GenericClient,
        key: &str,
        value: &str,
        shown: &str,
        actor: Actor,
        reason: &str,
    ) -> Result<()> {
        tx.execute(
            &self.q("INSERT INTO {s}.settings (key, value) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value"),
            &[&key, &value],
        )
        .await
        .map_err(self.err("changing a setting"))?;
        tx.execute(
            &self.q("INSERT INTO {s}.global_audit (at, setting, value, actor, reason) VALUES ($1, $2, $3, $4, $5)"),
            &[&now().unix_millis(), &key, &shown, &actor.as_str(), &reason],
        )
        .await
        .map_err(self.err("appending to the audit log"))?;
        Ok(())
    }

    /// Where write routes nobody staged go.
    async fn load_write_default(&self, client: &impl GenericClient) -> Result<Stage> {
        let value: Option<String> = client
            .query_opt(
                &self.q("SELECT value FROM {s}.settings WHERE key = $1"),
                &[&rules::WRITE_DEFAULT],
            )
            .await
            .map_err(self.err("reading settings"))?
            .map(|r| r.get(0));
        rules::write_default(value.as_deref())
    }

    /// A class, locked for the rest of the transaction when `lock` is set.
    async fn load_class(
        &self,
        tx: &impl GenericClient,
        id: &str,
        lock: bool,
    ) -> Result<Option<MismatchClass>> {
        let sql = format!(
            "SELECT {} FROM {{s}}.mismatch_classes WHERE id = $1{}",
            rules::CLASS_COLUMNS,
            if lock { " FOR UPDATE" } else { "" }
        );
        tx.query_opt(&self.q(&sql), &[&id])
            .await
            .map_err(self.err("reading a mismatch class"))?
            .map(|r| rules::class_from_row(class_row(&r)))
            .transpose()
    }

    /// Writes a class's lifecycle columns and appends the change to its history.
    async fn write_class(
        &self,
        tx: &impl GenericClient,
        c: &MismatchClass,
        event: &ClassEvent,
    ) -> Result<()> {
        tx.execute(
            &self.q(
                "UPDATE {s}.mismatch_classes SET state = $2, epoch = $3, resolved_at = $4, fixed_in = $5, regression = $6,
                     change_at = $7, change_action = $8, change_actor = $9, change_reason = $10, change_version = $11
                 WHERE id = $1",
            ),
            &[
                &c.id,
                &c.state.as_str(),
                &(c.epoch as i64),
                &c.resolved_at.map(Timestamp::unix_millis),
                &c.fixed_in,
                &c.regression,
                &event.at.unix_millis(),
                &event.action,
                &event.actor.as_str(),
                &event.reason,
                &event.version,
            ],
        )
        .await
        .map_err(self.err("changing a mismatch class"))?;
        tx.execute(
            &self.q("INSERT INTO {s}.mismatch_class_events (at, class_id, action, actor, reason, version) VALUES ($1, $2, $3, $4, $5, $6)"),
            &[&event.at.unix_millis(), &c.id, &event.action, &event.actor.as_str(), &event.reason, &event.version],
        )
        .await
        .map_err(self.err("changing a mismatch class"))?;
        Ok(())
    }

    /// Creates or updates a reported class (which locks it until commit, so a
    /// concurrent resolution waits or is waited for), reopens it if the evidence
    /// came after its resolution, and adds the count under its epoch.
    async fn record_class(
        &self,
        tx: &impl GenericClient,
        c: &ClassCount,
        at: Timestamp,
    ) -> Result<()> {
        let example = c.example.as_ref();
        tx.execute(
            &self.q(
                "INSERT INTO {s}.mismatch_classes AS m (id, endpoint, path, kind, additive, state, epoch, first_seen, last_seen,
                     example_at, example_request, example_version, example_difference)
                 VALUES ($1, $2, $3, $4, $5, 'open', 0, $6, $7, $8, $9, $10, $11)
                 ON CONFLICT (id) DO UPDATE SET
                     first_seen = least(m.first_seen, excluded.first_seen), last_seen = greatest(m.last_seen, excluded.last_seen),
                     additive = excluded.additive,
                     example_at = coalesce(excluded.example_at, m.example_at),
                     example_request = coalesce(excluded.example_request, m.example_request),
                     example_version = CASE WHEN excluded.example_at IS NULL THEN m.example_version ELSE excluded.example_version END,
                     example_difference = coalesce(excluded.example_difference, m.example_difference)",
            ),
            &[
                &c.id,
                &c.endpoint,
                &c.path,
                &c.kind,
                &c.additive,
                &c.first_at.unix_millis(),
                &c.last_at.unix_millis(),
                &example.map(|e| e.at.unix_millis()),
                &example.map(|e| e.request.as_str()),
                &example.and_then(|e| e.version.as_deref()),
                &example.map(|e| e.difference.as_str()),
            ],
        )
        .await
        .map_err(self.err("recording a mismatch class"))?;
        let class = self
            .load_class(tx, &c.id, false)
            .await?
            .ok_or_else(|| StoreError::UnknownClass(c.id.clone()))?;
        let (epoch, reopened) = rules::place_evidence(&class, c, at);
        if let Some((reopened, event)) = reopened {
            self.write_class(tx, &reopened, &event).await?;
        }
        tx.execute(
            &self.q(
                "INSERT INTO {s}.mismatch_class_counts AS n (tenant_id, class_id, epoch, version, hour, count, first_at, last_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (tenant_id, hour, class_id, epoch, version) DO UPDATE SET
                     count = n.count + excluded.count, first_at = least(n.first_at, excluded.first_at),
                     last_at = greatest(n.last_at, excluded.last_at)",
            ),
            &[
                &c.tenant.as_str(),
                &c.id,
                &epoch,
                &c.version,
                &rules::hour_of(c.last_at),
                &(c.count as i64),
                &c.first_at.unix_millis(),
                &c.last_at.unix_millis(),
            ],
        )
        .await
        .map_err(self.err("recording mismatch evidence"))?;
        Ok(())
    }

    fn err(&self, context: &str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
        let context = format!("{context} ({})", self.location);
        move |e| {
            if e.is_closed() || e.as_db_error().is_none() && e.code().is_none() {
                StoreError::Unreachable {
                    location: context,
                    detail: pg_detail(&e),
                }
            } else {
                StoreError::Backend {
                    context,
                    detail: pg_detail(&e),
                }
            }
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| StoreError::Unreachable {
            location: self.location.clone(),
            detail: match e {
                PoolError::Backend(e) => pg_detail(&e),
                other => other.to_string(),
            },
        })
    }

    /// Checks what the schema holds, and creates or migrates it when allowed.
    async fn prepare(&self, mode: OpenMode) -> Result<InitOutcome> {
        let client = self.client().await?;
        let found = self.schema_version(&**client).await?;
        match found {
            None if mode == OpenMode::Existing => {
                return Err(StoreError::NotInitialized {
                    location: self.location_with_schema(),
                });
            }
            Some(v) if v > SCHEMA_VERSION => {
                return Err(StoreError::NewerSchema {
                    location: self.location_with_schema(),
                    found: v,
                    supported: SCHEMA_VERSION,
                });
            }
            Some(v) if v == SCHEMA_VERSION => return Ok(InitOutcome::AlreadyInitialized),
            _ => {}
        }
        drop(client);
        self.migrate().await
    }

    fn location_with_schema(&self) -> String {
        format!("{} (schema {})", self.location, self.schema_name)
    }

    async fn schema_version(&self, client: &impl GenericClient) -> Result<Option<i64>> {
        let row = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1),
                        to_regclass(format('%I.meta', $1::text)) IS NOT NULL,
                        (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                          WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v'))",
                &[&self.schema_name],
            )
            .await
            .map_err(self.err("reading the schema"))?;
        let (schema_exists, has_meta, relations): (bool, bool, i64) =
            (row.get(0), row.get(1), row.get(2));
        if !schema_exists {
            return Ok(None);
        }
        if !has_meta {
            if relations > 0 {
                return Err(StoreError::NotAFicusStore {
                    location: self.location_with_schema(),
                    detail: "the schema holds tables ficus did not create".into(),
                });
            }
            return Ok(None);
        }
        let rows = client
            .query(
                &self.q("SELECT key, value FROM {s}.meta WHERE key IN ('app', 'schema_version')"),
                &[],
            )
            .await
            .map_err(self.err("reading the store's metadata"))?;
        let meta: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        if meta.get("app").map(String::as_str) != Some("ficus") {
            return Err(StoreError::NotAFicusStore {
                location: self.location_with_schema(),
                detail: "its meta table does not name ficus".into(),
            });
        }
        let version = meta.get("schema_version").cloned().unwrap_or_default();
        version
            .parse()
            .map(Some)
            .map_err(|_| StoreError::Corrupt(format!("schema version {version:?}")))
    }

    async fn migrate(&self) -> Result<InitOutcome> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(self.err("starting the schema migration"))?;
        // Two `ficus init` at once must not both create the schema.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('ficus-schema:' || $1))",
            &[&self.schema_name],
        )
        .await
        .map_err(self.err("locking the schema migration"))?;
        let from = self.schema_version(&*tx).await?.unwrap_or(0);
        if from > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                location: self.location_with_schema(),
                found: from,
                supported: SCHEMA_VERSION,
            });
        }
        for sql in &MIGRATIONS[from as usize..] {
            tx.batch_execute(&self.q(sql))
                .await
                .map_err(self.err("migrating the schema"))?;
        }
        tx.execute(
            &self.q(
                "INSERT INTO {s}.meta (key, value) VALUES ('schema_version', $1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            ),
            &[&SCHEMA_VERSION.to_string()],
        )
        .await
        .map_err(self.err("recording the schema version"))?;
        tx.commit()
            .await
            .map_err(self.err("committing the schema"))?;
        Ok(match from {
            0 => InitOutcome::Created,
            v if v == SCHEMA_VERSION => InitOutcome::AlreadyInitialized,
            v => InitOutcome::Upgraded { from: v },
        })
    }

    /// Advances the change counter (taking the writers' lock until commit) and
    /// prunes old entries now and then.
    async fn next_seq(&self, tx: &impl GenericClient) -> Result<i64> {
        let seq: i64 = tx
            .query_one(
                &self.q("UPDATE {s}.change_counter SET seq = seq + 1 WHERE id = 1 RETURNING seq"),
                &[],
            )
            .await
            .map_err(self.err("advancing the change log"))?
            .get(0);
        if seq % 1000 == 0 && seq > CHANGES_KEPT {
            let floor = seq - CHANGES_KEPT;
            tx.execute(
                &self.q("DELETE FROM {s}.changes WHERE seq <= $1"),
                &[&floor],
            )
            .await
            .map_err(self.err("pruning the change log"))?;
            tx.execute(
                &self.q("UPDATE {s}.change_counter SET floor = $1 WHERE id = 1"),
                &[&floor],
            )
            .await
            .map_err(self.err("pruning the change log"))?;
        }
        Ok(seq)
    }

    /// Records a change and queues its notification, delivered at commit.
    async fn record_change(
        &self,
        tx: &impl GenericClient,
        seq: i64,
        tenant: Option<&str>,
    ) -> Result<()> {
        tx.execute(
            &self.q("INSERT INTO {s}.changes (seq, tenant_id) VALUES ($1, $2)"),
            &[&seq, &tenant],
        )
        .await
        .map_err(self.err("recording a change"))?;
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&self.channel, &seq.to_string()],
        )
        .await
        .map_err(self.err("notifying subscribers"))?;
        Ok(())
    }

    async fn append_audit(&self, tx: &impl GenericClient, e: NewEvent<'_>) -> Result<()> {
        tx.execute(
            &self.q(
                "INSERT INTO {s}.audit_log (at, tenant_id, from_stage, to_stage, version, actor, reason)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            ),
            &[
                &e.at,
                &e.tenant,
                &e.from.map(Stage::as_str),
                &e.to.as_str(),
                &(e.version as i64),
                &e.actor.as_str(),
                &e.reason,
            ],
        )
        .await
        .map_err(self.err("appending to the audit log"))?;
        Ok(())
    }

    /// The tail of every change to an existing tenant: its audit entry, its
    /// change-log row, and the tenant as it now is.
    async fn finish_tenant_change(
        &self,
        tx: &impl GenericClient,
        seq: i64,
        tenant: &TenantId,
        event: NewEvent<'_>,
    ) -> Result<Tenant> {
        self.append_audit(tx, event).await?;
        self.record_change(tx, seq, Some(tenant.as_str())).await?;
        self.load_tenant(tx, tenant.as_str())
            .await?
            .ok_or_else(|| StoreError::UnknownTenant(tenant.clone()))
    }

    async fn domain_owners(
        &self,
        client: &impl GenericClient,
        domains: &[&str],
    ) -> Result<HashMap<String, String>> {
        let rows = client
            .query(
                &self.q("SELECT domain, tenant_id FROM {s}.tenant_domains WHERE domain = ANY($1)"),
                &[&domains],
            )
            .await
            .map_err(self.err("checking domains"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn insert_tenants(
        &self,
        tx: &impl GenericClient,
        tenants: &[NewTenant],
        at: i64,
    ) -> Result<()> {
        let ids: Vec<&str> = tenants.iter().map(|t| t.id.as_str()).collect();
        let names: Vec<&str> = tenants.iter().map(|t| t.name.as_str()).collect();
        let stages: Vec<&str> = tenants.iter().map(|t| t.stage.as_str()).collect();
        tx.execute(
            &self.q(
                "INSERT INTO {s}.tenants (id, name, stage, version, created_at, updated_at)
                 SELECT id, name, stage, 1, $4, $4 FROM unnest($1::text[], $2::text[], $3::text[]) AS t (id, name, stage)",
            ),
            &[&ids, &names, &stages, &at],
        )
        .await
        .map_err(self.err("adding tenants"))?;
        let (mut d_names, mut d_owners) = (Vec::new(), Vec::new());
        for t in tenants {
            for d in &t.domains {
                d_names.push(d.as_str());
                d_owners.push(t.id.as_str());
            }
        }
        if !d_names.is_empty() {
            tx.execute(
                &self.q("INSERT INTO {s}.tenant_domains (domain, tenant_id) SELECT * FROM unnest($1::text[], $2::text[])"),
                &[&d_names, &d_owners],
            )
            .await
            .map_err(self.err("adding domains"))?;
        }
        Ok(())
    }

    async fn load_tenant(&self, client: &impl GenericClient, id: &str) -> Result<Option<Tenant>> {
        let Some(row) = client
            .query_opt(
                &self.q(&format!(
                    "SELECT {TENANT_COLUMNS} FROM {{s}}.tenants WHERE id = $1"
                )),
                &[&id],
            )
            .await
            .map_err(self.err("reading a tenant"))?
        else {
            return Ok(None);
        };
        let domains = client
            .query(
                &self.q(
                    "SELECT domain FROM {s}.tenant_domains WHERE tenant_id = $1 ORDER BY domain",
                ),
                &[&id],
            )
            .await
            .map_err(self.err("reading a tenant's domains"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        rules::tenant_from_row(tenant_row(&row), domains).map(Some)
    }

    async fn load_tenants(
        &self,
        client: &impl GenericClient,
        stage: Option<Stage>,
    ) -> Result<Vec<Tenant>> {
        let stage = stage.map(Stage::as_str);
        let rows = client
            .query(
                &self.q(&format!(
                    "SELECT {TENANT_COLUMNS} FROM {{s}}.tenants WHERE $1::text IS NULL OR stage = $1 ORDER BY id"
                )),
                &[&stage],
            )
            .await
            .map_err(self.err("listing tenants"))?;
        let domains = client
            .query(
                &self.q(
                    "SELECT d.tenant_id, d.domain FROM {s}.tenant_domains d JOIN {s}.tenants t ON t.id = d.tenant_id
                     WHERE $1::text IS NULL OR t.stage = $1",
                ),
                &[&stage],
            )
            .await
            .map_err(self.err("listing domains"))?;
        rules::assemble(
            rows.iter().map(tenant_row).collect(),
            domains.iter().map(|r| (r.get(0), r.get(1))).collect(),
        )
    }

    async fn load_audit(
        &self,
        client: &impl GenericClient,
        q: &AuditQuery,
    ) -> Result<Vec<AuditEvent>> {
        let limit = q.limit.map_or(i64::MAX, |l| l.min(i64::MAX as u64) as i64);
        let rows = client
            .query(
                &self.q(
                    "SELECT seq, at, tenant_id, from_stage, to_stage, version, actor, reason FROM (
                        SELECT * FROM {s}.audit_log
                        WHERE ($1::text IS NULL OR tenant_id = $1) AND ($2::bigint IS NULL OR at >= $2)
                          AND ($4::bigint IS NULL OR at < $4) AND ($5::text IS NULL OR actor = $5)
                          AND ($6::text IS NULL OR to_stage = $6)
                        ORDER BY seq DESC LIMIT $3
                     ) recent ORDER BY seq",
                ),
                &[
                    &q.tenant.as_ref().map(TenantId::as_str),
                    &q.since.map(|t| t.unix_millis()),
                    &limit,
                    &q.until.map(|t| t.unix_millis()),
                    &q.actor.as_deref(),
                    &q.to.map(Stage::as_str),
                ],
            )
            .await
            .map_err(self.err("reading the audit log"))?;
        rows.iter()
            .map(|r| rules::audit_from_row(pg_audit_row(r)))
            .collect()
    }

    /// The change-log position the store is at.
    async fn current_seq(&self, client: &impl GenericClient) -> Result<u64> {
        let seq: i64 = client
            .query_one(
                &self.q("SELECT seq FROM {s}.change_counter WHERE id = 1"),
                &[],
            )
            .await
            .map_err(self.err("reading the change log"))?
            .get(0);
        Ok(seq as u64)
    }

    async fn load_retired(&self, client: &impl GenericClient) -> Result<bool> {
        let value: String = client
            .query_one(
                &self.q("SELECT value FROM {s}.settings WHERE key = 'legacy_retired'"),
                &[],
            )
            .await
            .map_err(self.err("reading settings"))?
            .get(0);
        Ok(value == "true")
    }

    async fn load_changes(&self, client: &impl GenericClient, since: u64) -> Result<ChangeSet> {
        let row = client
            .query_one(
                &self.q("SELECT seq, floor FROM {s}.change_counter WHERE id = 1"),
                &[],
            )
            .await
            .map_err(self.err("reading the change log"))?;
        let (seq, floor): (i64, i64) = (row.get(0), row.get(1));
        let seq = seq as u64;
        if since < floor as u64 || since > seq {
            return Ok(ChangeSet {
                seq,
                tenants: BTreeSet::new(),
                resync: true,
                routes: true,
            });
        }
        let rows = client
            .query(
                &self.q("SELECT DISTINCT tenant_id FROM {s}.changes WHERE seq > $1 AND seq <= $2"),
                &[&(since as i64), &(seq as i64)],
            )
            .await
            .map_err(self.err("reading the change log"))?;
        let mut set = ChangeSet {
            seq,
            tenants: BTreeSet::new(),
            resync: false,
            routes: false,
        };
        for r in rows {
            match r.get::<_, Option<String>>(0) {
                None => set.resync = true,
                Some(id) if id == crate::feed::ROUTES_MARK => set.routes = true,
                Some(id) => {
                    set.tenants.insert(
                        TenantId::parse(&id).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    );
                }
            }
        }
        Ok(set)
    }
}

const TENANT_COLUMNS: &str = "id, name, stage, version, created_at, updated_at, suspended";

fn tenant_row(r: &Row) -> TenantRow {
    TenantRow {
        id: r.get(0),
        name: r.get(1),
        stage: r.get(2),
        version: r.get(3),
        created_at: r.get(4),
        updated_at: r.get(5),
        suspended: r.get(6),
    }
}

fn check_domains_free(owners: &HashMap<String, String>, domains: &[Domain]) -> Result<()> {
    for d in domains {
        if let Some(owner) = owners.get(d.as_str()) {
            return Err(StoreError::DomainTaken {
                domain: d.clone(),
                owner: TenantId::parse(owner).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            });
        }
    }
    Ok(())
}

#[async_trait]
impl ControlStore for PgStore {
    fn location(&self) -> &str {
        &self.inner.location
    }

    fn init_outcome(&self) -> InitOutcome {
        self.inner.outcome
    }

    async fn add_tenant(&self, tenant: NewTenant, actor: Actor, reason: &str) -> Result<Tenant> {
        let s = &*self.inner;
        let reason = rules::reason(reason)?;
        rules::check_own_domains(&tenant)?;
        let mut client = s.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(s.err("starting a write"))?;
        let seq = s.next_seq(&*tx).await?;
        let id = tenant.id.as_str();
        if s.load_tenant(&*tx, id).await?.is_some() {
            return Err(StoreError::TenantExists(tenant.id.clone()));
        }
        let domains: Vec<&str> = tenant.domains.iter().map(Domain::as_str).collect();
        check_domains_free(&s.domain_owners(&*tx, &domains).await?, &tenant.domains)?;
        let at = now().unix_millis();
        s.insert_tenants(&*tx, std::slice::from_ref(&tenant), at)
            .await?;
        let event = NewEvent {
            at,
            tenant: id,
            from: None,
            to: tenant.stage,
            version: 1,
            actor,
            reason,
        };
        s.append_audit(&*tx, event).await?;
        s.record_change(&*tx, seq, Some(id)).await?;
        let added = s.load_tenant(&*tx, id).await?;
        tx.commit().await.map_err(s.err("committing"))?;
        added.ok_or_else(|| StoreError::UnknownTenant(tenant.id.clone()))
    }

    async fn import_tenants(
        &self,
        tenants: Vec<NewTenant>,
        actor: Actor,
        reason: &str,
    ) -> Result<u64> {
        let s = &*self.inner;
        let reason = rules::reason(reason)?;
        for t in &tenants {
            rules::check_own_domains(t)?;
        }
        let mut client = s.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(s.err("starting a write"))?;
        let seq = s.next_seq(&*tx).await?;
        let ids: Vec<&str> = tenants.iter().map(|t| t.id.as_str()).collect();
        let existing: HashSet<String> = tx
            .query(
                &s.q("SELECT id FROM {s}.tenants WHERE id = ANY($1)"),
                &[&ids],
            )
            .await
            .map_err(s.err("checking tenant ids"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let domains: Vec<&str> = tenants
            .iter()
            .flat_map(|t| t.domains.iter().map(Domain::as_str))
            .collect();
        let owners = s.domain_owners(&*tx, &domains).await?;
        let conflicts = rules::import_conflicts(&tenants, &existing, &owners);
        if !conflicts.is_empty() {
            return Err(StoreError::ImportConflicts(conflicts));
        }
        let at = now().unix_millis();
        s.insert_tenants(&*tx, &tenants, at).await?;
        let stages: Vec<&str> = tenants.iter().map(|t| t.stage.as_str()).collect();
        tx.execute(
            &s.q(
                "INSERT INTO {s}.audit_log (at, tenant_id, from_stage, to_stage, version, actor, reason)
                 SELECT $1, id, NULL, stage, 1, $4, $5
                 FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS t (id, stage, n) ORDER BY n",
            ),
            &[&at, &ids, &stages, &actor.as_str(), &reason],
        )
        .await
        .map_err(s.err("appending to the audit log"))?;
        // One entry for the whole import: subscribers reload everything.
        s.record_change(&*tx, seq, None).await?;
        tx.commit().await.map_err(s.err("committing"))?;
        Ok(tenants.len() as u64)
    }

    async fn tenant(&self, id: &TenantId) -> Result<Option<Tenant>> {
        let client = self.inner.client().await?;
        self.inner.load_tenant(&**client, id.as_str()).await
    }

    async fn tenants(&self, stage: Option<Stage>) -> Result<Vec<Tenant>> {
        let client = self.inner.client().await?;
        self.inner.load_tenants(&**client, stage).await
    }

    async fn tenants_by_id(&self, ids: &[TenantId]) -> Result<Vec<Tenant>> {
        let s = &*self.inner;
        let ids: Vec<&str> = ids.iter().map(TenantId::as_str).collect();
        let client = s.client().await?;
        let rows = client
            .query(
                &s.q(&format!(
                    "SELECT {TENANT_COLUMNS} FROM {{s}}.tenants WHERE id = ANY($1) ORDER BY id"
                )),
                &[&ids],
            )
            .await
            .map_err(s.err("reading tenants"))?;
        let domains = client
            .query(
                &s.q("SELECT tenant_id, domain FROM {s}.tenant_domains WHERE tenant_id = ANY($1)"),
                &[&ids],
            )
            .await
            .map_err(s.err("reading domains"))?;
        rules::assemble(
            rows.iter().map(tenant_row).collect(),
            domains.iter().map(|r| (r.get(0), r.get(1))).collect(),
        )
    }

    async fn change_stage(&self, change: StageChange) -> Result<Tenant> {
        let s = &*self.inner;
        let reason = rules::reason(&change.reason)?;
        let mut client = s.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(s.err("starting a write"))?;
        let seq = s.next_seq(&*tx).await?;
        let id = change.tenant.as_str();
        let current = s
            .load_tenant(&*tx, id)
            .await?
            .ok_or_else(|| StoreError::UnknownTenant(change.tenant.clone()))?;
        // The explanation of a stale write needs the last event; read it up front
        // only in that case (the closure below must stay synchronous).
        let last = match change.expected_version {
            Some(v) if v != current.version => {
                let q = AuditQuery {
                    tenant: Some(change.tenant.clone()),
                    limit: Some(1),
                    ..AuditQuery::default()
                };
                s.load_audit(&*tx, &q).await?.pop()
            }
            _ => None,
        };
        rules::check_stage_change(&current, &change, || Ok(last))?;
        let at = now().unix_millis();
        let version = current.version + 1;
        tx.execute(
            &s.q("UPDATE {s}.tenants SET stage = $1, version = $2, updated_at = $3 WHERE id = $4 AND version = $5"),
            &[&change.to.as_str(), &(version as i64), &at, &id, &(current.version as i64)],
        )
        .await
        .map_err(s.err("changing a stage"))?;
        let event = NewEvent {
            at,
            tenant: id,
            from: Some(current.stage),
            to: change.to,
            version,
            actor: change.actor,
            reason,
        };
        let changed = s
            .finish_tenant_change(&*tx, seq, &change.tenant, event)
            .await?;
        tx.commit().await.map_err(s.err("committing"))?;
        Ok(changed)
    }

    async fn audit(&self, query: AuditQuery) -> Result<Vec<AuditEvent>> {
        let client = self.inner.client().await?;
        self.inner.load_audit(&**client, &query).await
    }

    async fn progress(&self) -> Result<Progress> {
        let s = &*self.inner;
        let client = s.client().await?;
        let rows = client
            .query(
                &s.q("SELECT stage, count(*) FROM {s}.tenants GROUP BY stage"),
                &[],
            )
            .await
            .map_err(s.err("counting tenants"))?;
        let mut p = Progress::default();
        for r in rows {
            let stage = Stage::parse(r.get(0)).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            p.count(stage, r.get::<_, i64>(1) as u64);
        }
        let row = client
            .query_one(
                &s.q("SELECT (SELECT max(last_at) FROM {s}.legacy_traffic),
                             (SELECT first_at FROM {s}.traffic_reports WHERE id = 1)"),
                &[],
            )
            .await
            .map_err(s.err("reading legacy traffic"))?;
        p.legacy_last_request = rules::legacy_last_request(row.get(0), row.get(1));
        Ok(p)
    }

    async fn legacy_retired(&self) -> Result<bool> {
        let client = self.inner.client().await?;
        self.inner.load_retired(&**client).await
    }

    async fn set_legacy_retired(&self, retired: bool, actor: Actor, reason: &str) -> Result<bool> {
        let s = &*self.inner;
        let reason = rules::reason(reason)?;
        let mut client = s.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(s.err("starting a write"))?;
        let seq = s.next_seq(&*tx).await?;
        if s.load_retired(&*tx).await? == retired {
            return Ok(false);
        }
        let value = retired.to_string();
        s.put_setting(&*tx, "legacy_retired", &value, &value, actor, reason)
            .await?;
        s.record_change(&*tx, seq, None).await?;
        tx.commit().await.map_err(s.err("committing"))?;
        Ok(true)
    }

    async fn record_legacy_traffic(
        &self,
        counts: &[TrafficCount],
        reported_at: Timestamp,
    ) -> Result<()> {
        let s = &*self.inner;
        let keys: Vec<&str> = counts
            .iter()
            .map(|c| rules::traffic_key(c.tenant.as_ref()))
            .collect();
        let hours: Vec<i64> = counts.iter().map(|c| rules::hour_of(c.last_at)).collect();
        let requests: Vec<i64> = counts.iter().map(|c| c.requests as i64).collect();
        let last: Vec<i64> = counts.iter().map(|c| c.last_at.unix_millis()).collect();
        let mut client = s.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(s.err("starting a write"))?;
        if !counts.is_empty() {
            tx.execute(
                &s.q(
                    "INSERT INTO {s}.legacy_traffic AS t (tenant_key, hour, requests, last_at)
                     SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[])
                     ON CONFLICT (tenant_key, hour) DO UPDATE SET
                         requests = t.requests + excluded.requests, last_at = greatest(t.last_at, excluded.last_at)",
                ),
                &[&keys, &hours, &requests, &last],
            )
            .await
            .map_err(s.err("recording legacy traffic"))?;
        }
        tx.execute(
            &s.q(
                "INSERT INTO {s}.traffic_reports AS r (id, first_at, last_at) VALUES (1, $1, $1)
                 ON CONFLICT (id) DO UPDATE SET last_at = greatest(r.last_at, excluded.last_at)",
            ),
            &[&reported_at.unix_millis()],
        )
        .await
        .map_err(s.err("recording legacy traffic"))?;
        tx.commit().await.map_err(s.err("committing"))
    }

    async fn legacy_traffic(&self, since: Timestamp) -> Result<Vec<TrafficCount>> {
        let s = &*self.inner;
        let client = s.client().await?;
        let rows = client
            .query(
                &s.q(
                    "SELECT tenant_key, sum(requests)::bigint, max(last_at) FROM {s}.legacy_traffic
                     WHERE hour >= $1 GROUP BY tenant_key ORDER BY tenant_key",
                ),
                &[&rules::hour_of(since)],
            )
            .await
            .map_err(s.err("reading legacy traffic"))?;
        rows.iter()
            .map(|r| rules::traffic_from_row(r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    async fn record_comparisons(&self, evidence: &Evidence) -> Result<()> {
        let Evidence {
            counts,
            samples,
            noise,
            classes,
        } = evidence;
        let s = &*self.inner;
        let mut client = s.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(s.err("starting a write"))?;
        for c in counts {
            tx.execute(
                &s.q(
                    "INSERT INTO {s}.comparisons AS c (tenant_id, endpoint, hour, last_at, requests, compared, matched, mismatched, noise_only, errors, shed, version, raced)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                     ON CONFLICT (tenant_id, endpoint, version, hour) DO UPDATE SET
                         last_at = greatest(c.last_at, excluded.last_at), requests = c.requests + excluded.requests,
                         compared = c.compared + excluded.compared, matched = c.matched + excluded.matched,
                         mismatched = c.mismatched + excluded.mismatched, noise_only = c.noise_only + excluded.noise_only,
                         errors = c.errors + excluded.errors, shed = c.shed + excluded.shed,
                         raced = c.raced + excluded.raced",
                ),
                &[
                    &c.tenant.as_str(),
                    &c.endpoint,
                    &rules::hour_of(c.last_at),
                    &c.last_at.unix_millis(),
                    &(c.requests as i64),
                    &(c.compared as i64),
                    &(c.matched as i64),
                    &(c.mismatched as i64),
                    &(c.noise_only as i64),
                    &(c.errors as i64),
                    &(c.shed as i64),
                    &c.version,
                    &(c.raced as i64),
                ],
            )
            .await
            .map_err(s.err("recording comparisons"))?;
        }
        for m in samples {
            tx.execute(
                &s.q(
                    "INSERT INTO {s}.mismatch_samples (tenant_id, endpoint, at, method, path, served_by, compared_with, served_status, compared_status, differences, version)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                ),
                &[
                    &m.tenant.as_str(),
                    &m.endpoint,
                    &m.at.unix_millis(),
                    &m.method,
                    &m.path,
                    &m.served_by,
                    &m.compared_with,
                    &i32::from(m.served_status),
                    &i32::from(m.compared_status),
                    &m.differences,
                    &m.version,
                ],
            )
            .await
            .map_err(s.err("recording mismatch samples"))?;
            tx.execute(
                &s.q(
                    "DELETE FROM {s}.mismatch_samples WHERE tenant_id = $1 AND endpoint = $2 AND seq NOT IN
                        (SELECT seq FROM {s}.mismatch_samples WHERE tenant_id = $1 AND endpoint = $2 ORDER BY seq DESC LIMIT $3)",
                ),
                &[&m.tenant.as_str(), &m.endpoint, &SAMPLES_KEPT],
            )
            .await
            .map_err(s.err("pruning mismatch samples"))?;
        }
        for n in noise {
            tx.execute(
                &s.q(
                    "INSERT INTO {s}.noise_paths (endpoint, path, score, observations, updated_at) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (endpoint, path) DO UPDATE SET score = excluded.score,
                         observations = excluded.observations, updated_at = excluded.updated_at",
                ),
                &[&n.endpoint, &n.path, &n.score, &(n.observations as i64), &n.updated_at.unix_millis()],
            )
            .await
            .map_err(s.err("recording noise"))?;
        }
        let at = now();
        // Class rows are shared by every proxy and locked until commit: taken in
        // id order, two reports can wait for each other but never deadlock.
        let mut ordered: Vec<&ClassCount> = classes.iter().collect();
        ordered.sort_by(|a, b| a.id.cmp(&b.id));
        for c in ordered {
            s.record_class(&*tx, c, at).await?;
        }
        tx.commit().await.map_err(s.err("committing"))
    }

    async fn route_stages(&self) -> Result<Vec<RouteStage>> {
        let s = &*self.inner;
        let client = s.client().await?;
        let rows = client
            .query(
                &s.q("SELECT route, tenant_id, stage, version, updated_at FROM {s}.route_stages ORDER BY route, tenant_id"),
                &[],
            )
            .await
            .map_err(s.err("reading route stages"))?;
        rows.iter()
            .map(|r| rules::route_stage_from_row(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect()
    }

    async fn change_route(&self, change: RouteChange) -> Result<RouteStage> {
        let s = &*self.inner;
        let reason = rules::reason(&change.reason)?;
        let mut client = s.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(s.err("starting a write"))?;
        // The change counter's row lock orders this change with every other
        // write, as for tenants.
        let seq = s.next_seq(&*tx).await?;
        let route = change.route.to_string();
        let tenant = change.tenant.as_ref().map_or("", TenantId::as_str);
        if let Some(t) = &change.tenant
            && s.load_tenant(&*tx, t.as_str()).await?.is_none()
        {
            return Err(StoreError::UnknownTenant(t.clone()));
        }
        let row = |t: String| {
            let tx = &tx;
            let route = route.clone();
            async move {
                let found = tx
                    .query_opt(
                        &s.q("SELECT stage, version FROM {s}.route_stages WHERE route = $1 AND tenant_id = $2"),
                        &[&route, &t],
                    )
                    .await
                    .map_err(s.err("reading a route stage"))?;
                found
                    .map(|r| {
                        Ok::<_, StoreError>((
                            Stage::parse(r.get(0))
                                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                            r.get::<_, i64>(1).max(0) as u64,
                        ))
                    })
                    .transpose()
            }
        };
        let own = row(tenant.to_string()).await?;
        let inherited = if tenant.is_empty() {
            None
        } else {
            row(String::new()).await?.map(|(st, _)| st)
        };
        let write_default = s.load_write_default(&*tx).await?;
        let version = rules::check_route_change(&change, own, inherited, write_default)?;
        let at = now().unix_millis();
        tx.execute(
            &s.q(
                "INSERT INTO {s}.route_stages (route, tenant_id, stage, version, updated_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (route, tenant_id) DO UPDATE SET stage = excluded.stage, version = excluded.version,
                     updated_at = excluded.updated_at",
            ),
            &[&route, &tenant, &change.to.as_str(), &(version as i64), &at],
        )
        .await
        .map_err(s.err("changing a route stage"))?;
        let from = own
            .map(|(st, _)| st)
            .or(inherited)
            .unwrap_or_else(|| rules::route_default(&change.route, write_default));
        tx.execute(
            &s.q(
                "INSERT INTO {s}.route_events (at, route, tenant_id, action, from_stage, to_stage, version, actor, reason)
                 VALUES ($1, $2, $3, 'stage', $4, $5, $6, $7, $8)",
            ),
            &[&at, &route, &tenant, &from.as_str(), &change.to.as_str(), &(version as i64), &change.actor.as_str(), &reason],
        )
        .await
        .map_err(s.err("appending to the audit log"))?;
        s.record_change(&*tx, seq, Some(crate::feed::ROUTES_MARK))
            .await?;
        tx.commit().await.map_err(s.err("committing"))?;
        Ok(RouteStage {
            route,
            tenant: change.tenant.clone(),
            stage: change.to,
            version,
            updated_at: Timestamp::from_unix_millis(at),
        })
    }

    async fn mark_route(
        &self,
        route: &Route,
        destructive: bool,
        actor: Actor,
        reason: &str,
    ) -> Result<bool> {
        let s = &*self.inner;
        let reason = rules::reason(reason)?;
        let route = route.to_string();
        let mut client = s.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(s.err("starting a write"))?;
        let changed = if destructive {
            tx.execute(
                &s.q("INSERT INTO {s}.route_marks (route) VALUES ($1) ON CONFLICT DO NOTHING"),
                &[&route],
            )
            .await
        } else {
            tx.execute(
                &s.q("DELETE FROM {s}.route_marks WHERE route = $1"),
                &[&route],
            )
            .await
        }
        .map_err(s.err("marking a route"))?;
        if changed > 0 {
            tx.execute(
                &s.q("INSERT INTO {s}.route_events (at, route, tenant_id, action, version, actor, reason) VALUES ($1, $2, '', $3, 0, $4, $5)"),
                &[&now().unix_millis(), &route, &if destructive { "destructive" } else { "not destructive" }, &actor.as_str(), &reason],
            )
            .await
            .map_err(s.err("appending to the audit log"))?;
        }
        tx.commit().await.map_err(s.err("committing"))?;
        Ok(changed > 0)
    }

    async fn write_default(&self) -> Result<Stage> {
        let s = &*self.inner;
        let client = s.client().await?;
        s.load_write_default(&**client).await
    }

    async fn set_write_default(&self, stage: Stage, actor: Actor, reason: &str) -> Result<bool> {
        let s = &*self.inner;
        let reason = rules::reason(reason)?;
        let mut client = s.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(s.err("starting a write"))?;
        let seq = s.next_seq(&*tx).await?;
        if s.load_write_default(&*tx).await? == stage {
            return Ok(false);
        }
        let value = stage.as_str();
        s.put_setting(&*tx, rules::WRITE_DEFAULT, value, value, actor, reason)
            .await?;
        s.record_change(&*tx, seq, Some(crate::feed::ROUTES_MARK))
            .await?;
        tx.commit().await.map_err(s.err("committing"))?;
        Ok(true)
    }

    async fn route_marks(&self) -> Result<Vec<String>> {
        let s = &*self.inner;
        let client = s.client().await?;
        let rows = client
            .query(
                &s.q("SELECT route FROM {s}.route_marks ORDER BY route"),
                &[],
            )
            .await
            .map_err(s.err("reading route marks"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn route_events(&self, route: Option<&str>, limit: u64) -> Result<Vec<RouteEvent>> {
        let s = &*self.inner;
        let client = s.client().await?;
        let rows = client
            .query(
                &s.q(
                    "SELECT seq, at, route, tenant_id, action, from_stage, to_stage, version, actor, reason FROM
                        (SELECT * FROM {s}.route_events WHERE ($1::text IS NULL OR route = $1) ORDER BY seq DESC LIMIT $2) e
                     ORDER BY seq",
                ),
                &[&route, &(limit.min(i64::MAX as u64) as i64)],
            )
            .await
            .map_err(s.err("reading the routes' audit log"))?;
        rows.iter()
            .map(|r| {
                rules::route_event_from_row(rules::RouteEventRow {
                    seq: r.get(0),
                    at: r.get(1),
                    route: r.get(2),
                    tenant: r.get(3),
                    action: r.get(4),
                    from: r.get(5),
                    to: r.get(6),
                    version: r.get(7),
                    actor: r.get(8),
                    reason: r.get(9),
                })
            })
            .collect()
    }

    async fn record_route_census(&self, counts: &[RouteCount]) -> Result<()> {
        if counts.is_empty() {
            return Ok(());
        }
        let s = &*self.inner;
        let (mut keys, mut routes, mut backends, mut clients, mut hours, mut ns, mut ats) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        let mut configured = Vec::new();
        for c in counts {
            keys.push(rules::traffic_key(c.tenant.as_ref()));
            routes.push(c.route.as_str());
            backends.push(c.backend.as_str());
            clients.push(c.client.as_str());
            hours.push(rules::hour_of(c.last_at));
            ns.push(c.count as i64);
            ats.push(c.last_at.unix_millis());
            configured.push(c.configured);
        }
        let client = s.client().await?;
        // One statement for the whole report; rows of one key are summed
        // first, since one INSERT may not touch a row twice.
        client
            .execute(
                &s.q(
                    "INSERT INTO {s}.route_census AS c (tenant_key, route, backend, client, hour, count, last_at, configured)
                     SELECT k, r, b, cl, h, sum(n), max(a), bool_or(cf)
                     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[], $8::boolean[])
                         AS t(k, r, b, cl, h, n, a, cf)
                     GROUP BY k, r, b, cl, h
                     ON CONFLICT (tenant_key, route, backend, client, hour) DO UPDATE SET
                         count = c.count + excluded.count, last_at = greatest(c.last_at, excluded.last_at),
                         configured = c.configured OR excluded.configured",
                ),
                &[&keys, &routes, &backends, &clients, &hours, &ns, &ats, &configured],
            )
            .await
            .map_err(s.err("recording the route census"))?;
        Ok(())
    }

    async fn route_census(
        &self,
        tenant: Option<&TenantId>,
        since: Timestamp,
    ) -> Result<Vec<RouteCount>> {
        let s = &*self.inner;
        let client = s.client().await?;
        let key = tenant.map(|t| rules::traffic_key(Some(t)));
        let rows = client
            .query(
                &s.q(
                    "SELECT tenant_key, route, backend, client, sum(count)::bigint, max(last_at), bool_or(configured) FROM {s}.route_census
                     WHERE ($1::text IS NULL OR tenant_key = $1) AND hour >= $2
                     GROUP BY tenant_key, route, backend, client ORDER BY route, tenant_key, backend, client",
                ),
                &[&key, &rules::hour_of(since)],
            )
            .await
            .map_err(s.err("reading the route census"))?;
        rows.iter()
            .map(|r| {
                rules::census_from_row(
                    r.get(0),
                    r.get(1),
                    r.get(2),
                    r.get(3),
                    r.get(4),
                    r.get(5),
                    r.get(6),
                )
            })
            .collect()
    }

    async fn mismatch_classes(&self, state: Option<ClassState>) -> Result<Vec<MismatchClass>> {
        let s = &*self.inner;
        let client = s.client().await?;
        let sql = format!(
            "SELECT {} FROM {{s}}.mismatch_classes WHERE ($1::text IS NULL OR state = $1) ORDER BY endpoint, path, kind",
            rules::CLASS_COLUMNS
        );
        let rows = client
            .query(&s.q(&sql), &[&state.map(ClassState::as_str)])
            .await
            .map_err(s.err("reading mismatch classes"))?;
        rows.iter()
            .map(|r| rules::class_from_row(class_row(r)))
            .collect()
    }

    async fn class_evidence(
        &self,
        tenant: Option<&TenantId>,
        since: Timestamp,
    ) -> Result<Vec<ClassEvidence>> {
        let s = &*self.inner;
        let client = s.client().await?;
        let rows = client
            .query(
                &s.q(
                    "SELECT class_id, epoch, version, sum(count)::bigint, min(first_at), max(last_at) FROM {s}.mismatch_class_counts
                     WHERE ($1::text IS NULL OR tenant_id = $1) AND hour >= $2 GROUP BY class_id, epoch, version",
                ),
                &[&tenant.map(TenantId::as_str), &rules::hour_of(since)],
            )
            .await
            .map_err(s.err("reading mismatch evidence"))?;
        Ok(rows
            .iter()
            .map(|r| ClassEvidence {
                class: r.get(0),
                epoch: r.get::<_, i64>(1).max(0) as u64,
                version: r.get(2),
                count: r.get::<_, i64>(3).max(0) as u64,
                first_at: Timestamp::from_unix_millis(r.get(4)),
                last_at: Timestamp::from_unix_millis(r.get(5)),
            })
            .collect())
    }

    async fn change_class(&self, change: ClassChange) -> Result<MismatchClass> {
        let s = &*self.inner;
        let mut client = s.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(s.err("starting a write"))?;
        let seq = s.next_seq(&*tx).await?;
        let class = s
            .load_class(&*tx, &change.id, true)
            .await?
            .ok_or_else(|| StoreError::UnknownClass(change.id.clone()))?;
        let (class, event) = rules::changed_class(class, &change, now())?;
        s.write_class(&*tx, &class, &event).await?;
        // Every proxy reloads: an accepted class is a comparison rule.
        s.record_change(&*tx, seq, None).await?;
        tx.commit().await.map_err(s.err("committing"))?;
        Ok(class)
    }

    async fn class_history(&self, id: &str) -> Result<Vec<ClassEvent>> {
        let s = &*self.inner;
        let client = s.client().await?;
        let rows = client
            .query(
                &s.q("SELECT at, action, actor, reason, version FROM {s}.mismatch_class_events WHERE class_id = $1 ORDER BY seq"),
                &[&id],
            )
            .await
            .map_err(s.err("reading a class's history"))?;
        rows.iter()
            .map(|r| {
                Ok(ClassEvent {
                    at: Timestamp::from_unix_millis(r.get(0)),
                    action: r.get(1),
                    actor: Actor::parse(r.get(2))
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    reason: r.get(3),
                    version: r.get(4),
                })
            })
            .collect()
    }

    async fn record_latencies(&self, reports: &[LatencyReport]) -> Result<()> {
        let s = &*self.inner;
        let (mut tenants, mut backends, mut hours, mut buckets, mut counts) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in reports {
            for (bucket, count) in r.histogram.buckets() {
                tenants.push(r.tenant.as_str());
                backends.push(rules::backend_key(r.backend));
                hours.push(rules::hour_of(r.at));
                buckets.push(i32::from(bucket));
                counts.push(count as i64);
            }
        }
        if tenants.is_empty() {
            return Ok(());
        }
        let client = s.client().await?;
        // One statement, so the report is added whole or not at all. Rows that
        // share a key within one report are summed first: PostgreSQL refuses an
        // upsert that touches one row twice.
        client
            .execute(
                &s.q(
                    "INSERT INTO {s}.latencies AS l (tenant_id, backend, hour, bucket, count)
                     SELECT t, b, h, k, sum(c)::bigint
                     FROM unnest($1::text[], $2::text[], $3::bigint[], $4::int[], $5::bigint[]) AS u(t, b, h, k, c)
                     GROUP BY t, b, h, k
                     ON CONFLICT (tenant_id, backend, hour, bucket) DO UPDATE SET count = l.count + excluded.count",
                ),
                &[&tenants, &backends, &hours, &buckets, &counts],
            )
            .await
            .map_err(s.err("recording latencies"))?;
        Ok(())
    }

    async fn latencies(&self, tenant: &TenantId, since: Timestamp) -> Result<LatencyEvidence> {
        let s = &*self.inner;
        let client = s.client().await?;
        let rows = client
            .query(
                &s.q(
                    "SELECT backend, bucket::bigint, sum(count)::bigint FROM {s}.latencies
                     WHERE tenant_id = $1 AND hour >= $2 GROUP BY backend, bucket",
                ),
                &[&tenant.as_str(), &rules::hour_of(since)],
            )
            .await
            .map_err(s.err("reading latencies"))?;
        let mut evidence = LatencyEvidence::default();
        for row in rows {
            rules::add_latency(&mut evidence, row.get(0), row.get(1), row.get(2));
        }
        Ok(evidence)
    }

    async fn legacy_hours(&self, since: Timestamp) -> Result<Vec<(Timestamp, u64)>> {
        let s = &*self.inner;
        let client = s.client().await?;
        let rows = client
            .query(
                &s.q(
                    "SELECT hour, sum(count)::bigint FROM {s}.route_census WHERE backend = 'legacy' AND hour >= $1
                     GROUP BY hour ORDER BY hour",
                ),
                &[&rules::hour_of(since)],
            )
            .await
            .map_err(s.err("reading the route census"))?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    Timestamp::from_unix_millis(r.get(0)),
                    r.get::<_, i64>(1).max(0) as u64,
                )
            })
            .collect())
    }

    async fn endpoint_counts(&self, since: Timestamp) -> Result<Vec<EndpointCount>> {
        let s = &*self.inner;
        let client = s.client().await?;
        let rows = client
            .query(
                &s.q(
                    "SELECT endpoint, count(DISTINCT tenant_id)::bigint, sum(requests)::bigint, sum(compared)::bigint,
                            sum(mismatched)::bigint, sum(errors)::bigint
                     FROM {s}.comparisons WHERE hour >= $1 GROUP BY endpoint ORDER BY endpoint",
                ),
                &[&rules::hour_of(since)],
            )
            .await
            .map_err(s.err("reading comparisons"))?;
        Ok(rows
            .iter()
            .map(|r| {
                let n = |i| r.get::<_, i64>(i).max(0) as u64;
                EndpointCount {
                    endpoint: r.get(0),
                    tenants: n(1),
                    requests: n(2),
                    compared: n(3),
                    mismatched: n(4),
                    errors: n(5),
                }
            })
            .collect())
    }

    async fn latency_hours(
        &self,
        tenant: &TenantId,
        since: Timestamp,
    ) -> Result<Vec<(Timestamp, LatencyEvidence)>> {
        let s = &*self.inner;
        let client = s.client().await?;
        let rows = client
            .query(
                &s.q(
                    "SELECT hour, backend, bucket::bigint, sum(count)::bigint FROM {s}.latencies
                     WHERE tenant_id = $1 AND hour >= $2 GROUP BY hour, backend, bucket ORDER BY hour",
                ),
                &[&tenant.as_str(), &rules::hour_of(since)],
            )
            .await
            .map_err(s.err("reading latencies"))?;
        Ok(rules::latency_hours(
            rows.iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
                .collect(),
        ))
    }

    async fn gate_evidence(&self, since: Timestamp) -> Result<GateEvidence> {
        let s = &*self.inner;
        let hour = rules::hour_of(since);
        let tenant =
            |raw: &str| TenantId::parse(raw).map_err(|e| StoreError::Corrupt(e.to_string()));
        // The three reads run at once, each on its own connection: at ten
        // thousand tenants each takes tens of milliseconds of the server's time.
        // They are not one snapshot; evidence recorded between them is in one
        // and not another, as in any read of a live parallel run.
        let read = |sql: &'static str, what: &'static str| async move {
            let mut client = s.client().await?;
            let tx = client.transaction().await.map_err(s.err(what))?;
            // Hash the groups in memory rather than spill them to disk.
            tx.batch_execute("SET LOCAL work_mem = '64MB'")
                .await
                .map_err(s.err(what))?;
            let rows = tx.query(&s.q(sql), &[&hour]).await.map_err(s.err(what))?;
            tx.commit().await.map_err(s.err(what))?;
            Ok::<_, StoreError>(rows)
        };
        let (stats, classes, latencies) = tokio::try_join!(
            read(
                "SELECT tenant_id, endpoint, version, max(last_at), sum(requests)::bigint, sum(compared)::bigint,
                        sum(matched)::bigint, sum(mismatched)::bigint, sum(noise_only)::bigint,
                        sum(errors)::bigint, sum(shed)::bigint, sum(raced)::bigint
                 FROM {s}.comparisons WHERE hour >= $1 GROUP BY tenant_id, endpoint, version",
                "reading comparisons",
            ),
            read(
                "SELECT tenant_id, class_id, epoch, version, sum(count)::bigint, min(first_at), max(last_at)
                 FROM {s}.mismatch_class_counts WHERE hour >= $1 GROUP BY tenant_id, class_id, epoch, version",
                "reading mismatch evidence",
            ),
            // One row per tenant and backend, its buckets and counts as arrays:
            // a fifth of the rows to send and read.
            read(
                "SELECT tenant_id, backend, array_agg(bucket::bigint), array_agg(n) FROM (
                     SELECT tenant_id, backend, bucket, sum(count)::bigint AS n FROM {s}.latencies
                     WHERE hour >= $1 GROUP BY tenant_id, backend, bucket
                 ) b GROUP BY tenant_id, backend",
                "reading latencies",
            ),
        )?;
        let mut out = GateEvidence::default();
        for r in &stats {
            let n = |i| r.get::<_, i64>(i).max(0) as u64;
            out.stats.push(ComparisonCount {
                tenant: tenant(r.get(0))?,
                endpoint: r.get(1),
                version: r.get(2),
                last_at: Timestamp::from_unix_millis(r.get(3)),
                requests: n(4),
                compared: n(5),
                matched: n(6),
                mismatched: n(7),
                noise_only: n(8),
                errors: n(9),
                shed: n(10),
                raced: n(11),
            });
        }
        // The per-tenant reads list counts in this order; so does the bulk one.
        out.stats.sort_by(|a, b| {
            (&a.tenant, &a.endpoint, &a.version).cmp(&(&b.tenant, &b.endpoint, &b.version))
        });
        for r in &classes {
            out.classes.push((
                tenant(r.get(0))?,
                ClassEvidence {
                    class: r.get(1),
                    epoch: r.get::<_, i64>(2).max(0) as u64,
                    version: r.get(3),
                    count: r.get::<_, i64>(4).max(0) as u64,
                    first_at: Timestamp::from_unix_millis(r.get(5)),
                    last_at: Timestamp::from_unix_millis(r.get(6)),
                },
            ));
        }
        let mut by_tenant: HashMap<String, LatencyEvidence> = HashMap::new();
        for r in &latencies {
            let evidence = by_tenant.entry(r.get::<_, String>(0)).or_default();
            let (buckets, counts): (Vec<i64>, Vec<i64>) = (r.get(2), r.get(3));
            for (bucket, count) in buckets.into_iter().zip(counts) {
                rules::add_latency(evidence, r.get(1), bucket, count);
            }
        }
        for (t, evidence) in by_tenant {
            out.latencies.push((tenant(&t)?, evidence));
        }
        out.latencies.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn setting(&self, key: &str) -> Result<Option<String>> {
        let s = &*self.inner;
        let key = rules::setting_key(key)?;
        let client = s.client().await?;
        let row = client
            .query_opt(
                &s.q("SELECT value FROM {s}.settings WHERE key = $1"),
                &[&key],
            )
            .await
            .map_err(s.err("reading settings"))?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn settings_under(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let s = &*self.inner;
        let prefix = rules::setting_key(prefix)?;
        let client = s.client().await?;
        let rows = client
            .query(
                &s.q("SELECT key, value FROM {s}.settings WHERE left(key, length($1)) = $1 ORDER BY key"),
                &[&prefix],
            )
            .await
            .map_err(s.err("reading settings"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn set_setting(
        &self,
        key: &str,
        value: &str,
        shown: &str,
        actor: Actor,
        reason: &str,
    ) -> Result<()> {
        let s = &*self.inner;
        let key = rules::setting_key(key)?;
        let reason = rules::reason(reason)?;
        let mut client = s.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(s.err("starting a write"))?;
        s.put_setting(&*tx, key, value, shown, actor, reason)
            .await?;
        tx.commit().await.map_err(s.err("committing"))
    }

    async fn comparison_stats(
        &self,
        tenant: &TenantId,
        since: Timestamp,
    ) -> Result<Vec<ComparisonCount>> {
        let s = &*self.inner;
        let client = s.client().await?;
        let rows = client
            .query(
                &s.q(
                    "SELECT endpoint, max(last_at), sum(requests)::bigint, sum(compared)::bigint, sum(matched)::bigint,
                            sum(mismatched)::bigint, sum(noise_only)::bigint, sum(errors)::bigint, sum(shed)::bigint
                            , version, sum(raced)::bigint
                     FROM {s}.comparisons WHERE tenant_id = $1 AND hour >= $2 GROUP BY endpoint, version ORDER BY endpoint, version",
                ),
                &[&tenant.as_str(), &rules::hour_of(since)],
            )
            .await
            .map_err(s.err("reading comparisons"))?;
        Ok(rows
            .iter()
            .map(|r| {
                let n = |i| r.get::<_, i64>(i).max(0) as u64;
                ComparisonCount {
                    tenant: tenant.clone(),
                    endpoint: r.get(0),
                    version: r.get(9),
                    last_at: Timestamp::from_unix_millis(r.get(1)),
                    requests: n(2),
                    compared: n(3),
                    matched: n(4),
                    mismatched: n(5),
                    noise_only: n(6),
                    errors: n(7),
                    shed: n(8),
                    raced: n(10),
                }
            })
            .collect())
    }

    async fn mismatch_samples(
        &self,
        tenant: &TenantId,
        endpoint: Option<&str>,
        limit: u64,
    ) -> Result<Vec<MismatchSample>> {
        let s = &*self.inner;
        let client = s.client().await?;
        let rows = client
            .query(
                &s.q(
                    "SELECT tenant_id, endpoint, at, method, path, served_by, compared_with, served_status, compared_status, differences, version
                     FROM {s}.mismatch_samples WHERE tenant_id = $1 AND ($2::text IS NULL OR endpoint = $2) ORDER BY seq DESC LIMIT $3",
                ),
                &[&tenant.as_str(), &endpoint, &(limit.min(i64::MAX as u64) as i64)],
            )
            .await
            .map_err(s.err("reading mismatch samples"))?;
        rows.iter()
            .map(|r| {
                Ok(MismatchSample {
                    tenant: rules::tenant(r.get(0))?,
                    endpoint: r.get(1),
                    at: Timestamp::from_unix_millis(r.get(2)),
                    method: r.get(3),
                    path: r.get(4),
                    served_by: r.get(5),
                    compared_with: r.get(6),
                    served_status: u16::try_from(r.get::<_, i32>(7)).unwrap_or(0),
                    compared_status: u16::try_from(r.get::<_, i32>(8)).unwrap_or(0),
                    differences: r.get(9),
                    version: r.get(10),
                })
            })
            .collect()
    }

    async fn noise(&self) -> Result<Vec<NoiseEntry>> {
        let s = &*self.inner;
        let client = s.client().await?;
        let rows = client
            .query(&s.q("SELECT endpoint, path, score, observations, updated_at FROM {s}.noise_paths ORDER BY endpoint, path"), &[])
            .await
            .map_err(s.err("reading noise"))?;
        Ok(rows
            .iter()
            .map(|r| NoiseEntry {
                endpoint: r.get(0),
                path: r.get(1),
                score: r.get(2),
                observations: r.get::<_, i64>(3).max(0) as u64,
                updated_at: Timestamp::from_unix_millis(r.get(4)),
            })
            .collect())
    }

    async fn position(&self) -> Result<u64> {
        let client = self.inner.client().await?;
        self.inner.current_seq(&**client).await
    }

    async fn snapshot(&self) -> Result<Snapshot> {
        let s = &*self.inner;
        let mut client = s.client().await?;
        // REPEATABLE READ: the position and the tenants come from one snapshot.
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(s.err("starting a read"))?;
        let seq = s.current_seq(&*tx).await?;
        let tenants = s.load_tenants(&*tx, None).await?;
        let legacy_retired = s.load_retired(&*tx).await?;
        tx.commit().await.map_err(s.err("ending a read"))?;
        Ok(Snapshot {
            seq,
            tenants,
            legacy_retired,
        })
    }

    async fn changes_since(&self, seq: u64) -> Result<ChangeSet> {
        let client = self.inner.client().await?;
        self.inner.load_changes(&**client, seq).await
    }

    async fn tenant_config(
        &self,
        tenant: &TenantId,
        version: Option<u64>,
    ) -> Result<Option<ConfigVersion>> {
        let s = &*self.inner;
        let client = s.client().await?;
        let version = version.map(|v| v as i64);
        client
            .query_opt(
                &s.q(
                    "SELECT tenant_id, version, document, at, actor, reason FROM {s}.tenant_configs
                      WHERE tenant_id = $1 AND ($2::bigint IS NULL OR version = $2)
                      ORDER BY version DESC LIMIT 1",
                ),
                &[&tenant.as_str(), &version],
            )
            .await
            .map_err(s.err("reading a configuration"))?
            .map(|r| rules::config_from_row(config_row(&r)))
            .transpose()
    }

    async fn note(&self, tenant: &TenantId, actor: Actor, reason: &str) -> Result<()> {
        let s = &*self.inner;
        let reason = rules::reason(reason)?;
        let mut client = s.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(s.err("starting a write"))?;
        let current = s
            .load_tenant(&*tx, tenant.as_str())
            .await?
            .ok_or_else(|| StoreError::UnknownTenant(tenant.clone()))?;
        let event = NewEvent {
            at: now().unix_millis(),
            tenant: tenant.as_str(),
            from: Some(current.stage),
            to: current.stage,
            version: current.version,
            actor,
            reason,
        };
        s.append_audit(&*tx, event).await?;
        tx.commit().await.map_err(s.err("committing"))
    }

    async fn set_suspended(&self, change: SuspendChange) -> Result<Tenant> {
        let s = &*self.inner;
        let reason = rules::suspend_reason(&change)?;
        let mut client = s.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(s.err("starting a write"))?;
        let seq = s.next_seq(&*tx).await?;
        let id = change.tenant.as_str();
        let current = s
            .load_tenant(&*tx, id)
            .await?
            .ok_or_else(|| StoreError::UnknownTenant(change.tenant.clone()))?;
        if current.suspended == change.suspended {
            // Nothing to change: the transaction is dropped, so the change
            // position taken above is rolled back with it.
            return Ok(current);
        }
        let at = now().unix_millis();
        let version = current.version + 1;
        tx.execute(
            &s.q("UPDATE {s}.tenants SET suspended = $1, version = $2, updated_at = $3 WHERE id = $4"),
            &[&change.suspended, &(version as i64), &at, &id],
        )
        .await
        .map_err(s.err("suspending a tenant"))?;
        let event = NewEvent {
            at,
            tenant: id,
            from: Some(current.stage),
            to: current.stage,
            version,
            actor: change.actor,
            reason: &reason,
        };
        let changed = s
            .finish_tenant_change(&*tx, seq, &change.tenant, event)
            .await?;
        tx.commit().await.map_err(s.err("committing"))?;
        Ok(changed)
    }

    async fn claim_provision_job(
        &self,
        event_id: &str,
        kind: &str,
        payload: &str,
    ) -> Result<(ProvisionJob, bool)> {
        let s = &*self.inner;
        let client = s.client().await?;
        let at = now().unix_millis();
        let created = client
            .execute(
                &s.q("INSERT INTO {s}.provision_jobs (event_id, kind, payload, state, created_at, updated_at)
                      VALUES ($1, $2, $3, 'pending', $4, $4) ON CONFLICT (event_id) DO NOTHING"),
                &[&event_id, &kind, &payload, &at],
            )
            .await
            .map_err(s.err("recording a provisioning job"))?
            == 1;
        let row = client
            .query_one(
                &s.q(&format!(
                    "SELECT {JOB_COLUMNS} FROM {{s}}.provision_jobs WHERE event_id = $1"
                )),
                &[&event_id],
            )
            .await
            .map_err(s.err("reading a provisioning job"))?;
        Ok((rules::job_from_row(job_row(&row))?, created))
    }

    async fn update_provision_job(&self, job: &ProvisionJob) -> Result<()> {
        let s = &*self.inner;
        let client = s.client().await?;
        client
            .execute(
                &s.q("UPDATE {s}.provision_jobs SET tenant_id = COALESCE(tenant_id, $2), state = $3, steps = $4, attempts = $5,
                             last_error = $6, updated_at = $7 WHERE event_id = $1"),
                &[
                    &job.event_id,
                    &job.tenant.as_ref().map(TenantId::as_str),
                    &job.state.as_str(),
                    &job.steps.join(","),
                    &(job.attempts as i64),
                    &job.last_error,
                    &now().unix_millis(),
                ],
            )
            .await
            .map_err(s.err("recording a provisioning job's progress"))?;
        Ok(())
    }

    async fn provision_job(&self, event_id: &str) -> Result<Option<ProvisionJob>> {
        let s = &*self.inner;
        let client = s.client().await?;
        client
            .query_opt(
                &s.q(&format!(
                    "SELECT {JOB_COLUMNS} FROM {{s}}.provision_jobs WHERE event_id = $1"
                )),
                &[&event_id],
            )
            .await
            .map_err(s.err("reading a provisioning job"))?
            .map(|r| rules::job_from_row(job_row(&r)))
            .transpose()
    }

    async fn provision_job_of(&self, tenant: &TenantId) -> Result<Option<ProvisionJob>> {
        let s = &*self.inner;
        let client = s.client().await?;
        client
            .query_opt(
                &s.q(&format!(
                    "SELECT {JOB_COLUMNS} FROM {{s}}.provision_jobs WHERE tenant_id = $1
                     ORDER BY updated_at DESC, event_id LIMIT 1"
                )),
                &[&tenant.as_str()],
            )
            .await
            .map_err(s.err("reading a provisioning job"))?
            .map(|r| rules::job_from_row(job_row(&r)))
            .transpose()
    }

    async fn last_events(&self, tenants: &[TenantId]) -> Result<Vec<AuditEvent>> {
        let s = &*self.inner;
        let client = s.client().await?;
        let ids: Vec<&str> = tenants.iter().map(TenantId::as_str).collect();
        let rows = client
            .query(
                &s.q(
                    "SELECT DISTINCT ON (tenant_id) seq, at, tenant_id, from_stage, to_stage, version, actor, reason
                     FROM {s}.audit_log WHERE tenant_id = ANY($1) ORDER BY tenant_id, seq DESC",
                ),
                &[&ids],
            )
            .await
            .map_err(s.err("reading the audit log"))?;
        rows.iter()
            .map(|r| rules::audit_from_row(pg_audit_row(r)))
            .collect()
    }

    async fn provision_jobs(
        &self,
        state: Option<JobState>,
        limit: u64,
    ) -> Result<Vec<ProvisionJob>> {
        let s = &*self.inner;
        let client = s.client().await?;
        client
            .query(
                &s.q(&format!(
                    "SELECT {JOB_COLUMNS} FROM {{s}}.provision_jobs WHERE $1::text IS NULL OR state = $1
                     ORDER BY created_at, event_id LIMIT $2"
                )),
                &[&state.map(JobState::as_str), &(limit as i64)],
            )
            .await
            .map_err(s.err("listing provisioning jobs"))?
            .iter()
            .map(|r| rules::job_from_row(job_row(r)))
            .collect()
    }

    async fn latest_tenant_configs(&self) -> Result<Vec<ConfigVersion>> {
        let s = &*self.inner;
        let client = s.client().await?;
        client
            .query(
                &s.q(
                    "SELECT DISTINCT ON (tenant_id) tenant_id, version, document, at, actor, reason
                      FROM {s}.tenant_configs ORDER BY tenant_id, version DESC",
                ),
                &[],
            )
            .await
            .map_err(s.err("reading configurations"))?
            .iter()
            .map(|r| rules::config_from_row(config_row(r)))
            .collect()
    }

    async fn tenant_config_history(&self, tenant: &TenantId) -> Result<Vec<ConfigVersion>> {
        let s = &*self.inner;
        let client = s.client().await?;
        client
            .query(
                &s.q(
                    "SELECT tenant_id, version, document, at, actor, reason FROM {s}.tenant_configs
                      WHERE tenant_id = $1 ORDER BY version DESC",
                ),
                &[&tenant.as_str()],
            )
            .await
            .map_err(s.err("reading configuration history"))?
            .iter()
            .map(|r| rules::config_from_row(config_row(r)))
            .collect()
    }

    async fn set_tenant_config(&self, change: ConfigChange) -> Result<ConfigVersion> {
        rules::config_change(&change)?;
        let s = &*self.inner;
        let mut client = s.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(s.err("starting a write"))?;
        // Taking the change-log position first serializes writers, so two
        // concurrent changes cannot both be decided on the same version.
        let seq = s.next_seq(&*tx).await?;
        let id = change.tenant.as_str();
        if s.load_tenant(&*tx, id).await?.is_none() {
            return Err(StoreError::UnknownTenant(change.tenant.clone()));
        }
        let current: i64 = tx
            .query_one(
                &s.q(
                    "SELECT coalesce(max(version), 0) FROM {s}.tenant_configs WHERE tenant_id = $1",
                ),
                &[&id],
            )
            .await
            .map_err(s.err("reading a configuration"))?
            .get(0);
        if current as u64 != change.expected_version {
            return Err(StoreError::ConfigStale {
                tenant: change.tenant.clone(),
                expected: change.expected_version,
                actual: current as u64,
            });
        }
        let domains: Vec<&str> = change.domains.iter().map(Domain::as_str).collect();
        let mut owners = s.domain_owners(&*tx, &domains).await?;
        owners.retain(|_, owner| owner != id);
        check_domains_free(&owners, &change.domains)?;
        tx.execute(
            &s.q("DELETE FROM {s}.tenant_domains WHERE tenant_id = $1"),
            &[&id],
        )
        .await
        .map_err(s.err("replacing domains"))?;
        tx.execute(
            &s.q(
                "INSERT INTO {s}.tenant_domains (domain, tenant_id) SELECT unnest($1::text[]), $2",
            ),
            &[&domains, &id],
        )
        .await
        .map_err(s.err("replacing domains"))?;
        let at = now().unix_millis();
        tx.execute(
            &s.q(
                "INSERT INTO {s}.tenant_configs (tenant_id, version, document, at, actor, reason)
                  VALUES ($1, $2, $3, $4, $5, $6)",
            ),
            &[
                &id,
                &(current + 1),
                &change.document,
                &at,
                &change.actor.as_str(),
                &change.reason,
            ],
        )
        .await
        .map_err(s.err("writing a configuration"))?;
        s.record_change(&*tx, seq, Some(id)).await?;
        tx.commit().await.map_err(s.err("committing"))?;
        Ok(ConfigVersion {
            tenant: change.tenant,
            version: current as u64 + 1,
            document: change.document,
            actor: change.actor,
            reason: change.reason,
            at: Timestamp::from_unix_millis(at),
        })
    }

    fn subscribe(&self, from_seq: Option<u64>) -> Subscription {
        let (tx, sub) = Subscription::channel();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(pg_feed(Arc::clone(&self.inner), from_seq, tx));
            }
            Err(e) => {
                let _ = tx.try_send(FeedEvent::Lost {
                    error: format!("no async runtime for the feed: {e}"),
                });
            }
        }
        sub
    }
}

/// Follows the store until the subscriber goes away, reconnecting after losses
/// with capped exponential backoff.
async fn pg_feed(inner: Arc<Inner>, from_seq: Option<u64>, tx: mpsc::Sender<FeedEvent>) {
    let mut last = from_seq;
    let mut lost = false;
    let mut backoff = Duration::from_millis(100);
    loop {
        match follow(&inner, &mut last, &mut lost, &tx).await {
            Ok(()) => return,
            Err(e) => {
                if tx.is_closed() {
                    return;
                }
                if !lost {
                    lost = true;
                    backoff = Duration::from_millis(100);
                    if tx
                        .send(FeedEvent::Lost {
                            error: e.to_string(),
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = tx.closed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// One connection's worth of following. Returns `Ok` when the subscriber is gone,
/// `Err` when the connection is.
async fn follow(
    inner: &Inner,
    last: &mut Option<u64>,
    lost: &mut bool,
    tx: &mpsc::Sender<FeedEvent>,
) -> Result<()> {
    let (client, mut connection) =
        inner
            .config
            .connect(NoTls)
            .await
            .map_err(|e| StoreError::Unreachable {
                location: inner.location.clone(),
                detail: pg_detail(&e),
            })?;
    let (note_tx, mut notes) = mpsc::unbounded_channel::<()>();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(_) = message
                && note_tx.send(()).is_err()
            {
                break;
            }
        }
        // Dropping `note_tx` here tells the follower that the connection is gone.
    });
    let result = async {
        client
            .batch_execute(&format!("LISTEN {}", quote_ident(&inner.channel)))
            .await
            .map_err(inner.err("listening for changes"))?;
        if *lost {
            *lost = false;
            if tx.send(FeedEvent::Restored).await.is_err() {
                return Ok(());
            }
        }
        let mut resync = tokio::time::interval(RESYNC_EVERY);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The first tick fires at once, so a (re)connection starts by catching up.
            tokio::select! {
                note = notes.recv() => {
                    if note.is_none() {
                        return Err(StoreError::Unreachable {
                            location: inner.location.clone(),
                            detail: "the connection to the store was closed".into(),
                        });
                    }
                    while notes.try_recv().is_ok() {}
                }
                _ = resync.tick() => {}
                () = tx.closed() => return Ok(()),
            }
            match *last {
                None => {
                    *last = Some(inner.current_seq(&client).await?);
                }
                Some(since) => {
                    let set = inner.load_changes(&client, since).await?;
                    if set.seq != since {
                        *last = Some(set.seq);
                        if tx.send(FeedEvent::Changed(set)).await.is_err() {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
    .await;
    driver.abort();
    result
}

fn config_row(r: &tokio_postgres::Row) -> ConfigRow {
    ConfigRow {
        tenant: r.get(0),
        version: r.get(1),
        document: r.get(2),
        at: r.get(3),
        actor: r.get(4),
        reason: r.get(5),
    }
}

fn job_row(r: &Row) -> JobRow {
    JobRow {
        event_id: r.get(0),
        kind: r.get(1),
        payload: r.get(2),
        tenant: r.get(3),
        state: r.get(4),
        steps: r.get(5),
        attempts: r.get(6),
        last_error: r.get(7),
        created_at: r.get(8),
        updated_at: r.get(9),
    }
}

fn class_row(r: &Row) -> rules::ClassRow {
    rules::ClassRow {
        id: r.get(0),
        endpoint: r.get(1),
        path: r.get(2),
        kind: r.get(3),
        additive: r.get(4),
        state: r.get(5),
        epoch: r.get(6),
        first_seen: r.get(7),
        last_seen: r.get(8),
        resolved_at: r.get(9),
        fixed_in: r.get(10),
        regression: r.get(11),
        example_at: r.get(12),
        example_request: r.get(13),
        example_version: r.get(14),
        example_difference: r.get(15),
        change_at: r.get(16),
        change_action: r.get(17),
        change_actor: r.get(18),
        change_reason: r.get(19),
        change_version: r.get(20),
    }
}
