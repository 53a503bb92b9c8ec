//! The dashboard's pages and actions: each handler reads through
//! [`crate::ops::Direct`] acting as the viewer's token, and renders a template.

use std::collections::HashMap;
use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use ficus_core::{Stage, TenantId, Timestamp};
use ficus_store::ControlStore;
use serde::Deserialize;

use super::{Act, UiError, Viewer, cookie, html, session, svg};
use crate::api::{
    ClassJson, CriterionJson, EventJson, PromoteRequest, ReadinessJson, RetireRequest,
    RollbackRequest, TenantJson,
};
use crate::ops::{AuditFilter, Control, Direct, GateOverrides};
use crate::server::StoreSlot;

type Page = Result<Response, UiError>;
type QueryResult<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

fn query<T>(q: QueryResult<T>) -> Result<T, UiError> {
    q.map(|Query(t)| t).map_err(|e| {
        UiError(
            StatusCode::BAD_REQUEST,
            format!("bad query string: {}", e.body_text()),
        )
    })
}

/// Rows per page of the tenant board and the audit log.
pub const PAGE_SIZE: usize = 50;

fn store(slot: &StoreSlot) -> Result<Arc<dyn ControlStore>, UiError> {
    slot.get().cloned().ok_or_else(|| {
        UiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the control store is not open yet".to_string(),
        )
    })
}

fn control(slot: &StoreSlot, viewer: &Viewer) -> Result<Direct, UiError> {
    store(slot).map(|s| Direct::new(s, viewer.who.actor))
}

fn tenant_id(raw: &str) -> Result<TenantId, UiError> {
    TenantId::parse(raw).map_err(|e| UiError(StatusCode::BAD_REQUEST, e.to_string()))
}

/// The start of the gate's evidence window (`24h`, as the gate prints it) now.
fn window_start(window: &str) -> Result<Timestamp, UiError> {
    let span = humantime::parse_duration(window).map_err(|e| {
        UiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the gate's window {window:?}: {e}"),
        )
    })?;
    Ok(crate::ops::ago(span))
}

/// Percent-encodes a query value.
pub fn encode(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Where the login page may send a person back to: a dashboard path, never
/// another site (`//evil`, `https://…`).
fn safe_next(raw: Option<&str>) -> String {
    match raw {
        Some(p)
            if p.starts_with("/ui/") && !p.contains('\\') && !p.chars().any(|c| c.is_control()) =>
        {
            p.to_string()
        }
        _ => "/ui/".to_string(),
    }
}

/// The parts every page's frame shows.
pub struct Frame {
    pub who: String,
    pub scope: &'static str,
    pub csrf: String,
    pub can_act: bool,
    /// Where the page's live updates start.
    pub seq: u64,
}

impl Frame {
    fn of(v: &Viewer) -> Frame {
        Frame {
            who: v.who.name().to_string(),
            scope: v.who.scope.as_str(),
            csrf: v.csrf.clone(),
            can_act: v.can_act(),
            seq: v.seq,
        }
    }
}

// Login and logout.

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    nonce: String,
    next: String,
    error: Option<String>,
}

#[derive(Deserialize)]
pub struct NextQuery {
    next: Option<String>,
}

fn login_page(next: String, error: Option<String>, status: StatusCode) -> Page {
    let nonce = session::login_nonce()?;
    let page = LoginPage {
        nonce: nonce.clone(),
        next,
        error,
    };
    let mut response = html(&page)?;
    *response.status_mut() = status;
    response.headers_mut().append(
        header::SET_COOKIE,
        header_value(&format!(
            "{}={nonce}; Path=/ui/login; HttpOnly; SameSite=Strict",
            session::LOGIN_COOKIE
        ))?,
    );
    Ok(response)
}

fn header_value(raw: &str) -> Result<HeaderValue, UiError> {
    HeaderValue::from_str(raw)
        .map_err(|_| UiError(StatusCode::INTERNAL_SERVER_ERROR, "bad header".to_string()))
}

pub async fn login_form(q: QueryResult<NextQuery>) -> Page {
    let q = query(q)?;
    let next = safe_next(q.next.as_deref());
    login_page(next, None, StatusCode::OK)
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
    nonce: String,
    next: Option<String>,
}

/// Whether the request reached us over TLS (directly or through a proxy that
/// says so), so the session cookie can be marked `Secure`.
fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

