"""Day and week rows, only from merging stored hour rows (sketches merged, counts and sums added,
min of mins, max of maxes, percentiles read from the merged sketch). Never from averaging. A week
is merged from its days' rows where those check out against their hours (the same hours merged,
the same exact sum): see :func:`_roll_up_batch`."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import pickle
import signal
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from asyncpg import Connection

from .aggregate import Key, Row, roll_up_rows
from .buckets import DAY_MS, Granularity, bucket_end_ms, bucket_start_ms, rfc3339
from .lanes import in_lanes
from .logs import configure_logging
from .store import Series, Store, StoreError, WriteResult, series_lock_id, warn_unmerged

log = logging.getLogger(__name__)

_WRITE_BATCH = 1000
# In the roll-up queue's queued_by of a backfill (which may remove hours; a worker never does).
BACKFILL_QUEUE_TAG = "-backfill:"
_LANES = 2  # batches in flight: roll-up of bench/throughput 6.0 -> 5.0 s (three runs each)


Batch = tuple[int, int, list[Series], dict[Series, set[int]]]  # (first lock stripe, week, series, their touched days)


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
    store: Store,
    hour_keys: Iterable[Key],
    granularities: Sequence[Granularity] = ("day", "week"),
    helpers: RollupHelpers | None = None,
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
            (series_lock_id(batch[0]), week, batch, {series: touched[series] for series in batch})
            for week, touched in by_week.items()
            for ordered in [sorted(touched, key=lambda s: (series_lock_id(s), repr(s)))]
            for batch in (ordered[i : i + _WRITE_BATCH] for i in range(0, len(ordered), _WRITE_BATCH))
        ),
        key=lambda batch: batch[:2],
    )
    results = {granularity: WriteResult() for granularity in granularities}
    if helpers is None or not helpers.usable:
        lanes = await in_lanes(batches, _LANES, lambda work: _roll_up_lane(store, work, granularities))
    else:
        lanes = await in_lanes(batches, helpers.processes, lambda work: helpers.roll_up(work, granularities))
    for lane in lanes:
        for granularity, result in lane.items():
            results[granularity] += result
    return results


async def _roll_up_lane(store: Store, work: Sequence[Batch], granularities: Sequence[Granularity]) -> dict[Granularity, WriteResult]:
    """One lane of :func:`rollup_keys`: its batches one after the other, each one transaction."""
    results = {granularity: WriteResult() for granularity in granularities}
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


class RollupHelpers:
    """The worker's roll-ups in helper processes, one lane of batches each, on connections of
    their own: the merging, summarising and serialising of day and week rows runs on the
    machine's other core, beside the worker's thread (and PostgreSQL), not on it. The worker's
    thread only groups the keys and waits, so it reads and flushes on meanwhile. Over the
    default input's stored hours (``bench/throughput``), two processes rolled up in 2.5-2.6 s
    what the worker's own thread took 3.6-3.8 s for (alternated, measured).

    Each helper is a fresh interpreter (``spawn``: a fork of the worker would copy its threads'
    locks) with a pipe of its own to the worker, and nothing else shared: a helper that dies in a
    lane (killed, out of memory) fails it as a retriable :class:`StoreError`, the keys stay
    pending, and a new process takes the next try; one that died idle is passed over. (A pool
    of processes sharing one task queue was tried: a helper killed while it waited held the
    queue's lock for good, and the other one, the pool and the worker's exit hung on it.) A
    helper whose worker died reads the end of its pipe and exits. Helpers that keep stopping
    before they answer anything (a broken install) are given up: roll-ups then run in the
    worker's thread, as :func:`rollup_keys` without helpers does."""

    GIVE_UP_AFTER = 3  # helpers in a row that stopped before their first answer

    def __init__(self, dsn: str, redacted_dsn: str, processes: int = _LANES) -> None:
        self.processes = processes
        self._start_args = (dsn, redacted_dsn, logging.getLogger("streamagg").getEffectiveLevel())
        self._idle: list[_HelperProcess] = []
        self._closed = False
        self._stillborn = 0  # helpers in a row that stopped before their first answer

    @property
    def usable(self) -> bool:
        return self._stillborn < self.GIVE_UP_AFTER

    def start(self) -> None:
        """Start the processes now (their imports take about a second, in the background), so
        that the first roll-up does not wait for them."""
        try:
            while len(self._idle) < self.processes and not self._closed:
                self._idle.append(_HelperProcess(self._start_args))
        except OSError as exc:  # no process or pipe to be had: the first roll-up tries again
            log.warning("cannot start the roll-up helper processes yet: %s", exc)

    def pids(self) -> list[int]:
        """The idle helpers' process ids."""
        return [helper.process.pid for helper in self._idle if helper.process.pid is not None]

    async def roll_up(self, work: Sequence[Batch], granularities: Sequence[Granularity]) -> dict[Granularity, WriteResult]:
        """One lane of :func:`rollup_keys` in a helper process."""
        if self._closed:
            raise StoreError("the roll-up helper processes are stopped (the worker is stopping)", retriable=True)
        try:
            helper = self._take()
        except OSError as exc:  # a fork, an exec or a pipe refused (out of memory, of processes, of files)
            raise StoreError(f"cannot start a roll-up helper process: {exc}", retriable=True) from None
        try:
            done, outcome = await asyncio.to_thread(helper.call, (work, granularities))
        except (EOFError, OSError):  # it stopped: before the lane (a broken pipe) or in it
            helper.kill(grace=1.0)  # its own exit code, if it is exiting
            if not helper.answered:
                self._stillborn += 1
                if not self.usable:
                    log.warning("roll-up helper processes keep stopping before they answer (the last with exit code "
                                "%s): roll-ups run in the worker's thread from now on", helper.process.exitcode)  # fmt: skip
            raise StoreError(
                f"a roll-up helper process stopped (exit code {helper.process.exitcode})", retriable=True
            ) from None
        except BaseException:  # cancelled (a stop, the other lane failed): killed, its transaction rolls back
            helper.kill()
            raise
        self._stillborn = 0
        self._idle.append(helper)  # (lanes run under the flush lock, as close() does: never after it)
        if not done:
            raise outcome
        return outcome

    def close(self) -> None:
        """Stop the idle processes (none runs a lane while the worker stops: the roll-ups and
        the stop hold its flush lock) and start no more."""
        self._closed = True
        idle, self._idle = self._idle, []
        _stop(idle)

    def _take(self) -> _HelperProcess:
        """An idle helper that is alive (one that died waiting is passed over), else a new one."""
        while self._idle:
            helper = self._idle.pop()
            if helper.process.is_alive():
                return helper
            helper.kill()  # reaps it
        return _HelperProcess(self._start_args)


