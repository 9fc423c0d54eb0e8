-- What an operator asks about one execution, and what an operator can make happen to it:
-- barrier_explain tells its whole story (read-only), barrier_recover queues its recovery now,
-- stranded or not.

-- barrier_explain(execution_id): the whole story of one execution, for a person: its barrier
-- (with `stranded_at`, when the stranded predicate becomes or became true under the current
-- settings), its markers, every recovery intent it had (oldest first), its `state` and one
-- sentence of `advice`. docs/sql.md lists every key.
--
--   SELECT jsonb_pretty(barrier_explain('exec-1'));
CREATE OR REPLACE FUNCTION @extschema@.barrier_explain(execution_id text)
RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    eid CONSTANT text := @extschema@.pg_reaper_execution_id('barrier_explain', barrier_explain.execution_id);
    stuck CONSTANT interval := @extschema@.pg_reaper_stuck_timeout();
    b record;
    markers bigint;
    leases_live bigint;
    leases_lapsed bigint;
    intents jsonb;
    live jsonb;
    state text;
    advice text;
    drift CONSTANT text := @extschema@.pg_reaper_drift();
BEGIN
    SELECT s.organization_id, s.remaining, s.created_at, s.expires_at, s.last_progress_at,
           least(s.expires_at, s.last_progress_at + stuck, s.callback_due_at) AS stranded_at,
           s.callback IS NOT NULL AS has_callback, s.refired_at, s.callback_due_at, s.cut_from,
           @extschema@.barrier_is_stranded(s.expires_at, s.last_progress_at, s.created_at, stuck) AS stranded,
           s.expires_at < now() AS expired
      INTO b
      FROM @extschema@.pg_barrier_state s WHERE s.execution_id = eid;
    state := CASE WHEN NOT FOUND THEN 'absent'
                  WHEN b.remaining < 0 THEN 'torn_down'
                  WHEN b.stranded AND b.cut_from IS NOT NULL THEN 'callback_overdue'
                  WHEN b.stranded AND b.expired THEN 'stranded_expired'
                  WHEN b.stranded THEN 'stranded_no_progress'
                  WHEN b.refired_at IS NOT NULL THEN 'refired'
                  WHEN b.remaining = 0 THEN 'complete_awaiting_finish'
                  ELSE 'live' END;
    SELECT count(*), count(*) FILTER (WHERE d.lease_expires_at >= now()),
           count(*) FILTER (WHERE d.lease_expires_at < now())
      INTO markers, leases_live, leases_lapsed
      FROM @extschema@.pg_batch_dedup d WHERE d.execution_id = eid;
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'id', o.id, 'state', o.state, 'outcome', o.outcome, 'attempts', o.attempts,
               'failures', o.failures, 'action', o.action, 'last_error', o.last_error,
               'created_at', o.created_at, 'updated_at', o.updated_at) ORDER BY o.id), '[]')
      INTO intents
      FROM @extschema@.pg_reaper_outbox o WHERE o.execution_id = eid;
    SELECT i INTO live FROM jsonb_array_elements(intents) WITH ORDINALITY AS e(i, n)
     WHERE i->>'state' <> 'done' ORDER BY n DESC LIMIT 1;
    advice := CASE
        WHEN drift IS NOT NULL THEN
            'The barrier tables changed under pg_reaper (tables_drift): barrier_enqueue and barrier_claim fail until that is fixed; fix the table (a default for the new column, the old type back) first.'
        WHEN state = 'absent' AND jsonb_array_length(intents) > 0 THEN
            'No barrier: the execution finished, was recovered or was aborted; its recovery intents are listed.'
        WHEN state = 'absent' THEN
            'No barrier and no recovery intent: the execution never had a barrier here, or it finished and was cleaned up.'
        WHEN state = 'torn_down' THEN
            'The barrier was torn down (remaining < 0) but its row is still here; the next decrement or barrier_finish() removes it.'
        WHEN live->>'state' = 'dead' THEN
            format('Its recovery intent %s is dead: read last_error, fix the cause, then SELECT outbox_replay(%s).',
                   live->>'id', live->>'id')
        WHEN live IS NOT NULL THEN
            format('Recovery intent %s is %s: a relay carries it out (if it stays so, check that a relay runs and can reach the status API).',
                   live->>'id', live->>'state')
        WHEN state IN ('stranded_expired', 'stranded_no_progress', 'callback_overdue')
             AND NOT @extschema@.pg_reaper_recoverable(b.organization_id) THEN
            'Stranded, but it has no organization_id: the org-scoped status API cannot recover it; mark the execution yourself, then remove the barrier with barrier_abort().'
        WHEN state = 'callback_overdue' THEN
            'Every batch is done but nobody finished the barrier within pg_reaper.callback_timeout (the callback was lost): the next tick queues it and a relay re-fires the callback (if the hook declines, its deadline cut_from comes back).'
        WHEN state IN ('stranded_expired', 'stranded_no_progress') AND leases_lapsed > 0 THEN
            format('Stranded, with %s batch lease(s) lapsed: a worker died and its batch was not claimed again. The next tick queues it, or run SELECT * FROM reap_expired().', leases_lapsed)
        WHEN state IN ('stranded_expired', 'stranded_no_progress') THEN
            'Stranded and not queued yet: the next tick queues it (the worker''s, within a naptime; in the extension-free edition, its driver''s), or run SELECT * FROM reap_expired().'
        WHEN state = 'refired' THEN
            'Its callback was re-fired at refired_at; the barrier stays as the execution''s handle. At stranded_at a relay reads its status: terminal removes the barrier, anything else is marked ERROR (a callback is never re-fired twice).'
        WHEN state = 'complete_awaiting_finish' AND b.callback_due_at IS NOT NULL THEN
            'Every batch is done: the caller that saw ''complete'' must fire the callback and call barrier_finish(); if it died, the callback is re-fired after callback_due_at.'
        WHEN state = 'complete_awaiting_finish' THEN
            'Every batch is done: the caller that saw ''complete'' must fire the callback and call barrier_finish(); if it died, the barrier strands at stranded_at and is recovered then, or now with barrier_recover().'
        ELSE
            'Live: batches are still running; it strands at stranded_at if none completes before then, or recover it now with barrier_recover().'
        END;
    RETURN jsonb_build_object(
        'execution_id', eid, 'state', state,
        'organization_id', b.organization_id, 'remaining', b.remaining,
        'created_at', b.created_at, 'expires_at', b.expires_at,
        'last_progress_at', b.last_progress_at, 'stranded_at', b.stranded_at,
        'has_callback', b.has_callback, 'refired_at', b.refired_at,
        'callback_due_at', b.callback_due_at, 'cut_from', b.cut_from,
        'markers', markers, 'leases_live', leases_live, 'leases_lapsed', leases_lapsed, 'intents', intents, 'tables_drift', drift, 'advice', advice);
