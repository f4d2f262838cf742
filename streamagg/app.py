"""The Faust app: the only module that knows faust.App. Wires Kafka to the pipeline, the
pipeline's checkpoints to a Faust table, and closed hours to PostgreSQL.

Measured behaviour of faust-streaming 0.15.3 this is built around (docs/design.md):
* Faust's ack-based commits can commit past unacked offsets (faust-streaming#606), and one
  held ack hangs shutdown. So the source topics have ``acks=False`` and this module commits
  offsets itself, only up to what a completed checkpoint covers.
* ``import faust`` reads ``sys.argv`` and settings read environment variables: ``env={}``.
* Faust does not create source topics reliably: ``topics.ensure_topics`` does, before start.
* Faust hands every message to an agent through a ConsumerMessage, sensors and four asyncio
  tasks (``Service.wait_first``): about 14,000 events/s at most. Records of the source topics
  bypass that path: :class:`_BatchConsumer` passes each fetch straight to the runtime as one
  batch. Changelog records (table recovery) still take Faust's own path.
* An exception escaping the batch handler would lose its batch: it catches, counts, and stops
  the worker instead (a restart replays from the last checkpoint).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC
from pathlib import Path
from typing import Any

import faust
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from faust.stores import memory as faust_memory
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, ConsumerT
from prometheus_client import CollectorRegistry

from .aggregate import Key
from .buckets import DAY_MS, WEEK_MS, bucket_start_ms
from .errors import StreamaggError
from .lanes import in_lanes
from .logs import count_client_errors, keep_own_lines
from .pipeline import DeadLetter, Flushable, Pipeline, TopicPartition
from .rollup import RollupHelpers, roll_up_owed, rollup, rollup_keys
from .settings import Settings
from .state import PartitionState, collect_less_often, decode_key
from .store import Store, StoreError, WriteResult, key_lock_id
from .telemetry import Progress, Telemetry, serve
from .topics import TopicError, deadletter_topic, ensure_topics, source_topics

log = logging.getLogger(__name__)

TABLE_NAME = "partials"
FLUSH_KEYS_PER_TRANSACTION = 5_000
FLUSH_LANES = 2  # transactions in flight per flush (bench/throughput: 4,220 -> 4,960 events/s over 1)
ROLLUP_MAX_PENDING_KEYS = 200_000  # flushed hour keys whose days and weeks wait for a roll-up
ROLLUP_MAX_DEFERRAL = 12  # roll-up intervals a backlog defers roll-ups for, at most (day rows stay this fresh)
CATCH_UP_RECORDS = 20_000  # records behind the log ends (all owned partitions) that make a backlog to read
ANALYZE_MIN_ROWS = 5_000
RETRY_MAX_SECONDS = 60.0
# The checkpoint at a clean stop commits nothing (it only shortens the next owner's replay), so
# a broker that does not acknowledge it in this time does not hold the stop up: it hung for as
# long as Kafka was unreachable.
STOP_CHECKPOINT_SECONDS = 10.0
# Faust's own stop (the producer's pending records, the consumer leaving its group) waits for the
# broker without a limit. Past this, the worker exits at once, as if killed: nothing is lost,
# the next owner of its partitions replays from the last commit (and does its queued roll-ups).
STOP_LIMIT_SECONDS = 60.0
MAX_BATCH_RECORDS = 5_000  # records per processed fetch: ~0.1 s of the event loop
PROGRESS_SECONDS = 30.0  # a progress line in the log this often, while there is progress
RECOVERY_PROGRESS_SECONDS = 10.0  # the same while the checkpoints are read back


def flush_chunks(items: list[Flushable], max_keys: int) -> list[list[Flushable]]:
    """The flushables split into groups of at most ``max_keys`` keys, with every partition's partial
    of a key in the same group: a key's final row is then derived once per flush, not once per
    partition that closed its hour (each time reading and merging the other partitions' partials).
    Keys go in order of their lock stripe, so that groups far apart lock disjoint stripes."""
    keys = sorted(dict.fromkeys(key for item in items for key, _ in item.items), key=key_lock_id)
    chunk_of = {key: i // max_keys for i, key in enumerate(keys)}
    groups: list[list[Flushable]] = [[] for _ in range(-(-len(keys) // max_keys))]
    for item in items:
        parts: dict[int, list] = {}
        for entry in item.items:
            parts.setdefault(chunk_of[entry[0]], []).append(entry)
        for index, entries in parts.items():
            groups[index].append(replace(item, items=entries))
    return groups


def _delivered(delivery: asyncio.Future | None) -> bool:
    return delivery is not None and delivery.done() and not delivery.cancelled() and delivery.exception() is None


def rollup_due(pending: int, backlog: bool, since_last: float, interval: float) -> bool:
    """Whether the days and weeks of ``pending`` flushed hour keys are rolled up now.

    While a backlog is worked off (closed hours to write: the flush wrote at least a full
    transaction; or records to read: more than CATCH_UP_RECORDS behind the log ends), hours go
    first and roll-ups wait, so each day and week is merged once rather than once per flush or
    per hour the backlog closes, up to ROLLUP_MAX_PENDING_KEYS keys (memory) and
    ROLLUP_MAX_DEFERRAL intervals (a worker that never catches up still rolls up). Otherwise at
    most once per ``interval`` seconds, which batches a trickle of late events."""
    if not pending:
        return False
    if pending >= ROLLUP_MAX_PENDING_KEYS:
        return True
    return since_last >= (ROLLUP_MAX_DEFERRAL * interval if backlog else interval)


SourceBatch = Mapping[TP, list[ConsumerRecord]]


class _BatchConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer, except that each fetch's records of the source topics go to
    ``app.batch_handler`` in one call instead of message by message through the Conductor, and
    a fetch's changelog records go into the table at once (:meth:`_deliver`).

    Group membership, assignment, flow control around rebalances, the bookkeeping of table
    recovery and seeks stay Faust's. The source topics have ``acks=False``: the runtime commits
    their offsets.
    """

    _recovery_read = 0  # changelog records read since the last progress line
    _recovery_noted_at = 0.0  # that line's time (or the recovery's start)
    _recovery_fetched_at = -math.inf  # the last changelog fetch's time

    async def _drain_messages(self, fetcher: Any) -> None:  # the Fetcher service's loop
        app = self.app
        sources: frozenset[str] = app.batch_topics  # type: ignore[attr-defined]
        handle: Callable[[SourceBatch, int], Awaitable[SourceBatch]] = app.batch_handler  # type: ignore[attr-defined]
        callback = self.callback
        try:
            while not (self._stopped.is_set() or fetcher._stopped.is_set()):
                records, active = await self._wait_next_records(timeout=1.0)
                await asyncio.sleep(0)  # a fetch can return at once, many times in a row
                if not records or self.should_stop:
                    continue
                if not self.flow_active:  # the fetch raced a rebalance
                    await self._put_back(records)
                    await self.perform_seek()  # as Consumer.getmany
                    continue
                generation = app.consumer_generation_id
                batch: dict[TP, list[ConsumerRecord]] = {}
                changelog: list[tuple[TP, list[ConsumerRecord]]] = []
                for tp, tp_records in records.items():
                    if active is not None and tp not in active and tp not in self._buffered_partitions:
                        await self._put_back({tp: tp_records})
                    elif tp.topic in sources:
                        batch[tp] = tp_records
                    else:
                        changelog.append((tp, tp_records))
                if changelog:  # for table recovery, through Faust; a rebalance drops the rest
                    await self.wait_first(self._deliver(callback, changelog), self.suspend_flow.wait())
                if batch:
                    await self._put_back(await handle(batch, generation))
        except self.consumer_stopped_errors:
            if not app.should_stop:
                raise
            self.log.info("Broker stopped consumer, shutting down...")
        except asyncio.CancelledError:
            if not app.should_stop:
                raise

    async def _deliver(self, callback: Callable[[Any], Awaitable[Any]], records: list[tuple[TP, list[ConsumerRecord]]]) -> None:
        """Changelog records to the table, in order. Faust's recovery takes about 50 us a record (a
        task and a timed wait per record in its loop, a lock and a task in the Conductor): a
        restart recovering 262,983 records took 16-17 s to the table recovered. So the records of
        a partition under recovery go straight into the table's in-memory store, as Faust's
        recovery would put them there, tombstones deleting, each in offset order (Faust's
        store applied a batch's deletes after its updates). Recovery is then told the
        partition's new offset, and the fetch's last record goes through Faust's path: found
        applied already, it only makes Faust check whether recovery is done. Records of any
        other partition (a standby's: the app has none) take Faust's path."""
        recovery = self.app.tables.recovery
        to_message = self._to_message
        self._note_recovery(recovery, sum(len(tp_records) for _, tp_records in records))
        for tp, tp_records in records:
            if not tp_records:
                continue
            table = recovery.tp_to_table.get(tp)
            if table is None or tp not in recovery.active_tps or not isinstance(table.data, faust_memory.Store):
                for record in tp_records:
                    await callback(to_message(tp, record))
                continue
            seen = recovery.active_offsets.get(tp)
            last = -1 if seen is None else seen
            store = table.data
            data, owners, partition = store.data, store._key_partition, tp.partition
            for record in tp_records:
                if record.offset <= last:
                    continue
                last = record.offset
                if record.value is None:
                    data.pop(record.key, None)
                else:
                    data[record.key] = record.value
                owners[record.key] = partition  # which keys the store drops with a lost partition
            if seen is None or last > seen:
                recovery.active_offsets[tp] = last
            await callback(to_message(tp, tp_records[-1]))

    def _note_recovery(self, recovery: Any, read: int) -> None:
        """A progress line every RECOVERY_PROGRESS_SECONDS while the changelog is read (a large
        state takes a while: about 8 us a record); a shorter recovery logs only its end. A fetch
        that long after the previous one starts a new recovery (a rebalance)."""
        now = time.monotonic()
        if now - self._recovery_fetched_at > RECOVERY_PROGRESS_SECONDS:
            self._recovery_noted_at, self._recovery_read = now, 0
        self._recovery_fetched_at = now
        self._recovery_read += read
        if now - self._recovery_noted_at >= RECOVERY_PROGRESS_SECONDS:
            log.info("recovering the checkpoints: %s records read in %.0f s, %s to go", f"{self._recovery_read:,}",
                     now - self._recovery_noted_at, f"{recovery.active_remaining_total():,}")  # fmt: skip
            self._recovery_noted_at, self._recovery_read = now, 0

    async def _put_back(self, records: SourceBatch) -> None:
        """Seek still-assigned source partitions back to the first of these records, which are not
        processed now (changelog records are Faust's). Faust drops them and seeks to the committed offsets, but aiokafka leaves
        a partition without a committed offset at its fetch position: past the dropped records,
        for good (seen with two workers starting together). A seek that lands past what a
        partition's state expects is caught by ``PartitionState.admit`` like any gap."""
        assigned = self.assignment()
        sources: frozenset[str] = self.app.batch_topics  # type: ignore[attr-defined]
        for tp, tp_records in records.items():
            if tp in assigned and tp.topic in sources and tp_records:
                log.info("%s: %d records fetched during a rebalance are read again", tp, len(tp_records))
                await self.seek(tp, tp_records[0].offset)


class _Transport(faust_aiokafka.Transport):
    Consumer = _BatchConsumer


class _App(faust.App):
    batch_topics: frozenset[str] = frozenset()
    batch_handler: Callable[[SourceBatch, int], Awaitable[SourceBatch]]  # returns what it did not take

    def _new_transport(self) -> _Transport:
        return _Transport(self.conf.broker_consumer, self)


# mode names a service's logger after the module of its class: Faust's lifecycle lines of these
# subclasses ("[^-_App]: Starting...") came out as streamagg's own INFO lines. They stay Faust's,
# shown from WARNING on like the rest of Faust's (set after the class statements, which would
# replace a logger mode already named).
_App.logger = faust.App.logger
_BatchConsumer.logger = faust_aiokafka.Consumer.logger


class Runtime:
    """What the Faust callbacks share: the pipeline, the table, the store, telemetry."""

    def __init__(self, settings: Settings, telemetry: Telemetry, app: faust.App, partitions: int) -> None:
        self.settings = settings
        self.telemetry = telemetry
        self.app = app
        # A source partition's checkpoints go to the changelog partition of its number: as many
        # as the source topic with the most partitions.
        self.table = app.Table(
            TABLE_NAME,
            default=None,
            partitions=partitions,
            key_type=bytes,
            value_type=bytes,
        )
        self.deadletter = app.topic(
            deadletter_topic(settings), key_type=bytes, key_serializer="raw", value_type=bytes, value_serializer="raw"
        )
        self.pipeline = Pipeline(settings, telemetry, self._restore)
        self._recovered: dict[TopicPartition, list[tuple[Key | None, bytes]]] | None = None
        self._last_checkpoint = time.monotonic()
        self._store: Store | None = None
        # Processes started by run_worker before the first read (else with the first roll-up).
        self.rollup_helpers = RollupHelpers(settings.database_url.get_secret_value(), settings.redacted_dsn())
        self._flush_lock = asyncio.Lock()
        self._closing = False  # set by close(): a flush ends after its current pass
        self._failures = 0  # flush attempts in a row that failed
        self._failed_stages: set[str] = set()  # what failed in the current flush attempt (logged once)
        self._retry_at = 0.0  # monotonic time before which flushes wait (exponential backoff)
        # Dead letters since the last checkpoint, each with its delivery (None: not queued yet,
        # or to be sent again). The next checkpoint sends what is not queued and awaits them all
        # before its meta record; a checkpoint that fails keeps those not known delivered.
        self._dead_letters: list[tuple[DeadLetter, asyncio.Future | None]] = []
        self._checkpoint_lock = asyncio.Lock()
        self._handling = asyncio.Lock()  # a batch from its processing to its dead letters queued
        self._ready: set[TP] = set()  # source partitions recovered in this generation
        # Day and week roll-ups of flushed keys are batched: a key's hour is flushed once per
        # partition that saw it, its day and week once per roll-up (see rollup_due).
        self._to_roll_up: set[Key] = set()
        # The flushes also queue their hours in the database (Store.write_partials_of): what a
        # worker that died owed is rolled up by the next one to start or get partitions.
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._check_owed_rollups = True
        self._last_rollup = time.monotonic()
        self._rollup_interval = settings.rollup_interval_seconds or max(5.0, 5 * settings.flush_interval_seconds)
        self._inserted_since_analyze = 0  # final rows, since the planner's statistics were refreshed
        self._inserted_at_analyze = 0
        self.failed = False  # set when the worker stops because of an internal error
        self._progress = Progress.of(telemetry, [], time.monotonic())  # the counters at the last line
        # Faust's consumer once its start made it, for the scrape thread (see _note_log_ends).
        self._consumer: ConsumerT | None = None

    # -- recovery ----------------------------------------------------------------------------
    def _index_table(self) -> None:
        """Index the recovered table by topic-partition (the table has no per-partition view)."""
        index: dict[TopicPartition, list[tuple[Key | None, bytes]]] = {}
        for raw_key, value in self.table.data.items():
            if value is None:
                continue
            topic, partition, key = decode_key(raw_key)
            index.setdefault((topic, partition), []).append((key, value))
        self._recovered = index
        log.info("table recovered: %d partitions, %d records", len(index), sum(map(len, index.values())))

    async def on_recovered(self) -> None:
        """After every rebalance: rebuild the owned partitions from the recovered table."""
        self._index_table()
        assert self._recovered is not None
        sources = set(source_topics(self.settings))
        consumer = self._consumer = self.app.consumer
        ready = {tp for tp in consumer.assignment() if tp.topic in sources}
        # Rebuild every owned partition now, not on its next event: a partition whose events
        # were all consumed and committed by a worker that died before flushing them gets no
        # next event, and its hours would never be written.
        restored = []
        unstarted: dict[TP, PartitionState] = {}  # without a meta record: no checkpoint, or a first one cut short
        for tp in sorted(ready):
            new = not self.pipeline.owns(tp.topic, tp.partition)
            state = self.pipeline.state_for(tp.topic, tp.partition)
            if new and state.offset >= 0:
                restored.append(state.open_keys)
            if state.offset < 0:
                unstarted[tp] = state
        # Those must be read from the log's first offset: tell their states, so that a consumer
        # starting one further on is sent back (PartitionState.admit). Their batches wait for
        # ``_ready``, set below.
        starts = await consumer.earliest_offsets(*unstarted) if unstarted else {}
        for tp, start in starts.items():
            unstarted[tp].expect(start)
        if restored:  # one line, however many partitions (each on its own at DEBUG)
            log.info("%d of %d partitions restored from their checkpoints: %s keys", len(restored), len(ready),
                     f"{sum(restored):,}")  # fmt: skip
        self._ready = ready
        self._check_owed_rollups = True  # a rebalance may mean that a worker died

    def _restore(self, topic: str, partition: int) -> list[tuple[Key | None, bytes]]:
        if self._recovered is None:
            self._index_table()
        assert self._recovered is not None
        return self._recovered.pop((topic, partition), [])

    def on_revoked(self, revoked: Iterable[TP]) -> None:
        revoked = set(revoked)
        self._ready -= revoked
        self.pipeline.revoke({(tp.topic, tp.partition) for tp in revoked})
        self._recovered = None  # the next assignment recovers the table again

    def _note_log_ends(self) -> None:
        """Tell the pipeline the owned partitions' end offsets as the fetcher last saw them
        (plain integers, also from the scrape thread: a stale value at worst); none before the
        first fetch.

        Never through ``app.consumer`` here: Faust creates the consumer on first access, and a
        scrape during the worker's start made it in the scrape thread, a second consumer that
        never started (``ConsumerNotStarted`` in the table manager's start) or one on the scrape
        thread's event loop ("attached to a different loop")."""
        consumer = self._consumer
        if consumer is None:  # no partition is owned before the first recovery
            return
        ends: dict[TopicPartition, int] = {}
        try:
            for topic, partition in list(self.pipeline.states):
                end = consumer.highwater(TP(topic, partition))
                if end is not None and end >= 0:
                    ends[(topic, partition)] = end
        except Exception:  # not started, or stopping: no end is known
            log.debug("no end offsets from the consumer", exc_info=True)
        self.pipeline.saw_log_ends(ends)

    def health(self) -> list:
        """Per-partition state for the scrape, consumer lag from the log ends last seen."""
        self._note_log_ends()
        return self.pipeline.health()

    # -- consuming ---------------------------------------------------------------------------
    async def consume(self, batch: SourceBatch, generation: int) -> SourceBatch:
        """One fetch of source records; returns the records it did not take, to be read again.
        A failure stops the worker (a restart replays the batch)."""
        try:
            return await self.process(batch, generation)
        except Exception:  # a bug must not silently skip a batch
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A stop cancelled this task while a checkpoint's gather ended in a delivery's
                # error: the cancel is owed, not a bug (taken for one, the stop hung 60 s, exit 1).
                raise asyncio.CancelledError from None
            self._stop_on_bug("processing a batch")
            await asyncio.Event().wait()  # no further batch: wait for the shutdown
            raise

    def _stop_on_bug(self, what: str) -> None:
        self.telemetry.errors.labels("process").inc()
        log.exception("%s failed; stopping so a restart replays it", what)
        self.failed = True
        os.kill(os.getpid(), signal.SIGTERM)

    async def process(self, batch: SourceBatch, generation: int) -> SourceBatch:
        # The batch's offsets and its dead letters go in one checkpoint: one taken while a dead
        # letter waited to be queued (a full producer buffer) committed past it unsent.
        async with self._handling:
            # Only records of partitions whose table recovery completed in the current consumer
            # generation: a record fetched before a rebalance, folded into a state rebuilt
            # meanwhile, would break offset order. The others are returned, to be read again.
            # (Checked once the lock is held: waiting for it, a rebalance may have come.)
            if generation != self.app.consumer_generation_id:
                return batch
            ready = self._ready
            taken = {tp: records for tp, records in batch.items() if tp in ready}
            untaken = {tp: records for tp, records in batch.items() if tp not in ready}
            processed = self.pipeline.process(taken)
            # Queued in a list of the batch's own: a checkpoint failing meanwhile puts its
            # undelivered letters back at the front of the shared one.
            letters: list[tuple[DeadLetter, asyncio.Future | None]] = [(letter, None) for letter in processed.dead]
            try:
                await self._queue_dead_letters(letters)
            finally:
                self._dead_letters.extend(letters)
        for (topic, partition), offset in processed.seeks.items():
            self.telemetry.errors.labels("skipped_offset").inc()
            await self.app.consumer.seek(TP(topic, partition), offset)
        await self.checkpoint_if_due()
        return untaken

    async def _queue_dead_letters(self, letters: list[tuple[DeadLetter, asyncio.Future | None]]) -> None:
        """Queue (buffered sends) the dead letters of ``letters`` not queued yet, in place. A send
        that raises leaves it and those after it unqueued: a checkpoint queues them, and awaits
        every delivery before its meta record, so a dead letter is never lost."""
        for i, (letter, delivery) in enumerate(letters):
            if delivery is None:
                letters[i] = (letter, await self.app.producer.send(
                    self.deadletter.get_topic_name(), letter.message.key, letter.value(), None, None, letter.headers()
                ))  # fmt: skip

    async def checkpoint(self, commit: bool = True) -> None:
        """Changed keys -> changelog (explicit partition); their acks; then commit the offsets covered.

        Serialised: a later checkpoint's commit must never overtake an earlier one's records.
        None once a failure stopped the worker: a batch that failed half-way left keys ahead
        of their partition's offset, and labelled with it they would be counted again by the
        replay; the next owner replays from the last commit instead.
        """
        if self.failed:
            return
        async with self._checkpoint_lock:
            await self._checkpoint(commit)

    async def checkpoint_if_due(self) -> None:
        if time.monotonic() - self._last_checkpoint >= self.settings.checkpoint_interval_seconds:
            await self.checkpoint()

    async def _checkpoint(self, commit: bool) -> None:
        async with self._handling:  # not between a batch's processing and its dead letters' queueing
            checkpoints = self.pipeline.checkpoint_records()
            offsets = self.pipeline.offsets()  # same instant as the records: no await in between
            letters, self._dead_letters = self._dead_letters, []
        # Three steps, each acknowledged (acks=all) before the next goes: the changed keys' values
        # (and the dead letters so far), then the meta records, then the tombstones; then the
        # offsets are committed. A meta record that landed then says its values did, whatever
        # became of a batch that failed while a later one of its partition went through, and a
        # tombstone never lands before the meta record that let its hour go (Checkpoint).
        states = {tp: self.pipeline.states.get(tp) for tp in checkpoints}
        try:
            await self._queue_dead_letters(letters)
            deliveries = [delivery for _, delivery in letters]
            for step in range(3):  # Checkpoint.steps
                for tp, checkpoint in checkpoints.items():
                    if step and self.pipeline.states.get(tp) is not states[tp]:
                        continue  # revoked meanwhile: its next owner has restored from the older meta record
                    deliveries.extend(await self._send_changelog(tp[1], checkpoint.steps()[step]))
                await asyncio.gather(*deliveries)
                deliveries = []
        except BaseException:
            # Its keys, and its dead letters not known delivered, go out with the next checkpoint
            # (the stop's too): dropped, that one's meta record claimed an offset past them.
            self.pipeline.checkpoint_failed()
            self._dead_letters[:0] = [(letter, None) for letter, delivery in letters if not _delivered(delivery)]
            raise
        self.pipeline.checkpoint_sent()
        self._last_checkpoint = time.monotonic()
        if not commit:
            return
        assigned = self.app.consumer.assignment()
        to_commit = {TP(topic, p): offset + 1 for (topic, p), offset in offsets.items() if offset >= 0}
        to_commit = {tp: offset for tp, offset in to_commit.items() if tp in assigned}
        if to_commit:
            await self.app.consumer._commit(to_commit)

    async def _send_changelog(self, partition: int, records: Sequence[tuple[bytes, bytes | None]]) -> list[asyncio.Future]:
        """Queue records for one changelog partition, in order; their deliveries.

        Straight to aiokafka's batch API, not through Table.send_changelog's buffer (a task
        switch per record, and a flush() that gives up after 0.1 s without progress) nor Faust's
        send (sensors and a future per record)."""
        if not records:
            return []
        producer = self.app.producer._ensure_producer()
        changelog = self.table.changelog_topic.get_topic_name()
        deliveries = []
        batch = producer.create_batch()
        for key, value in records:
            if batch.append(key=key, value=value, timestamp=None) is None:  # full
                deliveries.append(await producer.send_batch(batch, changelog, partition=partition))
                batch = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)  # a first record always fits
        deliveries.append(await producer.send_batch(batch, changelog, partition=partition))
        return deliveries

    # -- flushing ----------------------------------------------------------------------------
    async def store(self) -> Store:
        if self._store is None:
            self._store = await Store.open(self.settings.database_url.get_secret_value(), self.settings.redacted_dsn())
            await self._store.migrate()
        return self._store

    async def flush(self) -> None:
        """Write closed hours' partials (and the final rows); roll up their days and weeks. While
        a backlog is worked off, pass after pass: what closed meanwhile waits for no timer tick."""
        async with self._flush_lock:  # the crontab's flush may wait here for the timer's
            if self._closing:  # waited for close(), which closed the store: nothing to reopen it for
                return
            if time.monotonic() < self._retry_at:
                return  # backing off after a database error (perhaps of the attempt waited for)
            self._failed_stages.clear()  # a new attempt
            try:
                store = await self.store()
            except StoreError as exc:
                self._failed("connect", exc)
                return
            while await self._flush_pass(store) and not self._closing:
                pass

    async def _flush_pass(self, store: Store) -> bool:
        """One pass of :meth:`flush`; True if it wrote a backlog's full transaction and all went
        well, so another pass follows at once."""
        self._note_log_ends()  # an idle partition closes its hours only once read to the end
        items = [item for item in self.pipeline.flushable() if item.items]
        # Chunks follow the key lock stripes, so lanes of consecutive chunks seldom wait for
        # each other's locks.
        chunks = flush_chunks(items, FLUSH_KEYS_PER_TRANSACTION)
        all_written = all(await in_lanes(chunks, FLUSH_LANES, lambda lane: self._flush_chunks(store, lane)))
        self.pipeline.confirm_written()
        if self._inserted_since_analyze > max(ANALYZE_MIN_ROWS, self._inserted_at_analyze):
            # The table doubled since the planner last looked: a fresh table's statistics
            # make every roll-up lookup scan it, long before autovacuum's first analyze.
            try:
                await store.analyze()
            except StoreError as exc:
                self._failed("flush", exc)
                return False
            self._inserted_at_analyze += self._inserted_since_analyze
            self._inserted_since_analyze = 0
        if self._check_owed_rollups:
            try:
                await self._roll_up_owed(store)
            except StoreError as exc:
                self._failed("rollup", exc)
                return False
            self._check_owed_rollups = False
        # A backlog: this pass wrote a full transaction, and more of it may follow. Nothing
        # follows once every partition is read to its end with all it holds written: its
        # days and weeks are rolled up now, not a flush interval later. Reading a backlog, the
        # worker closes its hours one after the other: their days wait for the last (1,000,000
        # events over a clock hour's boundary: the first hour's days were rolled up mid-read,
        # 3.7 s of the worker's thread, and again with the second's).
        backlog = sum(len(item.items) for item in items) >= FLUSH_KEYS_PER_TRANSACTION and not self.pipeline.settled()
        catching_up = self.pipeline.unread() > CATCH_UP_RECORDS
        if rollup_due(
            len(self._to_roll_up), backlog or catching_up, time.monotonic() - self._last_rollup, self._rollup_interval
        ):
            try:
                await self._roll_up(store)
            except StoreError as exc:
                self._failed("rollup", exc)
                return False
        if all_written:  # a failed chunk keeps the backoff growing and is no success
            self._failures = 0
            self.telemetry.last_success.set(time.time())
        self.pipeline.evict()
        return backlog and all_written

    async def _flush_chunks(self, store: Store, chunks: Sequence[list[Flushable]]) -> bool:
        """Write chunks one transaction after the other; False if any failed (it stays in memory)."""
        all_written = True
        for chunk in chunks:
            # revoked while this flush ran: the new owner writes them
            owned = [item for item in chunk if self.pipeline.owns(item.topic, item.partition)]
            try:
                result = await store.write_partials_of(
                    [(i.partition, i.offset, i.items) for i in owned], queued_by=self.instance
                )
            except StoreError as exc:
                for item in owned:
                    self.pipeline.unflush(item)
                self._failed("flush", exc)
                all_written = False
                continue
            self.telemetry.rows_written.labels("hour").inc(result.inserted + result.updated)
            self.telemetry.errors.labels("flush").inc(result.unmerged)
            self._inserted_since_analyze += result.inserted
            now_ms = time.time() * 1000
            for item in owned:
                self.telemetry.flush_latency.observe(max(0.0, (now_ms - item.closed_at_ms) / 1000))
                self._to_roll_up.update(key for key, _ in item.items)
        return all_written

    async def _roll_up(self, store: Store) -> None:
        """Roll up the days and weeks of the flushed hour keys, then clear this worker's roll-up
        queue (no flush of it runs meanwhile: both hold the flush lock); on failure they stay
        pending."""
        touched, self._to_roll_up = self._to_roll_up, set()
        try:
            self._count_rollups(await rollup_keys(store, touched, helpers=self.rollup_helpers))
            await store.rolled_up(self.instance)
        except BaseException:
            self._to_roll_up |= touched
            raise
        self._last_rollup = time.monotonic()

    async def _roll_up_owed(self, store: Store) -> None:
        """Roll up what other workers or a stopped backfill queued and did not roll up."""
        self._count_rollups(await roll_up_owed(store, exclude=self.instance, helpers=self.rollup_helpers))

    def _count_rollups(self, results: Mapping[str, WriteResult]) -> None:
        for granularity, result in results.items():
            self.telemetry.rows_written.labels(granularity).inc(result.inserted + result.updated)
            self.telemetry.errors.labels("rollup").inc(result.unmerged)

    def _failed(self, stage: str, exc: StreamaggError) -> None:
        """Count a failed stage. The backoff grows once per flush attempt, however many of its
        chunks failed: counted per chunk, one outage of 8 s reached the 60 s ceiling. A stage's
        first failure of an attempt is logged, the others only counted (every chunk in flight
        said the same again)."""
        self.telemetry.errors.labels(stage).inc()
        if not self._failed_stages:
            self._failures += 1
            delay = min(RETRY_MAX_SECONDS, self.settings.flush_interval_seconds * 2 ** (self._failures - 1))
            self._retry_at = time.monotonic() + delay
        if stage not in self._failed_stages:
            self._failed_stages.add(stage)
            log.warning("%s failed (%d in a row; state kept, retried in %.0f s): %s", stage, self._failures,
                        self._retry_at - time.monotonic(), exc)  # fmt: skip

    def log_progress(self) -> None:
        """A line of what the worker did since the last one, for whoever reads its log (a
        catch-up on a backlog otherwise says nothing until it is done)."""
        now = Progress.of(self.telemetry, self.health(), time.monotonic())
        line, self._progress = now.line_since(self._progress), now
        if line is not None:
            log.info("%s", line)

    async def scheduled_rollup(self, now_ms: int) -> None:
        """01:00 UTC: the previous day, and on Mondays the previous week, from stored hours."""
        store = await self.store()
        today = bucket_start_ms(now_ms, "day")
        # In the worker's thread, as the flush's roll-ups were before the helpers: this runs
        # outside the flush lock, and a whole day's lanes in the helpers would hold up the
        # flush's roll-ups (and so the flushes) behind them.
        await rollup(store, "day", today - DAY_MS, today)
        week = bucket_start_ms(now_ms, "week")
        if today == week:
            await rollup(store, "week", week - WEEK_MS, week)

    async def close(self) -> None:
        """At a clean stop: roll up what is pending (else the next worker to start would, from
        the roll-up queue), then close the database pool and stop the roll-up processes."""
        self._closing = True
        async with self._flush_lock:  # let a running flush finish its pass first
            try:
                if self._store is None:
                    return
                if self._to_roll_up:
                    log.info("rolling up the days and weeks of %d flushed hour keys before stopping", len(self._to_roll_up))
                    try:
                        await self._roll_up(self._store)
                    except StoreError as exc:
                        self.telemetry.errors.labels("rollup").inc()
                        log.warning("roll-up at stop failed; the next worker to start does it (roll-up queue): %s", exc)
                await self._store.close()
                self._store = None
            finally:
                await asyncio.to_thread(self.rollup_helpers.close)


