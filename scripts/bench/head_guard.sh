#!/usr/bin/env bash
# What the raw-head checks of a data plane on hyper cost (issue 22): the Framer
# that follows a client's byte stream and judges each head, against httparse
# parsing the same heads once (what hyper itself spends on them), in the same
# run; ns per request and the ratio.
#   scripts/bench/head_guard.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
cargo bench --locked -p ficus-proxy --bench head_guard -- --noplot >/dev/null
python3 - <<'PY'
import json, os
root = "target/criterion"
def mean_ns(group, fn):
    with open(os.path.join(root, group.replace("/", "_"), fn, "new", "estimates.json")) as f:
        return json.load(f)["mean"]["point_estimate"]
print("| stream | requests | httparse, per request | framer, per request | framer / httparse |")
print("|---|---|---|---|---|")
for name, n in [("get", 1), ("get_x10", 10), ("post_chunked_1k_x10", 10)]:
    g = f"head_guard/{name}"
    p, f = mean_ns(g, "httparse") / n, mean_ns(g, "framer") / n
    print(f"| {name} | {n} | {p:,.0f} ns | {f:,.0f} ns | {f/p:.2f}× |")
PY
