//! Structural comparison of two JSON documents under [`Rules`].
//!
//! Parsing goes through serde_json, whose recursion limit (128) turns a hostile
//! document nested 100,000 levels deep into an error instead of a stack overflow;
//! the comparison itself recurses at most as deep as the parsed documents.

use std::collections::HashMap;

use serde_json::Value;

use crate::path::{Seg, render};
use crate::{Collector, Compat, Difference, Kind, Rules, Sample, fingerprint};

pub(crate) fn parse(body: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A serialization with object members sorted, so equal values hash equally
/// whatever their member order.
pub(crate) fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn canonical_string(v: &Value) -> String {
    let mut s = String::new();
    canonical(v, &mut s);
    s
}

fn sample(v: &Value, rules: &Rules) -> Sample {
    let text = canonical_string(v);
    Sample {
        kind: type_name(v).into(),
        len: text.len(),
        hash: fingerprint(text.as_bytes()),
        value: rules.reveal.then(|| {
            let mut s: String = text.chars().take(rules.reveal_bytes).collect();
            if text.len() > s.len() {
                s.push('…');
            }
            s
        }),
    }
}

pub(crate) fn diff(a: &Value, b: &Value, out: &mut Collector<'_>) {
    walk(a, b, &mut Vec::new(), out);
}

fn ignored(path: &[Seg<'_>], rules: &Rules) -> bool {
    rules.ignore.iter().any(|p| p.matches(path))
}

/// How a client of the legacy contract sees a difference. Only something new's
/// answer has and legacy's lacks can be additive: an object member always is, an
/// array element only when the rules say the array is open (a client may count the
/// elements or show them all), and nothing is under `additive = "mismatch"`.
fn compat(path: &[Seg<'_>], kind: Kind, rules: &Rules) -> Compat {
    if kind != Kind::Extra || rules.additive_is_mismatch {
        return Compat::Breaking;
    }
    match path.split_last() {
        Some((Seg::Key(_), _)) => Compat::Additive,
        Some((Seg::Index(_), array)) if rules.open_arrays.iter().any(|p| p.matches(array)) => {
            Compat::Additive
        }
        _ => Compat::Breaking,
    }
}

fn push(
    out: &mut Collector<'_>,
    path: &[Seg<'_>],
    kind: Kind,
    a: Option<&Value>,
    b: Option<&Value>,
) {
    let rules = out.rules;
    out.push(Difference {
        path: render(path),
        kind,
        compat: compat(path, kind, rules),
        left: a.map(|v| sample(v, rules)),
        right: b.map(|v| sample(v, rules)),
    });
}

fn numbers_equal(a: &serde_json::Number, b: &serde_json::Number, tolerance: f64) -> bool {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        return x == y || (tolerance > 0.0 && (x as f64 - y as f64).abs() <= tolerance);
    }
    if let (Some(x), Some(y)) = (a.as_u64(), b.as_u64()) {
        return x == y || (tolerance > 0.0 && (x as f64 - y as f64).abs() <= tolerance);
    }
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y || (x - y).abs() <= tolerance,
        _ => a == b,
    }
}

fn walk<'v>(a: &'v Value, b: &'v Value, path: &mut Vec<Seg<'v>>, out: &mut Collector<'_>) {
    if out.full() {
        out.stop();
        return;
    }
    if ignored(path, out.rules) {
        return;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y))
            if x.len() == y.len() && x.keys().zip(y.keys()).all(|(a, b)| a == b) =>
        {
            // The common case, two answers of one contract: the same members in
            // the same order. Walked pairwise, without a lookup per member.
            for ((k, va), vb) in x.iter().zip(y.values()) {
                path.push(Seg::Key(k));
                walk(va, vb, path, out);
                path.pop();
            }
        }
        (Value::Object(x), Value::Object(y)) => {
            for (k, va) in x {
                path.push(Seg::Key(k));
                match y.get(k) {
                    Some(vb) => walk(va, vb, path, out),
                    None if va.is_null() && out.rules.null_equals_missing => {}
                    None if !ignored(path, out.rules) => {
                        push(out, path, Kind::Missing, Some(va), None)
                    }
                    None => {}
                }
                path.pop();
            }
            for (k, vb) in y {
                if x.contains_key(k) {
                    continue;
                }
                path.push(Seg::Key(k));
                let skip =
                    (vb.is_null() && out.rules.null_equals_missing) || ignored(path, out.rules);
                if !skip {
                    push(out, path, Kind::Extra, None, Some(vb));
                }
                path.pop();
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            let rules = out.rules;
            if let Some((_, key)) = rules.match_by_key.iter().find(|(p, _)| p.matches(path)) {
                arrays_by_key(x, y, key, path, out);
            } else if rules.unordered.iter().any(|p| p.matches(path)) {
                arrays_unordered(x, y, path, out);
            } else {
                for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                    path.push(Seg::Index(i));
                    walk(va, vb, path, out);
                    path.pop();
                }
                for (i, va) in x.iter().enumerate().skip(y.len()) {
                    path.push(Seg::Index(i));
                    push(out, path, Kind::Missing, Some(va), None);
                    path.pop();
                }
                for (i, vb) in y.iter().enumerate().skip(x.len()) {
                    path.push(Seg::Index(i));
                    push(out, path, Kind::Extra, None, Some(vb));
                    path.pop();
                }
            }
        }
        (Value::Number(x), Value::Number(y)) => {
            if !numbers_equal(x, y, out.rules.numeric_tolerance) {
                push(out, path, Kind::Value, Some(a), Some(b));
            }
        }
        (Value::String(x), Value::String(y)) if x != y => {
            push(out, path, Kind::Value, Some(a), Some(b))
        }
        (Value::Bool(x), Value::Bool(y)) if x != y => {
            push(out, path, Kind::Value, Some(a), Some(b))
        }
        (Value::String(_), Value::String(_))
        | (Value::Bool(_), Value::Bool(_))
        | (Value::Null, Value::Null) => {}
        _ => push(out, path, Kind::Type, Some(a), Some(b)),
    }
}

