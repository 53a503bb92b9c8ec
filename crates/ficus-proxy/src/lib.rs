//! `ficus proxy`: the data plane. It stands where the legacy backend stood, resolves
//! each request's tenant, and forwards it to exactly one backend according to that
//! tenant's stage in a routing table fed by the control store's change feed.
//!
//! Built on hyper: [`request`] is the request path's decisions, [`hyper_engine`]
//! carries them over HTTP/1 and h2c connections, [`table`]
//! the routing table and its follower, [`resolve`] tenant resolution, [`config`] the
//! one TOML file, [`admin`] the admin listener, [`metrics`] Prometheus metrics and
//! legacy-traffic counting. [`run`] wires them into one process with one shutdown
//! signal.

pub mod admin;
pub mod census;
mod clock;
pub mod config;
pub mod drain;
pub mod guard;
pub mod hyper_engine;
pub mod metrics;
pub mod request;
pub mod resolve;
pub mod served_config;
pub mod shadow;
pub mod table;
pub mod tape;
pub mod writes;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ficus_core::Timestamp;
use ficus_store::{ControlStore, OpenMode, StoreUrl};

pub use crate::config::{Config, ConfigError};
use crate::request::Shared;

/// The request path's hash maps and sets: foldhash, seeded at random per
/// process. std's SipHash cost about 190 instructions a lookup, and a request
/// makes about ten (BENCHMARKS.md). The keys a client chooses are either
/// bounded (the census's client versions and routes) or only looked up, never
/// inserted (tenants and domains come from the store), so a weaker hash gives
/// a client nothing to flood.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub(crate) type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// A header value whose clones share its buffer. A value made from a copy
/// (`HeaderValue::from_str`) is copied again, into a new allocation, the first
/// time it is cloned, and the forwarded head is cloned for every request that
/// may be sent again; one made this way is only counted.
pub(crate) fn shared_value<T: AsRef<[u8]> + Send + 'static>(owner: T) -> Option<http::HeaderValue> {
    http::HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(owner)).ok()
}

/// The one shutdown signal every service of the proxy watches: it turns true
/// when the listeners close.
pub type ShutdownWatch = tokio::sync::watch::Receiver<bool>;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("invalid store url in the config: {0}")]
    Store(#[from] ficus_store::StoreError),
    #[error("cannot bind the admin listener {addr}: {source}")]
    AdminBind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot listen on {addr}: {source}; another process is listening there (a second replica configured with the same address would be sent this one's traffic)"
    )]
    ListenBind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A socket bound to `addr` with `SO_REUSEADDR`, so a restart over a previous
/// run's closing connections still succeeds. Listeners bind before the admin
/// listener says ready: a replica given a port another process listens on
/// fails at start (found by the soak on pingora, which retried the bind in the
/// background while the admin listener said ready, and the load balancer's
/// traffic went to the other replica).
fn bind_reusing(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// Waits for SIGTERM or SIGINT, then sets `draining` and serves on for the
/// drain delay (a second signal cuts it short); returns when the listeners
/// are to close. Closing them at once reset the connections a load balancer
/// had just opened, a write already in some, which it may not retry (found by
/// the soak, seed 7: one POST lost during a drain).
async fn drain_signal(shared: &Shared) {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            shared.draining.store(true, Ordering::SeqCst);
            let delay = shared.settings.load().drain_delay;
            tracing::info!(
                drain_delay_ms = delay.as_millis() as u64,
                "shutdown requested: /readyz says 503; still serving so load balancers stop sending first"
            );
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = term.recv() => tracing::info!("second signal: not waiting out the drain delay"),
                _ = int.recv() => tracing::info!("second signal: not waiting out the drain delay"),
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot watch for SIGTERM/SIGINT; the proxy will not drain on a signal");
            std::future::pending::<()>().await;
        }
    }
    tracing::info!("listeners closing: draining in-flight requests");
}

fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp::from_unix_millis(d.as_millis() as i64)
}

/// Sets up logging once per process, text or JSON lines, filtered by `RUST_LOG`
/// (default `info`).
pub fn init_logging(format: config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        config::LogFormat::Json => builder.json().try_init(),
        config::LogFormat::Text => builder.try_init(),
    };
}

/// Writes the legacy-traffic counts and the route census to the store; on
/// failure they are kept for the next attempt.
async fn flush_traffic(shared: &Shared, store: &dyn ControlStore) {
    let counts = shared.traffic.take();
    if let Err(e) = store.record_legacy_traffic(&counts, now()).await {
        tracing::warn!(error = %e, "could not record legacy traffic; will retry");
        shared.traffic.restore(counts);
    }
    let routes = shared.census.take();
    if !routes.is_empty()
        && let Err(e) = store.record_route_census(&routes).await
    {
        tracing::warn!(error = %e, "could not record the route census; will retry");
        shared.census.restore(routes);
    }
}

