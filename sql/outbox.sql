-- Every transition of a recovery intent. An intent is `pending` (due at next_attempt_at),
-- `in_flight` (a relay's claim, until lease_expires_at), `done` (with its outcome: the audit
-- trail, pruned after pg_reaper.outbox_retention) or `dead` (failed --max-attempts times about
-- its execution; replayed by an operator). `attempts` counts claims and is the claim's fencing
-- token: every transition of a claimed intent compares it with the caller's, so a relay whose
-- lease ran out can change nothing.

-- An execution's live intent: the one not `done` (pending, in_flight or dead), if any; the
-- partial unique index pg_reaper_outbox_live allows at most one. This is the one definition of
-- "live" that reaping, barrier_recover and the status gauges use. It is a single SELECT without
-- a SET clause so the planner inlines it into the caller: one probe of that index (the LIMIT
-- keeps it a probe: a plain subquery could be turned into a join over the whole outbox). Its
-- operators are schema-qualified because an inlined body is parsed under the caller's
-- search_path.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_live_intent(execution_id text)
RETURNS TABLE (id bigint, state text)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT o.id, o.state FROM @extschema@.pg_reaper_outbox o
     WHERE o.execution_id OPERATOR(pg_catalog.=) $1 AND o.state OPERATOR(pg_catalog.<>) 'done'
     LIMIT 1
$$;

-- Queues one recovery intent per execution of the arrays, in their order (`action`: NULL for a
-- strand, whose recovery the relay decides; an operator's 'error' or 'refire'), except for an execution that has a live intent already: another reaper queued it
-- first, and it counts as queued. The only statement that creates intents. Returns the new
-- intents' ids.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_queue(execution_ids text[], organization_ids text[],
                                                      remainings integer[], action text)
RETURNS SETOF bigint
LANGUAGE sql PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO @extschema@.pg_reaper_outbox (execution_id, organization_id, remaining, action)
    SELECT u.execution_id, u.organization_id, u.remaining, pg_reaper_queue.action
      FROM unnest(execution_ids, organization_ids, remainings) AS u(execution_id, organization_id, remaining)
    ON CONFLICT (execution_id) WHERE state <> 'done' DO NOTHING
    RETURNING id
$$;

