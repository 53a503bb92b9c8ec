#!/usr/bin/env bash
# Builds `ficus` with profile-guided optimization, the build to run in front of
# production traffic: an instrumented build serves a training load, and the
# profile it writes guides a second build (the same source, so the same
# behaviour; the compiler only lays out and inlines the code by how often it
# ran). The binary is left at target/pgo/ficus. BENCHMARKS.md has what it
# changes (the proxy's instructions a request and its throughput) against
# `cargo build --release`.
#
# The training load is the proxy's whole request path, not one benchmark's:
# tenants at every stage (legacy, shadow with its compared reads, whose
# answers differ; migrated), a write, a request with a query, an unknown tenant
# and none at all, in the proportions a migration in progress would send, over
# one and two worker threads. A path it does not exercise is compiled for size.
#   scripts/build-pgo.sh [training seconds, default 10]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs="${1:-10}"
need=()
for tool in nginx wrk; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
command -v cmake >/dev/null 2>&1 || need+=(cmake)
if [ "${#need[@]}" -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
# llvm-profdata must be the one of the compiler's own LLVM: a Debian one of
# another version cannot read the profiles this rustc writes.
sysroot="$(rustc --print sysroot)"
profdata="$(ls "$sysroot"/lib/rustlib/*/bin/llvm-profdata 2>/dev/null | head -1 || true)"
if [ -z "$profdata" ]; then
  rustup component add llvm-tools
  profdata="$(ls "$sysroot"/lib/rustlib/*/bin/llvm-profdata | head -1)"
fi

root="$PWD/target/pgo"
# Nothing of an earlier build stays under the guided binary's name.
rm -rf "$root/profiles" "$root/ficus"
mkdir -p "$root/profiles"
echo "building the instrumented ficus"
RUSTFLAGS="-Cprofile-generate=$root/profiles" cargo build --release --locked -p ficus --target-dir "$root/gen"
gen="$root/gen/release/ficus"

work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
# Two backends whose answers differ in one member, so shadowed reads find and
# record mismatches as they would in a real parallel run.
cat > "$work/backend.conf" <<CONF
worker_processes 1; daemon off; pid $work/backend.pid; error_log $work/backend.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:18101; location / { default_type application/json; return 200 '{"backend":"legacy","homes":[{"id":1,"city":"Lisbon","price":420000}]}'; } }
  server { listen 127.0.0.1:18102; location / { default_type application/json; return 200 '{"backend":"new","homes":[{"id":1,"city":"Lisbon","price":420000}]}'; } } }
CONF
nginx -c "$work/backend.conf" -p "$work" & pids+=($!)
store="sqlite:$work/ficus.db"
FICUS_STORE="$store" "$gen" init >/dev/null
{ echo "id,stage"; for i in $(seq 0 99); do
  case $((i % 10)) in 0 | 1) s=migrated ;; 2) s=shadow ;; *) s=legacy ;; esac
  echo "t$i,$s"; done; } > "$work/tenants.csv"
FICUS_STORE="$store" "$gen" tenant import "$work/tenants.csv" >/dev/null
cat > "$work/train.lua" <<'LUA'
local reqs, n = {}, 0
init = function(args)
  local tenant = function(i) return {["X-Tenant-Id"] = "t" .. i} end
  for i = 0, 19 do
    -- Reads of tenants at every stage: legacy (7 in 10), migrated, shadow.
    table.insert(reqs, wrk.format("GET", "/homes/" .. i, tenant(i)))
    table.insert(reqs, wrk.format("GET", "/homes?city=Lisbon&page=" .. i, tenant(i + 20)))
  end
  table.insert(reqs, wrk.format("POST", "/homes", {["X-Tenant-Id"] = "t3", ["Content-Type"] = "application/json"}, '{"city":"Porto","price":310000}'))
  table.insert(reqs, wrk.format("PUT", "/homes/2", {["X-Tenant-Id"] = "t2", ["Content-Type"] = "application/json"}, '{"price":300000}'))
  table.insert(reqs, wrk.format("GET", "/homes/1", {["X-Tenant-Id"] = "nobody"}))
  table.insert(reqs, wrk.format("GET", "/homes/1", {}))
end
request = function() n = n + 1; return reqs[(n % #reqs) + 1] end
LUA
for threads in 1 2; do
  port=$((18110 + threads))
  cat > "$work/ficus-$threads.toml" <<CONF
[proxy]
listen = ["127.0.0.1:$port"]
admin_listen = "127.0.0.1:$((port + 10))"
drain_delay_ms = 0
store = "$store"
threads = $threads
[backends.legacy]
upstreams = ["127.0.0.1:18101"]
[backends.new]
upstreams = ["127.0.0.1:18102"]
[[tenant_from]]
header = "X-Tenant-Id"
CONF
  RUST_LOG=warn "$gen" proxy --config "$work/ficus-$threads.toml" 2>"$work/proxy-$threads.log" & fp=$!
  ready=""
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$((port + 10))/readyz" >/dev/null && { ready=1; break; }; sleep 0.1; done
  if [ -z "$ready" ]; then
    echo "the instrumented proxy did not become ready:" >&2; cat "$work/proxy-$threads.log" >&2; exit 1
  fi
  echo "training on $threads worker thread(s) for ${secs}s"
  # A training run that fails stops the build: an unguided or half-trained
  # binary must not be left under the guided one's name.
  out="$(wrk -t1 -c32 -d"${secs}s" -s "$work/train.lua" "http://127.0.0.1:$port")"
  grep -E 'Requests/sec|Non-2xx' <<<"$out" || true
  # The profile is written when the process exits: it must end, not be killed.
  kill -TERM "$fp"
  wait "$fp"
done
ls "$root"/profiles/*.profraw >/dev/null 2>&1 || { echo "the training wrote no profile" >&2; exit 1; }
"$profdata" merge -o "$root/ficus.profdata" "$root/profiles"
echo "building the profile-guided ficus"
RUSTFLAGS="-Cprofile-use=$root/ficus.profdata" cargo build --release --locked -p ficus --target-dir "$root/use"
cp "$root/use/release/ficus" "$root/ficus"
echo "built $root/ficus"
