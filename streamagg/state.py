"""Hot state of one source topic-partition, and its checkpoint records. No Faust, no SQL.

The unit of state is a Kafka topic-partition: its events arrive in offset order, so "the
state includes every event up to offset N" is one number. Each key's checkpoint record carries
the offset its value includes; a recovered partition skips, per key, the events its key
already holds (a checkpoint that crashed half-way leaves some keys newer than others).

Record layouts (little-endian):
* key:   JSON ``[topic, partition, hour_ms, metric, dimension_type, dimension_value]``;
         the partition's meta record is ``[topic, partition, "meta"]``
* value: ``u8 version (1) | i64 offset | aggregate bytes (Agg.encode)``;
         meta: ``u8 version (2) | i64 offset | i64 watermark_ms | u32 n | n x (i64 hour_ms,
         i64 written_offset)``, the hours whose every change up to that offset is in the
         database (version 1 has no such list: every restored key is written again)
"""

from __future__ import annotations

import gc
import json
import logging
import struct
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from operator import itemgetter

import orjson

from sketches import Kind

from .aggregate import Agg, AggregateState, Key
from .buckets import HOUR_MS
from .errors import StateError
from .events import Event

log = logging.getLogger(__name__)

_VALUE = struct.Struct("<Bq")
_META = struct.Struct("<Bqq")
_WRITTEN = struct.Struct("<I")
_WRITTEN_HOUR = struct.Struct("<qq")
_VERSION = 1
_META_VERSION = 2
_NO_WATERMARK = -(2**63)

Clock = Callable[[], int]  # epoch milliseconds


def collect_less_often() -> None:
    """For a process holding the state (worker, backfill): it is hundreds of thousands of
    long-lived objects, which the collector's default thresholds scan every few batches
    (bench/core: +20%; bench/backfill: 5,309 -> 6,282 events/s). A young generation of 100,000
    rather than 10,000 objects: a batch's short-lived containers (rows, lists of a flush's
    thousands of keys) are mostly gone before a collection, not traversed by one (the
    collector's time in bench/throughput's worker: 0.6-0.9 s against 1.6-1.9 s, three runs
    each). Not gc.freeze(): objects frozen with the app would keep every aggregate alive at exit."""
    gc.set_threshold(100_000, 10, 100)


def encode_key(topic: str, partition: int, key: Key) -> bytes:
    """The JSON array ``[topic, partition, hour, metric, dimension type, dimension value]``, byte
    for byte as ``json.dumps(..., separators=(",", ":"))`` writes it: the changelog is compacted
    by these bytes, so they never change. Put together from json's own string encoder: 0.62 us a
    key against 2.47 for the dumps, which took 0.9 s of bench/throughput's worker (measured)."""
    hour, metric, dimension_type, dimension_value = key
    return (
        f"[{_json_text(topic)},{int(partition)},{int(hour)},{_json_text(metric)},"
        f"{_json_text(dimension_type)},{_json_text(dimension_value)}]"
    ).encode()


def _json_text(value: str | None) -> str:
    return "null" if value is None else encode_basestring_ascii(value)


def meta_key(topic: str, partition: int) -> bytes:
    return json.dumps([topic, partition, "meta"], separators=(",", ":")).encode()


def decode_key(data: bytes) -> tuple[str, int, Key | None]:
    """(topic, partition, key); key is None for the partition's meta record. orjson, as a restart
    decodes every key of the table (262,196 keys: 0.82 s with json.loads, 0.39 s); json for what
    orjson refuses and a dimension value may hold (a lone surrogate, escaped)."""
    try:
        try:
            items = orjson.loads(data)
        except orjson.JSONDecodeError:
            items = json.loads(data)
        if len(items) == 3 and items[2] == "meta":
            return items[0], int(items[1]), None
        topic, partition, hour, metric, dimension_type, dimension_value = items
        return topic, int(partition), (int(hour), metric, dimension_type, dimension_value)
    except (ValueError, TypeError) as exc:
        raise StateError(f"corrupt checkpoint key {data[:80]!r}") from exc


def encode_value(offset: int, agg: Agg) -> bytes:
    return _VALUE.pack(_VERSION, offset) + agg.encode()


