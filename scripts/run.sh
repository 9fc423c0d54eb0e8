#!/usr/bin/env bash
# `make run`: a throwaway cluster with pg_reaper, a few executions fanned out, some of them
# stranded as a crashed worker would leave them, and reap_expired() turning the strands into
# recovery intents. Everything it starts is stopped and removed on exit or Ctrl-C.
# (The background worker and the relay join this demo when they land.)
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
export PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo pgrx install --pg-config "$PG_CONFIG" >/dev/null

BIN="$(dirname "$PG_CONFIG")"
DATA="$(mktemp -d /tmp/pg-reaper-run.XXXXXX)"
PORT="${PG_REAPER_RUN_PORT:-55439}"
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" -eq 0 ] && chown postgres "$DATA"
cleanup() {
  as_pg "$BIN/pg_ctl" -D "$DATA/pg" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$DATA"
}
trap cleanup EXIT INT TERM

as_pg "$BIN/initdb" -D "$DATA/pg" -A trust -U postgres --locale=C.UTF-8 >/dev/null
cat >> "$DATA/pg/postgresql.conf" <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DATA'
CONF
as_pg "$BIN/pg_ctl" -D "$DATA/pg" -l "$DATA/pg/server.log" -w start >/dev/null
psql() { command psql -X -q -h 127.0.0.1 -p "$PORT" -U postgres -d queue -v ON_ERROR_STOP=1 "$@"; }
command psql -X -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -c 'CREATE DATABASE queue'
psql -c 'CREATE EXTENSION pg_reaper'

echo "== 6 executions fan out into 3 batches each"
psql -o /dev/null <<'SQL'
SELECT barrier_enqueue('exec-' || i, 'org-demo', 3, '1 hour',
                       jsonb_build_object('task_name', 'aggregate', 'execution_id', 'exec-' || i))
  FROM generate_series(1, 6) i;
-- exec-1 and exec-2: every batch claims, decrements, the last one fires the callback and finishes.
SELECT e, b, barrier_claim(e, b) FROM (VALUES ('exec-1'), ('exec-2')) x(e), generate_series(0, 2) b;
SELECT e, (barrier_decrement(e, jsonb_build_object('batch', b))).* FROM (VALUES ('exec-1'), ('exec-2')) x(e), generate_series(0, 2) b;
SELECT barrier_finish('exec-1'), barrier_finish('exec-2');
-- exec-3: a worker was SIGKILLed after one batch. exec-4: all batches done, the callback never fired.
SELECT (barrier_decrement('exec-3', '{"batch": 0}')).status;
SELECT (barrier_decrement('exec-4', jsonb_build_object('batch', b))).status FROM generate_series(0, 2) b;
-- Let time pass for them: their deadline is behind them.
UPDATE pg_barrier_state SET created_at = now() - interval '2 hours', expires_at = now() - interval '1 minute'
 WHERE execution_id IN ('exec-3', 'exec-4', 'exec-5');
UPDATE pg_barrier_state SET organization_id = '' WHERE execution_id = 'exec-5';
SQL
echo "== barriers"
psql -c "SELECT execution_id, organization_id, remaining, jsonb_array_length(results) AS results,
                expires_at < now() AS expired FROM pg_barrier_state ORDER BY 1"
echo "== SELECT * FROM reap_expired(dry_run => true)"
psql -c "SELECT * FROM reap_expired(dry_run => true)"
echo "== SELECT * FROM reap_expired()"
psql -c "SELECT * FROM reap_expired()"
echo "== the outbox: one recovery intent per recoverable strand"
psql -c "SELECT id, execution_id, organization_id, remaining, state, attempts FROM pg_reaper_outbox ORDER BY id"
echo "== pg_reaper_status"
psql -x -c "SELECT * FROM pg_reaper_status"
