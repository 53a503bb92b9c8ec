//! `ficus db distribute` against a real Citus cluster: a coordinator and two
//! workers from `ficus-testkit`, Citus 13.2.2 built from the vendored source.

use std::process::{Command, Stdio};

use ficus_testkit::citus::CitusCluster;

const FICUS: &str = env!("CARGO_BIN_EXE_ficus");

fn ficus(url: &str, args: &[&str]) -> std::process::Output {
    Command::new(FICUS)
        .args(args)
        .env("FICUS_DB_URL", url)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn status_json(url: &str) -> serde_json::Value {
    let out = ficus(url, &["db", "distribute", "status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Status before anything is distributed, then after the spine, one
/// tenant-owned table and one shared table are distributed the way `distribute
/// apply` places them: the nodes with their shards, each table, and where each
/// tenant's rows live (largest first), checked against Citus's own answer; and
/// the one-line errors for a server without Citus and a database without the
/// extension.
#[test]
fn distribute_status_shows_the_nodes_the_tables_and_where_each_tenant_lives() {
    let cluster = CitusCluster::start(2, 0).unwrap();
    let url = cluster.fresh_database("status").unwrap();
    let db = url.rsplit('/').next().unwrap().to_string();
    let sql = |q: &str| cluster.coordinator.psql(&db, q).unwrap();

    let empty = status_json(&url);
    assert!(
        empty["citus_version"]
            .as_str()
            .unwrap()
            .starts_with("Citus 13.2.2 "),
        "{empty}"
    );
    let roles: Vec<(&str, i64)> = empty["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["role"].as_str().unwrap(), n["port"].as_i64().unwrap()))
        .collect();
    let mut want = vec![("coordinator", i64::from(cluster.coordinator.port()))];
    want.extend(
        cluster
            .workers
            .iter()
            .map(|w| ("worker", i64::from(w.port()))),
    );
    assert_eq!(roles, want);
    assert_eq!(empty["tables"], serde_json::json!([]));
    let text = ficus(&url, &["db", "distribute", "status"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("no table is distributed yet"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );

    sql("CREATE SCHEMA tenancy;
         CREATE TABLE tenancy.organizations (id bigint PRIMARY KEY, slug text NOT NULL, name text NOT NULL);
         CREATE TABLE homes (tenant_id bigint NOT NULL REFERENCES tenancy.organizations (id), id bigint NOT NULL,
                             city text NOT NULL, PRIMARY KEY (tenant_id, id));
         CREATE TABLE cities (name text PRIMARY KEY);
         INSERT INTO tenancy.organizations VALUES (1, 'acme', 'Acme'), (2, 'beta', 'Beta'), (3, 'gamma', 'Gamma');
         INSERT INTO cities VALUES ('Lyon'), ('Oslo');
         INSERT INTO homes SELECT 1, g, 'Lyon' FROM generate_series(1, 30) g;
         INSERT INTO homes SELECT 2, g, 'Oslo' FROM generate_series(1, 20) g;
         INSERT INTO homes SELECT 3, g, 'Oslo' FROM generate_series(1, 10) g;
         SELECT create_distributed_table('tenancy.organizations', 'id');
         SELECT create_distributed_table('homes', 'tenant_id', colocate_with => 'tenancy.organizations');
         SELECT create_reference_table('cities');");

    let s = status_json(&url);
    let tables: Vec<(String, String, String)> = s["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["table"].as_str().unwrap().to_string(),
                t["kind"].as_str().unwrap().to_string(),
                t["column"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        tables,
        [
            ("cities".into(), "reference".into(), String::new()),
            ("homes".into(), "distributed".into(), "tenant_id".into()),
            (
                "tenancy.organizations".into(),
                "distributed".into(),
                "id".into()
            ),
        ]
    );
    let tenants: Vec<(&str, i64)> = s["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["tenant"].as_str().unwrap(), t["rows"].as_i64().unwrap()))
        .collect();
    assert_eq!(tenants, [("acme", 30), ("beta", 20), ("gamma", 10)]);
    for (i, t) in s["tenants"].as_array().unwrap().iter().enumerate() {
        let id = i + 1;
        let (shard, port) = sql(&format!(
            "SELECT s.shardid || ' ' || s.nodeport FROM citus_shards s
             WHERE s.shardid = get_shard_id_for_distribution_column('tenancy.organizations', {id})"
        ))
        .split_once(' ')
        .map(|(a, b)| (a.parse::<i64>().unwrap(), b.to_string()))
        .unwrap();
        assert_eq!(t["shard"].as_i64(), Some(shard), "{t}");
        assert_eq!(
            t["nodes"],
            serde_json::json!([format!("127.0.0.1:{port}")]),
            "{t}"
        );
    }
    // Every shard of the two distributed tables is on a worker (32 each by
    // default), and the reference table on every node.
    let shards: i64 = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["shards"].as_i64().unwrap())
        .sum();
    assert_eq!(shards, 32 * 2 + 3, "{s}");
    let text = ficus(&url, &["db", "distribute", "status"]);
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(
        text.contains("3 tenants; the 3 with the most rows:") && text.contains("acme"),
        "{text}"
    );

    // A server without Citus, and a Citus server's database without the
    // extension: one line each, naming the fix.
    let plain = ficus_testkit::shared().fresh_database("nocitus").unwrap();
    let out = ficus(&plain, &["db", "distribute", "status"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: Citus is not loaded on this server: add citus to shared_preload_libraries in postgresql.conf (and wal_level = logical for online moves), restart it, then CREATE EXTENSION citus"
    );
    cluster
        .coordinator
        .psql("postgres", "CREATE DATABASE without_extension")
        .unwrap();
    let out = ficus(
        &cluster.coordinator.url("without_extension"),
        &["db", "distribute", "status"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: Citus is loaded but not installed in this database: CREATE EXTENSION citus, on the coordinator and every worker"
    );
}

/// `add-node`: a spare node joins and holds nothing until shards are moved;
/// the same node again, an unreachable one, a server without Citus and a
/// malformed address are each refused in one line naming it.
#[test]
fn a_node_is_added_after_it_is_checked_and_every_bad_node_is_named() {
    let cluster = CitusCluster::start(2, 1).unwrap();
    let url = cluster.fresh_database("addnode").unwrap();
    let db = url.rsplit('/').next().unwrap().to_string();
    cluster
        .coordinator
        .psql(
            &db,
            "CREATE TABLE homes (tenant_id bigint NOT NULL, id bigint NOT NULL, PRIMARY KEY (tenant_id, id));
             SELECT create_distributed_table('homes', 'tenant_id');",
        )
        .unwrap();
    let spare = &cluster.spares[0];
    let node = format!("127.0.0.1:{}", spare.port());
    let added = ficus(&url, &["db", "distribute", "add-node", &node, "--json"]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let added: serde_json::Value = serde_json::from_slice(&added.stdout).unwrap();
    assert_eq!(added["node"], node.as_str());
    let s = status_json(&url);
    let on_spare: Vec<(i64, bool, i64)> = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["port"].as_i64() == Some(i64::from(spare.port())))
        .map(|n| {
            (
                n["id"].as_i64().unwrap(),
                n["should_have_shards"].as_bool().unwrap(),
                n["shards"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(on_spare, [(added["node_id"].as_i64().unwrap(), true, 0)]);

    let refused = |args: &[&str]| {
        let out = ficus(&url, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        String::from_utf8_lossy(&out.stderr).trim().to_string()
    };
    assert_eq!(
        refused(&["db", "distribute", "add-node", &node]),
        format!(
            "error: node {node} is in the cluster already (node {})",
            added["node_id"]
        )
    );
    let unreachable = refused(&["db", "distribute", "add-node", "127.0.0.1:1"]);
    assert!(
        unreachable.starts_with(&format!(
            "error: cannot connect to node 127.0.0.1:1 (database {db}):"
        )),
        "{unreachable}"
    );
    // A server without Citus, holding a database of the same name.
    let plain = ficus_testkit::shared();
    plain
        .psql("postgres", &format!("CREATE DATABASE \"{db}\""))
        .unwrap();
    let without = format!("127.0.0.1:{}", plain.port());
    assert_eq!(
        refused(&["db", "distribute", "add-node", &without]),
        format!(
            "error: node {without}: Citus is not loaded on this server: add citus to shared_preload_libraries in postgresql.conf (and wal_level = logical for online moves), restart it, then CREATE EXTENSION citus"
        )
    );
    assert_eq!(
        refused(&["db", "distribute", "add-node", "worker-3"]),
        "error: \"worker-3\" is not a node address: write HOST:PORT"
    );
    // Nothing was added by the refusals.
    assert_eq!(status_json(&url)["nodes"].as_array().unwrap().len(), 4);
}
