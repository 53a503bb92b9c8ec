//! How far the whole migration has come, and what still stands before the finish line.
//!
//! The finish line (DESIGN.md §2) is every tenant migrated *and* legacy idle for a
//! quiet window. The second half needs traffic evidence that only a proxy can
//! report; until a proxy has reported, Ficus says so rather than guess that legacy
//! is idle.

use std::fmt;

use crate::{Stage, Timestamp};

/// Tenant counts per stage, plus what is known about legacy's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    pub legacy: u64,
    pub shadow: u64,
    pub migrated: u64,
    /// When a request was last routed to legacy, served or shadowed, as reported by
    /// proxies; `None` when no proxy has reported yet.
    pub legacy_last_request: Option<LegacyTraffic>,
}

/// What proxies have reported about requests routed to legacy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegacyTraffic {
    /// No request has ever been routed to legacy since reporting began at this time.
    NoneSince(Timestamp),
    /// The last request routed to legacy was at this time.
    LastAt(Timestamp),
}

/// One thing standing between now and the retirement of legacy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocker {
    NoTenants,
    NotMigrated {
        legacy: u64,
        shadow: u64,
    },
    LegacyTrafficUnreported,
    LegacyRecentlyUsed {
        last_at: Timestamp,
        quiet_until: Timestamp,
    },
    /// A write route still goes to legacy, for every tenant or some.
    HeldRoute {
        route: String,
        /// `None`: held for every tenant.
        tenants: Option<u64>,
    },
}

impl fmt::Display for Blocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Blocker::NoTenants => f.write_str("no tenants are registered yet"),
            Blocker::NotMigrated { legacy, shadow } => write!(
                f,
                "{} not migrated ({legacy} on legacy, {shadow} in shadow)",
                plural(legacy + shadow, "tenant", "tenants")
            ),
            Blocker::LegacyTrafficUnreported => f.write_str(
                "no proxy has reported legacy traffic yet, so legacy cannot be shown to be idle",
            ),
            Blocker::LegacyRecentlyUsed { .. } => {
                f.write_str("legacy received traffic within the quiet window")
            }
            Blocker::HeldRoute { route, tenants } => match tenants {
                None => write!(f, "route {route} is held on legacy"),
                Some(n) => write!(
                    f,
                    "route {route} is held on legacy for {}",
                    plural(*n, "tenant", "tenants")
                ),
            },
        }
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

impl Progress {
    pub fn count(&mut self, stage: Stage, n: u64) {
        match stage {
            Stage::Legacy => self.legacy += n,
            Stage::Shadow => self.shadow += n,
            Stage::Migrated => self.migrated += n,
        }
    }

    pub fn of(&self, stage: Stage) -> u64 {
        match stage {
            Stage::Legacy => self.legacy,
            Stage::Shadow => self.shadow,
            Stage::Migrated => self.migrated,
        }
    }

    pub fn total(&self) -> u64 {
        self.legacy + self.shadow + self.migrated
    }

    /// Percent of tenants migrated, 0 when there are none.
    pub fn percent_migrated(&self) -> f64 {
        match self.total() {
            0 => 0.0,
            total => self.migrated as f64 * 100.0 / total as f64,
        }
    }

    /// What stands between now and the finish line, given the quiet window in
    /// milliseconds; empty when the finish line is reached.
    pub fn blockers(&self, now: Timestamp, quiet_window_ms: i64) -> Vec<Blocker> {
        let mut out = Vec::new();
        if self.total() == 0 {
            out.push(Blocker::NoTenants);
        }
        if self.legacy + self.shadow > 0 {
            out.push(Blocker::NotMigrated {
                legacy: self.legacy,
                shadow: self.shadow,
            });
        }
        match self.legacy_last_request {
            None => out.push(Blocker::LegacyTrafficUnreported),
            Some(traffic) => {
                let last = match traffic {
                    LegacyTraffic::NoneSince(t) | LegacyTraffic::LastAt(t) => t,
                };
                let quiet_until = Timestamp::from_unix_millis(last.unix_millis() + quiet_window_ms);
                if quiet_until > now {
                    out.push(Blocker::LegacyRecentlyUsed {
                        last_at: last,
                        quiet_until,
                    });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;

    fn check(progress: Progress, expect: Expect) {
        let now = Timestamp::from_unix_millis(100_000);
        let blockers: Vec<String> = progress
            .blockers(now, 10_000)
            .iter()
            .map(ToString::to_string)
            .collect();
        let actual = format!(
            "{:.1}% migrated; {}",
            progress.percent_migrated(),
            if blockers.is_empty() {
                "finish line reached".to_string()
            } else {
                blockers.join("; ")
            }
        );
        expect.assert_eq(&actual);
    }

    #[test]
    fn finish_line() {
        check(
            Progress::default(),
            expect![[
                "0.0% migrated; no tenants are registered yet; no proxy has reported legacy traffic yet, so legacy cannot be shown to be idle"
            ]],
        );
        check(
            Progress {
                legacy: 1,
                shadow: 2,
                migrated: 1,
                legacy_last_request: None,
            },
            expect![[
                "25.0% migrated; 3 tenants not migrated (1 on legacy, 2 in shadow); no proxy has reported legacy traffic yet, so legacy cannot be shown to be idle"
            ]],
        );
        let at = |ms| Some(LegacyTraffic::LastAt(Timestamp::from_unix_millis(ms)));
        check(
            Progress {
                legacy: 0,
                shadow: 0,
                migrated: 3,
                legacy_last_request: at(95_000),
            },
            expect![["100.0% migrated; legacy received traffic within the quiet window"]],
        );
        check(
            Progress {
                legacy: 0,
                shadow: 0,
                migrated: 3,
                legacy_last_request: at(90_000),
            },
            expect![["100.0% migrated; finish line reached"]],
        );
    }
}
