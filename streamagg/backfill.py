"""`streamagg backfill`: recompute hours by replaying the source topics outside the live group.

Planning is pure (which hours, which offsets of which partition, what retention still allows,
which stored rows a rebuilt hour must lose); the I/O part replays and writes:

* an aiokafka consumer without a group (``group_id=None``, manual ``assign``): it never joins
  the live worker's group and never commits, so a running worker is undisturbed;
* each topic-partition is read from the first offset whose timestamp is >= from - max lateness
  (an event may run that far ahead of its record's timestamp) up to its end when the backfill
  started: an event of the range can come at any later offset;
* every event of the rebuilt hours goes into a fresh AggregateState per partition, also those
  the live worker dead-lettered as too late (CONTRACT section 2: "so a backfill can still count
  it"); without them, the partials equal the live worker's for the same hours;
* results go through the live worker's write path (``Store.write_partials_of``) as partials
  fenced by source offset, one transaction per chunk of keys of one hour; stored partials the
  replay found nothing for are retired, so a rebuilt hour holds exactly what the topics hold;
* days and weeks of the rebuilt keys are rolled up again from the stored hours; the written
  hours wait in the roll-up queue until then, so a backfill stopped half-way leaves them to the
  next live worker that starts or gets partitions.

Why the windows are exact, retention, and dry runs: docs/design.md, "Backfill".
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndTimestamp

from .aggregate import Agg, AggregateState, Key
from .buckets import HOUR_MS, bucket_start_ms, to_datetime
from .catalogue import METRICS_BY_NAME
from .errors import StreamaggError
from .events import Event, EventKind, Rejected, decode
from .rollup import BACKFILL_QUEUE_TAG, rollup_keys
from .settings import Settings
from .store import Retire, Store, WriteResult
from .telemetry import BackfillTelemetry
from .topics import existing_partitions, source_topics

log = logging.getLogger(__name__)

KEYS_PER_TRANSACTION = 5_000  # partial rows written (or retired) per transaction, as the worker's flush
_FETCH_RECORDS = 50_000
_STALL_SECONDS = 60.0
_NO_WATERMARK = np.iinfo(np.int64).min // 2  # below every event time minus any lateness

TopicPartitionId = tuple[str, int]


class BackfillError(StreamaggError):
    """The backfill cannot run (Kafka unreachable, a topic missing, the log changed under it)."""

    def __init__(self, message: str, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


class RetentionRefused(BackfillError):
    """The topics no longer hold the start of the range; nothing was written."""


def iso(time_ms: int) -> str:
    """RFC 3339 in UTC, as the command line takes it."""
    return to_datetime(time_ms).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the hours ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class HourRange:
    """Whole UTC hours [start, end)."""

    start_ms: int
    end_ms: int

    def hours(self) -> list[int]:
        return list(range(self.start_ms, self.end_ms, HOUR_MS))

    def __len__(self) -> int:
        return (self.end_ms - self.start_ms) // HOUR_MS

    def __str__(self) -> str:
        return f"[{iso(self.start_ms)}, {iso(self.end_ms)})"


def hour_range(start_ms: int | None, end_ms: int | None, now_ms: int) -> HourRange:
    """[from, to) rounded outward to whole UTC hours (an hour row is all or nothing); without a
    range, the previous complete hour."""
    if (start_ms is None) != (end_ms is None):
        raise BackfillError("give both --from and --to, or neither (the previous complete hour)")
    if start_ms is None or end_ms is None:
        end = bucket_start_ms(now_ms, "hour")
        return HourRange(end - HOUR_MS, end)
    if end_ms <= start_ms:
        raise BackfillError("--to must be after --from")
    return HourRange(bucket_start_ms(start_ms, "hour"), bucket_start_ms(end_ms - 1, "hour") + HOUR_MS)


# -- the offsets --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PartitionFacts:
    """What Kafka said about one source partition when the backfill started."""

    topic: str
    partition: int
    beginning: int  # first retained offset; > 0 means records were deleted (retention, delete_records)
    end: int  # the offset the next record gets
    start: int | None  # first offset with a timestamp >= from - max lateness (None: no such record)
    first_retained_ms: int | None = None  # timestamp of the first retained record, when it matters

    @property
    def tp(self) -> TopicPartitionId:
        return (self.topic, self.partition)

    @property
    def emptied(self) -> bool:
        """Every record it ever held is gone: nothing says what they were."""
        return 0 < self.beginning == self.end

    def needs_first_retained(self) -> bool:
        """Whether the window may start at the first retained record, so its time decides whether
        deleted records were needed. (After a deletion, Kafka's lookup by time can also answer
        "none" while retained records qualify; then the replay starts at the beginning.)"""
        return 0 < self.beginning < self.end and (self.start is None or self.start <= self.beginning)


@dataclass(frozen=True)
class Window:
    """The offsets of one partition to replay: from ``start`` and before ``end``."""

    topic: str
    partition: int
    start: int
    end: int  # the partition's end when the backfill started: later records are the live worker's

    @property
    def tp(self) -> TopicPartitionId:
        return (self.topic, self.partition)


@dataclass(frozen=True)
class Plan:
    requested: HourRange
    hours: HourRange  # what is rebuilt: ``requested``, or its rebuildable end with --allow-partial
    windows: tuple[Window, ...]
    skipped: tuple[TopicPartitionId, ...] = ()  # emptied partitions left alone (--allow-partial)

    @property
    def expected_records(self) -> int:
        return sum(w.end - w.start for w in self.windows)


def first_rebuildable_hour(first_retained_ms: int, max_lateness_ms: int) -> int:
    """The first hour none of whose window [hour - max lateness, ...) was deleted, given the time
    of the first retained record: Kafka deletes from the start of the log, so (times in offset
    order) every deleted record is at most that old, and an hour more than max lateness after it
    needs none of them (no event runs further ahead of its record). Strictly after: a deleted
    record may carry that very millisecond."""
    return bucket_start_ms(first_retained_ms + max_lateness_ms, "hour") + HOUR_MS


def plan(requested: HourRange, facts: Sequence[PartitionFacts], max_lateness_ms: int, allow_partial: bool) -> Plan:
    """Windows of every partition for ``requested``, or a refusal if retention deleted records
    the range needs. With ``allow_partial`` the range starts at the first rebuildable hour and
    emptied partitions are left alone (their stored partials stay as they are)."""
    needed_from = requested.start_ms - max_lateness_ms
    short = [
        f for f in facts
        if f.beginning > 0 and f.first_retained_ms is not None and f.first_retained_ms >= needed_from
    ]  # fmt: skip
    emptied = [f for f in facts if f.emptied]
    hours = requested
    if short:
        newest = max(short, key=lambda f: f.first_retained_ms or 0)
        assert newest.first_retained_ms is not None
        first = first_rebuildable_hour(newest.first_retained_ms, max_lateness_ms)
        reason = (
            f"{newest.topic}[{newest.partition}] begins at offset {newest.beginning} "
            f"({iso(newest.first_retained_ms)}) but {requested} needs records from {iso(needed_from)}"
        )
        if first >= requested.end_ms:
            raise RetentionRefused(f"no hour of {requested} can be rebuilt: {reason}")
        if not allow_partial:
            raise RetentionRefused(
                f"the topics no longer hold the start of {requested}: {reason}; the first hour that can be "
                f"rebuilt is {iso(first)} (--allow-partial rebuilds from there)"
            )
        hours = HourRange(first, requested.end_ms)
    if emptied and not allow_partial:
        names = ", ".join(f"{f.topic}[{f.partition}]" for f in emptied)
        verb = "holds" if len(emptied) == 1 else "hold"
        raise RetentionRefused(
            f"{names} no longer {verb} any record (deleted up to offset {emptied[0].beginning}), so what they held "
            f"for {requested} is unknown; --allow-partial rebuilds without them and keeps their stored partials"
        )
    skipped = {f.tp for f in emptied}
    windows = []
    for f in facts:
        if f.tp in skipped:
            continue
        start = f.start if f.start is not None else f.beginning if f.beginning > 0 else f.end
        if f.needs_first_retained():
            start = f.beginning
        windows.append(Window(f.topic, f.partition, start, f.end))
    return Plan(requested, hours, tuple(windows), tuple(sorted(skipped)))


# -- the replay ---------------------------------------------------------------------------------
def admit(times_ms: np.ndarray, watermark_ms: int | None, max_lateness_ms: int) -> tuple[np.ndarray, int | None]:
    """Which events of a batch of one partition (in offset order) the live worker applies, and
    the watermark after them: ``PartitionState.ingest``'s rule, vectorised. An event older than
    the watermark (the newest event time before it) minus the maximum lateness is too late.
    Too-late events may join the running maximum: they are older than it, so nothing changes."""
    if times_ms.size == 0:
        return np.zeros(0, dtype=bool), watermark_ms
    first = _NO_WATERMARK if watermark_ms is None else watermark_ms
    before = np.maximum.accumulate(np.concatenate(([first], times_ms[:-1])))
    return times_ms >= before - max_lateness_ms, max(first, int(times_ms.max()))


class PartitionReplay:
    """One source partition replayed through its window: decode, then every event of the rebuilt
    hours into a fresh aggregate state, counting those the live worker's lateness rule drops."""

    def __init__(
        self, window: Window, kind: EventKind, aggregates: AggregateState, hours: HourRange, max_lateness_ms: int
    ) -> None:
        self.window = window
        self.kind = kind
        self.aggregates = aggregates
        self.hours = hours
        self.max_lateness_ms = max_lateness_ms
        self.watermark_ms: int | None = None
        # Every record up to this offset has been read (before the window start: not needed).
        self.covered = window.start - 1
        self.records = 0
        self.rejected = 0  # the live worker dead-letters these
        self.too_late = 0  # events of the rebuilt hours the live worker dead-lettered as too late

    @property
    def done(self) -> bool:
        """At the end of the window: a too-late event of the range can come at any offset."""
        return self.covered >= self.window.end - 1

    def feed(self, records: Iterable[tuple[int, bytes | None, int]]) -> None:
        """The next records of the partition, ``(offset, value, timestamp)`` in offset order."""
        events: list[Event] = []
        for offset, value, timestamp_ms in records:
            if offset >= self.window.end:
                break
            self.covered = offset
            self.records += 1
            try:
                events.append(decode(self.kind, value or b"", timestamp_ms, self.max_lateness_ms))
            except Rejected:
                self.rejected += 1
        if not events:
            return
        times = np.fromiter((event.time_ms for event in events), dtype=np.int64, count=len(events))
        admitted, self.watermark_ms = admit(times, self.watermark_ms, self.max_lateness_ms)
        in_range = (times >= self.hours.start_ms) & (times < self.hours.end_ms)
        self.too_late += int(np.count_nonzero(in_range & ~admitted))
        wanted = np.flatnonzero(in_range)
        if wanted.size:
            self.aggregates.ingest([events[i] for i in wanted.tolist()])

    def reached(self, position: int) -> None:
        """The consumer's position: offsets below it that were not records (transaction markers,
        compacted away) count as read."""
        if position > self.covered + 1:
            self.covered = min(position, self.window.end) - 1


