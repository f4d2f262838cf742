"""The store against a real PostgreSQL: schema, upsert semantics, partials, roll-ups."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import inspect
import multiprocessing
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources

import asyncpg
import numpy as np
import pytest

from sketches import Kind
from streamagg.exact import fingerprints
from streamagg.aggregate import Agg, AggregateState, Key, Row, roll_up
from streamagg.buckets import DAY_MS, HOUR_MS, bucket_start_ms, rfc3339, to_datetime, to_ms
from streamagg.rollup import BACKFILL_QUEUE_TAG, RollupHelpers, roll_up_owed, rollup, rollup_keys
from streamagg.settings import Settings
from streamagg.store import Store, StoreError, WriteResult, series_lock_id
from streamagg.errors import StateError
from streamagg.oracle import exact_hours, exact_rollup
from streamagg.events import validate
from tests.unit.test_aggregate import START_MS, assert_row_matches, kinds, make_events, stats


async def open_store(dsn: str) -> Store:
    store = await Store.open(dsn, dsn, max_size=6)
    await store.migrate()
    return store


def test_migrate_is_idempotent_and_versioned(database: str) -> None:
    async def run() -> None:
        async with await Store.open(database, database) as store:
            first = await store.migrate()
            assert first == [
                "001_metrics_aggregates.sql",
                "002_metrics_partials.sql",
                "003_hypertable.sql",
                "004_series_indexes.sql",
                "005_partials_fence.sql",
                "006_rollup_queue.sql",
                "007_partials_probe_by_key.sql",
                "008_rollup_sum_parts.sql",
            ]
            assert await store.migrate() == []
            await asyncio.gather(store.migrate(), store.migrate())  # concurrent runs serialise

    asyncio.run(run())


def test_upsert_revisions_follow_value_changes(database: str) -> None:
    events = make_events(hours=2, per_hour=600, seed=21)
    state = AggregateState(kinds(), 10_000)
    state.ingest(events)
    rows = state.rows()

    async def run() -> None:
        async with await open_store(database) as store:
            first = await store.upsert_rows(rows)
            assert (first.inserted, first.updated, first.unchanged) == (len(rows), 0, 0)
            revisions = await store.revisions()
            assert set(revisions.values()) == {1}
            # Same values again, even from a re-built state with new sketch coin flips: untouched.
            again = AggregateState(kinds(), 10_000)
            again.ingest(list(reversed(events)))
            second = await store.upsert_rows(again.rows())
            assert (second.inserted, second.updated) == (0, 0)
            assert await store.revisions() == revisions
            # One more event changes its keys only: revision 2 there, 1 elsewhere.
            again.take_dirty()
            again.ingest(events[:1])
            touched = again.take_dirty()
            third = await store.upsert_rows(again.rows(touched))
            assert third.updated == len(touched) and third.inserted == 0
            after = await store.revisions()
            assert sorted(after.values()).count(2) == len(touched)
            stored = {row.key: row for row in await store.fetch_rows("hour", START_MS, START_MS + 2 * HOUR_MS)}
            for key in touched:
                assert stats(stored[key]) == stats(again[key].to_row(key, "hour"))

    asyncio.run(run())


def test_global_slice_upserts_like_any_other(database: str) -> None:
    events = make_events(hours=1, per_hour=50, seed=2)
    state = AggregateState(kinds(), 10_000)
    state.ingest(events)
    global_rows = [row for row in state.rows() if row.dimension_type is None]

    async def run() -> None:
        async with await open_store(database) as store:
            await store.upsert_rows(global_rows)
            await store.upsert_rows(global_rows)
            count = await store.execute(
                "SELECT 1 FROM observability.metrics_aggregates WHERE dimension_type IS NULL"
            )
            assert count == f"SELECT {len(global_rows)}"

    asyncio.run(run())


def test_partials_from_partitions_merge_to_the_oracle(database: str) -> None:
    """Three partitions written concurrently (as by several workers): the final rows are the
    exact aggregate over all events, whichever partition each arrived on."""
    events = make_events(hours=2, per_hour=1500, seed=23)
    partitions = [AggregateState(kinds(), 10_000) for _ in range(3)]
    for i, event in enumerate(events):
        partitions[i % 3].ingest([event])
    oracle = exact_hours(events)

    async def run() -> None:
        async with await open_store(database) as store:
            await asyncio.gather(
                *(store.write_partials(p, list(state.items())) for p, state in enumerate(partitions))
            )
            rows = {row.key: row for row in await store.fetch_rows("hour", START_MS, START_MS + 2 * HOUR_MS)}
            assert set(rows) == set(oracle)
            for key, exact in oracle.items():
                assert_row_matches(rows[key], exact)
            before = await store.revisions()
            # A partition re-writing the same state (a replay) changes nothing.
            result = await store.write_partials(1, list(partitions[1].items()))
            assert result.updated == 0 and result.inserted == 0
            assert await store.revisions() == before
            # A stale writer (older offset) cannot overwrite a newer partial.
            await store.write_partials(2, list(partitions[2].items()), source_offset=100)
            stale = AggregateState(kinds(), 10_000)
            stale.ingest(events[2:300:3])
            await store.write_partials(2, list(stale.items()), source_offset=50)
            rows = {row.key: row for row in await store.fetch_rows("hour", START_MS, START_MS + 2 * HOUR_MS)}
            for key, exact in oracle.items():
                assert_row_matches(rows[key], exact)

    asyncio.run(run())


def test_an_extension_available_but_not_creatable_leaves_an_ordinary_table(database: str) -> None:
    """003's guard, run as a role that may not create the extension it names: file_fdw, which
    needs a superuser, standing in for a timescaledb missing from shared_preload_libraries (no
    TimescaleDB here). A notice, no error: the migrations after it still run."""
    sql = (resources.files("streamagg.migrations") / "003_hypertable.sql").read_text().replace("timescaledb", "file_fdw")
    role = f"streamagg_not_super_{uuid.uuid4().hex[:8]}"

    async def run() -> None:
        admin = await asyncpg.connect(database)
        try:
            await admin.execute(f"DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN")
            user = await asyncpg.connect(database, user=role)
            notices: list[str] = []
            user.add_log_listener(lambda _, message: notices.append(message.message))
            try:
                await user.execute(sql)
            finally:
                await user.close()
            assert any("file_fdw is available but cannot be created" in n for n in notices), notices
            assert not await admin.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'file_fdw'")
        finally:
            await admin.execute(f"DROP ROLE IF EXISTS {role}")
            await admin.close()

    asyncio.run(run())


async def _removed_by_a_stopped_backfill(database: str, key: Key) -> None:
    """The state a backfill leaves when it removed the hour row ``key`` (its replay found no event
    for it) and stopped before its roll-ups: the row gone, the hour in the roll-up queue."""
    conn = await asyncpg.connect(database)
    try:
        await conn.execute(
            "DELETE FROM observability.metrics_aggregates WHERE granularity = 'hour' AND bucket_time = $1 "
            "AND metric_name = $2 AND dimension_type = $3 AND dimension_value = $4", to_datetime(key[0]), *key[1:],
        )  # fmt: skip
        await conn.execute("INSERT INTO observability.metrics_rollup_queue (hour, queued_by) VALUES ($1, $2)",
                           to_datetime(key[0]), f"app{BACKFILL_QUEUE_TAG}1")  # fmt: skip
    finally:
        await conn.close()


def test_a_week_is_merged_from_its_stored_days_where_they_hold_their_hours(database: str) -> None:
    """Rolled up with a new day, a week is merged from the stored rows of its other days: an
    hour of Monday whose sketch bytes are broken is never read for Wednesday's roll-up (merged
    from the hours, it raises). A day row that does not hold its hours (rolled up before
    migration 008, without the exact sum; or missing) makes the week come from the hours and is
    made again. Every week equals the oracle, its sum the hours' sums added."""
    week = bucket_start_ms(START_MS, "week")
    events = make_events(hours=50, per_hour=300, seed=27, start_ms=week)  # Monday 00:00 to Wednesday 02:00
    state = AggregateState(kinds(), 10_000)
    state.ingest(events)
    rows = state.rows()
    oracle = exact_hours(events)
    wednesday = week + 2 * DAY_MS
    early = [row for row in rows if row.bucket_ms < wednesday]
    late = [row for row in rows if row.bucket_ms >= wednesday]
    broken = next(
        r for r in early
        if r.bucket_ms < week + DAY_MS and r.sketch is not None and r.dimension_type == "user_id"
        and any(o.key[1:] == r.key[1:] for o in late)
    )  # fmt: skip

    async def weeks_match_the_oracle(store: Store) -> None:
        stored = {r.key: r for r in await store.fetch_rows("week", week, week + 1)}
        expected = exact_rollup(oracle, "week")
        assert set(stored) == set(expected)
        for key, (exact, hour_sums) in expected.items():
            assert_row_matches(stored[key], exact, expected_sum=hour_sums)

    async def run() -> None:
        async with await open_store(database) as store:
            await store.upsert_rows(early)
            await rollup_keys(store, [row.key for row in early])
            await store.upsert_rows(late)
            set_sketch = (
                "UPDATE observability.metrics_aggregates SET sketch = $5 WHERE granularity = 'hour' "
                "AND bucket_time = $1 AND metric_name = $2 AND dimension_type = $3 AND dimension_value = $4"
            )
            await store.execute(set_sketch, to_datetime(broken.bucket_ms), *broken.key[1:], b"\x01\x02")
            with pytest.raises(StateError, match="unreadable sketch"):
                await rollup_keys(store, [broken.key], granularities=("week",))  # from every hour
            await rollup_keys(store, [row.key for row in late])
            await weeks_match_the_oracle(store)
            await store.execute(set_sketch, to_datetime(broken.bucket_ms), *broken.key[1:], broken.sketch)  # mended

            monday, tuesday = week, week + DAY_MS
            await store.execute("UPDATE observability.metrics_aggregates SET sum_parts = NULL "
                                "WHERE granularity = 'day' AND bucket_time = $1", to_datetime(monday))  # fmt: skip
            await store.execute("DELETE FROM observability.metrics_aggregates "
                                "WHERE granularity = 'day' AND bucket_time = $1", to_datetime(tuesday))  # fmt: skip
            await rollup_keys(store, [row.key for row in late])
            await weeks_match_the_oracle(store)
            touched = {row.key[1:] for row in late}  # the series rolled up: their other days made again
            days = {r.key: r for r in await store.fetch_rows("day", monday, wednesday) if r.key[1:] in touched}
            expected = exact_rollup({k: v for k, v in oracle.items() if k[0] < wednesday and k[1:] in touched}, "day")
            assert set(days) == set(expected) and any(key[0] == tuesday for key in days)
            assert all(r.sum_parts is not None for r in days.values() if r.sketch is not None)

    asyncio.run(run())


