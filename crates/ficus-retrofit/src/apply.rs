//! Running and reverting the plan's steps, one at a time, under the rules that keep
//! the live application unblocked: every statement waits at most the lock timeout
//! for its lock, then gives up, backs off with jitter and retries; when the retry
//! budget is spent the run stops cleanly and names who held the lock. One migrator
//! runs at a time (an advisory lock), and each finished step is journaled in
//! `tenancy_private.journal`, so a second run skips what is done.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::backfill::{self, Progress};
use crate::ident::{Table, literal};
use crate::inspect::Inventory;
use crate::plan::{Hazard, Plan, Statement, Step, StepKind};
use crate::{Error, Result, describe, sql};

/// The advisory lock key every `ficus db` writer takes ("ficus-db" in ASCII).
const MIGRATION_LOCK: i64 = 0x6669_6375_732d_6462;

#[derive(Debug, Clone)]
pub struct Options {
    pub lock_timeout: Duration,
    /// Attempts per statement before the run stops.
    pub attempts: u32,
    pub allow_destructive: bool,
    pub backfill: backfill::Options,
    /// Run only steps of this kind (`ficus db backfill`); their prerequisites must
    /// be done.
    pub only: Option<StepKind>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            lock_timeout: Duration::from_millis(500),
            attempts: 8,
            allow_destructive: false,
            backfill: backfill::Options::default(),
            only: None,
        }
    }
}

/// What a run reports as it goes.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    Step {
        step: String,
        status: &'static str,
        ms: u64,
    },
    Retry {
        step: String,
        attempt: u32,
        wait_ms: u64,
        blockers: String,
    },
    Backfill(Progress),
}

/// How long a run waits for another to let go of the migration lock. A run that
/// was killed holds it until the server notices its connection is gone.
const LOCK_WAIT: Duration = Duration::from_secs(15);

/// Takes the migration lock for this session, or says who holds it.
pub async fn lock(client: &Client) -> Result<()> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        let got: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(sql("taking the migration lock"))?
            .get(0);
        if got {
            return Ok(());
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let holder = client
        .query_opt(
            "SELECT a.pid, coalesce(a.application_name, ''), coalesce(a.client_addr::text, 'local')
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted
               AND ((l.classid::bigint << 32) | l.objid::bigint) = $1 LIMIT 1",
            &[&MIGRATION_LOCK],
        )
        .await
        .map_err(sql("reading who holds the migration lock"))?
        .map(|r| {
            format!(
                "pid {} ({}, {})",
                r.get::<_, i32>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2)
            )
        })
        .unwrap_or_else(|| "another session".into());
    Err(Error::Refused(format!(
        "another ficus db run has held the migration lock for {} s ({holder}); nothing was changed",
        LOCK_WAIT.as_secs()
    )))
}

/// Whether a table exists, by its qualified name.
pub(crate) async fn relation_exists(client: &Client, name: &str) -> Result<bool> {
    Ok(client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .await
        .map_err(sql(format!("looking for {name}")))?
        .get(0))
}

