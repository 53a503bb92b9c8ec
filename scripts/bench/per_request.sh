#!/usr/bin/env bash
# Where a proxied request's cost goes, per request, for nginx, the bare pingora and
# hyper floors, the floor of hyper's connection API (`conn-floor`), the same with a
# hand-written upstream client in the request's task (`raw-floor`) and Ficus, each
# with one worker thread pinned to core 0; the backend (one nginx worker) and the
# load generators pinned to core 1:
# - system calls (strace -c -f over 10,000 requests at a fixed 2,000 req/s);
# - context switches and CPU time (perf stat over the same load, without strace),
#   and CPU time at saturation (perf stat under wrk -t1 -c32);
# - allocations (the counting allocator of `ficus-bench`, which runs the floors and,
#   with `ficus-bench proxy`, Ficus itself; the idle rate over as long is taken off);
# - user-space instructions (valgrind's callgrind, counted only while 2,000 requests
#   on 8 kept-alive connections pass; a count, so the same on a busy machine). It
#   counts each byte of a `rep movsb` copy as one instruction, so large moves weigh
#   more in it than in time.
# The fixed-rate client opens connections as an open-loop client does, so its
# numbers include connection set-up; wrk's 32 connections stay open.
# FICUS=target/pgo/ficus measures the profile-guided build (scripts/build-pgo.sh)
# in the Ficus rows but the allocations, which `ficus-bench proxy` counts in a
# plain build (a profile changes where code goes, not what it allocates).
#   [FICUS=path] scripts/bench/per_request.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
need=()
for tool in nginx strace perf curl wrk; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
command -v cmake >/dev/null 2>&1 || need+=(cmake) # pingora's zlib-ng build
if [ "${#need[@]}" -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  pkgs=("${need[@]/perf/linux-perf}")
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${pkgs[@]}"
fi
cargo build --release --locked -p ficus -p ficus-bench >/dev/null 2>&1 || cargo build --release --locked -p ficus -p ficus-bench
ficus=${FICUS:-target/release/ficus}; bench=target/release/ficus-bench
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
taskset -c 0 "$bench" pingora-floor 127.0.0.1:18050 127.0.0.1:18001 --allocs "$work/pingora-floor.allocs" 2>"$work/floor.log" & pids+=($!)
taskset -c 0 "$bench" hyper-floor 127.0.0.1:18060 127.0.0.1:18001 --allocs "$work/hyper-floor.allocs" 2>"$work/hyper.log" & pids+=($!)
taskset -c 0 "$bench" conn-floor 127.0.0.1:18065 127.0.0.1:18001 --allocs "$work/conn-floor.allocs" 2>"$work/conn.log" & pids+=($!)
taskset -c 0 "$bench" raw-floor 127.0.0.1:18066 127.0.0.1:18001 --allocs "$work/raw-floor.allocs" 2>"$work/raw.log" & pids+=($!)
dir="$work/f"; mkdir -p "$dir"; store="sqlite:$dir/ficus.db"
FICUS_STORE="$store" "$ficus" init >/dev/null
FICUS_STORE="$store" "$ficus" tenant add t5 >/dev/null
conf() { printf '[proxy]\nlisten = ["127.0.0.1:%s"]\nadmin_listen = "127.0.0.1:%s"\nstore = "%s"\nthreads = 1\ndrain_delay_ms = 0\n[backends.legacy]\nupstreams = ["127.0.0.1:18001"]\n[backends.new]\nupstreams = ["127.0.0.1:18001"]\n[[tenant_from]]\nheader = "X-Tenant-Id"\n' "$1" "$2" "$store"; }
conf 18030 18031 > "$dir/ficus.toml"
conf 18070 18071 > "$dir/counted.toml"
RUST_LOG=warn taskset -c 0 "$ficus" proxy --config "$dir/ficus.toml" 2>"$dir/proxy.log" & pids+=($!)
# The same proxy in the counting build, on their own ports, for the allocation column.
RUST_LOG=warn taskset -c 0 "$bench" proxy "$dir/counted.toml" --allocs "$work/ficus.allocs" 2>"$dir/counted.log" & pids+=($!)
for port in 18031 18071; do
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
done
sleep 1
# The proxying nginx's worker: the child of the master started with proxy.conf.
master=$(pgrep -f "proxy.conf" | head -1); nginx_worker=$(pgrep -P "$master" | head -1)
floor=$(pgrep -f "pingora-floor 127.0.0.1:18050" | head -1); hyper=$(pgrep -f "hyper-floor 127.0.0.1:18060" | head -1)
conn=$(pgrep -f "conn-floor 127.0.0.1:18065" | head -1)
raw=$(pgrep -f "raw-floor 127.0.0.1:18066" | head -1)
ficusp=$(pgrep -f "ficus proxy --config $dir/ficus.toml" | head -1)
echo 'wrk.headers["X-Tenant-Id"] = "t5"' > "$work/wrk.lua"
n=10000
allocs() { cat "$work/$1.allocs" 2>/dev/null || echo 0; }
# Instructions: each proxy again under callgrind, on its own port, counting only
# while the measured requests pass.
cat > "$work/client.py" <<'PY'
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
req = b"GET /homes/1 HTTP/1.1\r\nHost: localhost\r\nX-Tenant-Id: t5\r\nUser-Agent: bench/1.0\r\n\r\n"
done = 0
while done < n:
    for s in socks:
        s.sendall(req)
    for s in socks:
        buf = b""
        while True:
            buf += s.recv(65536)
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep:
                length = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0]
                if len(body) >= length:
                    break
    done += len(socks)