# -- what a rebuilt hour writes -----------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    """One transaction of a rebuilt hour (the arguments of ``Store.write_partials_of``)."""

    batches: list[tuple[int, int, list[tuple[Key, Agg]]]]
    retire: list[Retire]
    orphans: list[Key]


def hour_chunks(
    produced: Mapping[Key, Mapping[TopicPartitionId, Agg]],
    stored_finals: Iterable[Key],
    stored_partials: Iterable[tuple[Key, int]],
    covered: Mapping[TopicPartitionId, int],
    topic_of: Mapping[str, str],
    max_rows: int = KEYS_PER_TRANSACTION,
) -> list[Chunk]:
    """Split one hour's writes into transactions of about ``max_rows`` partial rows, every key
    whole in one of them (its final row is the merge of all its partitions' partials).

    ``produced``: the replay's partials by key and topic-partition. A stored partial of a
    replayed partition that the replay did not produce is retired (unless it includes more of
    the partition than the replay read); a stored key the replay produced nothing for is an
    orphan, whose final row goes once no partial is left (a partial of a partition not
    replayed keeps it). Keys of metrics outside ``topic_of`` are not the backfill's to judge.
    """
    by_key: defaultdict[Key, list[int]] = defaultdict(list)
    for key, partition in stored_partials:
        by_key[key].append(partition)
    keys = sorted({*produced, *stored_finals, *by_key}, key=repr)
    chunks: list[Chunk] = []
    batches: defaultdict[TopicPartitionId, list[tuple[Key, Agg]]] = defaultdict(list)
    retire: list[Retire] = []
    orphans: list[Key] = []
    rows = 0
    for key in keys:
        topic = topic_of.get(key[1])
        if topic is None:
            continue
        made = produced.get(key, {})
        for tp, agg in made.items():
            batches[tp].append((key, agg))
        for partition in sorted(by_key.get(key, ())):
            tp = (topic, partition)
            if tp in covered and tp not in made:
                retire.append(Retire(key, partition, covered[tp]))
        if not made:
            orphans.append(key)
        rows += max(1, len(made)) + len(by_key.get(key, ()))
        if rows >= max_rows:
            chunks.append(_chunk(batches, retire, orphans, covered))
            batches, retire, orphans, rows = defaultdict(list), [], [], 0
    if batches or retire or orphans:
        chunks.append(_chunk(batches, retire, orphans, covered))
    return chunks


