"""Tests for :mod:`sketches._layout`, the pre-deserialization structural validator.

Two parts:

* every byte string the installed ``datasketches`` library produces must pass the
  checker and deserialize;
* a fuzz: mutated bytes must either be rejected with ``CorruptSketchError`` or pass
  and then deserialize, answer quantiles, merge and update without crashing.  A
  segfault kills the interpreter, so the fuzz loop runs in a child process (this
  very file run as a script, see ``_fuzz_main``) and the test asserts on its exit
  code and printed counts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import datasketches as ds
import numpy as np
import pytest

from sketches._layout import check_kll_doubles, check_req_floats, req_exact_bytes, req_exact_items
from sketches.errors import CorruptSketchError

REPO_ROOT = Path(__file__).resolve().parents[2]
QUANTILE_RANKS = [0.0, 0.5, 0.99, 1.0]

# --------------------------------------------------------------------------- builders


def _values(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(n)


def make_req(n: int, k: int = 12, hra: bool = True, seed: int = 0):
    sk = ds.req_floats_sketch(k, hra)
    if n:
        sk.update(_values(n, seed).astype(np.float32))
    return sk


def make_req_merged(parts: int, n_each: int, k: int = 12, hra: bool = True, seed: int = 0):
    sk = ds.req_floats_sketch(k, hra)
    for i in range(parts):
        sk.merge(make_req(n_each + 37 * i, k, hra, seed + i))
    return sk


def make_kll(n: int, k: int = 200, seed: int = 0):
    sk = ds.kll_doubles_sketch(k)
    if n:
        sk.update(_values(n, seed))
    return sk


def make_kll_merged(parts: int, n_each: int, k: int = 200, seed: int = 0, other_k: int | None = None):
    sk = ds.kll_doubles_sketch(k)
    for i in range(parts):
        sk.merge(make_kll(n_each + 37 * i, other_k or k, seed + i))
    return sk


SIZES = [0, 1, 2, 3, 4, 5, 100, 143, 144, 200, 201, 1000, 10**5, 10**6]
REQ_CONFIGS = [(12, True), (24, True), (12, False), (24, False)]
KLL_KS = [200, 400]


def _deserialize_and_query(cls, data: bytes, n: int) -> None:
    sk = cls.deserialize(data)
    assert sk.n == n
    if n:
        qs = sk.get_quantiles(QUANTILE_RANKS)
        assert len(qs) == len(QUANTILE_RANKS)
        assert all(np.isfinite(qs))
    else:
        assert sk.is_empty()


# ----------------------------------------------------------- library bytes are accepted


@pytest.mark.parametrize("k,hra", REQ_CONFIGS)
@pytest.mark.parametrize("n", SIZES)
def test_req_library_bytes_pass(n: int, k: int, hra: bool) -> None:
    data = make_req(n, k, hra).serialize()
    check_req_floats(data)
    check_req_floats(data, k=k, hra=hra)
    _deserialize_and_query(ds.req_floats_sketch, data, n)


def _req_exact_cases(seed: int) -> list[tuple[int, list[float]]]:
    """(k, items) with 1 to 16 items: heavy-tailed, integral, repeated, tiny and subnormal, at
    float32's largest, and doubles that float32 rounds (up, down, to even)."""
    rng = random.Random(seed)
    f32_max = float(np.finfo(np.float32).max)
    draws = [
        lambda: rng.lognormvariate(5, 2),
        lambda: float(rng.randrange(0, 10_000)),
        lambda: rng.choice([0.0, 1.0, 2.5]),
        lambda: rng.uniform(0, 1e-40),
        lambda: rng.choice([5e-324, 1e-45, 1.5e-45, f32_max, 3.4e38]),
        lambda: 1.0 + rng.randrange(1 << 30) * 2.0**-52,
        lambda: rng.random() * 1e6,
    ]
    out = []
    for _ in range(300):
        draw = rng.choice(draws)
        out.append((2 * rng.randrange(2, 128), [draw() for _ in range(rng.randrange(1, 17))]))
    return out