PY
cat > "$work/cg-nginx.conf" <<CONF
master_process off; daemon off; worker_processes 1; pid $work/cg-nginx.pid; error_log $work/cg-nginx.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream legacy { server 127.0.0.1:18001; keepalive 256; }
  server { listen 127.0.0.1:18090; location / { proxy_pass http://legacy; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
conf 18091 18092 > "$dir/cg.toml"
declare -A instr
instructions() { # name port command...
  local name=$1 port=$2; shift 2
  RUST_LOG=warn taskset -c 0 valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/$name.cg" "$@" 2>"$work/$name.vg" & local vp=$!
  for _ in $(seq 1 600); do curl -sf -H "X-Tenant-Id: t5" "http://127.0.0.1:$port/homes/1" >/dev/null && break; sleep 0.2; done
  taskset -c 1 python3 "$work/client.py" "$port" 1000
  callgrind_control -i on "$vp" >/dev/null
  taskset -c 1 python3 "$work/client.py" "$port" 2000
  callgrind_control -i off "$vp" >/dev/null
  callgrind_control -d "$vp" >/dev/null
  kill -9 "$vp"; wait "$vp" 2>/dev/null || true
  instr[$name]=$(cat "$work/$name".cg.* | awk '/^totals:/ {s+=$2} END {printf "%d", s/2000}')
}
instructions nginx 18090 nginx -c "$work/cg-nginx.conf" -p "$work"
instructions pingora-floor 18093 "$bench" pingora-floor 127.0.0.1:18093 127.0.0.1:18001
instructions hyper-floor 18094 "$bench" hyper-floor 127.0.0.1:18094 127.0.0.1:18001
instructions conn-floor 18095 "$bench" conn-floor 127.0.0.1:18095 127.0.0.1:18001
instructions raw-floor 18096 "$bench" raw-floor 127.0.0.1:18096 127.0.0.1:18001
instructions ficus 18091 "$ficus" proxy --config "$dir/cg.toml"

echo "| proxy | system calls / request | context switches / request | CPU µs / request at 2,000/s | CPU µs / request at saturation | req/s at saturation | allocations / request | user-space instructions / request | most frequent calls / request |"
echo "|---|---|---|---|---|---|---|---|---|"
for entry in "nginx:$nginx_worker:18010:18010" "pingora-floor:$floor:18050:18050" "hyper-floor:$hyper:18060:18060" "conn-floor:$conn:18065:18065" "raw-floor:$raw:18066:18066" "ficus:$ficusp:18030:18070"; do
  IFS=: read -r name pid port counted <<< "$entry"
  url="http://127.0.0.1:$port/homes/1"
  taskset -c 1 "$bench" rate "$url" --rps 2000 --secs 1 --header "X-Tenant-Id: t5" >/dev/null
  strace -c -f -p "$pid" -o "$work/$name.strace" & st=$!
  sleep 0.5
  taskset -c 1 "$bench" rate "$url" --rps 2000 --secs 5 --header "X-Tenant-Id: t5" > "$work/$name.rate"
  sleep 0.3; kill -INT $st; wait $st 2>/dev/null || true
  calls=$(awk '/^[ 0-9.]+ +[0-9.]+ +[0-9]+ +[0-9]+/ {s+=$4} END {print s}' "$work/$name.strace")
  perf stat -e context-switches,task-clock -p "$pid" -o "$work/$name.perf" -- sleep 5.4 & ps=$!
  sleep 0.2
  taskset -c 1 "$bench" rate "$url" --rps 2000 --secs 5 --header "X-Tenant-Id: t5" > /dev/null
  wait $ps || true
  cs=$(awk '/context-switches/ {gsub(",","",$1); print $1}' "$work/$name.perf")
  ms=$(awk '/task-clock/ {gsub(",","",$1); print $1}' "$work/$name.perf")
  # Saturation: CPU time over the requests wrk completed in the same window.
  taskset -c 1 wrk -t1 -c32 -d7s -s "$work/wrk.lua" "$url" > "$work/$name.wrk" & wk=$!
  sleep 1
  perf stat -e task-clock -p "$pid" -o "$work/$name.sat" -- sleep 5 >/dev/null 2>&1
  wait $wk
  sat_rps=$(awk '/Requests\/sec/ {print $2}' "$work/$name.wrk")
  sat_ms=$(awk '/task-clock/ {gsub(",","",$1); print $1}' "$work/$name.sat")
  # Allocations: the counting build under the same fixed load, less its idle rate.
  per_alloc="n/a (per-request pools)"
  if [ "$name" != nginx ]; then
    curl_url="http://127.0.0.1:$counted/homes/1"
    sleep 0.3; a0=$(allocs "$name"); sleep 5; a1=$(allocs "$name")
    taskset -c 1 "$bench" rate "$curl_url" --rps 2000 --secs 5 --header "X-Tenant-Id: t5" > /dev/null
    sleep 0.3; a2=$(allocs "$name")
    per_alloc=$(python3 -c "print(round((($a2-$a1)-($a1-$a0))/$n,1))")
  fi
  echo "| $name | $(python3 -c "print(round($calls/$n,2))") | $(python3 -c "print(round(${cs:-0}/$n,3))") | $(python3 -c "print(round(${ms:-0}*1000/$n,1))") | $(python3 -c "print(round(${sat_ms:-0}*1000/($sat_rps*5),1))") | $(python3 -c "print(f'{$sat_rps:,.0f}')") | $per_alloc | $(python3 -c "print(f'{${instr[$name]:-0}:,}')") | $(sort -k4 -n -r "$work/$name.strace" | awk 'NR>2 && NR<7 {printf "%s %.2f, ", $NF, $4/10000}') |"
done

