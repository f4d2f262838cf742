"""`streamagg demo`: the main job on embedded defaults, end to end on real parts.

1. Kafka and PostgreSQL: the configured ones, or (when neither is configured) the local
   stack, started if needed; a fresh database and fresh topics for this run.
2. A few hours of synthetic telemetry ending in the past, produced to Kafka.
3. The live worker (a real ``streamagg worker`` process) until those hours are flushed and
   rolled up, then stopped with SIGTERM.
4. A dashboard of the stored rows, and their accuracy against exact values computed from the
   same events. Exit 0 only if every row is present and count/sum/min/max are exact.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from rich.console import Console
from rich.table import Table

from .aggregate import Key
from .buckets import HOUR_MS, Granularity, bucket_start_ms, rfc3339, to_datetime
from .dashboard import Accuracy, accuracy, dashboard
from .errors import StreamaggError
from .events import validate
from .generate import generate
from .oracle import Exact, exact_hours, exact_rollup
from .settings import Settings
from .stack import Stack, free_port
from .store import Store
from .synth import Synth

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoPlan:
    hours: int = 4
    events_per_hour: int = 20_000
    seed: int = 7
    timeout_seconds: float = 600.0


_DATABASE_PATIENCE_SECONDS = 30.0


class DemoFailed(StreamaggError):
    pass


def run_demo(settings: Settings, plan: DemoPlan, console: Console, err: Console) -> bool:
    # SIGTERM and SIGHUP stop the demo as Ctrl-C does, through its clean-ups: its worker, a
    # child in its process group, outlived a demo killed by them.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    settings = resolve_target(settings, err)
    run = uuid.uuid4().hex[:8]
    database = asyncio.run(fresh_database(settings, f"streamagg_demo_{run}"))
    settings = settings.model_copy(
        update={
            "database_url": settings.database_url.__class__(database),
            "topic_prefix": f"demo-{run}.",
            "app_id": f"streamagg-demo-{run}",
            "partitions": 4,
            "flush_interval_seconds": 2.0,
            "grace_seconds": 5,
            "session_timeout_seconds": 6.0,
            "metrics_port": free_port(),
        }
    )
    start = bucket_start_ms(int(time.time() * 1000), "hour") - plan.hours * HOUR_MS
    end = start + plan.hours * HOUR_MS
    err.print(f"[bold]1.[/] producing {plan.hours} h x {plan.events_per_hour:,} events "
              f"({to_datetime(start):%Y-%m-%d %H:%M} to {to_datetime(end):%H:%M} UTC) to topics {settings.topic_prefix}*")  # fmt: skip
    produced = asyncio.run(generate(settings, plan.hours, plan.events_per_hour, plan.seed, start))
    events = [validate(kind, event) for kind, _, event in Synth(plan.seed).events(start, plan.hours, plan.events_per_hour)]
    hours = exact_hours(events)
    rolled = {granularity: exact_rollup(hours, granularity) for granularity in ("day", "week")}
    expected = exact_counts(hours, rolled)

    err.print(f"[bold]2.[/] running the worker on {produced.total:,} events; metrics on "
              f"http://{settings.metrics_host}:{settings.metrics_port}/metrics")  # fmt: skip
    started = time.monotonic()
    worker = subprocess.Popen(
        [sys.executable, "-m", "streamagg", "--quiet", "worker"],
        env={**env_without_settings(), **worker_env(settings)},
        stdin=subprocess.DEVNULL,
    )
    try:
        with err.status("waiting for the hours to be flushed and rolled up") as status:
            done = asyncio.run(wait_for_rows(settings, expected, worker, plan.timeout_seconds, status))
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    err.print(f"    all {len(expected['hour']):,} hour rows stored after {done['hour'] - started:.1f} s, every day and "
              f"week row rolled up from them after {max(done.values()) - started:.1f} s; worker stopped (exit {worker.returncode})")  # fmt: skip

    err.print("[bold]3.[/] reading the stored rows")
    rows = asyncio.run(_stored_rows(settings, start, end))
    last_hour = end - HOUR_MS
    day = bucket_start_ms(last_hour, "day")
    console.print(
        dashboard(
            [r for r in rows["hour"] if r.bucket_ms == last_hour],
            [r for r in rows["day"] if r.bucket_ms == day],
            f"{to_datetime(last_hour):%Y-%m-%d %H:00}",
            f"{to_datetime(day):%Y-%m-%d}",
        )
    )
    results = {"hour": accuracy(rows["hour"], hours)}
    for granularity, exact in rolled.items():
        results[granularity] = accuracy(rows[granularity], {k: v[0] for k, v in exact.items()}, {k: v[1] for k, v in exact.items()})
    console.print(_accuracy_table(results))
    ok = all(result.ok for result in results.values())
    console.print(
        f"{produced.total:,} events, {sum(r.rows for r in results.values()):,} rows compared with exact values: "
        + ("[green]every row present; count, sum, min and max exact[/]" if ok else "[red]MISMATCH[/]")
    )
    err.print(f"The rows stay in {settings.redacted_dsn()} for a look around, e.g. (`./dev streamagg` in a checkout):\n"
              f"    STREAMAGG_DATABASE_URL={settings.redacted_dsn()} streamagg query --metric trace.duration_ms "
              f"--dimension operation_type --from {rfc3339(start)} --to {rfc3339(end)}", soft_wrap=True)  # fmt: skip
    return ok


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def resolve_target(settings: Settings, err: Console) -> Settings:
    """The configured Kafka and PostgreSQL (a variable or its flag; one alone, the other's
    default), or the local stack when neither is."""
    if {"kafka_bootstrap", "database_url"} & settings.model_fields_set:
        err.print(f"[bold]0.[/] using the configured Kafka {settings.kafka_bootstrap} and PostgreSQL {settings.redacted_dsn()}")
        return settings
    err.print(f"[bold]0.[/] no Kafka/PostgreSQL configured: starting the local stack in {settings.stack_dir} "
              "(it keeps running for a look around; `streamagg stack down` stops it)")  # fmt: skip
    info = Stack(settings.stack_dir, settings.cache_dir).up()
    return settings.model_copy(
        update={"kafka_bootstrap": info.kafka_bootstrap, "database_url": settings.database_url.__class__(info.database_url)}
    )


def _dsn_of(settings: Settings, database: str) -> str:
    """The DSN of another database on the configured server (its parameters, e.g. sslmode, kept)."""
    return urlunsplit(urlsplit(settings.database_url.get_secret_value())._replace(path=f"/{database}"))


def database_of(settings: Settings) -> str:
    """The name of the configured database."""
    return urlsplit(settings.database_url.get_secret_value()).path.lstrip("/")


async def _server(settings: Settings) -> asyncpg.Connection:
    """A connection to the maintenance database of the configured server."""
    try:
        return await asyncpg.connect(_dsn_of(settings, "postgres"), timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise DemoFailed(f"cannot reach PostgreSQL at {settings.redacted_dsn()}: {type(exc).__name__}") from None


async def fresh_database(settings: Settings, name: str) -> str:
    conn = await _server(settings)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return _dsn_of(settings, name)


async def drop_databases(settings: Settings, name: str) -> None:
    """Drop the database ``name`` that :func:`fresh_database` made, and those named after it
    (``name_...``): a benchmark's, when it is done."""
    conn = await _server(settings)
    try:
        doomed = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname = $1 OR starts_with(datname, $1 || '_')", name
        )
        for (datname,) in doomed:
            await conn.execute(f'DROP DATABASE IF EXISTS "{datname}" WITH (FORCE)')
    finally:
        await conn.close()