/// Writes comparison evidence (counts, mismatch samples, noise, mismatch
/// classes) to the store; on failure all but the noise (which is sent whole
/// every time) is kept for the next attempt.
async fn flush_comparisons(shared: &Shared, store: &dyn ControlStore) {
    let latencies = shared.shadow.take_latencies();
    if let Err(e) = store.record_latencies(&latencies).await {
        tracing::warn!(error = %e, "could not record latencies; will retry");
        shared.shadow.restore_latencies(latencies);
    }
    let evidence = shared.shadow.take();
    if evidence == ficus_store::Evidence::default() {
        return;
    }
    if let Err(e) = store.record_comparisons(&evidence).await {
        tracing::warn!(error = %e, "could not record comparisons; will retry");
        shared.shadow.restore(evidence);
    }
}

/// How far back the guard's latency baselines look: the parallel run before the
/// tenant was migrated.
const BASELINE_SPAN_MS: i64 = 7 * 24 * 60 * 60 * 1000;
/// How often the baselines are read again.
const BASELINE_REFRESH: Duration = Duration::from_secs(60);

/// Reads the legacy p99 of the tenants the guard is watching (all of them, or
/// those it has none for yet), so that it can judge the new backend's latency
/// against what legacy did for that tenant.
async fn refresh_baselines(shared: &Shared, store: &dyn ControlStore, missing_only: bool) {
    let since = Timestamp::from_unix_millis(now().unix_millis() - BASELINE_SPAN_MS);
    let mut found = Vec::new();
    for tenant in shared.guard.active(missing_only) {
        match store.latencies(&tenant, since).await {
            Ok(evidence) => {
                if let Some(p99) = evidence.legacy.quantile_micros(0.99) {
                    found.push((tenant, p99));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read latency baselines; will retry");
                return;
            }
        }
    }
    shared.guard.set_baselines(found);
}

/// Runs the proxy until it is told to stop. Returns once in-flight requests have
/// drained (or the drain deadline passed) and the last traffic counts are written.
pub fn run(config_path: &Path) -> Result<(), ProxyError> {
    let config = Config::load(config_path)?;
    init_logging(config.log_format);
    let store_url = StoreUrl::parse(&config.store)?;
    let shared = Arc::new(Shared::new(config.settings.clone()));

    // Bind the admin listener now, so a port conflict is a start-up error rather
    // than a log line from a background task.
    let admin_listener = std::net::TcpListener::bind(config.admin_listen).map_err(|source| {
        ProxyError::AdminBind {
            addr: config.admin_listen,
            source,
        }
    })?;
    admin_listener
        .set_nonblocking(true)
        .map_err(|source| ProxyError::AdminBind {
            addr: config.admin_listen,
            source,
        })?;

    serve(config, shared, store_url, admin_listener)
}

/// Binds the listeners, starts the background services as tasks on one
/// runtime with one shutdown watch and the request workers on another, and
/// drains on the first SIGTERM or SIGINT.
fn serve(
    config: Config,
    shared: Arc<Shared>,
    store_url: StoreUrl,
    admin_listener: std::net::TcpListener,
) -> Result<(), ProxyError> {
    let addr = config
        .listen
        .first()
        .copied()
        .unwrap_or(config.admin_listen);
    // The control side (background services, signals, the drain) runs here;
    // requests run on their own runtime ([`worker_runtime`]), so a burst of
    // them never holds up the change feed or a signal.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ProxyError::ListenBind { addr, source })?;
    let drain = config.settings.drain_timeout;
    let threads = config.threads;
    let result = runtime.block_on(async move {
        let mut listeners = Vec::new();
        for addr in &config.listen {
            let listener = bind_reusing(*addr)
                .and_then(|s| s.listen(1024))
                .and_then(|l| l.into_std())
                .map_err(|source| ProxyError::ListenBind {
                    addr: *addr,
                    source,
                })?;
            listeners.push(listener);
        }
        tracing::info!(engine = "hyper", listen = ?config.listen, "proxy listening");
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(table::follow(
            store_url.clone(),
            Arc::clone(&shared.table),
            Arc::clone(&shared.table_loaded),
            Arc::clone(&shared.health),
            Arc::clone(&shared.store),
            stopped.clone(),
        ));
        tokio::spawn(flush_loop(
            store_url.clone(),
            Arc::clone(&shared),
            stopped.clone(),
        ));
        {
            tokio::spawn(resume_provisioning(Arc::clone(&shared), stopped.clone()));
        }
        tokio::spawn(admin::serve(
            admin_listener,
            Arc::clone(&shared),
            stopped.clone(),
        ));
        let path = config.path.clone();
        let header_case = config.header_case;
        let pool_size = config.upstream_pool_size;
        tokio::spawn(reload_on_sighup(
            path,
            Arc::clone(&shared),
            Arc::new(std::sync::Mutex::new(config)),
            stopped.clone(),
        ));

        let builder = Arc::new(hyper_engine::server_builder(header_case));
        // One engine, and so one upstream pool, for every worker thread: a
        // connection's task runs on whichever thread has a core for it.
        let engine = Arc::new(hyper_engine::Engine::new(
            Arc::clone(&shared),
            pool_size,
            header_case,
        ));
        let (stopped, serving) = (stopped.clone(), Arc::clone(&shared));
        let workers = std::thread::Builder::new()
            .name("ficus-workers".into())
            .spawn(move || {
                hyper_workers(threads, listeners, engine, builder, stopped, serving, drain)
            })
            .map_err(|source| ProxyError::ListenBind { addr, source })?;

        drain_signal(&shared).await;
        let _ = stop.send(true);
        let started = Instant::now();
        let _ = tokio::task::spawn_blocking(move || workers.join()).await;
        let left = shared.in_flight.load(Ordering::SeqCst);
        match tokio::time::timeout(
            Duration::from_secs(5),
            ficus_store::open(&store_url, OpenMode::Existing),
        )
        .await
        {
            Ok(Ok(store)) => {
                flush_traffic(&shared, &*store).await;
                flush_comparisons(&shared, &*store).await;
            }
            _ => {
                tracing::warn!("could not reach the store to write the last legacy-traffic counts")
            }
        }
        tracing::info!(
            in_flight = left,
            drained_in_ms = started.elapsed().as_millis() as u64,
            "proxy stopped"
        );
        Ok(())
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// The runtime requests run on: `threads` workers that steal each other's
/// tasks, or one thread of its own when `threads` is 1.
///
/// A connection is not tied to the thread that accepted it: when one thread
/// is held up (a core shared with other work, a long poll), the other takes
/// its ready connections. Each worker its own one-thread runtime, with the
/// connections spread evenly at accept, ran two threads at the pace of the one
/// with the busier core (BENCHMARKS.md: 0.89x nginx where work stealing ran at
/// 0.91x-0.97x, a core shared with the load).
pub fn worker_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads > 1 {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("ficus-worker")
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }
}

/// The request workers: accepts and serves on [`worker_runtime`] until
/// `stopped`, then lets the connections finish their requests (and the
/// tunnels close) within the drain deadline. When `threads` is 1 the calling
/// thread is the worker.
fn hyper_workers(
    threads: usize,
    listeners: Vec<std::net::TcpListener>,
    engine: Arc<hyper_engine::Engine>,
    builder: Arc<hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>>,
    stopped: tokio::sync::watch::Receiver<bool>,
    shared: Arc<Shared>,
    drain: Duration,
) {
    let runtime = match worker_runtime(threads) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the request workers");
            return;
        }
    };
    runtime.block_on(async move {
        tokio::spawn(keep_a_timer_ahead(stopped.clone()));
        let mut accepting = Vec::new();
        for l in listeners {
            match tokio::net::TcpListener::from_std(l) {
                Ok(l) => accepting.push(tokio::spawn(hyper_engine::accept(
                    l,
                    Arc::clone(&engine),
                    Arc::clone(&builder),
                    stopped.clone(),
                ))),
                Err(e) => tracing::error!(error = %e, "cannot accept on a listener"),
            }
        }
        let mut open = Vec::new();
        for task in accepting {
            if let Ok(drain) = task.await {
                open.push(drain);
            }
        }
        let started = Instant::now();
        // Closes idle connections and, on each busy one, lets its request end.
        let closing = futures_join_all(open.into_iter().map(|d| d.close()));
        if tokio::time::timeout(drain, closing).await.is_err() {
            tracing::warn!("drain timeout: closing connections with requests still in flight");
        }
        // Upgraded connections outlive their HTTP connection: their requests
        // stay in flight until their tunnels close, or the deadline.
        while shared.in_flight.load(Ordering::SeqCst) > 0 && started.elapsed() < drain {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    runtime.shutdown_timeout(Duration::from_millis(100));
}

/// How far ahead of now the workers' timer wheel always holds a timer.
const TIMER_AHEAD: Duration = Duration::from_millis(250);

/// Keeps a timer due within [`TIMER_AHEAD`] in the workers' timer wheel until
/// shutdown. tokio wakes its driver through an eventfd (a `write` system call)
/// whenever a timer is armed earlier than every other one; with no other
/// timer, every request's read timeout was such a timer, one system call per
/// request (found by `strace` in `per_request.sh`: 0.77 `write`s a request
/// that nginx and the hyper floor do not make). With this one always due
/// sooner, a request's timers (seconds away) are never the earliest.
async fn keep_a_timer_ahead(mut stopped: ShutdownWatch) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(TIMER_AHEAD) => {}
            _ = stopped.changed() => return,
        }
    }
}

/// Finishes the jobs of billing events received on the admin listener that
/// could not finish (an unavailable database, a crash between steps), once the
/// routing-table follower has opened the store.
async fn resume_provisioning(shared: Arc<Shared>, mut shutdown: ShutdownWatch) {
    let store = loop {
        if let Some(s) = shared.store.get() {
            break Arc::clone(s);
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = shutdown.changed() => return,
        }
    };
    ficus_admin::provision::resume(
        store,
        ficus_admin::provision::Hooks::from_env(),
        Duration::from_secs(5),
        shutdown,
    )
    .await;
}

/// Waits for every future, run side by side.
async fn futures_join_all<F: Future<Output = ()> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) {
    let tasks: Vec<_> = futures.map(tokio::spawn).collect();
    for task in tasks {
        let _ = task.await;
    }
}

