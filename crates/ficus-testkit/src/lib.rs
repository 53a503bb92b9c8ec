//! Throwaway PostgreSQL clusters: `initdb` + `pg_ctl` on a free loopback port.
//!
//! Every test, benchmark and the demo that needs PostgreSQL gets it from here, so
//! there is exactly one place that knows how to find the server binaries, how to run
//! them when the caller is root (`initdb` refuses to), and how to tear a cluster down.
//!
//! A cluster is stopped and its directory removed when the [`PgCluster`] is dropped.
//! Because a test process may also die without running destructors (a panic across
//! threads, `kill -9`, or a `static` that is never dropped), each cluster is watched by
//! a small detached shell process that stops the server once the owning process is
//! gone. A crashed test run therefore never leaves a postmaster behind.

#[cfg(feature = "browser")]
pub mod browser;
pub mod citus;

use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Why a cluster could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH, in FICUS_PG_BIN or under /usr/lib/postgresql; on Debian run `apt-get install postgresql`"
    )]
    BinariesNotFound,
    #[error(
        "running as root but there is no `postgres` user to run the server as; on Debian it comes with the `postgresql` package"
    )]
    NoPostgresUser,
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// A running throwaway PostgreSQL server, reachable over TCP on 127.0.0.1 with trust
/// authentication for the superuser `postgres`.
#[derive(Debug)]
pub struct PgCluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres_user: bool,
    settings: Vec<(String, String)>,
}

impl PgCluster {
    /// Starts a cluster tuned for tests: durability off, because a test database is
    /// thrown away and fsync on every commit only makes the suite slower.
    pub fn start() -> Result<PgCluster, Error> {
        PgCluster::start_with(&[
            ("fsync", "off"),
            ("synchronous_commit", "off"),
            ("full_page_writes", "off"),
        ])
    }

