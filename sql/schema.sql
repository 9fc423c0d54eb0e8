-- pg_reaper state. Every name is qualified with @extschema@ so the extension works in any
-- schema and never depends on the caller's search_path.

-- The two barrier tables are created here, or adopted when the schema already has them: the
-- reference platform's own migration creates pg_barrier_state and pg_batch_dedup (without
-- defaults, callback column or created_at index, and with a surrogate id on the dedup table)
-- and its workers keep using them with their own SQL. An adopted table keeps its rows and its
-- definition; pg_reaper adds only what its functions and its hot path need (the callback and
-- refired_at columns, the two indexes reaping and the marker sweep use, fillfactor 70) and does not make it
-- a member of the extension, so DROP EXTENSION leaves it and its rows alone. A same-named
-- table that cannot be adopted fails CREATE EXTENSION before anything was changed.
--
-- Index design (HOT versus reap cost): barrier_decrement rewrites remaining, results and
-- last_progress_at, so none of them is indexed and every decrement can be a HOT update
-- (fillfactor leaves room on the page for the new version). The stranded predicate still
-- reaches its rows through indexes: expires_at is never moved by a decrement, and a barrier
-- whose last progress is older than the stuck timeout was necessarily created before that
-- too, so created_at (also never moved by a decrement) bounds the stale-progress strands.
-- Switching editions on one database (a platform that moves from a managed service to its own
-- servers, or back), rows, markers, settings and intents kept:
--
-- - CREATE EXTENSION over the extension-free edition: the edition's functions, view and tick
--   record go (this script creates the functions and view again, as the extension's); its
--   tables are adopted below. Its functions are those with pg_reaper's names (as in
--   finalize.sql) owned by the owner of its tick record.
-- - The edition's file over the extension: the extension's tables, their sequence and the
--   decrement's result type are detached from it, then DROP EXTENSION removes its functions and
--   view, and the file creates them again. Only the extension's owner may, as for DROP EXTENSION.
--
-- Either way the EXECUTE and SELECT grants on the functions and the view are carried over,
-- the former owner's own included (finalize.sql grants them again; never to PUBLIC).
DO $switch$
DECLARE
    ext oid;
    ext_schema oid;
    ext_owner oid;
    -- Inside CREATE EXTENSION this runs first: the extension has no member yet.
    creating boolean;
    edition_owner oid;
    -- pg_reaper's functions in this schema (its names, as in finalize.sql).
    functions regprocedure[];
    member record;
    f regprocedure;
