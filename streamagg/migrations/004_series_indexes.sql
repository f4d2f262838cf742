-- Lookups by series (metric, dimension type, dimension value) join on these expressions: an
-- equality on NULL never matches and IS NOT DISTINCT FROM cannot use an index. '' stands for
-- NULL safely: dimension_type is never '', and dimension_value is NULL only with it.
CREATE INDEX IF NOT EXISTS metrics_partials_series
    ON observability.metrics_partials
       (metric_name, (coalesce(dimension_type, '')), (coalesce(dimension_value, '')), bucket_time);

CREATE INDEX IF NOT EXISTS metrics_aggregates_series
    ON observability.metrics_aggregates
       (metric_name, (coalesce(dimension_type, '')), (coalesce(dimension_value, '')), granularity, bucket_time);
