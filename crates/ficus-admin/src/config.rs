//! The tenant configuration as the JSON document clients and operators see, its
//! JSON Schema, and the mapping to [`ficus_core::config`]'s plain values.
//!
//! The document is read by hand from a `serde_json::Value` rather than derived,
//! so that every refusal names the field's full path (`branding.logo_url`,
//! `features.dark_mode.ios`) and an unknown key is refused by name; the schema
//! published at `/v1/tenant-config.schema.json` says the same thing for tools,
//! and a test keeps the two in step.

use std::collections::BTreeMap;

use ficus_core::Domain;
use ficus_core::config::{Branding, ConfigError, Feature, Platform, TenantConfig, Value};
use serde_json::{Map, Value as Json, json};

/// The JSON Schema of the document, served by the admin API.
pub const SCHEMA: &str = include_str!("tenant-config.schema.json");

/// The keys of the document and of its `branding` object, as the schema lists
/// them.
pub const TOP_KEYS: &[&str] = &[
    "display_name",
    "app_name",
    "branding",
    "domains",
    "locale",
    "features",
];
pub const BRANDING_KEYS: &[&str] = &["primary_color", "accent_color", "logo_url", "icon_url"];
pub const FEATURE_KEYS: &[&str] = &["default", "web", "ios", "android"];

fn err(field: impl Into<String>, why: impl Into<String>) -> ConfigError {
    ConfigError::new(field, why)
}

fn object<'a>(
    v: &'a Json,
    field: &str,
    keys: &[&str],
) -> Result<&'a Map<String, Json>, ConfigError> {
    let o = v
        .as_object()
        .ok_or_else(|| err(field_or_root(field), "must be an object"))?;
    for k in o.keys() {
        if !keys.contains(&k.as_str()) {
            return Err(err(
                join(field, k),
                format!("unknown key; expected one of {}", keys.join(", ")),
            ));
        }
    }
    Ok(o)
}

fn field_or_root(field: &str) -> String {
    if field.is_empty() {
        "(document)".to_string()
    } else {
        field.to_string()
    }
}

fn join(base: &str, key: &str) -> String {
    if base.is_empty() {
        key.to_string()
    } else {
        format!("{base}.{key}")
    }
}

fn string(o: &Map<String, Json>, base: &str, key: &str) -> Result<Option<String>, ConfigError> {
    match o.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(err(join(base, key), "must be a string")),
    }
}

fn required(o: &Map<String, Json>, key: &str) -> Result<String, ConfigError> {
    string(o, "", key)?.ok_or_else(|| err(key, "is required"))
}

fn value(v: &Json, field: &str) -> Result<Value, ConfigError> {
    match v {
        Json::Bool(b) => Ok(Value::Bool(*b)),
        Json::String(s) => Ok(Value::Text(s.clone())),
        Json::Number(n) => n
            .as_f64()
            .map(Value::Number)
            .ok_or_else(|| err(field, "must be a finite number")),
        _ => Err(err(field, "must be a boolean, a string or a number")),
    }
}

fn value_json(v: &Value) -> Json {
    match v {
        Value::Bool(b) => json!(b),
        Value::Text(s) => json!(s),
        Value::Number(n) => json!(n),
    }
}

