//! The shadow leg: safe reads of a tenant in `shadow` are also sent to the new
//! backend (and, with `reverse`, reads of a `migrated` tenant to legacy), and the two
//! answers are compared.
//!
//! **Writes never reach both backends.** The only way to send a request to the
//! second backend is [`Shadow::spawn`], which takes a [`SafeRequest`], and a
//! `SafeRequest` can only be built for GET, HEAD and OPTIONS. There is no code path
//! that turns any other method into one.
//!
//! The shadow request runs on its own detached task, bounded by a semaphore (when
//! full, the request is shed and counted, never waited for) and by a timeout. The
//! client's response never waits for it: the primary answer is captured as it streams
//! past (up to a cap) and handed to the task when it is complete.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ficus_core::latency::Histogram;
use ficus_core::reconcile::{ClassExample, version_label};
use ficus_core::{Backend, TenantId, Timestamp};
use ficus_diff::class::{Accepted, ClassKey, classify};
use ficus_diff::noise::NoiseModel;
use ficus_diff::{Compat, Difference, Response, Rules};
use ficus_store::{
    ClassCount, ComparisonCount, Evidence, LatencyReport, MismatchSample, NoiseEntry,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use tokio::sync::{Semaphore, oneshot};

use crate::config::{BackendConfig, GuardConfig, ShadowConfig};
use crate::guard::{Guard, Signal, Watch};
use crate::writes::{Window, Writes};

/// A request that may be sent to a second backend because it cannot change state.
#[derive(Debug, Clone)]
pub struct SafeRequest {
    method: Method,
    path_and_query: String,
    headers: HeaderMap,
}

impl SafeRequest {
    /// `None` for every method except GET, HEAD and OPTIONS.
    pub fn new(
        method: &Method,
        path_and_query: &str,
        headers: impl Iterator<Item = (HeaderName, HeaderValue)>,
    ) -> Option<SafeRequest> {
        if !(method == Method::GET || method == Method::HEAD || method == Method::OPTIONS) {
            return None;
        }
        let mut clean = HeaderMap::with_capacity(headers.size_hint().0);
        for (name, value) in headers {
            // Connection-level headers belong to the client's connection, and asking
            // for identity encoding keeps both answers comparable.
            if matches!(
                name.as_str(),
                "connection"
                    | "keep-alive"
                    | "te"
                    | "trailer"
                    | "transfer-encoding"
                    | "upgrade"
                    | "proxy-connection"
                    | "content-length"
                    | "accept-encoding"
            ) {
                continue;
            }
            clean.append(name, value);
        }
        Some(SafeRequest {
            method: method.clone(),
            path_and_query: path_and_query.to_string(),
            headers: clean,
        })
    }

    pub fn method(&self) -> &Method {
        &self.method
    }
}

/// The primary answer as it streamed to the client.
#[derive(Debug, Default)]
pub struct Captured {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body went past the cap; it is not compared.
    pub overflow: bool,
    /// The body was content-encoded (gzip…); it is not compared.
    pub encoded: bool,
    /// From sending the request to the end of the body.
    pub micros: u64,
}

impl Captured {
    fn as_response(&self) -> Response<'_> {
        Response {
            status: self.status,
            headers: self
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            body: &self.body,
        }
    }
}

/// What the request path holds while a shadow comparison is pending.
pub struct Pending {
    /// When the request left for the primary backend.
    pub started: Instant,
    pub captured: Captured,
    pub cap: usize,
    pub done: Option<oneshot::Sender<Captured>>,
}

