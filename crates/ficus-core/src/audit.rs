//! Audit events: the append-only record of every change to a tenant.

use std::fmt;

use crate::{Stage, TenantId, Timestamp, ValidationError};

/// Who or what made a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Actor {
    /// An operator at the command line.
    Cli,
    /// A caller of the admin HTTP API holding the store's first token.
    Api,
    /// A caller of the admin API or the dashboard holding a named token: the audit
    /// log records whose token it was.
    Token(TokenName),
    /// The proxy's automatic rollback guard.
    Guard,
    /// The billing-driven provisioning pipeline.
    Provisioning,
    /// Evidence a proxy recorded, such as a mismatch that reopens a resolved
    /// class.
    Proxy,
}

/// The stored spelling of a named token's actor: `token:NAME`.
const TOKEN_ACTOR: &str = "token:";

impl Actor {
    pub fn parse(raw: &str) -> Result<Actor, ValidationError> {
        match raw {
            "cli" => Ok(Actor::Cli),
            "api" => Ok(Actor::Api),
            "guard" => Ok(Actor::Guard),
            "provisioning" => Ok(Actor::Provisioning),
            "proxy" => Ok(Actor::Proxy),
            _ => match raw.strip_prefix(TOKEN_ACTOR).map(TokenName::parse) {
                Some(Ok(name)) => Ok(Actor::Token(name)),
                _ => Err(ValidationError::Actor {
                    value: raw.to_string(),
                }),
            },
        }
    }

    /// The stored spelling; a named token's is `token:NAME`.
    pub fn as_str(&self) -> &str {
        match self {
            Actor::Cli => "cli",
            Actor::Api => "api",
            Actor::Token(name) => name.actor(),
            Actor::Guard => "guard",
            Actor::Provisioning => "provisioning",
            Actor::Proxy => "proxy",
        }
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The name of an admin token: lowercase letters, digits and `_`, at most
/// [`TokenName::MAX`] bytes. Held inline (with its `token:` prefix) so that an
/// [`Actor`] stays a plain `Copy` value.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenName {
    /// `token:NAME`, padded with zeros.
    bytes: [u8; TOKEN_ACTOR.len() + TokenName::MAX],
    len: u8,
}

impl TokenName {
    /// The longest name.
    pub const MAX: usize = 32;

    pub fn parse(raw: &str) -> Result<TokenName, ValidationError> {
        let plain = !raw.is_empty()
            && raw.len() <= TokenName::MAX
            && raw
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !plain {
            return Err(ValidationError::TokenName {
                value: raw.to_string(),
            });
        }
        let mut bytes = [0u8; TOKEN_ACTOR.len() + TokenName::MAX];
        let whole = format!("{TOKEN_ACTOR}{raw}");
        bytes[..whole.len()].copy_from_slice(whole.as_bytes());
        Ok(TokenName {
            bytes,
            len: whole.len() as u8,
        })
    }

    /// The name alone.
    pub fn as_str(&self) -> &str {
        &self.actor()[TOKEN_ACTOR.len()..]
    }

    fn actor(&self) -> &str {
        // Only `parse` builds a name, from checked ASCII, so this cannot fail.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("token:?")
    }
}

impl fmt::Debug for TokenName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenName({:?})", self.as_str())
    }
}

impl fmt::Display for TokenName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One entry of the audit log.
///
/// `from` is `None` when the event records the tenant's creation. `version` is the
/// tenant's version after the change, so an event can be matched to the state it made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// Position in the log; strictly increasing in commit order.
    pub seq: u64,
    pub at: Timestamp,
    pub tenant: TenantId,
    pub from: Option<Stage>,
    pub to: Stage,
    pub version: u64,
    pub actor: Actor,
    pub reason: String,
}
