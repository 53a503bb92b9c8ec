#!/usr/bin/env bash
# The dashboard on a PostgreSQL store of a large migration: 10,000 tenants and
# 1,000,000 comparisons; the tenant board's first page, a tenant page and the
# overview loaded 100 times each (next to the API's tenant read in the same go),
# and the time from a committed stage change to an open page's event stream.
#   scripts/bench/dashboard.sh [--tenants N] [--comparisons M] [--loads L] [--changes C]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql
fi
# pingora's zlib-ng build needs cmake.
command -v cmake >/dev/null 2>&1 || { s=""; [ "$(id -u)" -ne 0 ] && s=sudo; $s apt-get update -qq && DEBIAN_FRONTEND=noninteractive $s apt-get install -y -qq cmake; }
cargo build --release --locked -p ficus-bench
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r)"
target/release/ficus-bench dashboard "$@"
