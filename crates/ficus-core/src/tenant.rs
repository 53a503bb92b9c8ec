//! Tenants: who is being moved, and the validated names they go by.

use std::fmt;
use std::sync::Arc;

use crate::{Stage, Timestamp};

/// A tenant's id: a slug matching `[a-z0-9][a-z0-9-]{0,62}`.
///
/// The id travels in URLs, headers, SQL parameters and log lines, so it is kept to a
/// character set that needs no escaping anywhere. Holding a `TenantId` proves the
/// string was checked.
///
/// Shared, not owned: the proxy clones a tenant's id on every request (from its
/// routing table into the request), and a clone is a reference count.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TenantId(Arc<str>);

/// The longest tenant id, in bytes (all of them ASCII).
pub const MAX_TENANT_ID_LEN: usize = 63;

impl TenantId {
    pub fn parse(raw: &str) -> Result<TenantId, ValidationError> {
        let invalid = |why: String| ValidationError::TenantId {
            value: raw.to_string(),
            why,
        };
        let Some(first) = raw.chars().next() else {
            return Err(invalid("it is empty".into()));
        };
        if raw.len() > MAX_TENANT_ID_LEN {
            return Err(invalid(format!(
                "it is {} characters long; the limit is {MAX_TENANT_ID_LEN}",
                raw.chars().count()
            )));
        }
        if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
            return Err(invalid(format!(
                "it starts with {first:?}; the first character must be a lowercase letter or a digit"
            )));
        }
        if let Some((at, c)) = raw
            .char_indices()
            .find(|&(_, c)| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
        {
            let hint = if c.is_ascii_uppercase() {
                " (ids are lowercase)"
            } else {
                ""
            };
            return Err(invalid(format!(
                "character {c:?} at position {} is not allowed{hint}; use a-z, 0-9 and '-'",
                at + 1
            )));
        }
        Ok(TenantId(Arc::from(raw)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A map keyed by `TenantId` can be looked up by a `&str`: the id's `Hash`,
/// `Eq` and `Ord` are its text's.
impl std::borrow::Borrow<str> for TenantId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A custom host name a tenant is reached by, lowercased and checked.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Domain(String);

impl Domain {
    /// Accepts a DNS host name (letters, digits, hyphens, dot-separated labels of at
    /// most 63 bytes, 253 bytes in all), folding it to lowercase. A trailing dot, a
    /// port, a scheme or a path is refused rather than silently stripped, so what the
    /// operator typed is exactly what is stored.
    pub fn parse(raw: &str) -> Result<Domain, ValidationError> {
        let invalid = |why: &str| ValidationError::Domain {
            value: raw.to_string(),
            why: why.to_string(),
        };
        let host = raw.to_ascii_lowercase();
        if host.is_empty() {
            return Err(invalid("it is empty"));
        }
        if host.len() > 253 {
            return Err(invalid("it is longer than 253 characters"));
        }
        if host.contains(':') || host.contains('/') {
            return Err(invalid(
                "give a bare host name, without scheme, port or path",
            ));
        }
        if !host.contains('.') {
            return Err(invalid("a custom domain needs at least two labels"));
        }
        for label in host.split('.') {
            if label.is_empty() {
                return Err(invalid("it has an empty label"));
            }
            if label.len() > 63 {
                return Err(invalid("a label is longer than 63 characters"));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(invalid("a label starts or ends with '-'"));
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(invalid(
                    "only letters, digits, '-' and '.' are allowed (use punycode for other scripts)",
                ));
            }
        }
        Ok(Domain(host))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A checked display name: non-empty after trimming, at most 200 characters, no
/// control characters (they would corrupt aligned tables and log lines).
pub fn parse_name(raw: &str) -> Result<String, ValidationError> {
    let name = raw.trim();
    let why = if name.is_empty() {
        Some("it is empty")
    } else if name.chars().count() > 200 {
        Some("it is longer than 200 characters")
    } else if name.chars().any(char::is_control) {
        Some("it contains a control character")
    } else {
        None
    };
    match why {
        Some(why) => Err(ValidationError::Name {
            value: raw.to_string(),
            why: why.to_string(),
        }),
        None => Ok(name.to_string()),
    }
}

/// A tenant as the control plane knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub stage: Stage,
    /// Bumped by every change; a write names the version it was based on so that a
    /// stale write is refused instead of silently overwriting a newer one.
    pub version: u64,
    pub domains: Vec<Domain>,
    /// A suspended tenant (its subscription ended) keeps every row and its
    /// stage, but the proxy answers its requests itself and forwards none.
    pub suspended: bool,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// A value that does not satisfy the domain's rules. Each variant names the value
/// and says what is wrong with it, so the message can be shown to an operator as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("invalid tenant id {value:?}: {why}")]
    TenantId { value: String, why: String },
    #[error("invalid domain {value:?}: {why}")]
    Domain { value: String, why: String },
    #[error("invalid name {value:?}: {why}")]
    Name { value: String, why: String },
    #[error("unknown stage {value:?}: expected one of legacy, shadow, migrated")]
    Stage { value: String },
    #[error(
        "unknown actor {value:?}: expected one of cli, api, guard, provisioning, proxy or token:NAME"
    )]
    Actor { value: String },
    #[error("invalid token name {value:?}: use 1 to 32 lowercase letters, digits and underscores")]
    TokenName { value: String },
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;

    fn check_id(input: &str, expect: Expect) {
        let actual = match TenantId::parse(input) {
            Ok(id) => format!("ok {id}"),
            Err(e) => e.to_string(),
        };
        expect.assert_eq(&actual);
    }

    #[test]
    fn tenant_ids() {
        check_id("acme", expect![["ok acme"]]);
        check_id("0-acme-2", expect![["ok 0-acme-2"]]);
        check_id(
            &"a".repeat(63),
            expect![["ok aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"]],
        );
        check_id("", expect![[r#"invalid tenant id "": it is empty"#]]);
        check_id(
            &"a".repeat(64),
            expect![[
                r#"invalid tenant id "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa": it is 64 characters long; the limit is 63"#
            ]],
        );
        check_id(
            "Acme",
            expect![[
                r#"invalid tenant id "Acme": it starts with 'A'; the first character must be a lowercase letter or a digit"#
            ]],
        );
        check_id(
            "acMe",
            expect![[
                r#"invalid tenant id "acMe": character 'M' at position 3 is not allowed (ids are lowercase); use a-z, 0-9 and '-'"#
            ]],
        );
        check_id(
            "my shop",
            expect![[
                r#"invalid tenant id "my shop": character ' ' at position 3 is not allowed; use a-z, 0-9 and '-'"#
            ]],
        );
        check_id(
            "../x",
            expect![[
                r#"invalid tenant id "../x": it starts with '.'; the first character must be a lowercase letter or a digit"#
            ]],
        );
        check_id(
            "a'; drop table t;--",
            expect![[
                r#"invalid tenant id "a'; drop table t;--": character '\'' at position 2 is not allowed; use a-z, 0-9 and '-'"#
            ]],
        );
        check_id(
            "-acme",
            expect![[
                r#"invalid tenant id "-acme": it starts with '-'; the first character must be a lowercase letter or a digit"#
            ]],
        );
        check_id(
            "ácme",
            expect![[
                r#"invalid tenant id "ácme": it starts with 'á'; the first character must be a lowercase letter or a digit"#
            ]],
        );
    }

    fn check_domain(input: &str, expect: Expect) {
        let actual = match Domain::parse(input) {
            Ok(d) => format!("ok {d}"),
            Err(e) => e.to_string(),
        };
        expect.assert_eq(&actual);
    }

    #[test]
    fn domains() {
        check_domain("Homes.Acme.test", expect![["ok homes.acme.test"]]);
        check_domain(
            "localhost",
            expect![[r#"invalid domain "localhost": a custom domain needs at least two labels"#]],
        );
        check_domain(
            "acme.test:8080",
            expect![[
                r#"invalid domain "acme.test:8080": give a bare host name, without scheme, port or path"#
            ]],
        );
        check_domain(
            "a..test",
            expect![[r#"invalid domain "a..test": it has an empty label"#]],
        );
        check_domain(
            "-a.test",
            expect![[r#"invalid domain "-a.test": a label starts or ends with '-'"#]],
        );
        check_domain(
            "a_b.test",
            expect![[
                r#"invalid domain "a_b.test": only letters, digits, '-' and '.' are allowed (use punycode for other scripts)"#
            ]],
        );
    }

    #[test]
    fn names() {
        assert_eq!(parse_name("  Acme Homes ").unwrap(), "Acme Homes");
        assert!(parse_name("   ").is_err());
        assert!(parse_name("a\nb").is_err());
    }
}