pub async fn login(
    State(slot): State<StoreSlot>,
    headers: HeaderMap,
    axum::extract::Form(form): axum::extract::Form<LoginForm>,
) -> Page {
    let next = safe_next(form.next.as_deref());
    let expected = cookie(&headers, session::LOGIN_COOKIE).unwrap_or("");
    if !session::nonce_ok(expected, &form.nonce) {
        return login_page(
            next,
            Some("the login form expired; enter the token again".to_string()),
            StatusCode::FORBIDDEN,
        );
    }
    let store = store(&slot)?;
    let Some((value, who)) = session::open(&*store, form.token.trim()).await? else {
        tracing::warn!("dashboard: login refused");
        return login_page(
            next,
            Some("that is not a live token".to_string()),
            StatusCode::UNAUTHORIZED,
        );
    };
    tracing::info!(token = who.name(), "dashboard: logged in");
    let secure = if over_tls(&headers) { "; Secure" } else { "" };
    let mut response = Redirect::to(&next).into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        header_value(&format!(
            "{}={value}; Path=/ui; Max-Age={}; HttpOnly; SameSite=Strict{secure}",
            session::COOKIE,
            session::LIFETIME_SECS
        ))?,
    );
    Ok(response)
}

#[derive(Deserialize)]
pub struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

pub async fn logout(
    viewer: Viewer,
    axum::extract::Form(form): axum::extract::Form<CsrfOnly>,
) -> Page {
    if viewer.is_session() && !super::session_csrf_matches(&viewer.csrf, &form.csrf) {
        return Err(UiError(
            StatusCode::FORBIDDEN,
            "the form's CSRF token is missing or wrong".to_string(),
        ));
    }
    let mut response = Redirect::to("/ui/login").into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        header_value(&format!(
            "{}=; Path=/ui; Max-Age=0; HttpOnly; SameSite=Strict",
            session::COOKIE
        ))?,
    );
    Ok(response)
}

// The overview.

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage {
    frame: Frame,
    status: crate::api::StatusJson,
    stages_svg: String,
    burndown_svg: String,
    legacy_svg: String,
    recent: Vec<EventJson>,
    guard: Vec<EventJson>,
}

pub async fn overview(State(slot): State<StoreSlot>, viewer: Viewer) -> Page {
    let c = control(&slot, &viewer)?;
    let status = c.status().await?;
    let history = c
        .audit(AuditFilter {
            limit: Some(svg::BURNDOWN_EVENTS),
            ..AuditFilter::default()
        })
        .await?
        .events;
    let guard = c
        .audit(AuditFilter {
            actor: Some("guard".to_string()),
            limit: Some(10),
            ..AuditFilter::default()
        })
        .await?
        .events;
    let recent: Vec<EventJson> = history.iter().rev().take(15).cloned().collect();
    let now = crate::ops::now().unix_millis();
    const HOURS: i64 = 24;
    let legacy = store(&slot)?
        .legacy_hours(Timestamp::from_unix_millis(now - HOURS * 3_600_000))
        .await
        .map_err(|e| UiError::from(crate::Error::Store(e)))?;
    let page = OverviewPage {
        frame: Frame::of(&viewer),
        stages_svg: svg::stage_bar(&status.stages),
        burndown_svg: svg::burndown(&history),
        legacy_svg: svg::legacy_traffic(&legacy, now, HOURS),
        recent,
        guard: guard.into_iter().rev().collect(),
        status,
    };
    html(&page)
}

// The tenant board.

#[derive(Deserialize, Default)]
pub struct BoardQuery {
    stage: Option<String>,
    q: Option<String>,
    sort: Option<String>,
    page: Option<usize>,
}

/// One row of the tenant board.
pub struct BoardRow {
    pub tenant: TenantJson,
    /// `None` outside shadow, where the gate does not apply.
    pub ready: Option<bool>,
    pub score: f64,
    pub compared: u64,
    pub breaking: u64,
    pub coverage: String,
    pub errors: String,
    pub latency: String,
    pub last: Option<EventJson>,
}

#[derive(Template)]
#[template(path = "board.html")]
struct BoardPage {
    frame: Frame,
    /// How old the gate verdicts are, when shadow tenants are shown.
    verdicts_age: Option<String>,
    rows: Vec<BoardRow>,
    total: usize,
    page: usize,
    pages: usize,
    stage: String,
    q: String,
    sort: String,
    /// The filter's query string without the page, for the pager's links.
    base: String,
}

fn criterion<'a>(r: &'a ReadinessJson, name: &str) -> Option<&'a CriterionJson> {
    r.criteria.iter().find(|c| c.name == name)
}

