//! The embedded store: one SQLite file in WAL mode with durable commits.
//!
//! rusqlite is synchronous, so every operation runs on tokio's blocking pool with the
//! connection behind a `std::sync::Mutex`; the lock is never held across an await.
//! Writes use `BEGIN IMMEDIATE`, which takes SQLite's single write lock up front, so
//! the check inside a write (does the tenant exist, is the version current) and the
//! write itself cannot interleave with another process's write.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ficus_core::readiness::LatencyEvidence;
use ficus_core::reconcile::{ClassEvent, ClassEvidence, ClassState, MismatchClass};
use ficus_core::{Actor, AuditEvent, Progress, Route, Stage, Tenant, TenantId, Timestamp};
use rusqlite::{
    Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params,
};

use crate::feed::{ChangeSet, FeedEvent, Subscription};
use crate::rules::{self, AuditRow, ConfigRow, JOB_COLUMNS, JobRow, NewEvent, TenantRow};
use crate::{
    AuditQuery, ClassChange, ClassCount, ComparisonCount, ConfigChange, ConfigVersion,
    ControlStore, EndpointCount, Evidence, GateEvidence, InitOutcome, JobState, LatencyReport,
    MismatchSample, NewTenant, NoiseEntry, OpenMode, ProvisionJob, Result, RouteChange, RouteCount,
    RouteEvent, RouteStage, SAMPLES_KEPT, SCHEMA_VERSION, Snapshot, StageChange, StoreError,
    SuspendChange, TrafficCount, now,
};

/// How many change-log entries are kept; a subscriber further behind resyncs.
const CHANGES_KEPT: i64 = 10_000;

/// How often the feed asks SQLite whether another connection has committed,
/// where it cannot watch the store's directory (`FeedWake::Clock`). The
/// question (`PRAGMA data_version`) reads a counter in shared memory, so asking
/// often costs little; but it wakes every replica a hundred times a second.
const FEED_POLL: Duration = Duration::from_millis(10);

/// The first wait after a write the feed saw (`FeedWake::Watch`); each wait
/// with nothing written doubles it, up to `FEED_FALLBACK`.
const FEED_SOON: Duration = Duration::from_millis(1);

/// How long the feed waits for a write it can see (`FeedWake::Watch`) before
/// it asks all the same: a commit inotify did not report (one made visible
/// long after its last write, a store on a file system that does not report
/// another host's writes) still arrives well under the second the design
/// allows.
const FEED_FALLBACK: Duration = Duration::from_millis(250);

/// Schema migrations; entry `i` brings the store from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE ficus_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE tenants (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    stage      TEXT NOT NULL CHECK (stage IN ('legacy', 'shadow', 'migrated')),
    version    INTEGER NOT NULL CHECK (version > 0),
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;
CREATE TABLE tenant_domains (
    domain    TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id)
) STRICT;
CREATE INDEX tenant_domains_tenant ON tenant_domains (tenant_id);
CREATE TABLE audit_log (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    at         INTEGER NOT NULL,
    tenant_id  TEXT NOT NULL,
    from_stage TEXT,
    to_stage   TEXT NOT NULL,
    version    INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    reason     TEXT NOT NULL
);
CREATE INDEX audit_log_tenant ON audit_log (tenant_id, seq);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TABLE change_counter (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    seq   INTEGER NOT NULL,
    floor INTEGER NOT NULL
) STRICT;
INSERT INTO change_counter (id, seq, floor) VALUES (1, 0, 0);
CREATE TABLE changes (
    seq       INTEGER NOT NULL,
    tenant_id TEXT
) STRICT;
CREATE INDEX changes_seq ON changes (seq);
INSERT INTO ficus_meta (key, value) VALUES ('app', 'ficus');
"#,
    r#"
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;
INSERT INTO settings (key, value) VALUES ('legacy_retired', 'false');
CREATE TABLE global_audit (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    at      INTEGER NOT NULL,
    setting TEXT NOT NULL,
    value   TEXT NOT NULL,
    actor   TEXT NOT NULL,
    reason  TEXT NOT NULL
);
CREATE TRIGGER global_audit_no_update BEFORE UPDATE ON global_audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER global_audit_no_delete BEFORE DELETE ON global_audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TABLE legacy_traffic (
    tenant_key TEXT NOT NULL,
    hour       INTEGER NOT NULL,
    requests   INTEGER NOT NULL,
    last_at    INTEGER NOT NULL,
    PRIMARY KEY (tenant_key, hour)
) STRICT;
CREATE INDEX legacy_traffic_last_at ON legacy_traffic (last_at);
CREATE TABLE traffic_reports (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    first_at INTEGER NOT NULL,
    last_at  INTEGER NOT NULL
) STRICT;
"#,
    r#"
CREATE TABLE comparisons (
    tenant_id  TEXT NOT NULL,
    endpoint   TEXT NOT NULL,
    hour       INTEGER NOT NULL,
    last_at    INTEGER NOT NULL,
    requests   INTEGER NOT NULL,
    compared   INTEGER NOT NULL,
    matched    INTEGER NOT NULL,
    mismatched INTEGER NOT NULL,
    noise_only INTEGER NOT NULL,
    errors     INTEGER NOT NULL,
    shed       INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, endpoint, hour)
) STRICT;
CREATE TABLE mismatch_samples (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id       TEXT NOT NULL,
    endpoint        TEXT NOT NULL,
    at              INTEGER NOT NULL,
    method          TEXT NOT NULL,
    path            TEXT NOT NULL,
    served_by       TEXT NOT NULL,
    compared_with   TEXT NOT NULL,
    served_status   INTEGER NOT NULL,
    compared_status INTEGER NOT NULL,
    differences     TEXT NOT NULL
);
CREATE INDEX mismatch_samples_tenant ON mismatch_samples (tenant_id, endpoint, seq);
CREATE TABLE noise_paths (
    endpoint     TEXT NOT NULL,
    path         TEXT NOT NULL,
    score        REAL NOT NULL,
    observations INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (endpoint, path)
) STRICT;
"#,
    r#"
CREATE TABLE latencies (
    tenant_id TEXT NOT NULL,
    backend   TEXT NOT NULL,
    hour      INTEGER NOT NULL,
    bucket    INTEGER NOT NULL,
    count     INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, backend, hour, bucket)
) STRICT;
"#,
    r#"
CREATE TABLE tenant_configs (
    tenant_id TEXT NOT NULL REFERENCES tenants (id),
    version   INTEGER NOT NULL CHECK (version > 0),
    document  TEXT NOT NULL,
    at        INTEGER NOT NULL,
    actor     TEXT NOT NULL,
    reason    TEXT NOT NULL,
    PRIMARY KEY (tenant_id, version)
) STRICT;
CREATE TRIGGER tenant_configs_no_update BEFORE UPDATE ON tenant_configs
BEGIN SELECT RAISE(ABORT, 'configuration history is append-only'); END;
CREATE TRIGGER tenant_configs_no_delete BEFORE DELETE ON tenant_configs
BEGIN SELECT RAISE(ABORT, 'configuration history is append-only'); END;
"#,
    r#"
ALTER TABLE tenants ADD COLUMN suspended INTEGER NOT NULL DEFAULT 0;
CREATE TABLE provision_jobs (
    event_id   TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    payload    TEXT NOT NULL,
    tenant_id  TEXT,
    state      TEXT NOT NULL CHECK (state IN ('pending', 'done', 'failed')),
    steps      TEXT NOT NULL DEFAULT '',
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;
CREATE INDEX provision_jobs_state ON provision_jobs (state, created_at);
"#,
    r#"
CREATE TABLE comparisons_v7 (
    tenant_id  TEXT NOT NULL,
    endpoint   TEXT NOT NULL,
    version    TEXT NOT NULL,
    hour       INTEGER NOT NULL,
    last_at    INTEGER NOT NULL,
    requests   INTEGER NOT NULL,
    compared   INTEGER NOT NULL,
    matched    INTEGER NOT NULL,
    mismatched INTEGER NOT NULL,
    noise_only INTEGER NOT NULL,
    errors     INTEGER NOT NULL,
    shed       INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, endpoint, version, hour)
) STRICT;
INSERT INTO comparisons_v7
    SELECT tenant_id, endpoint, '', hour, last_at, requests, compared, matched, mismatched, noise_only, errors, shed
    FROM comparisons;
DROP TABLE comparisons;
ALTER TABLE comparisons_v7 RENAME TO comparisons;
ALTER TABLE mismatch_samples ADD COLUMN version TEXT;
CREATE TABLE mismatch_classes (
    id                 TEXT PRIMARY KEY,
    endpoint           TEXT NOT NULL,
    path               TEXT NOT NULL,
    kind               TEXT NOT NULL,
    additive           INTEGER NOT NULL,
    state              TEXT NOT NULL CHECK (state IN ('open', 'resolved', 'accepted')),
    epoch              INTEGER NOT NULL CHECK (epoch >= 0),
    first_seen         INTEGER NOT NULL,
    last_seen          INTEGER NOT NULL,
    resolved_at        INTEGER,
    fixed_in           TEXT,
    regression         INTEGER NOT NULL DEFAULT 0,
    example_at         INTEGER,
    example_request    TEXT,
    example_version    TEXT,
    example_difference TEXT,
    change_at          INTEGER,
    change_action      TEXT,
    change_actor       TEXT,
    change_reason      TEXT,
    change_version     TEXT
) STRICT;
CREATE TABLE mismatch_class_counts (
    tenant_id TEXT NOT NULL,
    class_id  TEXT NOT NULL,
    epoch     INTEGER NOT NULL,
    version   TEXT NOT NULL,
    hour      INTEGER NOT NULL,
    count     INTEGER NOT NULL,
    first_at  INTEGER NOT NULL,
    last_at   INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, hour, class_id, epoch, version)
) STRICT;
CREATE INDEX mismatch_class_counts_hour ON mismatch_class_counts (hour);
CREATE TABLE mismatch_class_events (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    at       INTEGER NOT NULL,
    class_id TEXT NOT NULL,
    action   TEXT NOT NULL,
    actor    TEXT NOT NULL,
    reason   TEXT NOT NULL,
    version  TEXT
);
CREATE INDEX mismatch_class_events_class ON mismatch_class_events (class_id, seq);
CREATE TRIGGER mismatch_class_events_no_update BEFORE UPDATE ON mismatch_class_events
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER mismatch_class_events_no_delete BEFORE DELETE ON mismatch_class_events
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"#,
    r#"
