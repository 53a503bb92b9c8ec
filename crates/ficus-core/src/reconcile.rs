//! Reconciliation: the parallel run's mismatches grouped into classes, each with a
//! lifecycle that matches how a team works through them.
//!
//! A class is *open* while its evidence counts against readiness. *Resolved* says
//! "fixed as of now": evidence recorded before that moment stops counting, and the
//! class's next mismatch reopens it as a regression. *Accepted* says "intended":
//! the class becomes a comparison rule and never counts again.
//!
//! Which resolution a piece of evidence belongs to is its *epoch*: a class starts
//! at epoch 0 and every resolution moves it one further; evidence is recorded under
//! the epoch current when it was observed, and only evidence of the current epoch
//! counts. Nothing here reads a clock or a store.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::{Actor, Timestamp};

/// Where a class stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClassState {
    Open,
    Resolved,
    Accepted,
}

impl ClassState {
    pub fn as_str(self) -> &'static str {
        match self {
            ClassState::Open => "open",
            ClassState::Resolved => "resolved",
            ClassState::Accepted => "accepted",
        }
    }

    pub fn parse(raw: &str) -> Option<ClassState> {
        match raw {
            "open" => Some(ClassState::Open),
            "resolved" => Some(ClassState::Resolved),
            "accepted" => Some(ClassState::Accepted),
            _ => None,
        }
    }
}

impl fmt::Display for ClassState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Why a lifecycle change is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassError {
    #[error("class {id} is {state} already; nothing was changed")]
    Already { id: String, state: ClassState },
    #[error("class {id} is open; only a resolved or accepted class can be reopened")]
    NotClosed { id: String },
    #[error(
        "class {id} is accepted; reopen it first, then resolve it, if the difference is now a bug that was fixed"
    )]
    AcceptedNotResolvable { id: String },
}

/// Checks a change of a class from `from` to `to`.
pub fn check_change(id: &str, from: ClassState, to: ClassState) -> Result<(), ClassError> {
    match (from, to) {
        (a, b) if a == b && b != ClassState::Open => Err(ClassError::Already {
            id: id.to_string(),
            state: a,
        }),
        (ClassState::Open, ClassState::Open) => Err(ClassError::NotClosed { id: id.to_string() }),
        (ClassState::Accepted, ClassState::Resolved) => {
            Err(ClassError::AcceptedNotResolvable { id: id.to_string() })
        }
        _ => Ok(()),
    }
}

/// The last change made to a class, by hand or by evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassEvent {
    pub at: Timestamp,
    /// `resolved`, `accepted`, `reopened`, or `regression` (reopened by a
    /// mismatch recorded after a resolution).
    pub action: String,
    pub actor: Actor,
    pub reason: String,
    /// For `resolved`, the version that fixed it; for `regression`, the version
    /// the mismatch was seen on.
    pub version: Option<String>,
}

/// One mismatch seen of a class, redacted: the request, the version of new that
/// answered, and the difference as the diff engine wrote it (JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassExample {
    pub at: Timestamp,
    /// `GET /homes/42`.
    pub request: String,
    pub version: Option<String>,
    pub difference: String,
}

/// A class as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MismatchClass {
    /// 16 hex digits, a hash of endpoint, path and kind.
    pub id: String,
    pub endpoint: String,
    /// Generalized: `$.items[*].price`.
    pub path: String,
    /// The diff engine's kind: `value`, `missing`, `extra`, `type`, `status`,
    /// `header`.
    pub kind: String,
    /// Something only new's answer has, which a legacy client never reads.
    pub additive: bool,
    pub state: ClassState,
    pub epoch: u64,
    pub first_seen: Timestamp,
    pub last_seen: Timestamp,
    /// When the class was last resolved; evidence observed up to then belongs to
    /// the epoch before.
    pub resolved_at: Option<Timestamp>,
    /// The version a resolution named as the fix.
    pub fixed_in: Option<String>,
    /// Reopened by a mismatch recorded after it was resolved.
    pub regression: bool,
    pub last_change: Option<ClassEvent>,
    pub example: Option<ClassExample>,
}

/// Where evidence of a class observed at `observed` (the latest observation of
/// the batch) belongs, and whether it reopens the class as a regression.
pub fn place(class: &MismatchClass, observed: Timestamp) -> (u64, bool) {
    match class.resolved_at {
        // Observed up to the latest resolution: the epoch before it, whatever
        // the class is now (a regression reopens it and keeps the time, so a
        // slower proxy's late report still lands before the resolution).
        Some(at) if observed <= at && class.epoch > 0 => (class.epoch - 1, false),
        _ => (class.epoch, class.state == ClassState::Resolved),
    }
}

