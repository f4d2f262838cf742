"""UTC hour/day/week bucketing against datetime arithmetic, at the edges."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from streamagg.buckets import bucket_start_ms, hour_starts_ms, to_datetime, to_ms


def ms(moment: datetime) -> int:
    return to_ms(moment)


def reference(moment: datetime, granularity: str) -> datetime:
    if granularity == "hour":
        return moment.replace(minute=0, second=0, microsecond=0)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return day if granularity == "day" else day - timedelta(days=day.weekday())  # ISO: Monday


EDGES = [
    datetime(2026, 11, 26, 13, 0, 0, tzinfo=UTC),
    datetime(2026, 11, 26, 12, 59, 59, 999000, tzinfo=UTC),
    datetime(2026, 11, 29, 23, 59, 59, 999000, tzinfo=UTC),  # Sunday, last ms of an ISO week
    datetime(2026, 11, 30, 0, 0, tzinfo=UTC),  # Monday 00:00
    datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC),
    datetime(2027, 1, 1, 0, 0, tzinfo=UTC),  # Friday: its ISO week started in 2026
    datetime(2024, 2, 29, 12, 0, tzinfo=UTC),
    datetime(1970, 1, 1, tzinfo=UTC),  # a Thursday
    datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
    datetime(1969, 12, 29, 0, 0, tzinfo=UTC),  # Monday before the epoch
]


@pytest.mark.parametrize("moment", EDGES, ids=lambda m: m.isoformat())
@pytest.mark.parametrize("granularity", ["hour", "day", "week"])
def test_edges_match_datetime(moment: datetime, granularity: str) -> None:
    assert bucket_start_ms(ms(moment), granularity) == ms(reference(moment, granularity))  # type: ignore[arg-type]


def test_random_times_match_datetime() -> None:
    rng = np.random.default_rng(7)
    for value in rng.integers(-(10**12), 4 * 10**12, size=2000).tolist():
        moment = to_datetime(value)
        for granularity in ("hour", "day", "week"):
            assert bucket_start_ms(value, granularity) == ms(reference(moment, granularity))


def test_week_starts_on_monday() -> None:
    start = to_datetime(bucket_start_ms(ms(datetime(2026, 11, 26, tzinfo=UTC)), "week"))
    assert start == datetime(2026, 11, 23, tzinfo=UTC)
    assert start.isoweekday() == 1


def test_vectorised_hours_match_scalar() -> None:
    values = np.array([-1, 0, 3_599_999, 3_600_000, 1_764_161_999_999])
    assert hour_starts_ms(values).tolist() == [bucket_start_ms(int(v), "hour") for v in values]


def test_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError):
        to_ms(datetime(2026, 1, 1))


def test_offset_datetimes_convert() -> None:
    moment = datetime(2026, 11, 26, 15, 0, tzinfo=UTC).astimezone(tz=None)
    assert to_datetime(to_ms(moment)) == datetime(2026, 11, 26, 15, 0, tzinfo=UTC)