class _HelperProcess:
    """A helper process and the worker's end of its pipe."""

    def __init__(self, start_args: tuple[str, str, int]) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, theirs = context.Pipe()
        try:
            self.process = context.Process(target=_helper_main, args=(theirs, *start_args), name="streamagg-rollup")
            self.process.start()
        except BaseException:
            self._conn.close()
            raise
        finally:
            theirs.close()  # the helper's end lives in the helper only: it reads the end of the pipe when the worker dies
        self.answered = False
        self._calling = False
        _every_helper.add(self)

    def call(self, request: tuple[Sequence[Batch], Sequence[Granularity]]) -> tuple[bool, object]:
        """(True, the lane's results) or (False, the exception it raised); blocks, in a thread.
        A pipe that fails is closed here, by the one thread using it (:meth:`kill` leaves it)."""
        self._calling = True
        try:
            self._conn.send(request)
            reply = self._conn.recv()
        except BaseException:
            self._conn.close()
            raise
        finally:
            self._calling = False
        self.answered = True
        return reply

    def ask_to_stop(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)

    def kill(self, grace: float = 0.0) -> None:
        """Kill the process unless it exits within ``grace`` seconds; reap it."""
        if grace:
            self.process.join(grace)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        if not self._calling:
            self._conn.close()
        _every_helper.discard(self)


STOP_SECONDS = 10.0  # for stopping helpers: they close their connections, then are killed


def _stop(helpers: Iterable[_HelperProcess]) -> None:
    """Stop helpers together, against one deadline."""
    helpers = list(helpers)
    for helper in helpers:
        helper.ask_to_stop()
    deadline = time.monotonic() + STOP_SECONDS
    for helper in helpers:
        helper.kill(grace=max(0.0, deadline - time.monotonic()))


# Every helper process not stopped yet: stopped at the interpreter's exit, before
# multiprocessing's own exit handler joins them (it would wait for ever: they wait for work).
# Exit handlers run last registered first, and multiprocessing registered its own on import.
_every_helper: set[_HelperProcess] = set()


@atexit.register
def _stop_every_helper() -> None:
    _stop(_every_helper)


def _helper_main(conn: multiprocessing.connection.Connection, dsn: str, redacted_dsn: str, level: int) -> None:
    """A helper process: lanes in, their results (or the exception each raised) out, until the
    worker says stop or is gone."""
    configure_logging(verbose=int(level <= logging.DEBUG), quiet=level >= logging.WARNING)
    # A stop is the worker's to make: Ctrl-C (the process group's SIGINT) or a service manager's
    # SIGTERM to every process would end a helper before the worker's last roll-up at its
    # stop, which runs here. The worker stops them after it (RollupHelpers.close).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    loop = asyncio.new_event_loop()
    store: Store | None = None
    try:
        while True:
            try:
                request = conn.recv()
            except (EOFError, OSError):  # the worker is gone
                return
            if request is None:
                return
            try:
                if store is None:
                    store = loop.run_until_complete(Store.open(dsn, redacted_dsn, max_size=1))
                reply: tuple[bool, object] = (True, loop.run_until_complete(_roll_up_lane(store, *request)))
            except Exception as exc:
                if not isinstance(exc, StoreError):
                    log.exception("a roll-up lane failed in its helper process")
                reply = (False, _picklable(exc))
            try:
                conn.send(reply)
            except OSError:  # the worker is gone
                return
    finally:
        if store is not None:  # its connection closed (or, past a few seconds, dropped with the process)
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.wait_for(store.close(), STOP_SECONDS / 2))
        loop.close()


def _picklable(exc: Exception) -> Exception:
    """``exc``, or, if it would not come through the pipe as itself, an exception saying what it
    was: one that does not unpickle would break the pipe's reader, and look like a dead helper."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


async def roll_up_owed(store: Store, exclude: str, helpers: RollupHelpers | None = None) -> dict[Granularity, WriteResult]:
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
        for granularity, result in (await rollup_keys(store, keys, helpers=helpers)).items():
            results[granularity] += result
        await store.rolled_up(ids=[row for hour in hours for row in owed[hour]])
    return results
