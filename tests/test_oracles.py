"""Tests of the exact oracle (tests/oracles.py) against independent correctly rounded sources.

- numpy's float64 -> float32 / float16 casts and ml_dtypes' float32 -> bfloat16 cast are single
  IEEE roundings (round to nearest even, subnormals kept, overflow to inf).
- Python's ``int / int`` is correctly rounded into binary64.
- ``math.sqrt`` (binary64) and ``numpy.sqrt`` on float32 are correctly rounded (IEEE 754 says so).
- mpmath at 400 bits for irrational A + B/sqrt(D): its value is 2**-390 close to the exact one, so
  rounding it agrees with rounding the exact value except within 2**-390 of a midpoint.
"""

from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import mpmath
import numpy as np
import oracles
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from oracles import (
    FORMATS,
    normalize_group,
    rational_sqrt,
    round_fraction,
    round_sqrt_expr,
    round_sqrt_plus_expr,
    sqrt_bracket,
)

NUMPY_CASTS = {"float32": np.float32, "float16": np.float16}


def _numpy_rounded(v: float, fmt: str) -> float:
    with np.errstate(over="ignore"):
        return float(np.array(v, dtype=np.float64).astype(NUMPY_CASTS[fmt]))


def assert_same_float(actual: float, expected: float, what: str) -> None:
    """Equal as values (NaN equal to NaN) and in the sign of zero."""
    __tracebackhide__ = True
    same = (math.isnan(actual) and math.isnan(expected)) or (
        actual == expected and math.copysign(1.0, actual) == math.copysign(1.0, expected)
    )
    if not same:
        pytest.fail(
            f"{what}\n ACTUAL:  {actual!r} ({float(actual).hex()})\n"
            f" DESIRED: {expected!r} ({float(expected).hex()})"
        )


def _boundary_values(fmt: str) -> list[float]:
    """Ties, midpoints +- a hair, subnormal ties, the overflow threshold, for a numpy format."""
    spec = FORMATS[fmt]
    p, emin, emax = spec.precision, spec.emin, spec.emax
    ulp1 = 2.0 ** (1 - p)
    tiny = 2.0 ** (emin - p + 1)  # smallest subnormal
    max_v = float(spec.max_value)
    half_ulp_max = 2.0 ** (emax - p)
    hair = 2.0**-60
    values = [
        1 + ulp1 / 2,  # tie, rounds down to even 1
        1 + 3 * ulp1 / 2,  # tie, rounds up to even
        1 + ulp1 / 2 * (1 + hair),
        1 + ulp1 / 2 * (1 - hair),
        tiny / 2,  # subnormal tie with 0: rounds to 0
        tiny * 1.5,  # tie between 1 and 2 quanta: rounds to 2
        tiny * 2.5,  # tie between 2 and 3 quanta: rounds to 2
        tiny / 2 * (1 + hair),
        tiny / 4,
        2.0**emin * (1 - 2.0**-p),  # tie between largest subnormal and smallest normal
        2.0**emin * (1 - 2.0 ** -(p + 1)),
        max_v,
        max_v + half_ulp_max,  # tie with 2**(emax+1): to inf
        max_v + half_ulp_max * (1 - hair),  # just below: stays max
        max_v * 4,
    ]
    return values + [-v for v in values]


@pytest.mark.parametrize("fmt", ["float32", "float16"])
@pytest.mark.parametrize("value_index", range(30))
def test_round_fraction_boundaries_match_numpy(fmt: str, value_index: int) -> None:
    v = _boundary_values(fmt)[value_index]
    assert_same_float(round_fraction(Fraction(v), fmt), _numpy_rounded(v, fmt), f"{fmt} of {v!r}")


@pytest.mark.parametrize("fmt", ["float32", "float16"])
@given(v=st.floats(allow_nan=False, allow_infinity=False))
@example(v=5e-324)
@example(v=-0.0)
@example(v=-1e-300)  # rounds to -0.0
@example(v=65519.99999999999)
@example(v=3.4028235677973366e38)
def test_round_fraction_matches_numpy_cast(fmt: str, v: float) -> None:
    v += 0.0  # a Fraction has no signed zero: -0.0 is the exact value 0, which rounds to +0.0
    assert_same_float(round_fraction(Fraction(v), fmt), _numpy_rounded(v, fmt), f"{fmt} of {v!r}")


