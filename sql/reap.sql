-- Reaping: every stranded barrier becomes exactly one live outbox intent. The barrier row is
-- left alone: it is the recovery handle, removed only once the recovery was confirmed.
-- Concurrent reapers (the worker, an operator in psql, a second node) are harmless: the partial
-- unique index on live intents makes each INSERT a compare-and-set, and a loser's row simply
-- counts as already queued.

-- The stuck timeout in force (pg_reaper.stuck_timeout). Without a SET clause the planner inlines
-- it into the caller (its one name is schema-qualified).
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_stuck_timeout()
RETURNS interval
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT @extschema@.pg_reaper_duration('pg_reaper.stuck_timeout') $$;

-- reap_expired(max_rows, dry_run): queues one recovery intent per stranded barrier that has an
-- organization and no live intent: at most max_rows (NULL: all), the expired ones first (oldest
-- deadline first), then those without progress (oldest first). It is one step of the worker's
-- walk (below) from the start. A dry run writes nothing and reports what it would have queued.
-- Returns the counters: `stranded` (all stranded barriers), `queued` (by this call),
-- `already_queued` (a live intent existed, or another reaper queued it first),
-- `skipped_no_org` (no organization: the org-scoped status API cannot recover them; named in a
-- WARNING).
--
--   SELECT * FROM reap_expired();
CREATE OR REPLACE FUNCTION @extschema@.reap_expired(max_rows integer DEFAULT NULL, dry_run boolean DEFAULT false)
RETURNS TABLE (stranded integer, queued integer, already_queued integer, skipped_no_org integer)
LANGUAGE plpgsql SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    f CONSTANT text := 'reap_expired';
    stuck CONSTANT interval := @extschema@.pg_reaper_stuck_timeout();
    step record;
    orgless record;
    live integer;
BEGIN
    IF max_rows < 1 THEN
        PERFORM @extschema@.pg_reaper_invalid(f, 'max_rows', 'must be at least 1 (NULL: no limit)');
    ELSIF dry_run IS NULL THEN
        PERFORM @extschema@.pg_reaper_invalid(f, 'dry_run', 'must not be NULL');
    ELSIF pg_is_in_recovery() THEN
        RAISE EXCEPTION '%: the server is a standby (in recovery); reap on the primary', f
            USING ERRCODE = 'read_only_sql_transaction';
    END IF;
    step := @extschema@.pg_reaper_walk(coalesce(max_rows, 9223372036854775807), '-infinity', '',
                                       '-infinity', '', dry_run);
    -- Counted after the walk, so that what another reaper queued meanwhile counts as queued.
    SELECT count(*)::int, count(*) FILTER (WHERE EXISTS (
               SELECT FROM @extschema@.pg_reaper_live_intent(b.execution_id)))::int
      INTO stranded, live
      FROM @extschema@.pg_barrier_state b
     WHERE @extschema@.barrier_is_stranded(b.expires_at, b.last_progress_at, b.created_at, stuck)
       AND @extschema@.pg_reaper_recoverable(b.organization_id);
    orgless := @extschema@.pg_reaper_orgless();
    PERFORM @extschema@.pg_reaper_warn_no_org(orgless.n, orgless.sample);
    stranded := stranded + orgless.n;
    queued := CASE WHEN dry_run THEN step.candidates ELSE step.queued END;
    already_queued := CASE WHEN dry_run THEN live ELSE live - step.queued END;
    skipped_no_org := orgless.n;
    RETURN NEXT;
END
$$;

