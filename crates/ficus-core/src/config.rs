//! White-label tenant configuration: what web and mobile clients of one system
//! need to look and behave as one tenant's product — names, branding, custom
//! domains, locale and feature toggles with per-platform values.
//!
//! Plain values and their rules. The JSON document and its schema are the admin
//! crate's; the store keeps every version. Validation names the field that is
//! wrong (`branding.primary_color`, `features.dark_mode.ios`), so an operator
//! can fix a document without guessing.

use std::collections::BTreeMap;

use crate::tenant::Domain;

/// One tenant's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantConfig {
    pub display_name: String,
    pub app_name: String,
    pub branding: Branding,
    /// Custom host names that route to this tenant; unique across tenants.
    pub domains: Vec<Domain>,
    /// A BCP 47 language tag such as `en`, `nl-NL` or `pt-BR`.
    pub locale: String,
    pub features: BTreeMap<String, Feature>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Branding {
    /// `#rgb` or `#rrggbb`.
    pub primary_color: Option<String>,
    pub accent_color: Option<String>,
    /// `https://` URLs.
    pub logo_url: Option<String>,
    pub icon_url: Option<String>,
}

/// A feature toggle's value: the three kinds clients can act on.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Bool(bool),
    Text(String),
    Number(f64),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Bool(_) => "boolean",
            Value::Text(_) => "string",
            Value::Number(_) => "number",
        }
    }
}

/// A feature toggle: a value for every client, and optionally another for one
/// platform.
#[derive(Debug, Clone, PartialEq)]
pub struct Feature {
    pub default: Value,
    pub web: Option<Value>,
    pub ios: Option<Value>,
    pub android: Option<Value>,
}

/// The client platforms a value can be set for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    Web,
    Ios,
    Android,
}

impl Platform {
    pub const ALL: [Platform; 3] = [Platform::Web, Platform::Ios, Platform::Android];

    pub fn parse(raw: &str) -> Option<Platform> {
        match raw {
            "web" => Some(Platform::Web),
            "ios" => Some(Platform::Ios),
            "android" => Some(Platform::Android),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Web => "web",
            Platform::Ios => "ios",
            Platform::Android => "android",
        }
    }
}

impl Feature {
    pub fn for_platform(&self, platform: Platform) -> &Value {
        let specific = match platform {
            Platform::Web => &self.web,
            Platform::Ios => &self.ios,
            Platform::Android => &self.android,
        };
        specific.as_ref().unwrap_or(&self.default)
    }
}

/// What is wrong with a configuration, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct ConfigError {
    /// The field's path, dot-separated (`branding.logo_url`, `domains[1]`).
    pub field: String,
    pub why: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, why: impl Into<String>) -> ConfigError {
        ConfigError {
            field: field.into(),
            why: why.into(),
        }
    }
}

/// The most features one tenant may have: clients fetch them all on start.
pub const MAX_FEATURES: usize = 200;

impl TenantConfig {
    /// The configuration a tenant has before anyone wrote one: its name and
    /// domains from the registry, nothing else.
    pub fn initial(name: &str, domains: &[Domain]) -> TenantConfig {
        TenantConfig {
            display_name: name.to_string(),
            app_name: name.to_string(),
            branding: Branding::default(),
            domains: domains.to_vec(),
            locale: "en".to_string(),
            features: BTreeMap::new(),
        }
    }

