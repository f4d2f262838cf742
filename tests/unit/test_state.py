"""Partition state: checkpoints survive a crash at any point without loss or double count."""

from __future__ import annotations

import json
import random

import pytest

from streamagg.aggregate import AggregateState
from streamagg.buckets import HOUR_MS
from streamagg.errors import StateError
from streamagg.state import (
    MEMORY_REFRESH_MS,
    MEMORY_SAMPLE,
    BACKLOG_IDLE_SHARE,
    STALLED_IDLE_FACTOR,
    Checkpoint,
    PartitionState,
    decode_key,
    encode_key,
)
from tests.unit.test_aggregate import START_MS, kinds, make_events, stats

LATENESS_MS = 48 * HOUR_MS


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def new_state(clock: Clock | None = None) -> PartitionState:
    return PartitionState("telemetry.traces", 3, kinds(), 10_000, clock or Clock(START_MS))


def changelog_view(log: list[tuple[bytes, bytes | None]]) -> list:
    """What a compacted changelog restores: the last value per key, tombstones removed."""
    latest: dict[bytes, bytes | None] = {}
    for key, value in log:
        latest[key] = value
    return [(decode_key(key)[2], value) for key, value in latest.items() if value is not None]


def sent(state: PartitionState) -> list[tuple[bytes, bytes | None]]:
    """A checkpoint that landed whole, in the order the runtime sends it."""
    records = state.checkpoint_records().in_order()
    state.checkpoint_sent()
    return records


def cut_short(checkpoint: Checkpoint, rng: random.Random) -> list[tuple[bytes, bytes | None]]:
    """What may have landed of a checkpoint that failed or crashed: any of its values, its meta
    record only once every value did, any of its tombstones only once the meta record did (the
    runtime awaits each step before it sends the next)."""
    values = [record for record in checkpoint.values if rng.random() < 0.7]
    if len(values) < len(checkpoint.values) or rng.random() < 0.5:
        return values
    return [*values, checkpoint.meta, *[record for record in checkpoint.tombstones if rng.random() < 0.7]]


def resumed(log: list[tuple[bytes, bytes | None]], batch: list, committed: int) -> PartitionState:
    """A restart: the changelog recovered, the events read again from the committed offset on."""
    state = new_state()
    state.restore(changelog_view(log))
    for start in range(committed + 1, len(batch), 37):
        state.ingest(batch[start : start + 37], LATENESS_MS)
    return state


def committed_run(events: list, committed: int, read: int) -> tuple[list, PartitionState, list]:
    """The events as offsets, a state that checkpointed (and committed) the first ``committed``
    of them and then read up to ``read``, and the changelog so far."""
    batch = list(enumerate(events))
    state = new_state()
    state.ingest(batch[:committed], LATENESS_MS)
    log = sent(state)
    state.ingest(batch[committed:read], LATENESS_MS)
    return batch, state, log


def final_stats(state: PartitionState) -> dict:
    return {row.key: stats(row) for row in state.aggregates.rows()}


def reference(events) -> dict:
    agg = AggregateState(kinds(), 10_000)
    agg.ingest(events)
    return {row.key: stats(row) for row in agg.rows()}


@pytest.mark.parametrize("seed", range(40))
def test_crash_anywhere_neither_loses_nor_doubles(seed: int) -> None:
    rng = random.Random(seed)
    events = make_events(hours=2, per_hour=400, seed=seed + 30)
    batch = [(offset, event) for offset, event in enumerate(events)]
    log: list[tuple[bytes, bytes | None]] = []
    committed = -1  # the consumer's committed offset: only ever up to a completed checkpoint
    state = new_state()
    position = 0
    crash_at = rng.randrange(200, len(batch) - 50)
    while position < crash_at:
        step = rng.randrange(1, 60)
        state.ingest(batch[position : position + step], LATENESS_MS)
        position = min(position + step, crash_at)
        if rng.random() < 0.4:
            if position >= crash_at - 60 and rng.random() < 0.5:
                log.extend(cut_short(state.checkpoint_records(), rng))  # crash while sending it
                break
            log.extend(sent(state))
            committed = state.offset  # acked after the checkpoint completed
    assert final_stats(resumed(log, batch, committed)) == reference(events)


