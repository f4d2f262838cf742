"""The pure aggregation core against the exact oracle."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from fractions import Fraction

import numpy as np
import pytest

from sketches import Kind, Sketch
from streamagg.aggregate import Agg, AggregateState, Row, roll_up, roll_up_rows
from streamagg.buckets import HOUR_MS, bucket_start_ms
from streamagg.catalogue import METRICS, METRICS_BY_NAME
from streamagg.errors import StateError
from streamagg.events import Event, validate
from streamagg.exact import exact_sum, fingerprints
from streamagg.settings import Settings
from streamagg.synth import Synth, SynthConfig
from streamagg.oracle import Exact, exact_hours, exact_rollup, quantiles

START_MS = 1_764_115_200_000  # Wednesday 2025-11-26 00:00 UTC
RANKS = (0.5, 0.95, 0.99)
# Rank error allowed past exact mode. The default REQ-HRA sketch's relative standard error of
# rank is well under 1% at these ranks; this is a wide margin for buckets of a few hundred values.
RANK_TOLERANCE = 0.02
DEFAULT_KIND = Settings().sketch_kind


def kinds(kind: str = DEFAULT_KIND) -> dict[str, Kind]:
    return {m.name: Kind.parse(kind) for m in METRICS if m.is_full}


def make_events(hours: int, per_hour: int, seed: int = 1, users: int = 300, start_ms: int = START_MS) -> list[Event]:
    synth = Synth(seed, SynthConfig(users=users, knowledge_bases=6))
    return [validate(kind, event) for kind, _, event in synth.events(start_ms, hours, per_hour)]


def ingest(events: list[Event], batch: int, max_series: int = 10_000, kind: str = DEFAULT_KIND) -> AggregateState:
    state = AggregateState(kinds(kind), max_series)
    for i in range(0, len(events), batch):
        state.ingest(events[i : i + batch])
    return state


def rank_error(values: list[float], estimate: float, rank: float) -> float:
    """Distance from ``rank`` to the interval of normalised ranks that ``estimate`` occupies."""
    ordered = np.sort(np.asarray(values, dtype=np.float32).astype(np.float64))
    low = np.searchsorted(ordered, estimate, side="left") / len(ordered)
    high = np.searchsorted(ordered, estimate, side="right") / len(ordered)
    return 0.0 if low <= rank <= high else min(abs(rank - low), abs(rank - high))


def assert_row_matches(row: Row, exact: Exact, expected_sum: float | None = None) -> None:
    assert row.count == exact.count, row.key
    metric = METRICS_BY_NAME[row.metric_name]
    if not metric.is_full:
        assert (row.sum_value, row.min_value, row.p50_value, row.sketch, row.sketch_kind) == (None,) * 5
        return
    total = exact.sum if expected_sum is None else expected_sum
    assert row.sum_value == total, row.key
    assert row.min_value == min(exact.values) and row.max_value == max(exact.values), row.key
    assert row.avg_value == total / exact.count, row.key
    assert row.sketch is not None and row.sketch_kind is not None
    sketch = Sketch.deserialize(row.sketch_kind, row.sketch)
    assert sketch.n == exact.count
    estimates = [row.p50_value, row.p95_value, row.p99_value]
    if sketch.is_exact:
        dtype = np.float32 if row.sketch_kind.startswith("req") else np.float64
        assert estimates == quantiles(exact.values, dtype), row.key
    else:
        for rank, estimate in zip(RANKS, estimates, strict=True):
            assert rank_error(exact.values, estimate, rank) <= RANK_TOLERANCE, (row.key, rank)


def test_hour_rows_equal_the_oracle() -> None:
    events = make_events(hours=3, per_hour=4000)
    state = ingest(events, batch=500)
    oracle = exact_hours(events)
    rows = {row.key: row for row in state.rows()}
    assert set(rows) == set(oracle)  # every metric and slice present, nothing extra
    for key, exact in oracle.items():
        assert_row_matches(rows[key], exact)
    # The data exercised both regimes and every metric.
    assert {key[1] for key in rows} == {m.name for m in METRICS}
    modes = {Sketch.deserialize(r.sketch_kind, r.sketch).is_exact for r in rows.values() if r.sketch}
    assert modes == {True, False}


def test_batching_and_partitioning_do_not_change_rows() -> None:
    events = make_events(hours=2, per_hour=2500, seed=4)
    reference = {row.key: row for row in ingest(events, batch=len(events)).rows()}
    by_one = ingest(events, batch=1).rows()
    assert {row.key: stats(row) for row in by_one} == {key: stats(row) for key, row in reference.items()}
    # Three "partitions" by a hash of the event, merged afterwards, in another order.
    partitions = [AggregateState(kinds(), 10_000) for _ in range(3)]
    for i, event in enumerate(events):
        partitions[hash(event.fields.get("user_id", i)) % 3].ingest([event])
    merged = AggregateState(kinds(), 10_000)
    for part in reversed(partitions):
        merged.merge(part)
    merged_rows = {row.key: row for row in merged.rows()}
    assert set(merged_rows) == set(reference)
    for key, row in reference.items():
        other = merged_rows[key]
        assert stats(other) == stats(row), key


def test_merging_states_leaves_the_merged_ones_as_they_were() -> None:
    events = make_events(hours=1, per_hour=600, seed=7)
    parts = [AggregateState(kinds(), 10_000) for _ in range(2)]
    for i, event in enumerate(events):
        parts[i % 2].ingest([event])
    before = [{row.key: stats(row) for row in part.rows()} for part in parts]
    merged = AggregateState(kinds(), 10_000)
    for part in parts:
        merged.merge(part)
    assert [{row.key: stats(row) for row in part.rows()} for part in parts] == before
    assert {row.key: stats(row) for row in merged.rows()} == {row.key: stats(row) for row in ingest(events, len(events)).rows()}


@pytest.mark.parametrize("seed", range(6))
def test_batch_ingest_equals_aggregates_built_value_by_value(seed: int) -> None:
    """Grouped batch ingest against each key's values from the oracle, folded in one at a time:
    count, exact sum, min, max, fingerprint and (while exact) the very sketch bytes."""
    rng = random.Random(seed)
    events = make_events(hours=3, per_hour=600, seed=seed, users=rng.choice([40, 300]))
    for event in rng.sample(events, 60):  # -0.0 and integers reach the values too
        for name in ("duration_ms", "response_time_ms", "total_tokens"):
            if name in event.fields:
                event.fields[name] = rng.choice([-0.0, 0, 7, 2**60 + 1])
    max_series = rng.choice([5, 10_000])
    state = AggregateState(kinds(), max_series)
    position = 0
    while position < len(events):
        step = rng.choice([1, 2, 17, 250, 2000])
        state.ingest(events[position : position + step])
        position += step
    oracle = exact_hours(events, max_series=max_series)
    assert set(state.keys()) == set(oracle)
    for key, expected in oracle.items():
        agg = state[key]
        if not METRICS_BY_NAME[key[1]].is_full:
            assert (agg.count, agg.sketch) == (expected.count, None), key
            continue
        values = [value + 0.0 for value in expected.values]
        reference = Agg(agg.sketch.kind)
        reference.count = len(values)
        reference.total = exact_sum(values)
        reference.min, reference.max = min(values), max(values)
        reference.fingerprint = int(fingerprints(np.array(values)).sum(dtype=np.uint64))
        for value in values:
            reference.sketch.update_many(np.array([value]))
        # __overflow__ takes its values series by series, not in event order: same items, other order
        if reference.sketch.is_exact and key[3] != "__overflow__":
            assert agg.encode() == reference.encode(), key
        else:
            assert (agg.count, agg.total, agg.min, agg.max, agg.fingerprint, agg.sketch.n) == (
                reference.count, reference.total, reference.min, reference.max, reference.fingerprint, reference.sketch.n
            ), key  # fmt: skip
            if reference.sketch.is_exact:
                assert agg.sketch.quantiles(RANKS) == reference.sketch.quantiles(RANKS), key


def stats(row: Row) -> tuple:
    """What must not depend on batching, partitioning or merge order: all but estimated quantiles."""
    exact = row.sketch is None or Sketch.deserialize(row.sketch_kind, row.sketch).is_exact
    quantiles = (row.p50_value, row.p95_value, row.p99_value) if exact else None
    return (row.count, row.sum_value, row.min_value, row.max_value, row.avg_value, row.fingerprint, quantiles)


@pytest.mark.parametrize("value", [0.1, 12.25, 1e300, 5e-324, 0.0])
def test_a_single_value_is_every_statistic_of_its_bucket_after_any_path(value: float) -> None:
    """CONTRACT section 3: one event gives min = max = avg = p50 = p95 = p99 = its value, also
    where float32 (REQ's items) cannot hold it, after a checkpoint round trip and once merged
    with an empty partial."""
    event = validate(
        "traces",
        {"trace_id": "t", "operation_type": "chat", "started_at": START_MS, "duration_ms": value, "status": "success"},
    )
    agg = ingest([event], batch=1)[(START_MS, "trace.duration_ms", None, None)]
    merged = agg.empty_like()
    merged.merge(Agg.decode(agg.encode()))
    for one in (agg, Agg.decode(agg.encode()), merged):
        assert tuple(one.summary()) == (value,) * 7


def test_single_event_bucket() -> None:
    event = validate(
        "traces",
        {"trace_id": "t", "operation_type": "chat", "started_at": START_MS + 5, "duration_ms": 12.25, "status": "success"},
    )
    state = ingest([event], batch=1)
    rows = {row.key: row for row in state.rows()}
    duration = rows[(START_MS, "trace.duration_ms", None, None)]
    assert duration.count == 1
    assert duration.min_value == duration.max_value == duration.avg_value == 12.25
    assert duration.p50_value == duration.p95_value == duration.p99_value == 12.25
    # no kb_id / user_id on the event: those slices are absent, the others are there
    assert set(rows) == {
        (START_MS, metric, dimension_type, value)
        for metric in ("trace.count", "trace.duration_ms")
        for dimension_type, value in ((None, None), ("operation_type", "chat"))
    }


def test_failed_traces_count_but_have_no_duration() -> None:
    event = validate(
        "traces",
        {"trace_id": "t", "operation_type": "chat", "started_at": START_MS, "duration_ms": 5, "status": "error"},
    )
    keys = set(ingest([event], batch=1).keys())
    assert (START_MS, "trace.count", None, None) in keys
    assert not any(key[1] == "trace.duration_ms" for key in keys)


def test_llm_tokens_sum_prompt_and_completion() -> None:
    base = {"span_id": "s", "trace_id": "t", "span_type": "llm", "started_at": START_MS, "duration_ms": 1, "model": "m"}
    events = [
        validate("spans", {**base, "prompt_tokens": 10, "completion_tokens": 5}),
        validate("spans", {**base, "prompt_tokens": 7}),
        validate("spans", base),  # no token field: not in llm.tokens
        validate("spans", {**base, "span_type": "tool", "prompt_tokens": 3}),  # not an llm span
    ]
    row = {r.key: r for r in ingest(events, batch=4).rows()}[(START_MS, "llm.tokens", "model", "m")]
    assert (row.count, row.sum_value, row.min_value, row.max_value) == (2, 22.0, 7.0, 15.0)
    calls = {r.key: r for r in ingest(events, batch=4).rows()}[(START_MS, "llm.call_count", None, None)]
    assert calls.count == 3


def test_llm_tokens_of_a_huge_integer_and_a_fraction_are_rounded_once() -> None:
    """2**53 + 1 tokens and 0.5 more: 9007199254740993.5 rounds to ...994; converting the integer
    to a float first (...992) and then adding gave ...992."""
    base = {"span_id": "s", "trace_id": "t", "span_type": "llm", "started_at": START_MS, "duration_ms": 1, "model": "m"}
    event = validate("spans", {**base, "prompt_tokens": 2**53 + 1, "completion_tokens": 0.5})
    row = {r.key: r for r in ingest([event], batch=1).rows()}[(START_MS, "llm.tokens", None, None)]
    assert row.sum_value == 9007199254740994.0 == float(Fraction(2**53 + 1) + Fraction(1, 2))


@pytest.mark.parametrize("kind", ["req-hra-k128", "kll-k200"])
def test_values_at_the_edges_of_the_float_ranges_match_the_oracle(kind: str) -> None:
    """A finite sum whose partial sums pass float64's range (in one order of its values), a sum
    beyond it (infinity), and values beyond float32's range, which a REQ sketch stores as float32's
    largest value: rows and oracle agree, in either order of the events."""
    below_max = math.nextafter(1.7976931348623157e308, 0)
    hours = [[below_max, 2.0**970, 2.0**971 - 2.0**918], [1e308, 1e308], [1e39, 2e39, 3e39]]
    events = [
        validate("traces", {"trace_id": f"{h}-{i}", "operation_type": "chat", "started_at": START_MS + h * HOUR_MS,
                            "duration_ms": value, "status": "success"})
        for h, values in enumerate(hours) for i, value in enumerate(values)
    ]  # fmt: skip
    oracle = exact_hours(events)
    for ordered in (events, list(reversed(events))):
        rows = {row.key: row for row in ingest(ordered, batch=1, kind=kind).rows()}
        assert set(rows) == set(oracle)
        for key, exact in oracle.items():
            assert_row_matches(rows[key], exact)
    sums = [oracle[(START_MS + h * HOUR_MS, "trace.duration_ms", None, None)].sum for h in range(3)]
    assert sums == [1.7976931348623157e308, math.inf, 6e39]


@pytest.mark.parametrize("batch", [1, 7, 10_000])
def test_overflow_after_max_series(batch: int) -> None:
    events = make_events(hours=2, per_hour=1500, seed=9, users=200)
    state = ingest(events, batch=batch, max_series=25)
    oracle = exact_hours(events, max_series=25)
    rows = {row.key: row for row in state.rows()}
    assert set(rows) == set(oracle)
    for key, exact in oracle.items():
        assert_row_matches(rows[key], exact)
    user_values = {key[3] for key in rows if key[2] == "user_id"}
    assert "__overflow__" in user_values
    per_series: dict[tuple, int] = {}
    for hour, metric, dimension_type, value in rows:
        if dimension_type is not None and value != "__overflow__":
            per_series[(hour, metric, dimension_type)] = per_series.get((hour, metric, dimension_type), 0) + 1
    assert max(per_series.values()) == 25
    # The overflow counter counts exactly the events kept under __overflow__.
    overflowed = {(k[1], k[2]): 0 for k in rows if k[3] == "__overflow__"}
    for key, row in rows.items():
        if key[3] == "__overflow__":
            overflowed[(key[1], key[2])] += row.count
    assert dict(state.overflow_events) == overflowed


@pytest.mark.parametrize("granularity", ["day", "week"])
def test_rollups_equal_the_oracle(granularity: str) -> None:
    # 30 hours from Sunday 20:00 cross a day and an ISO week boundary.
    start = bucket_start_ms(START_MS, "week") - 4 * HOUR_MS
    events = make_events(hours=30, per_hour=400, seed=5, start_ms=start)
    hours = ingest(events, batch=1000).rows()
    rolled = {row.key: row for row in roll_up(hours, granularity)}  # type: ignore[arg-type]
    oracle = exact_rollup(exact_hours(events), granularity)
    assert set(rolled) == set(oracle)
    assert len({key[0] for key in rolled}) == {"day": 3, "week": 2}[granularity]
    for key, (exact, hour_sums_added) in oracle.items():
        row = rolled[key]
        assert row.granularity == granularity
        assert_row_matches(row, exact, expected_sum=hour_sums_added)


def test_days_and_weeks_rolled_up_together_merge_each_run_of_hours_once() -> None:
    """Rolled up together, days and weeks equal the oracle; a bucket of one hour is that hour's
    row, and a week whose hours lie in one day is that day's row (same sketch bytes: nothing
    merged twice). Only the wanted buckets come out."""
    start = bucket_start_ms(START_MS, "week") - 4 * HOUR_MS  # Sunday 20:00: a day and a week boundary
    events = make_events(hours=8, per_hour=300, seed=7, start_ms=start)
    hours = sorted(ingest(events, batch=500).rows(), key=lambda row: row.bucket_ms)
    rolled = roll_up_rows(hours, {"day": None, "week": None})
    oracle = exact_hours(events)
    for granularity in ("day", "week"):
        rows = {row.key: row for row in rolled[granularity]}
        expected = exact_rollup(oracle, granularity)
        assert set(rows) == set(expected)
        for key, (exact, hour_sums) in expected.items():
            assert rows[key].granularity == granularity
            assert_row_matches(rows[key], exact, expected_sum=hour_sums)
    by_series: dict[tuple, list[Row]] = {}
    for row in hours:
        by_series.setdefault((bucket_start_ms(row.bucket_ms, "day"), *row.key[1:]), []).append(row)
    days = {row.key: row for row in rolled["day"]}
    weeks = {row.key: row for row in rolled["week"]}
    singles = [(key, members[0]) for key, members in by_series.items() if len(members) == 1]
    assert singles and all(days[key].sketch == hour.sketch and days[key].p99_value == hour.p99_value for key, hour in singles)
    merged_days = [key for key, members in by_series.items() if len(members) > 1 and members[0].sketch is not None]
    assert merged_days and all(weeks[(bucket_start_ms(key[0], "week"), *key[1:])].sketch == days[key].sketch for key in merged_days)
    some = {next(iter(days))}
    assert {row.key for row in roll_up_rows(hours, {"day": some})["day"]} == some


def _full_agg(values: list[float]) -> Agg:
    agg = Agg(Kind.parse(DEFAULT_KIND))
    agg.add_group(values, int(fingerprints(np.asarray(values)).sum(dtype=np.uint64)))
    return agg


def test_a_week_merged_from_its_days_adds_their_hours_sums_exactly() -> None:
    """A day row carries the exact sum of its hours' sums (``sum_parts``), so a week merged from
    day rows has the sum of one merged from the hours, not the sum of the days' rounded sums:
    1 + 2**-53 rounds to 1 on Monday, and Monday plus Tuesday's 2**-53 to 1 + 2**-52."""
    week = bucket_start_ms(START_MS, "week")
    series = ("trace.duration_ms", "user_id", "u1")
    tiny = 2.0**-53
    hours = [
        _full_agg([value]).to_row((week + offset, *series), "hour")
        for offset, value in [(0, 1.0), (HOUR_MS, tiny), (24 * HOUR_MS, tiny)]
    ]
    days = roll_up_rows(hours, {"day": None})["day"]
    assert [row.sum_value for row in days] == [1.0, tiny]
    assert days[0].sum_parts == (1.0, tiny) and days[1].sum_parts == (tiny,)  # a day of one hour too
    (direct,) = roll_up_rows(hours, {"week": None})["week"]
    (via_days,) = roll_up_rows(days, {"week": None})["week"]
    assert direct.sum_value == via_days.sum_value == 1.0 + 2.0**-52
    assert stats(via_days) == stats(direct) and via_days.sum_parts == direct.sum_parts == (1.0 + 2.0**-52,)
    rounded_only = [dataclasses.replace(row, sum_parts=None) for row in days]  # as rolled up before migration 008
    (double_rounded,) = roll_up_rows(rounded_only, {"week": None})["week"]
    assert double_rounded.sum_value == 1.0


