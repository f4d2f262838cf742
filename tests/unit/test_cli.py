"""The command line's own parsing (CONTRACT section 5), without services."""

from __future__ import annotations

import click
import pytest

from streamagg.buckets import rfc3339
from streamagg.cli import TIME


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-26", "2026-11-26T00:00:00Z"),  # a date: midnight UTC
        ("2026-11-26T13:00:00Z", "2026-11-26T13:00:00Z"),
        ("2026-11-26T15:00:00+02:00", "2026-11-26T13:00:00Z"),
        ("2026-11-26 13:00:00", "2026-11-26T13:00:00Z"),  # no offset: UTC
    ],
)
def test_a_time_is_rfc_3339_or_a_date(text: str, expected: str) -> None:
    assert rfc3339(TIME.convert(text, None, None)) == expected


@pytest.mark.parametrize("text", ["2026-1-26", "20261126", "2026-W48-5", "2026-11-26T13:00", "tomorrow"])
def test_other_times_are_refused_with_a_one_line_reason(text: str) -> None:
    with pytest.raises(click.BadParameter, match="is not an RFC 3339 time or a date"):
        TIME.convert(text, None, None)