BEGIN
    SELECT e.oid, e.extnamespace, e.extowner INTO ext, ext_schema, ext_owner
      FROM pg_catalog.pg_extension e WHERE e.extname = 'pg_reaper';
    creating := ext IS NOT NULL AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
                                                 WHERE d.refobjid = ext AND d.deptype = 'e');
    SELECT c.relowner INTO edition_owner FROM pg_catalog.pg_class c
     WHERE c.oid = pg_catalog.to_regclass('@extschema@.pg_reaper_ticks');
    IF ext IS NULL OR (creating AND edition_owner IS NULL) THEN
        RETURN;
    ELSIF NOT creating AND ext_schema <> '@extschema@'::regnamespace THEN
        RAISE EXCEPTION 'pg_reaper: the extension is installed in schema %, not here; install the extension-free edition into that schema to switch to it',
            ext_schema::regnamespace
            USING ERRCODE = 'duplicate_object';
    ELSIF NOT creating AND NOT pg_catalog.pg_has_role(ext_owner, 'USAGE') THEN
        RAISE EXCEPTION 'pg_reaper: the extension is installed here; switching to the extension-free edition drops it, which only its owner % may do (nothing was changed)',
            ext_owner::regrole
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT pg_catalog.array_agg(p.oid::regprocedure) INTO functions
      FROM pg_catalog.pg_proc p
     WHERE p.pronamespace = '@extschema@'::regnamespace
       AND (p.proname LIKE 'pg\_reaper\_%' OR p.proname LIKE 'barrier\_%'
            OR p.proname LIKE 'outbox\_%'
            OR p.proname IN ('reap_expired', 'recovery_lock', 'reaper_status'));
    PERFORM pg_catalog.set_config('pg_reaper_switch.grants', coalesce((
        SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_array(g.privilege, g.object, g.grantee))
          FROM (SELECT 'EXECUTE' AS privilege, 'FUNCTION ' OPERATOR(pg_catalog.||) p.oid::regprocedure::text AS object,
                       a.grantee::regrole::text AS grantee
                  FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
                 WHERE p.oid = ANY (functions::oid[])
                   AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0
                UNION ALL
                SELECT 'SELECT', 'TABLE ' OPERATOR(pg_catalog.||) c.oid::regclass::text, a.grantee::regrole::text
                  FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
                 WHERE c.oid = pg_catalog.to_regclass('@extschema@.pg_reaper_status')
                   AND a.privilege_type = 'SELECT' AND a.grantee <> 0) g),
        '[]')::text, true);
    IF creating THEN
        DROP VIEW IF EXISTS @extschema@.pg_reaper_status;
        FOR f IN
            SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
             WHERE p.oid = ANY (functions::oid[]) AND p.proowner = edition_owner
        LOOP
            EXECUTE pg_catalog.format('DROP FUNCTION %s', f);
        END LOOP;
        DROP TABLE @extschema@.pg_reaper_ticks;
        RAISE NOTICE 'pg_reaper: the extension replaces the extension-free edition in schema %: its tables, rows, intents and grants are kept', '@extschema@';
    ELSE
        -- Each is checked again just before it is detached: detaching one can detach others
        -- that belong to it (PostgreSQL 17 lists a relation's types as members of their own).
        FOR member IN
            SELECT CASE c.relkind WHEN 'r' THEN 'TABLE' ELSE 'SEQUENCE' END AS kind,
                   c.oid::regclass::text AS name, d.classid, d.objid
              FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_class c ON c.oid = d.objid
             WHERE d.refobjid = ext AND d.deptype = 'e' AND d.classid = 'pg_catalog.pg_class'::regclass
               AND c.relkind IN ('r', 'S')
            UNION ALL
            -- The standalone composite type (the decrement's result), not a relation's row or
            -- array type.
            SELECT 'TYPE', t.oid::regtype::text, d.classid, d.objid
              FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_type t ON t.oid = d.objid
              JOIN pg_catalog.pg_class c ON c.oid = t.typrelid
             WHERE d.refobjid = ext AND d.deptype = 'e' AND d.classid = 'pg_catalog.pg_type'::regclass
               AND c.relkind = 'c'
        LOOP
            CONTINUE WHEN NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
                                       WHERE d.refobjid = ext AND d.deptype = 'e'
                                         AND d.classid = member.classid AND d.objid = member.objid);
            EXECUTE pg_catalog.format('ALTER EXTENSION pg_reaper DROP %s %s', member.kind, member.name);
        END LOOP;
        DROP EXTENSION pg_reaper;
        RAISE NOTICE 'pg_reaper: the extension-free edition replaces the extension in schema %: its tables, rows, intents and grants are kept; take pg_reaper out of shared_preload_libraries', '@extschema@';
    END IF;
END
$switch$;

-- @adoption-begin (the upgrade script takes this function from here)
-- What keeps pg_reaper's functions from working on the barrier tables of this schema, one row
-- per problem, in the order they are checked: a table that is not a table, a column they read
-- or write missing or of another type, a column they do not fill that is NOT NULL without a
-- default, a missing unique key their ON CONFLICT relies on. Run before adopting a table
-- (`adopting`: the columns pg_reaper adds itself may be missing then) and, by the worker and
-- the status view, on the tables in use: the platform's migrations keep changing them.
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_table_problems(adopting boolean DEFAULT false)
RETURNS TABLE (relation text, problem text, sqlstate text)
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- Columns the functions read and write: table, column, type. Anything else in an adopted
    -- table must be fillable without them (nullable, a default, an identity).
    needed CONSTANT text[][] := ARRAY[
        ['pg_barrier_state', 'execution_id', 'text'],
        ['pg_barrier_state', 'organization_id', 'text'],
        ['pg_barrier_state', 'remaining', 'integer'],
        ['pg_barrier_state', 'results', 'jsonb'],
        ['pg_barrier_state', 'created_at', 'timestamp with time zone'],
        ['pg_barrier_state', 'expires_at', 'timestamp with time zone'],
        ['pg_barrier_state', 'last_progress_at', 'timestamp with time zone'],
        ['pg_barrier_state', 'callback', 'jsonb'],
        ['pg_barrier_state', 'refired_at', 'timestamp with time zone'],
        ['pg_barrier_state', 'callback_due_at', 'timestamp with time zone'],
        ['pg_barrier_state', 'cut_from', 'timestamp with time zone'],
        ['pg_batch_dedup', 'execution_id', 'text'],
        ['pg_batch_dedup', 'batch_index', 'integer'],
        ['pg_batch_dedup', 'created_at', 'timestamp with time zone'],
        ['pg_batch_dedup', 'lease_token', 'bigint'],
        ['pg_batch_dedup', 'lease_expires_at', 'timestamp with time zone']];
    -- The columns pg_reaper adds to a table it adopts.
    added CONSTANT text[] := ARRAY['callback', 'refired_at', 'callback_due_at', 'cut_from',
                                   'lease_token', 'lease_expires_at'];
    -- The unique key each table's ON CONFLICT relies on.
    keys CONSTANT text[][] := ARRAY[
        ['pg_barrier_state', 'execution_id'],
        ['pg_batch_dedup', 'execution_id,batch_index']];
    tbl text;
    rel regclass;
    kind "char";
    i int;
    col record;
    found_type text;
BEGIN
    FOREACH tbl IN ARRAY ARRAY['pg_barrier_state', 'pg_batch_dedup'] LOOP
        rel := to_regclass('@extschema@.' || tbl);
        CONTINUE WHEN rel IS NULL;
        relation := '@extschema@.' || tbl;
        SELECT c.relkind INTO kind FROM pg_class c WHERE c.oid = rel;
        IF kind <> 'r' THEN
            problem := format('it is not an ordinary table (relkind %s)', kind);
            sqlstate := 'wrong_object_type';
            RETURN NEXT;
            CONTINUE;
        END IF;
        FOR i IN 1 .. array_length(needed, 1) LOOP
            CONTINUE WHEN needed[i][1] <> tbl;
            SELECT format_type(a.atttypid, a.atttypmod) INTO found_type
              FROM pg_attribute a
             WHERE a.attrelid = rel AND a.attname = needed[i][2] AND NOT a.attisdropped;
            IF found_type IS NULL AND NOT (adopting AND needed[i][2] = ANY (added)) THEN
                problem := format('it has no column "%s" (%s)', needed[i][2], needed[i][3]);
                sqlstate := 'undefined_column';
                RETURN NEXT;
            ELSIF found_type IS DISTINCT FROM needed[i][3] AND found_type IS NOT NULL THEN
                problem := format('column "%s" is %s, expected %s', needed[i][2], found_type, needed[i][3]);
                sqlstate := 'datatype_mismatch';
                RETURN NEXT;
            END IF;
        END LOOP;
        FOR col IN
            SELECT a.attname FROM pg_attribute a
             WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
               AND a.attnotnull AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = ''
               AND NOT a.attname::text = ANY (SELECT needed[j][2] FROM generate_subscripts(needed, 1) j
                                               WHERE needed[j][1] = tbl)
             ORDER BY a.attnum
        LOOP
            problem := format('column "%s" is NOT NULL without a default, and pg_reaper''s functions do not fill it', col.attname);
            sqlstate := 'not_null_violation';
            RETURN NEXT;
        END LOOP;
        FOR i IN 1 .. array_length(keys, 1) LOOP
            CONTINUE WHEN keys[i][1] <> tbl;
            PERFORM FROM pg_index x
              WHERE x.indrelid = rel AND x.indisunique AND x.indisvalid AND x.indpred IS NULL
                AND x.indexprs IS NULL
                AND (SELECT string_agg(a.attname, ',' ORDER BY a.attname)
                       FROM pg_attribute a
                      WHERE a.attrelid = rel AND a.attnum = ANY (x.indkey::int2[]))
                    = (SELECT string_agg(k, ',' ORDER BY k)
                         FROM unnest(string_to_array(keys[i][2], ',')) k);
            IF NOT FOUND THEN
                problem := format('it has no unique index or constraint on exactly (%s)', keys[i][2]);
                sqlstate := 'invalid_table_definition';
                RETURN NEXT;
            END IF;
        END LOOP;
    END LOOP;
END
$$;
-- @adoption-end

DO $adopt$
DECLARE
    tbl text;
    cols text;
    i int;
    col record;
    barrier_adopted boolean;
    dedup_adopted boolean;
    -- CREATE EXTENSION, or the extension-free edition's file.
    in_extension CONSTANT boolean := EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'pg_reaper');