-- outbox_claim(max_intents, lease, due_by): claims up to max_intents due intents (and intents
-- whose relay's lease expired) for `lease`; each row's `attempt` is its fencing token. A single
-- pass over what was due at its start (a relay's --once) passes that time as due_by, so that
-- intents failing during the pass wait for the next one. An intent whose attempts counter is at
-- its maximum is set aside as dead, with a WARNING, instead of wrapping the token around.
--
--   SELECT * FROM outbox_claim(16, '60 seconds');
CREATE OR REPLACE FUNCTION @extschema@.outbox_claim(
    max_intents integer DEFAULT 16,
    lease interval DEFAULT '60 seconds',
    due_by timestamptz DEFAULT NULL
) RETURNS TABLE (id bigint, execution_id text, organization_id text, remaining integer, attempt integer)
LANGUAGE plpgsql SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    f CONSTANT text := 'outbox_claim';
    r record;
    set_aside bigint[] := '{}';
BEGIN
    IF max_intents IS NULL OR max_intents < 1 THEN
        PERFORM @extschema@.pg_reaper_invalid(f, 'max_intents', 'must be at least 1');
    END IF;
    PERFORM @extschema@.pg_reaper_interval(f, 'lease', lease);
    FOR r IN
        WITH expired AS (
            SELECT o.id FROM @extschema@.pg_reaper_outbox o
             WHERE o.state = 'in_flight' AND o.lease_expires_at < coalesce(due_by, now())
             ORDER BY o.lease_expires_at
             LIMIT max_intents
               FOR UPDATE SKIP LOCKED
        ), due AS (
            SELECT o.id FROM @extschema@.pg_reaper_outbox o
             WHERE o.state = 'pending' AND o.next_attempt_at <= coalesce(due_by, now())
             ORDER BY o.next_attempt_at, o.id
             LIMIT max_intents
               FOR UPDATE SKIP LOCKED
        ), picked AS (
            SELECT p.id FROM (SELECT e.id FROM expired e UNION ALL SELECT d.id FROM due d) p
             LIMIT max_intents
        )
        UPDATE @extschema@.pg_reaper_outbox o
           SET state = CASE WHEN o.attempts < 2147483647 THEN 'in_flight' ELSE 'dead' END,
               attempts = CASE WHEN o.attempts < 2147483647 THEN o.attempts + 1 ELSE o.attempts END,
               lease_expires_at = CASE WHEN o.attempts < 2147483647 THEN now() + lease END,
               last_error = CASE WHEN o.attempts < 2147483647 THEN o.last_error
                                 ELSE 'set aside: its attempts counter is at the maximum; '
                                      || 'replay it with outbox_replay()' END,
               updated_at = now()
          FROM picked
         WHERE o.id = picked.id
     RETURNING o.id AS intent, o.execution_id AS execution, o.organization_id AS org,
               o.remaining AS left_, o.attempts AS token, o.state = 'dead' AS dead
    LOOP
        IF r.dead THEN
            set_aside := set_aside || r.intent;
            CONTINUE;
        END IF;
        id := r.intent;
        execution_id := r.execution;
        organization_id := r.org;
        remaining := r.left_;
        attempt := r.token;
        RETURN NEXT;
    END LOOP;
    IF cardinality(set_aside) > 0 THEN
        RAISE WARNING '%: set aside % intent(s) whose attempts counter is at its maximum, as dead: ids %; replay them with outbox_replay()',
            f, cardinality(set_aside), set_aside;
    END IF;
END
$$;

-- A claimed intent given back after a failed attempt, due again after `backoff`. A failure about
-- the execution (`counted`) is counted, and the last one allowed (`max_attempts`) makes the
-- intent dead; one that says nothing about the execution (the API unreachable, a mark whose
-- answer never came) is never counted and never kills. Returns the new state, or `lost` when
-- the claim is no longer the caller's.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_give_back(id bigint, attempt integer, error text,
                                                          backoff interval, max_attempts integer,
                                                          counted boolean)
RETURNS text
LANGUAGE plpgsql PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    given text;
BEGIN
    UPDATE @extschema@.pg_reaper_outbox o
       SET state = CASE WHEN pg_reaper_give_back.counted AND o.failures + 1 >= pg_reaper_give_back.max_attempts
                        THEN 'dead' ELSE 'pending' END,
           failures = o.failures + CASE WHEN pg_reaper_give_back.counted THEN 1 ELSE 0 END,
           lease_expires_at = NULL, next_attempt_at = now() + pg_reaper_give_back.backoff,
           last_error = coalesce(pg_reaper_give_back.error, ''), updated_at = now()
     WHERE o.id = pg_reaper_give_back.id AND o.state = 'in_flight'
       AND o.attempts = pg_reaper_give_back.attempt
 RETURNING o.state INTO given;
    RETURN coalesce(given, 'lost');
END
$$;

-- outbox_fail(id, attempt, error, backoff, max_attempts): gives a claimed intent back after a
-- failure about its execution: `pending` again after `backoff`, or `dead` once it has failed
-- max_attempts times (failures, not claims). Returns the new state, or `lost`.
--
--   SELECT outbox_fail(42, 3, 'HTTP 500 from the status API', '30 seconds', 10);
CREATE OR REPLACE FUNCTION @extschema@.outbox_fail(id bigint, attempt integer, error text,
                                                  backoff interval, max_attempts integer)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    f CONSTANT text := 'outbox_fail';
BEGIN
    PERFORM @extschema@.pg_reaper_claim(f, id, attempt);
    PERFORM @extschema@.pg_reaper_interval(f, 'backoff', backoff, or_stays => true);
    IF max_attempts IS NULL OR max_attempts < 1 THEN
        PERFORM @extschema@.pg_reaper_invalid(f, 'max_attempts', 'must be at least 1');
    END IF;
    RETURN @extschema@.pg_reaper_give_back(id, attempt, error, backoff, max_attempts, true);
END
$$;

-- outbox_defer(id, attempt, error, backoff): gives a claimed intent back after a failure that
-- says nothing about its execution (the status API unreachable, an ERROR mark whose answer
-- never came): `pending` again after `backoff`, never counted, never dead. Returns `pending`,
-- or `lost`.
--
--   SELECT outbox_defer(42, 3, 'status API unreachable', '30 seconds');
CREATE OR REPLACE FUNCTION @extschema@.outbox_defer(id bigint, attempt integer, error text,
                                                   backoff interval)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    f CONSTANT text := 'outbox_defer';
BEGIN
    PERFORM @extschema@.pg_reaper_claim(f, id, attempt);
    PERFORM @extschema@.pg_reaper_interval(f, 'backoff', backoff, or_stays => true);
    RETURN @extschema@.pg_reaper_give_back(id, attempt, error, backoff, 2147483647, false);
END
$$;

-- The claim a relay-facing function acts on: the intent's id and the claim's attempt token,
-- neither NULL.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_claim(func text, id bigint, attempt integer)
RETURNS void
LANGUAGE plpgsql PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF id IS NULL THEN
        PERFORM @extschema@.pg_reaper_invalid(func, 'id', 'must not be NULL');
    ELSIF attempt IS NULL THEN
        PERFORM @extschema@.pg_reaper_invalid(func, 'attempt', 'must not be NULL');
    END IF;
END
$$;

-- Holds the caller's claim for at least `hold` more. A recovery does so as it starts
-- (recovery_lock); before an ERROR mark may leave (`sending`), the time is recorded too and the
-- hold is the settle delay, so that if the relay dies with the request in flight, no relay
-- reads the status again before the API had that long to apply it. Returns the intent as the
-- recovery sees it, or no row when the claim is no longer the caller's.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_hold(id bigint, attempt integer, hold interval,
                                                     sending boolean)
