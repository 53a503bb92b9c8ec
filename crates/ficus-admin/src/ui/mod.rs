//! The operator dashboard under `/ui/`: server-rendered pages over the same
//! [`crate::ops::Control`] operations as the API, live over server-sent events.
//!
//! Access is the API's: a bearer token in `Authorization`, or the signed session
//! cookie the login page sets after a person enters a token (see [`session`]).
//! A viewer's token reads; an operator's also acts. Every form that changes
//! something carries the session's CSRF token and the version of what the page
//! showed, so a stale page gets a conflict rather than overwriting a newer
//! change. Every response carries a Content-Security-Policy that allows no
//! inline script or style and no other origin, and `X-Frame-Options: DENY`;
//! the page's only script is [`APP_JS`], vendored into the binary. Templates
//! (askama, checked at compile time) escape every value they print.

mod live;
mod pages;

pub use live::{MAX_STREAMS, MAX_STREAMS_PER_TOKEN};
pub use pages::encode;
pub mod session;
mod svg;
mod verdicts;

use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::server::{StoreSlot, status_of};
use crate::token::{self, Identity, Scope};
use crate::{Error, Result};

/// The dashboard's stylesheet.
pub const APP_CSS: &str = include_str!("../../assets/app.css");
/// The dashboard's one script: live rows over SSE, with a polling fallback.
pub const APP_JS: &str = include_str!("../../assets/app.js");

/// The policy every dashboard response carries: nothing inline, no script,
/// style or connection to another host, never framed. Images alone may come
/// over https from elsewhere: a tenant's logo in its branding preview.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: https:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The dashboard's routes, to be merged into the admin router.
pub fn router(store: StoreSlot, closing: crate::server::Closing) -> Router {
    let open = Router::new()
        .route("/ui/login", get(pages::login_form).post(pages::login))
        .route("/ui/static/app.css", get(css))
        .route("/ui/static/app.js", get(js));
    let guarded = Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(pages::overview))
        .route("/ui/tenants", get(pages::board))
        .route("/ui/tenants/{id}", get(pages::tenant))
        .route("/ui/tenants/{id}/promote", post(pages::promote))
        .route("/ui/tenants/{id}/rollback", post(pages::rollback))
        .route("/ui/promote-next", post(pages::promote_next))
        .route("/ui/retire", post(pages::retire))
        .route("/ui/classes/{class}", get(pages::class))
        .route("/ui/classes/{class}/{action}", post(pages::change_class))
        .route("/ui/endpoints", get(pages::endpoints))
        .route("/ui/routes", get(pages::routes))
        .route("/ui/routes/release", post(pages::release_route))
        .route("/ui/routes/hold", post(pages::hold_route))
        .route("/ui/audit", get(pages::audit))
        .route("/ui/logout", post(pages::logout))
        .route("/ui/events", get(live::events))
        .route_layer(middleware::from_fn_with_state(store.clone(), authenticate));
    let state = UiState {
        store,
        verdicts: Arc::new(verdicts::Verdicts::default()),
        hub: Arc::new(live::Hub::new(closing)),
    };
    open.merge(guarded)
        .layer(middleware::map_response(harden))
        .with_state(state)
}

/// What the dashboard's handlers share: the store, and the board's verdicts.
#[derive(Clone)]
pub struct UiState {
    store: StoreSlot,
    verdicts: Arc<verdicts::Verdicts>,
    hub: Arc<live::Hub>,
}

impl FromRef<UiState> for Arc<live::Hub> {
    fn from_ref(s: &UiState) -> Arc<live::Hub> {
        s.hub.clone()
    }
}

impl FromRef<UiState> for StoreSlot {
    fn from_ref(s: &UiState) -> StoreSlot {
        s.store.clone()
    }
}

impl FromRef<UiState> for Arc<verdicts::Verdicts> {
    fn from_ref(s: &UiState) -> Arc<verdicts::Verdicts> {
        s.verdicts.clone()
    }
}

async fn css() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], APP_CSS).into_response()
}

async fn js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP_JS,
    )
        .into_response()
}

/// Adds the security headers to every dashboard response.
async fn harden(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// Who is asking, and how: through a session (whose CSRF token forms must
/// carry) or a bearer token (which a browser never sends by itself, so no CSRF
/// token is needed).
#[derive(Debug, Clone)]
pub struct Viewer {
    pub who: Identity,
    /// What the request presented, checked again by a long-lived event stream.
    pub credential: Credential,
    /// The CSRF token forms on the page carry; empty for a bearer token.
    pub csrf: String,
    /// The change-log position before the page read anything: its live
    /// updates start here, so no change between render and stream is missed.
    pub seq: u64,
}

impl Viewer {
    pub fn can_act(&self) -> bool {
        self.who.scope == Scope::Operator
    }

    /// Whether the request came with a session (and so forms need the CSRF
    /// token).
    pub fn is_session(&self) -> bool {
        matches!(self.credential, Credential::Session(_))
    }

    /// Whether what the request presented still grants the same access: a
    /// session not expired and its token not revoked or rotated, or a bearer
    /// token still live.
    pub async fn still_valid(&self, store: &dyn ficus_store::ControlStore) -> bool {
        let now = match &self.credential {
            Credential::Session(c) => session::check(store, c).await.map(|s| s.map(|s| s.who)),
            Credential::Bearer(t) => token::identify(store, t).await,
        };
        matches!(now, Ok(Some(who)) if who == self.who)
    }
}

/// A session cookie or a bearer token. Never printed: `Debug` shows only which.
#[derive(Clone)]
pub enum Credential {
    Session(String),
    Bearer(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credential::Session(_) => "Session(…)",
            Credential::Bearer(_) => "Bearer(…)",
        })
    }
}

