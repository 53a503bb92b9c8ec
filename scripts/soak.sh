#!/usr/bin/env bash
# The migration soak under faults (issue 20): a whole migration on real parts —
# two throwaway PostgreSQL clusters (the application's data, the control store),
# two `ficus proxy` replicas on the PostgreSQL store, HAProxy in front of them,
# the demo's legacy backend and two instances of the rebuilt one, and one client
# process per tenant reading and writing through HAProxy the whole time — with
# faults injected on a schedule drawn from the seed. Prints the verdict and
# writes it to target/soak/seed-S/verdict.json; exits 1 on any lost or
# duplicated write, cross-tenant answer, NULL tenant id, duplicate tenant or
# failed request the rules do not allow.
#
#   bash scripts/soak.sh [--minutes N] [--seed S] [--release] [--homes N] [--rate R]
#
# Installs HAProxy (and PostgreSQL) when missing. Debug builds by default (what
# CI has already built); --release for the long runs in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

minutes=30
seed=1
profile=debug
pass=()
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    --release) profile=release; shift ;;
    --homes|--rate) pass+=("$1" "$2"); shift 2 ;;
    *) echo "soak.sh: unknown argument $1 (see the header of this script)" >&2; exit 2 ;;
  esac
done

need=()
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  need+=(postgresql)
fi
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing: ${need[*]}"
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

flags=(--locked -q -p ficus -p ficus-soak)
[ "$profile" = release ] && flags+=(--release)
cargo build "${flags[@]}"
exec "target/$profile/ficus-soak" run --minutes "$minutes" --seed "$seed" \
  --ficus "target/$profile/ficus" "${pass[@]}"