    /// Checks every field; the first problem is returned with its path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        text("display_name", &self.display_name, 100)?;
        text("app_name", &self.app_name, 50)?;
        for (field, value) in [
            ("branding.primary_color", &self.branding.primary_color),
            ("branding.accent_color", &self.branding.accent_color),
        ] {
            if let Some(v) = value {
                color(field, v)?;
            }
        }
        for (field, value) in [
            ("branding.logo_url", &self.branding.logo_url),
            ("branding.icon_url", &self.branding.icon_url),
        ] {
            if let Some(v) = value {
                url(field, v)?;
            }
        }
        for (i, d) in self.domains.iter().enumerate() {
            if self.domains[..i].contains(d) {
                return Err(ConfigError::new(
                    format!("domains[{i}]"),
                    format!("{d} is given twice"),
                ));
            }
        }
        locale(&self.locale)?;
        if self.features.len() > MAX_FEATURES {
            return Err(ConfigError::new(
                "features",
                format!(
                    "at most {MAX_FEATURES} features, got {}",
                    self.features.len()
                ),
            ));
        }
        for (key, feature) in &self.features {
            feature_key(key)?;
            let base = format!("features.{key}");
            value(&format!("{base}.default"), &feature.default)?;
            for p in Platform::ALL {
                let specific = match p {
                    Platform::Web => &feature.web,
                    Platform::Ios => &feature.ios,
                    Platform::Android => &feature.android,
                };
                if let Some(v) = specific {
                    let field = format!("{base}.{}", p.as_str());
                    value(&field, v)?;
                    if v.kind() != feature.default.kind() {
                        return Err(ConfigError::new(
                            field,
                            format!(
                                "is a {} but the default is a {}: a toggle keeps one kind on every platform",
                                v.kind(),
                                feature.default.kind()
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

fn text(field: &str, value: &str, max: usize) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        return Err(ConfigError::new(field, "must not be empty"));
    }
    if value.chars().count() > max {
        return Err(ConfigError::new(field, format!("at most {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(ConfigError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

fn color(field: &str, value: &str) -> Result<(), ConfigError> {
    let hex = value.strip_prefix('#').unwrap_or("");
    if (hex.len() == 3 || hex.len() == 6) && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(ConfigError::new(
            field,
            format!("{value:?} is not a colour: use #rgb or #rrggbb"),
        ))
    }
}

fn url(field: &str, value: &str) -> Result<(), ConfigError> {
    let rest = value
        .strip_prefix("https://")
        .ok_or_else(|| ConfigError::new(field, format!("{value:?} is not an https:// URL")))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty()
        || value.len() > 2048
        || value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"')
    {
        return Err(ConfigError::new(
            field,
            format!("{value:?} is not a valid URL"),
        ));
    }
    Ok(())
}

/// A BCP 47 tag in its common shapes: language, optional script, optional
/// region (`en`, `zh-Hant`, `pt-BR`, `es-419`).
fn locale(value: &str) -> Result<(), ConfigError> {
    let mut parts = value.split('-');
    let lang = parts.next().unwrap_or("");
    let ok_lang = (2..=3).contains(&lang.len()) && lang.chars().all(|c| c.is_ascii_lowercase());
    let mut ok = ok_lang;
    let mut rest: Vec<&str> = parts.collect();
    if ok
        && rest.first().is_some_and(|s| {
            s.len() == 4
                && s.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                && s.chars().skip(1).all(|c| c.is_ascii_lowercase())
        })
    {
        rest.remove(0);
    }
    if ok && let Some(region) = rest.first() {
        ok = (region.len() == 2 && region.chars().all(|c| c.is_ascii_uppercase()))
            || (region.len() == 3 && region.chars().all(|c| c.is_ascii_digit()));
        rest.remove(0);
    }
    if ok && rest.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::new(
            "locale",
            format!("{value:?} is not a language tag such as en, nl-NL or pt-BR"),
        ))
    }
}

fn feature_key(key: &str) -> Result<(), ConfigError> {
    let ok = !key.is_empty()
        && key.len() <= 64
        && key.starts_with(|c: char| c.is_ascii_lowercase())
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            format!("features.{key}"),
            "a feature name is lowercase letters, digits and _, starting with a letter, at most 64",
        ))
    }
}

fn value(field: &str, v: &Value) -> Result<(), ConfigError> {
    match v {
        Value::Number(n) if !n.is_finite() => {
            Err(ConfigError::new(field, "must be a finite number"))
        }
        Value::Text(s) if s.chars().count() > 1000 => {
            Err(ConfigError::new(field, "at most 1000 characters"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> TenantConfig {
        let mut c =
            TenantConfig::initial("Acme Homes", &[Domain::parse("homes.acme.test").unwrap()]);
        c.features.insert(
            "dark_mode".into(),
            Feature {
                default: Value::Bool(false),
                web: None,
                ios: Some(Value::Bool(true)),
                android: None,
            },
        );
        c
    }

    fn check(edit: impl FnOnce(&mut TenantConfig), expect: &str) {
        let mut c = base();
        edit(&mut c);
        let got = match c.validate() {
            Ok(()) => "ok".to_string(),
            Err(e) => e.to_string(),
        };
        assert_eq!(got, expect);
    }

    #[test]
    fn each_field_is_checked_and_named() {
        check(|_| {}, "ok");
        check(|c| c.branding.primary_color = Some("#0a7".into()), "ok");
        check(
            |c| c.branding.primary_color = Some("teal".into()),
            "branding.primary_color: \"teal\" is not a colour: use #rgb or #rrggbb",
        );
        check(
            |c| c.branding.accent_color = Some("#12345g".into()),
            "branding.accent_color: \"#12345g\" is not a colour: use #rgb or #rrggbb",
        );
        check(
            |c| c.branding.logo_url = Some("http://cdn.acme.test/logo.png".into()),
            "branding.logo_url: \"http://cdn.acme.test/logo.png\" is not an https:// URL",
        );
        check(
            |c| c.branding.icon_url = Some("https:///x".into()),
            "branding.icon_url: \"https:///x\" is not a valid URL",
        );
        check(
            |c| c.display_name = " ".into(),
            "display_name: must not be empty",
        );
        check(|c| c.locale = "pt-BR".into(), "ok");
        check(|c| c.locale = "zh-Hant-TW".into(), "ok");
        check(|c| c.locale = "es-419".into(), "ok");
        check(
            |c| c.locale = "english".into(),
            "locale: \"english\" is not a language tag such as en, nl-NL or pt-BR",
        );
        check(
            |c| c.domains.push(Domain::parse("homes.acme.test").unwrap()),
            "domains[1]: homes.acme.test is given twice",
        );
        check(
            |c| c.features.get_mut("dark_mode").unwrap().android = Some(Value::Text("on".into())),
            "features.dark_mode.android: is a string but the default is a boolean: a toggle keeps one kind on every platform",
        );
        check(
            |c| {
                c.features.insert(
                    "Bad-Name".into(),
                    Feature {
                        default: Value::Number(1.0),
                        web: None,
                        ios: None,
                        android: None,
                    },
                );
            },
            "features.Bad-Name: a feature name is lowercase letters, digits and _, starting with a letter, at most 64",
        );
    }

    #[test]
    fn a_platform_value_overrides_the_default_for_that_platform_only() {
        let c = base();
        let f = &c.features["dark_mode"];
        assert_eq!(f.for_platform(Platform::Ios), &Value::Bool(true));
        assert_eq!(f.for_platform(Platform::Web), &Value::Bool(false));
        assert_eq!(f.for_platform(Platform::Android), &Value::Bool(false));
    }
}
