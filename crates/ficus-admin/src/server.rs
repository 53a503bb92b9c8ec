//! The HTTP API: the operations of [`crate::ops`] as JSON over HTTP, under `/v1`.
//!
//! Every route needs `Authorization: Bearer TOKEN`; the token's hash is read from
//! the store on each request, so a rotation takes effect at once. A token in a
//! query string is refused even when right, because query strings end up in logs.
//! A refused request is logged with its method and path, never its token or
//! query. Every mutating call names the version it was decided on in `If-Match`
//! and carries a reason. Errors become responses in one place, [`ApiError`], as
//! `{"error": "…"}` with a status that says what happened.

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use ficus_core::{Stage, Timestamp};
use ficus_store::{ControlStore, StoreError};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::api::{
    AddRequest, ConfigRequest, ErrorJson, GateRequest, PromoteRequest, RestoreRequest,
    RetireRequest, RollbackRequest, StageRequest,
};
use crate::ops::{self, AuditFilter, Control, Direct, GateOverrides};
use crate::provision::{self, Hooks};
use crate::token::{Identity, Scope};
use crate::{Error, token};

/// Request bodies larger than this are refused: no call needs more.
pub const BODY_LIMIT: usize = 64 * 1024;

/// The OpenAPI document describing every route, served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Every route, as `(method, path)` in OpenAPI's spelling; the document is tested
/// against this list.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/openapi.json"),
    ("get", "/v1/tenants"),
    ("post", "/v1/tenants"),
    ("get", "/v1/tenants/{id}"),
    ("put", "/v1/tenants/{id}/stage"),
    ("post", "/v1/tenants/{id}/promote"),
    ("post", "/v1/tenants/{id}/rollback"),
    ("get", "/v1/tenants/{id}/readiness"),
    ("get", "/v1/tenants/{id}/mismatches"),
    ("get", "/v1/readiness"),
    ("get", "/v1/audit"),
    ("get", "/v1/status"),
    ("post", "/v1/retire"),
    ("get", "/v1/gate"),
    ("put", "/v1/gate"),
    ("get", "/v1/tenants/{id}/config"),
    ("put", "/v1/tenants/{id}/config"),
    ("get", "/v1/tenants/{id}/config/history"),
    ("post", "/v1/tenants/{id}/config/restore"),
    ("get", "/v1/tenant-config.schema.json"),
    ("get", "/v1/provisioning/jobs"),
    ("get", "/v1/provisioning/jobs/{event}"),
    ("post", "/v1/provisioning/jobs/{event}/retry"),
    ("get", "/v1/routes"),
    ("put", "/v1/routes/stage"),
    ("post", "/v1/routes/release"),
    ("post", "/v1/routes/hold"),
    ("post", "/v1/routes/mark"),
    ("put", "/v1/routes/default"),
    ("get", "/v1/mismatch-classes"),
    ("get", "/v1/mismatch-classes/{class}"),
    ("post", "/v1/mismatch-classes/{class}/{action}"),
];

/// The billing webhook: outside the bearer token, authenticated by its
/// signature instead (see `crate::provision`).
pub const HOOK_PATH: &str = "/v1/hooks/billing";

/// Where the API finds the store: set once it is open (the proxy opens it after
/// its listeners are up; until then the API answers 503).
pub type StoreSlot = Arc<OnceLock<Arc<dyn ControlStore>>>;

/// Turns true when the process begins to shut down: long-lived responses (the
/// dashboard's event streams) end then, so a graceful shutdown does not wait
/// on them for ever. A proxy passes its own shutdown watch, which is one.
pub type Closing = tokio::sync::watch::Receiver<bool>;

/// The API's routes, to be served or merged into another router; the billing
/// webhook's secret and tenant database come from the environment.
pub fn router(store: StoreSlot, closing: Closing) -> Router {
    router_with(store, Hooks::from_env(), closing)
}

