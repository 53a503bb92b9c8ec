//! `ficus proxy --config ficus.toml`: parsing and validating the proxy's one file.
//!
//! Parsing is strict: an unknown key is an error naming the key and its line, and
//! every value with rules of its own (addresses, header names, patterns, timeouts)
//! is checked here, so that a config that loads is a config that runs. Start-up and
//! SIGHUP reload both go through [`Config::load`].

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ficus_core::UnknownTenant;
use http::HeaderName;
use serde::Deserialize;
use toml::Spanned;

use crate::resolve::{HostPattern, JwtKey, JwtRule, PathPattern, Rule};

/// Headers a configured header name may not be ([`Settings::tenant_header`]
/// and the two beside it): the proxy writes those headers out itself after
/// the request's own, so one of these would frame the request, name its host
/// or speak for the connection behind hyper's back, or go out beside the one
/// the proxy sets.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "te",
    "trailer",
    "expect",
    "x-forwarded-for",
    "x-forwarded-proto",
    "via",
];

/// Why a config file was refused: where, which key, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub listen: Vec<SocketAddr>,
    pub admin_listen: SocketAddr,
    pub store: String,
    pub threads: usize,
    /// Idle keep-alive connections kept to upstreams, shared by both backends
    /// (per upstream address).
    pub upstream_pool_size: usize,
    pub log_format: LogFormat,
    /// Whether HTTP/1 header names keep the case the client (or the upstream)
    /// wrote them in, or go out in lower case.
    pub header_case: HeaderCase,
    /// Everything that can change on reload without restarting listeners.
    pub settings: Settings,
}

/// How HTTP/1 header names are written on the way through. Names are
/// case-insensitive (RFC 9110), and lower case is what HAProxy and Envoy send
/// by default; keeping each name's case costs about 8,600 instructions per
/// request (14% of the request path, BENCHMARKS.md), so it is asked for by
/// `header_case = "preserve"`, for a client or backend that reads names
/// case-sensitively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderCase {
    Lowercase,
    Preserve,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The reloadable part of the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub unknown_tenant: UnknownTenant,
    pub max_body_bytes: u64,
    pub max_header_bytes: usize,
    pub drain_timeout: Duration,
    /// After SIGTERM, how long the proxy goes on accepting and serving with
    /// `/readyz` at 503 before its listeners close, so a load balancer takes it
    /// out of rotation first: a connection it opened just before the listener
    /// closed would be reset with a write in it, which it may not retry.
    pub drain_delay: Duration,
    /// How long a request that arrives before the first routing table is
    /// loaded waits for it before it is refused with 503.
    pub first_table_wait: Duration,
    pub legacy: BackendConfig,
    pub new: BackendConfig,
    /// Every backend of the new side by name: `new` and any other service
    /// (`search`, `valuations`).
    pub services: BTreeMap<String, BackendConfig>,
    /// Which service implements which routes on the new side (`[[routes]]` with
    /// `match`); a route none names is `new`'s.
    pub service_routes: ServiceRoutes,
    pub rules: Vec<Rule>,
    pub routes: Vec<RouteRule>,
    /// The header that names the client's version in the route census (else the
    /// User-Agent's first product token).
    pub client_version_header: Option<HeaderName>,
    /// Routes this file marks destructive (`[proxy] destructive_routes`): the
    /// proxy marks them in the store, where every release is checked.
    pub destructive_routes: Vec<ficus_core::Route>,
    pub tenant_header: HeaderName,
    pub backend_header: HeaderName,
    pub request_id_header: HeaderName,
    pub traffic_flush: Duration,
    pub tenant_label_cap: usize,
    /// The path the proxy answers itself with the tenant's configuration.
    pub tenant_config_path: String,
    /// How long clients and caches may keep that answer.
    pub tenant_config_max_age: Duration,
    /// What a suspended tenant's requests get instead of a backend's answer.
    pub suspended_status: u16,
    pub suspended_message: String,
    pub shadow: ShadowConfig,
    pub guard: GuardConfig,
}

/// Automatic rollback of migrated tenants whose new backend misbehaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuardConfig {
    pub enabled: bool,
    /// The sliding window answers are judged over.
    pub window: Duration,
    /// Answers needed in the window before the guard may act.
    pub min_requests: u64,
    /// Share of bad answers (5xx, timeouts, unreachable) that trips it.
    pub max_error_rate: f64,
    /// After a trip, the same tenant is left alone this long.
    pub cooldown: Duration,
    /// An answer is slow when it takes this many times the tenant's legacy p99.
    pub max_latency_ratio: f64,
    /// Share of slow answers that trips it.
    pub max_slow_rate: f64,
    /// Reverse-shadow comparisons needed in the window before mismatches count.
    pub min_compared: u64,
    /// Share of mismatched reverse-shadow comparisons that trips it.
    pub max_mismatch_rate: f64,
}

