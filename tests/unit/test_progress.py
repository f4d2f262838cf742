"""The worker's progress lines in its log: what it did since the last line, silent once caught up;
how far reading its checkpoints back has come."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from streamagg import app
from streamagg.telemetry import PartitionHealth, Progress, Telemetry


def test_the_worker_logs_progress_while_it_works_and_is_silent_once_caught_up_and_idle() -> None:
    telemetry = Telemetry(CollectorRegistry())

    def health(behind: int) -> list[PartitionHealth]:
        return [PartitionHealth("traces", 0, 10, 1000, behind, 7_560.0), PartitionHealth("traces", 1, 10, 1000, 0, 30.0)]

    start = Progress.of(telemetry, health(150_000), at=100.0)
    telemetry.records_processed.inc(60_000)
    telemetry.events_rejected.labels("too_late").inc(3)
    telemetry.rows_written.labels("hour").inc(12_000)
    working = Progress.of(telemetry, health(90_000), at=130.0)
    assert working.line_since(start) == (
        "progress: 60,000 events aggregated in 30 s (2,000/s), 3 dead-lettered; rows written: 12,000 hour, 0 day, "
        "0 week; 90,000 records behind the log ends; newest event time 2.1 h behind the clock on the slowest partition"
    )
    stuck = Progress.of(telemetry, health(90_000), at=160.0)  # nothing moved, records wait: say so
    assert stuck.line_since(working) is not None and "0 events aggregated" in stuck.line_since(working)
    idle = Progress.of(telemetry, health(0), at=190.0)
    assert idle.line_since(Progress.of(telemetry, health(0), at=160.0)) is None


class _Recovery:
    def active_remaining_total(self) -> int:
        return 40_000


def test_reading_the_checkpoints_back_logs_progress_every_interval_and_starts_over_at_a_new_recovery(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(app.time, "monotonic", lambda: clock[0])
    consumer = app._BatchConsumer.__new__(app._BatchConsumer)  # only its progress notes: no Kafka here

    def fetch(records: int, at: float) -> list[str]:
        clock[0] = at
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="streamagg.app"):
            consumer._note_recovery(_Recovery(), records)
        return caplog.messages

    step = app.RECOVERY_PROGRESS_SECONDS / 4
    assert fetch(5_000, 1000.0) == []  # a recovery starts
    assert [fetch(5_000, 1000.0 + i * step) for i in (1, 2, 3)] == [[], [], []]
    assert fetch(5_000, 1000.0 + 4 * step) == [
        f"recovering the checkpoints: 25,000 records read in {app.RECOVERY_PROGRESS_SECONDS:.0f} s, 40,000 to go"
    ]
    later = 1000.0 + 4 * step + app.RECOVERY_PROGRESS_SECONDS + 1  # a rebalance's recovery, much later
    assert fetch(5_000, later) == []
    assert fetch(5_000, later + app.RECOVERY_PROGRESS_SECONDS) == [
        f"recovering the checkpoints: 10,000 records read in {app.RECOVERY_PROGRESS_SECONDS:.0f} s, 40,000 to go"
    ]
