//! The online backfill: every existing row of a tenant-owned table gets tenant
//! zero, without a long lock and without losing a row the live app writes.
//!
//! Rows are taken in keyset batches on the primary key, up to the largest key
//! present at the start (rows written later already carry the column default, so
//! the run always finishes however fast the app inserts). A batch finds its last
//! key by walking the primary key index, then updates the rows of that range
//! still NULL in one statement, and records its position in
//! `tenancy_private.backfill` in the same transaction, so a crash resumes exactly
//! where the last committed batch ended.
//!
//! That statement waits for rows the app holds, but never for long: it runs under
//! a statement timeout of half the server's `deadlock_timeout`. Any session that
//! waits on the batch's rows is therefore released before its own deadlock check
//! could fire, so a cycle between the batch and an app transaction always ends
//! with the batch giving up, never with the app's transaction aborted. A batch
//! that cannot get a row in time is done again with `FOR NO KEY UPDATE SKIP
//! LOCKED` (which never waits, at the price of writing a lock into every row
//! first), and what it skipped is left to the catch-up pass. A batch cancelled by
//! the timeout is halved. The catch-up pass then stamps whatever is still NULL:
//! skipped rows, rows written between the column and its default, and every row
//! of a table without a primary key.
//!
//! The batch size follows a target batch duration; the pace respects a
//! rows-per-second ceiling and waits while a replica's replay lag is above a limit.

use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::apply::{Backoff, blockers, deadlock_timeout};
use crate::ident::{Table, literal};
use crate::inspect::TableInfo;
use crate::plan::{Plan, key};
use crate::{Error, Result, sql};

/// How the backfill paces itself.
#[derive(Debug, Clone)]
pub struct Options {
    /// Each batch aims to take about this long.
    pub target_batch: Duration,
    pub min_batch: i64,
    pub max_batch: i64,
    /// At most this many rows per second (`None`: as fast as the target allows).
    pub max_rows_per_sec: Option<u64>,
    /// Pause while any replica's replay lag is above this; zero never waits.
    pub max_replica_lag: Duration,
    pub lock_timeout: Duration,
    /// Batches in a row that may fail to get their locks (each after waiting the
    /// lock timeout, then a jittered backoff) before the run stops cleanly and
    /// names the sessions holding them.
    pub attempts: u32,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            target_batch: Duration::from_millis(200),
            min_batch: 100,
            max_batch: 50_000,
            max_rows_per_sec: None,
            max_replica_lag: Duration::from_secs(10),
            lock_timeout: Duration::from_millis(500),
            attempts: 10,
        }
    }
}

/// Where a table's backfill stands.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Progress {
    pub table: String,
    pub rows: i64,
    pub estimate: i64,
    pub rows_per_sec: f64,
    pub eta_secs: Option<f64>,
    pub batch: i64,
    pub phase: &'static str,
    /// While the phase is `waiting for replicas`: the largest replay lag seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica_lag_secs: Option<f64>,
}

/// How a batch deals with rows the app holds.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Form {
    /// Waits for them, within the batch's time budget.
    Wait,
    /// Skips them (`FOR NO KEY UPDATE SKIP LOCKED`), leaving them to the catch-up.
    Skip,
}