def test_a_restore_reads_each_key_when_first_used_and_a_corrupt_one_fails_then() -> None:
    events = make_events(hours=2, per_hour=400, seed=12)
    first = new_state()
    first.ingest(list(enumerate(events[:600])), LATENESS_MS)
    log = sent(first)
    restored = new_state()
    restored.restore(changelog_view(log))
    assert all(type(held) is bytes for held in restored.aggregates.held())  # nothing decoded yet
    restored.ingest(list(enumerate(events))[600:], LATENESS_MS)
    assert final_stats(restored) == reference(events)

    key, value = next((key, value) for key, value in changelog_view(log) if key is not None)
    corrupt = new_state()
    corrupt.restore([(key, value[:-3])])  # restored: its bytes are not read yet
    with pytest.raises(StateError):
        corrupt.aggregates[key]


def test_checkpoint_keys_are_the_bytes_json_dumps_writes() -> None:
    """The changelog compacts by key bytes: an encoding that drifted from the one before would
    keep a key's old record beside its new one, and a restore would merge both."""
    rng = random.Random(3)
    alphabet = ['"', "\\", "/", "\n", "\t", "\x00", "\x1f", "\x7f", "é", "日", "\U0001f600", "\ud800", "a", " ", "null"]
    texts = [None, "", "user-1", "__overflow__"] + ["".join(rng.choices(alphabet, k=rng.randrange(1, 12))) for _ in range(300)]
    for i, value in enumerate(texts):
        dimension_type = None if value is None else rng.choice(["user_id", "kb_id", value])
        key = (START_MS + (i - 150) * HOUR_MS, rng.choice(["trace.count", value or "m"]), dimension_type, value)
        for topic, partition in (("telemetry.traces", 0), (value or "t", 2**31 - 1)):
            expected = json.dumps([topic, partition, *key], separators=(",", ":")).encode()
            assert encode_key(topic, partition, key) == expected, key
            assert decode_key(expected) == (topic, partition, key)


def test_redelivered_events_are_ignored() -> None:
    events = make_events(hours=1, per_hour=100, seed=5)
    batch = list(enumerate(events))
    state = new_state()
    state.ingest(batch[:60], LATENESS_MS)
    state.ingest(batch[40:], LATENESS_MS)  # overlap: 40..59 again
    assert final_stats(state) == reference(events)


def test_too_late_is_measured_against_the_watermark() -> None:
    events = make_events(hours=1, per_hour=20, seed=6)
    state = new_state(Clock(START_MS + 1000 * HOUR_MS))  # the wall clock is far ahead: irrelevant
    state.ingest(list(enumerate(events)), max_lateness_ms=HOUR_MS)
    old = events[0].__class__(events[0].kind, events[-1].time_ms - HOUR_MS - 1, events[0].fields)
    ok = events[0].__class__(events[0].kind, events[-1].time_ms - HOUR_MS + 1, events[0].fields)
    result = state.ingest([(100, old), (101, ok)], max_lateness_ms=HOUR_MS)
    assert result.too_late == [0] and result.applied == 1


def test_hours_close_on_watermark_or_when_idle() -> None:
    clock = Clock(START_MS)
    events = make_events(hours=2, per_hour=50, seed=7)
    first_hour = [e for e in events if e.time_ms < START_MS + HOUR_MS]
    state = new_state(clock)
    state.ingest(list(enumerate(first_hour)), LATENESS_MS)
    grace = 300_000
    assert state.take_flushable(grace, idle_ms=60_000) == []  # watermark inside the hour
    later = [e for e in events if e.time_ms >= START_MS + HOUR_MS + grace]
    state.ingest([(1000 + i, e) for i, e in enumerate(later)], LATENESS_MS)
    flushable = state.take_flushable(grace, idle_ms=60_000)
    assert flushable and {key[0] for key, _ in flushable} == {START_MS}
    assert state.take_flushable(grace, idle_ms=60_000) == []  # flushed keys are clean
    # an idle partition closes the second hour on the wall clock
    clock.now = START_MS + 2 * HOUR_MS + grace + 120_000
    assert {key[0] for key, _ in state.take_flushable(grace, idle_ms=60_000)} == {START_MS + HOUR_MS}


