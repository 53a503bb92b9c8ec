//! The readiness gate's settings: thresholds, the evidence window and the finish
//! line's quiet window. They live in the control store (setting `gate`), so every
//! operator, the CLI and the API judge with the same numbers, and every change is
//! in the audit log. A store that never set them uses the safe defaults.

use std::time::Duration;

use ficus_core::readiness::Thresholds;
use ficus_store::ControlStore;

use crate::api::GateJson;
use crate::ops::GateOverrides;
use crate::{Error, Result};

/// The setting the gate is stored under.
pub const KEY: &str = "gate";

/// The gate as the operations use it.
#[derive(Debug, Clone, PartialEq)]
pub struct Gate {
    pub window: Duration,
    pub thresholds: Thresholds,
    pub quiet_window: Duration,
}

impl Default for Gate {
    fn default() -> Gate {
        Gate {
            window: Duration::from_secs(24 * 60 * 60),
            thresholds: Thresholds::default(),
            quiet_window: Duration::from_secs(24 * 60 * 60),
        }
    }
}

pub(crate) fn span(raw: &str, what: &str) -> Result<Duration> {
    let d = humantime::parse_duration(raw).map_err(|_| {
        Error::Invalid(format!(
            "{what} {raw:?} is not a duration such as 24h, 90m or 7d"
        ))
    })?;
    if d.is_zero() {
        return Err(Error::Invalid(format!("{what} must be longer than zero")));
    }
    Ok(d)
}

fn share(value: f64, what: &str) -> Result<f64> {
    if !(0.0..=1.0).contains(&value) {
        return Err(Error::Invalid(format!(
            "{what} must be between 0.0 and 1.0, got {value}"
        )));
    }
    Ok(value)
}

impl Gate {
    /// Checks every field; a bad value is refused with its name.
    pub fn from_json(j: &GateJson) -> Result<Gate> {
        if !(j.max_latency_ratio.is_finite() && j.max_latency_ratio >= 1.0) {
            return Err(Error::Invalid(format!(
                "max_latency_ratio must be at least 1.0, got {}",
                j.max_latency_ratio
            )));
        }
        Ok(Gate {
            window: span(&j.window, "window")?,
            thresholds: Thresholds {
                min_comparisons: j.min_comparisons,
                max_mismatches: j.max_mismatches,
                min_per_endpoint: j.min_per_endpoint,
                max_error_rate: share(j.max_error_rate, "max_error_rate")?,
                max_latency_ratio: j.max_latency_ratio,
                latency_slack_ms: j.latency_slack_ms,
            },
            quiet_window: span(&j.quiet_window, "quiet_window")?,
        })
    }

    pub fn to_json(&self) -> GateJson {
        let t = &self.thresholds;
        GateJson {
            window: humantime::format_duration(self.window).to_string(),
            min_comparisons: t.min_comparisons,
            max_mismatches: t.max_mismatches,
            min_per_endpoint: t.min_per_endpoint,
            max_error_rate: t.max_error_rate,
            max_latency_ratio: t.max_latency_ratio,
            latency_slack_ms: t.latency_slack_ms,
            quiet_window: humantime::format_duration(self.quiet_window).to_string(),
        }
    }

    /// This gate with a caller's per-call changes, each checked like a stored one.
    pub fn with(mut self, o: &GateOverrides) -> Result<Gate> {
        if let Some(w) = &o.window {
            self.window = span(w, "window")?;
        }
        let t = &mut self.thresholds;
        if let Some(v) = o.min_comparisons {
            t.min_comparisons = v;
        }
        if let Some(v) = o.max_mismatches {
            t.max_mismatches = v;
        }
        if let Some(v) = o.min_per_endpoint {
            t.min_per_endpoint = v;
        }
        if let Some(v) = o.max_error_rate {
            t.max_error_rate = share(v, "max_error_rate")?;
        }
        Ok(self)
    }
}

/// The stored gate, or the defaults.
pub async fn load(store: &dyn ControlStore) -> Result<Gate> {
    match store.setting(KEY).await? {
        None => Ok(Gate::default()),
        Some(text) => {
            let json: GateJson = serde_json::from_str(&text).map_err(|e| {
                Error::Store(ficus_store::StoreError::Corrupt(format!(
                    "the stored readiness gate is not readable: {e}"
                )))
            })?;
            Gate::from_json(&json)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_bad_values_are_named() {
        let json = Gate::default().to_json();
        assert_eq!(Gate::from_json(&json).unwrap(), Gate::default());
        let bad = |f: fn(&mut GateJson)| {
            let mut j = Gate::default().to_json();
            f(&mut j);
            Gate::from_json(&j).unwrap_err().to_string()
        };
        assert_eq!(
            bad(|j| j.window = "soon".into()),
            "window \"soon\" is not a duration such as 24h, 90m or 7d"
        );
        assert_eq!(
            bad(|j| j.max_error_rate = 2.0),
            "max_error_rate must be between 0.0 and 1.0, got 2"
        );
        assert_eq!(
            bad(|j| j.max_latency_ratio = 0.5),
            "max_latency_ratio must be at least 1.0, got 0.5"
        );
        assert_eq!(
            bad(|j| j.quiet_window = "0s".into()),
            "quiet_window must be longer than zero"
        );
    }
}