RETURNS TABLE (execution_id text, organization_id text, action text)
LANGUAGE plpgsql PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    UPDATE @extschema@.pg_reaper_outbox o
       SET lease_expires_at = greatest(o.lease_expires_at, now() + pg_reaper_hold.hold),
           mark_sent_at = CASE WHEN pg_reaper_hold.sending THEN now() ELSE o.mark_sent_at END,
           updated_at = now()
     WHERE o.id = pg_reaper_hold.id AND o.state = 'in_flight' AND o.attempts = pg_reaper_hold.attempt
 RETURNING o.execution_id, o.organization_id, o.action;
END
$$;

-- outbox_mark_sending(id, attempt, hold): records, and commits before the request leaves, that
-- an ERROR mark may be sent for the caller's claim, and holds the claim for at least `hold` (the
-- relay's settle delay plus one HTTP timeout). False when the claim is no longer the caller's:
-- then no mark may be sent.
--
--   SELECT outbox_mark_sending(42, 3, '40 seconds');
CREATE OR REPLACE FUNCTION @extschema@.outbox_mark_sending(id bigint, attempt integer, hold interval)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    f CONSTANT text := 'outbox_mark_sending';
BEGIN
    PERFORM @extschema@.pg_reaper_claim(f, id, attempt);
    PERFORM @extschema@.pg_reaper_interval(f, 'hold', hold);
    RETURN EXISTS (SELECT FROM @extschema@.pg_reaper_hold(id, attempt, hold, true));
END
$$;

-- outbox_release(id, attempt): hands a claimed intent back untouched (a relay shutting down);
-- false when it was not held.
--
--   SELECT outbox_release(42, 3);
CREATE OR REPLACE FUNCTION @extschema@.outbox_release(id bigint, attempt integer)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM @extschema@.pg_reaper_claim('outbox_release', id, attempt);
    UPDATE @extschema@.pg_reaper_outbox o
       SET state = 'pending', lease_expires_at = NULL, next_attempt_at = now(), updated_at = now()
     WHERE o.id = outbox_release.id AND o.state = 'in_flight' AND o.attempts = outbox_release.attempt;
    RETURN FOUND;
END
$$;

-- outbox_replay(id): makes dead intents (one, or all when id is NULL) pending again with their
-- failure budget back; returns how many. `attempts` stays (it is the fencing token: reset, a
-- stale claim's token could match again), unless it is at the maximum, set aside for that.
--
--   SELECT outbox_replay();
CREATE OR REPLACE FUNCTION @extschema@.outbox_replay(id bigint DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    UPDATE @extschema@.pg_reaper_outbox o
       SET state = 'pending', failures = 0,
           attempts = CASE WHEN o.attempts < 2147483647 THEN o.attempts ELSE 0 END,
           next_attempt_at = now(), updated_at = now()
     WHERE o.state = 'dead' AND (outbox_replay.id IS NULL OR o.id = outbox_replay.id);
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM @extschema@.pg_reaper_wake_relays();
    END IF;
    RETURN n;
END
$$;

-- Wakes the relays listening on the channel `pg_reaper_outbox`; delivered when the transaction
-- commits.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_wake_relays()
RETURNS void
LANGUAGE sql PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pg_notify('pg_reaper_outbox', '') $$;

-- The worker's housekeeping of the outbox. An intent stays in_flight only while its relay's
-- lease runs; after that any relay may claim it, and it shows as pending again. A row still
-- locked by a relay's open transaction (a paused relay) is skipped, never waited for: the next
-- tick gets it. Returns how many.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_reoffer_expired_leases()
RETURNS bigint
LANGUAGE sql PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH reoffered AS (
        UPDATE @extschema@.pg_reaper_outbox
           SET state = 'pending', lease_expires_at = NULL, next_attempt_at = now(), updated_at = now()
         WHERE id IN (SELECT id FROM @extschema@.pg_reaper_outbox
                       WHERE state = 'in_flight' AND lease_expires_at < now()
                         FOR UPDATE SKIP LOCKED)
     RETURNING 1
    )
    SELECT count(*) FROM reoffered
$$;

-- Done intents are the audit trail of recoveries; past the retention they go. Nothing else is
-- ever deleted: pending, in-flight and dead intents are work. Returns how many.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_prune_done(retention interval)
RETURNS bigint
LANGUAGE sql PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH pruned AS (
        DELETE FROM @extschema@.pg_reaper_outbox WHERE state = 'done' AND updated_at < now() - retention
     RETURNING 1
    )
    SELECT count(*) FROM pruned
$$;
