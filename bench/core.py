"""Throughput of the pure core (``Pipeline.process``) against plain ``json.loads``, in the same run.

Builds N generated events as the generator sends them (compact JSON values, 8 partitions per
topic keyed by the event's id, consecutive offsets per partition), then times
  (a) baseline: ``json.loads`` of every message value;
  (b) streamagg: ``Pipeline.process`` in batches of ``--batch`` messages (mixed topics and
      partitions, grouped by topic-partition as the consumer fetches them), on a fresh
      pipeline each repeat.
No Kafka, no PostgreSQL. Prints the median of the repeats of both rates and the ratio.

    .venv/bin/python -m bench.core [--events 200000] [--hours 4] [--batch 10000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import zlib

from prometheus_client import CollectorRegistry

from streamagg.buckets import HOUR_MS
from streamagg.pipeline import Pipeline, RawMessage
from streamagg.settings import Settings, load_settings
from streamagg.state import collect_less_often
from streamagg.synth import Synth
from streamagg.telemetry import Telemetry

START_MS = 1_764_115_200_000  # Wednesday 2025-11-26 00:00 UTC
PARTITIONS = 8


def messages(settings: Settings, events: int, hours: int, seed: int, start_ms: int = START_MS) -> list[RawMessage]:
    """The generator's records (``streamagg.generate``) from ``start_ms`` on, as the worker receives them."""
    next_offset: dict[tuple[str, int], int] = {}
    out = []
    for kind, _, event in Synth(seed).events(start_ms, hours, events // hours):
        topic = settings.topic(kind)
        key = str(next(iter(event.values()))).encode()  # the event's id, as generate() keys it
        partition = zlib.crc32(key) % PARTITIONS
        offset = next_offset.get((topic, partition), 0)
        next_offset[(topic, partition)] = offset + 1
        out.append(RawMessage(topic, partition, offset, json.dumps(event, separators=(",", ":")).encode()))
    return out


def time_json(batch: list[RawMessage]) -> float:
    started = time.perf_counter()
    for message in batch:
        json.loads(message.value)
    return time.perf_counter() - started


def batches(messages: list[RawMessage], size: int) -> list[dict[tuple[str, int], list[RawMessage]]]:
    """``messages`` in batches of ``size``, each by topic-partition, as the consumer fetches them."""
    out = []
    for i in range(0, len(messages), size):
        batch: dict[tuple[str, int], list[RawMessage]] = {}
        for message in messages[i : i + size]:
            batch.setdefault((message.topic, message.partition), []).append(message)
        out.append(batch)
    return out


def time_pipeline(settings: Settings, fetches: list[dict[tuple[str, int], list[RawMessage]]], end_ms: int) -> float:
    pipeline = Pipeline(settings, Telemetry(CollectorRegistry()), lambda topic, partition: [], clock=lambda: end_ms)
    started = time.perf_counter()
    for fetch in fetches:
        processed = pipeline.process(fetch)
        if processed.dead or processed.seeks:
            raise SystemExit(f"unexpected dead letters or seeks in a generated batch: {processed}")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--hours", type=int, default=4)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args(argv)
    settings = load_settings()  # STREAMAGG_* apply (e.g. STREAMAGG_SKETCH_KIND), as for the worker
    batch = messages(settings, args.events, args.hours, args.seed)
    fetches = batches(batch, args.batch)
    collect_less_often()  # as the worker does
    end_ms = START_MS + args.hours * HOUR_MS  # a fixed clock: no partition looks idle
    json_seconds, core_seconds = [], []
    for _ in range(args.repeats):  # interleaved, so a noisy neighbour hits both alike
        json_seconds.append(time_json(batch))
        core_seconds.append(time_pipeline(settings, fetches, end_ms))
    json_rate = len(batch) / statistics.median(json_seconds)
    core_rate = len(batch) / statistics.median(core_seconds)
    print(f"events                      {len(batch):>12,}  ({args.hours} h, batches of {args.batch:,}, {args.repeats} repeats)")
    print(f"json.loads (baseline)       {json_rate:>12,.0f} events/s  (median {statistics.median(json_seconds):.3f} s)")
    print(f"Pipeline.process            {core_rate:>12,.0f} events/s  (median {statistics.median(core_seconds):.3f} s)")
    print(f"ratio core / baseline       {core_rate / json_rate:>12.3f}")
    print("all repeats, events/s:      " + " ".join(f"{len(batch) / s:,.0f}" for s in core_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
