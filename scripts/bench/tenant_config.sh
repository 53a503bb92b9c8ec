#!/usr/bin/env bash
# The tenant-config endpoint: a Ficus proxy (1 worker thread) with 10,000 tenants,
# each with a written configuration and a custom domain, answering
# /.well-known/tenant-config by Host, next to nginx (1 worker) serving one static
# JSON file of the same size; wrk -t1 -c32 on each, three interleaved rounds, the
# best of each kept.
#   scripts/bench/tenant_config.sh [seconds per run, default 10] [tenants, default 10000]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
secs="${1:-10}"
tenants="${2:-10000}"
need=()
for tool in nginx wrk curl; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
command -v cmake >/dev/null 2>&1 || need+=(cmake) # pingora's zlib-ng build
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

store="sqlite:$work/ficus.db"
"$bench" seed-configs --store "$store" --tenants "$tenants"
cat > "$work/ficus.toml" <<CONF
[proxy]
listen = ["127.0.0.1:18130"]
admin_listen = "127.0.0.1:18131"
drain_delay_ms = 0 # no load balancer in front: stop at once
store = "$store"
threads = 1
[backends.legacy]
upstreams = ["127.0.0.1:18199"]
[backends.new]
upstreams = ["127.0.0.1:18199"]
[[tenant_from]]
custom_domains = true
CONF
RUST_LOG=warn "$ficus" proxy --config "$work/ficus.toml" 2>"$work/proxy.log" & pids+=($!)
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:18131/readyz" >/dev/null && break; sleep 0.1; done
# nginx serves what Ficus serves for t5, as a static file.
curl -sf -H "Host: t5.brand.test" http://127.0.0.1:18130/.well-known/tenant-config > "$work/config.json"
# nginx's worker runs unprivileged; mktemp made the directory private.
chmod 755 "$work"; chmod 644 "$work/config.json"
cat > "$work/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $work/nginx.pid; error_log $work/nginx.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; etag on;
  server { listen 127.0.0.1:18120; location = /.well-known/tenant-config { default_type application/json; alias $work/config.json; } } }
CONF
nginx -c "$work/nginx.conf" -p "$work" & pids+=($!)
sleep 0.5

cat > "$work/report.lua" <<'LUA'
done = function(summary, latency, requests)
  io.write(string.format("RESULT %.0f %.3f %.3f %d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout))
end
LUA
declare -A url=( [nginx-static]=http://127.0.0.1:18120/.well-known/tenant-config
                 [ficus]=http://127.0.0.1:18130/.well-known/tenant-config
                 [ficus-ios]="http://127.0.0.1:18130/.well-known/tenant-config?platform=ios" )
order=(nginx-static ficus ficus-ios)
# Three interleaved rounds; each setup keeps its best round, so that a noisy
# moment on a shared machine does not decide the ratio.
declare -A rps p50 p99 err
for name in "${order[@]}"; do rps[$name]=0; done
for round in 1 2 3; do
  for name in "${order[@]}"; do
    wrk -t1 -c32 -d2s -H "Host: t5.brand.test" -s "$work/report.lua" "${url[$name]}" >/dev/null
    read -r _ r a b e < <(wrk -t1 -c32 -d"${secs}s" -H "Host: t5.brand.test" -s "$work/report.lua" "${url[$name]}" | grep RESULT)
    echo "round $round $name $r req/s" >&2
    if python3 -c "import sys; sys.exit(0 if float('$r') > float('${rps[$name]}') else 1)"; then
      rps[$name]=$r; p50[$name]=$a; p99[$name]=$b; err[$name]=$e
    fi
  done
done
echo "machine: $(nproc) cores; wrk -t1 -c32 -d${secs}s, best of 3 interleaved rounds; Ficus 1 worker thread with $tenants tenants (written configurations, custom domains); nginx 1 worker; body $(wc -c < "$work/config.json") bytes"
echo
echo "| setup | req/s | vs nginx static | p50 | p99 | errors |"
echo "|---|---|---|---|---|---|"
for name in "${order[@]}"; do
  python3 - "$name" "${rps[$name]}" "${rps[nginx-static]}" "${p50[$name]}" "${p99[$name]}" "${err[$name]}" <<'PY'
import sys
n, r, ng, a, b, e = sys.argv[1:]
r, ng = float(r), float(ng)
print(f"| {n} | {r:,.0f} | {r/ng:.2f}× | {a} ms | {b} ms | {e} |")
PY
done