/// The steps journaled as done (empty before the spine exists).
pub async fn journal(client: &Client) -> Result<BTreeSet<String>> {
    if !relation_exists(client, "tenancy_private.journal").await? {
        return Ok(BTreeSet::new());
    }
    Ok(client
        .query("SELECT step FROM tenancy_private.journal", &[])
        .await
        .map_err(sql("reading the journal"))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Who holds locks on `table` (or, with none, which transactions are old), for
/// an error an operator can act on.
pub(crate) async fn blockers(client: &Client, table: Option<&Table>) -> String {
    let on_table = match table {
        Some(t) => client
            .query(
                "SELECT DISTINCT a.pid, coalesce(a.application_name, ''), coalesce(a.usename::text, ''),
                        coalesce(to_char(a.query_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), ''),
                        left(regexp_replace(coalesce(a.query, ''), '\\s+', ' ', 'g'), 160), coalesce(a.state, '')
                 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                 WHERE l.granted AND l.locktype = 'relation' AND l.relation = to_regclass($1)
                   AND a.pid <> pg_backend_pid() AND coalesce(a.application_name, '') <> 'ficus-db'",
                &[&t.sql()],
            )
            .await
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let rows = if on_table.is_empty() {
        client
            .query(
                "SELECT pid, coalesce(application_name, ''), coalesce(usename::text, ''),
                        coalesce(to_char(query_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), ''),
                        left(regexp_replace(coalesce(query, ''), '\\s+', ' ', 'g'), 160), coalesce(state, '')
                 FROM pg_stat_activity
                 WHERE xact_start < now() - interval '1 second' AND pid <> pg_backend_pid()
                   AND coalesce(application_name, '') <> 'ficus-db'
                 ORDER BY xact_start LIMIT 5",
                &[],
            )
            .await
            .unwrap_or_default()
    } else {
        on_table
    };
    if rows.is_empty() {
        return "nobody visible (the holder may have finished)".to_string();
    }
    rows.iter()
        .map(|r| {
            format!(
                "pid {} (application {:?}, user {}, {} since {}: {})",
                r.get::<_, i32>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, String>(5),
                r.get::<_, String>(3),
                r.get::<_, String>(4)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The server's `deadlock_timeout`: how long a lock waiter waits before the
/// server checks for a deadlock (and cancels an autovacuum in the way).
pub(crate) async fn deadlock_timeout(client: &Client) -> Result<Duration> {
    let ms: f64 = client
        .query_one(
            "SELECT setting::float8 FROM pg_settings WHERE name = 'deadlock_timeout'",
            &[],
        )
        .await
        .map_err(sql("reading deadlock_timeout"))?
        .get(0);
    Ok(Duration::from_secs_f64(ms.max(1.0) / 1_000.0))
}

/// The waits between attempts to take a lock: doubling from 200 ms up to 5 s,
/// each jittered by ±50% so that retrying sessions do not line up.
pub(crate) struct Backoff {
    base: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff {
            base: Duration::from_millis(200),
        }
    }

    /// The next wait.
    pub(crate) fn next_wait(&mut self) -> Duration {
        let mut b = [0u8; 2];
        let _ = getrandom::fill(&mut b);
        let r = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX);
        let wait = self.base.mul_f64(0.5 + r);
        self.base = (self.base * 2).min(Duration::from_secs(5));
        wait
    }
}

/// Runs one statement under the lock timeout, with retries. Returns whether it
/// ran (false: its effect was already there).
pub(crate) async fn run_statement(
    client: &mut Client,
    s: &Statement,
    step: &Step,
    opts: &Options,
    on_event: &mut (dyn FnMut(&Event) + Send),
) -> Result<bool> {
    if let Some(q) = &s.done_if {
        let done: Option<bool> = client
            .query_opt(q.as_str(), &[])
            .await
            .map_err(sql(format!("{}: checking what is done", step.id)))?
            .and_then(|r| r.get(0));
        if done == Some(true) {
            return Ok(false);
        }
    }
    // An autovacuum in the way (the backfill's own dead rows start one, which on
    // a large table runs for minutes) is moved aside. A statement whose lock
    // still lets the app read and write (a concurrent index build, a VALIDATE)
    // waits past `deadlock_timeout`, after which the server cancels the vacuum
    // for any waiter. Any other statement would make the app queue behind it
    // that long, so it cancels the vacuum itself when the role may (superuser,
    // or `pg_signal_autovacuum_worker` on PostgreSQL 18). A vacuum that prevents
    // wraparound is never cancelled. Regression: on 10 million rows the index
    // and tighten steps gave up after every one of their 500 ms attempts.
    let app_safe = s.concurrent || s.sql.contains(" VALIDATE CONSTRAINT ");
    let mut timeout = opts.lock_timeout.as_millis();
    let mut backoff = Backoff::new();
    for attempt in 1..=opts.attempts {
        let outcome = if s.concurrent {
            // A concurrent index build cannot run in a transaction; a failed one
            // leaves an invalid index behind, dropped before the next attempt.
            if let Some(fix) = invalid_index_cleanup(&s.sql) {
                client
                    .batch_execute(&fix)
                    .await
                    .map_err(sql(format!("{}: dropping an invalid index", step.id)))?;
            }
            client
                .batch_execute(&format!("SET lock_timeout = '{timeout}ms'"))
                .await
                .map_err(sql("setting the lock timeout"))?;
            let r = client.batch_execute(&s.sql).await;
            client
                .batch_execute("RESET lock_timeout")
                .await
                .map_err(sql("resetting the lock timeout"))?;
            r
        } else {
            let tx = client
                .transaction()
                .await
                .map_err(sql(format!("{}: starting", step.id)))?;
            tx.batch_execute(&format!("SET LOCAL lock_timeout = '{timeout}ms'"))
                .await
                .map_err(sql("setting the lock timeout"))?;
            match tx.batch_execute(&s.sql).await {
                Ok(()) => tx.commit().await,
                Err(e) => Err(e),
            }
        };
        match outcome {
            Ok(()) => return Ok(true),
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                let mut who = blockers(client, step.table.as_ref()).await;
                if who.contains("autovacuum: ") {
                    if app_safe {
                        let deadlock = deadlock_timeout(client).await?;
                        timeout = timeout.max((deadlock + Duration::from_secs(1)).as_millis());
                    } else if let Some(t) = step.table.as_ref() {
                        let cancelled = cancel_autovacuum(client, t).await;
                        if !cancelled.is_empty() {
                            who =
                                format!("{who}; cancelled autovacuum pid {}", cancelled.join(", "));
                        }
                    }
                }
                if attempt == opts.attempts {
                    if s.concurrent
                        && let Some(fix) = invalid_index_cleanup(&s.sql)
                    {
                        let _ = client.batch_execute(&fix).await;
                    }
                    return Err(Error::LockTimeout {
                        step: step.id.clone(),
                        timeout_ms: timeout as u64,
                        attempts: attempt,
                        blockers: who,
                    });
                }
                let wait = backoff.next_wait();
                on_event(&Event::Retry {
                    step: step.id.clone(),
                    attempt,
                    wait_ms: wait.as_millis() as u64,
                    blockers: who,
                });
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                return Err(Error::Sql {
                    context: format!("{}: {}", step.id, first_line(&s.sql)),
                    detail: describe(&e),
                });
            }
        }
    }
    unreachable!("the loop returns on its last attempt")
}

/// Cancels the autovacuum workers holding a lock on `table`, except those that
/// prevent wraparound; returns the pids it could cancel (none when the role may
/// not signal them).
async fn cancel_autovacuum(client: &Client, table: &Table) -> Vec<String> {
    let rows = client
        .query(
            "SELECT a.pid::text FROM pg_stat_activity a
             WHERE a.backend_type = 'autovacuum worker'
               AND a.query NOT LIKE '%to prevent wraparound%'
               AND EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.relation = $1::text::regclass)",
            &[&table.sql()],
        )
        .await
        .unwrap_or_default();
    let mut cancelled = Vec::new();
    for r in rows {
        let pid: String = r.get(0);
        let ok = client
            .query_one("SELECT pg_cancel_backend($1::text::int)", &[&pid])
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false);
        if ok {
            cancelled.push(pid);
        }
    }
    cancelled
}

fn first_line(sql: &str) -> &str {
    sql.lines().next().unwrap_or(sql)
}

/// For `CREATE INDEX CONCURRENTLY IF NOT EXISTS "name" ON "schema"."table"`, the
/// statement that drops an invalid index of that name, if there is one.
fn invalid_index_cleanup(sql: &str) -> Option<String> {
    let rest = sql
        .strip_prefix("CREATE INDEX CONCURRENTLY IF NOT EXISTS ")
        .or_else(|| sql.strip_prefix("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS "))?;
    let (name, rest) = split_quoted(rest)?;
    let rest = rest.strip_prefix(" ON ")?;
    let (schema, _) = split_quoted(rest)?;
    Some(format!(
        "DO $fix$ BEGIN
           IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                      JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE c.relname = {} AND n.nspname = {} AND NOT i.indisvalid) THEN
             EXECUTE 'DROP INDEX ' || quote_ident({}) || '.' || quote_ident({});
           END IF;
         END $fix$",
        literal(&name),
        literal(&schema),
        literal(&schema),
        literal(&name)
    ))
}

/// Splits a leading `"quoted"` identifier off `s`, unescaping doubled quotes.
fn split_quoted(s: &str) -> Option<(String, &str)> {
    let body = s.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = body.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '"' {
            if chars.peek().map(|(_, n)| *n) == Some('"') {
                out.push('"');
                chars.next();
            } else {
                return Some((out, &body[i + 1..]));
            }
        } else {
            out.push(c);
        }
    }
    None
}