def test_a_day_rows_exact_sum_follows_its_hours_without_a_new_revision(database: str) -> None:
    """The same values split otherwise into a day's hours ({1, 2**-60}, {2**-60} then {1},
    {2**-60, 2**-60}) give the day the same evidence but other sums of hour sums: the parts are
    rewritten (a week is merged from them), the revision stays."""
    day = bucket_start_ms(START_MS, "day")
    series = ("trace.duration_ms", None, None)
    tiny = 2.0**-60

    def hour_row(at: int, values: list[float]) -> Row:
        agg = Agg(kinds()["trace.duration_ms"])
        agg.add_group(values, int(fingerprints(np.asarray(values)).sum(dtype=np.uint64)))
        return agg.to_row((at, *series), "hour")

    def day_row(hours: list[list[float]]) -> Row:
        (row,) = roll_up([hour_row(day + i * HOUR_MS, values) for i, values in enumerate(hours)], "day")
        return row

    before, after = day_row([[1.0, tiny], [tiny]]), day_row([[1.0], [tiny, tiny]])
    assert (before.count, before.sum_value, before.fingerprint) == (after.count, after.sum_value, after.fingerprint)
    assert before.sum_parts != after.sum_parts

    async def run() -> None:
        async with await open_store(database) as store:
            await store.upsert_rows([before])
            assert (await store.upsert_rows([after])).updated == 1
            (stored,) = await store.fetch_rows("day", day, day + 1)
            assert stored.sum_parts == after.sum_parts
            assert set((await store.revisions()).values()) == {1}

    asyncio.run(run())


