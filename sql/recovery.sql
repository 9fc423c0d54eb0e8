-- Recovery of one claimed intent, the part of the relay's work that happens in Postgres.
--
-- After its status read, a relay that may have to mark the execution ERROR opens a transaction
-- and calls recovery_lock: it renews the claim (fenced by `attempt`), locks the barrier row FOR
-- UPDATE and re-checks the stranded predicate. The relay keeps that transaction open across its
-- HTTP mark and commits it with outbox_resolve, so a re-enqueue or a decrement can never slip
-- between the check and the mark, and a second relay blocks on the same row instead of marking
-- twice. outbox_resolve records the outcome and, for every outcome that confirms the recovery
-- (a terminal status or an applied mark), deletes the barrier (guarded by the same predicate)
-- and its markers: the handle is never deleted before that.
--
-- A barrier the worker stranded early because its callback is overdue (pg_reaper_cut_deadlines)
-- is re-fired the same way; when it cannot be, its deadline goes back and the verdict is
-- `rearmed` unless it is stranded anyway.
--
-- A re-fire happens in recovery_lock, where the verdict is taken: the hook is called there, and
-- the verdict is `refire` only if it took the callback (a hook declines one it cannot re-fire by
-- raising feature_not_supported: the verdict is then `mark`, as without a hook). A re-fire does
-- not confirm anything yet, the callback is only queued: the barrier stays, stamped refired_at,
-- its progress now and its deadline at least now + the stuck timeout, so the execution keeps a
-- handle (the platform's own sweep of claims without a barrier leaves it alone) and nothing
-- reaps it while the callback runs. Once that time has passed it strands again: a terminal
-- status removes it, anything else is marked ERROR, never re-fired twice. (A callback that
-- finishes with barrier_finish removes it at once, as without a re-fire.)

-- The configured re-fire hook (pg_reaper.refire_function), a function
-- f(execution_id text, organization_id text, callback jsonb, results jsonb); NULL when the
-- setting is empty. The setting is parsed as a name, never as SQL, so nothing in it can run; one
-- that names no such function is an ERROR naming the setting.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_hook()
RETURNS regprocedure
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    setting CONSTANT text := btrim(@extschema@.pg_reaper_setting('pg_reaper.refire_function'));
    ident CONSTANT text := '("([^"]|"")+"|[[:alpha:]_][[:alnum:]_$]*)';
    hook regprocedure;
BEGIN
    IF setting IS NULL OR setting = '' THEN
        RETURN NULL;
    END IF;
    -- Anything but a (qualified) name would be a syntax error for to_regprocedure.
    IF setting ~ ('^' || ident || '(\.' || ident || ')?$') THEN
        hook := to_regprocedure(setting || '(text, text, jsonb, jsonb)');
    END IF;
    IF hook IS NULL THEN
        RAISE EXCEPTION 'pg_reaper.refire_function = ''%'' does not name a function f(text, text, jsonb, jsonb); fix the setting (or set it to '''' to mark ERROR instead)', setting
            USING ERRCODE = 'undefined_function';
    END IF;
    RETURN hook;
END
$$;

-- The re-fire itself: stamps the barrier (first, so that a hook whose callback may run longer
-- than the stuck timeout can move expires_at and last_progress_at later) and calls the hook with
-- its callback and results. False, with both undone, when the hook declines; any other error
-- of the hook is raised again with its SQLSTATE and a message that starts with "re-fire hook".
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_refire(id text, organization_id text, hook regprocedure)
RETURNS boolean
LANGUAGE plpgsql PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    b record;
BEGIN
    UPDATE @extschema@.pg_barrier_state s
       SET refired_at = now(), last_progress_at = now(), callback_due_at = NULL, cut_from = NULL,
           expires_at = greatest(s.expires_at, now() + @extschema@.pg_reaper_stuck_timeout())
     WHERE s.execution_id = pg_reaper_refire.id
 RETURNING s.callback, s.results INTO b;
    PERFORM @extschema@.pg_reaper_run_hook(hook, pg_reaper_refire.id, pg_reaper_refire.organization_id,
                                           b.callback, b.results);
    RETURN true;
EXCEPTION
    WHEN feature_not_supported THEN
        RAISE WARNING 'pg_reaper: the re-fire hook % declined the callback of execution %: %; marking it ERROR instead',
            hook, pg_reaper_refire.id, SQLERRM;
        RETURN false;
    WHEN OTHERS THEN
        RAISE EXCEPTION USING MESSAGE = format('re-fire hook %s: %s', hook::regproc, SQLERRM), ERRCODE = SQLSTATE;
END
$$;

-- recovery_lock(id, attempt, lease): renews the claim, locks the barrier and decides: `lost`
-- (the claim is no longer the caller's), `rearmed` (no barrier, or not stranded any more),
-- `refire` (every batch done, a callback, a hook that took it, not re-fired before: re-fired
-- now, see above) or `mark`. Call it in the transaction that will run outbox_resolve: the row
-- lock is held, and the re-fire uncommitted, until then.
--
--   BEGIN; SELECT * FROM recovery_lock(42, 3, '60 seconds'); … COMMIT;
CREATE OR REPLACE FUNCTION @extschema@.recovery_lock(id bigint, attempt integer, lease interval DEFAULT '60 seconds')
RETURNS TABLE (verdict text, remaining integer)
LANGUAGE plpgsql SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    f CONSTANT text := 'recovery_lock';
    intent record;
    b record;
    hook regprocedure;
BEGIN
    PERFORM @extschema@.pg_reaper_claim(f, id, attempt);
    PERFORM @extschema@.pg_reaper_interval(f, 'lease', lease);
    SELECT * INTO intent FROM @extschema@.pg_reaper_hold(id, attempt, lease, false);
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'lost', NULL::integer;
        RETURN;
    END IF;
    -- An operator's intent (barrier_recover) skips the stranded check.
    SELECT s.remaining AS left_, s.callback IS NOT NULL AS has_callback,
           s.refired_at IS NOT NULL AS refired, s.cut_from,
           @extschema@.barrier_is_stranded(s.expires_at, s.last_progress_at, s.created_at,
                                           @extschema@.pg_reaper_stuck_timeout())
           OR intent.action IS NOT NULL AS stranded
      INTO b
      FROM @extschema@.pg_barrier_state s
     WHERE s.execution_id = intent.execution_id
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'rearmed', NULL::integer;
        RETURN;
    END IF;
    -- An operator's choice, checked again now: the callback or the hook may have gone since.
    IF intent.action = 'refire' THEN
        hook := @extschema@.pg_reaper_hook();
        IF NOT b.has_callback OR hook IS NULL THEN
            RAISE EXCEPTION 'cannot re-fire execution % as asked by barrier_recover(): its barrier has no callback or pg_reaper.refire_function is empty', intent.execution_id;
        END IF;
        IF NOT @extschema@.pg_reaper_refire(intent.execution_id, intent.organization_id, hook) THEN
            RAISE EXCEPTION 'cannot re-fire execution % as asked by barrier_recover(): the hook declined its callback; recover it with ''error'' instead', intent.execution_id
                USING ERRCODE = 'feature_not_supported';
        END IF;
        RETURN QUERY SELECT 'refire', b.left_;
        RETURN;
    ELSIF intent.action = 'error' THEN
        RETURN QUERY SELECT 'mark', b.left_;
        RETURN;
    ELSIF NOT b.stranded THEN
        RETURN QUERY SELECT 'rearmed', b.left_;
        RETURN;
    END IF;
    -- Stranded: re-fired where it can be (the hook is looked up only then), else marked.
    IF b.left_ = 0 AND b.has_callback AND NOT b.refired THEN
        hook := @extschema@.pg_reaper_hook();
    END IF;
    IF hook IS NOT NULL
       AND @extschema@.pg_reaper_refire(intent.execution_id, intent.organization_id, hook) THEN
        RETURN QUERY SELECT 'refire', b.left_;
        RETURN;
    END IF;
    -- Stranded early for a re-fire that did not happen (the hook declined, or is gone): its
    -- deadline goes back, and it is decided as without the callback timeout.
    IF b.cut_from IS NOT NULL THEN
        UPDATE @extschema@.pg_barrier_state s SET expires_at = s.cut_from, cut_from = NULL
         WHERE s.execution_id = intent.execution_id
        RETURNING @extschema@.barrier_is_stranded(s.expires_at, s.last_progress_at, s.created_at,
                                                  @extschema@.pg_reaper_stuck_timeout())
             INTO b.stranded;
        IF NOT b.stranded THEN
            RETURN QUERY SELECT 'rearmed', b.left_;
            RETURN;
        END IF;
    END IF;
    RETURN QUERY SELECT 'mark', b.left_;
END
$$;

-- outbox_resolve(id, attempt, outcome): records the outcome of the caller's claimed intent and,
-- for `marked_error`, `already_terminal` and `gone`, deletes the barrier (a reaped strand's
-- only while it is still stranded; an operator's always) and its markers. `refired` keeps the
-- barrier, and needs recovery_lock's `refire` in this transaction (the re-fire it made is
-- committed with this record). Without the current claim nothing happens and the result is
-- false.
--
--   SELECT outbox_resolve(42, 3, 'marked_error');
CREATE OR REPLACE FUNCTION @extschema@.outbox_resolve(id bigint, attempt integer, outcome text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    f CONSTANT text := 'outbox_resolve';
    intent record;
BEGIN
    PERFORM @extschema@.pg_reaper_claim(f, id, attempt);
    IF outcome IS NULL OR outcome <> ALL (ARRAY['marked_error', 'already_terminal', 'gone', 'rearmed', 'refired']) THEN
        PERFORM @extschema@.pg_reaper_invalid(f, 'outcome',
            'must be one of marked_error, already_terminal, gone, rearmed, refired');
    END IF;
    UPDATE @extschema@.pg_reaper_outbox o
       SET state = 'done', outcome = outbox_resolve.outcome, lease_expires_at = NULL,
           last_error = NULL, updated_at = now()
     WHERE o.id = outbox_resolve.id AND o.state = 'in_flight' AND o.attempts = outbox_resolve.attempt
 RETURNING o.execution_id, o.organization_id, o.action INTO intent;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF outcome = 'refired' THEN
        -- now() is this transaction's start: stamped by its recovery_lock.
        PERFORM FROM @extschema@.pg_barrier_state s
          WHERE s.execution_id = intent.execution_id AND s.refired_at = now();
        IF NOT FOUND THEN
            RAISE EXCEPTION '%: execution % was not re-fired in this transaction: ''refired'' follows recovery_lock''s ''refire'' verdict, in its transaction',
                f, intent.execution_id USING ERRCODE = 'invalid_transaction_state';
        END IF;
    ELSIF outcome <> 'rearmed' THEN
        PERFORM @extschema@.pg_reaper_tear_down(
            intent.execution_id,
            CASE WHEN intent.action IS NULL THEN @extschema@.pg_reaper_stuck_timeout() END,
            false);
    END IF;
    RETURN true;
END
$$;