/// Arrays compared as multisets: an element counts as matched when an equal one
/// (canonically) exists on the other side.
fn arrays_unordered<'v>(
    x: &'v [Value],
    y: &'v [Value],
    path: &mut Vec<Seg<'v>>,
    out: &mut Collector<'_>,
) {
    let mut right: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, v) in y.iter().enumerate() {
        right.entry(canonical_string(v)).or_default().push(i);
    }
    for (i, v) in x.iter().enumerate() {
        match right
            .get_mut(&canonical_string(v))
            .and_then(|slots| slots.pop())
        {
            Some(_) => {}
            None => {
                path.push(Seg::Index(i));
                push(out, path, Kind::Missing, Some(v), None);
                path.pop();
            }
        }
    }
    let mut leftover: Vec<usize> = right.into_values().flatten().collect();
    leftover.sort_unstable();
    for i in leftover {
        path.push(Seg::Index(i));
        push(out, path, Kind::Extra, None, Some(&y[i]));
        path.pop();
    }
}

/// Arrays of objects matched on a key member; matched pairs are compared member
/// by member under the left element's index.
fn arrays_by_key<'v>(
    x: &'v [Value],
    y: &'v [Value],
    key: &str,
    path: &mut Vec<Seg<'v>>,
    out: &mut Collector<'_>,
) {
    let key_of = |v: &Value| v.get(key).map(canonical_string);
    let mut right: HashMap<String, usize> = HashMap::new();
    let mut unkeyed = Vec::new();
    for (i, v) in y.iter().enumerate() {
        match key_of(v) {
            Some(k) => {
                right.insert(k, i);
            }
            None => unkeyed.push(i),
        }
    }
    for (i, v) in x.iter().enumerate() {
        path.push(Seg::Index(i));
        match key_of(v).and_then(|k| right.remove(&k)) {
            Some(j) => walk(v, &y[j], path, out),
            None => push(out, path, Kind::Missing, Some(v), None),
        }
        path.pop();
    }
    let mut leftover: Vec<usize> = right.into_values().chain(unkeyed).collect();
    leftover.sort_unstable();
    for j in leftover {
        path.push(Seg::Index(j));
        push(out, path, Kind::Extra, None, Some(&y[j]));
        path.pop();
    }
}