def test_weeks_merged_from_days_equal_weeks_merged_from_hours() -> None:
    """Generated events over a week's first three days: weeks from the day rows equal weeks from
    the hour rows in every statistic that does not depend on merge order, and the oracle."""
    week = bucket_start_ms(START_MS, "week")
    events = make_events(hours=60, per_hour=150, seed=8, start_ms=week)
    hours = sorted(ingest(events, batch=700).rows(), key=lambda row: row.bucket_ms)
    days = sorted(roll_up_rows(hours, {"day": None})["day"], key=lambda row: row.bucket_ms)
    direct = {row.key: row for row in roll_up_rows(hours, {"week": None})["week"]}
    via_days = {row.key: row for row in roll_up_rows(days, {"week": None})["week"]}
    assert set(direct) == set(via_days) == set(exact_rollup(exact_hours(events), "week"))
    for key, (exact, hour_sums) in exact_rollup(exact_hours(events), "week").items():
        assert stats(via_days[key]) == stats(direct[key]), key
        assert_row_matches(via_days[key], exact, expected_sum=hour_sums)


def test_merge_is_associative_hours_days_week() -> None:
    """hours -> days -> week equals hours -> week, and both match one sketch over all values."""
    start = bucket_start_ms(START_MS, "week")
    events = make_events(hours=72, per_hour=300, seed=6, start_ms=start)
    hours = ingest(events, batch=2000).rows()
    via_days = {r.key: r for r in roll_up(roll_up(hours, "day"), "week")}
    direct = {r.key: r for r in roll_up(hours, "week")}
    assert set(via_days) == set(direct)
    oracle = exact_rollup(exact_hours(events), "week")
    for key, row in direct.items():
        other = via_days[key]
        assert (other.count, other.min_value, other.max_value, other.fingerprint) == (
            row.count,
            row.min_value,
            row.max_value,
            row.fingerprint,
        )
        if row.sum_value is not None:
            assert other.sum_value == pytest.approx(row.sum_value, rel=1e-12)
            assert_row_matches(row, oracle[key][0], expected_sum=row.sum_value)
            assert_row_matches(other, oracle[key][0], expected_sum=other.sum_value)


