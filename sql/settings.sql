-- Settings. Every setting has a name `pg_reaper.x`. Its value is, in this order: the GUC when it
-- is set to something other than its default anywhere (postgresql.conf, ALTER SYSTEM, ALTER
-- DATABASE or ROLE, a session's SET);
-- otherwise the row of that name in pg_reaper_settings, which the owner of this schema can
-- update where no GUC can be set (a managed service refuses `ALTER DATABASE … SET pg_reaper.x`
-- to anyone but a superuser); otherwise the default. Durations are seconds, or an interval
-- ('2h 30min').
--
--   UPDATE pg_reaper_settings SET value = '3600' WHERE name = 'pg_reaper.stuck_timeout';
DO $settings$
BEGIN
    IF pg_catalog.to_regclass('@extschema@.pg_reaper_settings') IS NULL THEN
        CREATE TABLE @extschema@.pg_reaper_settings (
            name  text PRIMARY KEY,
            value text NOT NULL
        );
        IF EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'pg_reaper') THEN
            PERFORM pg_catalog.pg_extension_config_dump('@extschema@.pg_reaper_settings', '');
        END IF;
    END IF;
    -- Replaced on every install and upgrade: a newer version knows more names.
    ALTER TABLE @extschema@.pg_reaper_settings DROP CONSTRAINT IF EXISTS pg_reaper_settings_name_valid;
    ALTER TABLE @extschema@.pg_reaper_settings ADD CONSTRAINT pg_reaper_settings_name_valid CHECK (name IN (
        'pg_reaper.stuck_timeout', 'pg_reaper.batch_size', 'pg_reaper.dedup_retention',
        'pg_reaper.outbox_retention', 'pg_reaper.refire_function', 'pg_reaper.callback_timeout',
        'pg_reaper.reclaim_timeout'));
END
$settings$;

-- The value of setting `name` (see above), as text. pg_reaper_guc() gives the GUC's value, or
-- NULL while it is at its default (the native library's function; in the extension-free edition,
-- where a setting is a placeholder any session may SET, an SQL function in sql/portable.sql).
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_setting(name text)
RETURNS text
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    value text := @extschema@.pg_reaper_guc(name);
BEGIN
    IF value IS NULL THEN
        SELECT t.value INTO value FROM @extschema@.pg_reaper_settings t WHERE t.name = pg_reaper_setting.name;
    END IF;
    RETURN coalesce(value, CASE name
        WHEN 'pg_reaper.stuck_timeout' THEN '9000'
        WHEN 'pg_reaper.batch_size' THEN '1000'
        WHEN 'pg_reaper.dedup_retention' THEN '86400'
        WHEN 'pg_reaper.outbox_retention' THEN '86400'
        WHEN 'pg_reaper.refire_function' THEN ''
        WHEN 'pg_reaper.callback_timeout' THEN '300'
        WHEN 'pg_reaper.reclaim_timeout' THEN '600'
    END);
END
$$;

-- The value of a duration setting: bare seconds ('9000'), or an interval ('2h 30min', and the
-- '9000s' a GUC with a unit shows).
CREATE OR REPLACE FUNCTION @extschema@.pg_reaper_duration(name text)
RETURNS interval
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    value CONSTANT text := btrim(@extschema@.pg_reaper_setting(name));
BEGIN
    IF value ~ '^[0-9]+(\.[0-9]+)?$' THEN
        RETURN make_interval(secs => value::float8);
    END IF;
    RETURN value::interval;
EXCEPTION WHEN invalid_datetime_format OR datetime_field_overflow THEN
    RAISE EXCEPTION '%: % is not a duration (seconds, or an interval such as ''2h 30min'')', name, quote_literal(value)
        USING ERRCODE = 'invalid_parameter_value';
END
$$;