/// The parallel run: which reads are also sent to the other backend, and how the
/// answers are compared.
#[derive(Debug, Clone)]
pub struct ShadowConfig {
    /// Shadow requests running at once; above this, new ones are shed and counted.
    pub max_in_flight: usize,
    pub timeout: Duration,
    /// `METHOD /prefix` entries: safe-method routes with side effects, never shadowed.
    pub unsafe_routes: Vec<(String, String)>,
    /// Bodies larger than this (either side) are not compared, only counted.
    pub body_cap: usize,
    /// Fraction of eligible requests shadowed, 0.0 to 1.0.
    pub sample_rate: f64,
    /// At most this many shadow requests per tenant per second.
    pub max_per_second: u32,
    /// Fraction of shadowed requests for which the serving backend is asked twice,
    /// to learn noise.
    pub noise_rate: f64,
    /// For migrated tenants, also send reads to legacy and compare (reverse shadow).
    pub reverse: bool,
    /// Keep the values of differing fields in mismatch samples (capped), instead of
    /// a type and a hash.
    pub reveal: bool,
    /// How often comparison counts and samples are written to the store.
    pub flush: Duration,
    pub templates: ficus_diff::endpoint::Templates,
    /// The response header in which new states its version; recorded with every
    /// comparison (a backend's configured `version` is used when it is absent).
    pub version_header: Option<HeaderName>,
    /// Per-endpoint comparison rules, first match wins; `default_rules` otherwise.
    pub rules: Vec<(String, ficus_diff::Rules)>,
    pub default_rules: ficus_diff::Rules,
}

impl ShadowConfig {
    pub fn rules_for(&self, endpoint: &str) -> &ficus_diff::Rules {
        self.rules
            .iter()
            .find(|(e, _)| e == endpoint)
            .map_or(&self.default_rules, |(_, r)| r)
    }

    pub fn is_unsafe(&self, method: &str, path: &str) -> bool {
        self.unsafe_routes
            .iter()
            .any(|(m, p)| m == method && path.starts_with(p.as_str()))
    }
}

/// One backend: where it is and how to talk to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub upstreams: Vec<SocketAddr>,
    /// The version deployed, as the operator states it (reloadable); the
    /// shadow's `version_header` takes precedence when the answer carries it.
    pub version: Option<String>,
    pub h2c: bool,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
    /// The request header by which this backend applies a write once however
    /// often it is sent (`Idempotency-Key`): a write carrying it that one
    /// upstream answers with a server error, or not in time, is sent to the
    /// next upstream once, like a safe read. Without it no write is ever sent
    /// twice.
    pub idempotency_header: Option<http::HeaderName>,
}

impl Settings {
    /// The backend a side stands for: legacy, or the new side's `service`
    /// (`new` when `None`, or when it is not configured any more after a reload).
    pub fn backend(&self, backend: ficus_core::Backend, service: Option<&str>) -> &BackendConfig {
        match backend {
            ficus_core::Backend::Legacy => &self.legacy,
            ficus_core::Backend::New => service
                .and_then(|s| self.services.get(s))
                .unwrap_or(&self.new),
        }
    }
}

/// The routes `[[routes]] match = "METHOD /template"` gives a service, looked up
/// by method and template (the route key a request's path resolves to).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceRoutes {
    by_route: HashMap<(String, String), (Arc<str>, Option<Duration>)>,
}

impl ServiceRoutes {
    pub fn is_empty(&self) -> bool {
        self.by_route.is_empty()
    }

    /// The service (and read timeout) of `method template`: an entry for that
    /// method, else one for every method (`*`).
    pub fn get(&self, method: &str, template: &str) -> Option<&(Arc<str>, Option<Duration>)> {
        if self.by_route.is_empty() {
            return None;
        }
        self.by_route
            .get(&(method.to_string(), template.to_string()))
            .or_else(|| self.by_route.get(&("*".to_string(), template.to_string())))
    }
}

/// Per-route overrides, first match wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRule {
    pub path_prefix: String,
    /// Empty means every method.
    pub methods: Vec<String>,
    pub read_timeout: Option<Duration>,
}