def test_hours_of_two_sketch_kinds_roll_up_while_one_side_is_exact() -> None:
    """Hour 0 under one kind, hour 1 under another (STREAMAGG_SKETCH_KIND changed between them):
    a day whose rows are exact on at least one side is their merge and equals the oracle; two
    sides past exact mode never merge: an error, or, given a list, no row and its key listed."""
    events = make_events(hours=2, per_hour=4000, seed=2)
    first = [e for e in events if e.time_ms < START_MS + HOUR_MS]
    second = [e for e in events if e.time_ms >= START_MS + HOUR_MS]
    hours = ingest(first, batch=500, kind="req-hra-k24").rows() + ingest(second, batch=500, kind="kll-k200").rows()
    full = [r for r in hours if METRICS_BY_NAME[r.metric_name].is_full]
    with pytest.raises(StateError):
        roll_up(full, "day")
    unmerged: list = []
    days = {row.key: row for row in roll_up_rows(sorted(full, key=lambda r: r.bucket_ms), {"day": None}, unmerged)["day"]}
    oracle = exact_rollup(exact_hours(events), "day")
    estimating = {r.key for r in full if not Sketch.deserialize(r.sketch_kind, r.sketch).is_exact}
    busy = {("day", (bucket_start_ms(k[0], "day"), *k[1:])) for k in estimating if k[0] == START_MS} & {
        ("day", (bucket_start_ms(k[0], "day"), *k[1:])) for k in estimating if k[0] == START_MS + HOUR_MS
    }
    assert busy and set(unmerged) == busy  # the global slice and the busiest ones
    mixed = 0
    for key, row in days.items():
        assert ("day", key) not in busy
        assert_row_matches(row, oracle[key][0], expected_sum=oracle[key][1])
        mixed += {r.sketch_kind for r in full if (bucket_start_ms(r.bucket_ms, "day"), *r.key[1:]) == key} == {"req-hra-k24", "kll-k200"}
    assert mixed > 100  # most series of the day have rows of both kinds, merged


