//! Scaling a distributed database out: `add-node`, a worker checked first
//! (reached with the coordinator's credentials, Citus installed in this
//! database), then `citus_add_node`. Adding a node moves nothing.
//!
//! Moving shards onto it (`rebalance`) and giving a tenant shards of its own
//! (`isolate`) are not here yet: under tenants writing in their own context,
//! Citus 13.2.2's online moves and splits lost acknowledged writes in our
//! test, and Ficus will not offer them until that is understood.

use std::str::FromStr;

use serde::Serialize;
use tokio_postgres::Client;

use super::status::require_citus;
use crate::{Error, Result, sql};

/// A node as the operator names it: `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeAddress {
    pub host: String,
    pub port: u16,
}

impl FromStr for NodeAddress {
    type Err = Error;

    fn from_str(s: &str) -> Result<NodeAddress> {
        let bad = || Error::Refused(format!("{s:?} is not a node address: write HOST:PORT"));
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(NodeAddress {
            host: host.to_string(),
            port,
        })
    }
}

impl std::fmt::Display for NodeAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Connects to `node` with the coordinator's user, password and database.
async fn connect_node(url: &str, node: &NodeAddress) -> Result<Client> {
    let coordinator =
        tokio_postgres::Config::from_str(url).map_err(|_| Error::BadUrl(crate::location(url)))?;
    let mut config = tokio_postgres::Config::new();
    config.host(&node.host).port(node.port);
    if let Some(user) = coordinator.get_user() {
        config.user(user);
    }
    if let Some(password) = coordinator.get_password() {
        config.password(password);
    }
    if let Some(db) = coordinator.get_dbname() {
        config.dbname(db);
    }
    let location = format!(
        "node {node} (database {})",
        coordinator.get_dbname().unwrap_or("postgres")
    );
    crate::connect_with(config, location).await
}

/// Adds `node` to the cluster as a worker that takes shards, after checking
/// that the coordinator has Citus, that the node can be reached with the
/// coordinator's credentials, and that it has Citus loaded and installed in
/// this database. Adding a node moves nothing: `rebalance` does. Returns the
/// node's id; a node already in the cluster is refused, named.
pub async fn add_node(client: &Client, url: &str, node: &NodeAddress) -> Result<i32> {
    require_citus(client).await?;
    let known: Option<i32> = client
        .query_opt(
            "SELECT nodeid FROM pg_dist_node WHERE nodename = $1 AND nodeport = $2",
            &[&node.host, &i32::from(node.port)],
        )
        .await
        .map_err(sql("reading the nodes"))?
        .map(|r| r.get(0));
    if let Some(id) = known {
        return Err(Error::Refused(format!(
            "node {node} is in the cluster already (node {id})"
        )));
    }
    let worker = connect_node(url, node).await?;
    require_citus(&worker)
        .await
        .map_err(|e| Error::Refused(format!("node {node}: {e}")))?;
    let id: i32 = client
        .query_one(
            "SELECT citus_add_node($1, $2)",
            &[&node.host, &i32::from(node.port)],
        )
        .await
        .map_err(sql(format!("adding node {node}")))?
        .get(0);
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses_are_host_and_port() {
        let check = |s: &str| match s.parse::<NodeAddress>() {
            Ok(n) => n.to_string(),
            Err(e) => e.to_string(),
        };
        assert_eq!(check("10.0.0.7:5432"), "10.0.0.7:5432");
        assert_eq!(check("worker-3.internal:6432"), "worker-3.internal:6432");
        assert_eq!(check("[::1]:5432"), "::1:5432");
        assert_eq!(
            check("worker-3"),
            "\"worker-3\" is not a node address: write HOST:PORT"
        );
        assert_eq!(
            check("worker-3:0"),
            "\"worker-3:0\" is not a node address: write HOST:PORT"
        );
        assert_eq!(
            check(":5432"),
            "\":5432\" is not a node address: write HOST:PORT"
        );
    }
}
