-- One-row status view over reaper_status(), which gathers the worker's shared-memory stats and
-- the table gauges in one place.
CREATE VIEW @extschema@.pg_reaper_status AS
    SELECT * FROM @extschema@.reaper_status();

-- Nothing is granted to PUBLIC: revoke the default EXECUTE on every function of this
-- extension (docs/security.md lists the grants an application, relay and monitoring role need).
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
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$$;
