#!/usr/bin/env bash
# The cost of enforced row level security for a tenant role's queries: pgbench
# scripts (point lookup, 100-row range scan, insert, count of the tenant's rows) on
# one table with RLS off, enforced with Ficus's policy, and enforced with the same
# policy without its (SELECT …) wrapper. Starts its own PostgreSQL cluster.
#   scripts/bench/rls.sh [rows, default 10000000] [seconds per run, default 10]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
# pingora's zlib-ng build needs cmake.
command -v cmake >/dev/null 2>&1 || { s=""; [ "$(id -u)" -ne 0 ] && s=sudo; $s apt-get update -qq && DEBIAN_FRONTEND=noninteractive $s apt-get install -y -qq cmake; }
cargo build --release --locked -p ficus-bench >/dev/null 2>&1 || cargo build --release --locked -p ficus-bench
./target/release/ficus-bench rls --rows "${1:-10000000}" --secs "${2:-10}"
