-- pg_reaper state. Every name is qualified with @extschema@ so the extension works in any
-- schema and never depends on the caller's search_path.

-- One row per fan-in barrier. `remaining` has no >= 0 check on purpose: a negative value is
-- the "already torn down" signal that barrier_decrement turns into a delete.
--
-- Index design (HOT versus reap cost): barrier_decrement rewrites remaining, results and
-- last_progress_at, so none of them is indexed and every decrement can be a HOT update
-- (fillfactor leaves room on the page for the new version). The stranded predicate still
-- reaches its rows through indexes: expires_at is never moved by a decrement, and a barrier
-- whose last progress is older than the stuck timeout was necessarily created before that
-- too, so created_at (also never moved by a decrement) bounds the stale-progress strands.
CREATE TABLE @extschema@.pg_barrier_state (
    execution_id     text        NOT NULL PRIMARY KEY,
    organization_id  text        NOT NULL DEFAULT '',
    remaining        integer     NOT NULL,
    results          jsonb       NOT NULL DEFAULT '[]'::jsonb,
    callback         jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    last_progress_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pg_barrier_execution_id_not_empty CHECK (execution_id <> ''),
    CONSTRAINT pg_barrier_expires_after_created CHECK (expires_at > created_at),
    CONSTRAINT pg_barrier_results_is_array CHECK (jsonb_typeof(results) = 'array')
) WITH (fillfactor = 70);
CREATE INDEX pg_barrier_expires_idx ON @extschema@.pg_barrier_state (expires_at);
CREATE INDEX pg_barrier_created_idx ON @extschema@.pg_barrier_state (created_at);

-- What barrier_decrement returns: a single row, so the function is entered once per call
-- (a set-returning function is entered again to say "no more rows").
CREATE TYPE @extschema@.barrier_decrement_result AS (status text, remaining integer, results jsonb);

-- One marker per claimed batch. No foreign key to the barrier on purpose: a marker may
-- outlive its barrier (barrier_abort with preserve_dedup) so that a redelivery is skipped.
CREATE TABLE @extschema@.pg_batch_dedup (
    execution_id text        NOT NULL,
    batch_index  integer     NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pg_batch_dedup_pkey PRIMARY KEY (execution_id, batch_index),
    CONSTRAINT pg_batch_dedup_batch_index_non_negative CHECK (batch_index >= 0)
);
CREATE INDEX pg_batch_dedup_created_idx ON @extschema@.pg_batch_dedup (created_at);

-- Recovery intents: one live (pending, in_flight or dead) intent per execution, enforced by
-- a partial unique index so that concurrent reapers cannot queue the same strand twice.
-- `attempts` counts claims and is the claim's fencing token; `failures` counts the failures
-- that were about this execution (compared with the relay's --max-attempts), never those of an
-- unreachable API; `mark_sent_at` is when an ERROR mark last may have left for the API;
-- `action` is set on intents an operator queued with barrier_recover() ('error' or 'refire':
-- carried out without the stranded re-check), NULL on those reaping queued.
CREATE TABLE @extschema@.pg_reaper_outbox (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    execution_id     text        NOT NULL,
    organization_id  text        NOT NULL,
    remaining        integer     NOT NULL,
    state            text        NOT NULL DEFAULT 'pending',
    outcome          text,
    attempts         integer     NOT NULL DEFAULT 0,
    failures         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_expires_at timestamptz,
    mark_sent_at     timestamptz,
    action           text,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pg_reaper_outbox_state_valid
        CHECK (state IN ('pending', 'in_flight', 'done', 'dead')),
    CONSTRAINT pg_reaper_outbox_outcome_valid
        CHECK (outcome IN ('marked_error', 'already_terminal', 'gone', 'rearmed', 'refired')),
    CONSTRAINT pg_reaper_outbox_outcome_iff_done CHECK ((state = 'done') = (outcome IS NOT NULL)),
    CONSTRAINT pg_reaper_outbox_lease_iff_in_flight
        CHECK ((state = 'in_flight') = (lease_expires_at IS NOT NULL)),
    CONSTRAINT pg_reaper_outbox_attempts_non_negative CHECK (attempts >= 0),
    CONSTRAINT pg_reaper_outbox_failures_non_negative CHECK (failures >= 0),
    CONSTRAINT pg_reaper_outbox_action_valid CHECK (action IN ('error', 'refire'))
);
CREATE UNIQUE INDEX pg_reaper_outbox_live_uniq
    ON @extschema@.pg_reaper_outbox (execution_id) WHERE state <> 'done';
CREATE INDEX pg_reaper_outbox_due_idx
    ON @extschema@.pg_reaper_outbox (next_attempt_at) WHERE state = 'pending';
CREATE INDEX pg_reaper_outbox_lease_idx
    ON @extschema@.pg_reaper_outbox (lease_expires_at) WHERE state = 'in_flight';

-- The stranded predicate, defined once. Reap, the relay's re-check, the guarded delete and the
-- status gauges all call it. It is a single-expression SQL function so the planner inlines it
-- and can use the two indexes above; its operators are schema-qualified because an inlined body
-- is parsed under the caller's search_path (and parenthesised: OPERATOR() forms all share one
-- precedence). The created_at term is implied by the last_progress_at
-- term (progress never precedes creation) and is there only to give the planner an index.
CREATE FUNCTION @extschema@.barrier_is_stranded(
    expires_at timestamptz,
    last_progress_at timestamptz,
    created_at timestamptz,
    stuck_timeout interval
) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT $1 OPERATOR(pg_catalog.<) pg_catalog.now()
        OR ($2 OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-) $4)
            AND $3 OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-) $4))
$$;

-- Keep the rows through pg_dump / pg_restore.
SELECT pg_catalog.pg_extension_config_dump('@extschema@.pg_barrier_state', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.pg_batch_dedup', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.pg_reaper_outbox', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.pg_reaper_outbox_id_seq', '');
