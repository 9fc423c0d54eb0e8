-- The fan-in barrier: arm it with the number of batches (barrier_enqueue), claim each batch once
-- (barrier_claim), count batches down (barrier_decrement), and tear it down once the callback
-- was enqueued (barrier_finish) or the execution failed (barrier_abort).
--
-- Every function is SECURITY DEFINER, so an application role needs only EXECUTE on them, never
-- rights on the tables. The hot path (claim, decrement) runs on every batch and skips the
-- per-call `SET search_path` of the others: its statements name every table, operator and
-- function with its schema instead, so they mean the same under any caller's search_path.

-- Argument checks shared by every function. Each raises 22023 with a message naming the
-- function, the argument and the rule it broke, before any statement ran: a rejected call has
-- changed nothing.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_invalid(func text, arg text, rule text)
RETURNS void
LANGUAGE plpgsql PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION '%: % %', func, arg, rule USING ERRCODE = 'invalid_parameter_value';
END
$$;

-- A non-empty execution id of at most 1024 bytes: ids are keys of btree indexes, whose entries
-- must fit in a third of a page, and longer ones would fail later with an index error naming no
-- argument. Real ids are UUIDs (36 bytes). Returns the id.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_execution_id(func text, id text)
RETURNS text
LANGUAGE plpgsql PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF id IS NULL OR id = '' THEN
        PERFORM @extschema@.pg_reaper_invalid(func, 'execution_id', 'must not be NULL or empty');
    ELSIF octet_length(id) > 1024 THEN
        PERFORM @extschema@.pg_reaper_invalid(func, 'execution_id',
            format('must be at most 1024 bytes long (got %s bytes)', octet_length(id)));
    END IF;
    RETURN id;
END
$$;

