-- On TimescaleDB the table is a hypertable on bucket_time; on plain PostgreSQL nothing happens.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
        PERFORM create_hypertable('observability.metrics_aggregates', 'bucket_time',
                                  if_not_exists => TRUE, migrate_data => TRUE);
    END IF;
END
$$;
