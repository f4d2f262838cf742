"""PostgreSQL through asyncpg: migrations, partial and final upserts, reads. No Faust here.

Writes overwrite a row with its full state, never increment, so any re-run gives the same
rows. A final row is overwritten (and its ``revision`` bumped) only when its evidence
``(count, sum, min, max, fingerprint, sketch kind)`` differs from what is stored: equal
evidence means the stored sketch already summarises exactly these values.
"""

from __future__ import annotations

import binascii
import contextlib
import functools
import hashlib
import logging
import math
import struct
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

import asyncpg
import orjson

from . import exact
from .aggregate import Agg, Key, Row, SketchKindsMismatch
from .buckets import Granularity, rfc3339, to_datetime, to_ms, width_ms
from .errors import StreamaggError
from .settings import without_password

log = logging.getLogger(__name__)

TABLE = "observability.metrics_aggregates"
PARTIALS = "observability.metrics_partials"
ROLLUP_QUEUE = "observability.metrics_rollup_queue"
_MIGRATION_LOCK = 0x5354_5241_4747_0001  # advisory lock id serialising concurrent `migrate`s

_RETRIABLE = (
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)


class StoreError(StreamaggError):
    """A database operation failed; ``retriable`` for connection loss, deadlocks and the like."""

    def __init__(self, message: str, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable

    def __reduce__(self) -> tuple[type[StoreError], tuple[str, bool]]:
        """Pickled with ``retriable`` (a roll-up helper process raises it in the worker)."""
        return type(self), (str(self), self.retriable)


# What a database call can raise that is not a bug of ours.
# InternalClientError: a connection lost in the middle of a statement (PostgreSQL stopped during
# a flush: "cannot switch to state 15; another operation (2) is in progress") crashed the worker.
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError)


def _wrap(what: str, exc: BaseException) -> StoreError:
    hint = " (is the schema there? `streamagg migrate` creates it)" if isinstance(exc, asyncpg.UndefinedTableError) else ""
    return StoreError(f"{what}: {type(exc).__name__}: {exc}{hint}", retriable=isinstance(exc, _RETRIABLE))


@dataclass(frozen=True)
class WriteResult:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    unmerged: int = 0  # rows left as they were: their parts hold sketches of two kinds past exact mode

    def __add__(self, other: WriteResult) -> WriteResult:
        return WriteResult(
            self.inserted + other.inserted,
            self.updated + other.updated,
            self.unchanged + other.unchanged,
            self.deleted + other.deleted,
            self.unmerged + other.unmerged,
        )


@dataclass(frozen=True)
class Retire:
    """A stored partial that a replay of its partition up to ``up_to_offset`` found no event for:
    it goes, unless it includes more of the partition than that (a newer owner's)."""

    key: Key
    partition: int
    up_to_offset: int


_COLUMNS = (
    "bucket_time, granularity, metric_name, dimension_type, dimension_value, count, sum_value, min_value, "
    "max_value, avg_value, p50_value, p95_value, p99_value, sketch, sketch_kind, value_fingerprint, sum_parts"
)
_KEY_COLUMNS = "bucket_time, metric_name, dimension_type, dimension_value"  # of both tables' keys, less granularity and partition
_T_COLUMNS = ", ".join("t." + c.strip() for c in _COLUMNS.split(","))


def _span(milliseconds: str) -> str:
    """SQL of the interval of ``milliseconds`` (an expression), exactly: a pure time span, never
    days, which PostgreSQL adds in the session's time zone."""
    return f"({milliseconds})::bigint * interval '1 millisecond'"


def _bucket_time(milliseconds: str) -> str:
    """SQL of the timestamptz ``milliseconds`` (a text expression) after the epoch, exactly."""
    return f"(timestamptz 'epoch' + {_span(milliseconds)})"


RowKey = tuple[Granularity, int, str | None]  # (granularity, bucket start ms, dimension value) within one slice
Series = tuple[str, str | None, str | None]  # (metric, dimension type, dimension value)

_UPSERT = f"""
INSERT INTO {TABLE} AS t ({_COLUMNS})
SELECT {_bucket_time("r->>0")}, r->>1, r->>2, r->>3, r->>4, (r->>5)::bigint, (r->>6)::float8, (r->>7)::float8,
       (r->>8)::float8, (r->>9)::float8, (r->>10)::float8, (r->>11)::float8, (r->>12)::float8,
       decode(r->>13, 'base64'), r->>14, (r->>15)::bigint, decode(r->>16, 'base64')
FROM jsonb_array_elements($1::jsonb) AS r
ON CONFLICT ON CONSTRAINT metrics_aggregates_key DO UPDATE SET
    count = EXCLUDED.count, sum_value = EXCLUDED.sum_value, min_value = EXCLUDED.min_value,
    max_value = EXCLUDED.max_value, avg_value = EXCLUDED.avg_value, p50_value = EXCLUDED.p50_value,
    p95_value = EXCLUDED.p95_value, p99_value = EXCLUDED.p99_value, sketch = EXCLUDED.sketch,
    sketch_kind = EXCLUDED.sketch_kind, value_fingerprint = EXCLUDED.value_fingerprint,
    sum_parts = EXCLUDED.sum_parts, updated_at = now(),
    revision = t.revision + ((t.count, t.sum_value, t.min_value, t.max_value, t.value_fingerprint, t.sketch_kind)
                             IS DISTINCT FROM (EXCLUDED.count, EXCLUDED.sum_value, EXCLUDED.min_value,
                             EXCLUDED.max_value, EXCLUDED.value_fingerprint, EXCLUDED.sketch_kind))::int
WHERE (t.count, t.sum_value, t.min_value, t.max_value, t.value_fingerprint, t.sketch_kind)
      IS DISTINCT FROM
      (EXCLUDED.count, EXCLUDED.sum_value, EXCLUDED.min_value, EXCLUDED.max_value,
       EXCLUDED.value_fingerprint, EXCLUDED.sketch_kind)
   OR t.sum_parts IS DISTINCT FROM EXCLUDED.sum_parts  -- the same values split otherwise into hours; or before 008
RETURNING (xmax = 0) AS inserted
"""

