"""The metric catalogue and its slices (CONTRACT section 3). Pure data.

A metric picks events of one kind (``select``) and, for "full" metrics, reads one value from
each (``value``). Every metric is aggregated globally (dimension NULL), by its natural
dimension, and by ``kb_id`` and ``user_id`` whenever the event carries them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Final, Literal

from .events import EventKind

Fields = Mapping[str, Any]
Stats = Literal["count", "full"]

DIMENSION_TYPES: Final = ("operation_type", "model", "event_type", "kb_id", "user_id")
OVERFLOW_VALUE: Final = "__overflow__"


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    kind: EventKind
    stats: Stats
    natural_dimension: str
    select: Callable[[Fields], bool]
    value: Callable[[Fields], float] | None = None

    @property
    def dimension_types(self) -> tuple[str | None, ...]:
        """The slices: None (global), the natural dimension, then kb_id and user_id, without repeats."""
        return tuple(dict.fromkeys((None, self.natural_dimension, "kb_id", "user_id")))

    @property
    def is_full(self) -> bool:
        return self.stats == "full"


def _always(fields: Fields) -> bool:
    return True


def _has(name: str) -> Callable[[Fields], bool]:
    return lambda fields: name in fields


def _field(name: str) -> Callable[[Fields], float]:
    return lambda fields: fields[name]


def _is_llm(fields: Fields) -> bool:
    return fields["span_type"] == "llm"


def _llm_with_tokens(fields: Fields) -> bool:
    return fields["span_type"] == "llm" and ("prompt_tokens" in fields or "completion_tokens" in fields)


def _llm_tokens(fields: Fields) -> float:
    prompt, completion = fields.get("prompt_tokens", 0), fields.get("completion_tokens", 0)
    total = prompt + completion
    # An integer beyond 2**53 plus a float is rounded twice (the integer to a float first): the
    # exact sum, rounded once, instead. Integers alone add exactly; so do floats, rounded once.
    if type(total) is float and max(abs(prompt), abs(completion)) > 2**53 and int in (type(prompt), type(completion)):
        return float(Fraction(prompt) + Fraction(completion))
    return total


METRICS: Final[tuple[Metric, ...]] = (
    Metric("trace.count", "traces", "count", "operation_type", _always),
    Metric(
        "trace.duration_ms",
        "traces",
        "full",
        "operation_type",
        lambda fields: fields["status"] == "success",
        _field("duration_ms"),
    ),
    Metric("trace.tokens", "traces", "full", "operation_type", _has("total_tokens"), _field("total_tokens")),
    Metric("trace.cost_usd", "traces", "full", "operation_type", _has("cost_usd"), _field("cost_usd")),
    Metric("llm.call_count", "spans", "count", "model", _is_llm),
    Metric("llm.latency_ms", "spans", "full", "model", _is_llm, _field("duration_ms")),
    Metric("llm.tokens", "spans", "full", "model", _llm_with_tokens, _llm_tokens),
    Metric("document.count", "document_events", "count", "event_type", _always),
    Metric("document.duration_ms", "document_events", "full", "event_type", _has("duration_ms"), _field("duration_ms")),
    Metric("chat.messages", "chat_messages", "count", "kb_id", _always),
    Metric(
        "chat.response_time_ms",
        "chat_messages",
        "full",
        "kb_id",
        _has("response_time_ms"),
        _field("response_time_ms"),
    ),
)

METRICS_BY_NAME: Final[dict[str, Metric]] = {metric.name: metric for metric in METRICS}
METRICS_BY_KIND: Final[dict[EventKind, tuple[Metric, ...]]] = {
    kind: tuple(metric for metric in METRICS if metric.kind == kind)
    for kind in ("traces", "spans", "document_events", "chat_messages")
}
