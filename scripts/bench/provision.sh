#!/usr/bin/env bash
# Provisioning: N signed billing events (default 1000) sent over HTTP by C clients
# (default 8) to the webhook, each timed until the tenant, its configuration and its
# organization in the tenant database are written. Starts its own PostgreSQL cluster.
#   scripts/bench/provision.sh [events, default 1000] [clients, default 8]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
# pingora's zlib-ng build needs cmake.
command -v cmake >/dev/null 2>&1 || { s=""; [ "$(id -u)" -ne 0 ] && s=sudo; $s apt-get update -qq && DEBIAN_FRONTEND=noninteractive $s apt-get install -y -qq cmake; }
cargo build --release --locked -p ficus-bench >/dev/null 2>&1 || cargo build --release --locked -p ficus-bench
./target/release/ficus-bench provision --events "${1:-1000}" --clients "${2:-8}"