/// A class's evidence for one tenant, one epoch and one version of new, summed
/// over the window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassEvidence {
    pub class: String,
    pub epoch: u64,
    /// `""` when new's version is not known.
    pub version: String,
    pub count: u64,
    pub first_at: Timestamp,
    pub last_at: Timestamp,
}

/// What one class amounts to for one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassTally {
    pub class: MismatchClass,
    /// Mismatches that count: the current epoch's, unless the class is accepted.
    pub counted: u64,
    /// Mismatches of the class recorded before its latest resolution, or while
    /// it is accepted.
    pub discounted: u64,
    /// First and last counted mismatch.
    pub first_at: Option<Timestamp>,
    pub last_at: Option<Timestamp>,
    /// Counted mismatches per version of new (`""`: unknown).
    pub by_version: BTreeMap<String, u64>,
}

impl ClassTally {
    /// Counts against readiness.
    pub fn blocks(&self) -> bool {
        self.counted > 0 && !self.class.additive && self.class.state != ClassState::Accepted
    }
}

/// Sums a tenant's evidence per class; with `version`, only evidence recorded on
/// that version of new. Classes without evidence for the tenant are left out.
pub fn tally(
    classes: &[MismatchClass],
    evidence: &[ClassEvidence],
    version: Option<&str>,
) -> Vec<ClassTally> {
    tally_in(&index(classes), evidence, version)
}

/// Classes by id, built once to tally many tenants' evidence against.
pub type ClassIndex<'a> = HashMap<&'a str, &'a MismatchClass>;

pub fn index(classes: &[MismatchClass]) -> ClassIndex<'_> {
    classes.iter().map(|c| (c.id.as_str(), c)).collect()
}

/// [`tally`] against an index of the classes.
pub fn tally_in(
    by_id: &ClassIndex<'_>,
    evidence: &[ClassEvidence],
    version: Option<&str>,
) -> Vec<ClassTally> {
    let mut out: BTreeMap<&str, ClassTally> = BTreeMap::new();
    for e in evidence {
        if version.is_some_and(|v| v != e.version) {
            continue;
        }
        let Some(class) = by_id.get(e.class.as_str()) else {
            continue;
        };
        let t = out.entry(class.id.as_str()).or_insert_with(|| ClassTally {
            class: (*class).clone(),
            counted: 0,
            discounted: 0,
            first_at: None,
            last_at: None,
            by_version: BTreeMap::new(),
        });
        if e.epoch == class.epoch && class.state != ClassState::Accepted {
            t.counted += e.count;
            t.first_at = Some(t.first_at.map_or(e.first_at, |f| f.min(e.first_at)));
            t.last_at = Some(t.last_at.map_or(e.last_at, |l| l.max(e.last_at)));
            *t.by_version.entry(e.version.clone()).or_default() += e.count;
        } else {
            t.discounted += e.count;
        }
    }
    let mut tallies: Vec<ClassTally> = out.into_values().collect();
    tallies.sort_by(|a, b| {
        b.counted
            .cmp(&a.counted)
            .then_with(|| a.class.endpoint.cmp(&b.class.endpoint))
            .then_with(|| a.class.path.cmp(&b.class.path))
    });
    tallies
}

/// The longest version label kept; longer ones are recorded as invalid.
pub const VERSION_MAX: usize = 128;

/// A backend's version as recorded: the value when it is short and printable,
/// `invalid` otherwise (never the raw bytes), `None` when there was none.
pub fn version_label(raw: Option<&[u8]>) -> Option<String> {
    let raw = raw?;
    let printable = !raw.is_empty()
        && raw.len() <= VERSION_MAX
        && raw.iter().all(|b| (0x21..0x7f).contains(b) || *b == b' ');
    Some(if printable {
        String::from_utf8_lossy(raw).trim().to_string()
    } else {
        "invalid".to_string()
    })
}