/// Runs every step not yet journaled, in order.
pub async fn apply(
    client: &mut Client,
    plan: &Plan,
    inv: &Inventory,
    opts: &Options,
    on_event: &mut (dyn FnMut(&Event) + Send),
) -> Result<()> {
    lock(client).await?;
    let result = apply_locked(client, plan, inv, opts, on_event).await;
    unlock(client).await;
    result
}

/// Releases the migration lock; a failure to do so is harmless, as the lock ends
/// with the session.
pub(crate) async fn unlock(client: &Client) {
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
}

async fn apply_locked(
    client: &mut Client,
    plan: &Plan,
    inv: &Inventory,
    opts: &Options,
    on_event: &mut (dyn FnMut(&Event) + Send),
) -> Result<()> {
    let mut done = journal(client).await?;
    for step in plan.steps(inv) {
        if let Some(only) = opts.only
            && step.kind != only
        {
            continue;
        }
        if step.kind == StepKind::Backfill
            && let Some(t) = &step.table
        {
            let column = format!("default:{}", crate::plan::key(t));
            if !done.contains(&column) {
                return Err(Error::Refused(format!(
                    "{} needs {column} first: run ficus db apply",
                    step.id
                )));
            }
        }
        if done.contains(&step.id) {
            on_event(&Event::Step {
                step: step.id.clone(),
                status: "already done",
                ms: 0,
            });
            continue;
        }
        let started = Instant::now();
        if step.kind == StepKind::Backfill {
            let table = step
                .table
                .as_ref()
                .expect("a backfill step names its table");
            let info = inv
                .table(table)
                .expect("the plan was checked against the inventory");
            let mut forward = |p: &Progress| on_event(&Event::Backfill(p.clone()));
            backfill::run(client, plan, info, &opts.backfill, &mut forward).await?;
        } else {
            for s in &step.forward {
                run_statement(client, s, &step, opts, on_event).await?;
            }
        }
        client
            .execute(
                "INSERT INTO tenancy_private.journal (step) VALUES ($1) ON CONFLICT DO NOTHING",
                &[&step.id],
            )
            .await
            .map_err(sql("journaling a step"))?;
        done.insert(step.id.clone());
        on_event(&Event::Step {
            step: step.id.clone(),
            status: "done",
            ms: started.elapsed().as_millis() as u64,
        });
    }
    Ok(())
}