def test_a_merge_of_two_kinds_does_not_depend_on_the_order_of_its_parts() -> None:
    """700 values under req-hra-k128 and 150 under kll-k200 (both exact), 5,000 under kll-k200:
    every order merges, to kll-k200 (first come, the two exact ones became a k128 sketch past
    exact mode, which then refused the third)."""
    rng = random.Random(5)

    def agg(kind: str, n: int) -> Agg:
        out = Agg(Kind.parse(kind))
        for i in range(n):
            out.add(rng.lognormvariate(5, 1), i)
        return out

    parts = [agg("req-hra-k128", 700), agg("kll-k200", 150), agg("kll-k200", 5000)]
    for order in itertools.permutations(parts):
        merged = Agg.merged(list(order))
        assert merged.count == merged.sketch.n == 5850 and str(merged.sketch.kind) == "kll-k200"


def test_a_roll_up_raises_on_unreadable_sketch_bytes_even_when_it_lists_unmerged_rows() -> None:
    """Only two kinds past exact mode are listed and left; corrupt bytes are not that and raise."""
    rows = [r for r in ingest(make_events(hours=2, per_hour=400, seed=4), batch=400).rows() if r.metric_name == "trace.duration_ms"]
    row = next(r for r in rows if r.dimension_type is None and r.bucket_ms == START_MS)
    broken = Row(row.bucket_ms, "hour", row.metric_name, None, None, row.count, row.sum_value, row.min_value,
                 row.max_value, row.avg_value, row.p50_value, row.p95_value, row.p99_value, row.sketch[:-9] + b"\xff" * 9,
                 row.sketch_kind, row.fingerprint)  # fmt: skip
    unmerged: list = []
    with pytest.raises(StateError):
        roll_up_rows(sorted([broken if r is row else r for r in rows], key=lambda r: r.bucket_ms), {"day": None}, unmerged)
    assert unmerged == []


