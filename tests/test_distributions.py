"""The input distributions keep their promises: shape, exactness in the dtype, determinism, and
each class's property (κ, constant rows, variance near ε, overflowing squares, subnormals,
non-finite rows)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from conformance.distributions import (
    DISTRIBUTIONS,
    KAPPA_TARGETS,
    NONFINITE_ROW_KINDS,
    QUICK_DISTRIBUTIONS,
    describe,
    draw,
    draw_affine,
    draw_grad,
    kappa,
    kappa_cap,
    nonfinite_kinds,
    target_kappa,
)

DTYPES = ("float64", "float32", "float16", "bfloat16")
NUMPY_TYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
}
#: Significand bits (hidden bit included), from the dtypes themselves.
PRECISION = {name: int(ml_dtypes.finfo(t).nmant) + 1 for name, t in NUMPY_TYPES.items()}
LARGE_MEAN = tuple(KAPPA_TARGETS)
FLOAT16_MAX = float(np.finfo(np.float16).max)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def assert_exact(values: np.ndarray, dtype: str) -> None:
    """Every value survives a round trip through ``dtype`` unchanged (NaN stays NaN)."""
    __tracebackhide__ = True
    assert values.dtype == np.float64, f"values are {values.dtype}, not float64"
    back = values.astype(NUMPY_TYPES[dtype]).astype(np.float64)
    same = (back == values) | (np.isnan(back) & np.isnan(values))
    if not same.all():
        index = tuple(int(i) for i in np.argwhere(~same)[0])
        raise AssertionError(
            f"{int((~same).sum())} / {values.size} values are not exact in {dtype}; "
            f"first at {index}: {values[index]!r} becomes {back[index]!r}"
        )


def row_kind(row: np.ndarray) -> str:
    """The non-finite kind of a row, judged from its values alone."""
    nans = int(np.isnan(row).sum())
    pos, neg = int((row == np.inf).sum()), int((row == -np.inf).sum())
    return {
        (1, 0, 0): "nan",
        (0, 1, 0): "+inf",
        (0, 0, 1): "-inf",
        (0, 1, 1): "+-inf",
        (0, 0, 0): "clean",
    }.get((nans, pos, neg), f"unexpected nan={nans} +inf={pos} -inf={neg}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_shape_exactness_and_finiteness(name: str, dtype: str) -> None:
    for rows, n in ((1, 1), (4, 1), (7, 2), (10, 33), (6, 256), (0, 5)):
        x = draw(name, rows, n, dtype, rng(), eps=1e-5)
        assert x.shape == (rows, n)
        assert_exact(x, dtype)
        if name != "nonfinite":
            assert np.isfinite(x).all(), f"{name} drew non-finite values in {dtype}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_same_seed_same_values_other_seed_other_values(name: str, dtype: str) -> None:
    first = draw(name, 8, 16, dtype, rng(7), eps=1e-6)
    again = draw(name, 8, 16, dtype, rng(7), eps=1e-6)
    other = draw(name, 8, 16, dtype, rng(8), eps=1e-6)
    assert np.array_equal(first, again, equal_nan=True)
    assert not np.array_equal(first, other, equal_nan=True)


def test_quick_distributions_keep_every_class() -> None:
    def family(name: str) -> str:
        return "large_mean" if name.startswith("large_mean") else name

    assert set(QUICK_DISTRIBUTIONS) <= set(DISTRIBUTIONS)
    assert {family(n) for n in QUICK_DISTRIBUTIONS} == {family(n) for n in DISTRIBUTIONS}


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_describe_is_one_line(name: str) -> None:
    text = describe(name)
    assert text
    assert "\n" not in text


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown distribution"):
        draw("gaussian", 2, 2, "float32", rng(), eps=1e-5)
    with pytest.raises(ValueError, match="unknown distribution"):
        describe("gaussian")
    with pytest.raises(ValueError, match="unsupported dtype"):
        draw("normal", 2, 2, "int8", rng(), eps=1e-5)
    with pytest.raises(ValueError, match="weight"):
        draw_affine("scale", 4, "float32", rng())


@pytest.mark.parametrize("dtype", DTYPES)
def test_kappa_cap_keeps_four_ulps_of_spread(dtype: str) -> None:
    # At κ = |μ|/s the spread is s/ulp(μ) >= 2^(p-1)/κ ulps; the cap leaves at least 4.
    assert 2.0 ** (PRECISION[dtype] - 1) / kappa_cap(dtype) == 4.0
    for name in LARGE_MEAN:
        assert target_kappa(name, dtype) == min(KAPPA_TARGETS[name], kappa_cap(dtype))
    assert target_kappa("large_mean_kmax", dtype) == kappa_cap(dtype)


@pytest.mark.parametrize("eps", [1e-5, 1e-12, 0.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LARGE_MEAN)
def test_large_mean_reaches_its_kappa(name: str, dtype: str, eps: float) -> None:
    x = draw(name, 16, 128, dtype, rng(3), eps=eps)
    target = target_kappa(name, dtype)
    k = kappa(x, eps)
    assert ((k >= target / 3) & (k <= target * 3)).all(), (
        f"κ per row {k} is not within a factor 3 of {target}"
    )
    # The spread stays resolvable: a row takes several distinct values of the dtype.
    distinct = [np.unique(row).size for row in x]
    assert min(distinct) >= 4, f"rows take only {distinct} distinct values"


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_rows(dtype: str) -> None:
    x = draw("constant", 9, 17, dtype, rng(1), eps=1e-5)
    assert (x == x[:, :1]).all(), "a row is not constant"
    values = x[:, 0]
    assert 0.0 in values
    assert 1.0 in values
    assert (values < 0).any()
    assert (np.abs(values) >= 1000).any()
    single = draw("constant", 5, 1, dtype, rng(1), eps=1e-5)
    assert single.shape == (5, 1)


@pytest.mark.parametrize("eps", [1e-5, 1e-6, 1e-12])
@pytest.mark.parametrize("dtype", DTYPES)
def test_near_eps_variance_is_near_eps(dtype: str, eps: float) -> None:
    x = draw("near_eps", 32, 64, dtype, rng(5), eps=eps)
    mean = x.mean(axis=1, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=1)
    ratio = variance / eps
    assert ((ratio >= 0.1) & (ratio <= 10)).all(), f"variance / eps = {ratio}"
    # The mean stays within about one spread, so ε matters for RMSNorm too.
    assert (np.abs(mean[:, 0]) <= 1.5 * np.sqrt(variance)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_near_eps_depends_on_eps(dtype: str) -> None:
    small = draw("near_eps", 4, 32, dtype, rng(2), eps=1e-6)
    large = draw("near_eps", 4, 32, dtype, rng(2), eps=1e-2)
    assert large.std(axis=1).min() > small.std(axis=1).max()


@pytest.mark.parametrize("dtype", DTYPES)
def test_overflow_squares(dtype: str) -> None:
    x = draw("overflow_squares", 9, 50, dtype, rng(4), eps=1e-5)
    magnitude = np.abs(x)
    assert (magnitude * magnitude > FLOAT16_MAX).all()
    assert (magnitude < FLOAT16_MAX).all()
    assert_exact(x, "float16")
    assert_exact(x, "bfloat16")
    assert (x > 0).all(axis=1).any(), "no all-positive row"
    assert (x < 0).all(axis=1).any(), "no all-negative row"


def test_overflow_squares_are_the_same_for_every_dtype() -> None:
    draws = [draw("overflow_squares", 6, 40, d, rng(9), eps=1e-5) for d in DTYPES]
    for other in draws[1:]:
        assert np.array_equal(draws[0], other)


@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormal_values(dtype: str) -> None:
    info = ml_dtypes.finfo(NUMPY_TYPES[dtype])
    x = draw("subnormal", 10, 40, dtype, rng(6), eps=1e-5)
    nonzero = x[x != 0]
    assert (np.abs(nonzero) < float(info.smallest_normal)).all()
    assert (np.abs(nonzero) >= float(info.smallest_subnormal)).all()
    assert (x != 0).any(axis=1).all(), "a row holds no subnormal"
    has_zero = (x == 0).any(axis=1)
    assert has_zero.any(), "no row is mixed with zeros"
    assert not has_zero.all(), "every row is mixed with zeros"


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_rows_hold_the_promised_kinds(dtype: str) -> None:
    x = draw("nonfinite", 12, 16, dtype, rng(2), eps=1e-5)
    observed = tuple(row_kind(row) for row in x)
    assert observed == nonfinite_kinds(12, 16)
    assert set(observed) == set(NONFINITE_ROW_KINDS)
    narrow = draw("nonfinite", 5, 1, dtype, rng(2), eps=1e-5)
    assert tuple(row_kind(row) for row in narrow) == nonfinite_kinds(5, 1)
    assert "+-inf" not in nonfinite_kinds(5, 1)


def test_kappa_on_rows_worked_by_hand() -> None:
    # [1, 3]: mean 2, biased variance 1, mean square 5.
    assert kappa([[1.0, 3.0]], 0.0)[0] == math.sqrt(5.0)
    assert kappa([1.0, 3.0], 0.0, center=False)[0] == 1.0
    assert kappa([[1.0, 3.0]], 3.0)[0] == math.sqrt(5.0) / 2.0
    # The same rows in float64's subnormal range, where squares underflow to 0.
    tiny = 5e-324
    assert kappa([[tiny, 3 * tiny]], 0.0)[0] == math.sqrt(5.0)
    # Constant rows: ill-posed without ε; a non-finite row has no κ.
    constant = kappa([[2.0, 2.0], [0.0, 0.0]], 0.0)
    assert np.isinf(constant).all()
    assert np.isnan(kappa([[1.0, np.nan], [np.inf, 1.0]], 1e-5)).all()


def test_kappa_is_unchanged_by_power_of_two_scaling() -> None:
    x = draw("normal", 6, 33, "float64", rng(11), eps=1e-5)
    assert np.array_equal(kappa(x, 1e-5), kappa(x * 2.0**300, 1e-5 * 2.0**600))


@pytest.mark.parametrize("params", [1, 2, 3, 768, (4, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_weight(dtype: str, params: int | tuple[int, ...]) -> None:
    w = draw_affine("weight", params, dtype, rng(3))
    shape = (params,) if isinstance(params, int) else params
    assert w.shape == shape
    assert_exact(w, dtype)
    assert (w != 0).all()
    assert ((np.abs(w) >= 0.5) & (np.abs(w) <= 2)).all(), "weights are not around 1"
    if w.size >= 2:
        assert (w > 0).any(), "no positive weight"
        assert (w < 0).any(), "no negative weight"
    assert (w > 0).mean() >= 0.5, "weights are not mostly positive"


@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_bias(dtype: str) -> None:
    b = draw_affine("bias", 768, dtype, rng(3))
    assert b.shape == (768,)
    assert_exact(b, dtype)
    assert abs(b.mean()) < 0.1 < b.std()


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad(dtype: str) -> None:
    for shape in ((1,), (3, 7), (2, 3, 4, 5)):
        g = draw_grad(shape, dtype, rng(4))
        assert g.shape == shape
        assert_exact(g, dtype)
        assert g.any()
        assert np.isfinite(g).all()
    assert draw_grad((0, 3), dtype, rng(4)).shape == (0, 3)
