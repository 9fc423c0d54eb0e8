#!/usr/bin/env bash
# Installs what building and testing pg_reaper needs, and nothing that is already there.
# `SETUP_FOR=build` (make run, lint, check, install, package) installs what building and running
# it takes: Debian's PostgreSQL 15 with server headers, clang for bindgen, sudo and runuser (to
# run Postgres as the postgres OS user when we are root), cargo-pgrx 0.18.1 and its config.
# The default, `SETUP_FOR=test` (make test, bench, soak), adds what the tests start: openssl
# (they make certificates), prometheus (promtool and a real server for the alerting-rule and
# dashboard tests), pgbouncer, patroni and etcd-server (the failover test), pg_cron (the
# managed stand-in's scheduler), matplotlib and valgrind (the benchmark's plots and its
# instruction counts), a Python virtualenv with psycopg (the platform-worker test), podman,
# mmdebstrap and runc (the container images, also `SETUP_FOR=images`: make images), and every
# PostgreSQL major in PG_MAJORS (default 15; the others from scripts/pg.sh).
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
cd "$(dirname "$0")/.."
FOR="${SETUP_FOR:-test}"
packages=(postgresql-15 postgresql-server-dev-15 postgresql-client-15 libclang-dev clang sudo util-linux)
if [ "$FOR" = test ]; then
  packages+=(openssl prometheus pgbouncer postgresql-15-cron python3 python3-venv python3-matplotlib patroni etcd-server valgrind)
fi
if [ "$FOR" = test ] || [ "$FOR" = images ]; then
  packages+=(podman mmdebstrap runc)
fi

missing=()
for p in "${packages[@]}"; do
  # Installed, not merely known to dpkg (a removed package keeps its configuration files).
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -qx 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing Debian packages (${missing[*]}); run as root or install them" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! cargo pgrx --version 2>/dev/null | grep -qx 'cargo-pgrx 0.18.1'; then
  echo "setup: installing cargo-pgrx 0.18.1"
  cargo install cargo-pgrx --version 0.18.1 --locked
fi

cargo fetch --locked

# psycopg2 for the platform-worker test, pinned by hash, in target/python (Debian's Python).
venv="$PWD/target/python"
requirements="tests/python/requirements.txt"
if [ "$FOR" = test ] && ! cmp -s "$requirements" "$venv/requirements.txt" 2>/dev/null; then
  echo "setup: installing psycopg2 into $venv"
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --require-hashes -r "$requirements"
  cp "$requirements" "$venv/requirements.txt"
fi

# cargo-pgrx's list of PostgreSQL installations: each major asked for, and those already listed
# (`cargo pgrx init` replaces the whole file). It rewrites the file even when nothing changes,
# which rebuilds pgrx-pg-sys: only run it when a major is missing or moved.
config="$HOME/.pgrx/config.toml"
declare -A known=()
if [ -f "$config" ]; then
  while IFS=' =' read -r key path; do
    if [[ "$key" =~ ^pg[0-9]+$ ]]; then known[${key#pg}]="${path//\"/}"; fi
  done < "$config"
fi
stale=0
for n in ${PG_MAJORS:-15}; do
  path="$(bash scripts/pg.sh "$n")"
  [ "${known[$n]:-}" = "$path" ] || { known[$n]="$path"; stale=1; }
done
if [ "$stale" = 1 ]; then
  args=()
  for n in "${!known[@]}"; do args+=("--pg$n" "${known[$n]}"); done
  cargo pgrx init "${args[@]}"
fi