/// The API's routes with the webhook's settings given.
pub fn router_with(store: StoreSlot, hooks: Hooks, closing: Closing) -> Router {
    let hook = Router::new()
        .route(HOOK_PATH, post(billing_hook))
        .with_state((store.clone(), hooks));
    let api = Router::new()
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/tenants", get(list).post(add))
        .route("/v1/tenants/{id}", get(show))
        .route("/v1/tenants/{id}/stage", put(stage))
        .route("/v1/tenants/{id}/promote", post(promote))
        .route("/v1/tenants/{id}/rollback", post(rollback))
        .route("/v1/tenants/{id}/readiness", get(readiness))
        .route("/v1/tenants/{id}/mismatches", get(mismatches))
        .route("/v1/readiness", get(readiness_all))
        .route("/v1/audit", get(audit))
        .route("/v1/status", get(status))
        .route("/v1/retire", post(retire))
        .route("/v1/gate", get(gate).put(set_gate))
        .route("/v1/tenants/{id}/config", get(config).put(set_config))
        .route("/v1/tenants/{id}/config/history", get(config_history))
        .route("/v1/tenants/{id}/config/restore", post(restore_config))
        .route("/v1/tenant-config.schema.json", get(config_schema))
        .route("/v1/provisioning/jobs", get(jobs))
        .route("/v1/provisioning/jobs/{event}", get(job))
        .route("/v1/provisioning/jobs/{event}/retry", post(retry_job))
        .route("/v1/routes", get(routes))
        .route("/v1/routes/stage", put(route_stage))
        .route("/v1/routes/release", post(release_route))
        .route("/v1/routes/hold", post(hold_route))
        .route("/v1/routes/mark", post(mark_route))
        .route("/v1/routes/default", put(write_default))
        .route("/v1/mismatch-classes", get(mismatch_classes))
        .route("/v1/mismatch-classes/{class}", get(mismatch_class))
        .route("/v1/mismatch-classes/{class}/{action}", post(change_class))
        .fallback(|| async {
            ApiError::Status(StatusCode::NOT_FOUND, "no such API route".to_string())
        });
    hook.merge(
        api.route_layer(middleware::from_fn_with_state(store.clone(), authorize))
            .with_state(store.clone()),
    )
    .merge(crate::ui::router(store, closing))
}

/// An error on its way to becoming a response: the one place that decides status
/// codes.
pub enum ApiError {
    Op(Error),
    Status(StatusCode, String),
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        ApiError::Op(e)
    }
}

fn store_status(e: &StoreError) -> StatusCode {
    match e {
        StoreError::UnknownTenant(_) | StoreError::UnknownClass(_) => StatusCode::NOT_FOUND,
        StoreError::Class(_) | StoreError::RouteAlready { .. } => StatusCode::CONFLICT,
        StoreError::RouteStale { .. } => StatusCode::PRECONDITION_FAILED,
        StoreError::Route(_) => StatusCode::BAD_REQUEST,
        StoreError::TenantExists(_)
        | StoreError::DomainTaken { .. }
        | StoreError::Transition { .. }
        | StoreError::ImportConflicts(_) => StatusCode::CONFLICT,
        StoreError::Stale { .. } | StoreError::ConfigStale { .. } => {
            StatusCode::PRECONDITION_FAILED
        }
        StoreError::MissingReason | StoreError::DuplicateDomain(_) | StoreError::BadSetting(_) => {
            StatusCode::BAD_REQUEST
        }
        StoreError::Unreachable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The status an operation's error answers with, in the API and the dashboard
/// alike.
pub(crate) fn status_of(e: &Error) -> StatusCode {
    match e {
        Error::Invalid(_) => StatusCode::BAD_REQUEST,
        Error::Refused(_) => StatusCode::CONFLICT,
        Error::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
        Error::Store(s) => store_status(s),
        Error::Remote { .. } | Error::Unreachable { .. } => StatusCode::BAD_GATEWAY,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            ApiError::Status(s, m) => (s, m),
            ApiError::Op(e) => {
                let status = status_of(&e);
                if status.is_server_error() {
                    tracing::error!(error = %e, "api: operation failed");
                }
                (status, e.to_string())
            }
        };
        (status, axum::Json(ErrorJson { error: message })).into_response()
    }
}

type ApiResult<T> = Result<axum::Json<T>, ApiError>;

/// Query parameters that would carry a credential. Refused by name, whatever
/// their value, so a token never has a reason to be in a URL.
const CREDENTIAL_PARAMS: &[&str] = &["token", "access_token", "api_key", "apikey", "bearer"];

async fn authorize(State(slot): State<StoreSlot>, request: Request, next: Next) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let refuse = |why: &'static str| {
        tracing::warn!(%method, path, why, "api: request refused");
        let mut response =
            ApiError::Status(StatusCode::UNAUTHORIZED, why.to_string()).into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        response
    };
    if let Some(query) = request.uri().query() {
        let named = query.split('&').any(|pair| {
            let name = pair.split('=').next().unwrap_or("").to_ascii_lowercase();
            CREDENTIAL_PARAMS.contains(&name.as_str())
        });
        if named || query.contains("ficus_") {
            return refuse(
                "a token in a query string is refused; send it as Authorization: Bearer TOKEN",
            );
        }
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(presented) = presented.filter(|t| !t.is_empty()) else {
        return refuse("missing Authorization: Bearer TOKEN");
    };
    let store = match open_store(&slot) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    match token::identify(&*store, presented).await {
        Ok(Some(who)) => {
            let reads = matches!(method, Method::GET | Method::HEAD);
            if who.scope == Scope::Viewer && !reads {
                tracing::warn!(%method, path, token = who.name(), "api: viewer token refused a change");
                return ApiError::Status(
                    StatusCode::FORBIDDEN,
                    format!(
                        "the token {} is a viewer's: it may read, not change; use an operator's token",
                        who.name()
                    ),
                )
                .into_response();
            }
            let mut request = request;
            request.extensions_mut().insert(who);
            next.run(request).await
        }
        Ok(None) => match token::any(&*store).await {
            Ok(true) => refuse("wrong token"),
            Ok(false) => {
                refuse("no API token is set; run `ficus token rotate` on the control store")
            }
            Err(e) => ApiError::Op(e).into_response(),
        },
        Err(e) => ApiError::Op(e).into_response(),
    }
}

