"""Decoding and validation: every rejection reason, timestamps, normalisation."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from streamagg.buckets import bucket_start_ms, to_datetime, width_ms
from streamagg.events import EVENT_KINDS, SCHEMAS, Reason, Rejected, decode, parse_json, parse_json_reference, validate
from streamagg.synth import Synth
from streamagg.pipeline import MAX_DEAD_LETTER_VALUE, DeadLetter, RawMessage

TRACE = {
    "trace_id": "t1",
    "operation_type": "chat",
    "started_at": "2026-11-26T13:00:00Z",
    "duration_ms": 12.5,
    "status": "success",
}


def ms(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp() * 1000)


def reason_of(kind: str, raw: bytes | str) -> Reason:
    with pytest.raises(Rejected) as info:
        decode(kind, raw)  # type: ignore[arg-type]
    return info.value.reason


def test_valid_trace_is_normalised() -> None:
    event = decode("traces", json.dumps({**TRACE, "kb_id": 7, "user_id": None, "extra": [1]}).encode())
    assert event.kind == "traces"
    assert event.time_ms == ms(2026, 11, 26, 13)
    assert event.fields["kb_id"] == "7"  # integer dimension values are stored as text
    assert "user_id" not in event.fields  # null means missing
    assert "extra" not in event.fields  # unknown fields are ignored


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe not utf-8", Reason.INVALID_JSON),
        (b"{not json", Reason.INVALID_JSON),
        (b"[1, 2]", Reason.NOT_AN_OBJECT),
        (b'"text"', Reason.NOT_AN_OBJECT),
        (json.dumps({k: v for k, v in TRACE.items() if k != "status"}), Reason.MISSING_FIELD),
        (json.dumps({**TRACE, "trace_id": None}), Reason.MISSING_FIELD),
        (json.dumps({**TRACE, "duration_ms": "12"}), Reason.WRONG_TYPE),
        (json.dumps({**TRACE, "duration_ms": True}), Reason.WRONG_TYPE),
        (json.dumps({**TRACE, "status": 1}), Reason.WRONG_TYPE),
        (json.dumps({**TRACE, "operation_type": 1.5}), Reason.WRONG_TYPE),
        (json.dumps({**TRACE, "operation_type": {"a": 1}}), Reason.WRONG_TYPE),
        (json.dumps({**TRACE, "started_at": 1.5e12}), Reason.WRONG_TYPE),
        (json.dumps({**TRACE, "duration_ms": -1}), Reason.INVALID_NUMBER),
        ('{"trace_id":"t","operation_type":"c","started_at":0,"duration_ms":NaN,"status":"s"}', Reason.INVALID_NUMBER),
        ('{"trace_id":"t","operation_type":"c","started_at":0,"duration_ms":Infinity,"status":"s"}', Reason.INVALID_NUMBER),
        ('{"trace_id":"t","operation_type":"c","started_at":0,"duration_ms":1e999,"status":"s"}', Reason.INVALID_NUMBER),
        (json.dumps({**TRACE, "cost_usd": -0.5}), Reason.INVALID_NUMBER),
        (json.dumps({**TRACE, "started_at": "yesterday"}), Reason.INVALID_TIMESTAMP),
        (json.dumps({**TRACE, "started_at": "2026-13-01T00:00:00Z"}), Reason.INVALID_TIMESTAMP),
        (json.dumps({**TRACE, "started_at": 10**17}), Reason.INVALID_TIMESTAMP),
        (json.dumps({**TRACE, "operation_type": "x" * 257}), Reason.VALUE_TOO_LONG),
        (json.dumps({**TRACE, "user_id": "u" * 257}), Reason.VALUE_TOO_LONG),
        # Valid JSON that PostgreSQL's text cannot hold: it stalled every flush of its hour.
        (json.dumps({**TRACE, "user_id": "a\x00b"}), Reason.INVALID_TEXT),
        (json.dumps({**TRACE, "operation_type": "\ud800"}), Reason.INVALID_TEXT),
        (json.dumps({**TRACE, "kb_id": "x\udc00\ud800"}), Reason.INVALID_TEXT),
        # These two raised out of decode (OverflowError, RecursionError): a worker crash loop.
        (json.dumps({**TRACE, "duration_ms": 10**400}), Reason.INVALID_NUMBER),
        (json.dumps({**TRACE, "extra": [[]]}).replace("[[]]", "[" * 100_000 + "]" * 100_000), Reason.INVALID_JSON),
    ],
)
def test_rejection_reasons(raw: bytes | str, reason: Reason) -> None:
    assert reason_of("traces", raw) is reason


LLM_SPAN = '{"span_id":"s","trace_id":"t","span_type":"llm","started_at":0,"duration_ms":1,%s}'


@pytest.mark.parametrize("digits", ["1" + "0" * 308, "1e308"])  # an integer as Python adds it, and a float
def test_token_counts_whose_sum_is_not_finite_are_rejected(digits: str) -> None:
    """Each count is finite, their sum (llm.tokens' value) is not: it raised OverflowError in the
    aggregation (a crash loop: the batch was replayed after each restart), or made sums infinite."""
    tokens = f'"prompt_tokens":{digits},"completion_tokens":{digits}'
    assert reason_of("spans", LLM_SPAN % tokens) is Reason.INVALID_NUMBER
    assert decode("spans", LLM_SPAN % tokens.replace(',"completion_tokens"', ',"other"')).fields["prompt_tokens"] > 0


def test_dimension_of_exactly_256_characters_is_accepted() -> None:
    assert validate("traces", {**TRACE, "user_id": "u" * 256}).fields["user_id"] == "u" * 256


def test_ids_are_not_length_limited() -> None:
    assert validate("traces", {**TRACE, "trace_id": "t" * 1000}).fields["trace_id"] == "t" * 1000


@pytest.mark.parametrize(
    ("kind", "event"),
    [
        ("spans", {"span_id": 1, "trace_id": "t", "span_type": "llm", "started_at": 0, "duration_ms": 0}),
        ("document_events", {"document_id": "d", "event_type": "parsed", "created_at": 0}),
        ("chat_messages", {"message_id": "m", "kb_id": "kb", "created_at": 0}),
    ],
)
def test_every_kind_needs_each_required_field(kind: str, event: dict) -> None:
    assert validate(kind, event).time_ms == 0  # type: ignore[arg-type]
    for name in event:
        with pytest.raises(Rejected) as info:
            validate(kind, {k: v for k, v in event.items() if k != name})  # type: ignore[arg-type]
        assert info.value.reason is Reason.MISSING_FIELD


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        ("2026-11-26T13:00:00Z", ms(2026, 11, 26, 13)),
        ("2026-11-26t13:00:00z", ms(2026, 11, 26, 13)),
        ("2026-11-26T13:00:00", ms(2026, 11, 26, 13)),  # naive means UTC
        ("2026-11-26 13:00:00.1234567+00:00", ms(2026, 11, 26, 13) + 123),  # floor to the millisecond
        ("2026-11-26T15:30:00+02:30", ms(2026, 11, 26, 13)),
        ("2026-11-26T08:00:00-05:00", ms(2026, 11, 26, 13)),
        ("2026-11-27T00:30:00+01:00", ms(2026, 11, 26, 23, 30)),  # offset moves it to the previous day
        (ms(2026, 11, 26, 13), ms(2026, 11, 26, 13)),
        (0, 0),
        (-1, -1),  # before the epoch still buckets correctly
        ("2016-12-31T23:59:60Z", ms(2017, 1, 1)),  # a leap second: the next second, as PostgreSQL reads it
        ("2016-12-31t23:59:60.5+00:00", ms(2017, 1, 1) + 500),
        ("0001-01-01T00:00:00Z", ms(1, 1, 1)),  # the first and the last accepted instant
        ("9999-12-26T23:59:59.999Z", ms(9999, 12, 27) - 1),
    ],
)
def test_timestamps(stamp: str | int, expected: int) -> None:
    assert validate("traces", {**TRACE, "started_at": stamp}).time_ms == expected


@pytest.mark.parametrize(
    "stamp",
    [
        "0001-01-01T00:00:00+01:00",  # year 0 once the offset is applied
        "9999-12-31T23:30:00-01:00",  # year 10000 once the offset is applied
        "9999-12-27T00:00:00Z",  # its week ends in the year 10000
        "9999-12-31T23:59:60Z",  # a leap second past datetime's last second
        "2016-12-31T23:60:59Z",  # only seconds may read 60
        ms(9999, 12, 31, 21),
        ms(1, 1, 1) - 1,
    ],
)
def test_times_whose_buckets_leave_datetime_are_rejected(stamp: str | int) -> None:
    """They were accepted and made every flush or roll-up of their bucket raise OverflowError
    (a crash loop: the keys were restored and flushed again after each restart)."""
    with pytest.raises(Rejected) as info:
        validate("traces", {**TRACE, "started_at": stamp})
    assert info.value.reason is Reason.INVALID_TIMESTAMP


@pytest.mark.parametrize("stamp", ["2026-11-27", "20261127T111500", "2026-W48-5T11:00:00", "2026-11-27T11:00"])
def test_iso_8601_forms_that_are_not_rfc_3339_date_times_are_rejected(stamp: str) -> None:
    """datetime.fromisoformat reads them all (a date alone was aggregated at its midnight)."""
    with pytest.raises(Rejected) as info:
        validate("traces", {**TRACE, "started_at": stamp})
    assert info.value.reason is Reason.INVALID_TIMESTAMP


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00Z", "9999-12-26T23:59:59.999Z"])
def test_every_bucket_of_an_accepted_time_starts_and_ends_in_range(stamp: str) -> None:
    time_ms = validate("traces", {**TRACE, "started_at": stamp}).time_ms
    for granularity in ("hour", "day", "week"):
        start = bucket_start_ms(time_ms, granularity)
        assert to_datetime(start + width_ms(granularity)) > to_datetime(start)  # OverflowError if not


def test_rejection_carries_detail() -> None:
    with pytest.raises(Rejected) as info:
        validate("traces", {**TRACE, "duration_ms": -3})
    assert "duration_ms" in info.value.detail
    assert info.value.retriable is False


def test_reason_set_is_fixed() -> None:
    assert {r.value for r in Reason} == {
        "invalid_json",
        "not_an_object",
        "missing_field",
        "wrong_type",
        "invalid_number",
        "invalid_timestamp",
        "value_too_long",
        "invalid_text",
        "too_late",
    }


# -- orjson against json.loads ----------------------------------------------------------------
# What json.loads accepts and orjson does not, or reads otherwise; and plain tricky JSON.
TRICKY_TOKENS = [
    "NaN", "-NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1.7976931348623159e308", "4.9e-324", "2.4703282292062328e-324",
    "18446744073709551615", "18446744073709551616", "-9223372036854775808", "-9223372036854775809", "1" * 25, "-" + "9" * 40,
    "1e19", "-0", "-0.0", "0e0", "00", "1.", ".5", "1e", "0.1000000000000000055511151231257827", "true", "null",
    '"\\ud800"', '"\\udc00\\ud800"', '"\\ud83d\\ude00"', '"\\u0000"', '"a\x01b"', '"\x7f"', '"\\x"',
    '"\xc3\xa9"', "[" * 1100 + "]" * 1100, "[" * 900 + "]" * 900, "{}", "[]", '{"a":1,"a":2}',
]  # fmt: skip
NUMBER_SHAPES = ("{i}", "{i}.{f}", "{i}e{e}", "{i}.{f}E{e}", "-{i}.{f}e-{e}")


def random_number(rng: random.Random) -> str:
    def digits(n: int) -> str:
        return "".join(rng.choice("0123456789") for _ in range(n))

    integer = (str(rng.randrange(1, 10)) + digits(rng.randrange(0, 30))) if rng.random() < 0.9 else "0"
    shape = rng.choice(NUMBER_SHAPES)
    return shape.format(i=integer, f=digits(rng.randrange(1, 40)), e=rng.randrange(0, 330))


def mutated(rng: random.Random, kind: str, event: dict) -> bytes:
    """An event's JSON with a few random edits: tricky tokens or random numbers as values,
    duplicate keys, raw bytes (invalid UTF-8, BOM, control characters), truncation."""
    text = json.dumps(event, separators=(",", ":"), ensure_ascii=rng.random() < 0.5)
    for _ in range(rng.randrange(1, 4)):
        name = rng.choice([*event, "extra"])
        token = rng.choice(TRICKY_TOKENS) if rng.random() < 0.5 else random_number(rng)
        text = text[:-1] + f',"{name}":{token}}}' if rng.random() < 0.5 else f'{{"{name}":{token},' + text[1:]
    raw = text.encode("utf-8", "surrogatepass")
    edit = rng.randrange(8)
    if edit == 0:
        raw = raw[: rng.randrange(len(raw))]
    elif edit == 1:
        at = rng.randrange(len(raw))
        raw = raw[:at] + bytes([rng.randrange(256)]) + raw[at + 1 :]
    elif edit == 2:
        raw = rng.choice([b"\xef\xbb\xbf", b" \t\r\n", b"\x0c", b"\x00"]) + raw
    elif edit == 3:
        raw = rng.choice(TRICKY_TOKENS).encode("utf-8", "surrogatepass")
    return raw


def outcome(parse: Callable[[bytes | str], object], kind: str, raw: bytes | str) -> tuple:
    """What decoding ends in: the event (its field values with their types), or the rejection."""
    try:
        event = validate(kind, parse(raw))  # type: ignore[arg-type]
    except Rejected as exc:
        return ("rejected", exc.reason, exc.detail)
    except RecursionError:
        return ("recursion",)
    return ("event", event.time_ms, [(name, type(value), repr(value)) for name, value in event.fields.items()])


@pytest.mark.parametrize("seed", range(8))
def test_decode_matches_json_loads_on_random_input(seed: int) -> None:
    rng = random.Random(seed)
    for kind, _, event in Synth(seed).events(0, 1, 400):
        raw = mutated(rng, kind, event)
        assert outcome(parse_json, kind, raw) == outcome(parse_json_reference, kind, raw), raw
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert outcome(parse_json, kind, text) == outcome(parse_json_reference, kind, text), text  # type: ignore[arg-type]


def test_numbers_read_exactly_like_json_loads() -> None:
    """Every number literal orjson accepts is read to the same value and type as by json.loads."""
    rng = random.Random(1)
    for _ in range(20_000):
        raw = random_number(rng).encode()
        assert repr(parse_json(raw)) == repr(parse_json_reference(raw)), raw


@pytest.mark.parametrize("token", TRICKY_TOKENS)
@pytest.mark.parametrize("kind", EVENT_KINDS)
def test_tricky_values_decode_like_json_loads(token: str, kind: str) -> None:
    schema = SCHEMAS[kind]  # type: ignore[index]
    for name in (*(name for name, _ in schema.required + schema.optional), "extra"):
        raw = f'{{"{name}":{token}}}'.encode("utf-8", "surrogatepass")
        assert outcome(parse_json, kind, raw) == outcome(parse_json_reference, kind, raw), raw
    raw = token.encode("utf-8", "surrogatepass")
    assert outcome(parse_json, kind, raw) == outcome(parse_json_reference, kind, raw), raw


def test_an_event_further_ahead_of_its_kafka_record_than_the_lateness_is_rejected() -> None:
    """The watermark is the newest event time: one event of a clock saying 2099 made every later
    event of its partition too late, for good. Bounded by the record's timestamp, which a replay
    reads the same, and by the lateness, so no event on time is too late because of it."""
    at, lateness = ms(2026, 11, 26, 13), 48 * 3_600_000
    raw = json.dumps({**TRACE, "started_at": at})
    assert decode("traces", raw, at - lateness, lateness).time_ms == at  # exactly the lateness ahead: accepted
    with pytest.raises(Rejected) as info:
        decode("traces", raw, at - lateness - 1, lateness)
    assert info.value.reason is Reason.INVALID_TIMESTAMP and "ahead of its Kafka record" in info.value.detail
    assert decode("traces", raw).time_ms == decode("traces", raw, -1, lateness).time_ms == at  # no record timestamp


def test_a_dead_letter_carries_the_value_as_it_came() -> None:
    """Unchanged (CONTRACT section 2), a tombstone's null included; cut past the size a broker
    takes, with the size in a header; b"" only for a record with neither key nor value, which
    the client cannot send."""
    def letter(value: bytes | None, key: bytes | None = b"k") -> DeadLetter:
        return DeadLetter(RawMessage("t", 1, 7, value, key=key), Reason.INVALID_JSON, "")

    assert letter(b"not json").value() == b"not json"
    assert letter(None).value() is None and letter(None, key=None).value() == b""
    big = letter(b"x" * (MAX_DEAD_LETTER_VALUE + 5))
    assert big.value() == b"x" * MAX_DEAD_LETTER_VALUE
    assert (("truncated_from", str(MAX_DEAD_LETTER_VALUE + 5).encode())) in big.headers()


@pytest.mark.parametrize("name", ["trace_id", "operation_type", "status", "duration_ms", "started_at", "kb_id"])
def test_validation_takes_each_value_as_its_fields_check_does(name: str) -> None:
    """validate's shortcuts for the usual values (a plain string, a finite float, a small int)
    give what the field's own check gives, and refuse what it refuses, for all value types."""
    from streamagg.events import _CHECKS

    ftype = dict(SCHEMAS["traces"].required + SCHEMAS["traces"].optional)[name]
    values = ["chat", "", "é", "a\x00b", "x" * 256, "x" * 257, "\ud800", "2026-11-26T13:00:00Z", "2026-11-26",
              0, 7, -1, 2**53 + 1, 2**63, 2**1023 - 1, 2**1023, 2**1024, 10**400, 1_764_115_200_000, 253_401_868_799_999,
              253_401_868_800_000, -62_135_596_800_000, -62_135_596_800_001,
              0.0, -0.0, 1.5, -1.5, 1e308, math.inf, -math.inf, math.nan, True, False, [1], {"a": 1}]  # fmt: skip
    for value in values:
        try:
            want: object = _CHECKS[ftype](name, value)
        except Rejected as exc:
            want = exc.reason
        try:
            got: object = validate("traces", {**TRACE, name: value}).fields[name]
        except Rejected as exc:
            got = exc.reason
        assert type(got) is type(want) and (got == want or got != got and want != want), (value, got, want)