def test_a_stored_day_that_lags_its_hours_makes_its_week_from_the_hours(database: str) -> None:
    """Another worker flushed an hour of Monday and has not rolled it up yet: Monday's stored day
    row, exact sum and all, lacks that hour (its count and fingerprint say so). Wednesday's
    roll-up then merges the week from the hours, with that hour, and makes Monday again."""
    week = bucket_start_ms(START_MS, "week")
    events = make_events(hours=50, per_hour=300, seed=28, start_ms=week)
    state = AggregateState(kinds(), 10_000)
    state.ingest(events)
    rows = state.rows()
    oracle = exact_hours(events)
    wednesday = week + 2 * DAY_MS
    late = [row for row in rows if row.bucket_ms >= wednesday]
    held = next(r for r in rows if r.bucket_ms < week + DAY_MS and r.dimension_type == "user_id"
                and r.sketch is not None and any(o.key[1:] == r.key[1:] for o in late))  # fmt: skip
    early = [row for row in rows if row.bucket_ms < wednesday and row is not held]

    async def run() -> None:
        async with await open_store(database) as store:
            await store.upsert_rows(early)
            await rollup_keys(store, [row.key for row in early])
            await store.upsert_rows([held, *late])  # the other worker's hour, then Wednesday's
            await rollup_keys(store, [row.key for row in late])
            weeks = {r.key: r for r in await store.fetch_rows("week", week, week + 1)}
            (exact, hour_sums) = exact_rollup(oracle, "week")[(week, *held.key[1:])]
            assert_row_matches(weeks[(week, *held.key[1:])], exact, expected_sum=hour_sums)
            monday = {r.key: r for r in await store.fetch_rows("day", week, week + 1)}
            (exact, hour_sums) = exact_rollup(oracle, "day")[(week, *held.key[1:])]
            assert_row_matches(monday[(week, *held.key[1:])], exact, expected_sum=hour_sums)

    asyncio.run(run())


def test_a_week_whose_days_hold_two_sketch_kinds_past_exact_mode_is_merged_from_its_hours(database: str) -> None:
    """STREAMAGG_SKETCH_KIND changed on Tuesday. Monday's hours (KLL) are each exact and join
    Tuesday's REQ sketch as their values, but Monday's day row, 500 values, is past exact mode
    like Tuesday's: merged from the days, the week would be refused and left as it was (Monday
    alone); it is merged from the hours, as before."""
    week = bucket_start_ms(START_MS, "week")
    series = ("trace.duration_ms", "user_id", "u1")
    rng = np.random.default_rng(3)

    def hour(at: int, kind: str, n: int) -> Row:
        agg = Agg(Kind.parse(kind))
        values = rng.lognormal(5, 1, n).tolist()
        agg.add_group(values, int(fingerprints(np.asarray(values)).sum(dtype=np.uint64)))
        return agg.to_row((at, *series), "hour")

    monday = [hour(week + i * HOUR_MS, "kll-k200", 50) for i in range(10)]
    tuesday = hour(week + DAY_MS, "req-hra-k24", 2000)

    async def run() -> None:
        async with await open_store(database) as store:
            await store.upsert_rows(monday)
            await rollup_keys(store, [row.key for row in monday])
            await store.upsert_rows([tuesday])
            result = await rollup_keys(store, [tuesday.key])
            assert result["week"].unmerged == 0
            (stored,) = await store.fetch_rows("week", week, week + 1)
            assert (stored.count, stored.sketch_kind) == (2500, "req-hra-k24")
            assert stored.sum_value == math.fsum(row.sum_value for row in [*monday, tuesday])

    asyncio.run(run())


def test_owed_roll_ups_remake_the_days_of_series_that_lost_some_of_their_hours(database: str) -> None:
    """A backfill removed a series' row of one hour (its replay found no event for it) and
    stopped before its roll-ups; the series still has another hour that day. The owed roll-up
    finds it by its day row and makes the day and week from the hour left (it kept the removed
    hour's count, since only series with a row in an owed hour were rolled up)."""
    events = make_events(hours=2, per_hour=600, seed=25)
    state = AggregateState(kinds(), 10_000)
    state.ingest(events)
    rows = state.rows()
    oracle = exact_hours(events)
    user = next(k for k in oracle if k[0] == START_MS and k[2] == "user_id" and (START_MS + HOUR_MS, *k[1:]) in oracle)
    later = (START_MS + HOUR_MS, *user[1:])

    async def run() -> None:
        async with await open_store(database) as store:
            await store.upsert_rows(rows)
            await rollup_keys(store, [row.key for row in rows])
            day = (bucket_start_ms(START_MS, "day"), *user[1:])
            assert {r.key: r for r in await store.fetch_rows("day", day[0], day[0] + 1)}[day].count == oracle[user].count + oracle[later].count
            await _removed_by_a_stopped_backfill(database, user)
            await roll_up_owed(store, exclude="a-live-worker")
            for granularity in ("day", "week"):
                start = bucket_start_ms(START_MS, granularity)
                stored = {r.key: r for r in await store.fetch_rows(granularity, start, start + 1)}
                assert_row_matches(stored[(start, *user[1:])], oracle[later], expected_sum=oracle[later].sum)
            assert await store.owed_rollups(exclude="a-live-worker") == {}

    asyncio.run(run())


