"""A week's p50/p95/p99 of trace.duration_ms by operation_type: streamagg query against the raw-table SQL.

Generates DAYS days of synthetic traces starting on a Monday, aggregates them in-process into
hour rows (every trace metric and slice), rolls those up into days and weeks, and loads the same
traces as raw rows (COPY) into bench_raw.traces of the same PostgreSQL. Then, for the whole ISO
week (answered from week rows) and for a 6-day range from Monday noon (day and hour rows):
  (a) query(): the Python function on an open connection pool, as a dashboard would call it;
  (a') `streamagg query --format json`: the command end to end, a new process each time;
  (b) the original SQL, PERCENTILE_CONT over the raw rows grouped by operation_type.
Each is repeated; prints median latencies, the ratio raw / query and the worst relative
difference between the two answers' percentiles. Uses the configured PostgreSQL, else the local
stack; a fresh database, dropped at the end unless --keep.

    .venv/bin/python -m bench.query [--traces-per-hour 6000] [--days 7] [--repeats 20]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from rich.console import Console

from streamagg.aggregate import AggregateState
from streamagg.buckets import DAY_MS, HOUR_MS, WEEK_MS, bucket_start_ms, rfc3339, to_datetime
from streamagg.demo import drop_databases, env_without_settings, fresh_database, resolve_target
from streamagg.events import Event, validate
from streamagg.query import QueryRow, RangeQuery, query
from streamagg.rollup import rollup
from streamagg.settings import Settings, load_settings
from streamagg.store import Store
from streamagg.synth import Synth, SynthConfig

METRIC = "trace.duration_ms"
DIMENSION = "operation_type"
BAR = 0.01  # the accuracy bar of bench/accuracy, at p50, p95 and p99
RAW_COLUMNS = ("trace_id", "operation_type", "started_at", "duration_ms", "status", "user_id", "kb_id",
               "total_tokens", "cost_usd")  # fmt: skip
RAW_TABLE = """
CREATE SCHEMA bench_raw;
CREATE TABLE bench_raw.traces (trace_id text, operation_type text, started_at timestamptz, duration_ms float8,
                               status text, user_id text, kb_id text, total_tokens bigint, cost_usd float8)
"""
RAW_SQL = """
SELECT operation_type, percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY duration_ms)
FROM bench_raw.traces WHERE status = 'success' AND started_at >= $1 AND started_at < $2
GROUP BY operation_type
"""
RAW_COUNTS = """
SELECT operation_type, count(*) FROM bench_raw.traces
WHERE status = 'success' AND started_at >= $1 AND started_at < $2 GROUP BY operation_type
"""
_WRITE_CHUNK = 20_000


@dataclass
class Measured:
    name: str
    start_ms: int
    end_ms: int
    query_seconds: float
    cli_seconds: float
    raw_seconds: float
    rows_read: dict[str, int]
    worst: list[float]  # relative difference per rank, worst over the operation types
    counts_equal: bool


def raw_record(event: Event) -> tuple[Any, ...]:
    fields = event.fields
    return (fields["trace_id"], fields["operation_type"], to_datetime(event.time_ms), float(fields["duration_ms"]),
            fields["status"], fields.get("user_id"), fields.get("kb_id"), fields.get("total_tokens"),
            fields.get("cost_usd"))  # fmt: skip


async def load(store: Store, dsn: str, settings: Settings, args: argparse.Namespace, start: int, err: Console) -> None:
    """Hour rows of every trace metric and slice, their days and weeks, and the raw traces, a day at a time."""
    synth = Synth(args.seed, SynthConfig(users=args.users, kind_shares={"traces": 1.0}))
    stream = synth.events(start, args.days * 24, args.traces_per_hour)
    state = AggregateState(settings.metric_sketch_kinds(), settings.max_series_per_dimension)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(RAW_TABLE)
        for day in range(args.days):
            began = time.perf_counter()
            events = [validate(kind, event) for kind, _, event in itertools.islice(stream, 24 * args.traces_per_hour)]
            for hour in range(24):
                state.ingest(events[hour * args.traces_per_hour : (hour + 1) * args.traces_per_hour])
            rows = state.rows()
            for i in range(0, len(rows), _WRITE_CHUNK):
                await store.upsert_rows(rows[i : i + _WRITE_CHUNK])
            state.pop_hours(state.hours())
            await conn.copy_records_to_table("traces", schema_name="bench_raw", columns=RAW_COLUMNS,
                                             records=[raw_record(e) for e in events])  # fmt: skip
            err.print(f"  day {day + 1}/{args.days}: {len(events):,} traces, {len(rows):,} hour rows "
                      f"({time.perf_counter() - began:.1f} s)")  # fmt: skip
        await conn.execute("CREATE INDEX ON bench_raw.traces (started_at)")
        await conn.execute("ANALYZE bench_raw.traces")
    finally:
        await conn.close()
    end = start + args.days * DAY_MS
    for granularity in ("day", "week"):
        began = time.perf_counter()
        result = await rollup(store, granularity, start, end)  # type: ignore[arg-type]
        err.print(f"  {granularity} roll-up: {result.inserted:,} rows ({time.perf_counter() - began:.1f} s)")
    await store.execute("ANALYZE observability.metrics_aggregates")


async def median_seconds(repeats: int, call: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls after one warm-up call, and the last result."""
    result = await call()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        result = await call()
        times.append(time.perf_counter() - began)
    return statistics.median(times), result


