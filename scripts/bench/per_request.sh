#!/usr/bin/env bash
# Where a proxied request's cost goes, per request, for nginx, the bare pingora
# floor and Ficus (one worker thread each, pinned to core 0; the backend on core
# 1): system calls (strace -c over 10,000 requests at a fixed 2,000 req/s) and
# context switches and CPU time (perf stat over the same load, without strace).
# The load generator opens connections as an open-loop client does, so the
# numbers include connection set-up. A first measurement toward issue 22.
#   scripts/bench/per_request.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
need=()
for tool in nginx strace perf curl; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
if [ "${#need[@]}" -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  pkgs=("${need[@]/perf/linux-perf}")
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${pkgs[@]}"
fi
cargo build --release --locked -p ficus -p ficus-bench >/dev/null 2>&1 || cargo build --release --locked -p ficus -p ficus-bench
ficus=target/release/ficus; bench=target/release/ficus-bench
work="$(mktemp -d)"; pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
cat > "$work/backend.conf" <<CONF
worker_processes 1; daemon off; pid $work/backend.pid; error_log $work/backend.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:18001; location / { default_type application/json; return 200 '{"backend":"legacy","homes":[{"id":1,"city":"Lisbon","price":420000}]}'; } } }
CONF
taskset -c 1 nginx -c "$work/backend.conf" -p "$work" & pids+=($!)
cat > "$work/proxy.conf" <<CONF
worker_processes 1; daemon off; pid $work/proxy.pid; error_log $work/proxy.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream legacy { server 127.0.0.1:18001; keepalive 256; }
  server { listen 127.0.0.1:18010; location / { proxy_pass http://legacy; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
taskset -c 0 nginx -c "$work/proxy.conf" -p "$work" & pids+=($!)
taskset -c 0 "$bench" pingora-floor 127.0.0.1:18050 127.0.0.1:18001 2>"$work/floor.log" & pids+=($!)
dir="$work/f"; mkdir -p "$dir"; store="sqlite:$dir/ficus.db"
FICUS_STORE="$store" "$ficus" init >/dev/null
FICUS_STORE="$store" "$ficus" tenant add t5 >/dev/null
printf '[proxy]\nlisten = ["127.0.0.1:18030"]\nadmin_listen = "127.0.0.1:18031"\nstore = "%s"\nthreads = 1\n[backends.legacy]\nupstreams = ["127.0.0.1:18001"]\n[backends.new]\nupstreams = ["127.0.0.1:18001"]\n[[tenant_from]]\nheader = "X-Tenant-Id"\n' "$store" > "$dir/ficus.toml"
RUST_LOG=warn taskset -c 0 "$ficus" proxy --config "$dir/ficus.toml" 2>"$dir/proxy.log" & pids+=($!)
for _ in $(seq 1 300); do curl -sf http://127.0.0.1:18031/readyz >/dev/null && break; sleep 0.1; done
sleep 1
# The proxying nginx's worker: the child of the master started with proxy.conf.
master=$(pgrep -f "proxy.conf" | head -1); nginx_worker=$(pgrep -P "$master" | head -1)
floor=$(pgrep -f "pingora-floor" | head -1); ficusp=$(pgrep -f "ficus proxy --config $dir" | head -1)
n=10000
echo "| proxy | system calls / request | context switches / request | CPU µs / request | most frequent calls / request |"
echo "|---|---|---|---|---|"
for entry in "nginx:$nginx_worker:18010" "pingora-floor:$floor:18050" "ficus:$ficusp:18030"; do
  IFS=: read -r name pid port <<< "$entry"
  url="http://127.0.0.1:$port/homes/1"
  "$bench" rate "$url" --rps 2000 --secs 1 --header "X-Tenant-Id: t5" >/dev/null
  strace -c -f -p "$pid" -o "$work/$name.strace" & st=$!
  sleep 0.5
  "$bench" rate "$url" --rps 2000 --secs 5 --header "X-Tenant-Id: t5" > "$work/$name.rate"
  sleep 0.3; kill -INT $st; wait $st 2>/dev/null || true
  calls=$(awk '/^[ 0-9.]+ +[0-9.]+ +[0-9]+ +[0-9]+/ {s+=$4} END {print s}' "$work/$name.strace")
  perf stat -e context-switches,task-clock -p "$pid" -o "$work/$name.perf" -- sleep 5.4 & ps=$!
  sleep 0.2
  "$bench" rate "$url" --rps 2000 --secs 5 --header "X-Tenant-Id: t5" > /dev/null
  wait $ps || true
  cs=$(awk '/context-switches/ {gsub(",","",$1); print $1}' "$work/$name.perf")
  ms=$(awk '/task-clock/ {gsub(",","",$1); print $1}' "$work/$name.perf")
  echo "| $name | $(python3 -c "print(round($calls/$n,2))") | $(python3 -c "print(round(${cs:-0}/$n,3))") | $(python3 -c "print(round(${ms:-0}*1000/$n,1))") | $(sort -k4 -n -r "$work/$name.strace" | awk 'NR>2 && NR<7 {printf "%s %.2f, ", $NF, $4/10000}') |"
  continue
  echo "$name syscalls/req $(python3 -c "print(round($calls/$n,2))") cs/req $(python3 -c "print(round(${cs:-0}/$n,3))") cpu-us/req $(python3 -c "print(round(${ms:-0}*1000/$n,2))")"
  sort -k4 -n -r "$work/$name.strace" | awk 'NR>2 && NR<9 {print "   ", $NF, $4}'
done
