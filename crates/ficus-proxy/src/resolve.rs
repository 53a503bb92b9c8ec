//! Tenant resolution: which tenant a request belongs to, from ordered rules.
//!
//! Rules are tried in config order. The first rule that yields a tenant the control
//! plane knows wins. If rules yield only unknown ids, the first of those is reported,
//! so the unknown-tenant policy can act on it; a host pattern that happens to capture
//! `www` therefore cannot hide a later header rule that names a real tenant.
//!
//! A JWT selects a tenant only when its signature verifies and `exp`/`nbf` hold; a
//! bad token is treated as no token. Keys and secrets are never printed: `Debug`
//! shows only what kind of key a rule has.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use ficus_core::TenantId;
use http::{HeaderMap, HeaderName};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::table::{Known, RoutingTable};

/// One tenant resolution rule.
#[derive(Debug, Clone)]
pub enum Rule {
    Header(HeaderName),
    Host(HostPattern),
    CustomDomains,
    PathPrefix { pattern: PathPattern, strip: bool },
    Jwt(Box<JwtRule>),
}

impl Rule {
    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Rule::Header(_) => "header",
            Rule::Host(_) => "host",
            Rule::CustomDomains => "custom_domain",
            Rule::PathPrefix { .. } => "path_prefix",
            Rule::Jwt(_) => "jwt",
        }
    }
}

/// `{tenant}.example.com`: a host name with one `{tenant}` label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    before: String,
    after: String,
}

impl HostPattern {
    pub fn parse(raw: &str) -> Result<HostPattern, String> {
        let lower = raw.to_ascii_lowercase();
        let Some((before, after)) = lower.split_once("{tenant}") else {
            return Err(format!("{raw:?} has no {{tenant}} placeholder"));
        };
        if after.contains("{tenant}") {
            return Err(format!("{raw:?} has {{tenant}} twice"));
        }
        if !(before.is_empty() || before.ends_with('.'))
            || !(after.is_empty() || after.starts_with('.'))
        {
            return Err(format!(
                "{raw:?}: {{tenant}} must be a whole label, such as {{tenant}}.example.com"
            ));
        }
        Ok(HostPattern {
            before: before.to_string(),
            after: after.to_string(),
        })
    }

    fn capture<'h>(&self, host: &'h str) -> Option<&'h str> {
        let rest = host.strip_prefix(self.before.as_str())?;
        let label = rest.strip_suffix(self.after.as_str())?;
        (!label.is_empty() && !label.contains('.')).then_some(label)
    }
}

/// `/t/{tenant}`: a path prefix ending in a `{tenant}` segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    before: String,
}

impl PathPattern {
    pub fn parse(raw: &str) -> Result<PathPattern, String> {
        let Some(before) = raw.strip_suffix("{tenant}") else {
            return Err(format!(
                "{raw:?} must end with a {{tenant}} segment, such as /t/{{tenant}}"
            ));
        };
        if !before.starts_with('/') || !before.ends_with('/') || before.contains('{') {
            return Err(format!(
                "{raw:?} must start with '/' and have {{tenant}} as its own last segment"
            ));
        }
        Ok(PathPattern {
            before: before.to_string(),
        })
    }

    /// The tenant segment and the path that remains after the prefix (always
    /// starting with '/', query string kept).
    fn capture<'p>(&self, path_and_query: &'p str) -> Option<(&'p str, String)> {
        let rest = path_and_query.strip_prefix(self.before.as_str())?;
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (segment, remainder) = rest.split_at(end);
        if segment.is_empty() {
            return None;
        }
        let remainder = if remainder.starts_with('/') {
            remainder.to_string()
        } else {
            format!("/{remainder}")
        };
        Some((segment, remainder))
    }
}

/// A verification key for JWTs.
#[derive(Clone)]
pub enum JwtKey {
    Hs256(DecodingKey),
    /// Keys from a JWKS file by `kid`, each with the algorithm it verifies.
    Jwks(HashMap<String, (DecodingKey, Algorithm)>),
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwtKey::Hs256(_) => f.write_str("Hs256(<secret>)"),
            JwtKey::Jwks(keys) => write!(f, "Jwks({} keys)", keys.len()),
        }
    }
}

impl JwtKey {
    pub fn hs256(secret: &[u8]) -> JwtKey {
        JwtKey::Hs256(DecodingKey::from_secret(secret))
    }

    /// Loads RS256 and ES256 (P-256) keys from a JWKS file.
    pub fn jwks_file(path: &Path) -> Result<JwtKey, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let set: JwkSet = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a JWKS document: {e}", path.display()))?;
        let mut keys = HashMap::new();
        for (i, jwk) in set.keys.iter().enumerate() {
            let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
                (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
                (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
                    if ec.curve == EllipticCurve::P256 =>
                {
                    Algorithm::ES256
                }
                _ => {
                    return Err(format!(
                        "key {i} in {} is not an RS256 or ES256 (P-256) key",
                        path.display()
                    ));
                }
            };
            let key = DecodingKey::from_jwk(jwk)
                .map_err(|e| format!("key {i} in {}: {e}", path.display()))?;
            let kid = jwk.common.key_id.clone().unwrap_or_default();
            keys.insert(kid, (key, alg));
        }
        if keys.is_empty() {
            return Err(format!("{} holds no keys", path.display()));
        }
        Ok(JwtKey::Jwks(keys))
    }
}