def decode_value(data: bytes) -> tuple[int, bytes]:
    """(offset, the aggregate's bytes): :meth:`Agg.decode` reads them, when they are needed."""
    if len(data) < _VALUE.size:
        raise StateError(f"checkpoint value of {len(data)} bytes is too short")
    version, offset = _VALUE.unpack_from(data)
    if version != _VERSION:
        raise StateError(f"checkpoint value of unknown version {version}")
    return offset, data[_VALUE.size :]


def encode_meta(offset: int, watermark_ms: int | None, written: Mapping[int, int]) -> bytes:
    """``written``: hour -> the partition offset up to which every change of the hour is stored."""
    watermark = _NO_WATERMARK if watermark_ms is None else watermark_ms
    parts = [_META.pack(_META_VERSION, offset, watermark), _WRITTEN.pack(len(written))]
    parts.extend(_WRITTEN_HOUR.pack(hour, through) for hour, through in sorted(written.items()))
    return b"".join(parts)


def decode_meta(data: bytes) -> tuple[int, int | None, dict[int, int]]:
    """(offset, watermark, written hours); a version 1 record (before the written hours) has none."""
    try:
        version, offset, watermark = _META.unpack_from(data)
        written: dict[int, int] = {}
        if version == _META_VERSION:
            (count,) = _WRITTEN.unpack_from(data, _META.size)
            start = _META.size + _WRITTEN.size
            if len(data) != start + count * _WRITTEN_HOUR.size:
                raise StateError(f"checkpoint meta of {len(data)} bytes does not hold {count} written hours")
            written = dict(_WRITTEN_HOUR.iter_unpack(data[start:]))
        elif version != 1 or len(data) != _META.size:
            raise StateError(f"checkpoint meta of unknown version {version} or size {len(data)}")
    except struct.error as exc:
        raise StateError(f"corrupt checkpoint meta: {exc}") from exc
    return offset, None if watermark == _NO_WATERMARK else watermark, written


# Offsets that never arrived (docs/design.md, "Gaps"): the consumer is sent back to the first
# missing offset; until HOLE_RESEEK_MS later, messages past it are stale prefetches and are
# dropped; after HOLE_ATTEMPTS re-reads that still skip it, the hole is taken as real.
HOLE_RESEEK_MS = 2000
HOLE_ATTEMPTS = 3
# A partition whose log end stays ahead of its last event this many idle periods is idle anyway.
STALLED_IDLE_FACTOR = 10
# A backlog read to its end (its newest event at least an idle period old on the wall clock) is
# idle after this share of an idle period without an event (PartitionState.is_idle).
BACKLOG_IDLE_SHARE = 4
_BEFORE_EVERY_HOUR = -(1 << 62)  # epoch ms before any event time
# The memory gauge looks at this many aggregates of a partition, at most this often.
MEMORY_SAMPLE = 1_000
MEMORY_REFRESH_MS = 10_000


def _held_bytes(agg: Agg | bytes) -> int:
    """About 200 bytes an aggregate plus its sketch's; a restored one not read yet is its bytes."""
    if agg.__class__ is bytes:
        return 33 + len(agg)  # type: ignore[arg-type]
    return 200 + (agg.sketch.memory_bytes if agg.sketch is not None else 0)  # type: ignore[union-attr]


@dataclass
class Checkpoint:
    """One partition's checkpoint records, in the order they must land: a meta record that
    landed says every value before it did (a restore trusts its offset), and a tombstone lands
    only after the meta record whose watermark let its hour go (restored from an older meta, a
    replay could rebuild an evicted key from scratch and write it over its complete partial)."""

    values: list[tuple[bytes, bytes | None]]
    meta: tuple[bytes, bytes]
    tombstones: list[tuple[bytes, bytes | None]]

    def steps(self) -> tuple[list[tuple[bytes, bytes | None]], ...]:
        """The records in the steps they are sent in, each acknowledged before the next goes."""
        return self.values, [self.meta], self.tombstones

    def in_order(self) -> list[tuple[bytes, bytes | None]]:
        return [record for step in self.steps() for record in step]


@dataclass
class Admission:
    taken: list[int]  # positions (into the offered offsets) to process, in order
    seek: int | None = None  # send the consumer back to this offset