@pytest.mark.parametrize("fmt", ["float32", "float16"])
@given(m=st.integers(-(2**60), 2**60), e=st.integers(-200, 40))
def test_round_fraction_matches_numpy_on_dyadics(fmt: str, m: int, e: int) -> None:
    """Dyadic values with up to 60 significant bits land near ties and subnormals often."""
    v = math.ldexp(m, e)
    if Fraction(v) != Fraction(m) * Fraction(2) ** e:
        return  # not exact in binary64
    assert_same_float(round_fraction(Fraction(v), fmt), _numpy_rounded(v, fmt), f"{fmt} of {v!r}")


@given(v=st.floats(width=32, allow_nan=False, allow_infinity=False))
@example(v=float(np.float32(1 + 2**-8)))  # tie: to 1
@example(v=float(np.float32(1 + 3 * 2**-8)))  # tie: up
@example(v=2.0**-134)  # half the smallest bfloat16 subnormal: tie to 0
@example(v=3 * 2.0**-134)
@example(v=float(np.finfo(np.float32).max))  # above bfloat16 max + half ulp: inf
@example(v=float.fromhex("0x1.fefffep127"))  # just below the overflow threshold
@example(v=float.fromhex("0x1.ff0000p127"))  # exactly max + half ulp: inf
def test_round_fraction_bfloat16_matches_ml_dtypes(v: float) -> None:
    """float32 values only: float32 -> bfloat16 is then the single rounding being tested."""
    v += 0.0  # no signed zero in a Fraction
    with np.errstate(over="ignore"):
        expected = float(np.float32(v).astype(ml_dtypes.bfloat16))
    assert_same_float(round_fraction(Fraction(v), "bfloat16"), expected, f"bfloat16 of {v!r}")


@given(
    num=st.integers(-(2**200), 2**200),
    den=st.integers(1, 2**200),
    shift=st.integers(-1200, 1100),
)
@example(num=1, den=3, shift=0)
@example(num=1, den=1, shift=-1075)  # tie with 0
@example(num=3, den=1, shift=-1075)  # tie between 1 and 2 quanta
@example(num=2**53 - 1, den=1, shift=971)  # max float64
@example(num=2**54 - 1, den=2, shift=971)  # max + half ulp: inf
def test_round_fraction_float64_matches_python_division(num: int, den: int, shift: int) -> None:
    if shift >= 0:
        num <<= shift
    else:
        den <<= -shift
    try:
        expected = num / den
    except OverflowError:
        expected = math.inf if num > 0 else -math.inf
    if expected == 0 and num < 0:
        expected = -0.0
    got = round_fraction(Fraction(num, den), "float64")
    assert_same_float(got, expected, f"float64 of {num}/{den}")


def test_round_fraction_zero_is_positive() -> None:
    assert_same_float(round_fraction(Fraction(0), "float16"), 0.0, "rounding of exact 0")


@given(q=st.fractions(min_value=0, max_denominator=10**12), k=st.integers(-20, 200))
def test_sqrt_bracket_contains_the_root(q: Fraction, k: int) -> None:
    lo, hi = sqrt_bracket(q, k)
    assert hi - lo == Fraction(2) ** -k
    assert lo >= 0
    assert lo * lo <= q <= hi * hi


@given(n=st.integers(0, 10**12), d=st.integers(1, 10**12))
def test_rational_sqrt_finds_exactly_the_square_ratios(n: int, d: int) -> None:
    root = rational_sqrt(Fraction(n * n, d * d))
    assert root == Fraction(n, d)
    q = Fraction(n * n + 1, d * d)
    assert (rational_sqrt(q) is None) == (n != 0)  # n*n+1 is a square only for n = 0


