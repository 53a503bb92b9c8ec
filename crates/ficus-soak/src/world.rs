//! The processes of the soak's topology: the `ficus proxy` replicas on the
//! shared PostgreSQL store, HAProxy in front of them, and the client
//! processes. Each is killed when its handle is dropped, so a soak that fails
//! half-way leaves nothing running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A free loopback address (the port may in theory be taken before it is used;
/// the process that binds it then fails to start, loudly).
/// A loopback address nothing listens on now, never one this process handed
/// out before: the kernel may give a just-released port again at once (seed 3
/// gave both replicas the same one).
pub fn free_addr() -> Result<String> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        if !given.contains(&addr.port()) {
            given.push(addr.port());
            return Ok(addr.to_string());
        }
    }
}

fn port(addr: &str) -> &str {
    addr.rsplit(':').next().unwrap_or(addr)
}

/// A child process killed on drop.
pub struct Proc {
    child: Option<Child>,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Proc> {
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            child: Some(child),
            name: name.to_string(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` (by name, as `kill` takes it).
    pub fn signal(&self, signal: &str) -> Result<()> {
        let Some(pid) = self.pid() else {
            bail!("{} is not running", self.name)
        };
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{signal} {pid} ({}) failed", self.name);
        }
        Ok(())
    }

    /// Waits up to `limit` for the process to exit by itself.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let started = Instant::now();
        let Some(child) = self.child.as_mut() else {
            bail!("{} is not running", self.name)
        };
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if started.elapsed() > limit {
                bail!("{} did not exit within {limit:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// What a replica's configuration points at.
pub struct Upstreams {
    pub store: String,
    pub legacy: String,
    pub new: Vec<String>,
    pub tenant_db: String,
    pub secret: String,
}

/// One `ficus proxy` replica; its addresses stay the same across restarts, so
/// the load balancer finds it again.
pub struct Replica {
    pub name: String,
    pub addr: String,
    pub admin: String,
    config: PathBuf,
    log: PathBuf,
    ficus: PathBuf,
    env: Vec<(String, String)>,
    pub proc: Option<Proc>,
}

impl Replica {
    pub fn new(dir: &Path, name: &str, ficus: &Path, up: &Upstreams) -> Result<Replica> {
        let (addr, admin) = (free_addr()?, free_addr()?);
        let config = dir.join(format!("{name}.toml"));
        let new: Vec<String> = up.new.iter().map(|a| format!("\"{a}\"")).collect();
        std::fs::write(
            &config,
            format!(
                "[proxy]\nlisten = [\"{addr}\"]\nadmin_listen = \"{admin}\"\nstore = \"{store}\"\n\
                 traffic_flush_ms = 200\ndrain_timeout_ms = 20000\ndrain_delay_ms = 3000\n\n\
                 [backends.legacy]\nupstreams = [\"{legacy}\"]\nread_timeout_ms = 10000\n\n\
                 [backends.new]\nupstreams = [{new}]\nread_timeout_ms = 10000\nidempotency_header = \"idempotency-key\"\n\n\
                 [[tenant_from]]\nhost = \"{{tenant}}.portal.test\"\n\n\
                 [shadow]\nsample_rate = 1.0\nflush_ms = 200\nmax_per_second = 10000\ntimeout_ms = 2000\nversion_header = \"x-app-version\"\n\n\
                 [guard]\nenabled = true\nwindow_ms = 5000\nmin_requests = 10\nmax_error_rate = 0.2\nmax_latency_ratio = 50.0\nmax_slow_rate = 0.5\ncooldown_ms = 5000\n",
                store = up.store,
                legacy = up.legacy,
                new = new.join(", "),
            ),
        )?;
        Ok(Replica {
            name: name.to_string(),
            addr,
            admin,
            log: dir.join(format!("{name}.log")),
            config,
            ficus: ficus.to_path_buf(),
            env: vec![
                ("FICUS_BILLING_SECRET".into(), up.secret.clone()),
                ("FICUS_TENANT_DB_URL".into(), up.tenant_db.clone()),
                ("RUST_LOG".into(), "warn".into()),
            ],
            proc: None,
        })
    }

    /// Starts the replica and waits until its `/readyz` answers 200.
    pub async fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(&self.ficus);
        cmd.args(["proxy", "--config"])
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.proc = Some(Proc::spawn(&self.name, &mut cmd)?);
        let http = reqwest::Client::builder().no_proxy().build()?;
        let started = Instant::now();
        loop {
            if let Ok(r) = http
                .get(format!("http://{}/readyz", self.admin))
                .send()
                .await
                && r.status().is_success()
            {
                return Ok(());
            }
            if !self.proc.as_mut().is_some_and(Proc::running) {
                bail!("{} exited at start; see {}", self.name, self.log.display());
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!(
                    "{} did not become ready; see {}",
                    self.name,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// HAProxy in front of the replicas, health-checking each one's `/readyz`.
pub struct Haproxy {
    pub addr: String,
    pub log: PathBuf,
    proc: Proc,
}

impl Haproxy {
    pub async fn start(dir: &Path, replicas: &[&Replica]) -> Result<Haproxy> {
        let addr = free_addr()?;
        let servers: String = replicas
            .iter()
            .map(|r| {
                format!(
                    "  server {} {} check port {}\n",
                    r.name,
                    r.addr,
                    port(&r.admin)
                )
            })
            .collect();
        // Writes are never retried by the load balancer once sent (a retried
        // write could be applied twice); reads are, on another replica, when
        // the one they were sent to died before answering. Each request gets
        // its own connection to a replica, so a replica that drains never has
        // an idle connection a request could race it for.
        let config = format!(
            "global\n  maxconn 8192\n  log stdout format raw local0\n\n\
             defaults\n  mode http\n  log global\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n  timeout check 1s\n\
               option http-server-close\n  retries 3\n  option redispatch 1\n  retry-on conn-failure empty-response\n\
               unique-id-format %[req.hdr(x-request-id)]\n  log-format \"%ID %s %ST %tsc %Ta %rc\"\n\n\
             frontend clients\n  bind {addr}\n  http-request disable-l7-retry if !METH_GET !METH_HEAD\n  default_backend replicas\n\n\
             backend replicas\n  balance roundrobin\n  option httpchk GET /readyz\n  http-check expect status 200\n\
               default-server inter 300ms fall 2 rise 2\n{servers}"
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config)?;
        let log_path = dir.join("haproxy.log");
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let proc = Proc::spawn("haproxy", &mut cmd).map_err(|e| {
            e.context(
                "HAProxy is needed in front of the replicas: on Debian, apt-get install haproxy",
            )
        })?;
        let h = Haproxy {
            addr,
            log: log_path,
            proc,
        };
        let started = Instant::now();
        while tokio::net::TcpStream::connect(&h.addr).await.is_err() {
            if started.elapsed() > Duration::from_secs(20) {
                bail!("haproxy did not listen on {}", h.addr);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(h)
    }

    /// Stops HAProxy so its log is complete.
    pub async fn stop(&mut self) {
        let _ = self.proc.signal("USR1");
        let _ = self.proc.wait_exit(Duration::from_secs(10)).await;
        self.proc.kill9();
    }
}

/// A client process for one tenant; it stops when its standard input closes.
pub struct Client {
    pub tenant: String,
    pub log: PathBuf,
    child: Child,
}

impl Client {
    pub fn start(
        dir: &Path,
        target: &str,
        tenant: &str,
        zero: bool,
        rate: u32,
        homes: u32,
    ) -> Result<Client> {
        let log = dir.join(format!("client-{tenant}.jsonl"));
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["client", "--target", target, "--tenant", tenant])
            .args(["--rate", &rate.to_string(), "--homes", &homes.to_string()])
            .arg("--log")
            .arg(&log)
            .stdin(Stdio::piped())
            .stdout(Stdio::null());
        if zero {
            cmd.arg("--zero");
        }
        let child = cmd.spawn().context("starting a client")?;
        Ok(Client {
            tenant: tenant.to_string(),
            log,
            child,
        })
    }

    /// Closes its input and waits for it to finish what is in flight.
    pub async fn stop(mut self) -> Result<PathBuf> {
        drop(self.child.stdin.take());
        let started = Instant::now();
        loop {
            if self.child.try_wait()?.is_some() {
                return Ok(self.log.clone());
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                bail!("the client of {} did not stop", self.tenant);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
