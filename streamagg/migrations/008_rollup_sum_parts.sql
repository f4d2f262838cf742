-- The exact sum of a day or week row's hour sums, as the non-overlapping float64 parts of
-- streamagg.exact (little-endian, like metrics_partials.sum_parts): a week is merged from its
-- days with the same correctly rounded sum as from its hours. NULL on hour rows (their sum is
-- sum_value), on count metrics, and on rows rolled up before this migration.
ALTER TABLE observability.metrics_aggregates ADD COLUMN IF NOT EXISTS sum_parts bytea NULL;
