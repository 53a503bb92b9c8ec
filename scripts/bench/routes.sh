#!/usr/bin/env bash
# Routes: what route-level routing costs a proxy with 500 route templates (half
# of them on a second service), 100 route stages and 1,000 per-tenant overrides
# over 10,000 tenants, against the same proxy configured as before routes had
# stages (10,000 tenants, no route table), measured in one run with wrk (one
# proxy thread each, runs alternated); then how fast a route stage change
# reaches a proxy on a PostgreSQL store, next to a tenant stage change.
#
# "Before" is the proxy as it was before routes had stages: the release build of
# commit $BEFORE (default 6a5ebc5, the last one before route-level routing),
# built in a git worktree; "without routes" is this build with no route table.
#   scripts/bench/routes.sh [seconds per run, default 10]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
secs="${1:-10}"
before_rev="${BEFORE:-6a5ebc5}"
need=()
for tool in nginx wrk curl; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
command -v cmake >/dev/null 2>&1 || need+=(cmake) # pingora's zlib-ng build
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ "${#need[@]}" -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true
  git worktree remove --force "$work/before-src" >/dev/null 2>&1 || true; rm -rf "$work"
}
trap cleanup EXIT
# The build before routes, in a target directory of its own (sharing this one
# would let its artifacts pass for this tree's), kept for the next run.
mkdir -p target/before
if [ ! -x "target/before/ficus-$before_rev" ]; then
  git worktree add --detach "$work/before-src" "$before_rev" >/dev/null
  (cd "$work/before-src" && CARGO_TARGET_DIR="$OLDPWD/target/before/build" cargo build --release --locked -p ficus >/dev/null)
  cp target/before/build/release/ficus "target/before/ficus-$before_rev"
fi
before="$PWD/target/before/ficus-$before_rev"
cargo build --release --locked -p ficus -p ficus-bench >/dev/null 2>&1 || cargo build --release --locked -p ficus -p ficus-bench
ficus="$PWD/target/release/ficus"
bench="$PWD/target/release/ficus-bench"

cat > "$work/backend.conf" <<CONF
worker_processes 2; daemon off; pid $work/backend.pid; error_log $work/backend.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:18001; location / { default_type application/json; return 200 '{"backend":"legacy","homes":[{"id":1,"city":"Lisbon","price":420000}]}'; } }
  server { listen 127.0.0.1:18002; location / { default_type application/json; return 200 '{"backend":"new","homes":[{"id":1,"city":"Lisbon","price":420000}]}'; } } }
CONF
nginx -c "$work/backend.conf" -p "$work" & pids+=($!)