impl RouteRule {
    pub fn matches(&self, method: &str, path: &str) -> bool {
        path.starts_with(&self.path_prefix)
            && (self.methods.is_empty() || self.methods.iter().any(|m| m == method))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    proxy: RawProxy,
    backends: RawBackends,
    #[serde(default)]
    tenant_from: Vec<RawRule>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    shadow: Option<RawShadow>,
    #[serde(default)]
    compare: Vec<RawCompare>,
    guard: Option<RawGuard>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuard {
    enabled: Option<bool>,
    window_ms: Option<u64>,
    min_requests: Option<u64>,
    max_error_rate: Option<Spanned<f64>>,
    cooldown_ms: Option<u64>,
    max_latency_ratio: Option<Spanned<f64>>,
    max_slow_rate: Option<Spanned<f64>>,
    min_compared: Option<u64>,
    max_mismatch_rate: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShadow {
    max_in_flight: Option<usize>,
    timeout_ms: Option<u64>,
    #[serde(default)]
    unsafe_routes: Vec<Spanned<String>>,
    body_cap_bytes: Option<usize>,
    sample_rate: Option<Spanned<f64>>,
    max_per_second: Option<u32>,
    noise_rate: Option<Spanned<f64>>,
    reverse: Option<bool>,
    reveal: Option<bool>,
    flush_ms: Option<u64>,
    #[serde(default)]
    route_templates: Vec<Spanned<String>>,
    version_header: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCompare {
    endpoint: Spanned<String>,
    #[serde(default)]
    ignore: Vec<Spanned<String>>,
    #[serde(default)]
    unordered: Vec<Spanned<String>>,
    #[serde(default)]
    match_by_key: std::collections::BTreeMap<String, String>,
    numeric_tolerance: Option<f64>,
    null_equals_missing: Option<bool>,
    headers: Option<Vec<String>>,
    #[serde(default)]
    open_arrays: Vec<Spanned<String>>,
    additive: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    listen: Vec<Spanned<String>>,
    admin_listen: Spanned<String>,
    store: Spanned<String>,
    unknown_tenant: Option<Spanned<String>>,
    threads: Option<Spanned<usize>>,
    upstream_pool_size: Option<usize>,
    max_body_bytes: Option<u64>,
    max_header_bytes: Option<usize>,
    drain_timeout_ms: Option<u64>,
    drain_delay_ms: Option<u64>,
    first_table_wait_ms: Option<u64>,
    traffic_flush_ms: Option<Spanned<u64>>,
    tenant_label_cap: Option<usize>,
    tenant_config_path: Option<Spanned<String>>,
    tenant_config_max_age_s: Option<u64>,
    suspended_status: Option<Spanned<u16>>,
    suspended_message: Option<String>,
    log_format: Option<Spanned<String>>,
    header_case: Option<Spanned<String>>,
    /// Read only to refuse what it can no longer mean: files written while
    /// pingora's engine existed chose an engine here.
    engine: Option<Spanned<String>>,
    tenant_header: Option<Spanned<String>>,
    backend_header: Option<Spanned<String>>,
    request_id_header: Option<Spanned<String>>,
    client_version_header: Option<Spanned<String>>,
    #[serde(default)]
    destructive_routes: Vec<Spanned<String>>,
}

/// `[backends.NAME]`: `legacy`, `new`, and any other service of the new side.
type RawBackends = BTreeMap<String, Spanned<RawBackend>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    upstreams: Spanned<Vec<Spanned<String>>>,
    protocol: Option<Spanned<String>>,
    connect_timeout_ms: Option<u64>,
    read_timeout_ms: Option<u64>,
    write_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    version: Option<Spanned<String>>,
    idempotency_header: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    header: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    custom_domains: Option<Spanned<bool>>,
    path_prefix: Option<Spanned<String>>,
    strip: Option<bool>,
    jwt_claim: Option<Spanned<String>>,
    hs256_secret_env: Option<Spanned<String>>,
    jwks_file: Option<Spanned<String>>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_s: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    path_prefix: Option<Spanned<String>>,
    #[serde(rename = "match")]
    matches: Option<Spanned<String>>,
    service: Option<Spanned<String>>,
    #[serde(default)]
    methods: Vec<String>,
    read_timeout_ms: Option<u64>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_path_buf(),
            line: None,
            message: format!("cannot read the config file: {e}"),
        })?;
        Config::parse(path, &text, &|name| std::env::var(name).ok())
    }

