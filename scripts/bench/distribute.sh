#!/usr/bin/env bash
# `ficus db distribute apply` on the demo database scaled to 1,000,000 rows, on
# a Citus coordinator and two workers started here, while the demo's two apps
# write: time per step, the saves' errors and p99 per step against an idle
# baseline; then a third worker added and rebalanced onto, and the largest tenant
# isolated, under the same apps; and a one-tenant point query on one node vs
# distributed.
#   scripts/bench/distribute.sh [rows, default 1000000] [seconds of baseline and per pgbench run, default 20]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bash scripts/citus.sh
# pingora's zlib-ng build needs cmake.
command -v cmake >/dev/null 2>&1 || { s=""; [ "$(id -u)" -ne 0 ] && s=sudo; $s apt-get update -qq && DEBIAN_FRONTEND=noninteractive $s apt-get install -y -qq cmake; }
cargo build --release --locked -p ficus-bench >/dev/null 2>&1 || cargo build --release --locked -p ficus-bench
./target/release/ficus-bench distribute --rows "${1:-1000000}" --secs "${2:-20}"
