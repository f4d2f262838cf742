"""UTC bucketing of event times. Pure; times are integer epoch milliseconds or aware datetimes.

hour = ``date_trunc('hour')``, day = ``date_trunc('day')``, week = ISO week starting Monday
00:00 UTC (``date_trunc('week')``). The epoch (1970-01-01) was a Thursday, so ISO weeks start
three days after multiples of seven days since the epoch.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from typing import Literal

import numpy as np

Granularity = Literal["hour", "day", "week"]
GRANULARITIES: tuple[Granularity, ...] = ("hour", "day", "week")

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
WEEK_MS = 7 * DAY_MS
_MONDAY_OFFSET_MS = 4 * DAY_MS  # 1970-01-05 was the first Monday
_WIDTH_MS = {"hour": HOUR_MS, "day": DAY_MS, "week": WEEK_MS}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def bucket_start_ms(time_ms: int, granularity: Granularity) -> int:
    """Start of the UTC bucket holding ``time_ms``, in epoch milliseconds."""
    if granularity == "week":
        return (time_ms - _MONDAY_OFFSET_MS) // WEEK_MS * WEEK_MS + _MONDAY_OFFSET_MS
    return time_ms // _WIDTH_MS[granularity] * _WIDTH_MS[granularity]


def hour_starts_ms(times_ms: np.ndarray) -> np.ndarray:
    """Vectorised :func:`bucket_start_ms` for hours (floor division, correct before 1970 too)."""
    return times_ms // HOUR_MS * HOUR_MS


def bucket_end_ms(start_ms: int, granularity: Granularity) -> int:
    return start_ms + _WIDTH_MS[granularity]


def width_ms(granularity: Granularity) -> int:
    return _WIDTH_MS[granularity]


@functools.lru_cache(maxsize=4096)
def to_datetime(time_ms: int) -> datetime:
    """Aware UTC datetime of an epoch-millisecond time (cached: the store converts a bucket
    start for every row it writes or reads, and a flush holds thousands of rows of few buckets)."""
    return EPOCH + timedelta(milliseconds=time_ms)


def rfc3339(time_ms: int) -> str:
    """RFC 3339 text of an epoch-millisecond time in UTC (``2026-11-26T13:00:00Z``)."""
    timespec = "seconds" if time_ms % 1000 == 0 else "milliseconds"
    return to_datetime(time_ms).isoformat(timespec=timespec).replace("+00:00", "Z")


def to_ms(moment: datetime) -> int:
    """Epoch milliseconds of an aware datetime (naive is refused: it has no meaning here)."""
    if moment.tzinfo is None:
        raise ValueError(f"naive datetime {moment.isoformat()} has no time zone")
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000
