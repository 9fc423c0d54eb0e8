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
echo "== lint and audit: rustfmt, cargo-deny over the lock file, clippy (warnings are errors)"
cargo fmt --all --check
bash scripts/audit.sh

LOG="$(mktemp /tmp/pg-reaper-test.XXXXXX)"
trap 'rm -f "$LOG"' EXIT
echo "== pg_tests (in-database)"
cargo pgrx test pg15 --runas postgres --pgdata "$PGRX_PGDATA" 2>&1 | tee -a "$LOG"

# The pg_test run installed a test build; the integration tests want the real one.
echo "== install"
cargo pgrx install --pg-config "$PG_CONFIG"

echo "== alerting rules: promtool unit tests"
(cd deploy/prometheus && promtool check rules pg_reaper.rules.yml && promtool test rules pg_reaper.rules.test.yml) 2>&1 | tee -a "$LOG"

echo "== integration tests: throwaway clusters, concurrent sessions, the worker, the relay and the sample API"
cargo test --locked -p pg_reaper_protocol -p pg_reaper_tests -p pg-reaper-relay 2>&1 | tee -a "$LOG"

echo "== benchmark smoke run (tiny sizes; the real run is make bench)"
BENCH_SMOKE=1 bash scripts/bench.sh

# One closing line over every runner above (set -o pipefail made any failure fatal already).
echo "== all tests ran in $((SECONDS - start)) s"
awk '/^test result: /{ for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$LOG"
