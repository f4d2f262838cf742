"""End-to-end throughput of one worker process against a plain consumer, in the same run.

Pre-fills fresh topics with N generated events, then measures
  (a) baseline: a plain aiokafka consumer that only reads and JSON-decodes every record;
  (b) streamagg: one `streamagg worker` process, from its first read to the last hour, day and
      week row committed in PostgreSQL: the clock stops at the poll (every 0.5 s) that found all
      the rows' totals, and the row-by-row comparison with the exact counts of the same events
      that confirms it is not counted.
Prints both rates and the ratio, and where (b)'s time went: the CPU seconds the worker, PostgreSQL
and the broker used from the first read to the last row, and each one's share of a core while the
worker read and after (from /proc: a server not on this machine is not counted). Uses the
configured Kafka/PostgreSQL, else the local stack.

    .venv/bin/python -m bench.throughput [--events 200000] [--hours 4] [--keep]

The topics and the database are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator

from aiokafka import AIOKafkaConsumer, TopicPartition
from rich.console import Console

from bench.procs import CpuSampler, broker_port, listener_pid, postgres_port
from streamagg.buckets import HOUR_MS, bucket_start_ms
from streamagg.demo import (
    drop_databases,
    env_without_settings,
    exact_counts,
    fresh_database,
    resolve_target,
    wait_for_rows,
    worker_env,
)
from streamagg.events import validate
from streamagg.generate import generate
from streamagg.logs import configure_logging
from streamagg.oracle import exact_hours, exact_rollup
from streamagg.settings import Settings, load_settings
from streamagg.stack import free_port
from streamagg.synth import Synth
from streamagg.topics import delete_topics, source_topics


async def plain_consumer(settings: Settings, total: int) -> float:
    """Seconds for a plain consumer to read and JSON-decode ``total`` records of the source topics."""
    topics, partitions = list(source_topics(settings)), settings.partitions
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                                max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024)  # fmt: skip
    await consumer.start()
    try:
        assigned = [TopicPartition(t, p) for t in topics for p in range(partitions)]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        seen = 0
        started = None
        while seen < total:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            if started is None and batches:
                started = time.perf_counter()
            for records in batches.values():
                for record in records:
                    json.loads(record.value)
                seen += len(records)
        return time.perf_counter() - (started or time.perf_counter())
    finally:
        await consumer.stop()


def metrics(port: int, *names: str) -> list[float]:
    """The current values of ``names`` on the worker's /metrics (0 when absent or unreachable)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
    except OSError:
        return [0.0] * len(names)
    values = dict(line.split(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return [float(values.get(name, 0.0)) for name in names]


def worker_end_to_end(settings: Settings, events: int, expected: dict, err: Console, profile: str | None = None) -> float:
    """Seconds for one `streamagg worker` process from its first read to the last of the
    ``expected`` hour, day and week rows committed (stopped with SIGTERM afterwards); prints
    when the events were all aggregated and each granularity's rows were all stored, and the
    CPU the worker, PostgreSQL and the broker used meanwhile (:func:`print_cpu`)."""
    runner = [sys.executable, "-m", "pyinstrument", "-o", profile] if profile else [sys.executable]
    worker = subprocess.Popen([*runner, "-m", "streamagg", "--quiet", "worker"],
                              env={**env_without_settings(), **worker_env(settings)}, stdin=subprocess.DEVNULL)  # fmt: skip
    servers = {"PostgreSQL": listener_pid(postgres_port(settings.database_url.get_secret_value())),
               "Kafka broker": listener_pid(broker_port(settings.kafka_bootstrap))}  # fmt: skip
    sampler = CpuSampler({"worker": worker.pid, **{name: pid for name, pid in servers.items() if pid is not None}}).start()
    try:
        first_read = None
        while first_read is None:
            # The counter moves only once a batch is processed: the first read was that long
            # before (batches run back to back while there is a backlog).
            processed, busy = metrics(settings.metrics_port, "observability_aggregation_records_processed_total",
                                      "observability_aggregation_duration_seconds_sum")  # fmt: skip
            if processed > 0:
                first_read = time.monotonic() - busy
            elif worker.poll() is not None:
                raise SystemExit(f"worker exited with {worker.returncode}")
            else:
                time.sleep(0.05)
        aggregated: list[float] = []
        watcher = threading.Thread(target=_when_aggregated, args=(settings.metrics_port, events, aggregated), daemon=True)
        watcher.start()
        with err.status("waiting for every hour, day and week row") as status:
            complete = asyncio.run(wait_for_rows(settings, expected, worker, 900, status))
        end = max(complete.values())  # the poll that saw the last rows, not the check that followed it
        phases = [("every event aggregated", aggregated[0] if aggregated else None),
                  *((f"every {g} row stored", complete.get(g)) for g in ("hour", "day", "week"))]  # fmt: skip
        err.print("worker phases, seconds after the first read: "
                  + ", ".join(f"{name} {at - first_read:.1f}" for name, at in phases if at is not None))  # fmt: skip
        sampler.stop()
        print_cpu(sampler, first_read, aggregated[0] if aggregated else None, end,
                  [name for name, pid in servers.items() if pid is None])  # fmt: skip
        return end - first_read
    finally:
        sampler.stop()
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)


def print_cpu(sampler: CpuSampler, first_read: float, aggregated: float | None, end: float, elsewhere: list[str]) -> None:
    """Where the run's time went, process by process: CPU seconds from the first read to the last
    row, and the share of a core each process used while the worker read and after."""
    cores = os.cpu_count() or 1
    spent = sampler.between(first_read, end)
    total = sum(seconds for seconds in spent.values() if seconds is not None)
    print(f"CPU, first read -> last row ({end - first_read:.1f} s x {cores} cores = {cores * (end - first_read):.1f} s): "
          + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in spent.items() if seconds is not None)
          + f"; together {total:.1f} s, {total / (cores * (end - first_read)):.0%} of the machine"
          + (f" ({' and '.join(elsewhere)} not on this machine: not counted)" if elsewhere else ""))  # fmt: skip
    if aggregated is None:
        return
    for what, start, stop in (("while reading", first_read, aggregated), ("after the last read", aggregated, end)):
        if stop - start > 0.2:
            shares = sampler.between(start, stop)
            print(f"  {what} ({start - first_read:.1f} -> {stop - first_read:.1f} s): "
                  + ", ".join(f"{name} {seconds / (stop - start):.0%}" for name, seconds in shares.items() if seconds is not None)
                  + " of a core")  # fmt: skip