def test_owed_roll_ups_remake_a_week_rolled_up_without_its_days(database: str) -> None:
    """Weeks rolled up on their own (`streamagg rollup --granularity week`) have no day rows. A
    backfill then removed a series' only hour of the week and stopped before its roll-ups: the
    owed roll-up finds the series by its week row and deletes that row, which still counted the
    removed hour (it looked for series by their hours and their day rows only)."""
    events = make_events(hours=2, per_hour=600, seed=26)
    state = AggregateState(kinds(), 10_000)
    state.ingest(events)
    rows = state.rows()
    oracle = exact_hours(events)
    lone = next(k for k in oracle if k[0] == START_MS and k[2] == "user_id" and (START_MS + HOUR_MS, *k[1:]) not in oracle)
    week = bucket_start_ms(START_MS, "week")

    async def run() -> None:
        async with await open_store(database) as store:
            await store.upsert_rows(rows)
            await rollup_keys(store, [row.key for row in rows], granularities=("week",))
            assert not await store.fetch_rows("day", week, week + 7 * 24 * HOUR_MS)
            assert (week, *lone[1:]) in {r.key for r in await store.fetch_rows("week", week, week + 1)}
            await _removed_by_a_stopped_backfill(database, lone)
            await roll_up_owed(store, exclude="a-live-worker")
            weeks = {r.key: r for r in await store.fetch_rows("week", week, week + 1)}
            assert (week, *lone[1:]) not in weeks
            others = {k for k in oracle if k[2] == "user_id" and k[1:] != lone[1:]}
            assert {(week, *k[1:]) for k in others} <= set(weeks)  # the other series' weeks stay
            assert await store.owed_rollups(exclude="a-live-worker") == {}

    asyncio.run(run())


def test_partials_of_two_sketch_kinds_merge_unless_both_are_past_exact_mode(database: str) -> None:
    """Partition 0 wrote under req-hra-k128; partition 1 then writes under kll-k200 (the setting
    changed): every key whose partials are exact on one side gets the merged final row; a key past
    exact mode on both keeps its row from partition 0 and is counted, and the rest is written."""
    events = make_events(hours=1, per_hour=12_000, seed=24)
    old, new = AggregateState(kinds("req-hra-k128"), 10_000), AggregateState(kinds("kll-k200"), 10_000)
    old.ingest(events[0::2])
    new.ingest(events[1::2])
    oracle = exact_hours(events)
    def estimating(state: AggregateState) -> set:
        return {key for key, agg in state.items() if agg.sketch is not None and not agg.sketch.is_exact}

    both_past = estimating(old) & estimating(new)
    assert both_past and len(both_past) < len(oracle) / 10

    async def run() -> None:
        async with await open_store(database) as store:
            await store.write_partials(0, list(old.items()))
            first = {row.key: row for row in await store.fetch_rows("hour", START_MS, START_MS + HOUR_MS)}
            result = await store.write_partials(1, list(new.items()))
            assert result.unmerged == len(both_past)
            rows = {row.key: row for row in await store.fetch_rows("hour", START_MS, START_MS + HOUR_MS)}
            assert set(rows) == set(oracle)
            for key, exact in oracle.items():
                if key in both_past:
                    assert rows[key] == first[key]
                else:
                    assert_row_matches(rows[key], exact)

    asyncio.run(run())


def _rollup_by_function(database: str, granularity: str, start: int, end: int) -> tuple[int, int, int, int]:
    async def run() -> WriteResult:
        async with await open_store(database) as store:
            return await rollup(store, granularity, start, end)  # type: ignore[arg-type]

    result = asyncio.run(run())
    return result.inserted, result.updated, result.unchanged, result.deleted


def _rollup_by_command(database: str, granularity: str, start: int, end: int) -> tuple[int, int, int, int]:
    """`streamagg rollup` (what the 01:00 schedule runs, by hand), its printed counts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMAGG_")} | {"STREAMAGG_DATABASE_URL": database}
    args = ["--granularity", granularity, "--from", rfc3339(start), "--to", rfc3339(end)]
    done = subprocess.run([sys.executable, "-m", "streamagg", "rollup", *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    printed = re.fullmatch(rf"{granularity} rows: (\d+) inserted, (\d+) updated, (\d+) unchanged, (\d+) deleted", done.stdout.strip())
    assert printed, done.stdout
    return int(printed[1]), int(printed[2]), int(printed[3]), int(printed[4])


@pytest.mark.parametrize("by", [_rollup_by_function, _rollup_by_command], ids=["function", "command"])
@pytest.mark.parametrize("granularity", ["day", "week"])
def test_rollup_from_stored_hours(database: str, granularity: str, by: Callable[..., tuple[int, int, int, int]]) -> None:
    """Rows of the buckets overlapping [from, to) that hold hours, each the merge of its stored
    hours; a wider range adds the rest; run again, nothing changes; a series' hours deleted, its
    row goes too (it stayed, stale)."""
    start = bucket_start_ms(START_MS, "week") - 6 * HOUR_MS  # crosses a day and a week boundary
    events = make_events(hours=30, per_hour=300, seed=24, start_ms=start)
    state = AggregateState(kinds(), 10_000)
    state.ingest(events)
    hours = state.rows()

    async def load() -> None:
        async with await open_store(database) as store:
            await store.upsert_rows(hours)

    async def stored() -> dict:
        async with await open_store(database) as store:
            rows = await store.fetch_rows(granularity, start - 7 * 24 * HOUR_MS, start + 8 * 24 * HOUR_MS)  # type: ignore[arg-type]
            return {row.key: stats(row) for row in rows}

    asyncio.run(load())
    expected = {row.key: stats(row) for row in roll_up(hours, granularity)}  # type: ignore[arg-type]
    monday = bucket_start_ms(START_MS, "week")
    inside = {key: row for key, row in expected.items() if key[0] == bucket_start_ms(monday, granularity)}  # type: ignore[arg-type]
    assert 0 < len(inside) < len(expected)
    assert by(database, granularity, monday + HOUR_MS, monday + 2 * HOUR_MS) == (len(inside), 0, 0, 0)
    assert asyncio.run(stored()) == inside
    assert by(database, granularity, start, start + 30 * HOUR_MS) == (len(expected) - len(inside), 0, len(inside), 0)
    assert asyncio.run(stored()) == expected
    assert by(database, granularity, start, start + 30 * HOUR_MS) == (0, 0, len(expected), 0)

    gone = next(row for row in hours if row.dimension_type == "user_id")  # a user's hours, all of them
    series = gone.key[1:]
    stale = {key for key in expected if key[1:] == series}

    async def delete_hours() -> None:
        conn = await asyncpg.connect(database)
        try:
            await conn.execute("DELETE FROM observability.metrics_aggregates WHERE granularity = 'hour' "
                               "AND metric_name = $1 AND dimension_type = $2 AND dimension_value = $3", *series)  # fmt: skip
        finally:
            await conn.close()

    asyncio.run(delete_hours())
    assert by(database, granularity, start, start + 30 * HOUR_MS) == (0, 0, len(expected) - len(stale), len(stale))
    assert asyncio.run(stored()) == {key: row for key, row in expected.items() if key not in stale}


def _hour_rows(hours: int, per_hour: int, seed: int) -> list[Row]:
    state = AggregateState(kinds(), 10_000)
    state.ingest(make_events(hours=hours, per_hour=per_hour, seed=seed))
    return state.rows()


def _rollup_helper_processes() -> list[multiprocessing.Process]:
    return [process for process in multiprocessing.active_children() if process.name == "streamagg-rollup"]


async def _until(condition: Callable[[], Awaitable[object] | object], what: str, seconds: float = 30.0) -> None:
    """Poll ``condition`` (or the awaitable it returns) until it is true, for at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        done = condition()
        if await done if inspect.isawaitable(done) else done:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)


