"""When the worker rolls up the days and weeks of flushed hours (streamagg.app.rollup_due)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from streamagg.app import ROLLUP_MAX_DEFERRAL, ROLLUP_MAX_PENDING_KEYS, rollup_due
from streamagg.pipeline import Pipeline
from streamagg.settings import Settings
from streamagg.telemetry import Telemetry


def test_nothing_pending_nothing_to_do() -> None:
    assert not rollup_due(0, backlog=False, since_last=1e9, interval=5)


def test_a_backlog_defers_roll_ups_until_its_hours_are_written() -> None:
    assert not rollup_due(50_000, backlog=True, since_last=ROLLUP_MAX_DEFERRAL * 5 - 0.1, interval=5)
    assert rollup_due(50_000, backlog=False, since_last=6, interval=5)


def test_a_backlog_defers_roll_ups_for_a_bounded_time() -> None:
    """A worker that never catches up still rolls up, every ROLLUP_MAX_DEFERRAL intervals."""
    assert rollup_due(50_000, backlog=True, since_last=ROLLUP_MAX_DEFERRAL * 5, interval=5)


def test_without_a_backlog_at_most_once_per_interval() -> None:
    assert not rollup_due(10, backlog=False, since_last=4.9, interval=5)
    assert rollup_due(10, backlog=False, since_last=5, interval=5)


def test_pending_keys_are_bounded_even_during_a_backlog() -> None:
    assert rollup_due(ROLLUP_MAX_PENDING_KEYS, backlog=True, since_last=0, interval=5)
    assert not rollup_due(ROLLUP_MAX_PENDING_KEYS - 1, backlog=True, since_last=0, interval=5)


def test_the_records_behind_the_log_ends_add_up_over_the_owned_partitions() -> None:
    """What tells a worker reading a backlog (CATCH_UP_RECORDS) from one keeping up."""
    pipeline = Pipeline(Settings(), Telemetry(CollectorRegistry()), lambda topic, partition: [])
    assert pipeline.unread() == 0
    pipeline.state_for("telemetry.traces", 0)
    pipeline.state_for("telemetry.spans", 3)
    assert pipeline.unread() == 0  # no end seen yet
    pipeline.saw_log_ends({("telemetry.traces", 0): 100, ("telemetry.spans", 3): 40, ("telemetry.spans", 4): 7})
    assert pipeline.unread() == 140  # nothing read yet; a partition not owned does not count