def _when_aggregated(port: int, events: int, out: list[float]) -> None:
    """Appends the time the worker's processed-records counter reached ``events``, to the half
    second: each scrape costs the worker a few milliseconds of CPU (its HTTP thread rendering
    every partition's gauges), and at 10 scrapes a second that was 2.7-3.1% of the worker's
    samples in a run (py-spy), a cost of the measurement, not of the worker."""
    while metrics(port, "observability_aggregation_records_processed_total")[0] < events:
        time.sleep(0.5)
    out.append(time.monotonic())


@contextlib.contextmanager
def prefilled(name: str, events: int, hours: int, seed: int, err: Console, keep: bool = False) -> Iterator[tuple[Settings, int, dict]]:
    """Fresh topics (8 partitions) holding ``events`` generated events over ``hours`` hours ending
    an hour ago, a fresh database, and settings for a fast-closing worker; yields the settings,
    the first hour and the exact count of every hour, day and week row. Afterwards the topics
    and the databases named after the run go, unless ``keep``."""
    configure_logging()  # as the commands log: a fresh topic's retried produce requests are no warning
    settings = resolve_target(load_settings(), err)
    run = uuid.uuid4().hex[:8]
    database = f"streamagg_{name.replace('-', '_')}_{run}"
    dsn = asyncio.run(fresh_database(settings, database))
    settings = settings.model_copy(update={
        "database_url": settings.database_url.__class__(dsn), "topic_prefix": f"{name}-{run}.",
        "app_id": f"streamagg-{name}-{run}", "partitions": 8, "flush_interval_seconds": 1.0, "grace_seconds": 1,
        "session_timeout_seconds": 6.0, "metrics_port": free_port(),
    })  # fmt: skip
    try:
        per_hour = events // hours
        start = bucket_start_ms(int(time.time() * 1000), "hour") - (hours + 1) * HOUR_MS
        err.print(f"pre-filling {per_hour * hours:,} events into {settings.topic_prefix}* ...")
        asyncio.run(generate(settings, hours, per_hour, seed, start))
        decoded = [validate(k, e) for k, _, e in Synth(seed).events(start, hours, per_hour)]
        hours_exact = exact_hours(decoded)
        yield settings, start, exact_counts(hours_exact, {g: exact_rollup(hours_exact, g) for g in ("day", "week")})
    finally:
        if keep:
            err.print(f"kept the topics {settings.topic_prefix}* and the databases {database}*")
        else:
            asyncio.run(drop_databases(settings, database))
            delete_topics(settings, [settings.topic_prefix, settings.app_id])


def input_parser(description: str | None, events: int) -> argparse.ArgumentParser:
    """The options of a bench over pre-filled topics (:func:`prefilled`): the input and --keep."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=events)
    parser.add_argument("--hours", type=int, default=4)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the bench's topics and databases")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = input_parser(__doc__, events=200_000)
    parser.add_argument("--profile", metavar="PATH", help="run the worker under pyinstrument, report to PATH")
    args = parser.parse_args(argv)
    err = Console(stderr=True)
    total = args.events // args.hours * args.hours
    with prefilled("bench", args.events, args.hours, args.seed, err, args.keep) as (settings, _, expected):
        err.print("baseline: plain aiokafka consumer, read + json.loads ...")
        baseline_seconds = asyncio.run(plain_consumer(settings, total))
        err.print("streamagg: one worker process, first read to the last hour, day and week row committed ...")
        worker_seconds = worker_end_to_end(settings, total, expected, err, args.profile)
    baseline_rate = total / baseline_seconds
    worker_rate = total / worker_seconds
    print(f"events                      {total:>12,}")
    print(f"plain consumer (baseline)   {baseline_rate:>12,.0f} events/s  ({baseline_seconds:.2f} s)")
    print(f"streamagg worker, e2e       {worker_rate:>12,.0f} events/s  ({worker_seconds:.2f} s, first read -> last hour/day/week row committed)")
    print(f"ratio worker / baseline     {worker_rate / baseline_rate:>12.2f}")
    print(f"target                      >= 50,000 events/s and >= 0.50 of the baseline: "
          f"{'met' if worker_rate >= 50_000 and worker_rate >= baseline_rate / 2 else 'NOT met'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