impl Pending {
    pub fn finish(&mut self) {
        if let Some(tx) = self.done.take() {
            self.captured.micros = self.started.elapsed().as_micros() as u64;
            let _ = tx.send(std::mem::take(&mut self.captured));
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    last_at: i64,
    requests: u64,
    compared: u64,
    matched: u64,
    mismatched: u64,
    noise_only: u64,
    errors: u64,
    shed: u64,
    raced: u64,
}

/// One class's mismatches in one tenant's evidence on one version, since the
/// last report.
#[derive(Debug, Clone)]
struct ClassAgg {
    key: ClassKey,
    additive: bool,
    count: u64,
    first_at: i64,
    last_at: i64,
    example: Option<ClassExample>,
}

/// Keys of the comparison counts: tenant, endpoint, version of new (`""` when
/// not known, as for requests counted before any answer).
type CountKey = (TenantId, String, String);

/// Everything the shadow leg shares across requests.
pub struct Shadow {
    /// Shadow requests and comparisons run here, on their own thread, so that
    /// their work never queues ahead of client requests on the serving threads.
    runtime: Option<tokio::runtime::Handle>,
    slots: Arc<Semaphore>,
    http1: reqwest::Client,
    h2c: reqwest::Client,
    counts: Mutex<HashMap<CountKey, Counts>>,
    /// Per tenant, class id and version.
    classes: Mutex<HashMap<(TenantId, String, String), ClassAgg>>,
    /// Latencies of both sides of compared reads, per tenant and backend.
    latencies: Mutex<HashMap<(TenantId, Backend), Histogram>>,
    guard: Arc<Guard>,
    samples: Mutex<Vec<MismatchSample>>,
    noise: Mutex<NoiseModel>,
    per_second: Mutex<HashMap<TenantId, (u64, u32)>>,
    rng: AtomicU64,
    /// Each tenant's writes in flight, which make a compared read raced.
    pub writes: Writes,
}

/// The runtime shadow work runs on: one thread, made once per process and kept for
/// its lifetime (it is leaked on purpose: dropping a runtime from inside another
/// runtime's shutdown panics, and the process ends with it anyway).
fn shadow_runtime() -> Option<tokio::runtime::Handle> {
    static RUNTIME: std::sync::OnceLock<Option<tokio::runtime::Handle>> =
        std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("ficus-shadow")
                .enable_all()
                .build()
            {
                Ok(rt) => Some(Box::leak(Box::new(rt)).handle().clone()),
                Err(e) => {
                    // Without its own runtime the shadow leg shares the serving one.
                    tracing::warn!(error = %e, "no separate runtime for shadow reads");
                    None
                }
            }
        })
        .clone()
}

/// Double-asks every endpoint gets before sampling takes over.
const NOISE_WARM_UP: u64 = 5;

/// Samples waiting to be written are capped; beyond this the oldest are dropped.
const SAMPLE_QUEUE: usize = 1_000;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

/// Where one comparison sends what.
pub struct Plan {
    pub tenant: TenantId,
    pub endpoint: String,
    pub served_by: Backend,
    pub compare_with: Backend,
    pub compare_backend: BackendConfig,
    /// The backend that served the client, asked again to learn noise; `None` when
    /// this request is not sampled for noise.
    pub ask_again: Option<BackendConfig>,
    pub rules: Rules,
    pub timeout: Duration,
    pub cap: usize,
    /// Set for reverse shadow of a migrated tenant: the guard counts mismatches.
    pub guard: Option<GuardConfig>,
    /// Classes accepted as intended, from the routing table of this request.
    pub accepted: Arc<Accepted>,
    /// New's version as configured, and the header that may state it instead.
    pub new_version: Option<String>,
    pub version_header: Option<HeaderName>,
    /// Opened before either backend was asked: the tenant's writes since
    /// then make the comparison raced.
    pub window: Window,
}

impl Shadow {
    pub fn new(config: &ShadowConfig, guard: Arc<Guard>) -> Shadow {
        let build = |h2c: bool| {
            let b = reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy();
            let b = if h2c {
                b.http2_prior_knowledge()
            } else {
                b.http1_only()
            };
            b.build().unwrap_or_else(|_| reqwest::Client::new())
        };
        Shadow {
            runtime: shadow_runtime(),
            slots: Arc::new(Semaphore::new(config.max_in_flight)),
            http1: build(false),
            h2c: build(true),
            counts: Mutex::new(HashMap::new()),
            classes: Mutex::new(HashMap::new()),
            latencies: Mutex::new(HashMap::new()),
            guard,
            samples: Mutex::new(Vec::new()),
            noise: Mutex::new(NoiseModel::default()),
            per_second: Mutex::new(HashMap::new()),
            rng: AtomicU64::new(now_ms() as u64 | 1),
            writes: Writes::default(),
        }
    }

