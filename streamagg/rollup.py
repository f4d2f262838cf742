"""Day and week rows, only from merging stored hour rows (sketches merged, counts and sums added,
min of mins, max of maxes, percentiles read from the merged sketch). Never from averaging."""

from __future__ import annotations

import logging

from collections import defaultdict
from collections.abc import Iterable

from .aggregate import Key, Row, roll_up
from .buckets import Granularity, bucket_end_ms, bucket_start_ms
from .store import Store, WriteResult

log = logging.getLogger(__name__)

_WRITE_BATCH = 1000


def aligned_range(granularity: Granularity, start_ms: int, end_ms: int) -> tuple[int, int]:
    """The smallest run of whole buckets covering [start, end)."""
    first = bucket_start_ms(start_ms, granularity)
    last = bucket_start_ms(end_ms - 1, granularity) if end_ms > start_ms else first
    return first, bucket_end_ms(last, granularity)


async def rollup(store: Store, granularity: Granularity, start_ms: int, end_ms: int) -> WriteResult:
    """Recompute every ``granularity`` row whose bucket overlaps [start, end) from stored hours.

    Hour rows stream in key order, so memory holds one key's hours at a time.
    """
    if granularity == "hour":
        raise ValueError("hour rows come from events, not from roll-ups")
    first, end = aligned_range(granularity, start_ms, end_ms)
    result = WriteResult()
    pending: list[Row] = []
    key_rows: list[Row] = []
    async for row in store.iter_hour_rows_by_key(first, end):
        if key_rows and row.key[1:] != key_rows[-1].key[1:]:
            pending.extend(roll_up(key_rows, granularity))
            key_rows = []
            if len(pending) >= _WRITE_BATCH:
                result += await store.upsert_rows(pending)
                pending = []
        key_rows.append(row)
    if key_rows:
        pending.extend(roll_up(key_rows, granularity))
    result += await store.upsert_rows(pending)
    log.info("rolled up %s rows in [%d, %d): %s", granularity, first, end, result)
    return result


async def rollup_keys(store: Store, granularity: Granularity, hour_keys: Iterable[Key]) -> WriteResult:
    """Recompute the ``granularity`` rows that contain the given hour keys (after a flush or a
    backfill); a row whose series has no hour row left in its bucket is deleted."""
    if granularity == "hour":
        raise ValueError("hour rows come from events, not from roll-ups")
    by_bucket: defaultdict[int, set[tuple[str, str | None, str | None]]] = defaultdict(set)
    for hour, metric, dimension_type, dimension_value in hour_keys:
        by_bucket[bucket_start_ms(hour, granularity)].add((metric, dimension_type, dimension_value))
    result = WriteResult()
    for bucket, series in sorted(by_bucket.items()):
        ordered = sorted(series, key=repr)
        for i in range(0, len(ordered), _WRITE_BATCH):
            batch = ordered[i : i + _WRITE_BATCH]
            rows = await store.fetch_hour_rows_of(bucket, bucket_end_ms(bucket, granularity), batch)
            result += await store.upsert_rows(roll_up(rows, granularity))
            empty = set(batch) - {row.key[1:] for row in rows}
            if empty:  # never for a flush, which writes hours; a backfill may have removed some
                gone = [(bucket, *s) for s in sorted(empty, key=repr)]
                result += WriteResult(deleted=await store.delete_rollups_without_hours(granularity, gone))
    return result
