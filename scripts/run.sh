#!/usr/bin/env bash
# `make run`: pg_reaper end to end on a throwaway cluster. The extension and its background
# worker (preloaded, naptime 1 s), the bundled sample status API and the relay all run; a few
# dozen executions fan out, some finish normally and some are stranded as crashed workers
# leave them; the worker reaps, the relay recovers, and the outcome of every execution is
# shown from both sides. Ctrl-C or the end stops everything it started and removes the cluster.
#
# EDITION=portable (make run EDITION=portable): the same with the extension-free edition, as on
# a managed service: nothing preloaded, the edition installed by the queue's owner (not a
# superuser), and the relay ticking it (--reap-interval 1s) in place of the worker.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
EDITION="${EDITION:-native}"
case "$EDITION" in native|portable) ;; *) echo "EDITION must be native or portable, not '$EDITION'" >&2; exit 2 ;; esac
SETUP_FOR=build bash scripts/setup.sh
echo "== building and installing ($EDITION edition)"
if [ "$EDITION" = native ]; then
  cargo pgrx install --pg-config "$PG_CONFIG" >/dev/null
else
  python3 scripts/sql.py portable >/dev/null
fi
cargo build --locked -q -p pg-reaper-relay -p pg-reaper-sample-api
RELAY=target/debug/pg-reaper-relay
SAMPLE_API=target/debug/pg-reaper-sample-api
PG_PORT="${PG_REAPER_RUN_PORT:-25439}"
API_PORT="${PG_REAPER_RUN_API_PORT:-25440}"
METRICS_PORT="${PG_REAPER_RUN_METRICS_PORT:-25441}"

if [ "$EDITION" = native ]; then
  echo "== a throwaway cluster on port $PG_PORT with pg_reaper preloaded"
  throwaway_cluster run "$PG_PORT" <<CONF
shared_preload_libraries = 'pg_reaper'
pg_reaper.database = 'queue'
pg_reaper.naptime = 1
CONF
  USER_=postgres
else
  echo "== a throwaway cluster on port $PG_PORT that preloads nothing, and a queue owner that is no superuser"
  throwaway_cluster run "$PG_PORT" </dev/null
  USER_=queue_owner
  command psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres \
    -c 'CREATE ROLE queue_owner LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE'
fi
psql() { command psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U "$USER_" -d queue -v ON_ERROR_STOP=1 "$@"; }
command psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -c "CREATE DATABASE queue OWNER $USER_"
if [ "$EDITION" = native ]; then
  psql -c 'CREATE EXTENSION pg_reaper'
else
  echo "== the extension-free edition, installed by queue_owner into its schema public"
  psql -f target/portable/pg_reaper.sql
fi

KEY_FILE="$DATA/api.key"
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$KEY_FILE"
echo "== the sample status API on 127.0.0.1:$API_PORT (a development stand-in for the platform's)"
"$SAMPLE_API" --listen "127.0.0.1:$API_PORT" --api-key-file "$KEY_FILE" 2>"$DATA/api.log" &
PIDS+=($!)
wait_for_port "$API_PORT"

echo "== 24 executions fan out into 3 batches each"
# A callback re-fire hook: instead of marking an all-batches-done strand ERROR, re-enqueue its
# callback (here: record it in a table, as a queue's enqueue function would).
# In the extension-free edition the hook must be SECURITY DEFINER with a fixed search_path, and
# the setting lives in pg_reaper_settings (only a superuser may ALTER DATABASE … SET pg_reaper.x).
psql <<'SQL'
CREATE TABLE callback_queue (execution_id text, organization_id text, callback jsonb, results jsonb,
                             enqueued_at timestamptz DEFAULT now());
CREATE FUNCTION public.refire_callback(e text, o text, c jsonb, r jsonb) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ INSERT INTO public.callback_queue VALUES (e, o, c, r) $$;
INSERT INTO pg_reaper_settings VALUES ('pg_reaper.refire_function', 'public.refire_callback');
SQL
declare -A kind
for i in $(seq -w 1 12); do kind[exec-$i]=normal; done
for i in $(seq -w 13 20); do kind[exec-$i]=crashed; done
kind[exec-21]=callback-lost; kind[exec-22]=finish-lost; kind[exec-23]=no-org; kind[exec-24]=deleted
for id in "${!kind[@]}"; do
  case "${kind[$id]}" in
    finish-lost|normal) status=COMPLETED ;;
    *) status=EXECUTING ;;
  esac
  org=org-demo; [ "${kind[$id]}" = no-org ] && org=''
  [ "${kind[$id]}" = deleted ] || api PUT "/_admin/executions/$id" "{\"organization_id\": \"$org\", \"status\": \"$status\"}" >/dev/null
  psql -o /dev/null -c "SELECT barrier_enqueue('$id', '$org', 3, '1 hour', '{\"task_name\": \"aggregate\", \"queue\": \"callbacks\"}')" 2>/dev/null
done
psql -o /dev/null <<'SQL'
-- Normal runs: every batch claims, decrements, the last one fires the callback and finishes.
SELECT barrier_claim(e, b), barrier_decrement(e, jsonb_build_object('batch', b))
  FROM (SELECT 'exec-' || lpad(i::text, 2, '0') e FROM generate_series(1, 12) i) x, generate_series(0, 2) b
 ORDER BY e, b;