def test_a_refused_merge_leaves_the_aggregate_as_it_was() -> None:
    a, b = Agg(Kind.parse("req-hra-k24")), Agg(Kind.parse("kll-k200"))
    for i in range(3000):
        a.add(float(i), i)
        b.add(float(i) / 2, i)
    before = (a.count, a.total, a.min, a.max, a.fingerprint, a.sketch.n)
    with pytest.raises(StateError):
        a.merge(b)
    assert (a.count, a.total, a.min, a.max, a.fingerprint, a.sketch.n) == before


def test_agg_bytes_round_trip_and_corruption() -> None:
    events = make_events(hours=1, per_hour=3000, seed=3)
    state = ingest(events, batch=3000)
    for key, agg in list(state.items())[:200]:
        copy = Agg.decode(agg.encode())
        assert copy.to_row(key, "hour") == agg.to_row(key, "hour") or not copy.sketch or not copy.sketch.is_exact
        assert copy.count == agg.count and copy.total == agg.total and copy.fingerprint == agg.fingerprint
    full = next(agg for _, agg in state.items() if agg.sketch is not None and agg.count > 500)
    data = full.encode()
    for bad in (b"", data[:5], b"\x09" + data[1:], data[:40], data[:-7]):
        with pytest.raises(StateError):
            Agg.decode(bad)