def test_a_fresh_partition_has_closed_nothing() -> None:
    """Its first batch of a backlog's old events counted as late events: with no watermark the
    wall clock said every past hour was closed."""
    state = new_state(Clock(START_MS + 30 * 24 * HOUR_MS))
    assert state.closed_hours_before(300_000, 60_000) < START_MS - 100 * 365 * 24 * HOUR_MS


def test_a_partition_with_records_left_to_read_is_not_idle() -> None:
    grace, idle = 300_000, 60_000
    clock = Clock(START_MS + HOUR_MS + grace)  # a backlog: the wall clock passed the hour already
    events = [e for e in make_events(hours=1, per_hour=50, seed=9) if e.time_ms < START_MS + HOUR_MS]
    state = new_state(clock)
    state.ingest(list(enumerate(events)), LATENESS_MS)  # offsets 0..49
    clock.now += idle  # quiet for the idle time
    assert state.unread is None  # no log end seen yet
    state.end_offset = len(events) + 10  # but ten records wait unread (a backlog's slow fetch)
    assert state.unread == 10
    assert state.take_flushable(grace, idle_ms=idle) == []
    clock.now += (STALLED_IDLE_FACTOR - 1) * idle  # quiet that long, the records count as absent
    assert {key[0] for key, _ in state.take_flushable(grace, idle_ms=idle)} == {START_MS}
    state.ingest([(len(events), events[0])], LATENESS_MS)  # (one more event of the hour)
    state.end_offset = len(events) + 1  # read to the end
    assert state.unread == 0
    assert state.take_flushable(grace, idle_ms=idle) == []  # just read: not idle yet
    clock.now += idle
    assert {key[0] for key, _ in state.take_flushable(grace, idle_ms=idle)} == {START_MS}


def test_a_backlog_read_to_its_end_is_idle_sooner_than_a_live_partition() -> None:
    """Read to its end, a partition whose newest event is at least the idle time old on the wall
    clock (a backlog) is idle after a share of the idle time without events; one whose newest
    event is recent (a live producer) only after the whole idle time."""
    grace, idle = 300_000, 60_000
    events = [e for e in make_events(hours=1, per_hour=50, seed=9) if e.time_ms < START_MS + HOUR_MS]
    clock = Clock(START_MS + 2 * HOUR_MS)  # a backlog: its hour ended an hour ago
    backlog = new_state(clock)
    backlog.ingest(list(enumerate(events)), LATENESS_MS)
    backlog.end_offset = len(events)
    assert backlog.unread == 0
    assert backlog.take_flushable(grace, idle_ms=idle) == []  # just read
    clock.now += idle // BACKLOG_IDLE_SHARE - 1
    assert backlog.take_flushable(grace, idle_ms=idle) == []
    clock.now += 1
    assert {key[0] for key, _ in backlog.take_flushable(grace, idle_ms=idle)} == {START_MS}

    # Live: the newest event (of the next hour) 25 s old when read; the first hour's end plus the
    # grace passed on the wall clock, not in the watermark.
    newest = START_MS + HOUR_MS + grace - 20_000
    next_hour = events[0].__class__(events[0].kind, newest, events[0].fields)
    clock = Clock(newest + 25_000)
    live = new_state(clock)
    live.ingest([*enumerate(events), (len(events), next_hour)], LATENESS_MS)
    live.end_offset = len(events) + 1
    clock.now += idle // BACKLOG_IDLE_SHARE
    assert live.unread == 0 and clock.now > START_MS + HOUR_MS + grace
    assert live.take_flushable(grace, idle_ms=idle) == []  # its newest event is 40 s old
    clock.now += idle - idle // BACKLOG_IDLE_SHARE
    assert {key[0] for key, _ in live.take_flushable(grace, idle_ms=idle)} == {START_MS}


