"""In-memory aggregate state: batch ingest, rows, merges. Pure, no I/O.

State is keyed by ``(hour_ms, metric, dimension_type, dimension_value)``; the global slice
has both dimension fields ``None``. Each key holds an :class:`Agg`: count, and for "full"
metrics the exact sum, min, max, a multiset fingerprint and a quantile sketch.

Ingest goes per (metric, slice): a metric's values and their fingerprints are computed once
for the batch (numpy), the batch's rows are grouped by key with one dict pass, and each key
gets one update with its group's values (most groups hold one or two values, where plain
Python beats numpy's per-call cost).
"""

from __future__ import annotations

import functools
import math
import struct
from collections import Counter, defaultdict
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from sketches import Kind, Sketch, SketchError, SketchKindMismatch

from . import exact
from .buckets import HOUR_MS, Granularity, bucket_start_ms
from .catalogue import METRICS_BY_KIND, METRICS_BY_NAME, OVERFLOW_VALUE, Metric
from .errors import StateError
from .events import Event

Key = tuple[int, str, str | None, str | None]  # (bucket start ms, metric, dimension type, value)
QUANTILE_RANKS = (0.5, 0.95, 0.99)


@dataclass(slots=True, unsafe_hash=True)
class Row:
    """One row of ``observability.metrics_aggregates``, less revision and updated_at.

    Treated as immutable (hashable by value), but not ``frozen``: a frozen dataclass sets each
    field through ``object.__setattr__``, 1.57 us a row against 0.20 (measured), and a flush,
    a roll-up and every read build one per row."""

    bucket_ms: int
    granularity: Granularity
    metric_name: str
    dimension_type: str | None
    dimension_value: str | None
    count: int
    sum_value: float | None = None
    min_value: float | None = None
    max_value: float | None = None
    avg_value: float | None = None
    p50_value: float | None = None
    p95_value: float | None = None
    p99_value: float | None = None
    sketch: bytes | None = None
    sketch_kind: str | None = None
    fingerprint: int | None = None  # unsigned 64-bit multiset fingerprint of the values
    # A day or week row's exact sum of its hours' sums (exact.ExactSum: sum_value is its rounded
    # value), so a week merged from days adds exactly what one merged from hours adds. None on
    # hour rows (their sum_value is exact) and count rows; not part of the row's value.
    sum_parts: tuple[float, ...] | None = field(default=None, compare=False)

    @property
    def key(self) -> Key:
        return (self.bucket_ms, self.metric_name, self.dimension_type, self.dimension_value)


class Summary(NamedTuple):
    """What a full aggregate reports: the correctly rounded exact sum, extremes, mean, p50/p95/p99.
    A named tuple, made for every row written: 0.27 us against 0.82 for a frozen dataclass."""

    sum: float
    min: float
    max: float
    avg: float
    p50: float
    p95: float
    p99: float


@dataclass(frozen=True, slots=True)
class _Values:
    """A full metric's values in a batch (float64, -0.0 as 0.0) and their fingerprints, by position."""

    floats: list[float]
    fingerprints: list[int]


class SketchKindsMismatch(StateError):
    """Aggregates whose sketches are of two kinds, both past exact mode: they never merge."""


