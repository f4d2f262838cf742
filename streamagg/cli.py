"""Command line: arguments -> Settings -> the pieces. stdout carries results, stderr the rest.

Every setting of :class:`~streamagg.settings.Settings` is also a flag of the same name
(``STREAMAGG_PARTITIONS`` <-> ``--partitions``) that overrides the environment.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click
from click.exceptions import NoArgsIsHelpError

from .catalogue import METRICS_BY_NAME
from .errors import StreamaggError
from .logs import configure_logging
from .settings import Settings, load_settings

log = logging.getLogger("streamagg")


def _settings_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add one ``--flag`` per setting; the command receives ``settings`` built from env + flags."""
    names = list(Settings.model_fields)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        overrides = {name: kwargs.pop(name) for name in names}
        try:
            settings = load_settings(overrides)
        except StreamaggError as exc:  # one line, like the command's own errors (_fail_cleanly)
            raise click.ClickException(str(exc)) from exc
        return func(*args, settings=settings, **kwargs)

    for name in reversed(names):
        field = Settings.model_fields[name]
        wrapper = click.option(
            f"--{name.replace('_', '-')}",
            name,
            default=None,
            metavar="VALUE",
            help=f"{field.description} [env STREAMAGG_{name.upper()}]",
        )(wrapper)
    return wrapper


def _fail_cleanly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn streamagg's own errors into one line on stderr and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except StreamaggError as exc:
            raise click.ClickException(str(exc)) from exc
        except OSError as exc:  # a stack or cache directory that is a file, not writable, a full disk
            if logging.getLogger("streamagg").isEnabledFor(logging.DEBUG):
                raise  # -v: the traceback
            said = exc.strerror or str(exc) or type(exc).__name__  # a bare TimeoutError says nothing
            raise click.ClickException(f"{said}{f': {exc.filename}' if exc.filename else ''}") from exc

    return wrapper


class _UsageError(click.UsageError):
    """A usage error in one line (CONTRACT section 5), like the other errors, and where the help
    is; click's own takes three: the usage, a hint and the error."""

    def show(self, file: Any = None) -> None:
        path = self.ctx.command_path if self.ctx is not None else "streamagg"
        click.echo(f"Error: {self.format_message().rstrip('.')}; see '{path} --help'", file=file, err=file is None)


