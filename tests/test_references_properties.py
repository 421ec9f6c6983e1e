"""Mathematical properties of the references, checked with hypothesis.

Exact identities of the real-valued maps become bitwise identities of correctly rounded results:
two calls whose exact results coincide must return the same bits. Where an identity involves
the rounded outputs themselves (mean 0, variance sigma**2/(sigma**2 + eps)) the bound is derived
from the rounding (every output within half an ulp of the exact value), never a tolerance
literal. Agreement with ``torch.nn.functional`` in float64 uses the error bound derived in
``torch_float64_bound``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from oracles import FMT_NAMES, as_backend, sqrt_bracket, to_float64, ulp_of

import references as R

SLOW = settings(deadline=None)
U64 = 2.0**-53  # unit roundoff of float64

#: Constant C of the float64 error bound for torch.nn.functional (derivation in
#: ``torch_float64_bound``): 1 from the mean, 1 from the variance through the square root,
#: 6 for the roundings of the final arithmetic, all to first order in the unit roundoff.
TORCH_FLOAT64_BOUND_C = 8

#: Largest integer magnitude per dtype such that x + c stays an exact integer of the dtype
#: (|x|, |c| below half of 2**precision).
EXACT_INT = {"float64": 2**40, "float32": 2**22, "float16": 1000, "bfloat16": 120}


def assert_bitwise_equal(
    actual, desired, what: str, context: str = "", *, signed_zero: bool = True
) -> None:
    """Same dtype, shape and bits: NaN matches NaN; -0.0 differs from 0.0 unless not
    ``signed_zero`` (when the inputs differ in the sign of a zero: an exact zero has no sign,
    so the contract does not fix it).
    """
    __tracebackhide__ = True
    a = actual.detach().cpu() if hasattr(actual, "detach") else np.asarray(actual)
    d = desired.detach().cpu() if hasattr(desired, "detach") else np.asarray(desired)
    assert a.dtype == d.dtype, f"{what}: dtype {a.dtype} != {d.dtype}\n{context}"
    assert tuple(a.shape) == tuple(d.shape), f"{what}: shape {a.shape} != {d.shape}\n{context}"
    a64, d64 = to_float64(a), to_float64(d)
    same = (a64 == d64) & ((np.signbit(a64) == np.signbit(d64)) | (not signed_zero))
    same |= np.isnan(a64) & np.isnan(d64)
    if same.all():
        return
    bad = ~same
    worst = tuple(int(i) for i in np.argwhere(bad)[0])
    count = int(bad.sum())
    raise AssertionError(
        f"{what}: results differ although the exact results are equal\n"
        f"Mismatched elements: {count} / {bad.size} ({100 * count / bad.size:.3g}%)\n"
        f"First at index {worst}: ACTUAL {a64[worst]!r} DESIRED {d64[worst]!r}\n{context}"
    )


def values(fmt: str, n: int, limit: float = 1e3):
    floats = st.floats(-limit, limit, width=64 if fmt == "float64" else 32)
    return st.lists(st.one_of(floats, st.integers(-5, 5).map(float)), min_size=n, max_size=n)


def float64_rows(max_rows: int = 3, max_n: int = 6):
    shape = st.tuples(st.integers(1, max_rows), st.integers(2, max_n))
    return shape.flatmap(
        lambda s: values("float64", s[0] * s[1]).map(lambda v: np.array(v).reshape(s))
    )


# ---------------------------------------------------------------------------------------------
# Mean 0 and variance sigma^2/(sigma^2 + eps) of the rounded non-affine LayerNorm output


def _variance_target(var: Fraction, eps: Fraction, outside: bool) -> tuple[Fraction, Fraction]:
    """Bounds on (1/n) sum y_i**2 of the exact outputs: var/(var+eps) or var/(sigma+eps)**2."""
    if not outside:
        v = var / (var + eps)
        return v, v
    if var == 0:
        return Fraction(0), Fraction(0)
    magnitude = var.numerator.bit_length() - var.denominator.bit_length()
    lo, hi = sqrt_bracket(var, 200 - magnitude // 2)  # sigma to ~200 significant bits
    return lo**2 / (hi + eps) ** 2, hi**2 / (lo + eps) ** 2


@pytest.mark.parametrize("eps_placement", ["inside", "outside"])
@SLOW
@given(x=float64_rows(), eps=st.sampled_from([1e-5, 0.0, 1.0, 2.0**-60]))
@example(x=np.array([[2.0**52, 2.0**52 + 1, 2.0**52 + 2]]), eps=1e-5)
@example(x=np.array([[5e-324, 1e-323, 0.0]]), eps=0.0)
@example(x=np.array([[1e-3, -1e-3, 2e-3]]), eps=1e-5)
def test_layer_norm_output_has_mean_zero_and_known_variance(x, eps, eps_placement) -> None:
    """Exact outputs y: sum y = 0, (1/n) sum y**2 = var/(var+eps) (or var/(sigma+eps)**2).

    With y_hat = y + d_i and |d_i| <= h_i = ulp(y_hat_i)/2 (round to nearest):
        |sum y_hat| <= sum h_i,
        |(1/n) sum y_hat**2 - (1/n) sum y**2| <= (1/n) sum h_i (2 |y_hat_i| + h_i),
    since y_hat**2 - y**2 = d (2 y_hat - d). Both sides are evaluated exactly in rationals.
    """
    out = R.layer_norm(x, x.shape[-1:], None, None, eps, eps_placement=eps_placement)
    n = x.shape[-1]
    for row_x, row in zip(x, out, strict=True):
        assume(np.isfinite(row).all())
        ys = [Fraction(float(v)) for v in row]
        h = [Fraction(ulp_of(float(v), "float64")) / 2 for v in row]
        context = f"x = {row_x.tolist()!r}, eps = {eps!r}, output = {row.tolist()!r}"
        assert abs(sum(ys)) <= sum(h), f"output mean is not 0 to within rounding\n{context}"
        xs = [Fraction(float(v)) for v in row_x]
        mu = sum(xs) / n
        var = sum((v - mu) ** 2 for v in xs) / n
        lo, hi = _variance_target(var, Fraction(eps), eps_placement == "outside")
        second_moment = sum(y * y for y in ys) / n
        slack = sum(hi_ * (2 * abs(y) + hi_) for y, hi_ in zip(ys, h, strict=True)) / n
        assert lo - slack <= second_moment <= hi + slack, (
            f"output variance {float(second_moment)!r} is not {float(lo)!r} to within "
            f"rounding ({float(slack):.3g})\n{context}"
        )


# ---------------------------------------------------------------------------------------------
# Invariances


@st.composite
def integer_rows(draw, fmt: str):
    """Small integer rows and a shift c with every x + c an exact integer of ``fmt``."""
    limit = EXACT_INT[fmt]
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 4)))
    n = math.prod(shape)
    x = np.array(draw(st.lists(st.integers(-limit, limit), min_size=n, max_size=n)), float)
    return x.reshape(shape), float(draw(st.integers(-limit, limit)))


CENTERED_NORMS = {
    "layer_norm": lambda x, **kw: R.layer_norm(x, x.shape[-2:], eps=kw.pop("eps"), **kw),
    "group_norm": lambda x, **kw: R.group_norm(x, 1, eps=kw.pop("eps"), **kw),
    "batch_norm": lambda x, **kw: R.batch_norm(x, None, None, training=True, **kw),
    "instance_norm": lambda x, **kw: R.instance_norm(x, **kw),
}


@pytest.mark.parametrize("norm", list(CENTERED_NORMS))
@SLOW
@given(data=st.data())
def test_shift_invariance(norm: str, data: st.DataObject) -> None:
    """x and x + c (exact) have the same deviations x - mu: the outputs are identical bits."""
    fmt = data.draw(st.sampled_from(FMT_NAMES), label="dtype")
    x, c = data.draw(integer_rows(fmt), label="x, c")
    eps = data.draw(st.sampled_from([1e-5, 0.0]), label="eps")
    conv = {
        "variance": data.draw(st.sampled_from(["biased", "unbiased"]), label="variance"),
        "eps_placement": data.draw(st.sampled_from(["inside", "outside"]), label="eps_placement"),
    }
    fn = CENTERED_NORMS[norm]
    base = fn(as_backend(x, fmt, "numpy"), eps=eps, **conv)
    shifted = fn(as_backend(x + c, fmt, "numpy"), eps=eps, **conv)
    assert_bitwise_equal(shifted, base, f"{norm}(x + {c!r})", f"x = {x.tolist()!r}, {conv}")


@SLOW
@given(data=st.data())
def test_scale_invariance_without_eps(data: st.DataObject) -> None:
    """With eps = 0, x and 2**k x (exact) normalise to the same values."""
    fmt = data.draw(st.sampled_from(FMT_NAMES), label="dtype")
    x, _ = data.draw(integer_rows(fmt), label="x")
    k = data.draw(st.integers(-20, 20), label="k")
    scaled = x * 2.0**k
    assume(representable(scaled, fmt))
    base = R.layer_norm(as_backend(x, fmt, "torch"), x.shape[-1:], eps=0.0)
    other = R.layer_norm(as_backend(scaled, fmt, "torch"), x.shape[-1:], eps=0.0)
    assert_bitwise_equal(other, base, f"layer_norm(2**{k} x)", f"x = {x.tolist()!r}")


def representable(a: np.ndarray, fmt: str) -> bool:
    try:
        as_backend(a, fmt, "numpy")
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Layouts that are the same problem


def channel_inputs(fmt: str):
    shape = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))
    return shape.flatmap(
        lambda s: values(fmt, math.prod(s)).map(
            lambda v: np.array([_exact(t, fmt) for t in v]).reshape(s)
        )
    )


def _exact(v: float, fmt: str) -> float:
    """A value of ``fmt`` near v (bfloat16 values come from float32 ones)."""
    from oracles import round_fraction

    return round_fraction(Fraction(v), fmt)


conventions = st.fixed_dictionaries(
    {
        "variance": st.sampled_from(["biased", "unbiased"]),
        "eps_placement": st.sampled_from(["inside", "outside"]),
        "eps": st.sampled_from([1e-5, 0.0, 0.5]),
    }
)


@SLOW
@given(data=st.data())
def test_batch_norm_training_is_layer_norm_of_the_transpose(data: st.DataObject) -> None:
    """BatchNorm groups (channel c over N and L) are the rows of x.transpose(1, 0, 2)."""
    fmt = data.draw(st.sampled_from(FMT_NAMES), label="dtype")
    x = data.draw(channel_inputs(fmt), label="x")
    conv = data.draw(conventions, label="conventions")
    n, c, length = x.shape
    bn = R.batch_norm(as_backend(x, fmt, "numpy"), None, None, training=True, **conv)
    rows = np.ascontiguousarray(x.transpose(1, 0, 2).reshape(c, n * length))
    ln = R.layer_norm(as_backend(rows, fmt, "numpy"), (n * length,), **conv)
    back = np.ascontiguousarray(ln.reshape(c, n, length).transpose(1, 0, 2))
    assert_bitwise_equal(bn, back, "batch_norm(training=True)", f"x = {x.tolist()!r} {conv}")


@SLOW
@given(data=st.data())
def test_group_norm_one_group_is_layer_norm(data: st.DataObject) -> None:
    fmt = data.draw(st.sampled_from(FMT_NAMES), label="dtype")
    x = data.draw(channel_inputs(fmt), label="x")
    conv = data.draw(conventions, label="conventions")
    gn = R.group_norm(as_backend(x, fmt, "torch"), 1, **conv)
    ln = R.layer_norm(as_backend(x, fmt, "torch"), x.shape[1:], **conv)
    assert_bitwise_equal(gn, ln, "group_norm(num_groups=1)", f"x = {x.tolist()!r} {conv}")


@SLOW
@given(data=st.data())
def test_group_norm_one_channel_per_group_is_instance_norm(data: st.DataObject) -> None:
    fmt = data.draw(st.sampled_from(FMT_NAMES), label="dtype")
    x = data.draw(channel_inputs(fmt), label="x")
    conv = data.draw(conventions, label="conventions")
    c = x.shape[1]
    w = as_backend(np.array(data.draw(values(fmt, c, 10.0).map(_exact_all(fmt)))), fmt, "torch")
    b = as_backend(np.array(data.draw(values(fmt, c, 10.0).map(_exact_all(fmt)))), fmt, "torch")
    eps = conv.pop("eps")
    gn = R.group_norm(as_backend(x, fmt, "torch"), c, w, b, eps, **conv)
    inorm = R.instance_norm(as_backend(x, fmt, "torch"), None, None, w, b, eps=eps, **conv)
    assert_bitwise_equal(gn, inorm, "group_norm(num_groups=C)", f"x = {x.tolist()!r} {conv}")


def _exact_all(fmt: str):
    return lambda vs: [_exact(v, fmt) for v in vs]


@SLOW
@given(data=st.data())
def test_deep_norm_alpha_one_is_add_then_layer_norm(data: st.DataObject) -> None:
    """alpha = 1, add_rounding="dtype": deep_norm(x, s) = fused_add_layer_norm(x, s)[0] =
    layer_norm(x + s), with x + s by torch in the dtype. torch's 16-bit add is float32 add
    then rounding, a correct rounding since 24 >= 2p + 2 for p = 11 and p = 8.
    """
    fmt = data.draw(st.sampled_from(FMT_NAMES), label="dtype")
    shape = (data.draw(st.integers(1, 3), label="rows"), data.draw(st.integers(1, 5), label="n"))
    n = math.prod(shape)
    x = np.array(data.draw(values(fmt, n).map(_exact_all(fmt)), label="x")).reshape(shape)
    s = np.array(data.draw(values(fmt, n).map(_exact_all(fmt)), label="s")).reshape(shape)
    conv = data.draw(conventions, label="conventions")
    eps = conv.pop("eps")
    w = as_backend(np.arange(1.0, shape[1] + 1), fmt, "torch")
    b = as_backend(np.full(shape[1], 0.5), fmt, "torch")
    tx, ts = as_backend(x, fmt, "torch"), as_backend(s, fmt, "torch")
    deep = R.deep_norm(tx, ts, shape[1:], w, b, 1.0, eps, **conv)
    fused, residual_out = R.fused_add_layer_norm(tx, ts, shape[1:], w, b, eps, alpha=1.0, **conv)
    plain = R.layer_norm(tx + ts, shape[1:], w, b, eps, **conv)
    context = f"x = {x.tolist()!r}, s = {s.tolist()!r} {conv}"
    same = {"context": context, "signed_zero": False}  # -0.0 + -0.0 is -0.0 in torch
    assert_bitwise_equal(residual_out, tx + ts, "fused_add_layer_norm residual_out", **same)
    assert_bitwise_equal(deep, plain, "deep_norm(alpha=1)", **same)
    assert_bitwise_equal(fused, plain, "fused_add_layer_norm(alpha=1)", **same)
    rms_fused, _ = R.fused_add_rms_norm(tx, ts, shape[1:], w, eps, alpha=1.0, **conv)
    rms_plain = R.rms_norm(tx + ts, shape[1:], w, eps, **conv)
    assert_bitwise_equal(rms_fused, rms_plain, "fused_add_rms_norm(alpha=1)", **same)


# ---------------------------------------------------------------------------------------------
# Agreement with torch.nn.functional (float64, PyTorch's conventions)


def torch_float64_bound(x_hat, kappa, n: int, w, y, b) -> np.ndarray:
    """Bound on |torch - exact| for a normalisation computed by torch in float64.

    Notation: u = 2**-53, n the group size, s = sqrt(var + eps), x_hat = (x - mu)/s, kappa =
    max(1, rms(x)/s) (the condition number of the normalisation), y = b + w x_hat. PyTorch
    computes mu_hat, var_hat, r_hat = 1/sqrt(var_hat + eps) and (x - mu_hat) r_hat w + b. To
    first order in u:
    - mean: any summation order has |mu_hat - mu| <= n u mean|x| <= n u rms(x); through
      (x - mu)/s that is n u kappa |w| in y;
    - variance: two-pass, Welford and pairwise-merged Welford (ATen's) updates satisfy
      |var_hat - var| <= 2 n u rms(x) sigma <= 2 n u kappa s**2 (Chan, Golub, LeVeque's bound
      for updating formulas); the square root halves it: r_hat/r - 1 <= n u kappa, which is
      n u kappa |x_hat| |w| in y;
    - six roundings (eps add, sqrt, reciprocal, subtraction, the two products): 6 u |x_hat| |w|,
      which is <= 6 n u kappa |x_hat| |w| since n, kappa >= 1; the final add of b: u |y|.
    Total: (1 + 1 + 6) n u kappa (|x_hat| + 1) |w| + u |y|: C = 8. The remaining 2 u (|y| + |b|)
    covers the final add and second-order terms generously. Comparing with the reference adds
    the reference's own rounding, half an ulp of y. The rounding model |fl(a op b) - a op b| <=
    u |a op b| holds without underflow only, so the inputs stay clear of the subnormal range
    (torch folds w * rstd into one scale, whose underflow error x then multiplies).
    """
    c = TORCH_FLOAT64_BOUND_C
    return c * n * U64 * kappa * (np.abs(x_hat) + 1) * np.abs(w) + 2 * U64 * (np.abs(y) + np.abs(b))


def batch_condition(groups: np.ndarray, eps: float, center: bool):
    """kappa per group (rows of ``groups``) and x_hat per element, from float64 estimates.

    The bound is first order, so estimates of kappa and x_hat good to a few ulps suffice.
    """
    mu = groups.mean(axis=1, keepdims=True) if center else 0.0
    s = np.sqrt(((groups - mu) ** 2).mean(axis=1, keepdims=True) + eps)
    rms = np.sqrt((groups**2).mean(axis=1, keepdims=True))
    return np.maximum(1.0, rms / s), (groups - mu) / s


def check_against_torch(ref, want, *, x_hat, kappa, n, w, b, what: str, context: str) -> None:
    """|ref - torch| <= torch_float64_bound + ulp(ref)/2 elementwise (arrays of one shape)."""
    __tracebackhide__ = True
    got, expected = to_float64(ref), to_float64(want)
    half_ulp = np.vectorize(lambda v: ulp_of(float(v), "float64") / 2)(got)
    bound = torch_float64_bound(x_hat, kappa, n, w, got, b) + half_ulp
    err = np.abs(got - expected)
    bad = ~(err <= bound) & ~(np.isnan(got) & np.isnan(expected))
    if not bad.any():
        return
    ratio = np.where(bad, np.nan_to_num(err / bound, nan=np.inf), 0)
    worst = tuple(int(i) for i in np.unravel_index(np.argmax(ratio), bad.shape))
    raise AssertionError(
        f"{what}: reference and torch differ beyond the float64 error bound\n"
        f"Mismatched elements: {int(bad.sum())} / {bad.size}\n"
        f"Worst element at index {worst}: |diff| {err[worst]:.3g} > bound {bound[worst]:.3g}\n"
        f" ACTUAL (reference): {got[worst]!r}\n DESIRED (torch):    {expected[worst]!r}\n"
        f"{context}"
    )


def no_underflow(v: list[float]) -> np.ndarray:
    """The bound uses the rounding model without underflow: keep values off the subnormals."""
    return np.array([0.0 if abs(t) < 2.0**-500 else t for t in v])


@st.composite
def torch_case(draw):
    """float64 (N, C, L) input, per-channel w and b, eps; values away from underflow."""
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4)))
    x = no_underflow(draw(values("float64", math.prod(shape)))).reshape(shape)
    if draw(st.booleans()):  # a large mean with a small spread: kappa up to ~1e6
        x = x * 1e-3 + 1e3
    w = no_underflow(draw(values("float64", shape[1], 10.0)))
    b = no_underflow(draw(values("float64", shape[1], 10.0)))
    return x, w, b, draw(st.sampled_from([1e-5, 1e-2, 1.0]))


def _grouped(a: np.ndarray, norm: str) -> np.ndarray:
    """(N, C, L) -> rows = the groups of ``norm``."""
    n, c, length = a.shape
    if norm in ("layer_norm", "rms_norm"):
        return a.reshape(n * c, length)
    if norm == "group_norm":
        return a.reshape(n, c * length)
    if norm == "batch_norm":
        return a.transpose(1, 0, 2).reshape(c, n * length)
    return a.reshape(n * c, length)  # instance_norm


TORCH_NORMS = ["layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm"]


def _torch_calls(norm: str, x, w, b, eps):
    """(reference, torch) results and the per-element weight and bias (as (N, C, L) arrays)."""
    t = torch.from_numpy
    length = x.shape[-1]
    if norm in ("layer_norm", "rms_norm"):
        wl, bl = np.resize(w, length), np.resize(b, length)
        wb = (np.broadcast_to(wl, x.shape), np.broadcast_to(bl, x.shape))
        if norm == "layer_norm":
            args = (t(x), (length,), t(wl), t(bl), eps)
            return R.layer_norm(*args), F.layer_norm(*args), wb
        args = (t(x), (length,), t(wl), None)  # eps=None: 2**-52 in both
        return R.rms_norm(*args), F.rms_norm(*args), (wb[0], np.zeros(x.shape))
    wb = tuple(np.broadcast_to(p.reshape(1, -1, 1), x.shape) for p in (w, b))
    if norm == "group_norm":
        args = (t(x), 1, t(w), t(b), eps)
        return R.group_norm(*args), F.group_norm(*args), wb
    args = (t(x), None, None, t(w), t(b), True, 0.1, eps)
    fn = "batch_norm" if norm == "batch_norm" else "instance_norm"
    return getattr(R, fn)(*args), getattr(F, fn)(*args), wb


@pytest.mark.parametrize("norm", TORCH_NORMS)
@SLOW
@given(case=torch_case())
@example(case=(np.array([[[1e3, 1e3 + 1e-3, 1e3 - 2e-3, 1e3]]]), np.ones(1), np.zeros(1), 1e-5))
def test_float64_agrees_with_torch_within_error_bound(norm: str, case) -> None:
    """PyTorch's conventions (biased variance, eps inside) with batch statistics."""
    x, w, b, eps = case
    groups = _grouped(x, norm)
    assume(groups.shape[1] > 1 or norm in ("layer_norm", "rms_norm"))  # torch refuses n = 1
    ref, want, (wx, bx) = _torch_calls(norm, x, w, b, eps)
    if norm == "rms_norm":
        eps = 2.0**-52
    kappa, x_hat = batch_condition(groups, eps, center=norm != "rms_norm")
    context = f"x = {x.tolist()!r}, w = {w.tolist()!r}, b = {b.tolist()!r}, eps = {eps!r}"
    check_against_torch(
        _grouped(to_float64(ref), norm),
        _grouped(to_float64(want), norm),
        x_hat=x_hat,
        kappa=kappa,
        n=groups.shape[1],
        w=_grouped(np.asarray(wx), norm),
        b=_grouped(np.asarray(bx), norm),
        what=norm,
        context=context,
    )


@SLOW
@given(case=torch_case())
def test_float64_batch_norm_eval_agrees_with_torch(case) -> None:
    """Given statistics: no reduction, only the roundings (n = 1, kappa = 1 in the bound)."""
    x, w, b, eps = case
    c = x.shape[1]
    rm, rv = np.linspace(-1.0, 1.0, c), np.linspace(0.5, 2.0, c)
    t = torch.from_numpy
    args = (t(x), t(rm), t(rv), t(w), t(b), False, 0.1, eps)
    ref, want = R.batch_norm(*args), F.batch_norm(*args)

    def per_channel(p):
        return np.broadcast_to(p.reshape(1, -1, 1), x.shape)

    x_hat = (x - per_channel(rm)) / np.sqrt(per_channel(rv) + eps)
    check_against_torch(
        ref,
        want,
        x_hat=x_hat,
        kappa=1.0,
        n=1,
        w=per_channel(w),
        b=per_channel(b),
        what="batch_norm(training=False)",
        context=f"x = {x.tolist()!r}, w = {w.tolist()!r}, b = {b.tolist()!r}, eps = {eps!r}",
    )
