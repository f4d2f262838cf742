"""Day and week rows, only from merging stored hour rows (sketches merged, counts and sums added,
min of mins, max of maxes, percentiles read from the merged sketch). Never from averaging."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence

from .aggregate import Key, roll_up_rows
from .buckets import DAY_MS, Granularity, bucket_end_ms, bucket_start_ms, rfc3339
from .lanes import in_lanes
from .store import Series, Store, WriteResult, series_lock_id, warn_unmerged

log = logging.getLogger(__name__)

_WRITE_BATCH = 1000
# In the roll-up queue's queued_by of a backfill (which may remove hours; a worker never does).
BACKFILL_QUEUE_TAG = "-backfill:"
_LANES = 2  # batches in flight: roll-up of bench/throughput 6.0 -> 5.0 s (three runs each)


def aligned_range(granularity: Granularity, start_ms: int, end_ms: int) -> tuple[int, int]:
    """The smallest run of whole buckets covering [start, end)."""
    first = bucket_start_ms(start_ms, granularity)
    last = bucket_start_ms(end_ms - 1, granularity) if end_ms > start_ms else first
    return first, bucket_end_ms(last, granularity)


async def rollup(store: Store, granularity: Granularity, start_ms: int, end_ms: int) -> WriteResult:
    """Recompute every ``granularity`` row whose bucket overlaps [start, end) and holds an hour
    row, from the stored hours (as :func:`rollup_keys`, one series batch at a time); delete the
    rows of those buckets whose series has no hour row left in them."""
    if granularity == "hour":
        raise ValueError("hour rows come from events, not from roll-ups")
    first, end = aligned_range(granularity, start_ms, end_ms)
    result = (await rollup_keys(store, await store.hour_series_days(first, end), (granularity,)))[granularity]
    result += WriteResult(deleted=await store.delete_rollups_without_hours_between(granularity, first, end))
    log.info("rolled up %s rows in [%s, %s): %s", granularity, rfc3339(first), rfc3339(end), result)
    return result


async def rollup_keys(
    store: Store, hour_keys: Iterable[Key], granularities: Sequence[Granularity] = ("day", "week")
) -> dict[Granularity, WriteResult]:
    """Recompute the day and week rows (or only ``granularities``) that contain the given hour
    keys (after a flush or a backfill); a row whose series has no hour row left in its bucket is
    deleted.

    One read per week and batch of series serves both: the week's hour rows are fetched and
    decoded once, then merged into the touched days and into the week. Each batch is one
    transaction holding its series' roll-up locks (:meth:`Store.rolling_up`)."""
    by_week: defaultdict[int, dict[Series, set[int]]] = defaultdict(dict)
    for hour, metric, dimension_type, dimension_value in hour_keys:
        series = (metric, dimension_type, dimension_value)
        by_week[bucket_start_ms(hour, "week")].setdefault(series, set()).add(bucket_start_ms(hour, "day"))
    # Series in order of their lock stripe, and batches in order of their first stripe: the two
    # lanes take consecutive runs of batches, so they seldom wait for each other's locks.
    batches = sorted(
        (
            (series_lock_id(ordered[i]), week, ordered[i : i + _WRITE_BATCH], touched)
            for week, touched in by_week.items()
            for ordered in [sorted(touched, key=lambda s: (series_lock_id(s), repr(s)))]
            for i in range(0, len(ordered), _WRITE_BATCH)
        ),
        key=lambda batch: batch[:2],
    )
    results = {granularity: WriteResult() for granularity in granularities}

    async def lane(work: Sequence[tuple[int, int, list[Series], dict[Series, set[int]]]]) -> None:
        for _, week, batch, touched in work:
            wanted = {
                "day": {(day, *series) for series in batch for day in touched[series]},
                "week": {(week, *series) for series in batch},
            }
            # Days only (the daily schedule): their hours, not the whole week's.
            days = {key[0] for key in wanted["day"]} if "week" not in granularities else ()
            start, end = (min(days), max(days) + DAY_MS) if days else (week, bucket_end_ms(week, "week"))
            written: dict[Granularity, WriteResult] = {}
            unmerged: list[tuple[Granularity, Key]] = []
            async with store.rolling_up(batch) as conn:
                hours = await store.fetch_hour_rows_of(start, end, batch, conn)
                rolled = roll_up_rows(hours, {granularity: wanted[granularity] for granularity in granularities}, unmerged)
                for granularity in granularities:
                    rows = sorted(rolled[granularity], key=lambda row: repr(row.key))
                    written[granularity] = await store.upsert_rows(rows, conn)
                    left = [key for of, key in unmerged if of == granularity]  # as they were
                    written[granularity] += WriteResult(unmerged=len(left))
                    warn_unmerged(granularity, left)
                    empty = sorted(wanted[granularity] - {row.key for row in rows} - set(left), key=repr)
                    if empty:  # never for a flush, which writes hours; a backfill may have removed some
                        deleted = await store.delete_rollups_without_hours(granularity, empty, conn)
                        written[granularity] += WriteResult(deleted=deleted)
            for granularity, result in written.items():  # once committed
                results[granularity] += result

    await in_lanes(batches, _LANES, lane)
    return results


async def roll_up_owed(store: Store, exclude: str) -> dict[Granularity, WriteResult]:
    """Roll up the hours that others than ``exclude`` queued and did not roll up: a dead
    worker's debt or an interrupted backfill's (a live one's is merely done twice). A day at a
    time, with every series that has a row in its owed hours, and, where a backfill queued them,
    every series with a day row on that day or a week row in its week: a series whose hours it
    removed is named only by those, and its day and week rows are made again from the hours it
    has left, or deleted (as any roll-up does, under the series' locks)."""
    owed = await store.owed_rollups(exclude=exclude)
    results = {granularity: WriteResult() for granularity in ("day", "week")}
    if not owed:
        return results
    by_backfill = await store.owed_rollups(exclude=exclude, queued_by_like=f"%{BACKFILL_QUEUE_TAG}%")
    log.info("rolling up %d hours that were flushed and not rolled up", len(owed))
    by_day: dict[int, list[int]] = {}
    for hour in owed:
        by_day.setdefault(bucket_start_ms(hour, "day"), []).append(hour)
    for day, hours in sorted(by_day.items()):
        keys = set(await store.hour_keys_at(hours))
        if any(hour in by_backfill for hour in hours):  # it may have removed a series' hour: all of the day's
            keys |= {(hours[0], *series) for series in await store.series_with_rows("day", day)}
            # and of its week: a week rolled up on its own (`rollup --granularity week`) has no day row
            keys |= {(hours[0], *series) for series in await store.series_with_rows("week", bucket_start_ms(day, "week"))}
        for granularity, result in (await rollup_keys(store, keys)).items():
            results[granularity] += result
        await store.rolled_up(ids=[row for hour in hours for row in owed[hour]])
    return results
