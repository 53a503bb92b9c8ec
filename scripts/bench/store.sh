#!/usr/bin/env bash
# The control store's benchmark: tenant import and change-feed latency, on SQLite
# and PostgreSQL, printed as a Markdown table for BENCHMARKS.md.
#   scripts/bench/store.sh [--tenants N] [--changes N]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql
fi
# pingora's zlib-ng build needs cmake.
command -v cmake >/dev/null 2>&1 || { s=""; [ "$(id -u)" -ne 0 ] && s=sudo; $s apt-get update -qq && DEBIAN_FRONTEND=noninteractive $s apt-get install -y -qq cmake; }
cargo build --release --locked -p ficus -p ficus-bench
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r)"
target/release/ficus-bench store "$@"