def test_settled_means_read_to_the_end_with_everything_written() -> None:
    grace, idle = 300_000, 60_000
    clock = Clock(START_MS + 2 * HOUR_MS + grace)  # a backlog: the wall clock passed both hours
    events = make_events(hours=2, per_hour=50, seed=4)
    state = new_state(clock)
    assert not state.settled  # no log end seen yet
    state.ingest(list(enumerate(events)), LATENESS_MS)
    state.end_offset = len(events)
    assert state.unread == 0 and not state.settled  # read to the end, nothing written
    assert {key[0] for key, _ in state.take_flushable(grace, idle_ms=idle)} == {START_MS}  # the watermark closed it
    assert not state.settled  # the last hour waits until idle
    clock.now += idle
    assert {key[0] for key, _ in state.take_flushable(grace, idle_ms=idle)} == {START_MS + HOUR_MS}
    assert state.settled
    state.end_offset = len(events) + 1  # a record more to read
    assert not state.settled
    state.ingest([(len(events), events[-1])], LATENESS_MS)
    state.end_offset = len(events) + 1
    assert state.unread == 0 and not state.settled  # read, but its hour not written again


def test_the_memory_gauge_samples_and_refreshes() -> None:
    clock = Clock(START_MS)
    state = new_state(clock)
    assert state.estimated_bytes() == 0  # scraped before the first event
    state.ingest(list(enumerate(make_events(hours=1, per_hour=3_000, seed=10))), LATENESS_MS)
    aggs = list(state.aggregates.held())
    assert len(aggs) > 2 * MEMORY_SAMPLE  # the gauge samples
    every = sum(200 + (a.sketch.memory_bytes if a.sketch is not None else 0) for a in aggs)
    estimate = state.estimated_bytes()  # at once, not 0 until MEMORY_REFRESH_MS passed
    assert 0.8 * every <= estimate <= 1.25 * every
    per_key = estimate / len(aggs)
    state.ingest([(10**6 + i, e) for i, e in enumerate(make_events(hours=1, per_hour=3_000, seed=11))], LATENESS_MS)
    keys = len(state.aggregates)
    assert keys > len(aggs)
    assert abs(state.estimated_bytes() - per_key * keys) <= 1  # the sampled average, times the keys held now
    clock.now += MEMORY_REFRESH_MS
    every = sum(200 + (a.sketch.memory_bytes if a.sketch is not None else 0) for a in state.aggregates.held())
    assert 0.8 * every <= state.estimated_bytes() <= 1.25 * every  # sampled again


def test_eviction_tombstones_old_hours() -> None:
    events = make_events(hours=3, per_hour=30, seed=8)
    state = new_state()
    state.ingest(list(enumerate(events)), LATENESS_MS)
    state.take_flushable(0, idle_ms=0)
    checkpoint = state.checkpoint_records()
    assert state.evict(max_lateness_ms=HOUR_MS, grace_ms=0) == 0  # its last values are not acknowledged yet
    state.checkpoint_sent()
    gone = state.evict(max_lateness_ms=HOUR_MS, grace_ms=0)
    assert gone > 0
    checkpoint = state.checkpoint_records()
    assert [value for _, value in checkpoint.tombstones] == [None] * gone and not checkpoint.values
    assert checkpoint.in_order()[-gone:] == checkpoint.tombstones  # after the meta record
    assert min(state.aggregates.hours()) > START_MS


# -- admission: the state never passes an offset it has not seen --------------------------------
def test_admit_takes_consecutive_offsets_and_drops_redeliveries() -> None:
    state = new_state()
    assert state.admit([5, 6, 7]).taken == [0, 1, 2]  # a fresh partition starts where the log does
    assert state.admit([6, 7, 8, 9]).taken == [2, 3]  # 6 and 7 were seen: dropped
    assert state.position == 10


def test_admit_stops_at_a_gap_and_asks_to_read_again() -> None:
    clock = Clock(START_MS)
    state = new_state(clock)
    state.admit([0, 1, 2])
    admission = state.admit([3, 5, 6])
    assert admission.taken == [0] and admission.seek == 4  # 4 never arrived: not passed
    clock.now += 100
    assert state.admit([7, 8]).taken == [] and state.admit([7]).seek is None  # stale prefetches while the seek is under way
    assert state.admit([4, 5, 6, 7]).taken == [0, 1, 2, 3]  # the re-read fills the gap
    assert state.position == 8