-- An execution id that starts a recovery handle (a new barrier, an operator's intent): without
-- control characters. The relay puts the id into a URL path, and the URL standard drops a tab,
-- newline or carriage return wherever it stands, so 'a<TAB>b' would reach the status API as
-- 'ab': another execution. No real id has one.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_new_execution_id(func text, id text)
RETURNS text
LANGUAGE plpgsql PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    at int := strpos(regexp_replace(@extschema@.pg_reaper_execution_id(func, id),
                                    '[\x01-\x1f\x7f]', E'\x01'), E'\x01');
BEGIN
    IF at > 0 THEN
        PERFORM @extschema@.pg_reaper_invalid(func, 'execution_id',
            format('must not contain control characters (U+%s at byte %s)',
                   upper(lpad(to_hex(ascii(substr(id, at, 1))), 4, '0')),
                   octet_length(substr(id, 1, at - 1))));
    END IF;
    RETURN id;
END
$$;

-- An interval that moves the clock forward (or, with or_stays, keeps it): checked on the clock,
-- because an interval mixes months, days and microseconds ('-1 mon 30 days 1 hour' is negative
-- in a 31-day month and positive in a 30-day one), exactly as the table's
-- expires_at > created_at constraint will see it. Returns the interval.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_interval(func text, arg text, value interval,
                                                         or_stays boolean DEFAULT false)
RETURNS interval
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF value IS NULL THEN
        PERFORM @extschema@.pg_reaper_invalid(func, arg, 'must not be NULL');
    ELSIF or_stays AND NOT now() + value >= now() THEN
        PERFORM @extschema@.pg_reaper_invalid(func, arg, 'must be a non-negative interval');
    ELSIF NOT or_stays AND NOT now() + value > now() THEN
        PERFORM @extschema@.pg_reaper_invalid(func, arg, 'must be a positive interval');
    END IF;
    RETURN value;
END
$$;

-- barrier_enqueue(execution_id, organization_id, total, ttl, callback): arms (or re-arms) the
-- barrier of an execution for `total` batches; returns when it expires. Re-arming resets every
-- column and deletes the execution's markers. The callback descriptor (a JSON object, or NULL)
-- is what the re-fire hook receives if the barrier strands after its last batch.
--
--   SELECT barrier_enqueue('exec-1', 'org-1', 4, '6 hours', '{"task": "aggregate"}');
CREATE OR REPLACE FUNCTION @extschema@.barrier_enqueue(
    execution_id text,
    organization_id text,
    total integer,
    ttl interval DEFAULT '6 hours',
    callback jsonb DEFAULT NULL
) RETURNS timestamptz
LANGUAGE plpgsql SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    f CONSTANT text := 'barrier_enqueue';
    eid CONSTANT text := barrier_enqueue.execution_id;
    org CONSTANT text := coalesce(organization_id, '');
    expires timestamptz;
BEGIN
    -- The checks run inline; the helpers are called only to raise (a call each would cost the
    -- hot path a settings save and restore).
    IF eid IS NULL OR eid = '' OR octet_length(eid) > 1024 OR eid ~ '[\x01-\x1f\x7f]' THEN
        PERFORM @extschema@.pg_reaper_new_execution_id(f, eid);
    END IF;
    IF total IS NULL THEN
        PERFORM @extschema@.pg_reaper_invalid(f, 'total', 'must not be NULL');
    ELSIF total < 1 THEN
        PERFORM @extschema@.pg_reaper_invalid(f, 'total', 'must be at least 1');
    END IF;
    IF ttl IS NULL OR NOT now() + ttl > now() THEN
        PERFORM @extschema@.pg_reaper_interval(f, 'ttl', ttl);
    END IF;
    IF jsonb_typeof(callback) IS DISTINCT FROM 'object' AND callback IS NOT NULL THEN
        PERFORM @extschema@.pg_reaper_invalid(f, 'callback',
            format('must be a JSON object or SQL NULL (got a JSON %s)', jsonb_typeof(callback)));
    END IF;
    IF NOT @extschema@.pg_reaper_recoverable(org) THEN
        RAISE WARNING '%: execution % has no organization_id; if it strands it cannot be recovered through the org-scoped status API', f, eid;
    END IF;
    INSERT INTO @extschema@.pg_barrier_state AS b
        (execution_id, organization_id, remaining, results, callback,
         created_at, expires_at, last_progress_at)
    VALUES (eid, org, total, '[]', callback, now(), now() + ttl, now())
    ON CONFLICT (execution_id) DO UPDATE SET
        organization_id = excluded.organization_id,
        remaining = excluded.remaining,
        results = '[]',
        callback = excluded.callback,
        refired_at = NULL,
        callback_due_at = NULL,
        cut_from = NULL,
        created_at = excluded.created_at,
        expires_at = excluded.expires_at,
        last_progress_at = excluded.last_progress_at
    RETURNING b.expires_at INTO expires;
    DELETE FROM @extschema@.pg_batch_dedup d WHERE d.execution_id = eid;
    RETURN expires;
END
$$;

-- barrier_claim(execution_id, batch_index): true for the first delivery of a batch, false for
-- every redelivery (skip it: it must not be counted down twice). It names created_at because an
-- adopted dedup table has no column defaults.
--
--   SELECT barrier_claim('exec-1', 0);
CREATE OR REPLACE FUNCTION @extschema@.barrier_claim(execution_id text, batch_index integer)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER PARALLEL UNSAFE
AS $$
#variable_conflict use_column
DECLARE
    eid ALIAS FOR $1;  -- a name only: no expression to set up per call
BEGIN
    -- One test for every argument: each expression costs a call its set-up in every transaction.
    IF eid IS NULL OR eid OPERATOR(pg_catalog.=) ''
       OR pg_catalog.octet_length(eid) OPERATOR(pg_catalog.>) 1024
       OR barrier_claim.batch_index IS NULL OR barrier_claim.batch_index OPERATOR(pg_catalog.<) 0 THEN
        PERFORM @extschema@.pg_reaper_lease_args('barrier_claim', eid,
                                                 barrier_claim.batch_index, 0, '1 second');
    END IF;
    INSERT INTO @extschema@.pg_batch_dedup (execution_id, batch_index, created_at)
    VALUES (eid, barrier_claim.batch_index, pg_catalog.now())
    ON CONFLICT DO NOTHING;
    RETURN FOUND;
END
$$;

-- barrier_decrement(execution_id, result): counts one batch down and appends its result as one
-- array element. Returns (status, remaining, results): `pending`; `complete` for the one caller
-- that saw 0, with every batch's result in order (it fires the callback, then calls
-- barrier_finish); `abandoned` when there is no barrier, or it went below 0 (then it is deleted,
-- as a torn-down barrier). The results go only to the caller that completes: shipping the growing
-- array back on every decrement would make a fan-out of n batches cost O(n^2). A barrier with a
-- callback, completed while a re-fire hook is configured, is given until now +
-- pg_reaper.callback_timeout to be finished (callback_due_at): past that, the worker strands it
-- and the relay re-fires the callback.
--
--   SELECT status, remaining, results FROM barrier_decrement('exec-1', '{"files": 10}');
CREATE OR REPLACE FUNCTION @extschema@.barrier_decrement(execution_id text, result jsonb DEFAULT NULL)
RETURNS @extschema@.barrier_decrement_result
LANGUAGE plpgsql SECURITY DEFINER PARALLEL UNSAFE
AS $$
#variable_conflict use_column
DECLARE
    eid ALIAS FOR $1;  -- a name only: no expression to set up per call
    r @extschema@.barrier_decrement_result;