pub async fn board(
    State(slot): State<StoreSlot>,
    State(verdicts): State<Arc<super::verdicts::Verdicts>>,
    viewer: Viewer,
    q: QueryResult<BoardQuery>,
) -> Page {
    let q = query(q)?;
    let mut timing = Timing::start();
    let c = control(&slot, &viewer)?;
    let stage = match q.stage.as_deref().filter(|s| !s.is_empty()) {
        Some(raw) => {
            Some(Stage::parse(raw).map_err(|e| UiError(StatusCode::BAD_REQUEST, e.to_string()))?)
        }
        None => None,
    };
    let text = q.q.clone().unwrap_or_default().trim().to_lowercase();
    let mut tenants = c.tenants(stage).await?.tenants;
    timing.mark("tenants");
    if !text.is_empty() {
        tenants.retain(|t| {
            t.id.contains(&text)
                || t.name.to_lowercase().contains(&text)
                || t.domains.iter().any(|d| d.contains(&text))
        });
    }
    let judgment = if stage.is_none_or(|s| s == Stage::Shadow) {
        Some(verdicts.get(control(&slot, &viewer)?).await?)
    } else {
        None
    };
    let judged = judgment.as_ref().map(|j| &j.by_tenant);
    timing.mark("gate");
    let mut rows: Vec<BoardRow> = tenants
        .into_iter()
        .map(|t| {
            // A verdict only for a tenant still in shadow: one judged before
            // the tenant moved says nothing about it now.
            let r = judged
                .filter(|_| t.stage == Stage::Shadow.as_str())
                .and_then(|j| j.get(&t.id));
            let detail = |name: &str| {
                r.and_then(|r| criterion(r, name))
                    .map_or_else(|| "—".to_string(), |c| c.detail.clone())
            };
            BoardRow {
                ready: r.map(|r| r.ready),
                score: r.map_or(0.0, |r| r.score),
                compared: r.map_or(0, |r| r.versions.iter().map(|v| v.compared).sum()),
                breaking: r.map_or(0, |r| r.open_classes.iter().map(|c| c.counted).sum()),
                coverage: detail("coverage"),
                errors: detail("shadow errors"),
                latency: detail("latency"),
                last: None,
                tenant: t,
            }
        })
        .collect();
    let sort = q.sort.clone().unwrap_or_else(|| "ready".to_string());
    match sort.as_str() {
        // Closest to ready: ready first, then by score; tenants outside shadow last.
        "ready" => rows.sort_by(|a, b| {
            b.ready
                .is_some()
                .cmp(&a.ready.is_some())
                .then(b.ready.cmp(&a.ready))
                .then(b.score.total_cmp(&a.score))
                .then(a.tenant.id.cmp(&b.tenant.id))
        }),
        // Most at risk: most breaking mismatches, then the least ready.
        "risk" => rows.sort_by(|a, b| {
            b.breaking
                .cmp(&a.breaking)
                .then(a.score.total_cmp(&b.score))
                .then(a.tenant.id.cmp(&b.tenant.id))
        }),
        "name" => rows.sort_by(|a, b| a.tenant.id.cmp(&b.tenant.id)),
        "updated" => rows.sort_by(|a, b| {
            b.tenant
                .updated_at
                .cmp(&a.tenant.updated_at)
                .then(a.tenant.id.cmp(&b.tenant.id))
        }),
        other => {
            return Err(UiError(
                StatusCode::BAD_REQUEST,
                format!("unknown sort {other:?}: expected ready, risk, name or updated"),
            ));
        }
    }
    let total = rows.len();
    let pages = total.div_ceil(PAGE_SIZE).max(1);
    let page = q.page.unwrap_or(1).clamp(1, pages);
    let mut rows: Vec<BoardRow> = rows
        .into_iter()
        .skip((page - 1) * PAGE_SIZE)
        .take(PAGE_SIZE)
        .collect();
    // The last change and who made it, for the rows shown only, in one query.
    let ids = rows
        .iter()
        .map(|r| tenant_id(&r.tenant.id))
        .collect::<Result<Vec<_>, _>>()?;
    let last: HashMap<String, EventJson> = store(&slot)?
        .last_events(&ids)
        .await
        .map_err(|e| UiError::from(crate::Error::Store(e)))?
        .iter()
        .map(|e| (e.tenant.to_string(), EventJson::from(e)))
        .collect();
    for row in &mut rows {
        row.last = last.get(&row.tenant.id).cloned();
    }
    timing.mark("rows");
    let stage = stage.map(|s| s.as_str().to_string()).unwrap_or_default();
    let base = format!(
        "stage={}&q={}&sort={}",
        encode(&stage),
        encode(&text),
        encode(&sort)
    );
    let verdicts_age = judgment.map(|j| {
        format!(
            "Gate verdicts judged {} s ago (in {} ms); stages and versions are current.",
            j.at.elapsed().as_secs(),
            j.took.as_millis()
        )
    });
    let mut response = html(&BoardPage {
        frame: Frame::of(&viewer),
        verdicts_age,
        rows,
        total,
        page,
        pages,
        stage,
        q: text,
        sort,
        base,
    })?;
    timing.mark("render");
    timing.header(&mut response);
    Ok(response)
}