# The rows of one granularity in [$1, $2), less those in [$6, $7), of the series ($3, $4, $5:
# metrics, dimension types and values), as ``t``: one probe of the series index per series,
# fenced by OFFSET 0. As a plain join on a table whose statistics had no day rows yet (a
# worker's first roll-up: its day rows come in while it runs), the planner expected one row and
# took a nested loop over every day row of the week, each compared with every series of the
# batch: 6.2 s for 1,000 series and 49,389 day rows (EXPLAIN ANALYZE), and bench/throughput's
# roll-up took 60 s, not 5.
_SERIES_ROWS = f"""unnest($3::text[], $4::text[], $5::text[]) AS s(m, dt, dv) CROSS JOIN LATERAL (
    SELECT * FROM {TABLE} t
    WHERE t.metric_name = s.m AND coalesce(t.dimension_type, '') = coalesce(s.dt, '')
      AND coalesce(t.dimension_value, '') = coalesce(s.dv, '') AND t.granularity = '{{granularity}}'
      AND t.bucket_time >= $1 AND t.bucket_time < $2 AND NOT (t.bucket_time >= $6 AND t.bucket_time < $7)
    OFFSET 0
) t"""

# The rows of a write go as one JSON array of arrays (jsonb): 1.8 us a row of the worker's CPU against
# 5.7 us for one array parameter per column, where asyncpg checks every element against abstract
# base classes; PostgreSQL's time is the same (measured on 5,000 rows; the worker's CPU is what
# bounds a flush). Bytes go as base64, bucket times as epoch milliseconds (exact), and a sum that
# overflowed to infinity as text (JSON has no infinity), which float8 reads back.
#
# One statement writes a flush's partials and reads back what the final rows also need: which
# of them were fenced off (a stored partial includes more: a newer owner's), and every other
# stored partial of their keys and of ``$2..$5`` (a backfill's keys without a partial here).
# Every part reads the snapshot from before the insert: a fenced partial is read as stored, one
# written here is left out (its in-memory aggregate is the truth). Sent once, the input costs
# half of what a separate upsert and read cost, and only fenced inputs come back, not every
# written key. The read probes the unique key once per key (the global slice by IS NULL),
# fenced by OFFSET 0: as a plain join the planner charged the anti-join to every probe and
# sorted the whole partials table for a merge join instead (measured: 390 ms against 100 ms for
# 5,000 keys in a 157,000-partial table, and growing with the table, not with the keys).
_WRITE_PARTIALS = f"""
WITH input AS (
    SELECT {_bucket_time("r->>0")} AS bucket_time, r->>1 AS metric_name, r->>2 AS dimension_type,
           r->>3 AS dimension_value, (r->>4)::int AS source_partition, (r->>5)::bigint AS count,
           decode(r->>6, 'base64') AS sum_parts, (r->>7)::float8 AS min_value, (r->>8)::float8 AS max_value,
           decode(r->>9, 'base64') AS sketch, r->>10 AS sketch_kind, (r->>11)::bigint AS value_fingerprint,
           (r->>12)::bigint AS source_offset, n
    FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS i(r, n)
), written AS (
    INSERT INTO {PARTIALS} AS t (bucket_time, metric_name, dimension_type, dimension_value, source_partition,
                                 count, sum_parts, min_value, max_value, sketch, sketch_kind,
                                 value_fingerprint, source_offset)
    SELECT bucket_time, metric_name, dimension_type, dimension_value, source_partition, count, sum_parts,
           min_value, max_value, sketch, sketch_kind, value_fingerprint, source_offset
    FROM input
    ON CONFLICT ON CONSTRAINT metrics_partials_key DO UPDATE SET
        count = EXCLUDED.count, sum_parts = EXCLUDED.sum_parts, min_value = EXCLUDED.min_value,
        max_value = EXCLUDED.max_value, sketch = EXCLUDED.sketch, sketch_kind = EXCLUDED.sketch_kind,
        value_fingerprint = EXCLUDED.value_fingerprint, source_offset = EXCLUDED.source_offset, updated_at = now()
    WHERE EXCLUDED.source_offset >= t.source_offset
    RETURNING t.bucket_time, t.metric_name, coalesce(t.dimension_type, '') AS dt,
              coalesce(t.dimension_value, '') AS dv, t.source_partition
), keys AS (
    SELECT bucket_time AS b, metric_name AS m, dimension_type AS dt, dimension_value AS dv FROM input
    UNION
    SELECT * FROM unnest($2::timestamptz[], $3::text[], $4::text[], $5::text[])
)
SELECT i.n AS fenced, NULL::timestamptz AS bucket_time, NULL AS metric_name, NULL AS dimension_type,
       NULL AS dimension_value, NULL::int AS source_partition, NULL::bigint AS count, NULL::bytea AS sum_parts,
       NULL::float8 AS min_value, NULL::float8 AS max_value, NULL::bytea AS sketch, NULL AS sketch_kind,
       NULL::bigint AS value_fingerprint
FROM input i
WHERE NOT EXISTS (
    SELECT 1 FROM written w
    WHERE w.bucket_time = i.bucket_time AND w.metric_name = i.metric_name AND w.dt = coalesce(i.dimension_type, '')
      AND w.dv = coalesce(i.dimension_value, '') AND w.source_partition = i.source_partition)
UNION ALL
SELECT NULL, p.bucket_time, p.metric_name, p.dimension_type, p.dimension_value, p.source_partition, p.count,
       p.sum_parts, p.min_value, p.max_value, p.sketch, p.sketch_kind, p.value_fingerprint
FROM keys k
CROSS JOIN LATERAL (
    SELECT * FROM {PARTIALS} p
    WHERE p.bucket_time = k.b AND p.metric_name = k.m AND p.dimension_type = k.dt AND p.dimension_value = k.dv
    UNION ALL
    SELECT * FROM {PARTIALS} p
    WHERE k.dt IS NULL AND p.bucket_time = k.b AND p.metric_name = k.m
      AND p.dimension_type IS NULL AND p.dimension_value IS NULL
    OFFSET 0) p
WHERE NOT EXISTS (
    SELECT 1 FROM written w
    WHERE w.bucket_time = p.bucket_time AND w.metric_name = p.metric_name AND w.dt = coalesce(p.dimension_type, '')
      AND w.dv = coalesce(p.dimension_value, '') AND w.source_partition = p.source_partition)
"""

