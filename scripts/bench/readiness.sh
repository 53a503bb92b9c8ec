#!/usr/bin/env bash
# `ficus readiness` on a PostgreSQL store with a busy parallel run: 1,000,000
# comparisons and 10,000 mismatches across 200 classes for the judged tenant (99
# other tenants with a hundredth each), timed as an operator runs it, next to
# `ficus tenant show` in the same go.
#   scripts/bench/readiness.sh [--comparisons N] [--mismatches M] [--classes K] [--runs R]
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
target/release/ficus-bench readiness "$@"