-- Whether a barrier of this organization can be recovered: the status API is org-scoped, so one
-- without an organization cannot. Inlined, like barrier_is_stranded.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_recoverable(organization_id text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT $1 OPERATOR(pg_catalog.<>) '' $$;

-- The WARNING that names the strands nobody can recover: `n` of them, `sample` their first ids.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_warn_no_org(n integer, sample text[])
RETURNS void
LANGUAGE plpgsql PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF n > 0 THEN
        RAISE WARNING '%', format(
            'pg_reaper: %s stranded barrier(s) have no organization_id and are left untouched (the org-scoped status API cannot recover them): %s%s',
            n, array_to_string(sample, ', '),
            CASE WHEN n > cardinality(sample) THEN format(' and %s more', n - cardinality(sample)) ELSE '' END);
    END IF;
END
$$;

-- The strands nobody can recover (no organization): how many, and up to ten ids.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_orgless(OUT n integer, OUT sample text[])
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH orgless AS (
        SELECT b.execution_id FROM @extschema@.pg_barrier_state b
         WHERE NOT @extschema@.pg_reaper_recoverable(b.organization_id)
           AND @extschema@.barrier_is_stranded(b.expires_at, b.last_progress_at, b.created_at,
                                              (SELECT @extschema@.pg_reaper_stuck_timeout()))
    )
    SELECT (SELECT count(*) FROM orgless)::int,
           coalesce((SELECT array_agg(x.execution_id ORDER BY x.execution_id)
                       FROM (SELECT execution_id FROM orgless ORDER BY execution_id LIMIT 10) x), '{}')
$$;

-- One step of the worker's walk over the strands: the next strands after the last ones it
-- queued, in index order, at most `budget` in all, those already queued (or without an
-- organization) skipped. Expired barriers go by (expires_at, execution_id) from
-- (expired_at, expired_id); the others that are stranded (no progress for the stuck timeout) by
-- (created_at, execution_id) from (stale_at, stale_id), with what the expired ones left of the
-- budget. Each kind is one index range with a limit, and no barrier is in both: resuming after
-- the last key makes a step cost the same however many strands are already queued ahead of it.
-- Whether a strand has a live intent is one probe of the outbox's unique index per strand
-- (pg_reaper_live_intent). Returns how many strands it found (`candidates`) and how many of them it queued
-- (none in a dry run), the positions the next step starts from (the start again for a kind
-- walked to its end), and whether both kinds were walked to their end.
--
-- Each kind must be read in its index's order, stopping at the limit: statistics taken before a
-- mass strand (a few strands among many live barriers, an empty outbox) make the planner prefer
-- sorting every strand, or scanning the outbox for each. With sorts and sequential scans ruled
-- out for this function's statements, the intended plan is the only one left. Ruling them out
-- adds a huge cost to every plan, which would make Postgres compile each statement with JIT
-- (half a second a step, against milliseconds of work): JIT is off here too.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_walk(
    budget bigint, expired_at timestamptz, expired_id text, stale_at timestamptz, stale_id text,
    dry_run boolean DEFAULT false,
    OUT candidates integer, OUT queued integer, OUT caught_up boolean,
    OUT next_expired_at timestamptz, OUT next_expired_id text,
    OUT next_stale_at timestamptz, OUT next_stale_id text)
LANGUAGE plpgsql PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
SET enable_sort = off
SET enable_seqscan = off
SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    stuck CONSTANT interval := @extschema@.pg_reaper_stuck_timeout();
    expired bigint;
    stale bigint;
    le_at timestamptz;
    le_id text;
    ls_at timestamptz;
    ls_id text;
BEGIN
    IF pg_is_in_recovery() THEN
        RAISE EXCEPTION 'pg_reaper: the server is a standby (in recovery)'
            USING ERRCODE = 'read_only_sql_transaction';
    END IF;
    WITH exp AS (
        SELECT b.execution_id, b.organization_id, b.remaining, b.expires_at AS key
          FROM @extschema@.pg_barrier_state b
          LEFT JOIN LATERAL @extschema@.pg_reaper_live_intent(b.execution_id) live ON true
         WHERE b.expires_at < now()
           AND (b.expires_at, b.execution_id) > (expired_at, expired_id)
           AND @extschema@.pg_reaper_recoverable(b.organization_id)
           AND @extschema@.barrier_is_stranded(b.expires_at, b.last_progress_at, b.created_at, stuck)
           AND live.id IS NULL
         ORDER BY b.expires_at, b.execution_id
         LIMIT budget
    ), stl AS (
        SELECT b.execution_id, b.organization_id, b.remaining, b.created_at AS key
          FROM @extschema@.pg_barrier_state b
          LEFT JOIN LATERAL @extschema@.pg_reaper_live_intent(b.execution_id) live ON true
         WHERE b.created_at < now() - stuck
           AND (b.created_at, b.execution_id) > (stale_at, stale_id)
           AND b.expires_at >= now()
           AND @extschema@.pg_reaper_recoverable(b.organization_id)
           AND @extschema@.barrier_is_stranded(b.expires_at, b.last_progress_at, b.created_at, stuck)
           AND live.id IS NULL
         ORDER BY b.created_at, b.execution_id
         LIMIT budget - (SELECT count(*) FROM exp)
    ), picked AS (
        SELECT array_agg(p.execution_id) AS ids, array_agg(p.organization_id) AS orgs,
               array_agg(p.remaining) AS lefts
          FROM (SELECT e.execution_id, e.organization_id, e.remaining FROM exp e
                UNION ALL
                SELECT s.execution_id, s.organization_id, s.remaining FROM stl s) p
         WHERE NOT dry_run
    ), ins AS (
        SELECT count(*) AS n
          FROM picked, @extschema@.pg_reaper_queue(picked.ids, picked.orgs, picked.lefts, NULL) q
    ), le AS (
        SELECT e.key, e.execution_id FROM exp e ORDER BY e.key DESC, e.execution_id DESC LIMIT 1
    ), ls AS (
        SELECT s.key, s.execution_id FROM stl s ORDER BY s.key DESC, s.execution_id DESC LIMIT 1
    )
    SELECT (SELECT count(*) FROM exp), (SELECT count(*) FROM stl), (SELECT n FROM ins)::int,
           (SELECT key FROM le), (SELECT execution_id FROM le),
           (SELECT key FROM ls), (SELECT execution_id FROM ls)
      INTO expired, stale, queued, le_at, le_id, ls_at, ls_id;
    candidates := expired + stale;
    IF queued > 0 THEN
        PERFORM @extschema@.pg_reaper_wake_relays();
    END IF;
    -- A kind that gave fewer than it was asked for is walked to its end: it starts over next
    -- time. The stale kind is asked only for what the expired one left; a kind that picked
    -- none without being walked to its end (it was not asked for any) stays where it was.
    IF expired < budget THEN
        next_expired_at := '-infinity'; next_expired_id := '';
    ELSIF le_id IS NOT NULL THEN
        next_expired_at := le_at; next_expired_id := le_id;
    ELSE
        next_expired_at := expired_at; next_expired_id := expired_id;
    END IF;
    IF budget - expired > 0 AND stale < budget - expired THEN
        next_stale_at := '-infinity'; next_stale_id := '';
    ELSIF ls_id IS NOT NULL THEN
        next_stale_at := ls_at; next_stale_id := ls_id;
    ELSE
        next_stale_at := stale_at; next_stale_id := stale_id;
    END IF;
    caught_up := expired < budget AND budget - expired > 0 AND stale < budget - expired;
END
$$;

-- Strands now what is known to be lost before its deadline, at most `budget` barriers of each
-- kind, by cutting its deadline (expires_at) to just before now: from then on the stranded
-- predicate, the walk and the relay treat it as any expired barrier.
--
-- - A completed barrier whose callback is overdue (callback_due_at passed, see barrier_decrement):
--   the relay re-fires it. Its deadline is kept in cut_from: a re-fire the hook declines puts it
--   back, so that it is then handled as without the callback timeout (never marked ERROR
--   earlier). Without a hook configured any more, only the due time is cleared.
-- - A barrier with a batch whose lease lapsed more than pg_reaper.reclaim_timeout ago and that
--   nobody claimed again: that worker died and the queue did not deliver the batch again, so the
--   barrier can never complete. The batch is given up (never claimed again); the relay marks the
--   execution ERROR.
--
-- Returns how many barriers it cut and leases it gave up, and whether either kind filled its
-- budget (more may be waiting). Rows locked by a decrement or a recovery are left to the next
-- tick.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_cut_deadlines(budget bigint, OUT cut integer,
                                                              OUT lapsed integer, OUT full_ boolean)
LANGUAGE plpgsql PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    hooked CONSTANT boolean := btrim(@extschema@.pg_reaper_setting('pg_reaper.refire_function')) <> '';
    reclaim CONSTANT interval := @extschema@.pg_reaper_duration('pg_reaper.reclaim_timeout');
    -- A microsecond before now: stranded already in this transaction, so that the walk of the
    -- same tick queues it.
    cut_to CONSTANT timestamptz := now() - interval '1 microsecond';
    ids text[];
BEGIN
    IF pg_is_in_recovery() THEN
        RAISE EXCEPTION 'pg_reaper: the server is a standby (in recovery)'
            USING ERRCODE = 'read_only_sql_transaction';
    END IF;
    UPDATE @extschema@.pg_barrier_state b
       SET cut_from = CASE WHEN hooked THEN b.expires_at END,
           expires_at = CASE WHEN hooked THEN least(b.expires_at, cut_to) ELSE b.expires_at END,
           callback_due_at = NULL
     WHERE b.execution_id IN (SELECT d.execution_id FROM @extschema@.pg_barrier_state d
                               WHERE d.callback_due_at < now()
                               ORDER BY d.callback_due_at LIMIT budget
                                 FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS cut = ROW_COUNT;
    WITH given_up AS (
        -- Through the index of the leases that run (their tokens): as many as batches in
        -- flight, however many were done.
        UPDATE @extschema@.pg_batch_dedup d SET lease_token = NULL, lease_expires_at = NULL
         WHERE (d.execution_id, d.batch_index) IN (
                   SELECT l.execution_id, l.batch_index FROM @extschema@.pg_batch_dedup l
                    WHERE l.lease_token IS NOT NULL AND l.lease_expires_at < now() - reclaim
                    LIMIT budget
                      FOR UPDATE SKIP LOCKED)
     RETURNING d.execution_id
    )
    SELECT count(*)::int, array_agg(DISTINCT g.execution_id) INTO lapsed, ids FROM given_up g;
    UPDATE @extschema@.pg_barrier_state b SET expires_at = cut_to
     WHERE b.execution_id = ANY (ids) AND b.expires_at > cut_to AND b.remaining > 0;
    full_ := cut >= budget OR lapsed >= budget;
END
$$;
