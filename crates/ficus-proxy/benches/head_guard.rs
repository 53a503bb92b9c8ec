//! What the raw-head checks of a data plane on hyper cost per request: the
//! `Framer` fed a client's bytes (following the messages, judging each head,
//! queuing its verdict) next to httparse parsing the same heads once, which is
//! what hyper itself spends on them (the peer). Streams: one browser-like GET,
//! a keep-alive connection of ten such GETs, and ten chunked POSTs of 1 KiB.
//! `scripts/bench/head_guard.sh` turns criterion's estimates into ns per
//! request and the ratio to the peer for BENCHMARKS.md.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use ficus_proxy::head_guard::Framer;

const GET: &str = "GET /api/homes?city=lisbon&page=2 HTTP/1.1\r\nHost: acme.portal.test\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36\r\n\
Accept: application/json\r\nAccept-Language: en-GB,en;q=0.9\r\nAccept-Encoding: gzip, deflate, br\r\n\
Cookie: session=4f1c9a7e2b; theme=dark\r\nX-Request-Id: 7d2f0c1e9a8b4c3d\r\nConnection: keep-alive\r\n\r\n";

fn post_chunked() -> String {
    let body = "x".repeat(1024);
    format!(
        "POST /api/homes HTTP/1.1\r\nHost: acme.portal.test\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nX-Request-Id: 7d2f0c1e9a8b4c3d\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    )
}

/// Parses each head of `heads` once with httparse, as hyper does.
fn parse_heads(heads: &[&[u8]]) -> usize {
    let mut n = 0;
    for head in heads {
        let mut headers = [httparse::EMPTY_HEADER; 100];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(len)) = req.parse(head) {
            n += len;
        }
    }
    n
}

fn frame(stream: &[u8], requests: usize) -> usize {
    let mut framer = Framer::new(400 * 1024, 100);
    framer.feed(stream);
    let mut n = 0;
    while framer.next_verdict().is_some() {
        n += 1;
    }
    assert_eq!(n, requests);
    n
}

fn bench(c: &mut Criterion) {
    let post = post_chunked();
    let post_head_len = post.find("\r\n\r\n").map_or(0, |i| i + 4);
    let cases: Vec<(&str, String, Vec<&[u8]>, usize)> = vec![
        ("get", GET.to_string(), vec![GET.as_bytes()], 1),
        ("get_x10", GET.repeat(10), vec![GET.as_bytes(); 10], 10),
        (
            "post_chunked_1k_x10",
            post.repeat(10),
            vec![&post.as_bytes()[..post_head_len]; 10],
            10,
        ),
    ];
    for (name, stream, heads, requests) in &cases {
        let mut g = c.benchmark_group(format!("head_guard/{name}"));
        g.bench_function("httparse", |b| b.iter(|| parse_heads(black_box(heads))));
        g.bench_function("framer", |b| {
            b.iter(|| frame(black_box(stream.as_bytes()), *requests))
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