/// Undoes journaled steps in reverse order, down to (not including) `to`.
/// Destructive undos need `allow_destructive`; the run stops before the first
/// one without it, having undone everything after it.
pub async fn revert(
    client: &mut Client,
    plan: &Plan,
    inv: &Inventory,
    to: Option<&str>,
    opts: &Options,
    on_event: &mut (dyn FnMut(&Event) + Send),
) -> Result<()> {
    lock(client).await?;
    let result = revert_locked(client, plan, inv, to, opts, on_event).await;
    unlock(client).await;
    result
}

async fn revert_locked(
    client: &mut Client,
    plan: &Plan,
    inv: &Inventory,
    to: Option<&str>,
    opts: &Options,
    on_event: &mut (dyn FnMut(&Event) + Send),
) -> Result<()> {
    let steps = plan.steps(inv);
    if let Some(to) = to
        && !steps.iter().any(|s| s.id == to)
    {
        return Err(Error::Refused(format!(
            "--to {to:?} is not a step of this plan; the steps are named like spine, column:public.orders"
        )));
    }
    // Row level security is stepped back first, every table through its phases
    // and proved as `unenforce` proves them: an enforced table's policies
    // depend on its tenant_id, and a view made to run as its owner again over an
    // enforced table would hand its readers every tenant's rows. Only when the
    // revert will undo a step: a `--to` with nothing after it, or a first step
    // refused as destructive, leaves row level security as it is.
    let done = journal(client).await?;
    let will_undo = steps
        .iter()
        .rev()
        .take_while(|s| Some(s.id.as_str()) != to)
        .find(|s| done.contains(&s.id))
        .is_some_and(|s| s.undo_hazard != Hazard::Destructive || opts.allow_destructive);
    for p in plan.owned().collect::<Vec<_>>().into_iter().rev() {
        if !will_undo {
            break;
        }
        let t = Table::new(&p.schema, &p.name);
        while crate::enforce::phase(client, &t).await? != crate::enforce::Phase::Off {
            let started = Instant::now();
            let r = crate::enforce::step(client, plan, inv, &t, false, true, opts).await?;
            on_event(&Event::Step {
                step: format!("rls:{}", crate::plan::key(&t)),
                status: r.to.as_str(),
                ms: started.elapsed().as_millis() as u64,
            });
        }
    }
    for step in steps.iter().rev() {
        if Some(step.id.as_str()) == to {
            break;
        }
        if !done.contains(&step.id) {
            continue;
        }
        if step.undo_hazard == Hazard::Destructive && !opts.allow_destructive {
            return Err(Error::Refused(format!(
                "undoing {} is destructive ({}); pass --allow-destructive to do it. Everything after it was undone",
                step.id,
                match step.kind {
                    StepKind::Spine => "it drops the tenancy schemas and the journal",
                    _ => "it drops the tenant_id column and its values",
                }
            )));
        }
        let started = Instant::now();
        for s in &step.undo {
            run_statement(client, s, step, opts, on_event).await?;
        }
        if step.kind != StepKind::Spine {
            client
                .execute(
                    "DELETE FROM tenancy_private.journal WHERE step = $1",
                    &[&step.id],
                )
                .await
                .map_err(sql("journaling an undo"))?;
        }
        if step.kind == StepKind::Backfill
            && let Some(t) = &step.table
        {
            client
                .execute(
                    "DELETE FROM tenancy_private.backfill WHERE table_name = $1",
                    &[&crate::plan::key(t)],
                )
                .await
                .map_err(sql("journaling an undo"))?;
        }
        on_event(&Event::Step {
            step: step.id.clone(),
            status: "undone",
            ms: started.elapsed().as_millis() as u64,
        });
    }
    Ok(())
}