_QUEUE_ROLLUPS = f"INSERT INTO {ROLLUP_QUEUE} (hour, queued_by) SELECT unnest($1::timestamptz[]), $2"

# Partials go by their unique key: a slice's by equality, the global slice's by IS NULL (both are
# index conditions; an equality on NULL never matches). The two deletes touch disjoint rows.
_RETIRE_PARTIALS = f"""
WITH r AS (
    SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::int[], $6::bigint[])
        AS r(b, m, dt, dv, part, upto)
), sliced AS (
    DELETE FROM {PARTIALS} p USING r
    WHERE p.bucket_time = r.b AND p.metric_name = r.m AND p.dimension_type = r.dt AND p.dimension_value = r.dv
      AND p.source_partition = r.part AND p.source_offset <= r.upto
)
DELETE FROM {PARTIALS} p USING r
WHERE r.dt IS NULL AND p.bucket_time = r.b AND p.metric_name = r.m AND p.dimension_type IS NULL
  AND p.dimension_value IS NULL AND p.source_partition = r.part AND p.source_offset <= r.upto
"""

# '' stands for NULL in these joins so that the series index serves them (004_series_indexes.sql).
_DELETE_HOUR_ROWS = f"""
DELETE FROM {TABLE} t USING unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[]) AS k(b, m, dt, dv)
WHERE t.granularity = 'hour' AND t.metric_name = k.m AND coalesce(t.dimension_type, '') = coalesce(k.dt, '')
  AND coalesce(t.dimension_value, '') = coalesce(k.dv, '') AND t.bucket_time = k.b
"""

# A day or week row ``t`` of granularity $1 (bucket width $2, in milliseconds) is deleted only
# while no hour row of its series lies inside its bucket, checked in the statement itself, so a
# concurrent flush of a new hour is never undone. The width is a span of milliseconds, not an
# interval of days: in a time zone with clock changes a day is 23 or 25 hours (on a
# Europe/Berlin server 2025-03-30's row went while its 23:00 UTC hour stood).
_WITHOUT_HOURS = f"""t.granularity = $1 AND NOT EXISTS (
      SELECT 1 FROM {TABLE} h
      WHERE h.granularity = 'hour' AND h.metric_name = t.metric_name
        AND coalesce(h.dimension_type, '') = coalesce(t.dimension_type, '')
        AND coalesce(h.dimension_value, '') = coalesce(t.dimension_value, '')
        AND h.bucket_time >= t.bucket_time AND h.bucket_time < t.bucket_time + {_span("$2")})"""

_DELETE_ROLLUPS_WITHOUT_HOURS = f"""
DELETE FROM {TABLE} t USING unnest($3::timestamptz[], $4::text[], $5::text[], $6::text[]) AS k(b, m, dt, dv)
WHERE t.metric_name = k.m AND coalesce(t.dimension_type, '') = coalesce(k.dt, '')
  AND coalesce(t.dimension_value, '') = coalesce(k.dv, '') AND t.bucket_time = k.b AND {_WITHOUT_HOURS}
"""

_DELETE_ROLLUPS_WITHOUT_HOURS_BETWEEN = f"""
DELETE FROM {TABLE} t WHERE t.bucket_time >= $3 AND t.bucket_time < $4 AND {_WITHOUT_HOURS}
"""


_LOCK_STRIPES = 512
_LOCK_BASE = 0x5354_5241_4747_1000


_SERIES_LOCK_BASE = 0x5354_5241_4747_2000


def key_lock_id(key: Key) -> int:
    """The advisory lock guarding a bucket key: one of a fixed set of stripes, so a transaction
    over many thousand keys takes at most ``_LOCK_STRIPES`` locks (each lock is a slot in
    PostgreSQL's shared lock table, max_locks_per_transaction x max_connections in all)."""
    return _LOCK_BASE + _stripe(key)


def series_lock_id(series: Series) -> int:
    """The advisory lock guarding the day and week rows of a series (striped as :func:`key_lock_id`)."""
    return _SERIES_LOCK_BASE + _stripe(series)


