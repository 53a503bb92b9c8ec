//! JSON paths (`$.items[3].price`) as the diff builds them, and path patterns
//! (`$.items[*].updated_at`) as rules name them.

use std::fmt::Write as _;

/// One step into a JSON document. A key borrows the document's own member
/// name: the walk visits every member of both documents, and cloning each name
/// was the largest cost of comparing two equal documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// Renders a path: `$`, `$.a.b`, `$.items[3]`, `$["odd key"]`.
pub(crate) fn render(path: &[Seg<'_>]) -> String {
    let mut out = String::from("$");
    for seg in path {
        match seg {
            Seg::Key(k) if is_plain(k) => {
                let _ = write!(out, ".{k}");
            }
            Seg::Key(k) => {
                let _ = write!(out, "[{}]", serde_json::Value::String((*k).to_string()));
            }
            Seg::Index(i) => {
                let _ = write!(out, "[{i}]");
            }
        }
    }
    out
}

fn is_plain(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pat {
    Key(String),
    AnyKey,
    Index(usize),
    AnyIndex,
}

/// A path with wildcards: `*` for any member name, `[*]` for any array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    segs: Vec<Pat>,
    source: String,
}

impl PathPattern {
    /// Parses `$.items[*].updated_at`, `$.meta.*`, `$["odd key"][0]`.
    pub fn parse(raw: &str) -> Result<PathPattern, String> {
        let bad = |why: &str| format!("invalid JSON path {raw:?}: {why}");
        let rest = raw
            .strip_prefix('$')
            .ok_or_else(|| bad("it must start with '$'"))?;
        let mut segs = Vec::new();
        let mut chars = rest.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '.' => {
                    let start = at + 1;
                    let mut end = rest.len();
                    while let Some(&(i, c)) = chars.peek() {
                        if c == '.' || c == '[' {
                            end = i;
                            break;
                        }
                        chars.next();
                    }
                    let name = &rest[start..end];
                    match name {
                        "" => return Err(bad("empty member name")),
                        "*" => segs.push(Pat::AnyKey),
                        n => segs.push(Pat::Key(n.to_string())),
                    }
                }
                '[' => {
                    let close = rest[at..].find(']').ok_or_else(|| bad("unclosed '['"))? + at;
                    let inner = &rest[at + 1..close];
                    if inner == "*" {
                        segs.push(Pat::AnyIndex);
                    } else if let Ok(i) = inner.parse::<usize>() {
                        segs.push(Pat::Index(i));
                    } else if inner.starts_with('"') {
                        let key: String = serde_json::from_str(inner)
                            .map_err(|_| bad("invalid quoted member name"))?;
                        segs.push(Pat::Key(key));
                    } else {
                        return Err(bad("an index must be a number, * or a quoted name"));
                    }
                    while chars.peek().is_some_and(|&(i, _)| i <= close) {
                        chars.next();
                    }
                }
                _ => return Err(bad("expected '.' or '['")),
            }
        }
        Ok(PathPattern {
            segs,
            source: raw.to_string(),
        })
    }

    pub(crate) fn matches(&self, path: &[Seg<'_>]) -> bool {
        self.segs.len() == path.len()
            && self.segs.iter().zip(path).all(|(p, s)| match (p, s) {
                (Pat::AnyKey, Seg::Key(_)) | (Pat::AnyIndex, Seg::Index(_)) => true,
                (Pat::Key(a), Seg::Key(b)) => a == b,
                (Pat::Index(a), Seg::Index(b)) => a == b,
                _ => false,
            })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

/// `$.items[3].price` → `$.items[*].price`: the shape noise is learned under, so
/// that a timestamp in every element is one noise path, not one per index.
pub fn generalize(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut chars = path.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '[' && chars.peek().is_some_and(char::is_ascii_digit) {
            while chars.peek().is_some_and(char::is_ascii_digit) {
                chars.next();
            }
            out.push('*');
        }
    }
    out
}
