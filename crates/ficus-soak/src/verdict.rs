//! The verdict: every client request accounted for (a failure must have a
//! cause the rules allow), every acknowledged write found exactly once with
//! what was sent, no NULL tenant id, no answer holding another tenant's data,
//! no tenant born twice, and each fault with what it did.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use ficus_store::ControlStore;
use serde::Serialize;

use crate::client::Record;
use crate::schedule::{Fault, Schedule};

/// A fault as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    pub fault: String,
    #[serde(skip)]
    pub kind: Option<Fault>,
    /// Unix milliseconds when it began, and when its effect ended (a killed
    /// replica reaped, a drained one exited).
    pub at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<u64>,
    pub what: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard_reaction_ms: Option<u64>,
    /// Whether the fault's own checks passed.
    pub ok: bool,
}

impl FaultRecord {
    pub fn new(kind: Fault, at_ms: u64, what: String) -> FaultRecord {
        FaultRecord {
            fault: kind.to_string(),
            kind: Some(kind),
            at_ms,
            until_ms: None,
            what,
            replica: None,
            tenant: None,
            guard_reaction_ms: None,
            ok: true,
        }
    }

    pub fn new_fixed(name: &str, at_ms: u64, what: String) -> FaultRecord {
        FaultRecord {
            fault: name.to_string(),
            kind: None,
            ..FaultRecord::new(Fault::KillReplica, at_ms, what)
        }
    }
}

/// One line of HAProxy's log: which replica a request went to and how it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct LbLine {
    pub server: String,
    pub status: i32,
    /// HAProxy's termination state (`----` for a normal end, `SH--` for a
    /// server that closed before answering…).
    pub termination: String,
    /// Connection retries, `+`-prefixed when the request was redispatched to
    /// another replica.
    pub retried: bool,
}

pub fn read_records(paths: &[PathBuf]) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for p in paths {
        let Ok(text) = std::fs::read_to_string(p) else {
            continue;
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            out.push(
                serde_json::from_str(line).with_context(|| {
                    format!("a line of {} is not a record: {line}", p.display())
                })?,
            );
        }
    }
    Ok(out)
}

/// HAProxy's log (`%ID %s %ST %tsc %Ta %rc`), by request id.
pub fn read_haproxy_log(path: &Path) -> Result<HashMap<String, LbLine>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(parse_haproxy_log(&text))
}

pub fn parse_haproxy_log(text: &str) -> HashMap<String, LbLine> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 || !f[0].starts_with("soak-") {
            continue;
        }
        out.insert(
            f[0].to_string(),
            LbLine {
                server: f[1].to_string(),
                status: f[2].parse().unwrap_or(-1),
                termination: f[3].to_string(),
                retried: f
                    .get(5)
                    .is_some_and(|rc| rc.trim_start_matches('+').parse::<u32>().unwrap_or(0) > 0),
            },
        );
    }
    out
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// In flight on a replica at the instant it was killed: allowed.
    InFlightOnKilledReplica,
    /// Answered with the injected 500 (or cut by the injected hang) for the
    /// broken tenant before the guard rolled it back: the fault itself, which
    /// reached a client although the other instance of the rebuilt backend
    /// could answer (reads fail over, and writes too since they carry an
    /// idempotency key). Counted apart, and not allowed.
    InjectedBackendFault,
    /// Anything else: a finding.
    Unexplained,
}

/// How long after the guard's rollback is in the store a replica may still
/// send the tenant to the broken backend.
const PROPAGATION_MS: u64 = 1_000;

