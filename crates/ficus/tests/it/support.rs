//! Test support for the proxy: echo backends that say who answered, and a launcher
//! that runs `ficus proxy` as a real process on free loopback ports.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use tokio::sync::watch;

pub const FICUS: &str = env!("CARGO_BIN_EXE_ficus");

/// One request as a backend saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub headers: HashMap<String, String>,
}

impl Seen {
    /// Whether this was a shadow read (the proxy marks them).
    pub fn is_shadow(&self) -> bool {
        self.headers.contains_key("x-ficus-shadow")
    }
}

/// An HTTP backend on a free port that answers with JSON naming itself.
pub struct Backend {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// What `/contract/{id}` answers; see [`Backend::set_contract`].
    contract: Arc<Mutex<Contract>>,
    /// Turned true by [`Backend::release`]; dropping it (with the backend) also
    /// lets every held request go.
    gate: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How a "new" backend's `/contract/{id}` answers: with the price bug or not,
/// and the version it states in `x-app-version` (none when empty).
#[derive(Debug, Default, Clone)]
struct Contract {
    bug: bool,
    version: String,
}

#[derive(Clone)]
struct BackendState {
    name: &'static str,
    seen: Arc<Mutex<Vec<Seen>>>,
    contract: Arc<Mutex<Contract>>,
    /// Whether every answer waits for the gate, not only those of `/held`.
    hold_all: bool,
    gate: watch::Receiver<bool>,
}

impl Backend {
    /// Starts a backend named `name` (the `backend` field of every answer).
    /// Routes: `/slow/{ms}` answers after a delay, `/status/{code}` with that
    /// status, `/ws` is a WebSocket echo, `/held` echoes once the test calls
    /// [`Backend::release`], `/priced/{id}` answers a price that differs between
    /// "legacy" and "new" and a timestamp that differs on every call, `/garbage`
    /// and `/big` answer invalid JSON and 10 MB from "new" (a small valid answer
    /// from "legacy"), `/contract/{id}` answers a home to which "new" adds
    /// members (and, with [`Backend::set_contract`], a wrong price and a version
    /// header), and anything else echoes the request.
    ///
    /// Every request is recorded when it arrives, so a held one is counted while
    /// it is still in flight.
    pub async fn start(name: &'static str) -> Backend {
        Backend::start_with(name, false).await
    }

    /// Like [`Backend::start`], but every request, on any route but `/slow`,
    /// `/status` and `/ws`, is held until [`Backend::release`]: a backend as slow
    /// as a test needs, for as long as it needs, without a clock.
    pub async fn start_held(name: &'static str) -> Backend {
        Backend::start_with(name, true).await
    }

    async fn start_with(name: &'static str, hold_all: bool) -> Backend {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let contract = Arc::new(Mutex::new(Contract::default()));
        let (gate, opened) = watch::channel(false);
        let state = BackendState {
            name,
            seen: Arc::clone(&seen),
            contract: Arc::clone(&contract),
            hold_all,
            gate: opened,
        };
        let app = Router::new()
            .route("/slow/{ms}", any(slow))
            .route("/status/{code}", any(status))
            .route("/ws", get(ws))
            .route("/held", any(held))
            .route("/priced/{id}", get(priced))
            .route("/garbage", get(garbage))
            .route("/big", get(big))
            .route("/contract/{id}", get(contract_home))
            .fallback(echo)
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Backend {
            addr,
            seen,
            contract,
            gate,
            task,
        }
    }

    /// From now on, `/contract/{id}` answers with the price bug or without, and
    /// states `version` (a "new" backend only).
    pub fn set_contract(&self, bug: bool, version: &str) {
        *self.contract.lock().unwrap() = Contract {
            bug,
            version: version.to_string(),
        };
    }

    /// Lets every held request, and every later one, be answered.
    pub fn release(&self) {
        self.gate.send_replace(true);
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Requests with this method that were not shadow reads.
    pub fn served(&self, method: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.method == method && !s.is_shadow())
            .count()
    }