def _fed(sketch: Any, items: list[float]) -> Any:
    """A library sketch after ``items`` were fed to it in order."""
    for item in items:
        sketch.update(item)
    return sketch


@pytest.mark.parametrize("seed", range(5))
def test_req_exact_bytes_are_the_librarys(seed: int) -> None:
    for k, items in _req_exact_cases(seed):
        assert req_exact_bytes(k, items) == bytes(_fed(ds.req_floats_sketch(k, True), items).serialize()), (k, items)


@pytest.mark.parametrize("seed", range(5))
def test_req_exact_items_are_what_the_library_reads(seed: int) -> None:
    for k, items in _req_exact_cases(seed):
        data = bytes(_fed(ds.req_floats_sketch(k, True), items).serialize())
        held = [item for item, _ in ds.req_floats_sketch.deserialize(data)][::-1]  # newest first, as fed
        assert req_exact_items(k, data) == held, (k, items)


def test_req_exact_items_refuse_any_other_bytes() -> None:
    data = req_exact_bytes(12, [3.0, 1.0, 2.0, 5.0, 4.0])
    assert req_exact_items(12, data) == [3.0, 1.0, 2.0, 5.0, 4.0]
    raw = req_exact_bytes(12, [1.0, 2.0])
    nan = raw[:8] + struct.pack("<f", math.nan) + raw[12:]  # the newest item, after the 8-byte preamble
    compacted = _fed(ds.req_floats_sketch(4, True), [float(i) for i in range(100)])
    refused = {
        "another k": (14, data),
        "truncated": (12, data[:-1]),
        "a byte more": (12, data + b"\0"),
        "a count that disagrees": (12, data[:-4]),
        "another family's flags": (12, data[:3] + bytes([data[3] ^ 0x01]) + data[4:]),
        "NaN": (12, nan),
        "estimation mode": (4, bytes(compacted.serialize())),
        "empty": (12, bytes(ds.req_floats_sketch(12, True).serialize())),
        "low rank accuracy": (12, bytes(_fed(ds.req_floats_sketch(12, False), [1.0, 2.0]).serialize())),
        "nothing": (12, b""),
    }
    for name, (k, refused_data) in refused.items():
        assert req_exact_items(k, refused_data) is None, name


def test_req_exact_bytes_refuse_what_would_compact() -> None:
    with pytest.raises(ValueError):
        req_exact_bytes(4, [1.0] * 24)  # 24 fill level 0 of k=4: the library compacts
    with pytest.raises(ValueError):
        req_exact_bytes(12, [])


@pytest.mark.parametrize("k", KLL_KS)
@pytest.mark.parametrize("n", SIZES)
def test_kll_library_bytes_pass(n: int, k: int) -> None:
    data = make_kll(n, k).serialize()
    check_kll_doubles(data)
    check_kll_doubles(data, k=k)
    _deserialize_and_query(ds.kll_doubles_sketch, data, n)


@pytest.mark.parametrize("k,hra", REQ_CONFIGS)
def test_req_large_and_merged_pass(k: int, hra: bool) -> None:
    cases = [
        make_req(10**7, k, hra),
        make_req_merged(40, 2_000, k, hra),
        make_req_merged(8, 100_000, k, hra, seed=7),
        make_req_merged(3, 2, k, hra),  # merge of raw-items sketches
    ]
    # merge of sketches that were themselves merged
    outer = ds.req_floats_sketch(k, hra)
    for i in range(5):
        outer.merge(make_req_merged(4, 3_000, k, hra, seed=100 + i))
    cases.append(outer)
    for sk in cases:
        data = sk.serialize()
        check_req_floats(data, k=k, hra=hra)
        _deserialize_and_query(ds.req_floats_sketch, data, sk.n)


@pytest.mark.parametrize("k", KLL_KS)
def test_kll_large_and_merged_pass(k: int) -> None:
    cases = [
        make_kll(10**7, k),
        make_kll_merged(40, 2_000, k),
        make_kll_merged(8, 100_000, k, seed=7),
        make_kll_merged(10, 5_000, k, other_k=8),  # min_k < k after merging a smaller k
        make_kll_merged(3, 1, k),  # merge of single-item sketches
    ]
    for sk in cases:
        data = sk.serialize()
        check_kll_doubles(data, k=k)
        _deserialize_and_query(ds.kll_doubles_sketch, data, sk.n)