def test_a_roll_up_helper_that_dies_fails_its_lane_as_retriable_and_the_other_goes_on(database: str) -> None:
    """Helpers share nothing: one killed while idle is passed over and the other serves (a pool
    sharing a task queue hung for good when a helper died holding its lock); one killed in a
    lane (out of memory) fails that roll-up as a retriable StoreError, as a lost connection
    does, and a new process takes the next. SIGINT and SIGTERM, which a terminal or a service
    manager sends to the whole process group, leave them running. Closed, none is left."""
    hours = _hour_rows(hours=3, per_hour=200, seed=25)
    keys = [row.key for row in hours]
    helpers = RollupHelpers(database, database)

    def ignored(pid: int) -> set[int]:
        status = dict(line.split(":\t", 1) for line in open(f"/proc/{pid}/status").read().splitlines())
        mask = int(status["SigIgn"], 16)
        return {signum for signum in (signal.SIGINT, signal.SIGTERM) if mask >> (signum - 1) & 1}

    async def run() -> None:
        async with await open_store(database) as store:
            await store.upsert_rows(hours)
            helpers.start()
            assert len(helpers.pids()) == helpers.processes
            await _until(lambda: all(ignored(pid) == {signal.SIGINT, signal.SIGTERM} for pid in helpers.pids()), "SIG_IGN")
            for pid in helpers.pids():
                os.kill(pid, signal.SIGINT)
                os.kill(pid, signal.SIGTERM)
            first = await rollup_keys(store, keys, helpers=helpers)
            assert first["day"].inserted > 0
            unchanged = {g: WriteResult(unchanged=first[g].inserted) for g in ("day", "week")}

            idle = helpers._idle[-1]  # the next to be given a lane
            os.kill(idle.process.pid, signal.SIGKILL)
            await _until(lambda: not idle.process.is_alive(), "the idle helper's death")
            assert await rollup_keys(store, keys, helpers=helpers) == unchanged

            # A lane held on its series' lock while its helper is killed.
            blocker = await asyncpg.connect(database)
            try:
                await blocker.execute("SELECT pg_advisory_lock($1)", series_lock_id(keys[0][1:]))
                rolling = asyncio.create_task(rollup_keys(store, keys[:1], helpers=helpers))
                await wait_for_lock_waiters(store)
                busy = [p for p in _rollup_helper_processes() if p.pid not in helpers.pids()]
                assert len(busy) == 1
                os.kill(busy[0].pid, signal.SIGKILL)
                with pytest.raises(StoreError, match="a roll-up helper process stopped") as failed:
                    await rolling
                assert failed.value.retriable
            finally:
                await blocker.close()
            assert await rollup_keys(store, keys, helpers=helpers) == unchanged
            rows = await store.fetch_rows("day", START_MS - DAY_MS, START_MS + 2 * DAY_MS)
            assert {row.key: stats(row) for row in rows} == {row.key: stats(row) for row in roll_up(hours, "day")}

    try:
        asyncio.run(run())
    finally:
        helpers.close()
    assert _rollup_helper_processes() == []


def test_roll_up_helpers_exit_with_a_worker_killed_even_as_they_start() -> None:
    """A helper reads the end of its pipe when its worker dies, however early: killed right
    after starting them, the worker leaves no process behind."""
    script = (  # a stand-in worker: starts its helpers, says their pids, waits (on its stdin) to be killed
        "import sys\n"
        "from streamagg.rollup import RollupHelpers\n"
        "helpers = RollupHelpers('postgresql://127.0.0.1:1/none', 'postgresql://127.0.0.1:1/none')\n"
        "helpers.start()\n"
        "print(*helpers.pids(), flush=True)\n"
        "sys.stdin.read()\n"
    )

    def gone(pid: int) -> bool:
        try:
            return "\nState:\tZ" in open(f"/proc/{pid}/status").read()  # a zombie, for a parent that does not reap
        except FileNotFoundError:
            return True

    with subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as worker:
        pids = [int(pid) for pid in worker.stdout.readline().split()]  # type: ignore[union-attr]
        worker.kill()
    assert len(pids) == 2
    try:
        asyncio.run(_until(lambda: all(map(gone, pids)), "the helpers to exit", seconds=20))
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_roll_up_helpers_that_keep_stopping_before_they_answer_are_given_up(database: str) -> None:
    """A helper that cannot start (here its logging level is not one; a broken install would do
    the same) fails its roll-up as retriable; after GIVE_UP_AFTER in a row, roll-ups run in the
    caller's thread rather than never again."""
    hours = _hour_rows(hours=1, per_hour=40, seed=26)
    keys = [row.key for row in hours]
    helpers = RollupHelpers(database, database)
    helpers._start_args = (database, database, "not a level")  # type: ignore[assignment]

    async def run() -> None:
        async with await open_store(database) as store:
            await store.upsert_rows(hours)
            for _ in range(RollupHelpers.GIVE_UP_AFTER):
                assert helpers.usable
                with pytest.raises(StoreError, match=r"a roll-up helper process stopped \(exit code 1\)"):
                    await rollup_keys(store, keys, helpers=helpers)
            assert not helpers.usable
            result = await rollup_keys(store, keys, helpers=helpers)
            assert result["day"] == WriteResult(inserted=len(roll_up(hours, "day")))

    try:
        asyncio.run(run())
    finally:
        helpers.close()
    assert _rollup_helper_processes() == []