SELECT barrier_finish('exec-' || lpad(i::text, 2, '0')) FROM generate_series(1, 12) i;
-- Crashed workers: one or two batches done, then nothing.
SELECT barrier_claim(e, 0), barrier_decrement(e, '{"batch": 0}')
  FROM (SELECT 'exec-' || i e FROM generate_series(13, 20) i) x;
-- exec-21: every batch done, but the worker died before enqueueing the callback.
-- exec-22: the callback ran (the execution COMPLETED) but barrier_finish never happened.
SELECT barrier_claim(e, b), barrier_decrement(e, jsonb_build_object('batch', b))
  FROM (VALUES ('exec-21'), ('exec-22')) x(e), generate_series(0, 2) b;
-- Let time pass for the unfinished ones: their 1 hour deadline is behind them.
UPDATE pg_barrier_state SET created_at = now() - interval '2 hours', expires_at = now() - interval '1 second';
SQL
if [ "$EDITION" = native ]; then
  echo "== barriers left behind: $(psql -Atc 'SELECT count(*) FROM pg_barrier_state') (the worker reaps within a naptime)"
  TICK=()
else
  echo "== barriers left behind: $(psql -Atc 'SELECT count(*) FROM pg_barrier_state') (the relay ticks the edition every second)"
  TICK=(--reap-interval 1s)
fi

echo "== the relay (logs in $DATA/relay.log)"
PG_REAPER_API_KEY_FILE="$KEY_FILE" "$RELAY" "${TICK[@]}" \
  --database-url "host=127.0.0.1 port=$PG_PORT user=$USER_ dbname=queue" \
  --api-base-url "http://127.0.0.1:$API_PORT/internal" \
  --poll-interval 1s --backoff-base 250ms --concurrency 4 --listen "127.0.0.1:$METRICS_PORT" \
  2>"$DATA/relay.log" &
PIDS+=($!)

# Until the 11 recoverable strands are done (3 minutes at most: CI machines are loaded).
for _ in $(seq 180); do
  line="$(psql -Atc "SELECT format('worker %s | outbox pending %s, in flight %s, done %s, dead %s | barriers stranded %s',
                       coalesce(worker_state, '-'), outbox_pending, outbox_in_flight, outbox_done, outbox_dead,
                       barriers_stranded) FROM pg_reaper_status")"
  echo "   $line"
  done_n="$(psql -Atc "SELECT count(*) FROM pg_reaper_outbox WHERE state = 'done'")"
  [ "$done_n" -ge 11 ] && break
  sleep 1
done

echo "== outcome per execution (database and status API)"
API_STATE="$(api GET /_admin/executions)"
psql -v api="$API_STATE" <<'SQL'
SELECT e.id AS execution, coalesce(o.outcome, CASE WHEN b.execution_id IS NOT NULL THEN 'left: ' ||
           CASE WHEN b.organization_id = '' THEN 'no organization' ELSE 'not recovered' END
         ELSE 'completed normally' END) AS outcome,
       a.value ->> 'status' AS api_status, (a.value ->> 'error_marks')::int AS error_marks,
       b.execution_id IS NOT NULL AS barrier_left,
       EXISTS (SELECT 1 FROM callback_queue q WHERE q.execution_id = e.id) AS callback_refired
  FROM (SELECT 'exec-' || lpad(i::text, 2, '0') AS id FROM generate_series(1, 24) i) e
  LEFT JOIN pg_reaper_outbox o ON o.execution_id = e.id
  LEFT JOIN pg_barrier_state b ON b.execution_id = e.id
  LEFT JOIN jsonb_each(:'api'::jsonb) a ON a.key = e.id
 ORDER BY e.id;
SQL
psql -x -c "SELECT * FROM pg_reaper_status"

echo "== what an operator sees of one recovered and one unrecoverable execution: barrier_explain()"
psql -At -c "SELECT jsonb_pretty(barrier_explain('exec-13'))" -c "SELECT jsonb_pretty(barrier_explain('exec-23'))"

echo "== the relay's /metrics (one scrape target: relay counters and database gauges), summarised"
metrics="$(exec 3<>"/dev/tcp/127.0.0.1/$METRICS_PORT"; printf 'GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' >&3; cat <&3)"
printf '%s\n' "$metrics" | grep -E '^pg_reaper_(relay_outcomes_total|relay_api_reachable|outbox_intents|barriers|worker_leader|relay_intents_claimed_total)' \
  | grep -v ' 0$' | sed 's/^/   /' || true
# What the walkthrough promises (make test runs it for both editions): the 11 recoverable strands
# recovered, each ERROR mark sent once, the lost callback re-fired.
expected="11 8 1"
seen="$(psql -Atc "SELECT format('%s %s %s', count(*) FILTER (WHERE state = 'done'),
                          count(*) FILTER (WHERE outcome = 'marked_error'), count(*) FILTER (WHERE outcome = 'refired'))
                     FROM pg_reaper_outbox")"
marks="$(api GET /_admin/executions | python3 -c 'import json, sys; print(sum(e.get("error_marks", 0) for e in json.load(sys.stdin).values()))')"
if [ "$seen" != "$expected" ] || [ "$marks" != 8 ]; then
  echo "== FAILED: done, marked, re-fired intents: $seen (expected $expected); ERROR marks sent: $marks (expected 8)" >&2
  exit 1
fi
echo "== done; stopping the relay, the API and the cluster"