    /// Requests served, of any method (everything but shadow reads).
    pub fn served_total(&self) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| !s.is_shadow())
            .count()
    }

    /// Shadow reads received.
    pub fn shadowed(&self) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.is_shadow())
            .count()
    }

    pub fn last(&self) -> Option<Seen> {
        self.seen.lock().unwrap().last().cloned()
    }
}

/// Waits until the test releases held requests (or drops the backend).
async fn released(state: &BackendState) {
    let mut gate = state.gate.clone();
    let _ = gate.wait_for(|open| *open).await;
}

/// Holds the answer of a backend started with [`Backend::start_held`].
async fn hold(state: &BackendState) {
    if state.hold_all {
        released(state).await;
    }
}

fn record(state: &BackendState, method: &str, headers: &HeaderMap) {
    // A header sent twice reads as its values joined, as HTTP combines them,
    // so that a test expecting one value sees a duplicate.
    let mut seen: HashMap<String, String> = HashMap::new();
    for (k, v) in headers {
        let v = v.to_str().unwrap_or("");
        seen.entry(k.as_str().to_string())
            .and_modify(|prior| {
                prior.push_str(", ");
                prior.push_str(v);
            })
            .or_insert_with(|| v.to_string());
    }
    let headers = seen;
    state.seen.lock().unwrap().push(Seen {
        method: method.into(),
        headers,
    });
}

async fn priced(
    State(state): State<BackendState>,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Response {
    record(&state, "GET", &headers);
    hold(&state).await;
    let price = if state.name == "new" { 101 } else { 100 };
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        .to_string();
    axum::Json(serde_json::json!({"id": id, "price": price, "at": at, "tags": ["a", "b"]}))
        .into_response()
}

/// A home under a contract that the rebuilt backend grows: "new" adds members
/// legacy never had, and may carry a price bug and state its version.
async fn contract_home(
    State(state): State<BackendState>,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Response {
    record(&state, "GET", &headers);
    hold(&state).await;
    if state.name != "new" {
        return axum::Json(serde_json::json!({"id": id, "name": "home", "price": 100}))
            .into_response();
    }
    let c = state.contract.lock().unwrap().clone();
    let body = serde_json::json!({
        "id": id,
        "name": "home",
        "price": if c.bug { 999 } else { 100 },
        "energy": "A",
        "links": {"self": format!("/contract/{id}")},
    });
    let mut response = axum::Json(body).into_response();
    if !c.version.is_empty() {
        response.headers_mut().insert(
            "x-app-version",
            axum::http::HeaderValue::from_str(&c.version).unwrap(),
        );
    }
    response
}

async fn garbage(State(state): State<BackendState>, headers: HeaderMap) -> Response {
    record(&state, "GET", &headers);
    hold(&state).await;
    let body = if state.name == "new" {
        "{\"id\": 1, oops"
    } else {
        "{\"id\": 1}"
    };
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

async fn big(State(state): State<BackendState>, headers: HeaderMap) -> Response {
    record(&state, "GET", &headers);
    hold(&state).await;
    let body = if state.name == "new" {
        format!("{{\"blob\":\"{}\"}}", "x".repeat(10 * 1024 * 1024))
    } else {
        "{\"blob\":\"x\"}".into()
    };
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// The JSON every echoing route answers with.
fn reply(
    state: &BackendState,
    req_method: &str,
    path: &str,
    headers: &HeaderMap,
    body_len: usize,
) -> Response {
    let body = serde_json::json!({
        "backend": state.name,
        "method": req_method,
        "path": path,
        "request_id": headers.get("x-request-id").and_then(|v| v.to_str().ok()),
        "tenant": headers.get("x-ficus-tenant").and_then(|v| v.to_str().ok()),
        "body_len": body_len,
    });
    axum::Json(body).into_response()
}

async fn echo(State(state): State<BackendState>, req: Request) -> Response {
    let hold_all = state.hold_all;
    echo_held(state, req, hold_all).await
}

async fn held(State(state): State<BackendState>, req: Request) -> Response {
    echo_held(state, req, true).await
}

/// Echoes the request; with `wait`, only once the test releases it.
async fn echo_held(state: BackendState, req: Request, wait: bool) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    record(&state, parts.method.as_str(), &parts.headers);
    if wait {
        released(&state).await;
    }
    reply(
        &state,
        parts.method.as_str(),
        &path,
        &parts.headers,
        body.len(),
    )
}

async fn slow(
    State(state): State<BackendState>,
    Path(ms): Path<u64>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(&state, "ANY", &headers);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    reply(&state, "ANY", &format!("/slow/{ms}"), &headers, body.len())
}

async fn status(
    State(state): State<BackendState>,
    Path(code): Path<u16>,
    headers: HeaderMap,
) -> Response {
    record(&state, "ANY", &headers);
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::IM_A_TEAPOT),
        format!("{{\"backend\":\"{}\"}}", state.name),
    )
        .into_response()
}

async fn ws(
    State(state): State<BackendState>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    record(&state, "GET", &headers);
    let name = state.name;
    upgrade.on_upgrade(move |mut socket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            if let Message::Text(t) = msg {
                let reply = format!("{name}: {}", t.as_str());
                if socket.send(Message::Text(reply.into())).await.is_err() {
                    break;
                }
            }
        }
    })
}

