//! Readiness: whether the evidence from a tenant's parallel run allows moving it to
//! `migrated`. Each criterion is judged separately and says why it passes or fails,
//! so an operator sees exactly what is missing.

/// One endpoint's evidence over the readiness window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointEvidence {
    pub endpoint: String,
    /// Eligible reads the tenant made on this endpoint.
    pub requests: u64,
    pub compared: u64,
    pub mismatched: u64,
    pub errors: u64,
}

/// The thresholds of the gate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Comparisons needed over the window, all endpoints together.
    pub min_comparisons: u64,
    /// Mismatches allowed over the window (noise never counts).
    pub max_mismatches: u64,
    /// Every endpoint the tenant used must have been compared this many times.
    pub min_per_endpoint: u64,
    /// Share of shadow requests that may fail or time out.
    pub max_error_rate: f64,
}

impl Default for Thresholds {
    /// Safe defaults: plenty of evidence, nothing unexplained, nothing uncovered.
    fn default() -> Thresholds {
        Thresholds {
            min_comparisons: 500,
            max_mismatches: 0,
            min_per_endpoint: 5,
            max_error_rate: 0.01,
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
pub fn judge(evidence: &[EndpointEvidence], t: &Thresholds) -> Readiness {
    let compared: u64 = evidence.iter().map(|e| e.compared).sum();
    let mismatched: u64 = evidence.iter().map(|e| e.mismatched).sum();
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
    let criteria = vec![
        Criterion {
            name: "comparisons",
            passed: compared >= t.min_comparisons,
            detail: format!("{compared} compared; at least {} needed", t.min_comparisons),
        },
        Criterion {
            name: "mismatches",
            passed: mismatched <= t.max_mismatches,
            detail: format!(
                "{mismatched} mismatched; at most {} allowed",
                t.max_mismatches
            ),
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
        })
        / 4.0;
    Readiness {
        criteria,
        uncovered,
        score,
    }
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;

    fn ev(
        endpoint: &str,
        requests: u64,
        compared: u64,
        mismatched: u64,
        errors: u64,
    ) -> EndpointEvidence {
        EndpointEvidence {
            endpoint: endpoint.into(),
            requests,
            compared,
            mismatched,
            errors,
        }
    }

    fn check(evidence: &[EndpointEvidence], expect: Expect) {
        let r = judge(
            evidence,
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
            expect![[r#"
            ready=false score=0.50
            FAIL comparisons: 0 compared; at least 100 needed
            pass mismatches: 0 mismatched; at most 0 allowed
            FAIL coverage: no traffic seen in the window
            pass shadow errors: 0.00% of shadow requests failed; at most 1.00% allowed
        "#]],
        );
        check(
            &[
                ev("GET /homes/{id}", 90, 90, 0, 0),
                ev("GET /search", 20, 20, 0, 0),
            ],
            expect![[r#"
            ready=true score=1.00
            pass comparisons: 110 compared; at least 100 needed
            pass mismatches: 0 mismatched; at most 0 allowed
            pass coverage: 2 of 2 endpoints compared at least 5 times
            pass shadow errors: 0.00% of shadow requests failed; at most 1.00% allowed
        "#]],
        );
        check(
            &[
                ev("GET /homes/{id}", 200, 200, 1, 0),
                ev("GET /export", 3, 0, 0, 0),
                ev("GET /rare", 2, 2, 0, 3),
            ],
            expect![[r#"
            ready=false score=0.33
            pass comparisons: 202 compared; at least 100 needed
            FAIL mismatches: 1 mismatched; at most 0 allowed
            FAIL coverage: 1 of 3 endpoints compared at least 5 times
            FAIL shadow errors: 1.46% of shadow requests failed; at most 1.00% allowed
            uncovered: GET /export, GET /rare
        "#]],
        );
    }
}
