"""Backward functions of the references against numerical differentiation in mpmath.

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

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import mpmath
import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from oracles import add_scaled, as_backend, fmt_of, round_fraction, to_float64, ulp_of

import references as R

#: Working precisions (bits) of the two numerical derivatives whose difference bounds the error.
PRECISIONS = (200, 240)
#: Bound on mpmath.diff's error relative to the size of the terms of the loss (see docstring).
DIFF_RELATIVE_ERROR = Fraction(1, 2**160)
#: Each example differentiates every element (tens of high-precision evaluations of L each);
#: no per-example deadline (the profile decides how many examples).
BACKWARD = settings(deadline=None)
OPMATH_EPS = {"float64": 2.0**-52, "float32": 2.0**-23}


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


# ---------------------------------------------------------------------------------------------
# Cases


@dataclass
class BackwardCase:
    norm: str  # layer, rms, group, batch_train, batch_eval, instance, deep, fused_ln, fused_rms
    fmt: str
    backend: str
    x: np.ndarray
    grad_output: np.ndarray
    weight: np.ndarray | None
    bias: np.ndarray | None
    eps: float | None
    variance: str = "biased"
    eps_placement: str = "inside"
    weight_offset: float = 0.0
    extra: dict = field(default_factory=dict)

    def keywords(self) -> dict:
        return {
            "variance": self.variance,
            "eps_placement": self.eps_placement,
            "weight_offset": self.weight_offset,
        }

    def describe(self) -> str:
        lines = [
            f"{self.norm} backward, {self.fmt} ({self.backend}): eps={self.eps!r} "
            f"variance={self.variance!r} eps_placement={self.eps_placement!r} "
            f"weight_offset={self.weight_offset!r}"
        ]
        named = [("x", self.x), ("grad_output", self.grad_output), ("weight", self.weight)]
        for k, v in [*named, ("bias", self.bias), *self.extra.items()]:
            if isinstance(v, np.ndarray):
                lines.append(f"  {k} = np.array({v.tolist()!r})")
            elif v is not None:
                lines.append(f"  {k} = {v!r}")
        return "\n".join(lines)


def _values(fmt: str, n: int, limit: float = 8.0):
    floats = st.floats(-limit, limit, width=64 if fmt == "float64" else 32)
    element = st.one_of(floats, st.integers(-4, 4).map(float))
    return st.lists(element, min_size=n, max_size=n).map(np.array)


@st.composite
def backward_cases(draw, norm: str) -> BackwardCase:
    fmt = draw(st.sampled_from(["float64", "float32"]))
    channel_layout = norm in ("group", "batch_train", "batch_eval", "instance")
    if channel_layout:
        groups = draw(st.integers(1, 2)) if norm == "group" else 1
        channels = groups * draw(st.integers(1, 2)) if norm == "group" else draw(st.integers(1, 2))
        spatial = (draw(st.integers(1, 3)),)
        shape = (draw(st.integers(1, 2)), channels, *spatial)
        param_shape: tuple[int, ...] = (channels,)
    else:
        param_shape = (draw(st.integers(1, 4)),)
        shape = (draw(st.integers(1, 2)), *param_shape)
    size = math.prod(shape)
    x = draw(_values(fmt, size)).reshape(shape)
    grad = draw(_values(fmt, size)).reshape(shape)
    weight = bias = None
    if draw(st.booleans()):
        weight = draw(_values(fmt, param_shape[0], 4.0))
        if norm not in ("rms", "fused_rms") and draw(st.booleans()):
            bias = draw(_values(fmt, param_shape[0], 4.0))
    rms = norm in ("rms", "fused_rms")
    eps = draw(st.sampled_from([1e-5, 1e-2, 0.5, 0.0] + ([None] if rms else [])))
    case = BackwardCase(
        norm,
        fmt,
        draw(st.sampled_from(["torch", "numpy"])),
        x,
        grad,
        weight,
        bias,
        eps,
        variance=draw(st.sampled_from(["biased", "unbiased"])),
        eps_placement=draw(st.sampled_from(["inside", "outside"])),
        weight_offset=draw(st.sampled_from([0.0, 1.0])) if weight is not None else 0.0,
    )
    if channel_layout:
        case.extra["num_groups"] = groups
    if norm == "batch_eval":
        case.extra["running_mean"] = draw(_values(fmt, channels))
        running_var = np.abs(draw(_values(fmt, channels)))
        case.extra["running_var"] = np.where(running_var < 0.25, 0.25, running_var)
    if norm in ("deep", "fused_ln", "fused_rms"):
        case.extra["other"] = draw(_values(fmt, size)).reshape(shape)
        case.extra["alpha"] = draw(st.sampled_from([1.0, 0.5, 1 / 3, 8**0.25]))
        case.extra["add_rounding"] = draw(st.sampled_from(["dtype", "exact"]))
        if norm != "deep":
            case.extra["grad_residual_out"] = draw(_values(fmt, size)).reshape(shape)
    return case


# ---------------------------------------------------------------------------------------------
# From a case to the problem (groups), the reference call, and the check


def _normalised_values(case: BackwardCase) -> list:
    """z: the tensor the norm sees (after the add, rounded or exact), as exact rationals."""
    if case.norm not in ("deep", "fused_ln", "fused_rms"):
        return [Fraction(float(v)) for v in case.x.ravel()]
    alpha = case.extra["alpha"]
    ax, ay = (alpha, 1.0) if case.norm == "deep" else (1.0, alpha)
    if case.extra["add_rounding"] == "dtype":
        z = add_scaled(case.x, case.extra["other"], ax, ay, case.fmt)
        return [Fraction(float(v)) for v in z.ravel()]
    return [
        Fraction(ax) * Fraction(float(a)) + Fraction(ay) * Fraction(float(b))
        for a, b in zip(case.x.ravel(), case.extra["other"].ravel(), strict=True)
    ]


def build_problem(case: BackwardCase) -> Problem:
    shape = case.x.shape
    idx = list(np.ndindex(*shape))
    if case.norm in ("group", "batch_train", "batch_eval", "instance"):
        channels = shape[1]
        param_index = [i[1] for i in idx]
        if case.norm == "group":
            per = channels // case.extra["num_groups"]
            keys = [i[0] * case.extra["num_groups"] + i[1] // per for i in idx]
        elif case.norm == "instance":
            keys = [i[0] * channels + i[1] for i in idx]
        elif case.norm == "batch_train":
            keys = [i[1] for i in idx]
        else:
            keys = list(range(len(idx)))
    else:
        n = shape[-1]
        param_index = [k % n for k in range(len(idx))]
        keys = [k // n for k in range(len(idx))]
    members: dict[int, list[int]] = {}
    for k, key in enumerate(keys):
        members.setdefault(key, []).append(k)
    groups = [Group(m) for m in members.values()]
    if case.norm == "batch_eval":
        rm, rv = case.extra["running_mean"], case.extra["running_var"]
        for g in groups:
            c = param_index[g.members[0]]
            g.fixed = (float(rm[c]), float(rv[c]))
    rms = case.norm in ("rms", "fused_rms")
    eps = case.eps if case.eps is not None else OPMATH_EPS[case.fmt]
    g_res = case.extra.get("grad_residual_out")
    return Problem(
        case.fmt,
        _normalised_values(case),
        case.grad_output.ravel(),
        groups,
        param_index,
        case.weight,
        None if rms else case.bias,
        eps,
        center=not rms,
        unbiased=case.variance == "unbiased",
        outside=case.eps_placement == "outside",
        weight_offset=case.weight_offset,
        grad_z_extra=None if g_res is None else g_res.ravel(),
    )


def _well_defined(p: Problem) -> bool:
    """The loss is differentiable at the point: every denominator r is positive.

    (sqrt(var) is not differentiable at var = 0, but with eps outside y = (x - mu)/(sigma + eps)
    is: sigma enters only at second order, so that case stays in.)
    """
    for g in p.groups:
        n = len(g.members)
        if g.fixed is None and p.unbiased and n == 1:
            return False
        if p.eps == 0:
            zs = [p.z[k] for k in g.members]
            if g.fixed is None and (len(set(zs)) == 1 and (p.center or zs[0] == 0)):
                return False
    return True


def call_backward(case: BackwardCase):
    """The reference backward function for the case."""
    b = case.backend

    def t(a):
        return as_backend(a, case.fmt, b)

    x, g, w, bias = t(case.x), t(case.grad_output), t(case.weight), t(case.bias)
    kw = case.keywords()
    e = case.extra
    match case.norm:
        case "layer":
            return R.layer_norm_backward(g, x, x.shape[-1:], w, bias, case.eps, **kw)
        case "rms":
            return R.rms_norm_backward(g, x, x.shape[-1:], w, case.eps, **kw)
        case "group":
            return R.group_norm_backward(g, x, e["num_groups"], w, bias, case.eps, **kw)
        case "batch_train":
            return R.batch_norm_backward(g, x, None, None, w, bias, True, case.eps, **kw)
        case "batch_eval":
            rm, rv = t(e["running_mean"]), t(e["running_var"])
            return R.batch_norm_backward(g, x, rm, rv, w, bias, False, case.eps, **kw)
        case "instance":
            return R.instance_norm_backward(g, x, None, None, w, bias, True, case.eps, **kw)
        case "deep":
            return R.deep_norm_backward(
                g,
                x,
                t(e["other"]),
                x.shape[-1:],
                w,
                bias,
                e["alpha"],
                case.eps,
                add_rounding=e["add_rounding"],
                **kw,
            )
        case "fused_ln" | "fused_rms":
            args = [g, t(e["grad_residual_out"]), x, t(e["other"]), x.shape[-1:], w]
            fn = R.fused_add_rms_norm_backward
            if case.norm == "fused_ln":
                args.append(bias)
                fn = R.fused_add_layer_norm_backward
            return fn(*args, case.eps, alpha=e["alpha"], add_rounding=e["add_rounding"], **kw)
    raise AssertionError(case.norm)


#: Which Gradients fields carry the derivative in z, and by what factor z moves with them.
Z_FIELDS = {
    "deep": lambda a: {"input": a, "sublayer_output": 1.0},
    "fused_ln": lambda a: {"input": 1.0, "residual": a},
    "fused_rms": lambda a: {"input": 1.0, "residual": a},
}
ALL_FIELDS = ("input", "weight", "bias", "residual", "sublayer_output")


def check_backward(case: BackwardCase) -> None:
    __tracebackhide__ = True
    problem = build_problem(case)
    assume(_well_defined(problem))
    coefficients = Z_FIELDS.get(case.norm, lambda a: {"input": 1.0})(case.extra.get("alpha"))
    expected = expected_gradients(problem, case.x.shape, coefficients)
    grads = call_backward(case)
    for name in ALL_FIELDS:
        got = getattr(grads, name)
        if name not in expected:
            assert got is None, f"Gradients.{name} should be None\n{case.describe()}"
            continue
        lo, hi = expected[name]
        assert_within_rounding(
            got,
            lo,
            hi,
            fmt=case.fmt,
            backend=case.backend,
            what=f"grad {name}",
            context=case.describe(),
        )


# ---------------------------------------------------------------------------------------------
# Tests: one per backward function, hypothesis cases plus the rows that matter for derivatives


def _row(norm, fmt, x, g, weight=None, bias=None, eps=1e-5, backend="torch", **kw):
    def a(v):
        return None if v is None else np.array(v, dtype=np.float64)

    extra = {k: a(v) if isinstance(v, list) else v for k, v in kw.pop("extra", {}).items()}
    return BackwardCase(norm, fmt, backend, a(x), a(g), a(weight), a(bias), eps, extra=extra, **kw)


def with_examples(*cases):
    def decorate(test):
        for c in reversed(cases):
            test = example(case=c)(test)
        return test

    return decorate


CONSTANT_ROW_OUTSIDE = {  # sigma = 0, eps outside: differentiable, dL/dx = (g w - mean(g w))/eps
    "x": [[3.0, 3.0, 3.0]],
    "g": [[1.0, -2.0, 0.5]],
    "eps": 0.5,
    "eps_placement": "outside",
}


@BACKWARD
@given(case=backward_cases("layer"))
@with_examples(
    _row("layer", "float64", weight=[2.0, 1.0, -1.0], bias=[0.0, 1.0, 0.0], **CONSTANT_ROW_OUTSIDE),
    _row(
        "layer",
        "float32",
        [[2.0**23, 2.0**23 + 1, 2.0**23 + 2]],
        [[1.0, 0.25, -3.0]],
        backend="numpy",
    ),
    _row(
        "layer",
        "float64",
        [[1.0, 2.0, 4.0, 8.0]],
        [[1.0, 1.0, 1.0, 1.0]],
        weight=[0.5, 1.0, 2.0, 3.0],
        eps=0.0,
        variance="unbiased",
        weight_offset=1.0,
    ),
    _row(
        "layer",
        "float32",
        [[-1.0, 1.0], [0.0, 0.0]],
        [[1.0, 1.0], [2.0, -1.0]],
        eps=0.5,
        eps_placement="outside",
        variance="unbiased",
        backend="numpy",
    ),
)
def test_layer_norm_backward(case: BackwardCase) -> None:
    check_backward(case)


@BACKWARD
@given(case=backward_cases("rms"))
@with_examples(
    _row("rms", "float32", [[0.0, 0.0, 0.0]], [[1.0, 2.0, 3.0]], eps=0.5, eps_placement="outside"),
    _row(
        "rms",
        "float64",
        [[1.0, -2.0, 3.0]],
        [[1.0, 2.0, 3.0]],
        weight=[1.0, 0.5, -2.0],
        eps=None,
        weight_offset=1.0,
        backend="numpy",
    ),
    _row("rms", "float32", [[1.0, -2.0, 3.0]], [[1.0, 2.0, 3.0]], eps=None, variance="unbiased"),
)
def test_rms_norm_backward(case: BackwardCase) -> None:
    check_backward(case)


@BACKWARD
@given(case=backward_cases("group"))
@with_examples(
    _row(
        "group",
        "float64",
        [[[1.0, 2.0], [3.0, 5.0], [1.0, 1.0], [1.0, 1.0]]],
        [[[1.0, 2.0], [3.0, 4.0], [1.0, -1.0], [0.5, 2.0]]],
        weight=[1.0, 2.0, 3.0, 4.0],
        bias=[0.0, 0.0, 1.0, 1.0],
        eps=0.25,
        eps_placement="outside",
        extra={"num_groups": 2},
    ),
)
def test_group_norm_backward(case: BackwardCase) -> None:
    check_backward(case)


@BACKWARD
@given(case=backward_cases("batch_train"))
@with_examples(
    _row(
        "batch_train",
        "float32",
        [[[1.0, 2.0], [0.0, 1.0]], [[4.0, 8.0], [2.0, 2.0]]],
        [[[1.0, 0.0], [1.0, 1.0]], [[-1.0, 2.0], [0.5, 0.5]]],
        weight=[2.0, 3.0],
        bias=[1.0, -1.0],
        variance="unbiased",
        backend="numpy",
    ),
)
def test_batch_norm_training_backward(case: BackwardCase) -> None:
    check_backward(case)


@BACKWARD
@given(case=backward_cases("batch_eval"))
@with_examples(
    _row(
        "batch_eval",
        "float64",
        [[[1.0, 2.0], [0.0, 1.0]]],
        [[[1.0, 0.0], [1.0, 3.0]]],
        weight=[2.0, 3.0],
        bias=[1.0, -1.0],
        eps=0.0,
        extra={"running_mean": [0.5, 1.0], "running_var": [2.0, 0.25]},
    ),
)
def test_batch_norm_eval_backward(case: BackwardCase) -> None:
    check_backward(case)


@BACKWARD
@given(case=backward_cases("instance"))
@with_examples(
    _row(
        "instance",
        "float32",
        [[[1.0, 2.0, 4.0], [7.0, 7.0, 7.0]]],
        [[[1.0, 0.0, 2.0], [1.0, 3.0, -1.0]]],
        weight=[2.0, 3.0],
        bias=[0.0, 1.0],
        eps=0.25,
        eps_placement="outside",
    ),
)
def test_instance_norm_backward(case: BackwardCase) -> None:
    check_backward(case)


def _add_extra(alpha: float, rounding: str, fused: bool) -> dict:
    extra = {
        "other": [[0.5, 2.0**-30, -1.0]],
        "alpha": alpha,
        "add_rounding": rounding,
    }
    if fused:
        extra["grad_residual_out"] = [[1.0, -1.0, 0.25]]
    return extra


@BACKWARD
@given(case=backward_cases("deep"))
@with_examples(
    *(
        _row(
            "deep",
            "float32",
            [[1.0, 2.0, 4.0]],
            [[1.0, 0.5, -2.0]],
            weight=[1.0, 2.0, 3.0],
            bias=[0.0, 0.5, 0.0],
            extra=_add_extra(8**0.25, r, fused=False),
        )
        for r in ("dtype", "exact")
    )
)
def test_deep_norm_backward(case: BackwardCase) -> None:
    check_backward(case)


@pytest.mark.parametrize("norm", ["fused_ln", "fused_rms"])
@BACKWARD
@given(data=st.data())
def test_fused_add_norm_backward(norm: str, data: st.DataObject) -> None:
    check_backward(data.draw(backward_cases(norm), label="case"))


@pytest.mark.parametrize("norm", ["fused_ln", "fused_rms"])
@pytest.mark.parametrize("rounding", ["dtype", "exact"])
def test_fused_add_norm_backward_rounded_add(norm: str, rounding: str) -> None:
    """The add loses 2**-30 in float32 ("dtype"): the backward differentiates at the rounded z."""
    case = _row(
        norm,
        "float32",
        [[1.0, 2.0, 4.0]],
        [[1.0, 0.5, -2.0]],
        weight=[1.0, 2.0, 3.0],
        eps=1e-2,
        extra=_add_extra(0.5, rounding, fused=True),
    )
    check_backward(case)