/// Where a page's server time went, as a `Server-Timing` header that a
/// browser's developer tools show and the dashboard benchmark prints.
struct Timing {
    last: std::time::Instant,
    marks: Vec<(&'static str, f64)>,
}

impl Timing {
    fn start() -> Timing {
        Timing {
            last: std::time::Instant::now(),
            marks: Vec::new(),
        }
    }

    fn mark(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.marks
            .push((name, now.duration_since(self.last).as_secs_f64() * 1000.0));
        self.last = now;
    }

    fn header(&self, response: &mut Response) {
        let value = self
            .marks
            .iter()
            .map(|(name, ms)| format!("{name};dur={ms:.1}"))
            .collect::<Vec<_>>()
            .join(", ");
        if let Ok(v) = HeaderValue::from_str(&value) {
            response.headers_mut().insert("server-timing", v);
        }
    }
}

// A tenant's page.

/// A mismatch's difference, one changed field per row, legacy beside new.
pub struct FieldDiff {
    pub path: String,
    pub kind: String,
    pub legacy: String,
    pub new: String,
}

/// The differences the diff engine recorded, one row per field. The engine
/// redacts a value to its type, length and hash unless `reveal` was configured
/// for it, so what is shown is exactly what was stored. A document of another
/// shape (a newer Ficus) is shown whole rather than dropped.
pub fn field_diffs(differences: &serde_json::Value) -> Vec<FieldDiff> {
    let side = |s: &Option<ficus_diff::Sample>| {
        s.as_ref()
            .map_or_else(|| "(absent)".to_string(), ToString::to_string)
    };
    // A sample holds a list; a class's example holds its one difference.
    let list = if differences.is_object() {
        serde_json::from_value::<ficus_diff::Difference>(differences.clone()).map(|d| vec![d])
    } else {
        serde_json::from_value::<Vec<ficus_diff::Difference>>(differences.clone())
    };
    match list {
        Ok(list) => list
            .iter()
            .map(|d| FieldDiff {
                path: d.path.clone(),
                kind: format!("{} ({})", d.kind, d.compat),
                legacy: side(&d.left),
                new: side(&d.right),
            })
            .collect(),
        Err(_) => vec![FieldDiff {
            path: "$".to_string(),
            kind: "unreadable".to_string(),
            legacy: differences.to_string(),
            new: String::new(),
        }],
    }
}

pub struct Sample {
    pub at: String,
    pub request: String,
    pub status: String,
    pub served_by: String,
    pub fields: Vec<FieldDiff>,
}

pub struct Branded {
    pub display_name: String,
    pub app_name: String,
    pub primary: String,
    pub accent: String,
    pub logo: Option<String>,
    pub header_svg: String,
}

/// One endpoint of a tenant's parallel run over the gate's window.
pub struct Coverage {
    pub endpoint: String,
    pub requests: u64,
    pub compared: u64,
    pub mismatched: u64,
    pub errors: u64,
    /// Compared at least the gate's minimum per endpoint.
    pub covered: bool,
}

#[derive(Template)]
#[template(path = "tenant.html")]
struct TenantPage {
    frame: Frame,
    coverage: Vec<Coverage>,
    min_per_endpoint: u64,
    latency_svg: String,
    tenant: TenantJson,
    readiness: ReadinessJson,
    comparisons: crate::api::ComparisonsJson,
    classes: Vec<ClassJson>,
    samples: Vec<Sample>,
    audit: Vec<EventJson>,
    guard: Vec<EventJson>,
    brand: Option<Branded>,
    job: Option<crate::api::JobJson>,
}

/// `#rgb` or `#rrggbb`, else the fallback: the value ends up in an SVG attribute.
fn colour(raw: Option<&serde_json::Value>, fallback: &str) -> String {
    match raw.and_then(|v| v.as_str()) {
        Some(c)
            if (c.len() == 4 || c.len() == 7)
                && c.starts_with('#')
                && c[1..].bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            c.to_string()
        }
        _ => fallback.to_string(),
    }
}

