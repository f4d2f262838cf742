"""The least time any worker needs for an input on this machine, against bench/throughput's target.

bench/throughput asks one worker for >= 50,000 events/s end to end and >= half a plain
consumer's rate. Whatever a worker does, it must at least read and decode every event, and
PostgreSQL must at least take every row the input makes (hour rows, then day and week rows).
A worker built as issue 3 says (state in a Faust table, so in a changelog topic) must also
send its state to the broker. This bench measures those necessities alone, on the same
pre-filled topics (the same generated input as bench/throughput with the same arguments), in
the same run:
  (a) the plain aiokafka consumer of bench/throughput: wall time and its CPU time, and the
      broker's CPU while it serves the read;
  (b) COPY of exactly the rows the input makes into a table with the contract's columns and
      unique key and nothing else (no upsert, no partials, no other index): wall time, client
      CPU and the PostgreSQL backend's CPU. First the rows that can be written before the last
      event is read, then those that cannot (the last hour's rows, and the day and week rows
      holding it: they need that hour);
  (c) the aggregate state the input makes, sent once to a changelog-like topic (8 partitions,
      acks=all) packed into values of up to 900 kB (fewer, larger records than any table's
      one record a key: only its bytes are paid): wall time, client CPU and the broker's CPU.
  (d) this design's writes of the same input, through streamagg's own store on one
      connection: every source partition's partials with the final hour rows merged from
      them, in the worker's chunks of keys (`Store.write_partials_of`), then the day and week
      rows from the stored hours (`rollup_keys`): wall time, client CPU and the backend's CPU;
  (e) the final rows alone, upserted by the same store into the emptied table in chunks of the
      worker's size (`Store.upsert_rows`), as a design that merged partitions before the
      database (no partials, no read-back) would write them: the same three figures;
  (f) the second stage that docs/design.md proposes, in Python as the code stands: every
      partial of (d) sent (its checkpoint bytes, made beforehand) to a fresh topic keyed by
      series, read back by a plain consumer, kept per key and source partition, merged into
      the hour rows, rolled up in memory into the day and week rows, all upserted into the
      emptied table: wall time, client CPU, the broker's and the backend's CPU.
No aggregation, no merging across partitions, no wait for the last hour to close: all cost
nothing in (a)-(c). Lower bounds on a worker's end-to-end time follow:
  cpu floor       = every CPU second of (a) and (b), spread over all cores
  ordering floor  = (a)'s wall time, then (b)'s after-the-last-event CPU over all cores
  with state      = every CPU second of (a), (b) and (c), the broker's included, over all cores
  this design     = every CPU second of (a), (c) and (d), over all cores: a worker that writes
                    as streamagg does, with its aggregation, checkpoints and Faust free
  final rows only = the same with (e) for (d)
  second stage    = the same with (f) for (d)
and from the largest of the first two, then from the larger of the first three, then from each
of the last three, the most events/s a worker could reach, next to the target. The broker must
run on this machine (the local stack), as PostgreSQL must: their processes' CPU is read from
/proc.

    .venv/bin/python -m bench.floor [--events 200000] [--hours 4] [--keep]

The topics and the database are deleted at the end unless --keep.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import zlib
from collections.abc import Sequence
from typing import NamedTuple

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry
from rich.console import Console

from bench.core import batches, messages
from bench.procs import broker_port, cpu_seconds, listener_pid
from bench.throughput import input_parser, plain_consumer, prefilled
from streamagg.aggregate import Agg, AggregateState, Key, Row, roll_up, roll_up_rows
from streamagg.app import FLUSH_KEYS_PER_TRANSACTION, flush_chunks
from streamagg.buckets import HOUR_MS, bucket_end_ms, to_datetime
from streamagg.pipeline import Flushable, Pipeline
from streamagg.rollup import rollup_keys
from streamagg.settings import Settings
from streamagg.state import collect_less_often
from streamagg.store import Store
from streamagg.telemetry import Telemetry
from streamagg.topics import ensure_topics

_COLUMNS = ("bucket_time", "granularity", "metric_name", "dimension_type", "dimension_value", "count", "sum_value",
            "min_value", "max_value", "avg_value", "p50_value", "p95_value", "p99_value", "sketch", "sketch_kind")  # fmt: skip
_TABLE = """
CREATE TABLE floor_rows (
    bucket_time timestamptz NOT NULL, granularity text NOT NULL, metric_name text NOT NULL,
    dimension_type text, dimension_value text, count bigint NOT NULL,
    sum_value double precision, min_value double precision, max_value double precision,
    avg_value double precision, p50_value double precision, p95_value double precision,
    p99_value double precision, sketch bytea, sketch_kind text,
    revision integer NOT NULL DEFAULT 1, updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE NULLS NOT DISTINCT (bucket_time, granularity, metric_name, dimension_type, dimension_value)
)"""


CHANGELOG_VALUE_BYTES = 900_000


class Output(NamedTuple):
    rows: list[Row]  # every hour, day and week row the table must end with
    changelog: list[list[bytes]]  # the per-partition state's checkpoint records, packed per changelog partition
    partials: list[Flushable]  # every source partition's state, as the worker flushes it


def required_output(settings: Settings, events: int, hours: int, seed: int, start_ms: int) -> Output:
    """What the input makes: its rows, its state's checkpoint records (the worker's, as ``key +
    value`` bytes, packed into values of at most CHANGELOG_VALUE_BYTES) and its partials."""
    end_ms = start_ms + hours * HOUR_MS
    pipeline = Pipeline(settings, Telemetry(CollectorRegistry()), lambda topic, partition: [], clock=lambda: end_ms)
    for fetch in batches(messages(settings, events, hours, seed, start_ms), 10_000):
        pipeline.process(fetch)
    merged = AggregateState(settings.metric_sketch_kinds(), settings.max_series_per_dimension)
    for state in pipeline.states.values():
        merged.merge(state.aggregates)
    hour_rows = merged.rows()
    changelog: list[list[bytes]] = [[] for _ in range(settings.partitions)]
    for (_, partition), checkpoint in pipeline.checkpoint_records().items():
        values, pending, size = changelog[partition], [], 0
        for key, value in checkpoint.in_order():
            record = key + (value or b"")
            if size + len(record) > CHANGELOG_VALUE_BYTES and pending:
                values.append(b"".join(pending))
                pending, size = [], 0
            pending.append(record)
            size += len(record)
        values.append(b"".join(pending))
    partials = [Flushable(topic, partition, list(state.aggregates.items()), offset=state.offset)
                for (topic, partition), state in pipeline.states.items()]  # fmt: skip
    return Output([*hour_rows, *roll_up(hour_rows, "day"), *roll_up(hour_rows, "week")], changelog, partials)


class Cpu:
    """CPU seconds of this process and of another one (the broker, a database backend) over a
    ``with`` block, and its wall time."""

    def __init__(self, other: int) -> None:
        self._other = other
        self.own = self.other = self.wall = 0.0

    def __enter__(self) -> Cpu:
        self._start = (time.perf_counter(), time.process_time(), cpu_seconds(self._other))
        return self

    def __exit__(self, *exc_info: object) -> None:
        wall, own, other = self._start
        after = cpu_seconds(self._other)
        if other is None or after is None:
            raise SystemExit(f"process {self._other} went away during the bench")
        self.wall, self.own, self.other = time.perf_counter() - wall, time.process_time() - own, after - other


async def send_state(settings: Settings, changelog: Sequence[list[bytes]]) -> None:
    """Every packed value to its partition of a fresh topic, acks=all, all acknowledged."""
    topic = settings.topic("floor-changelog")
    ensure_topics(settings, [topic])
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", max_request_size=16 * 1024 * 1024,
                                max_batch_size=1024 * 1024)  # fmt: skip
    await producer.start()
    try:
        sent = [await producer.send(topic, value, partition=partition) for partition, values in enumerate(changelog) for value in values]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def copy_rows(dsn: str, batches: Sequence[list[Row]]) -> list[tuple[float, float, float]]:
    """(wall, client CPU, server CPU) seconds of one COPY per batch, into a fresh contract table."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(_TABLE)
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        if cpu_seconds(backend) is None:
            raise SystemExit("the PostgreSQL backend's CPU is not readable here: run this bench on the database's machine")
        out = []
        for rows in batches:
            records = [
                (to_datetime(r.bucket_ms), r.granularity, r.metric_name, r.dimension_type, r.dimension_value, r.count,
                 r.sum_value, r.min_value, r.max_value, r.avg_value, r.p50_value, r.p95_value, r.p99_value, r.sketch,
                 r.sketch_kind)
                for r in rows
            ]  # fmt: skip
            with Cpu(backend) as copy:
                await conn.copy_records_to_table("floor_rows", columns=_COLUMNS, records=records)
            out.append((copy.wall, copy.own, copy.other))
        return out
    finally:
        await conn.close()