/// A TCP listener that accepts connections and closes them at once, like a backend
/// that resets every request.
pub async fn resetting_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            // A zero linger makes the close an RST and never blocks, which is the
            // case the deprecation warns about.
            #[allow(
                deprecated,
                reason = "zero linger: an immediate RST, no blocking close"
            )]
            let _ = stream.set_linger(Some(Duration::ZERO));
            drop(stream);
        }
    });
    (addr, task)
}

/// What a [`recording_backend`] received: the raw bytes of every connection, and
/// whether the proxy has closed it.
#[derive(Default)]
pub struct Wire {
    conns: Mutex<Vec<(Vec<u8>, bool)>>,
}

impl Wire {
    /// The bytes received on each connection so far.
    pub fn connections(&self) -> Vec<Vec<u8>> {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .map(|(bytes, _)| bytes.clone())
            .collect()
    }

    /// Whether the proxy has closed every connection it opened, so nothing more
    /// can arrive on them.
    pub fn all_closed(&self) -> bool {
        self.conns.lock().unwrap().iter().all(|(_, closed)| *closed)
    }
}

/// A backend that never answers and keeps the raw bytes of every connection, to
/// prove exactly what the proxy sent.
pub async fn recording_backend() -> (SocketAddr, Arc<Wire>, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let wire: Arc<Wire> = Arc::default();
    let record = Arc::clone(&wire);
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let record = Arc::clone(&record);
            let slot = {
                let mut all = record.conns.lock().unwrap();
                all.push((Vec::new(), false));
                all.len() - 1
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    record.conns.lock().unwrap()[slot]
                        .0
                        .extend_from_slice(&buf[..n]);
                }
                record.conns.lock().unwrap()[slot].1 = true;
            });
        }
    });
    (addr, wire, task)
}

/// A backend that answers the first request on each connection (keep-alive)
/// and closes the connection under the second without answering, as an
/// upstream whose keep-alive timeout ends just as a request arrives. Keeps the
/// head of every request it read, by connection, in arrival order.
pub async fn closing_backend() -> (SocketAddr, Arc<Mutex<Vec<Vec<String>>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
    let seen = Arc::clone(&heads);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = Arc::clone(&seen);
            let conn = {
                let mut all = seen.lock().unwrap();
                all.push(Vec::new());
                all.len() - 1
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // One whole head, and the body its Content-Length names.
                    let end = loop {
                        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break at + 4;
                        }
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    let length: usize = head
                        .lines()
                        .filter_map(|l| l.split_once(':'))
                        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
                        .map_or(0, |(_, v)| v.trim().parse().unwrap());
                    while buf.len() < end + length {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..end + length);
                    let nth = {
                        let mut all = seen.lock().unwrap();
                        all[conn].push(head);
                        all[conn].len()
                    };
                    if nth > 1 {
                        return;
                    }
                    let body = format!("{{\"backend\":\"legacy\",\"connection\":{conn}}}");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, heads)
}

