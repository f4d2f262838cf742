"""Range queries without services: which week/day/hour buckets tile a range, which stored rows
stand in for missing coarse ones, and how the chosen rows merge into results."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import numpy as np
import pytest

from sketches import Kind
from streamagg.aggregate import Agg, AggregateState, Row, roll_up
from streamagg.buckets import DAY_MS, HOUR_MS, WEEK_MS, bucket_start_ms, to_ms, width_ms
from streamagg.query import (
    BadRange,
    MixedSketchKinds,
    QueryError,
    QueryRow,
    RangeQuery,
    Tiling,
    UnknownDimension,
    UnknownMetric,
    merge_rows,
)
from tests.unit.test_aggregate import kinds, make_events


def at(day: int, hour: int = 0, month: int = 11) -> int:
    """Epoch ms of 2025-``month``-``day`` ``hour``:00 UTC (2025-11-24 is a Monday)."""
    return to_ms(datetime(2025, month, day, hour, tzinfo=UTC))


MONDAY = at(24)


@pytest.mark.parametrize(
    ("start", "end", "coarsest", "runs"),
    [
        pytest.param(at(24), at(1, month=12), "week", [("week", at(24), at(1, month=12))], id="one ISO week"),
        pytest.param(
            at(26, 13), at(28, 9), "week",
            [("hour", at(26, 13), at(27)), ("day", at(27), at(28)), ("hour", at(28), at(28, 9))],
            id="mid-day to mid-day inside a week",
        ),
        pytest.param(at(26, 13), at(26, 17), "week", [("hour", at(26, 13), at(26, 17))], id="inside one day"),
        pytest.param(
            at(26, 13), at(27, 2), "week", [("hour", at(26, 13), at(27, 2))], id="across midnight, no whole day"
        ),
        pytest.param(
            at(27), at(3, month=12), "week", [("day", at(27), at(3, month=12))],
            id="across an ISO week boundary, no whole week",
        ),
        pytest.param(
            at(22, 9), at(9, 15, month=12), "week",
            [
                ("hour", at(22, 9), at(23)),
                ("day", at(23), at(24)),
                ("week", at(24), at(8, month=12)),
                ("day", at(8, month=12), at(9, month=12)),
                ("hour", at(9, month=12), at(9, 15, month=12)),
            ],
            id="hours, a day, two weeks, a day, hours",
        ),
        pytest.param(
            at(22, 9), at(9, 15, month=12), "day",
            [
                ("hour", at(22, 9), at(23)),
                ("day", at(23), at(9, month=12)),
                ("hour", at(9, month=12), at(9, 15, month=12)),
            ],
            id="no weeks when days are the coarsest",
        ),
        pytest.param(
            at(22, 9), at(9, 15, month=12), "hour", [("hour", at(22, 9), at(9, 15, month=12))], id="hours only"
        ),
        pytest.param(
            at(30, 23), at(1, 1, month=12), "week", [("hour", at(30, 23), at(1, 1, month=12))],
            id="Sunday night to Monday morning",
        ),
    ],
)  # fmt: skip
def test_runs(start: int, end: int, coarsest: str, runs: list[tuple[str, int, int]]) -> None:
    assert list(Tiling.of(start, end, coarsest).runs) == runs  # type: ignore[arg-type]


def hours_of(granularity: str, bucket: int) -> range:
    return range(bucket, bucket + width_ms(granularity), HOUR_MS)  # type: ignore[arg-type]


@pytest.mark.parametrize("coarsest", ["hour", "day", "week"])
def test_random_ranges_are_tiled_exactly_and_coarsely(coarsest: str) -> None:
    rng = np.random.default_rng(3)
    order = ("hour", "day", "week")
    for _ in range(400):
        start = MONDAY + int(rng.integers(-400, 400)) * HOUR_MS
        end = start + int(rng.integers(1, 1200)) * HOUR_MS
        runs = Tiling.of(start, end, coarsest).runs  # type: ignore[arg-type]
        hours = []
        for granularity, run_start, run_end in runs:
            assert order.index(granularity) <= order.index(coarsest)
            assert bucket_start_ms(run_start, granularity) == run_start
            assert bucket_start_ms(run_end, granularity) == run_end
            for bucket in range(run_start, run_end, width_ms(granularity)):
                hours.extend(hours_of(granularity, bucket))
                for coarser in order[order.index(granularity) + 1 : order.index(coarsest) + 1]:
                    # A finer run never holds a whole bucket of an allowed coarser granularity.
                    outer = bucket_start_ms(bucket, coarser)  # type: ignore[arg-type]
                    assert not (start <= outer and outer + width_ms(coarser) <= end)  # type: ignore[arg-type]
        assert hours == list(range(start, end, HOUR_MS))  # every hour once, in order


def keys_of(tiling: Tiling, values: list[str | None], missing: set) -> list:
    """Every row the lookups could find for each series, less ``missing``."""
    return [
        (granularity, bucket, value)
        for value in values
        for granularity, start, end in tiling.lookups()
        for bucket in range(start, end, width_ms(granularity))
        if (granularity, bucket, value) not in missing
    ]


def assert_chosen_tile_each_series(tiling: Tiling, start: int, end: int, keys: list, chosen: list) -> None:
    present_hours: dict = {}
    for granularity, bucket, value in keys:
        if granularity == "hour":
            present_hours.setdefault(value, set()).add(bucket)
    covered: dict = {}
    for granularity, bucket, value in chosen:
        for hour in hours_of(granularity, bucket):
            assert hour not in covered.setdefault(value, set()), f"{value} hour {hour} counted twice"
            covered[value].add(hour)
    for value, hours in present_hours.items():
        assert hours <= covered[value] <= set(range(start, end, HOUR_MS)), value


def test_choose_takes_the_coarsest_stored_rows() -> None:
    start, end = at(22, 9), at(9, 15, month=12)
    tiling = Tiling.of(start, end, "week")
    chosen = tiling.choose(keys_of(tiling, ["chat", "search"], set()))
    tiles = [(g, b) for g, s, e in tiling.runs for b in range(s, e, width_ms(g))]
    assert sorted(chosen) == sorted((g, b, v) for v in ("chat", "search") for g, b in tiles)


def test_missing_week_row_falls_back_to_its_days_then_hours_per_series() -> None:
    start, end = at(22, 9), at(9, 15, month=12)
    tiling = Tiling.of(start, end, "week")
    missing = {("week", MONDAY, "chat"), ("day", at(26), "chat"), ("day", at(23), "search")}
    keys = keys_of(tiling, ["chat", "search"], missing)
    chosen = set(tiling.choose(keys))
    # chat: no week row for the week of Nov 24: its days stand in, and Wednesday's hours for the missing day.
    assert ("week", MONDAY, "chat") not in chosen
    assert {("day", MONDAY + d * DAY_MS, "chat") for d in (0, 1, 3, 4, 5, 6)} <= chosen
    assert {("hour", h, "chat") for h in hours_of("day", at(26))} <= chosen
    chat_hours = {k[1] for k in chosen if k[0] == "hour" and k[2] == "chat"}
    assert {h for h in chat_hours if MONDAY <= h < MONDAY + WEEK_MS} == set(hours_of("day", at(26)))
    # search keeps its week row; its missing day row outside any week gives way to that day's hours.
    assert ("week", MONDAY, "search") in chosen
    assert not any(k[2] == "search" and k[0] != "week" and MONDAY <= k[1] < MONDAY + WEEK_MS for k in chosen)
    assert {("hour", h, "search") for h in hours_of("day", at(23))} <= chosen
    assert_chosen_tile_each_series(tiling, start, end, keys, list(chosen))


def test_series_with_hours_only_is_answered_from_its_hours() -> None:
    """A series whose roll-ups have not run at all (only hour rows) next to a rolled-up one."""
    start, end = at(23), at(8, month=12)
    tiling = Tiling.of(start, end, "week")
    keys = [k for k in keys_of(tiling, ["old", "new"], set()) if k[2] == "old" or k[0] == "hour"]
    chosen = tiling.choose(keys)
    assert sorted(k for k in chosen if k[2] == "new") == sorted(k for k in keys if k[2] == "new")
    old = sorted(k[:2] for k in chosen if k[2] == "old")
    assert old == [("day", at(23)), ("week", MONDAY), ("week", MONDAY + WEEK_MS)]


def test_random_missing_rows_never_lose_or_double_an_hour() -> None:
    rng = np.random.default_rng(11)
    for _ in range(60):
        start = MONDAY + int(rng.integers(-200, 200)) * HOUR_MS
        end = start + int(rng.integers(1, 700)) * HOUR_MS
        tiling = Tiling.of(start, end, "week")
        every = keys_of(tiling, [None], set())
        # Coarse rows go missing at random, and so do some hours (hours without events).
        keep = rng.random(len(every)) < np.where([k[0] == "hour" for k in every], 0.9, 0.6)
        keys = [k for k, kept in zip(every, keep.tolist(), strict=True) if kept]
        assert_chosen_tile_each_series(tiling, start, end, keys, tiling.choose(keys))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"metric": "trace.latency"}, UnknownMetric),
        ({"dimension_type": "model"}, UnknownDimension),  # traces are not sliced by model
        ({"dimension_value": "chat"}, UnknownDimension),
        ({"start_ms": MONDAY + 30 * 60_000}, BadRange),
        ({"end_ms": MONDAY + 1}, BadRange),
        ({"end_ms": MONDAY}, BadRange),
        ({"granularity": "month"}, QueryError),
    ],
)
def test_requests_are_checked(kwargs: dict, error: type[Exception]) -> None:
    request = {"metric": "trace.duration_ms", "start_ms": MONDAY, "end_ms": MONDAY + DAY_MS, **kwargs}
    with pytest.raises(error):
        RangeQuery(**request)


def test_describe_names_metric_series_and_range() -> None:
    request = RangeQuery("trace.duration_ms", MONDAY, MONDAY + WEEK_MS, dimension_type="operation_type")
    assert request.describe() == "trace.duration_ms by operation_type in [2025-11-24T00:00:00Z, 2025-12-01T00:00:00Z)"
    one = RangeQuery("llm.latency_ms", MONDAY, MONDAY + HOUR_MS, dimension_type="model", dimension_value="gpt-4o")
    assert one.describe() == "llm.latency_ms for model=gpt-4o in [2025-11-24T00:00:00Z, 2025-11-24T01:00:00Z)"


def hour_rows(hours: int, per_hour: int, start: int, kind: str | None = None, seed: int = 4) -> list[Row]:
    state = AggregateState(kinds(kind) if kind else kinds(), 10_000)
    state.ingest(make_events(hours=hours, per_hour=per_hour, seed=seed, start_ms=start))
    return state.rows()


def test_merging_a_day_row_with_hours_equals_merging_the_hours() -> None:
    start = at(26, 12)  # 36 hours: the rest of Wednesday, all of Thursday
    hours = [r for r in hour_rows(36, 400, start) if r.metric_name == "trace.duration_ms" and r.dimension_type is None]
    thursday = roll_up([r for r in hours if r.bucket_ms >= at(27)], "day")
    from_tiles = merge_rows([r for r in hours if r.bucket_ms < at(27)] + thursday, "total")
    from_hours = merge_rows(hours, "total")
    assert len(from_tiles) == len(from_hours) == 1
    tiles, direct = from_tiles[0], from_hours[0]
    assert (tiles.count, tiles.min, tiles.max) == (direct.count, direct.min, direct.max)
    assert tiles.count == sum(r.count for r in hours)
    assert tiles.sum == math.fsum([r.sum_value for r in hours if r.bucket_ms < at(27)] + [thursday[0].sum_value])
    assert tiles.sum == pytest.approx(direct.sum, rel=1e-15) and tiles.avg == tiles.sum / tiles.count
    assert tiles.p50 is not None and tiles.p50 == pytest.approx(direct.p50, rel=0.03)


def test_results_per_bucket_and_series_sorted() -> None:
    rows = [r for r in hour_rows(30, 300, at(26, 6)) if r.metric_name == "trace.count" and r.dimension_type == "kb_id"]
    results = merge_rows(rows, "day")
    keys = [(r.bucket_ms, r.dimension_value) for r in results]
    assert keys == sorted(keys) and {b for b, _ in keys} == {at(26), at(27)}
    for result in results:
        of_result = [r for r in rows if bucket_start_ms(r.bucket_ms, "day") == result.bucket_ms]
        assert result.count == sum(r.count for r in of_result if r.dimension_value == result.dimension_value)
        assert (result.sum, result.min, result.max, result.avg, result.p50, result.p95, result.p99) == (None,) * 7


def test_rows_of_different_sketch_kinds_merge_only_as_the_values_of_an_exact_one() -> None:
    def global_duration(kind: str, start: int, events: int) -> Row:
        rows = hour_rows(1, events, start, kind)
        return next(r for r in rows if r.metric_name == "trace.duration_ms" and r.dimension_type is None)

    busy, quiet = global_duration("req-hra-k64", at(26), 20_000), global_duration("kll-k200", at(26, 1), 200)
    (total,) = merge_rows([busy, quiet], "total")
    assert total.count == busy.count + quiet.count and total.max == max(busy.max_value, quiet.max_value)
    with pytest.raises(MixedSketchKinds, match="req-hra-k64.*kll-k200, both past exact mode"):
        merge_rows([busy, global_duration("kll-k200", at(26, 1), 20_000)], "total")


def test_json_object_has_exactly_the_contract_keys() -> None:
    total = QueryRow(None, "trace.count", None, None, 12)
    hourly = QueryRow(at(26, 13), "trace.duration_ms", "operation_type", "chat", 2, 3.0, 1.0, 2.0, 1.5, 1.5, 1.95, 1.99)
    keys = ["bucket_time", "metric_name", "dimension_type", "dimension_value", "count",
            "sum", "min", "max", "avg", "p50", "p95", "p99"]  # fmt: skip
    assert list(total.to_json()) == keys and list(hourly.to_json()) == keys
    assert total.to_json()["bucket_time"] is None and total.to_json()["p99"] is None
    assert hourly.to_json()["bucket_time"] == "2025-11-26T13:00:00Z"


def test_a_sum_past_the_float_range_is_null_in_json() -> None:
    """Two durations of 1e308 in an hour: the sum and avg are infinite, and json.dumps wrote
    Infinity, which is not JSON."""
    agg = Agg(Kind.parse("req-hra-k128"))
    agg.add_group([1e308, 1e308], 0)
    row = agg.to_row((at(26, 13), "trace.duration_ms", None, None), "hour")
    result = merge_rows([row], "total")[0]
    assert result.sum == math.inf
    text = json.dumps(result.to_json(), allow_nan=False)  # raises on a non-finite float
    assert json.loads(text)["sum"] is None and json.loads(text)["avg"] is None and json.loads(text)["max"] == 1e308
