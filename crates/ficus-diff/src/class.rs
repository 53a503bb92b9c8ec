//! Mismatch classes: differences grouped by what they are, not by which tenant or
//! which record showed them, so that an operator can say once "this is fixed" or
//! "this is intended" for every tenant.
//!
//! A class is `(endpoint, generalized path, kind)`: `GET /homes/{id}`,
//! `$.items[*].price`, `value`. Its id is a stable 64-bit hash of those three,
//! written as 16 hex digits, so every proxy replica and every store names the same
//! class the same way without asking anyone.

use std::collections::{HashMap, HashSet};

use crate::path::generalize;
use crate::{Compat, Difference, Kind, fnv64};

/// What a class is made of.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClassKey {
    /// `GET /homes/{id}`.
    pub endpoint: String,
    /// The generalized path: `$.items[*].price`, `status`, `header:location`.
    pub path: String,
    pub kind: Kind,
}

impl ClassKey {
    /// The class of one difference seen on `endpoint`.
    pub fn of(endpoint: &str, d: &Difference) -> ClassKey {
        ClassKey {
            endpoint: endpoint.to_string(),
            path: generalize(&d.path),
            kind: d.kind,
        }
    }

    /// The class's id: 16 hex digits, the same on every machine and build.
    pub fn id(&self) -> String {
        let mut bytes = Vec::with_capacity(self.endpoint.len() + self.path.len() + 10);
        bytes.extend_from_slice(self.endpoint.as_bytes());
        bytes.push(b'\n');
        bytes.extend_from_slice(self.path.as_bytes());
        bytes.push(b'\n');
        bytes.extend_from_slice(self.kind.to_string().as_bytes());
        format!("{:016x}", fnv64(&bytes))
    }

    /// Whether a rule made of this class would hide every body difference of its
    /// endpoint: the whole body is one path, `$`.
    pub fn is_whole_endpoint(&self) -> bool {
        self.path == "$"
    }
}

/// The accepted classes: differences the team decided are intended. A difference
/// of an accepted class is treated like one under an `ignore` rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accepted {
    by_endpoint: HashMap<String, HashSet<(String, Kind)>>,
}

impl Accepted {
    pub fn new(keys: impl IntoIterator<Item = ClassKey>) -> Accepted {
        let mut by_endpoint: HashMap<String, HashSet<(String, Kind)>> = HashMap::new();
        for k in keys {
            by_endpoint
                .entry(k.endpoint)
                .or_default()
                .insert((k.path, k.kind));
        }
        Accepted { by_endpoint }
    }

    pub fn is_empty(&self) -> bool {
        self.by_endpoint.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_endpoint.values().map(HashSet::len).sum()
    }

    /// Whether `d`, seen on `endpoint`, belongs to an accepted class.
    pub fn accepts(&self, endpoint: &str, d: &Difference) -> bool {
        self.by_endpoint
            .get(endpoint)
            .is_some_and(|set| set.contains(&(generalize(&d.path), d.kind)))
    }
}

/// A comparison's real differences (noise already taken out), sorted by what they
/// mean for readiness.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Classified {
    /// Count against readiness.
    pub breaking: Vec<Difference>,
    /// Shown, never counted.
    pub additive: Vec<Difference>,
    /// Of an accepted class: neither shown as mismatches nor counted.
    pub accepted: Vec<Difference>,
}

/// Sorts `differences` seen on `endpoint` into breaking, additive and accepted.
pub fn classify(endpoint: &str, differences: Vec<Difference>, accepted: &Accepted) -> Classified {
    let mut out = Classified::default();
    for d in differences {
        if !accepted.is_empty() && accepted.accepts(endpoint, &d) {
            out.accepted.push(d);
        } else if d.compat == Compat::Additive {
            out.additive.push(d);
        } else {
            out.breaking.push(d);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diff(path: &str, kind: Kind, compat: Compat) -> Difference {
        Difference {
            path: path.into(),
            kind,
            compat,
            left: None,
            right: None,
        }
    }

    #[test]
    fn a_class_is_the_same_whatever_the_index_and_its_id_is_stable() {
        let a = ClassKey::of(
            "GET /homes/{id}",
            &diff("$.items[3].price", Kind::Value, Compat::Breaking),
        );
        let b = ClassKey::of(
            "GET /homes/{id}",
            &diff("$.items[12].price", Kind::Value, Compat::Breaking),
        );
        assert_eq!(a, b);
        assert_eq!(a.path, "$.items[*].price");
        // Pinned: every replica, store and release must name a class alike.
        assert_eq!(a.id(), "72829d603846de48");
        let other_kind = ClassKey {
            kind: Kind::Type,
            ..a.clone()
        };
        assert_ne!(a.id(), other_kind.id());
    }

    #[test]
    fn accepted_classes_are_taken_out_then_additive_from_breaking() {
        let accepted = Accepted::new([ClassKey {
            endpoint: "GET /homes/{id}".into(),
            path: "$.photos[*].url".into(),
            kind: Kind::Value,
        }]);
        let out = classify(
            "GET /homes/{id}",
            vec![
                diff("$.photos[0].url", Kind::Value, Compat::Breaking),
                diff("$.energy", Kind::Extra, Compat::Additive),
                diff("$.price", Kind::Value, Compat::Breaking),
            ],
            &accepted,
        );
        assert_eq!(out.accepted.len(), 1);
        assert_eq!(out.additive[0].path, "$.energy");
        assert_eq!(out.breaking[0].path, "$.price");
        // The same path on another endpoint is not accepted.
        let elsewhere = classify(
            "GET /search",
            vec![diff("$.photos[0].url", Kind::Value, Compat::Breaking)],
            &accepted,
        );
        assert_eq!(elsewhere.breaking.len(), 1);
    }
}