pub async fn tenant(
    State(slot): State<StoreSlot>,
    viewer: Viewer,
    Path(raw): Path<String>,
) -> Page {
    let id = tenant_id(&raw)?;
    let c = control(&slot, &viewer)?;
    let shown = c.show(&id, 50).await?;
    let readiness = c.readiness(&id, &GateOverrides::default()).await?;
    let classes = c.mismatch_classes(Some(&id), None).await?.classes;
    let samples = c
        .mismatches(&id, None, 5)
        .await?
        .mismatches
        .into_iter()
        .map(|m| Sample {
            at: m.at,
            request: format!("{} {}", m.method, m.path),
            status: format!("{} / {}", m.status[0], m.status[1]),
            served_by: m.served_by,
            fields: field_diffs(&m.differences),
        })
        .collect();
    let brand = c.config(&id, None).await.ok().map(|cfg| {
        let doc = &cfg.config;
        let branding = doc.get("branding");
        let primary = colour(branding.and_then(|b| b.get("primary_color")), "#2f5d50");
        let accent = colour(branding.and_then(|b| b.get("accent_color")), "#e0b040");
        let display_name = doc
            .get("display_name")
            .and_then(|v| v.as_str())
            .unwrap_or(&shown.tenant.name)
            .to_string();
        let app_name = doc
            .get("app_name")
            .and_then(|v| v.as_str())
            .unwrap_or(&display_name)
            .to_string();
        let logo = branding
            .and_then(|b| b.get("logo_url"))
            .and_then(|v| v.as_str())
            .map(str::to_string);
        Branded {
            header_svg: svg::branded_header(
                &display_name,
                &app_name,
                &primary,
                &accent,
                logo.as_deref(),
            ),
            logo,
            display_name,
            app_name,
            primary,
            accent,
        }
    });
    let job = store(&slot)?
        .provision_job_of(&id)
        .await
        .map_err(|e| UiError::from(crate::Error::Store(e)))?
        .as_ref()
        .map(crate::api::JobJson::from);
    // Endpoint coverage and latency over the gate's window.
    let gate = c.gate().await?;
    let since = window_start(&gate.window)?;
    let s = store(&slot)?;
    let mut coverage: Vec<Coverage> = Vec::new();
    for count in s
        .comparison_stats(&id, since)
        .await
        .map_err(|e| UiError::from(crate::Error::Store(e)))?
    {
        let row = match coverage.iter_mut().find(|c| c.endpoint == count.endpoint) {
            Some(row) => row,
            None => {
                coverage.push(Coverage {
                    endpoint: count.endpoint.clone(),
                    requests: 0,
                    compared: 0,
                    mismatched: 0,
                    errors: 0,
                    covered: false,
                });
                coverage.last_mut().ok_or_else(|| {
                    UiError(StatusCode::INTERNAL_SERVER_ERROR, "no row".to_string())
                })?
            }
        };
        row.requests += count.requests;
        row.compared += count.compared;
        row.mismatched += count.mismatched;
        row.errors += count.errors;
    }
    for row in &mut coverage {
        row.covered = row.compared >= gate.min_per_endpoint;
    }
    let hours = s
        .latency_hours(&id, since)
        .await
        .map_err(|e| UiError::from(crate::Error::Store(e)))?;
    let latency_svg = svg::latency_chart(&hours, gate.max_latency_ratio, gate.latency_slack_ms);
    let guard = shown
        .audit
        .iter()
        .filter(|e| e.actor == "guard")
        .cloned()
        .collect();
    let mut audit = shown.audit;
    audit.reverse();
    html(&TenantPage {
        frame: Frame::of(&viewer),
        coverage,
        min_per_endpoint: gate.min_per_endpoint,
        latency_svg,
        tenant: shown.tenant,
        comparisons: shown.comparisons,
        readiness,
        classes,
        samples,
        audit,
        guard,
        brand,
        job,
    })
}

// A mismatch class, drilled down to its sample pair.

#[derive(Deserialize)]
pub struct ClassForm {
    reason: String,
    #[serde(default)]
    fixed_in: Option<String>,
}

