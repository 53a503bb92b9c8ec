#!/usr/bin/env bash
# `ficus db rehearse` on every schema of the corpus: the public sample databases
# in shared/schemas (chinook, northwind), the rental shop shaped like the
# real-schema report, and the demo portal, each in its own throwaway cluster.
# Prints each step's time per schema against the copy step, the workload's
# rounds and errors, leaks, and whether revert restored the schema exactly;
# exits 1 if any rehearsal did not pass.
#   scripts/bench/corpus.sh [rows per table, default 10000] [schemas dir, default the copies in crates/ficus-retrofit/tests/retrofit/schemas]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
# pingora's zlib-ng build needs cmake.
command -v cmake >/dev/null 2>&1 || { s=""; [ "$(id -u)" -ne 0 ] && s=sudo; $s apt-get update -qq && DEBIAN_FRONTEND=noninteractive $s apt-get install -y -qq cmake; }
cargo build --release --locked -p ficus-bench >/dev/null 2>&1 || cargo build --release --locked -p ficus-bench
./target/release/ficus-bench corpus --rows "${1:-10000}" --schemas "${2:-crates/ficus-retrofit/tests/retrofit/schemas}"
