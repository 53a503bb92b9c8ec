//! The demo's sample application: a homeowner portal (homes, valuations, saved
//! searches, notifications) with one JSON API and two implementations over one
//! PostgreSQL database.
//!
//! - *legacy* was written for one customer: it knows nothing of tenants and
//!   connects as the tables' owner;
//! - *new* is the rebuilt, tenant-aware backend: it connects as a tenant role
//!   and, in every transaction, sets the tenant context from the
//!   `X-Ficus-Tenant` header the proxy adds, so that row level security does the
//!   isolation. It has a deliberate bug that can be switched on (a field computed
//!   differently on one endpoint) so that the parallel run has something to
//!   catch.
//!
//! [`schema`] holds the single-tenant schema and its sample data; [`backend`]
//! the HTTP service both flavours share.

pub mod backend;
pub mod schema;
