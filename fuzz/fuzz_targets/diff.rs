//! Fuzzes `ficus-diff`: any two bodies, under any content type and rule set, must
//! give an answer, never a panic, a hang or a stack overflow.

#![no_main]

use ficus_diff::{PathPattern, Response, Rules, compare};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (control, rest) = data.split_at(2);
    let split = rest.len() * usize::from(control[0]) / 255;
    let (left, right) = rest.split_at(split.min(rest.len()));
    let content_type = match control[1] % 3 {
        0 => "application/json",
        1 => "text/plain",
        _ => "application/octet-stream",
    };
    let rules = Rules {
        ignore: PathPattern::parse(&String::from_utf8_lossy(&left[..left.len().min(24)])).into_iter().collect(),
        unordered: vec![PathPattern::parse("$.items").unwrap(), PathPattern::parse("$[*]").unwrap()],
        match_by_key: vec![(PathPattern::parse("$").unwrap(), "id".into())],
        numeric_tolerance: f64::from(control[1]) / 100.0,
        null_equals_missing: control[1] & 1 == 1,
        reveal: control[0] & 1 == 1,
        ..Rules::default()
    };
    let a = Response { status: 200, headers: vec![("content-type", content_type)], body: left };
    let b = Response { status: 200 + u16::from(control[0] % 2), headers: vec![("content-type", content_type)], body: right };
    let outcome = compare(&a, &b, &rules);
    assert!(outcome.differences.len() <= rules.max_differences);
    let _ = ficus_diff::endpoint::endpoint("GET", &String::from_utf8_lossy(right), &[]);
});