/// The identity [`authorize`] found for the request's token.
pub struct Who(pub Identity);

impl<S: Send + Sync> FromRequestParts<S> for Who {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Identity>()
            .copied()
            .map(Who)
            .ok_or_else(|| {
                // Only a route mounted outside `authorize` could get here: a bug, and
                // refused rather than served as nobody.
                ApiError::Status(StatusCode::UNAUTHORIZED, "no token was checked".to_string())
            })
    }
}

/// The store, once the process has opened it (the proxy opens it after its
/// listeners are up).
fn open_store(slot: &StoreSlot) -> Result<Arc<dyn ControlStore>, ApiError> {
    slot.get().cloned().ok_or_else(|| {
        ApiError::Status(
            StatusCode::SERVICE_UNAVAILABLE,
            "the control store is not open yet".to_string(),
        )
    })
}

fn control(slot: &StoreSlot, who: &Who) -> Result<Direct, ApiError> {
    open_store(slot).map(|s| Direct::new(s, who.0.actor))
}

/// A JSON body read with the API's own limit and errors.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !is_json {
            return Err(ApiError::Status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the body must be JSON (Content-Type: application/json)".to_string(),
            ));
        }
        let bytes: Bytes = axum::body::to_bytes(req.into_body(), BODY_LIMIT)
            .await
            .map_err(|_| {
                ApiError::Status(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the body is larger than {BODY_LIMIT} bytes"),
                )
            })?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            ApiError::Status(StatusCode::BAD_REQUEST, format!("malformed JSON body: {e}"))
        })
    }
}

fn query<T: DeserializeOwned>(
    q: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    q.map(|Query(t)| t).map_err(|e| {
        ApiError::Status(
            StatusCode::BAD_REQUEST,
            format!("bad query string: {}", e.body_text()),
        )
    })
}

/// The `If-Match` value, without the quotes of an entity tag.
fn if_match(headers: &HeaderMap) -> Result<String, ApiError> {
    let raw = headers
        .get(header::IF_MATCH)
        .ok_or_else(|| {
            ApiError::Status(
                StatusCode::PRECONDITION_REQUIRED,
                "If-Match with the version this change was decided on is required".to_string(),
            )
        })?
        .to_str()
        .map_err(|_| ApiError::Status(StatusCode::BAD_REQUEST, "If-Match is not text".into()))?;
    Ok(raw
        .trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string())
}