/// Backfills one table; resumable. `on_progress` hears about every batch.
pub async fn run(
    client: &mut Client,
    plan: &Plan,
    info: &TableInfo,
    opts: &Options,
    on_progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<i64> {
    let mut retry = LockRetry::new(opts);
    let t = &info.table;
    let name = key(t);
    let zero = format!("{}::{}", literal(&plan.tenant_zero.id), plan.id_type.sql());
    let budget = wait_budget(client).await?;
    // Before anything is written: a run that cannot see its replicas stops here.
    replica_lag(client, opts).await?;
    let pk: Vec<(String, String)> = info
        .primary_key
        .iter()
        .map(|c| (crate::ident::quote(&c.name), c.sql_type.clone()))
        .collect();
    // The state row, made once with the upper bound as of now.
    let state = client
        .query_opt(
            "SELECT upper_key, last_key, rows_done, keyset_done, done FROM tenancy_private.backfill WHERE table_name = $1",
            &[&name],
        )
        .await
        .map_err(sql(format!("reading the backfill journal of {t}")))?;
    let (upper, mut last, mut rows, keyset_done) = match state {
        Some(r) => {
            if r.get::<_, bool>(4) {
                return Ok(r.get(2));
            }
            (
                r.get::<_, Option<Vec<String>>>(0),
                r.get::<_, Option<Vec<String>>>(1),
                r.get::<_, i64>(2),
                r.get::<_, bool>(3),
            )
        }
        None => {
            let upper = if pk.is_empty() {
                None
            } else {
                let cols: Vec<String> = pk.iter().map(|(c, _)| format!("{c}::text")).collect();
                let order: Vec<String> = pk.iter().map(|(c, _)| format!("{c} DESC")).collect();
                client
                    .query_opt(
                        &format!(
                            "SELECT ARRAY[{}] FROM {} ORDER BY {} LIMIT 1",
                            cols.join(", "),
                            t.sql(),
                            order.join(", ")
                        ),
                        &[],
                    )
                    .await
                    .map_err(sql(format!("reading the largest key of {t}")))?
                    .map(|r| r.get::<_, Vec<String>>(0))
            };
            let empty_keyset = !pk.is_empty() && upper.is_none();
            client
                .execute(
                    "INSERT INTO tenancy_private.backfill (table_name, upper_key, keyset_done) VALUES ($1, $2, $3)
                     ON CONFLICT (table_name) DO NOTHING",
                    &[&name, &upper, &(pk.is_empty() || empty_keyset)],
                )
                .await
                .map_err(sql(format!("starting the backfill journal of {t}")))?;
            (upper, None, 0, pk.is_empty() || empty_keyset)
        }
    };
    let started = Instant::now();
    let rows_at_start = rows;
    let mut batch = opts.min_batch.max(1_000).min(opts.max_batch);
    let mut report = |rows: i64, batch: i64, phase: &'static str, lag: Option<f64>| {
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let rate = (rows - rows_at_start) as f64 / secs;
        let remaining = (info.row_estimate - rows).max(0) as f64;
        on_progress(&Progress {
            table: t.to_string(),
            rows,
            estimate: info.row_estimate,
            rows_per_sec: rate,
            eta_secs: (rate > 0.0).then(|| remaining / rate),
            batch,
            phase,
            replica_lag_secs: lag,
        });
    };
    // The keyset pass.
    if !keyset_done && let Some(upper) = &upper {
        let keyset = Keyset::new(&pk, &t.sql(), &zero);
        let mut form = Form::Wait;
        loop {
            wait_for_replicas(client, opts, &mut |lag| {
                report(rows, batch, "waiting for replicas", Some(lag))
            })
            .await?;
            let began = Instant::now();
            let tx = begin_batch(client, opts, form, budget).await?;
            let query = keyset.statement(form, last.is_none());
            let r = match tx.query_one(&query, &[&last, upper, &batch]).await {
                Ok(r) => r,
                Err(e) if form == Form::Wait && e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                    // A row the app holds: this range again, skipping it.
                    drop(tx);
                    form = Form::Skip;
                    continue;
                }
                Err(e) if form == Form::Wait && e.code() == Some(&SqlState::QUERY_CANCELED) => {
                    // Over the time budget: a smaller batch, or at the smallest,
                    // one that cannot wait.
                    drop(tx);
                    if batch <= opts.min_batch {
                        form = Form::Skip;
                    }
                    batch = (batch / 2).max(opts.min_batch);
                    continue;
                }
                Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                    drop(tx);
                    retry.wait(client, t).await?;
                    continue;
                }
                Err(e) => {
                    return Err(sql(format!("backfilling {t}"))(e));
                }
            };
            let updated: i64 = r.get(0);
            let next: Option<Vec<String>> = r.get(1);
            let finished: bool = r.get(2);
            rows += updated;
            tx.execute(
                "UPDATE tenancy_private.backfill SET last_key = coalesce($2, last_key), rows_done = $3, keyset_done = $4 WHERE table_name = $1",
                &[&name, &next, &rows, &finished],
            )
            .await
            .map_err(sql("recording backfill progress"))?;
            tx.commit()
                .await
                .map_err(sql("committing a backfill batch"))?;
            retry = LockRetry::new(opts);
            form = Form::Wait;
            report(rows, batch, "keyset", None);
            if finished {
                break;
            }
            last = next;
            batch = next_batch(batch, began.elapsed(), opts);
            pace(updated, began, opts).await;
        }
    }
    // The catch-up pass: one scan for rows still NULL when nothing was skipped.
    // The rows are found first and updated by their ctid under the batch's time
    // budget; a row the app moved in between is missed by its old ctid and found
    // by the next scan, so the pass ends only when a scan found fewer rows than
    // it asked for and updated every one of them.
    let find = format!(
        "SELECT coalesce(array_agg(ctid::text), '{{}}') FROM (SELECT ctid FROM {} WHERE tenant_id IS NULL LIMIT $1) c",
        t.sql()
    );
    let update = format!(
        "UPDATE {} SET tenant_id = {zero} WHERE ctid = ANY($1::text[]::tid[]) AND tenant_id IS NULL",
        t.sql()
    );
    let skip = format!(
        "UPDATE {table} SET tenant_id = {zero} WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM {table} WHERE tenant_id IS NULL LIMIT $1 FOR NO KEY UPDATE SKIP LOCKED))",
        table = t.sql()
    );
    let mut form = Form::Wait;
    loop {
        wait_for_replicas(client, opts, &mut |lag| {
            report(rows, batch, "waiting for replicas", Some(lag))
        })
        .await?;
        let began = Instant::now();
        let tx = begin_batch(client, opts, Form::Skip, budget).await?;
        let outcome = match form {
            Form::Skip => tx
                .execute(&skip, &[&batch])
                .await
                .map(|n| (n as i64, n as i64)),
            // Finding takes no row lock, so only the update runs under the
            // waiting form's budget.
            Form::Wait => {
                async {
                    let ctids: Vec<String> = tx.query_one(&find, &[&batch]).await?.get(0);
                    tx.batch_execute(&timeouts(opts, Form::Wait, budget))
                        .await?;
                    let n = tx.execute(&update, &[&ctids]).await?;
                    Ok((ctids.len() as i64, n as i64))
                }
                .await
            }
        };
        let (found, updated) = match outcome {
            Ok(n) => n,
            Err(e)
                if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE)
                    || (form == Form::Wait && e.code() == Some(&SqlState::QUERY_CANCELED)) =>
            {
                // Stamp what is free now (the skipping form); rows held all
                // along count against the budget until their holder lets go.
                drop(tx);
                retry.wait(client, t).await?;
                form = Form::Skip;
                batch = (batch / 2).max(opts.min_batch);
                continue;
            }
            Err(e) => {
                return Err(sql(format!("backfilling {t}"))(e));
            }
        };
        rows += updated;
        tx.execute(
            "UPDATE tenancy_private.backfill SET rows_done = $2 WHERE table_name = $1",
            &[&name, &rows],
        )
        .await
        .map_err(sql("recording backfill progress"))?;
        tx.commit()
            .await
            .map_err(sql("committing a backfill batch"))?;
        if form == Form::Wait {
            retry = LockRetry::new(opts);
            if found < batch && updated == found {
                break;
            }
        }
        form = Form::Wait;
        if updated > 0 {
            report(rows, batch, "catch-up", None);
        }
        batch = next_batch(batch, began.elapsed(), opts);
        pace(updated, began, opts).await;
    }
    client
        .execute(
            "UPDATE tenancy_private.backfill SET done = true, rows_done = $2 WHERE table_name = $1",
            &[&name, &rows],
        )
        .await
        .map_err(sql("finishing the backfill journal"))?;
    report(rows, batch, "done", None);
    Ok(rows)
}