/// One table's state, as `ficus db status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableStatus {
    pub table: String,
    pub column: Option<String>,
    pub default: bool,
    pub rows: i64,
    pub null_rows: i64,
    pub backfill_percent: f64,
    pub index: &'static str,
    pub tightened: bool,
    /// Row level security: off, enabled or enforced.
    pub rls: &'static str,
    pub next_step: Option<String>,
}

/// Every tenant-owned table's state, read from the catalog and exact counts.
pub async fn status(client: &Client, plan: &Plan, inv: &Inventory) -> Result<Vec<TableStatus>> {
    let done = journal(client).await?;
    let steps = plan.steps(inv);
    let mut out = Vec::new();
    for p in plan.owned() {
        let t = Table::new(&p.schema, &p.name);
        let Some(info) = inv.table(&t) else { continue };
        let col = client
            .query_opt(
                "SELECT format_type(a.atttypid, a.atttypmod), a.attnotnull,
                        pg_get_expr(d.adbin, d.adrelid) LIKE '%default_tenant_id%'
                 FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                 WHERE a.attrelid = to_regclass($1) AND a.attname = 'tenant_id' AND NOT a.attisdropped",
                &[&t.sql()],
            )
            .await
            .map_err(sql(format!("reading {t}")))?;
        let (column, not_null, default) = match &col {
            Some(r) => (
                Some(r.get::<_, String>(0)),
                r.get::<_, bool>(1),
                r.get::<_, Option<bool>>(2).unwrap_or(false),
            ),
            None => (None, false, false),
        };
        let (rows, nulls) = if column.is_some() {
            let r = client
                .query_one(
                    &format!(
                        "SELECT count(*), count(*) FILTER (WHERE tenant_id IS NULL) FROM {}",
                        t.sql()
                    ),
                    &[],
                )
                .await
                .map_err(sql(format!("counting {t}")))?;
            (r.get::<_, i64>(0), r.get::<_, i64>(1))
        } else {
            (info.row_estimate, info.row_estimate)
        };
        let index_name = t.object_name("tenant_id_idx");
        let valid: Option<bool> = client
            .query_opt(
                "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                 WHERE i.indrelid = to_regclass($1) AND c.relname = $2",
                &[&t.sql(), &index_name],
            )
            .await
            .map_err(sql(format!("reading {t}'s indexes")))?
            .map(|r| r.get(0));
        let fk: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = to_regclass($1) AND conname = $2 AND convalidated)",
                &[&t.sql(), &t.object_name("tenant_id_fkey")],
            )
            .await
            .map_err(sql(format!("reading {t}'s constraints")))?
            .get(0);
        let next_step = steps
            .iter()
            .find(|s| {
                s.table.as_ref() == Some(&t) && !done.contains(&s.id)
                    || (s.kind == StepKind::Spine && !done.contains(&s.id))
            })
            .map(|s| s.id.clone());
        out.push(TableStatus {
            table: t.to_string(),
            column,
            default,
            rows,
            null_rows: nulls,
            backfill_percent: if rows == 0 {
                100.0
            } else {
                ((rows - nulls) as f64 * 1000.0 / rows as f64).floor() / 10.0
            },
            index: match valid {
                Some(true) => "valid",
                Some(false) => "INVALID",
                None => "none",
            },
            tightened: not_null && fk,
            rls: crate::enforce::phase(client, &t).await?.as_str(),
            next_step,
        });
    }
    Ok(out)
}

