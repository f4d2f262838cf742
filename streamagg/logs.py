"""stderr logging, as every command has it: streamagg's own INFO, the libraries' warnings, and
the Kafka client's noise kept readable.

A broker that cannot be reached made aiokafka log 70-80 ERROR lines a second for as long as it
lasted: such repeats pass once per window (:class:`Repeats`), and the worker still counts every
one of them in ``observability_aggregation_errors_total{stage="kafka"}``
(:func:`count_client_errors`). mode (under Faust's worker) replaces the root logger's
handlers when the worker starts, so the filters are on the libraries' own loggers, and
:func:`keep_own_lines` puts back what its handler changed.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

# Every logger of aiokafka (one per module that logs; the client's is plain "aiokafka").
KAFKA_CLIENT_LOGGERS = (
    "aiokafka",
    "aiokafka.admin.client",
    "aiokafka.cluster",
    "aiokafka.conn",
    "aiokafka.consumer.consumer",
    "aiokafka.consumer.fetcher",
    "aiokafka.consumer.group_coordinator",
    "aiokafka.producer.producer",
    "aiokafka.producer.sender",
)


class ExpectedNoise(logging.Filter):
    """Demotes to INFO library messages that say something normal in words of alarm: a fresh
    broker's first seconds (aiokafka logs ERROR for the group coordinator lookup, WARNING when
    it marks a coordinator that answered "not ready" dead before looking it up again, and
    WARNING for produce requests to partitions whose leader is still starting, and retries
    them all; a broker that stays away still shows as connection errors), and a flush or
    checkpoint timer that outlasts its interval while a backlog is worked off (mode logs
    WARNING; flush latency is in the metrics)."""

    LOGGERS = ("aiokafka.consumer.group_coordinator", "aiokafka.producer.sender", "mode.timers")

    def filter(self, record: logging.LogRecord) -> bool:
        msg, args = record.msg, record.args
        if not isinstance(msg, str) or not isinstance(args, tuple) or not args:
            return True
        retried = msg.startswith(("Group Coordinator Request failed", "Got error produce response")) and getattr(
            args[-1], "retriable", False
        )
        slow_timer = msg.startswith("Timer %s is overlapping") and args[0] in ("flush", "checkpoint")
        looked_up_again = msg.startswith("Marking the coordinator dead")
        if retried or slow_timer or looked_up_again:
            record.levelno, record.levelname = logging.INFO, "INFO"
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


class Repeats(logging.Filter):
    """Lets one warning or error of each message (by its template) through per WINDOW seconds;
    the next one says how many were held back. Every error, let through or not, is passed to
    ``count_error`` when one is set."""

    WINDOW = 10.0

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[tuple[str, object], tuple[float, int]] = {}  # template -> (let through at, held back)
        self.count_error: Callable[[], None] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        if record.levelno >= logging.ERROR and self.count_error is not None:
            self.count_error()
        key = (record.name, record.msg)
        shown_at, held = self._seen.get(key, (-self.WINDOW, 0))
        if record.created - shown_at < self.WINDOW:
            self._seen[key] = (shown_at, held + 1)
            return False
        if held:
            record.msg = f"{record.msg} ({held} more like this in the {record.created - shown_at:.0f} s before)"
        self._seen[key] = (record.created, 0)
        return True


FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# One for the process: it is on the Kafka client's loggers, which are the process's too.
_CLIENT_REPEATS = Repeats()


def configure_logging(verbose: int = 0, quiet: bool = False) -> None:
    """stderr logging as every command has it (the benchmarks too): streamagg's own INFO, the
    libraries' warnings, expected library noise demoted (:class:`ExpectedNoise`), the Kafka
    client's repeats held back (:class:`Repeats`)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose >= 2 else logging.WARNING,
        stream=sys.stderr,
        format=FORMAT,
    )
    own_level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.getLogger("streamagg").setLevel(own_level)
    for name in ExpectedNoise.LOGGERS:
        logging.getLogger(name).addFilter(ExpectedNoise())
    # After ExpectedNoise on the same logger: a demoted message is neither held back nor counted.
    for name in KAFKA_CLIENT_LOGGERS:
        logging.getLogger(name).addFilter(_CLIENT_REPEATS)
    # kafka-python (topic creation, generate) logs each retry of a broker it cannot reach as
    # ERROR and WARNING lines, a dozen before the command's own one-line error says so.
    logging.getLogger("kafka").setLevel(logging.DEBUG if verbose >= 2 else logging.CRITICAL)


def count_client_errors(count: Callable[[], None] | None) -> None:
    """Call ``count`` for every error the Kafka client logs (None: stop counting)."""
    _CLIENT_REPEATS.count_error = count


def keep_own_lines(root: logging.Logger) -> None:
    """After mode's logging setup at the worker's start: its handler took the root level
    (WARNING), which dropped streamagg's own INFO lines for the rest of the run (restores,
    rebalances, dead letters), and its own format. The loggers' levels decide again, and every
    line has the format of the lines before the start."""
    for handler in root.handlers:
        handler.setLevel(logging.NOTSET)
        handler.setFormatter(logging.Formatter(FORMAT))
