"""The sketches layer: kinds, exact-mode PERCENTILE_CONT, bounds past it, merges, bytes."""

from __future__ import annotations

import math

import datasketches
import numpy as np
import pytest

from sketches import CorruptSketchError, Kind, Sketch, SketchError, SketchKindError, SketchKindMismatch, sniff_kind
from sketches.quantiles import LAZY_MAX
from streamagg.settings import Settings
from streamagg.oracle import percentile_cont

KINDS = ["kll-k200", "kll-k400", "req-hra-k12", "req-hra-k24", "req-hra-k64", "req-hra-k96", "req-hra-k128"]
RANKS = [0.0, 0.01, 0.25, 0.5, 0.95, 0.99, 1.0]


@pytest.mark.parametrize("text", KINDS)
def test_kind_round_trip(text: str) -> None:
    assert str(Kind.parse(text)) == text
    assert Sketch(text).kind == Kind.parse(text)


@pytest.mark.parametrize("text", ["", "kll", "kll-200", "kll-k0", "kll-k3", "req-k24", "req-hra-k13", "tdigest-k100", "KLL-k200"])
def test_bad_kinds_are_typed_errors(text: str) -> None:
    with pytest.raises(SketchKindError):
        Kind.parse(text)


def exact_capacity(kind: str) -> int:
    """How many values a fresh sketch of this kind holds before estimating (measured, not assumed)."""
    sketch = Sketch(kind)
    n = 0
    while True:
        sketch.update_many(np.array([float(n)]))
        if not sketch.is_exact:
            return n
        n += 1


@pytest.mark.parametrize("kind", KINDS)
def test_exact_mode_is_percentile_cont(kind: str) -> None:
    rng = np.random.default_rng(11)
    dtype = np.float32 if kind.startswith("req") else np.float64
    limit = exact_capacity(kind)
    assert limit >= 70  # measured: REQ k=12 keeps 71 values, REQ k=24 143, KLL k=200 200
    for n in (1, 2, 3, 7, 50, limit):
        values = rng.lognormal(5, 1, n)
        sketch = Sketch(kind)
        sketch.update_many(values)
        assert sketch.is_exact
        stored = values.astype(dtype).astype(np.float64).tolist()
        assert sketch.quantiles(RANKS) == [percentile_cont(stored, r) for r in RANKS]


def test_single_value_is_every_quantile() -> None:
    sketch = Sketch("req-hra-k24")
    sketch.update_many(np.array([42.0]))
    assert sketch.quantiles([0.5, 0.95, 0.99]) == [42.0, 42.0, 42.0]


def test_kll_exact_mode_is_bitwise_exact_on_doubles() -> None:
    values = np.array([0.1, 0.2, 0.30000000000000004, 1e-300, 123456.789])
    sketch = Sketch("kll-k200")
    sketch.update_many(values)
    assert sketch.quantiles([0.5]) == [percentile_cont(values.tolist(), 0.5)]


def rank_of(ordered: np.ndarray, value: float, rank: float) -> float:
    """Distance from ``rank`` to the normalised ranks that ``value`` occupies in ``ordered``."""
    low = np.searchsorted(ordered, value, side="left") / len(ordered)
    high = np.searchsorted(ordered, value, side="right") / len(ordered)
    return 0.0 if low <= rank <= high else min(abs(rank - low), abs(rank - high))


@pytest.mark.parametrize("kind", KINDS)
def test_estimation_mode_within_rank_guarantee(kind: str) -> None:
    """Past exact mode the library's guarantee is on rank: KLL's 99%-confidence normalised rank
    error, REQ's relative standard error (times 3) at each rank."""
    values = np.random.default_rng(2).lognormal(5, 1, 20_000)
    sketch = Sketch(kind)
    sketch.update_many(values)
    assert not sketch.is_exact
    ordered = np.sort(values.astype(np.float32 if kind.startswith("req") else np.float64).astype(np.float64))
    parsed = Kind.parse(kind)
    for rank, estimate in zip((0.5, 0.95, 0.99), sketch.quantiles([0.5, 0.95, 0.99]), strict=True):
        if parsed.family == "kll":
            bound = datasketches.kll_doubles_sketch.get_normalized_rank_error(parsed.k, False)
        else:
            bound = 3 * datasketches.req_floats_sketch.get_RSE(parsed.k, rank, True, len(values))
        assert rank_of(ordered, estimate, rank) <= bound, (rank, bound)