def exact_counts(
    hours: Mapping[Key, Exact], rolled: Mapping[Granularity, Mapping[Key, tuple[Exact, float]]]
) -> dict[Granularity, dict[Key, int]]:
    """Every hour row's exact count and, from ``rolled`` (:func:`exact_rollup` per granularity),
    every day and week row's: what :func:`wait_for_rows` and :func:`rows_match` expect."""
    counts: dict[Granularity, dict[Key, int]] = {"hour": {key: exact.count for key, exact in hours.items()}}
    for granularity, rows in rolled.items():
        counts[granularity] = {key: exact.count for key, (exact, _) in rows.items()}
    return counts


def worker_env(settings: Settings) -> dict[str, str]:
    import json

    out = {}
    for name, value in settings.model_dump().items():
        if value is None:  # unset: the worker's default
            continue
        if name == "database_url":
            value = settings.database_url.get_secret_value()
        out[f"STREAMAGG_{name.upper()}"] = json.dumps(value) if isinstance(value, dict) else str(value)
    return out


def env_without_settings() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAMAGG_")}


async def wait_for_rows(
    settings: Settings, expected: dict[Granularity, dict[Key, int]], worker: subprocess.Popen, timeout: float,
    status: object,
) -> dict[Granularity, float]:
    """Until every expected row (by granularity, key: count) is stored with its count; returns
    when (``time.monotonic()``) each granularity's row totals were first seen complete, for good:
    the poll that saw them, not the row-by-row check that confirms them afterwards.

    Polls row totals (one row back per granularity, so the wait takes no CPU from the worker
    it waits for) and compares every row only once the totals match."""
    deadline = time.monotonic() + timeout
    ranges = _ranges(expected)
    totals = {g: (len(wanted), sum(wanted.values())) for g, wanted in expected.items()}
    rows_wanted = sum(n for n, _ in totals.values())
    what = "hours to be flushed" if set(expected) == {"hour"} else "hours to be flushed and rolled up"
    complete: dict[Granularity, float] = {}
    failing_since: float | None = None
    async with await Store.open(settings.database_url.get_secret_value(), settings.redacted_dsn()) as store:
        while True:
            if worker.poll() is not None:
                raise DemoFailed(f"the worker exited with status {worker.returncode}")
            try:
                stored = {g: await store.row_totals(g, *ranges[g]) for g in expected}
                failing_since = None
            except StreamaggError as exc:
                stored = {g: (0, 0) for g in expected}
                # No table yet: the worker has not migrated. Anything else (a server that went
                # away) for long is the end: the wait lasted its whole timeout.
                if not isinstance(exc.__cause__, asyncpg.UndefinedTableError):
                    failing_since = failing_since or time.monotonic()
                    if time.monotonic() - failing_since > _DATABASE_PATIENCE_SECONDS:
                        raise DemoFailed(f"PostgreSQL at {settings.redacted_dsn()} failed for "
                                         f"{_DATABASE_PATIENCE_SECONDS:.0f} s: {exc}") from None  # fmt: skip
            status.update(f"waiting for the {what}: {sum(n for n, _ in stored.values()):,}/{rows_wanted:,} rows")  # type: ignore[attr-defined]
            polled = time.monotonic()
            for granularity in expected:
                if stored[granularity] == totals[granularity]:
                    complete.setdefault(granularity, polled)
                else:  # incomplete again (a row rewritten): its time is that of a later poll
                    complete.pop(granularity, None)
            if stored == totals and await rows_match(store, expected):
                return complete
            if time.monotonic() > deadline:
                raise DemoFailed(f"the rows were not all final after {timeout:.0f} s: stored (rows, total count) "
                                 f"{stored}, expected {totals}")  # fmt: skip
            await asyncio.sleep(0.5)


