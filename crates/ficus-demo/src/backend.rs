//! The portal's HTTP API, served by both backends.
//!
//! Every request runs in one transaction. The new backend starts it by naming
//! the tenant (`set_config('ficus.tenant_id', …, true)`, transaction-local, so a
//! pooled connection carries nothing over), looked up by the slug the proxy
//! sends in `X-Ficus-Tenant`; row level security does the rest. A request to the
//! new backend without that header is refused rather than served with no
//! tenant. Errors become `{"error"}` responses in one place, [`ApiError`].

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_postgres::NoTls;

/// The header the proxy names the tenant in.
pub const TENANT_HEADER: &str = "x-ficus-tenant";

/// What can be made to go wrong in the rebuilt backend, for the demo.
#[derive(Debug, Default)]
pub struct Faults {
    /// The deliberate bug: `GET /homes/{id}` divides the price by one bedroom
    /// too many.
    pub bug: AtomicBool,
    /// Answers for this tenant (slug) are held back this many milliseconds.
    pub slow: std::sync::Mutex<Option<(String, u64)>>,
}

/// Which backend this is.
#[derive(Clone)]
pub enum Flavor {
    Legacy,
    /// The rebuilt backend, with the faults the demo switches.
    New {
        faults: Arc<Faults>,
    },
}

#[derive(Clone)]
struct App {
    pool: Pool,
    flavor: Flavor,
}

/// Why a request failed; the one place errors become responses.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("the database is unavailable: {0}")]
    Database(String),
    /// An idempotency key sent again with another request.
    #[error("{0}")]
    KeyReused(String),
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> ApiError {
        ApiError::Database(
            e.as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_string()),
        )
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> ApiError {
        ApiError::Database(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Database(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::KeyReused(_) => StatusCode::UNPROCESSABLE_ENTITY,
        };
        (status, axum::Json(json!({ "error": self.to_string() }))).into_response()
    }
}

type ApiResult = Result<axum::Json<Value>, ApiError>;

/// A connection pool for `url` (the role it names is the role the backend
/// connects as).
pub fn pool(url: &str, size: usize) -> Result<Pool, String> {
    let config = tokio_postgres::Config::from_str(url).map_err(|e| e.to_string())?;
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .build()
        .map_err(|e| e.to_string())
}

/// The request header by which both backends save a home once however often
/// the request is sent (the IETF's `Idempotency-Key`): a retried save answers
/// with the home the first one saved.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// The header in which the rebuilt backend states its version.
pub const VERSION_HEADER: &str = "x-app-version";

/// The rebuilt backend's version: the release with the bug, or the one that
/// fixed it.
pub fn new_version(faults: &Faults) -> &'static str {
    if faults.bug.load(Ordering::Relaxed) {
        "2.0.0"
    } else {
        "2.0.1"
    }
}

/// The API's routes.
pub fn router(pool: Pool, flavor: Flavor) -> Router {
    let stamped = flavor.clone();
    Router::new()
        .route("/homes", get(homes).post(add_home))
        .route("/homes/{id}", get(home))
        .route(
            "/homes/{id}/valuations",
            get(valuations).post(add_valuation),
        )
        .route("/searches", get(searches).post(add_search))
        .route("/searches/{id}", axum::routing::delete(delete_search))
        .route("/notifications", get(notifications))
        .route("/notifications/{id}/read", post(read_notification))
        .route(
            "/healthz",
            get(|| async { axum::Json(json!({ "ok": true })) }),
        )
        .with_state(App { pool, flavor })
        .layer(axum::middleware::map_response(
            move |mut response: axum::response::Response| {
                let flavor = stamped.clone();
                async move {
                    if let Flavor::New { faults } = &flavor {
                        response.headers_mut().insert(
                            VERSION_HEADER,
                            axum::http::HeaderValue::from_static(new_version(faults)),
                        );
                    }
                    response
                }
            },
        ))
}

/// Runs `work` in one transaction, as the request's tenant on the new backend.
async fn in_tx<F>(app: &App, headers: &HeaderMap, work: F) -> ApiResult
where
    F: for<'t> FnOnce(
        &'t tokio_postgres::Transaction<'t>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Value, ApiError>> + Send + 't>,
    >,
{
    let mut client = app.pool.get().await?;
    let tx = client.transaction().await?;
    if let Flavor::New { faults } = &app.flavor {
        let slug = headers
            .get(TENANT_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                ApiError::BadRequest(format!("the new backend needs the {TENANT_HEADER} header"))
            })?;
        let known = tx
            .query_opt(
                "SELECT set_config('ficus.tenant_id', o.id::text, true)
                 FROM tenancy.organizations o WHERE o.slug = $1",
                &[&slug],
            )
            .await?;
        if known.is_none() {
            return Err(ApiError::NotFound(format!("no tenant {slug}")));
        }
        let delay = faults
            .slow
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|(tenant, _)| tenant == slug)
            .map(|(_, ms)| *ms);
        if let Some(ms) = delay {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
    }
    let value = work(&tx).await?;
    tx.commit().await?;
    Ok(axum::Json(value))
}

