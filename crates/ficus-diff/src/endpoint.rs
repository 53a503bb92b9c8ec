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

    /// How many literal segments it has: of two templates that match a path,
    /// the one with more literals is the more specific and names it
    /// (`/homes/search` before `/homes/{id}`).
    fn literals(&self) -> usize {
        self.segments.iter().filter(|s| s.is_some()).count()
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

/// Configured templates, indexed by segment count and first segment, so that a
/// path is held against the few that could match it rather than all of them (a
/// proxy may carry hundreds of route templates, and names every request's route).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Templates {
    list: Vec<Template>,
    /// (segments, first literal or `None` for a placeholder) → positions in
    /// `list`, ascending.
    index: std::collections::HashMap<(usize, Option<String>), Vec<usize>>,
}

impl Templates {
    pub fn push(&mut self, t: Template) {
        let key = (t.segments.len(), t.segments.first().cloned().flatten());
        self.index.entry(key).or_default().push(self.list.len());
        self.list.push(t);
    }

    pub fn contains(&self, t: &Template) -> bool {
        self.list.contains(t)
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The most specific configured template that matches `segments` (the
    /// most literal segments; the first configured among equals).
    fn find(&self, segments: &[&str]) -> Option<&Template> {
        if self.list.is_empty() {
            return None;
        }
        let n = segments.len();
        let literal = self
            .index
            .get(&(n, segments.first().map(|s| (*s).to_string())))
            .map_or(&[][..], Vec::as_slice);
        let placeholder = self.index.get(&(n, None)).map_or(&[][..], Vec::as_slice);
        literal
            .iter()
            .chain(placeholder)
            .map(|i| (*i, &self.list[*i]))
            .filter(|(_, t)| t.matches(segments))
            .max_by(|(i, a), (j, b)| a.literals().cmp(&b.literals()).then(j.cmp(i)))
            .map(|(_, t)| t)
    }

    /// The endpoint of a request, as [`endpoint`] names it, with these templates.
    pub fn endpoint(&self, method: &str, path_and_query: &str) -> String {
        let path = path_of(path_and_query);
        // The proxy names every request's route: with no templates, the
        // segments are not gathered first (an allocation a request).
        if self.list.is_empty() {
            return automatic(method, path);
        }
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match self.find(&segments) {
            Some(t) => format!("{method} {}", t.source),
            None => automatic(method, path),
        }
    }
}

impl FromIterator<Template> for Templates {
    fn from_iter<I: IntoIterator<Item = Template>>(iter: I) -> Templates {
        let mut all = Templates::default();
        for t in iter {
            all.push(t);
        }
        all
    }
}

fn looks_like_id(seg: &str) -> bool {
    let b = seg.as_bytes();
    if b.is_empty() {
        return false;
    }
    if b.iter().all(u8::is_ascii_digit) {
        return true;
    }
    let hex = b.len() >= 16 && b.iter().all(u8::is_ascii_hexdigit);
    let uuid = || {
        b.len() == 36
            && b.iter().enumerate().all(|(i, c)| {
                if matches!(i, 8 | 13 | 18 | 23) {
                    *c == b'-'
                } else {
                    c.is_ascii_hexdigit()
                }
            })
    };
    hex || uuid()
}

/// The path of a request target, without its query string. The search is a
/// plain pass over the bytes: targets are short, and a `memchr` call costs
/// more than it saves on them.
fn path_of(path_and_query: &str) -> &str {
    match path_and_query.bytes().position(|b| b == b'?') {
        // `?` is ASCII, so the cut is at a character boundary.
        Some(end) => &path_and_query[..end],
        None => path_and_query,
    }
}

/// The endpoint of a request: method and route template, such as
/// `GET /homes/{id}/photos`. The query string is not part of it. Of the
/// configured templates that match, the most specific names it.
pub fn endpoint(method: &str, path_and_query: &str, templates: &[Template]) -> String {
    let path = path_of(path_and_query);
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let best = templates
        .iter()
        .enumerate()
        .filter(|(_, t)| t.matches(&segments))
        .max_by(|(i, a), (j, b)| a.literals().cmp(&b.literals()).then(j.cmp(i)));
    if let Some((_, t)) = best {
        return format!("{method} {}", t.source);
    }
    automatic(method, path)
}

/// The endpoint no configured template names: identifiers become `{id}`.
/// The segments are cut from the path in one pass over its bytes, each at a
/// `/` (ASCII, so at a character boundary).
fn automatic(method: &str, path: &str) -> String {
    // Room for a few identifiers made longer by `{id}`, so that the name is
    // written into one allocation.
    let mut out = String::with_capacity(method.len() + 1 + path.len() + 8);
    out.push_str(method);
    out.push(' ');
    let rest = path.trim_start_matches('/');
    let mut start = 0;
    for end in rest
        .bytes()
        .enumerate()
        .filter_map(|(i, b)| (b == b'/').then_some(i))
        .chain(std::iter::once(rest.len()))
    {
        let seg = &rest[start..end];
        out.push('/');
        out.push_str(if looks_like_id(seg) { "{id}" } else { seg });
        start = end + 1;
    }
    out
}
