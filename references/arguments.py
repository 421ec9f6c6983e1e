"""A norm call's arguments, validated and mapped into the group engine's terms.

Shared by the forward functions (:mod:`references.norms`) and the backward ones
(:mod:`references.gradients`): the input and its layout, the affine parameters, the convention,
the exact values to normalise (for DeepNorm and the fused adds, a sum of two tensors, rounded or
not into the input dtype), and given statistics (BatchNorm in evaluation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from references import groups, layouts
from references.conventions import (
    ADD_ROUNDINGS,
    choice,
    convention,
    finite_float,
    rms_norm_default_eps,
)
from references.exact import LinComb
from references.fast import Approx, certify, two_product, two_sum, working_for
from references.formats import FLOAT32, Format, format_of, round_array, round_fraction
from references.tensors import Operand, operand, optional_operand


def output_format(out_dtype: object, x: Operand) -> Format:
    return x.fmt if out_dtype is None else format_of(out_dtype)


def stats_format(x: Operand) -> Format:
    """Statistics come in float32 for 16-bit inputs (PyTorch's accumulation type)."""
    return FLOAT32 if x.fmt.precision < FLOAT32.precision else x.fmt


def affine(
    weight: object, bias: object, layout: layouts.Layout
) -> tuple[Operand | None, Operand | None]:
    ops = optional_operand(weight, "weight"), optional_operand(bias, "bias")
    for name, op in zip(("weight", "bias"), ops, strict=True):
        if op is not None and op.shape != layout.weight_shape:
            raise ValueError(
                f"{name} has shape {list(op.shape)}, expected {list(layout.weight_shape)}"
            )
    return ops


@dataclass(frozen=True)
class Summand:
    """The second summand of DeepNorm and the fused adds, before validation."""

    value: Any
    name: str  # "residual" or "sublayer_output"
    alpha: float
    alpha_scales_input: bool  # DeepNorm scales the input, the fused adds the residual
    add_rounding: str


@dataclass(frozen=True)
class Setup:
    """A norm call's validated arguments in the engine's terms."""

    x: Operand
    layout: layouts.Layout
    weight: Operand | None
    bias: Operand | None
    conv: groups.Convention
    z: LinComb  # the values to normalise, exact
    other: Operand | None = None  # the second summand of DeepNorm / the fused adds
    scales: tuple[Fraction, Fraction] = (Fraction(1), Fraction(1))  # of input, of other
    rounded_sum: np.ndarray | None = None  # that sum, correctly rounded into x's dtype

    def problem(self, given: tuple[np.ndarray, np.ndarray] | None = None) -> groups.Problem:
        return groups.Problem(
            z=self.z,
            shape=(self.layout.groups, self.layout.size),
            conv=self.conv,
            weight=None if self.weight is None else self.weight.values.ravel(),
            bias=None if self.bias is None else self.bias.values.ravel(),
            widx=self.layout.widx,
            given=given,
        )


def setup(
    input: Any,
    layout_of: Callable[[tuple[int, ...]], layouts.Layout],
    weight: Any,
    bias: Any,
    eps: float | None,
    *,
    center: bool,
    variance: str,
    eps_placement: str,
    weight_offset: float,
    summand: Summand | None = None,
) -> Setup:
    """Validate a call's arguments; ``eps=None`` is PyTorch's RMSNorm default."""
    x = operand(input, "input")
    layout = layout_of(x.shape)
    w, b = affine(weight, bias, layout)
    conv = convention(
        center=center,
        variance=variance,
        eps=rms_norm_default_eps(x.fmt) if eps is None else eps,
        eps_placement=eps_placement,
        weight_offset=weight_offset,
    )
    if summand is None:
        return Setup(x, layout, w, b, conv, [(Fraction(1), (layout.to_groups(x.values),))])
    other = operand(summand.value, summand.name)
    if other.shape != x.shape:
        raise ValueError(f"{summand.name} has shape {list(other.shape)}, expected {list(x.shape)}")
    which = "input" if summand.alpha_scales_input else summand.name
    alpha = Fraction(finite_float(f"alpha (scales {which})", summand.alpha))
    scales = (alpha, Fraction(1)) if summand.alpha_scales_input else (Fraction(1), alpha)
    rounded = rounded_sum(x, scales[0], other, scales[1])
    if choice("add_rounding", summand.add_rounding, ADD_ROUNDINGS) == "dtype":
        z: LinComb = [(Fraction(1), (layout.to_groups(rounded),))]
    else:
        z = [
            (scales[0], (layout.to_groups(x.values),)),
            (scales[1], (layout.to_groups(other.values),)),
        ]
    return Setup(x, layout, w, b, conv, z, other, scales, rounded)


def given_statistics(
    running_mean: Any, running_var: Any, channels: int, repeat: int
) -> tuple[np.ndarray, np.ndarray]:
    if running_mean is None or running_var is None:
        raise ValueError(
            "running_mean and running_var are required when not using batch statistics"
        )
    values = []
    for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
        op = operand(stat, name)
        if op.shape != (channels,):
            raise ValueError(f"{name} has shape {list(op.shape)}, expected [{channels}]")
        values.append(np.tile(op.values, repeat))
    return values[0], values[1]


def rounded_sum(a: Operand, scale_a: Fraction, b: Operand, scale_b: Fraction) -> np.ndarray:
    """``scale_a * a + scale_b * b`` correctly rounded into ``a``'s format (float64 values)."""
    fmt = a.fmt
    w = working_for(fmt)
    values, decided = np.zeros(a.shape), np.zeros(a.shape, dtype=bool)
    if w is not None:
        with np.errstate(invalid="ignore", over="ignore"):
            total = Approx.exact(a.values, w) * Approx.of_fraction(scale_a, w) + Approx.exact(
                b.values, w
            ) * Approx.of_fraction(scale_b, w)
            values, decided = certify(total, fmt)
            # The running bound cannot see that a float64 sum is exact (alpha = 1 and narrow
            # inputs: nearly always), and an exact sum on a rounding boundary of the target
            # would never be decided. Error-free transformations tell: where the products and
            # the sum leave no error, the float64 sum is the exact value, rounded once here.
            if float(scale_a) == scale_a and float(scale_b) == scale_b:
                p_a, e_a, ok_a = two_product(np.full(a.shape, float(scale_a)), a.values)
                p_b, e_b, ok_b = two_product(np.full(a.shape, float(scale_b)), b.values)
                exact_sum_, e_s = two_sum(p_a, p_b)
                exact = ok_a & ok_b & (e_a == 0) & (e_b == 0) & (e_s == 0)
                exact &= np.isfinite(exact_sum_) & ~decided
                values[exact] = round_array(exact_sum_[exact], fmt)
                decided |= exact
    finite = np.isfinite(a.values) & np.isfinite(b.values)
    ieee = float(scale_a) * a.values + float(scale_b) * b.values
    values = np.where(finite, values, ieee)
    for index in zip(*np.nonzero(~decided & finite), strict=True):
        exact = scale_a * Fraction(float(a.values[index])) + scale_b * Fraction(
            float(b.values[index])
        )
        values[index] = round_fraction(exact, fmt)
    return values