/// A loopback address where nothing listens.
pub fn dead_address() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Two free loopback ports, told apart: both are held while the second is
/// picked, since a port picked and released alone may be handed out again at
/// once (regression: a proxy was given one port for its listener and its admin
/// listener, and refused to start).
fn free_ports() -> (u16, u16) {
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, b) = (bind(), bind());
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

/// A running `ficus proxy` process.
pub struct Proxy {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What a test proxy routes to and how.
#[derive(Default)]
pub struct ProxySetup<'a> {
    pub store: &'a str,
    pub legacy: Vec<SocketAddr>,
    pub new: Vec<SocketAddr>,
    /// More TOML appended after the defaults (rules, routes, backend options).
    pub extra: &'a str,
    /// Lines added to the `[proxy]` table.
    pub proxy_extra: &'a str,
    /// Lines added to the `[backends.new]` table.
    pub new_extra: &'a str,
    pub env: Vec<(&'a str, &'a str)>,
    /// Both backends' read timeout; `None` is 60 s. Every timeout of a test proxy
    /// is generous unless a test sets it, because a test proves what the proxy
    /// does, not how fast a loaded machine answers (regression: with a 2 s read
    /// timeout the proxy cut a WebSocket whose first echo took longer than that
    /// to come back on a busy machine).
    pub read_timeout_ms: Option<u64>,
}

pub const HEADER_RULE: &str = "[[tenant_from]]\nheader = \"X-Tenant-Id\"\n";

