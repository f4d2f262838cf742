"""The worker's health over HTTP: every metric of the contract and of issue 4 is exposed, and
its values agree with what was sent (events per topic, rejections per reason, late and too
late events, overflowed series) and with the rows written."""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from streamagg.buckets import HOUR_MS
from streamagg.catalogue import OVERFLOW_VALUE
from streamagg.events import Reason
from streamagg.synth import Synth
from tests.integration.harness import Scenario, metric, wait_for


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by name: [(labels, value), ...]."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    matching = [v for l, v in samples.get(name, []) if all(l.get(k) == want for k, want in labels.items())]
    assert matching, f"{name}{labels} is not exposed"
    return sum(matching)


def test_metrics_over_http_agree_with_what_was_sent(scenario: Callable[..., Scenario]) -> None:
    world = scenario(hours=2, per_hour=800, seed=15, STREAMAGG_MAX_LATENESS_SECONDS=str(3 * 3600),
                     STREAMAGG_MAX_SERIES_PER_DIMENSION="25")  # fmt: skip
    world.produce()
    bad = [b"not json", b"{broken", b"[]", b'{"trace_id": "x"}']
    world.send_raw("traces", bad)
    started = time.time()
    _, port = world.start_worker()
    total = world.hours * world.per_hour
    wait_for("every event aggregated", lambda: metric(port, "observability_aggregation_records_processed_total") == total, world.workers)

    wait_for("closed hours flushed", lambda: metric(port, "observability_flush_latency_seconds_count"), world.workers)
    late_before = value(scrape(port), "observability_late_events_total")  # hours closed by idleness count too
    hour = world.start_ms
    late = {"trace_id": "late-1", "operation_type": "chat", "started_at": hour + 60_000, "duration_ms": 12.5, "status": "success"}
    too_late = {**late, "trace_id": "late-2", "started_at": hour - 3 * HOUR_MS}
    world.send_raw("traces", [json.dumps(late).encode(), json.dumps(too_late).encode()])
    wait_for("the late events counted", lambda: metric(port, "observability_events_too_late_total") == 1, world.workers)
    # Every hour of every partition flushed: the global rows (merged from all partitions) are
    # complete, and the flush that completed them has finished all its chunks.
    expected = {k: v.count for k, v in world.oracle().items() if k[2] is None}
    for name in ("trace.count", "trace.duration_ms"):
        expected[(hour, name, None, None)] += 1  # the late event
    wait_for("complete global rows", lambda: {k: r.count for k, r in world.rows().items() if k[2] is None} == expected, world.workers)
    complete_at = time.time()
    wait_for("that flush finished", lambda: (metric(port, "observability_aggregation_last_success") or 0) > complete_at, world.workers)
    wait_for("lag caught up", lambda: all(v == 0 for _, v in scrape(port).get("observability_consumer_lag_records", [(None, 1)])), world.workers)
    samples = scrape(port)

    # Contract section 6.
    assert value(samples, "observability_aggregation_records_processed_total") == total + 1  # + the late one
    assert value(samples, "observability_aggregation_duration_seconds_count") > 0
    assert value(samples, "observability_aggregation_last_success") >= started
    assert {l["stage"] for l, _ in samples["observability_aggregation_errors_total"]} >= {"process", "flush", "rollup"}
    # Events consumed by topic: everything produced, the bad and late ones on traces included.
    produced = Counter(kind for kind, _, _ in Synth(world.seed).events(world.start_ms, world.hours, world.per_hour))
    for kind, count in produced.items():
        extra = len(bad) + 2 if kind == "traces" else 0
        assert value(samples, "observability_events_consumed_total", topic=world.settings.topic(kind)) == count + extra
    # Rejections by reason equal the bad events sent; late and too-late events.
    rejected = {l["reason"]: v for l, v in samples["observability_events_rejected_total"]}
    assert {r: v for r, v in rejected.items() if v} == {"invalid_json": 2, "not_an_object": 1, "missing_field": 1, "too_late": 1}
    assert set(rejected) == {reason.value for reason in Reason}  # every reason is a series, at 0 until used
    assert value(samples, "observability_late_events_total") == late_before + 1
    assert value(samples, "observability_events_too_late_total") == 1
    # State gauges, per source topic-partition.
    partitions = {(l["topic"], l["partition"]) for l, _ in samples["observability_open_buckets"]}
    assert len(partitions) == 4 * 4  # four topics, four partitions each
    assert value(samples, "observability_open_buckets") > 0
    assert value(samples, "observability_open_buckets_bytes") > 0
    assert {(l["topic"], l["partition"]) for l, _ in samples["observability_consumer_lag_records"]} == partitions
    watermark_lags = [v for _, v in samples["observability_watermark_lag_seconds"]]
    assert len(watermark_lags) == len(partitions) and min(watermark_lags) > HOUR_MS / 1000  # the data ends an hour ago
    assert value(samples, "observability_flush_latency_seconds_count") > 0
    # Series past the cap went to __overflow__, and the counter says how many events did.
    rows = world.rows()
    for (metric_name, dimension_type), count in {
        (l["metric"], l["dimension_type"]): v for l, v in samples["observability_overflow_events_total"]
    }.items():
        stored = sum(r.count for k, r in rows.items() if k[1] == metric_name and k[2] == dimension_type and k[3] == OVERFLOW_VALUE)
        assert stored == count, (metric_name, dimension_type)
    assert value(samples, "observability_overflow_events_total", dimension_type="user_id") > 0
