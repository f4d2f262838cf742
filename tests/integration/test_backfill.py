"""`streamagg backfill` on the real stack: beside a live worker it changes nothing (rows,
revisions, the group's committed offsets); deleted rows come back identical; retention is
refused or, with --allow-partial, only the rebuildable hours change; --dry-run writes nothing
and predicts the real run; alone, it builds the oracle's rows and reports its progress."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Callable

import asyncpg
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry

from streamagg.backfill import HourRange, Progress, Report, backfill, first_rebuildable_hour, iso
from streamagg.buckets import HOUR_MS, bucket_start_ms, to_datetime
from streamagg.oracle import exact_rollup
from streamagg.rollup import roll_up_owed
from streamagg.store import Store
from streamagg.telemetry import BackfillTelemetry
from tests.integration.harness import (
    DEADLINE_SECONDS,
    Scenario,
    assert_equal_to_oracle,
    committed_offsets,
    committed_to_the_end,
    counts_match,
    metric,
    source_partitions,
    wait_for,
)
from tests.unit.test_aggregate import assert_row_matches

TABLE = "observability.metrics_aggregates"
PARTIALS = "observability.metrics_partials"
QUEUE = "observability.metrics_rollup_queue"


def backfill_cli(world: Scenario, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamagg", "backfill", *args],
        env=world.env, capture_output=True, text=True, timeout=DEADLINE_SECONDS,
    )  # fmt: skip


def table(stdout: str) -> dict[str, tuple[int, int, int, int]]:
    """The per-hour table: hour -> (inserted, changed, deleted, unchanged)."""
    header, *lines = stdout.strip().splitlines()
    assert header.split("\t") == ["hour", "inserted", "changed", "deleted", "unchanged"]
    return {hour: tuple(map(int, rest)) for hour, *rest in (line.split("\t") for line in lines)}  # type: ignore[misc]


def sql(world: Scenario, query: str, *args: object) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(world.settings.database_url.get_secret_value())
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


def all_rows(world: Scenario) -> dict[str, dict]:
    return {granularity: world.rows(granularity) for granularity in ("hour", "day", "week")}


def partials(world: Scenario) -> list[tuple]:
    return [tuple(r) for r in sql(world, f"SELECT * FROM {PARTIALS} ORDER BY 1, 2, 3, 4, 5")]


def consumer_groups(world: Scenario) -> list:
    admin = KafkaAdminClient(bootstrap_servers=world.settings.kafka_bootstrap)
    try:
        return sorted(map(str, admin.list_groups()))
    finally:
        admin.close()


def run_worker_to_the_oracle(world: Scenario, oracle: dict) -> None:
    """A live worker until every hour, day and week row of the data is stored (it keeps running)."""
    world.start_worker()
    wait_for("hour rows to match the oracle's counts", counts_match(world, oracle), world.workers)
    for granularity in ("day", "week"):
        expected = {key: exact.count for key, (exact, _) in exact_rollup(oracle, granularity).items()}
        wait_for(f"{granularity} rows", lambda g=granularity, e=expected: {k: r.count for k, r in world.rows(g).items()} == e,
                 world.workers)  # fmt: skip


def test_beside_a_live_worker_twice_nothing_changes(scenario: Callable[..., Scenario]) -> None:
    """The middle hour of three with 30 minutes of lateness: the replay starts inside the topics
    and reads to their end, yet rows, revisions, the group's committed offsets and the list of
    groups stay as they are."""
    world = scenario(hours=3, per_hour=1500, seed=31, STREAMAGG_MAX_LATENESS_SECONDS="1800")
    world.produce()
    oracle = world.oracle()
    run_worker_to_the_oracle(world, oracle)
    worker = world.workers[0]
    wait_for("the live group to commit every offset", committed_to_the_end(world), world.workers)
    offsets, groups = committed_offsets(world), consumer_groups(world)
    before, revisions = all_rows(world), world.revisions()
    hour = world.start_ms + HOUR_MS
    keys = sum(1 for key in oracle if key[0] == hour)

    for _ in range(2):
        result = backfill_cli(world, "--from", iso(hour), "--to", iso(hour + HOUR_MS))
        assert committed_offsets(world) == offsets
        assert result.returncode == 0, result.stderr
        assert table(result.stdout) == {iso(hour): (0, 0, 0, keys)}
        replayed = int(re.search(r"([\d,]+) events replayed", result.stderr).group(1).replace(",", ""))  # type: ignore[union-attr]
        assert world.per_hour < replayed < world.hours * world.per_hour  # the windows, not the whole topics
        assert_equal_to_oracle(world, oracle)
        assert world.revisions() == revisions
        assert all_rows(world) == before
    assert worker.poll() is None  # undisturbed
    assert consumer_groups(world) == groups  # the backfill joined no group


def test_an_event_too_late_for_the_live_worker_is_counted_by_a_backfill(scenario: Callable[..., Scenario]) -> None:
    """CONTRACT section 2: an event older than the watermark minus the maximum lateness goes to
    the dead letter as too_late, "so a backfill can still count it". Its hour and day gain it."""
    world = scenario(hours=3, per_hour=300, seed=35, STREAMAGG_MAX_LATENESS_SECONDS="1800")
    world.produce()
    oracle = world.oracle()
    _, port = world.start_worker()
    wait_for("hour rows to match the oracle's counts", counts_match(world, oracle), world.workers)
    hour = world.start_ms
    late = {"trace_id": "late-1", "operation_type": "chat", "started_at": hour + 60_000, "duration_ms": 7.25, "status": "success"}
    world.send_raw("traces", [json.dumps(late).encode()])
    wait_for("the event dead-lettered as too late", lambda: metric(port, "observability_events_too_late_total") == 1, world.workers)
    world.stop_all()
    before = all_rows(world)

    result = backfill_cli(world, "--from", iso(hour), "--to", iso(hour + HOUR_MS))
    assert result.returncode == 0, result.stderr
    assert "1 of them too late for the live worker and counted here" in result.stderr
    gained = {(metric_name, dimension) for metric_name in ("trace.count", "trace.duration_ms") for dimension in (None, "chat")}
    for granularity, rows in all_rows(world).items():
        assert rows.keys() == before[granularity].keys()
        for key, row in rows.items():
            expected = before[granularity][key].count
            if (key[1], key[3]) in gained and key[2] in (None, "operation_type") and key[0] <= hour:
                expected += 1
            assert row.count == expected, (granularity, key)


def test_deleted_rows_come_back_identical(scenario: Callable[..., Scenario]) -> None:
    """A few dozen values per key and hour keep every sketch (hours, days, weeks) in exact mode,
    where even its bytes are a function of the values: the rows come back byte for byte."""
    world = scenario(hours=3, per_hour=120, seed=32)
    world.produce()
    oracle = world.oracle()
    run_worker_to_the_oracle(world, oracle)
    world.stop_all()
    before = all_rows(world)
    sql(world, f"DELETE FROM {TABLE}")
    assert all_rows(world) == {"hour": {}, "day": {}, "week": {}}

    result = backfill_cli(world, "--from", iso(world.start_ms), "--to", iso(world.start_ms + 3 * HOUR_MS))
    assert result.returncode == 0, result.stderr
    inserted = {iso(h): sum(1 for key in oracle if key[0] == h) for h in range(world.start_ms, world.start_ms + 3 * HOUR_MS, HOUR_MS)}
    assert table(result.stdout) == {hour: (n, 0, 0, 0) for hour, n in inserted.items()}
    assert all_rows(world) == before
    assert set(world.revisions().values()) == {1}


def test_retention_refuses_then_allow_partial_rebuilds_only_the_rest(scenario: Callable[..., Scenario]) -> None:
    lateness_s = 1800
    world = scenario(hours=4, per_hour=400, seed=33, STREAMAGG_MAX_LATENESS_SECONDS=str(lateness_s))
    world.produce()
    oracle = world.oracle()
    run_worker_to_the_oracle(world, oracle)
    world.stop_all()
    # Every hour's global trace count is made wrong, so a rebuild shows where it happened.
    sql(world, f"UPDATE {TABLE} SET count = count + 1000, revision = revision + 1 "
               "WHERE granularity = 'hour' AND metric_name = 'trace.count' AND dimension_type IS NULL")  # fmt: skip

    # Retention: one partition loses its records older than 1h10m into the data.
    tp = TopicPartition(world.settings.topic("traces"), 0)
    consumer = KafkaConsumer(bootstrap_servers=world.settings.kafka_bootstrap, enable_auto_commit=False)
    cut = consumer.offsets_for_times({tp: world.start_ms + HOUR_MS + 10 * 60_000})[tp].offset
    admin = KafkaAdminClient(bootstrap_servers=world.settings.kafka_bootstrap)
    admin.delete_records({tp: cut})
    admin.close()
    consumer.assign([tp])
    consumer.seek(tp, cut)
    first_kept = next(iter(consumer.poll(timeout_ms=10_000, max_records=1).values()))[0]
    consumer.close()
    assert first_kept.offset == cut
    first = first_rebuildable_hour(first_kept.timestamp, lateness_s * 1000)
    assert world.start_ms < first < world.start_ms + 4 * HOUR_MS
    before, revisions = all_rows(world), world.revisions()
    span = ("--from", iso(world.start_ms), "--to", iso(world.start_ms + 4 * HOUR_MS))

    refused = backfill_cli(world, *span)
    assert refused.returncode != 0 and refused.stdout == ""
    reason = refused.stderr.strip().splitlines()[-1]
    assert f"the first hour that can be rebuilt is {iso(first)}" in reason and f"offset {cut}" in reason
    assert all_rows(world) == before and world.revisions() == revisions

    partial = backfill_cli(world, *span, "--allow-partial")
    assert partial.returncode == 0, partial.stderr
    assert list(table(partial.stdout)) == [iso(h) for h in range(first, world.start_ms + 4 * HOUR_MS, HOUR_MS)]
    after, after_revisions = world.rows(), world.revisions()
    for key, row in after.items():
        if key[0] < first:  # left alone, wrong global count included
            assert row == before["hour"][key]
        else:
            assert_row_matches(row, oracle[key])
    changed = {k for k in after_revisions if k[1] == "hour" and after_revisions[k] != revisions.get(k)}
    assert changed and all(k[0] >= to_datetime(first) for k in changed)


def test_dry_run_writes_nothing_and_predicts_the_real_run(scenario: Callable[..., Scenario]) -> None:
    world = scenario(hours=3, per_hour=300, seed=34)
    world.produce()
    oracle = world.oracle()
    run_worker_to_the_oracle(world, oracle)
    world.stop_all()
    h0, h1, h2 = (world.start_ms + i * HOUR_MS for i in range(3))
    # hour 0 loses 5 rows, hour 1 gets 3 wrong counts, hour 2 a partial and a row no event backs.
    sql(world, f"DELETE FROM {TABLE} WHERE ctid IN (SELECT ctid FROM {TABLE} WHERE granularity = 'hour' "
               "AND bucket_time = $1 ORDER BY metric_name, dimension_value LIMIT 5)", to_datetime(h0))  # fmt: skip
    sql(world, f"UPDATE {TABLE} SET count = count + 7 WHERE ctid IN (SELECT ctid FROM {TABLE} WHERE granularity = 'hour' "
               "AND bucket_time = $1 ORDER BY metric_name, dimension_value LIMIT 3)", to_datetime(h1))  # fmt: skip
    columns = "bucket_time, metric_name, dimension_type, count, sum_parts, min_value, max_value, sketch, sketch_kind, value_fingerprint"
    sql(world, f"INSERT INTO {PARTIALS} ({columns}, dimension_value, source_partition, source_offset) "
               f"SELECT {columns}, 'user-gone', source_partition, -1 FROM {PARTIALS} WHERE bucket_time = $1 "
               "AND metric_name = 'trace.count' AND dimension_type = 'user_id' LIMIT 1", to_datetime(h2))  # fmt: skip
    sql(world, f"INSERT INTO {TABLE} (bucket_time, granularity, metric_name, dimension_type, dimension_value, count) "
               "VALUES ($1, 'hour', 'trace.count', 'user_id', 'user-gone', 1)", to_datetime(h2))  # fmt: skip
    stale = (h2, "trace.count", "user_id", "user-gone")
    assert stale in world.rows()
    before, revisions, stored_partials = all_rows(world), world.revisions(), partials(world)
    keys = {h: sum(1 for key in oracle if key[0] == h) for h in (h0, h1, h2)}
    expected = {iso(h0): (5, 0, 0, keys[h0] - 5), iso(h1): (0, 3, 0, keys[h1] - 3), iso(h2): (0, 0, 1, keys[h2])}
    span = ("--from", iso(h0), "--to", iso(h2 + HOUR_MS))

    dry = backfill_cli(world, *span, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert table(dry.stdout) == expected
    assert dry.stderr.strip().splitlines()[-1].startswith("dry run, nothing written")
    assert all_rows(world) == before and world.revisions() == revisions and partials(world) == stored_partials

    real = backfill_cli(world, *span)
    assert real.returncode == 0, real.stderr
    assert table(real.stdout) == expected
    assert_equal_to_oracle(world, oracle)
    assert stale not in world.rows()
    assert not sql(world, f"SELECT 1 FROM {PARTIALS} WHERE dimension_value = 'user-gone'")


def test_without_a_worker_the_rows_are_the_oracles_and_progress_is_in_the_metrics(scenario: Callable[..., Scenario]) -> None:
    world = scenario(hours=2, per_hour=2000, seed=35)
    world.produce()
    oracle = world.oracle()
    telemetry = BackfillTelemetry(CollectorRegistry())
    seen: list[Progress] = []

    async def run() -> Report:
        async with await Store.open(world.settings.database_url.get_secret_value(), "test") as store:
            await store.migrate()
            hours = HourRange(world.start_ms, world.start_ms + 2 * HOUR_MS)
            return await backfill(world.settings, store, hours, telemetry=telemetry, on_progress=seen.append)

    report = asyncio.run(run())
    assert_equal_to_oracle(world, oracle)
    for granularity in ("day", "week"):
        rows = world.rows(granularity)
        for key, (exact, hour_sums) in exact_rollup(oracle, granularity).items():
            assert_row_matches(rows[key], exact, expected_sum=hour_sums)
    partitions = len(source_partitions(world))
    assert report.records == world.hours * world.per_hour and report.hour_rows.inserted == len(oracle)
    value = telemetry.registry.get_sample_value
    assert value("observability_backfill_partitions") == value("observability_backfill_partitions_done") == partitions
    assert value("observability_backfill_events_replayed_total") == report.records
    reading = [p for p in seen if p.phase == "reading"]
    assert reading[0].records == 0 and reading[-1].partitions_done == partitions and reading[-1].records == report.records
    assert [p.hours_done for p in seen if p.phase == "writing"] == [1, 2]
    assert sql(world, f"SELECT * FROM {QUEUE}") == []  # its roll-ups are written: it owes nothing


class Interrupted(Exception):
    pass


def test_stopped_after_its_first_hour_its_roll_ups_are_owed_to_the_next_worker(scenario: Callable[..., Scenario]) -> None:
    """A backfill that stops after writing an hour (here its progress callback raises) leaves
    that hour in the roll-up queue; the owed roll-up a live worker runs at start then writes the
    day and week rows of what is stored, and deletes a day row left without hours."""
    world = scenario(hours=2, per_hour=600, seed=36)
    world.produce()
    oracle = world.oracle()
    first = {key: value for key, value in oracle.items() if key[0] == world.start_ms}

    def stop_after_the_first_hour(progress: Progress) -> None:
        if progress.phase == "writing":
            raise Interrupted

    async def interrupted() -> None:
        async with await Store.open(world.settings.database_url.get_secret_value(), "test") as store:
            await store.migrate()
            hours = HourRange(world.start_ms, world.start_ms + 2 * HOUR_MS)
            try:
                await backfill(world.settings, store, hours, on_progress=stop_after_the_first_hour)
            except Interrupted:
                return
            raise AssertionError("the backfill was not interrupted")

    asyncio.run(interrupted())
    assert {key: row.count for key, row in world.rows("hour").items()} == {key: v.count for key, v in first.items()}
    assert world.rows("day") == world.rows("week") == {}
    queued = sql(world, f"SELECT hour, queued_by FROM {QUEUE}")
    assert {r["hour"] for r in queued} == {to_datetime(world.start_ms)}
    assert all(r["queued_by"].startswith(f"{world.settings.app_id}-backfill:") for r in queued)
    ghost = "ghost-of-a-removed-series"  # a day row whose series has no hour row: a backfill removed them
    sql(world, f"INSERT INTO {TABLE} (bucket_time, granularity, metric_name, dimension_type, dimension_value, count) "
               "VALUES ($1, 'day', 'trace.duration_ms', 'user_id', $2, 1)", to_datetime(bucket_start_ms(world.start_ms, "day")), ghost)  # fmt: skip

    async def owed() -> None:
        async with await Store.open(world.settings.database_url.get_secret_value(), "test") as store:
            await roll_up_owed(store, exclude="a-live-worker")

    asyncio.run(owed())
    for granularity in ("day", "week"):
        rows = world.rows(granularity)
        expected = exact_rollup(first, granularity)
        assert rows.keys() == expected.keys()
        for key, (exact, hour_sums) in expected.items():
            assert_row_matches(rows[key], exact, expected_sum=hour_sums)
    assert sql(world, f"SELECT * FROM {QUEUE}") == []
