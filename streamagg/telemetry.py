"""The worker's health in Prometheus, on an injected registry (tests use a fresh one).

Counters and histograms are updated as work happens; values that are a property of the
current state (open buckets, consumer lag, watermark lag) are computed at scrape time by a
custom collector asking the worker, so they are never stale.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .errors import ConfigError
from .events import Reason

NAMESPACE = "observability"
# Stages of observability_aggregation_errors_total (app.py): a batch that raised, the database
# (connect, flush, rollup; also rows left as they were because their sketches do not merge),
# offsets the consumer skipped and that were read again, and every error the Kafka client
# logged (an unreachable broker: streamagg.logs).
ERROR_STAGES = ("process", "connect", "flush", "rollup", "skipped_offset", "kafka")


@dataclass(frozen=True)
class PartitionHealth:
    topic: str
    partition: int
    open_buckets: int
    open_bytes: int
    consumer_lag_records: int | None
    watermark_lag_seconds: float | None


@dataclass
class Telemetry:
    registry: CollectorRegistry
    aggregation_duration: Histogram = field(init=False)
    records_processed: Counter = field(init=False)
    last_success: Gauge = field(init=False)
    errors: Counter = field(init=False)
    events_consumed: Counter = field(init=False)
    events_rejected: Counter = field(init=False)
    late_events: Counter = field(init=False)
    too_late: Counter = field(init=False)
    flush_latency: Histogram = field(init=False)
    rows_written: Counter = field(init=False)
    overflow_events: Counter = field(init=False)

    def __post_init__(self) -> None:
        r, ns = self.registry, NAMESPACE
        self.aggregation_duration = Histogram(
            "aggregation_duration_seconds", "Time to validate and aggregate one batch of events",
            namespace=ns, registry=r, buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )  # fmt: skip
        self.records_processed = Counter(
            "aggregation_records_processed", "Events folded into aggregates", namespace=ns, registry=r
        )
        self.last_success = Gauge(
            "aggregation_last_success", "Unix time of the last successful flush to PostgreSQL", namespace=ns, registry=r
        )
        self.errors = Counter(
            "aggregation_errors", f"Errors by stage ({', '.join(ERROR_STAGES)})", ["stage"], namespace=ns, registry=r
        )
        self.events_consumed = Counter("events_consumed", "Events read, by topic", ["topic"], namespace=ns, registry=r)
        self.events_rejected = Counter(
            "events_rejected", "Events sent to the dead letter topic, by reason", ["reason"], namespace=ns, registry=r
        )
        self.late_events = Counter(
            "late_events", "Events for an hour that had already closed (still applied)", namespace=ns, registry=r
        )
        self.too_late = Counter(
            "events_too_late", "Events older than watermark - max lateness (dead-lettered)", namespace=ns, registry=r
        )
        self.flush_latency = Histogram(
            "flush_latency_seconds", "From an hour closing to its rows committed", namespace=ns, registry=r,
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
        )  # fmt: skip
        self.rows_written = Counter(
            "rows_written", "Final rows inserted or changed in metrics_aggregates", ["granularity"], namespace=ns, registry=r
        )
        self.overflow_events = Counter(
            "overflow_events", "Events of series past STREAMAGG_MAX_SERIES_PER_DIMENSION, kept under __overflow__",
            ["metric", "dimension_type"], namespace=ns, registry=r,
        )  # fmt: skip

        # Known label values start at 0, so every series exists before its first event.
        for stage in ERROR_STAGES:
            self.errors.labels(stage)
        for reason in Reason:
            self.events_rejected.labels(reason.value)
        for granularity in ("hour", "day", "week"):
            self.rows_written.labels(granularity)

    def watch(self, health: Callable[[], list[PartitionHealth]]) -> None:
        """Expose scrape-time state through ``health`` (called on every scrape)."""
        self.registry.register(_HealthCollector(health))


class _HealthCollector(Collector):
    def __init__(self, health: Callable[[], list[PartitionHealth]]) -> None:
        self._health = health

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["topic", "partition"]
        open_buckets = GaugeMetricFamily(f"{NAMESPACE}_open_buckets", "Aggregates held in memory", labels=labels)
        open_bytes = GaugeMetricFamily(
            f"{NAMESPACE}_open_buckets_bytes", "Estimated bytes of the aggregates held in memory", labels=labels
        )
        lag = GaugeMetricFamily(f"{NAMESPACE}_consumer_lag_records", "Records behind the end of the partition", labels=labels)
        watermark = GaugeMetricFamily(
            f"{NAMESPACE}_watermark_lag_seconds", "Wall clock minus the partition's watermark", labels=labels
        )
        for item in self._health():
            values = [item.topic, str(item.partition)]
            open_buckets.add_metric(values, item.open_buckets)
            open_bytes.add_metric(values, item.open_bytes)
            if item.consumer_lag_records is not None:
                lag.add_metric(values, item.consumer_lag_records)
            if item.watermark_lag_seconds is not None:
                watermark.add_metric(values, item.watermark_lag_seconds)
        yield from (open_buckets, open_bytes, lag, watermark)


def serve(registry: CollectorRegistry, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    """``/metrics`` over HTTP in a daemon thread; ``server.shutdown()`` stops it. A port in use
    (or a host not of this machine) is a :class:`ConfigError`, not a traceback."""
    try:
        return start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve /metrics on {host}:{port}: {exc.strerror or exc}") from exc


@dataclass
class BackfillTelemetry:
    """Progress of ``streamagg backfill``, on its own registry: a live worker's ``/metrics`` does
    not carry them, and a backfill serves them only when asked to (``--metrics-port``)."""

    registry: CollectorRegistry
    partitions: Gauge = field(init=False)
    partitions_done: Gauge = field(init=False)
    events_replayed: Counter = field(init=False)

    def __post_init__(self) -> None:
        r, ns = self.registry, NAMESPACE
        # Not "..._total": that suffix belongs to counters.
        self.partitions = Gauge("backfill_partitions", "Source partitions the backfill replays", namespace=ns, registry=r)
        self.partitions_done = Gauge(
            "backfill_partitions_done", "Source partitions replayed to the end of their window", namespace=ns, registry=r
        )
        self.events_replayed = Counter("backfill_events_replayed", "Records read by the backfill", namespace=ns, registry=r)


@dataclass(frozen=True)
class Progress:
    """What the worker's periodic progress line compares: its counters and the partitions'
    health at one moment (``at``: monotonic seconds)."""

    at: float
    aggregated: float
    rejected: float
    rows: tuple[float, float, float]  # hour, day, week rows written
    behind: int  # records between the owned partitions' state and their log ends
    watermark_lag_seconds: float | None  # of the partition furthest behind

    @classmethod
    def of(cls, telemetry: Telemetry, health: list[PartitionHealth], at: float) -> Progress:
        rows = _totals(telemetry.rows_written)
        lags = [item.watermark_lag_seconds for item in health if item.watermark_lag_seconds is not None]
        return cls(
            at=at,
            aggregated=sum(_totals(telemetry.records_processed).values()),
            rejected=sum(_totals(telemetry.events_rejected).values()),
            rows=(rows.get(("hour",), 0.0), rows.get(("day",), 0.0), rows.get(("week",), 0.0)),
            behind=sum(item.consumer_lag_records or 0 for item in health),
            watermark_lag_seconds=max(lags, default=None),
        )

    def line_since(self, before: Progress) -> str | None:
        """One line of what happened since ``before``; None when nothing did and nothing waits
        to be read (an idle worker that has caught up says nothing)."""
        aggregated, rejected = self.aggregated - before.aggregated, self.rejected - before.rejected
        rows = [now - then for now, then in zip(self.rows, before.rows, strict=True)]
        if not (aggregated or rejected or any(rows) or self.behind):
            return None
        seconds = max(self.at - before.at, 1e-9)
        line = (
            f"progress: {aggregated:,.0f} events aggregated in {seconds:.0f} s ({aggregated / seconds:,.0f}/s), "
            f"{rejected:,.0f} dead-lettered; rows written: {rows[0]:,.0f} hour, {rows[1]:,.0f} day, "
            f"{rows[2]:,.0f} week; {self.behind:,} records behind the log ends"
        )
        if self.watermark_lag_seconds is not None:
            line += f"; newest event time {_duration(self.watermark_lag_seconds)} behind the clock on the slowest partition"
        return line


def _totals(metric: Counter) -> dict[tuple[str, ...], float]:
    """A counter's value by label values (``()`` when it has no labels)."""
    out: dict[tuple[str, ...], float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                out[tuple(sample.labels.values())] = sample.value
    return out


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