impl Proxy {
    pub fn config_text(setup: &ProxySetup<'_>, listen: SocketAddr, admin: SocketAddr) -> String {
        let list = |addrs: &[SocketAddr]| {
            addrs
                .iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let read = setup.read_timeout_ms.unwrap_or(60_000);
        format!(
            "[proxy]\nlisten = [\"{listen}\"]\nadmin_listen = \"{admin}\"\nstore = \"{}\"\ntraffic_flush_ms = 200\ndrain_timeout_ms = 60000\n{}\n\n\
             [backends.legacy]\nupstreams = [{}]\nconnect_timeout_ms = 10000\nread_timeout_ms = {read}\n\n\
             [backends.new]\nupstreams = [{}]\nconnect_timeout_ms = 10000\nread_timeout_ms = {read}\n{}\n\n{}",
            setup.store,
            setup.proxy_extra,
            list(&setup.legacy),
            list(&setup.new),
            setup.new_extra,
            setup.extra,
        )
    }

    /// Starts a proxy and waits until `/readyz` says it has a routing table and
    /// its listener accepts connections.
    pub async fn start(setup: ProxySetup<'_>) -> Proxy {
        let mut proxy = Proxy::spawn(setup);
        proxy.wait_ready().await;
        proxy
    }

    /// Starts a proxy and waits only until its listener accepts connections,
    /// whether or not it has a routing table yet.
    pub async fn start_unready(setup: ProxySetup<'_>) -> Proxy {
        let mut proxy = Proxy::spawn(setup);
        let deadline = Instant::now() + PATIENCE;
        while tokio::net::TcpStream::connect(proxy.addr).await.is_err() {
            if let Some(status) = proxy
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("ficus proxy exited with {status}: {}", proxy.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "ficus proxy did not listen within {PATIENCE:?}: {}",
                proxy.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        proxy
    }

    fn spawn(setup: ProxySetup<'_>) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let (port, admin_port) = free_ports();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
        let config = dir.path().join("ficus.toml");
        std::fs::write(&config, Proxy::config_text(&setup, addr, admin)).unwrap();
        let log = dir.path().join("proxy.log");
        let mut cmd = Command::new(FICUS);
        cmd.args(["proxy", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in &setup.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        Proxy {
            child: Some(child),
            addr,
            admin,
            config,
            log,
            _dir: dir,
        }
    }

    async fn wait_ready(&mut self) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            // `/readyz` is served by the admin listener, which is bound before the
            // proxy's own; on a busy machine the routing table can be loaded before
            // the proxy's listener is bound, so the test also waits for that.
            if let Ok(r) = client.get(self.admin_url("/readyz")).send().await
                && r.status() == 200
                && tokio::net::TcpStream::connect(self.addr).await.is_ok()
            {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("ficus proxy exited with {status}: {}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "ficus proxy not ready within {PATIENCE:?}: {}",
            self.log_text()
        );
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args(["-s", sig, &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -s {sig} failed");
    }

    /// Waits for the process to exit on its own.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy did not exit within {timeout:?}: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(self.admin_url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The change-log position of the routing table the proxy routes by now.
    pub async fn routing_seq(&self) -> u64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix("ficus_routing_snapshot_seq "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// A fresh SQLite store with these tenants, as `(id, stage)`.
pub fn sqlite_store(dir: &std::path::Path, tenants: &[(&str, &str)]) -> String {
    let store = format!("sqlite:{}", dir.join("ficus.db").display());
    ficus(&store, &["init"]);
    for (id, stage) in tenants {
        ficus(&store, &["tenant", "add", id, "--stage", stage]);
    }
    store
}

/// A client whose timeout only ends a stuck request, never a slow one.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .unwrap()
}

/// Runs a `ficus` command against `store` with `--json` and parses its answer.
pub fn ficus_json(store: &str, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    serde_json::from_str(&ficus(store, &all)).unwrap()
}

/// Runs a `ficus` command against `store`, which must succeed.
pub fn ficus(store: &str, args: &[&str]) -> String {
    let out = Command::new(FICUS)
        .args(args)
        .env("FICUS_STORE", store)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ficus {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a `ficus` command against `store` that must fail with status 1; returns
/// its stderr.
pub fn ficus_fails(store: &str, args: &[&str]) -> String {
    let out = Command::new(FICUS)
        .args(args)
        .env("FICUS_STORE", store)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "ficus {args:?} should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

/// GETs `path` through the proxy as `tenant` and returns (status, JSON body).
pub async fn get_as(
    client: &reqwest::Client,
    proxy: &Proxy,
    tenant: &str,
    path: &str,
) -> (u16, serde_json::Value) {
    let failed = |e: reqwest::Error| -> ! {
        panic!(
            "GET {path} as {tenant}: {e:?}\n--- proxy log\n{}",
            proxy.log_text()
        )
    };
    let r = client
        .get(proxy.url(path))
        .header("x-tenant-id", tenant)
        .send()
        .await
        .unwrap_or_else(|e| failed(e));
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_else(|e| failed(e));
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

/// How long a test waits for something that happens at once on an idle machine:
/// long enough that only a stuck run fails, however busy the machine is.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Polls until `f` is true or the timeout passes; returns how long it took.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f().await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not met within {timeout:?}");
}

/// The common set-up: a SQLite store with these tenants, a `legacy` and a `new`
/// echo backend, and a proxy resolving tenants from `X-Tenant-Id`, with
/// `proxy_extra` added to its `[proxy]` table.
///
/// Destructure it binding every field by name (`new: _new`, `dir: _dir`): `..` or
/// `_` drops those fields at once, which stops a backend or deletes the store.
pub struct Rig {
    pub store: String,
    pub legacy: Backend,
    pub new: Backend,
    pub proxy: Proxy,
    /// Holds the store's directory; bind it (as `dir: _dir`) for as long as the
    /// store is used.
    pub dir: tempfile::TempDir,
}

impl Rig {
    pub async fn start(tenants: &[(&str, &str)], proxy_extra: &str) -> Rig {
        Rig::start_with(tenants, proxy_extra, "", Backend::start("new").await).await
    }

    /// Like [`Rig::start`] with more TOML after the header rule (a `[shadow]`
    /// table, `[[compare]]` rules) and a given `new` backend.
    pub async fn start_with(
        tenants: &[(&str, &str)],
        proxy_extra: &str,
        extra: &str,
        new: Backend,
    ) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_store(dir.path(), tenants);
        let legacy = Backend::start("legacy").await;
        let extra = format!("{HEADER_RULE}{extra}");
        let proxy = Proxy::start(ProxySetup {
            store: &store,
            legacy: vec![legacy.addr],
            new: vec![new.addr],
            extra: &extra,
            proxy_extra,
            ..Default::default()
        })
        .await;
        Rig {
            store,
            legacy,
            new,
            proxy,
            dir,
        }
    }
}
