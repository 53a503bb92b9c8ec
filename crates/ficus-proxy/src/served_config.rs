//! The tenant configuration as the proxy serves it to clients at a well-known
//! path: rendered once per version into one body per platform (all platforms,
//! `web`, `ios`, `android`), with an entity tag, so that a request costs a map
//! lookup and a copy of bytes.

use std::hash::{Hash, Hasher};

use bytes::Bytes;
use ficus_admin::config;
use ficus_core::config::{Platform, TenantConfig};
use ficus_core::{Domain, TenantId};
use ficus_store::ConfigVersion;

/// One tenant's configuration, ready to send.
#[derive(Debug, Clone)]
pub struct ServedConfig {
    pub version: u64,
    /// Bodies and entity tags: index 0 for no platform, then web, ios, android.
    bodies: [(Bytes, String); 4],
}

fn slot(platform: Option<Platform>) -> usize {
    match platform {
        None => 0,
        Some(Platform::Web) => 1,
        Some(Platform::Ios) => 2,
        Some(Platform::Android) => 3,
    }
}

impl ServedConfig {
    /// Renders a configuration. `written` is the stored version; without one the
    /// tenant's initial configuration (its name and domains) is served as
    /// version 0. A stored document this build cannot read is not served (the
    /// admin API refuses to write one, so it means a hand-edited store).
    pub fn build(
        tenant: &TenantId,
        name: &str,
        domains: &[Domain],
        written: Option<&ConfigVersion>,
    ) -> Option<ServedConfig> {
        let (version, config) = match written {
            Some(v) => {
                let doc: serde_json::Value = serde_json::from_str(&v.document).ok()?;
                (v.version, config::parse(&doc).ok()?)
            }
            None => (0, TenantConfig::initial(name, domains)),
        };
        let render = |platform: Option<Platform>| {
            let mut doc = config::for_platform(&config, platform);
            doc["tenant"] = serde_json::json!(tenant.as_str());
            doc["version"] = serde_json::json!(version);
            let body = Bytes::from(doc.to_string());
            // The tag is the content's: version 0 changes with the registry's
            // name and domains, not with a version number.
            let mut h = std::collections::hash_map::DefaultHasher::new();
            body.hash(&mut h);
            (body, format!("\"{version}-{:016x}\"", h.finish()))
        };
        Some(ServedConfig {
            version,
            bodies: [
                render(None),
                render(Some(Platform::Web)),
                render(Some(Platform::Ios)),
                render(Some(Platform::Android)),
            ],
        })
    }

    pub fn body(&self, platform: Option<Platform>) -> &Bytes {
        &self.bodies[slot(platform)].0
    }

    pub fn etag(&self, platform: Option<Platform>) -> &str {
        &self.bodies[slot(platform)].1
    }
}