/// A version an operator gives (a backend's configured one, the version that
/// fixed a class): kept only when it is short and printable.
pub fn given_version(raw: &str) -> Option<String> {
    version_label(Some(raw.as_bytes())).filter(|v| v != "invalid")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(id: &str, state: ClassState, epoch: u64, additive: bool) -> MismatchClass {
        MismatchClass {
            id: id.into(),
            endpoint: "GET /homes/{id}".into(),
            path: format!("$.{id}"),
            kind: if additive { "extra" } else { "value" }.into(),
            additive,
            state,
            epoch,
            first_seen: Timestamp::from_unix_millis(0),
            last_seen: Timestamp::from_unix_millis(0),
            resolved_at: (state == ClassState::Resolved).then(|| Timestamp::from_unix_millis(100)),
            fixed_in: None,
            regression: false,
            last_change: None,
            example: None,
        }
    }

    fn ev(class: &str, epoch: u64, version: &str, count: u64, at: i64) -> ClassEvidence {
        ClassEvidence {
            class: class.into(),
            epoch,
            version: version.into(),
            count,
            first_at: Timestamp::from_unix_millis(at),
            last_at: Timestamp::from_unix_millis(at),
        }
    }

    #[test]
    fn only_the_current_epoch_of_a_class_not_accepted_counts() {
        let classes = [
            class("price", ClassState::Resolved, 1, false),
            class("name", ClassState::Open, 1, false),
            class("photo", ClassState::Accepted, 0, false),
            class("energy", ClassState::Open, 0, true),
        ];
        let evidence = [
            ev("price", 0, "1.0", 46, 50),
            ev("name", 0, "1.0", 3, 50),
            ev("name", 1, "1.1", 2, 150),
            ev("photo", 0, "1.1", 9, 150),
            ev("energy", 0, "1.1", 7, 150),
            ev("gone", 0, "1.1", 1, 150),
        ];
        let t = tally(&classes, &evidence, None);
        let summary: Vec<String> = t
            .iter()
            .map(|t| {
                format!(
                    "{} counted={} discounted={} blocks={}",
                    t.class.id,
                    t.counted,
                    t.discounted,
                    t.blocks()
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                "energy counted=7 discounted=0 blocks=false",
                "name counted=2 discounted=3 blocks=true",
                "photo counted=0 discounted=9 blocks=false",
                "price counted=0 discounted=46 blocks=false",
            ]
        );
        let only_old = tally(&classes, &evidence, Some("1.0"));
        assert_eq!(only_old.iter().filter(|t| t.blocks()).count(), 0);
    }

    #[test]
    fn evidence_observed_before_a_resolution_belongs_to_the_epoch_before() {
        let resolved = class("price", ClassState::Resolved, 1, false);
        assert_eq!(
            place(&resolved, Timestamp::from_unix_millis(100)),
            (0, false)
        );
        assert_eq!(
            place(&resolved, Timestamp::from_unix_millis(101)),
            (1, true)
        );
        let open = class("price", ClassState::Open, 1, false);
        assert_eq!(place(&open, Timestamp::from_unix_millis(500)), (1, false));
        // Reopened by a regression: a late report from before the resolution
        // still belongs to the epoch before it.
        let reopened = MismatchClass {
            resolved_at: Some(Timestamp::from_unix_millis(100)),
            regression: true,
            ..open
        };
        assert_eq!(
            place(&reopened, Timestamp::from_unix_millis(50)),
            (0, false)
        );
        assert_eq!(
            place(&reopened, Timestamp::from_unix_millis(150)),
            (1, false)
        );
    }

    #[test]
    fn lifecycle_changes_that_make_no_sense_are_refused() {
        use ClassState::*;
        assert!(check_change("c", Open, Resolved).is_ok());
        assert!(check_change("c", Open, Accepted).is_ok());
        assert!(check_change("c", Resolved, Accepted).is_ok());
        assert!(check_change("c", Resolved, Open).is_ok());
        assert!(check_change("c", Accepted, Open).is_ok());
        assert_eq!(
            check_change("c", Resolved, Resolved)
                .unwrap_err()
                .to_string(),
            "class c is resolved already; nothing was changed"
        );
        assert!(check_change("c", Open, Open).is_err());
        assert!(check_change("c", Accepted, Resolved).is_err());
    }

    #[test]
    fn a_version_is_kept_only_short_and_printable() {
        assert_eq!(version_label(None), None);
        assert_eq!(version_label(Some(b"2.4.1")).as_deref(), Some("2.4.1"));
        assert_eq!(
            version_label(Some(&[b'a'; 129])).as_deref(),
            Some("invalid")
        );
        assert_eq!(version_label(Some(b"1.0\x07")).as_deref(), Some("invalid"));
        assert_eq!(version_label(Some(b"")).as_deref(), Some("invalid"));
        assert_eq!(given_version("2.4.1").as_deref(), Some("2.4.1"));
        assert_eq!(given_version("1.0\u{7}"), None);
    }
}