class Agg:
    """Running statistics of one key. Count metrics use ``count`` only (``sketch`` is None)."""

    __slots__ = ("count", "total", "min", "max", "fingerprint", "sketch")

    def __init__(self, kind: Kind | None) -> None:
        self.count = 0
        self.total: exact.ExactSum = exact.ZERO
        self.min = math.inf
        self.max = -math.inf
        self.fingerprint = 0
        self.sketch = Sketch(kind) if kind is not None else None

    @property
    def is_full(self) -> bool:
        return self.sketch is not None

    def add(self, value: float, fingerprint: int) -> None:
        """Fold one value in (most keys get one a batch): :meth:`add_group` without its list work."""
        self.count += 1
        if self.sketch is None:
            return
        self.total = exact.add_one(self.total, value)
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.fingerprint = exact.combine_fingerprints(self.fingerprint, fingerprint)
        self.sketch.update(value)

    def add_group(self, values: list[float], fingerprint: int) -> None:
        """Fold one batch group in: its values, in order, and the sum of their :func:`exact.fingerprints`."""
        self.count += len(values)
        if self.sketch is None:
            return
        self.total = exact.add(self.total, values)
        self.min = min(self.min, *values)
        self.max = max(self.max, *values)
        self.fingerprint = exact.combine_fingerprints(self.fingerprint, fingerprint)
        self.sketch.update_many(values)

    def merge(self, other: Agg) -> None:
        if (self.sketch is None) != (other.sketch is None):
            raise StateError("cannot merge a count aggregate with a full one")
        if self.sketch is not None and other.sketch is not None:
            try:  # first: a refused merge leaves this aggregate as it was
                self.sketch.merge(other.sketch)
            except SketchKindMismatch as exc:
                raise SketchKindsMismatch(f"cannot merge aggregates: {exc}") from exc
            except SketchError as exc:
                raise StateError(f"cannot merge aggregates: {exc}") from exc
            self.total = exact.add(self.total, other.total)
            if other.min < self.min:
                self.min = other.min
            if other.max > self.max:
                self.max = other.max
            self.fingerprint = exact.combine_fingerprints(self.fingerprint, other.fingerprint)
        self.count += other.count

    def empty_like(self) -> Agg:
        """An empty aggregate of the same kind (to merge copies into)."""
        return Agg(self.sketch.kind if self.sketch is not None else None)

    @classmethod
    def merged(cls, parts: Sequence[Agg], into_first: bool = False) -> Agg:
        """A new aggregate of all of ``parts`` (at least one), merged in order; the parts stay as
        they were, unless ``into_first`` lets the first one take the others (throwaway parts:
        no copy). Parts of several sketch kinds go past-exact-mode first, so the merge does not
        depend on their order: it fails (:class:`SketchKindsMismatch`) only if two kinds hold
        parts past exact mode; exact parts of the others join as their values."""
        if len({part.sketch.kind for part in parts if part.sketch is not None}) > 1:
            parts = sorted(parts, key=lambda part: part.sketch is not None and part.sketch.is_exact)
        out = parts[0] if into_first else parts[0].empty_like()
        for part in parts[1:] if into_first else parts:
            out.merge(part)
        return out

    def summary(self) -> Summary | None:
        """The reported statistics of a full aggregate; None for a count aggregate."""
        if self.sketch is None:
            return None
        if self.count == 1:  # most keys (a user's hour): every statistic is the one value, no sketch read
            value = self.min
            return Summary(value, value, value, value, value, value, value)
        total = exact.rounded(self.total)
        # Every quantile lies within the exact [min, max]; a REQ sketch's float32 items do not
        # (one event of 0.1 read 0.10000000149): clamped, a single event's percentiles are its value.
        low, high = self.min, self.max
        p50, p95, p99 = [min(max(q, low), high) for q in self.sketch.quantiles(QUANTILE_RANKS)]
        return Summary(total, low, high, total / self.count, p50, p95, p99)

    def to_row(self, key: Key, granularity: Granularity, sketch_bytes: bytes | None = None) -> Row:
        """The row of this aggregate; ``sketch_bytes``, when given, are its sketch already serialised."""
        bucket_ms, metric, dimension_type, dimension_value = key
        if self.sketch is None:
            return Row(bucket_ms, granularity, metric, dimension_type, dimension_value, self.count)
        summary = self.summary()
        assert summary is not None
        return Row(
            bucket_ms,
            granularity,
            metric,
            dimension_type,
            dimension_value,
            self.count,
            sum_value=summary.sum,
            min_value=summary.min,
            max_value=summary.max,
            avg_value=summary.avg,
            p50_value=summary.p50,
            p95_value=summary.p95,
            p99_value=summary.p99,
            sketch=self.sketch.serialize() if sketch_bytes is None else sketch_bytes,
            sketch_kind=str(self.sketch.kind),
            fingerprint=self.fingerprint,
            sum_parts=None if granularity == "hour" else self.total,
        )

    @classmethod
    def from_row(cls, row: Row) -> Agg:
        """An aggregate equivalent to a stored row (for roll-ups and range queries): its sum the
        row's exact sum of hour sums where it has one, else its sum_value."""
        agg = cls.from_stored(
            row.count, row.sum_value, row.min_value, row.max_value, row.sketch, row.sketch_kind, row.fingerprint, row.key
        )
        parts = row.sum_parts
        if parts is not None and agg.sketch is not None and exact.rounded(parts) == (row.sum_value or 0.0):
            agg.total = parts
        return agg

    @classmethod
    def from_stored(
        cls,
        count: int,
        sum_value: float | None,
        min_value: float | None,
        max_value: float | None,
        sketch: bytes | None,
        sketch_kind: str | None,
        fingerprint: int | None,
        key: Key | None = None,
    ) -> Agg:
        """An aggregate from stored columns (a count aggregate when there is no sketch); ``key``
        names the row in the error about an unreadable sketch."""
        if sketch is None or sketch_kind is None:
            agg = cls(None)
            agg.count = count
            return agg
        agg = cls.__new__(cls)
        agg.count = count
        agg.total = exact.exact_sum([sum_value or 0.0])
        agg.min = min_value if min_value is not None else float("inf")
        agg.max = max_value if max_value is not None else float("-inf")
        agg.fingerprint = fingerprint or 0
        try:
            agg.sketch = Sketch.deserialize(sketch_kind, sketch)
        except SketchError as exc:
            raise StateError(f"row {key} has an unreadable sketch: {exc}") from exc
        return agg

    # -- checkpoint bytes ----------------------------------------------------------------------
    # Layout (little-endian), version 1:
    #   0  u8   version (1)
    #   1  u8   flags: bit 0 = full aggregate (the fields below the count follow)
    #   2  u64  count
    # full aggregates only:
    #  10  f64  min
    #  18  f64  max
    #  26  u64  fingerprint
    #  34  u8   number of exact-sum parts P
    #  35  u8   length of the sketch kind text L
    #  36  P * f64 exact-sum parts, then L bytes of ASCII kind, then the sketch's DataSketches bytes
    _HEAD = struct.Struct("<BBQ")
    _FULL = struct.Struct("<ddQBB")
    _VERSION = 1

    def encode(self) -> bytes:
        sketch = self.sketch
        if sketch is None:
            return self._HEAD.pack(self._VERSION, 0, self.count)
        total = self.total
        kind = _kind_bytes(sketch.kind)
        head = _full_head(len(total)).pack(
            self._VERSION, 1, self.count, self.min, self.max, self.fingerprint, len(total), len(kind), *total
        )
        return head + kind + sketch.serialize()

    @classmethod
    def decode(cls, data: bytes) -> Agg:
        try:
            version, flags, count = cls._HEAD.unpack_from(data, 0)
            if version != cls._VERSION:
                raise StateError(f"aggregate bytes of unknown version {version}")
            agg = cls.__new__(cls)
            agg.count = count
            if not flags & 1:
                agg.total, agg.min, agg.max, agg.fingerprint, agg.sketch = exact.ZERO, float("inf"), float("-inf"), 0, None
                if len(data) != cls._HEAD.size:
                    raise StateError(f"count aggregate of {len(data)} bytes, expected {cls._HEAD.size}")
                return agg
            offset = cls._HEAD.size
            agg.min, agg.max, agg.fingerprint, n_parts, kind_len = cls._FULL.unpack_from(data, offset)
            offset += cls._FULL.size
            agg.total = struct.unpack_from(f"<{n_parts}d", data, offset)
            offset += 8 * n_parts
            kind = bytes(data[offset : offset + kind_len]).decode("ascii")
            offset += kind_len
            agg.sketch = Sketch.deserialize(kind, bytes(data[offset:]))
        except (struct.error, UnicodeDecodeError, SketchError) as exc:
            raise StateError(f"corrupt aggregate bytes: {exc}") from exc
        if agg.sketch.n != agg.count:
            raise StateError(f"corrupt aggregate bytes: count {agg.count} but sketch holds {agg.sketch.n}")
        return agg


