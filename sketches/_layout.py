"""Pure-Python structural validation of serialized REQ (float) and KLL (double) sketches,
and the bytes of a small exact REQ sketch written and read without the library
(:func:`req_exact_bytes`, :func:`req_exact_items`).

The C++ deserializers behind the ``datasketches`` binding (Apache DataSketches
C++, v5.2.0) trust most of the header fields they read: a corrupted level
offset, item count or flag turns into an out-of-bounds read or write and kills
the whole process.  :func:`check_req_floats` and :func:`check_kll_doubles` walk
the byte layout first and raise :class:`CorruptSketchError` for anything that
is not exactly a well-formed sketch, so that ``deserialize`` is only ever
reached with consistent structure.

This module must not import ``datasketches``.

All integers are little-endian.  "u8/u16/u32/u64" are unsigned, "f32/f64" are
IEEE-754 floats.  Offsets are in bytes from the start of the buffer.

REQ sketch, float items (family 17, serial version 1)
======================================================
Preamble, always present (8 bytes)::

    off size  meaning
    0   1     u8  preamble ints: 2 if num_levels <= 1, 4 if num_levels > 1
    1   1     u8  serial version = 1
    2   1     u8  family id = 17
    3   1     u8  flags: bit0, bit1 reserved (0); bit2 IS_EMPTY; bit3 IS_HIGH_RANK
                  (HRA); bit4 RAW_ITEMS; bit5 IS_LEVEL_ZERO_SORTED; bit6, bit7 unused (0)
    4   2     u16 k (even, 4..1024; the 5.2.0 binding only produces 4..254 because
                  it truncates k to 8 bits: req_floats_sketch(400) has k 144)
    6   1     u8  num_levels (number of compactors; 0 for an empty sketch, 1 in
                  exact mode, > 1 in estimation mode)
    7   1     u8  num_raw_items (n when RAW_ITEMS is set, else 0)

Empty sketch (IS_EMPTY): nothing follows, total size 8.

Estimation-mode block, only when num_levels > 1 (16 bytes)::

    8   8     u64 n (stream length)
    16  4     f32 min item
    20  4     f32 max item

Body, one of:

* RAW_ITEMS (n <= 4, num_levels == 1): ``num_raw_items`` x f32 items.  The 5.2.0
  writer sizes the buffer as if a compactor header were present whenever
  n >= 2, so those buffers end with 20 extra zero bytes (n=1: 12 bytes total,
  n=2: 36 = 8 + 2*4 + 20).  Both lengths are accepted; the padding must be zero.
* otherwise ``num_levels`` compactors back to back, compactor h being::

    +0  8     u64 state (number of compactions done, OR-ed on merge)
    +8  4     f32 section_size_raw (k / sqrt(2)**j, j = log2(num_sections / 3))
    +12 1     u8  lg_weight (== h; each item weighs 2**h)
    +13 1     u8  num_sections (3 * 2**j)
    +14 2     u16 padding (0)
    +16 4     u32 num_items
    +20 4*num_items  f32 items (ascending; level 0 only when IS_LEVEL_ZERO_SORTED)

  In exact mode (num_levels == 1) n, min and max are derived from the items.
  In estimation mode n == sum(num_items_h << h): compaction promotes exactly
  half of an even-sized range, so total weight is conserved.

KLL sketch, double items (family 15)
====================================
Preamble, always present (8 bytes)::

    off size  meaning
    0   1     u8  preamble ints: 2 (empty or single item), 5 (full)
    1   1     u8  serial version: 1 (empty, full), 2 (single item)
    2   1     u8  family id = 15
    3   1     u8  flags: bit0 IS_EMPTY; bit1 IS_LEVEL_ZERO_SORTED; bit2 IS_SINGLE_ITEM;
                  other bits 0
    4   2     u16 k (8..65535)
    6   1     u8  m = 8 (minimum level width)
    7   1     u8  unused (0)

Empty: nothing follows, total size 8.
Single item (n == 1): ``8 8 f64 item``, total size 16.
Full (n >= 2)::

    8   8     u64 n
    16  2     u16 min_k (8..k; smallest k seen across merges)
    18  1     u8  num_levels L (1..61)
    19  1     u8  unused (0)
    20  4*L   u32 levels[0..L-1]: offsets of each level inside the item buffer.
              levels[L] is not stored: it is the total capacity
              sum_h max(m, round(k * (2/3)**(L-h-1))) (kll_helper::compute_total_capacity)
    20+4L      8  f64 min item
    28+4L      8  f64 max item
    36+4L      8*(levels[L]-levels[0])  f64 items, level by level
              (levels >= 1 ascending; level 0 only when IS_LEVEL_ZERO_SORTED)

Consistency: levels non-decreasing and <= capacity; n == sum((levels[h+1] -
levels[h]) << h); L <= 1 + floor(log2 n); total size exact.

Items, min and max must be finite in both families.  Note that the library's
``update`` drops NaN but keeps +/-inf, so a sketch fed infinities serializes to
bytes that these checks refuse: filter non-finite values before updating.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from .errors import CorruptSketchError

__all__ = ["check_req_floats", "check_kll_doubles", "req_exact_bytes", "req_exact_items"]

# --------------------------------------------------------------------------- REQ

_REQ_PREAMBLE = struct.Struct("<BBBBHBB")  # pre_ints, ser_ver, family, flags, k, num_levels, num_raw
_REQ_ESTIMATION = struct.Struct("<Qff")  # n, min, max
_REQ_COMPACTOR = struct.Struct("<QfBBHI")  # state, ssr, lg_weight, num_sections, padding, num_items
_F32 = np.dtype("<f4")

_REQ_FAMILY = 17
_REQ_SERIAL_VERSION = 1
_REQ_FLAG_EMPTY = 1 << 2
_REQ_FLAG_HRA = 1 << 3
_REQ_FLAG_RAW = 1 << 4
_REQ_FLAG_SORTED = 1 << 5
_REQ_KNOWN_FLAGS = _REQ_FLAG_EMPTY | _REQ_FLAG_HRA | _REQ_FLAG_RAW | _REQ_FLAG_SORTED
_REQ_MIN_K = 4
_REQ_MAX_K = 1024
_REQ_MAX_RAW = 4  # raw items are written when n <= MIN_K
_REQ_RAW_PADDING = _REQ_COMPACTOR.size  # 5.2.0 over-allocates one compactor header
_REQ_INIT_SECTIONS = 3
# num_sections doubles only after 2**(num_sections-1) compactions of that level:
# 3 -> 6 after 4, -> 12 after 32, -> 24 after 2**11, -> 48 after 2**23.  96 would
# need 2**47 compactions (and the C++ threshold shift is undefined from there on).
_REQ_SECTIONS = {_REQ_INIT_SECTIONS << j: j for j in range(5)}
_REQ_MAX_LEVELS = 64  # n is a u64, so no item can weigh 2**64
_SQRT2_F32 = np.float32(math.sqrt(2.0))

# --------------------------------------------------------------------------- KLL

_KLL_PREAMBLE = struct.Struct("<BBBBHBB")  # pre_ints, ser_ver, family, flags, k, m, unused
_KLL_FULL = struct.Struct("<QHBB")  # n, min_k, num_levels, unused
_KLL_MINMAX = struct.Struct("<dd")
_KLL_SINGLE = struct.Struct("<d")
_U32 = np.dtype("<u4")
_F64 = np.dtype("<f8")

_KLL_FAMILY = 15
_KLL_SERIAL_VERSION_1 = 1  # empty and full
_KLL_SERIAL_VERSION_2 = 2  # single item
_KLL_PREAMBLE_INTS_SHORT = 2
_KLL_PREAMBLE_INTS_FULL = 5
_KLL_FLAG_EMPTY = 1 << 0
_KLL_FLAG_SORTED = 1 << 1
_KLL_FLAG_SINGLE = 1 << 2
_KLL_KNOWN_FLAGS = _KLL_FLAG_EMPTY | _KLL_FLAG_SORTED | _KLL_FLAG_SINGLE
_KLL_MIN_K = 8
_KLL_M = 8
_KLL_DATA_START = 20
_KLL_MAX_LEVELS = 61  # kll_helper::int_cap_aux rejects depth > 60
_POWERS_OF_THREE = tuple(3**i for i in range(31))


def _fail(kind: str, msg: str) -> CorruptSketchError:
    return CorruptSketchError(f"{kind}: {msg}")


def _as_buffer(data: object) -> memoryview:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def _items(buf: memoryview, offset: int, count: int, dtype: np.dtype, kind: str, what: str) -> np.ndarray:
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=offset)
    if count and not np.isfinite(arr).all():
        raise _fail(kind, f"non-finite item in {what}")
    return arr


def _is_sorted(arr: np.ndarray) -> bool:
    return arr.size < 2 or bool((arr[1:] >= arr[:-1]).all())


def _check_bounds(kind: str, arr: np.ndarray, lo: float, hi: float) -> None:
    if arr.size and (float(arr.min()) < lo or float(arr.max()) > hi):
        raise _fail(kind, f"items outside [min, max] = [{lo!r}, {hi!r}]")


# ----------------------------------------------------------------------- REQ impl


def _nearest_even(value: float) -> int:
    # req_compactor::nearest_even: round(value / 2) << 1, round half away from zero
    return int(math.floor(value / 2.0 + 0.5)) * 2


@lru_cache(maxsize=None)
def _req_section_size_raw(k: int, j: int) -> float:
    # ensure_enough_sections: section_size_raw_ = section_size_raw_ / sqrtf(2) in float
    ssr = np.float32(k)
    for _ in range(j):
        ssr = np.float32(ssr / _SQRT2_F32)
    return float(ssr)


def _req_compactor_nom_capacity(kind: str, h: int, k: int, state: int, ssr: float, num_sections: int) -> int:
    j = _REQ_SECTIONS.get(num_sections)
    if j is None:
        raise _fail(kind, f"compactor {h}: num_sections {num_sections} is not 3 * 2**j (j <= 4)")
    if not math.isfinite(ssr) or ssr <= 0.0:
        raise _fail(kind, f"compactor {h}: section_size_raw {ssr!r} is not a positive finite number")
    expected = _req_section_size_raw(k, j)
    if abs(ssr - expected) > 1e-3 * expected:
        raise _fail(
            kind,
            f"compactor {h}: section_size_raw {ssr!r} inconsistent with k={k} and "
            f"num_sections={num_sections} (expected ~{expected!r})",
        )
    section_size = _nearest_even(ssr)
    if section_size < _REQ_MIN_K:
        raise _fail(kind, f"compactor {h}: section size {section_size} < {_REQ_MIN_K}")
    if j > 0 and state < (1 << ((num_sections >> 1) - 1)):
        raise _fail(kind, f"compactor {h}: state {state} too small to have reached {num_sections} sections")
    if state >= (1 << (num_sections - 1)) and _nearest_even(float(np.float32(np.float32(ssr) / _SQRT2_F32))) >= _REQ_MIN_K:
        raise _fail(kind, f"compactor {h}: state {state} would already have doubled {num_sections} sections")
    return 2 * num_sections * section_size


def check_req_floats(data: bytes, *, k: int | None = None, hra: bool | None = None) -> None:
    """Raise :class:`CorruptSketchError` unless ``data`` is a well-formed serialized
    ``req_floats_sketch`` (and, when given, has this ``k`` / high-rank-accuracy mode)."""
    kind = "REQ sketch"
    buf = _as_buffer(data)
    size = len(buf)
    if size < _REQ_PREAMBLE.size:
        raise _fail(kind, f"{size} bytes, shorter than the {_REQ_PREAMBLE.size}-byte preamble")
    pre_ints, ser_ver, family, flags, hk, num_levels, num_raw = _REQ_PREAMBLE.unpack_from(buf, 0)
    if family != _REQ_FAMILY:
        raise _fail(kind, f"family id {family}, expected {_REQ_FAMILY}")
    if ser_ver != _REQ_SERIAL_VERSION:
        raise _fail(kind, f"serial version {ser_ver}, expected {_REQ_SERIAL_VERSION}")
    if flags & ~_REQ_KNOWN_FLAGS:
        raise _fail(kind, f"unknown flag bits in 0x{flags:02x}")
    if hk % 2 or not _REQ_MIN_K <= hk <= _REQ_MAX_K:
        raise _fail(kind, f"k {hk} is not even in [{_REQ_MIN_K}, {_REQ_MAX_K}]")
    is_hra = bool(flags & _REQ_FLAG_HRA)
    if k is not None and k != hk:
        raise _fail(kind, f"k mismatch: expected k={k}, header has k={hk}")
    if hra is not None and bool(hra) != is_hra:
        raise _fail(kind, f"hra mismatch: expected hra={bool(hra)}, header has hra={is_hra}")
    expected_pre = 4 if num_levels > 1 else 2
    if pre_ints != expected_pre:
        raise _fail(kind, f"preamble ints {pre_ints}, expected {expected_pre} for {num_levels} levels")

    if flags & _REQ_FLAG_EMPTY:
        if num_levels > 1 or num_raw:
            raise _fail(kind, f"empty sketch with {num_levels} levels and {num_raw} raw items")
        if size != _REQ_PREAMBLE.size:
            raise _fail(kind, f"empty sketch is {size} bytes, expected {_REQ_PREAMBLE.size}")
        return
    if num_levels == 0:
        raise _fail(kind, "non-empty sketch with 0 levels")
    if num_levels > _REQ_MAX_LEVELS:
        raise _fail(kind, f"{num_levels} levels > {_REQ_MAX_LEVELS}")

    off = _REQ_PREAMBLE.size
    n = lo = hi = None
    if num_levels > 1:
        if size - off < _REQ_ESTIMATION.size:
            raise _fail(kind, f"truncated: {size} bytes, estimation block needs {off + _REQ_ESTIMATION.size}")
        n, lo, hi = _REQ_ESTIMATION.unpack_from(buf, off)
        off += _REQ_ESTIMATION.size
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise _fail(kind, f"non-finite min/max ({lo!r}, {hi!r})")
        if lo > hi:
            raise _fail(kind, f"min {lo!r} > max {hi!r}")

    if flags & _REQ_FLAG_RAW:
        if num_levels != 1:
            raise _fail(kind, f"raw-items sketch with {num_levels} levels")
        if not 1 <= num_raw <= _REQ_MAX_RAW:
            raise _fail(kind, f"{num_raw} raw items, expected 1..{_REQ_MAX_RAW}")
        end = off + 4 * num_raw
        if size == end + _REQ_RAW_PADDING:
            if any(buf[end:]):
                raise _fail(kind, "non-zero padding after raw items")
        elif size != end:
            raise _fail(kind, f"{size} bytes, expected {end} (or {end + _REQ_RAW_PADDING}) for {num_raw} raw items")
        items = _items(buf, off, num_raw, _F32, kind, "raw items")
        if flags & _REQ_FLAG_SORTED and not _is_sorted(items):
            raise _fail(kind, "raw items flagged sorted but are not")
        return
    if num_raw:
        raise _fail(kind, f"{num_raw} raw items without the raw-items flag")

    max_nom_size = 0
    retained = 0
    total_weight = 0
    arrays = []
    for h in range(num_levels):
        if size - off < _REQ_COMPACTOR.size:
            raise _fail(kind, f"truncated: compactor {h} header at offset {off}, buffer is {size} bytes")
        state, ssr, lg_weight, num_sections, padding, num_items = _REQ_COMPACTOR.unpack_from(buf, off)
        off += _REQ_COMPACTOR.size
        if lg_weight != h:
            raise _fail(kind, f"compactor {h}: lg_weight {lg_weight}, expected {h}")
        if padding:
            raise _fail(kind, f"compactor {h}: non-zero padding 0x{padding:04x}")
        max_nom_size += _req_compactor_nom_capacity(kind, h, hk, state, ssr, num_sections)
        if num_items > (size - off) // 4:
            raise _fail(kind, f"compactor {h}: {num_items} items overrun the {size}-byte buffer")
        items = _items(buf, off, num_items, _F32, kind, f"compactor {h}")
        off += 4 * num_items
        if (h > 0 or flags & _REQ_FLAG_SORTED) and not _is_sorted(items):
            raise _fail(kind, f"compactor {h}: items are not sorted")
        retained += num_items
        total_weight += num_items << h
        arrays.append(items)
    if off != size:
        raise _fail(kind, f"{size - off} trailing bytes after the last compactor")
    if retained == 0:
        raise _fail(kind, "non-empty sketch retains no items")
    if retained > max_nom_size:
        raise _fail(kind, f"{retained} retained items exceed the nominal capacity {max_nom_size}")
    if num_levels > 1:
        if n != total_weight:
            raise _fail(kind, f"n {n} != total weight {total_weight} of the compactors")
        for items in arrays:
            _check_bounds(kind, items, lo, hi)


def req_exact_bytes(k: int, items: Sequence[float]) -> bytes:
    """The bytes the library (5.2.0) writes for a new high-rank-accuracy ``req_floats_sketch(k)``
    fed ``items`` (1 or more, all finite within float32 range, too few for a compaction:
    fewer than the 6 * k that fill the first level), in order. Level 0 holds them newest first,
    unsorted; up to four are raw items (one alone is flagged sorted). About 1 us, against 2
    to 12 us to build the library object for it and serialise that (1 to 16 items, measured);
    unit tests compare the bytes with the library's."""
    n = len(items)
    if not 1 <= n < _REQ_INIT_SECTIONS * 2 * k:
        raise ValueError(f"{n} items are not an exact REQ sketch of k={k} without compaction")
    head, tail = _req_exact_frame(k, n)
    return head + _floats32(n).pack(*reversed(items)) + tail