def test_a_database_error_in_a_roll_up_helper_reaches_the_worker_as_itself(database: str) -> None:
    """A helper that cannot connect (its own connections) fails the roll-up with the StoreError
    a roll-up in the worker's thread would raise: retriable, the password not in it."""
    helpers = RollupHelpers("postgresql://postgres:s3cret@127.0.0.1:1/nowhere", "postgresql://postgres:***@127.0.0.1:1/nowhere")

    async def run() -> None:
        async with await open_store(database) as store:
            with pytest.raises(StoreError, match=r"cannot connect to postgresql://postgres:\*\*\*@127.0.0.1:1/nowhere") as failed:
                await rollup_keys(store, [(START_MS, "trace.count", None, None)], helpers=helpers)
            assert failed.value.retriable and "s3cret" not in str(failed.value)

    try:
        asyncio.run(run())
    finally:
        helpers.close()


def test_days_and_weeks_are_utc_whatever_the_server_time_zone(database: str) -> None:
    """A day is 24 hours of UTC and a week 168 on a server whose time zone changes clocks too.
    With the database's zone Europe/Berlin, SQL's day arithmetic made 2025-03-30 (clocks forward)
    23 hours long: `rollup` found no hour of a series whose only hour was 23:00 UTC in its day and
    deleted the day and week rows it had just written. 2025-10-26 (clocks back) was 25 hours: a
    day whose hour was deleted kept its stale row, as the next day's 00:00 hour fell inside."""
    at = {"spring": to_ms(datetime(2025, 3, 30, 23, 10, tzinfo=UTC)),
          "autumn": to_ms(datetime(2025, 10, 26, 10, 10, tzinfo=UTC)),
          "next day": to_ms(datetime(2025, 10, 27, 0, 10, tzinfo=UTC))}  # fmt: skip
    state = AggregateState(kinds(), 10_000)
    state.ingest([validate("traces", {"trace_id": name, "operation_type": name, "started_at": time_ms, "duration_ms": 7,
                                      "status": "success"}) for name, time_ms in at.items()])  # fmt: skip
    hours = state.rows()

    async def run() -> None:
        conn = await asyncpg.connect(database)
        try:
            await conn.execute(f"ALTER DATABASE \"{database.rsplit('/', 1)[1]}\" SET timezone TO 'Europe/Berlin'")
        finally:
            await conn.close()
        conn = await asyncpg.connect(database)  # sessions from now on, the store's included
        try:
            assert await conn.fetchval("SHOW timezone") == "Europe/Berlin"
        finally:
            await conn.close()
        async with await open_store(database) as store:

            async def stored(granularity: str) -> dict:
                rows = await store.fetch_rows(granularity, at["spring"] - 8 * 24 * HOUR_MS, at["next day"] + 8 * 24 * HOUR_MS)  # type: ignore[arg-type]
                return {row.key: stats(row) for row in rows}

            await store.upsert_rows(hours)
            for granularity in ("day", "week"):
                for time_ms in at.values():
                    await rollup(store, granularity, time_ms, time_ms + HOUR_MS)
                assert await stored(granularity) == {row.key: stats(row) for row in roll_up(hours, granularity)}  # type: ignore[arg-type]
            # Every hour before the next day goes; the autumn day's rows go with them, the global
            # slice's too, though that series has an hour at 00:10 the next day.
            autumn_day, next_day = bucket_start_ms(at["autumn"], "day"), bucket_start_ms(at["next day"], "day")
            await store.execute("DELETE FROM observability.metrics_aggregates WHERE granularity = 'hour' AND bucket_time < $1",
                                to_datetime(next_day))  # fmt: skip
            await rollup(store, "day", at["autumn"], at["autumn"] + HOUR_MS)
            assert not [key for key in await stored("day") if key[0] == autumn_day]
            assert (next_day, "trace.duration_ms", None, None) in await stored("day")

    asyncio.run(run())


def test_a_rollup_reads_its_hours_only_once_it_holds_their_series(database: str) -> None:
    """Two workers roll up one series at once: the second waits for the first's transaction and
    then reads, so an hour flushed meanwhile is in the day row it writes. (Read before waiting,
    its older read would overwrite the first's day, and the day would miss that hour for good.)"""
    from streamagg.rollup import rollup_keys

    events = make_events(hours=2, per_hour=300, seed=27)
    state = AggregateState(kinds(), 10_000)
    state.ingest(events)
    first = [row for row in state.rows() if row.bucket_ms == START_MS]
    second = [row for row in state.rows() if row.bucket_ms == START_MS + HOUR_MS]
    series = {row.key[1:] for row in first + second}

    async def run() -> None:
        async with await open_store(database) as store:
            await store.upsert_rows(first)
            async with store.rolling_up(series):  # the other worker's roll-up
                mine = asyncio.create_task(rollup_keys(store, [row.key for row in first]))
                await wait_for_lock_waiters(store)
                await store.upsert_rows(second)  # a flush of the next hour commits meanwhile
            await mine
            days = {row.key: stats(row) for row in await store.fetch_rows("day", START_MS, START_MS + HOUR_MS)}
            mine_series = {row.key[1:] for row in first}
            expected = [row for row in roll_up(first + second, "day") if row.key[1:] in mine_series]
            assert any(row.key[1:] in mine_series for row in second)  # the race is there to lose
            assert days == {row.key: stats(row) for row in expected}

    asyncio.run(run())


