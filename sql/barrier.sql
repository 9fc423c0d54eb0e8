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
    f CONSTANT text := 'barrier_claim';
    eid CONSTANT text := barrier_claim.execution_id;
BEGIN
    IF eid IS NULL OR eid OPERATOR(pg_catalog.=) ''
       OR pg_catalog.octet_length(eid) OPERATOR(pg_catalog.>) 1024 THEN
        PERFORM @extschema@.pg_reaper_execution_id(f, eid);
    END IF;
    IF barrier_claim.batch_index IS NULL THEN
        PERFORM @extschema@.pg_reaper_invalid(f, 'batch_index', 'must not be NULL');
    ELSIF barrier_claim.batch_index OPERATOR(pg_catalog.<) 0 THEN
        PERFORM @extschema@.pg_reaper_invalid(f, 'batch_index', 'must not be negative');
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
-- array back on every decrement would make a fan-out of n batches cost O(n^2).
--
--   SELECT status, remaining, results FROM barrier_decrement('exec-1', '{"files": 10}');
CREATE OR REPLACE FUNCTION @extschema@.barrier_decrement(execution_id text, result jsonb DEFAULT NULL)
RETURNS @extschema@.barrier_decrement_result
LANGUAGE plpgsql SECURITY DEFINER PARALLEL UNSAFE
AS $$
#variable_conflict use_column
DECLARE
    eid CONSTANT text := barrier_decrement.execution_id;
    left_ integer;
    all_ jsonb;
BEGIN
    IF eid IS NULL OR eid OPERATOR(pg_catalog.=) ''
       OR pg_catalog.octet_length(eid) OPERATOR(pg_catalog.>) 1024 THEN
        PERFORM @extschema@.pg_reaper_execution_id('barrier_decrement', eid);
    END IF;
    UPDATE @extschema@.pg_barrier_state
       SET remaining = remaining OPERATOR(pg_catalog.-) 1,
           results = results OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_array(barrier_decrement.result),
           last_progress_at = pg_catalog.now()
     WHERE execution_id OPERATOR(pg_catalog.=) eid
    RETURNING remaining, CASE WHEN remaining OPERATOR(pg_catalog.=) 0 THEN results END
         INTO left_, all_;
    IF NOT FOUND THEN
        RETURN ROW('abandoned', NULL, NULL)::@extschema@.barrier_decrement_result;
    ELSIF left_ OPERATOR(pg_catalog.<) 0 THEN
        DELETE FROM @extschema@.pg_barrier_state
         WHERE execution_id OPERATOR(pg_catalog.=) eid AND remaining OPERATOR(pg_catalog.<) 0;
        RETURN ROW('abandoned', left_, NULL)::@extschema@.barrier_decrement_result;
    ELSIF left_ OPERATOR(pg_catalog.=) 0 THEN
        RETURN ROW('complete', 0, all_)::@extschema@.barrier_decrement_result;
    END IF;
    RETURN ROW('pending', left_, NULL)::@extschema@.barrier_decrement_result;
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
