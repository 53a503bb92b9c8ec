#!/usr/bin/env bash
# The README's first command: on a fresh Debian machine with a Rust toolchain,
# installs what is missing (PostgreSQL's server binaries, which the demo's
# throwaway database needs; cmake and util-linux, which the build and the cluster
# helper need), builds Ficus, and runs `ficus demo`. Extra arguments go to the
# demo (--fast, --keep).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  need+=(postgresql)
fi
command -v runuser >/dev/null 2>&1 || need+=(util-linux)
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing: ${need[*]}"
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
cargo build --release --locked -p ficus
exec ./target/release/ficus demo "$@"