@dataclass
class IngestResult:
    applied: int = 0
    too_late: list[int] = field(default_factory=list)  # positions in the batch


class PartitionState:
    """Aggregates of one topic-partition: ingest in offset order, checkpoint, close, evict."""

    def __init__(
        self,
        topic: str,
        partition: int,
        sketch_kinds: Mapping[str, Kind],
        max_series_per_dimension: int,
        clock: Clock,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.aggregates = AggregateState(sketch_kinds, max_series_per_dimension)
        self.offset = -1  # highest offset whose event is included
        self.watermark_ms: int | None = None
        self.last_event_at = clock()  # wall clock of the last event (idle detection)
        self.end_offset: int | None = None  # the log's end as the consumer last saw it
        self._memory: tuple[float, int] | None = None  # (estimated bytes per key, when)
        self._clock = clock
        self._key_offsets: dict[Key, int] = {}  # from recovery: what each key already holds
        self._replay_until = -1
        self.position: int | None = None  # the next offset expected from the consumer
        self._hole: tuple[int, int, int] | None = None  # (first missing offset, re-reads, when)
        self._checkpoint_dirty: set[Key] = set()
        self._checkpoint_sending: set[Key] = set()  # taken by a checkpoint not acknowledged yet
        self._encoded_keys: dict[Key, bytes] = {}  # checkpoint keys of held aggregates (a key is checkpointed often)
        self._flush_dirty: defaultdict[int, set[Key]] = defaultdict(set)  # by hour: flush goes by hour
        # hour -> partition offset up to which every change of the hour is in the database
        # (checkpointed in the meta record), and the same for hours taken by the flush under
        # way, until it says they were all written (confirm_written).
        self._written: dict[int, int] = {}
        self._taken: dict[int, int] = {}

    # -- recovery ----------------------------------------------------------------------------
    def restore(self, records: Iterable[tuple[Key | None, bytes]]) -> None:
        """Rebuild from checkpoint records (key None = meta). A restored key is flushed again
        unless the meta record says its hour was written up to the key's offset or later."""
        for key, value in records:
            if key is None:
                offset, watermark, written = decode_meta(value)
                self.offset = max(self.offset, offset)
                self.watermark_ms = watermark
                self._written = written
                continue
            offset, data = decode_value(value)
            self.aggregates.put_encoded(key, data)  # decoded on first use: most keys never are
            self._key_offsets[key] = offset
            self._replay_until = max(self._replay_until, offset)
        # ``offset`` stays the meta record's: what *every* key includes. Keys of a checkpoint that
        # crashed half-way may include more (up to the replay limit), but a checkpoint taken
        # while replaying must label the other keys, and commit, only what was replayed so far.
        # A key that changed after its hour's last complete write was checkpointed later, with
        # a higher offset; one whose offset is not above it holds what the database holds.
        written, offsets = self._written, self._key_offsets
        self._mark_flush_dirty(key for key in self.aggregates.take_dirty() if offsets[key] > written.get(key[0], -1))

    # -- admission ---------------------------------------------------------------------------
    def admit(self, offsets: Sequence[int]) -> Admission:
        """Which of these raw message offsets (in arrival order) to process.

        Kafka offsets of a source partition are consecutive, and the state must never pass one
        it has not seen: its commit would skip it. Faust can deliver a prefetched message ahead
        of its predecessors around a rebalance (faust-streaming#216, #221), so an offset past
        the next expected one stops the batch there and asks for a seek back to the first
        missing offset. Offsets already seen are dropped (redeliveries).
        """
        if offsets and self._hole is None:
            # The usual fetch: the next offsets, consecutive. Taken at once, not one by one.
            first, count = offsets[0], len(offsets)
            expected = self._expected(first)
            if (expected is None or first == expected) and list(offsets) == list(range(first, first + count)):
                self.position = first + count
                return Admission(list(range(count)))
        taken: list[int] = []
        for i, offset in enumerate(offsets):
            expected = self._expected(offset)
            if expected is not None and offset < expected:
                continue
            if expected is not None and offset > expected and not self._accept_hole(expected, offset):
                return Admission(taken, self._seek_for(expected))
            taken.append(i)
            self.position = offset + 1
            if self._hole is not None and offset >= self._hole[0]:
                self._hole = None
        return Admission(taken)

    def _expected(self, offset: int) -> int | None:
        """The offset due next, given that ``offset`` came (None: any, a partition's first)."""
        if self.position is None and self.offset >= 0:
            # restored: the consumer restarts at the committed offset, at most offset + 1
            return min(offset, self.offset + 1)
        return self.position

    def _seek_for(self, missing: int) -> int | None:
        now = self._clock()
        if self._hole is None or self._hole[0] != missing:
            self._hole = (missing, 1, now)
            log.warning("%s[%d]: offset %d was skipped by the consumer; reading again from it", self.topic, self.partition, missing)
            return missing
        _, attempts, since = self._hole
        if now - since < HOLE_RESEEK_MS:
            return None  # a seek is under way; these are stale prefetched messages
        self._hole = (missing, attempts + 1, now)
        return missing

    def _accept_hole(self, missing: int, offset: int) -> bool:
        """After HOLE_ATTEMPTS re-reads that jump from before ``missing`` to ``offset``, the
        offsets in between do not exist (e.g. a transactional producer's commit markers)."""
        hole = self._hole
        if hole is None or hole[0] != missing or hole[1] < HOLE_ATTEMPTS or self._clock() - hole[2] < HOLE_RESEEK_MS:
            return False
        log.warning("%s[%d]: offsets %d..%d are absent after %d re-reads; going on", self.topic, self.partition, missing, offset - 1, hole[1])
        self._hole = None
        return True

    def expect(self, offset: int) -> None:
        """A partition without checkpoints starts at ``offset`` (the log's first): a consumer
        that starts it further on is sent back, like any gap."""
        if self.offset < 0 and self.position is None:
            self.position = offset

    def advance(self, offset: int) -> None:
        """Every message up to ``offset`` is handled (aggregated, skipped or dead-lettered)."""
        self.offset = max(self.offset, offset)
        if 0 <= self._replay_until <= offset:  # read past every key's checkpoint: the fast path again
            self._key_offsets.clear()
            self._replay_until = -1

    @property
    def replaying(self) -> bool:
        """Restored keys from further on than the state's offset are still being caught up with."""
        return self._replay_until >= 0

    def flush_label(self, key: Key) -> int:
        """The partition offset a partial of ``key`` taken now includes: the state's offset, or
        more for a restored key whose checkpoint came from further on than the replay has read
        (labelled with the state's offset, its partial lost to an older, smaller one's)."""
        return max(self.offset, self._key_offsets.get(key, -1))

    # -- ingest ------------------------------------------------------------------------------
    def ingest(self, batch: Sequence[tuple[int, Event]], max_lateness_ms: int) -> IngestResult:
        """Fold ``(offset, event)`` pairs, in offset order, into the state.

        Events older than the watermark minus the maximum lateness are not applied; their
        positions are returned so the caller can dead-letter them (reason ``too_late``).
        Offsets at or below what a key's checkpoint holds are skipped for that key only.
        """
        result = IngestResult()
        fresh: list[Event] = []
        watermark = self.watermark_ms
        for position, (offset, event) in enumerate(batch):
            if offset <= self.offset and offset > self._replay_until:
                continue  # already ingested (a redelivery)
            if watermark is not None and event.time_ms < watermark - max_lateness_ms:
                if offset <= self.offset:
                    # A replay up to the restored meta record meets that record's watermark, later
                    # than the one this event met. Counted then, its keys hold it (or it went with
                    # its evicted hour); refused then, its dead letter was delivered before the
                    # meta record was sent. Either way, no dead letter again.
                    continue
                result.too_late.append(position)
                continue
            watermark = event.time_ms if watermark is None else max(watermark, event.time_ms)
            if offset <= self._replay_until:
                self.aggregates.ingest([event], accept=lambda key, o=offset: self._key_offsets.get(key, -1) < o)
            else:
                fresh.append(event)
            result.applied += 1
        if fresh:
            self.aggregates.ingest(fresh)
        if batch:
            self.advance(batch[-1][0])
            self.last_event_at = self._clock()
        self.watermark_ms = watermark
        dirty = self.aggregates.take_dirty()
        self._checkpoint_dirty |= dirty
        self._mark_flush_dirty(dirty)
        return result

    def _mark_flush_dirty(self, keys: Iterable[Key]) -> None:
        by_hour = self._flush_dirty
        for key in keys:
            by_hour[key[0]].add(key)

    # -- checkpoint --------------------------------------------------------------------------
    def checkpoint_records(self) -> Checkpoint:
        """Records for the keys changed since the last call (evicted keys: tombstones) and the
        meta record, to be sent in :meth:`Checkpoint.in_order`; then :meth:`checkpoint_sent`,
        or :meth:`checkpoint_failed` to take the keys up again."""
        values: list[tuple[bytes, bytes | None]] = []
        tombstones: list[tuple[bytes, bytes | None]] = []
        encoded = self._encoded_keys
        for key in self._checkpoint_dirty:
            data = encoded.get(key)
            if data is None:
                data = encoded[key] = encode_key(self.topic, self.partition, key)
            if key in self.aggregates:
                values.append((data, encode_value(self.offset, self.aggregates[key])))
            else:
                tombstones.append((data, None))
                del encoded[key]
        values.sort(key=itemgetter(0))
        tombstones.sort(key=itemgetter(0))
        self._checkpoint_sending |= self._checkpoint_dirty
        self._checkpoint_dirty = set()
        meta = (meta_key(self.topic, self.partition), encode_meta(self.offset, self.watermark_ms, self._written))
        return Checkpoint(values, meta, tombstones)

    def checkpoint_sent(self) -> None:
        """Every record of the last :meth:`checkpoint_records` is acknowledged."""
        self._checkpoint_sending.clear()

    def checkpoint_failed(self) -> None:
        """The last checkpoint's records may not all have landed: its keys go out again with the
        next (sent by none, a stop's checkpoint would have written a meta record at an offset
        that their changes, never replayed, are not in)."""
        self._checkpoint_dirty |= self._checkpoint_sending
        self._checkpoint_sending.clear()

    # -- closing and flushing ----------------------------------------------------------------
    def closed_hours_before(self, grace_ms: int, idle_ms: int) -> int:
        """Hours ending at or before the returned time are closed: the watermark passed their end
        plus grace, or the partition is idle and the wall clock did. Before its first event a
        partition has closed nothing (on the wall clock, a backlog's first batch counted as late)."""
        now = self._clock()
        horizon = self.watermark_ms - grace_ms if self.watermark_ms is not None else _BEFORE_EVERY_HOUR
        if self.is_idle(idle_ms):
            horizon = max(horizon, now - grace_ms)
        return horizon

    def is_idle(self, idle_ms: int) -> bool:
        """No event for ``idle_ms`` and nothing left to read; or a backlog read to its end: nothing
        left to read, its newest event at least ``idle_ms`` old on the wall clock, and no event
        for ``idle_ms / BACKLOG_IDLE_SHARE``.

        A partition with unread records is not idle however long its last event was: a worker
        behind on a backlog fetches some partitions seconds apart, and closing their hours early
        wrote each hour again and again, once per fetch that brought more of it. Without a known
        log end (before the first fetch), the wall clock alone decides, and so it does after
        STALLED_IDLE_FACTOR times ``idle_ms``: a log may end in offsets no consumer is given (a
        transactional producer's commit markers).

        A backlog's last hour closes on the wall clock only when idle: with the whole idle time
        it waited two flush intervals after its last record (bench/throughput: 17,042 -> 18,855
        events/s, three alternated pairs). A live producer's newest event is not that old, so it
        waits the whole idle time as before; one whose events lag the wall clock by more than the
        grace (an hour is closed on the wall clock only once its end plus the grace passed) may
        see an hour closed before its last events, which update it as late events do."""
        now = self._clock()
        quiet = now - self.last_event_at
        if quiet >= idle_ms:
            return self.unread in (None, 0) or quiet >= STALLED_IDLE_FACTOR * idle_ms
        return (
            self.unread == 0
            and quiet * BACKLOG_IDLE_SHARE >= idle_ms
            and self.watermark_ms is not None
            and now - self.watermark_ms >= idle_ms
        )

    @property
    def settled(self) -> bool:
        """Read to the log end, and nothing changed that is not written (no hour, open or closed,
        waits to be flushed): only new records can give this partition more to write."""
        return self.unread == 0 and not any(self._flush_dirty.values())

    @property
    def unread(self) -> int | None:
        """Records between the state and the log end the consumer last saw (None: none seen yet)."""
        return None if self.end_offset is None else max(0, self.end_offset - 1 - self.offset)

    def take_flushable(self, grace_ms: int, idle_ms: int) -> list[tuple[Key, Agg]]:
        """Changed keys of closed hours, to write to the database; they are marked clean."""
        horizon = self.closed_hours_before(grace_ms, idle_ms)
        hours = [h for h in self._flush_dirty if h + HOUR_MS <= horizon]
        # Every change of these hours up to here is being written; a take that was never
        # confirmed (a flush cut short) counts for nothing.
        self._taken = dict.fromkeys(hours, self.offset)
        ready = [key for hour in hours for key in self._flush_dirty.pop(hour)]
        return [(key, self.aggregates[key]) for key in ready if key in self.aggregates]  # the store orders its writes

    def unflush(self, keys: Iterable[Key]) -> None:
        """A database write failed: these keys must be written again (and their hours are not
        written up to the take, whatever the other keys' writes did)."""
        keys = list(keys)
        for key in keys:
            self._taken.pop(key[0], None)
        self._mark_flush_dirty(keys)

    def confirm_written(self) -> None:
        """Every write of the keys taken since the last call is done: those that failed were
        given back (:meth:`unflush`); the other hours are in the database up to their take."""
        held = self.aggregates.hours()
        for hour, offset in self._taken.items():
            if hour in held:  # not evicted meanwhile
                self._written[hour] = max(self._written.get(hour, -1), offset)
        self._taken.clear()

    def evict(self, max_lateness_ms: int, grace_ms: int) -> int:
        """Drop hours no event can change any more (older than watermark - max lateness) once
        written; their checkpoint records become tombstones. Returns how many keys went."""
        if self.watermark_ms is None:
            return 0
        limit = self.watermark_ms - max_lateness_ms - grace_ms
        hours = [hour for hour in self.aggregates.hours() if hour + HOUR_MS <= limit]
        if not hours:
            return 0
        # An hour waits while a key of it is to be written, or its last change is not in an
        # acknowledged checkpoint: its tombstone must follow its last value, or a restore that
        # finds the value but not the tombstone would write an older one over the database's.
        pending_hours = {hour for hour, keys in self._flush_dirty.items() if keys}
        pending_hours.update(key[0] for key in self._checkpoint_dirty)
        pending_hours.update(key[0] for key in self._checkpoint_sending)
        gone = self.aggregates.pop_hours(hour for hour in hours if hour not in pending_hours)
        self._checkpoint_dirty |= set(gone)
        for hour in {key[0] for key in gone}:
            self._written.pop(hour, None)
        return len(gone)

    @property
    def open_keys(self) -> int:
        return len(self.aggregates)

    def estimated_bytes(self) -> int:
        """Rough memory of the held aggregates: about 200 bytes each plus their sketches', an
        average per key from every ``step``-th of them (at most MEMORY_SAMPLE), worked out again
        at most every MEMORY_REFRESH_MS, times the keys held now. The gauge is read by each
        scrape, in the scrape's thread: walking every aggregate each time took 13% of a busy
        worker's CPU, scraped every 0.1 s. (The estimate itself was kept for the interval: a
        partition first scraped before its first event said 0 bytes for 10 s while it held keys.)"""
        now = self._clock()
        keys = len(self.aggregates)
        if self._memory is None or now - self._memory[1] >= MEMORY_REFRESH_MS or (keys and not self._memory[0]):
            aggs = list(self.aggregates.held())  # atomic under the GIL
            step = -(-len(aggs) // MEMORY_SAMPLE) or 1
            sample = aggs[::step]
            self._memory = (sum(_held_bytes(agg) for agg in sample) / len(sample) if sample else 0.0, now)
        return int(self._memory[0] * keys)
