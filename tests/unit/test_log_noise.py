"""The worker's logging filter: normal library messages worded as alarms become INFO."""

from __future__ import annotations

import logging

import pytest

from streamagg.cli import _ExpectedNoise


def record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("mode.timers", logging.WARNING, __file__, 1, msg, args, None)


@pytest.mark.parametrize("timer", ["flush", "checkpoint"])
def test_a_slow_flush_or_checkpoint_timer_is_demoted(timer: str) -> None:
    entry = record("Timer %s is overlapping (interval=%r runtime=%r)", timer, 1.0, 1.4)
    _ExpectedNoise().filter(entry)
    assert entry.levelno == logging.INFO


def test_other_warnings_stay_warnings() -> None:
    entry = record("Timer %s is overlapping (interval=%r runtime=%r)", "daily_rollup", 1.0, 1.4)
    assert _ExpectedNoise().filter(entry) and entry.levelno == logging.WARNING
    entry = record("Heartbeat failed for group %s because it is rebalancing", "g")
    assert _ExpectedNoise().filter(entry) and entry.levelno == logging.WARNING


def test_a_coordinator_marked_dead_and_looked_up_again_is_demoted() -> None:
    # aiokafka then finds the coordinator again (seen on a fresh broker in the demo)
    entry = logging.LogRecord("aiokafka.consumer.group_coordinator", logging.WARNING, __file__, 1,
                              "Marking the coordinator dead (node %s)for group %s.", (1, "g"), None)  # fmt: skip
    _ExpectedNoise().filter(entry)
    assert entry.levelno == logging.INFO
