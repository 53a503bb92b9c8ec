//! Comparing two HTTP responses to the same request, one from each backend.
//!
//! [`compare`] takes two [`Response`]s and a [`Rules`] set and returns the list of
//! [`Difference`]s: status, selected headers, and the body, compared structurally
//! when both bodies are JSON, as text when they are text, and by hash otherwise.
//! Every difference carries a redacted [`Sample`] of each side (a type and a short
//! hash), never the value itself unless the caller asks for it.
//!
//! The first response is always legacy's and the second new's, whichever served
//! the client: a difference is then judged from the point of view of a client of
//! the legacy contract ([`Compat`]), and something only new's answer has is
//! *additive*, not a break. [`class`] groups differences into classes that
//! operators resolve or accept.
//!
//! [`noise`] learns which paths differ between two answers of the *same* backend,
//! so that a timestamp that changes on every call is not reported as a mismatch;
//! [`endpoint`] groups concrete paths into route templates. Nothing here does IO or
//! reads a clock.

pub mod class;
pub mod endpoint;
mod json;
pub mod noise;
mod path;

use std::fmt;

pub use crate::path::PathPattern;

/// One side of a comparison.
#[derive(Debug, Clone, Default)]
pub struct Response<'a> {
    pub status: u16,
    /// Header names in lowercase.
    pub headers: Vec<(&'a str, &'a str)>,
    pub body: &'a [u8],
}

impl Response<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
    }
}

/// How to compare responses of one route.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Headers compared (lowercase). Hop-by-hop headers, `date` and `server` are
    /// never compared, whatever this says.
    pub headers: Vec<String>,
    /// JSON paths whose values are not compared (`$.items[*].updated_at`).
    pub ignore: Vec<PathPattern>,
    /// JSON arrays compared as multisets, order ignored.
    pub unordered: Vec<PathPattern>,
    /// JSON arrays of objects matched element by element on a key field.
    pub match_by_key: Vec<(PathPattern, String)>,
    /// Two numbers closer than this are equal.
    pub numeric_tolerance: f64,
    /// Treat an object member that is `null` on one side and absent on the other
    /// as equal.
    pub null_equals_missing: bool,
    /// Stop after this many differences; the result says it was cut.
    pub max_differences: usize,
    /// Include the actual values in samples (capped at `reveal_bytes`), instead of
    /// a type and a hash.
    pub reveal: bool,
    pub reveal_bytes: usize,
    /// JSON arrays to which new may append elements without breaking a client
    /// (a feed, a list of links); elsewhere an extra element is breaking.
    pub open_arrays: Vec<PathPattern>,
    /// Every difference is breaking, additive ones too (`additive = "mismatch"`):
    /// for a route whose clients cannot take a member they do not know.
    pub additive_is_mismatch: bool,
}

impl Default for Rules {
    fn default() -> Rules {
        Rules {
            headers: vec!["content-type".into(), "location".into()],
            ignore: Vec::new(),
            unordered: Vec::new(),
            match_by_key: Vec::new(),
            numeric_tolerance: 0.0,
            null_equals_missing: false,
            max_differences: 50,
            reveal: false,
            reveal_bytes: 256,
            open_arrays: Vec::new(),
            additive_is_mismatch: false,
        }
    }
}

/// What differs.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The status codes differ.
    Status,
    /// A compared header differs or is present on one side only.
    Header,
    /// Present in the first response, absent from the second.
    Missing,
    /// Absent from the first response, present in the second.
    Extra,
    /// Both present, of different JSON types (or one body is JSON and the other not).
    Type,
    /// Both present, same type, different values.
    Value,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Kind::Status => "status",
            Kind::Header => "header",
            Kind::Missing => "missing",
            Kind::Extra => "extra",
            Kind::Type => "type",
            Kind::Value => "value",
        };
        f.pad(s)
    }
}

impl Kind {
    pub fn parse(raw: &str) -> Option<Kind> {
        Some(match raw {
            "status" => Kind::Status,
            "header" => Kind::Header,
            "missing" => Kind::Missing,
            "extra" => Kind::Extra,
            "type" => Kind::Type,
            "value" => Kind::Value,
            _ => return None,
        })
    }
}

