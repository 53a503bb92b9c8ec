#!/usr/bin/env bash
# The ficus db numbers: batched backfill vs one naive UPDATE under an OLTP workload
# (rows/s and the workload's p99 against its idle baseline), the lock-queue
# experiment (worst point-query wait behind a 4 s reader, plain ALTER vs ficus),
# and instant vs batched backfill (time, size). Starts its own PostgreSQL cluster.
#   scripts/bench/backfill.sh [rows, default 10000000] [idle baseline seconds, default 10] [more flags]
# More flags go to the driver: --batch-time MS (the batches' target duration),
# --max-rows-per-sec N (the backfill's ceiling).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
# pingora's zlib-ng build needs cmake.
command -v cmake >/dev/null 2>&1 || { s=""; [ "$(id -u)" -ne 0 ] && s=sudo; $s apt-get update -qq && DEBIAN_FRONTEND=noninteractive $s apt-get install -y -qq cmake; }
cargo build --release --locked -p ficus-bench >/dev/null 2>&1 || cargo build --release --locked -p ficus-bench
./target/release/ficus-bench backfill --rows "${1:-10000000}" --secs "${2:-10}" "${@:3}"
