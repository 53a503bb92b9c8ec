#!/usr/bin/env bash
# The proxy's benchmark: the same small JSON response served directly, through
# nginx, HAProxy, the bare pingora and hyper floors, and Ficus (10 and 100,000
# tenants), each proxy with one and with two worker threads, measured in one run
# with wrk (throughput and latency under saturation) and with a fixed-rate load
# (latency at a steady rate). Then the time for a stage change to reach a running
# proxy on a PostgreSQL store.
#
# Placement: the backend (one nginx worker), wrk and the fixed-rate client run on
# core 1. A one-thread proxy runs on core 0, so it has a core to itself; a
# two-thread proxy may run on both cores, and so shares core 1 with the load.
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
load="taskset -c 1"
# cores THREADS: where a proxy with that many threads runs.
cores() { if [ "$1" = 1 ]; then echo 0; else echo 0,1; fi; }

# The backend: nginx answering a fixed ~100-byte JSON body. Port 18001 plays
# legacy, 18002 new.
cat > "$work/backend.conf" <<CONF
worker_processes 1; daemon off; pid $work/backend.pid; error_log $work/backend.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:18001; location / { default_type application/json; return 200 '{"backend":"legacy","homes":[{"id":1,"city":"Lisbon","price":420000}]}'; } }
  server { listen 127.0.0.1:18002; location / { default_type application/json; return 200 '{"backend":"new","homes":[{"id":1,"city":"Lisbon","price":420000}]}'; } } }
CONF
$load nginx -c "$work/backend.conf" -p "$work" & pids+=($!)

declare -A url
for t in 1 2; do
  port=$((18010 + t))
  cat > "$work/nginx-$t.conf" <<CONF
