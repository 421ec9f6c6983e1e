"""Cases for the backward tests: drawing them, calling the reference, checking the gradients.

A ``BackwardCase`` is one call of a backward function. ``build_problem`` turns it into the
layout-free ``Problem`` (flat groups) that ``numerical_gradients`` differentiates, and
``check_backward`` compares every field of the returned Gradients with the correctly rounded
numerical derivative (or None where the function has no such input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from hypothesis import assume, currently_in_test_context
from hypothesis import strategies as st
from numerical_gradients import Group, Problem, assert_within_rounding, expected_gradients
from oracles import add_scaled, as_backend

import references as R

OPMATH_EPS = {"float64": 2.0**-52, "float32": 2.0**-23}


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
    if currently_in_test_context():
        assume(_well_defined(problem))
    else:  # a fixed case must be one where the derivative exists
        assert _well_defined(problem), f"ill-defined fixed case\n{case.describe()}"
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
