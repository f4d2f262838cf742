"""Recovery: a worker that committed everything and died before flushing leaves its hours in
the checkpoint table only, and the next owner must write them although its partitions never
deliver another event; one that stopped cleanly leaves them written, and the next owner does
not write them again; a database that is not there is retried with backoff, losing nothing."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import asyncpg
from kafka import KafkaConsumer, TopicPartition

from streamagg.app import TABLE_NAME
from tests.conftest import create_database
from tests.integration.harness import (
    Scenario,
    assert_equal_to_oracle,
    assert_rollups_equal_oracle,
    committed_to_the_end,
    counts_match,
    metric,
    wait_for,
)


def test_hours_only_in_the_checkpoint_are_flushed_by_the_next_owner(scenario: Callable[..., Scenario]) -> None:
    world = scenario(hours=2, per_hour=1500, seed=16)
    world.produce()
    oracle = world.oracle()
    # The first worker checkpoints and commits, but never flushes.
    first, _ = world.start_worker(extra_env={"STREAMAGG_FLUSH_INTERVAL_SECONDS": "3600", "STREAMAGG_CHECKPOINT_INTERVAL_SECONDS": "1"})
    wait_for("every offset committed", committed_to_the_end(world), world.workers)
    # Nothing was flushed (unless the minute-5 crontab happened to run): the hours live in the
    # checkpoint table only.
    first.send_signal(signal.SIGKILL)
    first.wait()
    world.start_worker()  # no event will ever reach it
    wait_for("rows from the checkpoints alone", counts_match(world, oracle), world.workers)
    assert_equal_to_oracle(world, oracle)


def stored_then_stopped(world: Scenario) -> dict:
    """The input produced and a worker run until every hour row is stored, then stopped cleanly
    (SIGTERM, exit 0); returns the oracle."""
    world.produce()
    oracle = world.oracle()
    first, _ = world.start_worker()
    wait_for("hour rows", counts_match(world, oracle), world.workers)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 0
    return oracle


def partials_written_since(world: Scenario, since: datetime | None) -> tuple[int, datetime]:
    """How many partials were written after ``since`` (all of them when None), and the time now."""

    async def count() -> tuple[int, datetime]:
        conn = await asyncpg.connect(world.settings.database_url.get_secret_value())
        try:
            written = await conn.fetchval(
                "SELECT count(*) FROM observability.metrics_partials WHERE $1::timestamptz IS NULL OR updated_at > $1", since
            )
            return written, await conn.fetchval("SELECT clock_timestamp()")
        finally:
            await conn.close()

    return asyncio.run(count())


def test_hours_a_worker_wrote_before_a_clean_stop_are_not_written_again_by_the_next(scenario: Callable[..., Scenario]) -> None:
    """The stop's checkpoint says which hours are stored up to which offset: the next worker
    restores them without writing their partials again (it wrote every one of them before), and
    still writes what changes after."""
    world = scenario(hours=2, per_hour=1000, seed=19, STREAMAGG_MAX_LATENESS_SECONDS=str(3 * 3600))
    stored_then_stopped(world)
    partials, stopped_at = partials_written_since(world, None)
    assert partials > 1000

    world.start_worker()
    hour = world.start_ms
    key = (hour, "trace.duration_ms", "operation_type", "chat")
    before = world.rows()[key].count
    late = {"trace_id": "late-after-restart", "operation_type": "chat", "started_at": hour + 60_000,
            "duration_ms": 42.0, "status": "success", "user_id": "late-user", "kb_id": "kb-late"}  # fmt: skip
    world.send_raw("traces", [json.dumps(late).encode()])  # read after the restore: flushed after it too
    wait_for("the late event in its hour", lambda: world.rows()[key].count == before + 1, world.workers)
    rewritten, _ = partials_written_since(world, stopped_at)
    assert 0 < rewritten <= 20  # the late event's keys (its hour, its partition), not the restored ones


def changelog_keys(world: Scenario) -> tuple[int, int]:
    """Keys of the worker table's changelog as it ends now: (held, deleted by a tombstone),
    read from the first record to the end with a plain consumer."""
    topic = f"{world.settings.app_id}-{TABLE_NAME}-changelog"
    consumer = KafkaConsumer(bootstrap_servers=world.settings.kafka_bootstrap, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(partitions)
        last: dict[bytes, bytes | None] = {}
        while any(consumer.position(tp) < end for tp, end in ends.items()):
            for records in consumer.poll(timeout_ms=1000).values():
                last.update((record.key, record.value) for record in records)
    finally:
        consumer.close()
    held = sum(value is not None for value in last.values())
    return held, len(last) - held


def test_a_restarted_worker_recovers_exactly_what_its_changelog_holds(scenario: Callable[..., Scenario], tmp_path: Path) -> None:
    """Recovery puts the changelog's records into the table itself, not through Faust's loop
    (app._BatchConsumer._deliver): the next worker holds every key whose last record is a
    value and none whose last record is a tombstone (hours evicted past the lateness window),
    and rebuilds its partitions' state from all of them."""
    world = scenario(hours=3, per_hour=600, seed=21, STREAMAGG_MAX_LATENESS_SECONDS="900")
    oracle = stored_then_stopped(world)
    held, deleted = changelog_keys(world)
    assert held > 1000 and deleted > 1000  # the first hours were evicted: tombstones to recover

    log = tmp_path / "worker.log"
    world.start_worker(log=log)
    recovered = re.compile(rb"table recovered: \d+ partitions, (\d+) records")
    wait_for("the table recovered", lambda: recovered.search(log.read_bytes()) is not None, world.workers)
    match = recovered.search(log.read_bytes())
    assert match is not None and int(match[1]) == held
    # Every recovered record is in the hot state: a meta record per partition, the rest keys.
    restored = re.compile(rb"(\d+) of \d+ partitions restored from their checkpoints: ([\d,]+) keys")
    wait_for("the partitions restored", lambda: restored.search(log.read_bytes()) is not None, world.workers)
    partitions, keys = restored.search(log.read_bytes()).groups()  # type: ignore[union-attr]
    assert int(partitions) + int(keys.replace(b",", b"")) == held
    assert_equal_to_oracle(world, oracle)


