#!/usr/bin/env bash
# The Debian packages, used as an operator would: `make package`, then, on this machine, what
# `cargo pgrx install` put into PostgreSQL 15's directories removed, both packages installed with
# apt-get, a cluster with the packaged library preloaded, CREATE EXTENSION, the worker leading
# and queuing a stranded execution, the packaged relay recovering it through the sample status
# API, the systemd unit verified; then both packages removed. Run by `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
source scripts/lib.sh
fail() { echo "package test: $*" >&2; exit 1; }

# Debug builds (the ones the tests already made): the packaging is what is tested here.
mapfile -t debs < <(PACKAGE_PROFILE=debug bash scripts/package.sh)
[ "${#debs[@]}" = 2 ] || fail "make package built ${#debs[@]} packages, not 2"
for deb in "${debs[@]}"; do
  echo "== $(basename "$deb"): $(dpkg-deb --field "$deb" Package Version | tr '\n' ' ')"
  dpkg-deb --contents "$deb" | awk '{ print "   " $6 }' | grep -v '/$'
done

echo "== apt-get install of both, after removing what cargo pgrx install put there"
rm -f "$("$PG_CONFIG" --pkglibdir)/pg_reaper.so" "$("$PG_CONFIG" --sharedir)"/extension/pg_reaper*
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${debs[@]/#/$PWD/}" >/dev/null
removed() {
  DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq postgresql-15-pg-reaper pg-reaper-relay >/dev/null 2>&1 || true
}
trap removed EXIT
dpkg -L postgresql-15-pg-reaper | grep -qx "$("$PG_CONFIG" --pkglibdir)/pg_reaper.so" \
  || fail "the library is not where PostgreSQL 15 loads it from"
for script in sql/pg_reaper--*--*.sql; do
  dpkg -L postgresql-15-pg-reaper | grep -q "/extension/$(basename "$script")$" || fail "$script is not packaged"
done
for doc in pg_reaper-extension-free.sql unstract-refire.sql; do
  dpkg -L postgresql-15-pg-reaper | grep -qx "/usr/share/doc/postgresql-15-pg-reaper/$doc" || fail "$doc is not packaged"
done
# The release's other artifacts: the edition's file, the same as the packaged one, and checksums.
version="$(dpkg-deb --field "${debs[0]}" Version)"
cmp -s "target/package/pg_reaper-$version.sql" /usr/share/doc/postgresql-15-pg-reaper/pg_reaper-extension-free.sql \
  || fail "target/package/pg_reaper-$version.sql is not the packaged edition file"
(cd target/package && sha256sum --check --quiet SHA256SUMS) || fail "SHA256SUMS does not check"
[ "$(wc -l < target/package/SHA256SUMS)" = 3 ] || fail "SHA256SUMS does not list the three artifacts"
systemd-analyze verify /lib/systemd/system/pg-reaper-relay.service
pg-reaper-relay --version

echo "== a cluster with the packaged library preloaded"
PG_PORT="${PACKAGE_TEST_PG_PORT:-25459}"; API_PORT="${PACKAGE_TEST_API_PORT:-25460}"
throwaway_cluster package "$PG_PORT" <<CONF
shared_preload_libraries = 'pg_reaper'
pg_reaper.database = 'queue'
pg_reaper.naptime = 0.2
CONF
trap 'cleanup; removed' EXIT
psql() { command psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d queue -v ON_ERROR_STOP=1 "$@"; }
command psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -c 'CREATE DATABASE queue'
psql -c 'CREATE EXTENSION pg_reaper'
[ "$(psql -Atc "SELECT extversion FROM pg_extension WHERE extname = 'pg_reaper'")" = "$(dpkg-query -W -f '${Version}' postgresql-15-pg-reaper)" ] \
  || fail "the extension's version is not the package's"

cargo build --locked -q -p pg-reaper-relay -p pg-reaper-sample-api
KEY_FILE="$DATA/api.key"
echo package-test-key > "$KEY_FILE"
target/debug/pg-reaper-sample-api --listen "127.0.0.1:$API_PORT" --api-key-file "$KEY_FILE" 2>"$DATA/api.log" &
PIDS+=($!)
wait_for_port "$API_PORT"
api PUT /_admin/executions/pkg-1 '{"organization_id": "org", "status": "EXECUTING"}' >/dev/null

echo "== a stranded execution: the worker queues it, the packaged relay marks it ERROR"
psql -o /dev/null -c "SELECT barrier_enqueue('pkg-1', 'org', 2)" \
  -c "SELECT barrier_claim('pkg-1', 0), barrier_decrement('pkg-1', '1')" \
  -c "UPDATE pg_barrier_state SET created_at = now() - interval '2 hours', expires_at = now() - interval '1 second'"
for _ in $(seq 600); do
  [ "$(psql -Atc "SELECT count(*) FROM pg_reaper_outbox WHERE execution_id = 'pkg-1'")" = 1 ] && break
  sleep 0.1
done
[ "$(psql -Atc "SELECT worker_state FROM pg_reaper_status")" = leader ] || fail "the worker does not lead"
PG_REAPER_API_KEY_FILE="$KEY_FILE" /usr/bin/pg-reaper-relay --once \
  --database-url "host=127.0.0.1 port=$PG_PORT user=postgres dbname=queue" \
  --api-base-url "http://127.0.0.1:$API_PORT/internal" 2>"$DATA/relay.log" \
  || { cat "$DATA/relay.log" >&2; fail "the relay failed"; }
outcome="$(psql -Atc "SELECT state || ' ' || coalesce(outcome, '') FROM pg_reaper_outbox WHERE execution_id = 'pkg-1'")"
[ "$outcome" = "done marked_error" ] || fail "the intent is '$outcome', not done marked_error"
marked="$(api GET /_admin/executions | python3 -c 'import json, sys; print(json.load(sys.stdin)["pkg-1"]["status"])')"
[ "$marked" = ERROR ] || fail "the API has pkg-1 as $marked, not ERROR"

cleanup
removed
for f in "$("$PG_CONFIG" --pkglibdir)/pg_reaper.so" /usr/bin/pg-reaper-relay; do
  [ ! -e "$f" ] || fail "$f is still there after apt-get remove"
done
# Leave the machine as the test found it: this tree's build installed.
cargo pgrx install --pg-config "$PG_CONFIG" >/dev/null
echo "== package test passed: installed, recovered one execution, removed"
