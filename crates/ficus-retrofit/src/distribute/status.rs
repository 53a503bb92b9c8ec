//! `ficus db distribute status`: where a distributed database stands, read from
//! Citus's own catalogs and views on the coordinator, changing nothing. The
//! nodes with their shards and bytes; each Citus table with its kind,
//! distribution column, co-location group and shard count; where each tenant's
//! rows live (the shard its id hashes to, and that shard's node), largest
//! tenants first; and a running rebalance's progress, shard by shard.
//!
//! A database without Citus gets one line naming the fix, whether it is the
//! preload that is missing or only the extension.

use serde::Serialize;
use tokio_postgres::Client;

use crate::{Error, Result, sql};

/// A node of the cluster (`pg_dist_node`), with what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    pub id: i32,
    pub host: String,
    pub port: i32,
    /// `coordinator` (group 0) or `worker`.
    pub role: &'static str,
    pub active: bool,
    /// Whether the rebalancer may place shards on it.
    pub should_have_shards: bool,
    pub shards: i64,
    pub bytes: i64,
}

/// A table Citus knows (`citus_tables`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CitusTable {
    pub table: String,
    /// `distributed`, `reference` or `local` (Citus's own words).
    pub kind: String,
    pub column: Option<String>,
    pub colocation_id: i32,
    pub shards: i64,
    pub bytes: i64,
}

/// Where one tenant's rows live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TenantPlace {
    pub tenant: String,
    pub shard: i64,
    /// `host:port` of each placement of the shard.
    pub nodes: Vec<String>,
    /// The tenant's rows in the distributed tables co-located with the
    /// organizations (an exact count).
    pub rows: i64,
    /// Whether the shard holds this tenant alone (after `isolate`), as far as
    /// the tenants in the spine tell.
    pub alone: bool,
}

/// One shard move of a running rebalance (`get_rebalance_progress()`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Move {
    pub table: String,
    pub shard: i64,
    pub from: String,
    pub to: String,
    /// 0 waiting, 1 moving, 2 done (Citus's numbers).
    pub progress: i32,
    pub source_bytes: i64,
    pub target_bytes: i64,
}

/// The whole status.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    pub citus_version: String,
    pub nodes: Vec<Node>,
    pub tables: Vec<CitusTable>,
    /// Every tenant, the most rows first.
    pub tenants: Vec<TenantPlace>,
    /// The background rebalance's state (`citus_rebalance_status()`), when one
    /// was ever started.
    pub rebalance: Option<String>,
    pub moves: Vec<Move>,
}

/// Checks that Citus is loaded and installed in this database; the one-line
/// error names the fix.
pub async fn require_citus(client: &Client) -> Result<String> {
    let preload: String = client
        .query_one("SELECT current_setting('shared_preload_libraries')", &[])
        .await
        .map_err(sql("reading shared_preload_libraries"))?
        .get(0);
    let loaded = preload
        .split(',')
        .any(|l| l.trim().trim_matches('"') == "citus");
    let version: Option<String> = client
        .query_opt(
            "SELECT extversion FROM pg_extension WHERE extname = 'citus'",
            &[],
        )
        .await
        .map_err(sql("reading the installed extensions"))?
        .map(|r| r.get(0));
    match (loaded, version) {
        (false, _) => Err(Error::Refused(
            "Citus is not loaded on this server: add citus to shared_preload_libraries in postgresql.conf (and wal_level = logical for online moves), restart it, then CREATE EXTENSION citus".into(),
        )),
        (true, None) => Err(Error::Refused(
            "Citus is loaded but not installed in this database: CREATE EXTENSION citus, on the coordinator and every worker".into(),
        )),
        (true, Some(_)) => {
            let v: String = client
                .query_one("SELECT citus_version()", &[])
                .await
                .map_err(sql("reading citus_version()"))?
                .get(0);
            Ok(v)
        }
    }
}

/// Reads the status.
pub async fn read(client: &Client) -> Result<Status> {
    let citus_version = require_citus(client).await?;
    let nodes = client
        .query(
            "SELECT n.nodeid, n.nodename::text, n.nodeport, n.groupid = 0, n.isactive, n.shouldhaveshards,
                    COALESCE(s.shards, 0), COALESCE(s.bytes, 0)
             FROM pg_dist_node n
             LEFT JOIN (SELECT nodename, nodeport, count(*) AS shards, sum(shard_size)::bigint AS bytes
                        FROM citus_shards GROUP BY nodename, nodeport) s
               ON s.nodename = n.nodename AND s.nodeport = n.nodeport
             WHERE n.noderole = 'primary'
             ORDER BY n.groupid, n.nodeid",
            &[],
        )
        .await
        .map_err(sql("reading the nodes"))?
        .iter()
        .map(|r| Node {
            id: r.get(0),
            host: r.get(1),
            port: r.get(2),
            role: if r.get(3) { "coordinator" } else { "worker" },
            active: r.get(4),
            should_have_shards: r.get(5),
            shards: r.get(6),
            bytes: r.get(7),
        })
        .collect();
    let tables: Vec<CitusTable> = client
        .query(
            "SELECT table_name::text, citus_table_type::text,
                    NULLIF(distribution_column::text, '<none>'), colocation_id, shard_count::bigint,
                    citus_total_relation_size(table_name)::bigint
             FROM citus_tables ORDER BY table_name::text",
            &[],
        )
        .await
        .map_err(sql("reading citus_tables"))?
        .iter()
        .map(|r| CitusTable {
            table: r.get(0),
            kind: r.get(1),
            column: r.get(2),
            colocation_id: r.get(3),
            shards: r.get(4),
            bytes: r.get(5),
        })
        .collect();
    let tenants = tenant_places(client, &tables).await?;
    let rebalance: Option<String> = client
        .query_opt("SELECT state::text FROM citus_rebalance_status()", &[])
        .await
        .map_err(sql("reading citus_rebalance_status()"))?
        .map(|r| r.get(0));
    let moves = moves(client).await?;
    Ok(Status {
        citus_version,
        nodes,
        tables,
        tenants,
        rebalance,
        moves,
    })
}