/// The statements of the keyset pass for one table.
struct Keyset {
    cols: Vec<String>,
    types: Vec<String>,
    table: String,
    zero: String,
}

impl Keyset {
    fn new(pk: &[(String, String)], table: &str, zero: &str) -> Keyset {
        Keyset {
            cols: pk.iter().map(|(c, _)| c.clone()).collect(),
            types: pk.iter().map(|(_, ty)| ty.clone()).collect(),
            table: table.to_string(),
            zero: zero.to_string(),
        }
    }

    /// The key columns as one comparable value.
    fn row(&self, list: &str) -> String {
        if self.cols.len() == 1 {
            list.to_string()
        } else {
            format!("ROW({list})")
        }
    }

    /// A key held as `text[]` (a parameter or a subquery), typed column by column.
    fn typed(&self, array: &str) -> String {
        let parts: Vec<String> = self
            .types
            .iter()
            .enumerate()
            .map(|(i, ty)| format!("({array})[{}]::{ty}", i + 1))
            .collect();
        self.row(&parts.join(", "))
    }

    /// One batch: `$1` the last key done (NULL before the first batch), `$2` the
    /// upper bound, `$3` the batch size. Returns the rows updated, the batch's
    /// last key and whether it reached the upper bound. There are two forms of
    /// each, with and without a lower bound, so that each is a plain range on the
    /// primary key index (an `IS NULL OR` would hide the range from the planner
    /// and turn every batch into a scan).
    fn statement(&self, form: Form, first: bool) -> String {
        let cols = self.cols.join(", ");
        let keys = self.row(&cols);
        let lower = if first {
            "$1::text[] IS NULL AND ".to_string()
        } else {
            format!("{keys} > {} AND ", self.typed("$1::text[]"))
        };
        let upper = self.typed("$2::text[]");
        let table = &self.table;
        let zero = &self.zero;
        let as_text: Vec<String> = self.cols.iter().map(|c| format!("{c}::text")).collect();
        let as_text = as_text.join(", ");
        match form {
            // The end key from the index alone (no row is touched to find it),
            // then one range update: no lock is written before the update itself.
            Form::Wait => format!(
                "WITH e AS (
                    SELECT coalesce(
                        (SELECT ARRAY[{as_text}] FROM {table}
                         WHERE {lower}{keys} <= {upper}
                         ORDER BY {cols} OFFSET $3::bigint - 1 LIMIT 1),
                        $2::text[]) AS k
                 ), u AS (
                    UPDATE {table} SET tenant_id = {zero}
                    WHERE {lower}{keys} <= {end} AND tenant_id IS NULL
                    RETURNING 1
                 )
                 SELECT (SELECT count(*) FROM u), k, k = $2::text[] FROM e",
                end = self.typed("(SELECT k FROM e)"),
            ),
            Form::Skip => {
                // The batch's last key: an aggregate for a one-column key (no
                // sort), the top row for a composite one.
                let last = if self.cols.len() == 1 {
                    format!(
                        "(SELECT ARRAY[max({})::text] FROM b HAVING count(*) > 0)",
                        self.cols[0]
                    )
                } else {
                    let desc: Vec<String> = self.cols.iter().map(|c| format!("{c} DESC")).collect();
                    format!(
                        "(SELECT ARRAY[{as_text}] FROM b ORDER BY {} LIMIT 1)",
                        desc.join(", ")
                    )
                };
                format!(
                    "WITH b AS (
                        SELECT ctid AS row_ctid, {cols} FROM {table}
                        WHERE {lower}{keys} <= {upper}
                        ORDER BY {cols} LIMIT $3
                        FOR NO KEY UPDATE SKIP LOCKED
                     ), u AS (
                        UPDATE {table} AS t SET tenant_id = {zero}
                        WHERE t.ctid = ANY(ARRAY(SELECT row_ctid FROM b)) AND t.tenant_id IS NULL
                        RETURNING 1
                     ), l AS (SELECT {last} AS k)
                     SELECT (SELECT count(*) FROM u), k, k IS NULL OR (SELECT count(*) FROM b) < $3 FROM l"
                )
            }
        }
    }
}