def test_flushed_hours_wait_in_the_roll_up_queue_until_rolled_up(database: str) -> None:
    """A flush queues its hours with its writes; a worker sees other workers' queue only, and
    clears its own, or given rows, once the roll-ups are done."""
    events = make_events(hours=2, per_hour=200, seed=28)
    state = AggregateState(kinds(), 10_000)
    state.ingest(events)
    items = list(state.items())
    first_hour = [item for item in items if item[0][0] == START_MS]

    async def run() -> None:
        async with await open_store(database) as store:
            await store.write_partials_of([(0, 5, items)], queued_by="a")
            await store.write_partials_of([(1, 5, first_hour[:10])], queued_by="b")
            await store.write_partials_of([(2, 5, items)], dry_run=True, queued_by="b")  # rolled back
            owed_by_a = await store.owed_rollups(exclude="b")
            assert sorted(owed_by_a) == [START_MS, START_MS + HOUR_MS]
            owed_by_b = await store.owed_rollups(exclude="a")
            assert list(owed_by_b) == [START_MS] and len(owed_by_b[START_MS]) == 1
            assert set(await store.hour_keys_at([START_MS])) == {key for key, _ in first_hour}
            await store.rolled_up("a")
            assert await store.owed_rollups(exclude="b") == {}
            await store.rolled_up(ids=[row for rows in owed_by_b.values() for row in rows])
            assert await store.owed_rollups(exclude="a") == {}

    asyncio.run(run())


async def wait_for_lock_waiters(store: Store, deadline_s: float = 10.0) -> None:
    """Until some transaction of the store's database waits for an advisory lock."""
    waiting = ("SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
               "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")  # fmt: skip
    await _until(lambda: store._fetch("pg_locks", waiting), "a transaction waiting for the roll-up locks", deadline_s)


def test_connection_error_names_no_password() -> None:
    from streamagg.store import StoreError

    dsn = "postgresql://u:hunter2@127.0.0.1:1/db"
    with pytest.raises(StoreError) as info:
        asyncio.run(Store.open(dsn, Settings(database_url=dsn).redacted_dsn()))
    assert "hunter2" not in str(info.value) and info.value.retriable


def test_a_dsn_the_client_refuses_says_why_without_its_password() -> None:
    dsn = "postgresql://u:hunter%2F2@127.0.0.1:1/db?sslmode=bogus"
    with pytest.raises(StoreError) as info:
        asyncio.run(Store.open(dsn, Settings(database_url=dsn).redacted_dsn()))
    message = str(info.value)
    assert "`sslmode` parameter must be one of" in message and not info.value.retriable
    assert "hunter" not in message and "u:***@" in message


def test_one_transaction_over_many_keys_fits_the_lock_table(database: str) -> None:
    """Tens of thousands of keys in one write must not exhaust PostgreSQL's shared lock table
    (max_locks_per_transaction x max_connections slots)."""
    events = make_events(hours=2, per_hour=20_000, seed=25, users=5000)
    state = AggregateState(kinds(), 10_000)
    state.ingest(events)
    assert len(state) > 30_000  # one lock per key would exceed the shared lock table (64 x 200 slots)

    async def run() -> None:
        async with await open_store(database) as store:
            result = await store.write_partials(0, list(state.items()))
            assert result.inserted == len(state)

    asyncio.run(run())


def test_retired_partials_and_orphans_leave_exactly_the_replayed_rows(database: str) -> None:
    """What a backfill writes: retired partials go unless they include more of their partition,
    keys left without partials lose their final hour row, a dry run changes nothing, and day
    rows of series with no hour left go too."""
    from streamagg.rollup import rollup_keys
    from streamagg.store import Retire

    events = make_events(hours=1, per_hour=600, seed=26)
    partitions = [AggregateState(kinds(), 10_000) for _ in range(2)]
    for i, event in enumerate(events):
        partitions[i % 2].ingest([event])
    both = sorted(set(partitions[0].keys()) & set(partitions[1].keys()), key=repr)
    only_one = sorted(set(partitions[1].keys()) - set(partitions[0].keys()), key=repr)
    gone, newer = only_one[0], only_one[1]

    async def run() -> None:
        async with await open_store(database) as store:
            await store.write_partials(0, list(partitions[0].items()), source_offset=10)
            await store.write_partials(1, list(partitions[1].items()), source_offset=10)
            await store.write_partials(1, [(newer, partitions[1][newer])], source_offset=99)  # read further
            await store.upsert_rows([partitions[0][both[0]].to_row((START_MS, "junk", None, None), "hour")])
            junk = (START_MS, "junk", None, None)
            await rollup_keys(store, [gone, junk, both[0]])
            before_rows = await store.fetch_rows("hour", START_MS, START_MS + HOUR_MS)
            before_revisions = await store.revisions()
            retire = [Retire(both[0], 1, 10), Retire(gone, 1, 10), Retire(newer, 1, 10)]

            dry = await store.write_partials_of([], retire, [junk], dry_run=True)
            assert await store.fetch_rows("hour", START_MS, START_MS + HOUR_MS) == before_rows
            assert await store.revisions() == before_revisions
            real = await store.write_partials_of([], retire, [junk])
            assert real == dry
            # both[0] lost partition 1's share; gone and junk lost their rows; newer kept its partial.
            assert (real.updated, real.deleted, real.unchanged) == (1, 2, 1)
            rows = {row.key: row for row in await store.fetch_rows("hour", START_MS, START_MS + HOUR_MS)}
            assert gone not in rows and junk not in rows and newer in rows
            assert stats(rows[both[0]]) == stats(partitions[0][both[0]].to_row(both[0], "hour"))
            rolled = (await rollup_keys(store, [gone, junk, both[0]]))["day"]
            assert rolled.deleted == 2 and rolled.updated == 1
            day_keys = {row.key for row in await store.fetch_rows("day", START_MS, START_MS + 24 * HOUR_MS)}
            assert (bucket_start_ms(START_MS, "day"), *gone[1:]) not in day_keys

    asyncio.run(run())


