-- Hours whose day and week rows a worker still owes: a row per hour goes in with the flush that
-- wrote the hour (same transaction) and out once the worker rolled those days and weeks up.
-- Rows a worker left behind when it died are rolled up by the next worker to start or to get
-- partitions (its own are in its memory too). Roll-ups are idempotent: doing one twice is harmless.
CREATE TABLE IF NOT EXISTS observability.metrics_rollup_queue (
    id        bigserial PRIMARY KEY,
    hour      timestamptz NOT NULL,
    queued_by text NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_rollup_queue_by ON observability.metrics_rollup_queue (queued_by);