    /// Starts a cluster with extra `postgresql.conf` settings (for benchmarks that
    /// must measure with durable commits, pass no settings).
    pub fn start_with(settings: &[(&str, &str)]) -> Result<PgCluster, Error> {
        let mut cluster = PgCluster::unstarted(
            settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )?;
        let data = cluster.data_dir();
        let mut initdb = cluster.pg_command("initdb");
        initdb.arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ]);
        run(&mut initdb, "initdb")?;
        cluster.watch_owner()?;
        cluster.start_server()?;
        Ok(cluster)
    }

    /// Starts a streaming replica of this cluster (`pg_basebackup -R`, hot standby),
    /// for tests of what Ficus does while a replica lags. It is torn down like any
    /// other cluster; the primary's default `pg_hba.conf` already trusts
    /// replication connections from 127.0.0.1.
    pub fn start_standby(&self) -> Result<PgCluster, Error> {
        let mut standby = PgCluster::unstarted(self.settings.clone())?;
        let mut backup = standby.pg_command("pg_basebackup");
        backup
            .arg("-D")
            .arg(standby.data_dir())
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
            ])
            .arg("-p")
            .arg(self.port.to_string());
        run(&mut backup, "pg_basebackup")?;
        standby.watch_owner()?;
        standby.start_server()?;
        Ok(standby)
    }

    /// Makes `role` log in over TCP with a password (`scram-sha-256`) while every
    /// other role keeps trust authentication, so a test can see what a wrong
    /// password does. The role must exist; returns once new connections are
    /// checked by the new rule (the reload is asynchronous).
    pub fn require_password(&self, role: &str) -> Result<(), Error> {
        if role.is_empty() || !role.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(Error::Command {
                what: "require_password".into(),
                detail: format!("{role:?} is not a plain role name"),
            });
        }
        let hba = self.data_dir().join("pg_hba.conf");
        let old = fs::read_to_string(&hba).map_err(io_err("reading pg_hba.conf"))?;
        fs::write(
            &hba,
            format!("host all {role} 127.0.0.1/32 scram-sha-256\n{old}"),
        )
        .map_err(io_err("writing pg_hba.conf"))?;
        self.psql("postgres", "SELECT pg_reload_conf()")?;
        for _ in 0..100 {
            // `-w` never prompts: once the rule is loaded, a login without a
            // password fails.
            let out = Command::new(self.bin.join("psql"))
                .args(["-X", "-w", "-h", "127.0.0.1", "-U", role, "-d", "postgres"])
                .arg("-p")
                .arg(self.port.to_string())
                .args(["-c", "SELECT 1"])
                .env_remove("PGPASSWORD")
                .stdin(Stdio::null())
                .output()
                .map_err(io_err("running psql"))?;
            if !out.status.success() {
                return Ok(());
            }
            #[allow(
                clippy::disallowed_methods,
                reason = "a synchronous test helper polling for the server's reload"
            )]
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Err(Error::Command {
            what: "require_password".into(),
            detail: format!("the server still lets {role} in without a password after 5 s"),
        })
    }

    /// A cluster directory, not yet initialised or started.
    fn unstarted(settings: Vec<(String, String)>) -> Result<PgCluster, Error> {
        let bin = find_bin_dir().ok_or(Error::BinariesNotFound)?;
        let as_postgres_user = running_as_root()?;
        if as_postgres_user && !user_exists("postgres") {
            return Err(Error::NoPostgresUser);
        }
        let dir = tempfile::Builder::new()
            .prefix("ficus-pg-")
            .tempdir_in(std::env::temp_dir())
            .map_err(io_err("creating a directory for the cluster"))?
            .keep();
        let cluster = PgCluster {
            bin,
            dir,
            port: 0,
            as_postgres_user,
            settings,
        };
        if as_postgres_user {
            run(
                Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&cluster.dir),
                "chown of the cluster directory",
            )?;
        }
        Ok(cluster)
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log so far, for a test to show what the server saw when
    /// it fails.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// A connection URL for `database` as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a fresh, uniquely named database and returns its URL. Tests sharing
    /// one cluster each take their own database, so they never see each other's rows.
    pub fn fresh_database(&self, prefix: &str) -> Result<String, Error> {
        let name = database_name(prefix);
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))?;
        Ok(self.url(&name))
    }

    /// Runs SQL through `psql` as the superuser and returns what it printed
    /// (unaligned, tuples only). For set-up and assertions in tests.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, Error> {
        let out = run(
            Command::new(self.bin.join("psql"))
                .args([
                    "-X",
                    "-q",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                ])
                .arg("-p")
                .arg(self.port.to_string())
                .arg("-d")
                .arg(database)
                .arg("-c")
                .arg(sql),
            "psql",
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    }

    /// The schema of `database` as `pg_dump --schema-only` prints it, for
    /// comparing a schema before and after a change.
    pub fn dump_schema(&self, database: &str) -> Result<String, Error> {
        let out = run(
            Command::new(self.bin.join("pg_dump"))
                .args(["--schema-only", "-h", "127.0.0.1", "-U", "postgres"])
                .arg("-p")
                .arg(self.port.to_string())
                .arg(database),
            "pg_dump",
        )?;
        // pg_dump brackets its output with `\restrict KEY` lines whose key is new
        // on every run; they say nothing about the schema.
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with("\\restrict ") && !l.starts_with("\\unrestrict "))
            .map(|l| format!("{l}\n"))
            .collect())
    }

    /// Stops the server (fast shutdown), keeping its data, so a test can observe what
    /// clients do while the database is away.
    pub fn stop(&self) -> Result<(), Error> {
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-m", "fast", "-w", "stop"]);
        run(&mut cmd, "pg_ctl stop").map(drop)
    }

    /// Starts a stopped server again on the same port.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.start_server()
    }

    /// The directory holding PostgreSQL's binaries (`psql`, `pgbench`, …).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn start_server(&mut self) -> Result<(), Error> {
        // The port is chosen by binding to port 0 and releasing it; another process
        // could take it in between, so a failed start retries on a new port.
        let mut last = None;
        for _ in 0..5 {
            let port = if self.port != 0 {
                self.port
            } else {
                free_port()?
            };
            let mut opts = format!(
                "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=200"
            );
            for (k, v) in &self.settings {
                opts.push_str(&format!(" -c {k}={v}"));
            }
            let mut cmd = self.pg_command("pg_ctl");
            cmd.arg("-D")
                .arg(self.data_dir())
                .arg("-l")
                .arg(self.dir.join("server.log"))
                .args(["-w", "-t", "60", "-o", &opts, "start"]);
            match run(&mut cmd, "pg_ctl start") {
                Ok(_) => {
                    self.port = port;
                    return Ok(());
                }
                Err(e) => {
                    let log = fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
                    last = Some(Error::Command {
                        what: "pg_ctl start".into(),
                        detail: format!("{e}; server log: {}", tail(&log, 800)),
                    });
                    if self.port != 0 {
                        break;
                    }
                }
            }
        }
        Err(last.expect("the loop ran at least once"))
    }

    /// Spawns a detached watcher that stops the server and removes its directory
    /// once this process has exited, whatever way it exited.
    fn watch_owner(&self) -> Result<(), Error> {
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             if [ -f '{data}/postmaster.pid' ]; then kill -QUIT $(head -n 1 '{data}/postmaster.pid') 2>/dev/null; sleep 1; fi; \
             rm -rf '{dir}'",
            pid = std::process::id(),
            data = self.data_dir().display(),
            dir = self.dir.display(),
        );
        Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io_err("spawning the cluster watcher"))?;
        Ok(())
    }

    fn pg_command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres_user {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(path);
            cmd
        } else {
            Command::new(path)
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let pid_file = self.data_dir().join("postmaster.pid");
        if let Ok(pid) = fs::read_to_string(&pid_file)
            && let Some(pid) = pid.lines().next()
        {
            // Immediate shutdown: the data is thrown away next, so there is
            // nothing to flush.
            let _ = Command::new("kill").args(["-QUIT", pid]).status();
            for _ in 0..50 {
                if !pid_file.exists() {
                    break;
                }
                #[allow(
                    clippy::disallowed_methods,
                    reason = "Drop is synchronous; waiting for the postmaster to exit"
                )]
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One cluster shared by every test in this process, started on first use. Each
/// test takes its own database from it with [`PgCluster::fresh_database`].
pub fn shared() -> &'static PgCluster {
    static SHARED: OnceLock<PgCluster> = OnceLock::new();
    SHARED.get_or_init(|| match PgCluster::start() {
        Ok(c) => c,
        Err(e) => panic!("cannot start the shared test PostgreSQL cluster: {e}"),
    })
}

