#!/usr/bin/env bash
# The proxy's benchmark: the same small JSON response served directly, through
# nginx, through HAProxy, and through Ficus with 10 and with 100,000 tenants, each
# proxy with one worker thread, measured in one run with wrk (throughput and
# latency under saturation) and with a fixed-rate load (latency at a steady rate).
# Then the time for a stage change to reach a running proxy on a PostgreSQL store.
#   scripts/bench/proxy.sh [seconds per run, default 10] [fixed rate, default 2000]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
secs="${1:-10}"
rate="${2:-2000}"
need=()
for tool in nginx haproxy wrk; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ "${#need[@]}" -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
cargo build --release --locked -p ficus -p ficus-bench >/dev/null 2>&1 || cargo build --release --locked -p ficus -p ficus-bench
ficus="$PWD/target/release/ficus"
bench="$PWD/target/release/ficus-bench"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# The backend: nginx answering a fixed ~100-byte JSON body, two workers so that it
# is not the bottleneck. Port 18001 plays legacy, 18002 new.
cat > "$work/backend.conf" <<CONF
worker_processes 2; daemon off; pid $work/backend.pid; error_log $work/backend.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:18001; location / { default_type application/json; return 200 '{"backend":"legacy","homes":[{"id":1,"city":"Lisbon","price":420000}]}'; } }
  server { listen 127.0.0.1:18002; location / { default_type application/json; return 200 '{"backend":"new","homes":[{"id":1,"city":"Lisbon","price":420000}]}'; } } }
CONF
nginx -c "$work/backend.conf" -p "$work" & pids+=($!)

cat > "$work/proxy.conf" <<CONF
worker_processes 1; daemon off; pid $work/proxy.pid; error_log $work/proxy.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream legacy { server 127.0.0.1:18001; keepalive 256; }
  server { listen 127.0.0.1:18010; location / { proxy_pass http://legacy; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
nginx -c "$work/proxy.conf" -p "$work" & pids+=($!)

cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 8192
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend f
  bind 127.0.0.1:18020
  default_backend b
backend b
  http-reuse always
  server s1 127.0.0.1:18001
CONF
haproxy -f "$work/haproxy.cfg" -db & pids+=($!)

start_ficus() { # port admin tenants
  local dir="$work/ficus-$1"; mkdir -p "$dir"
  local store="sqlite:$dir/ficus.db"
  FICUS_STORE="$store" "$ficus" init >/dev/null
  { echo "id,stage"; for i in $(seq 0 $(( $3 - 1 ))); do echo "t$i,legacy"; done; } > "$dir/tenants.csv"
  FICUS_STORE="$store" "$ficus" tenant import "$dir/tenants.csv" >/dev/null
  cat > "$dir/ficus.toml" <<CONF
[proxy]
listen = ["127.0.0.1:$1"]
admin_listen = "127.0.0.1:$2"
store = "$store"
threads = 1
[backends.legacy]
upstreams = ["127.0.0.1:18001"]
[backends.new]
upstreams = ["127.0.0.1:18002"]
[[tenant_from]]
header = "X-Tenant-Id"
CONF
  RUST_LOG=warn "$ficus" proxy --config "$dir/ficus.toml" 2>"$dir/proxy.log" & pids+=($!)
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$2/readyz" >/dev/null && return; sleep 0.1; done
  echo "ficus on $1 did not become ready" >&2; exit 1
}
# The smallest proxy pingora can be: same framework and version, one thread, no
# filters. Its row separates what pingora costs from what Ficus adds.
"$bench" pingora-floor 127.0.0.1:18050 127.0.0.1:18001 2>"$work/floor.log" & pids+=($!)

start_ficus 18030 18031 10
start_ficus 18040 18041 100000
sleep 1

cat > "$work/report.lua" <<'LUA'
wrk.headers["X-Tenant-Id"] = "t5"
done = function(summary, latency, requests)
  io.write(string.format("RESULT %.0f %.3f %.3f %.3f %d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency:percentile(99.9) / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout))
end
LUA

declare -A url=( [direct]=http://127.0.0.1:18001/homes/1 [nginx]=http://127.0.0.1:18010/homes/1 [haproxy]=http://127.0.0.1:18020/homes/1
                 [pingora-floor]=http://127.0.0.1:18050/homes/1 [ficus-10]=http://127.0.0.1:18030/homes/1 [ficus-100k]=http://127.0.0.1:18040/homes/1 )
order=(direct nginx haproxy pingora-floor ficus-10 ficus-100k)
declare -A rps p50 p99 p999 err fp50 fp99 fp999
for name in "${order[@]}"; do
  wrk -t1 -c32 -d2s -s "$work/report.lua" "${url[$name]}" >/dev/null   # warm-up
  read -r _ rps[$name] p50[$name] p99[$name] p999[$name] err[$name] < <(wrk -t1 -c32 -d"${secs}s" -s "$work/report.lua" "${url[$name]}" | grep RESULT)
  fixed=$("$bench" rate "${url[$name]}" --rps "$rate" --secs "$secs" --header "X-Tenant-Id: t5")
  fp50[$name]=$(echo "$fixed" | python3 -c 'import json,sys; print("%.3f" % json.load(sys.stdin)["p50_ms"])')
  fp99[$name]=$(echo "$fixed" | python3 -c 'import json,sys; print("%.3f" % json.load(sys.stdin)["p99_ms"])')
  fp999[$name]=$(echo "$fixed" | python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.3f" % d["p999_ms"] + (" (%d errors)" % d["errors"] if d["errors"] else ""))')
done

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; wrk -t1 -c32 -d${secs}s; fixed rate ${rate} req/s for ${secs}s; each proxy 1 worker thread"
echo
echo "| setup | req/s (wrk) | vs direct | vs nginx | vs HAProxy | p50 | p99 | p99.9 | errors | fixed-rate p50 | p99 | p99.9 |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
for name in "${order[@]}"; do
  python3 - "$name" "${rps[$name]}" "${rps[direct]}" "${rps[nginx]}" "${rps[haproxy]}" "${p50[$name]}" "${p99[$name]}" "${p999[$name]}" "${err[$name]}" "${fp50[$name]}" "${fp99[$name]}" "${fp999[$name]}" <<'PY'
import sys
n, r, d, ng, ha, a, b, c, e, f1, f2, f3 = sys.argv[1:]
r, d, ng, ha = map(float, (r, d, ng, ha))
print(f"| {n} | {r:,.0f} | {r/d:.2f}× | {r/ng:.2f}× | {r/ha:.2f}× | {a} ms | {b} ms | {c} ms | {e} | {f1} ms | {f2} ms | {f3} ms |")
PY
done
echo
python3 - "${rps[ficus-10]}" "${rps[ficus-100k]}" "${rps[pingora-floor]}" <<'PY'
import sys
a, b, f = map(float, sys.argv[1:])
print(f"100,000 tenants vs 10 tenants: {b/a:.3f}× the throughput ({(b/a-1)*100:+.1f}%)")
print(f"Ficus (10 tenants) vs the pingora floor: {a/f:.2f}×")
PY
echo
echo "stage change → proxy routing by it (PostgreSQL store, 100 flips):"
"$bench" propagation --legacy 127.0.0.1:18001 --new 127.0.0.1:18002 --flips 100
