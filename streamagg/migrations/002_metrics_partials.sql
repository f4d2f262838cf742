-- Per source partition partial aggregates of hours. The final hour row in metrics_aggregates
-- is the merge of the partials of every partition, made in the same transaction that writes
-- them; sum_parts keeps each partial's exact sum so the merged sum is the exact sum of all
-- values, whatever the split across partitions.
CREATE TABLE IF NOT EXISTS observability.metrics_partials (
    bucket_time       timestamptz        NOT NULL,
    metric_name       text               NOT NULL,
    dimension_type    text NULL,
    dimension_value   text NULL,
    source_partition  integer            NOT NULL,
    count             bigint             NOT NULL,
    sum_parts         bytea NULL,  -- little-endian float64 parts of the exact sum
    min_value         double precision NULL,
    max_value         double precision NULL,
    sketch            bytea NULL,
    sketch_kind       text NULL,
    value_fingerprint bigint             NULL,
    updated_at        timestamptz        NOT NULL DEFAULT now(),
    CONSTRAINT metrics_partials_key
        UNIQUE NULLS NOT DISTINCT (bucket_time, metric_name, dimension_type, dimension_value, source_partition)
);
