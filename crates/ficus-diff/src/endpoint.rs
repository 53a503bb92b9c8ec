//! Endpoints: concrete request paths grouped into route templates, so that every
//! statistic is per tenant × endpoint (`GET /homes/{id}`), not per URL.
//!
//! Segments that look like identifiers become `{id}`: all digits, UUIDs, and hex
//! strings of 16 characters or more. Configured templates take precedence, for
//! identifiers these rules cannot see (slugs, emails).

/// A configured template such as `/homes/{id}/photos/{photo}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    segments: Vec<Option<String>>,
    source: String,
}

impl Template {
    pub fn parse(raw: &str) -> Result<Template, String> {
        if !raw.starts_with('/') {
            return Err(format!("route template {raw:?} must start with '/'"));
        }
        let segments = raw[1..]
            .split('/')
            .map(|s| {
                if s.starts_with('{') && s.ends_with('}') {
                    None
                } else {
                    Some(s.to_string())
                }
            })
            .collect();
        Ok(Template {
            segments,
            source: raw.to_string(),
        })
    }

    fn matches(&self, segments: &[&str]) -> bool {
        self.segments.len() == segments.len()
            && self
                .segments
                .iter()
                .zip(segments)
                .all(|(t, s)| t.as_deref().is_none_or(|lit| lit == *s))
    }
}

fn looks_like_id(seg: &str) -> bool {
    let digits = !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit());
    let hex = seg.len() >= 16 && seg.bytes().all(|b| b.is_ascii_hexdigit());
    let uuid = seg.len() == 36
        && seg.bytes().enumerate().all(|(i, b)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        });
    digits || hex || uuid
}

/// The endpoint of a request: method and route template, such as
/// `GET /homes/{id}/photos`. The query string is not part of it.
pub fn endpoint(method: &str, path_and_query: &str, templates: &[Template]) -> String {
    let path = path_and_query.split('?').next().unwrap_or("/");
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if let Some(t) = templates.iter().find(|t| t.matches(&segments)) {
        return format!("{method} {}", t.source);
    }
    let mut out = String::with_capacity(path.len() + method.len() + 1);
    out.push_str(method);
    out.push(' ');
    for seg in &segments {
        out.push('/');
        out.push_str(if looks_like_id(seg) { "{id}" } else { seg });
    }
    out
}
