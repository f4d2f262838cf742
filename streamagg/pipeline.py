"""The worker's processing, without Faust: consumed records in; dead letters, checkpoint records
and rows to write out. ``app.py`` wires it to Kafka (Faust) and PostgreSQL (store).

Every input is a :class:`Record`: the consumer's own records (aiokafka's ``ConsumerRecord``),
or :class:`RawMessage`. Per topic-partition there is one :class:`~streamagg.state.PartitionState`,
created on the partition's first message from its recovered checkpoint records (``restore``
callable).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .aggregate import Agg, Key
from .buckets import HOUR_MS
from .events import EventKind, Reason, Rejected, decode
from .settings import Settings
from .state import Checkpoint, Clock, PartitionState
from .telemetry import PartitionHealth, Telemetry

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]

# A dead letter carries its message's value unchanged up to this size and is cut there past it,
# with a ``truncated_from`` header (the value's size); the whole message stays in its source topic
# at the offset the headers give. A producer's compressed batch can hold a value larger than the
# broker takes uncompressed (1,048,588 bytes a batch by default), and a dead letter is sent
# uncompressed: refused, it stopped the worker at every restart.
MAX_DEAD_LETTER_VALUE = 1_000_000


class Record(Protocol):
    """A consumed Kafka record, as aiokafka's ``ConsumerRecord`` has it: the pipeline takes the
    consumer's records themselves (a copy of each took 0.67 us, measured)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def timestamp(self) -> int | None: ...  # bounds how far ahead the event time may be (events.decode)
    @property
    def key(self) -> bytes | None: ...  # kept by its dead letter


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A :class:`Record` made by hand (tests, benchmarks)."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    timestamp: int | None = None
    key: bytes | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    message: Record
    reason: Reason
    detail: str

    def value(self) -> bytes | None:
        """The message's value, cut past MAX_DEAD_LETTER_VALUE. A null value (a tombstone) stays
        null, unless the key is null too: the client sends no record with neither (b"" then)."""
        value = self.message.value
        if value is None:
            return None if self.message.key is not None else b""
        return value[:MAX_DEAD_LETTER_VALUE]

    def headers(self) -> list[tuple[str, bytes]]:
        headers = [
            ("reason", self.reason.value.encode()),
            ("source_topic", self.message.topic.encode()),
            ("source_partition", str(self.message.partition).encode()),
            ("source_offset", str(self.message.offset).encode()),
            ("detail", self.detail[:500].encode()),
        ]
        size = len(self.message.value or b"")
        if size > MAX_DEAD_LETTER_VALUE:
            headers.append(("truncated_from", str(size).encode()))
        return headers


@dataclass
class Processed:
    dead: list[DeadLetter] = field(default_factory=list)  # to the dead-letter topic
    seeks: dict[TopicPartition, int] = field(default_factory=dict)  # offsets to read again from