CREATE TABLE route_stages (
    route      TEXT NOT NULL,
    tenant_id  TEXT NOT NULL,
    stage      TEXT NOT NULL CHECK (stage IN ('legacy', 'shadow', 'migrated')),
    version    INTEGER NOT NULL CHECK (version > 0),
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (route, tenant_id)
) STRICT;
CREATE TABLE route_marks (
    route TEXT PRIMARY KEY
) STRICT;
CREATE TABLE route_events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    at         INTEGER NOT NULL,
    route      TEXT NOT NULL,
    tenant_id  TEXT NOT NULL,
    action     TEXT NOT NULL,
    from_stage TEXT,
    to_stage   TEXT,
    version    INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    reason     TEXT NOT NULL
);
CREATE INDEX route_events_route ON route_events (route, seq);
CREATE TRIGGER route_events_no_update BEFORE UPDATE ON route_events
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER route_events_no_delete BEFORE DELETE ON route_events
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TABLE route_census (
    tenant_key TEXT NOT NULL,
    route      TEXT NOT NULL,
    backend    TEXT NOT NULL,
    client     TEXT NOT NULL,
    hour       INTEGER NOT NULL,
    count      INTEGER NOT NULL,
    last_at    INTEGER NOT NULL,
    configured INTEGER NOT NULL,
    PRIMARY KEY (tenant_key, route, backend, client, hour)
) STRICT;
CREATE INDEX route_census_hour ON route_census (hour);
-- A store that already has migrated tenants sent their writes to new before
-- routes had stages: they keep doing so until someone holds them on purpose.
INSERT INTO settings (key, value)
    SELECT 'route_write_default', 'migrated' WHERE EXISTS (SELECT 1 FROM tenants WHERE stage = 'migrated');
"#,
    r#"
-- Compared reads a write of the same tenant raced: counted, not judged.
ALTER TABLE comparisons ADD COLUMN raced INTEGER NOT NULL DEFAULT 0;
"#,
];

/// The SQLite control store.
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    location: String,
    outcome: InitOutcome,
}

impl SqliteStore {
    pub async fn open(path: &Path, mode: OpenMode) -> Result<SqliteStore> {
        let path = path.to_path_buf();
        let location = format!("sqlite:{}", path.display());
        let (conn, outcome) = {
            let (path, location) = (path.clone(), location.clone());
            blocking(move || open_connection(&path, &location, mode)).await?
        };
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path,
            location,
            outcome,
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, &str) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = Arc::clone(&self.conn);
        let location = self.location.clone();
        blocking(move || {
            // A poisoned lock means a panic while the connection was held; SQLite
            // rolls back any open transaction when its statement objects drop, so
            // the connection itself is still sound.
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard, &location)
        })
        .await
    }

    /// Runs `f` in a `BEGIN IMMEDIATE` transaction that also takes the next change
    /// position, and commits.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>, &str, i64) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.with(move |conn, location| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql_err(location, "starting a write"))?;
            let seq = next_seq(&tx, location)?;
            let out = f(&tx, location, seq)?;
            tx.commit().map_err(sql_err(location, "committing"))?;
            Ok(out)
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Backend {
            context: "store worker".into(),
            detail: e.to_string(),
        })?
}

fn sql_err(location: &str, context: &str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    let (location, context) = (location.to_string(), context.to_string());
    move |e| match e.sqlite_error_code() {
        Some(ErrorCode::ReadOnly) | Some(ErrorCode::CannotOpen) if context == "opening" => {
            StoreError::ReadOnly { location }
        }
        Some(ErrorCode::ReadOnly) => StoreError::ReadOnly { location },
        Some(ErrorCode::NotADatabase) => StoreError::NotAFicusStore {
            location,
            detail: "not an SQLite database".into(),
        },
        _ => StoreError::Backend {
            context: format!("{context} ({location})"),
            detail: e.to_string(),
        },
    }
}

fn open_connection(
    path: &Path,
    location: &str,
    mode: OpenMode,
) -> Result<(Connection, InitOutcome)> {
    match std::fs::metadata(path) {
        Err(_) if mode == OpenMode::Existing => {
            return Err(StoreError::NotInitialized {
                location: location.into(),
            });
        }
        Err(_) => {}
        Ok(meta) if meta.is_dir() => {
            return Err(StoreError::NotAFicusStore {
                location: location.into(),
                detail: "it is a directory".into(),
            });
        }
        // Checked by hand because root ignores file permissions: an operator who
        // made the store read-only meant it, whoever runs ficus.
        Ok(meta) if meta.permissions().readonly() => {
            return Err(StoreError::ReadOnly {
                location: location.into(),
            });
        }
        Ok(_) => {}
    }
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if mode == OpenMode::Create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let mut conn =
        Connection::open_with_flags(path, flags).map_err(sql_err(location, "opening"))?;
    if conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(false) {
        return Err(StoreError::ReadOnly {
            location: location.into(),
        });
    }
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(sql_err(location, "configuring"))?;

    // Look before touching anything: a file that is not ours must stay byte for byte
    // as it was, so WAL mode is switched on only once the file is known to be ours.
    let found = schema_version(&conn, location)?;
    match found {
        None if mode == OpenMode::Existing => {
            return Err(StoreError::NotInitialized {
                location: location.into(),
            });
        }
        Some(v) if v > SCHEMA_VERSION => {
            return Err(StoreError::NewerSchema {
                location: location.into(),
                found: v,
                supported: SCHEMA_VERSION,
            });
        }
        _ => {}
    }
    conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))
        .map_err(sql_err(location, "enabling WAL"))?;
    // FULL makes every commit durable across power loss in WAL mode; NORMAL would
    // only protect against application crashes.
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
        .map_err(sql_err(location, "configuring"))?;

    let outcome = migrate(&mut conn, location)?;
    Ok((conn, outcome))
}

/// The store's schema version; `None` for an empty database. Refuses a database
/// that holds tables Ficus did not create.
fn schema_version(conn: &Connection, location: &str) -> Result<Option<i64>> {
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(sql_err(location, "reading the schema"))?;
    if tables.is_empty() {
        return Ok(None);
    }
    if !tables.iter().any(|t| t == "ficus_meta") {
        let mut listed = tables
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if tables.len() > 5 {
            listed.push_str(", …");
        }
        return Err(StoreError::NotAFicusStore {
            location: location.into(),
            detail: format!("it holds tables ficus did not create: {listed}"),
        });
    }
    let meta = |key: &str| -> Result<Option<String>> {
        conn.query_row("SELECT value FROM ficus_meta WHERE key = ?1", [key], |r| {
            r.get(0)
        })
        .optional()
        .map_err(sql_err(location, "reading ficus_meta"))
    };
    if meta("app")?.as_deref() != Some("ficus") {
        return Err(StoreError::NotAFicusStore {
            location: location.into(),
            detail: "its ficus_meta table does not name ficus".into(),
        });
    }
    let version = meta("schema_version")?.unwrap_or_default();
    version
        .parse::<i64>()
        .map(Some)
        .map_err(|_| StoreError::Corrupt(format!("schema version {version:?}")))
}

fn migrate(conn: &mut Connection, location: &str) -> Result<InitOutcome> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_err(location, "starting the schema migration"))?;
    // Read again under the write lock: another process may have migrated meanwhile.
    let from = schema_version(&tx, location)?.unwrap_or(0);
    if from > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            location: location.into(),
            found: from,
            supported: SCHEMA_VERSION,
        });
    }
    for sql in &MIGRATIONS[from as usize..] {
        tx.execute_batch(sql)
            .map_err(sql_err(location, "migrating the schema"))?;
    }
    tx.execute(
        "INSERT INTO ficus_meta (key, value) VALUES ('schema_version', ?1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [SCHEMA_VERSION.to_string()],
    )
    .map_err(sql_err(location, "recording the schema version"))?;
    tx.commit()
        .map_err(sql_err(location, "committing the schema"))?;
    Ok(match from {
        0 => InitOutcome::Created,
        v if v == SCHEMA_VERSION => InitOutcome::AlreadyInitialized,
        v => InitOutcome::Upgraded { from: v },
    })
}

/// The tail of every change to an existing tenant: its audit entry, its
/// change-log row, and the tenant as it now is.
fn finish_tenant_change(
    tx: &Transaction<'_>,
    location: &str,
    seq: i64,
    tenant: &TenantId,
    event: NewEvent<'_>,
) -> Result<Tenant> {
    append_audit(tx, location, event)?;
    record_change(tx, location, seq, Some(tenant.as_str()))?;
    load_tenant(tx, location, tenant.as_str())?
        .ok_or_else(|| StoreError::UnknownTenant(tenant.clone()))
}

/// Takes the next change-log position; prunes old entries now and then.
fn next_seq(tx: &Transaction<'_>, location: &str) -> Result<i64> {
    let seq: i64 = tx
        .query_row(
            "UPDATE change_counter SET seq = seq + 1 WHERE id = 1 RETURNING seq",
            [],
            |r| r.get(0),
        )
        .map_err(sql_err(location, "advancing the change log"))?;
    if seq % 1000 == 0 && seq > CHANGES_KEPT {
        let floor = seq - CHANGES_KEPT;
        tx.execute("DELETE FROM changes WHERE seq <= ?1", [floor])
            .and_then(|_| tx.execute("UPDATE change_counter SET floor = ?1 WHERE id = 1", [floor]))
            .map_err(sql_err(location, "pruning the change log"))?;
    }
    Ok(seq)
}

fn record_change(
    tx: &Transaction<'_>,
    location: &str,
    seq: i64,
    tenant: Option<&str>,
) -> Result<()> {
    tx.prepare_cached("INSERT INTO changes (seq, tenant_id) VALUES (?1, ?2)")
        .and_then(|mut s| s.execute(params![seq, tenant]))
        .map_err(sql_err(location, "recording a change"))?;
    Ok(())
}

fn append_audit(tx: &Transaction<'_>, location: &str, e: NewEvent<'_>) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO audit_log (at, tenant_id, from_stage, to_stage, version, actor, reason)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .and_then(|mut s| {
        s.execute(params![
            e.at,
            e.tenant,
            e.from.map(Stage::as_str),
            e.to.as_str(),
            e.version as i64,
            e.actor.as_str(),
            e.reason
        ])
    })
    .map_err(sql_err(location, "appending to the audit log"))?;
    Ok(())
}

fn insert_tenant(tx: &Transaction<'_>, location: &str, t: &NewTenant, at: i64) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO tenants (id, name, stage, version, created_at, updated_at) VALUES (?1, ?2, ?3, 1, ?4, ?4)",
    )
    .and_then(|mut s| s.execute(params![t.id.as_str(), t.name, t.stage.as_str(), at]))
    .map_err(sql_err(location, "adding a tenant"))?;
    let mut stmt = tx
        .prepare_cached("INSERT INTO tenant_domains (domain, tenant_id) VALUES (?1, ?2)")
        .map_err(sql_err(location, "adding a domain"))?;
    for d in &t.domains {
        stmt.execute(params![d.as_str(), t.id.as_str()])
            .map_err(sql_err(location, "adding a domain"))?;
    }
    Ok(())
}

const TENANT_COLUMNS: &str = "id, name, stage, version, created_at, updated_at, suspended";

fn tenant_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TenantRow> {
    Ok(TenantRow {
        id: r.get(0)?,
        name: r.get(1)?,
        stage: r.get(2)?,
        version: r.get(3)?,
        created_at: r.get(4)?,
        updated_at: r.get(5)?,
        suspended: r.get::<_, i64>(6)? != 0,
    })
}

fn load_tenant(conn: &Connection, location: &str, id: &str) -> Result<Option<Tenant>> {
    let row = conn
        .prepare_cached(&format!(
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE id = ?1"
        ))
        .and_then(|mut s| s.query_row([id], tenant_row).optional())
        .map_err(sql_err(location, "reading a tenant"))?;
    let Some(row) = row else { return Ok(None) };
    let domains: Vec<String> = conn
        .prepare_cached("SELECT domain FROM tenant_domains WHERE tenant_id = ?1 ORDER BY domain")
        .and_then(|mut s| s.query_map([id], |r| r.get(0))?.collect())
        .map_err(sql_err(location, "reading a tenant's domains"))?;
    rules::tenant_from_row(row, domains).map(Some)
}

