"""streamagg query on a real PostgreSQL: ranges that need week, day and hour rows together answer
like merging the covered hour rows directly, and like the exact values of the same events; a
missing roll-up row is replaced by its days or hours; the CLI prints the contract's JSON."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pytest

from sketches import Sketch
from streamagg.aggregate import AggregateState, Row
from streamagg.buckets import DAY_MS, HOUR_MS, bucket_start_ms, rfc3339, to_datetime, to_ms
from streamagg.catalogue import METRICS_BY_NAME
from streamagg.oracle import Exact, exact_hours, quantiles
from streamagg.query import QueryGranularity, QueryRow, RangeQuery, query
from streamagg.rollup import rollup
from streamagg.store import Store
from tests.unit.test_aggregate import RANK_TOLERANCE, RANKS, kinds, make_events, rank_error


def at(day: int, hour: int = 0, month: int = 11) -> int:
    """Epoch ms of 2025-``month``-``day`` ``hour``:00 UTC (2025-11-24 is a Monday)."""
    return to_ms(datetime(2025, month, day, hour, tzinfo=UTC))


START = at(22)  # a Saturday; ten days of telemetry, through Monday 2025-12-01
HOURS = 240
METRICS = ("trace.duration_ms", "trace.count", "llm.latency_ms")
CONTRACT_KEYS = ("bucket_time", "metric_name", "dimension_type", "dimension_value", "count",
                 "sum", "min", "max", "avg", "p50", "p95", "p99")  # fmt: skip

SERIES = {
    "global": ("trace.duration_ms", None, None),
    "by operation_type": ("trace.duration_ms", "operation_type", None),
    "model=gpt-4o": ("llm.latency_ms", "model", "gpt-4o"),
    "count by kb_id": ("trace.count", "kb_id", None),
}
RANGES = {  # name: (start, end, the granularities of the rows a total over it reads)
    "hours, a day, a week, hours": (at(22, 9), at(1, 15, month=12), {"hour", "day", "week"}),
    "mid-week across the ISO week boundary": (at(26, 13), at(2, month=12), {"hour", "day"}),
    "starting before the data": (at(17), at(26), {"day", "week"}),
}


@dataclass(frozen=True)
class Telemetry:
    hours: list[Row]
    exact: dict[tuple, Exact]


@pytest.fixture(scope="module")
def telemetry() -> Telemetry:
    """Hour rows of ten days of synthetic events, aggregated in-process, and their exact values."""
    events = make_events(hours=HOURS, per_hour=300, seed=31, users=20, start_ms=START)
    state = AggregateState(kinds(), 10_000)
    state.ingest(events)
    rows = [row for row in state.rows() if row.metric_name in METRICS]
    exact = {key: value for key, value in exact_hours(events).items() if key[1] in METRICS}
    return Telemetry(rows, exact)


async def load(dsn: str, hours: list[Row]) -> None:
    async with await Store.open(dsn, dsn) as store:
        await store.migrate()
        await store.upsert_rows(hours)
        for granularity in ("day", "week"):
            await rollup(store, granularity, START, START + HOURS * HOUR_MS)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def loaded(database_factory: Callable[[], str], telemetry: Telemetry) -> str:
    """A database holding the hour rows and their day and week roll-ups (read-only for tests)."""
    dsn = database_factory()
    asyncio.run(load(dsn, telemetry.hours))
    return dsn


async def run_query(dsn: str, request: RangeQuery, *setup: str) -> tuple[list[QueryRow], list[Row]]:
    """The results, and the stored rows the query merged (to see which granularities it used)."""
    async with await Store.open(dsn, dsn) as store:
        for statement in setup:
            await store.execute(statement)
        read: list[Row] = []
        fetch = store.fetch_rows_by_keys

        async def spy(*args: object) -> list[Row]:
            rows = await fetch(*args)  # type: ignore[arg-type]
            read.extend(rows)
            return rows

        store.fetch_rows_by_keys = spy  # type: ignore[method-assign]
        return await query(store, request), read


def assert_equals_merged_hours(results: list[QueryRow], request: RangeQuery, telemetry: Telemetry) -> None:
    """Each result against the covered hour rows merged directly and against the exact values."""
    groups: defaultdict[tuple, list[Row]] = defaultdict(list)
    for row in telemetry.hours:
        if (
            row.metric_name == request.metric
            and row.dimension_type == request.dimension_type
            and request.dimension_value in (None, row.dimension_value)
            and request.start_ms <= row.bucket_ms < request.end_ms
        ):
            bucket = None if request.granularity == "total" else bucket_start_ms(row.bucket_ms, request.granularity)
            groups[(bucket, row.dimension_value)].append(row)
    assert groups, "the range must hold rows"
    by_key = {(r.bucket_ms, r.dimension_value): r for r in results}
    assert sorted(by_key, key=repr) == sorted(groups, key=repr)
    assert all(r.metric_name == request.metric and r.dimension_type == request.dimension_type for r in results)
    for key, hours in groups.items():
        result = by_key[key]
        exact = [telemetry.exact[row.key] for row in hours]
        assert result.count == sum(row.count for row in hours) == sum(e.count for e in exact), key
        if not METRICS_BY_NAME[request.metric].is_full:
            assert (result.sum, result.min, result.max, result.avg, result.p50, result.p95, result.p99) == (None,) * 7
            continue
        values = [v for e in exact for v in e.values]
        assert result.min == min(row.min_value for row in hours) == min(values), key
        assert result.max == max(row.max_value for row in hours) == max(values), key
        # Coarse rows hold the exact sum of their hours' sums (sum_parts): the hours' sums added, to the bit.
        assert result.sum == math.fsum(row.sum_value for row in hours), key
        assert result.sum == pytest.approx(math.fsum(values), rel=1e-14, abs=0), key
        assert result.avg == result.sum / result.count
        merged = Sketch.deserialize(hours[0].sketch_kind, hours[0].sketch)  # type: ignore[arg-type]
        for row in hours[1:]:
            merged.merge(Sketch.deserialize(row.sketch_kind, row.sketch))  # type: ignore[arg-type]
        estimates = [result.p50, result.p95, result.p99]
        if merged.is_exact:
            assert estimates == quantiles(values, np.float32), key  # the merged sketch's, within [min, max]
        else:
            for rank, estimate in zip(RANKS, estimates, strict=True):
                assert rank_error(values, estimate, rank) <= RANK_TOLERANCE, (key, rank)


@pytest.mark.parametrize("granularity", ["total", "day", "week"])
@pytest.mark.parametrize("span", list(RANGES))
@pytest.mark.parametrize("series", list(SERIES))
def test_query_equals_merging_the_covered_hours(
    loaded: str, telemetry: Telemetry, series: str, span: str, granularity: QueryGranularity
) -> None:
    metric, dimension_type, dimension_value = SERIES[series]
    start, end, used = RANGES[span]
    request = RangeQuery(metric, start, end, granularity, dimension_type, dimension_value)
    results, read = asyncio.run(run_query(loaded, request))
    assert_equals_merged_hours(results, request, telemetry)
    if granularity == "total":
        assert {row.granularity for row in read} == used  # the coarsest rows, not the hours


@pytest.mark.parametrize("series", list(SERIES))
def test_hour_granularity_reads_hour_rows(loaded: str, telemetry: Telemetry, series: str) -> None:
    metric, dimension_type, dimension_value = SERIES[series]
    request = RangeQuery(metric, at(26, 20), at(28, 2), "hour", dimension_type, dimension_value)
    results, read = asyncio.run(run_query(loaded, request))
    assert_equals_merged_hours(results, request, telemetry)
    assert {row.granularity for row in read} == {"hour"}
    assert len({r.bucket_ms for r in results}) == 30


def test_missing_rollup_rows_are_replaced_by_their_days_and_hours(
    database_factory: Callable[[], str], telemetry: Telemetry
) -> None:
    dsn = database_factory()
    asyncio.run(load(dsn, telemetry.hours))
    table = "observability.metrics_aggregates"
    metric = "metric_name = 'trace.duration_ms'"
    delete = [
        # The global week of Nov 24 and its Wednesday were never rolled up: its days, and Wednesday's hours, stand in.
        f"DELETE FROM {table} WHERE {metric} AND dimension_type IS NULL AND granularity = 'week' "
        f"AND bucket_time = '{rfc3339(at(24))}'",
        f"DELETE FROM {table} WHERE {metric} AND dimension_type IS NULL AND granularity = 'day' "
        f"AND bucket_time = '{rfc3339(at(26))}'",
        # One operation type lacks its week row while the others have theirs.
        f"DELETE FROM {table} WHERE {metric} AND dimension_value = 'chat' AND granularity = 'week'",
    ]
    request = RangeQuery("trace.duration_ms", at(22, 9), at(1, 15, month=12))
    results, read = asyncio.run(run_query(dsn, request, *delete))
    assert_equals_merged_hours(results, request, telemetry)
    in_week = [row for row in read if at(24) <= row.bucket_ms < at(1, month=12)]
    assert {row.granularity for row in in_week} == {"day", "hour"}
    assert {bucket_start_ms(row.bucket_ms, "day") for row in in_week if row.granularity == "hour"} == {at(26)}

    by_type = RangeQuery("trace.duration_ms", at(22, 9), at(1, 15, month=12), dimension_type="operation_type")
    results, read = asyncio.run(run_query(dsn, by_type))
    assert_equals_merged_hours(results, by_type, telemetry)
    week_rows = {row.dimension_value for row in read if row.granularity == "week"}
    assert "chat" not in week_rows and len(week_rows) == 5
    assert any(row.dimension_value == "chat" and row.granularity == "day" and row.bucket_ms >= at(24) for row in read)

    # No roll-up ran at all: hours only, same answer.
    results, read = asyncio.run(run_query(dsn, by_type, f"DELETE FROM {table} WHERE granularity <> 'hour'"))
    assert_equals_merged_hours(results, by_type, telemetry)
    assert {row.granularity for row in read} == {"hour"}


def test_ranges_without_rows_give_an_empty_list(loaded: str) -> None:
    for request in (
        RangeQuery("trace.duration_ms", at(3, month=11), at(10, month=11)),
        RangeQuery("trace.duration_ms", at(22), at(2, month=12), "day", "operation_type", "no-such-operation"),
        RangeQuery("document.count", at(22), at(2, month=12)),  # not loaded
    ):
        assert asyncio.run(run_query(loaded, request))[0] == []


def cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAMAGG_")}
    env["STREAMAGG_DATABASE_URL"] = dsn
    return subprocess.run(
        [sys.executable, "-m", "streamagg", "query", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_json_has_exactly_the_contract_keys(loaded: str, telemetry: Telemetry) -> None:
    start, end, _ = RANGES["hours, a day, a week, hours"]
    # Both spellings of RFC 3339 UTC.
    times = ["--from", to_datetime(start).isoformat(), "--to", to_datetime(end).strftime("%Y-%m-%dT%H:%M:%SZ")]
    args = ["--metric", "trace.duration_ms", "--dimension", "operation_type", *times]
    done = cli(loaded, *args, "--format", "json")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert isinstance(printed, list) and len(printed) == 6
    assert all(set(obj) == set(CONTRACT_KEYS) and obj["bucket_time"] is None for obj in printed)
    results = [QueryRow(None, *(obj[key] for key in CONTRACT_KEYS[1:])) for obj in printed]
    request = RangeQuery("trace.duration_ms", start, end, dimension_type="operation_type")
    assert_equals_merged_hours(results, request, telemetry)

    by_day = cli(loaded, *args, "--granularity", "day", "--format", "json")
    assert by_day.returncode == 0, by_day.stderr
    days = json.loads(by_day.stdout)
    assert {obj["bucket_time"] for obj in days} == {rfc3339(day) for day in range(at(22), end, DAY_MS)}
    assert rfc3339(at(1, month=12)) == "2025-12-01T00:00:00Z"

    table = cli(loaded, *args)
    assert table.returncode == 0 and "operation_type=summarize" in table.stdout and table.stdout.count("\n") > 6


def test_cli_says_when_no_rows_and_fails_in_one_line(loaded: str) -> None:
    week = ["--from", "2020-01-01", "--to", "2020-01-08"]
    empty = cli(loaded, "--metric", "trace.duration_ms", *week, "--format", "json")
    assert empty.returncode == 0 and json.loads(empty.stdout) == []
    assert "no rows for trace.duration_ms in [2020-01-01T00:00:00Z, 2020-01-08T00:00:00Z)" in empty.stderr
    empty_table = cli(loaded, "--metric", "trace.duration_ms", *week)
    assert empty_table.returncode == 0 and empty_table.stdout == "" and "no rows" in empty_table.stderr
    unknown = cli(loaded, "--metric", "trace.latency", "--from", "2025-11-22", "--to", "2025-11-23")
    assert unknown.returncode != 0 and unknown.stdout == ""
    assert len(unknown.stderr.strip().splitlines()) == 1 and "unknown metric 'trace.latency'" in unknown.stderr
