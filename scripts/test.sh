#!/usr/bin/env bash
# Every test, against real Postgres: the in-database pg_tests, then the integration tests that
# start their own clusters. Run by `make test` and by CI.
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
export PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"
cd "$(dirname "$0")/.."
bash scripts/setup.sh

# A killed earlier run can leave a cluster behind (the harness stops it in an exit hook).
PGRX_PGDATA=/tmp/pgr-pgrx-test
for d in "$PGRX_PGDATA"/15-*; do
  [ -d "$d" ] || continue
  runuser -u postgres -- "$(dirname "$PG_CONFIG")/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$d"
done

start=$SECONDS
echo "== pg_tests (in-database)"
cargo pgrx test pg15 --runas postgres --pgdata "$PGRX_PGDATA"

# The pg_test run installed a test build; the integration tests want the real one.
echo "== install"
cargo pgrx install --pg-config "$PG_CONFIG"

echo "== integration tests (throwaway clusters, concurrent sessions)"
cargo test --locked -p pg_reaper_tests
echo "== all tests passed in $((SECONDS - start)) s"