def test_admit_accepts_a_real_hole_after_repeated_reads() -> None:
    clock = Clock(START_MS)
    state = new_state(clock)
    state.admit([0])
    seeks = []
    for _ in range(10):
        admission = state.admit([2, 3])
        if admission.taken:
            break
        seeks.append(admission.seek)
        clock.now += 2500
    assert seeks == [1, 1, 1]  # three re-reads of offset 1, then offsets 2.. go on
    assert admission.taken == [0, 1] and state.position == 4


def test_admit_after_restore_replays_from_the_committed_offset_but_not_past_a_gap() -> None:
    state = new_state()
    state.offset = 99  # restored: the checkpoint covers up to offset 99
    assert state.admit([80, 81]).taken == [0, 1]  # the committed offset was 80: replay
    restored = new_state()
    restored.offset = 99
    assert restored.admit([105]).seek == 100  # a prefetched message from beyond: read from 100


def test_a_fresh_partition_told_where_the_log_starts_reads_from_there() -> None:
    state = new_state()
    state.expect(3)
    assert state.admit([7, 8]).seek == 3  # offsets 3..6 were skipped by the consumer
    assert state.admit([3, 4]).taken == [0, 1]
    restored = new_state()
    restored.offset = 99
    restored.expect(0)  # a restored partition goes by its checkpoint, not by the log start
    assert restored.admit([100]).taken == [0]


def write(db: dict, state: PartitionState, items: list) -> None:
    """A flush transaction as the store runs it: each partial, labelled with the offset it
    includes (``flush_label``), overwritten unless the stored one includes more."""
    for key, agg in items:
        label = state.flush_label(key)
        if db.get(key, (-1, None))[0] <= label:
            db[key] = (label, stats(agg.to_row(key, "hour")))


def accepted(events: list, max_lateness_ms: int) -> list:
    """The events one uninterrupted run applies: the rest are too late for the watermark of
    the events before them, in offset order."""
    out, watermark = [], None
    for event in events:
        if watermark is not None and event.time_ms < watermark - max_lateness_ms:
            continue
        watermark = event.time_ms if watermark is None else max(watermark, event.time_ms)
        out.append(event)
    return out


@pytest.mark.parametrize("seed", range(60))
def test_repeated_crashes_stops_and_failed_writes_lose_nothing_and_double_nothing(seed: int) -> None:
    """Several incarnations in a row, each restored from the changelog and resumed at the
    committed offset; each ingests (events up to 70 minutes out of order, one hour of
    lateness: some are too late), flushes (transactions failing at random), evicts hours past
    the lateness, checkpoints (also in the middle of its replay; a checkpoint may fail, partly
    landed, and the incarnation goes on) and crashes at a random point, possibly while a
    checkpoint is sent, or stops in the middle of a flush pass; the last one runs to the end.
    The database (a model of the partials' fence) must end equal to the aggregate of every
    event one uninterrupted run applies, key by key, and so must every key the state holds."""
    rng = random.Random(5000 + seed)
    lateness = HOUR_MS
    events = sorted(make_events(hours=5, per_hour=150, seed=seed + 7), key=lambda e: e.time_ms + rng.randrange(0, 70 * 60_000))
    batch = list(enumerate(events))
    expected = reference(accepted(events, lateness))
    log: list[tuple[bytes, bytes | None]] = []
    db: dict = {}
    committed = -1
    for incarnation in range(6):
        clock = Clock(START_MS)
        state = new_state(clock)
        state.restore(changelog_view(log))
        position = committed + 1
        last = incarnation == 5
        crash_at = len(batch) if last else min(len(batch), position + rng.randrange(1, 300))
        while position < crash_at:
            step = rng.randrange(1, 40)
            state.ingest(batch[position : min(position + step, crash_at)], lateness)
            position = min(position + step, crash_at)
            if rng.random() < 0.3:  # a flush pass: the watermark closes hours (no grace)
                items = state.take_flushable(0, idle_ms=10 * HOUR_MS)
                stopping = not last and rng.random() < 0.1
                while items and not (stopping and rng.random() < 0.5):
                    cut = rng.randrange(1, len(items) + 1)
                    chunk, items = items[:cut], items[cut:]
                    if rng.random() < 0.2:
                        state.unflush(key for key, _ in chunk)  # the transaction failed
                    else:
                        write(db, state, chunk)
                if stopping:  # SIGTERM cancelled the pass: the rest is neither written nor given
                    log.extend(sent(state))  # back; the stop checkpoints, no commit
                    break
                state.confirm_written()
                state.evict(lateness, 0)
            if rng.random() < 0.4:
                if not last and rng.random() < 0.25:
                    log.extend(cut_short(state.checkpoint_records(), rng))  # crash while sending it
                    break
                if rng.random() < 0.1:  # the send failed, part of it landed: no commit, go on
                    log.extend(cut_short(state.checkpoint_records(), rng))
                    state.checkpoint_failed()
                    continue
                log.extend(sent(state))
                committed = state.offset
    # the last incarnation read everything: once idle, every hour it holds closes and is written
    clock.now = max(e.time_ms for e in events) + 2 * HOUR_MS
    state.end_offset = len(batch)
    write(db, state, state.take_flushable(0, idle_ms=60_000))
    held = final_stats(state)
    assert held == {key: expected[key] for key in held}
    assert {key: value for key, (_, value) in db.items()} == expected