BEGIN
    -- Every batch but the last takes one statement and one test; each expression costs a call
    -- its set-up in every transaction. The id is checked only when no barrier was found: an id
    -- that fails the checks matches none (barrier_enqueue refuses them), and the error rolls
    -- back whatever the call did.
    UPDATE @extschema@.pg_barrier_state
       SET remaining = remaining OPERATOR(pg_catalog.-) 1,
           results = results OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_array(barrier_decrement.result),
           last_progress_at = pg_catalog.now()
     WHERE execution_id OPERATOR(pg_catalog.=) eid
    RETURNING 'pending', remaining, CASE WHEN remaining OPERATOR(pg_catalog.=) 0 THEN results END
         INTO r;
    IF NOT FOUND OR r.remaining OPERATOR(pg_catalog.<=) 0 THEN
        IF NOT FOUND THEN
            PERFORM @extschema@.pg_reaper_execution_id('barrier_decrement', eid);
            r.status := 'abandoned';
        ELSIF r.remaining OPERATOR(pg_catalog.<) 0 THEN
            DELETE FROM @extschema@.pg_barrier_state
             WHERE execution_id OPERATOR(pg_catalog.=) eid
               AND remaining OPERATOR(pg_catalog.<) 0;
            r.status := 'abandoned';
        ELSE
            PERFORM @extschema@.pg_reaper_await_callback(eid);
            r.status := 'complete';
        END IF;
    END IF;
    RETURN r;
END
$$;

-- The final decrement of a barrier: sets its callback's deadline, now +
-- pg_reaper.callback_timeout, when it has a callback, a re-fire hook is configured and the
-- timeout is not 0.
-- (Without a hook an unfinished barrier waits for the stuck timeout, as before: stranding it
-- early could only end in an earlier ERROR mark.)
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_await_callback(id text)
RETURNS void
LANGUAGE plpgsql PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    timeout CONSTANT interval := @extschema@.pg_reaper_duration('pg_reaper.callback_timeout');
BEGIN
    IF timeout > interval '0' AND btrim(@extschema@.pg_reaper_setting('pg_reaper.refire_function')) <> '' THEN
        UPDATE @extschema@.pg_barrier_state b SET callback_due_at = now() + timeout
         WHERE b.execution_id = pg_reaper_await_callback.id AND b.callback IS NOT NULL;
    END IF;
END
$$;

-- barrier_claim_lease(execution_id, batch_index, lease): barrier_claim with a lease. Returns the
-- claim's fencing token, or NULL when the batch must be skipped: it is done, or another claim's
-- lease on it lives. A batch whose lease lapsed (its worker died, or stopped renewing) is claimed
-- again with a new, larger token: the old one is refused from then on. Renew the lease with
-- barrier_renew_lease well within its length, count the batch down with barrier_decrement_lease.
-- A lease that lapsed and that nobody claims again within pg_reaper.reclaim_timeout strands the
-- execution at the worker's next tick. A batch claimed without a lease (barrier_claim) is never
-- claimed again, as before.
--
--   SELECT barrier_claim_lease('exec-1', 0, '60 seconds');   -- 17, then NULL while it lives
CREATE OR REPLACE FUNCTION @extschema@.barrier_claim_lease(execution_id text, batch_index integer,
                                                           lease interval DEFAULT '60 seconds')
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER PARALLEL UNSAFE
AS $$
#variable_conflict use_column
DECLARE
    eid ALIAS FOR $1;  -- a name only: no expression to set up per call
    token bigint;
BEGIN
    IF eid IS NULL OR eid OPERATOR(pg_catalog.=) ''
       OR pg_catalog.octet_length(eid) OPERATOR(pg_catalog.>) 1024
       OR barrier_claim_lease.batch_index IS NULL OR barrier_claim_lease.batch_index OPERATOR(pg_catalog.<) 0
       OR lease IS NULL
       OR NOT pg_catalog.now() OPERATOR(pg_catalog.+) lease OPERATOR(pg_catalog.>) pg_catalog.now() THEN
        PERFORM @extschema@.pg_reaper_lease_args('barrier_claim_lease', eid,
                                                 barrier_claim_lease.batch_index, 0, lease);
    END IF;
    INSERT INTO @extschema@.pg_batch_dedup AS d
        (execution_id, batch_index, created_at, lease_token, lease_expires_at)
    VALUES (eid, barrier_claim_lease.batch_index, pg_catalog.now(),
            pg_catalog.nextval('@extschema@.pg_reaper_lease_token_seq'::pg_catalog.regclass),
            pg_catalog.now() OPERATOR(pg_catalog.+) lease)
    ON CONFLICT (execution_id, batch_index) DO UPDATE
       SET lease_token = excluded.lease_token, lease_expires_at = excluded.lease_expires_at
     WHERE d.lease_expires_at OPERATOR(pg_catalog.<) pg_catalog.now()
    RETURNING d.lease_token INTO token;
    RETURN token;