/// Whether `r` was in flight on the replica `kill` killed while it died: by
/// HAProxy's log (sent there, or moved from there to the other replica), or
/// cut at the connection level with no line in the log at all (HAProxy closed
/// the client's connection instead of answering for a write it could not
/// retry; seed 1 showed one). A process does not die the instant SIGKILL is
/// sent: until the kernel has closed its sockets (`until_ms`, when it was
/// reaped) its listener still completes connections that are then reset, so
/// a request sent in that span was in flight on it too (regression: CI's
/// seed 7 lost a POST sent 4 ms after the signal).
fn in_flight_on_killed(r: &Record, kill: &FaultRecord, lb: &HashMap<String, LbLine>) -> bool {
    let there = match lb.get(&r.id) {
        Some(l) => Some(&l.server) == kill.replica.as_ref() || l.retried,
        None => r.status.is_none(),
    };
    let dead = kill.until_ms.unwrap_or(kill.at_ms).max(kill.at_ms);
    there && r.sent_ms <= dead && r.done_ms >= kill.at_ms
}

/// The cause of a failed request, from the faults and the load balancer's log.
pub fn cause(r: &Record, faults: &[FaultRecord], lb: &HashMap<String, LbLine>) -> Cause {
    for f in faults {
        match f.kind {
            // Moved to the live replica by HAProxy and failed there: not this.
            Some(Fault::KillReplica)
                if in_flight_on_killed(r, f, lb) && !lb.get(&r.id).is_some_and(|l| l.retried) =>
            {
                return Cause::InFlightOnKilledReplica;
            }
            Some(Fault::BreakNewForTenant) => {
                // Until the rollback reached the replicas: the store's change
                // feed carries it in milliseconds; a second bounds it.
                let during = r.sent_ms >= f.at_ms
                    && f.guard_reaction_ms
                        .is_some_and(|g| r.sent_ms <= f.at_ms + g + PROPAGATION_MS);
                if during
                    && f.tenant.as_deref() == Some(r.tenant.as_str())
                    && matches!(r.status, Some(500 | 502 | 504))
                {
                    return Cause::InjectedBackendFault;
                }
            }
            _ => {}
        }
    }
    Cause::Unexplained
}