def changelog_topic(settings: Settings) -> str:
    """The table's changelog, as Faust names it (build_app checks), known before the app is built."""
    return f"{settings.app_id}-{TABLE_NAME}-changelog"


def build_app(
    settings: Settings, telemetry: Telemetry, datadir: Path, partitions: int | None = None
) -> tuple[faust.App, Runtime]:
    """The Faust app and its runtime; ``partitions``, the most any source topic has, defaults to
    ``STREAMAGG_PARTITIONS`` (what the worker creates them with)."""
    partitions = partitions or settings.partitions
    brokers = [f"kafka://{server.strip()}" for server in settings.kafka_bootstrap.split(",")]
    app = _App(
        settings.app_id,
        env={},  # ignore APP_STORE, BROKER_URL, ...: settings come from streamagg's Settings only
        broker=brokers,
        store="memory://",
        topic_partitions=partitions,
        topic_replication_factor=1,
        table_standby_replicas=0,
        web_enabled=False,
        autodiscover=False,
        datadir=str(datadir),
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        stream_wait_empty=False,
        broker_session_timeout=settings.session_timeout_seconds,
        broker_heartbeat_interval=settings.session_timeout_seconds / 10,
        producer_max_request_size=16 * 1024 * 1024,
        producer_max_batch_size=1024 * 1024,  # checkpoints send thousands of records at once
        # One fetch is processed in one synchronous call: unbounded, a backlog's fetch held up to
        # 100,000 records and held the event loop (heartbeats, timers, commits) for seconds.
        broker_max_poll_records=MAX_BATCH_RECORDS,
        timezone=UTC,
    )
    runtime = Runtime(settings, telemetry, app, partitions)
    assert runtime.table.changelog_topic.get_topic_name() == changelog_topic(settings), "Faust named it otherwise"
    # Subscribed through the Conductor like an agent's topic; consumed by _BatchConsumer.
    sources = app.topic(
        *source_topics(settings),
        key_type=bytes,
        key_serializer="raw",
        value_type=bytes,
        value_serializer="raw",
        partitions=partitions,
        acks=False,
    )

    app.topics.add(sources)
    app.batch_topics = frozenset(sources.topics)
    app.batch_handler = runtime.consume

    @app.timer(settings.flush_interval_seconds, name="flush")
    async def flush() -> None:
        await runtime.flush()

    @app.timer(1.0, name="checkpoint")
    async def checkpoint() -> None:
        await runtime.checkpoint_if_due()  # also when the stream is idle

    @app.timer(PROGRESS_SECONDS, name="progress")
    async def progress() -> None:
        runtime.log_progress()

    @app.crontab("5 * * * *", timezone=UTC)
    async def close_idle_hours() -> None:
        await runtime.flush()

    @app.crontab("0 1 * * *", timezone=UTC, on_leader=True)
    async def daily_rollup() -> None:
        await runtime.scheduled_rollup(int(time.time() * 1000))

    @runtime.table.on_recover
    async def recovered() -> None:
        try:
            await runtime.on_recovered()
        except Exception:  # Faust swallows a failed recovery callback
            runtime._stop_on_bug("rebuilding the state after a rebalance")

    @app.on_partitions_revoked.connect
    async def revoked(sender: Any, revoked: set[TP], **kwargs: Any) -> None:
        runtime.on_revoked(revoked)

    async def stop_checkpoint() -> bool:
        """The consumer is gone: no commit, only less replay (and fewer rewrites) for the next owner."""
        if runtime.failed:
            log.warning("not checkpointing at stop after a failure; the next owner of the partitions replays from "
                        "the last commit")  # fmt: skip
            return False
        try:
            await asyncio.wait_for(runtime.checkpoint(commit=False), STOP_CHECKPOINT_SECONDS)
            return True
        except TimeoutError:
            log.warning("the checkpoint at stop was not acknowledged in %.0f s (is Kafka reachable?); the next "
                        "owner of the partitions replays from the last commit instead", STOP_CHECKPOINT_SECONDS)  # fmt: skip
            return False
        except Exception as exc:  # a record or dead letter refused: the stop goes on all the same
            log.warning("the checkpoint at stop failed (%s: %s); the next owner of the partitions replays from the "
                        "last commit instead", type(exc).__name__, exc)  # fmt: skip
            return False

    @app.on_before_shutdown.connect
    async def before_shutdown(sender: Any, **kwargs: Any) -> None:
        acknowledged = False
        try:
            acknowledged = await stop_checkpoint()
        finally:
            await runtime.close()  # lets a running flush pass finish
        if acknowledged:  # once more: the hours that pass wrote are stored, which the next owner then knows
            await stop_checkpoint()

    return app, runtime


