"""Backfill speed against the live worker over the same topics, in the same run.

Pre-fills fresh topics with N generated events, then measures
  (a) streamagg backfill of every hour of them into a fresh database: records replayed per
      second, from the start of the backfill to its last day/week roll-up written;
  (b) one `streamagg worker` process over the same topics into another fresh database, from
      its first read to the last hour, day and week row committed (as bench.throughput).
Both stores are checked against the exact row counts. Prints both rates and the ratio. Uses
the configured Kafka/PostgreSQL, else the local stack; the topics and databases are deleted at
the end unless --keep.

    .venv/bin/python -m bench.backfill [--events 100000] [--hours 4] [--keep]
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from rich.console import Console

from bench.throughput import input_parser, prefilled, worker_end_to_end
from streamagg.backfill import HourRange, Report, backfill
from streamagg.buckets import HOUR_MS
from streamagg.demo import database_of, fresh_database, rows_match
from streamagg.settings import Settings
from streamagg.state import collect_less_often
from streamagg.store import Store


async def timed_backfill(settings: Settings, hours: HourRange, expected: dict) -> tuple[Report, float]:
    async with await Store.open(settings.database_url.get_secret_value(), settings.redacted_dsn()) as store:
        await store.migrate()
        started = time.perf_counter()
        report = await backfill(settings, store, hours)
        seconds = time.perf_counter() - started
        if not await rows_match(store, expected):
            raise SystemExit("the backfill's hour, day or week rows differ from the exact counts")
    return report, seconds


def main(argv: list[str] | None = None) -> int:
    args = input_parser(__doc__, events=100_000).parse_args(argv)
    err = Console(stderr=True)
    total = args.events // args.hours * args.hours
    with prefilled("bench-backfill", args.events, args.hours, args.seed, err, args.keep) as (settings, start, expected):
        err.print("streamagg backfill of every hour, into a fresh database ...")
        collect_less_often()  # as `streamagg backfill` does
        hours = HourRange(start, start + args.hours * HOUR_MS)
        report, backfill_seconds = asyncio.run(timed_backfill(settings, hours, expected))
        if report.records != total:
            raise SystemExit(f"the backfill replayed {report.records:,} records of {total:,}")

        err.print("streamagg: one worker process over the same topics, into another fresh database ...")
        # Named after the bench's database, so that it goes with it.
        database = asyncio.run(fresh_database(settings, database_of(settings) + "_worker"))
        worker_seconds = worker_end_to_end(settings.model_copy(update={"database_url": settings.database_url.__class__(database)}),
                                           total, expected, err)  # fmt: skip
    backfill_rate = total / backfill_seconds
    worker_rate = total / worker_seconds
    rows = report.hour_rows
    print(f"events                      {total:>12,}   ({args.hours} hours, {rows.inserted:,} hour rows)")
    print(f"streamagg backfill          {backfill_rate:>12,.0f} events/s  ({backfill_seconds:.2f} s, start -> roll-ups written)")
    print(f"streamagg worker, e2e       {worker_rate:>12,.0f} events/s  ({worker_seconds:.2f} s, first read -> last hour/day/week row committed)")
    print(f"ratio backfill / worker     {backfill_rate / worker_rate:>12.2f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
