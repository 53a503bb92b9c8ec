//! The stage machine of DESIGN.md §3: where a tenant is in its move, and which moves
//! are allowed.
//!
//! ```text
//! legacy ──promote──▶ shadow ──promote (gate)──▶ migrated
//!   ▲                   │  ▲                         │
//!   └────rollback───────┘  └───rollback (or guard)───┘
//! ```
//!
//! A migrated tenant may also be rolled back straight to legacy: an operator who has
//! lost confidence in the new backend for a tenant must not be forced through a stage
//! that still sends its reads to the new backend. Skipping `shadow` on the way forward
//! is never allowed, because `shadow` is where the evidence for the move is gathered.

use std::fmt;

use crate::ValidationError;

/// Where one tenant is in its move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// Legacy serves the tenant; nothing is compared.
    Legacy,
    /// Legacy answers the client; safe reads are also sent to new and compared.
    Shadow,
    /// New answers the client; safe reads may be compared against legacy.
    Migrated,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::Legacy, Stage::Shadow, Stage::Migrated];

    pub fn parse(raw: &str) -> Result<Stage, ValidationError> {
        match raw {
            "legacy" => Ok(Stage::Legacy),
            "shadow" => Ok(Stage::Shadow),
            "migrated" => Ok(Stage::Migrated),
            _ => Err(ValidationError::Stage {
                value: raw.to_string(),
            }),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Legacy => "legacy",
            Stage::Shadow => "shadow",
            Stage::Migrated => "migrated",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The kind of an allowed stage move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// One step forward: `legacy → shadow` or `shadow → migrated`.
    Promote,
    /// Backward: `shadow → legacy`, `migrated → shadow` or `migrated → legacy`.
    Rollback,
}

impl Transition {
    /// Classifies the move `from → to`, or says why the stage machine forbids it.
    pub fn between(from: Stage, to: Stage) -> Result<Transition, TransitionError> {
        use Stage::*;
        match (from, to) {
            (Legacy, Shadow) | (Shadow, Migrated) => Ok(Transition::Promote),
            (Shadow, Legacy) | (Migrated, Shadow) | (Migrated, Legacy) => Ok(Transition::Rollback),
            (Legacy, Migrated) => Err(TransitionError::SkipsShadow),
            (a, b) => {
                debug_assert_eq!(a, b);
                Err(TransitionError::AlreadyThere(a))
            }
        }
    }

    /// Whether this move, taken from `from`, would cross the readiness gate.
    pub fn is_gated(self, from: Stage) -> bool {
        self == Transition::Promote && from == Stage::Shadow
    }
}

/// Why a stage move is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("the tenant is already in stage {0}")]
    AlreadyThere(Stage),
    #[error(
        "legacy → migrated skips shadow, where the evidence for a move is gathered; promote to shadow first"
    )]
    SkipsShadow,
}

#[cfg(test)]
mod tests {
    use expect_test::expect;

    use super::*;

    #[test]
    fn every_pair_of_stages() {
        let mut table = String::new();
        for from in Stage::ALL {
            for to in Stage::ALL {
                let verdict = match Transition::between(from, to) {
                    Ok(t) => format!("{t:?}{}", if t.is_gated(from) { " (gated)" } else { "" }),
                    Err(e) => format!("refused: {e}"),
                };
                table.push_str(&format!("{from:>8} → {to:<8} {verdict}\n"));
            }
        }
        expect![[r#"
              legacy → legacy   refused: the tenant is already in stage legacy
              legacy → shadow   Promote
              legacy → migrated refused: legacy → migrated skips shadow, where the evidence for a move is gathered; promote to shadow first
              shadow → legacy   Rollback
              shadow → shadow   refused: the tenant is already in stage shadow
              shadow → migrated Promote (gated)
            migrated → legacy   Rollback
            migrated → shadow   Rollback
            migrated → migrated refused: the tenant is already in stage migrated
        "#]]
        .assert_eq(&table);
    }

    #[test]
    fn stage_names_round_trip() {
        for s in Stage::ALL {
            assert_eq!(Stage::parse(s.as_str()), Ok(s));
        }
        assert_eq!(
            Stage::parse("Migrated").unwrap_err().to_string(),
            "unknown stage \"Migrated\": expected one of legacy, shadow, migrated"
        );
    }
}
