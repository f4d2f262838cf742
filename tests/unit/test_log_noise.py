"""The worker's logging filters: normal library messages worded as alarms become INFO, and a
message repeated many times a second is let through once per window."""

from __future__ import annotations

import logging

import pytest

from streamagg.logs import ExpectedNoise, Repeats


def record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("mode.timers", logging.WARNING, __file__, 1, msg, args, None)


@pytest.mark.parametrize("timer", ["flush", "checkpoint"])
def test_a_slow_flush_or_checkpoint_timer_is_demoted(timer: str) -> None:
    entry = record("Timer %s is overlapping (interval=%r runtime=%r)", timer, 1.0, 1.4)
    ExpectedNoise().filter(entry)
    assert entry.levelno == logging.INFO


def test_other_warnings_stay_warnings() -> None:
    entry = record("Timer %s is overlapping (interval=%r runtime=%r)", "daily_rollup", 1.0, 1.4)
    assert ExpectedNoise().filter(entry) and entry.levelno == logging.WARNING
    entry = record("Heartbeat failed for group %s because it is rebalancing", "g")
    assert ExpectedNoise().filter(entry) and entry.levelno == logging.WARNING


def test_a_coordinator_marked_dead_and_looked_up_again_is_demoted() -> None:
    # aiokafka then finds the coordinator again (seen on a fresh broker in the demo)
    entry = logging.LogRecord("aiokafka.consumer.group_coordinator", logging.WARNING, __file__, 1,
                              "Marking the coordinator dead (node %s)for group %s.", (1, "g"), None)  # fmt: skip
    ExpectedNoise().filter(entry)
    assert entry.levelno == logging.INFO


def test_a_repeated_error_is_let_through_once_per_window() -> None:
    repeats = Repeats()

    def at(seconds: float, level: int = logging.ERROR, node: int = 1) -> logging.LogRecord:
        entry = logging.LogRecord("aiokafka", level, __file__, 1, "Unable connect to node with id %s: %s", (node, "refused"), None)
        entry.created = 1000.0 + seconds
        return entry

    assert repeats.filter(at(0.0))
    assert not any(repeats.filter(at(0.01 * i, node=i)) for i in range(1, 800))  # 80 a second, other args alike
    assert repeats.filter(at(0.5, level=logging.DEBUG))  # -vv sees them all
    again = at(10.0)
    assert repeats.filter(again) and again.getMessage().endswith("(799 more like this in the 10 s before)")
    other = logging.LogRecord("aiokafka", logging.ERROR, __file__, 1, "Unable to update metadata from %s", ([1],), None)
    other.created = 1000.5
    assert repeats.filter(other)  # another message has its own window


def test_every_kafka_client_error_is_counted_held_back_or_not() -> None:
    from prometheus_client import CollectorRegistry

    from streamagg.logs import configure_logging, count_client_errors
    from streamagg.telemetry import Telemetry

    telemetry = Telemetry(CollectorRegistry())
    configure_logging()
    count_client_errors(telemetry.errors.labels("kafka").inc)
    try:
        for node in range(50):  # one window: one line on stderr, 50 errors counted
            logging.getLogger("aiokafka").error("Unable connect to node with id %s: %s", node, "refused")
        logging.getLogger("aiokafka.conn").error("Unable to request metadata from node with id %s", 1)
        logging.getLogger("aiokafka.consumer.fetcher").warning("a warning is not an error")
        # a retried coordinator lookup on a fresh broker is demoted to INFO first, not an error
        retriable = type("Retriable", (Exception,), {"retriable": True})()
        logging.getLogger("aiokafka.consumer.group_coordinator").error("Group Coordinator Request failed: %s", retriable)
    finally:
        count_client_errors(None)
    assert telemetry.registry.get_sample_value("observability_aggregation_errors_total", {"stage": "kafka"}) == 51