@lru_cache(maxsize=4096)
def _req_exact_frame(k: int, n: int) -> tuple[bytes, bytes]:
    """The bytes before and after the items of :func:`req_exact_bytes`, which depend on k and n
    alone (made once: with them, a sketch of one item is written in 0.50 us instead of 0.60)."""
    if n == 1:
        flags = _REQ_FLAG_HRA | _REQ_FLAG_RAW | _REQ_FLAG_SORTED
        return _REQ_PREAMBLE.pack(2, _REQ_SERIAL_VERSION, _REQ_FAMILY, flags, k, 1, 1), b""
    if n <= _REQ_MAX_RAW:
        flags = _REQ_FLAG_HRA | _REQ_FLAG_RAW
        return _REQ_PREAMBLE.pack(2, _REQ_SERIAL_VERSION, _REQ_FAMILY, flags, k, 1, n), bytes(_REQ_RAW_PADDING)
    head = _REQ_PREAMBLE.pack(2, _REQ_SERIAL_VERSION, _REQ_FAMILY, _REQ_FLAG_HRA, k, 1, 0)
    return head + _REQ_COMPACTOR.pack(0, float(k), 0, _REQ_INIT_SECTIONS, 0, n), b""


@lru_cache(maxsize=4096)
def _floats32(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}f")


