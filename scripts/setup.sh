#!/usr/bin/env bash
# Installs what building and testing pg_reaper needs, and nothing that is already there:
# Debian's PostgreSQL 15 with server headers, clang for bindgen, sudo and runuser (to run
# Postgres as the postgres OS user when we are root), openssl (the tests make certificates),
# prometheus (promtool and a real server for the alerting-rule and dashboard tests), pgbouncer
# and a Python virtualenv with psycopg (the platform-worker test), cargo-pgrx 0.18.1, and its
# config.
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"
packages=(postgresql-15 postgresql-server-dev-15 postgresql-client-15 libclang-dev clang sudo util-linux openssl prometheus
          pgbouncer python3 python3-venv)

missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
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

# `cargo pgrx init` rewrites the file even when nothing changes, which rebuilds pgrx-pg-sys:
# only run it when the file does not already point at this pg_config.
if ! grep -qs "^pg15 = \"$PG_CONFIG\"" "$HOME/.pgrx/config.toml"; then
  cargo pgrx init --pg15 "$PG_CONFIG"
fi
cargo fetch --locked

# psycopg for the platform-worker test, pinned by hash, in target/python (Debian's Python).
venv="$(cd "$(dirname "$0")/.." && pwd)/target/python"
requirements="$(dirname "$0")/../tests/python/requirements.txt"
if ! cmp -s "$requirements" "$venv/requirements.txt" 2>/dev/null; then
  echo "setup: installing psycopg into $venv"
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --require-hashes -r "$requirements"
  cp "$requirements" "$venv/requirements.txt"
fi