# --------------------------------------------------------------- targeted rejections


def _reject(check, data: bytes, fragment: str | None, **kw) -> None:
    with pytest.raises(CorruptSketchError, match=fragment):
        check(bytes(data), **kw)


def _set(data: bytes, fmt: str, offset: int, *values) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, *values)
    return bytes(buf)


def test_req_k_and_hra_mismatch_name_both() -> None:
    data = make_req(1000, 24, True).serialize()
    with pytest.raises(CorruptSketchError) as exc:
        check_req_floats(data, k=12)
    assert "12" in str(exc.value) and "24" in str(exc.value)
    with pytest.raises(CorruptSketchError) as exc:
        check_req_floats(data, hra=False)
    assert "hra=False" in str(exc.value) and "hra=True" in str(exc.value)
    check_req_floats(make_req(1000, 12, False).serialize(), k=12, hra=False)
    _reject(check_req_floats, make_req(0, 12, False).serialize(), "hra mismatch", hra=True)


def test_kll_k_mismatch_names_both() -> None:
    with pytest.raises(CorruptSketchError) as exc:
        check_kll_doubles(make_kll(1000, 400).serialize(), k=200)
    assert "200" in str(exc.value) and "400" in str(exc.value)


def test_wrong_family_is_rejected() -> None:
    _reject(check_req_floats, make_kll(1000).serialize(), "family")
    _reject(check_kll_doubles, make_req(1000).serialize(), "family")


