"""Day and week rows, only from merging stored hour rows (sketches merged, counts and sums added,
min of mins, max of maxes, percentiles read from the merged sketch). Never from averaging. A week
is merged from its days' rows where those check out against their hours (the same hours merged,
the same exact sum): see :func:`_roll_up_batch`."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from asyncpg import Connection

from .aggregate import Key, Row, roll_up_rows
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

    A week and batch of series at a time (:func:`_roll_up_batch`: days from their hours, the
    week from its days where their stored rows hold their hours, else from every hour), each
    batch one transaction holding its series' roll-up locks (:meth:`Store.rolling_up`)."""
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
            written: dict[Granularity, WriteResult] = {}
            unmerged: list[tuple[Granularity, Key]] = []
            async with store.rolling_up(batch) as conn:
                rolled = await _roll_up_batch(store, conn, week, batch, wanted, granularities, unmerged)
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


async def _roll_up_batch(
    store: Store,
    conn: Connection,
    week: int,
    batch: Sequence[Series],
    wanted: Mapping[Granularity, set[Key]],
    granularities: Sequence[Granularity],
    unmerged: list[tuple[Granularity, Key]],
) -> dict[Granularity, list[Row]]:
    """The wanted rows of ``granularities`` of one week and batch of series (see roll_up_rows).

    Days are merged from their hours. A week rolled up with its touched days is merged from
    days: the batch's days from the first touched one to the last, from their hours (read
    anyway), and the stored rows of the week's other days, each holding the exact sum of its
    hours' sums (``Row.sum_parts``) and checked against its hours' count and fingerprint, summed
    in PostgreSQL. So the roll-up of a Sunday's hour reads its series' Sunday hours and six day
    rows, not up to 168 hours each. A week rolled up alone (``rollup --granularity week``), or
    beside a stored day that does not hold its hours (not rolled up yet; rolled up before
    migration 008, without the exact sum; or no row, where weeks were rolled up alone), is
    merged from every hour of the week, and those days are made again on the way; so is one
    with parts of two sketch kinds past exact mode (see :meth:`Agg.merged`)."""
    week_end = bucket_end_ms(week, "week")
    targets = {granularity: wanted[granularity] for granularity in granularities}
    days = {key[0] for key in wanted["day"]} if "day" in granularities else set()
    if "day" in granularities and "week" in granularities:
        touched = (min(days), max(days) + DAY_MS)
        evidence: dict[Key, tuple[int, int | None]] = {}
        if await store.has_hour_rows(week, week_end, touched, conn):  # any series' (none in a fresh table's week)
            evidence = await store.hour_evidence_by_day(week, week_end, batch, conn, but=touched)
        stored: dict[Key, Row] = {}
        if evidence:
            stored = {row.key: row for row in await store.fetch_rows_of("day", week, week_end, batch, conn, but=touched)}
        stale = {key for key, totals in evidence.items() if not _rolled_up_from_its_hours(stored.get(key), totals)}
        if not stale:
            hours = await store.fetch_rows_of("hour", *touched, batch, conn)
            in_range = wanted["day"] | {(bucket_start_ms(row.bucket_ms, "day"), *row.key[1:]) for row in hours}
            not_merged: list[tuple[Granularity, Key]] = []
            rolled = roll_up_rows(hours, {"day": in_range}, not_merged)
            in_order = sorted([*(stored[key] for key in evidence), *rolled["day"]], key=lambda row: row.bucket_ms)
            rolled |= roll_up_rows(in_order, {"week": wanted["week"]}, not_merged)
            # A merge refused (parts of two sketch kinds past exact mode): from the hours, as
            # before, where fewer refuse (a day of many exact hours of one kind is past it).
            if not not_merged:
                return rolled
        targets["day"] = wanted["day"] | stale
        start, end = week, week_end
    elif days:  # days only (the daily schedule): their hours, not the whole week's
        start, end = min(days), max(days) + DAY_MS
    else:
        start, end = week, week_end
    hours = await store.fetch_rows_of("hour", start, end, batch, conn)
    return roll_up_rows(hours, targets, unmerged)


def _rolled_up_from_its_hours(day: Row | None, hours: tuple[int, int | None]) -> bool:
    """Whether a stored day row holds what its stored hours do (their count and fingerprint:
    the evidence a row is kept on), and, for a full metric, their exact sum."""
    if day is None or day.count != hours[0]:
        return False
    return day.sketch is None or (day.sum_parts is not None and day.fingerprint == hours[1])


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