/// Reads and checks a document; the error names the field.
pub fn parse(doc: &Json) -> Result<TenantConfig, ConfigError> {
    let top = object(doc, "", TOP_KEYS)?;
    let branding = match top.get("branding") {
        None | Some(Json::Null) => Branding::default(),
        Some(b) => {
            let b = object(b, "branding", BRANDING_KEYS)?;
            Branding {
                primary_color: string(b, "branding", "primary_color")?,
                accent_color: string(b, "branding", "accent_color")?,
                logo_url: string(b, "branding", "logo_url")?,
                icon_url: string(b, "branding", "icon_url")?,
            }
        }
    };
    let mut domains = Vec::new();
    match top.get("domains") {
        None | Some(Json::Null) => {}
        Some(Json::Array(items)) => {
            for (i, d) in items.iter().enumerate() {
                let field = format!("domains[{i}]");
                let raw = d.as_str().ok_or_else(|| err(&field, "must be a string"))?;
                domains.push(Domain::parse(raw).map_err(|e| err(&field, e.to_string()))?);
            }
        }
        Some(_) => return Err(err("domains", "must be an array of host names")),
    }
    let mut features = BTreeMap::new();
    match top.get("features") {
        None | Some(Json::Null) => {}
        Some(Json::Object(map)) => {
            for (name, f) in map {
                let base = format!("features.{name}");
                // A bare value is the same for every platform.
                let feature = if f.is_object() {
                    let o = object(f, &base, FEATURE_KEYS)?;
                    let get = |key: &str| -> Result<Option<Value>, ConfigError> {
                        o.get(key)
                            .filter(|v| !v.is_null())
                            .map(|v| value(v, &join(&base, key)))
                            .transpose()
                    };
                    Feature {
                        default: get("default")?
                            .ok_or_else(|| err(join(&base, "default"), "is required"))?,
                        web: get("web")?,
                        ios: get("ios")?,
                        android: get("android")?,
                    }
                } else {
                    Feature {
                        default: value(f, &base)?,
                        web: None,
                        ios: None,
                        android: None,
                    }
                };
                features.insert(name.clone(), feature);
            }
        }
        Some(_) => return Err(err("features", "must be an object")),
    }
    let config = TenantConfig {
        display_name: required(top, "display_name")?,
        app_name: required(top, "app_name")?,
        branding,
        domains,
        locale: string(top, "", "locale")?.unwrap_or_else(|| "en".to_string()),
        features,
    };
    config.validate()?;
    Ok(config)
}

/// The document, with every field present (nulls for unset branding).
pub fn to_json(c: &TenantConfig) -> Json {
    let features: Map<String, Json> = c
        .features
        .iter()
        .map(|(name, f)| {
            let mut o = Map::new();
            o.insert("default".into(), value_json(&f.default));
            for p in Platform::ALL {
                let v = match p {
                    Platform::Web => &f.web,
                    Platform::Ios => &f.ios,
                    Platform::Android => &f.android,
                };
                if let Some(v) = v {
                    o.insert(p.as_str().into(), value_json(v));
                }
            }
            (name.clone(), Json::Object(o))
        })
        .collect();
    json!({
        "display_name": c.display_name,
        "app_name": c.app_name,
        "branding": {
            "primary_color": c.branding.primary_color,
            "accent_color": c.branding.accent_color,
            "logo_url": c.branding.logo_url,
            "icon_url": c.branding.icon_url,
        },
        "domains": c.domains.iter().map(Domain::as_str).collect::<Vec<_>>(),
        "locale": c.locale,
        "features": features,
    })
}

/// What one platform's client receives: each feature resolved to its value.
pub fn for_platform(c: &TenantConfig, platform: Option<Platform>) -> Json {
    let mut doc = to_json(c);
    if let Some(p) = platform {
        let features: Map<String, Json> = c
            .features
            .iter()
            .map(|(name, f)| (name.clone(), value_json(f.for_platform(p))))
            .collect();
        doc["features"] = Json::Object(features);
        doc["platform"] = json!(p.as_str());
    }
    doc
}

