//! `ficus db`: grow tenancy onto a live single-tenant PostgreSQL, additively.
//!
//! [`inspect`] reads the catalog and classifies every table; [`plan`] turns that
//! into a plan file the operator reviews and edits, and derives from it the steps
//! (forward SQL, undo SQL, the lock each takes, a hazard label); [`apply`] runs
//! them one short transaction at a time under a `lock_timeout` with retries,
//! journals every step in `tenancy_private`, and reverts them; [`backfill`] stamps
//! existing rows with tenant zero in keyset batches that never hold a lock for
//! long. The danger in all of this is the lock queue, not the work: a statement
//! waiting for a lock makes everything behind it wait, so no statement here waits
//! longer than the lock timeout.

pub mod apply;
pub mod backfill;
pub mod distribute;
pub mod enforce;
pub mod ident;
pub mod inspect;
pub mod lint;
pub mod plan;
pub mod probe;
pub mod rehearse;
pub mod workload;

use std::str::FromStr;

pub use crate::inspect::{Inventory, inspect};
pub use crate::plan::{Plan, Step};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a `ficus db` command was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid database url: {0}")]
    BadUrl(String),
    #[error("cannot connect to {location}: {detail}")]
    Connect { location: String, detail: String },
    #[error("{context}: {detail}")]
    Sql { context: String, detail: String },
    #[error("the plan {path}: {detail}")]
    BadPlan { path: String, detail: String },
    #[error("{0}")]
    Refused(String),
    #[error(
        "{step}: could not take its lock within {timeout_ms} ms after {attempts} attempts; nothing more was changed. Holding the lock: {blockers}"
    )]
    LockTimeout {
        step: String,
        timeout_ms: u64,
        attempts: u32,
        blockers: String,
    },
}

/// Where a database is, for messages: never its password.
pub fn location(url: &str) -> String {
    match tokio_postgres::Config::from_str(url) {
        Ok(c) => {
            let host = c
                .get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(s) => s.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .unwrap_or_else(|| "localhost".to_string());
            let port = c.get_ports().first().copied().unwrap_or(5432);
            format!(
                "postgres://{host}:{port}/{}",
                c.get_dbname().unwrap_or("postgres")
            )
        }
        Err(_) => "(unparsable url)".to_string(),
    }
}

/// Opens one connection, driven on its own task, named `ficus-db` in
/// `pg_stat_activity` so that operators can tell it apart.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let config = tokio_postgres::Config::from_str(url)
        .map_err(|e| Error::BadUrl(redact(&e.to_string(), url)))?;
    connect_with(config, location(url)).await
}

/// [`connect`] with a configuration already built; `location` names the
/// server in errors (never with its password).
pub async fn connect_with(
    mut config: tokio_postgres::Config,
    location: String,
) -> Result<tokio_postgres::Client> {
    config.application_name("ficus-db");
    config.connect_timeout(std::time::Duration::from_secs(10));
    let (client, connection) =
        config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| Error::Connect {
                location,
                detail: describe(&e),
            })?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    // Ask the server to notice within a second when this process dies, so that a
    // killed run's locks go with it (PostgreSQL 14 and later; older ones ignore it).
    let _ = client
        .batch_execute("SET client_connection_check_interval = '1s'")
        .await;
    Ok(client)
}

/// An error's message with the server's own words when there are some.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                s = format!("{s}: {inner}");
                source = inner.source();
            }
            s
        }
    }
}

fn redact(message: &str, url: &str) -> String {
    match tokio_postgres::Config::from_str(url).ok().and_then(|c| {
        c.get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
    }) {
        Some(p) if !p.is_empty() => message.replace(&p, "***"),
        _ => message.to_string(),
    }
}

/// Maps a failed statement to an error naming what was being done.
pub(crate) fn sql(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Error {
    let context = context.into();
    move |e| Error::Sql {
        context,
        detail: describe(&e),
    }
}
