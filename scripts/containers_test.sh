#!/usr/bin/env bash
# The container images used as the platform's compose deployment uses them (make test, on
# PostgreSQL 15): the database image started as the platform starts its database (its
# POSTGRES_* variables, a script in /docker-entrypoint-initdb.d), pg-reaper-init from the same
# image waiting until "the backend migrated" (here: the platform's schema loaded from the
# host), then creating the extension and the re-fire hook; the relay image configured with
# the platform's own variables only (INTERNAL_API_BASE_URL, INTERNAL_SERVICE_API_KEY and the
# DB_* of its workers' env file). A crashed execution is marked ERROR once, a lost callback
# re-fired onto the platform's queue. Containers share the host's network (these machines).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
fail() { echo "container test: $*" >&2; exit 1; }

# DEBS: the packages to build the images from (make test passes the package test's); else the
# debug builds are packaged here.
mapfile -t images < <(PACKAGE_PROFILE=debug bash scripts/containers.sh)
[ "${#images[@]}" = 2 ] || fail "make images built ${#images[@]} images, not 2"
DB_IMAGE="${images[0]}"; RELAY_IMAGE="${images[1]}"
cargo build --locked -q -p pg-reaper-sample-api
PG_PORT="${CONTAINER_TEST_PG_PORT:-25479}"; API_PORT="${CONTAINER_TEST_API_PORT:-25480}"
DATA="$(mktemp -d /tmp/pg-reaper-containers.XXXXXX)"
names=(pg-reaper-test-db pg-reaper-test-init pg-reaper-test-relay)
done_() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for n in "${names[@]}"; do pod rm -f -t 5 "$n" >/dev/null 2>&1 || true; done
  rm -rf "$DATA"
}
trap done_ EXIT
for n in "${names[@]}"; do pod rm -f "$n" >/dev/null 2>&1 || true; done

echo "== the database image, started as the platform starts its database"
mkdir -p "$DATA/initdb.d"
cat > "$DATA/initdb.d/db_setup.sh" <<'SH'
psql -U "$POSTGRES_USER" -d "$POSTGRES_DB" -c "ALTER ROLE $POSTGRES_USER SET timezone TO 'UTC'"
SH
pod_run -d --name pg-reaper-test-db -e POSTGRES_USER=unstract_dev -e POSTGRES_PASSWORD=unstract_pass \
  -e POSTGRES_DB=unstract_db -v "$DATA/initdb.d:/docker-entrypoint-initdb.d:ro,Z" \
  "$DB_IMAGE" postgres -c port="$PG_PORT" -c pg_reaper.naptime=1 >/dev/null
export PGHOST=127.0.0.1 PGPORT="$PG_PORT" PGUSER=unstract_dev PGPASSWORD=unstract_pass PGDATABASE=unstract_db
for _ in $(seq 120); do pg_isready -q && break; sleep 1; done
pg_isready -q || { pod logs pg-reaper-test-db >&2; fail "the database did not start"; }
psql -X -Atc "SHOW shared_preload_libraries" | grep -qx pg_reaper || fail "pg_reaper is not preloaded"
[ "$(psql -X -Atc "SELECT lower(setting) FROM pg_db_role_setting, unnest(setconfig) setting")" = timezone=utc ] \
  || fail "the /docker-entrypoint-initdb.d script did not run"

echo "== pg-reaper-init waits for the backend's migration, then creates the extension"
pod_run -d --name pg-reaper-test-init -e DB_HOST=127.0.0.1 -e DB_PORT="$PG_PORT" -e DB_USER=unstract_dev \
  -e DB_PASSWORD=unstract_pass -e DB_NAME=unstract_db -e DB_SCHEMA=unstract \
  "$DB_IMAGE" pg-reaper-init >/dev/null