def test_roll_ups_a_killed_worker_owed_are_done_by_the_next_worker(scenario: Callable[..., Scenario]) -> None:
    """Hours flushed and evicted (past the lateness window) are in no checkpoint any more: when
    their worker dies before rolling them up, the next worker must still roll up their days and
    weeks, from what the flush left in the roll-up queue."""
    world = scenario(hours=3, per_hour=600, seed=18, STREAMAGG_MAX_LATENESS_SECONDS="900")
    world.produce()
    oracle = world.oracle()
    first, _ = world.start_worker(extra_env={"STREAMAGG_ROLLUP_INTERVAL_SECONDS": "3600"})
    wait_for("hour rows", counts_match(world, oracle), world.workers)
    assert not world.rows("day")  # rolled up only after an hour: still owed
    first.send_signal(signal.SIGKILL)
    first.wait()
    world.start_worker()
    assert_rollups_equal_oracle(world, oracle)


def test_a_database_that_is_not_there_yet_is_retried_with_backoff_and_nothing_is_lost(
    scenario: Callable[..., Scenario], database: str
) -> None:
    server = database.rsplit("/", 1)[0]
    late = f"t_late_{uuid.uuid4().hex[:10]}"
    world = scenario(hours=2, per_hour=800, seed=17, STREAMAGG_DATABASE_URL=f"{server}/{late}")
    world.produce()
    oracle = world.oracle()
    _, port = world.start_worker()
    # Connecting fails (the database does not exist): counted, and retried with growing pauses.
    def reached(errors: int, seconds: float = 60) -> float:
        """When the connect errors first reached ``errors`` (polled finely: the gaps are measured)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if (metric(port, "observability_aggregation_errors_total", '{stage="connect"}') or 0) >= errors:
                return time.monotonic()
            time.sleep(0.05)
        raise AssertionError(f"fewer than {errors} connect errors after {seconds:.0f} s")

    third, fourth = reached(3), reached(4)
    assert fourth - third >= 3.0  # after three failures the pause is 4 flush intervals (1 s each), not one
    create_database(server, late)
    wait_for("every row once the database is there", counts_match(world, oracle), world.workers, seconds=240)
    assert_equal_to_oracle(world, oracle)