END
$$;

-- barrier_renew_lease(execution_id, batch_index, token, lease): moves the end of the caller's
-- lease to now + lease. Returns it, or NULL when `token` is no longer the batch's (its lease
-- lapsed and the batch was claimed again, or it is done): stop working on it and do not count
-- it down. A lapsed lease nobody claimed again is renewed.
--
--   SELECT barrier_renew_lease('exec-1', 0, 17, '60 seconds');
CREATE OR REPLACE FUNCTION @extschema@.barrier_renew_lease(execution_id text, batch_index integer,
                                                           token bigint,
                                                           lease interval DEFAULT '60 seconds')
RETURNS timestamptz
LANGUAGE plpgsql SECURITY DEFINER PARALLEL UNSAFE
AS $$
#variable_conflict use_column
DECLARE
    eid ALIAS FOR $1;  -- a name only: no expression to set up per call
    ends timestamptz;
BEGIN
    IF eid IS NULL OR eid OPERATOR(pg_catalog.=) ''
       OR pg_catalog.octet_length(eid) OPERATOR(pg_catalog.>) 1024
       OR barrier_renew_lease.batch_index IS NULL
       OR barrier_renew_lease.batch_index OPERATOR(pg_catalog.<) 0 OR token IS NULL
       OR lease IS NULL
       OR NOT pg_catalog.now() OPERATOR(pg_catalog.+) lease OPERATOR(pg_catalog.>) pg_catalog.now() THEN
        PERFORM @extschema@.pg_reaper_lease_args('barrier_renew_lease', eid,
                                                 barrier_renew_lease.batch_index, token, lease);
    END IF;
    UPDATE @extschema@.pg_batch_dedup d
       SET lease_expires_at = pg_catalog.now() OPERATOR(pg_catalog.+) lease
     WHERE d.execution_id OPERATOR(pg_catalog.=) eid
       AND d.batch_index OPERATOR(pg_catalog.=) barrier_renew_lease.batch_index
       AND d.lease_token OPERATOR(pg_catalog.=) token
    RETURNING d.lease_expires_at INTO ends;
    RETURN ends;
END
$$;

-- barrier_decrement_lease(execution_id, batch_index, token, result): barrier_decrement for a
-- batch claimed with barrier_claim_lease, fenced by its token. Returns what barrier_decrement
-- returns or, when `token` is no longer the batch's (another claim took the batch over, it was
-- counted already, or the lapse stranded the execution), status `fenced`: nothing changed. The
-- batch is done from then on: never claimed again, however its lease would have lapsed.
--
--   SELECT status, remaining, results FROM barrier_decrement_lease('exec-1', 0, 17, '{"files": 10}');
CREATE OR REPLACE FUNCTION @extschema@.barrier_decrement_lease(execution_id text, batch_index integer,
                                                               token bigint, result jsonb DEFAULT NULL)
RETURNS @extschema@.barrier_decrement_result
LANGUAGE plpgsql SECURITY DEFINER PARALLEL UNSAFE
AS $$
#variable_conflict use_column
DECLARE
    eid ALIAS FOR $1;  -- a name only: no expression to set up per call
BEGIN
    IF eid IS NULL OR eid OPERATOR(pg_catalog.=) ''
       OR pg_catalog.octet_length(eid) OPERATOR(pg_catalog.>) 1024
       OR barrier_decrement_lease.batch_index IS NULL
       OR barrier_decrement_lease.batch_index OPERATOR(pg_catalog.<) 0 OR token IS NULL THEN
        PERFORM @extschema@.pg_reaper_lease_args('barrier_decrement_lease', eid,
                                                 barrier_decrement_lease.batch_index, token, '1 second');
    END IF;
    UPDATE @extschema@.pg_batch_dedup d SET lease_token = NULL, lease_expires_at = NULL
     WHERE d.execution_id OPERATOR(pg_catalog.=) eid
       AND d.batch_index OPERATOR(pg_catalog.=) barrier_decrement_lease.batch_index
       AND d.lease_token OPERATOR(pg_catalog.=) token;
    IF NOT FOUND THEN
        RETURN ROW('fenced', NULL, NULL)::@extschema@.barrier_decrement_result;
    END IF;
    RETURN @extschema@.barrier_decrement(eid, barrier_decrement_lease.result);