def cli_seconds(dsn: str, request: RangeQuery, repeats: int) -> tuple[float, list[dict[str, Any]]]:
    """Median wall time of ``streamagg query --format json`` in a new process, and its output."""
    env = {**env_without_settings(), "STREAMAGG_DATABASE_URL": dsn}
    command = [sys.executable, "-m", "streamagg", "query", "--metric", request.metric, "--dimension", DIMENSION,
               "--from", rfc3339(request.start_ms), "--to", rfc3339(request.end_ms), "--format", "json"]  # fmt: skip
    times, output = [], ""
    for _ in range(repeats):
        began = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        times.append(time.perf_counter() - began)
        output = done.stdout
    return statistics.median(times), json.loads(output)


def worst_difference(results: list[QueryRow], raw: dict[str, list[float]]) -> list[float]:
    if {r.dimension_value for r in results} != set(raw):
        raise SystemExit(f"the answers name different operation types: {sorted(raw)} vs {results}")
    worst = [0.0, 0.0, 0.0]
    for row in results:
        for i, estimate in enumerate((row.p50, row.p95, row.p99)):
            truth = raw[row.dimension_value][i]  # type: ignore[index]
            worst[i] = max(worst[i], abs(estimate / truth - 1))  # type: ignore[operator]
    return worst