for _ in $(seq 120); do pod logs pg-reaper-test-init 2>&1 | grep -q "waiting for the backend" && break; sleep 1; done
pod logs pg-reaper-test-init 2>&1 | grep -q "waiting for the backend" || fail "pg-reaper-init did not wait"
# The backend's --migrate: the platform's schema, as its migration creates it.
psql -X -q -v ON_ERROR_STOP=1 -f tests/fixtures/unstract_queue_schema.sql
[ "$(pod wait pg-reaper-test-init)" = 0 ] || { pod logs pg-reaper-test-init >&2; fail "pg-reaper-init failed"; }
psql -X -Atc "SELECT extversion FROM pg_extension WHERE extname = 'pg_reaper'" | grep -q . || fail "no extension"
pod_run --rm -e DB_HOST=127.0.0.1 -e DB_PORT="$PG_PORT" -e DB_USER=unstract_dev -e DB_PASSWORD=unstract_pass \
  -e DB_NAME=unstract_db "$DB_IMAGE" pg-reaper-init >/dev/null || fail "pg-reaper-init is not idempotent"

echo "== the relay image, with the platform's variables only"
KEY_FILE="$DATA/api.key"
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$KEY_FILE"
target/debug/pg-reaper-sample-api --listen "127.0.0.1:$API_PORT" --api-key-file "$KEY_FILE" 2>"$DATA/api.log" &
PIDS+=($!)
wait_for_port "$API_PORT"
pod_run -d --name pg-reaper-test-relay -e DB_HOST=127.0.0.1 -e DB_PORT="$PG_PORT" -e DB_USER=unstract_dev \
  -e DB_PASSWORD=unstract_pass -e DB_NAME=unstract_db -e DB_SCHEMA=unstract \
  -e INTERNAL_API_BASE_URL="http://127.0.0.1:$API_PORT/internal" -e INTERNAL_SERVICE_API_KEY="$(cat "$KEY_FILE")" \
  "$RELAY_IMAGE" --poll-interval 1s >/dev/null

echo "== a crashed execution and a lost callback, stranded"
for id in crashed lost-callback; do
  api PUT "/_admin/executions/$id" '{"organization_id": "org-a", "status": "EXECUTING"}' >/dev/null
done
psql -X -q -o /dev/null -v ON_ERROR_STOP=1 <<'SQL'
SELECT unstract.barrier_enqueue('crashed', 'org-a', 2, '1 hour');
SELECT unstract.barrier_claim('crashed', 0), unstract.barrier_decrement('crashed', '0');
SELECT unstract.barrier_enqueue('lost-callback', 'org-a', 1, '1 hour',
       '{"task_name": "process_batch_callback", "kwargs": {"execution_id": "lost-callback"},
         "queue": "callback", "fairness_headers": null, "transport": "pg_queue"}');
SELECT unstract.barrier_claim('lost-callback', 0), unstract.barrier_decrement('lost-callback', '{"file": 0}');
UPDATE unstract.pg_barrier_state SET created_at = now() - interval '4 hours', expires_at = now() - interval '1 second';
SQL
for _ in $(seq 180); do
  [ "$(psql -X -Atc "SELECT count(*) FROM unstract.pg_reaper_outbox WHERE state = 'done'")" = 2 ] && break
  sleep 1
done
outcomes="$(psql -X -Atc "SELECT string_agg(execution_id || '=' || coalesce(outcome, state), ' ' ORDER BY execution_id) FROM unstract.pg_reaper_outbox")"
[ "$outcomes" = "crashed=marked_error lost-callback=refired" ] || { pod logs pg-reaper-test-relay >&2; fail "outcomes: $outcomes"; }
executions="$(api GET /_admin/executions)"
python3 - "$executions" <<'PY' || fail "the status API saw: $executions"
import json, sys
e = json.loads(sys.argv[1])
assert (e["crashed"]["status"], e["crashed"]["error_marks"]) == ("ERROR", 1), e
assert (e["lost-callback"]["status"], e["lost-callback"]["error_marks"]) == ("EXECUTING", 0), e
PY
[ "$(psql -X -Atc "SELECT message->>'task_name' FROM unstract.pg_queue_message")" = process_batch_callback ] \
  || fail "the lost callback is not on the platform's queue"
echo "== containers: crashed execution marked ERROR once, lost callback re-fired onto pg_queue_message"
