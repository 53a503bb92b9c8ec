#!/usr/bin/env bash
# The guard's reaction time: from a tenant's first bad answer on the new backend
# to legacy serving that tenant on both of two proxy replicas (PostgreSQL store,
# default thresholds), as p50/p99 over many trips, at several request rates for
# that tenant. The peer is the rate itself: the guard cannot act before the
# minimum sample (20 answers) has arrived, so 20 / rate is the floor.
#   scripts/bench/guard.sh [trials per rate, default 20]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
trials="${1:-20}"
for rate in 0 50 10; do
  FICUS_GUARD_TRIALS="$trials" FICUS_GUARD_RATE="$rate" \
    cargo test --release --locked -q -p ficus --test it proxy::guard_reaction_time -- --ignored --nocapture 2>/dev/null \
    | grep '^guard rate=' | while read -r line; do
        if [ "$rate" -gt 0 ]; then
          echo "$line floor=$(awk "BEGIN { printf \"%.2fs\", 20 / $rate }")"
        else
          echo "$line"
        fi
      done
done