/// Resolves, accepts or reopens a mismatch class from its page.
pub async fn change_class(
    State(slot): State<StoreSlot>,
    Path((raw, action)): Path<(String, String)>,
    act: Act<ClassForm>,
) -> Page {
    if !["resolve", "accept", "reopen"].contains(&action.as_str()) {
        return Err(UiError(
            StatusCode::NOT_FOUND,
            format!("no class action {action:?}: expected resolve, accept or reopen"),
        ));
    }
    let c = control(&slot, &act.viewer)?;
    let changed = c
        .change_class(
            &raw,
            &action,
            crate::api::ClassChangeRequest {
                reason: act.form.reason,
                fixed_in: act.form.fixed_in.filter(|v| !v.trim().is_empty()),
                whole_endpoint: false,
            },
        )
        .await?;
    Ok(Redirect::to(&format!("/ui/classes/{}", encode(&changed.class.id))).into_response())
}

#[derive(Template)]
#[template(path = "class.html")]
struct ClassPage {
    frame: Frame,
    class: ClassJson,
    history: Vec<crate::api::ClassEventJson>,
    fields: Vec<FieldDiff>,
    request: String,
}

pub async fn class(State(slot): State<StoreSlot>, viewer: Viewer, Path(raw): Path<String>) -> Page {
    let c = control(&slot, &viewer)?;
    let found = c.mismatch_class(&raw).await?;
    let (fields, request) = match &found.class.example {
        Some(e) => (field_diffs(&e.difference), e.request.clone()),
        None => (Vec::new(), String::new()),
    };
    html(&ClassPage {
        frame: Frame::of(&viewer),
        class: found.class,
        history: found.history,
        fields,
        request,
    })
}

// Endpoints across tenants.

pub struct EndpointRow {
    pub endpoint: String,
    pub tenants: u64,
    pub compared: u64,
    pub mismatched: u64,
    pub errors: u64,
    pub breaking: u64,
    pub additive: u64,
    pub classes: Vec<ClassJson>,
}

pub struct NoiseRow {
    pub endpoint: String,
    pub path: String,
    pub why: String,
}

#[derive(Template)]
#[template(path = "endpoints.html")]
struct EndpointsPage {
    frame: Frame,
    endpoints: Vec<EndpointRow>,
    noise: Vec<NoiseRow>,
}

pub async fn endpoints(State(slot): State<StoreSlot>, viewer: Viewer) -> Page {
    let c = control(&slot, &viewer)?;
    let classes = c.mismatch_classes(None, None).await?;
    let since = window_start(&classes.window)?;
    let row = |endpoint: &str| EndpointRow {
        endpoint: endpoint.to_string(),
        tenants: 0,
        compared: 0,
        mismatched: 0,
        errors: 0,
        breaking: 0,
        additive: 0,
        classes: Vec::new(),
    };
    let mut by: std::collections::BTreeMap<String, EndpointRow> = Default::default();
    for e in store(&slot)?
        .endpoint_counts(since)
        .await
        .map_err(|e| UiError::from(crate::Error::Store(e)))?
    {
        let r = by
            .entry(e.endpoint.clone())
            .or_insert_with(|| row(&e.endpoint));
        (r.tenants, r.compared, r.mismatched, r.errors) =
            (e.tenants, e.compared, e.mismatched, e.errors);
    }
    for class in classes.classes {
        let row = by
            .entry(class.endpoint.clone())
            .or_insert_with(|| row(&class.endpoint));
        if class.compat == "additive" {
            row.additive += class.counted;
        } else {
            row.breaking += class.counted;
        }
        row.classes.push(class);
    }
    let noise = store(&slot)?
        .noise()
        .await
        .map_err(|e| UiError::from(crate::Error::Store(e)))?
        .into_iter()
        .map(|n| NoiseRow {
            endpoint: n.endpoint.clone(),
            path: n.path.clone(),
            why: format!(
                "differed between two answers of the same backend in {:.0}% of {} observations (last {})",
                n.score * 100.0,
                n.observations,
                ficus_store::format_time(n.updated_at)
            ),
        })
        .collect();
    html(&EndpointsPage {
        frame: Frame::of(&viewer),
        endpoints: by.into_values().collect(),
        noise,
    })
}

// The audit log.

#[derive(Deserialize, Default)]
pub struct AuditQuery {
    tenant: Option<String>,
    actor: Option<String>,
    to: Option<String>,
    since: Option<String>,
    until: Option<String>,
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    frame: Frame,
    events: Vec<EventJson>,
    tenant: String,
    actor: String,
    to: String,
    since: String,
    until: String,
}

