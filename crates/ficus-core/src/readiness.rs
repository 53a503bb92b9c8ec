//! Readiness: whether the evidence from a tenant's parallel run allows moving it to
//! `migrated`. Each criterion is judged separately and says why it passes or fails,
//! so an operator sees exactly what is missing.
//!
//! Mismatches are judged by class ([`crate::reconcile`]): only breaking classes'
//! counted evidence blocks; additive classes are listed, never counted.

use crate::latency::{Histogram, format_micros};
use crate::reconcile::ClassTally;

/// One endpoint's evidence over the readiness window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointEvidence {
    pub endpoint: String,
    /// Eligible reads the tenant made on this endpoint.
    pub requests: u64,
    pub compared: u64,
    pub errors: u64,
    /// Compared while a write of the tenant was in flight: not judged, and
    /// not in `compared`.
    pub raced: u64,
}

/// The thresholds of the gate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Comparisons needed over the window, all endpoints together.
    pub min_comparisons: u64,
    /// Mismatches allowed over the window, counted per class (noise, additive
    /// differences, accepted classes and evidence from before a class was
    /// resolved never count).
    pub max_mismatches: u64,
    /// Every endpoint the tenant used must have been compared this many times.
    pub min_per_endpoint: u64,
    /// Share of shadow requests that may fail or time out.
    pub max_error_rate: f64,
    /// New's p99 may be at most this many times legacy's p99 for the tenant...
    pub max_latency_ratio: f64,
    /// ...or at most this many milliseconds above it, whichever allows more, so
    /// that a 1 ms legacy is not failed for a 2 ms new.
    pub latency_slack_ms: u64,
}

/// Latencies of the two backends for the same compared reads of one tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencyEvidence {
    pub legacy: Histogram,
    pub new: Histogram,
}

impl Default for Thresholds {
    /// Safe defaults: plenty of evidence, nothing unexplained, nothing uncovered.
    fn default() -> Thresholds {
        Thresholds {
            min_comparisons: 500,
            max_mismatches: 0,
            min_per_endpoint: 5,
            max_error_rate: 0.01,
            max_latency_ratio: 1.5,
            latency_slack_ms: 10,
        }
    }
}

/// One criterion's verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Criterion {
    pub name: &'static str,
    pub passed: bool,
    /// The numbers behind the verdict, in words.
    pub detail: String,
}

/// All criteria for one tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct Readiness {
    pub criteria: Vec<Criterion>,
    /// Endpoints used but not compared often enough.
    pub uncovered: Vec<String>,
    /// The classes whose mismatches counted, most first.
    pub blocking: Vec<ClassTally>,
    /// Additive classes seen: shown, not counted.
    pub additive: Vec<ClassTally>,
    /// 0.0 to 1.0: how close the tenant is, for ranking.
    pub score: f64,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.criteria.iter().all(|c| c.passed)
    }

    pub fn failing(&self) -> Vec<&Criterion> {
        self.criteria.iter().filter(|c| !c.passed).collect()
    }
}