class _Command(click.Command):
    """A command whose usage errors are one line and name it (the parser raises some, an option
    without its value, with no context: the hint would name the top command)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _one_line(exc, ctx) from None


class _Commands(_Command, click.Group):
    """A command group: its subcommands, and the usage errors raised while it hands the rest of
    the arguments to one (no such command) or runs it, in one line too. A group run without
    arguments still shows its help."""

    command_class = _Command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _one_line(exc, ctx) from None


def _one_line(exc: click.UsageError, ctx: click.Context) -> click.UsageError:
    if isinstance(exc, _UsageError | NoArgsIsHelpError):
        return exc
    one = _UsageError(exc.format_message(), exc.ctx or ctx)
    one.exit_code = exc.exit_code
    return one


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="debug output of streamagg on stderr (-vv: of the libraries too)")
@click.option("-q", "--quiet", is_flag=True, help="warnings and errors only on stderr")
def main(verbose: int, quiet: bool) -> None:
    """streamagg: streaming, incremental aggregation of observability telemetry.

    Consumes trace, span, document and chat events from Kafka, keeps count/sum/min/max and
    mergeable quantile sketches per (hour, metric, dimension), and writes them to PostgreSQL's
    observability.metrics_aggregates. Settings come from STREAMAGG_* variables or the flags
    of the same name.
    """
    configure_logging(verbose, quiet)


@main.group(cls=_Commands)
def stack() -> None:
    """A local Kafka (KRaft, from Maven Central) and PostgreSQL on loopback, for development."""


@stack.command("up")
@click.option("--kafka-port", type=int, default=None, help="broker port (default 9092 if free, else any free port)")
@click.option("--postgres-port", type=int, default=None, help="PostgreSQL port (default 5432 if free, else any)")
@_settings_options
@_fail_cleanly
def stack_up(settings: Settings, kafka_port: int | None, postgres_port: int | None) -> None:
    """Start the stack (idempotent) and print the export lines:  eval "$(streamagg stack up)" """
    from .stack import Stack

    info = Stack(settings.stack_dir, settings.cache_dir).up(kafka_port, postgres_port)
    click.echo(info.exports(), nl=False)


@stack.command("down")
@_settings_options
@_fail_cleanly
def stack_down(settings: Settings) -> None:
    """Stop the stack and remove its data; no process is left behind."""
    from .stack import Stack

    Stack(settings.stack_dir, settings.cache_dir).down()


@stack.command("status")
@_settings_options
@_fail_cleanly
def stack_status(settings: Settings) -> None:
    """Report whether Kafka and PostgreSQL run and where (JSON on stdout; exit 3 if not both)."""
    from .stack import Stack

    status = Stack(settings.stack_dir, settings.cache_dir).status()
    click.echo(json.dumps(status, indent=2))
    if not all(component["running"] for component in status.values()):
        sys.exit(3)


@stack.command("check")
@_settings_options
@_fail_cleanly
def stack_check(settings: Settings) -> None:
    """Smoke check: a record through Kafka and a query through PostgreSQL, at the configured addresses."""
    from .smoke import smoke_check

    for line in smoke_check(settings):
        click.echo(line)


class _Time(click.ParamType):
    """A time T: RFC 3339 (``2026-11-26T13:00:00Z``; no offset means UTC) or a date (midnight UTC)."""

    name = "T"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        from .events import Rejected, parse_timestamp

        text = f"{value}T00:00:00Z" if isinstance(value, str) and len(value) == 10 else value  # a date: its midnight UTC
        try:
            return parse_timestamp(param.name if param else "time", text)
        except Rejected as exc:
            self.fail(f"{value!r} is not an RFC 3339 time or a date", param, ctx)
            raise AssertionError from exc  # unreachable: fail() raises


TIME = _Time()


def _run(coro: Any) -> Any:
    import asyncio

    return asyncio.run(coro)


@main.command()
@_settings_options
@_fail_cleanly
def migrate(settings: Settings) -> None:
    """Create or upgrade the schema (versioned SQL; idempotent)."""
    from .store import Store

    async def run() -> list[str]:
        async with await Store.open(settings.database_url.get_secret_value(), settings.redacted_dsn()) as store:
            return await store.migrate()

    applied = _run(run())
    click.echo("\n".join(applied) if applied else "schema up to date")


@main.command()
@click.option("--granularity", type=click.Choice(["day", "week"]), required=True)
@click.option("--from", "start", type=TIME, required=True, help="start T (inclusive)")
@click.option("--to", "end", type=TIME, required=True, help="end T (exclusive)")
@_settings_options
@_fail_cleanly
def rollup(settings: Settings, granularity: str, start: int, end: int) -> None:
    """Recompute day or week rows overlapping [from, to) by merging stored hour rows; delete
    those whose series has no hour row left in their bucket.

    Each batch of series is read and written under the same locks the workers' roll-ups take,
    so it is safe to run while workers run (the 01:00 schedule does the same for yesterday)."""
    from .rollup import rollup as run_rollup
    from .store import Store

    if end <= start:
        raise click.BadParameter("--to must be after --from")

    async def run() -> Any:
        async with await Store.open(settings.database_url.get_secret_value(), settings.redacted_dsn()) as store:
            return await run_rollup(store, granularity, start, end)  # type: ignore[arg-type]

    result = _run(run())
    click.echo(f"{granularity} rows: {result.inserted} inserted, {result.updated} updated, {result.unchanged} unchanged, "
               f"{result.deleted} deleted")


@main.command()
@click.option("--metric", required=True, metavar="M", help=f"a metric of the catalogue: {', '.join(METRICS_BY_NAME)}")
@click.option(
    "--dimension",
    metavar="TYPE[=VALUE]",
    default=None,
    help="TYPE: one series per value of that dimension type; TYPE=VALUE: that series only; "
    "without: the global slice",
)
@click.option("--from", "start", type=TIME, required=True, help="start T (inclusive), on an hour boundary")
@click.option("--to", "end", type=TIME, required=True, help="end T (exclusive), on an hour boundary")
@click.option(
    "--granularity",
    type=click.Choice(["hour", "day", "week", "total"]),
    default="total",
    show_default=True,
    help="total: one result per series over the whole range; hour|day|week: one per bucket overlapping it",
)
@click.option(
    "--format",
    "output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table: for a terminal; json: one JSON array for programs",
)
@_settings_options
@_fail_cleanly
def query(
    settings: Settings, metric: str, dimension: str | None, start: int, end: int, granularity: str, output: str
) -> None:
    """Aggregates of a metric over [from, to), merged from stored rows.

    Count, sum, min, max, avg, p50, p95 and p99 (count only for count metrics), read from the
    coarsest stored rows that tile the range: whole ISO weeks (Monday 00:00 UTC) from week
    rows, whole days from day rows, the remaining hours from hour rows; where a week or day
    row is missing (not rolled up yet), its days or hours stand in. Percentiles come from the
    merged sketches. --format json prints one JSON array of objects with the keys bucket_time
    (null for total), metric_name, dimension_type, dimension_value, count, sum, min, max, avg,
    p50, p95, p99. A range without rows prints nothing (json: []) and says so on stderr.
    """
    from .dashboard import query_table
    from .query import RangeQuery, run_query

    dimension_type, dimension_value = None, None
    if dimension is not None:
        dimension_type, has_value, value = dimension.partition("=")
        dimension_value = value if has_value else None
    request = RangeQuery(metric, start, end, granularity, dimension_type, dimension_value)  # type: ignore[arg-type]
    rows = run_query(settings, request)
    if output == "json":
        click.echo(json.dumps([row.to_json() for row in rows], indent=2))
    elif rows:
        _tables_console().print(query_table(rows, request.describe()))
    if not rows:
        click.echo(f"no rows for {request.describe()}", err=True)


@main.command()
@click.option("--from", "start", type=TIME, default=None, help="start T, rounded down to a whole hour")
@click.option("--to", "end", type=TIME, default=None, help="end T (exclusive), rounded up to a whole hour")
@click.option("--allow-partial", is_flag=True, help="if retention deleted the start of the range, rebuild the hours after it")
@click.option("--dry-run", is_flag=True, help="write nothing; list per hour the rows that would change")
@_settings_options
@_fail_cleanly
def backfill(settings: Settings, start: int | None, end: int | None, allow_partial: bool, dry_run: bool) -> None:
    """Recompute every hour in [from, to) by replaying the source topics, then its days and weeks.

    Without --from/--to: the previous complete hour. A from/to inside an hour is rounded
    outward to whole UTC hours (an hour row is rebuilt whole or not at all). Each partition is
    read from the first record at from - STREAMAGG_MAX_LATENESS_SECONDS to its end when the
    backfill starts, by a consumer outside the worker's group: a running worker is undisturbed
    and its committed offsets do not move. Every event of the hours counts, also those the
    worker dead-lettered as too late (the summary says how many).
    Rebuilt hours hold exactly what the topics hold (rows the replay finds no events for are
    deleted) except where a worker has read further; a second run changes nothing.

    If retention deleted records the range needs, the backfill refuses and names the first
    hour that can be rebuilt; --allow-partial rebuilds from that hour on and leaves earlier
    hours alone. stdout: per hour, the hour rows inserted, changed, deleted and unchanged (with
    --dry-run: that would be). Progress on stderr. Prometheus progress metrics are served only
    when --metrics-port is given on the command line (the variable is the live worker's).
    """
    import time

    from prometheus_client import CollectorRegistry

    from .backfill import backfill as run_backfill
    from .backfill import hour_range, iso
    from .state import collect_less_often
    from .store import Store
    from .telemetry import BackfillTelemetry, serve

    collect_less_often()

    requested = hour_range(start, end, int(time.time() * 1000))
    telemetry = BackfillTelemetry(CollectorRegistry())
    server = None
    if click.get_current_context().params.get("metrics_port") is not None:
        server, _ = serve(telemetry.registry, settings.metrics_host, settings.metrics_port)
        log.info("backfill metrics on http://%s:%d/metrics", settings.metrics_host, server.server_port)

    async def run() -> Any:
        async with await Store.open(settings.database_url.get_secret_value(), settings.redacted_dsn()) as store:
            await store.migrate()
            return await run_backfill(settings, store, requested, allow_partial=allow_partial, dry_run=dry_run,
                                      telemetry=telemetry, on_progress=progress.backfill)  # fmt: skip

    progress = _ProgressDisplay("backfill")
    try:
        with progress:
            report = _run(run())
    finally:
        if server is not None:
            server.shutdown()
    click.echo("hour\tinserted\tchanged\tdeleted\tunchanged")
    for hour, result in sorted(report.hours.items()):
        click.echo(f"{iso(hour)}\t{result.inserted}\t{result.updated}\t{result.deleted}\t{result.unchanged}")
    rows = report.hour_rows
    rate = report.records / report.seconds if report.seconds > 0 else 0.0
    would = "would be " if dry_run else ""
    summary = (
        f"{'dry run, nothing written: ' if dry_run else ''}{len(report.plan.hours)} hour"
        f"{'' if len(report.plan.hours) == 1 else 's'} {would}rebuilt "
        f"{report.plan.hours}; hour rows: {rows.inserted} {would}inserted, {rows.updated} {would}changed, "
        f"{rows.deleted} {would}deleted, {rows.unchanged} unchanged"
    )
    for granularity, result in report.rollups.items():
        summary += f"; {granularity} rows: {result.inserted} inserted, {result.updated} changed, {result.deleted} deleted"
    summary += f"; {report.records:,} events replayed in {report.seconds:.1f} s ({rate:,.0f} events/s)"
    if report.too_late:
        summary += f", {report.too_late:,} of them too late for the live worker and counted here"
    if report.plan.skipped:
        summary += f"; left alone: {', '.join(f'{t}[{p}]' for t, p in report.plan.skipped)}"
    click.echo(summary, err=True)


class _ProgressDisplay:
    """Progress of a long command on stderr: a live bar on a terminal, otherwise a plain line
    every few seconds and at each milestone (a log file or CI shows it too)."""

    PLAIN_EVERY_SECONDS = 5.0

    def __init__(self, command: str) -> None:
        self._command = command
        self._console = _stderr_console()
        self._bar: Any = None
        self._task: Any = None
        self._last_line = 0.0
        self._milestone: tuple = ()

    def __enter__(self) -> _ProgressDisplay:
        if self._console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                console=self._console, transient=True,
            )  # fmt: skip
            self._bar.start()
            self._task = self._bar.add_task(self._command, total=None, detail="starting")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def show(self, phase: str, done: int, total: int | None, detail: str, milestone: tuple = ()) -> None:
        """``milestone`` changing (a phase's part finished) prints a plain line at once."""
        if self._bar is not None:
            self._bar.update(self._task, description=phase, completed=done, total=total, detail=detail)
            return
        import time

        now = time.monotonic()
        milestone = (phase, *milestone)
        if now - self._last_line >= self.PLAIN_EVERY_SECONDS or milestone != self._milestone:
            self._last_line, self._milestone = now, milestone
            self._console.print(f"{self._command} {phase}: {detail}", highlight=False, soft_wrap=True)

    def backfill(self, progress: Any) -> None:
        """The display of a :class:`~streamagg.backfill.Progress`."""
        if progress.phase == "reading":
            eta = progress.eta_seconds
            detail = (
                f"{progress.partitions_done}/{progress.partitions} partitions, {progress.records:,} of "
                f"~{progress.expected_records:,} events, {progress.records_per_second:,.0f} events/s"
                + (f", ETA {eta:.0f} s" if eta is not None else "")
            )
            done, total = progress.records, max(progress.expected_records, progress.records)
        else:
            detail = f"{progress.hours_done}/{progress.hours} hours"
            done, total = progress.hours_done, progress.hours
        finished = (progress.partitions_done == progress.partitions, progress.hours_done == progress.hours)
        self.show(progress.phase, done, total, detail, finished)


@main.command()
@click.option("--hours", type=click.IntRange(min=1), required=True, help="how many hours of telemetry")
@click.option("--events-per-hour", type=click.IntRange(min=1), required=True, help="events in each hour, all topics")
@click.option("--seed", type=click.IntRange(min=0), default=1, show_default=True, help="the same seed gives the same events")
@click.option("--start", type=TIME, default=None, help="first hour, rounded down to a whole hour (default: the hours end at the last full hour)")
@_settings_options
@_fail_cleanly
def generate(settings: Settings, hours: int, events_per_hour: int, seed: int, start: int | None) -> None:
    """Produce realistic synthetic telemetry to the four source topics."""
    import time

    from .buckets import HOUR_MS, bucket_start_ms, to_datetime
    from .generate import generate as run_generate

    if start is None:
        start = bucket_start_ms(int(time.time() * 1000), "hour") - hours * HOUR_MS
    start = bucket_start_ms(start, "hour")

    def produced(done: int, total: int) -> None:
        progress.show("producing", done, total, f"{done:,} of {total:,} events", (done == total,))

    with _ProgressDisplay("generate") as progress:
        generated = _run(run_generate(settings, hours, events_per_hour, seed, start, produced))
    for topic, count in sorted(generated.counts.items()):
        click.echo(f"{topic}\t{count}")
    click.echo(f"total\t{generated.total}\t{to_datetime(generated.start_ms).isoformat()}\t{to_datetime(generated.end_ms).isoformat()}")


def _tables_console() -> Any:
    """stdout for tables, room for 200 columns (a table takes what it needs: the dashboard about
    190): narrower, rich cut numbers to "28,1…", which read as values, and metric names; a
    narrower terminal wraps the lines instead."""
    import shutil

    from rich.console import Console

    return Console(width=max(200, shutil.get_terminal_size().columns) if sys.stdout.isatty() else 200)


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


@main.command()
@_settings_options
@_fail_cleanly
@click.pass_context
def worker(ctx: click.Context, settings: Settings) -> None:
    """Run the live worker until SIGINT/SIGTERM (a clean stop loses nothing).

    Consumes the four source topics (created with STREAMAGG_PARTITIONS partitions when
    missing), keeps hour aggregates per partition checkpointed in a Faust table, writes
    closed hours to PostgreSQL every STREAMAGG_FLUSH_INTERVAL_SECONDS and rolls up their days
    and weeks; Prometheus metrics on STREAMAGG_METRICS_HOST:STREAMAGG_METRICS_PORT.
    """
    from .app import run_worker

    verbose = ctx.find_root().params.get("verbose", 0)
    run_worker(settings, verbose)


@main.command()
@click.option("--hours", type=click.IntRange(min=1, max=48), default=4, show_default=True,
              help="hours of telemetry, ending at the last full hour")
@click.option("--events-per-hour", type=click.IntRange(min=10), default=20_000, show_default=True,
              help="events in each hour, all topics")
@click.option("--seed", type=click.IntRange(min=0), default=7, show_default=True, help="the same seed gives the same events")
@_settings_options
@_fail_cleanly
def demo(settings: Settings, hours: int, events_per_hour: int, seed: int) -> None:
    """The main job on embedded defaults, end to end.

    Starts the local stack unless Kafka/PostgreSQL are configured, produces a few hours of
    synthetic telemetry ending in the past to fresh topics, runs the worker until those hours
    are flushed and rolled up into a fresh database, then prints a dashboard and the accuracy
    of every stored row against exact values computed from the same events. Of the settings
    below it takes Kafka, PostgreSQL, the sketch kinds and the stack's; its topics, app id,
    partitions, timings and metrics port are its own.
    """
    from .demo import DemoPlan, run_demo

    ok = run_demo(settings, DemoPlan(hours, events_per_hour, seed), _tables_console(), _stderr_console())
    if not ok:
        sys.exit(1)
