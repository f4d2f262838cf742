-- The source offset a partial includes. A partial is only overwritten by one that includes at
-- least as much of its partition (a worker that lost the partition in a rebalance may still
-- be finishing a flush: its older state must not overwrite the new owner's).
ALTER TABLE observability.metrics_partials ADD COLUMN IF NOT EXISTS source_offset bigint NOT NULL DEFAULT -1;