@functools.lru_cache(maxsize=1 << 17)
def _stripe(item: tuple) -> int:
    """Stable across processes (not ``hash``); cached, as a flush orders its keys by stripe and
    then locks them, and a roll-up does the same with its series."""
    digest = hashlib.blake2b(repr(item).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % _LOCK_STRIPES


async def _lock(conn: asyncpg.Connection, lock_ids: Iterable[int]) -> None:
    """Take transaction-scoped advisory locks in ascending order: every transaction takes them in
    the same order, so none deadlocks with another."""
    await conn.execute("SELECT pg_advisory_xact_lock(id) FROM unnest($1::bigint[]) AS id ORDER BY id", sorted(set(lock_ids)))


def _row_from_record(record: asyncpg.Record) -> Row:
    """The row of a record of ``_COLUMNS`` (or ``_T_COLUMNS``), in that order, unpacked by position:
    2.1-2.9 us a row against 3.1-3.3 by column name (a roll-up reads every hour row back)."""
    (bucket_time, granularity, metric, dimension_type, dimension_value, count, sum_value, min_value, max_value,
     avg_value, p50, p95, p99, sketch, sketch_kind, fingerprint, sum_parts) = record  # fmt: skip
    return Row(
        to_ms(bucket_time), granularity, metric, dimension_type, dimension_value, count, sum_value, min_value,
        max_value, avg_value, p50, p95, p99, sketch, sketch_kind,
        exact.from_signed64(fingerprint) if fingerprint is not None else None,
        None if sum_parts is None else _parts_of(sum_parts),
    )  # fmt: skip


def _rows_json(rows: Sequence[Row]) -> str:
    """The parameter of :data:`_UPSERT`: each row as a JSON array in the order of ``_COLUMNS``."""
    return _json([
        [r.bucket_ms, r.granularity, r.metric_name, r.dimension_type, r.dimension_value, r.count,
         _finite(r.sum_value), r.min_value, r.max_value, _finite(r.avg_value), r.p50_value, r.p95_value, r.p99_value,
         _base64(r.sketch), r.sketch_kind, exact.to_signed64(r.fingerprint) if r.fingerprint is not None else None,
         None if r.sum_parts is None else _base64(_parts_bytes(r.sum_parts))]
        for r in rows
    ])  # fmt: skip


def _parts_bytes(parts: exact.ExactSum) -> bytes:
    """An exact sum's parts as the ``sum_parts`` columns store them: little-endian float64s."""
    return struct.pack(f"<{len(parts)}d", *parts)


def _parts_of(data: bytes) -> exact.ExactSum:
    return struct.unpack(f"<{len(data) // 8}d", data)


def _day_ms(column: str) -> str:
    """SQL of the UTC day start, in epoch milliseconds, of the timestamptz ``column``."""
    return f"(floor(extract(epoch FROM {column}) / 86400) * 86400000)::bigint"


def _json(rows: list[list[Any]]) -> str:
    return orjson.dumps(rows).decode()


def _base64(data: bytes | None) -> str | None:
    return None if data is None else binascii.b2a_base64(data, newline=False).decode()


def _finite(value: float | None) -> float | str | None:
    """A sum or average as JSON can carry it: one that overflowed to infinity goes as text (JSON
    writers put null there). Every other float of a row is finite: values are, and so are their
    minimum, maximum and quantiles."""
    return value if value is None or math.isfinite(value) else str(value)


class Store:
    """A pool of connections to the database of ``dsn``; ``async with Store.open(dsn)``."""

    def __init__(self, pool: asyncpg.Pool, redacted_dsn: str) -> None:
        self._pool = pool
        self._redacted = redacted_dsn

    @classmethod
    async def open(cls, dsn: str, redacted_dsn: str, max_size: int = 4) -> Store:
        try:
            # No JIT: these statements are index probes and batch upserts, whose cost estimates
            # pass jit_above_cost; compiling them took 150-200 ms a statement (measured).
            # No floor of connections (min_size 0): asyncpg restores a floor in the background and
            # logs every failed try of it with a 40-line traceback, five in a 20 s outage; the
            # flush's own warnings and error counter already tell of one. A first connection
            # says at once whether the database is there.
            pool = await asyncpg.create_pool(
                dsn, min_size=0, max_size=max_size, command_timeout=300, server_settings={"jit": "off"}
            )
            try:
                async with pool.acquire():
                    pass
            except BaseException:
                pool.terminate()
                raise
        except _DB_ERRORS as exc:
            # The message names the redacted DSN only: asyncpg's own may quote the password; the
            # server's (no such database, authentication failed) and the socket's do not. A DSN
            # asyncpg refuses (`sslmode=bogus`) says what is wrong, with any password taken out,
            # and trying again cannot help.
            misconfigured = isinstance(exc, asyncpg.ClientConfigurationError)
            said = f": {exc}" if isinstance(exc, asyncpg.PostgresError | OSError) else ""
            if misconfigured:
                said = f": {without_password(str(exc), dsn)}"
            raise StoreError(
                f"cannot connect to {redacted_dsn}: {type(exc).__name__}{said}", retriable=not misconfigured
            ) from None
        return cls(pool, redacted_dsn)

    async def close(self) -> None:
        await self._pool.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _fetch(self, what: str, sql: str, *args: Any, conn: asyncpg.Connection | None = None) -> list[asyncpg.Record]:
        """One statement's records on ``conn`` (a transaction's), else on a pooled connection; a
        database error becomes a StoreError saying ``what`` failed."""
        try:
            if conn is not None:
                return await conn.fetch(sql, *args)
            async with self._pool.acquire() as own:
                return await own.fetch(sql, *args)
        except _DB_ERRORS as exc:
            raise _wrap(f"{what} failed", exc) from exc

    async def _execute(self, what: str, sql: str, *args: Any, conn: asyncpg.Connection | None = None) -> str:
        """One statement's status (connection and errors as in :meth:`_fetch`)."""
        try:
            if conn is not None:
                return await conn.execute(sql, *args)
            async with self._pool.acquire() as own:
                return await own.execute(sql, *args)
        except _DB_ERRORS as exc:
            raise _wrap(f"{what} failed", exc) from exc

    @contextlib.asynccontextmanager
    async def rolling_up(self, series: Iterable[Series]) -> AsyncIterator[asyncpg.Connection]:
        """A transaction holding the roll-up locks of ``series``, for reading their hour rows and
        writing their day and week rows from what it read.

        Without them, two workers rolling up one series could commit in the opposite order of
        their reads: the one that read before the other's flush of a new hour would write last,
        and the day would miss that hour for good. Under the locks the last writer read last,
        after every flush whose roll-up came before it."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await _lock(conn, map(series_lock_id, series))
                yield conn
        except _DB_ERRORS as exc:
            raise _wrap("rolling up failed", exc) from exc

    # -- schema ------------------------------------------------------------------------------
    async def migrate(self) -> list[str]:
        """Apply the versioned SQL files not applied yet, in order; returns their names."""
        files = sorted(
            (entry.name, entry.read_text())
            for entry in resources.files("streamagg.migrations").iterdir()
            if entry.name.endswith(".sql")
        )
        applied: list[str] = []
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                await conn.execute("CREATE SCHEMA IF NOT EXISTS observability")
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS observability.schema_migrations "
                    "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = {r["name"] for r in await conn.fetch("SELECT name FROM observability.schema_migrations")}
                for name, sql in files:
                    if name in done:
                        continue
                    log.info("applying migration %s", name)
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO observability.schema_migrations (name) VALUES ($1)", name)
                    applied.append(name)
        except _DB_ERRORS as exc:
            raise _wrap("migration failed", exc) from exc
        return applied

    # -- writes ------------------------------------------------------------------------------
    async def upsert_rows(self, rows: Sequence[Row], conn: asyncpg.Connection | None = None) -> WriteResult:
        """Write final rows (any granularity) in one statement; unchanged evidence is left alone."""
        if not rows:
            return WriteResult()
        if conn is None:
            try:
                async with self._pool.acquire() as own, own.transaction():
                    return await self.upsert_rows(rows, own)
            except _DB_ERRORS as exc:
                raise _wrap("upsert failed", exc) from exc
        records = await conn.fetch(_UPSERT, _rows_json(rows))
        inserted = sum(1 for r in records if r["inserted"])
        return WriteResult(inserted, len(records) - inserted, len(rows) - len(records))

    async def write_partials(
        self, partition: int, partials: Sequence[tuple[Key, Agg]], source_offset: int = -1
    ) -> WriteResult:
        """Overwrite one source partition's partial aggregates (see :meth:`write_partials_of`)."""
        return await self.write_partials_of([(partition, source_offset, partials)])

    async def write_partials_of(
        self,
        batches: Sequence[tuple[int, int, Sequence[tuple[Key, Agg]]]],
        retire: Sequence[Retire] = (),
        orphans: Sequence[Key] = (),
        dry_run: bool = False,
        queued_by: str | None = None,
    ) -> WriteResult:
        """Overwrite partial aggregates of closed hours of several source partitions and, in the
        same transaction, re-derive the final hour rows of the touched keys from all partitions
        (once per key, however many of the given partitions touched it).

        Each batch is ``(partition, source_offset, partials)``; ``source_offset`` is the partition
        offset the partials include, and a stored partial that includes more (a newer owner's)
        is left alone.

        A backfill also passes ``retire`` (stored partials its replay found nothing for) and
        ``orphans`` (keys whose final hour row it did not produce): a key of either that is left
        without partials loses its final hour row, so a rebuilt hour holds exactly what the
        replay found. ``dry_run`` rolls the transaction back: the result says what would change.

        ``queued_by`` (a worker, a backfill) owes the roll-up of the written hours: they go into
        the roll-up queue in the same transaction, until :meth:`rolled_up` says it is done.
        """
        batches = [batch for batch in batches if batch[2]]
        if not batches and not retire and not orphans:
            return WriteResult()
        # What this call writes, by key and partition, each sketch serialised once and before
        # taking the locks, which other writers of these keys wait for.
        own: dict[Key, dict[int, tuple[Agg, bytes | None]]] = {}
        entries: list[tuple[Key, int]] = []  # (key, partition) of each input row, in column order
        rows: list[list[Any]] = []  # the statement's input rows, batch by batch
        for partition, offset, partials in batches:
            sketches = [agg.sketch.serialize() if agg.sketch is not None else None for _, agg in partials]
            rows.extend(_partial_rows(partition, partials, offset, sketches))
            for (key, agg), data in zip(partials, sketches, strict=True):
                own.setdefault(key, {})[partition] = (agg, data)
                entries.append((key, partition))
        written = set(own)
        candidates = {r.key for r in retire} | set(orphans)
        keys = sorted(written | candidates, key=repr)
        try:
            async with self._pool.acquire() as conn:
                transaction = conn.transaction()
                await transaction.start()
                try:
                    result = await self._write_partials(
                        conn, keys, own, entries, _json(rows), retire, candidates - written
                    )
                    if queued_by is not None:
                        await conn.execute(_QUEUE_ROLLUPS, sorted({to_datetime(key[0]) for key in keys}), queued_by)
                except BaseException:
                    await transaction.rollback()
                    raise
                await (transaction.rollback() if dry_run else transaction.commit())
                return result
        except _DB_ERRORS as exc:
            raise _wrap("writing partials failed", exc) from exc

    async def _write_partials(
        self,
        conn: asyncpg.Connection,
        keys: Sequence[Key],
        own: dict[Key, dict[int, tuple[Agg, bytes | None]]],
        entries: Sequence[tuple[Key, int]],
        partial_rows: str,
        retire: Sequence[Retire],
        may_vanish: set[Key],
    ) -> WriteResult:
        await _lock(conn, map(key_lock_id, keys))  # writers of one key (other partitions, workers) queue here
        if retire:
            await conn.execute(
                _RETIRE_PARTIALS, *_key_columns([r.key for r in retire]), [r.partition for r in retire],
                [r.up_to_offset for r in retire],
            )  # fmt: skip
        others: dict[Key, list[tuple[int, Agg]]] = {}
        for record in await conn.fetch(_WRITE_PARTIALS, partial_rows, *_key_columns(sorted(may_vanish, key=repr))):
            fenced = record["fenced"]
            if fenced is not None:  # a stored partial includes more: it is read as an other one
                key, partition = entries[fenced - 1]
                del own[key][partition]
                continue
            key = _record_key(record)
            others.setdefault(key, []).append((record["source_partition"], _agg_from_partial(record, key)))
        rows: dict[Key, Row | None] = {}
        unmerged: list[Key] = []
        for key in keys:
            try:
                rows[key] = _final_row(key, own.get(key, {}), others.get(key, []))
            except SketchKindsMismatch:  # partials of two sketch kinds past exact mode: the row stays as it is
                unmerged.append(key)
        warn_unmerged("hour", unmerged)
        result = await self.upsert_rows([row for row in rows.values() if row is not None], conn)
        result += WriteResult(unmerged=len(unmerged))
        gone = sorted((key for key in may_vanish if key in rows and rows[key] is None), key=repr)
        if gone:
            status = await conn.execute(_DELETE_HOUR_ROWS, *_key_columns(gone))
            result += WriteResult(deleted=int(status.split()[-1]))
        return result

    async def rolled_up(self, queued_by: str | None = None, ids: Sequence[int] = ()) -> None:
        """Owed roll-ups are done: every queued hour of ``queued_by``, and the queue rows ``ids``."""
        await self._execute(
            "clearing the roll-up queue", f"DELETE FROM {ROLLUP_QUEUE} WHERE queued_by = $1 OR id = ANY($2::bigint[])",
            queued_by, list(ids),
        )  # fmt: skip

    async def owed_rollups(self, exclude: str, queued_by_like: str = "%") -> dict[int, list[int]]:
        """The hours (epoch ms) other workers than ``exclude`` (or backfills: ``queued_by_like``
        a LIKE pattern of the queuers) queued and did not roll up yet, each with its queue rows."""
        records = await self._fetch(
            "reading the roll-up queue", f"SELECT hour, id FROM {ROLLUP_QUEUE} WHERE queued_by <> $1 AND queued_by LIKE $2",
            exclude, queued_by_like,
        )  # fmt: skip
        owed: dict[int, list[int]] = {}
        for record in records:
            owed.setdefault(to_ms(record["hour"]), []).append(record["id"])
        return owed

    async def hour_keys_at(self, hours: Sequence[int]) -> list[Key]:
        """The keys of every stored hour row of the given hours (epoch ms)."""
        records = await self._fetch(
            "reading hour keys",
            f"SELECT bucket_time, metric_name, dimension_type, dimension_value FROM {TABLE} "
            "WHERE granularity = 'hour' AND bucket_time = ANY($1::timestamptz[])",
            [to_datetime(hour) for hour in hours],
        )  # fmt: skip
        return [_record_key(record) for record in records]

    async def series_with_rows(self, granularity: Granularity, bucket_ms: int) -> list[Series]:
        """The series that have a row of ``granularity`` at the bucket starting at ``bucket_ms``."""
        records = await self._fetch(
            "reading series", f"SELECT metric_name, dimension_type, dimension_value FROM {TABLE} "
            "WHERE granularity = $1 AND bucket_time = $2", granularity, to_datetime(bucket_ms),
        )  # fmt: skip
        return [(r[0], r[1], r[2]) for r in records]

    async def delete_rollups_without_hours(
        self, granularity: Granularity, keys: Sequence[Key], conn: asyncpg.Connection | None = None
    ) -> int:
        """Delete the given day or week rows whose series has no hour row inside their bucket any
        more (a backfill removed it); returns how many went."""
        if granularity == "hour":
            raise ValueError("hour rows are deleted with their partials (write_partials_of)")
        if not keys:
            return 0
        status = await self._execute(
            f"deleting {granularity} rows", _DELETE_ROLLUPS_WITHOUT_HOURS, granularity,
            width_ms(granularity), *_key_columns(keys), conn=conn,
        )  # fmt: skip
        return int(status.split()[-1])

    async def delete_rollups_without_hours_between(self, granularity: Granularity, start_ms: int, end_ms: int) -> int:
        """Delete the day or week rows of buckets starting in [start, end) whose series has no
        hour row inside the bucket (hours deleted by hand, say); returns how many went."""
        if granularity == "hour":
            raise ValueError("hour rows are deleted with their partials (write_partials_of)")
        status = await self._execute(
            f"deleting {granularity} rows", _DELETE_ROLLUPS_WITHOUT_HOURS_BETWEEN, granularity,
            width_ms(granularity), to_datetime(start_ms), to_datetime(end_ms),
        )  # fmt: skip
        return int(status.split()[-1])

    async def analyze(self) -> None:
        """Refresh the planner's statistics of the final rows and the partials after a bulk write
        (a backfill, a worker's first flushes): planned on a near-empty table's statistics, every
        roll-up batch scanned the whole table (measured: 0.6 s instead of 20 ms a batch, until
        autovacuum got to it).

        Only the key columns, which the planner's estimates of those lookups read: the value
        columns (sketches above all) cost half of its time, 240 -> 140 ms over bench/throughput's
        rows (measured). A column list also leaves the tables' counts of changed rows as they
        were, so autovacuum's full analyze still comes."""
        await self._execute(
            "analyze", f"ANALYZE {TABLE} (granularity, {_KEY_COLUMNS}), {PARTIALS} ({_KEY_COLUMNS}, source_partition)"
        )

    # -- reads -------------------------------------------------------------------------------
    async def stored_hour_keys(self, start_ms: int, end_ms: int) -> tuple[set[Key], set[tuple[Key, int]]]:
        """What is stored for the hours in [start, end): the keys of final hour rows, and
        (key, source partition) of every partial."""
        try:
            async with self._pool.acquire() as conn:
                finals = await conn.fetch(
                    f"SELECT bucket_time, metric_name, dimension_type, dimension_value FROM {TABLE} "
                    "WHERE granularity = 'hour' AND bucket_time >= $1 AND bucket_time < $2",
                    to_datetime(start_ms), to_datetime(end_ms),
                )  # fmt: skip
                partials = await conn.fetch(
                    "SELECT bucket_time, metric_name, dimension_type, dimension_value, source_partition "
                    f"FROM {PARTIALS} WHERE bucket_time >= $1 AND bucket_time < $2",
                    to_datetime(start_ms), to_datetime(end_ms),
                )  # fmt: skip
        except _DB_ERRORS as exc:
            raise _wrap("reading stored keys failed", exc) from exc
        return (
            {(to_ms(r[0]), r[1], r[2], r[3]) for r in finals},
            {((to_ms(r[0]), r[1], r[2], r[3]), r[4]) for r in partials},
        )

    async def fetch_rows(
        self,
        granularity: Granularity,
        start_ms: int,
        end_ms: int,
        metric: str | None = None,
    ) -> list[Row]:
        """Rows of one granularity with ``start <= bucket_time < end``, optionally of one metric."""
        sql = f"SELECT {_COLUMNS} FROM {TABLE} WHERE granularity = $1 AND bucket_time >= $2 AND bucket_time < $3"
        args: list[Any] = [granularity, to_datetime(start_ms), to_datetime(end_ms)]
        if metric is not None:
            sql += " AND metric_name = $4"
            args.append(metric)
        return [_row_from_record(r) for r in await self._fetch("reading rows", sql, *args)]

    async def fetch_rows_of(
        self, granularity: Granularity, start_ms: int, end_ms: int, series: Sequence[Series],
        conn: asyncpg.Connection | None = None, but: tuple[int, int] = (0, 0),
    ) -> list[Row]:
        """The rows of one granularity in [start, end), less those in the range ``but``, of the
        given (metric, dimension type, dimension value) series, in time order (the order a
        roll-up merges them in).

        One probe of the series index per series (:data:`_SERIES_ROWS`); the granularity is
        written into the statement, one prepared statement each (as a parameter, the plan
        PostgreSQL settles on after a few runs took up to 0.6 s for a batch of 1,000 series on a
        table not analysed yet, against 4 ms planned for each value: measured)."""
        if granularity not in ("hour", "day", "week"):
            raise ValueError(f"unknown granularity {granularity!r}")
        sql = f"SELECT {_T_COLUMNS} FROM {_SERIES_ROWS.format(granularity=granularity)} ORDER BY t.bucket_time"
        records = await self._fetch(
            f"reading {granularity} rows", sql, to_datetime(start_ms), to_datetime(end_ms),
            [s[0] for s in series], [s[1] for s in series], [s[2] for s in series], *map(to_datetime, but), conn=conn,
        )  # fmt: skip
        return [_row_from_record(record) for record in records]

    async def hour_evidence_by_day(
        self, start_ms: int, end_ms: int, series: Sequence[Series], conn: asyncpg.Connection | None = None,
        but: tuple[int, int] = (0, 0),
    ) -> dict[Key, tuple[int, int | None]]:
        """Per UTC day in [start, end), less the range ``but``, and given series with hour rows
        there, keyed like its day row: the hours' total count and combined fingerprint (None for
        a count metric), which a day row rolled up from exactly those hours holds. Summed in
        PostgreSQL: no hour row comes back."""
        records = await self._fetch(
            "reading hour totals",
            f"SELECT {_day_ms('t.bucket_time')}, t.metric_name, t.dimension_type, t.dimension_value, "
            "sum(t.count), sum(t.value_fingerprint::numeric) "
            f"FROM {_SERIES_ROWS.format(granularity='hour')} GROUP BY 1, 2, 3, 4",
            to_datetime(start_ms), to_datetime(end_ms), [s[0] for s in series], [s[1] for s in series],
            [s[2] for s in series], *map(to_datetime, but), conn=conn,
        )  # fmt: skip
        return {(r[0], r[1], r[2], r[3]): (int(r[4]), None if r[5] is None else int(r[5]) % 2**64) for r in records}

    async def has_hour_rows(
        self, start_ms: int, end_ms: int, but: tuple[int, int], conn: asyncpg.Connection | None = None
    ) -> bool:
        """Whether any hour row lies in [start, end), less the range ``but``: the unique key's
        time order, probed either side of ``but``, stops at the first (with both sides in one
        condition, PostgreSQL read the whole table where there was none)."""
        probe = f"SELECT 1 FROM {TABLE} WHERE granularity = 'hour' AND bucket_time >= {{0}} AND bucket_time < {{1}}"
        records = await self._fetch(
            "looking for hour rows",
            f"SELECT EXISTS ({probe.format('$1::timestamptz', 'least($2::timestamptz, $3::timestamptz)')}) "
            f"OR EXISTS ({probe.format('greatest($1::timestamptz, $4::timestamptz)', '$2::timestamptz')})",
            *map(to_datetime, (start_ms, end_ms, *but)), conn=conn,
        )  # fmt: skip
        return bool(records[0][0])

    async def row_totals(self, granularity: Granularity, start_ms: int, end_ms: int) -> tuple[int, int]:
        """How many rows of one granularity lie in [start, end), and the sum of their counts:
        a cheap progress probe (one row back) for who waits for a worker's rows."""
        record = (await self._fetch(
            "counting rows", f"SELECT count(*), coalesce(sum(count), 0) FROM {TABLE} "
            "WHERE granularity = $1 AND bucket_time >= $2 AND bucket_time < $3",
            granularity, to_datetime(start_ms), to_datetime(end_ms),
        ))[0]  # fmt: skip
        return record[0], int(record[1])

    async def fetch_row_keys(
        self,
        metric: str,
        dimension_type: str | None,
        dimension_value: str | None,
        ranges: Sequence[tuple[Granularity, int, int]],
    ) -> list[RowKey]:
        """Which rows of one slice are stored in the (granularity, start, end) ranges, without
        reading them: the global slice when ``dimension_type`` is None, every value of the type
        when only ``dimension_value`` is None, else one series. Bucket times come as epoch ms
        in one array per series and granularity: half the time of a record per row."""
        condition, slice_args = _slice_condition(dimension_type, dimension_value, first_param=5)
        sql = (
            "SELECT t.granularity, t.dimension_value, "
            "array_agg((extract(epoch FROM t.bucket_time) * 1000)::bigint) AS buckets_ms "
            "FROM unnest($2::text[], $3::timestamptz[], $4::timestamptz[]) AS r(g, start_time, end_time) "
            f"JOIN {TABLE} t "
            "ON t.granularity = r.g AND t.bucket_time >= r.start_time AND t.bucket_time < r.end_time "
            f"WHERE t.metric_name = $1 AND {condition} GROUP BY t.granularity, t.dimension_value"
        )
        records = await self._fetch(
            "reading row keys", sql, metric, [r[0] for r in ranges],
            [to_datetime(r[1]) for r in ranges], [to_datetime(r[2]) for r in ranges], *slice_args,
        )  # fmt: skip
        return [(r["granularity"], bucket, r["dimension_value"]) for r in records for bucket in r["buckets_ms"]]

    async def fetch_rows_by_keys(self, metric: str, dimension_type: str | None, keys: Sequence[RowKey]) -> list[Row]:
        """The rows of one metric and dimension type (None: the global slice) with these keys."""
        sql = (
            f"SELECT {_T_COLUMNS} "
            f"FROM unnest($2::text[], $3::timestamptz[], $4::text[]) AS k(g, b, dv) JOIN {TABLE} t "
            "ON t.metric_name = $1 AND coalesce(t.dimension_type, '') = coalesce($5::text, '') "
            "AND coalesce(t.dimension_value, '') = coalesce(k.dv, '') AND t.granularity = k.g AND t.bucket_time = k.b"
        )
        records = await self._fetch(
            "reading rows", sql, metric, [k[0] for k in keys], [to_datetime(k[1]) for k in keys],
            [k[2] for k in keys], dimension_type,
        )  # fmt: skip
        return [_row_from_record(r) for r in records]

    async def hour_series_days(self, start_ms: int, end_ms: int) -> list[Key]:
        """Every series with an hour row in [start, end), once per UTC day it has one in, as
        (day start ms, metric, dimension type, dimension value): what a roll-up of the range does."""
        records = await self._fetch(
            "reading hour series",
            f"SELECT DISTINCT {_day_ms('bucket_time')}, metric_name, dimension_type, dimension_value FROM {TABLE} "
            "WHERE granularity = 'hour' AND bucket_time >= $1 AND bucket_time < $2",
            to_datetime(start_ms), to_datetime(end_ms),
        )  # fmt: skip
        return [(r[0], r[1], r[2], r[3]) for r in records]

    async def revisions(self) -> dict[tuple[datetime, str, str, str | None, str | None], int]:
        """Every row's revision by its unique key (for checks and tests)."""
        async with self._pool.acquire() as conn:
            records = await conn.fetch(
                f"SELECT bucket_time, granularity, metric_name, dimension_type, dimension_value, revision FROM {TABLE}"
            )
        return {tuple(r.values())[:5]: r["revision"] for r in records}  # type: ignore[misc]

    async def execute(self, sql: str, *args: Any) -> str:
        """Run one statement (tests and maintenance)."""
        async with self._pool.acquire() as conn:
            return await conn.execute(sql, *args)


def warn_unmerged(granularity: Granularity, keys: Sequence[Key]) -> None:
    """One line for the rows a write left as they were because their parts hold sketches of two
    kinds, both past exact mode (STREAMAGG_SKETCH_KIND(S) changed while they were filling)."""
    if keys:
        log.warning(
            "%d %s rows left as they were: their parts hold sketches of different kinds past exact mode, which "
            "never merge (first: %s); a backfill of their hours under one kind rebuilds them",
            len(keys), granularity, f"{rfc3339(keys[0][0])} {keys[0][1]} {keys[0][2]}={keys[0][3]}",
        )  # fmt: skip


def _record_key(record: asyncpg.Record) -> Key:
    return (to_ms(record["bucket_time"]), record["metric_name"], record["dimension_type"], record["dimension_value"])


def _final_row(key: Key, own: dict[int, tuple[Agg, bytes | None]], others: list[tuple[int, Agg]]) -> Row | None:
    """The final hour row of ``key``: the merge of every partition's partial, in partition order
    (``own``: the partials just written, by partition; ``others``: the stored ones).

    Most keys (a user's hour) have one partition's partial, the one just written: its row comes
    straight from the in-memory aggregate and its already serialised sketch.
    """
    if len(own) == 1 and not others:
        (agg, data), = own.values()
        return agg.to_row(key, "hour", sketch_bytes=data)
    pieces = sorted([(p, agg) for p, (agg, _) in own.items()] + others, key=lambda piece: piece[0])
    if not pieces:
        return None
    return Agg.merged([agg for _, agg in pieces]).to_row(key, "hour")


def _slice_condition(
    dimension_type: str | None, dimension_value: str | None, first_param: int
) -> tuple[str, list[str]]:
    """SQL condition on ``t`` selecting one slice, each form matching an index: the global slice
    and one type's values by (metric, granularity, dimension_type, bucket_time); one series by the
    coalesce expressions of the series index ('' stands for NULL: no type or value of a typed
    slice is NULL, and no type is '')."""
    if dimension_type is None:
        return "t.dimension_type IS NULL", []
    if dimension_value is None:
        return f"t.dimension_type = ${first_param}", [dimension_type]
    return (
        f"coalesce(t.dimension_type, '') = ${first_param} AND coalesce(t.dimension_value, '') = ${first_param + 1}",
        [dimension_type, dimension_value],
    )


def _key_columns(keys: Sequence[Key]) -> list[list[Any]]:
    return [[to_datetime(k[0]) for k in keys], [k[1] for k in keys], [k[2] for k in keys], [k[3] for k in keys]]


def _partial_rows(
    partition: int, partials: Sequence[tuple[Key, Agg]], source_offset: int, sketches: Sequence[bytes | None]
) -> list[list[Any]]:
    """Input rows of :data:`_WRITE_PARTIALS` (JSON arrays) of one partition's partials."""
    rows = []
    for (key, agg), sketch in zip(partials, sketches, strict=True):
        if agg.sketch is None:  # a count metric
            rows.append([*key, partition, agg.count, None, None, None, None, None, None, source_offset])
        else:
            rows.append([*key, partition, agg.count, _base64(_parts_bytes(agg.total)), agg.min, agg.max,
                         _base64(sketch), str(agg.sketch.kind), exact.to_signed64(agg.fingerprint),
                         source_offset])  # fmt: skip
    return rows


def _agg_from_partial(record: asyncpg.Record, key: Key) -> Agg:
    """The aggregate of a stored partial, its exact sum from the stored parts."""
    fingerprint, sketch = record["value_fingerprint"], record["sketch"]
    agg = Agg.from_stored(
        record["count"], None, record["min_value"], record["max_value"], bytes(sketch) if sketch is not None else None,
        record["sketch_kind"], exact.from_signed64(fingerprint) if fingerprint is not None else None, key,
    )  # fmt: skip
    if agg.sketch is not None:
        agg.total = exact.exact_sum(_parts_of(record["sum_parts"] or b""))
    return agg