BEGIN
    -- Check both tables before changing either: an ERROR here leaves the database as it was.
    FOR col IN SELECT * FROM @extschema@.pg_reaper_table_problems(true) LOOP
        RAISE EXCEPTION 'pg_reaper cannot adopt %: %', col.relation, col.problem
            USING ERRCODE = col.sqlstate;
    END LOOP;

    barrier_adopted := pg_catalog.to_regclass('@extschema@.pg_barrier_state') IS NOT NULL;
    dedup_adopted := pg_catalog.to_regclass('@extschema@.pg_batch_dedup') IS NOT NULL;

    -- One row per fan-in barrier. `remaining` has no >= 0 check on purpose: a negative value
    -- is the "already torn down" signal that barrier_decrement turns into a delete.
    IF barrier_adopted THEN
        -- The columns pg_reaper adds, nullable: the platform's own SQL never writes them.
        FOR col IN SELECT * FROM (VALUES ('callback', 'jsonb'), ('refired_at', 'timestamptz'),
                                         ('callback_due_at', 'timestamptz'), ('cut_from', 'timestamptz')) AS c(name, type)
                    WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_attribute a
                                       WHERE a.attrelid = '@extschema@.pg_barrier_state'::regclass
                                         AND a.attname = c.name AND NOT a.attisdropped) LOOP
            EXECUTE pg_catalog.format('ALTER TABLE @extschema@.pg_barrier_state ADD COLUMN %I %s', col.name, col.type);
        END LOOP;
        -- Pages written from now on keep room for HOT updates; existing pages fill as they are.
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_class c, pg_catalog.unnest(c.reloptions) o
                        WHERE c.oid = '@extschema@.pg_barrier_state'::regclass AND o LIKE 'fillfactor=%') THEN
            ALTER TABLE @extschema@.pg_barrier_state SET (fillfactor = 70);
        END IF;
    ELSE
        CREATE TABLE @extschema@.pg_barrier_state (
            execution_id     text        NOT NULL PRIMARY KEY,
            organization_id  text        NOT NULL DEFAULT '',
            remaining        integer     NOT NULL,
            results          jsonb       NOT NULL DEFAULT '[]'::jsonb,
            callback         jsonb,
            created_at       timestamptz NOT NULL DEFAULT now(),
            expires_at       timestamptz NOT NULL,
            last_progress_at timestamptz NOT NULL DEFAULT now(),
            -- When the relay re-fired the callback: the row stays as the execution's handle
            -- until a status read finds it terminal, and is never re-fired again. (Last, as
            -- an upgrade adds it.)
            refired_at       timestamptz,
            -- Set by the final decrement of a barrier with a callback while a re-fire hook is
            -- configured: past it, nobody finished the barrier, and the worker's tick strands
            -- it (cutting expires_at to then, saving the deadline in cut_from, which a
            -- declined re-fire puts back).
            callback_due_at  timestamptz,
            cut_from         timestamptz,
            CONSTRAINT pg_barrier_execution_id_not_empty CHECK (execution_id <> ''),
            CONSTRAINT pg_barrier_expires_after_created CHECK (expires_at > created_at),
            CONSTRAINT pg_barrier_results_is_array CHECK (jsonb_typeof(results) = 'array')
        ) WITH (fillfactor = 70);
        -- Keep the rows through pg_dump / pg_restore (an extension's tables are not dumped
        -- otherwise; without the extension they are ordinary tables).
        IF in_extension THEN
            PERFORM pg_catalog.pg_extension_config_dump('@extschema@.pg_barrier_state', '');
        END IF;
    END IF;

    -- One marker per claimed batch. No foreign key to the barrier on purpose: a marker may
    -- outlive its barrier (barrier_abort with preserve_dedup) so that a redelivery is skipped.
    -- A batch claimed with a lease (barrier_claim_lease) has, while it runs, its fencing token
    -- and the lease's end; both NULL once it is done (or given up): never claimed again.
    IF dedup_adopted THEN
        FOR col IN SELECT * FROM (VALUES ('lease_token', 'bigint'), ('lease_expires_at', 'timestamptz')) AS c(name, type)
                    WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_attribute a
                                       WHERE a.attrelid = '@extschema@.pg_batch_dedup'::regclass
                                         AND a.attname = c.name AND NOT a.attisdropped) LOOP
            EXECUTE pg_catalog.format('ALTER TABLE @extschema@.pg_batch_dedup ADD COLUMN %I %s', col.name, col.type);
        END LOOP;
    ELSE
        CREATE TABLE @extschema@.pg_batch_dedup (
            execution_id     text        NOT NULL,
            batch_index      integer     NOT NULL,
            created_at       timestamptz NOT NULL DEFAULT now(),
            lease_token      bigint,
            lease_expires_at timestamptz,
            CONSTRAINT pg_batch_dedup_pkey PRIMARY KEY (execution_id, batch_index),
            CONSTRAINT pg_batch_dedup_batch_index_non_negative CHECK (batch_index >= 0)
        );
        IF in_extension THEN
            PERFORM pg_catalog.pg_extension_config_dump('@extschema@.pg_batch_dedup', '');
        END IF;
    END IF;

    -- The indexes reaping and the marker sweep scan, unless a plain index already starts with
    -- the same columns. The worker walks the strands in (deadline, id) and (creation, id)
    -- order, resuming after the last one it queued, so a batch costs the same however many
    -- strands are queued ahead of it (a mass strand shares one timestamp: the id breaks ties).
    FOR i IN 1 .. 3 LOOP
        tbl := (ARRAY['pg_barrier_state', 'pg_barrier_state', 'pg_batch_dedup'])[i];
        cols := (ARRAY['expires_at,execution_id', 'created_at,execution_id', 'created_at'])[i];
        CONTINUE WHEN EXISTS (
            SELECT FROM pg_catalog.pg_index x
             WHERE x.indrelid = ('@extschema@.' OPERATOR(pg_catalog.||) tbl)::regclass
               AND x.indpred IS NULL AND x.indexprs IS NULL
               AND (SELECT pg_catalog.string_agg(a.attname, ',' ORDER BY k.n)
                      FROM pg_catalog.unnest(x.indkey::int2[]) WITH ORDINALITY k(attnum, n)
                      JOIN pg_catalog.pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
                     WHERE k.n <= pg_catalog.array_length(pg_catalog.string_to_array(cols, ','), 1))
                   = cols);
        EXECUTE pg_catalog.format('CREATE INDEX %I ON @extschema@.%I (%s)',
            (ARRAY['pg_barrier_expires_key_idx', 'pg_barrier_created_key_idx', 'pg_batch_dedup_created_idx'])[i],
            tbl, cols);
    END LOOP;
    -- The deadlines the tick cuts short (overdue callbacks, lapsed leases): partial, so that
    -- they hold only the few rows concerned. No decrement but the last writes callback_due_at,
    -- and a renewal writes only lease_expires_at (the leases are found through their tokens,
    -- which only a claim sets and only the end of the lease clears), so those stay HOT updates.
    -- (Checked by name, not IF NOT EXISTS: inside CREATE EXTENSION that refuses an object
    -- the extension does not own, such as the extension-free edition's.)
    IF pg_catalog.to_regclass('@extschema@.pg_barrier_callback_due_idx') IS NULL THEN
        CREATE INDEX pg_barrier_callback_due_idx
            ON @extschema@.pg_barrier_state (callback_due_at) WHERE callback_due_at IS NOT NULL;
    END IF;
    IF pg_catalog.to_regclass('@extschema@.pg_batch_dedup_lease_idx') IS NULL THEN
        CREATE INDEX pg_batch_dedup_lease_idx
            ON @extschema@.pg_batch_dedup (lease_token) WHERE lease_token IS NOT NULL;
    END IF;
    -- Fencing tokens of leased claims: each claim of a batch gets a new, larger one.
    IF pg_catalog.to_regclass('@extschema@.pg_reaper_lease_token_seq') IS NULL THEN
        CREATE SEQUENCE @extschema@.pg_reaper_lease_token_seq;
    END IF;
    IF in_extension AND EXISTS (
        SELECT FROM pg_catalog.pg_depend d
         WHERE d.classid = 'pg_catalog.pg_class'::regclass
           AND d.objid = '@extschema@.pg_reaper_lease_token_seq'::regclass AND d.deptype = 'e') THEN
        PERFORM pg_catalog.pg_extension_config_dump('@extschema@.pg_reaper_lease_token_seq', '');
    END IF;
END
$adopt$;

-- What barrier_decrement returns: a single row, so the function is entered once per call
-- (a set-returning function is entered again to say "no more rows").
--
-- This type and the outbox below are created once: where they exist (the extension-free
-- edition's, kept when the extension is created over it, or the other way round) they are kept
-- with their rows.
DO $state$
BEGIN
    IF pg_catalog.to_regtype('@extschema@.barrier_decrement_result') IS NULL THEN
        CREATE TYPE @extschema@.barrier_decrement_result AS (status text, remaining integer, results jsonb);
    END IF;
    IF pg_catalog.to_regclass('@extschema@.pg_reaper_outbox') IS NOT NULL THEN
        RETURN;
    END IF;
    -- Recovery intents: one live (pending, in_flight or dead) intent per execution, enforced by
    -- a partial unique index so that concurrent reapers cannot queue the same strand twice.
    -- `attempts` counts claims and is the claim's fencing token; `failures` counts the failures
    -- that were about this execution (compared with the relay's --max-attempts), never those of an
    -- unreachable API; `mark_sent_at` is when an ERROR mark last may have left for the API;
    -- `action` is set on intents an operator queued with barrier_recover() ('error' or 'refire':
    -- carried out without the stranded re-check), NULL on those reaping queued. The last three came
    -- in 0.2.0 and sit last, where the upgrade from 0.1.0 adds them, so that a fresh install and an
    -- upgraded one have the same table.
    CREATE TABLE @extschema@.pg_reaper_outbox (
        id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        execution_id     text        NOT NULL,
        organization_id  text        NOT NULL,
        remaining        integer     NOT NULL,
        state            text        NOT NULL DEFAULT 'pending',
        outcome          text,
        attempts         integer     NOT NULL DEFAULT 0,
        next_attempt_at  timestamptz NOT NULL DEFAULT now(),
        lease_expires_at timestamptz,
        last_error       text,
        created_at       timestamptz NOT NULL DEFAULT now(),
        updated_at       timestamptz NOT NULL DEFAULT now(),
        failures         integer     NOT NULL DEFAULT 0,
        mark_sent_at     timestamptz,
        action           text,
        CONSTRAINT pg_reaper_outbox_state_valid
            CHECK (state IN ('pending', 'in_flight', 'done', 'dead')),
        CONSTRAINT pg_reaper_outbox_outcome_valid
            CHECK (outcome IN ('marked_error', 'already_terminal', 'gone', 'rearmed', 'refired')),
        CONSTRAINT pg_reaper_outbox_outcome_iff_done CHECK ((state = 'done') = (outcome IS NOT NULL)),
        CONSTRAINT pg_reaper_outbox_lease_iff_in_flight
            CHECK ((state = 'in_flight') = (lease_expires_at IS NOT NULL)),
        CONSTRAINT pg_reaper_outbox_attempts_non_negative CHECK (attempts >= 0),
        CONSTRAINT pg_reaper_outbox_failures_non_negative CHECK (failures >= 0),
        CONSTRAINT pg_reaper_outbox_action_valid CHECK (action IN ('error', 'refire'))
    );
    CREATE UNIQUE INDEX pg_reaper_outbox_live_uniq
        ON @extschema@.pg_reaper_outbox (execution_id) WHERE state <> 'done';
    -- A claim reads due intents in (next_attempt_at, id) order with a limit: the id breaks the
    -- ties of intents queued by one statement, so a claim never sorts a whole backlog.
    CREATE INDEX pg_reaper_outbox_due_idx
        ON @extschema@.pg_reaper_outbox (next_attempt_at, id) WHERE state = 'pending';
    CREATE INDEX pg_reaper_outbox_lease_idx
        ON @extschema@.pg_reaper_outbox (lease_expires_at) WHERE state = 'in_flight';
END
$state$;

-- The stranded predicate, defined once. Reap, the relay's re-check, the guarded delete and the
-- status gauges all call it. It is a single-expression SQL function so the planner inlines it
-- and can use the two indexes above; its operators are schema-qualified because an inlined body
-- is parsed under the caller's search_path (and parenthesised: OPERATOR() forms all share one
-- precedence). The created_at term is implied by the last_progress_at
-- term (progress never precedes creation) and is there only to give the planner an index.
CREATE OR REPLACE FUNCTION @extschema@.barrier_is_stranded(
    expires_at timestamptz,
    last_progress_at timestamptz,
    created_at timestamptz,
    stuck_timeout interval
) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT $1 OPERATOR(pg_catalog.<) pg_catalog.now()
        OR ($2 OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-) $4)
            AND $3 OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-) $4))
$$;

-- Keep the outbox through pg_dump / pg_restore (the barrier tables: above, when created here).
DO $dump$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_depend d
                WHERE d.classid = 'pg_catalog.pg_class'::regclass
                  AND d.objid = '@extschema@.pg_reaper_outbox'::regclass AND d.deptype = 'e') THEN
        PERFORM pg_catalog.pg_extension_config_dump('@extschema@.pg_reaper_outbox', '');
        PERFORM pg_catalog.pg_extension_config_dump('@extschema@.pg_reaper_outbox_id_seq', '');
    END IF;
END
$dump$;