/// A cookie's value from the request's `Cookie` headers.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

async fn authenticate(State(slot): State<StoreSlot>, mut request: Request, next: Next) -> Response {
    let Some(store) = slot.get().cloned() else {
        return UiError::from(Error::Store(ficus_store::StoreError::Unreachable {
            location: "the control store".to_string(),
            detail: "not open yet".to_string(),
        }))
        .into_response();
    };
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string);
    let found = match bearer {
        Some(t) => token::identify(&*store, &t).await.map(|w| {
            w.map(|who| Viewer {
                who,
                credential: Credential::Bearer(t.clone()),
                csrf: String::new(),
                seq: 0,
            })
        }),
        None => match cookie(request.headers(), session::COOKIE).map(str::to_string) {
            Some(c) => session::check(&*store, &c).await.map(|checked| {
                checked.map(|s| Viewer {
                    who: s.who,
                    credential: Credential::Session(c),
                    csrf: s.csrf,
                    seq: 0,
                })
            }),
            None => Ok(None),
        },
    };
    let found = match found {
        Ok(Some(mut viewer)) => match store.position().await {
            Ok(seq) => {
                viewer.seq = seq;
                Ok(Some(viewer))
            }
            Err(e) => Err(Error::Store(e)),
        },
        other => other,
    };
    match found {
        Ok(Some(viewer)) => {
            request.extensions_mut().insert(viewer);
            next.run(request).await
        }
        Ok(None) if request.method() == Method::GET => {
            // A page asked for without a session goes to the login page, which
            // brings the person back here afterwards.
            let back = request
                .uri()
                .path_and_query()
                .map_or("/ui/", |p| p.as_str())
                .to_string();
            Redirect::to(&format!("/ui/login?next={}", pages::encode(&back))).into_response()
        }
        Ok(None) => UiError(
            StatusCode::UNAUTHORIZED,
            "log in first: no session or token".to_string(),
        )
        .into_response(),
        Err(e) => UiError::from(e).into_response(),
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Viewer {
    type Rejection = UiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Viewer>().cloned().ok_or_else(|| {
            UiError(
                StatusCode::UNAUTHORIZED,
                "no session was checked".to_string(),
            )
        })
    }
}

/// A state-changing form: read only from an operator, and from a session only
/// with the session's CSRF token. Every action handler takes its form through
/// this, so none can forget either check.
pub struct Act<T> {
    pub viewer: Viewer,
    pub form: T,
}

#[derive(Deserialize)]
struct CsrfField {
    #[serde(default)]
    csrf: String,
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Act<T> {
    type Rejection = UiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let viewer = Viewer::from_request_parts(&mut parts, state).await?;
        if !viewer.can_act() {
            return Err(UiError(
                StatusCode::FORBIDDEN,
                format!(
                    "the token {} is a viewer's: it may look, not act",
                    viewer.who.name()
                ),
            ));
        }
        let bytes = axum::body::to_bytes(body, crate::server::BODY_LIMIT)
            .await
            .map_err(|_| {
                UiError(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "the form is too large".into(),
                )
            })?;
        if viewer.is_session() {
            let field: CsrfField = serde_urlencoded_form(&bytes)?;
            // The expected token is the session's; compare in constant time.
            if !session_csrf_matches(&viewer.csrf, &field.csrf) {
                return Err(UiError(
                    StatusCode::FORBIDDEN,
                    "the form's CSRF token is missing or wrong: reload the page and try again"
                        .to_string(),
                ));
            }
        }
        let form = serde_urlencoded_form(&bytes)?;
        Ok(Act { viewer, form })
    }
}

fn session_csrf_matches(expected: &str, presented: &str) -> bool {
    !expected.is_empty() && token::same(expected, presented)
}

fn serde_urlencoded_form<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, UiError> {
    serde_urlencoded::from_bytes(bytes)
        .map_err(|e| UiError(StatusCode::BAD_REQUEST, format!("bad form: {e}")))
}

/// An error on its way to becoming an HTML page, with the status the API would
/// give the same error.
#[derive(Debug)]
pub struct UiError(pub StatusCode, pub String);

impl From<Error> for UiError {
    fn from(e: Error) -> UiError {
        let status = status_of(&e);
        if status.is_server_error() {
            tracing::error!(error = %e, "dashboard: operation failed");
        }
        UiError(status, e.to_string())
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    status: u16,
    reason: &'a str,
    message: &'a str,
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let page = ErrorPage {
            status: self.0.as_u16(),
            reason: self.0.canonical_reason().unwrap_or("error"),
            message: &self.1,
        };
        match page.render() {
            Ok(html) => (self.0, html_headers(), html).into_response(),
            Err(_) => (self.0, self.1).into_response(),
        }
    }
}

fn html_headers() -> [(header::HeaderName, &'static str); 1] {
    [(header::CONTENT_TYPE, "text/html; charset=utf-8")]
}

/// A rendered page, or the error that stopped it.
pub fn html(page: &impl Template) -> Result<Response, UiError> {
    page.render()
        .map(|body| (html_headers(), body).into_response())
        .map_err(|e| {
            UiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("rendering failed: {e}"),
            )
        })
}
