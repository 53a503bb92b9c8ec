//! Noise: response parts that differ between two answers of the *same* backend
//! to the same request, such as timestamps and request ids.
//!
//! For a sample of shadowed requests the proxy asks legacy twice; the paths where
//! those two answers differ are learned as noise for the request's endpoint. Each
//! double-ask on an endpoint decays every score on it, so a path that stops
//! differing stops being noise after a few dozen clean double-asks. A difference
//! between legacy and new on a noise path is reported as noise, separately, never
//! as a mismatch.

use std::collections::HashMap;

use crate::path::generalize;
use crate::{Difference, Outcome};

/// Scores at or above this mark a path as noise. One observed difference scores
/// 1.0: a single proof that a backend disagrees with itself is enough.
const THRESHOLD: f64 = 0.5;
/// Applied to every score of an endpoint per double-ask there: a path that
/// differed once stays noise for about 34 clean double-asks.
const DECAY: f64 = 0.98;

/// What was learned per endpoint.
#[derive(Debug, Clone, Default)]
pub struct NoiseModel {
    endpoints: HashMap<String, Endpoint>,
}

#[derive(Debug, Clone, Default)]
struct Endpoint {
    double_asks: u64,
    scores: HashMap<String, f64>,
}

/// One learned noise path, for operators to see and confirm.
#[derive(Debug, Clone, PartialEq)]
pub struct NoisePath {
    pub endpoint: String,
    pub path: String,
    pub score: f64,
    /// Double-asks seen on the endpoint so far.
    pub double_asks: u64,
}

/// A comparison split into what is real and what is noise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    pub mismatches: Vec<Difference>,
    pub noise: Vec<Difference>,
}

impl NoiseModel {
    /// Learns from a comparison of two answers of the same backend.
    pub fn learn(&mut self, endpoint: &str, same_backend: &Outcome) {
        let e = self.endpoints.entry(endpoint.to_string()).or_default();
        e.double_asks += 1;
        for score in e.scores.values_mut() {
            *score *= DECAY;
        }
        for d in &same_backend.differences {
            *e.scores.entry(generalize(&d.path)).or_insert(0.0) += 1.0;
        }
        e.scores.retain(|_, s| *s >= 0.01);
    }

    /// How many double-asks the endpoint has seen.
    pub fn double_asks(&self, endpoint: &str) -> u64 {
        self.endpoints.get(endpoint).map_or(0, |e| e.double_asks)
    }

    pub fn is_noise(&self, endpoint: &str, path: &str) -> bool {
        self.endpoints
            .get(endpoint)
            .and_then(|e| e.scores.get(&generalize(path)))
            .is_some_and(|s| *s >= THRESHOLD)
    }

    /// Separates a legacy-vs-new comparison into mismatches and noise.
    pub fn split(&self, endpoint: &str, outcome: &Outcome) -> Split {
        let (noise, mismatches) = outcome
            .differences
            .iter()
            .cloned()
            .partition(|d| self.is_noise(endpoint, &d.path));
        Split { mismatches, noise }
    }

    /// Every path currently counted as noise, by endpoint then path.
    pub fn report(&self) -> Vec<NoisePath> {
        let mut out: Vec<NoisePath> = self
            .endpoints
            .iter()
            .flat_map(|(endpoint, e)| {
                e.scores
                    .iter()
                    .filter(|(_, s)| **s >= THRESHOLD)
                    .map(move |(path, score)| NoisePath {
                        endpoint: endpoint.clone(),
                        path: path.clone(),
                        score: *score,
                        double_asks: e.double_asks,
                    })
            })
            .collect();
        out.sort_by(|a, b| (&a.endpoint, &a.path).cmp(&(&b.endpoint, &b.path)));
        out
    }
}