def test_a_restored_key_from_a_checkpoint_cut_short_is_labelled_with_what_it_includes() -> None:
    """A key checkpointed further on than the meta record that landed (a checkpoint cut short
    after its values) is written during the replay before the replay reaches that offset:
    labelled with the state's offset, the stored partial of the worker before it (labelled
    higher, an event short) fenced it off, and the key, which the replay no longer changes,
    was short for good."""
    early = [e for e in make_events(hours=1, per_hour=40, seed=5) if e.time_ms < START_MS + 30 * 60_000]
    trace = next(e for e in early if e.kind == "traces")
    n = len(early)
    closer = trace.__class__(trace.kind, START_MS + 2 * HOUR_MS, dict(trace.fields))  # closes the hour
    late = [trace.__class__(trace.kind, START_MS + minute * 60_000, dict(trace.fields)) for minute in (40, 41)]
    batch = list(enumerate([*early, closer, *late]))
    db: dict = {}
    first = new_state()
    first.ingest(batch[:n], LATENESS_MS)
    log = sent(first)  # committed up to n - 1
    first.ingest(batch[n : n + 2], LATENESS_MS)
    write(db, first, first.take_flushable(0, idle_ms=10 * HOUR_MS))  # includes n + 1
    first.confirm_written()
    first.ingest(batch[n + 2 :], LATENESS_MS)  # a late event of the written hour
    log.extend(first.checkpoint_records().values)  # crash: the values landed, the meta did not

    second = new_state()
    second.restore(changelog_view(log))
    second.ingest(batch[n : n + 1], LATENESS_MS)  # the replay closes the hour
    write(db, second, second.take_flushable(0, idle_ms=10 * HOUR_MS))
    second.confirm_written()
    second.ingest(batch[n + 1 :], LATENESS_MS)
    write(db, second, second.take_flushable(0, idle_ms=10 * HOUR_MS))
    want = reference([event for _, event in batch])
    assert {key: value for key, (_, value) in db.items() if key[0] == START_MS} == {
        key: value for key, value in want.items() if key[0] == START_MS
    }


def test_tombstones_land_only_after_the_meta_record_that_let_their_hour_go() -> None:
    """A checkpoint that evicts an hour, cut short: its tombstones never land without its meta
    record. (Sent before it, they landed alone; the restore from the older meta record let a
    replayed event of that hour rebuild a key from scratch, written over its complete partial.)"""
    early = [e for e in make_events(hours=1, per_hour=50, seed=1) if e.time_ms < START_MS + 50 * 60_000]
    state = new_state()
    state.ingest(list(enumerate(early)), HOUR_MS)
    log = sent(state)
    trace = next(e for e in early if e.kind == "traces")
    late = trace.__class__(trace.kind, START_MS + 10 * 60_000, dict(trace.fields))  # on time
    later = make_events(hours=1, per_hour=20, seed=2, start_ms=START_MS + 3 * HOUR_MS)
    rest = list(enumerate([late, *later], start=len(early)))
    state.ingest(rest, HOUR_MS)
    db: dict = {}
    write(db, state, state.take_flushable(0, idle_ms=10 * HOUR_MS))
    state.confirm_written()
    log.extend(sent(state))  # the late event's keys, acknowledged: the hour may go now
    assert state.evict(HOUR_MS, 0) > 0
    checkpoint = state.checkpoint_records()
    assert checkpoint.tombstones and checkpoint.in_order().index(checkpoint.meta) < len(checkpoint.in_order()) - len(checkpoint.tombstones)
    stored = dict(db)
    for landed in range(len(checkpoint.in_order())):  # a crash after any record
        view = changelog_view(log + checkpoint.in_order()[:landed])
        restored = new_state()
        restored.restore(view)
        replay = [(offset, event) for offset, event in rest if offset > restored.offset]
        restored.ingest(replay, HOUR_MS)
        db = dict(stored)
        write(db, restored, restored.take_flushable(0, idle_ms=10 * HOUR_MS))
        assert db == stored, landed