/// A home as the API shows it. `detail` marks the one endpoint where the
/// deliberate bug lives.
fn home_json(app: &App, r: &tokio_postgres::Row, detail: bool) -> Value {
    let (price, bedrooms): (i64, i32) = (r.get("price"), r.get("bedrooms"));
    // The deliberate bug: the rebuilt backend divides by one bedroom too many.
    let divisor = match &app.flavor {
        Flavor::New { faults } if detail && faults.bug.load(Ordering::Relaxed) => bedrooms + 1,
        _ => bedrooms,
    };
    let per_bedroom = (price as f64 / f64::from(divisor) * 100.0).round() / 100.0;
    let mut home = json!({
        "id": r.get::<_, i64>("id"),
        "address": r.get::<_, String>("address"),
        "city": r.get::<_, String>("city"),
        "price": price,
        "bedrooms": bedrooms,
        "price_per_bedroom": per_bedroom,
    });
    // The rebuilt backend grows: a member legacy never had, which no client of
    // the legacy contract reads. The parallel run shows it and never counts it.
    if let (Flavor::New { .. }, Some(map)) = (&app.flavor, home.as_object_mut()) {
        map.insert(
            "energy_rating".into(),
            json!(["A", "B", "C", "D"][(bedrooms.unsigned_abs() % 4) as usize]),
        );
    }
    home
}

#[derive(Deserialize)]
struct HomesQuery {
    city: Option<String>,
}

async fn homes(
    State(app): State<App>,
    headers: HeaderMap,
    Query(q): Query<HomesQuery>,
) -> ApiResult {
    let a = app.clone();
    in_tx(&app, &headers, move |tx| {
        Box::pin(async move {
            let rows = tx
                .query(
                    "SELECT id, address, city, price, bedrooms FROM homes
                     WHERE $1::text IS NULL OR city = $1 ORDER BY id LIMIT 50",
                    &[&q.city],
                )
                .await?;
            Ok(json!({ "homes": rows.iter().map(|r| home_json(&a, r, false)).collect::<Vec<_>>() }))
        })
    })
    .await
}

async fn home(State(app): State<App>, headers: HeaderMap, Path(id): Path<i64>) -> ApiResult {
    let a = app.clone();
    in_tx(&app, &headers, move |tx| {
        Box::pin(async move {
            let r = tx
                .query_opt(
                    "SELECT id, address, city, price, bedrooms FROM homes WHERE id = $1",
                    &[&id],
                )
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("no home {id}")))?;
            let latest: Option<i64> = tx
                .query_opt(
                    "SELECT value FROM valuations WHERE home_id = $1 ORDER BY valued_at DESC, id DESC LIMIT 1",
                    &[&id],
                )
                .await?
                .map(|v| v.get(0));
            let mut home = home_json(&a, &r, true);
            home["latest_valuation"] = json!(latest);
            Ok(home)
        })
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewHome {
    address: String,
    city: String,
    price: i64,
    bedrooms: i32,
}

async fn add_home(
    State(app): State<App>,
    headers: HeaderMap,
    body: Result<axum::Json<NewHome>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let axum::Json(h) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if h.price <= 0 || h.bedrooms <= 0 || h.address.trim().is_empty() {
        return Err(ApiError::BadRequest(
            "a home needs an address, a positive price and at least one bedroom".into(),
        ));
    }
    let key = match headers.get(IDEMPOTENCY_HEADER) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .filter(|k| (1..=255).contains(&k.len()))
                .map(str::to_string)
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "the {IDEMPOTENCY_HEADER} header must be 1 to 255 visible ASCII characters"
                    ))
                })?,
        ),
    };
    let a = app.clone();
    in_tx(&app, &headers, move |tx| {
        Box::pin(async move {
            // A key seen before answers with the home it saved; two saves with
            // the same key at once wait on the unique index, and the second
            // finds the first's row.
            let saved = tx
                .query_opt(
                    "INSERT INTO homes (address, city, price, bedrooms, request_key) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (request_key) DO NOTHING
                     RETURNING id, address, city, price, bedrooms",
                    &[&h.address, &h.city, &h.price, &h.bedrooms, &key],
                )
                .await?;
            let r = match saved {
                Some(r) => r,
                None => {
                    let r = tx
                        .query_opt(
                            "SELECT id, address, city, price, bedrooms FROM homes WHERE request_key = $1",
                            &[&key],
                        )
                        .await?
                        .ok_or_else(|| {
                            ApiError::KeyReused(format!(
                                "the {IDEMPOTENCY_HEADER} was used before, by another tenant"
                            ))
                        })?;
                    let same = r.get::<_, String>("address") == h.address
                        && r.get::<_, String>("city") == h.city
                        && r.get::<_, i64>("price") == h.price
                        && r.get::<_, i32>("bedrooms") == h.bedrooms;
                    if !same {
                        return Err(ApiError::KeyReused(format!(
                            "the {IDEMPOTENCY_HEADER} was used before with another home"
                        )));
                    }
                    r
                }
            };
            Ok(home_json(&a, &r, false))
        })
    })
    .await
}

