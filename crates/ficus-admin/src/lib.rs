//! The control plane's operations and their HTTP API.
//!
//! [`ops::Control`] is the one list of what an operator can do: list, show, add
//! and move tenants, judge readiness, promote through the gate, roll back, read
//! mismatches and the audit log, see the finish line, retire legacy. [`ops::Direct`]
//! does it on a store; [`server`] serves it over HTTP with bearer-token auth (on
//! the proxy's admin listener, or `ficus serve`); [`client::Remote`] calls that
//! API, which is how `ficus --api URL` works. The JSON shapes are in [`api`], the
//! only place that knows them.

pub mod api;
pub mod client;
pub mod config;
pub mod gate;
pub mod ops;
pub mod provision;
pub mod server;
pub mod token;
pub mod ui;

use ficus_store::StoreError;

pub use crate::ops::{Control, Direct};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller's input breaks a rule (bad id, stage, name, threshold).
    #[error("{0}")]
    Invalid(String),
    /// The input is fine but the state does not allow it (not ready, legacy not
    /// empty, nothing to roll back).
    #[error("{0}")]
    Refused(String),
    /// The caller's `If-Match` version is not the current one.
    #[error("{0}")]
    PreconditionFailed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The remote control plane answered with an error.
    #[error("{message}")]
    Remote { status: u16, message: String },
    #[error("cannot reach the control plane at {url}: {detail}")]
    Unreachable { url: String, detail: String },
}
