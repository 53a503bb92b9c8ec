//! `ficus-diff` throughput on JSON pairs of 1 KB, 100 KB and 5 MB, equal,
//! differing in one field, and with a member only new has in every element, next
//! to serde_json parsing the same two documents (the floor any structural
//! comparison pays). Each comparison is classified the way the proxy does it
//! (breaking, additive, accepted against a set of accepted classes). The "equal" pair differs only in
//! whitespace: byte-identical bodies are answered by a memcmp and would say nothing. `scripts/bench/diff.sh` turns criterion's
//! estimates into MB/s and ratios for BENCHMARKS.md.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ficus_diff::class::{Accepted, ClassKey, classify};
use ficus_diff::{Kind, Response, Rules, compare};

/// A homes listing of roughly `bytes` bytes, like a real API answer.
fn document(bytes: usize, price_of_last: u32) -> String {
    let mut items = Vec::new();
    let mut len = 0;
    let mut i = 0;
    while len < bytes {
        let item = format!(
            r#"{{"id":{i},"title":"Home {i}","city":"Lisbon","price":{},"rooms":{},"tags":["garden","garage"],"agent":{{"name":"Ana","email":"ana@acme.test"}},"updated_at":"2026-11-21T10:00:00Z"}}"#,
            400_000 + i,
            1 + i % 5
        );
        len += item.len() + 1;
        items.push(item);
        i += 1;
    }
    let last = items.len() - 1;
    items[last] = items[last].replacen(
        &format!("\"price\":{}", 400_000 + last),
        &format!("\"price\":{price_of_last}"),
        1,
    );
    format!(
        r#"{{"total":{},"items":[{}]}}"#,
        items.len(),
        items.join(",")
    )
}

fn json(body: &str) -> Response<'_> {
    Response {
        status: 200,
        headers: vec![("content-type", "application/json")],
        body: body.as_bytes(),
    }
}

/// Compares and classifies, as the proxy does for every shadowed read.
fn judged(a: &str, b: &str, rules: &Rules, accepted: &Accepted) -> usize {
    let outcome = compare(&json(a), &json(b), rules);
    let c = classify("GET /homes", outcome.differences, accepted);
    c.breaking.len() + c.additive.len()
}

fn bench(c: &mut Criterion) {
    let rules = Rules::default();
    // A few accepted classes on the endpoint, none of which the pairs hit.
    let accepted = Accepted::new((0..10).map(|i| ClassKey {
        endpoint: "GET /homes".into(),
        path: format!("$.items[*].legacy_field_{i}"),
        kind: Kind::Value,
    }));
    for (label, size) in [
        ("1KB", 1_024),
        ("100KB", 100 * 1024),
        ("5MB", 5 * 1024 * 1024),
    ] {
        let a = document(size, 1);
        // Structurally equal but not byte-identical, so the comparison parses and
        // walks both documents instead of taking the byte-equality shortcut.
        let same = a.replace(",\"", ", \"");
        let other = document(size, 2);
        // New's answer grows a member in every element: additive differences,
        // up to the cap.
        let grown = a.replace("\"rooms\":", "\"energy\":\"A\",\"rooms\":");
        let mut group = c.benchmark_group(format!("diff/{label}"));
        group.throughput(Throughput::Bytes((a.len() * 2) as u64));
        if size > 1_000_000 {
            group.sample_size(10);
        }
        group.bench_function(BenchmarkId::new("compare", "equal"), |b| {
            b.iter(|| judged(&a, &same, &rules, &accepted))
        });
        group.bench_function(BenchmarkId::new("compare", "different"), |b| {
            b.iter(|| judged(&a, &other, &rules, &accepted))
        });
        group.bench_function(BenchmarkId::new("compare", "additive"), |b| {
            b.iter(|| judged(&a, &grown, &rules, &accepted))
        });
        group.bench_function(BenchmarkId::new("serde_json_parse", "both"), |b| {
            b.iter(|| {
                let x: serde_json::Value = serde_json::from_str(&a).unwrap();
                let y: serde_json::Value = serde_json::from_str(&other).unwrap();
                (x, y)
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