/// Takes the tenant from a claim of a verified bearer token.
#[derive(Debug, Clone)]
pub struct JwtRule {
    claim: String,
    key: JwtKey,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_s: u64,
}

impl JwtRule {
    pub fn new(
        claim: String,
        key: JwtKey,
        issuer: Option<String>,
        audience: Option<String>,
        leeway_s: u64,
    ) -> JwtRule {
        JwtRule {
            claim,
            key,
            issuer,
            audience,
            leeway_s,
        }
    }

    /// The claim's value if the token verifies; `None` for any failure.
    fn tenant_claim(&self, token: &str) -> Option<String> {
        let (key, alg) = match &self.key {
            JwtKey::Hs256(key) => (key, Algorithm::HS256),
            JwtKey::Jwks(keys) => {
                let header = jsonwebtoken::decode_header(token).ok()?;
                let kid = header.kid.unwrap_or_default();
                let found = keys
                    .get(&kid)
                    .or_else(|| (keys.len() == 1).then(|| keys.values().next()).flatten())?;
                if found.1 != header.alg {
                    return None;
                }
                (&found.0, found.1)
            }
        };
        let mut v = Validation::new(alg);
        v.leeway = self.leeway_s;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp"]);
        match &self.issuer {
            Some(iss) => v.set_issuer(&[iss]),
            None => v.iss = None,
        }
        match &self.audience {
            Some(aud) => v.set_audience(&[aud]),
            None => v.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<serde_json::Value>(token, key, &v).ok()?;
        data.claims.get(&self.claim)?.as_str().map(str::to_string)
    }
}

/// What resolution needs of a request.
pub struct RequestParts<'a> {
    /// The Host header or `:authority`, possibly with a port.
    pub host: Option<&'a str>,
    /// Path and query, as received.
    pub path_and_query: &'a str,
    pub headers: &'a HeaderMap,
}

/// The outcome of resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub tenant: TenantId,
    /// What the control plane knows of this tenant, if it knows it.
    pub known: Option<Known>,
    /// Which kind of rule matched.
    pub rule: &'static str,
    /// The path to forward instead, when a `strip` path rule matched.
    pub rewritten_path: Option<String>,
}

/// A tenant a rule names, and what the table knows of it.
type Named = (TenantId, Option<Known>);

/// Resolves a request's tenant with `rules` against the routing table.
pub fn resolve(rules: &[Rule], req: &RequestParts<'_>, table: &RoutingTable) -> Option<Resolved> {
    // Made when a rule first needs it: a tenant named by a header does not
    // pay for a lowercased copy of the host.
    let host_cell = std::cell::OnceCell::new();
    let host = || {
        host_cell
            .get_or_init(|| req.host.map(host_without_port))
            .as_deref()
    };
    // A name the table knows is its tenant (its ids were checked when they
    // were stored), taken from the table with what it knows of it; any other
    // is checked here, and unknown.
    let by_name = |raw: &str| -> Option<Named> {
        match table.known_by_name(raw) {
            Some((id, known)) => Some((id, Some(known))),
            None => TenantId::parse(raw).ok().map(|id| (id, None)),
        }
    };
    let by_id = |id: &TenantId| {
        let known = table.known(id);
        (id.clone(), known)
    };
    let mut first_unknown = None;
    for rule in rules {
        let candidate: Option<(Named, Option<String>)> = match rule {
            Rule::Header(name) => req
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| by_name(v.trim()))
                .map(|t| (t, None)),
            Rule::Host(pattern) => host()
                .and_then(|h| {
                    table
                        .tenant_by_domain(h)
                        .map(by_id)
                        .or_else(|| pattern.capture(h).and_then(by_name))
                })
                .map(|t| (t, None)),
            Rule::CustomDomains => host()
                .and_then(|h| table.tenant_by_domain(h).map(by_id))
                .map(|t| (t, None)),
            Rule::PathPrefix { pattern, strip } => pattern
                .capture(req.path_and_query)
                .and_then(|(segment, rest)| by_name(segment).map(|t| (t, strip.then_some(rest)))),
            Rule::Jwt(jwt) => bearer(req.headers)
                .and_then(|t| jwt.tenant_claim(t))
                .and_then(|c| by_name(&c))
                .map(|t| (t, None)),
        };
        let Some(((tenant, known), rewritten_path)) = candidate else {
            continue;
        };
        let resolved = Resolved {
            known,
            tenant,
            rule: rule.kind(),
            rewritten_path,
        };
        if resolved.known.is_some() {
            return Some(resolved);
        }
        first_unknown.get_or_insert(resolved);
    }
    first_unknown
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Lowercases a host and drops its port (`Example.COM:8080` → `example.com`,
/// `[::1]:8080` → `[::1]`).
pub fn host_without_port(host: &str) -> String {
    let h = if host.starts_with('[') {
        host.split_inclusive(']').next().unwrap_or(host)
    } else {
        host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}
