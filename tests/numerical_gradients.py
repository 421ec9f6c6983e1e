"""The expected gradients of a normalisation: numerical differentiation in mpmath.

The forward map is written here again, from the formulas, in mpmath:

    mu = mean(x) (0 for RMS norms),  var = sum (x - mu)**2 / (n or n - 1)
    r = sqrt(var + eps) (eps inside) or sqrt(var) + eps (eps outside)
    y = b + (weight_offset + w) (x - mu) / r

and the scalar loss L = sum(grad_output * y) (+ sum(grad_residual_out * z) for the fused adds,
whose normalised tensor is z = input + alpha * residual; deep_norm: z = alpha * input +
sublayer_output). The gradient with respect to each input, weight, bias and residual element is
``mpmath.diff`` of L in that element, evaluated where the forward pass evaluates it (at z
rounded into the input dtype when add_rounding="dtype": that rounding is the identity in the
backward pass).

Numerical differentiation is not exact, so its error is estimated: the derivative is computed
at 200 and at 240 bits, and the error bound is 8 times their difference plus 2**-160 times the
size of the terms of L (mpmath.diff evaluates L at twice the working precision with a step of
2**-(prec + 10), so the central difference is good to ~2**-(prec + 30) of those terms). The
reference gradient must lie between the correct roundings of the two ends of that interval:
equal to the correctly rounded derivative unless the derivative is within the numerical error
of a rounding boundary, where either neighbour is accepted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import mpmath
import numpy as np
from oracles import fmt_of, round_fraction, to_float64, ulp_of

#: Working precisions (bits) of the two numerical derivatives whose difference bounds the error.
PRECISIONS = (200, 240)
#: Bound on mpmath.diff's error relative to the size of the terms of the loss (see docstring).
DIFF_RELATIVE_ERROR = Fraction(1, 2**160)


@dataclass
class Group:
    """Flat indices of the normalised tensor forming one group; ``fixed``: given (mean, var)."""

    members: list[int]
    fixed: tuple[float, float] | None = None


@dataclass
class Problem:
    """A normalisation with its grad_output, in a layout-free form (flat indices)."""

    fmt: str
    z: list  # the normalised values (exact rationals), flat
    grad_output: np.ndarray  # flat
    groups: list[Group]
    param_index: list[int]  # flat element -> weight/bias index
    weight: np.ndarray | None
    bias: np.ndarray | None
    eps: float
    center: bool = True
    unbiased: bool = False
    outside: bool = False
    weight_offset: float = 0.0
    grad_z_extra: np.ndarray | None = None  # grad_residual_out: L += sum(g_res * z)
    group_of: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for gi, g in enumerate(self.groups):
            for k in g.members:
                self.group_of[k] = gi


def _mp(v) -> mpmath.mpf:
    """A dyadic rational (every value here: floats and their exact sums) as an exact mpf."""
    q = Fraction(v)
    return mpmath.mpf(q.numerator) / q.denominator


def group_loss(p: Problem, gi: int, zval: Callable, wval: Callable, bval: Callable):
    """sum over the group of grad_output * y, and the size of its terms (for the error bound)."""
    group = p.groups[gi]
    zs = [zval(k) for k in group.members]
    n = len(zs)
    if group.fixed is not None:
        mu, var = (_mp(v) for v in group.fixed)
    else:
        mu = mpmath.fsum(zs) / n if p.center else mpmath.mpf(0)
        var = mpmath.fsum((z - mu) ** 2 for z in zs) / (n - 1 if p.unbiased else n)
    eps = _mp(p.eps)
    r = mpmath.sqrt(var) + eps if p.outside else mpmath.sqrt(var + eps)
    total, size = mpmath.mpf(0), mpmath.mpf(0)
    for k, z in zip(group.members, zs, strict=True):
        c = p.param_index[k]
        scale = _mp(p.weight_offset) + wval(c) if p.weight is not None else mpmath.mpf(1)
        shift = bval(c) if p.bias is not None else mpmath.mpf(0)
        g = _mp(p.grad_output[k])
        total += g * (shift + scale * (z - mu) / r)
        size += abs(g) * (abs(shift) + abs(scale * (z - mu) / r) + abs(scale * mu / r))
    return total, size


def _derivative(f: Callable, t0: float) -> tuple[mpmath.mpf, mpmath.mpf]:
    """mpmath.diff of f at t0, and a bound on its error (see the module docstring)."""
    values, size = [], mpmath.mpf(0)
    for prec in PRECISIONS:
        with mpmath.workprec(prec):
            values.append(mpmath.diff(lambda t: f(t)[0], _mp(t0)))
            size = f(_mp(t0))[1]
    with mpmath.workprec(PRECISIONS[-1]):
        err = 8 * abs(values[1] - values[0]) + _mp(DIFF_RELATIVE_ERROR) * (1 + size)
    return values[1], err


def _rounding_interval(d, err, fmt: str) -> tuple[float, float]:
    """Correct roundings of d - err and d + err: the correctly rounded derivative lies between."""
    with mpmath.workprec(PRECISIONS[-1] + 20):
        ends = (d - err, d + err)
    return round_fraction(_fraction(ends[0]), fmt), round_fraction(_fraction(ends[1]), fmt)


def _fraction(v: mpmath.mpf) -> Fraction:
    sign, man, exp, _ = v._mpf_
    q = Fraction(int(man)) * Fraction(2) ** int(exp)
    return -q if sign else q


def z_gradient(p: Problem, k: int, coefficient: float) -> tuple[float, float]:
    """d L / d t where z_k = z_k0 + coefficient * t (an input element moving z_k)."""
    gi = p.group_of[k]
    z0 = p.z
    extra = 0.0 if p.grad_z_extra is None else p.grad_z_extra[k]
    c = _mp(coefficient)

    def f(t):
        zk = _mp(z0[k]) + c * t
        loss, size = group_loss(
            p, gi, lambda j: zk if j == k else _mp(z0[j]), _param(p.weight), _param(p.bias)
        )
        return loss + _mp(extra) * zk, size + abs(_mp(extra) * zk)

    d, err = _derivative(f, 0.0)
    return _rounding_interval(d, err, p.fmt)


def _param(values: np.ndarray | None) -> Callable:
    return lambda c: _mp(values[c]) if values is not None else mpmath.mpf(0)


def param_gradient(p: Problem, which: str, c: int) -> tuple[float, float]:
    """d L / d weight[c] or d L / d bias[c]: every group with an element of channel c."""
    values = p.weight if which == "weight" else p.bias
    groups = sorted({p.group_of[k] for k, pc in enumerate(p.param_index) if pc == c})

    def f(t):
        def moved(j):
            return t if j == c else _mp(values[j])

        wval = moved if which == "weight" else _param(p.weight)
        bval = moved if which == "bias" else _param(p.bias)
        terms = [group_loss(p, gi, lambda j: _mp(p.z[j]), wval, bval) for gi in groups]
        return mpmath.fsum(t[0] for t in terms), mpmath.fsum(t[1] for t in terms)

    d, err = _derivative(f, float(values[c]))
    return _rounding_interval(d, err, p.fmt)


def expected_gradients(p: Problem, shape: tuple[int, ...], coefficients: dict[str, float]):
    """{field: (lo, hi)} arrays of rounding intervals for each gradient the function returns."""
    out = {}
    for name, coefficient in coefficients.items():
        pairs = [z_gradient(p, k, coefficient) for k in range(len(p.z))]
        out[name] = tuple(np.array([q[i] for q in pairs]).reshape(shape) for i in (0, 1))
    for which, values in (("weight", p.weight), ("bias", p.bias)):
        if values is not None:
            pairs = [param_gradient(p, which, c) for c in range(values.size)]
            out[which] = tuple(
                np.array([q[i] for q in pairs]).reshape(values.shape) for i in (0, 1)
            )
    return out


def assert_within_rounding(actual, lo, hi, *, fmt: str, backend: str, what: str, context: str):
    """lo <= actual <= hi elementwise (lo == hi: the correctly rounded value), dtype ``fmt``."""
    __tracebackhide__ = True
    if (backend == "torch") != hasattr(actual, "detach"):
        raise AssertionError(f"{what}: wrong array type {type(actual).__name__}\n{context}")
    if fmt_of(actual) != fmt:
        raise AssertionError(f"{what}: dtype {fmt_of(actual)}, expected {fmt}\n{context}")
    got = to_float64(actual)
    if got.shape != lo.shape:
        raise AssertionError(f"{what}: shape {got.shape}, expected {lo.shape}\n{context}")
    with np.errstate(invalid="ignore"):
        bad = ~((lo <= got) & (got <= hi))
    if not bad.any():
        return
    dist = np.where(bad, np.nan_to_num(np.minimum(abs(got - lo), abs(got - hi)), nan=np.inf), 0)
    worst = tuple(int(i) for i in np.unravel_index(np.argmax(dist), dist.shape))
    count = int(bad.sum())
    ulps = dist[worst] / ulp_of(float(lo[worst]), fmt)
    desired = f"{lo[worst]!r}" if lo[worst] == hi[worst] else f"[{lo[worst]!r}, {hi[worst]!r}]"
    raise AssertionError(
        f"{what}: not the correctly rounded derivative\n"
        f"Mismatched elements: {count} / {bad.size} ({100 * count / bad.size:.3g}%)\n"
        f"Worst element at index {worst}: {ulps:.3g} ulp of {fmt} away\n"
        f" ACTUAL:  {got[worst]!r} ({float(got[worst]).hex()})\n"
        f" DESIRED: {desired}\n{context}"
    )
