"""Decoding and validation of the four event kinds (CONTRACT section 2). Pure, no I/O.

:func:`decode` turns one message value into an :class:`Event` or raises :class:`Rejected`
carrying one :class:`Reason` of a fixed set. A rejected message goes unchanged to the dead
letter topic; it never reaches an aggregate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final, Literal

import orjson

from .buckets import to_ms
from .errors import StreamaggError

EventKind = Literal["traces", "spans", "document_events", "chat_messages"]
EVENT_KINDS: Final[tuple[EventKind, ...]] = ("traces", "spans", "document_events", "chat_messages")

MAX_DIMENSION_LENGTH: Final = 256
# Event times whose hour, day and week buckets start and end within datetime's range (the store
# writes bucket starts and reads up to bucket ends; PostgreSQL's timestamptz covers more): from
# 0001-01-01, a Monday, up to the Monday of 9999's last week, which ends in the year 10000.
_MIN_EPOCH_MS: Final = -62_135_596_800_000  # 0001-01-01T00:00:00Z
_MAX_EPOCH_MS: Final = 253_401_868_799_999  # 9999-12-26T23:59:59.999Z
# orjson reads integer literals outside [-2**63, 2**64) as floats, all of magnitude >= 2**63.
_WIDE_INTEGER: Final = 2.0**63
# Integers below this are finite as floats, so :func:`_number` takes them (it takes some larger
# ones too, up to about 2**1024 - 2**970: those go to it).
_FINITE_FLOAT_INT: Final = 2**1023


class Reason(StrEnum):
    """Why a message was sent to the dead letter topic. The values are the ``reason`` header."""

    INVALID_JSON = "invalid_json"  # not UTF-8, or not JSON
    NOT_AN_OBJECT = "not_an_object"  # JSON, but not an object
    MISSING_FIELD = "missing_field"  # a required field is absent or null
    WRONG_TYPE = "wrong_type"  # a field has the wrong JSON type
    INVALID_NUMBER = "invalid_number"  # a number is NaN, infinite or negative
    INVALID_TIMESTAMP = "invalid_timestamp"  # a timestamp cannot be parsed or is out of range
    VALUE_TOO_LONG = "value_too_long"  # a dimension value longer than 256 characters
    INVALID_TEXT = "invalid_text"  # a dimension value PostgreSQL's text cannot hold (NUL, lone surrogate)
    TOO_LATE = "too_late"  # older than the watermark minus the maximum lateness


class Rejected(StreamaggError):
    """A message that cannot be aggregated; ``reason`` goes into the dead letter header."""

    retriable = False

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# Field types: "id" (string or integer, never aggregated), "dim" (dimension value: string or
# integer, stored as text, at most 256 characters), "str", "num" (finite, >= 0), "time".
FieldType = Literal["id", "dim", "str", "num", "time"]


@dataclass(frozen=True, slots=True)
class Schema:
    kind: EventKind
    time_field: str
    required: tuple[tuple[str, FieldType], ...]
    optional: tuple[tuple[str, FieldType], ...]
    # Numbers a metric adds up (the catalogue's llm.tokens): their sum must be finite too.
    sums: tuple[tuple[str, ...], ...] = ()


SCHEMAS: Final[dict[EventKind, Schema]] = {
    "traces": Schema(
        "traces",
        "started_at",
        required=(
            ("trace_id", "id"),
            ("operation_type", "dim"),
            ("started_at", "time"),
            ("duration_ms", "num"),
            ("status", "str"),
        ),
        optional=(("user_id", "dim"), ("kb_id", "dim"), ("total_tokens", "num"), ("cost_usd", "num")),
    ),
    "spans": Schema(
        "spans",
        "started_at",
        required=(
            ("span_id", "id"),
            ("trace_id", "id"),
            ("span_type", "str"),
            ("started_at", "time"),
            ("duration_ms", "num"),
        ),
        optional=(
            ("model", "dim"),
            ("prompt_tokens", "num"),
            ("completion_tokens", "num"),
            ("user_id", "dim"),
            ("kb_id", "dim"),
            ("status", "str"),
        ),
        sums=(("prompt_tokens", "completion_tokens"),),
    ),
    "document_events": Schema(
        "document_events",
        "created_at",
        required=(("document_id", "id"), ("event_type", "dim"), ("created_at", "time")),
        optional=(("duration_ms", "num"), ("kb_id", "dim"), ("user_id", "dim"), ("status", "str")),
    ),
    "chat_messages": Schema(
        "chat_messages",
        "created_at",
        required=(("message_id", "id"), ("kb_id", "dim"), ("created_at", "time")),
        optional=(("response_time_ms", "num"), ("user_id", "dim"), ("role", "str")),
    ),
}


@dataclass(slots=True)
class Event:
    """A validated event: its kind, event time and normalised fields.

    ``fields`` holds every known field that is present and not null: dimensions as ``str``,
    numbers as ``int``/``float``, timestamps as epoch milliseconds. Unknown fields are dropped.
    Treated as immutable, but not ``frozen`` (as :class:`~streamagg.aggregate.Row` is not):
    0.39 us to build against 0.20, once an event (measured).
    """

    kind: EventKind
    time_ms: int
    fields: dict[str, Any]


def decode(kind: EventKind, raw: bytes | str, record_ms: int | None = None, max_ahead_ms: int = 0) -> Event:
    """Parse and validate one message value of topic ``kind``. With ``record_ms``, the Kafka
    record's timestamp (negative: none), an event time more than ``max_ahead_ms`` (the maximum
    lateness) ahead of it is refused: the watermark is the newest event time, and one event of
    a producer whose clock said 2099 closed every hour of its partition and made every later
    event on it too late, for good. Bounded by the lateness, no event moves the watermark so far
    ahead of the records that an event on time is too late."""
    event = validate(kind, parse_json(raw))
    if record_ms is not None and record_ms >= 0 and event.time_ms > record_ms + max_ahead_ms:
        raise Rejected(Reason.INVALID_TIMESTAMP, f"event time {event.time_ms} ms is more than the maximum lateness "
                                                 f"({max_ahead_ms} ms) ahead of its Kafka record's timestamp {record_ms} ms")  # fmt: skip
    return event


def parse_json(raw: bytes | str) -> object:
    """The JSON value of UTF-8 bytes (or text), exactly as :func:`parse_json_reference` reads it.

    orjson is about three times as fast as :func:`json.loads` and reads what it accepts the same
    way, but it accepts less: no ``NaN``/``Infinity``, no numbers that overflow a float, no lone
    surrogate escapes, no nesting deeper than 1024; and it reads integers outside 64 bits as
    floats. When orjson refuses a value, or returns a top-level value (the only ones validation
    looks at) that is a float of magnitude 2**63 or more, the value is read again by the
    reference, whose result or rejection is the outcome.
    """
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return parse_json_reference(raw)
    for item in value.values() if type(value) is dict else (value,):
        if type(item) is float and not -_WIDE_INTEGER < item < _WIDE_INTEGER:
            return parse_json_reference(raw)
    return value


def parse_json_reference(raw: bytes | str) -> object:
    """:func:`json.loads` of the value decoded as UTF-8: the definition of what is valid JSON here."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes | bytearray | memoryview) else raw
        return json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise Rejected(Reason.INVALID_JSON, str(exc)) from exc
    except RecursionError as exc:
        raise Rejected(Reason.INVALID_JSON, "nested too deeply") from exc