/// Adds an organization and its first unit; returns the organization's id.
/// Idempotent by slug.
pub async fn add_tenant(client: &Client, slug: &str, name: &str) -> Result<String> {
    if crate::plan::slugify(slug) != slug {
        return Err(Error::Refused(format!(
            "tenant id {slug:?} must be lowercase letters, digits and '-'"
        )));
    }
    if name.trim().is_empty() {
        return Err(Error::Refused("the tenant's name must not be empty".into()));
    }
    if !relation_exists(client, "tenancy.organizations").await? {
        return Err(Error::Refused(
            "this database has no tenancy spine yet; run ficus db apply first".into(),
        ));
    }
    let id: String = client
        .query_one(
            "WITH o AS (
                INSERT INTO tenancy.organizations (slug, name) VALUES ($1, $2)
                ON CONFLICT (slug) DO UPDATE SET slug = excluded.slug RETURNING id
             ), u AS (
                INSERT INTO tenancy.units (organization_id, name) SELECT id, 'main' FROM o
                ON CONFLICT DO NOTHING
             )
             SELECT id::text FROM o",
            &[&slug, &name],
        )
        .await
        .map_err(sql(format!("adding tenant {slug}")))?
        .get(0);
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_index_cleanup_reads_quoted_names() {
        let fix = invalid_index_cleanup(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS \"Weird \"\"N\"\"_idx\" ON \"public\".\"Weird \"\"N\"\"\" (tenant_id)",
        )
        .unwrap();
        assert!(fix.contains("c.relname = 'Weird \"N\"_idx'"), "{fix}");
        assert!(fix.contains("n.nspname = 'public'"), "{fix}");
        assert!(invalid_index_cleanup("DROP INDEX x").is_none());
    }
}