class _StopLimit:
    """Exits the process STOP_LIMIT_SECONDS after the worker began to stop, if it has not."""

    def __init__(self, datadir: Path) -> None:
        self._datadir = datadir
        self._timer = threading.Timer(STOP_LIMIT_SECONDS, self._exit)
        self._timer.daemon = True
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()

    def _exit(self) -> None:
        log.error("the worker did not stop within %.0f s (is Kafka reachable?): exiting without a clean stop; "
                  "the next owner of its partitions replays from the last commit", STOP_LIMIT_SECONDS)  # fmt: skip
        shutil.rmtree(self._datadir, ignore_errors=True)
        logging.shutdown()
        os._exit(1)


class _Worker(faust.Worker):
    """Faust's worker, its stop on SIGINT/SIGTERM limited in time (:class:`_StopLimit`), and
    streamagg's own log lines kept after mode sets up logging (:func:`keep_own_lines`)."""

    stop_limit: _StopLimit
    start_error: KafkaError | None = None

    async def start(self) -> None:
        """A Kafka error while the worker starts (seen: the broker lost after the topics were made
        and before Faust's clients connected) is kept for :func:`run_worker` to report in one
        line, as a broker unreachable from the start is (mode logged it with a 30-line
        traceback); the worker then stops. Errors after the start go through mode's crash."""
        try:
            await super().start()
        except KafkaError as exc:
            self.start_error = exc

    def _schedule_shutdown(self, signal: signal.Signals) -> None:  # mode's handler of both signals
        self.stop_limit.start()
        super()._schedule_shutdown(signal)

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        super().on_setup_root_logger(logger, level)
        keep_own_lines(logger)