fn if_match_version(headers: &HeaderMap) -> Result<u64, ApiError> {
    let raw = if_match(headers)?;
    raw.parse().map_err(|_| {
        ApiError::Status(
            StatusCode::BAD_REQUEST,
            format!("If-Match {raw:?} is not a tenant version (a whole number)"),
        )
    })
}

fn reason(raw: &str) -> Result<(), ApiError> {
    if raw.trim().is_empty() {
        return Err(ApiError::Status(
            StatusCode::BAD_REQUEST,
            "a reason is required and must not be empty".to_string(),
        ));
    }
    Ok(())
}

fn id(raw: &str) -> Result<ficus_core::TenantId, ApiError> {
    Ok(ops::tenant_id(raw)?)
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    stage: Option<String>,
}

async fn list(
    State(slot): State<StoreSlot>,
    who: Who,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<crate::api::TenantsJson> {
    let q = query(q)?;
    let stage = q.stage.as_deref().map(ops::stage).transpose()?;
    Ok(axum::Json(control(&slot, &who)?.tenants(stage).await?))
}

async fn add(
    State(slot): State<StoreSlot>,
    who: Who,
    JsonBody(body): JsonBody<AddRequest>,
) -> Result<(StatusCode, axum::Json<crate::api::TenantEnvelope>), ApiError> {
    reason(&body.reason)?;
    let created = control(&slot, &who)?.add(body).await?;
    Ok((StatusCode::CREATED, axum::Json(created)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShowQuery {
    events: Option<u64>,
}

async fn show(
    State(slot): State<StoreSlot>,
    who: Who,
    Path(raw): Path<String>,
    q: Result<Query<ShowQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<crate::api::ShowJson> {
    let q = query(q)?;
    let events = q.events.unwrap_or(10).min(1_000);
    Ok(axum::Json(
        control(&slot, &who)?.show(&id(&raw)?, events).await?,
    ))
}

async fn stage(
    State(slot): State<StoreSlot>,
    who: Who,
    Path(raw): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<StageRequest>,
) -> ApiResult<crate::api::TenantEnvelope> {
    let version = if_match_version(&headers)?;
    reason(&body.reason)?;
    let c = control(&slot, &who)?;
    Ok(axum::Json(c.stage(&id(&raw)?, body, Some(version)).await?))
}

async fn promote(
    State(slot): State<StoreSlot>,
    who: Who,
    Path(raw): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<PromoteRequest>,
) -> ApiResult<crate::api::TenantEnvelope> {
    let version = if_match_version(&headers)?;
    reason(&body.reason)?;
    let c = control(&slot, &who)?;
    Ok(axum::Json(
        c.promote(&id(&raw)?, body, Some(version)).await?,
    ))
}

async fn rollback(
    State(slot): State<StoreSlot>,
    who: Who,
    Path(raw): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RollbackRequest>,
) -> ApiResult<crate::api::TenantEnvelope> {
    let version = if_match_version(&headers)?;
    reason(&body.reason)?;
    let c = control(&slot, &who)?;
    Ok(axum::Json(
        c.rollback(&id(&raw)?, body, Some(version)).await?,
    ))
}

async fn readiness(
    State(slot): State<StoreSlot>,
    who: Who,
    Path(raw): Path<String>,
    q: Result<Query<GateOverrides>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<crate::api::ReadinessJson> {
    let overrides = query(q)?;
    let c = control(&slot, &who)?;
    Ok(axum::Json(c.readiness(&id(&raw)?, &overrides).await?))
}

async fn readiness_all(
    State(slot): State<StoreSlot>,
    who: Who,
    q: Result<Query<GateOverrides>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<crate::api::ReadinessAllJson> {
    let overrides = query(q)?;
    Ok(axum::Json(
        control(&slot, &who)?.readiness_all(&overrides).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MismatchQuery {
    endpoint: Option<String>,
    limit: Option<u64>,
}

async fn mismatches(
    State(slot): State<StoreSlot>,
    who: Who,
    Path(raw): Path<String>,
    q: Result<Query<MismatchQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<crate::api::MismatchesJson> {
    let q = query(q)?;
    let limit = q.limit.unwrap_or(10).min(1_000);
    let c = control(&slot, &who)?;
    Ok(axum::Json(
        c.mismatches(&id(&raw)?, q.endpoint.as_deref(), limit)
            .await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQueryParams {
    tenant: Option<String>,
    since: Option<String>,
    until: Option<String>,
    actor: Option<String>,
    to: Option<String>,
    limit: Option<u64>,
}

/// An RFC 3339 time from a query parameter.
fn time_param(name: &str, raw: Option<&str>) -> Result<Option<Timestamp>, ApiError> {
    raw.map(|raw| {
        crate::api::parse_time(raw).ok_or_else(|| {
            ApiError::Status(
                StatusCode::BAD_REQUEST,
                format!("{name} {raw:?} is not an RFC 3339 time (2026-11-21T10:00:00Z)"),
            )
        })
    })
    .transpose()
}

async fn audit(
    State(slot): State<StoreSlot>,
    who: Who,
    q: Result<Query<AuditQueryParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<crate::api::EventsJson> {
    let q = query(q)?;
    let filter = AuditFilter {
        tenant: q.tenant.as_deref().map(id).transpose()?,
        since: time_param("since", q.since.as_deref())?,
        until: time_param("until", q.until.as_deref())?,
        actor: q.actor.filter(|a| !a.is_empty()),
        to: q
            .to
            .as_deref()
            .map(|raw| {
                Stage::parse(raw)
                    .map_err(|e| ApiError::Status(StatusCode::BAD_REQUEST, e.to_string()))
            })
            .transpose()?,
        limit: q.limit,
    };
    Ok(axum::Json(control(&slot, &who)?.audit(filter).await?))
}

async fn status(State(slot): State<StoreSlot>, who: Who) -> ApiResult<crate::api::StatusJson> {
    Ok(axum::Json(control(&slot, &who)?.status().await?))
}

async fn retire(
    State(slot): State<StoreSlot>,
    who: Who,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RetireRequest>,
) -> ApiResult<crate::api::RetireJson> {
    let version = if_match(&headers)?;
    reason(&body.reason)?;
    Ok(axum::Json(
        control(&slot, &who)?.retire(body, Some(&version)).await?,
    ))
}

async fn gate(State(slot): State<StoreSlot>, who: Who) -> Result<Response, ApiError> {
    let g = control(&slot, &who)?.gate().await?;
    let etag = format!("\"{}\"", gate_version(&g));
    Ok(([(header::ETAG, etag)], axum::Json(g)).into_response())
}

async fn set_gate(
    State(slot): State<StoreSlot>,
    who: Who,
    headers: HeaderMap,
    JsonBody(body): JsonBody<GateRequest>,
) -> ApiResult<crate::api::GateJson> {
    // The gate's version is its current content: a change decided on other
    // thresholds than the stored ones is refused.
    let expected = if_match(&headers)?;
    reason(&body.reason)?;
    let c = control(&slot, &who)?;
    let current = gate_version(&c.gate().await?);
    if expected != current {
        return Err(ApiError::Op(Error::PreconditionFailed(format!(
            "the gate changed since version {expected:?}: it is now {current:?}; nothing was changed"
        ))));
    }
    Ok(axum::Json(c.set_gate(body).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigQuery {
    version: Option<u64>,
}

/// The configuration, with its version as the ETag a change must name.
async fn config(
    State(slot): State<StoreSlot>,
    who: Who,
    Path(raw): Path<String>,
    q: Result<Query<ConfigQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let c = control(&slot, &who)?.config(&id(&raw)?, q.version).await?;
    let etag = format!("\"{}\"", c.version);
    Ok(([(header::ETAG, etag)], axum::Json(c)).into_response())
}

async fn set_config(
    State(slot): State<StoreSlot>,
    who: Who,
    Path(raw): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ConfigRequest>,
) -> ApiResult<crate::api::ConfigJson> {
    let version = if_match_version(&headers)?;
    reason(&body.reason)?;
    let c = control(&slot, &who)?;
    Ok(axum::Json(
        c.set_config(&id(&raw)?, body, Some(version)).await?,
    ))
}

async fn config_history(
    State(slot): State<StoreSlot>,
    who: Who,
    Path(raw): Path<String>,
) -> ApiResult<crate::api::ConfigHistoryJson> {
    Ok(axum::Json(
        control(&slot, &who)?.config_history(&id(&raw)?).await?,
    ))
}

async fn restore_config(
    State(slot): State<StoreSlot>,
    who: Who,
    Path(raw): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RestoreRequest>,
) -> ApiResult<crate::api::ConfigJson> {
    let version = if_match_version(&headers)?;
    reason(&body.reason)?;
    let c = control(&slot, &who)?;
    Ok(axum::Json(
        c.restore_config(&id(&raw)?, body, Some(version)).await?,
    ))
}

async fn config_schema() -> Response {
    (
        [(header::CONTENT_TYPE, "application/schema+json")],
        crate::config::SCHEMA,
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobsQuery {
    state: Option<String>,
}

async fn jobs(
    State(slot): State<StoreSlot>,
    who: Who,
    q: Result<Query<JobsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<crate::api::JobsJson> {
    let q = query(q)?;
    Ok(axum::Json(
        control(&slot, &who)?.jobs(q.state.as_deref()).await?,
    ))
}

async fn job(
    State(slot): State<StoreSlot>,
    who: Who,
    Path(event): Path<String>,
) -> ApiResult<crate::api::JobJson> {
    Ok(axum::Json(control(&slot, &who)?.job(&event).await?))
}

/// Runs a pending job now. Not versioned: running a pending job's remaining
/// steps again is what the resumer does anyway, and every step is idempotent.
async fn retry_job(
    State(slot): State<StoreSlot>,
    who: Who,
    Path(event): Path<String>,
) -> ApiResult<crate::api::JobJson> {
    Ok(axum::Json(control(&slot, &who)?.retry_job(&event).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesQuery {
    tenant: Option<String>,
}

async fn routes(
    State(slot): State<StoreSlot>,
    who: Who,
    q: Result<Query<RoutesQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<crate::api::RoutesJson> {
    let q = query(q)?;
    let tenant = q.tenant.as_deref().map(id).transpose()?;
    Ok(axum::Json(
        control(&slot, &who)?.routes(tenant.as_ref()).await?,
    ))
}

/// Sets a route's stage against the version in `If-Match` (0: never set).
async fn route_stage(
    State(slot): State<StoreSlot>,
    who: Who,
    headers: HeaderMap,
    JsonBody(body): JsonBody<crate::api::RouteStageRequest>,
) -> ApiResult<crate::api::RouteStageJson> {
    let version = if_match_version(&headers)?;
    reason(&body.reason)?;
    Ok(axum::Json(
        control(&slot, &who)?
            .route_stage(body, Some(version))
            .await?,
    ))
}

async fn release_route(
    State(slot): State<StoreSlot>,
    who: Who,
    JsonBody(body): JsonBody<crate::api::RouteReleaseRequest>,
) -> ApiResult<crate::api::RouteStageJson> {
    reason(&body.reason)?;
    Ok(axum::Json(control(&slot, &who)?.release_route(body).await?))
}

async fn hold_route(
    State(slot): State<StoreSlot>,
    who: Who,
    JsonBody(body): JsonBody<crate::api::RouteReleaseRequest>,
) -> ApiResult<crate::api::RouteStageJson> {
    reason(&body.reason)?;
    Ok(axum::Json(control(&slot, &who)?.hold_route(body).await?))
}

async fn mark_route(
    State(slot): State<StoreSlot>,
    who: Who,
    JsonBody(body): JsonBody<crate::api::RouteMarkRequest>,
) -> ApiResult<crate::api::RouteJson> {
    reason(&body.reason)?;
    Ok(axum::Json(control(&slot, &who)?.mark_route(body).await?))
}

async fn write_default(
    State(slot): State<StoreSlot>,
    who: Who,
    JsonBody(body): JsonBody<crate::api::WriteDefaultRequest>,
) -> ApiResult<crate::api::RoutesJson> {
    reason(&body.reason)?;
    Ok(axum::Json(control(&slot, &who)?.write_default(body).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassQuery {
    tenant: Option<String>,
    state: Option<String>,
}

async fn mismatch_classes(
    State(slot): State<StoreSlot>,
    who: Who,
    q: Result<Query<ClassQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<crate::api::ClassesJson> {
    let q = query(q)?;
    let tenant = q.tenant.as_deref().map(id).transpose()?;
    Ok(axum::Json(
        control(&slot, &who)?
            .mismatch_classes(tenant.as_ref(), q.state.as_deref())
            .await?,
    ))
}

async fn mismatch_class(
    State(slot): State<StoreSlot>,
    who: Who,
    Path(class): Path<String>,
) -> ApiResult<crate::api::ClassEnvelope> {
    Ok(axum::Json(
        control(&slot, &who)?.mismatch_class(&class).await?,
    ))
}

/// Resolves, accepts or reopens a class. Not versioned: each is refused when
/// the class already stands where it would put it.
async fn change_class(
    State(slot): State<StoreSlot>,
    who: Who,
    Path((class, action)): Path<(String, String)>,
    JsonBody(body): JsonBody<crate::api::ClassChangeRequest>,
) -> ApiResult<crate::api::ClassEnvelope> {
    reason(&body.reason)?;
    Ok(axum::Json(
        control(&slot, &who)?
            .change_class(&class, &action, body)
            .await?,
    ))
}

/// `POST /v1/hooks/billing`: a signed billing event. 401 for a missing, bad or
/// stale signature; 400 for a body that is not an event; 422 for an event type
/// that is neither a creation nor a cancellation; 413 over 64 KiB; nothing is
/// written in any of those cases. 200 with the job when it is done (or was
/// done before: `duplicate`), 202 when a step must be retried.
async fn billing_hook(
    State((slot, hooks)): State<(StoreSlot, Hooks)>,
    request: Request,
) -> Result<Response, ApiError> {
    let refuse = |status: StatusCode, why: String| {
        tracing::warn!(
            status = status.as_u16(),
            why,
            "billing hook: delivery refused"
        );
        ApiError::Status(status, why)
    };
    let Some(secret) = hooks.secret.clone() else {
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the billing webhook is not configured: set FICUS_BILLING_SECRET".into(),
        ));
    };
    let store = open_store(&slot)?;
    let json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().unwrap_or("").trim() == "application/json");
    if !json {
        return Err(refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the event as application/json".into(),
        ));
    }
    let signature = request
        .headers()
        .get(provision::SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = axum::body::to_bytes(request.into_body(), BODY_LIMIT)
        .await
        .map_err(|_| {
            refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("an event is at most {BODY_LIMIT} bytes"),
            )
        })?;
    let now = ops::now().unix_millis() / 1000;
    provision::verify(signature.as_deref(), &body, &secret, now)
        .map_err(|e| refuse(StatusCode::UNAUTHORIZED, e.to_string()))?;
    match provision::receive(&store, &hooks, &body).await? {
        Err(r @ provision::Refusal::UnknownType(_)) => {
            Err(refuse(StatusCode::UNPROCESSABLE_ENTITY, r.to_string()))
        }
        Err(r) => Err(refuse(StatusCode::BAD_REQUEST, r.to_string())),
        Ok(received) => {
            let mut json = crate::api::JobJson::from(&received.job);
            json.duplicate = received.duplicate;
            let status = if received.job.state == ficus_store::JobState::Pending {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            };
            Ok((status, axum::Json(json)).into_response())
        }
    }
}

/// A gate's version: a short hash of its content.
pub fn gate_version(g: &crate::api::GateJson) -> String {
    let text = serde_json::to_string(g).unwrap_or_default();
    token::hash(&text)[..16].to_string()
}

/// Serves the API alone on `listener` until `shutdown` resolves: `ficus serve`,
/// for a control plane without a proxy in front of it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: Arc<dyn ControlStore>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, store, Hooks::from_env(), shutdown).await
}

/// [`serve`] with the webhook's settings given; it also runs the resumer that
/// finishes pending provisioning jobs.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    store: Arc<dyn ControlStore>,
    hooks: Hooks,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let slot: StoreSlot = Arc::default();
    let _ = slot.set(Arc::clone(&store));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let resumer = tokio::spawn(provision::resume(
        store,
        hooks.clone(),
        std::time::Duration::from_secs(5),
        stopped,
    ));
    // The dashboard's event streams end when shutdown begins; the graceful
    // shutdown then waits only for ordinary requests (regression: `ficus serve`
    // never exited on SIGTERM while a dashboard page was open).
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let served = axum::serve(listener, router_with(slot, hooks, closing))
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = closing_tx.send(true);
        })
        .await;
    let _ = stop.send(true);
    let _ = resumer.await;
    served
}
