-- On TimescaleDB the table is a hypertable on bucket_time; on plain PostgreSQL nothing happens.
-- An extension that is available but cannot be created (timescaledb not in
-- shared_preload_libraries, or a role that may not create it) leaves an ordinary table too,
-- with a notice, instead of failing every migration after it.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS timescaledb;
        EXCEPTION WHEN OTHERS THEN
            RAISE NOTICE 'timescaledb is available but cannot be created (%): metrics_aggregates stays an ordinary table; '
                         'once it can, SELECT create_hypertable(''observability.metrics_aggregates'', ''bucket_time'', '
                         'migrate_data => TRUE) converts it', SQLERRM;
            RETURN;
        END;
        PERFORM create_hypertable('observability.metrics_aggregates', 'bucket_time',
                                  if_not_exists => TRUE, migrate_data => TRUE);
    END IF;
END
$$;