def test_an_hour_goes_only_once_its_last_change_is_checkpointed() -> None:
    """A late event changes a written hour, more events push the watermark past its lateness,
    and the hour is written again: it is evicted only after a checkpoint carried that change.
    (Evicted at once, its tombstone was the only record of the change: a restore from the meta
    record of a checkpoint whose tombstones did not land wrote the older value over the row.)"""
    early = [e for e in make_events(hours=1, per_hour=50, seed=1) if e.time_ms < START_MS + 50 * 60_000]
    state = new_state()
    state.ingest(list(enumerate(early)), HOUR_MS)
    db: dict = {}
    write(db, state, state.take_flushable(0, idle_ms=0))
    state.confirm_written()
    log = sent(state)
    trace = next(e for e in early if e.kind == "traces")
    late = trace.__class__(trace.kind, START_MS + 10 * 60_000, dict(trace.fields))
    later = make_events(hours=1, per_hour=20, seed=2, start_ms=START_MS + 3 * HOUR_MS)
    rest = list(enumerate([late, *later], start=len(early)))
    state.ingest(rest, HOUR_MS)  # the late event, then the watermark three hours on
    write(db, state, state.take_flushable(0, idle_ms=10 * HOUR_MS))
    state.confirm_written()
    state.evict(HOUR_MS, 0)  # the change is not in the changelog yet: nothing goes
    checkpoint = state.checkpoint_records()
    log.extend([*checkpoint.values, checkpoint.meta])  # a crash before anything more
    restored = new_state()
    restored.restore(changelog_view(log))
    stored = dict(db)
    write(db, restored, restored.take_flushable(0, idle_ms=10 * HOUR_MS))
    assert db == stored
    assert final_stats(restored) == reference([*early, late, *later])


def test_a_key_older_than_the_meta_record_gets_the_replay_up_to_the_furthest_key() -> None:
    """A revoked owner's checkpoint lands after the next owner restored (its values, then its
    meta record); the next owner writes some of those keys again, from earlier in its replay,
    and dies before its meta record. The third owner's keys are then of two ages under one
    meta record: its replay runs per key up to the furthest key's offset, not to the meta
    record's first batch."""
    events = make_events(hours=1, per_hour=300, seed=11)
    batch, first, log = committed_run(events, 100, 250)
    committed = 99
    late = first.checkpoint_records()  # under way when the partition is revoked
    second = new_state()
    second.restore(changelog_view(log))
    log.extend([*late.values, late.meta])  # lands after the second owner read the table
    second.ingest(batch[committed + 1 : 180], LATENESS_MS)
    log.extend(second.checkpoint_records().values)  # its values land; it dies before its meta record
    third = resumed(log, batch, committed)
    assert final_stats(third) == reference(events)


def test_a_failed_checkpoint_sends_its_keys_again_with_the_next() -> None:
    """A checkpoint whose records did not all land gives its keys back: the stop's checkpoint
    that follows writes them with its meta record. (Dropped, the meta record claimed an offset
    their changes were not in, and the next owner's replay skipped them.)"""
    events = make_events(hours=2, per_hour=200, seed=21)
    batch, state, log = committed_run(events, 150, 300)
    state.checkpoint_records()  # nothing of it landed
    state.checkpoint_failed()
    log.extend(sent(state))  # the stop's checkpoint (no commit)
    assert final_stats(resumed(log, batch, 149)) == reference(events)


