//! Throwaway Citus clusters: a coordinator and workers, each a [`PgCluster`]
//! on its own loopback port with Citus preloaded, for the tests and benchmarks
//! of `ficus db distribute`.
//!
//! Citus is installed into the machine's PostgreSQL by `scripts/citus.sh` (from
//! the vendored source, only when missing or of another version); a cluster
//! runs that script once per process before its first server starts. Every
//! node runs with `wal_level = logical`, which Citus's online shard moves
//! (logical replication) need.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use crate::{Error, PgCluster, run};

/// The Citus release the tests run: the last for PostgreSQL 15.
pub const VERSION: &str = "13.2.2";

/// A coordinator and its workers. Databases are made on every node at once
/// with [`CitusCluster::fresh_database`]; a spare node can be started and left
/// out of the cluster, for tests that add a node.
#[derive(Debug)]
pub struct CitusCluster {
    pub coordinator: PgCluster,
    pub workers: Vec<PgCluster>,
    /// Started like the workers but not in any database's cluster until a test
    /// adds it.
    pub spares: Vec<PgCluster>,
}

/// Installs Citus once per process (`scripts/citus.sh`, which does nothing when
/// the installed library is already this version).
pub fn ensure_installed() -> Result<(), Error> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/citus.sh");
            run(
                Command::new("bash").arg(&script),
                "scripts/citus.sh (installing Citus for the tests)",
            )
            .map(drop)
            .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|detail| Error::Command {
            what: "installing Citus".into(),
            detail,
        })
}

/// Whether this PostgreSQL restricts logical decoding output plugins to a list
/// (`output_plugin_libraries`, new in the 15.20 minor release): its sample
/// configuration names the setting.
fn restricts_output_plugins() -> bool {
    static KNOWN: OnceLock<bool> = OnceLock::new();
    *KNOWN.get_or_init(|| {
        let sample = Command::new("/usr/lib/postgresql/15/bin/pg_config")
            .arg("--sharedir")
            .output()
            .ok()
            .map(|o| {
                PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
                    .join("postgresql.conf.sample")
            });
        sample
            .and_then(|p| std::fs::read_to_string(p).ok())
            .is_some_and(|text| text.contains("output_plugin_libraries"))
    })
}

fn node() -> Result<PgCluster, Error> {
    // Citus splits shards (`isolate_tenant_to_new_shard`) by logical decoding
    // through its own output plugin, which a server that restricts output
    // plugins must be told to allow.
    let plugins: &[(&str, &str)] = if restricts_output_plugins() {
        &[(
            "output_plugin_libraries",
            "'pgoutput, test_decoding, citus'",
        )]
    } else {
        &[]
    };
    let mut settings = vec![
        ("fsync", "off"),
        // Not off, unlike the other test clusters: Citus's online shard
        // transfers lose the commits still in the WAL buffers when writes are
        // blocked (see `require_durable_commits` in ficus-retrofit), and
        // `distribute` refuses such a cluster. With fsync off, a commit's
        // write is cheap.
        ("synchronous_commit", "on"),
        ("full_page_writes", "off"),
        ("shared_preload_libraries", "citus"),
        ("wal_level", "logical"),
        ("max_replication_slots", "20"),
        ("max_wal_senders", "20"),
        ("max_worker_processes", "32"),
        // How a node reaches itself (create_distributed_table_concurrently,
        // background jobs): the servers listen on 127.0.0.1 only, and
        // "localhost" may resolve to ::1 first.
        ("citus.local_hostname", "127.0.0.1"),
    ];
    settings.extend_from_slice(plugins);
    PgCluster::start_with(&settings)
}

impl CitusCluster {
    /// Starts a coordinator, `workers` workers and `spares` spare nodes.
    pub fn start(workers: usize, spares: usize) -> Result<CitusCluster, Error> {
        ensure_installed()?;
        let coordinator = node()?;
        let workers = (0..workers).map(|_| node()).collect::<Result<_, _>>()?;
        let spares = (0..spares).map(|_| node()).collect::<Result<_, _>>()?;
        Ok(CitusCluster {
            coordinator,
            workers,
            spares,
        })
    }

    /// Creates a fresh database on every node (spares included, so that one
    /// can be added later) with the extension, registers the coordinator and
    /// the workers in it, and returns the coordinator's URL for it.
    pub fn fresh_database(&self, prefix: &str) -> Result<String, Error> {
        let name = crate::database_name(prefix);
        for n in std::iter::once(&self.coordinator)
            .chain(&self.workers)
            .chain(&self.spares)
        {
            n.psql("postgres", &format!("CREATE DATABASE \"{name}\""))?;
            n.psql(&name, "CREATE EXTENSION citus")?;
        }
        self.coordinator.psql(
            &name,
            &format!(
                "SELECT citus_set_coordinator_host('127.0.0.1', {})",
                self.coordinator.port()
            ),
        )?;
        for w in &self.workers {
            self.coordinator.psql(
                &name,
                &format!("SELECT citus_add_node('127.0.0.1', {})", w.port()),
            )?;
        }
        Ok(self.coordinator.url(&name))
    }
}
