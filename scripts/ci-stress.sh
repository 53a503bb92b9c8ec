#!/usr/bin/env bash
# Runs the workspace's test suite N times in a row, optionally with every core
# kept busy by a CPU hog beside it, and prints each test that failed with how
# many runs it failed in. A test whose outcome depends on the machine's speed
# shows up here long before it turns CI red.
#
#   scripts/ci-stress.sh [--runs N] [--hog] [-- extra cargo test arguments]
#
# --hog runs `stress-ng --cpu 0` (one busy worker per core; Debian's stress-ng,
# installed when missing) or, without it, one shell busy loop per core.
# Exit 0 when every run passed, 1 otherwise. Logs are kept in a temporary folder
# whose path is printed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

runs=5
hog=false
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="$2"; shift 2 ;;
    --hog) hog=true; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "ci-stress: unknown argument $1 (expected --runs N, --hog, -- cargo args)" >&2; exit 2 ;;
  esac
done
case "$runs" in
  ''|*[!0-9]*|0) echo "ci-stress: --runs needs a positive whole number, got '$runs'" >&2; exit 2 ;;
esac

logs="$(mktemp -d -t ficus-ci-stress.XXXXXX)"
echo "logs: $logs"

# Build once, outside the measured runs, so that every run tests the same binaries.
cargo test --workspace --locked --no-run -q "${extra[@]}" >"$logs/build.log" 2>&1 || {
  echo "ci-stress: the build failed, see $logs/build.log" >&2
  exit 1
}

hog_pids=()
stop_hog() {
  for pid in "${hog_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${hog_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  hog_pids=()
}
trap stop_hog EXIT
if $hog; then
  if ! command -v stress-ng >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends stress-ng; } >/dev/null 2>&1 || true
  fi
  if command -v stress-ng >/dev/null 2>&1; then
    stress-ng --cpu 0 --quiet &
    hog_pids+=($!)
    echo "hog: stress-ng --cpu 0 ($(nproc) workers)"
  else
    for _ in $(seq "$(nproc)"); do
      bash -c 'while :; do :; done' &
      hog_pids+=($!)
    done
    echo "hog: $(nproc) busy loops"
  fi
fi

failed_runs=0
for i in $(seq "$runs"); do
  start=$(date +%s)
  if cargo test --workspace --locked "${extra[@]}" >"$logs/run-$i.log" 2>&1; then
    verdict=passed
  else
    verdict=FAILED
    failed_runs=$((failed_runs + 1))
  fi
  passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$logs/run-$i.log" | awk '{s += $4} END {print s + 0}')
  echo "run $i/$runs: $verdict ($passed tests passed, $(($(date +%s) - start)) s)"
done
stop_hog

echo
if [ "$failed_runs" -eq 0 ]; then
  echo "every run passed ($runs of $runs$($hog && echo ', under a CPU hog'))"
  exit 0
fi
echo "failing tests (runs failed in, of $runs):"
cat "$logs"/run-*.log | grep -E '^test .* \.\.\. FAILED$' | sed -E 's/^test (.*) \.\.\. FAILED$/\1/' | sort | uniq -c | sort -rn
# A run can fail without a failing test line (a build or harness error).
echo "$failed_runs of $runs runs failed; logs in $logs"
exit 1