    fn count(&self, tenant: &TenantId, endpoint: &str, version: &str, f: impl FnOnce(&mut Counts)) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let key = (tenant.clone(), endpoint.to_string(), version.to_string());
        let c = counts.entry(key).or_default();
        c.last_at = now_ms();
        f(c);
    }

    /// A cheap pseudo-random fraction in [0, 1) (xorshift), for sampling.
    fn fraction(&self) -> f64 {
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    fn within_rate(&self, tenant: &TenantId, max_per_second: u32) -> bool {
        let second = (now_ms() / 1000) as u64;
        let mut map = self.per_second.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 100_000 {
            map.retain(|_, (s, _)| *s == second);
        }
        let entry = map.entry(tenant.clone()).or_insert((second, 0));
        if entry.0 != second {
            *entry = (second, 0);
        }
        if entry.1 >= max_per_second {
            return false;
        }
        entry.1 += 1;
        true
    }

    /// Counts an eligible read and decides whether to shadow it: sampled, under
    /// the tenant's rate, and a slot free. Returns the slot to hold.
    pub fn admit(
        &self,
        tenant: &TenantId,
        endpoint: &str,
        config: &ShadowConfig,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.count(tenant, endpoint, "", |c| c.requests += 1);
        let permit = (self.fraction() < config.sample_rate
            && self.within_rate(tenant, config.max_per_second))
        .then(|| Arc::clone(&self.slots).try_acquire_owned().ok())
        .flatten();
        if permit.is_none() {
            self.count(tenant, endpoint, "", |c| c.shed += 1);
        }
        permit
    }

    /// Whether this shadowed request also asks the serving backend again. The
    /// first few requests of every endpoint always do, so that noise is known before
    /// the first comparisons are judged; after that, `noise_rate` of them.
    pub fn sample_noise(&self, endpoint: &str, config: &ShadowConfig) -> bool {
        let warming_up = self
            .noise
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .double_asks(endpoint)
            < NOISE_WARM_UP;
        warming_up || self.fraction() < config.noise_rate
    }

    /// Starts the comparison for `request` on its own task and returns the sender
    /// through which the request path hands over the primary answer.
    pub fn spawn(
        self: &Arc<Self>,
        permit: tokio::sync::OwnedSemaphorePermit,
        request: SafeRequest,
        plan: Plan,
    ) -> oneshot::Sender<Captured> {
        let (tx, rx) = oneshot::channel();
        let shadow = Arc::clone(self);
        let task = async move {
            let _permit = permit;
            shadow.compare(request, plan, rx).await;
        };
        match &self.runtime {
            Some(rt) => drop(rt.spawn(task)),
            None => drop(tokio::spawn(task)),
        }
        tx
    }

    async fn send(
        &self,
        backend: &BackendConfig,
        request: &SafeRequest,
        plan: &Plan,
        role: Backend,
    ) -> Result<Captured, String> {
        let upstream = backend.upstreams
            [(self.fraction() * backend.upstreams.len() as f64) as usize % backend.upstreams.len()];
        let client = if backend.h2c { &self.h2c } else { &self.http1 };
        let started = Instant::now();
        let mut headers = request.headers.clone();
        headers.insert(
            HeaderName::from_static("x-ficus-backend"),
            HeaderValue::from_static(role.as_str()),
        );
        headers.insert(
            HeaderName::from_static("x-ficus-shadow"),
            HeaderValue::from_static("1"),
        );
        let url = format!("http://{upstream}{}", request.path_and_query);
        let response = client
            .request(request.method.clone(), url)
            .headers(headers)
            .timeout(plan.timeout)
            .send()
            .await
            .map_err(|e| format!("{e}"))?;
        let status = response.status().as_u16();
        let headers: Vec<(String, String)> = response
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let encoded = headers
            .iter()
            .any(|(k, v)| k == "content-encoding" && v != "identity");
        let mut body = Vec::new();
        let mut overflow = false;
        let mut response = response;
        while let Some(chunk) = response.chunk().await.map_err(|e| format!("{e}"))? {
            if body.len() + chunk.len() > plan.cap {
                overflow = true;
                break;
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Captured {
            status,
            headers,
            body,
            overflow,
            encoded,
            micros: started.elapsed().as_micros() as u64,
        })
    }

    async fn compare(
        &self,
        request: SafeRequest,
        plan: Plan,
        primary: oneshot::Receiver<Captured>,
    ) {
        let started = Instant::now();
        let second = async {
            match &plan.ask_again {
                Some(b) => Some(self.send(b, &request, &plan, plan.served_by).await),
                None => None,
            }
        };
        let (shadow, again) = tokio::join!(
            self.send(&plan.compare_backend, &request, &plan, plan.compare_with),
            second
        );
        // The primary answer may still be streaming; wait for it, but not forever.
        let remaining = (plan.timeout * 2).saturating_sub(started.elapsed());
        let Ok(Ok(primary)) = tokio::time::timeout(remaining, primary).await else {
            // The client's request failed or never finished: nothing to compare.
            return;
        };
        let (tenant, endpoint) = (&plan.tenant, plan.endpoint.as_str());
        let shadow = match shadow {
            Ok(s) => s,
            Err(error) => {
                tracing::debug!(%tenant, endpoint, error, "shadow request failed");
                self.count(tenant, endpoint, "", |c| c.errors += 1);
                return;
            }
        };
        if primary.overflow || shadow.overflow || primary.encoded || shadow.encoded {
            self.count(tenant, endpoint, "", |c| c.shed += 1);
            return;
        }
        let latencies = [
            (plan.served_by, primary.micros),
            (plan.compare_with, shadow.micros),
        ];
        // A write of the tenant overlapped the reads: either answer may show
        // it, so neither the difference nor the noise it would teach is
        // judged. The latencies are real either way.
        if self.writes.raced(tenant, &plan.window) {
            self.record_latencies(tenant, latencies);
            self.count(tenant, endpoint, "", |c| c.raced += 1);
            return;
        }
        if let Some(Ok(again)) = again
            && !again.overflow
            && !again.encoded
        {
            let same =
                ficus_diff::compare(&primary.as_response(), &again.as_response(), &plan.rules);
            self.noise
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .learn(endpoint, &same);
        }
        // Legacy's answer first, whichever served: something only new has is then
        // `extra`, and additive, in forward and reverse shadow alike.
        let (legacy, new) = match plan.served_by {
            Backend::Legacy => (&primary, &shadow),
            Backend::New => (&shadow, &primary),
        };
        let version = plan
            .version_header
            .as_ref()
            .and_then(|h| {
                new.headers
                    .iter()
                    .find(|(k, _)| k == h.as_str())
                    .map(|(_, v)| version_label(Some(v.as_bytes())))
            })
            .flatten()
            .or_else(|| plan.new_version.clone())
            .unwrap_or_default();
        let outcome = ficus_diff::compare(&legacy.as_response(), &new.as_response(), &plan.rules);
        let split = self
            .noise
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .split(endpoint, &outcome);
        let classified = classify(endpoint, split.mismatches, &plan.accepted);
        self.record_latencies(tenant, latencies);
        let breaking = !classified.breaking.is_empty();
        if let Some(config) = &plan.guard {
            self.guard.observe(
                &Watch::Tenant(tenant.clone()),
                Signal::Compared {
                    mismatched: breaking,
                },
                config,
            );
        }
        self.count(tenant, endpoint, &version, |c| {
            c.compared += 1;
            match (breaking, split.noise.is_empty()) {
                (false, true) => c.matched += 1,
                (false, false) => c.noise_only += 1,
                (true, _) => c.mismatched += 1,
            }
        });
        let at = now_ms();
        let request_line = format!("{} {}", request.method, request.path_and_query);
        let differences: Vec<Difference> = classified
            .breaking
            .into_iter()
            .chain(classified.additive)
            .collect();
        self.count_classes(tenant, endpoint, &version, &differences, at, &request_line);
        if breaking {
            let sample = MismatchSample {
                tenant: tenant.clone(),
                endpoint: endpoint.to_string(),
                at: Timestamp::from_unix_millis(at),
                method: request.method.to_string(),
                path: request.path_and_query.clone(),
                served_by: plan.served_by.as_str().to_string(),
                compared_with: plan.compare_with.as_str().to_string(),
                served_status: primary.status,
                compared_status: shadow.status,
                differences: serde_json::to_string(&differences).unwrap_or_else(|_| "[]".into()),
                version: (!version.is_empty()).then(|| version.clone()),
            };
            let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
            if samples.len() >= SAMPLE_QUEUE {
                samples.remove(0);
            }
            samples.push(sample);
        }
    }

    fn record_latencies(&self, tenant: &TenantId, measured: [(Backend, u64); 2]) {
        let mut latencies = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        for (backend, micros) in measured {
            match latencies.get_mut(&(tenant.clone(), backend)) {
                Some(h) => h.record(micros),
                None => latencies
                    .entry((tenant.clone(), backend))
                    .or_default()
                    .record(micros),
            }
        }
    }

    /// Counts each class once per comparison, keeping its latest difference as
    /// the class's (redacted) example.
    fn count_classes(
        &self,
        tenant: &TenantId,
        endpoint: &str,
        version: &str,
        differences: &[Difference],
        at: i64,
        request_line: &str,
    ) {
        if differences.is_empty() {
            return;
        }
        let mut classes = self.classes.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = std::collections::HashSet::new();
        for d in differences {
            let key = ClassKey::of(endpoint, d);
            let id = key.id();
            if !seen.insert(id.clone()) {
                continue;
            }
            let agg = classes
                .entry((tenant.clone(), id, version.to_string()))
                .or_insert_with(|| ClassAgg {
                    key,
                    additive: d.compat == Compat::Additive,
                    count: 0,
                    first_at: at,
                    last_at: at,
                    example: None,
                });
            agg.count += 1;
            agg.first_at = agg.first_at.min(at);
            agg.last_at = agg.last_at.max(at);
            agg.example = Some(ClassExample {
                at: Timestamp::from_unix_millis(at),
                request: request_line.to_string(),
                version: (!version.is_empty()).then(|| version.to_string()),
                difference: serde_json::to_string(d).unwrap_or_else(|_| "{}".into()),
            });
        }
    }

    /// Takes the evidence gathered since the last call, for the store.
    pub fn take(&self) -> Evidence {
        // Called every flush: the tenants that stopped writing are let go here.
        self.writes.forget_idle(Instant::now());
        let counts = std::mem::take(&mut *self.counts.lock().unwrap_or_else(|p| p.into_inner()));
        let counts = counts
            .into_iter()
            .map(|((tenant, endpoint, version), c)| ComparisonCount {
                tenant,
                endpoint,
                version,
                last_at: Timestamp::from_unix_millis(c.last_at),
                requests: c.requests,
                compared: c.compared,
                matched: c.matched,
                mismatched: c.mismatched,
                noise_only: c.noise_only,
                errors: c.errors,
                shed: c.shed,
                raced: c.raced,
            })
            .collect();
        let classes = std::mem::take(&mut *self.classes.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .map(|((tenant, id, version), a)| ClassCount {
                tenant,
                id,
                endpoint: a.key.endpoint,
                path: a.key.path,
                kind: a.key.kind.to_string(),
                additive: a.additive,
                version,
                count: a.count,
                first_at: Timestamp::from_unix_millis(a.first_at),
                last_at: Timestamp::from_unix_millis(a.last_at),
                example: a.example,
            })
            .collect();
        let samples = std::mem::take(&mut *self.samples.lock().unwrap_or_else(|p| p.into_inner()));
        let at = Timestamp::from_unix_millis(now_ms());
        let noise = self
            .noise
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .report()
            .into_iter()
            .map(|n| NoiseEntry {
                endpoint: n.endpoint,
                path: n.path,
                score: n.score,
                observations: n.double_asks,
                updated_at: at,
            })
            .collect();
        Evidence {
            counts,
            samples,
            noise,
            classes,
        }
    }

    /// Takes the latencies measured since the last call, for the store.
    pub fn take_latencies(&self) -> Vec<LatencyReport> {
        let at = Timestamp::from_unix_millis(now_ms());
        std::mem::take(&mut *self.latencies.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .map(|((tenant, backend), histogram)| LatencyReport {
                tenant,
                backend,
                at,
                histogram,
            })
            .collect()
    }

    /// Puts back latencies whose write failed.
    pub fn restore_latencies(&self, reports: Vec<LatencyReport>) {
        let mut latencies = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        for r in reports {
            latencies
                .entry((r.tenant, r.backend))
                .or_default()
                .merge(&r.histogram);
        }
    }

    /// Puts back evidence whose write failed.
    pub fn restore(&self, evidence: Evidence) {
        for c in evidence.counts {
            self.count(&c.tenant, &c.endpoint, &c.version, |k| {
                k.requests += c.requests;
                k.compared += c.compared;
                k.matched += c.matched;
                k.mismatched += c.mismatched;
                k.noise_only += c.noise_only;
                k.errors += c.errors;
                k.shed += c.shed;
                k.raced += c.raced;
            });
        }
        {
            let mut classes = self.classes.lock().unwrap_or_else(|p| p.into_inner());
            for c in evidence.classes {
                let Some(kind) = ficus_diff::Kind::parse(&c.kind) else {
                    continue;
                };
                let agg = classes
                    .entry((c.tenant, c.id, c.version))
                    .or_insert_with(|| ClassAgg {
                        key: ClassKey {
                            endpoint: c.endpoint,
                            path: c.path,
                            kind,
                        },
                        additive: c.additive,
                        count: 0,
                        first_at: c.first_at.unix_millis(),
                        last_at: c.last_at.unix_millis(),
                        example: None,
                    });
                agg.count += c.count;
                agg.first_at = agg.first_at.min(c.first_at.unix_millis());
                agg.last_at = agg.last_at.max(c.last_at.unix_millis());
                if agg.example.is_none() {
                    agg.example = c.example;
                }
            }
        }
        let mut queue = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        for s in evidence.samples {
            if queue.len() < SAMPLE_QUEUE {
                queue.push(s);
            }
        }
    }
}
