"""The backfill's pure planning: hours, offset windows, retention, the lateness rule, what a
rebuilt hour writes. No services."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from streamagg.aggregate import AggregateState
from streamagg.backfill import (
    BackfillError,
    HourRange,
    PartitionFacts,
    PartitionReplay,
    Progress,
    RetentionRefused,
    Window,
    admit,
    first_rebuildable_hour,
    hour_chunks,
    hour_range,
    iso,
    plan,
)
from streamagg.buckets import HOUR_MS
from streamagg.events import Rejected, decode
from streamagg.state import PartitionState
from streamagg.store import Retire
from streamagg.synth import Synth
from tests.unit.test_aggregate import START_MS, kinds, stats

MINUTE_MS = 60_000


# -- hours --------------------------------------------------------------------------------------
def test_hour_range_rounds_outward_to_whole_hours() -> None:
    assert hour_range(START_MS, START_MS + 3 * HOUR_MS, 0) == HourRange(START_MS, START_MS + 3 * HOUR_MS)
    inside = hour_range(START_MS + 20 * MINUTE_MS, START_MS + 2 * HOUR_MS + 1, 0)
    assert inside == HourRange(START_MS, START_MS + 3 * HOUR_MS)
    assert inside.hours() == [START_MS, START_MS + HOUR_MS, START_MS + 2 * HOUR_MS] and len(inside) == 3
    assert hour_range(START_MS + 1, START_MS + 2, 0) == HourRange(START_MS, START_MS + HOUR_MS)


def test_without_a_range_the_previous_complete_hour() -> None:
    now = START_MS + 5 * HOUR_MS + 17 * MINUTE_MS
    assert hour_range(None, None, now) == HourRange(START_MS + 4 * HOUR_MS, START_MS + 5 * HOUR_MS)
    assert hour_range(None, None, START_MS) == HourRange(START_MS - HOUR_MS, START_MS)


@pytest.mark.parametrize(("start", "end"), [(START_MS, None), (None, START_MS), (START_MS, START_MS), (START_MS + 1, START_MS)])
def test_a_range_needs_both_ends_in_order(start: int | None, end: int | None) -> None:
    with pytest.raises(BackfillError):
        hour_range(start, end, START_MS)


# -- windows and retention ----------------------------------------------------------------------
LATENESS_MS = 2 * HOUR_MS
RANGE = HourRange(START_MS + 10 * HOUR_MS, START_MS + 13 * HOUR_MS)


def facts(partition: int = 0, beginning: int = 0, end: int = 1000, start: int | None = 100,
          first_retained_ms: int | None = None) -> PartitionFacts:  # fmt: skip
    return PartitionFacts("t.traces", partition, beginning, end, start, first_retained_ms)


def test_windows_from_the_time_lookups() -> None:
    the_plan = plan(RANGE, [facts(0), facts(1, start=None), facts(2, start=400)], LATENESS_MS, False)
    assert the_plan.hours == RANGE and the_plan.skipped == ()
    assert the_plan.windows == (
        Window("t.traces", 0, 100, 1000),  # up to the end: a too-late event of the range can come at any offset
        Window("t.traces", 1, 1000, 1000),  # nothing at or after from - max lateness: nothing to read
        Window("t.traces", 2, 400, 1000),
    )
    assert the_plan.expected_records == 900 + 0 + 600


def test_first_rebuildable_hour_is_strictly_after_first_retained_plus_lateness() -> None:
    assert first_rebuildable_hour(START_MS + 30 * MINUTE_MS, LATENESS_MS) == START_MS + 3 * HOUR_MS
    assert first_rebuildable_hour(START_MS, LATENESS_MS) == START_MS + 3 * HOUR_MS  # a deleted record may share its ms
    assert first_rebuildable_hour(START_MS - 1, LATENESS_MS) == START_MS + 2 * HOUR_MS


def test_deleted_records_before_the_window_do_not_matter() -> None:
    old = facts(beginning=50, start=100, first_retained_ms=None)
    assert not old.needs_first_retained()
    assert plan(RANGE, [old], LATENESS_MS, False).windows[0].start == 100
    # The first retained record is older than from - max lateness: the deleted ones were not needed.
    early = facts(beginning=100, start=100, first_retained_ms=RANGE.start_ms - LATENESS_MS - 1)
    assert early.needs_first_retained()
    assert plan(RANGE, [early], LATENESS_MS, False).hours == RANGE


def test_refused_when_retention_took_the_start_of_the_range() -> None:
    first_kept = [RANGE.start_ms - LATENESS_MS + 20 * MINUTE_MS, RANGE.start_ms - LATENESS_MS + 70 * MINUTE_MS]
    partitions = [
        facts(0, beginning=300, start=300, first_retained_ms=first_kept[0]),
        facts(1, beginning=700, start=None, first_retained_ms=first_kept[1]),
        facts(2),
    ]
    expected = first_rebuildable_hour(max(first_kept), LATENESS_MS)
    assert expected == RANGE.start_ms + 2 * HOUR_MS
    with pytest.raises(RetentionRefused) as refused:
        plan(RANGE, partitions, LATENESS_MS, False)
    message = str(refused.value)
    assert f"the first hour that can be rebuilt is {iso(expected)}" in message and "\n" not in message
    assert "t.traces[1] begins at offset 700" in message

    partial = plan(RANGE, partitions, LATENESS_MS, True)
    assert partial.hours == HourRange(expected, RANGE.end_ms) and partial.requested == RANGE
    assert [w.start for w in partial.windows] == [300, 700, 100]  # short partitions from their first record


def test_refused_even_with_allow_partial_when_no_hour_is_left() -> None:
    late = facts(beginning=10, start=10, first_retained_ms=RANGE.end_ms)
    for allow_partial in (False, True):
        with pytest.raises(RetentionRefused, match="no hour of"):
            plan(RANGE, [late], LATENESS_MS, allow_partial)


def test_emptied_partitions_refuse_or_are_left_alone() -> None:
    emptied = facts(1, beginning=500, end=500, start=None)
    assert emptied.emptied and not emptied.needs_first_retained()
    with pytest.raises(RetentionRefused, match=r"t\.traces\[1\] no longer hold"):
        plan(RANGE, [facts(0), emptied], LATENESS_MS, False)
    partial = plan(RANGE, [facts(0), emptied], LATENESS_MS, True)
    assert partial.hours == RANGE and partial.skipped == (("t.traces", 1),)
    assert [w.partition for w in partial.windows] == [0]


def test_never_written_partitions_are_empty_not_emptied() -> None:
    empty = facts(beginning=0, end=0, start=None)
    assert not empty.emptied
    assert plan(RANGE, [empty], LATENESS_MS, False).windows == (Window("t.traces", 0, 0, 0),)


# -- the lateness rule --------------------------------------------------------------------------
def _traces(seed: int, hours: int, per_hour: int, start_ms: int) -> list[dict]:
    return [event for kind, _, event in Synth(seed).events(start_ms, hours, per_hour) if kind == "traces"]


@pytest.mark.parametrize("seed", range(20))
def test_admit_is_the_live_workers_rule(seed: int) -> None:
    """Vectorised over any batching, `admit` rejects exactly what PartitionState.ingest does."""
    rng = random.Random(seed)
    events = [decode("traces", json.dumps(e)) for e in _traces(seed, 6, 300, START_MS)]
    times = [rng.choice([e.time_ms, e.time_ms - rng.randrange(0, 4 * HOUR_MS)]) for e in events]
    events = [type(e)(e.kind, t, {**e.fields, "started_at": t}) for e, t in zip(events, times, strict=True)]
    lateness = rng.choice([0, 30 * MINUTE_MS, LATENESS_MS])
    live = PartitionState("t.traces", 0, kinds(), 10_000, lambda: START_MS)
    live_late: list[int] = []
    watermark: int | None = None
    replay_late: list[int] = []
    position = 0
    while position < len(events):
        step = rng.randrange(1, 80)
        batch = list(enumerate(events))[position : position + step]
        live_late += [position + i for i in live.ingest(batch, lateness).too_late]
        admitted, watermark = admit(np.array([e.time_ms for _, e in batch], dtype=np.int64), watermark, lateness)
        replay_late += [position + i for i in np.flatnonzero(~admitted).tolist()]
        assert watermark == live.watermark_ms
        position += step
    assert replay_late == live_late and live_late  # the data did exercise the rule


def test_admit_at_the_boundary() -> None:
    """An event exactly max lateness behind the watermark still counts; one millisecond older does not."""
    times = [START_MS + HOUR_MS, START_MS, START_MS - 1, START_MS + 2 * HOUR_MS, START_MS + HOUR_MS - 1]
    event = decode("traces", json.dumps(_traces(1, 1, 20, START_MS)[0]))
    live = PartitionState("t.traces", 0, kinds(), 10_000, lambda: START_MS)
    result = live.ingest([(i, type(event)(event.kind, t, event.fields)) for i, t in enumerate(times)], HOUR_MS)
    admitted, watermark = admit(np.array(times, dtype=np.int64), None, HOUR_MS)
    assert np.flatnonzero(~admitted).tolist() == result.too_late == [2, 4]
    assert watermark == live.watermark_ms == START_MS + 2 * HOUR_MS


def test_admit_of_nothing_keeps_the_watermark() -> None:
    admitted, watermark = admit(np.zeros(0, dtype=np.int64), 123, 5)
    assert admitted.size == 0 and watermark == 123


# -- a partition's replay -----------------------------------------------------------------------
def _partition_log(seed: int) -> list[tuple[int, bytes, int]]:
    """One traces partition, offsets 0..: mostly in order, some events delayed (late, within
    lateness or not), a few far too old, a few far ahead of their record's timestamp (2099), a
    few that do not decode. ``(offset, value, record timestamp)``; record timestamps are the
    event times of the events in order."""
    rng = random.Random(seed)
    events = _traces(seed, 8, 400, START_MS)
    delayed = sorted(events, key=lambda e: _time(e) + (rng.randrange(0, 3 * HOUR_MS) if rng.random() < 0.1 else 0))
    values = [json.dumps(e).encode() for e in delayed]
    for _ in range(15):
        old = dict(rng.choice(events), started_at=START_MS + rng.randrange(0, 2 * HOUR_MS))
        values.insert(rng.randrange(len(values) // 2, len(values)), json.dumps(old).encode())
    for _ in range(3):
        ahead = dict(rng.choice(events), started_at="2099-01-01T00:00:00Z")
        values.insert(rng.randrange(len(values) // 4), json.dumps(ahead).encode())
    for bad in (b"not json", b"[]", json.dumps({"trace_id": "x"}).encode()):
        values.insert(rng.randrange(len(values)), bad)
    stamps = [_time(event) for event in sorted(events, key=_time)]
    return [(offset, value, stamps[min(offset, len(stamps) - 1)]) for offset, value in enumerate(values)]


def _time(event: dict) -> int:
    return decode("traces", json.dumps(event)).time_ms


def _event_time(value: bytes, record_ms: int) -> int | None:
    try:
        return decode("traces", value, record_ms, LATENESS_MS).time_ms
    except Rejected:
        return None


@pytest.mark.parametrize("seed", range(6))
def test_replay_from_the_window_counts_what_the_live_worker_did_and_what_came_too_late(seed: int) -> None:
    """The live worker reads the whole partition; the replay starts at the first record at
    from - max lateness and reads to the end. The hours of the range come out as every valid event
    of the range (counts, sums, min, max, fingerprints; exact-mode quantiles): the live worker's,
    plus the ones it dead-lettered as too late (CONTRACT section 2: a backfill can still count them)."""
    log = _partition_log(seed)
    hours = HourRange(START_MS + 3 * HOUR_MS, START_MS + 5 * HOUR_MS)
    live = PartitionState("t.traces", 0, kinds(), 10_000, lambda: START_MS)
    valid = [(offset, decode("traces", value, stamp, LATENESS_MS)) for offset, value, stamp in log if _event_time(value, stamp) is not None]
    too_late = []
    for i in range(0, len(valid), 97):
        too_late += [valid[i + p][1] for p in live.ingest(valid[i : i + 97], LATENESS_MS).too_late]
    assert live.watermark_ms is not None and live.watermark_ms < hours.end_ms + 8 * HOUR_MS  # 2099 was refused
    counted_late = [e for e in too_late if hours.start_ms <= e.time_ms < hours.end_ms]
    assert counted_late  # the log has events of the range the live worker dropped as too late
    everything = AggregateState(kinds(), 10_000)
    everything.ingest([e for _, e in valid if hours.start_ms <= e.time_ms < hours.end_ms])
    expected = {row.key: stats(row) for row in everything.rows()}
    assert expected != {row.key: stats(row) for row in live.aggregates.rows() if hours.start_ms <= row.bucket_ms < hours.end_ms}

    start = next(offset for offset, value, stamp in log if (_event_time(value, stamp) or 0) >= hours.start_ms - LATENESS_MS)
    replay = PartitionReplay(Window("t.traces", 0, start, len(log)), "traces", AggregateState(kinds(), 10_000),
                             hours, LATENESS_MS)  # fmt: skip
    position = start
    while not replay.done:
        replay.feed(log[position : position + 61])
        position += 61
    assert replay.too_late == len(counted_late) and replay.rejected > 0
    assert {row.key: stats(row) for row in replay.aggregates.rows()} == expected


def test_replay_stops_at_the_window_end_and_skips_gaps() -> None:
    log = _partition_log(1)
    replay = PartitionReplay(Window("t.traces", 0, 10, 40), "traces", AggregateState(kinds(), 10_000),
                             HourRange(START_MS, START_MS + 8 * HOUR_MS), LATENESS_MS)  # fmt: skip
    assert replay.covered == 9 and not replay.done
    replay.feed(log[10:25])
    assert replay.covered == 24 and replay.records == 15
    replay.feed(log[25:60])  # records past the end when the backfill started are the live worker's
    assert replay.covered == 39 and replay.records == 30 and replay.done
    gap = PartitionReplay(Window("t.traces", 0, 0, 40), "traces", AggregateState(kinds(), 10_000), HourRange(0, HOUR_MS), 0)
    gap.reached(50)  # e.g. transaction markers at the end: the position passed the end
    assert gap.covered == 39 and gap.done
    empty = PartitionReplay(Window("t.traces", 0, 7, 7), "traces", AggregateState(kinds(), 10_000), HourRange(0, HOUR_MS), 0)
    assert empty.done and empty.covered == 6


def test_progress_rate_and_eta() -> None:
    progress = Progress("reading", 3, 8, 1000, 5000, 0, 2, 2.0)
    assert progress.records_per_second == 500 and progress.eta_seconds == 8
    assert Progress("writing", 8, 8, 5000, 5000, 1, 2, 3.0).eta_seconds is None


# -- what a rebuilt hour writes -----------------------------------------------------------------
def test_hour_chunks_write_whole_keys_and_retire_what_the_replay_did_not_find() -> None:
    hour = START_MS
    state = AggregateState(kinds(), 10_000)
    state.ingest([decode("traces", json.dumps(e)) for e in _traces(3, 1, 400, hour)])
    keys = sorted(state.keys(), key=repr)
    topic_of = {"trace.count": "t.traces", "trace.duration_ms": "t.traces", "trace.tokens": "t.traces",
                "trace.cost_usd": "t.traces", "chat.messages": "t.chat"}  # fmt: skip
    covered = {("t.traces", 0): 500, ("t.traces", 1): 600, ("t.chat", 0): 70}
    # Partition 0 produced every key, partition 1 every third.
    produced = {key: {("t.traces", 0): state[key], **({("t.traces", 1): state[key]} if i % 3 == 0 else {})}
                for i, key in enumerate(keys)}  # fmt: skip
    stale_key = (hour, "trace.count", "user_id", "user-gone")
    chat_key = (hour, "chat.messages", None, None)
    foreign = (hour, "no.such.metric", None, None)
    stored_partials = {(keys[1], 1), (keys[2], 0), (stale_key, 0), (stale_key, 1), (stale_key, 2), (chat_key, 0)}
    stored_finals = {keys[0], stale_key, chat_key, foreign, (hour, "trace.count", "kb_id", "kb-orphan")}

    chunks = hour_chunks(produced, stored_finals, stored_partials, covered, topic_of, max_rows=300)
    assert len(chunks) > 1
    seen: list = []
    for chunk in chunks:
        chunk_keys = {key for _, _, items in chunk.batches for key, _ in items} | {r.key for r in chunk.retire} | set(chunk.orphans)
        seen += sorted(chunk_keys, key=repr)
        for partition, offset, items in chunk.batches:
            assert offset == covered[("t.traces", partition)]
            for key, _ in items:  # every partition's partial of a key is in the key's chunk
                assert all(any(k == key for k, _ in b[2]) for b in chunk.batches if ("t.traces", b[0]) in produced[key])
    assert len(seen) == len(set(seen))  # each key in exactly one transaction
    assert set(seen) == set(keys) | {stale_key, chat_key, (hour, "trace.count", "kb_id", "kb-orphan")}  # not `foreign`
    retired = {r for chunk in chunks for r in chunk.retire}
    assert retired == {
        Retire(keys[1], 1, 600),  # stored for partition 1, which did not produce it
        Retire(stale_key, 0, 500),
        Retire(stale_key, 1, 600),  # partition 2 was not replayed: its partial is not ours to judge
        Retire(chat_key, 0, 70),
    }
    orphans = {key for chunk in chunks for key in chunk.orphans}
    assert orphans == {stale_key, chat_key, (hour, "trace.count", "kb_id", "kb-orphan")}
    assert sum(len(items) for chunk in chunks for _, _, items in chunk.batches) == sum(map(len, produced.values()))