def _chunk(
    batches: Mapping[TopicPartitionId, list[tuple[Key, Agg]]],
    retire: list[Retire],
    orphans: list[Key],
    covered: Mapping[TopicPartitionId, int],
) -> Chunk:
    return Chunk([(tp[1], covered[tp], items) for tp, items in sorted(batches.items())], retire, orphans)


# -- the run ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    phase: str  # "reading" or "writing"
    partitions_done: int
    partitions: int
    records: int
    expected_records: int
    hours_done: int
    hours: int
    elapsed_seconds: float

    @property
    def records_per_second(self) -> float:
        return self.records / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        rate = self.records_per_second
        if self.phase != "reading" or rate <= 0:
            return None
        return max(0, self.expected_records - self.records) / rate


@dataclass
class Report:
    plan: Plan
    dry_run: bool
    hours: dict[int, WriteResult] = field(default_factory=dict)
    rollups: dict[str, WriteResult] = field(default_factory=dict)
    records: int = 0
    rejected: int = 0
    too_late: int = 0  # events of the rebuilt hours the live worker dead-lettered as too late, counted here
    seconds: float = 0.0

    @property
    def hour_rows(self) -> WriteResult:
        return sum(self.hours.values(), WriteResult())


async def backfill(
    settings: Settings,
    store: Store,
    requested: HourRange,
    *,
    allow_partial: bool = False,
    dry_run: bool = False,
    telemetry: BackfillTelemetry | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Report:
    """Rebuild the hours of ``requested`` (see the module docstring); ``dry_run`` writes nothing
    and reports what would change. Raises :class:`RetentionRefused` before writing anything."""
    started = clock()
    max_lateness_ms = settings.max_lateness_seconds * 1000
    topics = source_topics(settings)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,  # outside the live group: no join, no commit
        enable_auto_commit=False,
        auto_offset_reset="none",  # records deleted under the replay are an error, not a silent jump
        client_id=f"{settings.app_id}-backfill",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    try:
        await consumer.start()
    except KafkaError as exc:
        await consumer.stop()  # else asyncio reports it unclosed, two more lines under the error
        raise BackfillError(f"kafka at {settings.kafka_bootstrap} is unreachable: {exc}", retriable=True) from exc
    try:
        facts = await _partition_facts(consumer, settings, topics, requested, max_lateness_ms)
        the_plan = plan(requested, facts, max_lateness_ms, allow_partial)
        log.info(
            "backfill of %s: replaying %d partitions (~%d records)%s", the_plan.hours, len(the_plan.windows),
            the_plan.expected_records, f", leaving {len(the_plan.skipped)} emptied ones alone" if the_plan.skipped else "",
        )  # fmt: skip
        report = Report(the_plan, dry_run)
        replays = await _replay(consumer, settings, topics, the_plan, report, telemetry, on_progress, clock, started)
    except KafkaError as exc:
        raise BackfillError(f"replaying from {settings.kafka_bootstrap} failed: {exc}", retriable=True) from exc
    finally:
        await consumer.stop()
    # The hours it writes are queued for their roll-ups in the same transactions: if it stops
    # before it has rolled them up, the next live worker to start or rebalance does.
    queued_by = None if dry_run else f"{settings.app_id}{BACKFILL_QUEUE_TAG}{os.getpid()}:{uuid.uuid4().hex[:8]}"
    touched = await _write(store, settings, the_plan, replays, report, on_progress, clock, started, queued_by)
    if queued_by is not None:
        await store.analyze()
        report.rollups.update(await rollup_keys(store, touched))
        await store.rolled_up(queued_by)
    report.seconds = clock() - started
    return report


async def _partition_facts(
    consumer: AIOKafkaConsumer,
    settings: Settings,
    topics: Mapping[str, EventKind],
    requested: HourRange,
    max_lateness_ms: int,
) -> list[PartitionFacts]:
    partitions = await asyncio.to_thread(existing_partitions, settings, list(topics))
    missing = sorted(set(topics) - set(partitions))
    if missing:  # a mistyped prefix must not "rebuild" every hour as empty
        raise BackfillError(f"source topic {missing[0]} does not exist on {settings.kafka_bootstrap}")
    tps = [TopicPartition(t, p) for t in topics for p in range(partitions[t])]
    beginning = await consumer.beginning_offsets(tps)
    end = await consumer.end_offsets(tps)
    starts = await consumer.offsets_for_times({tp: max(0, requested.start_ms - max_lateness_ms) for tp in tps})
    facts = [PartitionFacts(tp.topic, tp.partition, beginning[tp], end[tp], _offset(starts.get(tp))) for tp in tps]
    wanted = {TopicPartition(*f.tp): f.beginning for f in facts if f.needs_first_retained()}
    firsts = await _first_record_times(consumer, wanted)
    return [replace(f, first_retained_ms=firsts.get(TopicPartition(*f.tp))) for f in facts]


def _offset(found: OffsetAndTimestamp | None) -> int | None:
    return None if found is None else found.offset


async def _first_record_times(consumer: AIOKafkaConsumer, offsets: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
    """The timestamp of the first record at or after each offset (read, not looked up by time:
    after a deletion the lookup by time may skip a segment)."""
    if not offsets:
        return {}
    consumer.assign(list(offsets))
    for tp, offset in offsets.items():
        consumer.seek(tp, offset)
    found: dict[TopicPartition, int] = {}
    deadline = time.monotonic() + _STALL_SECONDS
    while len(found) < len(offsets):
        if time.monotonic() > deadline:
            raise BackfillError(f"no record came from {sorted(set(offsets) - set(found))[0]} in {_STALL_SECONDS:.0f} s")
        for tp, records in (await consumer.getmany(timeout_ms=500)).items():
            if records and tp not in found:
                found[tp] = records[0].timestamp
                consumer.pause(tp)
    return found


async def _replay(
    consumer: AIOKafkaConsumer,
    settings: Settings,
    topics: Mapping[str, EventKind],
    the_plan: Plan,
    report: Report,
    telemetry: BackfillTelemetry | None,
    on_progress: Callable[[Progress], None] | None,
    clock: Callable[[], float],
    started: float,
) -> list[PartitionReplay]:
    kinds = settings.metric_sketch_kinds()
    max_lateness_ms = settings.max_lateness_seconds * 1000
    replays = {
        TopicPartition(*w.tp): PartitionReplay(
            w, topics[w.topic], AggregateState(kinds, settings.max_series_per_dimension), the_plan.hours, max_lateness_ms
        )
        for w in the_plan.windows
    }
    active = {tp: replay for tp, replay in replays.items() if not replay.done}
    consumer.assign(list(active))
    for tp, replay in active.items():
        consumer.seek(tp, replay.window.start)
    if telemetry is not None:
        telemetry.partitions.set(len(replays))
    last_records, last_change = 0, clock()

    def progress() -> None:
        done = len(replays) - len(active)
        if telemetry is not None:
            telemetry.partitions_done.set(done)
        if on_progress is not None:
            on_progress(Progress("reading", done, len(replays), report.records, the_plan.expected_records,
                                 0, len(the_plan.hours), clock() - started))  # fmt: skip

    progress()
    while active:
        batches = await consumer.getmany(timeout_ms=500, max_records=_FETCH_RECORDS)
        for tp, records in batches.items():
            replay = active.get(tp)
            if replay is None:
                continue
            before = replay.records
            replay.feed((record.offset, record.value, record.timestamp) for record in records)
            report.records += replay.records - before
            if telemetry is not None:
                telemetry.events_replayed.inc(replay.records - before)
        for tp, replay in list(active.items()):
            if not replay.done:
                replay.reached(await consumer.position(tp))
            if replay.done:
                consumer.pause(tp)
                del active[tp]
        if report.records != last_records or len(batches):
            last_records, last_change = report.records, clock()
        elif clock() - last_change > _STALL_SECONDS:
            stuck = sorted(active, key=lambda tp: (tp.topic, tp.partition))[0]
            raise BackfillError(f"no record came from {stuck.topic}[{stuck.partition}] in {_STALL_SECONDS:.0f} s")
        progress()
    for replay in replays.values():
        report.rejected += replay.rejected
        report.too_late += replay.too_late
    return list(replays.values())


async def _write(
    store: Store,
    settings: Settings,
    the_plan: Plan,
    replays: Sequence[PartitionReplay],
    report: Report,
    on_progress: Callable[[Progress], None] | None,
    clock: Callable[[], float],
    started: float,
    queued_by: str | None,
) -> set[Key]:
    """Hour by hour, in transactions of whole keys; returns every key written or retired."""
    covered = {replay.window.tp: replay.covered for replay in replays}
    topic_of = {name: settings.topic(metric.kind) for name, metric in METRICS_BY_NAME.items()}
    produced: defaultdict[int, dict[Key, dict[TopicPartitionId, Agg]]] = defaultdict(dict)
    for replay in replays:
        for key, agg in replay.aggregates.items():
            produced[key[0]].setdefault(key, {})[replay.window.tp] = agg
    touched: set[Key] = set()
    for n, hour in enumerate(the_plan.hours.hours()):
        finals, partials = await store.stored_hour_keys(hour, hour + HOUR_MS)
        result = WriteResult()
        for chunk in hour_chunks(produced.get(hour, {}), finals, partials, covered, topic_of):
            result += await store.write_partials_of(chunk.batches, chunk.retire, chunk.orphans, dry_run=report.dry_run,
                                                    queued_by=queued_by)
            touched.update(key for _, _, items in chunk.batches for key, _ in items)
            touched.update(r.key for r in chunk.retire)
            touched.update(chunk.orphans)
        report.hours[hour] = result
        if on_progress is not None:
            on_progress(Progress("writing", len(replays), len(replays), report.records, the_plan.expected_records,
                                 n + 1, len(the_plan.hours), clock() - started))  # fmt: skip
    return touched
