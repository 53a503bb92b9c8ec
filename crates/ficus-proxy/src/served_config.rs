//! The tenant configuration as the proxy serves it to clients at a well-known
//! path. A written configuration is rendered once per version into one body per
//! platform (all platforms, `web`, `ios`, `android`), each with an entity tag,
//! so that a request costs a map lookup and a copy of bytes. A tenant nobody
//! wrote a configuration for is served its initial one (its registry name and
//! domains, version 0), rendered for the one platform asked, on demand: keeping
//! four bodies for every such tenant would cost memory at every table load for
//! tenants that clients may never ask about.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use bytes::Bytes;
use ficus_admin::config;
use ficus_core::config::{Platform, TenantConfig};
use ficus_core::{Domain, TenantId};
use ficus_store::ConfigVersion;

/// One answer: the body and its entity tag.
#[derive(Debug, Clone)]
pub struct Served {
    pub body: Bytes,
    pub etag: Arc<str>,
}

/// A written configuration, rendered for every platform.
#[derive(Debug, Clone)]
pub struct ServedConfig {
    /// Index 0 for no platform, then web, ios, android.
    bodies: [Served; 4],
}

fn slot(platform: Option<Platform>) -> usize {
    match platform {
        None => 0,
        Some(Platform::Web) => 1,
        Some(Platform::Ios) => 2,
        Some(Platform::Android) => 3,
    }
}

/// Renders `config` at `version` for one platform (or all).
fn render(
    tenant: &TenantId,
    version: u64,
    config: &TenantConfig,
    platform: Option<Platform>,
) -> Served {
    let mut doc = config::for_platform(config, platform);
    doc["tenant"] = serde_json::json!(tenant.as_str());
    doc["version"] = serde_json::json!(version);
    let body = Bytes::from(doc.to_string());
    // The tag is the content's: version 0 changes with the registry's name and
    // domains, not with a version number.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut h);
    Served {
        body,
        etag: Arc::from(format!("\"{version}-{:016x}\"", h.finish())),
    }
}

impl ServedConfig {
    /// Renders a stored version. A document this build cannot read is not
    /// served (the admin API refuses to write one, so it means a hand-edited
    /// store).
    pub fn build(tenant: &TenantId, written: &ConfigVersion) -> Option<ServedConfig> {
        let doc: serde_json::Value = serde_json::from_str(&written.document).ok()?;
        let config = config::parse(&doc).ok()?;
        let v = written.version;
        Some(ServedConfig {
            bodies: [
                render(tenant, v, &config, None),
                render(tenant, v, &config, Some(Platform::Web)),
                render(tenant, v, &config, Some(Platform::Ios)),
                render(tenant, v, &config, Some(Platform::Android)),
            ],
        })
    }

    pub fn get(&self, platform: Option<Platform>) -> &Served {
        &self.bodies[slot(platform)]
    }
}

/// The initial configuration of a tenant with none written, for one platform.
pub fn initial(
    tenant: &TenantId,
    name: &str,
    domains: &[Domain],
    platform: Option<Platform>,
) -> Served {
    render(tenant, 0, &TenantConfig::initial(name, domains), platform)
}