/// How long a waiting batch may run: half the server's `deadlock_timeout`, so a
/// session waiting on the batch is released before its deadlock check runs.
async fn wait_budget(client: &Client) -> Result<Duration> {
    Ok((deadlock_timeout(client).await? / 2).max(Duration::from_millis(10)))
}

/// The `SET LOCAL`s of a batch: a skipping batch waits only for the table's lock;
/// a waiting one for at most its budget in all.
fn timeouts(opts: &Options, form: Form, budget: Duration) -> String {
    match form {
        Form::Skip => format!(
            "SET LOCAL lock_timeout = '{}ms'",
            opts.lock_timeout.as_millis()
        ),
        Form::Wait => format!(
            "SET LOCAL lock_timeout = '{}ms'; SET LOCAL statement_timeout = '{}ms'",
            opts.lock_timeout.min(budget).as_millis().max(1),
            budget.as_millis().max(1)
        ),
    }
}

/// Starts one batch's transaction under its timeouts. Its commit does not wait
/// for the WAL to reach the disk: a crash may lose the last few batches, but each
/// takes its journal row with it, so the resumed run does exactly those again.
async fn begin_batch<'a>(
    client: &'a mut Client,
    opts: &Options,
    form: Form,
    budget: Duration,
) -> Result<tokio_postgres::Transaction<'a>> {
    let tx = client
        .transaction()
        .await
        .map_err(sql("starting a backfill batch"))?;
    tx.batch_execute(&format!(
        "SET LOCAL synchronous_commit = off; {}",
        timeouts(opts, form, budget)
    ))
    .await
    .map_err(sql("setting the batch's timeouts"))?;
    Ok(tx)
}

