-- What the extension-free edition has in place of native code: the worker's job as a function
-- that a driver calls (the relay's --reap-interval, or pg_cron), its record for the status
-- view, and the re-fire hook's call.

-- The record of the ticks, one row: the status view's worker columns, and where the walk over
-- the strands stands.
DO $ticks$
BEGIN
    IF pg_catalog.to_regclass('@extschema@.pg_reaper_ticks') IS NULL THEN
        CREATE TABLE @extschema@.pg_reaper_ticks (
            one              boolean PRIMARY KEY DEFAULT true CHECK (one),
            ticks            bigint NOT NULL DEFAULT 0,
            failed_ticks     bigint NOT NULL DEFAULT 0,
            last_tick_at     timestamptz,
            last_tick_queued integer,
            last_error       text,
            last_no_org      integer NOT NULL DEFAULT 0,
            last_drift       text,
            expired_at       timestamptz NOT NULL DEFAULT '-infinity',
            expired_id       text NOT NULL DEFAULT '',
            stale_at         timestamptz NOT NULL DEFAULT '-infinity',
            stale_id         text NOT NULL DEFAULT ''
        );
        INSERT INTO @extschema@.pg_reaper_ticks DEFAULT VALUES;
    END IF;
END
$ticks$;

-- pg_reaper_tick(): one tick of the worker: strand overdue callbacks and lapsed batch leases
-- (pg_reaper_cut_deadlines), queue strands (steps of the walk until it caught up, or for at most
-- about ten seconds), re-offer expired leases, sweep orphaned markers, prune done intents, check
-- the barrier tables (a WARNING when what broke them changed). Concurrent calls never overlap:
-- one runs, the others return NULL at once. A
-- failing tick is rolled back and counted (failed_ticks, last_error in pg_reaper_ticks).
-- Returns how many intents it queued.
--
--   SELECT pg_reaper_tick();
--   SELECT cron.schedule('pg_reaper', '* * * * *', 'SELECT unstract.pg_reaper_tick()');
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_tick()
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    started CONSTANT timestamptz := clock_timestamp();
    t record;
    step record;
    cut record;
    queued integer := 0;
    n integer;
    sample text[];
    drift text;
BEGIN
    -- The tick's record is its lock: a second driver skips instead of waiting.
    SELECT * INTO t FROM @extschema@.pg_reaper_ticks FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    BEGIN
        -- Before the walk, which then queues what was cut.
        LOOP
            cut := @extschema@.pg_reaper_cut_deadlines(
                @extschema@.pg_reaper_setting('pg_reaper.batch_size')::bigint);
            EXIT WHEN NOT cut.full_ OR clock_timestamp() - started > interval '5 seconds';
        END LOOP;
        LOOP
            step := @extschema@.pg_reaper_walk(
                @extschema@.pg_reaper_setting('pg_reaper.batch_size')::bigint,
                t.expired_at, t.expired_id, t.stale_at, t.stale_id);
            queued := queued + step.queued;
            t.expired_at := step.next_expired_at;
            t.expired_id := step.next_expired_id;
            t.stale_at := step.next_stale_at;
            t.stale_id := step.next_stale_id;
            EXIT WHEN step.caught_up OR clock_timestamp() - started > interval '10 seconds';
        END LOOP;
        IF step.caught_up THEN
            SELECT o.n, o.sample INTO n, sample FROM @extschema@.pg_reaper_orgless() o;
            IF n <> t.last_no_org THEN
                PERFORM @extschema@.pg_reaper_warn_no_org(n, sample);
                t.last_no_org := n;
            END IF;
        END IF;
        PERFORM @extschema@.pg_reaper_reoffer_expired_leases();
        PERFORM @extschema@.pg_reaper_sweep_orphan_markers(
            @extschema@.pg_reaper_duration('pg_reaper.dedup_retention'));
        PERFORM @extschema@.pg_reaper_prune_done(
            @extschema@.pg_reaper_duration('pg_reaper.outbox_retention'));
        drift := @extschema@.pg_reaper_drift();
        IF drift IS DISTINCT FROM t.last_drift THEN
            PERFORM @extschema@.pg_reaper_warn_drift(drift);
        END IF;
        UPDATE @extschema@.pg_reaper_ticks
           SET ticks = ticks + 1, last_tick_at = now(), last_tick_queued = queued,
               last_error = NULL, last_no_org = t.last_no_org, last_drift = drift,
               expired_at = t.expired_at, expired_id = t.expired_id,
               stale_at = t.stale_at, stale_id = t.stale_id;
        RETURN queued;
    EXCEPTION WHEN OTHERS THEN
        UPDATE @extschema@.pg_reaper_ticks
           SET failed_ticks = failed_ticks + 1, last_error = SQLERRM || ' (SQLSTATE ' || SQLSTATE || ')';
        RAISE WARNING 'pg_reaper: tick failed (rolled back): % (SQLSTATE %)', SQLERRM, SQLSTATE;
        RETURN 0;
    END;
END
$$;

-- The worker's columns of pg_reaper_status, from the record of the ticks: `ticking` while ticks
-- come (within two minutes of the last), `idle` before the first and after they stopped.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_worker()
RETURNS TABLE (
    leader_pid integer, last_tick_at timestamptz, ticks bigint, last_tick_queued integer,
    worker_state text, failed_ticks bigint,
    lock_holder_pid integer, lock_holder_role text, lock_holder_application text)
LANGUAGE sql STABLE SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT NULL::integer, t.last_tick_at, t.ticks, t.last_tick_queued,
           CASE WHEN t.last_tick_at > now() - interval '2 minutes' THEN 'ticking' ELSE 'idle' END,
           t.failed_ticks, NULL::integer, NULL::text, NULL::text
      FROM @extschema@.pg_reaper_ticks t
$$;

-- The re-fire hook's call. Without native code it cannot switch to the hook's owner, so the
-- hook must do that itself: it must be SECURITY DEFINER with a fixed search_path, owned by the
-- queue's owner (the role it enqueues as). Any other hook is refused: called from here it would
-- run with this schema owner's privileges.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_run_hook(hook oid, execution_id text,
                                                         organization_id text, callback jsonb,
                                                         results jsonb)
RETURNS void
LANGUAGE plpgsql PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p record;
BEGIN
    SELECT f.oid::regproc::text AS name, f.prosecdef AS definer,
           EXISTS (SELECT FROM unnest(f.proconfig) c WHERE c LIKE 'search\_path=%') AS fixed_path
      INTO p FROM pg_proc f WHERE f.oid = hook;
    IF NOT p.definer OR NOT p.fixed_path THEN
        RAISE EXCEPTION 'pg_reaper.refire_function % must be SECURITY DEFINER with a fixed search_path (SET search_path = …) in the extension-free edition', p.name
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    EXECUTE format('SELECT %s($1, $2, $3, $4)', p.name) USING execution_id, organization_id, callback, results;
END
$$;

-- A setting's GUC, where a session or the server set one (here a placeholder: there is no
-- library to define it); the native library has a function of this name in its place.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_guc(name text)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT NULLIF(pg_catalog.current_setting($1, true), '') $$;

-- Which edition this is; the native library answers 'native'.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_edition()
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 'extension-free'::text $$;