fn load_tenants(conn: &Connection, location: &str, stage: Option<Stage>) -> Result<Vec<Tenant>> {
    let stage = stage.map(Stage::as_str);
    let rows: Vec<TenantRow> = conn
        .prepare_cached(&format!(
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE ?1 IS NULL OR stage = ?1 ORDER BY id"
        ))
        .and_then(|mut s| s.query_map([stage], tenant_row)?.collect())
        .map_err(sql_err(location, "listing tenants"))?;
    let domains: Vec<(String, String)> = conn
        .prepare_cached(
            "SELECT d.tenant_id, d.domain FROM tenant_domains d JOIN tenants t ON t.id = d.tenant_id
             WHERE ?1 IS NULL OR t.stage = ?1",
        )
        .and_then(|mut s| s.query_map([stage], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .map_err(sql_err(location, "listing domains"))?;
    rules::assemble(rows, domains)
}

fn audit_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRow> {
    Ok(AuditRow {
        seq: r.get(0)?,
        at: r.get(1)?,
        tenant: r.get(2)?,
        from: r.get(3)?,
        to: r.get(4)?,
        version: r.get(5)?,
        actor: r.get(6)?,
        reason: r.get(7)?,
    })
}

fn load_audit(conn: &Connection, location: &str, q: &AuditQuery) -> Result<Vec<AuditEvent>> {
    let limit = q.limit.map_or(i64::MAX, |l| l.min(i64::MAX as u64) as i64);
    let rows: Vec<AuditRow> = conn
        .prepare_cached(
            "SELECT seq, at, tenant_id, from_stage, to_stage, version, actor, reason FROM (
                SELECT * FROM audit_log
                WHERE (?1 IS NULL OR tenant_id = ?1) AND (?2 IS NULL OR at >= ?2)
                  AND (?4 IS NULL OR at < ?4) AND (?5 IS NULL OR actor = ?5) AND (?6 IS NULL OR to_stage = ?6)
                ORDER BY seq DESC LIMIT ?3
             ) ORDER BY seq",
        )
        .and_then(|mut s| {
            s.query_map(
                params![
                    q.tenant.as_ref().map(TenantId::as_str),
                    q.since.map(|t| t.unix_millis()),
                    limit,
                    q.until.map(|t| t.unix_millis()),
                    q.actor.as_deref(),
                    q.to.map(Stage::as_str),
                ],
                audit_row,
            )?
            .collect()
        })
        .map_err(sql_err(location, "reading the audit log"))?;
    rows.into_iter().map(rules::audit_from_row).collect()
}

/// The change-log position the store is at.
fn current_seq(conn: &Connection, location: &str) -> Result<u64> {
    let seq: i64 = conn
        .query_row("SELECT seq FROM change_counter WHERE id = 1", [], |r| {
            r.get(0)
        })
        .map_err(sql_err(location, "reading the change log"))?;
    Ok(seq as u64)
}

fn load_retired(conn: &Connection, location: &str) -> Result<bool> {
    let value: String = conn
        .query_row(
            "SELECT value FROM settings WHERE key = 'legacy_retired'",
            [],
            |r| r.get(0),
        )
        .map_err(sql_err(location, "reading settings"))?;
    Ok(value == "true")
}

fn load_changes(conn: &Connection, location: &str, since: u64) -> Result<ChangeSet> {
    let (seq, floor): (i64, i64) = conn
        .query_row(
            "SELECT seq, floor FROM change_counter WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(sql_err(location, "reading the change log"))?;
    let seq = seq as u64;
    if since < floor as u64 || since > seq {
        return Ok(ChangeSet {
            seq,
            tenants: BTreeSet::new(),
            resync: true,
            routes: true,
        });
    }
    let touched: Vec<Option<String>> = conn
        .prepare_cached("SELECT DISTINCT tenant_id FROM changes WHERE seq > ?1 AND seq <= ?2")
        .and_then(|mut s| {
            s.query_map(params![since as i64, seq as i64], |r| r.get(0))?
                .collect()
        })
        .map_err(sql_err(location, "reading the change log"))?;
    let mut set = ChangeSet {
        seq,
        tenants: BTreeSet::new(),
        resync: false,
        routes: false,
    };
    for t in touched {
        match t {
            None => set.resync = true,
            Some(id) if id == crate::feed::ROUTES_MARK => set.routes = true,
            Some(id) => {
                set.tenants
                    .insert(TenantId::parse(&id).map_err(|e| StoreError::Corrupt(e.to_string()))?);
            }
        }
    }
    Ok(set)
}

#[async_trait]
impl ControlStore for SqliteStore {
    fn location(&self) -> &str {
        &self.location
    }

    fn init_outcome(&self) -> InitOutcome {
        self.outcome
    }

    async fn add_tenant(&self, tenant: NewTenant, actor: Actor, reason: &str) -> Result<Tenant> {
        let reason = rules::reason(reason)?.to_string();
        rules::check_own_domains(&tenant)?;
        self.write(move |tx, location, seq| {
            let id = tenant.id.as_str();
            if load_tenant(tx, location, id)?.is_some() {
                return Err(StoreError::TenantExists(tenant.id.clone()));
            }
            for d in &tenant.domains {
                let owner: Option<String> = tx
                    .query_row(
                        "SELECT tenant_id FROM tenant_domains WHERE domain = ?1",
                        [d.as_str()],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(sql_err(location, "checking a domain"))?;
                if let Some(owner) = owner {
                    return Err(StoreError::DomainTaken {
                        domain: d.clone(),
                        owner: TenantId::parse(&owner)
                            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    });
                }
            }
            let at = now().unix_millis();
            insert_tenant(tx, location, &tenant, at)?;
            let event = NewEvent {
                at,
                tenant: id,
                from: None,
                to: tenant.stage,
                version: 1,
                actor,
                reason: &reason,
            };
            append_audit(tx, location, event)?;
            record_change(tx, location, seq, Some(id))?;
            load_tenant(tx, location, id)?
                .ok_or_else(|| StoreError::UnknownTenant(tenant.id.clone()))
        })
        .await
    }

    async fn import_tenants(
        &self,
        tenants: Vec<NewTenant>,
        actor: Actor,
        reason: &str,
    ) -> Result<u64> {
        let reason = rules::reason(reason)?.to_string();
        for t in &tenants {
            rules::check_own_domains(t)?;
        }
        self.write(move |tx, location, seq| {
            let existing_ids: HashSet<String> = {
                let mut stmt = tx
                    .prepare("SELECT id FROM tenants")
                    .map_err(sql_err(location, "reading tenant ids"))?;
                stmt.query_map([], |r| r.get(0))
                    .and_then(|rows| rows.collect())
                    .map_err(sql_err(location, "reading tenant ids"))?
            };
            let owners: HashMap<String, String> = {
                let mut stmt = tx
                    .prepare("SELECT domain, tenant_id FROM tenant_domains")
                    .map_err(sql_err(location, "reading domains"))?;
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .and_then(|rows| rows.collect())
                    .map_err(sql_err(location, "reading domains"))?
            };
            let conflicts = rules::import_conflicts(&tenants, &existing_ids, &owners);
            if !conflicts.is_empty() {
                return Err(StoreError::ImportConflicts(conflicts));
            }
            let at = now().unix_millis();
            for t in &tenants {
                insert_tenant(tx, location, t, at)?;
                let event = NewEvent {
                    at,
                    tenant: t.id.as_str(),
                    from: None,
                    to: t.stage,
                    version: 1,
                    actor,
                    reason: &reason,
                };
                append_audit(tx, location, event)?;
            }
            // One entry for the whole import: subscribers reload everything rather
            // than read thousands of tenants one by one.
            record_change(tx, location, seq, None)?;
            Ok(tenants.len() as u64)
        })
        .await
    }

    async fn tenant(&self, id: &TenantId) -> Result<Option<Tenant>> {
        let id = id.clone();
        self.with(move |conn, location| load_tenant(conn, location, id.as_str()))
            .await
    }

    async fn tenants(&self, stage: Option<Stage>) -> Result<Vec<Tenant>> {
        self.with(move |conn, location| load_tenants(conn, location, stage))
            .await
    }

    async fn tenants_by_id(&self, ids: &[TenantId]) -> Result<Vec<Tenant>> {
        let ids: BTreeSet<TenantId> = ids.iter().cloned().collect();
        self.with(move |conn, location| {
            let tx = conn
                .transaction()
                .map_err(sql_err(location, "starting a read"))?;
            let mut out = Vec::with_capacity(ids.len());
            for id in &ids {
                if let Some(t) = load_tenant(&tx, location, id.as_str())? {
                    out.push(t);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn change_stage(&self, change: StageChange) -> Result<Tenant> {
        let reason = rules::reason(&change.reason)?.to_string();
        self.write(move |tx, location, seq| {
            let id = change.tenant.as_str();
            let current = load_tenant(tx, location, id)?
                .ok_or_else(|| StoreError::UnknownTenant(change.tenant.clone()))?;
            rules::check_stage_change(&current, &change, || {
                let q = AuditQuery { tenant: Some(change.tenant.clone()), limit: Some(1), ..AuditQuery::default() };
                Ok(load_audit(tx, location, &q)?.pop())
            })?;
            let at = now().unix_millis();
            let version = current.version + 1;
            tx.execute(
                "UPDATE tenants SET stage = ?1, version = ?2, updated_at = ?3 WHERE id = ?4 AND version = ?5",
                params![change.to.as_str(), version as i64, at, id, current.version as i64],
            )
            .map_err(sql_err(location, "changing a stage"))?;
            let event = NewEvent {
                at,
                tenant: id,
                from: Some(current.stage),
                to: change.to,
                version,
                actor: change.actor,
                reason: &reason,
            };
            finish_tenant_change(tx, location, seq, &change.tenant, event)
        })
        .await
    }

    async fn audit(&self, query: AuditQuery) -> Result<Vec<AuditEvent>> {
        self.with(move |conn, location| load_audit(conn, location, &query))
            .await
    }

    async fn progress(&self) -> Result<Progress> {
        self.with(|conn, location| {
            let counts: Vec<(String, i64)> = conn
                .prepare_cached("SELECT stage, count(*) FROM tenants GROUP BY stage")
                .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
                .map_err(sql_err(location, "counting tenants"))?;
            let mut p = Progress::default();
            for (stage, n) in counts {
                let stage = Stage::parse(&stage).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                p.count(stage, n as u64);
            }
            let last_request: Option<i64> = conn
                .query_row("SELECT max(last_at) FROM legacy_traffic", [], |r| r.get(0))
                .map_err(sql_err(location, "reading legacy traffic"))?;
            let first_report: Option<i64> = conn
                .query_row(
                    "SELECT first_at FROM traffic_reports WHERE id = 1",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql_err(location, "reading legacy traffic"))?;
            p.legacy_last_request = rules::legacy_last_request(last_request, first_report);
            Ok(p)
        })
        .await
    }

    async fn legacy_retired(&self) -> Result<bool> {
        self.with(|conn, location| load_retired(conn, location))
            .await
    }

    async fn set_legacy_retired(&self, retired: bool, actor: Actor, reason: &str) -> Result<bool> {
        let reason = rules::reason(reason)?.to_string();
        self.write(move |tx, location, seq| {
            if load_retired(tx, location)? == retired {
                return Ok(false);
            }
            let value = retired.to_string();
            put_setting(
                tx,
                location,
                "legacy_retired",
                &value,
                &value,
                actor,
                &reason,
            )?;
            record_change(tx, location, seq, None)?;
            Ok(true)
        })
        .await
    }

    async fn record_legacy_traffic(
        &self,
        counts: &[TrafficCount],
        reported_at: Timestamp,
    ) -> Result<()> {
        let counts = counts.to_vec();
        self.with(move |conn, location| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql_err(location, "starting a write"))?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO legacy_traffic (tenant_key, hour, requests, last_at) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (tenant_key, hour) DO UPDATE SET
                             requests = requests + excluded.requests, last_at = max(last_at, excluded.last_at)",
                    )
                    .map_err(sql_err(location, "recording legacy traffic"))?;
                for c in &counts {
                    stmt.execute(params![
                        rules::traffic_key(c.tenant.as_ref()),
                        rules::hour_of(c.last_at),
                        c.requests as i64,
                        c.last_at.unix_millis()
                    ])
                    .map_err(sql_err(location, "recording legacy traffic"))?;
                }
            }
            tx.execute(
                "INSERT INTO traffic_reports (id, first_at, last_at) VALUES (1, ?1, ?1)
                 ON CONFLICT (id) DO UPDATE SET last_at = max(last_at, excluded.last_at)",
                [reported_at.unix_millis()],
            )
            .map_err(sql_err(location, "recording legacy traffic"))?;
            tx.commit().map_err(sql_err(location, "committing"))
        })
        .await
    }

    async fn legacy_traffic(&self, since: Timestamp) -> Result<Vec<TrafficCount>> {
        self.with(move |conn, location| {
            let rows: Vec<(String, i64, i64)> = conn
                .prepare_cached(
                    "SELECT tenant_key, sum(requests), max(last_at) FROM legacy_traffic
                     WHERE hour >= ?1 GROUP BY tenant_key ORDER BY tenant_key",
                )
                .and_then(|mut s| {
                    s.query_map([rules::hour_of(since)], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })?
                    .collect()
                })
                .map_err(sql_err(location, "reading legacy traffic"))?;
            rows.into_iter()
                .map(|(k, n, at)| rules::traffic_from_row(k, n, at))
                .collect()
        })
        .await
    }

    async fn record_comparisons(&self, evidence: &Evidence) -> Result<()> {
        let Evidence {
            counts,
            samples,
            noise,
            classes,
        } = evidence.clone();
        self.with(move |conn, location| {
            let err = |what: &'static str| sql_err(location, what);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err("starting a write"))?;
            {
                let mut upsert = tx
                    .prepare_cached(
                        "INSERT INTO comparisons (tenant_id, endpoint, hour, last_at, requests, compared, matched, mismatched, noise_only, errors, shed, version, raced)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
                         ON CONFLICT (tenant_id, endpoint, version, hour) DO UPDATE SET
                             last_at = max(last_at, excluded.last_at), requests = requests + excluded.requests,
                             compared = compared + excluded.compared, matched = matched + excluded.matched,
                             mismatched = mismatched + excluded.mismatched, noise_only = noise_only + excluded.noise_only,
                             errors = errors + excluded.errors, shed = shed + excluded.shed,
                             raced = raced + excluded.raced",
                    )
                    .map_err(err("recording comparisons"))?;
                for c in &counts {
                    upsert
                        .execute(params![
                            c.tenant.as_str(),
                            c.endpoint,
                            rules::hour_of(c.last_at),
                            c.last_at.unix_millis(),
                            c.requests as i64,
                            c.compared as i64,
                            c.matched as i64,
                            c.mismatched as i64,
                            c.noise_only as i64,
                            c.errors as i64,
                            c.shed as i64,
                            c.version,
                            c.raced as i64
                        ])
                        .map_err(err("recording comparisons"))?;
                }
                let mut insert = tx
                    .prepare_cached(
                        "INSERT INTO mismatch_samples (tenant_id, endpoint, at, method, path, served_by, compared_with, served_status, compared_status, differences, version)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                    )
                    .map_err(err("recording mismatch samples"))?;
                let mut prune = tx
                    .prepare_cached(
                        "DELETE FROM mismatch_samples WHERE tenant_id = ?1 AND endpoint = ?2 AND seq NOT IN
                            (SELECT seq FROM mismatch_samples WHERE tenant_id = ?1 AND endpoint = ?2 ORDER BY seq DESC LIMIT ?3)",
                    )
                    .map_err(err("pruning mismatch samples"))?;
                for m in &samples {
                    insert
                        .execute(params![
                            m.tenant.as_str(),
                            m.endpoint,
                            m.at.unix_millis(),
                            m.method,
                            m.path,
                            m.served_by,
                            m.compared_with,
                            m.served_status,
                            m.compared_status,
                            m.differences,
                            m.version
                        ])
                        .map_err(err("recording mismatch samples"))?;
                    prune.execute(params![m.tenant.as_str(), m.endpoint, SAMPLES_KEPT]).map_err(err("pruning mismatch samples"))?;
                }
                let mut put = tx
                    .prepare_cached(
                        "INSERT INTO noise_paths (endpoint, path, score, observations, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (endpoint, path) DO UPDATE SET score = excluded.score,
                             observations = excluded.observations, updated_at = excluded.updated_at",
                    )
                    .map_err(err("recording noise"))?;
                for n in &noise {
                    put.execute(params![n.endpoint, n.path, n.score, n.observations as i64, n.updated_at.unix_millis()])
                        .map_err(err("recording noise"))?;
                }
                let at = now();
                // In id order, as the PostgreSQL store writes them.
                let mut classes = classes;
                classes.sort_by(|a, b| a.id.cmp(&b.id));
                for c in &classes {
                    record_class(&tx, location, c, at)?;
                }
            }
            tx.commit().map_err(err("committing"))
        })
        .await
    }

    async fn route_stages(&self) -> Result<Vec<RouteStage>> {
        self.with(|conn, location| load_route_stages(conn, location))
            .await
    }

    async fn change_route(&self, change: RouteChange) -> Result<RouteStage> {
        let reason = rules::reason(&change.reason)?.to_string();
        self.write(move |tx, location, seq| {
            let route = change.route.to_string();
            let tenant = change.tenant.as_ref().map_or("", TenantId::as_str).to_string();
            if let Some(t) = &change.tenant
                && load_tenant(tx, location, t.as_str())?.is_none()
            {
                return Err(StoreError::UnknownTenant(t.clone()));
            }
            let row = |t: &str| -> Result<Option<(Stage, u64)>> {
                let found: Option<(String, i64)> = tx
                    .query_row(
                        "SELECT stage, version FROM route_stages WHERE route = ?1 AND tenant_id = ?2",
                        params![route, t],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()
                    .map_err(sql_err(location, "reading a route stage"))?;
                found
                    .map(|(s, v)| Ok((Stage::parse(&s).map_err(|e| StoreError::Corrupt(e.to_string()))?, v.max(0) as u64)))
                    .transpose()
            };
            let own = row(&tenant)?;
            let inherited = if tenant.is_empty() { None } else { row("")?.map(|(s, _)| s) };
            let write_default = load_write_default(tx, location)?;
            let version = rules::check_route_change(&change, own, inherited, write_default)?;
            let at = now().unix_millis();
            tx.execute(
                "INSERT INTO route_stages (route, tenant_id, stage, version, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (route, tenant_id) DO UPDATE SET stage = excluded.stage, version = excluded.version,
                     updated_at = excluded.updated_at",
                params![route, tenant, change.to.as_str(), version as i64, at],
            )
            .map_err(sql_err(location, "changing a route stage"))?;
            let from = own
                .map(|(s, _)| s)
                .or(inherited)
                .unwrap_or_else(|| rules::route_default(&change.route, write_default));
            tx.execute(
                "INSERT INTO route_events (at, route, tenant_id, action, from_stage, to_stage, version, actor, reason)
                 VALUES (?1, ?2, ?3, 'stage', ?4, ?5, ?6, ?7, ?8)",
                params![at, route, tenant, from.as_str(), change.to.as_str(), version as i64, change.actor.as_str(), reason],
            )
            .map_err(sql_err(location, "appending to the audit log"))?;
            record_change(tx, location, seq, Some(crate::feed::ROUTES_MARK))?;
            Ok(RouteStage {
                route,
                tenant: change.tenant.clone(),
                stage: change.to,
                version,
                updated_at: Timestamp::from_unix_millis(at),
            })
        })
        .await
    }

    async fn mark_route(
        &self,
        route: &Route,
        destructive: bool,
        actor: Actor,
        reason: &str,
    ) -> Result<bool> {
        let reason = rules::reason(reason)?.to_string();
        let route = route.to_string();
        self.write(move |tx, location, _seq| {
            let changed = if destructive {
                tx.execute("INSERT INTO route_marks (route) VALUES (?1) ON CONFLICT DO NOTHING", [&route])
            } else {
                tx.execute("DELETE FROM route_marks WHERE route = ?1", [&route])
            }
            .map_err(sql_err(location, "marking a route"))?;
            if changed > 0 {
                tx.execute(
                    "INSERT INTO route_events (at, route, tenant_id, action, version, actor, reason) VALUES (?1, ?2, '', ?3, 0, ?4, ?5)",
                    params![now().unix_millis(), route, if destructive { "destructive" } else { "not destructive" }, actor.as_str(), reason],
                )
                .map_err(sql_err(location, "appending to the audit log"))?;
            }
            Ok(changed > 0)
        })
        .await
    }

    async fn write_default(&self) -> Result<Stage> {
        self.with(|conn, location| load_write_default(conn, location))
            .await
    }

    async fn set_write_default(&self, stage: Stage, actor: Actor, reason: &str) -> Result<bool> {
        let reason = rules::reason(reason)?.to_string();
        self.write(move |tx, location, seq| {
            if load_write_default(tx, location)? == stage {
                return Ok(false);
            }
            let value = stage.as_str();
            put_setting(
                tx,
                location,
                rules::WRITE_DEFAULT,
                value,
                value,
                actor,
                &reason,
            )?;
            record_change(tx, location, seq, Some(crate::feed::ROUTES_MARK))?;
            Ok(true)
        })
        .await
    }

    async fn route_marks(&self) -> Result<Vec<String>> {
        self.with(|conn, location| {
            conn.prepare_cached("SELECT route FROM route_marks ORDER BY route")
                .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
                .map_err(sql_err(location, "reading route marks"))
        })
        .await
    }

    async fn route_events(&self, route: Option<&str>, limit: u64) -> Result<Vec<RouteEvent>> {
        let route = route.map(str::to_string);
        self.with(move |conn, location| {
            let rows: Vec<rules::RouteEventRow> = conn
                .prepare_cached(
                    "SELECT seq, at, route, tenant_id, action, from_stage, to_stage, version, actor, reason FROM
                        (SELECT * FROM route_events WHERE (?1 IS NULL OR route = ?1) ORDER BY seq DESC LIMIT ?2)
                     ORDER BY seq",
                )
                .and_then(|mut s| {
                    s.query_map(params![route, limit.min(i64::MAX as u64) as i64], |r| {
                        Ok(rules::RouteEventRow {
                            seq: r.get(0)?,
                            at: r.get(1)?,
                            route: r.get(2)?,
                            tenant: r.get(3)?,
                            action: r.get(4)?,
                            from: r.get(5)?,
                            to: r.get(6)?,
                            version: r.get(7)?,
                            actor: r.get(8)?,
                            reason: r.get(9)?,
                        })
                    })?
                    .collect()
                })
                .map_err(sql_err(location, "reading the routes' audit log"))?;
            rows.into_iter().map(rules::route_event_from_row).collect()
        })
        .await
    }

    async fn record_route_census(&self, counts: &[RouteCount]) -> Result<()> {
        let counts = counts.to_vec();
        self.with(move |conn, location| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql_err(location, "starting a write"))?;
            {
                let mut upsert = tx
                    .prepare_cached(
                        "INSERT INTO route_census (tenant_key, route, backend, client, hour, count, last_at, configured) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                         ON CONFLICT (tenant_key, route, backend, client, hour) DO UPDATE SET
                             count = count + excluded.count, last_at = max(last_at, excluded.last_at),
                             configured = max(configured, excluded.configured)",
                    )
                    .map_err(sql_err(location, "recording the route census"))?;
                for c in &counts {
                    upsert
                        .execute(params![
                            rules::traffic_key(c.tenant.as_ref()),
                            c.route,
                            c.backend,
                            c.client,
                            rules::hour_of(c.last_at),
                            c.count as i64,
                            c.last_at.unix_millis(),
                            i64::from(c.configured)
                        ])
                        .map_err(sql_err(location, "recording the route census"))?;
                }
            }
            tx.commit().map_err(sql_err(location, "committing"))
        })
        .await
    }

    async fn route_census(
        &self,
        tenant: Option<&TenantId>,
        since: Timestamp,
    ) -> Result<Vec<RouteCount>> {
        let key = tenant.map(|t| rules::traffic_key(Some(t)).to_string());
        self.with(move |conn, location| {
            let rows: Vec<(String, String, String, String, i64, i64, i64)> = conn
                .prepare_cached(
                    "SELECT tenant_key, route, backend, client, sum(count), max(last_at), max(configured) FROM route_census
                     WHERE (?1 IS NULL OR tenant_key = ?1) AND hour >= ?2
                     GROUP BY tenant_key, route, backend, client ORDER BY route, tenant_key, backend, client",
                )
                .and_then(|mut s| {
                    s.query_map(params![key, rules::hour_of(since)], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
                    })?
                    .collect()
                })
                .map_err(sql_err(location, "reading the route census"))?;
            rows.into_iter()
                .map(|(k, route, backend, client, n, at, configured)| rules::census_from_row(k, route, backend, client, n, at, configured != 0))
                .collect()
        })
        .await
    }

    async fn mismatch_classes(&self, state: Option<ClassState>) -> Result<Vec<MismatchClass>> {
        self.with(move |conn, location| {
            let sql = format!(
                "SELECT {} FROM mismatch_classes WHERE (?1 IS NULL OR state = ?1) ORDER BY endpoint, path, kind",
                rules::CLASS_COLUMNS
            );
            let rows: Vec<rules::ClassRow> = conn
                .prepare_cached(&sql)
                .and_then(|mut s| s.query_map([state.map(ClassState::as_str)], class_row)?.collect())
                .map_err(sql_err(location, "reading mismatch classes"))?;
            rows.into_iter().map(rules::class_from_row).collect()
        })
        .await
    }

    async fn class_evidence(
        &self,
        tenant: Option<&TenantId>,
        since: Timestamp,
    ) -> Result<Vec<ClassEvidence>> {
        let tenant = tenant.map(|t| t.as_str().to_string());
        self.with(move |conn, location| {
            conn.prepare_cached(
                "SELECT class_id, epoch, version, sum(count), min(first_at), max(last_at) FROM mismatch_class_counts
                 WHERE (?1 IS NULL OR tenant_id = ?1) AND hour >= ?2 GROUP BY class_id, epoch, version",
            )
            .and_then(|mut s| {
                s.query_map(params![tenant, rules::hour_of(since)], |r| {
                    Ok(ClassEvidence {
                        class: r.get(0)?,
                        epoch: r.get::<_, i64>(1)?.max(0) as u64,
                        version: r.get(2)?,
                        count: r.get::<_, i64>(3)?.max(0) as u64,
                        first_at: Timestamp::from_unix_millis(r.get(4)?),
                        last_at: Timestamp::from_unix_millis(r.get(5)?),
                    })
                })?
                .collect()
            })
            .map_err(sql_err(location, "reading mismatch evidence"))
        })
        .await
    }

    async fn change_class(&self, change: ClassChange) -> Result<MismatchClass> {
        self.write(move |tx, location, seq| {
            let class = load_class(tx, location, &change.id)?
                .ok_or_else(|| StoreError::UnknownClass(change.id.clone()))?;
            let (class, event) = rules::changed_class(class, &change, now())?;
            write_class(tx, location, &class, &event)?;
            // Every proxy reloads: an accepted class is a comparison rule.
            record_change(tx, location, seq, None)?;
            Ok(class)
        })
        .await
    }

    async fn class_history(&self, id: &str) -> Result<Vec<ClassEvent>> {
        let id = id.to_string();
        self.with(move |conn, location| {
            let rows: Vec<(i64, String, String, String, Option<String>)> = conn
                .prepare_cached(
                    "SELECT at, action, actor, reason, version FROM mismatch_class_events WHERE class_id = ?1 ORDER BY seq",
                )
                .and_then(|mut s| {
                    s.query_map([&id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
                        .collect()
                })
                .map_err(sql_err(location, "reading a class's history"))?;
            rows.into_iter()
                .map(|(at, action, actor, reason, version)| {
                    Ok(ClassEvent {
                        at: Timestamp::from_unix_millis(at),
                        action,
                        actor: Actor::parse(&actor).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                        reason,
                        version,
                    })
                })
                .collect()
        })
        .await
    }

    async fn record_latencies(&self, reports: &[LatencyReport]) -> Result<()> {
        let reports = reports.to_vec();
        self.with(move |conn, location| {
            let err = |what: &'static str| sql_err(location, what);
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(err("starting a write"))?;
            {
                let mut upsert = tx
                    .prepare_cached(
                        "INSERT INTO latencies (tenant_id, backend, hour, bucket, count) VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (tenant_id, backend, hour, bucket) DO UPDATE SET count = count + excluded.count",
                    )
                    .map_err(err("recording latencies"))?;
                for r in &reports {
                    for (bucket, count) in r.histogram.buckets() {
                        upsert
                            .execute(params![
                                r.tenant.as_str(),
                                rules::backend_key(r.backend),
                                rules::hour_of(r.at),
                                i64::from(bucket),
                                count as i64
                            ])
                            .map_err(err("recording latencies"))?;
                    }
                }
            }
            tx.commit().map_err(err("committing"))
        })
        .await
    }

    async fn latencies(&self, tenant: &TenantId, since: Timestamp) -> Result<LatencyEvidence> {
        let tenant = tenant.clone();
        self.with(move |conn, location| {
            let rows: Vec<(String, i64, i64)> = conn
                .prepare_cached(
                    "SELECT backend, bucket, sum(count) FROM latencies WHERE tenant_id = ?1 AND hour >= ?2
                     GROUP BY backend, bucket",
                )
                .and_then(|mut s| {
                    s.query_map(params![tenant.as_str(), rules::hour_of(since)], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })?
                    .collect()
                })
                .map_err(sql_err(location, "reading latencies"))?;
            let mut evidence = LatencyEvidence::default();
            for (backend, bucket, count) in rows {
                rules::add_latency(&mut evidence, &backend, bucket, count);
            }
            Ok(evidence)
        })
        .await
    }

    async fn legacy_hours(&self, since: Timestamp) -> Result<Vec<(Timestamp, u64)>> {
        self.with(move |conn, location| {
            conn.prepare_cached(
                "SELECT hour, sum(count) FROM route_census WHERE backend = 'legacy' AND hour >= ?1
                 GROUP BY hour ORDER BY hour",
            )
            .and_then(|mut s| {
                s.query_map(params![rules::hour_of(since)], |r| {
                    Ok((
                        Timestamp::from_unix_millis(r.get(0)?),
                        r.get::<_, i64>(1)?.max(0) as u64,
                    ))
                })?
                .collect()
            })
            .map_err(sql_err(location, "reading the route census"))
        })
        .await
    }

    async fn endpoint_counts(&self, since: Timestamp) -> Result<Vec<EndpointCount>> {
        self.with(move |conn, location| {
            conn.prepare_cached(
                "SELECT endpoint, count(DISTINCT tenant_id), sum(requests), sum(compared), sum(mismatched), sum(errors)
                 FROM comparisons WHERE hour >= ?1 GROUP BY endpoint ORDER BY endpoint",
            )
            .and_then(|mut s| {
                s.query_map(params![rules::hour_of(since)], |r| {
                    let n = |i| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
                    Ok(EndpointCount {
                        endpoint: r.get(0)?,
                        tenants: n(1)?,
                        requests: n(2)?,
                        compared: n(3)?,
                        mismatched: n(4)?,
                        errors: n(5)?,
                    })
                })?
                .collect()
            })
            .map_err(sql_err(location, "reading comparisons"))
        })
        .await
    }

    async fn latency_hours(
        &self,
        tenant: &TenantId,
        since: Timestamp,
    ) -> Result<Vec<(Timestamp, LatencyEvidence)>> {
        let tenant = tenant.clone();
        self.with(move |conn, location| {
            let rows: Vec<(i64, String, i64, i64)> = conn
                .prepare_cached(
                    "SELECT hour, backend, bucket, sum(count) FROM latencies WHERE tenant_id = ?1 AND hour >= ?2
                     GROUP BY hour, backend, bucket ORDER BY hour",
                )
                .and_then(|mut s| {
                    s.query_map(params![tenant.as_str(), rules::hour_of(since)], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })?
                    .collect()
                })
                .map_err(sql_err(location, "reading latencies"))?;
            Ok(rules::latency_hours(rows))
        })
        .await
    }

    async fn gate_evidence(&self, since: Timestamp) -> Result<GateEvidence> {
        self.with(move |conn, location| {
            let hour = rules::hour_of(since);
            let tenant = |raw: String| {
                TenantId::parse(&raw).map_err(|e| StoreError::Corrupt(e.to_string()))
            };
            // One read transaction, so the three agree.
            let tx = conn
                .transaction()
                .map_err(sql_err(location, "starting a read"))?;
            type Raw = (String, String, String, i64, [i64; 8]);
            let stats: Vec<Raw> = tx
                .prepare_cached(
                    "SELECT tenant_id, endpoint, version, max(last_at), sum(requests), sum(compared), sum(matched),
                            sum(mismatched), sum(noise_only), sum(errors), sum(shed), sum(raced)
                     FROM comparisons WHERE hour >= ?1 GROUP BY tenant_id, endpoint, version
                     ORDER BY tenant_id, endpoint, version",
                )
                .and_then(|mut s| {
                    s.query_map(params![hour], |r| {
                        let mut n = [0i64; 8];
                        for (k, v) in n.iter_mut().enumerate() {
                            *v = r.get(4 + k)?;
                        }
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, n))
                    })?
                    .collect()
                })
                .map_err(sql_err(location, "reading comparisons"))?;
            let classes: Vec<(String, ClassEvidence)> = tx
                .prepare_cached(
                    "SELECT tenant_id, class_id, epoch, version, sum(count), min(first_at), max(last_at)
                     FROM mismatch_class_counts WHERE hour >= ?1 GROUP BY tenant_id, class_id, epoch, version",
                )
                .and_then(|mut s| {
                    s.query_map(params![hour], |r| {
                        Ok((
                            r.get(0)?,
                            ClassEvidence {
                                class: r.get(1)?,
                                epoch: r.get::<_, i64>(2)?.max(0) as u64,
                                version: r.get(3)?,
                                count: r.get::<_, i64>(4)?.max(0) as u64,
                                first_at: Timestamp::from_unix_millis(r.get(5)?),
                                last_at: Timestamp::from_unix_millis(r.get(6)?),
                            },
                        ))
                    })?
                    .collect()
                })
                .map_err(sql_err(location, "reading mismatch evidence"))?;
            let latencies: Vec<(String, String, i64, i64)> = tx
                .prepare_cached(
                    "SELECT tenant_id, backend, bucket, sum(count) FROM latencies WHERE hour >= ?1
                     GROUP BY tenant_id, backend, bucket ORDER BY tenant_id",
                )
                .and_then(|mut s| {
                    s.query_map(params![hour], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })?
                    .collect()
                })
                .map_err(sql_err(location, "reading latencies"))?;
            let mut out = GateEvidence::default();
            for (t, endpoint, version, last_at, n) in stats {
                let c = |i: usize| n[i].max(0) as u64;
                out.stats.push(ComparisonCount {
                    tenant: tenant(t)?,
                    endpoint,
                    version,
                    last_at: Timestamp::from_unix_millis(last_at),
                    requests: c(0),
                    compared: c(1),
                    matched: c(2),
                    mismatched: c(3),
                    noise_only: c(4),
                    errors: c(5),
                    shed: c(6),
                    raced: c(7),
                });
            }
            for (t, e) in classes {
                out.classes.push((tenant(t)?, e));
            }
            for (t, backend, bucket, count) in latencies {
                let id = tenant(t)?;
                if out.latencies.last().is_none_or(|(last, _)| *last != id) {
                    out.latencies.push((id, LatencyEvidence::default()));
                }
                if let Some((_, evidence)) = out.latencies.last_mut() {
                    rules::add_latency(evidence, &backend, bucket, count);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn setting(&self, key: &str) -> Result<Option<String>> {
        let key = rules::setting_key(key)?.to_string();
        self.with(move |conn, location| {
            conn.query_row("SELECT value FROM settings WHERE key = ?1", [&key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql_err(location, "reading settings"))
        })
        .await
    }

    async fn settings_under(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let prefix = rules::setting_key(prefix)?.to_string();
        self.with(move |conn, location| {
            conn.prepare_cached(
                "SELECT key, value FROM settings WHERE substr(key, 1, length(?1)) = ?1 ORDER BY key",
            )
            .and_then(|mut s| {
                s.query_map([&prefix], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<Vec<(String, String)>>>()
            })
            .map_err(sql_err(location, "reading settings"))
        })
        .await
    }

    async fn set_setting(
        &self,
        key: &str,
        value: &str,
        shown: &str,
        actor: Actor,
        reason: &str,
    ) -> Result<()> {
        let key = rules::setting_key(key)?.to_string();
        let reason = rules::reason(reason)?.to_string();
        let (value, shown) = (value.to_string(), shown.to_string());
        self.with(move |conn, location| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql_err(location, "starting a write"))?;
            put_setting(&tx, location, &key, &value, &shown, actor, &reason)?;
            tx.commit().map_err(sql_err(location, "committing"))
        })
        .await
    }

    async fn comparison_stats(
        &self,
        tenant: &TenantId,
        since: Timestamp,
    ) -> Result<Vec<ComparisonCount>> {
        let tenant = tenant.clone();
        self.with(move |conn, location| {
            let rows: Vec<ComparisonCount> = conn
                .prepare_cached(
                    "SELECT endpoint, max(last_at), sum(requests), sum(compared), sum(matched), sum(mismatched), sum(noise_only), sum(errors), sum(shed), version, sum(raced)
                     FROM comparisons WHERE tenant_id = ?1 AND hour >= ?2 GROUP BY endpoint, version ORDER BY endpoint, version",
                )
                .and_then(|mut s| {
                    s.query_map(params![tenant.as_str(), rules::hour_of(since)], |r| {
                        let n = |i| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
                        Ok(ComparisonCount {
                            tenant: tenant.clone(),
                            endpoint: r.get(0)?,
                            version: r.get(9)?,
                            last_at: Timestamp::from_unix_millis(r.get(1)?),
                            requests: n(2)?,
                            compared: n(3)?,
                            matched: n(4)?,
                            mismatched: n(5)?,
                            noise_only: n(6)?,
                            errors: n(7)?,
                            shed: n(8)?,
                            raced: n(10)?,
                        })
                    })?
                    .collect()
                })
                .map_err(sql_err(location, "reading comparisons"))?;
            Ok(rows)
        })
        .await
    }

    async fn mismatch_samples(
        &self,
        tenant: &TenantId,
        endpoint: Option<&str>,
        limit: u64,
    ) -> Result<Vec<MismatchSample>> {
        let (tenant, endpoint) = (tenant.clone(), endpoint.map(str::to_string));
        self.with(move |conn, location| {
            let rows: Vec<(String, String, i64, String, String, String, String, u16, u16, String, Option<String>)> = conn
                .prepare_cached(
                    "SELECT tenant_id, endpoint, at, method, path, served_by, compared_with, served_status, compared_status, differences, version
                     FROM mismatch_samples WHERE tenant_id = ?1 AND (?2 IS NULL OR endpoint = ?2) ORDER BY seq DESC LIMIT ?3",
                )
                .and_then(|mut s| {
                    s.query_map(params![tenant.as_str(), endpoint, limit.min(i64::MAX as u64) as i64], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?, r.get(10)?))
                    })?
                    .collect()
                })
                .map_err(sql_err(location, "reading mismatch samples"))?;
            rows.into_iter()
                .map(|(t, endpoint, at, method, path, served_by, compared_with, served_status, compared_status, differences, version)| {
                    Ok(MismatchSample {
                        tenant: rules::tenant(&t)?,
                        endpoint,
                        at: Timestamp::from_unix_millis(at),
                        method,
                        path,
                        served_by,
                        compared_with,
                        served_status,
                        compared_status,
                        differences,
                        version,
                    })
                })
                .collect()
        })
        .await
    }

    async fn noise(&self) -> Result<Vec<NoiseEntry>> {
        self.with(|conn, location| {
            conn.prepare_cached("SELECT endpoint, path, score, observations, updated_at FROM noise_paths ORDER BY endpoint, path")
                .and_then(|mut s| {
                    s.query_map([], |r| {
                        Ok(NoiseEntry {
                            endpoint: r.get(0)?,
                            path: r.get(1)?,
                            score: r.get(2)?,
                            observations: r.get::<_, i64>(3)?.max(0) as u64,
                            updated_at: Timestamp::from_unix_millis(r.get(4)?),
                        })
                    })?
                    .collect()
                })
                .map_err(sql_err(location, "reading noise"))
        })
        .await
    }

    async fn position(&self) -> Result<u64> {
        self.with(|conn, location| current_seq(conn, location))
            .await
    }

    async fn snapshot(&self) -> Result<Snapshot> {
        self.with(|conn, location| {
            // One read transaction, so the position and the tenants agree.
            let tx = conn
                .transaction()
                .map_err(sql_err(location, "starting a read"))?;
            let seq = current_seq(&tx, location)?;
            let tenants = load_tenants(&tx, location, None)?;
            let legacy_retired = load_retired(&tx, location)?;
            Ok(Snapshot {
                seq,
                tenants,
                legacy_retired,
            })
        })
        .await
    }

    async fn changes_since(&self, seq: u64) -> Result<ChangeSet> {
        self.with(move |conn, location| load_changes(conn, location, seq))
            .await
    }

    async fn tenant_config(
        &self,
        tenant: &TenantId,
        version: Option<u64>,
    ) -> Result<Option<ConfigVersion>> {
        let (id, version) = (tenant.as_str().to_string(), version.map(|v| v as i64));
        self.with(move |conn, location| {
            conn.prepare_cached(
                "SELECT tenant_id, version, document, at, actor, reason FROM tenant_configs
                 WHERE tenant_id = ?1 AND (?2 IS NULL OR version = ?2)
                 ORDER BY version DESC LIMIT 1",
            )
            .and_then(|mut s| s.query_row(params![id, version], config_row).optional())
            .map_err(sql_err(location, "reading a configuration"))?
            .map(rules::config_from_row)
            .transpose()
        })
        .await
    }

    async fn note(&self, tenant: &TenantId, actor: Actor, reason: &str) -> Result<()> {
        let reason = rules::reason(reason)?.to_string();
        let tenant = tenant.clone();
        self.with(move |conn, location| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql_err(location, "starting a write"))?;
            let current = load_tenant(&tx, location, tenant.as_str())?
                .ok_or_else(|| StoreError::UnknownTenant(tenant.clone()))?;
            let event = NewEvent {
                at: now().unix_millis(),
                tenant: tenant.as_str(),
                from: Some(current.stage),
                to: current.stage,
                version: current.version,
                actor,
                reason: &reason,
            };
            append_audit(&tx, location, event)?;
            tx.commit().map_err(sql_err(location, "committing"))
        })
        .await
    }

    async fn set_suspended(&self, change: SuspendChange) -> Result<Tenant> {
        let reason = rules::suspend_reason(&change)?;
        match self.tenant(&change.tenant).await? {
            None => return Err(StoreError::UnknownTenant(change.tenant)),
            Some(t) if t.suspended == change.suspended => return Ok(t),
            Some(_) => {}
        }
        self.write(move |tx, location, seq| {
            let id = change.tenant.as_str();
            let current = load_tenant(tx, location, id)?
                .ok_or_else(|| StoreError::UnknownTenant(change.tenant.clone()))?;
            let at = now().unix_millis();
            let version = current.version + 1;
            tx.execute(
                "UPDATE tenants SET suspended = ?1, version = ?2, updated_at = ?3 WHERE id = ?4",
                params![i64::from(change.suspended), version as i64, at, id],
            )
            .map_err(sql_err(location, "suspending a tenant"))?;
            let event = NewEvent {
                at,
                tenant: id,
                from: Some(current.stage),
                to: current.stage,
                version,
                actor: change.actor,
                reason: &reason,
            };
            finish_tenant_change(tx, location, seq, &change.tenant, event)
        })
        .await
    }

    async fn claim_provision_job(
        &self,
        event_id: &str,
        kind: &str,
        payload: &str,
    ) -> Result<(ProvisionJob, bool)> {
        let (event_id, kind, payload) =
            (event_id.to_string(), kind.to_string(), payload.to_string());
        self.with(move |conn, location| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql_err(location, "starting a write"))?;
            let at = now().unix_millis();
            let created = tx
                .execute(
                    "INSERT INTO provision_jobs (event_id, kind, payload, state, created_at, updated_at)
                     VALUES (?1, ?2, ?3, 'pending', ?4, ?4) ON CONFLICT (event_id) DO NOTHING",
                    params![event_id, kind, payload, at],
                )
                .map_err(sql_err(location, "recording a provisioning job"))?
                == 1;
            let row = tx
                .query_row(
                    &format!("SELECT {JOB_COLUMNS} FROM provision_jobs WHERE event_id = ?1"),
                    [&event_id],
                    job_row,
                )
                .map_err(sql_err(location, "reading a provisioning job"))?;
            tx.commit().map_err(sql_err(location, "committing"))?;
            Ok((rules::job_from_row(row)?, created))
        })
        .await
    }

    async fn update_provision_job(&self, job: &ProvisionJob) -> Result<()> {
        let job = job.clone();
        self.with(move |conn, location| {
            conn.execute(
                "UPDATE provision_jobs SET tenant_id = COALESCE(tenant_id, ?2), state = ?3, steps = ?4, attempts = ?5,
                        last_error = ?6, updated_at = ?7 WHERE event_id = ?1",
                params![
                    job.event_id,
                    job.tenant.as_ref().map(TenantId::as_str),
                    job.state.as_str(),
                    job.steps.join(","),
                    job.attempts as i64,
                    job.last_error,
                    now().unix_millis()
                ],
            )
            .map_err(sql_err(location, "recording a provisioning job's progress"))?;
            Ok(())
        })
        .await
    }

    async fn provision_job(&self, event_id: &str) -> Result<Option<ProvisionJob>> {
        let event_id = event_id.to_string();
        self.with(move |conn, location| {
            conn.prepare_cached(&format!(
                "SELECT {JOB_COLUMNS} FROM provision_jobs WHERE event_id = ?1"
            ))
            .and_then(|mut s| s.query_row([&event_id], job_row).optional())
            .map_err(sql_err(location, "reading a provisioning job"))?
            .map(rules::job_from_row)
            .transpose()
        })
        .await
    }

    async fn provision_job_of(&self, tenant: &TenantId) -> Result<Option<ProvisionJob>> {
        let tenant = tenant.as_str().to_string();
        self.with(move |conn, location| {
            conn.prepare_cached(&format!(
                "SELECT {JOB_COLUMNS} FROM provision_jobs WHERE tenant_id = ?1
                 ORDER BY updated_at DESC, event_id LIMIT 1"
            ))
            .and_then(|mut s| s.query_row([&tenant], job_row).optional())
            .map_err(sql_err(location, "reading a provisioning job"))?
            .map(rules::job_from_row)
            .transpose()
        })
        .await
    }

    async fn last_events(&self, tenants: &[TenantId]) -> Result<Vec<AuditEvent>> {
        let ids: Vec<String> = tenants.iter().map(|t| t.as_str().to_string()).collect();
        self.with(move |conn, location| {
            let mut out = Vec::with_capacity(ids.len());
            // Each a walk down the (tenant_id, seq) index; one statement, reused.
            let mut s = conn
                .prepare_cached(
                    "SELECT seq, at, tenant_id, from_stage, to_stage, version, actor, reason FROM audit_log
                     WHERE tenant_id = ?1 ORDER BY seq DESC LIMIT 1",
                )
                .map_err(sql_err(location, "reading the audit log"))?;
            for id in &ids {
                if let Some(row) = s
                    .query_row([id], audit_row)
                    .optional()
                    .map_err(sql_err(location, "reading the audit log"))?
                {
                    out.push(rules::audit_from_row(row)?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn provision_jobs(
        &self,
        state: Option<JobState>,
        limit: u64,
    ) -> Result<Vec<ProvisionJob>> {
        let state = state.map(JobState::as_str);
        self.with(move |conn, location| {
            let rows: Vec<JobRow> = conn
                .prepare_cached(&format!(
                    "SELECT {JOB_COLUMNS} FROM provision_jobs WHERE ?1 IS NULL OR state = ?1
                     ORDER BY created_at, event_id LIMIT ?2"
                ))
                .and_then(|mut s| {
                    s.query_map(params![state, limit as i64], job_row)?
                        .collect()
                })
                .map_err(sql_err(location, "listing provisioning jobs"))?;
            rows.into_iter().map(rules::job_from_row).collect()
        })
        .await
    }

    async fn latest_tenant_configs(&self) -> Result<Vec<ConfigVersion>> {
        self.with(move |conn, location| {
            let rows: Vec<ConfigRow> = conn
                .prepare_cached(
                    "SELECT c.tenant_id, c.version, c.document, c.at, c.actor, c.reason
                     FROM tenant_configs c
                     JOIN (SELECT tenant_id, max(version) AS version FROM tenant_configs GROUP BY tenant_id) m
                       ON m.tenant_id = c.tenant_id AND m.version = c.version",
                )
                .and_then(|mut s| s.query_map([], config_row)?.collect())
                .map_err(sql_err(location, "reading configurations"))?;
            rows.into_iter().map(rules::config_from_row).collect()
        })
        .await
    }

    async fn tenant_config_history(&self, tenant: &TenantId) -> Result<Vec<ConfigVersion>> {
        let id = tenant.as_str().to_string();
        self.with(move |conn, location| {
            let rows: Vec<ConfigRow> = conn
                .prepare_cached(
                    "SELECT tenant_id, version, document, at, actor, reason FROM tenant_configs
                     WHERE tenant_id = ?1 ORDER BY version DESC",
                )
                .and_then(|mut s| s.query_map([&id], config_row)?.collect())
                .map_err(sql_err(location, "reading configuration history"))?;
            rows.into_iter().map(rules::config_from_row).collect()
        })
        .await
    }

    async fn set_tenant_config(&self, change: ConfigChange) -> Result<ConfigVersion> {
        rules::config_change(&change)?;
        self.write(move |tx, location, seq| {
            let id = change.tenant.as_str();
            if load_tenant(tx, location, id)?.is_none() {
                return Err(StoreError::UnknownTenant(change.tenant.clone()));
            }
            let current: i64 = tx
                .query_row(
                    "SELECT coalesce(max(version), 0) FROM tenant_configs WHERE tenant_id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .map_err(sql_err(location, "reading a configuration"))?;
            if current as u64 != change.expected_version {
                return Err(StoreError::ConfigStale {
                    tenant: change.tenant.clone(),
                    expected: change.expected_version,
                    actual: current as u64,
                });
            }
            for d in &change.domains {
                let owner: Option<String> = tx
                    .query_row(
                        "SELECT tenant_id FROM tenant_domains WHERE domain = ?1 AND tenant_id <> ?2",
                        [d.as_str(), id],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(sql_err(location, "checking a domain"))?;
                if let Some(owner) = owner {
                    return Err(StoreError::DomainTaken {
                        domain: d.clone(),
                        owner: TenantId::parse(&owner)
                            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    });
                }
            }
            tx.execute("DELETE FROM tenant_domains WHERE tenant_id = ?1", [id])
                .map_err(sql_err(location, "replacing domains"))?;
            for d in &change.domains {
                tx.execute(
                    "INSERT INTO tenant_domains (domain, tenant_id) VALUES (?1, ?2)",
                    [d.as_str(), id],
                )
                .map_err(sql_err(location, "replacing domains"))?;
            }
            let at = now().unix_millis();
            tx.execute(
                "INSERT INTO tenant_configs (tenant_id, version, document, at, actor, reason)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    id,
                    current + 1,
                    change.document,
                    at,
                    change.actor.as_str(),
                    change.reason
                ],
            )
            .map_err(sql_err(location, "writing a configuration"))?;
            record_change(tx, location, seq, Some(id))?;
            Ok(ConfigVersion {
                tenant: change.tenant.clone(),
                version: current as u64 + 1,
                document: change.document.clone(),
                actor: change.actor,
                reason: change.reason.clone(),
                at: Timestamp::from_unix_millis(at),
            })
        })
        .await
    }

    fn subscribe(&self, from_seq: Option<u64>) -> Subscription {
        let (tx, sub) = Subscription::channel();
        let path = self.path.clone();
        let location = self.location.clone();
        let feed_tx = tx.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("ficus-sqlite-feed".into())
            .spawn(move || sqlite_feed(&path, &location, from_seq, &feed_tx))
        {
            // Without a thread there is no feed; the subscriber is told so.
            let _ = tx.try_send(FeedEvent::Lost {
                error: format!("cannot start the feed thread: {e}"),
            });
        }
        sub
    }
}

/// Follows a SQLite store from a dedicated thread until the subscriber goes away.
fn sqlite_feed(
    path: &Path,
    location: &str,
    from_seq: Option<u64>,
    tx: &tokio::sync::mpsc::Sender<FeedEvent>,
) {
    let mut conn: Option<Connection> = None;
    let mut last_seq = from_seq;
    let mut last_version: Option<i64> = None;
    let mut lost = false;
    let mut wake = FeedWake::new(path);
    while !tx.is_closed() {
        let step = (|| -> Result<()> {
            if conn.is_none() {
                let c = Connection::open_with_flags(
                    path,
                    OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(sql_err(location, "opening the feed"))?;
                c.busy_timeout(Duration::from_secs(1))
                    .map_err(sql_err(location, "opening the feed"))?;
                conn = Some(c);
                last_version = None;
            }
            let c = conn.as_ref().expect("opened above");
            // Prepared once for the connection's life: asked after every write
            // and its backoff (a hundred times a second on the clock), the
            // statement's parse cost more than its answer.
            let version: i64 = c
                .prepare_cached("PRAGMA data_version")
                .and_then(|mut s| s.query_row([], |r| r.get(0)))
                .map_err(sql_err(location, "watching the store"))?;
            if last_version == Some(version) {
                return Ok(());
            }
            last_version = Some(version);
            match last_seq {
                None => {
                    last_seq = Some(current_seq(c, location)?);
                }
                Some(since) => {
                    let set = load_changes(c, location, since)?;
                    if set.seq != since {
                        last_seq = Some(set.seq);
                        if tx.blocking_send(FeedEvent::Changed(set)).is_err() {
                            return Ok(());
                        }
                    }
                }
            }
            Ok(())
        })();
        match step {
            Ok(()) if lost => {
                lost = false;
                let _ = tx.blocking_send(FeedEvent::Restored);
            }
            Ok(()) => {}
            Err(e) => {
                conn = None;
                if !lost {
                    lost = true;
                    let _ = tx.blocking_send(FeedEvent::Lost {
                        error: e.to_string(),
                    });
                }
            }
        }
        wake.wait();
    }
}

/// What wakes the feed to ask the store again.
///
/// A commit by another connection writes the store's files (the WAL, or the
/// database and its journal), and inotify reports the write: the feed sleeps
/// until one comes, so an idle replica does not wake, and a change is seen as
/// soon as it is written. Where inotify cannot be had, the feed asks on a
/// clock, as often as before.
///
/// A write is reported before its commit can be read: SQLite appends a
/// commit's frames to the WAL, syncs them, then publishes them in the WAL
/// index, a shared memory map whose writes inotify does not see. So after a
/// write the feed asks again soon, then less and less often (1, 2, 4 ms ...)
/// back to the fallback's quarter second: the commit is read a little after
/// it is published however long its sync took (a test that released one route
/// right after the guard held another found the second change missing for the
/// fallback's quarter second when the feed asked once a write only).
enum FeedWake {
    /// An inotify descriptor watching the store's directory, and the next
    /// wait's length.
    Watch {
        fd: rustix::fd::OwnedFd,
        next: Duration,
    },
    Clock,
}

impl FeedWake {
    fn new(path: &Path) -> FeedWake {
        // The directory, not the files: the WAL is created on the first write
        // after a checkpoint removed it, and a watch on a file that is not
        // there yet sees nothing.
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let watch = || -> rustix::io::Result<rustix::fd::OwnedFd> {
            use rustix::fs::inotify;
            let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
            inotify::add_watch(
                &fd,
                dir,
                inotify::WatchFlags::MODIFY
                    | inotify::WatchFlags::CREATE
                    | inotify::WatchFlags::MOVED_TO,
            )?;
            Ok(fd)
        };
        match watch() {
            Ok(fd) => FeedWake::Watch {
                fd,
                next: FEED_FALLBACK,
            },
            Err(_) => FeedWake::Clock,
        }
    }

    /// Returns when the store may have changed: a write was reported
    /// (`true`), or the time to ask anyway is up (`false`).
    fn wait(&mut self) -> bool {
        let FeedWake::Watch { fd, next } = self else {
            #[allow(
                clippy::disallowed_methods,
                reason = "a dedicated OS thread, not an async task"
            )]
            std::thread::sleep(FEED_POLL);
            return false;
        };
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        use rustix::io::Errno;
        let timeout = Timespec {
            tv_sec: i64::try_from(next.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(next.subsec_nanos()),
        };
        let mut fds = [PollFd::new(&*fd, PollFlags::IN)];
        let (woken, mut failed) = match poll(&mut fds, Some(&timeout)) {
            Ok(n) => (n > 0, false),
            Err(e) => (false, e != Errno::INTR),
        };
        *next = if woken {
            FEED_SOON
        } else {
            (*next * 2).min(FEED_FALLBACK)
        };
        // The events themselves say nothing the store's counter does not:
        // they are read only to empty the queue, so the next wait sleeps
        // until a later write.
        let mut buf = [0u8; 4096];
        while !failed {
            match rustix::io::read(&*fd, &mut buf) {
                Ok(0) | Err(Errno::AGAIN) => break,
                Ok(_) | Err(Errno::INTR) => {}
                Err(_) => failed = true,
            }
        }
        if failed {
            *self = FeedWake::Clock;
        }
        woken
    }
}

fn config_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ConfigRow> {
    Ok(ConfigRow {
        tenant: r.get(0)?,
        version: r.get(1)?,
        document: r.get(2)?,
        at: r.get(3)?,
        actor: r.get(4)?,
        reason: r.get(5)?,
    })
}

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    Ok(JobRow {
        event_id: r.get(0)?,
        kind: r.get(1)?,
        payload: r.get(2)?,
        tenant: r.get(3)?,
        state: r.get(4)?,
        steps: r.get(5)?,
        attempts: r.get(6)?,
        last_error: r.get(7)?,
        created_at: r.get(8)?,
        updated_at: r.get(9)?,
    })
}

fn class_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<rules::ClassRow> {
    Ok(rules::ClassRow {
        id: r.get(0)?,
        endpoint: r.get(1)?,
        path: r.get(2)?,
        kind: r.get(3)?,
        additive: r.get::<_, i64>(4)? != 0,
        state: r.get(5)?,
        epoch: r.get(6)?,
        first_seen: r.get(7)?,
        last_seen: r.get(8)?,
        resolved_at: r.get(9)?,
        fixed_in: r.get(10)?,
        regression: r.get::<_, i64>(11)? != 0,
        example_at: r.get(12)?,
        example_request: r.get(13)?,
        example_version: r.get(14)?,
        example_difference: r.get(15)?,
        change_at: r.get(16)?,
        change_action: r.get(17)?,
        change_actor: r.get(18)?,
        change_reason: r.get(19)?,
        change_version: r.get(20)?,
    })
}

fn load_class(conn: &Connection, location: &str, id: &str) -> Result<Option<MismatchClass>> {
    let sql = format!(
        "SELECT {} FROM mismatch_classes WHERE id = ?1",
        rules::CLASS_COLUMNS
    );
    conn.prepare_cached(&sql)
        .and_then(|mut s| s.query_row([id], class_row).optional())
        .map_err(sql_err(location, "reading a mismatch class"))?
        .map(rules::class_from_row)
        .transpose()
}

/// Writes a class's lifecycle columns and appends the change to its history.
fn write_class(
    tx: &Transaction<'_>,
    location: &str,
    c: &MismatchClass,
    event: &ClassEvent,
) -> Result<()> {
    tx.prepare_cached(
        "UPDATE mismatch_classes SET state = ?2, epoch = ?3, resolved_at = ?4, fixed_in = ?5, regression = ?6,
             change_at = ?7, change_action = ?8, change_actor = ?9, change_reason = ?10, change_version = ?11
         WHERE id = ?1",
    )
    .and_then(|mut s| {
        s.execute(params![
            c.id,
            c.state.as_str(),
            c.epoch as i64,
            c.resolved_at.map(Timestamp::unix_millis),
            c.fixed_in,
            i64::from(c.regression),
            event.at.unix_millis(),
            event.action,
            event.actor.as_str(),
            event.reason,
            event.version
        ])
    })
    .and_then(|_| {
        tx.prepare_cached(
            "INSERT INTO mismatch_class_events (at, class_id, action, actor, reason, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            event.at.unix_millis(),
            c.id,
            event.action,
            event.actor.as_str(),
            event.reason,
            event.version
        ])
    })
    .map_err(sql_err(location, "changing a mismatch class"))?;
    Ok(())
}

/// Creates or updates a reported class, reopens it if the evidence came after
/// its resolution, and adds the count under the epoch it belongs to.
fn record_class(tx: &Transaction<'_>, location: &str, c: &ClassCount, at: Timestamp) -> Result<()> {
    let err = |what: &'static str| sql_err(location, what);
    let example = c.example.as_ref();
    tx.prepare_cached(
        "INSERT INTO mismatch_classes (id, endpoint, path, kind, additive, state, epoch, first_seen, last_seen,
             example_at, example_request, example_version, example_difference)
         VALUES (?1, ?2, ?3, ?4, ?5, 'open', 0, ?6, ?7, ?8, ?9, ?10, ?11)
         ON CONFLICT (id) DO UPDATE SET
             first_seen = min(first_seen, excluded.first_seen), last_seen = max(last_seen, excluded.last_seen),
             additive = excluded.additive,
             example_at = coalesce(excluded.example_at, example_at),
             example_request = coalesce(excluded.example_request, example_request),
             example_version = CASE WHEN excluded.example_at IS NULL THEN example_version ELSE excluded.example_version END,
             example_difference = coalesce(excluded.example_difference, example_difference)",
    )
    .and_then(|mut s| {
        s.execute(params![
            c.id,
            c.endpoint,
            c.path,
            c.kind,
            i64::from(c.additive),
            c.first_at.unix_millis(),
            c.last_at.unix_millis(),
            example.map(|e| e.at.unix_millis()),
            example.map(|e| e.request.as_str()),
            example.and_then(|e| e.version.as_deref()),
            example.map(|e| e.difference.as_str()),
        ])
    })
    .map_err(err("recording a mismatch class"))?;
    let class =
        load_class(tx, location, &c.id)?.ok_or_else(|| StoreError::UnknownClass(c.id.clone()))?;
    let (epoch, reopened) = rules::place_evidence(&class, c, at);
    if let Some((reopened, event)) = reopened {
        write_class(tx, location, &reopened, &event)?;
    }
    tx.prepare_cached(
        "INSERT INTO mismatch_class_counts (tenant_id, class_id, epoch, version, hour, count, first_at, last_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (tenant_id, hour, class_id, epoch, version) DO UPDATE SET
             count = count + excluded.count, first_at = min(first_at, excluded.first_at),
             last_at = max(last_at, excluded.last_at)",
    )
    .and_then(|mut s| {
        s.execute(params![
            c.tenant.as_str(),
            c.id,
            epoch,
            c.version,
            rules::hour_of(c.last_at),
            c.count as i64,
            c.first_at.unix_millis(),
            c.last_at.unix_millis()
        ])
    })
    .map_err(err("recording mismatch evidence"))?;
    Ok(())
}

fn load_route_stages(conn: &Connection, location: &str) -> Result<Vec<RouteStage>> {
    let rows: Vec<(String, String, String, i64, i64)> = conn
        .prepare_cached(
            "SELECT route, tenant_id, stage, version, updated_at FROM route_stages ORDER BY route, tenant_id",
        )
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
                .collect()
        })
        .map_err(sql_err(location, "reading route stages"))?;
    rows.into_iter()
        .map(|(route, tenant, stage, version, at)| {
            rules::route_stage_from_row(route, tenant, stage, version, at)
        })
        .collect()
}

fn load_write_default(conn: &Connection, location: &str) -> Result<Stage> {
    let value: Option<String> = conn
        .query_row(
            "SELECT value FROM settings WHERE key = ?1",
            [rules::WRITE_DEFAULT],
            |r| r.get(0),
        )
        .optional()
        .map_err(sql_err(location, "reading settings"))?;
    rules::write_default(value.as_deref())
}

/// Writes a global setting and its audit entry (`shown` in place of the value,
/// which may be a secret's hash), in the caller's transaction.
fn put_setting(
    tx: &Transaction<'_>,
    location: &str,
    key: &str,
    value: &str,
    shown: &str,
    actor: Actor,
    reason: &str,
) -> Result<()> {
    tx.execute(
        "INSERT INTO settings (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [key, value],
    )
    .map_err(sql_err(location, "changing a setting"))?;
    tx.execute(
        "INSERT INTO global_audit (at, setting, value, actor, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![now().unix_millis(), key, shown, actor.as_str(), reason],
    )
    .map_err(sql_err(location, "appending to the audit log"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::FeedWake;

    /// The feed sleeps until a write to the store's directory, and an idle
    /// store does not wake it: a watch that saw nothing (wrong flags, the
    /// wrong directory) would leave every change to the fallback's clock.
    #[test]
    fn feed_wakes_on_a_write_to_the_store_directory() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let db = dir.path().join("ficus.db");
        let mut wake = FeedWake::new(&db);
        assert!(
            matches!(wake, FeedWake::Watch { .. }),
            "inotify is watching"
        );
        std::fs::write(dir.path().join("ficus.db-wal"), b"a commit").expect("a write");
        assert!(wake.wait(), "woken by the write");
        let waits = |wake: &FeedWake| match wake {
            FeedWake::Watch { next, .. } => *next,
            FeedWake::Clock => panic!("the watch was given up"),
        };
        assert_eq!(waits(&wake), super::FEED_SOON, "asked again soon");
        // The write's events were read: nothing is left to wake the next
        // waits early, each twice as long as the one before, up to the
        // fallback's.
        let mut lengths = vec![];
        while waits(&wake) < super::FEED_FALLBACK {
            assert!(!wake.wait(), "nothing written since");
            lengths.push(waits(&wake).as_millis());
        }
        assert_eq!(lengths, [2, 4, 8, 16, 32, 64, 128, 250]);
    }
}