END
$$;

-- The argument checks of barrier_claim and the lease functions, which call it only when one
-- fails (a call on every claim would cost the hot path a settings save and restore): raises
-- the first problem.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_lease_args(func text, id text, batch_index integer,
                                                          token bigint, lease interval)
RETURNS void
LANGUAGE plpgsql PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM @extschema@.pg_reaper_execution_id(func, id);
    IF batch_index IS NULL THEN
        PERFORM @extschema@.pg_reaper_invalid(func, 'batch_index', 'must not be NULL');
    ELSIF batch_index < 0 THEN
        PERFORM @extschema@.pg_reaper_invalid(func, 'batch_index', 'must not be negative');
    ELSIF token IS NULL THEN
        PERFORM @extschema@.pg_reaper_invalid(func, 'token', 'must not be NULL (it is what barrier_claim_lease returned)');
    END IF;
    PERFORM @extschema@.pg_reaper_interval(func, 'lease', lease);
END
$$;

-- Tearing a barrier down, the one statement for it: deletes the row (with if_stranded_after,
-- only while it is still stranded under that stuck timeout) and, when the row went and
-- keep_markers is false, its markers. Only the caller whose DELETE removed the row sees true,
-- and only it clears the markers: a second finish, or a finish after an abort that kept the
-- markers, changes nothing.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_tear_down(id text, if_stranded_after interval,
                                                          keep_markers boolean)
RETURNS boolean
LANGUAGE plpgsql PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM @extschema@.pg_barrier_state b
     WHERE b.execution_id = pg_reaper_tear_down.id
       AND (pg_reaper_tear_down.if_stranded_after IS NULL
            OR @extschema@.barrier_is_stranded(b.expires_at, b.last_progress_at,
                                               b.created_at, pg_reaper_tear_down.if_stranded_after));
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF NOT pg_reaper_tear_down.keep_markers THEN
        DELETE FROM @extschema@.pg_batch_dedup d WHERE d.execution_id = pg_reaper_tear_down.id;
    END IF;
    RETURN true;
END
$$;

-- barrier_finish(execution_id): deletes the barrier and its markers once the callback was
-- enqueued. Returns whether a barrier was there.
--
--   SELECT barrier_finish('exec-1');
CREATE OR REPLACE FUNCTION @extschema@.barrier_finish(execution_id text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN @extschema@.pg_reaper_tear_down(
        @extschema@.pg_reaper_execution_id('barrier_finish', barrier_finish.execution_id), NULL, false);
END
$$;

-- barrier_abort(execution_id, preserve_dedup): tears the barrier down after a failed batch;
-- exactly one caller sees `aborted`, every other `already_aborted`. With preserve_dedup the
-- markers stay, so that a redelivered batch is still skipped.
--
--   SELECT barrier_abort('exec-1', preserve_dedup => true);
CREATE OR REPLACE FUNCTION @extschema@.barrier_abort(execution_id text, preserve_dedup boolean DEFAULT false)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    f CONSTANT text := 'barrier_abort';
    eid CONSTANT text := @extschema@.pg_reaper_execution_id(f, execution_id);
BEGIN
    IF preserve_dedup IS NULL THEN
        PERFORM @extschema@.pg_reaper_invalid(f, 'preserve_dedup', 'must not be NULL');
    END IF;
    IF @extschema@.pg_reaper_tear_down(eid, NULL, preserve_dedup) THEN
        RETURN 'aborted';
    END IF;
    RETURN 'already_aborted';
END
$$;

-- Markers outlive their barrier on purpose (a redelivery after an abort must still be skipped),
-- but not forever: past the retention, a marker whose execution has no barrier row is garbage.
-- A live barrier's markers are never touched, however old. Returns how many went.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_sweep_orphan_markers(retention interval)
RETURNS bigint
LANGUAGE sql PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH swept AS (
        DELETE FROM @extschema@.pg_batch_dedup d
         WHERE d.created_at < now() - retention
           AND NOT EXISTS (SELECT 1 FROM @extschema@.pg_barrier_state b
                            WHERE b.execution_id = d.execution_id)
     RETURNING 1
    )
    SELECT count(*) FROM swept
$$;