    /// Validates config text; `env` looks up environment variables (a parameter so
    /// tests do not have to change the process environment).
    pub fn parse(
        path: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let cx = Cx { path, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
            path: path.to_path_buf(),
            line: e.span().map(|s| cx.line(s.start)),
            message: e.message().trim().to_string(),
        })?;
        let p = raw.proxy;
        if p.listen.is_empty() {
            return Err(cx.err(None, "proxy.listen: give at least one address to listen on"));
        }
        let listen = p
            .listen
            .iter()
            .map(|a| cx.addr(a, "proxy.listen"))
            .collect::<Result<Vec<_>, _>>()?;
        let admin_listen = cx.addr(&p.admin_listen, "proxy.admin_listen")?;
        if listen.contains(&admin_listen) {
            return Err(cx.at(
                &p.admin_listen,
                "proxy.admin_listen: must differ from every proxy.listen address",
            ));
        }
        if let Err(e) = ficus_store::StoreUrl::parse(p.store.get_ref()) {
            return Err(cx.at(&p.store, &format!("proxy.store: {e}")));
        }
        let unknown_tenant = match p.unknown_tenant.as_ref().map(|s| (s.get_ref().as_str(), s)) {
            None | Some(("legacy", _)) => UnknownTenant::Legacy,
            Some(("reject", _)) => UnknownTenant::Reject,
            Some((other, s)) => {
                return Err(cx.at(
                    s,
                    &format!("proxy.unknown_tenant: {other:?} is not \"legacy\" or \"reject\""),
                ));
            }
        };
        let threads = match &p.threads {
            Some(t) if *t.get_ref() == 0 || *t.get_ref() > 256 => {
                return Err(cx.at(t, "proxy.threads: must be between 1 and 256"));
            }
            Some(t) => *t.get_ref(),
            None => std::thread::available_parallelism().map_or(2, |n| n.get()),
        };
        let log_format = match p.log_format.as_ref().map(|s| (s.get_ref().as_str(), s)) {
            None | Some(("text", _)) => LogFormat::Text,
            Some(("json", _)) => LogFormat::Json,
            Some((other, s)) => {
                return Err(cx.at(
                    s,
                    &format!("proxy.log_format: {other:?} is not \"text\" or \"json\""),
                ));
            }
        };
        // `engine = "hyper"` was how a file opted into what is now the only
        // engine: it still loads; asking for pingora is refused by name.
        if let Some(e) = &p.engine
            && e.get_ref() != "hyper"
        {
            return Err(cx.at(
                e,
                &format!(
                    "proxy.engine: {:?} is gone; the proxy runs on hyper only (remove this line)",
                    e.get_ref()
                ),
            ));
        }
        let header_case = match p.header_case.as_ref().map(|s| (s.get_ref().as_str(), s)) {
            None | Some(("lowercase", _)) => HeaderCase::Lowercase,
            Some(("preserve", _)) => HeaderCase::Preserve,
            Some((other, s)) => {
                return Err(cx.at(
                    s,
                    &format!("proxy.header_case: {other:?} is not \"lowercase\" or \"preserve\""),
                ));
            }
        };
        let header = |h: &Option<Spanned<String>>,
                      key: &str,
                      default: &'static str|
         -> Result<HeaderName, ConfigError> {
            match h {
                None => Ok(HeaderName::from_static(default)),
                Some(h) => {
                    let name = HeaderName::from_bytes(h.get_ref().as_bytes()).map_err(|_| {
                        cx.at(
                            h,
                            &format!("{key}: {:?} is not a valid header name", h.get_ref()),
                        )
                    })?;
                    // The proxy writes this header itself, after the request's
                    // own: it may not be one that frames the message, names
                    // its host, belongs to the connection, or that the proxy
                    // already sets.
                    if RESERVED_HEADERS.contains(&name.as_str()) {
                        return Err(cx.at(
                            h,
                            &format!(
                                "{key}: {:?} is a header the proxy may not set this way (it frames the request, names its host, belongs to the connection, or is one the proxy already sets)",
                                h.get_ref()
                            ),
                        ));
                    }
                    Ok(name)
                }
            }
        };
        let tenant_header = header(&p.tenant_header, "proxy.tenant_header", "x-ficus-tenant")?;
        let backend_header = header(&p.backend_header, "proxy.backend_header", "x-ficus-backend")?;
        let request_id_header = header(
            &p.request_id_header,
            "proxy.request_id_header",
            "x-request-id",
        )?;
        // Three headers the proxy sets, each once: one name for two would
        // send it twice.
        if tenant_header == backend_header
            || tenant_header == request_id_header
            || backend_header == request_id_header
        {
            // Named at the last of them the file sets (one at least does).
            let at = [&p.request_id_header, &p.backend_header, &p.tenant_header]
                .into_iter()
                .find_map(|h| h.as_ref().map(|h| h.span()));
            return Err(cx.err(
                at,
                &format!(
                    "proxy.tenant_header, proxy.backend_header and proxy.request_id_header must differ (they are {tenant_header:?}, {backend_header:?} and {request_id_header:?})"
                ),
            ));
        }
        let traffic_flush = match &p.traffic_flush_ms {
            Some(ms) if *ms.get_ref() < 100 => {
                return Err(cx.at(ms, "proxy.traffic_flush_ms: must be at least 100"));
            }
            Some(ms) => Duration::from_millis(*ms.get_ref()),
            None => Duration::from_secs(10),
        };
        let tenant_config_path = match &p.tenant_config_path {
            Some(raw) => {
                let path = raw.get_ref();
                if !path.starts_with('/')
                    || path.contains('?')
                    || path.contains('#')
                    || path.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(cx.at(
                        raw,
                        &format!("proxy.tenant_config_path: {path:?} is not an absolute path such as /.well-known/tenant-config"),
                    ));
                }
                path.clone()
            }
            None => "/.well-known/tenant-config".to_string(),
        };
        let suspended_status = match &p.suspended_status {
            Some(s) if !(400..500).contains(s.get_ref()) => {
                return Err(cx.at(
                    s,
                    &format!(
                        "proxy.suspended_status: {} is not a 4xx status",
                        s.get_ref()
                    ),
                ));
            }
            Some(s) => *s.get_ref(),
            None => 403,
        };
        let mut services = BTreeMap::new();
        for (name, b) in &raw.backends {
            let plain = !name.is_empty()
                && name.len() <= 32
                && name.bytes().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_'
                });
            if !plain {
                return Err(cx.at(
                    b,
                    &format!("backends.{name}: a backend's name is lowercase letters, digits, '-' and '_' (at most 32)"),
                ));
            }
            if name != "legacy" {
                services.insert(name.clone(), cx.backend(b, &format!("backends.{name}"))?);
            }
        }
        let legacy = match raw.backends.get("legacy") {
            Some(b) => cx.backend(b, "backends.legacy")?,
            None => {
                return Err(cx.err(
                    None,
                    "backends.legacy: missing; the backend that serves everyone today",
                ));
            }
        };
        let new = services.get("new").cloned().ok_or_else(|| {
            cx.err(
                None,
                "backends.new: missing; the new side's default service",
            )
        })?;
        let mut routes = Vec::new();
        let mut service_routes = ServiceRoutes::default();
        let mut templates: Vec<(ficus_core::Route, Range<usize>)> = Vec::new();
        for r in &raw.routes {
            match (&r.path_prefix, &r.matches) {
                (Some(_), None) => {
                    if let Some(s) = &r.service {
                        return Err(cx.at(s, "routes.service: goes with match = \"METHOD /template\", not with path_prefix"));
                    }
                    routes.push(cx.route(r)?);
                }
                (None, Some(m)) => {
                    // `GET,HEAD /homes/{id}`: one route per method.
                    let raw = m.get_ref().trim();
                    let (methods, template) = raw.split_once(' ').unwrap_or((raw, ""));
                    let parsed: Vec<ficus_core::Route> = methods
                        .split(',')
                        .map(|method| {
                            ficus_core::Route::parse(&format!("{} {template}", method.trim()))
                                .map_err(|e| cx.at(m, &format!("routes.match: {e}")))
                        })
                        .collect::<Result<_, _>>()?;
                    let service = match &r.service {
                        Some(s) if !services.contains_key(s.get_ref()) => {
                            return Err(cx.at(
                                s,
                                &format!(
                                    "routes.service: no backend {:?}; define [backends.{}] (the new side has: {})",
                                    s.get_ref(),
                                    s.get_ref(),
                                    services.keys().cloned().collect::<Vec<_>>().join(", ")
                                ),
                            ));
                        }
                        Some(s) => s.get_ref().clone(),
                        None => "new".to_string(),
                    };
                    for route in parsed {
                        for (other, _) in &templates {
                            let other_service = service_routes
                                .get(other.method(), other.template())
                                .map(|(s, _)| s.to_string())
                                .unwrap_or_default();
                            if other_service != service && routes_overlap(&route, other) {
                                return Err(cx.at(
                                    m,
                                    &format!(
                                        "routes.match: {route} overlaps {other}, which goes to {other_service}; a request must have one service"
                                    ),
                                ));
                            }
                        }
                        service_routes.by_route.insert(
                            (route.method().to_string(), route.template().to_string()),
                            (
                                Arc::from(service.as_str()),
                                r.read_timeout_ms.map(|ms| Duration::from_millis(ms.max(1))),
                            ),
                        );
                        templates.push((route, m.span()));
                    }
                }
                (Some(p), Some(_)) => {
                    return Err(cx.at(p, "routes: one of path_prefix or match, not both"));
                }
                (None, None) => {
                    return Err(cx.err(
                        None,
                        "routes: each [[routes]] needs match = \"METHOD /template\" or path_prefix",
                    ));
                }
            }
        }
        let client_version_header =
            p.client_version_header
                .as_ref()
                .map(|h| {
                    HeaderName::from_bytes(h.get_ref().trim().to_ascii_lowercase().as_bytes())
                        .map_err(|_| {
                            cx.at(
                                h,
                                &format!(
                                    "proxy.client_version_header: {:?} is not a header name",
                                    h.get_ref()
                                ),
                            )
                        })
                })
                .transpose()?;
        let mut shadow = cx.shadow(raw.shadow.as_ref(), &raw.compare)?;
        // A request's route key is its endpoint: the route templates name it too.
        for (route, _) in &templates {
            if let Ok(t) = ficus_diff::endpoint::Template::parse(route.template())
                && !shadow.templates.contains(&t)
            {
                shadow.templates.push(t);
            }
        }
        let settings = Settings {
            unknown_tenant,
            max_body_bytes: p.max_body_bytes.unwrap_or(10 * 1024 * 1024),
            max_header_bytes: p.max_header_bytes.unwrap_or(64 * 1024),
            drain_timeout: Duration::from_millis(p.drain_timeout_ms.unwrap_or(30_000)),
            drain_delay: Duration::from_millis(p.drain_delay_ms.unwrap_or(5_000)),
            first_table_wait: Duration::from_millis(p.first_table_wait_ms.unwrap_or(5_000)),
            legacy,
            new,
            services,
            service_routes,
            client_version_header,
            destructive_routes: p
                .destructive_routes
                .iter()
                .map(|r| match ficus_core::Route::parse(r.get_ref()) {
                    Ok(route) if route.method() == "*" => Err(cx.at(
                        r,
                        "proxy.destructive_routes: name one method (such as POST), not *",
                    )),
                    Ok(route) => Ok(route),
                    Err(e) => Err(cx.at(r, &format!("proxy.destructive_routes: {e}"))),
                })
                .collect::<Result<_, _>>()?,
            rules: raw
                .tenant_from
                .iter()
                .enumerate()
                .map(|(i, r)| cx.rule(r, i, env))
                .collect::<Result<Vec<_>, _>>()?,
            routes,
            tenant_header,
            backend_header,
            request_id_header,
            traffic_flush,
            tenant_label_cap: p.tenant_label_cap.unwrap_or(100),
            tenant_config_path,
            suspended_status,
            suspended_message: p
                .suspended_message
                .clone()
                .unwrap_or_else(|| "this account is suspended".to_string()),
            tenant_config_max_age: Duration::from_secs(p.tenant_config_max_age_s.unwrap_or(60)),
            shadow,
            guard: cx.guard(raw.guard.as_ref())?,
        };
        Ok(Config {
            path: path.to_path_buf(),
            listen,
            admin_listen,
            store: p.store.into_inner(),
            threads,
            upstream_pool_size: p.upstream_pool_size.unwrap_or(128),
            log_format,
            header_case,
            settings,
        })
    }

    /// What a reload cannot change without a restart, described for a log line;
    /// `None` when nothing of that kind differs.
    pub fn restart_needed_for(&self, new: &Config) -> Option<String> {
        let mut changed = Vec::new();
        if self.listen != new.listen {
            changed.push("proxy.listen");
        }
        if self.admin_listen != new.admin_listen {
            changed.push("proxy.admin_listen");
        }
        if self.store != new.store {
            changed.push("proxy.store");
        }
        if self.threads != new.threads {
            changed.push("proxy.threads");
        }
        if self.upstream_pool_size != new.upstream_pool_size {
            changed.push("proxy.upstream_pool_size");
        }
        if self.log_format != new.log_format {
            changed.push("proxy.log_format");
        }
        if self.header_case != new.header_case {
            changed.push("proxy.header_case");
        }
        (!changed.is_empty()).then(|| changed.join(", "))
    }
}