async def design_writes(settings: Settings, partials: list[Flushable], rows: list[Row]) -> list[tuple[float, float, float]]:
    """(wall, client CPU, server CPU) seconds of the writes of the input into the migrated schema,
    on one connection: (d) this design's, the partials with their final hour rows, chunked as the
    worker chunks them, then the day and week rows of every written hour; (e) ``rows`` alone,
    into the emptied table."""
    collect_less_often()  # as the worker does
    store = await Store.open(settings.database_url.get_secret_value(), settings.redacted_dsn(), max_size=1)
    try:
        await store.migrate()
        backend = await _store_backend(settings)
        with Cpu(backend) as flush:
            for chunk in flush_chunks(partials, FLUSH_KEYS_PER_TRANSACTION):
                await store.write_partials_of([(item.partition, item.offset, item.items) for item in chunk])
        await store.analyze()  # as the worker does once the table has doubled: else roll-ups' reads scan it
        with Cpu(backend) as rollups:
            await rollup_keys(store, {key for item in partials for key, _ in item.items})
        await store.execute("TRUNCATE observability.metrics_aggregates")
        with Cpu(backend) as finals:
            for i in range(0, len(rows), FLUSH_KEYS_PER_TRANSACTION):
                await store.upsert_rows(rows[i : i + FLUSH_KEYS_PER_TRANSACTION])
        return [(c.wall, c.own, c.other) for c in (flush, rollups, finals)]
    finally:
        await store.close()