async def measure(store: Store, dsn: str, name: str, start: int, end: int, repeats: int) -> Measured:
    request = RangeQuery(METRIC, start, end, dimension_type=DIMENSION)
    query_s, results = await median_seconds(repeats, lambda: query(store, request))
    tiling = request.tiling()
    read = tiling.choose(await store.fetch_row_keys(METRIC, DIMENSION, None, tiling.lookups()))
    rows_read = {g: sum(1 for key in read if key[0] == g) for g in ("week", "day", "hour")}
    conn = await asyncpg.connect(dsn)
    try:
        bounds = (to_datetime(start), to_datetime(end))
        raw_s, raw_records = await median_seconds(max(3, repeats // 4), lambda: conn.fetch(RAW_SQL, *bounds))
        raw_counts = {r["operation_type"]: r["count"] for r in await conn.fetch(RAW_COUNTS, *bounds)}
    finally:
        await conn.close()
    raw = {r["operation_type"]: list(r["percentile_cont"]) for r in raw_records}
    cli_s, printed = cli_seconds(dsn, request, max(3, repeats // 4))
    if {(o["dimension_value"], o["count"]) for o in printed} != {(r.dimension_value, r.count) for r in results}:
        raise SystemExit("the command and the function disagree on the counts")
    return Measured(name, start, end, query_s, cli_s, raw_s, rows_read, worst_difference(results, raw),
                    {r.dimension_value: r.count for r in results} == raw_counts)  # fmt: skip


async def sizes(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        raw = await conn.fetchrow("SELECT count(*) AS rows, pg_total_relation_size('bench_raw.traces') AS bytes "
                                  "FROM bench_raw.traces")  # fmt: skip
        aggregates = await conn.fetch("SELECT granularity, count(*) FROM observability.metrics_aggregates GROUP BY 1")
        aggregate_bytes = await conn.fetchval("SELECT pg_total_relation_size('observability.metrics_aggregates')")
    finally:
        await conn.close()
    return {"raw_rows": raw["rows"], "raw_bytes": raw["bytes"], "aggregate_bytes": aggregate_bytes,
            "aggregate_rows": {r["granularity"]: r["count"] for r in aggregates}}  # fmt: skip


async def run(settings: Settings, args: argparse.Namespace, err: Console) -> tuple[list[Measured], dict[str, Any]]:
    name = f"streamagg_bench_query_{uuid.uuid4().hex[:8]}"
    dsn = await fresh_database(settings, name)
    # A Monday a few weeks back, so every hour is complete.
    start = bucket_start_ms(int(time.time() * 1000), "week") - (args.days // 7 + 2) * WEEK_MS
    try:
        async with await Store.open(dsn, settings.redacted_dsn()) as store:
            await store.migrate()
            err.print(f"loading {args.days} days x 24 h x {args.traces_per_hour:,} traces "
                      f"from {rfc3339(start)} into {name}")  # fmt: skip
            await load(store, dsn, settings, args, start, err)
            measured = [await measure(store, dsn, "ISO week (week rows)", start, start + WEEK_MS, args.repeats)]
            midweek = start + 12 * HOUR_MS
            measured.append(await measure(store, dsn, "Mon 12:00 + 6 days (day and hour rows)", midweek,
                                          midweek + 6 * DAY_MS, args.repeats))  # fmt: skip
        return measured, await sizes(dsn)
    finally:
        if not args.keep:
            await drop_databases(settings, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces-per-hour", type=int, default=6000)
    parser.add_argument("--days", type=int, default=7, help="of telemetry (at least 7: the week is measured)")
    parser.add_argument("--users", type=int, default=1000, help="distinct user_id values (each is a series)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--keep", action="store_true", help="keep the bench database")
    args = parser.parse_args(argv)
    if args.days < 7:
        parser.error("--days must be at least 7")
    err = Console(stderr=True)
    settings = resolve_target(load_settings(), err)
    measured, size = asyncio.run(run(settings, args, err))
    rows = size["aggregate_rows"]
    print(f"raw traces                  {size['raw_rows']:>12,} rows  {size['raw_bytes'] / 2**20:>8,.0f} MiB  "
          "(bench_raw.traces, index on started_at)")
    print(f"metrics_aggregates          {sum(rows.values()):>12,} rows  {size['aggregate_bytes'] / 2**20:>8,.0f} MiB  "
          f"({rows.get('hour', 0):,} hour, {rows.get('day', 0):,} day, {rows.get('week', 0):,} week)")  # fmt: skip
    for m in measured:
        read = ", ".join(f"{n} {g}" for g, n in m.rows_read.items() if n)
        print(f"\n{METRIC} p50/p95/p99 by {DIMENSION} over [{rfc3339(m.start_ms)}, {rfc3339(m.end_ms)}): {m.name}")
        print(f"  query()                   {m.query_seconds * 1000:>10.2f} ms   "
              f"median of {args.repeats}; merges {read} rows")  # fmt: skip
        print(f"  streamagg query (CLI)     {m.cli_seconds * 1000:>10.2f} ms   new process, end to end")
        print(f"  raw SQL percentile_cont   {m.raw_seconds * 1000:>10.2f} ms")
        print(f"  ratio raw / query()       {m.raw_seconds / m.query_seconds:>10.0f} x    "
              f"(target >= 100 x: {'met' if m.raw_seconds / m.query_seconds >= 100 else 'NOT met'})")  # fmt: skip
        print(f"  ratio raw / CLI           {m.raw_seconds / m.cli_seconds:>10.2f} x")
        print(f"  worst relative difference p50 {m.worst[0]:.3%}  p95 {m.worst[1]:.3%}  p99 {m.worst[2]:.3%}  "
              f"(bar {BAR:.0%}: {'within' if max(m.worst) <= BAR else 'OUTSIDE'}); "
              f"counts {'equal' if m.counts_equal else 'DIFFER'}")  # fmt: skip
    ok = all(max(m.worst) <= BAR and m.counts_equal for m in measured)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
