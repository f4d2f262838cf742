"""When the worker rolls up the days and weeks of flushed hours (streamagg.app.rollup_due)."""

from __future__ import annotations

from streamagg.app import ROLLUP_MAX_PENDING_KEYS, rollup_due


def test_nothing_pending_nothing_to_do() -> None:
    assert not rollup_due(0, backlog=False, since_last=1e9, interval=5)


def test_a_backlog_defers_roll_ups_until_its_hours_are_written() -> None:
    assert not rollup_due(50_000, backlog=True, since_last=1e9, interval=5)
    assert rollup_due(50_000, backlog=False, since_last=6, interval=5)


def test_without_a_backlog_at_most_once_per_interval() -> None:
    assert not rollup_due(10, backlog=False, since_last=4.9, interval=5)
    assert rollup_due(10, backlog=False, since_last=5, interval=5)


def test_pending_keys_are_bounded_even_during_a_backlog() -> None:
    assert rollup_due(ROLLUP_MAX_PENDING_KEYS, backlog=True, since_last=0, interval=5)
    assert not rollup_due(ROLLUP_MAX_PENDING_KEYS - 1, backlog=True, since_last=0, interval=5)
