#!/usr/bin/env bash
# ficus-diff throughput (criterion) on 1 KB, 100 KB and 5 MB JSON pairs, equal,
# differing in one value and grown by a member per element (additive), each
# compared and classified as the proxy does, as MB/s of input (both documents) and as a ratio to serde_json parsing
# the same two documents, measured in the same run.
#   scripts/bench/diff.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
cargo bench --locked -p ficus-diff --bench diff -- --noplot >/dev/null
python3 - <<'PY'
import json, os
root = "target/criterion"
def mean_ns(group, fn, param):
    path = os.path.join(root, group.replace("/", "_"), fn, param, "new", "estimates.json")
    with open(path) as f:
        return json.load(f)["mean"]["point_estimate"]
print("| pair | input | compare equal | compare different | compare additive | serde_json parse of both | equal / parse | different / parse | additive / parse |")
print("|---|---|---|---|---|---|---|---|---|")
for label, size in [("1KB", 1024), ("100KB", 100 * 1024), ("5MB", 5 * 1024 * 1024)]:
    g = f"diff/{label}"
    bench = os.path.join(root, g.replace("/", "_"), "compare", "equal", "new", "benchmark.json")
    with open(bench) as f:
        b = json.load(f)
    nbytes = b["throughput"]["Bytes"]
    eq, df, ad, parse = (mean_ns(g, "compare", "equal"), mean_ns(g, "compare", "different"),
                         mean_ns(g, "compare", "additive"), mean_ns(g, "serde_json_parse", "both"))
    mbps = lambda ns: nbytes / (ns / 1e9) / 1e6
    print(f"| {label} | {nbytes/1e3:,.1f} kB | {mbps(eq):,.0f} MB/s | {mbps(df):,.0f} MB/s | {mbps(ad):,.0f} MB/s | {mbps(parse):,.0f} MB/s | {parse/eq:.2f}× | {parse/df:.2f}× | {parse/ad:.2f}× |")
PY
