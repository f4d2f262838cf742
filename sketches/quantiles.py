"""One small interface over two Apache DataSketches quantile families.

* ``kll-k<K>``: ``kll_doubles_sketch(K)``; rank error ~1.3% at K=200, float64 items.
* ``req-hra-k<K>``: ``req_floats_sketch(K, is_hra=True)``; relative rank error that shrinks
  towards rank 1.0, which is where p95/p99 of heavy-tailed latencies live. Items are float32
  (the library has no double REQ sketch); a value beyond float32's range is stored as its
  largest value (3.4e38), not as inf.

While a sketch is not in estimation mode it retains every value, and :meth:`Sketch.quantiles`
interpolates them exactly like PostgreSQL's ``PERCENTILE_CONT`` (for REQ: over the values as
float32, the precision the sketch stores). Past that it interpolates the same way over the sample
the sketch stands for, each retained item repeated by its weight.

Bytes are DataSketches' own binary format, so any DataSketches implementation (Java, C++,
the PostgreSQL extension) can read what we store. The kind is not recoverable from a library
object alone, so it travels next to the bytes (``sketch_kind`` in the database) and is checked
against the header when reading.
"""

from __future__ import annotations

import functools
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import datasketches
import numpy as np

from . import _layout
from .errors import CorruptSketchError, SketchError, SketchKindError, SketchKindMismatch

Family = Literal["kll", "req-hra"]

_KIND_RE = re.compile(r"^(kll|req-hra)-k([1-9][0-9]{0,4})$")

# Both families start with: preamble (u8), serial version (u8), family id (u8), flags (u8), k (u16).
_HEADER = struct.Struct("<BBBBH")
_FAMILY_ID = {"kll": 15, "req-hra": 17}
_REQ_FLAG_HRA = 1 << 3

_FLOAT32_MAX = float(np.finfo(np.float32).max)

# Below this many values, scalar updates are cheaper than one array update (measured).
_SCALAR_LOOP_MAX = 16

# Up to this many values a sketch keeps them in a list and builds the library object only to
# serialise it, or for good once it grows past: an empty REQ k=128 object takes about 4.3 KB,
# and most sketches of a worker (a user's hour) hold one or two values. Never more than the
# library object of the kind holds exactly (KLL k=8: 8 values), so a list reports what the
# object would.
LAZY_MAX = 16


@functools.lru_cache(maxsize=64)
def _listed_max(kind: Kind) -> int:
    impl = Sketch._new_impl(kind)
    for n in range(LAZY_MAX):
        impl.update(float(n))  # type: ignore[attr-defined]
        if impl.is_estimation_mode():  # type: ignore[attr-defined]
            return n
    return LAZY_MAX

# k ranges the library accepts; checked here so a bad setting fails with a clear message.
_K_RANGE = {"kll": (8, 65535), "req-hra": (4, 254)}  # datasketches 5.2 stores REQ k in 8 bits


@dataclass(frozen=True, slots=True)
class Kind:
    """Family and parameter of a sketch; its text form (``req-hra-k24``) is what gets stored."""

    family: Family
    k: int

    @classmethod
    @functools.lru_cache(maxsize=64)
    def parse(cls, text: str) -> Kind:
        match = _KIND_RE.match(text)
        if match is None:
            raise SketchKindError(f"unknown sketch kind {text!r}; expected kll-k<K> or req-hra-k<K>")
        family, k = match.group(1), int(match.group(2))
        low, high = _K_RANGE[family]
        if not low <= k <= high:
            raise SketchKindError(f"sketch kind {text!r}: k must be in [{low}, {high}] for {family}")
        if family == "req-hra" and k % 2:
            raise SketchKindError(f"sketch kind {text!r}: REQ needs an even k")
        return cls(family, k)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.family}-k{self.k}"