/// How a difference looks to a client written against the legacy contract.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Compat {
    /// The client may read something else than before: a member or element gone, a
    /// value, type, status or compared header changed, an element added to a
    /// closed array. It counts against readiness.
    #[default]
    Breaking,
    /// New's answer has something legacy's never had, where a client that does not
    /// know it is unaffected. It is shown, never counted.
    Additive,
}

impl Compat {
    pub fn as_str(self) -> &'static str {
        match self {
            Compat::Breaking => "breaking",
            Compat::Additive => "additive",
        }
    }

    pub fn parse(raw: &str) -> Option<Compat> {
        match raw {
            "breaking" => Some(Compat::Breaking),
            "additive" => Some(Compat::Additive),
            _ => None,
        }
    }
}

impl fmt::Display for Compat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A redacted view of one side's value: its type, its size, a short hash, and the
/// value itself only when revealing was asked for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    #[serde(rename = "type")]
    pub kind: String,
    pub len: usize,
    pub hash: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub value: Option<String>,
}

impl fmt::Display for Sample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{v}"),
            None => write!(f, "<{} len={} #{}>", self.kind, self.len, self.hash),
        }
    }
}

/// One difference between the two responses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Difference {
    /// `status`, `header:content-type`, `$` for a whole body, or a JSON path such
    /// as `$.items[3].price`.
    pub path: String,
    pub kind: Kind,
    /// Samples written before compatibility classes read as breaking, which is
    /// what every difference counted as then.
    #[serde(default)]
    pub compat: Compat,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub left: Option<Sample>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub right: Option<Sample>,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = |s: &Option<Sample>| {
            s.as_ref()
                .map_or("(absent)".to_string(), ToString::to_string)
        };
        write!(
            f,
            "{:<7} {}: {} → {}{}",
            self.kind,
            self.path,
            side(&self.left),
            side(&self.right),
            if self.compat == Compat::Additive {
                " (additive)"
            } else {
                ""
            }
        )
    }
}

/// The outcome of one comparison.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub differences: Vec<Difference>,
    /// The comparison stopped at `max_differences`; more may exist.
    pub truncated: bool,
    /// A body claimed to be JSON but did not parse (too deep, invalid); it was
    /// compared as bytes instead. The text says why.
    pub note: Option<String>,
}

impl Outcome {
    pub fn is_match(&self) -> bool {
        self.differences.is_empty()
    }
}

/// Headers that describe a connection or a server, not the answer.
const NEVER_COMPARED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "date",
    "server",
    "via",
    "x-request-id",
    "content-length",
];

/// Compares `left`, legacy's answer, with `right`, new's (whichever of them the
/// client got): [`Kind::Extra`] is then always something only new has.
pub fn compare(left: &Response<'_>, right: &Response<'_>, rules: &Rules) -> Outcome {
    let mut out = Collector::new(rules);
    if left.status != right.status {
        out.push(Difference {
            path: "status".into(),
            kind: Kind::Status,
            compat: Compat::Breaking,
            left: Some(sample_text("status", &left.status.to_string(), true, rules)),
            right: Some(sample_text(
                "status",
                &right.status.to_string(),
                true,
                rules,
            )),
        });
    }
    for name in &rules.headers {
        if NEVER_COMPARED.contains(&name.as_str()) {
            continue;
        }
        let (a, b) = (left.header(name), right.header(name));
        if a != b {
            out.push(Difference {
                path: format!("header:{name}"),
                kind: Kind::Header,
                compat: Compat::Breaking,
                left: a.map(|v| sample_text("header", v, false, rules)),
                right: b.map(|v| sample_text("header", v, false, rules)),
            });
        }
    }
    compare_bodies(left, right, rules, &mut out);
    out.finish()
}

fn is_json(r: &Response<'_>) -> bool {
    r.header("content-type").is_some_and(|ct| {
        let ct = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        ct == "application/json" || ct.ends_with("+json")
    })
}