/// A home a soak client saved, as the database has it.
struct SavedHome {
    id: i64,
    city: String,
    price: i64,
    bedrooms: i32,
    /// Its organization's slug: the tenant it belongs to.
    tenant: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Writes {
    pub acknowledged: u64,
    pub found_once: u64,
    pub missing: u64,
    pub duplicated: u64,
    pub altered: u64,
    pub wrong_tenant: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub seed: u64,
    pub minutes: f64,
    pub requests: u64,
    pub succeeded: u64,
    pub failed: BTreeMap<String, u64>,
    /// Up to ten unexplained failures, for the reader.
    pub unexplained_examples: Vec<String>,
    pub writes: Writes,
    pub null_tenant_ids: i64,
    pub cross_tenant_answers: u64,
    pub leak_examples: Vec<String>,
    pub duplicate_tenants: i64,
    pub guard_reaction_ms: Option<u64>,
    pub faults: Vec<FaultRecord>,
    pub passed: bool,
    pub reasons: Vec<String>,
}

#[allow(
    clippy::too_many_arguments,
    reason = "everything the soak gathered, once"
)]
pub async fn judge(
    schedule: &Schedule,
    records: &[Record],
    lb: &HashMap<String, LbLine>,
    faults: &[FaultRecord],
    db: &tokio_postgres::Client,
    store: &dyn ControlStore,
    tenants: &[String],
    took: Duration,
) -> Result<Verdict> {
    let mut failed: BTreeMap<String, u64> = BTreeMap::new();
    let mut examples = Vec::new();
    let mut leaks = Vec::new();
    let mut succeeded = 0;
    for r in records {
        if r.ok() {
            succeeded += 1;
        } else {
            let c = cause(r, faults, lb);
            *failed
                .entry(serde_json::to_value(c)?.as_str().unwrap_or("?").to_string())
                .or_default() += 1;
            if c == Cause::Unexplained && examples.len() < 10 {
                let via = lb
                    .get(&r.id)
                    .map(|l| format!(" (via {} {} {})", l.server, l.status, l.termination))
                    .unwrap_or_default();
                examples.push(format!(
                    "{} {} {} as {}: {}{via}",
                    r.id,
                    r.method,
                    r.path,
                    r.tenant,
                    r.error.clone().unwrap_or_default()
                ));
            }
        }
        if let Some(l) = &r.leak {
            leaks.push(format!("{} as {}: {l}", r.id, r.tenant));
        }
    }

    // Every acknowledged write, in the database exactly once, as sent, as its
    // tenant's.
    let rows = db
        .query(
            "SELECT h.id, h.address, h.city, h.price, h.bedrooms, o.slug
             FROM homes h LEFT JOIN tenancy.organizations o ON o.id = h.tenant_id
             WHERE h.address LIKE 'soak %'",
            &[],
        )
        .await?;
    let mut by_address: HashMap<String, Vec<SavedHome>> = HashMap::new();
    for row in &rows {
        by_address.entry(row.get(1)).or_default().push(SavedHome {
            id: row.get(0),
            city: row.get(2),
            price: row.get(3),
            bedrooms: row.get(4),
            tenant: row.get(5),
        });
    }
    let mut writes = Writes {
        duplicated: by_address.values().filter(|v| v.len() > 1).count() as u64,
        ..Writes::default()
    };
    for r in records {
        let Some(a) = &r.ack else { continue };
        writes.acknowledged += 1;
        match by_address.get(&a.address).map(Vec::as_slice) {
            None | Some([]) => writes.missing += 1,
            Some([h]) => {
                if (h.id, h.city.as_str(), h.price, h.bedrooms)
                    != (a.row, a.city.as_str(), a.price, a.bedrooms)
                {
                    writes.altered += 1;
                } else if h.tenant.as_deref() != Some(r.tenant.as_str()) {
                    writes.wrong_tenant += 1;
                } else {
                    writes.found_once += 1;
                }
            }
            Some(_) => {}
        }
    }

    // No row without a tenant after the retrofit.
    let mut null_tenant_ids = 0;
    for table in ["homes", "valuations", "saved_searches", "notifications"] {
        let n: i64 = db
            .query_one(
                &format!(
                    "SELECT count(*) FROM {} WHERE tenant_id IS NULL",
                    quote(table)
                ),
                &[],
            )
            .await?
            .get(0);
        null_tenant_ids += n;
    }

    // Each tenant once, in the control plane and in the tenant database.
    let mut duplicate_tenants = 0;
    for t in tenants {
        let orgs: i64 = db
            .query_one(
                "SELECT count(*) FROM tenancy.organizations WHERE slug = $1",
                &[t],
            )
            .await?
            .get(0);
        duplicate_tenants += (orgs - 1).max(0);
    }
    let known = store.tenants(None).await?;
    duplicate_tenants += (known.len() as i64 - tenants.len() as i64).max(0);

    // What a replica's kill caught in flight, from the load balancer's side.
    let mut faults = faults.to_vec();
    for f in faults
        .iter_mut()
        .filter(|f| f.kind == Some(Fault::KillReplica))
    {
        let caught: Vec<&Record> = records
            .iter()
            .filter(|r| in_flight_on_killed(r, f, lb))
            .collect();
        let failed = caught.iter().filter(|r| !r.ok()).count();
        let moved = caught
            .iter()
            .filter(|r| lb.get(&r.id).is_some_and(|l| l.retried))
            .count();
        f.what.push_str(&format!(
            "; {} client requests in flight on it, {moved} retried by HAProxy on the other replica, {failed} failed",
            caught.len()
        ));
    }
    // What a drained replica was still sent after the signal: HAProxy keeps
    // sending until its health checks see `/readyz` at 503, which the drain
    // delay outlasts, so these are answered rather than reset. HAProxy's log
    // names the last server a request went to, so one reset there and
    // redispatched shows as retried, and one cut silently has no line: both
    // are counted too.
    for f in faults
        .iter_mut()
        .filter(|f| f.kind == Some(Fault::TermReplica))
    {
        let end = f.until_ms.unwrap_or(f.at_ms);
        let sent: Vec<&Record> = records
            .iter()
            .filter(|r| {
                r.sent_ms >= f.at_ms
                    && r.sent_ms <= end
                    && match lb.get(&r.id) {
                        Some(l) => Some(&l.server) == f.replica.as_ref() || l.retried,
                        None => !r.ok(),
                    }
            })
            .collect();
        let failed = sent.iter().filter(|r| !r.ok()).count();
        let last = sent.iter().map(|r| r.sent_ms - f.at_ms).max();
        f.what.push_str(&format!(
            "; sent {} client requests after the signal (the last {} ms after it; counting any retried or cut), {failed} failed",
            sent.len(),
            last.map_or_else(|| "none".to_string(), |l| l.to_string())
        ));
    }
    let guard_reaction_ms = faults.iter().find_map(|f| f.guard_reaction_ms);
    let unexplained = failed.get("unexplained").copied().unwrap_or(0);
    let mut reasons = Vec::new();
    if unexplained > 0 {
        reasons.push(format!(
            "{unexplained} failed requests with no allowed cause"
        ));
    }
    let injected = failed.get("injected_backend_fault").copied().unwrap_or(0);
    if injected > 0 {
        reasons.push(format!(
            "{injected} requests failed with the injected backend fault: the proxy should have asked the other instance"
        ));
    }
    if writes.missing + writes.duplicated + writes.altered + writes.wrong_tenant > 0 {
        reasons.push(format!(
            "acknowledged writes not found exactly once as sent: {writes:?}"
        ));
    }
    if null_tenant_ids > 0 {
        reasons.push(format!("{null_tenant_ids} rows with a NULL tenant_id"));
    }
    if !leaks.is_empty() {
        reasons.push(format!(
            "{} answers held another tenant's data",
            leaks.len()
        ));
    }
    if duplicate_tenants > 0 {
        reasons.push(format!("{duplicate_tenants} tenants born more than once"));
    }
    for f in faults.iter().filter(|f| !f.ok) {
        reasons.push(format!("fault {}: {}", f.fault, f.what));
    }
    for kind in Fault::ALL {
        if !faults.iter().any(|f| f.kind == Some(kind)) {
            reasons.push(format!("fault {kind} was never injected"));
        }
    }
    leaks.truncate(10);
    Ok(Verdict {
        seed: schedule.seed,
        minutes: took.as_secs_f64() / 60.0,
        requests: records.len() as u64,
        succeeded,
        failed,
        unexplained_examples: examples,
        writes,
        null_tenant_ids,
        cross_tenant_answers: records.iter().filter(|r| r.leak.is_some()).count() as u64,
        leak_examples: leaks,
        duplicate_tenants,
        guard_reaction_ms,
        faults,
        passed: reasons.is_empty(),
        reasons,
    })
}