async fn valuations(State(app): State<App>, headers: HeaderMap, Path(id): Path<i64>) -> ApiResult {
    in_tx(&app, &headers, move |tx| {
        Box::pin(async move {
            let rows = tx
                .query(
                    "SELECT v.value, v.valued_at::text FROM valuations v JOIN homes h ON h.id = v.home_id
                     WHERE v.home_id = $1 ORDER BY v.valued_at, v.id",
                    &[&id],
                )
                .await?;
            Ok(json!({
                "home": id,
                "valuations": rows.iter().map(|r| json!({"value": r.get::<_, i64>(0), "at": r.get::<_, String>(1)})).collect::<Vec<_>>()
            }))
        })
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewValuation {
    value: i64,
}

async fn add_valuation(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    body: Result<axum::Json<NewValuation>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let axum::Json(v) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    in_tx(&app, &headers, move |tx| {
        Box::pin(async move {
            // The home must be visible (to this tenant) before it gets a value.
            tx.query_opt("SELECT 1 FROM homes WHERE id = $1", &[&id])
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("no home {id}")))?;
            let r = tx
                .query_one(
                    "INSERT INTO valuations (home_id, value) VALUES ($1, $2) RETURNING id",
                    &[&id, &v.value],
                )
                .await?;
            Ok(json!({ "id": r.get::<_, i64>(0), "home": id, "value": v.value }))
        })
    })
    .await
}

async fn searches(State(app): State<App>, headers: HeaderMap) -> ApiResult {
    in_tx(&app, &headers, move |tx| {
        Box::pin(async move {
            let rows = tx
                .query(
                    // The oldest first, at most 50: a page that a client's
                    // new search does not shift once it is full.
                    "SELECT id, owner, city, max_price FROM saved_searches ORDER BY id LIMIT 50",
                    &[],
                )
                .await?;
            Ok(json!({ "searches": rows.iter().map(|r| json!({
                "id": r.get::<_, i64>(0), "owner": r.get::<_, String>(1),
                "city": r.get::<_, String>(2), "max_price": r.get::<_, i64>(3),
            })).collect::<Vec<_>>() }))
        })
    })
    .await
}

/// Deletes a saved search and its notifications: the demo's destructive route.
async fn delete_search(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> ApiResult {
    in_tx(&app, &headers, move |tx| {
        Box::pin(async move {
            tx.execute("DELETE FROM notifications WHERE search_id = $1", &[&id])
                .await?;
            let n = tx
                .execute("DELETE FROM saved_searches WHERE id = $1", &[&id])
                .await?;
            Ok(json!({ "id": id, "deleted": n }))
        })
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSearch {
    owner: String,
    city: String,
    max_price: i64,
}

async fn add_search(
    State(app): State<App>,
    headers: HeaderMap,
    body: Result<axum::Json<NewSearch>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let axum::Json(s) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    in_tx(&app, &headers, move |tx| {
        Box::pin(async move {
            let r = tx
                .query_one(
                    "INSERT INTO saved_searches (owner, city, max_price) VALUES ($1, $2, $3) RETURNING id",
                    &[&s.owner, &s.city, &s.max_price],
                )
                .await?;
            let id: i64 = r.get(0);
            tx.execute(
                "INSERT INTO notifications (search_id, message) VALUES ($1, $2)",
                &[&id, &format!("saved a search for {}", s.city)],
            )
            .await?;
            Ok(json!({ "id": id, "owner": s.owner, "city": s.city, "max_price": s.max_price }))
        })
    })
    .await
}

async fn notifications(State(app): State<App>, headers: HeaderMap) -> ApiResult {
    in_tx(&app, &headers, move |tx| {
        Box::pin(async move {
            let rows = tx
                .query(
                    "SELECT id, search_id, message, read FROM notifications ORDER BY id LIMIT 20",
                    &[],
                )
                .await?;
            Ok(json!({ "notifications": rows.iter().map(|r| json!({
                "id": r.get::<_, i64>(0), "search": r.get::<_, i64>(1),
                "message": r.get::<_, String>(2), "read": r.get::<_, bool>(3),
            })).collect::<Vec<_>>() }))
        })
    })
    .await
}

async fn read_notification(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> ApiResult {
    in_tx(&app, &headers, move |tx| {
        Box::pin(async move {
            let n = tx
                .execute("UPDATE notifications SET read = true WHERE id = $1", &[&id])
                .await?;
            if n == 0 {
                return Err(ApiError::NotFound(format!("no notification {id}")));
            }
            Ok(json!({ "id": id, "read": true }))
        })
    })
    .await
}
