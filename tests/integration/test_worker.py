"""The live worker on the real stack: rows equal the exact oracle, replays change nothing,
late events re-flush, SIGKILL and two workers end with the oracle's rows."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from streamagg.aggregate import Row
from streamagg.app import changelog_topic
from streamagg.buckets import HOUR_MS, bucket_start_ms
from streamagg.oracle import exact_rollup
from streamagg.topics import existing_partitions, source_topics
from tests.integration.harness import (
    Scenario,
    assert_equal_to_oracle,
    assert_rollups_equal_oracle,
    counts_match,
    metric,
    wait_for,
)
from tests.unit.test_aggregate import assert_row_matches


def test_rows_equal_the_oracle_and_replay_changes_nothing(scenario: Callable[..., Scenario]) -> None:
    world = scenario(hours=3, per_hour=1500, seed=11)
    world.produce()
    oracle = world.oracle()
    worker, port = world.start_worker()
    wait_for("hour rows to match the oracle's counts", counts_match(world, oracle), world.workers)
    assert_equal_to_oracle(world, oracle)
    assert_rollups_equal_oracle(world, oracle)  # day and week rows are the merge of the hour rows
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
    # Valid JSON whose dimension values PostgreSQL's text cannot hold: a NUL, a lone surrogate.
    unstorable = {"trace_id": "u", "operation_type": "chat", "started_at": world.start_ms, "duration_ms": 5, "status": "success"}
    bad += [json.dumps({**unstorable, "user_id": "a\x00b"}).encode(), json.dumps({**unstorable, "kb_id": "\ud800"}).encode()]
    bad.append(json.dumps({**unstorable, "started_at": "2099-01-01T00:00:00Z"}).encode())  # far ahead of its record
    world.send_raw("traces", [*bad, None])  # a null value too (a tombstone): dead-lettered as null
    _, port = world.start_worker()
    wait_for("hour rows", counts_match(world, oracle), world.workers)
    assert_equal_to_oracle(world, oracle)  # bad events moved no aggregate
    for reason, count in (("invalid_json", 2), ("not_an_object", 1), ("missing_field", 1), ("invalid_number", 1), ("invalid_text", 2),
                          ("invalid_timestamp", 1)):
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
    while len(letters) < 9 and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            letters.extend(records)
    consumer.close()
    reasons = sorted(dict(r.headers)["reason"].decode() for r in letters)
    assert reasons == ["invalid_json", "invalid_json", "invalid_number", "invalid_text", "invalid_text", "invalid_timestamp", "missing_field",
                       "not_an_object", "too_late"]
    by_reason = {dict(r.headers)["reason"].decode(): r for r in letters if r.value is not None}
    assert by_reason["invalid_json"].value == b"not json"  # unchanged
    assert [dict(r.headers)["reason"] for r in letters if r.value is None] == [b"invalid_json"]  # null, as it came
    assert dict(by_reason["too_late"].headers)["source_topic"] == world.settings.topic("traces").encode()
    assert json.loads(by_reason["too_late"].value)["trace_id"] == "late-2"


def test_a_clean_stop_rolls_up_what_is_pending(scenario: Callable[..., Scenario]) -> None:
    world = scenario(hours=2, per_hour=400, seed=15, STREAMAGG_ROLLUP_INTERVAL_SECONDS="3600")
    world.produce()
    oracle = world.oracle()
    worker, _ = world.start_worker()
    wait_for("hour rows", counts_match(world, oracle), world.workers)
    assert not world.rows("day") and not world.rows("week")  # roll-ups wait for their interval
    world.stop_all()
    assert worker.returncode == 0
    assert_rollups_equal_oracle(world, oracle)


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


def test_killed_again_and_again_then_two_workers(scenario: Callable[..., Scenario]) -> None:
    """Four workers in a row SIGKILLed at seeded random points of their progress (mid-batch,
    mid-checkpoint, mid-flush or mid-roll-up, whichever it falls on), then two workers finish:
    hour, day and week rows equal the oracle (days and weeks owed by the dead are rolled up too)."""
    world = scenario(hours=3, per_hour=20_000, seed=31)
    world.produce()
    oracle = world.oracle()
    total = world.hours * world.per_hour
    rng = random.Random(7)
    for _ in range(4):
        worker, port = world.start_worker()
        kill_at = total * rng.uniform(0.1, 0.5)  # records this process has processed (replays count)
        wait_for(
            f"the worker to process {kill_at:,.0f} records",
            lambda: (metric(port, "observability_aggregation_records_processed_total") or 0) >= kill_at
            or counts_match(world, oracle)(),
            world.workers,
        )
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    world.start_worker()
    world.start_worker()
    wait_for("rows equal to the oracle", counts_match(world, oracle), world.workers)
    assert_equal_to_oracle(world, oracle)
    assert_rollups_equal_oracle(world, oracle)


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


def test_source_topics_made_with_other_partition_counts(scenario: Callable[..., Scenario], tmp_path: Path) -> None:
    """Topics a producer made before (6, 3, 5 and 2 partitions) and a changelog left by a run on
    fewer, under STREAMAGG_PARTITIONS=2: the changelog grows to the most partitions of a source
    topic and the rows equal the oracle (before, a checkpoint for partition 2 crashed the worker)."""
    world = scenario(hours=2, per_hour=3000, seed=16, STREAMAGG_PARTITIONS="2")
    counts = dict(zip(source_topics(world.settings), (6, 3, 5, 2), strict=True))
    changelog = changelog_topic(world.settings)
    admin = KafkaAdminClient(bootstrap_servers=world.settings.kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(name, n, 1) for name, n in [*counts.items(), (changelog, 2)]])
    finally:
        admin.close()
    world.produce()
    oracle = world.oracle()
    world.start_worker(log=tmp_path / "worker.log")
    wait_for("hour rows to match the oracle's counts", counts_match(world, oracle), world.workers)
    assert_equal_to_oracle(world, oracle)
    assert_rollups_equal_oracle(world, oracle)
    assert existing_partitions(world.settings, [changelog]) == {changelog: 6}
    # Fine for one worker; with more, Faust assigns only equal counts together: it says so.
    assert "WARNING streamagg.topics: partition counts differ" in (tmp_path / "worker.log").read_text()
    assert existing_partitions(world.settings, list(counts)) == counts  # source topics as they were


def queued_rollups(world: Scenario) -> int:
    async def count() -> int:
        conn = await asyncpg.connect(world.settings.database_url.get_secret_value())
        try:
            return await conn.fetchval("SELECT count(*) FROM observability.metrics_rollup_queue")
        finally:
            await conn.close()

    return asyncio.run(count())


def test_a_changed_sketch_kind_neither_stops_the_worker_nor_merges_kinds(scenario: Callable[..., Scenario]) -> None:
    """An hour flushed under the default kind, the next under kll-k200 (one day): day and week
    rows whose hours are exact on one side are their merge, equal to the oracle; the busy series,
    past exact mode under both kinds, keep their last rows, counted as rollup errors, and the
    worker keeps running (it crashed, and again at every start, on the owed roll-up)."""
    world = scenario(hours=1, per_hour=4000, seed=17)
    world.start_ms = bucket_start_ms(int(time.time() * 1000), "day") - 24 * HOUR_MS + 10 * HOUR_MS  # yesterday 10:00
    world.produce()
    first = world.oracle()
    world.start_worker()
    wait_for("the first hour's rows", counts_match(world, first), world.workers)
    assert_rollups_equal_oracle(world, first)
    world.stop_all()
    before = {granularity: world.rows(granularity) for granularity in ("day", "week")}

    later = Scenario(world.env, world.settings, world.start_ms + HOUR_MS, 1, 4000, 18)
    later.produce()
    both = {**first, **later.oracle()}
    worker, port = world.start_worker(extra_env={"STREAMAGG_SKETCH_KIND": "kll-k200"})
    wait_for("both hours' rows", counts_match(world, both), world.workers)
    assert_equal_to_oracle(world, both)
    wait_for("the roll-ups of the second hour", lambda: not queued_rollups(world), world.workers)
    assert (metric(port, "observability_aggregation_errors_total", '{stage="rollup"}') or 0) > 0
    hours = world.rows("hour")
    for granularity in ("day", "week"):
        expected = exact_rollup(both, granularity)
        rows, merged, kept = world.rows(granularity), 0, 0
        assert rows.keys() == expected.keys()
        for key, row in rows.items():
            kinds = {r.sketch_kind for k, r in hours.items() if k[1:] == key[1:]}
            if row.count == expected[key][0].count:
                assert_row_matches(row, expected[key][0], expected_sum=expected[key][1])
                merged += kinds == {"req-hra-k128", "kll-k200"}
            else:  # both sides past exact mode: as it was after the first hour
                assert row == before[granularity][key] and kinds == {"req-hra-k128", "kll-k200"}
                kept += 1
        assert merged > 100 and 0 < kept < 50, (merged, kept)
    assert worker.poll() is None


def test_a_bad_message_too_large_to_send_again_is_dead_lettered_cut(scenario: Callable[..., Scenario]) -> None:
    """A producer's compressed batch can hold a value larger than the broker takes uncompressed:
    sent on unchanged, its dead letter was refused (MESSAGE_TOO_LARGE), which stopped the worker
    at every restart. It is cut to size, with the headers saying so."""
    world = scenario(hours=1, per_hour=300, seed=16)
    world.produce()
    oracle = world.oracle()
    huge = b"{" + b"x" * 3_000_000  # not JSON; gzip takes it to a few KB
    producer = KafkaProducer(bootstrap_servers=world.settings.kafka_bootstrap, compression_type="gzip", max_request_size=8_000_000)
    producer.send(world.settings.topic("traces"), huge, key=b"trace-huge")
    producer.flush()
    producer.close()
    worker, port = world.start_worker()
    wait_for("hour rows", counts_match(world, oracle), world.workers)
    assert_equal_to_oracle(world, oracle)
    wait_for("the dead letter", lambda: metric(port, "observability_events_rejected_total", '{reason="invalid_json"}') == 1, world.workers)
    consumer = KafkaConsumer(bootstrap_servers=world.settings.kafka_bootstrap, enable_auto_commit=False, fetch_max_bytes=8_000_000)
    parts = [TopicPartition(world.settings.topic("deadletter"), p) for p in range(4)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    letters: list = []
    deadline = time.monotonic() + 30
    while not letters and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            letters.extend(records)
    consumer.close()
    assert len(letters) == 1
    headers = dict(letters[0].headers)
    assert headers["reason"] == b"invalid_json" and headers["truncated_from"] == str(len(huge)).encode()
    assert letters[0].value == huge[: len(letters[0].value)] and 0 < len(letters[0].value) < 1_048_588
    assert letters[0].key == b"trace-huge"  # the message's key is kept
    world.stop_all()
    assert worker.returncode == 0


def test_a_broker_lost_while_the_worker_starts_is_one_line_and_exit_1(scenario: Callable[..., Scenario], tmp_path: Path) -> None:
    """CONTRACT section 5: non-zero with a one-line reason. The broker answers while the worker
    makes its topics and is gone when Faust's clients connect: the reason, as for a broker
    unreachable from the start, not mode's 30-line traceback."""
    world = scenario(hours=1, per_hour=10)
    proxy = _FirstConnectionOnly(world.settings.kafka_bootstrap)
    log = tmp_path / "worker.log"
    worker, _ = world.start_worker(extra_env={"STREAMAGG_KAFKA_BOOTSTRAP": proxy.address}, log=log)
    assert worker.wait(timeout=120) == 1
    text = log.read_text()
    assert "creating topics" in text  # the first connection served the worker's topic creation
    assert "Traceback" not in text, text
    assert text.splitlines()[-1].startswith(f"Error: kafka at {proxy.address} failed while the worker started: "), text


class _FirstConnectionOnly:
    """A loopback address that forwards its first connection to the broker and closes every later
    one at once: a broker that goes away after its first client."""

    def __init__(self, broker: str) -> None:
        host, port = broker.rsplit(":", 1)
        self._broker = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        first = True
        while True:
            client, _ = self._listener.accept()
            if not first:
                client.close()
                continue
            first = False
            upstream = socket.create_connection(self._broker)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(source, sink), daemon=True).start()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)
