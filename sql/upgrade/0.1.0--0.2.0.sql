-- pg_reaper 0.1.0 → 0.2.0: ALTER EXTENSION pg_reaper UPDATE runs this in one transaction.
--
-- What changes: the outbox gains failures, mark_sent_at and action, pg_barrier_state refired_at,
-- callback_due_at and cut_from, pg_batch_dedup the lease columns (with an index each for the
-- deadlines the worker cuts, and a sequence for the leases' tokens); the two reaping indexes of
-- pg_barrier_state become (expires_at, execution_id) and (created_at, execution_id), the
-- outbox's due index (next_attempt_at, id); the settings table is new; every function becomes
-- SQL (the same definitions as a fresh install: this file is generated, see below);
-- outbox_claim gains due_by and outbox_resolve the claim's attempt (fenced resolve);
-- reaper_status() and the status view gain the leader lock holder; barrier_explain, barrier_recover, outbox_defer and
-- outbox_mark_sending are new. Every row is kept. Grants are carried over: a role that could
-- call a replaced function can call its replacement, a role that could call outbox_fail (the
-- relay) can call the two new relay functions, and a role that could read the status view still
-- can. The operator functions are granted to nobody, as in a fresh install.
\echo Use "ALTER EXTENSION pg_reaper UPDATE TO '0.2.0'" to load this file. \quit

ALTER TABLE @extschema@.pg_reaper_outbox
    ADD COLUMN failures integer NOT NULL DEFAULT 0,
    ADD COLUMN mark_sent_at timestamptz,
    ADD COLUMN action text,
    ADD CONSTRAINT pg_reaper_outbox_failures_non_negative CHECK (failures >= 0),
    ADD CONSTRAINT pg_reaper_outbox_action_valid CHECK (action IN ('error', 'refire'));

-- A re-fired execution's barrier stays, marked, until its status is terminal.
ALTER TABLE @extschema@.pg_barrier_state ADD COLUMN IF NOT EXISTS refired_at timestamptz;
-- The callback timeout's deadline, and the deadline a cut for it saved.
ALTER TABLE @extschema@.pg_barrier_state
    ADD COLUMN IF NOT EXISTS callback_due_at timestamptz,
    ADD COLUMN IF NOT EXISTS cut_from timestamptz;
-- Leased claims: the fencing token and the lease's end.
ALTER TABLE @extschema@.pg_batch_dedup
    ADD COLUMN IF NOT EXISTS lease_token bigint,
    ADD COLUMN IF NOT EXISTS lease_expires_at timestamptz;
CREATE INDEX IF NOT EXISTS pg_barrier_callback_due_idx
    ON @extschema@.pg_barrier_state (callback_due_at) WHERE callback_due_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS pg_batch_dedup_lease_idx
    ON @extschema@.pg_batch_dedup (lease_token) WHERE lease_token IS NOT NULL;
CREATE SEQUENCE @extschema@.pg_reaper_lease_token_seq;
SELECT pg_catalog.pg_extension_config_dump('@extschema@.pg_reaper_lease_token_seq', '');

-- 0.1.0 counted every claim towards --max-attempts; 0.2.0 counts failures. A live intent keeps
-- the budget it has used: its earlier claims (not the one in flight) count as failures.
UPDATE @extschema@.pg_reaper_outbox
   SET failures = CASE WHEN state = 'in_flight' THEN GREATEST(attempts - 1, 0) ELSE attempts END
 WHERE state <> 'done';

-- The reaping indexes gain the execution id: the worker walks the strands in (deadline, id) and
-- (creation, id) order and resumes after the last one it queued.
DROP INDEX @extschema@.pg_barrier_expires_idx;
DROP INDEX @extschema@.pg_barrier_created_idx;
CREATE INDEX pg_barrier_expires_key_idx ON @extschema@.pg_barrier_state (expires_at, execution_id);
CREATE INDEX pg_barrier_created_key_idx ON @extschema@.pg_barrier_state (created_at, execution_id);
-- Claims read due intents in (next_attempt_at, id) order: the id breaks the ties of intents
-- queued by one statement.
DROP INDEX @extschema@.pg_reaper_outbox_due_idx;
CREATE INDEX pg_reaper_outbox_due_idx
    ON @extschema@.pg_reaper_outbox (next_attempt_at, id) WHERE state = 'pending';

-- The replaced objects are renamed first, so that their grants can be copied to their
-- replacements below, and dropped last.
ALTER FUNCTION @extschema@.outbox_claim(integer, interval) RENAME TO outbox_claim_0_1_0;
ALTER FUNCTION @extschema@.outbox_resolve(bigint, text) RENAME TO outbox_resolve_0_1_0;
ALTER VIEW @extschema@.pg_reaper_status RENAME TO pg_reaper_status_0_1_0;
ALTER FUNCTION @extschema@.reaper_status() RENAME TO reaper_status_0_1_0;

-- What only the library can do: the worker's columns of the status view, the re-fire hook's
-- call as its owner, the edition's name and the settings' GUCs (as pgrx declares them for a
-- fresh install).
CREATE FUNCTION @extschema@.pg_reaper_worker() RETURNS TABLE (
	"leader_pid" INT,
	"last_tick_at" timestamp with time zone,
	"ticks" bigint,
	"last_tick_queued" INT,
	"worker_state" TEXT,
	"failed_ticks" bigint,
	"lock_holder_pid" INT,
	"lock_holder_role" TEXT,
	"lock_holder_application" TEXT
)
STRICT SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'pg_reaper_worker_wrapper';

CREATE FUNCTION @extschema@.pg_reaper_run_hook(
	"hook" oid,
	"execution_id" TEXT,
	"organization_id" TEXT,
	"callback" jsonb,
	"results" jsonb
) RETURNS void
STRICT PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'pg_reaper_run_hook_wrapper';

CREATE FUNCTION @extschema@.pg_reaper_edition() RETURNS TEXT
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'pg_reaper_edition_wrapper';

CREATE FUNCTION @extschema@.pg_reaper_guc(
	"name" TEXT
) RETURNS TEXT
STABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'pg_reaper_guc_wrapper';

-- @adoption: the check of the barrier tables, as sql/schema.sql defines it

-- @functions: every function, as a fresh install creates it (sql/*.sql, in src/lib.rs's order)

-- @finalize: the status view and the revocation from PUBLIC, as a fresh install does them

DO $grants$
DECLARE
    g record;
BEGIN
    FOR g IN
        SELECT p.target, a.grantee::regrole AS grantee, a.is_grantable
          FROM (VALUES
                  ('@extschema@.outbox_claim_0_1_0(integer, interval)'::regprocedure,
                   '@extschema@.outbox_claim(integer, interval, timestamptz)'::regprocedure::text),
                  ('@extschema@.outbox_resolve_0_1_0(bigint, text)'::regprocedure,
                   '@extschema@.outbox_resolve(bigint, integer, text)'::regprocedure::text),
                  ('@extschema@.reaper_status_0_1_0()'::regprocedure,
                   '@extschema@.reaper_status()'::regprocedure::text),
                  ('@extschema@.outbox_fail(bigint, integer, text, interval, integer)'::regprocedure,
                   '@extschema@.outbox_defer(bigint, integer, text, interval)'::regprocedure::text),
                  ('@extschema@.outbox_fail(bigint, integer, text, interval, integer)'::regprocedure,
                   '@extschema@.outbox_mark_sending(bigint, integer, interval)'::regprocedure::text)
               ) AS p(source, target),
               pg_catalog.aclexplode((SELECT f.proacl FROM pg_catalog.pg_proc f WHERE f.oid = p.source)) a
         WHERE a.privilege_type = 'EXECUTE' AND a.grantee <> 0
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %s%s', g.target, g.grantee,
                                  CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
    FOR g IN
        SELECT a.grantee::regrole AS grantee, a.privilege_type, a.is_grantable
          FROM pg_catalog.aclexplode((SELECT c.relacl FROM pg_catalog.pg_class c
                                       WHERE c.oid = '@extschema@.pg_reaper_status_0_1_0'::regclass)) a
         WHERE a.grantee <> 0
    LOOP
        EXECUTE pg_catalog.format('GRANT %s ON @extschema@.pg_reaper_status TO %s%s', g.privilege_type, g.grantee,
                                  CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
END
$grants$;

DROP VIEW @extschema@.pg_reaper_status_0_1_0;
DROP FUNCTION @extschema@.reaper_status_0_1_0();
DROP FUNCTION @extschema@.outbox_claim_0_1_0(integer, interval);
DROP FUNCTION @extschema@.outbox_resolve_0_1_0(bigint, text);