/// The shard moves of a running rebalance (or move, or split), as Citus
/// reports them (`get_rebalance_progress()`); none when nothing runs.
pub async fn moves(client: &Client) -> Result<Vec<Move>> {
    Ok(client
        .query(
            "SELECT table_name::text, shardid, sourcename::text || ':' || sourceport,
                    targetname::text || ':' || targetport, progress::int,
                    source_shard_size::bigint, target_shard_size::bigint
             FROM get_rebalance_progress() ORDER BY shardid",
            &[],
        )
        .await
        .map_err(sql("reading get_rebalance_progress()"))?
        .iter()
        .map(|r| Move {
            table: r.get(0),
            shard: r.get(1),
            from: r.get(2),
            to: r.get(3),
            progress: r.get(4),
            source_bytes: r.get(5),
            target_bytes: r.get(6),
        })
        .collect())
}

/// Where each tenant of the spine lives, once the tables are distributed by
/// tenant; nothing otherwise. A tenant's shard is the one its id hashes to in
/// the co-location group's anchor: `tenancy.units` as `distribute apply`
/// places it, or (distributed by hand) the organizations or the first table
/// distributed by `tenant_id`.
async fn tenant_places(client: &Client, tables: &[CitusTable]) -> Result<Vec<TenantPlace>> {
    let distributed = |name: &str| {
        tables
            .iter()
            .find(|t| t.table == name && t.kind == "distributed")
    };
    let Some(anchor) = distributed("tenancy.units")
        .or_else(|| distributed("tenancy.organizations"))
        .or_else(|| {
            tables
                .iter()
                .find(|t| t.kind == "distributed" && t.column.as_deref() == Some("tenant_id"))
        })
    else {
        return Ok(Vec::new());
    };
    // A database distributed by hand may have no spine to name tenants by.
    let spine: bool = client
        .query_one(
            "SELECT to_regclass('tenancy.organizations') IS NOT NULL",
            &[],
        )
        .await
        .map_err(sql("looking for the organizations"))?
        .get(0);
    if !spine {
        return Ok(Vec::new());
    }
    // Rows per tenant, summed over the tenant-owned tables co-located with
    // the anchor (the spine's own tables are not the tenant's data).
    let mut counts = String::new();
    for t in tables
        .iter()
        .filter(|t| t.kind == "distributed" && t.colocation_id == anchor.colocation_id)
    {
        let Some(column) = &t.column else { continue };
        if column != "tenant_id" {
            continue;
        }
        if !counts.is_empty() {
            counts.push_str(" UNION ALL ");
        }
        // The table name comes from citus_tables as regclass text (already
        // quoted where it needs to be); the column is quoted here.
        counts.push_str(&format!(
            "SELECT {col}::text AS tenant, count(*) AS n FROM {table} GROUP BY 1",
            col = crate::ident::quote(column),
            table = t.table,
        ));
    }
    let rows_by_tenant = if counts.is_empty() {
        "SELECT NULL::text AS tenant, 0::bigint AS n WHERE false".to_string()
    } else {
        counts
    };
    let query = format!(
        "WITH counts AS (SELECT tenant, sum(n)::bigint AS n FROM ({rows_by_tenant}) c GROUP BY tenant),
              placed AS (
                SELECT o.slug::text AS slug, o.id::text AS id,
                       get_shard_id_for_distribution_column({anchor}, o.id) AS shard
                FROM tenancy.organizations o)
         SELECT p.slug, p.shard,
                ARRAY(SELECT s.nodename::text || ':' || s.nodeport FROM citus_shards s
                      WHERE s.shardid = p.shard ORDER BY 1),
                COALESCE(c.n, 0),
                count(*) OVER (PARTITION BY p.shard) = 1
         FROM placed p LEFT JOIN counts c ON c.tenant = p.id
         ORDER BY 4 DESC, 1",
        anchor = crate::ident::literal(&anchor.table)
    );
    Ok(client
        .query(&query, &[])
        .await
        .map_err(sql("reading where each tenant's rows live"))?
        .iter()
        .map(|r| TenantPlace {
            tenant: r.get(0),
            shard: r.get(1),
            nodes: r.get(2),
            rows: r.get(3),
            alone: r.get(4),
        })
        .collect())
}
