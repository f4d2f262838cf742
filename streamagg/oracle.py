"""The exact oracle: aggregates computed straight from events with plain Python, no sketches.

Written independently of ``streamagg.aggregate`` so the two can disagree: it loops event by
event over the catalogue and the slices and keeps every value. Percentiles follow
PostgreSQL's ``PERCENTILE_CONT`` (linear interpolation between closest ranks). The tests
and the demo's accuracy report measure the stored rows against it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from streamagg.buckets import bucket_start_ms
from streamagg.catalogue import METRICS_BY_KIND
from streamagg.events import Event


def correctly_rounded_sum(values: Iterable[float]) -> float:
    """The exact sum of the values rounded once; +inf when that is beyond the float range. (fsum
    alone refuses a partial sum beyond the range even when the total is not.)"""
    values = list(values)
    try:
        return math.fsum(values)
    except OverflowError:
        try:
            return float(sum(map(Fraction, values), Fraction(0)))
        except OverflowError:
            return math.inf


def percentile_cont(values: Iterable[float], rank: float) -> float:
    ordered = sorted(values)
    position = rank * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


@dataclass
class Exact:
    values: list[float] = field(default_factory=list)
    count: int = 0

    @property
    def sum(self) -> float:
        return correctly_rounded_sum(self.values)


Key = tuple[int, str, str | None, str | None]


def exact_hours(events: Iterable[Event], max_series: int | None = None) -> dict[Key, Exact]:
    """Every (hour, metric, slice) of the events, with all of its values."""
    out: dict[Key, Exact] = defaultdict(Exact)
    seen: dict[tuple[int, str, str], set[str]] = defaultdict(set)
    for event in events:
        hour = bucket_start_ms(event.time_ms, "hour")
        for metric in METRICS_BY_KIND[event.kind]:
            if not metric.select(event.fields):
                continue
            value = float(metric.value(event.fields)) if metric.value else None
            for dimension_type in metric.dimension_types:
                if dimension_type is None:
                    dimension_value = None
                elif dimension_type in event.fields:
                    dimension_value = event.fields[dimension_type]
                    if max_series is not None:
                        known = seen[(hour, metric.name, dimension_type)]
                        if dimension_value not in known and len(known) >= max_series:
                            dimension_value = "__overflow__"
                        else:
                            known.add(dimension_value)
                else:
                    continue
                exact = out[(hour, metric.name, dimension_type, dimension_value)]
                exact.count += 1
                if value is not None:
                    exact.values.append(value)
    return dict(out)


def exact_rollup(hours: dict[Key, Exact], granularity: str) -> dict[Key, tuple[Exact, float]]:
    """Day or week buckets: all values, and the sum as "hour sums added" (correctly rounded)."""
    grouped: dict[Key, list[Exact]] = defaultdict(list)
    for (bucket, metric, dimension_type, dimension_value), exact in hours.items():
        grouped[(bucket_start_ms(bucket, granularity), metric, dimension_type, dimension_value)].append(exact)
    out = {}
    for key, parts in grouped.items():
        merged = Exact([v for p in parts for v in p.values], sum(p.count for p in parts))
        out[key] = (merged, correctly_rounded_sum(p.sum for p in parts))
    return out


def quantiles(values: list[float], dtype: type = np.float64) -> list[float]:
    """p50/p95/p99 by PERCENTILE_CONT over the values as the sketch stores them (dtype: a float32
    sketch stores a value beyond float32's range as its largest value, not as inf), within the
    values' own [min, max] (a float32 item can lie just outside it)."""
    ceiling = float(np.finfo(dtype).max)
    stored = [float(dtype(min(v, ceiling))) for v in values]
    low, high = min(values), max(values)
    return [min(max(percentile_cont(stored, rank), low), high) for rank in (0.5, 0.95, 0.99)]
