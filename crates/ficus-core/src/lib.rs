//! The domain of a per-tenant migration, as plain values and pure functions.
//!
//! Everything here is data and decisions: which strings are tenant ids, which stage
//! moves are allowed, what an audit event records, how far the migration has come.
//! Nothing in this crate does IO, reads a clock, or knows a wire format; the store,
//! the proxy and the CLI call into it so that every one of them decides the same way.

pub mod audit;
pub mod config;
pub mod latency;
pub mod progress;
pub mod readiness;
pub mod reconcile;
pub mod routing;
pub mod stage;
pub mod tenant;
pub mod time;

pub use audit::{Actor, AuditEvent, TokenName};
pub use progress::{Blocker, LegacyTraffic, Progress};
pub use routing::{Backend, Decision, Route, RouteStages, UnknownTenant, decide};
pub use stage::{Stage, Transition, TransitionError};
pub use tenant::{Domain, Tenant, TenantId, ValidationError};
pub use time::Timestamp;