async def second_stage(
    settings: Settings, partials: list[Flushable], expected: list[Row], broker: int
) -> tuple[float, float, float, float]:
    """(wall, client CPU, broker CPU, server CPU) seconds of the proposed merge stage over
    ``partials``: sent to a topic keyed by series, read back, merged per key (the partial that
    includes the most of each source partition kept), hour rows made, day and week rows rolled
    up in memory, every row upserted into the emptied table on one connection. Its rows must
    be the ``expected`` ones (keys, counts and sums)."""
    topic = settings.topic("floor-merge")
    ensure_topics(settings, [topic])
    n = settings.partitions
    records = []  # (partition, key, value), made untimed: stage 1 has these bytes from its checkpoint
    for item in partials:
        for key, agg in item.items:
            series = json.dumps([key[1], key[2], key[3]]).encode()
            value = json.dumps([item.topic, item.partition, item.offset, key[0]]).encode() + b"\n" + agg.encode()
            records.append((zlib.crc32(series) % n, series, value))
    store = await Store.open(settings.database_url.get_secret_value(), settings.redacted_dsn(), max_size=1)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5,
                                max_batch_size=1024 * 1024, max_request_size=16 * 1024 * 1024)  # fmt: skip
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024)  # fmt: skip
    await producer.start()
    await consumer.start()
    try:
        await store.execute("TRUNCATE observability.metrics_aggregates")
        backend = await _store_backend(settings)
        assigned = [TopicPartition(topic, p) for p in range(n)]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        with Cpu(broker) as kafka, Cpu(backend) as db:
            sent = [await producer.send(topic, value, key=series, partition=p) for p, series, value in records]
            await asyncio.gather(*sent)
            latest: dict[Key, dict[tuple[str, int], tuple[int, bytes]]] = {}
            seen = 0
            while seen < len(records):
                for batch in (await consumer.getmany(timeout_ms=1000, max_records=10_000)).values():
                    seen += len(batch)
                    for record in batch:
                        head, data = record.value.split(b"\n", 1)
                        source_topic, source_partition, offset, hour = json.loads(head)
                        metric, dimension_type, dimension_value = json.loads(record.key)
                        sources = latest.setdefault((hour, metric, dimension_type, dimension_value), {})
                        kept = sources.get((source_topic, source_partition))
                        if kept is None or offset >= kept[0]:
                            sources[(source_topic, source_partition)] = (offset, data)
            hours = []
            for key, sources in latest.items():
                pieces = [Agg.decode(data) for _, (_, data) in sorted(sources.items())]
                merged = pieces[0]  # decoded here for this merge only: the others fold into it, no copy
                for piece in pieces[1:]:
                    merged.merge(piece)
                hours.append(merged.to_row(key, "hour"))
            hours.sort(key=lambda row: (row.bucket_ms, repr(row.key)))
            rolled = roll_up_rows(hours, {"day": None, "week": None})
            for rows in (hours, rolled["day"], rolled["week"]):
                for i in range(0, len(rows), FLUSH_KEYS_PER_TRANSACTION):
                    await store.upsert_rows(rows[i : i + FLUSH_KEYS_PER_TRANSACTION])
        made = [*hours, *rolled["day"], *rolled["week"]]
        if sorted(_evidence(made)) != sorted(_evidence(expected)):
            raise SystemExit("the second stage's rows differ from the input's")
        return kafka.wall, kafka.own, kafka.other, db.other
    finally:
        await consumer.stop()
        await producer.stop()
        await store.close()