def test_a_replay_up_to_the_meta_record_dead_letters_nothing_it_counted() -> None:
    """Events between the committed offset and a meta record that landed (a stop's checkpoints,
    which commit nothing; the flush pass under way at the stop wrote and evicted their hour)
    meet the restored watermark, later than the one they met: too late for it, they were
    counted (or, refused then, dead-lettered before that meta record went), and are not
    dead-lettered again, though their keys went with the hour."""
    early = [e for e in make_events(hours=1, per_hour=30, seed=3) if e.time_ms < START_MS + 30 * 60_000]
    later = make_events(hours=1, per_hour=30, seed=4, start_ms=START_MS + 3 * HOUR_MS)
    batch = list(enumerate(early + later))
    state = new_state()
    state.ingest(batch[:5], HOUR_MS)
    log = sent(state)
    committed = state.offset
    assert state.ingest(batch[5:], HOUR_MS).too_late == []  # every event on time, and counted
    items = state.take_flushable(0, idle_ms=10 * HOUR_MS)  # the pass under way at SIGTERM
    log.extend(sent(state))  # the stop's first checkpoint
    write({}, state, items)
    state.confirm_written()
    assert state.evict(HOUR_MS, 0) > 0  # the end of the pass
    log.extend(sent(state))  # the stop's second checkpoint: the tombstones
    restored = new_state()
    restored.restore(changelog_view(log))
    assert restored.ingest(batch[committed + 1 :], HOUR_MS).too_late == []
    held, expected = final_stats(restored), reference([event for _, event in batch])
    assert held == {key: expected[key] for key in held}


def test_hours_written_and_checkpointed_are_not_written_again_after_a_restore() -> None:
    events = make_events(hours=2, per_hour=200, seed=3)
    state = new_state()
    state.ingest(list(enumerate(events)), LATENESS_MS)  # the first hour closed on the watermark
    first = state.take_flushable(0, idle_ms=10 * HOUR_MS)
    assert first and {key[0] for key, _ in first} == {START_MS}
    state.confirm_written()
    log = sent(state)
    restored = new_state()
    restored.restore(changelog_view(log))
    assert restored.take_flushable(0, idle_ms=10 * HOUR_MS) == []  # the first hour is stored
    restored.ingest([(len(events), make_events(hours=1, per_hour=1, seed=4, start_ms=START_MS + 2 * HOUR_MS)[0])], LATENESS_MS)
    assert {key[0] for key, _ in restored.take_flushable(0, idle_ms=10 * HOUR_MS)} == {START_MS + HOUR_MS}  # never written


def test_a_failed_write_or_an_unconfirmed_pass_is_written_again_after_a_restore() -> None:
    events = make_events(hours=2, per_hour=200, seed=3)
    for failed in (True, False):
        state = new_state()
        state.ingest(list(enumerate(events)), LATENESS_MS)
        items = state.take_flushable(0, idle_ms=10 * HOUR_MS)
        if failed:  # one of the pass's transactions failed: the hour is not known to be stored
            state.unflush([items[0][0]])
            state.confirm_written()
        log = sent(state)  # unconfirmed: the pass may still be writing
        restored = new_state()
        restored.restore(changelog_view(log))
        assert len(restored.take_flushable(0, idle_ms=10 * HOUR_MS)) == len(items)


def test_a_meta_record_of_version_1_restores_and_writes_every_key_again() -> None:
    events = make_events(hours=2, per_hour=200, seed=3)
    state = new_state()
    state.ingest(list(enumerate(events)), LATENESS_MS)
    items = state.take_flushable(0, idle_ms=10 * HOUR_MS)
    state.confirm_written()
    log = sent(state)
    key, meta = log[-1]
    assert key.endswith(b'"meta"]') and meta[0] == 2
    log[-1] = (key, bytes([1]) + meta[1:17])  # as written before the hours written were recorded
    restored = new_state()
    restored.restore(changelog_view(log))
    assert restored.offset == state.offset and restored.watermark_ms == state.watermark_ms
    assert len(restored.take_flushable(0, idle_ms=10 * HOUR_MS)) == len(items)