def test_non_bytes_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        check_req_floats("not bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        check_kll_doubles(None)  # type: ignore[arg-type]


def test_bytearray_and_memoryview_are_accepted() -> None:
    data = make_kll(1000).serialize()
    check_kll_doubles(bytearray(data))
    check_kll_doubles(memoryview(data))


@pytest.mark.parametrize("n", [0, 1, 3, 100, 5000])
def test_req_truncation_and_trailing_bytes(n: int) -> None:
    data = make_req(n).serialize()
    for cut in range(len(data)):
        if cut == len(data) - 20 and 2 <= n <= 4:
            continue  # the unpadded raw-items length is also valid
        with pytest.raises(CorruptSketchError):
            check_req_floats(data[:cut])
    with pytest.raises(CorruptSketchError):
        check_req_floats(data + b"\x00")


@pytest.mark.parametrize("n", [0, 1, 2, 100, 5000])
def test_kll_truncation_and_trailing_bytes(n: int) -> None:
    data = make_kll(n).serialize()
    for cut in range(len(data)):
        with pytest.raises(CorruptSketchError):
            check_kll_doubles(data[:cut])
    with pytest.raises(CorruptSketchError):
        check_kll_doubles(data + b"\x00")


def test_req_raw_items_padding_variants() -> None:
    data = make_req(3).serialize()
    assert len(data) == 8 + 3 * 4 + 20  # 5.2.0 over-sizes raw-items buffers
    check_req_floats(data[:-20])  # what a correctly sized writer would emit
    _reject(check_req_floats, data[:-1] + b"\x01", "padding")


def test_req_header_fields() -> None:
    est = make_req(5000).serialize()  # estimation mode: 2+ compactors
    assert est[0] == 4 and est[6] > 1
    _reject(check_req_floats, _set(est, "<B", 0, 2), "preamble ints")
    _reject(check_req_floats, _set(est, "<B", 1, 2), "serial version")
    _reject(check_req_floats, _set(est, "<B", 3, est[3] | 1), "flag")
    _reject(check_req_floats, _set(est, "<H", 4, 13), "k 13")
    _reject(check_req_floats, _set(est, "<H", 4, 2048), "k 2048")
    _reject(check_req_floats, _set(est, "<B", 6, est[6] + 1), None)
    _reject(check_req_floats, _set(est, "<B", 7, 3), "raw items")
    _reject(check_req_floats, _set(est, "<Q", 8, struct.unpack_from("<Q", est, 8)[0] + 1), "total weight")
    _reject(check_req_floats, _set(est, "<f", 16, float("nan")), "non-finite")
    _reject(check_req_floats, _set(est, "<f", 20, float("inf")), "non-finite")
    _reject(check_req_floats, _set(est, "<f", 16, 2.0), "min")  # min > max
    _reject(check_req_floats, _set(est, "<f", 20, 0.5), "outside")  # items above max


def test_req_compactor_fields() -> None:
    est = make_req(5000).serialize()
    c0 = 24  # first compactor header
    state, ssr, lg_weight, num_sections, pad, num_items = struct.unpack_from("<QfBBHI", est, c0)
    j = (num_sections // 3).bit_length() - 1
    assert (lg_weight, pad) == (0, 0) and num_sections == 3 << j
    assert ssr == pytest.approx(12 / 2 ** (j / 2), rel=1e-3)
    _reject(check_req_floats, _set(est, "<B", c0 + 12, 1), "lg_weight")
    _reject(check_req_floats, _set(est, "<B", c0 + 13, 5), "num_sections")
    _reject(check_req_floats, _set(est, "<B", c0 + 13, 0), "num_sections")
    _reject(check_req_floats, _set(est, "<f", c0 + 8, 0.0), "section_size_raw")
    _reject(check_req_floats, _set(est, "<f", c0 + 8, float("nan")), "section_size_raw")
    _reject(check_req_floats, _set(est, "<f", c0 + 8, ssr * 3), "section_size_raw")
    _reject(check_req_floats, _set(est, "<H", c0 + 14, 1), "padding")
    _reject(check_req_floats, _set(est, "<I", c0 + 16, num_items + 1), None)
    _reject(check_req_floats, _set(est, "<I", c0 + 16, 0xFFFFFFFF), "overrun")
    _reject(check_req_floats, _set(est, "<Q", c0, 2**63), "state")
    if num_sections > 3:
        _reject(check_req_floats, _set(est, "<Q", c0, 0), "state")
    _reject(check_req_floats, _set(est, "<f", c0 + 20, float("nan")), "non-finite")


def test_req_unsorted_upper_level_and_overfull() -> None:
    est = make_req(5000).serialize()
    c0 = 24
    n0 = struct.unpack_from("<I", est, c0 + 16)[0]
    c1 = c0 + 20 + 4 * n0
    a, b = struct.unpack_from("<ff", est, c1 + 20)
    assert a < b
    _reject(check_req_floats, _set(est, "<ff", c1 + 20, b, a), "sorted")
    # one compactor holding more items than the whole sketch may nominally hold
    big = 2 * 3 * 12 * 2 + 10
    items = np.sort(np.random.default_rng(0).random(big).astype("<f4"))
    data = struct.pack("<BBBBHBB", 2, 1, 17, 0x28, 12, 1, 0) + struct.pack("<QfBBHI", 0, 12.0, 0, 3, 0, big) + items.tobytes()
    _reject(check_req_floats, data, "nominal capacity")
    # the same structure under capacity is fine
    small = items[:60].tobytes()
    check_req_floats(struct.pack("<BBBBHBB", 2, 1, 17, 0x28, 12, 1, 0) + struct.pack("<QfBBHI", 0, 12.0, 0, 3, 0, 60) + small)


def test_req_raw_and_empty_shapes() -> None:
    one = make_req(1).serialize()
    _reject(check_req_floats, _set(one, "<B", 7, 0), "raw items")
    _reject(check_req_floats, _set(one, "<B", 7, 5), "raw items")
    _reject(check_req_floats, _set(one, "<f", 8, float("-inf")), "non-finite")
    empty = make_req(0).serialize()
    _reject(check_req_floats, empty + b"\x00" * 4, "empty")
    _reject(check_req_floats, _set(empty, "<B", 7, 1), "empty")
    _reject(check_req_floats, _set(empty, "<H", 4, 0), "k 0")
    # empty flag cleared: non-empty with 0 levels
    _reject(check_req_floats, _set(empty, "<B", 3, empty[3] & ~0x04), "0 levels")


def test_kll_header_fields() -> None:
    full = make_kll(100_000).serialize()
    num_levels = full[18]
    assert full[0] == 5 and num_levels > 1
    _reject(check_kll_doubles, _set(full, "<B", 0, 2), "preamble ints")
    _reject(check_kll_doubles, _set(full, "<B", 1, 2), "serial version")
    _reject(check_kll_doubles, _set(full, "<B", 3, 0x08), "flag")
    _reject(check_kll_doubles, _set(full, "<B", 3, 0x05), "both empty and single")
    _reject(check_kll_doubles, _set(full, "<H", 4, 7), "k 7")
    _reject(check_kll_doubles, _set(full, "<B", 6, 4), "m 4")
    _reject(check_kll_doubles, _set(full, "<B", 7, 1), "unused")
    _reject(check_kll_doubles, _set(full, "<Q", 8, 1), "n=1")
    _reject(check_kll_doubles, _set(full, "<Q", 8, 100_001), "total weight")
    _reject(check_kll_doubles, _set(full, "<H", 16, 201), "min_k")
    _reject(check_kll_doubles, _set(full, "<H", 16, 4), "min_k")
    _reject(check_kll_doubles, _set(full, "<B", 18, 0), "num_levels")
    _reject(check_kll_doubles, _set(full, "<B", 18, 62), "num_levels")
    _reject(check_kll_doubles, _set(full, "<B", 19, 1), "unused")


def test_kll_levels_and_items() -> None:
    full = make_kll(100_000).serialize()
    num_levels = full[18]
    levels = list(struct.unpack_from(f"<{num_levels}I", full, 20))
    # non-monotone offsets
    _reject(check_kll_doubles, _set(full, "<I", 20 + 4, levels[0] - 1), "monotone")
    _reject(check_kll_doubles, _set(full, "<I", 20, 0xFFFFFFFF), "monotone")
    # a different but monotone split changes the item count / weight
    _reject(check_kll_doubles, _set(full, "<I", 20, levels[0] + 1), "expected")  # one item fewer
    # move one item from a non-empty level h-1 to level h: same size, different weight
    h = next(h for h in range(1, num_levels) if levels[h] > levels[h - 1])
    _reject(check_kll_doubles, _set(full, "<I", 20 + 4 * h, levels[h] - 1), "total weight")
    mm = 20 + 4 * num_levels
    _reject(check_kll_doubles, _set(full, "<d", mm, float("nan")), "non-finite")
    _reject(check_kll_doubles, _set(full, "<d", mm + 8, -1.0), "min")
    _reject(check_kll_doubles, _set(full, "<d", mm + 16, float("inf")), "non-finite")
    _reject(check_kll_doubles, _set(full, "<d", mm + 16, 5.0), "outside")
    # swap two items of level 1 (always sorted)
    start = mm + 16 + 8 * (levels[1] - levels[0])
    a, b = struct.unpack_from("<dd", full, start)
    assert a < b
    _reject(check_kll_doubles, _set(full, "<dd", start, b, a), "sorted")
    single = make_kll(1).serialize()
    _reject(check_kll_doubles, _set(single, "<d", 8, float("nan")), "non-finite")
    _reject(check_kll_doubles, _set(single, "<B", 1, 1), "serial version")
    _reject(check_kll_doubles, single[:-1], "single-item")


def test_infinite_items_are_rejected_even_though_the_library_keeps_them() -> None:
    # update() drops NaN but keeps +/-inf; such sketches are refused by design
    req = ds.req_floats_sketch(12, True)
    req.update(np.array([1.0, np.inf, 2.0], dtype=np.float32))
    _reject(check_req_floats, req.serialize(), "non-finite")
    kll = ds.kll_doubles_sketch(200)
    kll.update(np.concatenate([_values(1000, 1), [-np.inf]]))
    _reject(check_kll_doubles, kll.serialize(), "non-finite")
    nan_only = ds.kll_doubles_sketch(200)
    nan_only.update(np.array([np.nan, 0.5, np.nan]))
    check_kll_doubles(nan_only.serialize())  # NaN never reaches the bytes


# ----------------------------------------------------------------------------- fuzz

_MAX64 = 2**64 - 1
_FLOAT_EXTREMES = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e30, -1e30, 1e-40, 3.0, -1.0]


def _req_fields(data: bytes) -> list[tuple[int, str]]:
    """(offset, struct format) of every structural field of a library-made REQ buffer."""
    fields = [(0, "B"), (1, "B"), (2, "B"), (3, "B"), (4, "H"), (6, "B"), (7, "B")]
    if len(data) == 8:
        return fields
    num_levels, raw = data[6], data[3] & 0x10
    off = 8
    if num_levels > 1:
        fields += [(8, "Q"), (16, "f"), (20, "f")]
        off = 24
    if raw:
        return fields + [(off, "f")]
    for _ in range(num_levels):
        fields += [(off, "Q"), (off + 8, "f"), (off + 12, "B"), (off + 13, "B"), (off + 14, "H"), (off + 16, "I")]
        num_items = struct.unpack_from("<I", data, off + 16)[0]
        if num_items:
            fields.append((off + 20, "f"))
        off += 20 + 4 * num_items
    return fields


def _kll_fields(data: bytes) -> list[tuple[int, str]]:
    fields = [(0, "B"), (1, "B"), (2, "B"), (3, "B"), (4, "H"), (6, "B"), (7, "B")]
    if len(data) == 8:
        return fields
    if data[3] & 0x04:
        return fields + [(8, "d")]
    num_levels = data[18]
    fields += [(8, "Q"), (16, "H"), (18, "B"), (19, "B")]
    fields += [(20 + 4 * h, "I") for h in range(num_levels)]
    mm = 20 + 4 * num_levels
    return fields + [(mm, "d"), (mm + 8, "d"), (mm + 16, "d")]


def _extreme(rng: random.Random, fmt: str, old):
    if fmt in "fd":
        return rng.choice(_FLOAT_EXTREMES + [old * 2, -old, old + 1e-3])
    top = {"B": 0xFF, "H": 0xFFFF, "I": 0xFFFFFFFF, "Q": _MAX64}[fmt]
    choice = rng.choice([0, 1, 2, top, top - 1, top >> 1, old + 1, old - 1, old * 2, old // 2, old ^ (1 << rng.randrange(8 * struct.calcsize(fmt))), rng.randrange(top + 1)])
    return choice % (top + 1)


def _mutate(base: bytes, fields: list[tuple[int, str]], rng: random.Random) -> tuple[str, bytes]:
    buf = bytearray(base)
    op = rng.randrange(6)
    if op == 0:  # 1-4 random byte changes, biased towards structural fields
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.6:
                off, fmt = rng.choice(fields)
                pos = off + rng.randrange(struct.calcsize(fmt))
            else:
                pos = rng.randrange(len(buf))
            buf[pos] = rng.randrange(256)
        return "bytes", bytes(buf)
    if op == 1:  # 1-4 bit flips anywhere
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(buf))
            buf[pos] ^= 1 << rng.randrange(8)
        return "bits", bytes(buf)
    if op == 2:  # truncation
        return "truncate", bytes(buf[: rng.randrange(len(buf))])
    if op == 3:  # appended garbage (sometimes zeros)
        extra = rng.randint(1, 64)
        tail = bytes(extra) if rng.random() < 0.3 else rng.randbytes(extra)
        return "append", bytes(buf) + tail
    # header field(s) set to extreme values (op 4: one field, op 5: two fields + a byte)
    for _ in range(1 if op == 4 else 2):
        off, fmt = rng.choice(fields)
        (old,) = struct.unpack_from("<" + fmt, buf, off)
        struct.pack_into("<" + fmt, buf, off, _extreme(rng, fmt, old))
    if op == 5:
        buf[rng.randrange(len(buf))] = rng.randrange(256)
    return "field", bytes(buf)


def _fuzz_bases() -> list[tuple[str, bytes]]:
    bases = [
        ("req-empty", make_req(0).serialize()),
        ("req-empty-lra", make_req(0, 24, False).serialize()),
        ("req-one", make_req(1).serialize()),
        ("req-raw3", make_req(3).serialize()),
        ("req-exact", make_req(50).serialize()),
        ("req-est", make_req(3000).serialize()),
        ("req-est-lra-k24", make_req(20_000, 24, False, seed=3).serialize()),
        ("req-merged", make_req_merged(6, 1500, seed=9).serialize()),
        ("kll-empty", make_kll(0).serialize()),
        ("kll-one", make_kll(1).serialize()),
        ("kll-exact", make_kll(150).serialize()),
        ("kll-est", make_kll(5000).serialize()),
        ("kll-est-k400", make_kll(50_000, 400, seed=4).serialize()),
        ("kll-merged", make_kll_merged(6, 3000, k=64, seed=9).serialize()),
    ]
    return bases


def _exercise(family: str, data: bytes) -> None:
    """What a consumer does after a passed check: deserialize, query, merge, update."""
    rng = np.random.default_rng(len(data))
    if family == "req":
        sk = ds.req_floats_sketch.deserialize(data)
        if not sk.is_empty():
            sk.get_quantiles(QUANTILE_RANKS)
            sk.get_rank(0.5)
        target = ds.req_floats_sketch(sk.k, sk.is_hra())
        target.update(rng.random(300).astype(np.float32))
        target.merge(sk)
        target.update(rng.random(500).astype(np.float32))
        sk.update(rng.random(500).astype(np.float32))
        target.merge(sk)
    else:
        sk = ds.kll_doubles_sketch.deserialize(data)
        if not sk.is_empty():
            sk.get_quantiles(QUANTILE_RANKS)
            sk.get_rank(0.5)
        target = ds.kll_doubles_sketch(sk.k)
        target.update(rng.random(300))
        target.merge(sk)
        sk.update(rng.random(500))
        target.merge(sk)
    target.get_quantiles(QUANTILE_RANKS)
    # what the library writes after touching accepted bytes must itself be accepted
    (check_req_floats if family == "req" else check_kll_doubles)(target.serialize())


def run_fuzz(per_base: int, seed: int) -> dict:
    rng = random.Random(seed)
    counts: dict[str, Counter] = {}
    for name, base in _fuzz_bases():
        family = name.split("-")[0]
        check = check_req_floats if family == "req" else check_kll_doubles
        check(base)
        fields = _req_fields(base) if family == "req" else _kll_fields(base)
        c = counts.setdefault(family, Counter())
        for _ in range(per_base):
            op, data = _mutate(base, fields, rng)
            c["total"] += 1
            try:
                check(data)
            except CorruptSketchError:
                c["rejected"] += 1
                continue
            c["accepted"] += 1
            c["accepted_identical" if data == base else "accepted_changed"] += 1
            try:
                _exercise(family, data)
            except (ValueError, IndexError, RuntimeError) as exc:
                c["library_error"] += 1
                c[f"library_error:{type(exc).__name__}:{op}"] += 1
    return {fam: dict(c) for fam, c in counts.items()}


def _fuzz_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="fuzz sketches._layout against the datasketches deserializers")
    parser.add_argument("--per-base", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=20240601)
    args = parser.parse_args(argv)
    print(json.dumps(run_fuzz(args.per_base, args.seed), sort_keys=True), flush=True)
    return 0


def test_fuzz_mutations_never_crash() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--per-base", "1500", "--seed", "1234"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # a segfault in the C++ deserializer shows up as a negative return code (-11)
    assert proc.returncode == 0, f"fuzz child exited with {proc.returncode}\n{proc.stderr[-4000:]}"
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    for family in ("req", "kll"):
        c = counts[family]
        assert c["total"] == c["rejected"] + c["accepted"]
        assert c["rejected"] > 1000, c
        assert c.get("accepted_changed", 0) > 50, c  # mutated bytes that passed and were exercised


if __name__ == "__main__":
    sys.exit(_fuzz_main(sys.argv[1:]))