def test_dirty_keys_and_eviction() -> None:
    events = make_events(hours=2, per_hour=200, seed=8)
    state = AggregateState(kinds(), 10_000)
    state.ingest(events[:10])
    first = state.take_dirty()
    assert first and state.take_dirty() == set()
    state.ingest(events[-1:])
    assert {key[0] for key in state.take_dirty()} == {bucket_start_ms(events[-1].time_ms, "hour")}
    hour = min(state.hours())
    taken = state.pop_hours([hour])
    assert taken and all(key[0] == hour for key in taken)
    assert hour not in state.hours()


@pytest.mark.parametrize("kind", ["req-hra-k128", "req-hra-k12", "kll-k200"])
@pytest.mark.parametrize("value", [0.1, 123.456, 16777217.0, 1e-320, 3.5e38, 0.0])
def test_a_single_value_is_every_statistic_of_its_bucket(kind: str, value: float) -> None:
    """CONTRACT section 3: one event gives min = max = avg = p50 = p95 = p99 = its value. REQ
    keeps float32 items (0.1 read 0.10000000149011612 before the clamp), also after a round trip."""
    agg = Agg(Kind.parse(kind))
    agg.add(value, 0)
    restored = Agg.from_row(agg.to_row((0, "trace.duration_ms", None, None), "hour"))
    for summary in (agg.summary(), restored.summary()):
        assert summary is not None
        assert (summary.min, summary.max, summary.avg, summary.p50, summary.p95, summary.p99) == (value,) * 6


def test_percentiles_stay_within_min_and_max() -> None:
    rng = random.Random(5)
    for _ in range(200):
        agg = Agg(Kind.parse("req-hra-k128"))
        for value in [rng.uniform(0.1, 1000.0) for _ in range(rng.randrange(1, 40))]:
            agg.add(value, 0)
        summary = agg.summary()
        assert summary is not None
        assert summary.min <= summary.p50 <= summary.p95 <= summary.p99 <= summary.max