/// A quoted SQL identifier.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl Verdict {
    /// The verdict as a table for people.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let mut row = |k: &str, v: String| t.push_str(&format!("  {k:<44} {v}\n"));
        row("seed", self.seed.to_string());
        row("minutes", format!("{:.1}", self.minutes));
        row("client requests sent", self.requests.to_string());
        row("  succeeded", self.succeeded.to_string());
        for (cause, n) in &self.failed {
            row(&format!("  failed: {cause}"), n.to_string());
        }
        row("acknowledged writes", self.writes.acknowledged.to_string());
        row(
            "  found exactly once, as sent",
            self.writes.found_once.to_string(),
        );
        row("  missing", self.writes.missing.to_string());
        row("  duplicated rows", self.writes.duplicated.to_string());
        row(
            "  altered / wrong tenant",
            format!("{} / {}", self.writes.altered, self.writes.wrong_tenant),
        );
        row(
            "rows with a NULL tenant_id",
            self.null_tenant_ids.to_string(),
        );
        row(
            "answers with another tenant's data",
            self.cross_tenant_answers.to_string(),
        );
        row(
            "tenants born more than once",
            self.duplicate_tenants.to_string(),
        );
        row(
            "guard reaction",
            self.guard_reaction_ms
                .map_or("-".into(), |ms| format!("{ms} ms")),
        );
        for f in &self.faults {
            t.push_str(&format!("  fault {:<38} {}\n", f.fault, f.what));
        }
        for e in &self.unexplained_examples {
            t.push_str(&format!("  unexplained: {e}\n"));
        }
        for e in &self.leak_examples {
            t.push_str(&format!("  leak: {e}\n"));
        }
        t.push_str(&format!(
            "  verdict: {}\n",
            if self.passed {
                "PASS".to_string()
            } else {
                format!("FAIL ({})", self.reasons.join("; "))
            }
        ));
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, tenant: &str, sent: u64, done: u64, status: Option<u16>) -> Record {
        Record {
            id: id.into(),
            tenant: tenant.into(),
            method: "POST".into(),
            path: "/homes".into(),
            sent_ms: sent,
            done_ms: done,
            status,
            error: Some("failed".into()),
            ack: None,
            leak: None,
        }
    }

    #[test]
    fn a_failure_is_in_flight_on_the_killed_replica_from_the_injected_fault_or_unexplained() {
        let lb = parse_haproxy_log(
            "soak-a-1 replica-a 502 SH-- 12 0\nsoak-a-2 replica-b 502 SH-- 12 +1\nnot-ours x 200 ---- 1 0\n",
        );
        assert_eq!(lb.len(), 2);
        assert!(!lb["soak-a-1"].retried && lb["soak-a-2"].retried);
        let mut kill = FaultRecord::new(Fault::KillReplica, 1_000, String::new());
        kill.replica = Some("replica-a".into());
        kill.until_ms = Some(1_006);
        let mut broken = FaultRecord::new(Fault::BreakNewForTenant, 5_000, String::new());
        broken.tenant = Some("acme".into());
        broken.guard_reaction_ms = Some(2_000);
        let faults = [kill, broken];
        let check =
            |r: Record, expect: Cause| assert_eq!(cause(&r, &faults, &lb), expect, "{}", r.id);
        check(
            record("soak-a-1", "a", 900, 1_100, Some(502)),
            Cause::InFlightOnKilledReplica,
        );
        // Sent after the process was gone: the load balancer should have
        // gone elsewhere.
        check(
            record("soak-a-1", "a", 1_007, 1_100, Some(502)),
            Cause::Unexplained,
        );
        // In flight then, but on the live replica.
        check(
            record("soak-a-2", "a", 900, 1_100, Some(502)),
            Cause::Unexplained,
        );
        // In flight then, cut below HTTP, and never logged by HAProxy.
        check(
            record("soak-a-3", "a", 999, 1_018, None),
            Cause::InFlightOnKilledReplica,
        );
        // Not logged, but answered: not a connection-level failure.
        check(
            record("soak-a-4", "a", 999, 1_018, Some(502)),
            Cause::Unexplained,
        );
        // Cut below HTTP, sent after the signal while the process was
        // still dying (it was reaped at 1,006).
        check(
            record("soak-a-5", "a", 1_004, 1_013, None),
            Cause::InFlightOnKilledReplica,
        );
        // Cut below HTTP, but sent once the process was gone.
        check(
            record("soak-a-6", "a", 1_007, 1_018, None),
            Cause::Unexplained,
        );
        check(
            record("soak-x-1", "acme", 6_000, 6_010, Some(500)),
            Cause::InjectedBackendFault,
        );
        check(
            record("soak-x-2", "acme", 8_500, 8_510, Some(500)),
            Cause::Unexplained,
        );
        check(
            record("soak-x-3", "other", 6_000, 6_010, Some(500)),
            Cause::Unexplained,
        );
        check(
            record("soak-x-4", "acme", 6_000, 6_010, Some(403)),
            Cause::Unexplained,
        );
    }
}