def validate(kind: EventKind, obj: object) -> Event:
    """Validate an already parsed JSON value (the generator and tests build objects directly)."""
    if obj.__class__ is not dict and not isinstance(obj, dict):
        raise Rejected(Reason.NOT_AN_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
    checks, time_field, sums = _VALIDATORS[kind]
    get = obj.get
    fields: dict[str, Any] = {}
    for name, ftype, check, required in checks:
        value = get(name)
        if value is None:
            if required:
                raise Rejected(Reason.MISSING_FIELD, f"{kind} event has no {name!r}")
            continue
        # The usual values, taken as their check would take them (validation 2.90 -> 2.39 us an
        # event, measured); any other goes to the check, which normalises or refuses it.
        cls = value.__class__
        if cls is str:
            if ftype == "id" or ftype == "str" or (ftype == "dim" and _plain_dimension(value)):
                fields[name] = value
                continue
        elif cls is float:
            if ftype == "num" and 0.0 <= value < math.inf:
                fields[name] = value
                continue
        elif cls is int:
            if (ftype == "num" and 0 <= value < _FINITE_FLOAT_INT) or (ftype == "time" and _MIN_EPOCH_MS <= value <= _MAX_EPOCH_MS):
                fields[name] = value
                continue
        fields[name] = check(name, value)
    for label, names in sums:  # two finite numbers can add up to one that is not: 1e308 + 1e308
        _number(label, sum([fields.get(name, 0) for name in names]))
    return Event(kind, fields[time_field], fields)


def _plain_dimension(text: str) -> bool:
    """A dimension value :func:`_dimension` takes as it is: ASCII, no NUL, not too long."""
    return len(text) <= MAX_DIMENSION_LENGTH and text.isascii() and "\x00" not in text


def _number(name: str, value: object) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Rejected(Reason.WRONG_TYPE, f"{name!r} must be a number, got {_json_type(value)}")
    try:
        valid = math.isfinite(value) and value >= 0
    except OverflowError:  # an integer beyond every float: it could not be aggregated
        raise Rejected(Reason.INVALID_NUMBER, f"{name!r} is an integer of {len(str(value))} digits, too large") from None
    if not valid:
        raise Rejected(Reason.INVALID_NUMBER, f"{name!r} must be finite and >= 0, got {value!r}")
    return value


def _identifier(name: str, value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise Rejected(Reason.WRONG_TYPE, f"{name!r} must be a string or an integer, got {_json_type(value)}")


def _dimension(name: str, value: object) -> str:
    text = _identifier(name, value)
    if len(text) > MAX_DIMENSION_LENGTH:
        raise Rejected(Reason.VALUE_TOO_LONG, f"{name!r} has {len(text)} characters, more than {MAX_DIMENSION_LENGTH}")
    # Valid JSON, but no PostgreSQL text: stored, it would fail every flush of its hour for good.
    if "\x00" in text:
        raise Rejected(Reason.INVALID_TEXT, f"{name!r} contains a NUL character")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise Rejected(Reason.INVALID_TEXT, f"{name!r} contains a lone surrogate, which UTF-8 cannot encode") from None
    return text


def _string(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise Rejected(Reason.WRONG_TYPE, f"{name!r} must be a string, got {_json_type(value)}")
    return value


def parse_timestamp(name: str, value: object) -> int:
    """RFC 3339 text (no offset means UTC) or integer epoch milliseconds -> epoch milliseconds."""
    if isinstance(value, str):
        moment = _from_rfc3339(value.upper())
        if moment is None:
            raise Rejected(Reason.INVALID_TIMESTAMP, f"{name!r}: {value[:64]!r} is not RFC 3339")
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        time_ms = to_ms(moment)  # an offset can take year 1 or 9999 past the range: checked below
        if not _MIN_EPOCH_MS <= time_ms <= _MAX_EPOCH_MS:
            raise Rejected(Reason.INVALID_TIMESTAMP, f"{name!r}: {value[:64]!r} is out of range")
        return time_ms
    if isinstance(value, int) and not isinstance(value, bool):
        if not _MIN_EPOCH_MS <= value <= _MAX_EPOCH_MS:
            raise Rejected(Reason.INVALID_TIMESTAMP, f"{name!r}: epoch milliseconds {value} out of range")
        return value
    raise Rejected(
        Reason.WRONG_TYPE, f"{name!r} must be an RFC 3339 string or integer epoch milliseconds, got {_json_type(value)}"
    )


def _from_rfc3339(text: str) -> datetime | None:
    """``datetime.fromisoformat`` of an RFC 3339 date-time (a full date, ``T`` or a space, a full
    time); None otherwise. fromisoformat alone also reads ISO 8601's other forms: a date alone,
    week dates, ``20261127T111500``. A leap second, ``23:59:60`` (RFC 3339 allows it, datetime
    does not), is read as 23:59:59 plus a second, the next day's 00:00:00, as PostgreSQL reads it."""
    if len(text) < 19 or text[4] != "-" or text[7] != "-" or text[10] not in "T " or text[13] != ":" or text[16] != ":":
        return None
    leap = text[17:19] == "60"
    try:
        moment = datetime.fromisoformat(f"{text[:17]}59{text[19:]}" if leap else text)
        return moment + timedelta(seconds=1) if leap else moment
    except (ValueError, OverflowError):  # OverflowError: a leap second past 9999's last
        return None


def _json_type(value: object) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


_CHECKS: Final[dict[FieldType, Callable[[str, object], Any]]] = {
    "id": _identifier,
    "dim": _dimension,
    "str": _string,
    "num": _number,
    "time": parse_timestamp,
}
Checks = tuple[tuple[str, FieldType, Callable[[str, object], Any], bool], ...]
# Per kind: ((name, type, check, required) of every field, required first; the time field; the
# sums, each with its label), built once.
_VALIDATORS: Final[dict[EventKind, tuple[Checks, str, tuple[tuple[str, tuple[str, ...]], ...]]]] = {
    kind: (
        tuple((name, ftype, _CHECKS[ftype], True) for name, ftype in schema.required)
        + tuple((name, ftype, _CHECKS[ftype], False) for name, ftype in schema.optional),
        schema.time_field,
        tuple((" + ".join(names), names) for names in schema.sums),
    )
    for kind, schema in SCHEMAS.items()
}
