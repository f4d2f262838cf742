"""The live worker on the real stack: rows equal the exact oracle, replays change nothing,
late events re-flush, SIGKILL and two workers end with the oracle's rows."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streamagg.aggregate import Row
from streamagg.buckets import HOUR_MS, bucket_start_ms
from streamagg.events import validate
from streamagg.generate import generate
from streamagg.oracle import Exact, exact_hours, exact_rollup
from streamagg.settings import Settings
from streamagg.stack import Stack, StackInfo, free_port
from streamagg.store import Store
from streamagg.synth import Synth
from tests.unit.test_aggregate import assert_row_matches

DEADLINE_SECONDS = 180


@dataclass
class Scenario:
    """One test's private world: topics (prefix), consumer group, database, worker processes."""

    env: dict[str, str]
    settings: Settings
    start_ms: int
    hours: int
    per_hour: int
    seed: int
    workers: list[subprocess.Popen] = field(default_factory=list)

    # -- data -----------------------------------------------------------------------------
    def produce(self) -> None:
        asyncio.run(generate(self.settings, self.hours, self.per_hour, self.seed, self.start_ms))

    def oracle(self) -> dict:
        events = [
            validate(kind, event) for kind, _, event in Synth(self.seed).events(self.start_ms, self.hours, self.per_hour)
        ]
        return exact_hours(events)

    def send_raw(self, topic: str, values: list[bytes]) -> None:
        producer = KafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap)
        for value in values:
            producer.send(self.settings.topic(topic), value)
        producer.flush()
        producer.close()

    # -- workers --------------------------------------------------------------------------
    def start_worker(self, app_id: str | None = None, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
        port = free_port()
        env = {**self.env, **(extra_env or {}), "STREAMAGG_METRICS_PORT": str(port)}
        if app_id:
            env["STREAMAGG_APP_ID"] = app_id
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamagg", "worker"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(os.devnull, "wb") if not os.environ.get("TEST_WORKER_LOGS") else None,
        )
        self.workers.append(proc)
        return proc, port

    def stop_all(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # -- reading --------------------------------------------------------------------------
    def rows(self, granularity: str = "hour") -> dict:
        async def fetch() -> list[Row]:
            async with await Store.open(self.settings.database_url.get_secret_value(), "test") as store:
                return await store.fetch_rows(granularity, self.start_ms - 8 * 24 * HOUR_MS, self.start_ms + 8 * 24 * HOUR_MS)  # type: ignore[arg-type]

        try:
            return {row.key: row for row in asyncio.run(fetch())}
        except Exception:  # the schema may not exist yet while the worker starts
            return {}

    def revisions(self) -> dict:
        async def fetch() -> dict:
            async with await Store.open(self.settings.database_url.get_secret_value(), "test") as store:
                return await store.revisions()

        return asyncio.run(fetch())


def wait_for(what: str, condition: Callable[[], bool], workers: list[subprocess.Popen], seconds: float = DEADLINE_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    delay = 0.2
    while time.monotonic() < deadline:
        if condition():
            return
        for proc in workers:
            assert proc.poll() is None or proc.returncode in (0, -9), f"a worker exited with {proc.returncode}"
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}: {condition!r}")


def metric(port: int, name: str, labels: str = "") -> float | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return None


class counts_match:  # noqa: N801  (reads as a condition)
    """Stored hour counts equal the oracle's; its repr says how far off they are."""

    def __init__(self, scenario: Scenario, oracle: dict) -> None:
        self.scenario = scenario
        self.expected = {key: exact.count for key, exact in oracle.items()}
        self.last: dict = {}

    def __call__(self) -> bool:
        self.last = {key: row.count for key, row in self.scenario.rows().items()}
        return self.last == self.expected

    def __repr__(self) -> str:
        missing = set(self.expected) - set(self.last)
        extra = set(self.last) - set(self.expected)
        off = {k for k in set(self.expected) & set(self.last) if self.expected[k] != self.last[k]}
        sample = sorted(off, key=repr)[:3]
        return (f"{len(missing)} missing, {len(extra)} extra, {len(off)} with other counts, e.g. "
                f"{[(k, self.expected[k], self.last[k]) for k in sample]}")  # fmt: skip


def assert_equal_to_oracle(scenario: Scenario, oracle: dict[tuple, Exact]) -> None:
    rows = scenario.rows()
    assert set(rows) == set(oracle)  # every catalogue metric and slice present, nothing extra
    for key, exact in oracle.items():
        assert_row_matches(rows[key], exact)


@pytest.fixture
def scenario(stack: tuple[Stack, StackInfo], database: str) -> Iterator[Callable[..., Scenario]]:
    made: list[Scenario] = []
    _, info = stack

    def make(hours: int = 3, per_hour: int = 1500, seed: int = 1, **extra: str) -> Scenario:
        tag = uuid.uuid4().hex[:10]
        env = {
            **os.environ,
            "STREAMAGG_KAFKA_BOOTSTRAP": info.kafka_bootstrap,
            "STREAMAGG_DATABASE_URL": database,
            "STREAMAGG_TOPIC_PREFIX": f"t{tag}.",
            "STREAMAGG_APP_ID": f"streamagg-test-{tag}",
            "STREAMAGG_PARTITIONS": "4",
            "STREAMAGG_FLUSH_INTERVAL_SECONDS": "1",
            "STREAMAGG_GRACE_SECONDS": "1",
            "STREAMAGG_SESSION_TIMEOUT_SECONDS": "6",
            "STREAMAGG_CHECKPOINT_INTERVAL_SECONDS": "2",
            **extra,
        }
        keys = {k.removeprefix("STREAMAGG_").lower(): v for k, v in env.items() if k.startswith("STREAMAGG_")}
        settings = Settings(**keys)
        start = bucket_start_ms(int(time.time() * 1000), "hour") - (hours + 1) * HOUR_MS
        made.append(Scenario(env, settings, start, hours, per_hour, seed))
        return made[-1]

    yield make
    for item in made:
        item.stop_all()


def test_rows_equal_the_oracle_and_replay_changes_nothing(scenario: Callable[..., Scenario]) -> None:
    world = scenario(hours=3, per_hour=1500, seed=11)
    world.produce()
    oracle = world.oracle()
    worker, port = world.start_worker()
    wait_for("hour rows to match the oracle's counts", counts_match(world, oracle), world.workers)
    assert_equal_to_oracle(world, oracle)
    # Day and week rows are the merge of the hour rows.
    for granularity in ("day", "week"):
        expected = exact_rollup(oracle, granularity)
        wait_for(
            f"{granularity} rows",
            lambda g=granularity, e=expected: {k: r.count for k, r in world.rows(g).items()} == {k: v[0].count for k, v in e.items()},
            world.workers,
        )
        rows = world.rows(granularity)
        for key, (exact, hour_sums) in expected.items():
            assert_row_matches(rows[key], exact, expected_sum=hour_sums)
    assert metric(port, "observability_aggregation_records_processed_total") == world.hours * world.per_hour
    world.stop_all()
    assert worker.returncode == 0
    before_rows, before_revisions = world.rows(), world.revisions()

    # The same input consumed again by a fresh group: identical rows, unchanged revisions.
    again, port = world.start_worker(app_id=f"{world.settings.app_id}-again")
    total = world.hours * world.per_hour
    wait_for("the second group to consume everything", lambda: metric(port, "observability_aggregation_records_processed_total") == total, world.workers)
    flushed_at = time.time()
    wait_for("a flush after that", lambda: (metric(port, "observability_aggregation_last_success") or 0) > flushed_at + 1, world.workers)
    assert world.revisions() == before_revisions
    assert world.rows() == before_rows


def test_bad_and_late_events(scenario: Callable[..., Scenario]) -> None:
    world = scenario(hours=2, per_hour=400, seed=12, STREAMAGG_MAX_LATENESS_SECONDS=str(3 * 3600))
    world.produce()
    oracle = world.oracle()
    bad = [b"not json", b"[1]", b'{"trace_id": "x"}', json.dumps({"trace_id": "t", "operation_type": "chat",
           "started_at": "2026-01-01T00:00:00Z", "duration_ms": -5, "status": "success"}).encode()]  # fmt: skip
    world.send_raw("traces", bad)
    _, port = world.start_worker()
    wait_for("hour rows", counts_match(world, oracle), world.workers)
    assert_equal_to_oracle(world, oracle)  # bad events moved no aggregate
    for reason, count in (("invalid_json", 1), ("not_an_object", 1), ("missing_field", 1), ("invalid_number", 1)):
        assert metric(port, "observability_events_rejected_total", f'{{reason="{reason}"}}') == count

    hour = world.start_ms
    key = (hour, "trace.duration_ms", "operation_type", "chat")
    before = world.rows()
    revisions = world.revisions()
    late = {"trace_id": "late-1", "operation_type": "chat", "started_at": hour + 60_000, "duration_ms": 123.5,
            "status": "success", "user_id": "late-user", "kb_id": "kb-late"}  # fmt: skip
    too_late = {**late, "trace_id": "late-2", "started_at": hour - 3 * HOUR_MS}
    world.send_raw("traces", [json.dumps(late).encode(), json.dumps(too_late).encode()])
    wait_for("the late event in its hour", lambda: world.rows().get(key) and world.rows()[key].count == before[key].count + 1, world.workers)
    for granularity in ("day", "week"):
        rolled_key = (bucket_start_ms(hour, granularity), *key[1:])
        expected = exact_rollup(oracle, granularity)[rolled_key][0].count + 1
        wait_for(
            f"the {granularity} row to follow",
            lambda g=granularity, k=rolled_key, n=expected: (world.rows(g).get(k) or Row(0, g, "", None, None, -1)).count == n,
            world.workers,
        )
    after = world.revisions()
    changed = {k for k in after if after[k] != revisions.get(k)}
    assert changed and all(after[k] == revisions[k] + 1 for k in changed if k in revisions)
    wait_for("too_late in the metrics", lambda: metric(port, "observability_events_too_late_total") == 1, world.workers)

    consumer = KafkaConsumer(bootstrap_servers=world.settings.kafka_bootstrap, enable_auto_commit=False)
    parts = [TopicPartition(world.settings.topic("deadletter"), p) for p in range(4)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    letters: list = []
    deadline = time.monotonic() + 30
    while len(letters) < 5 and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            letters.extend(records)
    consumer.close()
    reasons = sorted(dict(r.headers)["reason"].decode() for r in letters)
    assert reasons == ["invalid_json", "invalid_number", "missing_field", "not_an_object", "too_late"]
    by_reason = {dict(r.headers)["reason"].decode(): r for r in letters}
    assert by_reason["invalid_json"].value == b"not json"  # unchanged
    assert dict(by_reason["too_late"].headers)["source_topic"] == world.settings.topic("traces").encode()
    assert json.loads(by_reason["too_late"].value)["trace_id"] == "late-2"


def test_sigkill_mid_stream_then_restart(scenario: Callable[..., Scenario]) -> None:
    world = scenario(hours=3, per_hour=20_000, seed=13)
    world.produce()
    oracle = world.oracle()
    first, port = world.start_worker()
    total = world.hours * world.per_hour
    wait_for("the worker to be mid-stream", lambda: (metric(port, "observability_aggregation_records_processed_total") or 0) > total * 0.3, world.workers)
    first.send_signal(signal.SIGKILL)
    first.wait()
    world.start_worker()
    wait_for("rows equal to the oracle after the restart", counts_match(world, oracle), world.workers)
    assert_equal_to_oracle(world, oracle)


def test_two_workers_in_one_group(scenario: Callable[..., Scenario]) -> None:
    world = scenario(hours=3, per_hour=4000, seed=14)
    world.produce()
    oracle = world.oracle()
    _, port_a = world.start_worker()
    _, port_b = world.start_worker()
    wait_for("rows from both workers to equal the oracle", counts_match(world, oracle), world.workers)
    assert_equal_to_oracle(world, oracle)
    a = metric(port_a, "observability_aggregation_records_processed_total") or 0
    b = metric(port_b, "observability_aggregation_records_processed_total") or 0
    assert a > 0 and b > 0  # both took part