fn time(name: &str, raw: &str) -> Result<Option<Timestamp>, UiError> {
    if raw.trim().is_empty() {
        return Ok(None);
    }
    crate::api::parse_time(raw.trim()).map(Some).ok_or_else(|| {
        UiError(
            StatusCode::BAD_REQUEST,
            format!("{name} {raw:?} is not a time like 2026-11-21 10:00:00"),
        )
    })
}

pub async fn audit(
    State(slot): State<StoreSlot>,
    viewer: Viewer,
    q: QueryResult<AuditQuery>,
) -> Page {
    let q = query(q)?;
    let c = control(&slot, &viewer)?;
    let tenant = q.tenant.clone().unwrap_or_default().trim().to_string();
    let actor = q.actor.clone().unwrap_or_default().trim().to_string();
    let to = q.to.clone().unwrap_or_default().trim().to_string();
    let since = q.since.clone().unwrap_or_default();
    let until = q.until.clone().unwrap_or_default();
    let filter = AuditFilter {
        tenant: if tenant.is_empty() {
            None
        } else {
            Some(tenant_id(&tenant)?)
        },
        since: time("since", &since)?,
        until: time("until", &until)?,
        actor: (!actor.is_empty()).then(|| actor.clone()),
        to: if to.is_empty() {
            None
        } else {
            Some(Stage::parse(&to).map_err(|e| UiError(StatusCode::BAD_REQUEST, e.to_string()))?)
        },
        limit: Some(200),
    };
    let mut events = c.audit(filter).await?.events;
    events.reverse();
    html(&AuditPage {
        frame: Frame::of(&viewer),
        events,
        tenant,
        actor,
        to,
        since,
        until,
    })
}

// Actions.

#[derive(Deserialize)]
pub struct StageForm {
    version: u64,
    reason: String,
    #[serde(default)]
    to: Option<String>,
    /// A checkbox: promote although the gate says not ready (the reason goes on
    /// record with the failing criteria).
    #[serde(default)]
    force: Option<String>,
}

fn back_to(id: &TenantId) -> Response {
    Redirect::to(&format!("/ui/tenants/{}", encode(id.as_str()))).into_response()
}

pub async fn promote(
    State(slot): State<StoreSlot>,
    Path(raw): Path<String>,
    act: Act<StageForm>,
) -> Page {
    let id = tenant_id(&raw)?;
    let c = control(&slot, &act.viewer)?;
    c.promote(
        &id,
        PromoteRequest {
            reason: act.form.reason,
            force: act.form.force.is_some(),
        },
        Some(act.form.version),
    )
    .await?;
    Ok(back_to(&id))
}

pub async fn rollback(
    State(slot): State<StoreSlot>,
    Path(raw): Path<String>,
    act: Act<StageForm>,
) -> Page {
    let id = tenant_id(&raw)?;
    let c = control(&slot, &act.viewer)?;
    c.rollback(
        &id,
        RollbackRequest {
            reason: act.form.reason,
            to: act.form.to.filter(|t| !t.is_empty()),
        },
        Some(act.form.version),
    )
    .await?;
    Ok(back_to(&id))
}

#[derive(Deserialize)]
pub struct NextForm {
    n: u64,
    reason: String,
}

#[derive(Template)]
#[template(path = "promoted.html")]
struct PromotedPage {
    frame: Frame,
    promoted: Vec<TenantJson>,
    stopped: Option<String>,
}

/// Promotes the `n` most ready tenants in shadow, each through the gate, in one
/// go (the CLI's `--next` also waits a soak between them; a page cannot hold a
/// request that long, so it shows what it did and the guard watches after).
pub async fn promote_next(State(slot): State<StoreSlot>, act: Act<NextForm>) -> Page {
    let c = control(&slot, &act.viewer)?;
    let n = act.form.n.clamp(1, 1_000);
    let ranked = c.readiness_all(&GateOverrides::default()).await?;
    let mut promoted = Vec::new();
    let mut stopped = None;
    for r in ranked.tenants.iter().filter(|r| r.ready) {
        if promoted.len() as u64 >= n {
            break;
        }
        let id = tenant_id(&r.tenant)?;
        match c
            .promote(
                &id,
                PromoteRequest {
                    reason: act.form.reason.clone(),
                    force: false,
                },
                None,
            )
            .await
        {
            Ok(moved) => promoted.push(moved.tenant),
            Err(e) => {
                stopped = Some(format!("promoting {id} failed: {e}"));
                break;
            }
        }
    }
    if stopped.is_none() && (promoted.len() as u64) < n {
        stopped = Some(format!(
            "only {} of the {} tenants in shadow were ready",
            promoted.len(),
            ranked.tenants.len()
        ));
    }
    html(&PromotedPage {
        frame: Frame::of(&act.viewer),
        promoted,
        stopped,
    })
}