@pytest.mark.parametrize("kind", KINDS)
def test_estimates_sit_at_their_ranks_in_the_weighted_sample(kind: str) -> None:
    """Past exact mode each estimate lies between the two order statistics around its rank of the
    sample the sketch stands for (retained items repeated by their weights), as the library's own
    rank function (which knows the weights) sees it."""
    rng = np.random.default_rng(9)
    sketch = Sketch(kind)
    for _ in range(30):  # merged hours, as in a day row
        hour = Sketch(kind)
        hour.update_many(rng.lognormal(5, 1, 2000))
        sketch.merge(hour)
    assert not sketch.is_exact
    impl, n = sketch._impl, sketch.n
    for rank, estimate in zip(RANKS, sketch.quantiles(RANKS), strict=True):
        assert impl.get_rank(estimate, False) <= rank + 1 / n, rank  # items below the estimate
        assert impl.get_rank(estimate, True) >= rank - 1 / n, rank  # items up to it


def test_default_kind_within_one_percent_of_value() -> None:
    """The bar of bench/accuracy for one hour of lognormal(5, 1) latencies (the bench takes the
    worst over 840 hours; one hour here keeps the test quick)."""
    values = np.random.default_rng(3).lognormal(5, 1, 20_000)
    sketch = Sketch(Settings().sketch_kind)
    sketch.update_many(values)
    truth = [percentile_cont(values.tolist(), rank) for rank in (0.5, 0.95, 0.99)]
    errors = np.abs(np.array(sketch.quantiles([0.5, 0.95, 0.99])) / np.array(truth) - 1)
    assert errors.max() < 0.01, errors


def _of(kind: str, values: list[float]) -> Sketch:
    sketch = Sketch(kind)
    sketch.update_many(values)
    return sketch


@pytest.mark.parametrize(("mine", "other"), [("req-hra-k24", "req-hra-k12"), ("kll-k200", "req-hra-k24"), ("req-hra-k128", "kll-k200")])
def test_other_kinds_merge_only_as_the_values_of_an_exact_one(mine: str, other: str) -> None:
    """Sketches of two kinds never merge; an exact one is its values, added as if ingested under
    the other kind (the result is byte for byte that sketch). Past exact mode, both refuse."""
    rng = np.random.default_rng(4)
    few, many, more = (rng.lognormal(5, 1, n).tolist() for n in (5, 3000, 2500))
    stored = lambda kind, values: Sketch.deserialize(kind, _of(kind, values).serialize()).exact_values()  # noqa: E731
    # An exact other's values join an estimating sketch, which keeps its kind.
    a = _of(mine, many)
    a.merge(_of(other, few))
    assert a.kind == Kind.parse(mine) and a.n == 3005
    # An exact sketch merged with an estimating one of another kind takes that kind.
    b = _of(mine, few)
    b.merge(_of(other, many))
    assert b.kind == Kind.parse(other) and b.n == 3005
    # Both exact: this one's kind, the other's values as it stored them (float32 for REQ).
    c = _of(mine, few[:3])
    c.merge(Sketch.deserialize(other, _of(other, few[3:]).serialize()))
    assert c.serialize() == _of(mine, few[:3] + stored(other, few[3:])).serialize()
    assert c.exact_values() == few[:3] + stored(other, few[3:])
    d = _of(mine, many)
    with pytest.raises(SketchKindMismatch):
        d.merge(_of(other, more))
    assert d.kind == Kind.parse(mine) and d.n == len(many)  # refused: unchanged