def sniff_kind(data: bytes) -> str:
    """The kind named by a serialized sketch's header (family, k and, for REQ, rank accuracy)."""
    if len(data) < _HEADER.size:
        raise CorruptSketchError(f"sketch of {len(data)} bytes is shorter than its header")
    _, _, family_id, flags, k = _HEADER.unpack_from(data)
    if family_id == _FAMILY_ID["kll"]:
        return f"kll-k{k}"
    if family_id == _FAMILY_ID["req-hra"]:
        return f"req-hra-k{k}" if flags & _REQ_FLAG_HRA else f"req-lra-k{k}"
    raise CorruptSketchError(f"sketch header names unknown family id {family_id}")


def percentile_cont(ordered: Sequence[float], ranks: Sequence[float]) -> list[float]:
    """PostgreSQL's ``PERCENTILE_CONT`` over sorted values, with its exact arithmetic.

    PostgreSQL computes ``lo + (hi - lo) * (rank * (n - 1) - floor(rank * (n - 1)))``;
    numpy's "linear" method rounds differently in the last bit, so it is not used here.
    """
    last = len(ordered) - 1
    out = []
    for rank in ranks:
        position = rank * last
        first = math.floor(position)
        low, high = ordered[first], ordered[math.ceil(position)]
        out.append(low + (high - low) * (position - first))
    return out


class _OrderStatistics(Sequence[float]):
    """The sample a sketch stands for (each retained item repeated by its weight), sorted, read
    one order statistic at a time from the library's sorted view.

    Order statistic j (0-based) is the library's inclusive quantile at normalised rank
    (j + 0.5) / n: the view returns the first item whose cumulative weight reaches
    ceil(rank * n) = j + 1, and half a rank from either neighbour no rounding picks the wrong one.
    """

    def __init__(self, impl: object) -> None:
        self._impl = impl
        self._n = impl.n  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, j: int) -> float:  # type: ignore[override]
        return self._impl.get_quantile((j + 0.5) / self._n, True)  # type: ignore[attr-defined]


# Digests of sketch bytes already checked (or written by the library itself). The same stored
# sketch is read again and again (every roll-up of its day and week, every merge of its key's
# partials); the structural check is about half the cost of a read. Bounded: cleared when full.
_TRUSTED_MAX = 200_000
_trusted: set[int] = set()


def _digest(kind: str, data: bytes) -> int:
    return hash((kind, len(data), data))


def _trust(kind: str, data: bytes) -> None:
    if len(_trusted) >= _TRUSTED_MAX:
        _trusted.clear()
    _trusted.add(_digest(kind, data))


def _is_trusted(kind: str, data: bytes) -> bool:
    return _digest(kind, data) in _trusted