/// The next batch size: scaled towards the target duration, at most doubling.
fn next_batch(batch: i64, took: Duration, opts: &Options) -> i64 {
    let took = took.as_secs_f64().max(0.000_1);
    let scaled = (batch as f64 * opts.target_batch.as_secs_f64() / took) as i64;
    scaled.min(batch * 2).clamp(opts.min_batch, opts.max_batch)
}

/// Sleeps as long as the rows-per-second ceiling asks.
async fn pace(updated: i64, began: Instant, opts: &Options) {
    if let Some(max) = opts.max_rows_per_sec.filter(|m| *m > 0) {
        let should_take = Duration::from_secs_f64(updated as f64 / max as f64);
        if let Some(rest) = should_take.checked_sub(began.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }
}

/// Waits while a replica's replay lag is above the limit, telling `waiting` the
/// lag once a second.
async fn wait_for_replicas(
    client: &Client,
    opts: &Options,
    waiting: &mut (dyn FnMut(f64) + Send),
) -> Result<()> {
    loop {
        let lag = replica_lag(client, opts).await?;
        if lag <= opts.max_replica_lag.as_secs_f64() {
            return Ok(());
        }
        waiting(lag);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The largest replay lag of the replicas, in seconds (0 when the limit is off).
/// A role that may not see the replicas' state (it needs `pg_read_all_stats`)
/// would never wait, so that is refused rather than ignored.
async fn replica_lag(client: &Client, opts: &Options) -> Result<f64> {
    if opts.max_replica_lag.is_zero() {
        return Ok(0.0);
    }
    let r = client
        .query_one(
            "SELECT coalesce(max(extract(epoch FROM replay_lag)), 0)::float8,
                    count(*) FILTER (WHERE state IS NULL)
             FROM pg_stat_replication",
            &[],
        )
        .await
        .map_err(sql("reading replication lag"))?;
    let (lag, hidden): (f64, i64) = (r.get(0), r.get(1));
    if hidden > 0 {
        return Err(Error::Refused(format!(
            "cannot see the replay lag of {hidden} replica(s): the role needs pg_read_all_stats (GRANT pg_read_all_stats TO it), or pass --max-replica-lag 0 to backfill without waiting for replicas; nothing more was changed"
        )));
    }
    Ok(lag)
}

/// The budget for batches that cannot get their locks: consecutive failures,
/// each followed by a jittered wait; spent, it stops the run with the names of
/// the sessions holding the table.
struct LockRetry {
    backoff: Backoff,
    failures: u32,
    attempts: u32,
    timeout: Duration,
}

impl LockRetry {
    fn new(opts: &Options) -> LockRetry {
        LockRetry {
            backoff: Backoff::new(),
            failures: 0,
            attempts: opts.attempts.max(1),
            timeout: opts.lock_timeout,
        }
    }

    async fn wait(&mut self, client: &Client, t: &Table) -> Result<()> {
        self.failures += 1;
        if self.failures >= self.attempts {
            return Err(Error::LockTimeout {
                step: format!("backfill:{}", key(t)),
                timeout_ms: self.timeout.as_millis() as u64,
                attempts: self.failures,
                blockers: blockers(client, Some(t)).await,
            });
        }
        tokio::time::sleep(self.backoff.next_wait()).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_follow_the_target_duration_within_bounds() {
        let o = Options::default();
        assert_eq!(next_batch(1_000, Duration::from_millis(100), &o), 2_000);
        assert_eq!(next_batch(1_000, Duration::from_millis(400), &o), 500);
        assert_eq!(next_batch(1_000, Duration::from_secs(100), &o), 100);
        assert_eq!(next_batch(40_000, Duration::from_millis(1), &o), 50_000);
    }
}