start_ficus() { # name port admin routes? binary
  local dir="$work/$1"; mkdir -p "$dir"
  local store="sqlite:$dir/ficus.db" bin="$5"
  FICUS_STORE="$store" "$bin" init >/dev/null
  { echo "id,stage"; for i in $(seq 0 9999); do echo "t$i,migrated"; done; } > "$dir/tenants.csv"
  FICUS_STORE="$store" "$bin" tenant import "$dir/tenants.csv" >/dev/null
  cat > "$dir/ficus.toml" <<CONF
[proxy]
listen = ["127.0.0.1:$2"]
admin_listen = "127.0.0.1:$3"
drain_delay_ms = 0 # no load balancer in front: stop at once
store = "$store"
threads = 1
traffic_flush_ms = 1000
[backends.legacy]
upstreams = ["127.0.0.1:18001"]
[backends.new]
upstreams = ["127.0.0.1:18002"]
[[tenant_from]]
header = "X-Tenant-Id"
CONF
  if [ "$4" = routes ]; then
    printf '[backends.search]\nupstreams = ["127.0.0.1:18002"]\n' >> "$dir/ficus.toml"
    for i in $(seq 0 499); do
      service=new; [ $(( i % 2 )) -eq 1 ] && service=search
      printf '[[routes]]\nmatch = "GET /area%d/{id}/item%d"\nservice = "%s"\n' $(( i % 50 )) "$i" "$service" >> "$dir/ficus.toml"
    done
    # Stages the proxy must look through: 100 routes' own, 1,000 per tenant.
    python3 - "$dir/ficus.db" <<'PY'
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1])
now = int(time.time() * 1000)
rows = [(f"GET /area{i % 50}/{{id}}/item{i}", "", "migrated", 1, now) for i in range(100)]
rows += [(f"POST /area{i % 50}/{{id}}/item{i}", f"t{i}", "migrated", 1, now) for i in range(1000)]
db.executemany("INSERT INTO route_stages (route, tenant_id, stage, version, updated_at) VALUES (?, ?, ?, ?, ?)", rows)
db.commit()
PY
  fi
  RUST_LOG=warn "$bin" proxy --config "$dir/ficus.toml" 2>"$dir/proxy.log" & pids+=($!)
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$3/readyz" >/dev/null && return; sleep 0.1; done
  echo "ficus $1 did not become ready" >&2; cat "$dir/proxy.log" >&2; exit 1
}
start_ficus before 18020 18021 none "$before"
start_ficus today 18030 18031 none "$ficus"
start_ficus routes 18040 18041 routes "$ficus"
sleep 1
# The templated path goes to the search service on the routes proxy.
curl -sf -H "X-Tenant-Id: t5" http://127.0.0.1:18040/area7/1/item457 | grep -q '"new"'

cat > "$work/report.lua" <<'LUA'
wrk.headers["X-Tenant-Id"] = "t5"
done = function(summary, latency, requests)
  io.write(string.format("RESULT %.0f %.3f\n", summary.requests / (summary.duration / 1e6), latency:percentile(99) / 1000))
end
LUA
declare -A rps p99
run() { # key url
  wrk -t1 -c32 -d2s -s "$work/report.lua" "$2" >/dev/null
  local r q; read -r _ r q < <(wrk -t1 -c32 -d"${secs}s" -s "$work/report.lua" "$2" | grep RESULT)
  rps[$1]=$(( ${rps[$1]:-0} + r )); p99[$1]="${p99[$1]:-} $q"
}
for round in 1 2; do
  run before-plain http://127.0.0.1:18020/homes/1
  run today-plain http://127.0.0.1:18030/homes/1
  run routes-plain http://127.0.0.1:18040/homes/1
  run before-templated http://127.0.0.1:18020/area7/1/item457
  run today-templated http://127.0.0.1:18030/area7/1/item457
  run routes-templated http://127.0.0.1:18040/area7/1/item457
done
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r)"
echo
echo "| path | before routes req/s | this build, no routes | with 500 templates, 1,100 route stages | routes vs before | p99 before / no routes / routes (ms, two runs each) |"
echo "|---|---|---|---|---|---|"
for kind in plain templated; do
  python3 - "$kind" "${rps[before-$kind]}" "${rps[today-$kind]}" "${rps[routes-$kind]}" "${p99[before-$kind]}" "${p99[today-$kind]}" "${p99[routes-$kind]}" <<'PY'
import sys
kind, a, b, c, pa, pb, pc = sys.argv[1:]
a, b, c = int(a) / 2, int(b) / 2, int(c) / 2
path = "GET /homes/1 (no template matches)" if kind == "plain" else "GET /area7/1/item457 (a template; service search)"
print(f"| {path} | {a:,.0f} | {b:,.0f} ({b/a:.3f}×) | {c:,.0f} | {c/a:.3f}× | {pa.strip()} / {pb.strip()} / {pc.strip()} |")
PY
done
echo
echo "stage changes → proxy routing by them (PostgreSQL store, 100 flips each):"
"$bench" propagation --legacy 127.0.0.1:18001 --new 127.0.0.1:18002 --flips 100
"$bench" propagation --legacy 127.0.0.1:18001 --new 127.0.0.1:18002 --flips 100 --routes