@pytest.mark.parametrize("kind", KINDS)
def test_exact_values_in_stored_order_then_refused_past_exact_mode(kind: str) -> None:
    sketch = Sketch(kind)
    assert sketch.exact_values() == []
    values = np.random.default_rng(9).lognormal(5, 1, 40).tolist()
    sketch.update_many(values)  # past the list, still exact for every kind here
    assert sketch.is_exact
    as_stored = values if kind.startswith("kll") else np.asarray(values, dtype=np.float32).tolist()
    assert sketch.exact_values() == as_stored
    assert Sketch.deserialize(kind, sketch.serialize()).exact_values() == as_stored
    sketch.update_many(np.random.default_rng(10).lognormal(5, 1, 5000))
    with pytest.raises(SketchError):
        sketch.exact_values()


def test_merge_of_exact_sketches_stays_exact() -> None:
    a, b = Sketch("req-hra-k24"), Sketch("req-hra-k24")
    a.update_many(np.array([1.0, 2.0, 3.0]))
    b.update_many(np.array([10.0, 20.0]))
    a.merge(b)
    assert a.n == 5 and a.is_exact
    assert a.quantiles([0.5, 0.95]) == [percentile_cont([1, 2, 3, 10, 20], 0.5), percentile_cont([1, 2, 3, 10, 20], 0.95)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [0, 1, 100, 5000])
def test_serialization_round_trip(kind: str, n: int) -> None:
    values = np.random.default_rng(n).lognormal(5, 1, n)
    sketch = Sketch(kind)
    sketch.update_many(values)
    data = sketch.serialize()
    assert sniff_kind(data) == kind
    copy = Sketch.deserialize(kind, data)
    assert copy.n == n
    assert copy.serialize() == data
    if n:
        assert copy.quantiles(RANKS) == sketch.quantiles(RANKS)


# DataSketches' own binary format for values 1, 2, 3 (exact mode has no randomness). If a
# library upgrade changes these bytes, stored rows would no longer read: this must fail first.
GOLDEN = {
    "kll-k200": (
        "05010f00c80008000300000000000000c8000100c5000000000000000000f03f"
        "000000000000084000000000000008400000000000000040000000000000f03f"
    ),
    "req-hra-k24": "020111181800010300004040000000400000803f0000000000000000000000000000000000000000",
}


@pytest.mark.parametrize("kind", sorted(GOLDEN))
def test_golden_bytes(kind: str) -> None:
    sketch = Sketch(kind)
    sketch.update_many(np.array([1.0, 2.0, 3.0]))
    assert sketch.serialize().hex() == GOLDEN[kind]
    assert Sketch.deserialize(kind, bytes.fromhex(GOLDEN[kind])).quantiles([0.5]) == [2.0]


def test_bytes_of_another_kind_are_a_typed_error() -> None:
    sketch = Sketch("kll-k200")
    sketch.update_many(np.array([1.0]))
    with pytest.raises(SketchKindMismatch):
        Sketch.deserialize("req-hra-k24", sketch.serialize())
    with pytest.raises(SketchKindMismatch):
        Sketch.deserialize("kll-k400", sketch.serialize())


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x02\x01\x11", b"\x05\x01\x0f\x00\xc8\x00\x08\x00" + b"\xff" * 3, b"\x00" * 64])
def test_corrupt_bytes_are_a_typed_error(data: bytes) -> None:
    with pytest.raises((CorruptSketchError, SketchKindMismatch)):
        Sketch.deserialize("kll-k200", data)
    with pytest.raises((CorruptSketchError, SketchKindMismatch)):
        Sketch.deserialize("req-hra-k24", data)