@functools.lru_cache(maxsize=None)
def _full_head(parts: int) -> struct.Struct:
    """:attr:`Agg._HEAD`, :attr:`Agg._FULL` and ``parts`` exact-sum parts as one struct: a full
    aggregate's fixed fields packed at once (its encoding 1.31 -> 1.06 us, measured)."""
    return struct.Struct(Agg._HEAD.format + Agg._FULL.format[1:] + f"{parts}d")


@functools.lru_cache(maxsize=64)
def _kind_bytes(kind: Kind) -> bytes:
    return str(kind).encode("ascii")


class AggregateState:
    """Hour aggregates of every (metric, slice), fed with batches of validated events.

    ``sketch_kinds`` names the sketch kind of each full metric. Past ``max_series_per_dimension``
    distinct values in one (hour, metric, dimension type), new values go to ``__overflow__``.
    Keys touched since the last :meth:`take_dirty` are reported by it.

    A key restored with :meth:`put_encoded` holds its :meth:`Agg.encode` bytes until it is first
    read: a restart restores every key of the lateness window (262,164 in bench/throughput's
    state: 1.7-1.9 s to decode), and most of them are never read again.
    """

    def __init__(self, sketch_kinds: Mapping[str, Kind], max_series_per_dimension: int) -> None:
        missing = [m.name for m in METRICS_BY_NAME.values() if m.is_full and m.name not in sketch_kinds]
        if missing:
            raise StateError(f"no sketch kind for {', '.join(missing)}")
        self._kinds = dict(sketch_kinds)
        self._max_series = max_series_per_dimension
        self._aggs: dict[Key, Agg | bytes] = {}  # bytes: restored, not read since (put_encoded)
        self._by_hour: defaultdict[int, set[Key]] = defaultdict(set)  # eviction goes by hour
        self._series: defaultdict[tuple[int, str, str], int] = defaultdict(int)
        self._dirty: set[Key] = set()
        # Events folded into ``__overflow__`` since the last take, by (metric, dimension type).
        self.overflow_events: Counter[tuple[str, str | None]] = Counter()
        self._accept: Callable[[Key], bool] | None = None

    def __len__(self) -> int:
        return len(self._aggs)

    def __contains__(self, key: Key) -> bool:
        return key in self._aggs

    def __getitem__(self, key: Key) -> Agg:
        agg = self._read(key)
        if agg is None:
            raise KeyError(key)
        return agg

    def _read(self, key: Key) -> Agg | None:
        """The aggregate of ``key``, decoded first if it was restored and not read since."""
        agg = self._aggs.get(key)
        if agg.__class__ is bytes:
            agg = self._aggs[key] = Agg.decode(agg)  # type: ignore[arg-type]
        return agg  # type: ignore[return-value]

    def keys(self) -> Iterable[Key]:
        return self._aggs.keys()

    def items(self) -> Iterable[tuple[Key, Agg]]:
        for key in [key for key, agg in self._aggs.items() if agg.__class__ is bytes]:
            self._read(key)
        return self._aggs.items()  # type: ignore[return-value]

    def held(self) -> Iterable[Agg | bytes]:
        """What each key holds: its aggregate, or the bytes of one restored and not read since
        (for the memory gauge, which must not decode them)."""
        return self._aggs.values()

    # -- ingest --------------------------------------------------------------------------------
    def ingest(self, events: Sequence[Event], accept: Callable[[Key], bool] | None = None) -> None:
        """Fold a batch of events (any kinds, any hours) into the state.

        ``accept``, when given, decides per key whether the batch's values for it are applied
        (recovery uses it to skip what a key's checkpoint already holds).
        """
        self._accept = accept
        by_kind: defaultdict[str, list[Event]] = defaultdict(list)
        for event in events:
            by_kind[event.kind].append(event)
        for kind, batch in by_kind.items():
            hours = [event.time_ms // HOUR_MS * HOUR_MS for event in batch]
            fields = [event.fields for event in batch]
            for metric in METRICS_BY_KIND[kind]:  # type: ignore[index]
                select = metric.select
                picked = [i for i, f in enumerate(fields) if select(f)]
                if picked:
                    self._ingest_metric(metric, [fields[i] for i in picked], [hours[i] for i in picked])

    def _ingest_metric(self, metric: Metric, fields: list[Mapping], hours: list[int]) -> None:
        values = None
        if metric.is_full:
            assert metric.value is not None
            array = np.array([metric.value(f) for f in fields], dtype=np.float64) + 0.0  # -0.0 -> 0.0
            values = _Values(array.tolist(), exact.fingerprints(array).tolist())
        for dimension_type in metric.dimension_types:
            groups = _positions_by_hour(hours) if dimension_type is None else _positions_by_value(hours, fields, dimension_type)
            self._apply_groups(metric, dimension_type, groups, values)

    def _apply_groups(
        self,
        metric: Metric,
        dimension_type: str | None,
        groups: dict[tuple[int, str | None], list[int]],
        values: _Values | None,
    ) -> None:
        """One update per key, in order of first appearance (the order series count towards the cap)."""
        redirected = 0
        aggs, dirty, name, accept = self._aggs, self._dirty, metric.name, self._accept
        for (hour, value), positions in groups.items():
            key = (hour, name, dimension_type, value)
            agg = aggs.get(key)
            if agg is None or agg.__class__ is bytes or accept is not None:  # not the usual key held and read
                agg, overflowed = self._agg_for(metric, hour, dimension_type, value)
                if agg is None:
                    continue
                if overflowed:
                    redirected += len(positions)
            else:
                dirty.add(key)
            if values is None:
                agg.count += len(positions)
            elif len(positions) == 1:
                agg.add(values.floats[positions[0]], values.fingerprints[positions[0]])
            else:
                floats, fingerprints = values.floats, values.fingerprints
                agg.add_group([floats[p] for p in positions], sum([fingerprints[p] for p in positions]))
        if redirected:
            self.overflow_events[(metric.name, dimension_type)] += redirected

    def _agg_for(self, metric: Metric, hour: int, dimension_type: str | None, value: str | None) -> tuple[Agg | None, bool]:
        """The aggregate of a series, and whether the series went to ``__overflow__`` (past the cap of
        distinct values); None when ``accept`` refuses the key."""
        name = metric.name
        key = (hour, name, dimension_type, value)
        agg = self._read(key)
        overflowed = False
        if (
            agg is None
            and dimension_type is not None
            and value != OVERFLOW_VALUE
            and self._series[(hour, name, dimension_type)] >= self._max_series
        ):
            key = (hour, name, dimension_type, OVERFLOW_VALUE)
            agg = self._read(key)
            overflowed = True
        if self._accept is not None and not self._accept(key):
            return None, overflowed
        if agg is None:
            if dimension_type is not None and key[3] != OVERFLOW_VALUE:
                self._series[(hour, name, dimension_type)] += 1
            agg = self._aggs[key] = Agg(self._kinds[name] if metric.is_full else None)
            self._by_hour[hour].add(key)
        self._dirty.add(key)
        return agg, overflowed

    # -- state management ------------------------------------------------------------------------
    def take_dirty(self) -> set[Key]:
        """Keys changed since the previous call."""
        dirty, self._dirty = self._dirty, set()
        return dirty

    def put(self, key: Key, agg: Agg) -> None:
        """Install an aggregate, the object itself (later merges into the key change it); merges
        it in if the key exists."""
        existing = self._read(key)
        if existing is None:
            self._install(key, agg)
        else:
            existing.merge(agg)
        self._dirty.add(key)

    def put_encoded(self, key: Key, data: bytes) -> None:
        """Install an aggregate restored from a checkpoint, as its :meth:`Agg.encode` bytes, read
        on first use (a corrupt one raises StateError then); merges if the key exists."""
        if key in self._aggs:
            self.put(key, Agg.decode(data))
            return
        self._install(key, data)
        self._dirty.add(key)

    def _install(self, key: Key, agg: Agg | bytes) -> None:
        self._aggs[key] = agg
        self._by_hour[key[0]].add(key)
        if key[2] is not None and key[3] != OVERFLOW_VALUE:
            self._series[(key[0], key[1], key[2])] += 1

    def merge(self, other: AggregateState) -> None:
        """Fold another state (e.g. another partition's) into this one; ``other`` stays as it was
        (a key new here gets a copy: installed itself, the next state's merge would change it)."""
        for key, agg in other.items():
            self.put(key, agg if key in self._aggs else Agg.merged([agg]))

    def pop_hours(self, hours: Iterable[int]) -> set[Key]:
        """Remove every aggregate of the given hours (evicting closed state); returns their keys."""
        wanted = set(hours)
        taken = set()
        for hour in wanted:
            for key in self._by_hour.pop(hour, ()):
                del self._aggs[key]
                taken.add(key)
                self._dirty.discard(key)
        for series in [s for s in self._series if s[0] in wanted]:
            del self._series[series]
        return taken

    def hours(self) -> set[int]:
        return set(self._by_hour)

    def rows(self, keys: Iterable[Key] | None = None) -> list[Row]:
        """Hour rows of the given keys (all keys when None), sorted by key."""
        chosen = self._aggs.keys() if keys is None else keys
        return [self[key].to_row(key, "hour") for key in sorted(chosen, key=_sort_key)]


def _positions_by_hour(hours: list[int]) -> dict[tuple[int, None], list[int]]:
    """The global slice: the positions of each hour (a batch's events mostly share one)."""
    if hours.count(hours[0]) == len(hours):
        return {(hours[0], None): list(range(len(hours)))}
    groups: dict[tuple[int, None], list[int]] = {}
    for position, hour in enumerate(hours):
        groups.setdefault((hour, None), []).append(position)
    return groups


def _positions_by_value(hours: list[int], fields: list[Mapping], dimension_type: str) -> dict[tuple[int, str], list[int]]:
    """The positions of each distinct (hour, dimension value), keys in order of first appearance;
    events without the dimension are not in its slice."""
    groups: dict[tuple[int, str], list[int]] = {}
    for position, (hour, event_fields) in enumerate(zip(hours, fields)):
        value = event_fields.get(dimension_type)
        if value is None:
            continue
        key = (hour, value)
        members = groups.get(key)
        if members is None:
            groups[key] = [position]
        else:
            members.append(position)
    return groups


def _sort_key(key: Key) -> tuple:
    bucket, metric, dimension_type, value = key
    return (bucket, metric, dimension_type or "", value or "")


def roll_up(rows: Iterable[Row], granularity: Granularity) -> list[Row]:
    """Day or week rows from hour rows (or days into weeks): merge sketches, add counts and sums.

    Rows of different sketch kinds for one key raise :class:`StateError`; they never merge.
    """
    hours = sorted(rows, key=lambda row: _sort_key(row.key))
    return sorted(roll_up_rows(hours, {granularity: None})[granularity], key=lambda row: _sort_key(row.key))


def roll_up_rows(
    hours: Sequence[Row],
    wanted: Mapping[Granularity, Container[Key] | None],
    unmerged: list[tuple[Granularity, Key]] | None = None,
) -> dict[Granularity, list[Row]]:
    """The rows of each wanted granularity (only the given bucket keys; None: every one) from
    rows given in time order, merged in that order into a fresh aggregate per bucket.

    Rows whose sketches do not merge (two kinds past exact mode) raise :class:`StateError`, or,
    given ``unmerged``, have their bucket's granularity and key put there and make no row.

    A bucket of one row is that row under the bucket's key: nothing to merge. A bucket of the
    same rows as one of another granularity (a week whose hours lie in one day) is that bucket's
    row: each distinct run of rows is merged, summarised and serialised once, and each row is
    decoded once."""
    groups: dict[Granularity, dict[Key, list[int]]] = {granularity: {} for granularity in wanted}
    for index, row in enumerate(hours):
        _, metric, dimension_type, dimension_value = row.key
        for granularity, keep in wanted.items():
            key = (bucket_start_ms(row.bucket_ms, granularity), metric, dimension_type, dimension_value)
            if keep is None or key in keep:
                groups[granularity].setdefault(key, []).append(index)
    decoded: dict[int, Agg] = {}

    def agg_of(index: int) -> Agg:
        agg = decoded.get(index)
        if agg is None:
            agg = decoded[index] = Agg.from_row(hours[index])
        return agg

    made: dict[tuple[int, ...], Row] = {}
    out: dict[Granularity, list[Row]] = {}
    for granularity, buckets in groups.items():
        out[granularity] = rolled = []
        for key, members in buckets.items():
            run = tuple(members)
            source = made.get(run)
            if source is None:
                if len(run) == 1:
                    source = hours[run[0]]
                else:
                    parts = [agg_of(i) for i in run]  # unreadable bytes raise: not a mismatch of kinds
                    try:
                        source = Agg.merged(parts).to_row(key, granularity)
                    except SketchKindsMismatch:
                        if unmerged is None:
                            raise
                        unmerged.append((granularity, key))
                        continue
                made[run] = source
            rolled.append(_moved(source, key[0], granularity))
    return out


def _moved(row: Row, bucket_ms: int, granularity: Granularity) -> Row:
    """``row`` as the row of another (day or week) bucket, cheaper than dataclasses.replace: an
    hour row's sum is its exact sum."""
    parts = row.sum_parts
    if parts is None and row.sketch is not None:
        parts = exact.exact_sum([row.sum_value or 0.0])
    return Row(
        bucket_ms, granularity, row.metric_name, row.dimension_type, row.dimension_value, row.count, row.sum_value,
        row.min_value, row.max_value, row.avg_value, row.p50_value, row.p95_value, row.p99_value, row.sketch,
        row.sketch_kind, row.fingerprint, parts,
    )  # fmt: skip
