"""What integration tests of the worker and the backfill share: a private world per test
(topics, consumer group, database), worker processes, polling with a deadline, and the
comparison of stored rows with the exact oracle."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from streamagg.aggregate import Row
from streamagg.buckets import HOUR_MS, bucket_start_ms
from streamagg.events import validate
from streamagg.generate import generate
from streamagg.oracle import Exact, exact_hours, exact_rollup
from streamagg.settings import Settings
from streamagg.stack import Stack, StackInfo, free_port
from streamagg.store import Store
from streamagg.synth import Synth
from streamagg.topics import source_topics
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

    def send_raw(self, topic: str, values: list[bytes | None]) -> None:
        producer = KafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap)
        for value in values:
            producer.send(self.settings.topic(topic), value, key=None if value is not None else b"k")
        producer.flush()
        producer.close()

    # -- workers --------------------------------------------------------------------------
    def start_worker(
        self, app_id: str | None = None, extra_env: dict[str, str] | None = None, log: Path | None = None
    ) -> tuple[subprocess.Popen, int]:
        """A worker process and its metrics port; its log goes to ``log`` when given."""
        port = free_port()
        env = {**self.env, **(extra_env or {}), "STREAMAGG_METRICS_PORT": str(port)}
        if app_id:
            env["STREAMAGG_APP_ID"] = app_id
        if log is not None:
            stderr = open(log, "wb")  # noqa: SIM115  (the worker's, for as long as it runs)
        else:
            stderr = open(os.devnull, "wb") if not os.environ.get("TEST_WORKER_LOGS") else None
        proc = subprocess.Popen([sys.executable, "-m", "streamagg", "worker"], env=env, stdout=subprocess.DEVNULL, stderr=stderr)
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


def source_partitions(world: Scenario) -> list[TopicPartition]:
    consumer = KafkaConsumer(bootstrap_servers=world.settings.kafka_bootstrap)
    try:
        return [TopicPartition(t, p) for t in source_topics(world.settings) for p in sorted(consumer.partitions_for_topic(t))]
    finally:
        consumer.close()


def end_offsets(world: Scenario) -> dict[TopicPartition, int]:
    """End offsets of the source partitions that hold records."""
    consumer = KafkaConsumer(bootstrap_servers=world.settings.kafka_bootstrap)
    try:
        return {tp: offset for tp, offset in consumer.end_offsets(source_partitions(world)).items() if offset > 0}
    finally:
        consumer.close()


def committed_offsets(world: Scenario) -> dict[TopicPartition, int]:
    """The live group's committed offsets; empty while the group has no coordinator yet
    (kafka-python 3 names the admin call list_group_offsets)."""
    admin = KafkaAdminClient(bootstrap_servers=world.settings.kafka_bootstrap)
    try:
        offsets = admin.list_group_offsets(world.settings.app_id)[world.settings.app_id]
    except KafkaError:
        return {}
    finally:
        admin.close()
    return {tp: meta.offset for tp, meta in offsets.items()}


def committed_to_the_end(world: Scenario) -> Callable[[], bool]:
    """A condition: the live group has committed every source partition up to its end."""
    ends = end_offsets(world)
    return lambda: {tp: o for tp, o in committed_offsets(world).items() if tp in ends} == ends


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


def assert_rollups_equal_oracle(scenario: Scenario, oracle: dict[tuple, Exact]) -> None:
    """Once the day and week rows hold the oracle's counts (waiting for the workers' roll-ups):
    exactly the oracle's rows, each equal to the merge of its exact hours."""
    for granularity in ("day", "week"):
        expected = exact_rollup(oracle, granularity)  # type: ignore[arg-type]
        counts = {key: rolled.count for key, (rolled, _) in expected.items()}
        wait_for(
            f"{granularity} rows",
            lambda g=granularity: {key: row.count for key, row in scenario.rows(g).items()} == counts,
            scenario.workers,
        )
        rows = scenario.rows(granularity)
        for key, (exact, hour_sums) in expected.items():
            assert_row_matches(rows[key], exact, expected_sum=hour_sums)


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
        # A SIGKILLed worker cannot remove its private Faust data directory (app.run_worker).
        # The pattern covers the scenario's other app ids too (they extend its own).
        for leftover in Path(tempfile.gettempdir()).glob(f"streamagg-faust-{item.settings.app_id}*"):
            shutil.rmtree(leftover, ignore_errors=True)
