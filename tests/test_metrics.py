"""Metrics and grades: ulp distances against enumerated floats, compare() on hand-made cases.

The oracles are independent of the implementation's bit tricks: every float16 and bfloat16
value is enumerated and sorted (a distance is a difference of ranks), float32 and float64
distances are counted with ``np.nextafter``, and spacings come from ``np.spacing``.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from conformance import metrics
from conformance.results import GRADES, Metrics

NUMPY = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
}


def _all_finite(dtype: str) -> np.ndarray:
    """Every finite value of a 16-bit dtype, sorted, with -0 removed (it ranks as +0)."""
    with np.errstate(invalid="ignore"):  # the NaN patterns
        values = np.arange(1 << 16, dtype=np.uint16).view(NUMPY[dtype]).astype(np.float64)
    values = values[np.isfinite(values)]
    return np.unique(values)  # -0.0 == 0.0 collapses into one rank


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_ulp_distance_is_the_rank_difference(dtype: str) -> None:
    values = _all_finite(dtype)
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, values.size, (2, 20000))
    i[:3], j[:3] = 0, values.size - 1  # the widest distance, through zero
    got = metrics.ulp_distance(values[i], values[j], dtype)
    np.testing.assert_array_equal(got, np.abs(i - j).astype(np.float64))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_ulp_is_the_gap_to_the_next_value(dtype: str) -> None:
    values = _all_finite(dtype)
    positive = values[values >= 0]
    gaps = np.diff(positive)
    np.testing.assert_array_equal(metrics.ulp(positive[:-1], dtype), gaps)
    np.testing.assert_array_equal(metrics.ulp(-positive[:-1], dtype), gaps)


def _stepped(start: float, steps: int, dtype: Any) -> float:
    value = dtype(start)
    towards = dtype(np.inf) if steps > 0 else dtype(-np.inf)
    for _ in range(abs(steps)):
        value = np.nextafter(value, towards)
    return float(value)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@given(
    start=st.floats(allow_nan=False, allow_infinity=False, width=32),
    steps=st.integers(-40, 40),
)
@example(start=0.0, steps=-3)
@example(start=-0.0, steps=3)
@example(start=2.0**-149, steps=-2)
@example(start=1.0, steps=-1)
@example(start=float(np.finfo(np.float32).max), steps=-5)
def test_ulp_distance_counts_nextafter_steps(dtype: str, start: float, steps: int) -> None:
    kind = NUMPY[dtype]
    end = _stepped(start, steps, kind)
    if not np.isfinite(end):
        return
    origin = float(kind(start))
    assert metrics.ulp_distance(np.array([end]), np.array([origin]), dtype)[0] == abs(steps)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_ulp_matches_numpy_spacing(dtype: str) -> None:
    kind = NUMPY[dtype]
    finfo = np.finfo(kind)
    values = np.array([0.0, finfo.smallest_subnormal, finfo.tiny, 1.0, 1.5, 3.0, finfo.max / 3])
    values = np.concatenate([values, -values]).astype(kind)
    expected = np.spacing(np.abs(values)).astype(np.float64)  # the spacing at |value|
    np.testing.assert_array_equal(metrics.ulp(values.astype(np.float64), dtype), expected)


def test_ulp_of_non_finite_values() -> None:
    got = metrics.ulp(np.array([np.inf, -np.inf, np.nan]), "float32")
    assert got[0] == np.inf
    assert got[1] == np.inf
    assert np.isnan(got[2])


def test_signed_zeros_are_zero_apart() -> None:
    for dtype in NUMPY:
        assert metrics.ulp_distance(np.array([-0.0]), np.array([0.0]), dtype)[0] == 0


# -- compare -------------------------------------------------------------------------------------


def _compare(actual: Any, reference: Any, bound: Any, dtype: str = "float32") -> Metrics:
    return metrics.compare(
        np.asarray(actual, dtype=np.float64),
        np.asarray(reference, dtype=np.float64),
        np.asarray(bound, dtype=np.float64),
        dtype,
    )


def test_compare_counts_and_locates() -> None:
    reference = np.array([[1.0, 2.0, 4.0], [-1.0, 0.5, 8.0]])
    actual = reference.copy()
    actual[0, 1] = np.nextafter(np.float32(2.0), np.float32(3)).astype(np.float64)  # 1 ulp
    actual[1, 2] = 8.0 + 3 * 2.0**-20  # 3 ulps of float32 at 8
    bound = np.full(reference.shape, 2.0**-21)
    m = _compare(actual, reference, bound)
    assert m.n == 6
    assert m.mismatched == 1
    assert m.worst_index == (1, 2)
    assert m.max_abs_index == (1, 2)
    assert m.max_ulp == 3
    assert m.max_ratio == 6
    assert m.worst_ulp == 3
    assert m.worst_tolerance_ulp == 2.0**-21 / 2.0**-20
    assert m.frac_correctly_rounded == 4 / 6
    assert m.frac_faithful == 5 / 6
    assert m.max_rel_error == 3 * 2.0**-20 / 8
    assert m.nonfinite_mismatches == 0


def test_compare_bound_zero() -> None:
    m = _compare([1.0, 2.0], [1.0, 2.0], [0.0, 0.0])
    assert m.mismatched == 0
    assert m.max_ratio == 0
    m = _compare([1.0, 2.0], [1.0, 3.0], [0.0, 0.0])
    assert m.max_ratio == np.inf
    assert m.mismatched == 1


@pytest.mark.parametrize(
    ("actual", "reference", "bad"),
    [
        (np.nan, np.nan, 0),
        (1.0, np.nan, 1),
        (np.inf, np.nan, 1),
        (np.inf, np.inf, 0),
        (-np.inf, np.inf, 1),
        (1.0, np.inf, 1),
        (np.nan, 1.0, 1),
        (np.inf, 1.0, 1),
        (-np.inf, -np.inf, 0),
    ],
)
def test_non_finite_rules(actual: float, reference: float, bad: int) -> None:
    m = _compare([actual, 2.0], [reference, 2.0], [1.0, 1.0])
    assert m.nonfinite_mismatches == bad
    assert m.mismatched == bad
    assert m.max_ratio == (np.inf if bad else 0)
    assert m.frac_correctly_rounded == (0.5 if bad else 1.0)
    if bad:
        assert m.worst_index == (0,)


def test_worst_ties_go_to_the_larger_distance() -> None:
    reference = np.array([1.0, 1024.0])
    actual = np.array([1.0 + 2.0**-23, 1024.0 + 4 * 2.0**-13])  # 1 and 4 float32 ulps
    bound = np.abs(actual - reference) * 2  # both at ratio 0.5
    m = _compare(actual, reference, bound)
    assert m.max_ratio == 0.5
    assert m.worst_index == (1,)
    assert m.worst_ulp == 4


def test_percentiles_match_numpy() -> None:
    rng = np.random.default_rng(3)
    reference = rng.standard_normal(5000).astype(np.float32).astype(np.float64)
    steps = np.floor(np.exp(rng.uniform(0, 14, reference.size))) * (
        rng.random(reference.size) < 0.4
    )
    actual = reference * (1 + steps * 2.0**-23)
    actual = actual.astype(np.float32).astype(np.float64)
    ulps = metrics.ulp_distance(actual, reference, "float32")
    m = _compare(actual, reference, np.ones_like(reference))
    assert m.p50_ulp == np.percentile(ulps, 50, method="higher")
    assert m.p99_ulp == np.percentile(ulps, 99, method="higher")
    assert m.max_ulp == ulps.max()


def test_empty_arrays() -> None:
    m = _compare(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3)))
    assert m.n == 0
    assert m.mismatched == 0
    assert metrics.grade(m) == "correctly_rounded"


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        _compare(np.zeros(3), np.zeros(4), np.zeros(4))


def test_grades() -> None:
    one_ulp = float(np.nextafter(np.float32(1), np.float32(2)))
    cases = {
        "correctly_rounded": ([1.0], [1.0], [0.0]),
        "faithful": ([one_ulp], [1.0], [1.0]),
        "within_tolerance": ([1.0 + 2.0**-20], [1.0], [1.0]),
        "fail": ([1.5], [1.0], [0.25]),
    }
    assert tuple(cases) == GRADES
    for expected, (a, r, b) in cases.items():
        assert metrics.grade(_compare(a, r, b)) == expected
