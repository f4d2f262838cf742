"""What the demo prints: a dashboard table of stored rows, and their accuracy against the
exact values computed from the same events (streamagg.oracle)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from rich.table import Table

from .aggregate import Key, Row
from .buckets import rfc3339
from .catalogue import METRICS
from .oracle import Exact, percentile_cont
from .query import QueryRow

RANKS = (0.5, 0.95, 0.99)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def dashboard(
    hour_rows: Iterable[Row], day_rows: Iterable[Row], hour_label: str, day_label: str, top: int = 6
) -> Table:
    """Per metric: all, then its natural dimension's ``top`` values by the day's count: count,
    avg, p50, p95, p99 for an hour and a day."""
    hours = {(r.metric_name, r.dimension_value): r for r in hour_rows if _natural(r) or r.dimension_type is None}
    days = {(r.metric_name, r.dimension_value): r for r in day_rows if _natural(r) or r.dimension_type is None}
    table = Table(title=f"streamagg dashboard: last hour {hour_label}, day {day_label}", show_lines=False)
    table.add_column("metric", no_wrap=True, min_width=max(len(metric.name) for metric in METRICS))
    table.add_column("by", no_wrap=True, min_width=28)
    for scope in ("hour", "day"):
        for stat in ("count", "avg", "p50", "p95", "p99"):
            table.add_column(f"{scope} {stat}", justify="right")
    for metric in METRICS:
        named = {value for name, value in {**hours, **days} if name == metric.name and value is not None}
        busiest = sorted(named, key=lambda v: (-(days[(metric.name, v)].count if (metric.name, v) in days else 0), v))
        values: list[str | None] = [None, *busiest[:top]]
        for i, value in enumerate(values):
            label = "(all)" if value is None else f"{metric.natural_dimension}={value}"
            cells = [metric.name if i == 0 else "", label]
            for source in (hours, days):
                row = source.get((metric.name, value))
                cells += (
                    [f"{row.count:,}", _fmt(row.avg_value), _fmt(row.p50_value), _fmt(row.p95_value), _fmt(row.p99_value)]
                    if row
                    else ["-"] * 5
                )
            table.add_row(*cells, end_section=i == len(values) - 1)
    return table


def query_table(rows: Iterable[QueryRow], title: str) -> Table:
    """Results of ``streamagg query``: a bucket column unless they are totals, the series, then
    count, sum, min, max, avg, p50, p95, p99 ("-" where a count metric has no value)."""
    results = list(rows)
    table = Table(title=title)
    by_bucket = any(row.bucket_ms is not None for row in results)
    if by_bucket:
        table.add_column("bucket (UTC)", no_wrap=True)
    table.add_column("series", no_wrap=True)
    for stat in ("count", "sum", "min", "max", "avg", "p50", "p95", "p99"):
        table.add_column(stat, justify="right")
    for row in results:
        bucket = [rfc3339(row.bucket_ms)] if row.bucket_ms is not None else []
        series = "(all)" if row.dimension_type is None else f"{row.dimension_type}={row.dimension_value}"
        stats = (row.sum, row.min, row.max, row.avg, row.p50, row.p95, row.p99)
        table.add_row(*bucket, series, f"{row.count:,}", *(_fmt(value) for value in stats))
    return table


def _natural(row: Row) -> bool:
    return any(m.name == row.metric_name and m.natural_dimension == row.dimension_type for m in METRICS)


@dataclass
class Accuracy:
    rows: int = 0
    missing: list[Key] = field(default_factory=list)
    extra: list[Key] = field(default_factory=list)
    exact_mismatches: list[Key] = field(default_factory=list)  # count, sum, min or max differ
    worst_error: dict[float, float] = field(default_factory=lambda: dict.fromkeys(RANKS, 0.0))
    worst_error_large: dict[float, float] = field(default_factory=lambda: dict.fromkeys(RANKS, 0.0))

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.exact_mismatches)


def accuracy(rows: Iterable[Row], exact: Mapping[Key, Exact], sums: Mapping[Key, float] | None = None) -> Accuracy:
    """Compare stored rows with exact aggregates. ``sums`` overrides the expected sum (day and
    week sums are hour sums added). Percentile errors are relative errors of the value; the
    "large" figures cover buckets of at least 1,000 values, where the sketch estimates."""
    result = Accuracy()
    stored = {row.key: row for row in rows}
    result.missing = sorted(set(exact) - set(stored), key=repr)
    result.extra = sorted(set(stored) - set(exact), key=repr)
    for key in set(stored) & set(exact):
        row, truth = stored[key], exact[key]
        result.rows += 1
        if not truth.values:
            if row.count != truth.count:
                result.exact_mismatches.append(key)
            continue
        expected_sum = sums[key] if sums is not None else math.fsum(truth.values)
        if (row.count, row.sum_value, row.min_value, row.max_value) != (
            truth.count,
            expected_sum,
            min(truth.values),
            max(truth.values),
        ):
            result.exact_mismatches.append(key)
        ordered = np.sort(np.asarray(truth.values))
        for rank, estimate in zip(RANKS, (row.p50_value, row.p95_value, row.p99_value), strict=True):
            true = percentile_cont(ordered.tolist(), rank)
            error = abs(estimate / true - 1) if true else abs(estimate or 0.0)
            result.worst_error[rank] = max(result.worst_error[rank], error)
            if truth.count >= 1000:
                result.worst_error_large[rank] = max(result.worst_error_large[rank], error)
    return result