def test_truncated_real_sketch_is_corrupt() -> None:
    sketch = Sketch("req-hra-k24")
    sketch.update_many(np.random.default_rng(0).lognormal(5, 1, 3000))
    data = sketch.serialize()
    for cut in range(8, len(data), max(1, len(data) // 50)):
        with pytest.raises(CorruptSketchError):
            Sketch.deserialize("req-hra-k24", data[:cut])


@pytest.mark.parametrize("size", [1, 16, 17, 500])
def test_update_many_takes_a_list_like_an_array(size: int) -> None:
    values = np.random.default_rng(size).lognormal(5, 1, size)
    from_array, from_list = Sketch("req-hra-k24"), Sketch("req-hra-k24")
    from_array.update_many(values)
    from_list.update_many(values.tolist())
    assert from_list.n == size
    if from_array.is_exact:
        assert from_list.serialize() == from_array.serialize()


def test_update_many_takes_one_dimension() -> None:
    with pytest.raises(ValueError):
        Sketch("kll-k200").update_many(np.zeros((2, 2)))


def test_quantiles_of_empty_sketch_raise() -> None:
    from sketches import SketchError

    with pytest.raises(SketchError):
        Sketch("req-hra-k24").quantiles([0.5])


LISTED_KINDS = ["kll-k8", "kll-k200", "req-hra-k4", "req-hra-k128"]


def materialised(sketch: Sketch) -> Sketch:
    """The same sketch with its values fed to a library object (what a listed one stands for)."""
    twin = Sketch.deserialize(sketch.kind, sketch.serialize())
    twin._materialise()
    return twin


@pytest.mark.parametrize("kind", LISTED_KINDS)
def test_a_few_values_report_what_the_library_object_would(kind: str) -> None:
    """Sketches of a few values keep a list, not a 4 KB library object: quantiles, counts and
    bytes are the object's, for REQ with its float32 rounding (inf past float32's range)."""
    rng = np.random.default_rng(17)
    for n in range(1, LAZY_MAX + 3):
        values = rng.lognormal(5, 3, n).tolist()
        values[0] *= 1e36  # past float32's range for the larger ones
        sketch = Sketch(kind)
        for value in values:
            sketch.update(value)
        twin = materialised(sketch)
        assert sketch.serialize() == twin.serialize()  # before quantiles, which reorder the object's items
        assert (sketch.n, sketch.retained, sketch.is_exact) == (twin.n, twin.retained, twin.is_exact)
        assert sketch.quantiles(RANKS) == twin.quantiles(RANKS)
        if n <= 8:  # every kind lists this many
            assert sketch._impl is None and sketch.n == n


@pytest.mark.parametrize("kind", LISTED_KINDS)
def test_merges_across_the_list_limit_stay_exact(kind: str) -> None:
    rng = np.random.default_rng(18)
    sizes = [1, 3, 0, 5, 2, 8, 1, 4]
    merged, everything = Sketch(kind), []
    for size in sizes:
        part = Sketch(kind)
        values = rng.lognormal(5, 1, size)
        part.update_many(values)
        merged.merge(part)
        everything.extend(values.tolist())
        dtype = np.float32 if kind.startswith("req") else np.float64
        stored = np.asarray(everything, dtype=dtype).astype(np.float64).tolist()
        if everything and merged.is_exact:
            assert merged.quantiles(RANKS) == [percentile_cont(stored, r) for r in RANKS]
    assert merged.n == sum(sizes)
    eager = Sketch(kind)
    eager._materialise()
    for value in everything:
        eager.update(value)
    assert materialised(merged).quantiles(RANKS) == eager.quantiles(RANKS) or not eager.is_exact


@pytest.mark.parametrize("n", [1, 3, 100])  # listed, and a library object
def test_values_past_float32_are_stored_as_its_largest(n: int) -> None:
    """REQ stores float32: 1e39 would be inf and the quantiles around it NaN."""
    largest = float(np.finfo(np.float32).max)
    one_by_one, at_once = Sketch("req-hra-k128"), Sketch("req-hra-k128")
    for value in [1.0] * (n - 1) + [1e39]:
        one_by_one.update(value)
    at_once.update_many(np.array([1.0] * (n - 1) + [1e300]))
    for sketch in (one_by_one, at_once, Sketch.deserialize("req-hra-k128", at_once.serialize())):
        quantiles = sketch.quantiles([0.0, 0.5, 1.0])
        assert all(math.isfinite(q) for q in quantiles) and quantiles[-1] == largest
    kll = Sketch("kll-k200")
    kll.update(1e300)  # float64 items: stored as given
    assert kll.quantiles([1.0]) == [1e300]