class Sketch:
    """A mergeable quantile sketch of one kind. Not thread-safe, like the library object it wraps.

    Holds either the library object or, up to :data:`LAZY_MAX` values, the values themselves
    (exact mode, where quantiles are those of the values as the library object stores them).
    """

    __slots__ = ("kind", "_impl", "_values", "_listed_max", "_ceiling")

    def __init__(self, kind: str | Kind, _impl: object | None = None) -> None:
        self._become(kind if isinstance(kind, Kind) else Kind.parse(kind), _impl)

    def _become(self, kind: Kind, impl: object | None = None) -> None:
        """An empty sketch of ``kind`` (listed), or the library object ``impl`` of that kind."""
        self.kind = kind
        self._impl = impl
        self._values: list[float] | None = [] if impl is None else None
        self._listed_max = _listed_max(kind)
        # REQ stores float32: a larger finite value would become inf, and quantiles around it
        # NaN. It is stored as float32's largest value instead (sum, min and max stay exact).
        self._ceiling = math.inf if kind.family == "kll" else _FLOAT32_MAX

    @staticmethod
    def _new_impl(kind: Kind, values: Sequence[float] = ()) -> Any:
        impl = (
            datasketches.kll_doubles_sketch(kind.k) if kind.family == "kll" else datasketches.req_floats_sketch(kind.k, True)
        )
        update = impl.update
        for value in values:
            update(value)
        return impl

    def _materialise(self) -> Any:
        """The library object, built from the listed values first if there is none yet."""
        if self._values is not None:
            self._impl, self._values = self._new_impl(self.kind, self._values), None
        return self._impl

    # -- writing ---------------------------------------------------------------------------
    def update(self, value: float) -> None:
        """Add one finite value."""
        if value > self._ceiling:
            value = self._ceiling
        values = self._values
        if values is None:
            self._impl.update(value)  # type: ignore[attr-defined]
            return
        values.append(value)
        if len(values) > self._listed_max:
            self._materialise()

    def update_many(self, values: np.ndarray | Sequence[float]) -> None:
        """Add finite values in order: a 1-D array, or a sequence of floats."""
        if isinstance(values, np.ndarray) and values.ndim != 1:
            raise ValueError(f"update_many takes a 1-D array, got shape {values.shape}")
        if len(values) and (values.max() if isinstance(values, np.ndarray) else max(values)) > self._ceiling:
            values = np.minimum(np.asarray(values, dtype=np.float64), self._ceiling)
        self._add(values)

    def _add(self, values: np.ndarray | Sequence[float]) -> None:
        """Add values already within range (see ``_ceiling``), in order."""
        listed = self._values
        if listed is not None and len(listed) + len(values) <= self._listed_max:
            listed.extend(values.tolist() if isinstance(values, np.ndarray) else values)
            return
        impl = self._materialise()
        if len(values) > _SCALAR_LOOP_MAX:
            impl.update(values if isinstance(values, np.ndarray) else np.array(values, dtype=np.float64))
        else:
            # The array entry point costs ~3 us a call against ~0.16 us a scalar update;
            # most keys (a user's hour) get one or two values a batch.
            update = impl.update
            for value in values.tolist() if isinstance(values, np.ndarray) else values:
                update(value)

    def merge(self, other: Sketch) -> None:
        """Fold ``other`` in; a listed ``other`` adds its values, in order.

        Sketches of different kinds never merge (CONTRACT section 4), but an exact one is its
        values (every one retained): those are added as if ingested under the other kind, which
        is how a key spanning a change of STREAMAGG_SKETCH_KIND(S) still gets one row. The result
        takes the kind of the one that is not exact; with both exact, this one's. Two of
        different kinds past exact mode raise :class:`SketchKindMismatch`."""
        if other.kind != self.kind:
            if other.is_exact:
                self.update_many(other.exact_values())
                return
            if not self.is_exact:
                raise SketchKindMismatch(str(self.kind), str(other.kind))
            values = self.exact_values()
            self._become(other.kind)
            self.update_many(values)
        if other._values is not None:
            self._add(other._values)  # a sketch's values are within range already
        else:
            self._materialise().merge(other._impl)

    def exact_values(self) -> list[float]:
        """Every value of an exact sketch, in the order they were stored (for REQ, as the float32
        it stores unless still listed); :class:`SketchError` past exact mode."""
        if self._values is not None:
            return list(self._values)
        if not self.is_exact:
            raise SketchError(f"a {self.kind} sketch past exact mode does not hold its values")
        # Newest first, like deserialize's; an empty REQ sketch is not iterated (it crashes).
        return [item for item, _ in self._impl][::-1] if self.n else []  # type: ignore[attr-defined]

    # -- reading ---------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self._values) if self._values is not None else self._impl.n  # type: ignore[attr-defined]

    @property
    def retained(self) -> int:
        """How many items the sketch holds."""
        if self._values is not None:
            return len(self._values)
        return self._impl.num_retained  # type: ignore[attr-defined]

    @property
    def memory_bytes(self) -> int:
        """Rough bytes held: a list and its floats while listed; else the library object, whose
        buffers start at about 32 bytes per unit of k for REQ (4.3 KB at k=128, measured)."""
        if self._values is not None:
            return 56 + 32 * len(self._values)
        base = 32 * self.kind.k if self.kind.family == "req-hra" else 200
        return base + 8 * self.retained

    @property
    def is_exact(self) -> bool:
        """True while every value is retained (quantiles are then exact)."""
        return self._values is not None or not self._impl.is_estimation_mode()  # type: ignore[attr-defined]

    def quantiles(self, ranks: Sequence[float]) -> list[float]:
        """Values at normalised ranks in [0, 1], interpolated like PERCENTILE_CONT.

        PERCENTILE_CONT over the sample the sketch stands for (each retained item repeated by its
        weight; while exact, the values themselves, for REQ as float32). The library's own
        ``get_quantile`` returns the next item above the rank instead; near the top of a heavy
        tail, where REQ-HRA keeps items of weight 1, that step alone is an error of up to 12%
        at p99 of a bucket of ~1,000 values, which interpolation removes. The two order
        statistics around each rank come from the library's sorted view: microseconds, where
        iterating the retained items from Python took about 1 ms for a busy week's sketch (and
        the binding's KLL iterator reports weight 1 for every item).
        """
        if self._values is not None:
            if not self._values:
                raise SketchError("quantiles of an empty sketch are undefined")
            return percentile_cont(sorted(self._stored(self._values)), ranks)
        if self._impl.is_empty():  # type: ignore[attr-defined]
            raise SketchError("quantiles of an empty sketch are undefined")
        return percentile_cont(_OrderStatistics(self._impl), ranks)

    def _stored(self, values: Sequence[float]) -> list[float]:
        """The values as the library object stores them: float32 for REQ."""
        if self.kind.family == "kll":
            return list(values)
        return np.asarray(values, dtype=np.float32).tolist()  # within range: see _ceiling

    # -- bytes -----------------------------------------------------------------------------
    def serialize(self) -> bytes:
        # A listed sketch is serialised as the library object it stands for would be: REQ's
        # bytes written directly, KLL's through a library object built for the occasion and
        # dropped. The list stays the (small) state.
        values = self._values
        if values and self.kind.family == "req-hra":
            # Not trusted: reading these back never asks (listed bytes are read as their items).
            return _layout.req_exact_bytes(self.kind.k, values)
        impl = self._impl if values is None else self._new_impl(self.kind, values)
        data = bytes(impl.serialize())  # type: ignore[attr-defined]
        _trust(str(self.kind), data)  # the library's bytes: reading them back needs no check
        return data

    @classmethod
    def deserialize(cls, kind: str | Kind, data: bytes) -> Sketch:
        """Read DataSketches bytes; a typed error for bytes of another kind or corrupt bytes.

        The bytes are checked structurally before the library sees them: its deserialiser
        trusts the header and can crash the process on corrupt input.
        """
        kind = kind if isinstance(kind, Kind) else Kind.parse(kind)
        data = bytes(data)
        actual = sniff_kind(data)
        if actual != str(kind):
            raise SketchKindMismatch(str(kind), actual)
        if kind.family == "req-hra":
            # A listed sketch's bytes (most stored sketches: a user's hour) are read back without
            # the library: the items, once the bytes prove to be exactly what they serialise to.
            items = _layout.req_exact_items(kind.k, data)
            if items is not None and len(items) <= _listed_max(kind):
                sketch = cls(kind)
                sketch._values = items
                return sketch
        trusted = _is_trusted(actual, data)
        if kind.family == "kll":
            if not trusted:
                _layout.check_kll_doubles(data, k=kind.k)
            reader = datasketches.kll_doubles_sketch.deserialize
        else:
            if not trusted:
                _layout.check_req_floats(data, k=kind.k, hra=True)
            reader = datasketches.req_floats_sketch.deserialize
        try:
            impl = reader(data)
        except (ValueError, IndexError, RuntimeError) as exc:
            raise CorruptSketchError(f"{kind} sketch bytes rejected by the library: {exc}") from exc
        _trust(actual, data)
        sketch = cls(kind, impl)
        if impl.n <= sketch._listed_max and not impl.is_estimation_mode():
            # Listed again. Both families iterate an exact sketch's items newest first: reversed,
            # they are fed back in their stored order, so serialising gives back the same bytes.
            # (Iterating an empty deserialised REQ sketch crashes the process: datasketches 5.2.)
            sketch._impl, sketch._values = None, [item for item, _ in impl][::-1] if impl.n else []
        return sketch

    def __repr__(self) -> str:
        return f"Sketch({str(self.kind)!r}, n={self.n}, exact={self.is_exact})"