@pytest.mark.parametrize("fmt", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize(
    ("a", "b", "d", "expected"),
    [
        pytest.param(0, 1, Fraction(4), Fraction(1, 2), id="1/sqrt(4)"),
        pytest.param(1, 3, Fraction(9, 16), Fraction(5), id="1+3/sqrt(9/16)"),
        pytest.param(-2, 1, Fraction(1, 4), Fraction(0), id="cancels-to-zero"),
        pytest.param(0, 7, Fraction(49), Fraction(1), id="7/sqrt(49)"),
    ],
)
def test_sqrt_expr_rational_cases_are_exact(fmt: str, a, b, d, expected) -> None:
    assert_same_float(round_sqrt_expr(a, b, d, fmt), round_fraction(expected, fmt), "A+B/sqrt(D)")


@pytest.mark.parametrize("fmt", ["float64", "float32", "float16", "bfloat16"])
def test_sqrt_expr_ties_round_to_even(fmt: str) -> None:
    """A + B/sqrt(D) exactly on a midpoint (rational root): 1 + half an ulp -> 1."""
    half_ulp = Fraction(1, 2 ** FORMATS[fmt].precision)
    assert_same_float(round_sqrt_expr(1, 3 * half_ulp, Fraction(9), fmt), 1.0, "tie at 1")
    up = float(1 + 4 * half_ulp)  # 1 + 3 half-ulps is a tie between 1 + 1 ulp and 1 + 2 ulps
    assert_same_float(round_sqrt_expr(1, 6 * half_ulp, Fraction(4), fmt), up, "tie up")
    assert_same_float(
        round_sqrt_plus_expr(1, 9 * half_ulp, Fraction(4), Fraction(1), fmt), up, "outside tie"
    )


@given(d=st.floats(min_value=0, exclude_min=True, allow_infinity=False))
@example(d=2.0)
@example(d=5e-324)
@example(d=float.fromhex("0x1.fffffffffffffp1023"))
def test_sqrt_expr_float64_matches_math_sqrt(d: float) -> None:
    """d / sqrt(d) = sqrt(d), and math.sqrt is correctly rounded."""
    q = Fraction(d)
    assert_same_float(round_sqrt_expr(0, q, q, "float64"), math.sqrt(d), f"sqrt({d!r})")


@given(d=st.floats(min_value=0, exclude_min=True, allow_infinity=False, width=32))
def test_sqrt_expr_float32_matches_numpy_sqrt(d: float) -> None:
    q = Fraction(d)
    expected = float(np.sqrt(np.float32(d)))
    assert_same_float(round_sqrt_expr(0, q, q, "float32"), expected, f"sqrt({d!r})")


def _mpmath_rounded(value: mpmath.mpf, fmt: str) -> float:
    sign, man, exp, _ = value._mpf_
    exact = Fraction(int(man)) * Fraction(2) ** int(exp)
    return round_fraction(-exact if sign else exact, fmt)


finite64 = st.floats(min_value=-1e30, max_value=1e30, allow_nan=False)
positive64 = st.floats(min_value=1e-30, max_value=1e30)


@pytest.mark.parametrize("fmt", ["float64", "float32", "float16", "bfloat16"])
@settings(deadline=None)
@given(a=finite64, b=finite64, d=positive64, e=st.floats(0, 1e3))
@example(a=1.0, b=-1.0, d=1.0000000001, e=0.0)  # heavy cancellation
@example(a=1e20, b=1.0, d=2.0, e=0.0)  # B/r far below an ulp of A
def test_sqrt_exprs_match_high_precision_mpmath(fmt: str, a, b, d, e) -> None:
    with mpmath.workprec(400):
        inside = mpmath.mpf(a) + mpmath.mpf(b) / mpmath.sqrt(d)
        outside = mpmath.mpf(a) + mpmath.mpf(b) / (mpmath.sqrt(d) + mpmath.mpf(e))
    qa, qb, qd, qe = (Fraction(v) for v in (a, b, d, e))
    assert_same_float(round_sqrt_expr(qa, qb, qd, fmt), _mpmath_rounded(inside, fmt), "inside")
    assert_same_float(
        round_sqrt_plus_expr(qa, qb, qd, qe, fmt), _mpmath_rounded(outside, fmt), "outside"
    )


def test_sqrt_plus_expr_zero_denominator() -> None:
    """1/(sqrt(0) + 0) is +inf (the rstd of a constant group with eps = 0)."""
    assert round_sqrt_plus_expr(0, 1, Fraction(0), Fraction(0), "float32") == math.inf
    assert round_sqrt_expr(0, 1, Fraction(0), "float32") == math.inf


def _mp_normalized(xs, ws, bs, eps, *, center, unbiased, outside):
    """The normalised group in mpmath at the ambient precision (a second, independent formula)."""
    n = len(xs)
    mu = mpmath.fsum(xs) / n if center else 0
    var = mpmath.fsum((x - mu) ** 2 for x in xs) / (n - 1 if unbiased else n)
    r = mpmath.sqrt(var) + eps if outside else mpmath.sqrt(var + eps)
    return [b + w * (x - mu) / r for x, w, b in zip(xs, ws, bs, strict=True)]


@pytest.mark.parametrize("fmt", ["float64", "float32", "float16"])
@pytest.mark.parametrize("outside", [False, True], ids=["eps-inside", "eps-outside"])
@settings(deadline=None)
@given(
    xs=st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=6),
    eps=st.sampled_from([1e-5, 0.5, 2.0**-30]),
    center=st.booleans(),
    unbiased=st.booleans(),
    data=st.data(),
)
def test_normalize_group_matches_mpmath(fmt, outside, xs, eps, center, unbiased, data) -> None:
    n = len(xs)
    ws = data.draw(st.lists(st.floats(-10, 10), min_size=n, max_size=n), label="weights")
    bs = data.draw(st.lists(st.floats(-10, 10), min_size=n, max_size=n), label="biases")
    got = normalize_group(
        [Fraction(v) for v in xs],
        [Fraction(v) for v in ws],
        [Fraction(v) for v in bs],
        Fraction(eps),
        center=center,
        unbiased=unbiased,
        eps_outside=outside,
        fmt=fmt,
    )
    with mpmath.workprec(400):
        exact = _mp_normalized(
            [mpmath.mpf(v) for v in xs],
            [mpmath.mpf(v) for v in ws],
            [mpmath.mpf(v) for v in bs],
            mpmath.mpf(eps),
            center=center,
            unbiased=unbiased,
            outside=outside,
        )
    for i, (g, e) in enumerate(zip(got, exact, strict=True)):
        assert_same_float(g + 0.0, _mpmath_rounded(e, fmt) + 0.0, f"element {i}")


