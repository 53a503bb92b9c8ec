//! Audit events: the append-only record of every change to a tenant.

use std::fmt;

use crate::{Stage, TenantId, Timestamp, ValidationError};

/// Who or what made a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Actor {
    /// An operator at the command line.
    Cli,
    /// A caller of the admin HTTP API.
    Api,
    /// The proxy's automatic rollback guard.
    Guard,
    /// The billing-driven provisioning pipeline.
    Provisioning,
    /// Evidence a proxy recorded, such as a mismatch that reopens a resolved
    /// class.
    Proxy,
}

impl Actor {
    pub fn parse(raw: &str) -> Result<Actor, ValidationError> {
        match raw {
            "cli" => Ok(Actor::Cli),
            "api" => Ok(Actor::Api),
            "guard" => Ok(Actor::Guard),
            "provisioning" => Ok(Actor::Provisioning),
            "proxy" => Ok(Actor::Proxy),
            _ => Err(ValidationError::Actor {
                value: raw.to_string(),
            }),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Actor::Cli => "cli",
            Actor::Api => "api",
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