/// Flushes comparison evidence every `shadow.flush_ms` and legacy-traffic counts
/// every `traffic_flush_ms` until shutdown.
async fn flush_loop(url: StoreUrl, shared: Arc<Shared>, mut shutdown: ShutdownWatch) {
    let store = loop {
        match ficus_store::open(&url, OpenMode::Existing).await {
            Ok(s) => break s,
            Err(_) => {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    };
    let mut last_traffic = Instant::now();
    let mut last_baselines: Option<Instant> = None;
    let mut marked: std::collections::HashSet<String> = std::collections::HashSet::new();
    loop {
        let settings = shared.settings.load_full();
        mark_destructive(&settings, &*store, &mut marked).await;
        tokio::select! {
            () = tokio::time::sleep(settings.shadow.flush.min(settings.traffic_flush)) => {}
            _ = shutdown.changed() => return,
        }
        flush_comparisons(&shared, &*store).await;
        // A tenant new to the guard gets its baseline at the next flush; all of
        // them are read again now and then, as their parallel-run data grows.
        let all = last_baselines.is_none_or(|at| at.elapsed() >= BASELINE_REFRESH);
        if all {
            last_baselines = Some(Instant::now());
        }
        refresh_baselines(&shared, &*store, !all).await;
        if last_traffic.elapsed() >= settings.traffic_flush {
            last_traffic = Instant::now();
            flush_traffic(&shared, &*store).await;
        }
    }
}

/// Marks the routes the configuration lists as destructive in the store, where
/// every release is checked; each once per process (and again after a reload
/// lists more), and again after a failure.
async fn mark_destructive(
    settings: &config::Settings,
    store: &dyn ControlStore,
    marked: &mut std::collections::HashSet<String>,
) {
    for route in &settings.destructive_routes {
        let name = route.to_string();
        if marked.contains(&name) {
            continue;
        }
        match store
            .mark_route(
                route,
                true,
                ficus_core::Actor::Proxy,
                "listed in destructive_routes of the proxy's configuration",
            )
            .await
        {
            Ok(_) => {
                marked.insert(name);
            }
            Err(e) => {
                tracing::warn!(route = %name, error = %e, "could not mark a destructive route; will retry")
            }
        }
    }
}

/// SIGHUP re-reads the config through the same path as start-up. A config that does
/// not load is refused and the running one stays; settings that need new listeners
/// or a new store are reported and kept as they were.
async fn reload_on_sighup(
    path: std::path::PathBuf,
    shared: Arc<Shared>,
    current: Arc<std::sync::Mutex<Config>>,
    mut shutdown: ShutdownWatch,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch for SIGHUP; reload is unavailable");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {}
            _ = shutdown.changed() => return,
        }
        match Config::load(&path) {
            Ok(new) => {
                let mut current = current.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(fields) = current.restart_needed_for(&new) {
                    tracing::warn!(
                        fields,
                        "reloaded; these settings need a restart and keep their running values"
                    );
                }
                shared.settings.store(Arc::new(new.settings.clone()));
                *current = new;
                tracing::info!(path = %path.display(), "configuration reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "configuration reload refused; the running configuration stays")
            }
        }
    }
}