/// Whether some request could match both routes: their methods meet (equal, or
/// either is `*`) and their templates have as many segments, each pair of which
/// is equal or has a placeholder.
fn routes_overlap(a: &ficus_core::Route, b: &ficus_core::Route) -> bool {
    let methods = a.method() == b.method() || a.method() == "*" || b.method() == "*";
    let (x, y): (Vec<&str>, Vec<&str>) = (
        a.template().split('/').collect(),
        b.template().split('/').collect(),
    );
    let placeholder = |s: &str| s.starts_with('{');
    methods
        && x.len() == y.len()
        && x.iter()
            .zip(&y)
            .all(|(p, q)| p == q || placeholder(p) || placeholder(q))
}

/// Context for validation messages: the file and its text, to turn spans into lines.
struct Cx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Cx<'_> {
    fn line(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .matches('\n')
            .count()
            + 1
    }

    fn err(&self, span: Option<Range<usize>>, message: &str) -> ConfigError {
        ConfigError {
            path: self.path.to_path_buf(),
            line: span.map(|s| self.line(s.start)),
            message: message.to_string(),
        }
    }

    fn at<T>(&self, value: &Spanned<T>, message: &str) -> ConfigError {
        self.err(Some(value.span()), message)
    }

    fn addr(&self, raw: &Spanned<String>, key: &str) -> Result<SocketAddr, ConfigError> {
        raw.get_ref().parse().map_err(|_| {
            self.at(
                raw,
                &format!(
                    "{key}: {:?} is not an IP address with a port, such as 127.0.0.1:8080",
                    raw.get_ref()
                ),
            )
        })
    }

    fn backend(&self, raw: &Spanned<RawBackend>, key: &str) -> Result<BackendConfig, ConfigError> {
        let b = raw.get_ref();
        if b.upstreams.get_ref().is_empty() {
            return Err(self.at(
                &b.upstreams,
                &format!("{key}.upstreams: give at least one address"),
            ));
        }
        let upstreams = b
            .upstreams
            .get_ref()
            .iter()
            .map(|a| self.addr(a, &format!("{key}.upstreams")))
            .collect::<Result<Vec<_>, _>>()?;
        let h2c = match b.protocol.as_ref().map(|p| (p.get_ref().as_str(), p)) {
            None | Some(("http1", _)) => false,
            Some(("h2c", _)) => true,
            Some((other, p)) => {
                return Err(self.at(
                    p,
                    &format!("{key}.protocol: {other:?} is not \"http1\" or \"h2c\""),
                ));
            }
        };
        let ms = |v: Option<u64>, default: u64| Duration::from_millis(v.unwrap_or(default).max(1));
        let version = match &b.version {
            None => None,
            Some(v) => match ficus_core::reconcile::given_version(v.get_ref()) {
                Some(label) => Some(label),
                None => {
                    return Err(self.at(
                        v,
                        &format!(
                            "{key}.version: give at most {} printable characters",
                            ficus_core::reconcile::VERSION_MAX
                        ),
                    ));
                }
            },
        };
        let idempotency_header = match &b.idempotency_header {
            None => None,
            Some(h) => Some(
                http::HeaderName::from_bytes(h.get_ref().trim().as_bytes())
                    .ok()
                    .filter(|_| !h.get_ref().trim().is_empty())
                    .ok_or_else(|| {
                        self.at(
                            h,
                            &format!(
                                "{key}.idempotency_header: {:?} is not a header name",
                                h.get_ref()
                            ),
                        )
                    })?,
            ),
        };
        let backend = BackendConfig {
            upstreams,
            version,
            h2c,
            idempotency_header,
            connect_timeout: ms(b.connect_timeout_ms, 2_000),
            read_timeout: ms(b.read_timeout_ms, 30_000),
            write_timeout: ms(b.write_timeout_ms, 30_000),
            idle_timeout: ms(b.idle_timeout_ms, 60_000),
        };
        Ok(backend)
    }

    fn shadow(
        &self,
        raw: Option<&RawShadow>,
        compare: &[RawCompare],
    ) -> Result<ShadowConfig, ConfigError> {
        let fraction =
            |v: &Option<Spanned<f64>>, key: &str, default: f64| -> Result<f64, ConfigError> {
                match v {
                    Some(f) if !(0.0..=1.0).contains(f.get_ref()) => {
                        Err(self.at(f, &format!("shadow.{key}: must be between 0.0 and 1.0")))
                    }
                    Some(f) => Ok(*f.get_ref()),
                    None => Ok(default),
                }
            };
        let empty = RawShadow {
            max_in_flight: None,
            timeout_ms: None,
            unsafe_routes: Vec::new(),
            body_cap_bytes: None,
            sample_rate: None,
            max_per_second: None,
            noise_rate: None,
            reverse: None,
            reveal: None,
            flush_ms: None,
            route_templates: Vec::new(),
            version_header: None,
        };
        let r = raw.unwrap_or(&empty);
        let mut unsafe_routes = Vec::new();
        for entry in &r.unsafe_routes {
            match entry.get_ref().split_once(' ') {
                Some((m, p)) if p.starts_with('/') && !m.is_empty() => {
                    unsafe_routes.push((m.to_ascii_uppercase(), p.to_string()))
                }
                _ => {
                    return Err(self.at(
                        entry,
                        &format!(
                            "shadow.unsafe_routes: {:?} is not \"METHOD /path\"",
                            entry.get_ref()
                        ),
                    ));
                }
            }
        }
        let templates = r
            .route_templates
            .iter()
            .map(|t| {
                ficus_diff::endpoint::Template::parse(t.get_ref())
                    .map_err(|why| self.at(t, &format!("shadow.route_templates: {why}")))
            })
            .collect::<Result<ficus_diff::endpoint::Templates, _>>()?;
        let version_header =
            r.version_header
                .as_ref()
                .map(|h| {
                    HeaderName::from_bytes(h.get_ref().trim().to_ascii_lowercase().as_bytes())
                        .map_err(|_| {
                            self.at(
                                h,
                                &format!(
                                    "shadow.version_header: {:?} is not a header name",
                                    h.get_ref()
                                ),
                            )
                        })
                })
                .transpose()?;
        let reveal = r.reveal.unwrap_or(false);
        let default_rules = ficus_diff::Rules {
            reveal,
            ..ficus_diff::Rules::default()
        };
        let mut rules = Vec::new();
        for c in compare {
            let patterns = |list: &[Spanned<String>],
                            key: &str|
             -> Result<Vec<ficus_diff::PathPattern>, ConfigError> {
                list.iter()
                    .map(|p| {
                        ficus_diff::PathPattern::parse(p.get_ref())
                            .map_err(|why| self.at(p, &format!("compare.{key}: {why}")))
                    })
                    .collect()
            };
            let mut by_key = Vec::new();
            for (path, key) in &c.match_by_key {
                let pattern = ficus_diff::PathPattern::parse(path)
                    .map_err(|why| self.at(&c.endpoint, &format!("compare.match_by_key: {why}")))?;
                by_key.push((pattern, key.clone()));
            }
            let endpoint = c.endpoint.get_ref();
            if endpoint
                .split_once(' ')
                .is_none_or(|(_, p)| !p.starts_with('/'))
            {
                return Err(self.at(
                    &c.endpoint,
                    &format!("compare.endpoint: {endpoint:?} is not \"METHOD /route/{{id}}\""),
                ));
            }
            let additive_is_mismatch = match c.additive.as_ref().map(|a| (a.get_ref().as_str(), a))
            {
                None | Some(("compatible", _)) => false,
                Some(("mismatch", _)) => true,
                Some((other, a)) => {
                    return Err(self.at(
                        a,
                        &format!(
                            "compare.additive: {other:?} is not \"compatible\" or \"mismatch\""
                        ),
                    ));
                }
            };
            rules.push((
                endpoint.clone(),
                ficus_diff::Rules {
                    open_arrays: patterns(&c.open_arrays, "open_arrays")?,
                    additive_is_mismatch,
                    ignore: patterns(&c.ignore, "ignore")?,
                    unordered: patterns(&c.unordered, "unordered")?,
                    match_by_key: by_key,
                    numeric_tolerance: c.numeric_tolerance.unwrap_or(0.0),
                    null_equals_missing: c.null_equals_missing.unwrap_or(false),
                    headers: c
                        .headers
                        .clone()
                        .map_or(default_rules.headers.clone(), |h| {
                            h.iter().map(|s| s.to_ascii_lowercase()).collect()
                        }),
                    ..default_rules.clone()
                },
            ));
        }
        Ok(ShadowConfig {
            max_in_flight: r.max_in_flight.unwrap_or(256).max(1),
            timeout: Duration::from_millis(r.timeout_ms.unwrap_or(2_000).max(1)),
            unsafe_routes,
            body_cap: r.body_cap_bytes.unwrap_or(1024 * 1024),
            sample_rate: fraction(&r.sample_rate, "sample_rate", 1.0)?,
            max_per_second: r.max_per_second.unwrap_or(1_000),
            noise_rate: fraction(&r.noise_rate, "noise_rate", 0.05)?,
            reverse: r.reverse.unwrap_or(false),
            reveal,
            flush: Duration::from_millis(r.flush_ms.unwrap_or(2_000).max(100)),
            templates,
            version_header,
            rules,
            default_rules,
        })
    }

    fn guard(&self, raw: Option<&RawGuard>) -> Result<GuardConfig, ConfigError> {
        let share = |value: Option<&Spanned<f64>>, key: &str, default: f64| match value {
            Some(r) if !(*r.get_ref() > 0.0 && *r.get_ref() <= 1.0) => Err(self.at(
                r,
                &format!("guard.{key}: must be above 0.0 and at most 1.0"),
            )),
            Some(r) => Ok(*r.get_ref()),
            None => Ok(default),
        };
        let rate = share(
            raw.and_then(|g| g.max_error_rate.as_ref()),
            "max_error_rate",
            0.2,
        )?;
        let max_latency_ratio = match raw.and_then(|g| g.max_latency_ratio.as_ref()) {
            Some(r) if !(*r.get_ref() >= 1.0 && r.get_ref().is_finite()) => {
                return Err(self.at(r, "guard.max_latency_ratio: must be at least 1.0"));
            }
            Some(r) => *r.get_ref(),
            None => 3.0,
        };
        Ok(GuardConfig {
            enabled: raw.and_then(|g| g.enabled).unwrap_or(true),
            window: Duration::from_millis(
                raw.and_then(|g| g.window_ms).unwrap_or(10_000).max(1_000),
            ),
            min_requests: raw.and_then(|g| g.min_requests).unwrap_or(20).max(1),
            max_error_rate: rate,
            cooldown: Duration::from_millis(raw.and_then(|g| g.cooldown_ms).unwrap_or(60_000)),
            max_latency_ratio,
            max_slow_rate: share(
                raw.and_then(|g| g.max_slow_rate.as_ref()),
                "max_slow_rate",
                0.2,
            )?,
            min_compared: raw.and_then(|g| g.min_compared).unwrap_or(20).max(1),
            max_mismatch_rate: share(
                raw.and_then(|g| g.max_mismatch_rate.as_ref()),
                "max_mismatch_rate",
                0.2,
            )?,
        })
    }

    fn route(&self, raw: &RawRoute) -> Result<RouteRule, ConfigError> {
        let Some(prefix) = &raw.path_prefix else {
            return Err(self.err(None, "routes: path_prefix is missing"));
        };
        if !prefix.get_ref().starts_with('/') {
            return Err(self.at(prefix, "routes.path_prefix: must start with '/'"));
        }
        let methods: Vec<String> = raw.methods.iter().map(|m| m.to_ascii_uppercase()).collect();
        Ok(RouteRule {
            path_prefix: prefix.get_ref().clone(),
            methods,
            read_timeout: raw
                .read_timeout_ms
                .map(|ms| Duration::from_millis(ms.max(1))),
        })
    }

    fn rule(
        &self,
        raw: &RawRule,
        index: usize,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Rule, ConfigError> {
        let key = format!("tenant_from[{index}]");
        let kinds: Vec<(&str, Range<usize>)> = [
            raw.header.as_ref().map(|s| ("header", s.span())),
            raw.host.as_ref().map(|s| ("host", s.span())),
            raw.custom_domains
                .as_ref()
                .map(|s| ("custom_domains", s.span())),
            raw.path_prefix.as_ref().map(|s| ("path_prefix", s.span())),
            raw.jwt_claim.as_ref().map(|s| ("jwt_claim", s.span())),
        ]
        .into_iter()
        .flatten()
        .collect();
        let (kind, span) =
            match kinds.as_slice() {
                [one] => one.clone(),
                [] => {
                    return Err(self.err(None, &format!(
                    "{key}: give one of header, host, custom_domains, path_prefix or jwt_claim"
                )));
                }
                [_, second, ..] => {
                    let names: Vec<&str> = kinds.iter().map(|k| k.0).collect();
                    return Err(self.err(
                        Some(second.1.clone()),
                        &format!(
                            "{key}: one rule per [[tenant_from]]; this one has {}",
                            names.join(" and ")
                        ),
                    ));
                }
            };
        let misplaced = |field: &str, present: bool, allowed: &str| -> Result<(), ConfigError> {
            if present && kind != allowed {
                Err(self.err(
                    Some(span.clone()),
                    &format!("{key}: `{field}` only applies to a {allowed} rule"),
                ))
            } else {
                Ok(())
            }
        };
        misplaced("strip", raw.strip.is_some(), "path_prefix")?;
        for (field, present) in [
            ("hs256_secret_env", raw.hs256_secret_env.is_some()),
            ("jwks_file", raw.jwks_file.is_some()),
            ("issuer", raw.issuer.is_some()),
            ("audience", raw.audience.is_some()),
            ("leeway_s", raw.leeway_s.is_some()),
        ] {
            misplaced(field, present, "jwt_claim")?;
        }
        Ok(match kind {
            "header" => {
                let h = raw.header.as_ref().expect("kind says header");
                Rule::Header(HeaderName::from_bytes(h.get_ref().as_bytes()).map_err(|_| {
                    self.at(
                        h,
                        &format!("{key}.header: {:?} is not a valid header name", h.get_ref()),
                    )
                })?)
            }
            "host" => {
                let h = raw.host.as_ref().expect("kind says host");
                Rule::Host(
                    HostPattern::parse(h.get_ref())
                        .map_err(|why| self.at(h, &format!("{key}.host: {why}")))?,
                )
            }
            "custom_domains" => Rule::CustomDomains,
            "path_prefix" => {
                let p = raw.path_prefix.as_ref().expect("kind says path_prefix");
                Rule::PathPrefix {
                    pattern: PathPattern::parse(p.get_ref())
                        .map_err(|why| self.at(p, &format!("{key}.path_prefix: {why}")))?,
                    strip: raw.strip.unwrap_or(false),
                }
            }
            _ => {
                let claim = raw.jwt_claim.as_ref().expect("kind says jwt_claim");
                if claim.get_ref().is_empty() {
                    return Err(
                        self.at(claim, &format!("{key}.jwt_claim: the claim name is empty"))
                    );
                }
                let key_source = match (&raw.hs256_secret_env, &raw.jwks_file) {
                    (Some(var), None) => {
                        let secret = env(var.get_ref()).filter(|s| !s.is_empty()).ok_or_else(|| {
                            self.at(var, &format!(
                                "{key}.hs256_secret_env: the environment variable {} is not set or empty",
                                var.get_ref()
                            ))
                        })?;
                        JwtKey::hs256(secret.as_bytes())
                    }
                    (None, Some(file)) => {
                        let path = self
                            .path
                            .parent()
                            .unwrap_or(Path::new("."))
                            .join(file.get_ref());
                        JwtKey::jwks_file(&path)
                            .map_err(|why| self.at(file, &format!("{key}.jwks_file: {why}")))?
                    }
                    _ => {
                        return Err(self.at(claim, &format!("{key}: a jwt_claim rule needs exactly one of hs256_secret_env or jwks_file")));
                    }
                };
                Rule::Jwt(Box::new(JwtRule::new(
                    claim.get_ref().clone(),
                    key_source,
                    raw.issuer.clone(),
                    raw.audience.clone(),
                    raw.leeway_s.unwrap_or(0),
                )))
            }
        })
    }
}
