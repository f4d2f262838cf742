"""One small interface over two Apache DataSketches quantile families.

* ``kll-k<K>``: ``kll_doubles_sketch(K)``; rank error ~1.3% at K=200, float64 items.
* ``req-hra-k<K>``: ``req_floats_sketch(K, is_hra=True)``; relative rank error that shrinks
  towards rank 1.0, which is where p95/p99 of heavy-tailed latencies live. Items are float32
  (the library has no double REQ sketch).

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
from typing import Literal

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

# Below this many values, scalar updates are cheaper than one array update (measured).
_SCALAR_LOOP_MAX = 16

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
    """A mergeable quantile sketch of one kind. Not thread-safe, like the library object it wraps."""

    __slots__ = ("kind", "_impl")

    def __init__(self, kind: str | Kind, _impl: object | None = None) -> None:
        self.kind = kind if isinstance(kind, Kind) else Kind.parse(kind)
        if _impl is None:
            _impl = (
                datasketches.kll_doubles_sketch(self.kind.k)
                if self.kind.family == "kll"
                else datasketches.req_floats_sketch(self.kind.k, True)
            )
        self._impl = _impl

    # -- writing ---------------------------------------------------------------------------
    def update(self, value: float) -> None:
        """Add one finite value."""
        self._impl.update(value)

    def update_many(self, values: np.ndarray | Sequence[float]) -> None:
        """Add finite values in order: a 1-D array, or a sequence of floats."""
        if isinstance(values, np.ndarray) and values.ndim != 1:
            raise ValueError(f"update_many takes a 1-D array, got shape {values.shape}")
        if len(values) > _SCALAR_LOOP_MAX:
            self._impl.update(values if isinstance(values, np.ndarray) else np.array(values, dtype=np.float64))
        else:
            # The array entry point costs ~3 us a call against ~0.16 us a scalar update;
            # most keys (a user's hour) get one or two values a batch.
            update = self._impl.update
            for value in values.tolist() if isinstance(values, np.ndarray) else values:
                update(value)

    def merge(self, other: Sketch) -> None:
        if other.kind != self.kind:
            raise SketchKindMismatch(str(self.kind), str(other.kind))
        self._impl.merge(other._impl)

    # -- reading ---------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self._impl.n

    @property
    def retained(self) -> int:
        """How many items the sketch holds (its memory is proportional)."""
        return self._impl.num_retained

    @property
    def is_exact(self) -> bool:
        """True while every value is retained (quantiles are then exact)."""
        return not self._impl.is_estimation_mode()

    def quantiles(self, ranks: Sequence[float]) -> list[float]:
        """Values at normalised ranks in [0, 1], interpolated like PERCENTILE_CONT.

        PERCENTILE_CONT over the sample the sketch stands for (each retained item repeated by its
        weight; while exact, the values themselves). The library's own ``get_quantile`` returns
        the next item above the rank instead; near the top of a heavy tail, where REQ-HRA keeps
        items of weight 1, that step alone is an error of up to 12% at p99 of a bucket of ~1,000
        values, which interpolation removes. The two order statistics around each rank come from
        the library's sorted view: microseconds, where iterating the retained items from Python
        took about 1 ms for a busy week's sketch (and the binding's KLL iterator reports weight 1
        for every item).
        """
        if self._impl.is_empty():
            raise SketchError("quantiles of an empty sketch are undefined")
        return percentile_cont(_OrderStatistics(self._impl), ranks)

    # -- bytes -----------------------------------------------------------------------------
    def serialize(self) -> bytes:
        data = bytes(self._impl.serialize())
        _trust(str(self.kind), data)  # the library wrote them: reading them back needs no check
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
        return cls(kind, impl)

    def __repr__(self) -> str:
        return f"Sketch({str(self.kind)!r}, n={self.n}, exact={self.is_exact})"
