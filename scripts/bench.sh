#!/usr/bin/env bash
# `make bench`: builds and installs what it measures, then runs the driver, scripts/bench.py
# (Debian's Python, whose matplotlib draws the plots). BENCH_SMOKE=1: tiny sizes and debug
# builds, report to /tmp; `make test` runs that so the benchmark code cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"
bash scripts/setup.sh
if [ "${BENCH_SMOKE:-0}" = 1 ]; then PROFILE=(); else PROFILE=(--release); fi
echo "== building (${PROFILE[*]:-debug})"
cargo pgrx install --pg-config "$PG_CONFIG" "${PROFILE[@]}" >/dev/null
cargo build --locked -q "${PROFILE[@]}" -p pg-reaper-relay -p pg-reaper-sample-api
python3 scripts/sql.py portable >/dev/null  # the extension-free edition, measured in section 9
exec /usr/bin/python3 scripts/bench.py
