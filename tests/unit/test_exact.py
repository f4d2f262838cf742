"""Exact sums and fingerprints: order independence and exactness against Fractions."""

from __future__ import annotations

import functools
import math
import random
from fractions import Fraction

import numpy as np

from streamagg import exact


def exact_fraction(values: list[float]) -> Fraction:
    return sum((Fraction(v) for v in values), Fraction(0))


def test_sum_is_exact_and_correctly_rounded() -> None:
    rng = random.Random(3)
    for _ in range(200):
        values = [rng.lognormvariate(5, 3) * rng.choice([1e-9, 1, 1e9]) for _ in range(rng.randrange(1, 60))]
        total = exact.exact_sum(values)
        assert sum((Fraction(p) for p in total), Fraction(0)) == exact_fraction(values)
        assert exact.rounded(total) == math.fsum(values)


def test_sum_does_not_depend_on_order_or_grouping() -> None:
    rng = random.Random(5)
    values = [rng.random() * 10 ** rng.randrange(-8, 8) for _ in range(500)]
    whole = exact.rounded(exact.exact_sum(values))
    for _ in range(20):
        rng.shuffle(values)
        cut = rng.randrange(len(values))
        left = exact.exact_sum(values[:cut])
        right = exact.exact_sum(values[cut:])
        assert exact.rounded(exact.add(left, right)) == whole
        assert exact.rounded(exact.add(right, left)) == whole


def test_add_one_gives_the_parts_the_general_way_gives() -> None:
    """The one-value fast path against the general one, part for part: magnitudes far apart
    (an error part), cancellation to zero, subnormals, overflow, infinite totals, zero, and the
    negative values and totals the state never holds (TwoSum of opposite signs can overflow)."""
    rng = random.Random(11)
    big, tiny = 1.7976931348623157e308, 5e-324
    values = [0.0, 1.0, 0.1, 1e16, 1e-16, 2.0**53, 2.0**53 + 2, big, big / 2, tiny, 3 * tiny, 1e308, math.inf]
    values += [rng.lognormvariate(5, 3) * rng.choice([1e-300, 1e-9, 1, 1e9, 1e300]) for _ in range(300)]
    totals = [exact.ZERO, exact.exact_sum([math.inf]), exact.exact_sum([1.0, 1e-30]), exact.exact_sum([big, big / 4])]
    totals += [exact.exact_sum([value]) for value in values] + [exact.exact_sum([-value]) for value in values]
    values += [-value for value in values] + [2.9937604643020797e292]
    for total in totals:
        for value in values:
            assert exact.add_one(total, value) == exact._add_exactly(total, (value,)), (total, value)


def test_naive_float_sum_would_differ() -> None:
    """The reason for all this: plain accumulation depends on order."""
    values = [1e16, 1.0, 1.0, 0.1, 0.2, 0.3]
    assert sum(values) != sum(reversed(values))
    assert exact.rounded(exact.exact_sum(values)) == exact.rounded(exact.exact_sum(list(reversed(values))))


def test_empty_and_overflow() -> None:
    assert exact.rounded(exact.ZERO) == 0.0
    assert exact.rounded(exact.exact_sum([1.7e308, 1.7e308])) == math.inf
    assert exact.rounded(exact.add(exact.exact_sum([1.7e308, 1.7e308]), [1.0])) == math.inf


def test_a_finite_sum_near_the_float_range_is_finite_in_any_order() -> None:
    """fsum refuses a partial sum past the float range even when the total is finite: the largest
    float below max, 2**970 and 2**971 - 2**918 sum to max exactly rounded, whichever order."""
    below_max = math.nextafter(1.7976931348623157e308, 0)
    values = [below_max, 2.0**970, 2.0**971 - 2.0**918]
    want = float(exact_fraction(values))
    assert want == 1.7976931348623157e308
    rng = random.Random(7)
    for _ in range(12):
        rng.shuffle(values)
        total = exact.exact_sum(values)
        assert exact.rounded(total) == want
        assert sum((Fraction(p) for p in total), Fraction(0)) == exact_fraction(values)
        assert exact.rounded(exact.add(exact.exact_sum(values[:1]), values[1:])) == want
    # and past the midpoint above max the correctly rounded sum is +inf, in any order too
    assert exact.rounded(exact.exact_sum([1.7976931348623157e308, 2.0**970])) == math.inf
    assert exact.rounded(exact.exact_sum([2.0**970, 1.7976931348623157e308, 1.0, -1.0])) == math.inf


def test_fingerprints_are_order_independent_and_sensitive() -> None:
    rng = np.random.default_rng(1)
    values = rng.lognormal(5, 1, 1000)
    fp = functools.reduce(exact.combine_fingerprints, exact.fingerprints(values).tolist())
    shuffled = rng.permutation(values)
    assert exact.combine_fingerprints(int(np.add.reduce(exact.fingerprints(shuffled))), 0) == fp
    changed = values.copy()
    changed[10] = np.nextafter(changed[10], np.inf)
    assert functools.reduce(exact.combine_fingerprints, exact.fingerprints(changed).tolist()) != fp


def test_negative_zero_fingerprints_like_zero() -> None:
    assert exact.fingerprints(np.array([-0.0]))[0] == exact.fingerprints(np.array([0.0]))[0]


def test_signed_round_trip() -> None:
    for value in (0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1):
        signed = exact.to_signed64(value)
        assert -(1 << 63) <= signed < 1 << 63
        assert exact.from_signed64(signed) == value
