//! [`Remote`]: the control plane reached through its HTTP API, for `ficus --api
//! URL`. It speaks the same [`Control`] operations as a store opened directly, so
//! every command prints the same whichever way it went. The token travels only in
//! the `Authorization` header and never appears in an error.

use std::time::Duration;

use async_trait::async_trait;
use ficus_core::{Stage, TenantId};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{
    AddRequest, ConfigHistoryJson, ConfigJson, ConfigRequest, ErrorJson, EventsJson, GateJson,
    GateRequest, JobJson, JobsJson, MismatchesJson, PromoteRequest, ReadinessAllJson,
    ReadinessJson, RestoreRequest, RetireJson, RetireRequest, RollbackRequest, ShowJson,
    StageRequest, StatusJson, TenantEnvelope, TenantsJson,
};
use crate::ops::{AuditFilter, Control, GateOverrides};
use crate::server::gate_version;
use crate::{Error, Result};

/// The control plane behind `base` (such as `http://127.0.0.1:9090`).
pub struct Remote {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Remote {
    pub fn new(base: &str, token: &str) -> Result<Remote> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::Invalid(format!(
                "--api {base:?} must be an http:// or https:// URL"
            )));
        }
        if token.trim().is_empty() {
            return Err(Error::Invalid(
                "--api needs the API token in FICUS_TOKEN".to_string(),
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .no_proxy()
            .build()
            .map_err(|e| Error::Invalid(format!("cannot build an HTTP client: {e}")))?;
        Ok(Remote {
            base,
            token: token.trim().to_string(),
            http,
        })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    async fn send<T: DeserializeOwned>(&self, request: RequestBuilder) -> Result<T> {
        let response = request.send().await.map_err(|e| Error::Unreachable {
            url: self.base.clone(),
            detail: e.without_url().to_string(),
        })?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| Error::Unreachable {
            url: self.base.clone(),
            detail: e.without_url().to_string(),
        })?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| Error::Remote {
                status: status.as_u16(),
                message: format!("the control plane answered something unreadable: {e}"),
            });
        }
        let message = serde_json::from_slice::<ErrorJson>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| format!("the control plane answered {status}"));
        let message = if status == StatusCode::UNAUTHORIZED {
            format!("the control plane refused the token: {message}")
        } else {
            message
        };
        Err(Error::Remote {
            status: status.as_u16(),
            message,
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(self.request(Method::GET, path)).await
    }

    async fn write<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        if_match: &str,
        body: &impl Serialize,
    ) -> Result<T> {
        self.send(
            self.request(method, path)
                .header("If-Match", format!("\"{if_match}\""))
                .json(body),
        )
        .await
    }

    /// The tenant's version: the one given, or else the current one.
    async fn version(&self, id: &TenantId, given: Option<u64>) -> Result<u64> {
        match given {
            Some(v) => Ok(v),
            None => Ok(self.show(id, 0).await?.tenant.version),
        }
    }

    /// The configuration version a change is decided on: the one given, or
    /// the current one.
    async fn config_version(&self, id: &TenantId, given: Option<u64>) -> Result<u64> {
        match given {
            Some(v) => Ok(v),
            None => Ok(self.config(id, None).await?.version),
        }
    }
}

fn path_id(id: &TenantId) -> String {
    // Tenant ids are lowercase letters, digits and '-': nothing to escape.
    id.to_string()
}

/// Refuses a class id or action that is not plain letters and digits, so that
/// no caller's text becomes part of a path.
fn plain_segments(id: &str, action: &str) -> Result<()> {
    let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
    if !plain(id) || !plain(action) {
        return Err(Error::Invalid(format!(
            "{id:?} is not a class id: give its 16 hex digits, or at least the first 4"
        )));
    }
    Ok(())
}

/// Appends a query string built from `params`.
fn with_query(path: &str, params: &impl Serialize) -> String {
    let encoded = serde_json::to_value(params)
        .ok()
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            format!("{}={}", encode(&k), encode(&v))
        })
        .collect::<Vec<_>>()
        .join("&");
    if encoded.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{encoded}")
    }
}

