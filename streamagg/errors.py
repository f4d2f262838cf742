"""The error tree of streamagg. Errors say whether retrying can help (``retriable``).

Callers branch on the class or on ``retriable``, never on message text.
"""

from __future__ import annotations


class StreamaggError(Exception):
    """Root of every error streamagg raises on purpose."""

    retriable: bool = False


class ConfigError(StreamaggError):
    """A setting is unknown or malformed; the process stops at start with this message."""


class StackError(StreamaggError):
    """The local development stack (Kafka, PostgreSQL) could not be started, stopped or reached."""


class PrerequisiteMissing(StackError):
    """A program the local stack needs (java, mvn, initdb) is not installed."""


class StateError(StreamaggError):
    """Aggregate state that cannot be decoded or merged (corrupt bytes, kinds that differ)."""