fn is_text(r: &Response<'_>) -> bool {
    r.header("content-type")
        .is_some_and(|ct| ct.trim_start().to_ascii_lowercase().starts_with("text/"))
}

fn compare_bodies(
    left: &Response<'_>,
    right: &Response<'_>,
    rules: &Rules,
    out: &mut Collector<'_>,
) {
    if left.body == right.body {
        return;
    }
    if is_json(left) && is_json(right) {
        match (json::parse(left.body), json::parse(right.body)) {
            (Ok(a), Ok(b)) => {
                json::diff(&a, &b, out);
                return;
            }
            (a, b) => {
                let why = a.err().or(b.err()).unwrap_or_default();
                out.note = Some(format!(
                    "a body declared as JSON was compared as bytes: {why}"
                ));
            }
        }
    }
    let (kind_l, kind_r) = if is_text(left) && is_text(right) {
        ("text", "text")
    } else {
        ("bytes", "bytes")
    };
    out.push(Difference {
        path: "$".into(),
        kind: Kind::Value,
        compat: Compat::Breaking,
        left: Some(sample_bytes(kind_l, left.body, rules)),
        right: Some(sample_bytes(kind_r, right.body, rules)),
    });
}

/// Accumulates differences up to the cap.
pub(crate) struct Collector<'r> {
    pub(crate) rules: &'r Rules,
    differences: Vec<Difference>,
    /// Breaking and additive differences are capped apart: additive ones never
    /// count against readiness, so they must not crowd out a breaking one that
    /// comes later in the document (regression: 50 elements that each grew a
    /// member hid a wrong total after them).
    breaking: usize,
    additive: usize,
    truncated: bool,
    note: Option<String>,
}

impl<'r> Collector<'r> {
    fn new(rules: &'r Rules) -> Collector<'r> {
        Collector {
            rules,
            differences: Vec::new(),
            breaking: 0,
            additive: 0,
            truncated: false,
            note: None,
        }
    }

    /// The walk stops once the breaking differences reach the cap.
    pub(crate) fn full(&self) -> bool {
        self.breaking >= self.rules.max_differences
    }

    /// Notes that the walk stopped before the end because the list is full.
    pub(crate) fn stop(&mut self) {
        self.truncated = true;
    }

    pub(crate) fn push(&mut self, d: Difference) {
        let count = match d.compat {
            Compat::Breaking => &mut self.breaking,
            Compat::Additive => &mut self.additive,
        };
        if *count >= self.rules.max_differences {
            self.truncated = true;
        } else {
            *count += 1;
            self.differences.push(d);
        }
    }

    fn finish(self) -> Outcome {
        Outcome {
            differences: self.differences,
            truncated: self.truncated,
            note: self.note,
        }
    }
}

/// FNV-1a, 64 bits: stable across builds and machines, unlike std's hasher.
pub(crate) fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A short, stable fingerprint for samples. Not cryptographic; it only lets an
/// operator see that two samples are the same value.
pub fn fingerprint(bytes: &[u8]) -> String {
    let h = fnv64(bytes);
    format!("{:08x}", (h >> 32) as u32 ^ h as u32)
}

fn reveal(bytes: &[u8], rules: &Rules) -> String {
    let cut = &bytes[..bytes.len().min(rules.reveal_bytes)];
    let mut s = String::from_utf8_lossy(cut).into_owned();
    if bytes.len() > rules.reveal_bytes {
        s.push('…');
    }
    s
}

fn sample_bytes(kind: &str, bytes: &[u8], rules: &Rules) -> Sample {
    Sample {
        kind: kind.into(),
        len: bytes.len(),
        hash: fingerprint(bytes),
        value: rules.reveal.then(|| reveal(bytes, rules)),
    }
}

/// A sample of a short string; `always` shows the value even without revealing
/// (status codes carry no user data).
fn sample_text(kind: &str, value: &str, always: bool, rules: &Rules) -> Sample {
    Sample {
        kind: kind.into(),
        len: value.len(),
        hash: fingerprint(value.as_bytes()),
        value: (always || rules.reveal).then(|| reveal(value.as_bytes(), rules)),
    }
}