/// Percent-encodes everything but unreserved characters.
fn encode(raw: &str) -> String {
    raw.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[async_trait]
impl Control for Remote {
    fn location(&self) -> String {
        self.base.clone()
    }

    async fn tenants(&self, stage: Option<Stage>) -> Result<TenantsJson> {
        let params = serde_json::json!({ "stage": stage.map(Stage::as_str) });
        self.get(&with_query("/v1/tenants", &params)).await
    }

    async fn show(&self, id: &TenantId, events: u64) -> Result<ShowJson> {
        self.get(&format!("/v1/tenants/{}?events={events}", path_id(id)))
            .await
    }

    async fn add(&self, request: AddRequest) -> Result<TenantEnvelope> {
        self.send(self.request(Method::POST, "/v1/tenants").json(&request))
            .await
    }

    async fn stage(
        &self,
        id: &TenantId,
        request: StageRequest,
        if_version: Option<u64>,
    ) -> Result<TenantEnvelope> {
        let v = self.version(id, if_version).await?;
        let path = format!("/v1/tenants/{}/stage", path_id(id));
        self.write(Method::PUT, &path, &v.to_string(), &request)
            .await
    }

    async fn promote(
        &self,
        id: &TenantId,
        request: PromoteRequest,
        if_version: Option<u64>,
    ) -> Result<TenantEnvelope> {
        let v = self.version(id, if_version).await?;
        let path = format!("/v1/tenants/{}/promote", path_id(id));
        self.write(Method::POST, &path, &v.to_string(), &request)
            .await
    }

    async fn rollback(
        &self,
        id: &TenantId,
        request: RollbackRequest,
        if_version: Option<u64>,
    ) -> Result<TenantEnvelope> {
        let v = self.version(id, if_version).await?;
        let path = format!("/v1/tenants/{}/rollback", path_id(id));
        self.write(Method::POST, &path, &v.to_string(), &request)
            .await
    }

    async fn readiness(&self, id: &TenantId, overrides: &GateOverrides) -> Result<ReadinessJson> {
        let path = format!("/v1/tenants/{}/readiness", path_id(id));
        self.get(&with_query(&path, overrides)).await
    }

    async fn readiness_all(&self, overrides: &GateOverrides) -> Result<ReadinessAllJson> {
        self.get(&with_query("/v1/readiness", overrides)).await
    }

    async fn mismatches(
        &self,
        id: &TenantId,
        endpoint: Option<&str>,
        limit: u64,
    ) -> Result<MismatchesJson> {
        let path = format!("/v1/tenants/{}/mismatches", path_id(id));
        let params = serde_json::json!({ "endpoint": endpoint, "limit": limit });
        self.get(&with_query(&path, &params)).await
    }

    async fn mismatch_classes(
        &self,
        tenant: Option<&TenantId>,
        state: Option<&str>,
    ) -> Result<crate::api::ClassesJson> {
        let params = serde_json::json!({
            "tenant": tenant.map(TenantId::as_str),
            "state": state,
        });
        self.get(&with_query("/v1/mismatch-classes", &params)).await
    }

    async fn routes(&self, tenant: Option<&TenantId>) -> Result<crate::api::RoutesJson> {
        let params = serde_json::json!({ "tenant": tenant.map(TenantId::as_str) });
        self.get(&with_query("/v1/routes", &params)).await
    }

    async fn route_stage(
        &self,
        request: crate::api::RouteStageRequest,
        if_version: Option<u64>,
    ) -> Result<crate::api::RouteStageJson> {
        // The API changes a stage only against the version it was decided on:
        // without one given, the current one is read first, under the route's
        // canonical name (`post /x` is `POST /x`).
        let mut request = request;
        if let Ok(route) = ficus_core::Route::parse(&request.route) {
            request.route = route.to_string();
        }
        let version = match if_version {
            Some(v) => v,
            None => {
                let tenant = request
                    .tenant
                    .as_deref()
                    .map(crate::ops::tenant_id)
                    .transpose()?;
                let routes = self.routes(None).await?;
                let found = routes.routes.iter().find(|r| r.route == request.route);
                match (&tenant, found) {
                    (None, Some(r)) => r.version,
                    (Some(t), Some(r)) => r
                        .overrides
                        .iter()
                        .find(|o| o.tenant == t.as_str())
                        .map_or(0, |o| o.version),
                    (_, None) => 0,
                }
            }
        };
        self.write(
            Method::PUT,
            "/v1/routes/stage",
            &version.to_string(),
            &request,
        )
        .await
    }

    async fn release_route(
        &self,
        request: crate::api::RouteReleaseRequest,
    ) -> Result<crate::api::RouteStageJson> {
        self.send(
            self.request(Method::POST, "/v1/routes/release")
                .json(&request),
        )
        .await
    }

    async fn hold_route(
        &self,
        request: crate::api::RouteReleaseRequest,
    ) -> Result<crate::api::RouteStageJson> {
        self.send(self.request(Method::POST, "/v1/routes/hold").json(&request))
            .await
    }

    async fn write_default(
        &self,
        request: crate::api::WriteDefaultRequest,
    ) -> Result<crate::api::RoutesJson> {
        self.send(
            self.request(Method::PUT, "/v1/routes/default")
                .json(&request),
        )
        .await
    }

    async fn mark_route(
        &self,
        request: crate::api::RouteMarkRequest,
    ) -> Result<crate::api::RouteJson> {
        self.send(self.request(Method::POST, "/v1/routes/mark").json(&request))
            .await
    }

    async fn mismatch_class(&self, id: &str) -> Result<crate::api::ClassEnvelope> {
        plain_segments(id, "get")?;
        self.get(&format!("/v1/mismatch-classes/{id}")).await
    }

    async fn change_class(
        &self,
        id: &str,
        action: &str,
        request: crate::api::ClassChangeRequest,
    ) -> Result<crate::api::ClassEnvelope> {
        plain_segments(id, action)?;
        let path = format!("/v1/mismatch-classes/{id}/{action}");
        self.send(self.request(Method::POST, &path).json(&request))
            .await
    }

    async fn audit(&self, filter: AuditFilter) -> Result<EventsJson> {
        let params = serde_json::json!({
            "tenant": filter.tenant.as_ref().map(TenantId::as_str),
            "since": filter.since.map(ficus_store::format_time),
            "until": filter.until.map(ficus_store::format_time),
            "actor": filter.actor,
            "to": filter.to.map(Stage::as_str),
            "limit": filter.limit,
        });
        self.get(&with_query("/v1/audit", &params)).await
    }

    async fn status(&self) -> Result<StatusJson> {
        self.get("/v1/status").await
    }

    async fn retire(&self, request: RetireRequest, if_version: Option<&str>) -> Result<RetireJson> {
        let version = match if_version {
            Some(v) => v.to_string(),
            None => self.status().await?.version,
        };
        self.write(Method::POST, "/v1/retire", &version, &request)
            .await
    }

    async fn gate(&self) -> Result<GateJson> {
        self.get("/v1/gate").await
    }

    async fn set_gate(&self, request: GateRequest) -> Result<GateJson> {
        let current = gate_version(&self.gate().await?);
        self.write(Method::PUT, "/v1/gate", &current, &request)
            .await
    }

    async fn config(&self, id: &TenantId, version: Option<u64>) -> Result<ConfigJson> {
        let path = format!("/v1/tenants/{}/config", path_id(id));
        self.get(&with_query(
            &path,
            &serde_json::json!({ "version": version }),
        ))
        .await
    }

    async fn set_config(
        &self,
        id: &TenantId,
        request: ConfigRequest,
        if_version: Option<u64>,
    ) -> Result<ConfigJson> {
        let v = self.config_version(id, if_version).await?;
        let path = format!("/v1/tenants/{}/config", path_id(id));
        self.write(Method::PUT, &path, &v.to_string(), &request)
            .await
    }

    async fn jobs(&self, state: Option<&str>) -> Result<JobsJson> {
        self.get(&with_query(
            "/v1/provisioning/jobs",
            &serde_json::json!({ "state": state }),
        ))
        .await
    }

    async fn job(&self, event: &str) -> Result<JobJson> {
        self.get(&format!("/v1/provisioning/jobs/{}", encode(event)))
            .await
    }

    async fn retry_job(&self, event: &str) -> Result<JobJson> {
        let path = format!("/v1/provisioning/jobs/{}/retry", encode(event));
        self.send(
            self.request(Method::POST, &path)
                .json(&serde_json::json!({})),
        )
        .await
    }

    async fn config_history(&self, id: &TenantId) -> Result<ConfigHistoryJson> {
        self.get(&format!("/v1/tenants/{}/config/history", path_id(id)))
            .await
    }

    async fn restore_config(
        &self,
        id: &TenantId,
        request: RestoreRequest,
        if_version: Option<u64>,
    ) -> Result<ConfigJson> {
        let v = self.config_version(id, if_version).await?;
        let path = format!("/v1/tenants/{}/config/restore", path_id(id));
        self.write(Method::POST, &path, &v.to_string(), &request)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_encoded_and_skip_missing_values() {
        let params = serde_json::json!({ "endpoint": "GET /homes/{id}", "limit": 5, "x": null });
        assert_eq!(
            with_query("/v1/t", &params),
            "/v1/t?endpoint=GET%20%2Fhomes%2F%7Bid%7D&limit=5"
        );
        assert_eq!(with_query("/v1/t", &serde_json::json!({})), "/v1/t");
    }
}
