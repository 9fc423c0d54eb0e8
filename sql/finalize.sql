-- One-row status view over reaper_status(), which gathers the worker's shared-memory stats and
-- the table gauges in one place.
CREATE OR REPLACE VIEW @extschema@.pg_reaper_status AS
    SELECT * FROM @extschema@.reaper_status();

-- Nothing is granted to PUBLIC: revoke the default EXECUTE on every function of this extension,
-- or, installed without one, of pg_reaper's in this schema (docs/security.md lists the grants an
-- application, relay and monitoring role need).
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT d.objid::regprocedure
        FROM pg_catalog.pg_depend d
        WHERE d.refclassid = 'pg_catalog.pg_extension'::regclass
          AND d.refobjid = (SELECT oid FROM pg_catalog.pg_extension WHERE extname = 'pg_reaper')
          AND d.classid = 'pg_catalog.pg_proc'::regclass
          AND d.deptype = 'e'
        UNION
        SELECT p.oid::regprocedure
        FROM pg_catalog.pg_proc p
        WHERE p.pronamespace = '@extschema@'::regnamespace
          AND NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'pg_reaper')
          AND (p.proname LIKE 'pg\_reaper\_%' OR p.proname LIKE 'barrier\_%'
               OR p.proname LIKE 'outbox\_%'
               OR p.proname IN ('reap_expired', 'recovery_lock', 'reaper_status'))
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$$;
REVOKE ALL ON @extschema@.pg_reaper_status FROM PUBLIC;

-- The grants of the edition this one replaced, if any (see schema.sql): again on the same
-- functions and view, where they still exist.
DO $$
DECLARE
    g jsonb;
BEGIN
    FOR g IN SELECT * FROM pg_catalog.jsonb_array_elements(
                 coalesce(nullif(pg_catalog.current_setting('pg_reaper_switch.grants', true), ''), '[]')::jsonb)
    LOOP
        CONTINUE WHEN g->>0 = 'EXECUTE'
                      AND pg_catalog.to_regprocedure(pg_catalog.substr(g->>1, 10)) IS NULL;
        EXECUTE pg_catalog.format('GRANT %s ON %s TO %s', g->>0, g->>1, g->>2);
    END LOOP;
    PERFORM pg_catalog.set_config('pg_reaper_switch.grants', '', true);
END
$$;