def _evidence(rows: list[Row]) -> list[tuple]:
    return [(row.granularity, row.bucket_ms, repr(row.key), row.count, row.sum_value, row.fingerprint) for row in rows]


async def _store_backend(settings: Settings) -> int:
    """The pid of the one client backend of the bench's database other than the asking one."""
    probe = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        return await probe.fetchval("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                    "AND pid <> pg_backend_pid() AND backend_type = 'client backend'")  # fmt: skip
    finally:
        await probe.close()


def main(argv: list[str] | None = None) -> int:
    args = input_parser(__doc__, events=200_000).parse_args(argv)
    err = Console(stderr=True)
    total = args.events // args.hours * args.hours
    cores = os.cpu_count() or 1
    with prefilled("floor", args.events, args.hours, args.seed, err, args.keep) as (settings, start_ms, _):
        broker = listener_pid(broker_port(settings.kafka_bootstrap))
        if broker is None:
            raise SystemExit(f"no process here listens on {settings.kafka_bootstrap}: run this bench on the broker's machine")
        err.print("plain aiokafka consumer, read + json.loads ...")
        with Cpu(broker) as read:
            asyncio.run(plain_consumer(settings, total))
        read_wall, read_cpu = read.wall, read.own
        err.print("the rows and the state of the input (the core, untimed), then COPY, then the state to a topic ...")
        rows, changelog, partials = required_output(settings, total, args.hours, args.seed, start_ms)
        last_hour = max(row.bucket_ms for row in rows if row.granularity == "hour")
        before, after = [], []
        for row in rows:  # the rows holding the last hour can only be written after it
            (after if row.bucket_ms <= last_hour < bucket_end_ms(row.bucket_ms, row.granularity) else before).append(row)
        (b_wall, b_client, b_server), (a_wall, a_client, a_server) = asyncio.run(
            copy_rows(settings.database_url.get_secret_value(), [before, after])
        )
        with Cpu(broker) as state:
            asyncio.run(send_state(settings, changelog))
        err.print("this design's writes of the same input (partials and hour rows, roll-ups), then the final rows alone ...")
        (f_wall, f_client, f_server), (r_wall, r_client, r_server), (e_wall, e_client, e_server) = asyncio.run(
            design_writes(settings, partials, rows)
        )
        err.print("the proposed second stage over the same partials, in Python ...")
        s_wall, s_client, s_broker, s_server = asyncio.run(second_stage(settings, partials, rows, broker))
    cpu_floor = (read_cpu + b_client + b_server + a_client + a_server) / cores
    ordering_floor = read_wall + (a_client + a_server) / cores
    floor = max(cpu_floor, ordering_floor)
    state_floor = max(floor, (read_cpu + read.other + b_client + b_server + a_client + a_server + state.own + state.other) / cores)
    design_floor = (read_cpu + read.other + state.own + state.other + f_client + f_server + r_client + r_server) / cores
    finals_floor = (read_cpu + read.other + state.own + state.other + e_client + e_server) / cores
    stage_floor = (read_cpu + read.other + state.own + state.other + s_client + s_broker + s_server) / cores
    baseline = total / read_wall
    n_partials = sum(len(item.items) for item in partials)
    n_hours = sum(1 for row in rows if row.granularity == "hour")
    state_bytes = sum(map(len, (value for values in changelog for value in values)))
    print(f"events                        {total:>10,}  ({args.hours} h, {cores} cores)")
    print(f"(a) plain consumer            {read_wall:>10.2f} s wall  {read_cpu:.2f} s CPU + {read.other:.2f} s broker CPU   {baseline:,.0f} events/s")
    print(f"(b) COPY, before last event   {b_wall:>10.2f} s wall  {b_client:.2f} s client + {b_server:.2f} s server CPU  ({len(before):,} rows)")
    print(f"(b) COPY, after last event    {a_wall:>10.2f} s wall  {a_client:.2f} s client + {a_server:.2f} s server CPU  ({len(after):,} rows)")
    print(f"(c) state to a changelog      {state.wall:>10.2f} s wall  {state.own:.2f} s client + {state.other:.2f} s broker CPU  "
          f"({state_bytes / 1e6:,.1f} MB)")  # fmt: skip
    print(f"(d) partials + hour rows      {f_wall:>10.2f} s wall  {f_client:.2f} s client + {f_server:.2f} s server CPU  "
          f"({n_partials:,} partials, {n_hours:,} hour rows)")  # fmt: skip
    print(f"(d) roll-ups                  {r_wall:>10.2f} s wall  {r_client:.2f} s client + {r_server:.2f} s server CPU  "
          f"({len(rows) - n_hours:,} day and week rows)")  # fmt: skip
    print(f"(e) final rows only           {e_wall:>10.2f} s wall  {e_client:.2f} s client + {e_server:.2f} s server CPU  "
          f"({len(rows):,} hour, day and week rows)")  # fmt: skip
    print(f"(f) second stage, in Python   {s_wall:>10.2f} s wall  {s_client:.2f} s client + {s_broker:.2f} s broker + "
          f"{s_server:.2f} s server CPU  ({n_partials:,} partials -> {len(rows):,} rows)")  # fmt: skip
    print(f"cpu floor                     {cpu_floor:>10.2f} s")
    print(f"ordering floor                {ordering_floor:>10.2f} s")
    print(f"floor with state and broker   {state_floor:>10.2f} s")
    print(f"floor of this design's writes {design_floor:>10.2f} s")
    print(f"floor of final rows only      {finals_floor:>10.2f} s")
    print(f"floor with a second stage     {stage_floor:>10.2f} s")
    for what, seconds in (("best any worker could do", floor), ("... keeping its state", state_floor),
                          ("... writing as streamagg does", design_floor), ("... writing final rows only", finals_floor),
                          ("... merging in a second stage", stage_floor)):  # fmt: skip
        print(f"{what:<30}{total / seconds:>10,.0f} events/s = {total / seconds / baseline:.2f} of the plain consumer "
              f"(target: >= 50,000 and >= 0.50); left for everything else: {2 * read_wall - seconds:.2f} s within 0.50 "
              f"of the consumer, {total / 50_000 - seconds:.2f} s within 50,000 events/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