def _ranges(expected: dict[Granularity, dict[Key, int]]) -> dict[Granularity, tuple[int, int]]:
    """Per granularity, the bucket range [first, last] of the expected rows."""
    return {g: (min(k[0] for k in wanted), max(k[0] for k in wanted) + 1) for g, wanted in expected.items()}


async def rows_match(store: Store, expected: dict[Granularity, dict[Key, int]]) -> bool:
    """Whether the stored rows in the expected rows' range are exactly those, with those counts."""
    for granularity, (start, end) in _ranges(expected).items():
        rows = await store.fetch_rows(granularity, start, end)
        if {row.key: row.count for row in rows} != expected[granularity]:
            return False
    return True


async def _stored_rows(settings: Settings, start: int, end: int) -> dict:
    async with await Store.open(settings.database_url.get_secret_value(), settings.redacted_dsn()) as store:
        week = bucket_start_ms(start, "week")
        return {
            granularity: await store.fetch_rows(granularity, week, end + 7 * 24 * HOUR_MS)  # type: ignore[arg-type]
            for granularity in ("hour", "day", "week")
        }


def _accuracy_table(results: dict[str, Accuracy]) -> Table:
    table = Table(title="accuracy against exact values computed from the same events")
    for column in ("granularity", "rows", "missing", "extra", "count/sum/min/max exact",
                   "p50 worst err", "p95 worst err", "p99 worst err", "p99 worst err, >=1000 values"):  # fmt: skip
        table.add_column(column, justify="right")
    for granularity, result in results.items():
        exact_rows = result.rows - len(result.exact_mismatches)
        table.add_row(
            granularity,
            f"{result.rows:,}",
            str(len(result.missing)),
            str(len(result.extra)),
            f"{exact_rows:,}/{result.rows:,}",
            *(f"{result.worst_error[rank]:.3%}" for rank in (0.5, 0.95, 0.99)),
            f"{result.worst_error_large[0.99]:.3%}",
        )
    return table
