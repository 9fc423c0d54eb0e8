-- pg_reaper's re-fire hook for the Unstract platform's PostgreSQL queue.
--
-- When every batch of an execution is done but the worker died before it enqueued the
-- aggregating callback, pg_reaper calls this hook instead of marking the execution ERROR. The
-- hook enqueues the callback onto `pg_queue_message` exactly as the platform's worker does when
-- the barrier completes (`_fire_barrier_callback` → `dispatch` → `PgQueueClient.send` in
-- workers/queue_backend): the task payload with the barrier's results as its one argument and
-- `_pg_transport: true` among its keyword arguments, the queue (or `default`), and the org and
-- priority of the producer's fairness key (`x-fairness-key` of `fairness_headers`; without one,
-- no org and priority 5).
--
-- It takes the callback descriptor the platform's workers store through barrier_enqueue
-- (`{task_name, kwargs, queue, fairness_headers, transport}`). It declines (SQLSTATE 0A000,
-- feature_not_supported: pg_reaper then marks the execution ERROR, as the platform does today)
-- a descriptor of the Celery transport, which only a Celery producer can send, and one the
-- platform's own dispatch would fail on (an unknown workload type, a priority outside 1 to 10).
--
-- Run it in the queue's schema, as the role that owns `pg_queue_message` (the hook is SECURITY
-- DEFINER and writes as its owner), with that schema first on the search_path; then name it:
--
--   SET search_path = unstract;
--   \i refire.sql                  -- or a migration's RunSQL of this text
--   ALTER DATABASE unstract_db SET pg_reaper.refire_function = 'unstract.pg_reaper_unstract_refire';
--   -- the extension-free edition, without the right to ALTER DATABASE:
--   UPDATE unstract.pg_reaper_settings SET value = 'unstract.pg_reaper_unstract_refire'
--    WHERE name = 'pg_reaper.refire_function';
--
-- Running it again replaces the function. Nobody but its owner may call it: pg_reaper calls it
-- as its owner.
DO $install$
DECLARE
    target CONSTANT text := pg_catalog.current_schema();
BEGIN
    IF target IS NULL THEN
        RAISE EXCEPTION 'no schema to install the hook into: the first schema of search_path does not exist'
            USING ERRCODE = 'invalid_schema_name';
    END IF;
    EXECUTE pg_catalog.replace($hook$
CREATE OR REPLACE FUNCTION @schema@.pg_reaper_unstract_refire(execution_id text, organization_id text,
                                                              callback jsonb, results jsonb)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- A falsy header (absent, null, {}) is no fairness key, as in the platform's
    -- _fairness_from_headers.
    header CONSTANT jsonb := NULLIF(NULLIF(callback #> '{fairness_headers,x-fairness-key}', 'null'), '{}');
    fairness jsonb;
    priority integer := 5;
BEGIN
    IF callback->>'transport' IS DISTINCT FROM 'pg_queue' THEN
        RAISE EXCEPTION 'the callback of execution % is on the % transport: only the PostgreSQL queue''s (pg_queue) can be re-fired from SQL',
            execution_id, coalesce(callback->>'transport', 'Celery')
            USING ERRCODE = 'feature_not_supported';
    END IF;
    IF jsonb_typeof(callback->'task_name') IS DISTINCT FROM 'string'
       OR jsonb_typeof(coalesce(callback->'kwargs', '{}')) <> 'object' THEN
        RAISE EXCEPTION 'the callback of execution % has no task_name string or a kwargs that is not an object', execution_id
            USING ERRCODE = 'feature_not_supported';
    END IF;
    IF header IS NOT NULL THEN
        IF coalesce(header->>'workload_type', '') NOT IN ('api', 'non_api') THEN
            RAISE EXCEPTION 'the fairness key of execution % has the workload type %, not api or non_api',
                execution_id, coalesce(header->'workload_type', 'null')
                USING ERRCODE = 'feature_not_supported';
        END IF;
        IF header ? 'pipeline_priority' THEN
            IF jsonb_typeof(header->'pipeline_priority') IS DISTINCT FROM 'number'
               OR (header->>'pipeline_priority') !~ '^[0-9]+$'
               OR (header->>'pipeline_priority')::numeric NOT BETWEEN 1 AND 10 THEN
                RAISE EXCEPTION 'the fairness key of execution % has the priority %, not an integer from 1 to 10',
                    execution_id, header->'pipeline_priority'
                    USING ERRCODE = 'feature_not_supported';
            END IF;
            priority := (header->>'pipeline_priority')::integer;
        END IF;
        fairness := jsonb_build_object('org_id', coalesce(header->'org_id', 'null'),
                                       'workload_type', header->'workload_type',
                                       'pipeline_priority', priority);
    END IF;
    INSERT INTO @schema@.pg_queue_message (queue_name, message, org_id, priority, enqueued_at, vt, read_ct, state)
    VALUES (coalesce(NULLIF(callback->>'queue', ''), 'default'),
            jsonb_build_object(
                'task_name', callback->'task_name',
                'args', jsonb_build_array(results),
                'kwargs', coalesce(callback->'kwargs', '{}') || '{"_pg_transport": true}',
                'queue', coalesce(callback->'queue', 'null'),
                'fairness', coalesce(fairness, 'null')),
            coalesce(fairness->>'org_id', ''), priority, now(), now(), 0, 'ready');
END
$$;
REVOKE ALL ON FUNCTION @schema@.pg_reaper_unstract_refire(text, text, jsonb, jsonb) FROM PUBLIC;
$hook$, '@schema@', pg_catalog.quote_ident(target));
END
$install$;