@dataclass
class Flushable:
    """Keys of closed hours of one topic-partition, ready for the database."""

    topic: str
    partition: int
    items: list[tuple[Key, Agg]] = field(default_factory=list)
    closed_at_ms: int = 0  # when their hour closed (flush latency = commit time - this)
    offset: int = -1  # the partition offset the items include


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        telemetry: Telemetry,
        restore: Callable[[str, int], Iterable[tuple[Key | None, bytes]]],
        clock: Clock = wall_clock_ms,
    ) -> None:
        self._settings = settings
        self._telemetry = telemetry
        self._restore = restore
        self._clock = clock
        self._kinds = settings.metric_sketch_kinds()
        self._topic_kinds: dict[str, EventKind] = {
            settings.topic(kind): kind for kind in ("traces", "spans", "document_events", "chat_messages")
        }
        self.states: dict[TopicPartition, PartitionState] = {}
        self._max_lateness_ms = settings.max_lateness_seconds * 1000
        self._grace_ms = settings.grace_seconds * 1000
        self._idle_ms = int(max(2 * settings.flush_interval_seconds, 1.0) * 1000)

    # -- consuming ---------------------------------------------------------------------------
    def state_for(self, topic: str, partition: int) -> PartitionState:
        state = self.states.get((topic, partition))
        if state is None:
            state = PartitionState(topic, partition, self._kinds, self._settings.max_series_per_dimension, self._clock)
            state.restore(self._restore(topic, partition))
            if state.offset >= 0:
                log.debug("restored %s[%d] up to offset %d: %d keys", topic, partition, state.offset, state.open_keys)
            self.states[(topic, partition)] = state
        return state

    def process(self, batch: Mapping[TopicPartition, Sequence[Record]]) -> Processed:
        """Validate and aggregate a batch: records by topic-partition, each in offset order."""
        started = time.perf_counter()
        out = Processed()
        dead = out.dead
        applied = 0
        max_lateness_ms = self._max_lateness_ms
        for (topic, partition), offered in batch.items():
            if not offered:
                continue
            state = self.state_for(topic, partition)
            admission = state.admit([m.offset for m in offered])
            if admission.seek is not None:
                out.seeks[(topic, partition)] = admission.seek
            group = offered if len(admission.taken) == len(offered) else [offered[i] for i in admission.taken]
            if not group:
                continue
            kind = self._topic_kinds[topic]
            self._telemetry.events_consumed.labels(topic).inc(len(group))
            valid = []
            valid_messages = []  # valid[i] came from valid_messages[i]
            for message in group:
                try:
                    valid.append((message.offset, decode(kind, message.value or b"", message.timestamp, max_lateness_ms)))
                    valid_messages.append(message)
                except Rejected as exc:
                    dead.append(DeadLetter(message, exc.reason, exc.detail))
            horizon = state.closed_hours_before(self._grace_ms, self._idle_ms)
            late = sum(1 for _, event in valid if event.time_ms // HOUR_MS * HOUR_MS + HOUR_MS <= horizon)
            result = state.ingest(valid, max_lateness_ms)
            applied += result.applied
            for position in result.too_late:
                event = valid[position][1]
                dead.append(DeadLetter(valid_messages[position], Reason.TOO_LATE, f"event time {event.time_ms} ms is older than "
                                       f"watermark {state.watermark_ms} ms - {max_lateness_ms} ms"))  # fmt: skip
            self._telemetry.too_late.inc(len(result.too_late))
            self._telemetry.late_events.inc(max(0, late - len(result.too_late)))
            state.advance(group[-1].offset)
            overflow = state.aggregates.overflow_events
            for (metric, dimension_type), count in overflow.items():
                self._telemetry.overflow_events.labels(metric, dimension_type).inc(count)
            overflow.clear()
        for letter in dead:
            self._telemetry.events_rejected.labels(letter.reason.value).inc()
        self._telemetry.records_processed.inc(applied)
        self._telemetry.aggregation_duration.observe(time.perf_counter() - started)
        return out

    def revoke(self, partitions: Iterable[TopicPartition]) -> None:
        """Forget partitions this worker no longer owns (their checkpoints live on in the table)."""
        for tp in partitions:
            self.states.pop(tp, None)

    # -- checkpointing -----------------------------------------------------------------------
    def checkpoint_records(self) -> dict[TopicPartition, Checkpoint]:
        """Every partition's changed keys and meta record, for the changelog partition of its own."""
        return {tp: state.checkpoint_records() for tp, state in self.states.items()}

    def checkpoint_sent(self) -> None:
        for state in self.states.values():
            state.checkpoint_sent()

    def checkpoint_failed(self) -> None:
        for state in self.states.values():
            state.checkpoint_failed()

    def offsets(self) -> dict[TopicPartition, int]:
        return {tp: state.offset for tp, state in self.states.items()}

    # -- flushing ----------------------------------------------------------------------------
    def saw_log_ends(self, ends: Mapping[TopicPartition, int]) -> None:
        """The consumer's end offsets of owned partitions: which partitions have read everything
        (the only ones whose hours close when idle), and their lag."""
        for tp, end in ends.items():
            state = self.states.get(tp)
            if state is not None:
                state.end_offset = end

    def flushable(self) -> list[Flushable]:
        """Changed keys of closed hours, per partition."""
        out = []
        for (topic, partition), state in self.states.items():
            items = state.take_flushable(self._grace_ms, self._idle_ms)
            if not items:
                continue
            closed = max(key[0] for key, _ in items) + HOUR_MS + self._grace_ms
            if not state.replaying:  # one label, the state's offset
                out.append(Flushable(topic, partition, items, closed, state.offset))
                continue
            by_label: defaultdict[int, list[tuple[Key, Agg]]] = defaultdict(list)
            for item in items:
                by_label[state.flush_label(item[0])].append(item)
            out.extend(Flushable(topic, partition, group, closed, label) for label, group in by_label.items())
        return out

    def unread(self) -> int:
        """Records behind the log ends, over every owned partition (as the consumer last saw them)."""
        return sum(state.unread or 0 for state in self.states.values())

    def settled(self) -> bool:
        """Every owned partition read to its end with everything it holds written."""
        return all(state.settled for state in self.states.values())

    def owns(self, topic: str, partition: int) -> bool:
        return (topic, partition) in self.states

    def unflush(self, flushable: Flushable) -> None:
        state = self.states.get((flushable.topic, flushable.partition))
        if state is not None:
            state.unflush(key for key, _ in flushable.items)

    def confirm_written(self) -> None:
        """The flush's writes of everything :meth:`flushable` took are done (failed ones given
        back with :meth:`unflush`): checkpoints now say which hours the database holds, so a
        restore does not write them again."""
        for state in self.states.values():
            state.confirm_written()

    def evict(self) -> int:
        return sum(state.evict(self._max_lateness_ms, self._grace_ms) for state in self.states.values())

    def health(self) -> list[PartitionHealth]:
        now = self._clock()
        out = []
        for (topic, partition), state in list(self.states.items()):
            out.append(
                PartitionHealth(
                    topic=topic,
                    partition=partition,
                    open_buckets=state.open_keys,
                    open_bytes=state.estimated_bytes(),
                    consumer_lag_records=state.unread,
                    watermark_lag_seconds=None if state.watermark_ms is None else (now - state.watermark_ms) / 1000,
                )
            )
        return out