/// Judges a tenant's evidence against the thresholds.
pub fn judge(
    evidence: &[EndpointEvidence],
    classes: &[ClassTally],
    latency: &LatencyEvidence,
    t: &Thresholds,
) -> Readiness {
    let compared: u64 = evidence.iter().map(|e| e.compared).sum();
    let raced: u64 = evidence.iter().map(|e| e.raced).sum();
    let blocking: Vec<ClassTally> = classes.iter().filter(|c| c.blocks()).cloned().collect();
    let additive: Vec<ClassTally> = classes
        .iter()
        .filter(|c| c.class.additive && c.counted > 0)
        .cloned()
        .collect();
    let mismatched: u64 = blocking.iter().map(|c| c.counted).sum();
    let regressions = blocking.iter().filter(|c| c.class.regression).count();
    let errors: u64 = evidence.iter().map(|e| e.errors).sum();
    let attempted = compared + errors;
    let used: Vec<&EndpointEvidence> = evidence.iter().filter(|e| e.requests > 0).collect();
    let uncovered: Vec<String> = used
        .iter()
        .filter(|e| e.compared < t.min_per_endpoint)
        .map(|e| e.endpoint.clone())
        .collect();
    let error_rate = if attempted == 0 {
        0.0
    } else {
        errors as f64 / attempted as f64
    };
    let latency_passed = latency_verdict(latency, t);
    let criteria = vec![
        Criterion {
            name: "comparisons",
            passed: compared >= t.min_comparisons,
            detail: if raced == 0 {
                format!("{compared} compared; at least {} needed", t.min_comparisons)
            } else {
                format!(
                    "{compared} compared (and {raced} raced by the tenant's own writes, not judged); at least {} needed",
                    t.min_comparisons
                )
            },
        },
        Criterion {
            name: "mismatches",
            passed: mismatched <= t.max_mismatches,
            detail: match (blocking.len(), regressions) {
                (0, _) => format!("0 mismatched; at most {} allowed", t.max_mismatches),
                (n, 0) => format!(
                    "{mismatched} mismatched in {n} open class{}; at most {} allowed",
                    if n == 1 { "" } else { "es" },
                    t.max_mismatches
                ),
                (n, r) => format!(
                    "{mismatched} mismatched in {n} open class{} ({r} REGRESSION{}: resolved, then seen again); at most {} allowed",
                    if n == 1 { "" } else { "es" },
                    if r == 1 { "" } else { "S" },
                    t.max_mismatches
                ),
            },
        },
        Criterion {
            name: "coverage",
            passed: !used.is_empty() && uncovered.is_empty(),
            detail: if used.is_empty() {
                "no traffic seen in the window".to_string()
            } else {
                format!(
                    "{} of {} endpoints compared at least {} times",
                    used.len() - uncovered.len(),
                    used.len(),
                    t.min_per_endpoint
                )
            },
        },
        Criterion {
            name: "shadow errors",
            passed: error_rate <= t.max_error_rate,
            detail: format!(
                "{:.2}% of shadow requests failed; at most {:.2}% allowed",
                error_rate * 100.0,
                t.max_error_rate * 100.0
            ),
        },
        Criterion {
            name: "latency",
            passed: latency_passed.0,
            detail: latency_passed.1,
        },
    ];
    let progress = |have: f64, need: f64| {
        if need <= 0.0 {
            1.0
        } else {
            (have / need).min(1.0)
        }
    };
    let coverage = if used.is_empty() {
        0.0
    } else {
        (used.len() - uncovered.len()) as f64 / used.len() as f64
    };
    let clean = if mismatched <= t.max_mismatches {
        1.0
    } else {
        0.0
    };
    let score = (progress(compared as f64, t.min_comparisons as f64)
        + coverage
        + clean
        + if error_rate <= t.max_error_rate {
            1.0
        } else {
            0.0
        }
        + if latency_passed.0 { 1.0 } else { 0.0 })
        / 5.0;
    Readiness {
        criteria,
        uncovered,
        blocking,
        additive,
        score,
    }
}