def req_exact_items(k: int, data: bytes) -> list[float] | None:
    """The items, in the order they were fed, of bytes that are exactly what
    :func:`req_exact_bytes` writes for them (so the library's own bytes for them); None for any
    other bytes, which the library and :func:`check_req_floats` must read. The check is complete:
    the bytes are written again from the items and compared. Items are finite float32 values."""
    if len(data) < _REQ_PREAMBLE.size:
        return None
    flags = data[3]
    if flags == _REQ_FLAG_HRA | _REQ_FLAG_RAW | _REQ_FLAG_SORTED:
        start, stop = _REQ_PREAMBLE.size, len(data)
    elif flags == _REQ_FLAG_HRA | _REQ_FLAG_RAW:
        start, stop = _REQ_PREAMBLE.size, len(data) - _REQ_RAW_PADDING
    elif flags == _REQ_FLAG_HRA:
        start, stop = _REQ_PREAMBLE.size + _REQ_COMPACTOR.size, len(data)
    else:
        return None
    n, remainder = divmod(stop - start, 4)
    if remainder or not 1 <= n < _REQ_INIT_SECTIONS * 2 * k:
        return None
    items = list(struct.unpack_from(f"<{n}f", data, start))
    items.reverse()
    if not all(map(math.isfinite, items)) or req_exact_bytes(k, items) != data:
        return None
    return items