worker_processes $t; daemon off; pid $work/nginx-$t.pid; error_log $work/nginx-$t.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream legacy { server 127.0.0.1:18001; keepalive 256; }
  server { listen 127.0.0.1:$port; location / { proxy_pass http://legacy; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
  taskset -c "$(cores $t)" nginx -c "$work/nginx-$t.conf" -p "$work" & pids+=($!)
  url[nginx-${t}t]=http://127.0.0.1:$port/homes/1

  port=$((18020 + t))
  cat > "$work/haproxy-$t.cfg" <<CONF
global
  nbthread $t
  maxconn 8192
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend f
  bind 127.0.0.1:$port
  default_backend b
backend b
  http-reuse always
  server s1 127.0.0.1:18001
CONF
  taskset -c "$(cores $t)" haproxy -f "$work/haproxy-$t.cfg" -db & pids+=($!)
  url[haproxy-${t}t]=http://127.0.0.1:$port/homes/1

  # The smallest proxies pingora and hyper can be: their rows separate what the
  # framework costs from what Ficus adds.
  port=$((18050 + t))
  taskset -c "$(cores $t)" "$bench" pingora-floor 127.0.0.1:$port 127.0.0.1:18001 --threads $t 2>"$work/floor-$t.log" & pids+=($!)
  url[pingora-floor-${t}t]=http://127.0.0.1:$port/homes/1
  port=$((18060 + t))
  taskset -c "$(cores $t)" "$bench" hyper-floor 127.0.0.1:$port 127.0.0.1:18001 --threads $t 2>"$work/hyper-$t.log" & pids+=($!)
  url[hyper-floor-${t}t]=http://127.0.0.1:$port/homes/1
done
url[direct]=http://127.0.0.1:18001/homes/1

start_ficus() { # name port admin tenants threads
  local dir="$work/$1"; mkdir -p "$dir"
  local store="sqlite:$dir/ficus.db"
  FICUS_STORE="$store" "$ficus" init >/dev/null
  { echo "id,stage"; for i in $(seq 0 $(( $4 - 1 ))); do echo "t$i,legacy"; done; } > "$dir/tenants.csv"
  FICUS_STORE="$store" "$ficus" tenant import "$dir/tenants.csv" >/dev/null
  cat > "$dir/ficus.toml" <<CONF
[proxy]
listen = ["127.0.0.1:$2"]
admin_listen = "127.0.0.1:$3"
drain_delay_ms = 0 # no load balancer in front: stop at once
store = "$store"
threads = $5
[backends.legacy]
upstreams = ["127.0.0.1:18001"]
[backends.new]
upstreams = ["127.0.0.1:18002"]
[[tenant_from]]
header = "X-Tenant-Id"
CONF
  RUST_LOG=warn taskset -c "$(cores $5)" "$ficus" proxy --config "$dir/ficus.toml" 2>"$dir/proxy.log" & pids+=($!)
  url[$1]=http://127.0.0.1:$2/homes/1
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$3/readyz" >/dev/null && return; sleep 0.1; done
  echo "ficus on $2 did not become ready" >&2; exit 1
}
start_ficus ficus-1t 18030 18031 10 1
start_ficus ficus-2t 18032 18033 10 2
start_ficus ficus-100k-1t 18040 18041 100000 1
sleep 1

cat > "$work/report.lua" <<'LUA'
wrk.headers["X-Tenant-Id"] = "t5"
done = function(summary, latency, requests)
  io.write(string.format("RESULT %.0f %.3f %.3f %.3f %d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency:percentile(99.9) / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout))
end
LUA

order=(direct nginx-1t haproxy-1t pingora-floor-1t hyper-floor-1t ficus-1t ficus-100k-1t nginx-2t haproxy-2t pingora-floor-2t hyper-floor-2t ficus-2t)
declare -A rps p50 p99 p999 err fp50 fp99 fp999
for name in "${order[@]}"; do
  $load wrk -t1 -c32 -d2s -s "$work/report.lua" "${url[$name]}" >/dev/null   # warm-up
  read -r _ rps[$name] p50[$name] p99[$name] p999[$name] err[$name] < <($load wrk -t1 -c32 -d"${secs}s" -s "$work/report.lua" "${url[$name]}" | grep RESULT)
  fixed=$($load "$bench" rate "${url[$name]}" --rps "$rate" --secs "$secs" --header "X-Tenant-Id: t5")
  read -r fp50[$name] fp99[$name] fp999[$name] < <(echo "$fixed" | python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.3f %.3f %.3f%s" % (d["p50_ms"], d["p99_ms"], d["p999_ms"], " (%d errors)" % d["errors"] if d["errors"] else ""))')
done

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; wrk -t1 -c32 -d${secs}s; fixed rate ${rate} req/s for ${secs}s; backend, wrk and the fixed-rate client on core 1; 1-thread proxies on core 0, 2-thread proxies on both"
echo
echo "| setup | req/s (wrk) | vs nginx | vs HAProxy | p50 | p99 | p99.9 | errors | fixed-rate p50 | p99 | p99.9 | added p99 at ${rate}/s |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
for name in "${order[@]}"; do
  t="${name##*-}"; [ "$name" = direct ] && t=1t
  python3 - "$name" "${rps[$name]}" "${rps[nginx-$t]}" "${rps[haproxy-$t]}" "${p50[$name]}" "${p99[$name]}" "${p999[$name]}" "${err[$name]}" "${fp50[$name]}" "${fp99[$name]}" "${fp999[$name]}" "${fp99[direct]}" <<'PY'
import sys
n, r, ng, ha, a, b, c, e, f1, f2, f3, d99 = sys.argv[1:]
r, ng, ha = map(float, (r, ng, ha))
added = "" if n == "direct" else f"{float(f2) - float(d99):+.3f} ms"
print(f"| {n} | {r:,.0f} | {r/ng:.2f}× | {r/ha:.2f}× | {a} ms | {b} ms | {c} ms | {e} | {f1} ms | {f2} ms | {f3} ms | {added} |")
PY
done
echo
python3 - "${rps[ficus-1t]}" "${rps[ficus-2t]}" "${rps[ficus-100k-1t]}" \
  "${rps[nginx-1t]}" "${rps[nginx-2t]}" "${rps[hyper-floor-1t]}" "${rps[hyper-floor-2t]}" "${rps[pingora-floor-1t]}" "${rps[pingora-floor-2t]}" \
  "${p99[ficus-1t]}" "${p99[ficus-2t]}" "${p99[nginx-1t]}" "${p99[nginx-2t]}" \
  "${fp99[ficus-1t]}" "${fp99[nginx-1t]}" "${fp99[direct]}" <<'PY'
import sys
f1, f2, f100k, n1, n2, hf1, hf2, pf1, pf2, p_f1, p_f2, p_n1, p_n2, q_f, q_n, q_d = map(float, sys.argv[1:])
ok = lambda c: "met" if c else "NOT met"
print(f"Ficus vs nginx: {f1/n1:.2f}x at 1 thread (target >= 0.95x: {ok(f1/n1 >= 0.95)}), {f2/n2:.2f}x at 2 ({ok(f2/n2 >= 0.95)})")
print(f"  the hyper floor vs nginx: {hf1/n1:.2f}x at 1 thread, {hf2/n2:.2f}x at 2; Ficus vs the hyper floor: {f1/hf1:.2f}x, {f2/hf2:.2f}x; vs the pingora floor: {f1/pf1:.2f}x, {f2/pf2:.2f}x")
print(f"  p99 at saturation vs nginx: {p_f1:.3f} vs {p_n1:.3f} ms at 1 thread ({ok(p_f1 <= p_n1)}), {p_f2:.3f} vs {p_n2:.3f} ms at 2 ({ok(p_f2 <= p_n2)})")
print(f"  added p99 at a fixed rate vs nginx: {q_f - q_d:+.3f} vs {q_n - q_d:+.3f} ms (target <= nginx + 0.1 ms: {ok(q_f - q_d <= q_n - q_d + 0.1)})")
print(f"  100,000 tenants vs 10: {f100k/f1:.3f}x the throughput ({(f100k/f1-1)*100:+.1f}%; target within 5%: {ok(abs(f100k/f1-1) <= 0.05)})")
PY
echo
echo "stage change → proxy routing by it (PostgreSQL store, 100 flips):"
"$bench" propagation --legacy 127.0.0.1:18001 --new 127.0.0.1:18002 --flips 100
