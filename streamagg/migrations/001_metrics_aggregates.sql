-- The contract's table (CONTRACT section 4), plus value_fingerprint: the 64-bit multiset
-- fingerprint of a full metric's values, which with count/sum/min/max tells whether a new
-- write carries different evidence (only then is the row overwritten and revision bumped).
CREATE SCHEMA IF NOT EXISTS observability;

CREATE TABLE IF NOT EXISTS observability.metrics_aggregates (
    bucket_time       timestamptz      NOT NULL,
    granularity       text             NOT NULL CHECK (granularity IN ('hour', 'day', 'week')),
    metric_name       text             NOT NULL,
    dimension_type    text             NULL,
    dimension_value   text             NULL,
    count             bigint           NOT NULL,
    sum_value         double precision NULL,
    min_value         double precision NULL,
    max_value         double precision NULL,
    avg_value         double precision NULL,
    p50_value         double precision NULL,
    p95_value         double precision NULL,
    p99_value         double precision NULL,
    sketch            bytea            NULL,
    sketch_kind       text             NULL,
    value_fingerprint bigint           NULL,
    revision          integer          NOT NULL DEFAULT 1,
    updated_at        timestamptz      NOT NULL DEFAULT now(),
    CONSTRAINT metrics_aggregates_key
        UNIQUE NULLS NOT DISTINCT (bucket_time, granularity, metric_name, dimension_type, dimension_value)
);

CREATE INDEX IF NOT EXISTS metrics_aggregates_lookup
    ON observability.metrics_aggregates (metric_name, granularity, dimension_type, bucket_time);