/// A database name unique in this process and among processes: `prefix`
/// (letters, digits and `_`, lowercased), the process id and a counter.
fn database_name(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let clean: String = prefix
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(40)
        .collect::<String>()
        .to_ascii_lowercase();
    format!(
        "{clean}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn run(cmd: &mut Command, what: &str) -> Result<Output, Error> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("running {what}")))?;
    if out.status.success() {
        Ok(out)
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        Err(Error::Command {
            what: what.to_string(),
            detail: format!(
                "{}: {}{}",
                out.status,
                tail(&stderr, 600),
                tail(&stdout, 300)
            ),
        })
    }
}

fn tail(s: &str, max: usize) -> &str {
    let s = s.trim();
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

fn free_port() -> Result<u16, Error> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io_err("finding a free port"))?;
    Ok(l.local_addr()
        .map_err(io_err("finding a free port"))?
        .port())
}

fn running_as_root() -> Result<bool, Error> {
    let meta = fs::metadata("/proc/self").map_err(io_err("reading /proc/self"))?;
    Ok(meta.uid() == 0)
}

fn user_exists(name: &str) -> bool {
    fs::read_to_string("/etc/passwd")
        .map(|p| p.lines().any(|l| l.split(':').next() == Some(name)))
        .unwrap_or(false)
}

/// Finds PostgreSQL's server binaries: `FICUS_PG_BIN`, then `PATH`, then the newest
/// version under Debian's `/usr/lib/postgresql/*/bin`.
pub fn find_bin_dir() -> Option<PathBuf> {
    let has_all = |dir: &Path| {
        ["initdb", "pg_ctl", "psql"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    if let Some(dir) = std::env::var_os("FICUS_PG_BIN").map(PathBuf::from)
        && has_all(&dir)
    {
        return Some(dir);
    }
    // Debian's directory is preferred over PATH because PATH often holds only the
    // client wrappers; a symlinked initdb on PATH is resolved to its real directory.
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, dir)| has_all(dir))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Some(dir);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .filter_map(|p| fs::canonicalize(p.join("initdb")).ok())
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .find(|dir| has_all(dir))
    })
}
