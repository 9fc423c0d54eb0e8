#!/usr/bin/env bash
# Every test, against real Postgres: the in-database pg_tests, then the integration tests that
# start their own clusters. Run by `make test` and by CI: everything on PostgreSQL 15, then on
# 14, 16, 17 and 18 the pg_tests and the SQL, worker and extension-free edition integration tests. `PG=17 make test`
# runs everything on that one major instead.
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
cd "$(dirname "$0")/.."
if [ -n "${PG:-}" ]; then FULL="$PG"; OTHERS=""; else FULL=15; OTHERS="14 16 17 18"; fi
PG_MAJORS="$FULL $OTHERS" bash scripts/setup.sh
export PG_CONFIG="$(bash scripts/pg.sh "$FULL")"

# A killed earlier run can leave a cluster behind (the harness stops it in an exit hook).
PGRX_PGDATA=/tmp/pgr-pgrx-test
for d in "$PGRX_PGDATA"/*-*; do
  [ -d "$d" ] || continue
  n="$(basename "$d")"; n="${n%%-*}"
  runuser -u postgres -- "$(dirname "$(bash scripts/pg.sh "$n")")/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$d"
done

start=$SECONDS
# Each step's wall time, printed together at the end: where a run's time goes.
times=()
step() {
  [ -z "${step_label:-}" ] || times+=("$step_label $((SECONDS - step_start)) s")
  step_label="$1"; step_start=$SECONDS
  [ -z "${2:-}" ] || echo "== $2"
}
step lint "lint and audit: rustfmt, cargo-deny over the lock file, clippy (warnings are errors)"
cargo fmt --all --check
bash scripts/audit.sh

LOG="$(mktemp /tmp/pg-reaper-test.XXXXXX)"
args=()
trap 'rm -f "$LOG"' EXIT
echo "== PostgreSQL $FULL: $("$PG_CONFIG" --version)"
step pg_tests "pg_tests (in-database)"
cargo pgrx test "pg$FULL" --runas postgres --pgdata "$PGRX_PGDATA" 2>&1 | tee -a "$LOG"

# The pg_test run installed a test build; the integration tests want the real one.
step install "install"
cargo pgrx install --pg-config "$PG_CONFIG"

step promtool "alerting rules: promtool unit tests"
(cd deploy/prometheus && promtool check rules pg_reaper.rules.yml && promtool test rules pg_reaper.rules.test.yml) 2>&1 | tee -a "$LOG"

step integration "integration tests: throwaway clusters, concurrent sessions, the worker, the relay and the sample API"
# The upgrade test builds 0.1.0, which supported PostgreSQL 15 to 17 only.
case "$FULL" in
  15|16|17) ;;
  *) args=(--skip-binary "tests test upgrade")
     echo "== (no upgrade test on PostgreSQL $FULL: 0.1.0 was never built for it)" ;;
esac
# The managed stand-in preloads Debian's pg_cron, packaged for PostgreSQL 15 here.
if [ "$FULL" != 15 ]; then
  args+=(--skip-binary "tests test managed")
  echo "== (no managed stand-in test on PostgreSQL $FULL: Debian's pg_cron package here is for 15)"
fi
# On 15 the suites that drive pg_reaper from outside run a second time, in the same schedule,
# against the extension-free edition (no worker: the relays tick it; the tests named native_…
# are about the extension itself).
if [ "$FULL" = 15 ]; then
  for t in foundation branches chaos adoption database outbox_cases soak; do args+=(--portable "$t"); done
fi
python3 scripts/tests.py "${args[@]}" -p pg_reaper_protocol -p pg_reaper_tests -p pg-reaper-relay 2>&1 | tee -a "$LOG"

step bench "benchmark smoke run (tiny sizes; the real run is make bench)"
BENCH_SMOKE=1 bash scripts/bench.sh
if [ "$FULL" = 15 ]; then
  step run "make run, both editions (the newcomer's walkthrough, with its expected outcomes)"
  bash scripts/run.sh > "$LOG.run" 2>&1 || { cat "$LOG.run"; exit 1; }
  EDITION=portable bash scripts/run.sh > "$LOG.run" 2>&1 || { cat "$LOG.run"; exit 1; }
  rm -f "$LOG.run"
  step packages "Debian packages: built, installed with apt-get, used, removed"
  bash scripts/package_test.sh
  step containers "container images: built with podman from Debian and the packages, run as the platform's compose runs them"
  DEBS="$(echo target/package/postgresql-15-pg-reaper_*.deb target/package/pg-reaper-relay_*.deb)" \
    bash scripts/containers_test.sh
fi
step end
echo "== PostgreSQL $FULL, everything: $((SECONDS - start)) s, by step:"
printf '==   %s\n' "${times[@]}"

for n in $OTHERS; do
  config="$(bash scripts/pg.sh "$n")"
  part=$SECONDS
  echo "== PostgreSQL $n: $("$config" --version): pg_tests, then the SQL, worker and extension-free edition integration tests"
  cargo pgrx test "pg$n" --runas postgres --pgdata "$PGRX_PGDATA" 2>&1 | tee -a "$LOG"
  cargo pgrx install --pg-config "$config"
  PG_CONFIG="$config" python3 scripts/tests.py -p pg_reaper_tests --test foundation --test worker --test portable 2>&1 | tee -a "$LOG"
  echo "== PostgreSQL $n took $((SECONDS - part)) s"
done

# One closing line over every runner above (set -o pipefail made any failure fatal already).
echo "== all tests ran in $((SECONDS - start)) s"
awk '/^test result: /{ for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$LOG"
