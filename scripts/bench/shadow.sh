#!/usr/bin/env bash
# The cost of the parallel run to clients: the same fixed-rate load through Ficus
# for a tenant on legacy (no shadow), in shadow with a new backend as fast as
# legacy, and in shadow with a new backend 10x slower; client latency ratios to the
# legacy run, and how many shadow reads were shed.
#   scripts/bench/shadow.sh [seconds per run, default 15] [rate, default 1000]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
secs="${1:-15}"
rate="${2:-1000}"
# pingora's zlib-ng build needs cmake.
command -v cmake >/dev/null 2>&1 || { s=""; [ "$(id -u)" -ne 0 ] && s=sudo; $s apt-get update -qq && DEBIAN_FRONTEND=noninteractive $s apt-get install -y -qq cmake; }
cargo build --release --locked -p ficus -p ficus-bench >/dev/null 2>&1 || cargo build --release --locked -p ficus -p ficus-bench
ficus="$PWD/target/release/ficus"
bench="$PWD/target/release/ficus-bench"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# Legacy answers in 2 ms; "new" in 2 ms; "new-slow" in 20 ms (10x legacy).
"$bench" backend 127.0.0.1:18101 --delay-ms 2 --name legacy & pids+=($!)
"$bench" backend 127.0.0.1:18102 --delay-ms 2 --name new & pids+=($!)
"$bench" backend 127.0.0.1:18103 --delay-ms 20 --name new & pids+=($!)

run() { # label stage new-port
  local dir="$work/$1"; mkdir -p "$dir"
  local store="sqlite:$dir/ficus.db"
  FICUS_STORE="$store" "$ficus" init >/dev/null
  FICUS_STORE="$store" "$ficus" tenant add acme --stage "$2" >/dev/null
  cat > "$dir/ficus.toml" <<CONF
[proxy]
listen = ["127.0.0.1:18110"]
admin_listen = "127.0.0.1:18111"
drain_delay_ms = 0 # no load balancer in front: stop at once
store = "$store"
threads = 1
[backends.legacy]
upstreams = ["127.0.0.1:18101"]
[backends.new]
upstreams = ["127.0.0.1:18102"]
[[tenant_from]]
header = "X-Tenant-Id"
[shadow]
flush_ms = 500
timeout_ms = 2000
max_in_flight = 64
CONF
  sed -i "s/127.0.0.1:18102/127.0.0.1:$3/" "$dir/ficus.toml"
  RUST_LOG=warn "$ficus" proxy --config "$dir/ficus.toml" 2>"$dir/proxy.log" & local pid=$!
  for _ in $(seq 1 100); do curl -sf http://127.0.0.1:18111/readyz >/dev/null && break; sleep 0.1; done
  "$bench" rate http://127.0.0.1:18110/homes/1 --rps "$rate" --secs 3 --header "X-Tenant-Id: acme" >/dev/null   # warm-up
  local result; result=$("$bench" rate http://127.0.0.1:18110/homes/1 --rps "$rate" --secs "$secs" --header "X-Tenant-Id: acme")
  sleep 1
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  local shown; shown=$(FICUS_STORE="$store" "$ficus" tenant show acme --json)
  python3 - "$1" "$result" "$shown" <<'PY'
import json, sys
label, result, shown = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])["comparisons"]
print(json.dumps({"label": label, **result, "compared": shown["compared"], "shed": shown["shed"], "shadow_errors": shown["errors"]}))
PY
}
{
  run legacy legacy 18102
  run shadow-equal shadow 18102
  run shadow-new-10x-slower shadow 18103
} > "$work/results.jsonl"
echo "machine: $(nproc) cores; fixed rate ${rate} req/s for ${secs}s; ficus threads = 1; legacy answers in 2 ms"
echo
python3 - "$work/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
base = rows[0]
print("| run | p50 | p99 | p99.9 | p99 vs legacy run | client errors | shadow compared | shed | shadow errors |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['label']} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['p999_ms']:.2f} ms | {r['p99_ms']/base['p99_ms']:.2f}× | {r['errors']} | {r['compared']} | {r['shed']} | {r['shadow_errors']} |")
PY
