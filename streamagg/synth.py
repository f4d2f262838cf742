"""Realistic synthetic telemetry for all four event kinds, reproducible from a seed. Pure.

Heavy-tailed (lognormal) latencies whose scale depends on the operation or model, several
operation types, models and document event types, a few dozen knowledge bases, thousands of
users with a Zipf-like activity skew, some failed traces and spans without tokens. Used by
``streamagg generate``, the demo, the tests and the benchmarks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .buckets import HOUR_MS
from .events import EventKind

OPERATIONS = {"chat": 6.2, "search": 4.8, "ingest": 7.4, "summarize": 6.9, "embed": 3.9, "rerank": 4.2}
MODELS = {"gpt-4o": 6.6, "gpt-4o-mini": 5.9, "claude-3-5-sonnet": 6.5, "llama-3-70b": 6.1, "mistral-large": 6.0}
DOCUMENT_EVENTS = {"uploaded": 3.5, "parsed": 6.8, "chunked": 5.1, "embedded": 7.0, "indexed": 5.5, "deleted": 3.0}
SPAN_TYPES = ("llm", "llm", "llm", "retrieval", "tool", "embedding")
KIND_SHARES: dict[EventKind, float] = {"traces": 0.35, "spans": 0.40, "document_events": 0.10, "chat_messages": 0.15}


@dataclass(frozen=True)
class SynthConfig:
    users: int = 5000
    knowledge_bases: int = 40
    failure_rate: float = 0.04
    sigma: float = 1.0  # lognormal shape of every latency
    kind_shares: Mapping[EventKind, float] = field(default_factory=lambda: dict(KIND_SHARES))  # e.g. traces only


class Synth:
    """Draws events in time order, reproducibly from the seed."""

    def __init__(self, seed: int, config: SynthConfig | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        self.config = config or SynthConfig()
        self._serial = 0
        ranks = np.arange(1, self.config.users + 1)
        weights = 1.0 / ranks**0.8
        self._user_p = weights / weights.sum()

    def events(self, start_ms: int, hours: int, per_hour: int) -> Iterator[tuple[EventKind, int, dict[str, Any]]]:
        """``(kind, event time in epoch ms, event)`` for ``per_hour`` events in each hour."""
        kinds = list(self.config.kind_shares)
        shares = np.array(list(self.config.kind_shares.values()))
        for hour in range(hours):
            times = np.sort(self.rng.integers(0, HOUR_MS, size=per_hour)) + start_ms + hour * HOUR_MS
            picks = self.rng.choice(len(kinds), size=per_hour, p=shares / shares.sum())
            users = self.rng.choice(self.config.users, size=per_hour, p=self._user_p)
            kbs = self.rng.integers(0, self.config.knowledge_bases, size=per_hour)
            for time_ms, pick, user, kb in zip(times.tolist(), picks.tolist(), users.tolist(), kbs.tolist(), strict=True):
                kind = kinds[pick]
                yield kind, time_ms, self._make(kind, time_ms, f"user-{user}", f"kb-{kb}")

    def _id(self, prefix: str) -> str:
        self._serial += 1
        return f"{prefix}-{self._serial:010d}"

    def _latency(self, mu: float) -> float:
        return round(float(self.rng.lognormal(mu, self.config.sigma)), 3)

    def _make(self, kind: EventKind, time_ms: int, user: str, kb: str) -> dict[str, Any]:
        rng = self.rng
        stamp = _rfc3339(time_ms) if rng.random() < 0.5 else time_ms  # both encodings, as in the wild
        if kind == "traces":
            operation = str(rng.choice(list(OPERATIONS)))
            event: dict[str, Any] = {
                "trace_id": self._id("tr"),
                "operation_type": operation,
                "started_at": stamp,
                "duration_ms": self._latency(OPERATIONS[operation]),
                "status": "error" if rng.random() < self.config.failure_rate else "success",
                "user_id": user,
                "kb_id": kb,
            }
            if operation in ("chat", "summarize", "rerank"):
                event["total_tokens"] = int(rng.lognormal(6.5, 0.8))
                event["cost_usd"] = round(event["total_tokens"] * 2.5e-6, 8)
            return event
        if kind == "spans":
            span_type = str(rng.choice(SPAN_TYPES))
            event = {
                "span_id": self._id("sp"),
                "trace_id": self._id("tr"),
                "span_type": span_type,
                "started_at": stamp,
                "user_id": user,
                "kb_id": kb,
                "status": "success",
            }
            if span_type == "llm":
                model = str(rng.choice(list(MODELS)))
                event["model"] = model
                event["duration_ms"] = self._latency(MODELS[model])
                if rng.random() < 0.9:
                    event["prompt_tokens"] = int(rng.lognormal(6.0, 0.9))
                    event["completion_tokens"] = int(rng.lognormal(5.0, 0.8))
            else:
                event["duration_ms"] = self._latency(4.0)
            return event
        if kind == "document_events":
            event_type = str(rng.choice(list(DOCUMENT_EVENTS)))
            event = {"document_id": self._id("doc"), "event_type": event_type, "created_at": stamp, "kb_id": kb}
            if rng.random() < 0.8:
                event["user_id"] = user
            if event_type != "uploaded":
                event["duration_ms"] = self._latency(DOCUMENT_EVENTS[event_type])
            return event
        event = {"message_id": self._id("msg"), "kb_id": kb, "created_at": stamp, "user_id": user}
        if rng.random() < 0.5:
            event["role"] = "assistant"
            event["response_time_ms"] = self._latency(7.0)
        else:
            event["role"] = "user"
        return event


def _rfc3339(time_ms: int) -> str:
    seconds, millis = divmod(time_ms, 1000)
    moment = np.datetime64(seconds, "s").astype(str)
    return f"{moment}.{millis:03d}Z"