def run_worker(settings: Settings, verbose: int = 0) -> None:
    """`streamagg worker`: runs until SIGINT/SIGTERM; raises SystemExit with the exit status."""
    # Topics created before (by a producer, or with another STREAMAGG_PARTITIONS) keep their counts.
    counts = ensure_topics(settings, changelog=changelog_topic(settings))
    partitions = max(counts[topic] for topic in source_topics(settings))
    registry = CollectorRegistry()
    telemetry = Telemetry(registry)
    server, _ = serve(registry, settings.metrics_host, settings.metrics_port)  # a port in use: stop here
    # Faust insists on a data directory even with in-memory tables: a private throwaway one.
    datadir = Path(tempfile.mkdtemp(prefix=f"streamagg-faust-{settings.app_id}-"))
    stop_limit = _StopLimit(datadir)
    runtime = None
    try:
        app, runtime = build_app(settings, telemetry, datadir, partitions)
        runtime.rollup_helpers.start()  # their imports overlap the recovery, not the first reads

        @app.on_before_shutdown.connect
        async def limit_the_stop(sender: Any, **kwargs: Any) -> None:
            stop_limit.start()  # a stop that no signal began (a failed batch)

        collect_less_often()
        telemetry.watch(runtime.health)
        count_client_errors(telemetry.errors.labels("kafka").inc)
        log.info(
            "worker %s: kafka %s, database %s, metrics http://%s:%d/metrics",
            settings.app_id, settings.kafka_bootstrap, settings.redacted_dsn(), settings.metrics_host, server.server_port,
        )  # fmt: skip
        worker = _Worker(app, loglevel="DEBUG" if verbose >= 2 else "WARNING", quiet=True)
        worker.stop_limit = stop_limit
        worker.spinner = None  # Faust's terminal spinner wrote escape codes to stdout, which carries results only
        try:
            worker.execute_from_commandline()
        except SystemExit as exit_:
            if worker.start_error is not None:
                raise TopicError(
                    f"kafka at {settings.kafka_bootstrap} failed while the worker started: {worker.start_error}"
                ) from None
            if runtime.failed and not exit_.code:
                raise SystemExit(1) from None
            raise
    finally:
        if runtime is not None:
            runtime.rollup_helpers.close()  # a stop that did not reach Runtime.close
        count_client_errors(None)
        stop_limit.cancel()
        server.shutdown()
        shutil.rmtree(datadir, ignore_errors=True)

