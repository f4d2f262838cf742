"""Day and week rows, only from merging stored hour rows (sketches merged, counts and sums added,
min of mins, max of maxes, percentiles read from the merged sketch). Never from averaging."""

from __future__ import annotations

import logging

from collections import defaultdict
from collections.abc import Iterable, Sequence

from .aggregate import Key, Row, roll_up, roll_up_aggs
from .buckets import Granularity, bucket_end_ms, bucket_start_ms
from .lanes import in_lanes
from .store import Store, WriteResult

log = logging.getLogger(__name__)

_WRITE_BATCH = 1000
_LANES = 2  # batches in flight: roll-up of bench/throughput 6.0 -> 5.0 s (three runs each)

Series = tuple[str, str | None, str | None]  # (metric, dimension type, dimension value)


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


async def rollup_keys(store: Store, hour_keys: Iterable[Key]) -> dict[Granularity, WriteResult]:
    """Recompute the day and week rows that contain the given hour keys (after a flush or a
    backfill); a row whose series has no hour row left in its bucket is deleted.

    One read per week and batch of series serves both: the week's hour rows are fetched and
    decoded once, then merged into the touched days and into the week."""
    by_week: defaultdict[int, dict[Series, set[int]]] = defaultdict(dict)
    for hour, metric, dimension_type, dimension_value in hour_keys:
        series = (metric, dimension_type, dimension_value)
        by_week[bucket_start_ms(hour, "week")].setdefault(series, set()).add(bucket_start_ms(hour, "day"))
    batches = [
        (week, ordered[i : i + _WRITE_BATCH], touched)
        for week, touched in sorted(by_week.items())
        for ordered in [sorted(touched, key=repr)]
        for i in range(0, len(ordered), _WRITE_BATCH)
    ]
    results: dict[Granularity, WriteResult] = {"day": WriteResult(), "week": WriteResult()}

    async def lane(work: Sequence[tuple[int, list[Series], dict[Series, set[int]]]]) -> None:
        for week, batch, touched in work:
            hours = await store.fetch_hour_aggs_of(week, bucket_end_ms(week, "week"), batch)
            wanted = {
                "day": {(day, *series) for series in batch for day in touched[series]},
                "week": {(week, *series) for series in batch},
            }
            for granularity in ("day", "week"):
                merged = roll_up_aggs(hours, granularity, keep=wanted[granularity])
                rows = [merged[key].to_row(key, granularity) for key in sorted(merged, key=repr)]
                written = await store.upsert_rows(rows)
                empty = sorted(wanted[granularity] - merged.keys(), key=repr)
                if empty:  # never for a flush, which writes hours; a backfill may have removed some
                    written += WriteResult(deleted=await store.delete_rollups_without_hours(granularity, empty))
                results[granularity] += written  # after the awaits: the other lane adds too

    await in_lanes(batches, _LANES, lane)  # batches of different lanes hold disjoint series
    return results