/// Applies one `--set key=value` edit to a document: `key` is a dotted path
/// (`branding.primary_color`, `features.dark_mode.ios`); `domains` takes a
/// comma-separated list; a value that reads as JSON (`true`, `12`, `"x"`) is
/// that, anything else a string.
pub fn set(doc: &mut Json, assignment: &str) -> Result<(), ConfigError> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| err(assignment, "write an edit as key=value"))?;
    let key = key.trim();
    let value: Json = if key == "domains" {
        Json::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(|d| json!(d))
                .collect(),
        )
    } else {
        serde_json::from_str(raw).unwrap_or_else(|_| json!(raw))
    };
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(err(key, "is not a key path"));
    }
    let mut at = doc;
    for p in &parts[..parts.len() - 1] {
        if !at.is_object() {
            return Err(err(key, "goes through a value that is not an object"));
        }
        at = at
            .as_object_mut()
            .expect("checked above")
            .entry(p.to_string())
            .or_insert_with(|| json!({}));
        // A bare feature value becomes its default when a platform is set.
        if !at.is_object() && !at.is_null() {
            let old = at.take();
            *at = json!({ "default": old });
        }
    }
    match at.as_object_mut() {
        Some(o) => {
            o.insert(parts[parts.len() - 1].to_string(), value);
            Ok(())
        }
        None => Err(err(key, "goes through a value that is not an object")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Json {
        json!({
            "display_name": "Acme Homes",
            "app_name": "Acme",
            "branding": {"primary_color": "#0a7f5a", "logo_url": "https://cdn.acme.test/logo.svg"},
            "domains": ["homes.acme.test"],
            "locale": "en-GB",
            "features": {"dark_mode": {"default": false, "ios": true}, "max_saved_searches": 10}
        })
    }

    fn check(edit: impl FnOnce(&mut Json), expect: &str) {
        let mut d = doc();
        edit(&mut d);
        let got = match parse(&d) {
            Ok(_) => "ok".to_string(),
            Err(e) => e.to_string(),
        };
        assert_eq!(got, expect);
    }

    #[test]
    fn every_refusal_names_its_field() {
        check(|_| {}, "ok");
        check(
            |d| d["branding"]["primary_color"] = json!("green"),
            "branding.primary_color: \"green\" is not a colour: use #rgb or #rrggbb",
        );
        check(
            |d| d["branding"]["colour"] = json!("#fff"),
            "branding.colour: unknown key; expected one of primary_color, accent_color, logo_url, icon_url",
        );
        check(
            |d| d["theme"] = json!("dark"),
            "theme: unknown key; expected one of display_name, app_name, branding, domains, locale, features",
        );
        check(
            |d| d["domains"] = json!(["homes.acme.test", "https://x.test/"]),
            "domains[1]: invalid domain \"https://x.test/\": give a bare host name, without scheme, port or path",
        );
        check(
            |d| d["features"]["dark_mode"]["ios"] = json!([1]),
            "features.dark_mode.ios: must be a boolean, a string or a number",
        );
        check(
            |d| {
                d.as_object_mut().unwrap().remove("app_name");
            },
            "app_name: is required",
        );
        check(|d| *d = json!([]), "(document): must be an object");
    }

    #[test]
    fn a_document_reads_back_the_same_and_resolves_per_platform() {
        let c = parse(&doc()).unwrap();
        assert_eq!(parse(&to_json(&c)).unwrap(), c);
        let ios = for_platform(&c, Some(Platform::Ios));
        assert_eq!(
            ios["features"],
            json!({"dark_mode": true, "max_saved_searches": 10.0})
        );
        let web = for_platform(&c, Some(Platform::Web));
        assert_eq!(web["features"]["dark_mode"], json!(false));
    }

    #[test]
    fn set_edits_by_key_path() {
        let mut d = doc();
        set(&mut d, "branding.accent_color=#123").unwrap();
        set(&mut d, "features.max_saved_searches.android=25").unwrap();
        set(&mut d, "features.beta=true").unwrap();
        set(&mut d, "domains=a.acme.test, b.acme.test").unwrap();
        set(&mut d, "app_name=Acme Homes").unwrap();
        let c = parse(&d).unwrap();
        assert_eq!(c.branding.accent_color.as_deref(), Some("#123"));
        assert_eq!(
            c.features["max_saved_searches"].android,
            Some(Value::Number(25.0))
        );
        assert_eq!(c.features["beta"].default, Value::Bool(true));
        assert_eq!(c.domains.len(), 2);
        assert_eq!(c.app_name, "Acme Homes");
        assert_eq!(
            set(&mut d, "no equals").unwrap_err().to_string(),
            "no equals: write an edit as key=value"
        );
    }

    #[test]
    fn the_schema_lists_exactly_the_keys_the_reader_accepts() {
        let schema: Json = serde_json::from_str(SCHEMA).unwrap();
        let keys = |v: &Json| -> Vec<String> {
            let mut k: Vec<String> = v["properties"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            k.sort();
            k
        };
        let sorted = |list: &[&str]| {
            let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
            v.sort();
            v
        };
        assert_eq!(keys(&schema), sorted(TOP_KEYS));
        assert_eq!(
            keys(&schema["properties"]["branding"]),
            sorted(BRANDING_KEYS)
        );
        assert_eq!(
            keys(&schema["$defs"]["feature"]["oneOf"][1]),
            sorted(FEATURE_KEYS)
        );
        assert_eq!(schema["additionalProperties"], json!(false));
    }
}