def test_oracle_layouts_agree_with_each_other() -> None:
    """group_norm with G = C is instance_norm; batch_norm's groups are the transposed rows."""
    rng = np.random.default_rng(7)
    x = rng.integers(-50, 50, size=(2, 3, 4)).astype(np.float64)
    w, b = np.array([1.0, -2.0, 0.5]), np.array([0.0, 1.0, 3.0])
    gn = oracles.group_norm(x, 3, w, b, 1e-5, fmt="float32")
    inorm = oracles.instance_norm(x, w, b, 1e-5, fmt="float32")
    np.testing.assert_array_equal(gn.output, inorm.output)
    bn = oracles.batch_norm_training(x, None, None, 1e-5, fmt="float32")
    rows = x.transpose(1, 0, 2).reshape(3, 8)
    ln = oracles.layer_norm(rows, (8,), fmt="float32")
    np.testing.assert_array_equal(bn.output, ln.output.reshape(3, 2, 4).transpose(1, 0, 2))
    one = oracles.group_norm(x, 1, fmt="float64")
    whole = oracles.layer_norm(x, (3, 4), fmt="float64")
    np.testing.assert_array_equal(one.output, whole.output)
    assert oracles.layer_norm(
        np.array([[0.0, 2.0]]), (2,), eps=0.0, fmt="float16"
    ).output.tolist() == [[-1.0, 1.0]]
