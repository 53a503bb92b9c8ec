#!/usr/bin/env bash
# Installs Citus 13.2.2 into this machine's PostgreSQL 15 for the tests and
# benchmarks of `ficus db distribute` (issue 21), only when the installed
# citus.so is missing or of another version. Citus is never linked into or
# shipped with Ficus; tests run it in throwaway clusters (ficus-testkit).
#
# The source is the vendored tarball (../shared/vendor from the project root, or
# FICUS_CITUS_SOURCE=/path/to/citus-13.2.2.tar.gz), with its one patch already
# applied (PostgreSQL 15.20 exports have_createdb_privilege()). Builds in a few
# minutes on 2 cores.
#   bash scripts/citus.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

version=13.2.2
pg_config=/usr/lib/postgresql/15/bin/pg_config
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"

# The build needs PostgreSQL 15's server headers, and the server must match
# them: installing postgresql-server-dev-15 brings the newest 15.x headers, so
# postgresql-15 is installed (upgraded) in the same command.
need=()
[ -x "$pg_config" ] && [ -d "$($pg_config --includedir-server 2>/dev/null)" ] || need+=(postgresql-15 postgresql-server-dev-15)
for h in lz4.h zstd.h openssl/ssl.h gssapi/gssapi.h; do
  [ -f "/usr/include/$h" ] || { need+=(liblz4-dev libzstd-dev libssl-dev libkrb5-dev); break; }
done
command -v make >/dev/null 2>&1 && command -v gcc >/dev/null 2>&1 || need+=(build-essential)
if [ "${#need[@]}" -gt 0 ]; then
  echo "citus.sh: installing ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

lib="$($pg_config --pkglibdir)/citus.so"
# citus_version() returns "Citus 13.2.2 on …": the version is compiled into the
# library as text.
if [ -f "$lib" ] && grep -aq "Citus $version " "$lib"; then
  exit 0
fi

source="${FICUS_CITUS_SOURCE:-}"
if [ -z "$source" ]; then
  for candidate in ../shared/vendor/citus-$version.tar.gz /work/shared/vendor/citus-$version.tar.gz; do
    [ -f "$candidate" ] && { source="$candidate"; break; }
  done
fi
if [ -z "$source" ] || [ ! -f "$source" ]; then
  echo "citus.sh: the Citus $version source is not at ../shared/vendor/citus-$version.tar.gz; set FICUS_CITUS_SOURCE to the tarball" >&2
  exit 1
fi

build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
echo "citus.sh: building Citus $version from $source (a few minutes)"
tar -xzf "$source" -C "$build"
cd "$build/citus-$version"
PG_CONFIG="$pg_config" ./configure --without-libcurl >"$build/configure.log" 2>&1 ||
  { tail -n 30 "$build/configure.log" >&2; exit 1; }
make -j"$(nproc)" with_llvm=no >"$build/make.log" 2>&1 || { tail -n 30 "$build/make.log" >&2; exit 1; }
$sudo make install with_llvm=no >"$build/install.log" 2>&1 || { tail -n 30 "$build/install.log" >&2; exit 1; }
grep -aq "Citus $version " "$lib" || { echo "citus.sh: $lib is not Citus $version after the install" >&2; exit 1; }
echo "citus.sh: Citus $version installed ($lib)"
