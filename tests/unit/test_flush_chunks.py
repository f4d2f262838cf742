"""How the worker splits a flush into transactions (streamagg.app.flush_chunks), and backs off
when they fail."""

from __future__ import annotations

import logging
import random
import time
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from streamagg.aggregate import Agg
from streamagg.app import Runtime, flush_chunks
from streamagg.pipeline import Flushable
from streamagg.settings import Settings
from streamagg.store import StoreError, key_lock_id
from streamagg.telemetry import Telemetry


def test_every_partitions_partial_of_a_key_lands_in_one_chunk() -> None:
    rng = random.Random(3)
    keys = [(3_600_000, "trace.count", "user_id", f"u{i}") for i in range(1000)]
    items = []
    for partition in range(8):
        chosen = rng.sample(keys, 400)
        items.append(Flushable("t.traces", partition, [(key, Agg(None)) for key in chosen], closed_at_ms=7, offset=100 + partition))
    chunks = list(flush_chunks(items, max_keys=150))

    home: dict = {}
    seen = []
    for index, chunk in enumerate(chunks):
        chunk_keys = {key for part in chunk for key, _ in part.items}
        assert len(chunk_keys) <= 150
        for part in chunk:
            original = items[part.partition]
            assert (part.topic, part.offset, part.closed_at_ms) == (original.topic, original.offset, original.closed_at_ms)
            for key, agg in part.items:
                assert home.setdefault(key, index) == index  # one chunk per key
                seen.append((part.partition, key, id(agg)))
    expected = [(item.partition, key, id(agg)) for item in items for key, agg in item.items]
    assert sorted(seen) == sorted(expected)  # nothing lost, nothing twice


def test_no_items_no_chunks() -> None:
    assert list(flush_chunks([], max_keys=10)) == []


def test_chunks_follow_the_lock_stripes() -> None:
    """Consecutive chunks lock consecutive stripe ranges: two transactions in flight (one per
    lane of consecutive chunks) share at most the stripe at their boundary."""
    keys = [(3_600_000, "trace.count", "user_id", f"u{i}") for i in range(2000)]
    items = [Flushable("t.traces", p, [(key, Agg(None)) for key in keys[p::3]], closed_at_ms=7, offset=1) for p in range(3)]
    stripes = [sorted({key_lock_id(key) for part in chunk for key, _ in part.items}) for chunk in flush_chunks(items, max_keys=300)]
    assert len(stripes) == 7
    for before, after in zip(stripes, stripes[1:]):
        assert before[-1] <= after[0]


def test_the_backoff_grows_once_per_flush_attempt(caplog: pytest.LogCaptureFixture) -> None:
    """However many of an attempt's chunks fail: counted per chunk, an 8 s database outage
    reached the 60 s ceiling, and rows came 40 s after the database did. Each stage's failure
    is logged once an attempt (every chunk in flight logged it)."""
    telemetry = Telemetry(CollectorRegistry())
    runtime = SimpleNamespace(telemetry=telemetry, settings=Settings(flush_interval_seconds=1.0),
                              _failures=0, _failed_stages=set(), _retry_at=0.0)  # fmt: skip
    error = StoreError("writing partials failed: ConnectionDoesNotExistError", retriable=True)
    with caplog.at_level(logging.WARNING, logger="streamagg"):
        for _ in range(5):  # one attempt, five failed chunks
            Runtime._failed(runtime, "flush", error)  # type: ignore[arg-type]
        Runtime._failed(runtime, "rollup", error)  # type: ignore[arg-type]
    assert runtime._failures == 1 and 0.5 < runtime._retry_at - time.monotonic() <= 1.0
    assert [record.getMessage()[:30] for record in caplog.records] == ["flush failed (1 in a row; stat", "rollup failed (1 in a row; sta"]
    runtime._failed_stages.clear()  # the next attempt (Runtime.flush starts each so)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="streamagg"):
        Runtime._failed(runtime, "flush", error)  # type: ignore[arg-type]
    assert runtime._failures == 2 and 1.5 < runtime._retry_at - time.monotonic() <= 2.0
    assert len(caplog.records) == 1
    assert telemetry.errors.labels("flush")._value.get() == 6  # every failure is counted