END
$$;

-- barrier_recover(execution_id, action): queues a recovery of one execution now, stranded or
-- not: `error` marks it ERROR, `refire` re-fires its callback through the hook. The relay
-- carries it out with every safety rule but the stranded re-check. Returns the intent's id (an
-- existing live intent's, with a NOTICE: one live intent per execution still holds).
--
--   SELECT barrier_recover('exec-1', 'refire');
CREATE OR REPLACE FUNCTION @extschema@.barrier_recover(execution_id text, action text DEFAULT 'error')
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    f CONSTANT text := 'barrier_recover';
    eid CONSTANT text := @extschema@.pg_reaper_new_execution_id(f, barrier_recover.execution_id);
    b record;
    intent bigint;
    live record;
BEGIN
    IF action IS NULL OR action NOT IN ('error', 'refire') THEN
        PERFORM @extschema@.pg_reaper_invalid(f, 'action', 'must be ''error'' or ''refire''');
    END IF;
    IF pg_is_in_recovery() THEN
        RAISE EXCEPTION '%: the server is a standby (in recovery); recover on the primary', f
            USING ERRCODE = 'read_only_sql_transaction';
    END IF;
    SELECT s.organization_id AS org, s.remaining AS left_, s.callback IS NOT NULL AS has_callback
      INTO b FROM @extschema@.pg_barrier_state s WHERE s.execution_id = eid;
    IF NOT FOUND THEN
        PERFORM @extschema@.pg_reaper_invalid(f, 'execution_id',
            format('has no barrier (''%s''): there is nothing to recover (barrier_explain() tells what happened to it)', eid));
    ELSIF NOT @extschema@.pg_reaper_recoverable(b.org) THEN
        PERFORM @extschema@.pg_reaper_invalid(f, 'execution_id',
            'has a barrier without organization_id: the org-scoped status API cannot recover it');
    ELSIF action = 'refire' AND (NOT b.has_callback
                                 OR btrim(@extschema@.pg_reaper_setting('pg_reaper.refire_function')) = '') THEN
        PERFORM @extschema@.pg_reaper_invalid(f, 'action',
            '''refire'' needs a barrier with a callback and pg_reaper.refire_function set');
    END IF;
    SELECT q INTO intent
      FROM @extschema@.pg_reaper_queue(ARRAY[eid], ARRAY[b.org], ARRAY[b.left_], barrier_recover.action) q;
    IF intent IS NOT NULL THEN
        PERFORM @extschema@.pg_reaper_wake_relays();
        RETURN intent;
    END IF;
    SELECT l.id AS intent, l.state INTO live FROM @extschema@.pg_reaper_live_intent(eid) l;
    RAISE NOTICE '%: execution % already has a live recovery intent (%, %); returning it%', f, eid,
        live.intent, live.state, CASE WHEN live.state = 'dead' THEN ': replay it with outbox_replay()' ELSE '' END;
    RETURN live.intent;
END
$$;