# ----------------------------------------------------------------------- KLL impl


def _kll_int_cap_aux_aux(k: int, depth: int) -> int:
    tmp = ((k << 1) << depth) // _POWERS_OF_THREE[depth]  # pre-multiplied by 2 for rounding
    return (tmp + 1) >> 1


def _kll_int_cap_aux(k: int, depth: int) -> int:
    if depth <= 30:
        return _kll_int_cap_aux_aux(k, depth)
    half = depth // 2
    return _kll_int_cap_aux_aux(_kll_int_cap_aux_aux(k, half), depth - half)


@lru_cache(maxsize=4096)
def _kll_total_capacity(k: int, m: int, num_levels: int) -> int:
    # kll_helper::compute_total_capacity
    return sum(max(m, _kll_int_cap_aux(k, num_levels - h - 1)) for h in range(num_levels))


def check_kll_doubles(data: bytes, *, k: int | None = None) -> None:
    """Raise :class:`CorruptSketchError` unless ``data`` is a well-formed serialized
    ``kll_doubles_sketch`` (and, when given, has this ``k``)."""
    kind = "KLL sketch"
    buf = _as_buffer(data)
    size = len(buf)
    if size < _KLL_PREAMBLE.size:
        raise _fail(kind, f"{size} bytes, shorter than the {_KLL_PREAMBLE.size}-byte preamble")
    pre_ints, ser_ver, family, flags, hk, m, unused = _KLL_PREAMBLE.unpack_from(buf, 0)
    if family != _KLL_FAMILY:
        raise _fail(kind, f"family id {family}, expected {_KLL_FAMILY}")
    if flags & ~_KLL_KNOWN_FLAGS:
        raise _fail(kind, f"unknown flag bits in 0x{flags:02x}")
    if m != _KLL_M:
        raise _fail(kind, f"m {m}, expected {_KLL_M}")
    if unused:
        raise _fail(kind, f"non-zero unused preamble byte 0x{unused:02x}")
    if hk < _KLL_MIN_K:
        raise _fail(kind, f"k {hk} < {_KLL_MIN_K}")
    if k is not None and k != hk:
        raise _fail(kind, f"k mismatch: expected k={k}, header has k={hk}")
    is_empty = bool(flags & _KLL_FLAG_EMPTY)
    is_single = bool(flags & _KLL_FLAG_SINGLE)
    if is_empty and is_single:
        raise _fail(kind, "both empty and single-item flags set")

    if is_empty or is_single:
        if pre_ints != _KLL_PREAMBLE_INTS_SHORT:
            raise _fail(kind, f"preamble ints {pre_ints}, expected {_KLL_PREAMBLE_INTS_SHORT}")
        expected_ver = _KLL_SERIAL_VERSION_2 if is_single else _KLL_SERIAL_VERSION_1
        if ser_ver != expected_ver:
            raise _fail(kind, f"serial version {ser_ver}, expected {expected_ver}")
        expected_size = _KLL_PREAMBLE.size + (_KLL_SINGLE.size if is_single else 0)
        if size != expected_size:
            what = "single-item" if is_single else "empty"
            raise _fail(kind, f"{what} sketch is {size} bytes, expected {expected_size}")
        if is_single:
            (item,) = _KLL_SINGLE.unpack_from(buf, _KLL_PREAMBLE.size)
            if not math.isfinite(item):
                raise _fail(kind, f"non-finite single item {item!r}")
        return

    if pre_ints != _KLL_PREAMBLE_INTS_FULL:
        raise _fail(kind, f"preamble ints {pre_ints}, expected {_KLL_PREAMBLE_INTS_FULL}")
    if ser_ver != _KLL_SERIAL_VERSION_1:
        raise _fail(kind, f"serial version {ser_ver}, expected {_KLL_SERIAL_VERSION_1}")
    if size < _KLL_DATA_START:
        raise _fail(kind, f"truncated: {size} bytes, full preamble needs {_KLL_DATA_START}")
    n, min_k, num_levels, unused2 = _KLL_FULL.unpack_from(buf, _KLL_PREAMBLE.size)
    if unused2:
        raise _fail(kind, f"non-zero unused byte 0x{unused2:02x} at offset 19")
    if not _KLL_MIN_K <= min_k <= hk:
        raise _fail(kind, f"min_k {min_k} not in [{_KLL_MIN_K}, k={hk}]")
    if n < 2:
        raise _fail(kind, f"full-format sketch with n={n}")
    ub_levels = n.bit_length()  # kll_helper::ub_on_num_levels: 1 + floor(log2 n)
    if not 1 <= num_levels <= min(_KLL_MAX_LEVELS, ub_levels):
        raise _fail(kind, f"num_levels {num_levels} not in [1, {min(_KLL_MAX_LEVELS, ub_levels)}] for n={n}")
    levels_end = _KLL_DATA_START + 4 * num_levels
    items_start = levels_end + _KLL_MINMAX.size
    if size < items_start:
        raise _fail(kind, f"truncated: {size} bytes, levels and min/max need {items_start}")
    capacity = _kll_total_capacity(hk, m, num_levels)
    levels = [int(v) for v in np.frombuffer(buf, dtype=_U32, count=num_levels, offset=_KLL_DATA_START)]
    levels.append(capacity)
    for h in range(num_levels):
        if levels[h] > levels[h + 1]:
            raise _fail(kind, f"level offsets not monotone/within capacity {capacity}: {levels}")
    num_items = capacity - levels[0]
    if num_items == 0:
        raise _fail(kind, "non-empty sketch retains no items")
    expected_size = items_start + 8 * num_items
    if size != expected_size:
        raise _fail(kind, f"{size} bytes, expected {expected_size} for {num_items} items")
    total_weight = sum((levels[h + 1] - levels[h]) << h for h in range(num_levels))
    if total_weight != n:
        raise _fail(kind, f"n {n} != total weight {total_weight} of the levels")
    lo, hi = _KLL_MINMAX.unpack_from(buf, levels_end)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise _fail(kind, f"non-finite min/max ({lo!r}, {hi!r})")
    if lo > hi:
        raise _fail(kind, f"min {lo!r} > max {hi!r}")
    items = _items(buf, items_start, num_items, _F64, kind, "items")
    _check_bounds(kind, items, lo, hi)
    base = levels[0]
    for h in range(num_levels):
        if h == 0 and not flags & _KLL_FLAG_SORTED:
            continue
        if not _is_sorted(items[levels[h] - base : levels[h + 1] - base]):
            raise _fail(kind, f"level {h} items are not sorted")