#[derive(Deserialize)]
pub struct RetireForm {
    version: String,
    reason: String,
    confirm: String,
}

/// What a person must type to retire legacy.
pub const RETIRE_CONFIRMATION: &str = "retire legacy";

pub async fn retire(State(slot): State<StoreSlot>, act: Act<RetireForm>) -> Page {
    if act.form.confirm.trim() != RETIRE_CONFIRMATION {
        return Err(UiError(
            StatusCode::BAD_REQUEST,
            format!("type {RETIRE_CONFIRMATION:?} to confirm the retirement"),
        ));
    }
    let c = control(&slot, &act.viewer)?;
    c.retire(
        RetireRequest {
            reason: act.form.reason,
            undo: false,
            quiet_window: None,
        },
        Some(&act.form.version),
    )
    .await?;
    Ok(Redirect::to("/ui/").into_response())
}

// The write surface: routes, and releasing or holding write routes.

pub struct RouteRow {
    pub route: crate::api::RouteJson,
    /// Requests over the census window that went to legacy.
    pub legacy: u64,
    /// And to the new side, any of its services.
    pub new: u64,
}

#[derive(Template)]
#[template(path = "routes.html")]
struct RoutesPage {
    frame: Frame,
    routes: crate::api::RoutesJson,
    rows: Vec<RouteRow>,
}

pub async fn routes(State(slot): State<StoreSlot>, viewer: Viewer) -> Page {
    let c = control(&slot, &viewer)?;
    let mut routes = c.routes(None).await?;
    // Held write routes first: they are what stands between here and retiring
    // legacy.
    routes
        .routes
        .sort_by(|a, b| b.held.cmp(&a.held).then(a.route.cmp(&b.route)));
    let rows = routes
        .routes
        .iter()
        .map(|r| {
            let (legacy, new) = r.census.iter().fold((0, 0), |(l, n), c| {
                if c.backend == "legacy" {
                    (l + c.requests, n)
                } else {
                    (l, n + c.requests)
                }
            });
            RouteRow {
                route: r.clone(),
                legacy,
                new,
            }
        })
        .collect();
    html(&RoutesPage {
        frame: Frame::of(&viewer),
        routes,
        rows,
    })
}

#[derive(Deserialize)]
pub struct RouteForm {
    route: String,
    #[serde(default)]
    tenant: Option<String>,
    reason: String,
    /// For a destructive route, the route typed again.
    #[serde(default)]
    confirm: Option<String>,
}

/// Releases a held write route, for every tenant or one. A destructive route
/// needs its second confirmation: the person types the route itself, which the
/// control plane receives as `destructive: true`.
pub async fn release_route(State(slot): State<StoreSlot>, act: Act<RouteForm>) -> Page {
    let c = control(&slot, &act.viewer)?;
    let form = act.form;
    let confirmed = form
        .confirm
        .as_deref()
        .is_some_and(|typed| typed.trim() == form.route.trim());
    if form
        .confirm
        .as_deref()
        .is_some_and(|t| !t.trim().is_empty())
        && !confirmed
    {
        return Err(UiError(
            StatusCode::BAD_REQUEST,
            format!(
                "type the route {:?} exactly to confirm releasing it",
                form.route
            ),
        ));
    }
    c.release_route(crate::api::RouteReleaseRequest {
        route: form.route,
        tenant: form.tenant.filter(|t| !t.trim().is_empty()),
        destructive: confirmed,
        reason: form.reason,
    })
    .await?;
    Ok(Redirect::to("/ui/routes").into_response())
}

/// Holds a write route on legacy again, for every tenant or one.
pub async fn hold_route(State(slot): State<StoreSlot>, act: Act<RouteForm>) -> Page {
    let c = control(&slot, &act.viewer)?;
    let form = act.form;
    c.hold_route(crate::api::RouteReleaseRequest {
        route: form.route,
        tenant: form.tenant.filter(|t| !t.trim().is_empty()),
        destructive: false,
        reason: form.reason,
    })
    .await?;
    Ok(Redirect::to("/ui/routes").into_response())
}