def test_reading_other_partials_probes_the_index_per_key(database: str) -> None:
    """A flush reads the other partitions' partials of its keys (in the statement that writes its
    own): one probe of the unique key per key (the global slice's by IS NULL), never
    a scan (and sort) of the whole partials table, which grows with time while a flush's keys
    do not. Planned on a table of 60,000 partials with fresh statistics."""
    from streamagg.store import _WRITE_PARTIALS, PARTIALS

    async def run() -> str:
        async with await open_store(database) as store:
            await store.execute(
                f"INSERT INTO {PARTIALS} (bucket_time, metric_name, dimension_type, dimension_value, source_partition,"
                " count, sketch) SELECT to_timestamp(0) + (i % 24) * interval '1 hour', 'trace.duration_ms', 'user_id',"
                " 'u' || (i / 24 % 2500), i / 60000 + i % 3, 1, decode(repeat('ab', 200), 'hex')"
                " FROM generate_series(0, 59999) AS i"
            )
            await store.analyze()
            keys = [(h * HOUR_MS, "trace.duration_ms", "user_id", f"u{u}") for u in range(1000) for h in range(5)]
            keys += [(h * HOUR_MS, "trace.duration_ms", None, None) for h in range(5)]  # the global slice
            partials = json.dumps([[*key, 0, 1, None, 1.0, 1.0, None, None, None, 0] for key in keys])
            async with store._pool.acquire() as conn:
                plan = await conn.fetch("EXPLAIN " + _WRITE_PARTIALS, partials, [], [], [], [])
            return "\n".join(row[0] for row in plan)

    plan = asyncio.run(run())
    assert "Index Scan using metrics_partials_key" in plan, plan
    assert "(dimension_type IS NULL) AND (dimension_value IS NULL)" in plan, plan  # the global slice's probe
    assert "Seq Scan on metrics_partials" not in plan and "Sort" not in plan, plan


def test_a_sum_beyond_float_range_is_stored_as_infinity_at_every_step(database: str) -> None:
    """Values are finite, their sum need not be: the partial, the final hour row and the day row
    hold +inf as the sum and the average (rows go to PostgreSQL as JSON, which has no infinity),
    while count, min and max stay exact."""
    events = [
        validate("traces", {"trace_id": f"t{i}", "operation_type": "chat", "started_at": START_MS + i * 1000,
                            "duration_ms": 1e308, "status": "success"})
        for i in range(3)
    ]  # fmt: skip
    partitions = [AggregateState(kinds(), 10_000) for _ in range(2)]
    partitions[0].ingest(events[:2])
    partitions[1].ingest(events[2:])
    key = (START_MS, "trace.duration_ms", None, None)

    async def run() -> None:
        async with await open_store(database) as store:
            await store.write_partials_of([(p, 0, [(key, state[key])]) for p, state in enumerate(partitions)])
            parts = await store.execute(
                "SELECT 1 FROM observability.metrics_partials WHERE metric_name = 'trace.duration_ms' AND count = 2"
                " AND min_value = 1e308 AND max_value = 1e308"
            )
            assert parts == "SELECT 1"
            await rollup(store, "day", START_MS, START_MS + HOUR_MS)
            for granularity in ("hour", "day"):
                row = next(r for r in await store.fetch_rows(granularity, START_MS - 24 * HOUR_MS, START_MS + 24 * HOUR_MS)
                           if r.metric_name == "trace.duration_ms" and r.dimension_type is None)  # fmt: skip
                assert (row.count, row.sum_value, row.avg_value) == (3, math.inf, math.inf), granularity
                assert (row.min_value, row.max_value, row.p50_value, row.p99_value) == (1e308,) * 4, granularity

    asyncio.run(run())


def test_dimension_values_of_any_text_round_trip_through_every_write(database: str) -> None:
    """Rows go to PostgreSQL as JSON: quotes, backslashes, control characters, non-ASCII text,
    JSON-looking text and the empty string (a value, not NULL) come back exactly, through a
    partial, its final hour row and the day row."""
    values = ['a"b', "back\\slash", "it's", "ünïcødé ✓ 🚀 中文", "\x01\x1f\x7f", '{"json": [1, null]}', "", " ", "007",
              "null", "x" * 256]  # fmt: skip
    events = [
        validate("traces", {"trace_id": f"t{i}", "operation_type": value, "started_at": START_MS + i * 1000,
                            "duration_ms": 1.5 + i, "status": "success"})
        for i, value in enumerate(values)
    ]  # fmt: skip
    state = AggregateState(kinds(), 10_000)
    state.ingest(events)
    keys = [key for key in state.keys() if key[1] == "trace.duration_ms" and key[2] == "operation_type"]
    assert sorted(key[3] for key in keys) == sorted(values)

    async def run() -> None:
        async with await open_store(database) as store:
            await store.write_partials_of([(0, 0, [(key, state[key]) for key in keys])])
            await rollup(store, "day", START_MS, START_MS + HOUR_MS)
            for granularity in ("hour", "day"):
                rows = await store.fetch_rows(granularity, START_MS - 24 * HOUR_MS, START_MS + 24 * HOUR_MS, "trace.duration_ms")
                stored = {row.dimension_value: row for row in rows if row.dimension_type == "operation_type"}
                assert sorted(stored) == sorted(values), granularity
                for i, value in enumerate(values):
                    assert (stored[value].count, stored[value].sum_value) == (1, 1.5 + i), (granularity, value)

    asyncio.run(run())
