-- The one-row status view: what the worker is doing (pg_reaper_worker(), which each edition
-- provides), and the gauges of the tables.

-- The gauges: intents by state, the age of the oldest pending one, live and stranded barriers.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_gauges(
    OUT outbox_pending bigint, OUT outbox_in_flight bigint, OUT outbox_dead bigint,
    OUT outbox_done bigint, OUT oldest_pending_age interval,
    OUT barriers_live bigint, OUT barriers_stranded bigint)
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT o.pending, o.in_flight, o.dead, o.done, o.oldest_pending_age, b.live, b.stranded
      FROM (SELECT count(*) FILTER (WHERE state = 'pending') AS pending,
                   count(*) FILTER (WHERE state = 'in_flight') AS in_flight,
                   count(*) FILTER (WHERE state = 'dead') AS dead,
                   count(*) FILTER (WHERE state = 'done') AS done,
                   now() - min(created_at) FILTER (WHERE state = 'pending') AS oldest_pending_age
              FROM @extschema@.pg_reaper_outbox) o,
           (SELECT count(*) FILTER (WHERE NOT s) AS live, count(*) FILTER (WHERE s) AS stranded
              FROM (SELECT @extschema@.barrier_is_stranded(expires_at, last_progress_at, created_at,
                                                           (SELECT @extschema@.pg_reaper_stuck_timeout())) AS s
                      FROM @extschema@.pg_barrier_state) x) b
$$;

-- What changed in the barrier tables under pg_reaper (a column added NOT NULL without a
-- default, a type changed, a key dropped: the platform's migrations keep changing them), one
-- line; NULL while its functions can work on them.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_drift()
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT string_agg(p.relation || ': ' || p.problem, '; ')
      FROM @extschema@.pg_reaper_table_problems() p
$$;

-- The log line when the drift changed: a WARNING naming it, or a LOG once it was fixed.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_warn_drift(drift text)
RETURNS void
LANGUAGE plpgsql PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF drift IS NULL THEN
        RAISE LOG 'pg_reaper: the barrier tables are usable by pg_reaper''s functions again';
    ELSE
        RAISE WARNING 'pg_reaper: the barrier tables changed under pg_reaper: %; barrier_enqueue and barrier_claim fail until this is fixed', drift;
    END IF;
END
$$;

-- The row behind the pg_reaper_status view.
CREATE OR REPLACE FUNCTION @extschema@.reaper_status()
RETURNS TABLE (
    leader_pid integer, last_tick_at timestamptz, ticks bigint, last_tick_queued integer,
    outbox_pending bigint, outbox_in_flight bigint, outbox_dead bigint, outbox_done bigint,
    oldest_pending_age interval, barriers_live bigint, barriers_stranded bigint,
    worker_state text, failed_ticks bigint,
    lock_holder_pid integer, lock_holder_role text, lock_holder_application text,
    tables_drift text)
LANGUAGE sql SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT w.leader_pid, w.last_tick_at, w.ticks, w.last_tick_queued,
           g.outbox_pending, g.outbox_in_flight, g.outbox_dead, g.outbox_done,
           g.oldest_pending_age, g.barriers_live, g.barriers_stranded,
           w.worker_state, w.failed_ticks,
           w.lock_holder_pid, w.lock_holder_role, w.lock_holder_application,
           @extschema@.pg_reaper_drift()
      FROM @extschema@.pg_reaper_worker() w, @extschema@.pg_reaper_gauges() g
$$;