/// Compares new's p99 with legacy's, and says so with both p50s and p99s.
fn latency_verdict(l: &LatencyEvidence, t: &Thresholds) -> (bool, String) {
    let (Some(legacy_p99), Some(new_p99)) =
        (l.legacy.quantile_micros(0.99), l.new.quantile_micros(0.99))
    else {
        return (false, "no latency measured in the window".to_string());
    };
    let legacy_p50 = l.legacy.quantile_micros(0.5).unwrap_or(0);
    let new_p50 = l.new.quantile_micros(0.5).unwrap_or(0);
    let allowed = ((legacy_p99 as f64 * t.max_latency_ratio) as u64)
        .max(legacy_p99 + t.latency_slack_ms * 1_000);
    (
        new_p99 <= allowed,
        format!(
            "new p50 {} p99 {} vs legacy p50 {} p99 {}; new p99 at most {} allowed",
            format_micros(new_p50),
            format_micros(new_p99),
            format_micros(legacy_p50),
            format_micros(legacy_p99),
            format_micros(allowed)
        ),
    )
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;
    use crate::Timestamp;
    use crate::reconcile::{ClassEvidence, ClassState, MismatchClass, tally};

    /// The evidence of one endpoint; `mismatched` of them in one open class of
    /// their own.
    fn ev(
        endpoint: &str,
        requests: u64,
        compared: u64,
        mismatched: u64,
        errors: u64,
    ) -> (EndpointEvidence, u64) {
        (
            EndpointEvidence {
                endpoint: endpoint.into(),
                requests,
                compared,
                errors,
                raced: 0,
            },
            mismatched,
        )
    }

    fn classes_of(evidence: &[(EndpointEvidence, u64)]) -> Vec<ClassTally> {
        let mut classes = Vec::new();
        let mut rows = Vec::new();
        for (e, n) in evidence.iter().filter(|(_, n)| *n > 0) {
            classes.push(MismatchClass {
                id: e.endpoint.clone(),
                endpoint: e.endpoint.clone(),
                path: "$.price".into(),
                kind: "value".into(),
                additive: false,
                state: ClassState::Open,
                epoch: 0,
                first_seen: Timestamp::from_unix_millis(0),
                last_seen: Timestamp::from_unix_millis(0),
                resolved_at: None,
                fixed_in: None,
                regression: false,
                last_change: None,
                example: None,
            });
            rows.push(ClassEvidence {
                class: e.endpoint.clone(),
                epoch: 0,
                version: String::new(),
                count: *n,
                first_at: Timestamp::from_unix_millis(0),
                last_at: Timestamp::from_unix_millis(0),
            });
        }
        tally(&classes, &rows, None)
    }

    fn latencies(legacy_ms: u64, new_ms: u64) -> LatencyEvidence {
        let mut l = LatencyEvidence::default();
        for _ in 0..100 {
            l.legacy.record(legacy_ms * 1_000);
            l.new.record(new_ms * 1_000);
        }
        l
    }

    fn check(evidence: &[(EndpointEvidence, u64)], latency: &LatencyEvidence, expect: Expect) {
        let classes = classes_of(evidence);
        let endpoints: Vec<EndpointEvidence> = evidence.iter().map(|(e, _)| e.clone()).collect();
        let r = judge(
            &endpoints,
            &classes,
            latency,
            &Thresholds {
                min_comparisons: 100,
                ..Thresholds::default()
            },
        );
        let mut s = format!("ready={} score={:.2}\n", r.is_ready(), r.score);
        for c in &r.criteria {
            s.push_str(&format!(
                "{} {}: {}\n",
                if c.passed { "pass" } else { "FAIL" },
                c.name,
                c.detail
            ));
        }
        if !r.uncovered.is_empty() {
            s.push_str(&format!("uncovered: {}\n", r.uncovered.join(", ")));
        }
        expect.assert_eq(&s);
    }

    #[test]
    fn criteria() {
        check(
            &[],
            &LatencyEvidence::default(),
            expect![[r#"
                ready=false score=0.40
                FAIL comparisons: 0 compared; at least 100 needed
                pass mismatches: 0 mismatched; at most 0 allowed
                FAIL coverage: no traffic seen in the window
                pass shadow errors: 0.00% of shadow requests failed; at most 1.00% allowed
                FAIL latency: no latency measured in the window
            "#]],
        );
        check(
            &[
                ev("GET /homes/{id}", 90, 90, 0, 0),
                ev("GET /search", 20, 20, 0, 0),
            ],
            &latencies(40, 45),
            expect![[r#"
                ready=true score=1.00
                pass comparisons: 110 compared; at least 100 needed
                pass mismatches: 0 mismatched; at most 0 allowed
                pass coverage: 2 of 2 endpoints compared at least 5 times
                pass shadow errors: 0.00% of shadow requests failed; at most 1.00% allowed
                pass latency: new p50 47.6 ms p99 47.6 ms vs legacy p50 43.2 ms p99 43.2 ms; new p99 at most 64.9 ms allowed
            "#]],
        );
        check(
            &[
                ev("GET /homes/{id}", 200, 200, 1, 0),
                ev("GET /export", 3, 0, 0, 0),
                ev("GET /rare", 2, 2, 0, 3),
            ],
            &latencies(40, 200),
            expect![[r#"
                ready=false score=0.27
                pass comparisons: 202 compared; at least 100 needed
                FAIL mismatches: 1 mismatched in 1 open class; at most 0 allowed
                FAIL coverage: 1 of 3 endpoints compared at least 5 times
                FAIL shadow errors: 1.46% of shadow requests failed; at most 1.00% allowed
                FAIL latency: new p50 218.6 ms p99 218.6 ms vs legacy p50 43.2 ms p99 43.2 ms; new p99 at most 64.9 ms allowed
                uncovered: GET /export, GET /rare
            "#]],
        );
    }

    /// Reads raced by the tenant's own writes are shown, and count neither
    /// as comparisons nor as coverage.
    #[test]
    fn raced_reads_are_shown_and_not_counted() {
        let (mut homes, n) = ev("GET /homes/{id}", 130, 96, 0, 0);
        homes.raced = 30;
        let (mut searches, m) = ev("GET /searches", 10, 4, 0, 0);
        searches.raced = 6;
        check(
            &[(homes, n), (searches, m)],
            &latencies(40, 45),
            expect![[r#"
                ready=false score=0.90
                pass comparisons: 100 compared (and 36 raced by the tenant's own writes, not judged); at least 100 needed
                pass mismatches: 0 mismatched; at most 0 allowed
                FAIL coverage: 1 of 2 endpoints compared at least 5 times
                pass shadow errors: 0.00% of shadow requests failed; at most 1.00% allowed
                pass latency: new p50 47.6 ms p99 47.6 ms vs legacy p50 43.2 ms p99 43.2 ms; new p99 at most 64.9 ms allowed
                uncovered: GET /searches
            "#]],
        );
    }
}
