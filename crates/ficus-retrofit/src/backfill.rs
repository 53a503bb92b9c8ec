//! The online backfill: every existing row of a tenant-owned table gets tenant
//! zero, without a long lock and without losing a row the live app writes.
//!
//! Rows are taken in keyset batches on the primary key, up to the largest key
//! present at the start (rows written later already carry the column default, so
//! the run always finishes however fast the app inserts). Each batch locks its
//! rows `FOR NO KEY UPDATE SKIP LOCKED` (a row the app holds is skipped, not
//! waited for), updates those still NULL, and records its position in
//! `tenancy_private.backfill` in the same transaction, so a crash resumes exactly
//! where the last committed batch ended. A catch-up pass then stamps whatever was
//! skipped, waiting for row locks under the lock timeout. The batch size follows a
//! target batch duration; the pace respects a rows-per-second ceiling and waits
//! while replicas lag. Tables without a primary key go by ctid.

use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::apply::{Backoff, blockers};
use crate::ident::{Table, literal};
use crate::inspect::TableInfo;
use crate::plan::{Plan, key};
use crate::{Error, Result, describe, sql};

/// How the backfill paces itself.
#[derive(Debug, Clone)]
pub struct Options {
    /// Each batch aims to take about this long.
    pub target_batch: Duration,
    pub min_batch: i64,
    pub max_batch: i64,
    /// At most this many rows per second (`None`: as fast as the target allows).
    pub max_rows_per_sec: Option<u64>,
    /// Pause while any replica's replay lag is above this.
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
    let (upper, mut last, mut rows, mut keyset_done) = match state {
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
    let mut report = |rows: i64, batch: i64, phase: &'static str| {
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
        });
    };
    // The keyset pass.
    if !keyset_done && let Some(upper) = &upper {
        let n = pk.len();
        let cols: Vec<&str> = pk.iter().map(|(c, _)| c.as_str()).collect();
        let typed = |param: usize| -> String {
            pk.iter()
                .enumerate()
                .map(|(i, (_, ty))| format!("(${param}::text[])[{}]::{ty}", i + 1))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let row = |list: &str| {
            if n == 1 {
                list.to_string()
            } else {
                format!("ROW({list})")
            }
        };
        let order_desc: Vec<String> = cols.iter().map(|c| format!("{c} DESC")).collect();
        let last_cols: Vec<String> = cols.iter().map(|c| format!("{c}::text")).collect();
        // The batch's last key: an aggregate for a one-column key (no sort), the
        // top row for a composite one.
        let last_key = if n == 1 {
            format!(
                "(SELECT ARRAY[max({})::text] FROM b HAVING count(*) > 0)",
                cols[0]
            )
        } else {
            format!(
                "(SELECT ARRAY[{}] FROM b ORDER BY {} LIMIT 1)",
                last_cols.join(", "),
                order_desc.join(", ")
            )
        };
        // Two forms, with and without a lower bound, so that each is a plain
        // range on the primary key index (an `IS NULL OR` would hide the range
        // from the planner and turn every batch into a scan).
        let statement = |lower: &str| {
            format!(
                "WITH b AS (
                SELECT ctid AS row_ctid, {cols} FROM {table}
                WHERE {lower}{row_cols} <= {row_upper}
                ORDER BY {cols} LIMIT $3
                FOR NO KEY UPDATE SKIP LOCKED
             ), u AS (
                UPDATE {table} AS t SET tenant_id = {zero}
                WHERE t.ctid = ANY(ARRAY(SELECT row_ctid FROM b)) AND t.tenant_id IS NULL
                RETURNING 1
             )
             SELECT (SELECT count(*) FROM u), {last}",
                cols = cols.join(", "),
                table = t.sql(),
                row_cols = row(&cols.join(", ")),
                row_upper = row(&typed(2)),
                last = last_key,
            )
        };
        let first = statement("$1::text[] IS NULL AND ");
        let next = statement(&format!(
            "{} > {} AND ",
            row(&cols.join(", ")),
            row(&typed(1))
        ));
        loop {
            wait_for_replicas(client, opts).await?;
            let began = Instant::now();
            let tx = begin_batch(client, opts).await?;
            let query = if last.is_none() { &first } else { &next };
            let r = match tx.query_one(query, &[&last, upper, &batch]).await {
                Ok(r) => r,
                Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                    drop(tx);
                    retry.wait(client, t).await?;
                    continue;
                }
                Err(e) => {
                    return Err(Error::Sql {
                        context: format!("backfilling {t}"),
                        detail: describe(&e),
                    });
                }
            };
            let updated: i64 = r.get(0);
            let next: Option<Vec<String>> = r.get(1);
            rows += updated;
            let finished = next.is_none();
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
            report(rows, batch, "keyset");
            if finished {
                break;
            }
            last = next;
            batch = next_batch(batch, began.elapsed(), opts);
            pace(updated, began, opts).await;
        }
        keyset_done = true;
    }
    let _ = keyset_done;
    // The catch-up pass: rows skipped because the app held them, rows written
    // between the column and its default, and every row of a table without a key.
    for skip_locked in [true, false] {
        loop {
            wait_for_replicas(client, opts).await?;
            let began = Instant::now();
            let tx = begin_batch(client, opts).await?;
            let statement = format!(
                "UPDATE {table} SET tenant_id = {zero} WHERE ctid = ANY(ARRAY(
                    SELECT ctid FROM {table} WHERE tenant_id IS NULL LIMIT $1 FOR NO KEY UPDATE{skip}))",
                table = t.sql(),
                skip = if skip_locked { " SKIP LOCKED" } else { "" }
            );
            let updated = match tx.execute(&statement, &[&batch]).await {
                Ok(n) => n as i64,
                Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                    drop(tx);
                    retry.wait(client, t).await?;
                    continue;
                }
                Err(e) => {
                    return Err(Error::Sql {
                        context: format!("backfilling {t}"),
                        detail: describe(&e),
                    });
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
            retry = LockRetry::new(opts);
            if updated == 0 {
                break;
            }
            report(rows, batch, "catch-up");
            batch = next_batch(batch, began.elapsed(), opts);
            pace(updated, began, opts).await;
        }
    }
    client
        .execute(
            "UPDATE tenancy_private.backfill SET done = true, rows_done = $2 WHERE table_name = $1",
            &[&name, &rows],
        )
        .await
        .map_err(sql("finishing the backfill journal"))?;
    report(rows, batch, "done");
    Ok(rows)
}

/// Starts one batch's transaction, whose row-lock waits end at the lock timeout.
async fn begin_batch<'a>(
    client: &'a mut Client,
    opts: &Options,
) -> Result<tokio_postgres::Transaction<'a>> {
    let tx = client
        .transaction()
        .await
        .map_err(sql("starting a backfill batch"))?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        opts.lock_timeout.as_millis()
    ))
    .await
    .map_err(sql("setting the lock timeout"))?;
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

/// Waits while a replica's replay lag is above the limit.
async fn wait_for_replicas(client: &Client, opts: &Options) -> Result<()> {
    loop {
        let lag: f64 = client
            .query_one(
                "SELECT coalesce(max(extract(epoch FROM replay_lag)), 0)::float8 FROM pg_stat_replication",
                &[],
            )
            .await
            .map_err(sql("reading replication lag"))?
            .get(0);
        if lag <= opts.max_replica_lag.as_secs_f64() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
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
