"""The forward references, one function per norm, shaped like ``torch.nn.functional``.

Each function validates its arguments, maps the tensor onto the group engine
(:mod:`references.layouts`, :mod:`references.groups`) and answers in the input's kind and dtype
(or ``out_dtype``), every element correctly rounded. The convention keywords are documented in
:mod:`references.conventions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np

from references import groups, layouts
from references.conventions import (
    ADD_ROUNDINGS,
    MOMENTUM_WEIGHTS,
    VARIANCES,
    choice,
    convention,
    finite_float,
    rms_norm_default_eps,
)
from references.exact import LinComb
from references.fast import FLOAT64_WORKING, Approx, certify
from references.formats import FLOAT32, Format, format_of, round_fraction
from references.tensors import Operand, answer, operand, optional_operand, write_back


class NormOutput(NamedTuple):
    """A normalised output with its statistics (``mean`` is None for RMS norms)."""

    output: Any
    mean: Any
    rstd: Any


# -- shared plumbing --------------------------------------------------------------------------
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


def problem(
    z: LinComb,
    layout: layouts.Layout,
    conv: groups.Convention,
    weight: Operand | None,
    bias: Operand | None,
    given: tuple[np.ndarray, np.ndarray] | None = None,
) -> groups.Problem:
    return groups.Problem(
        z=z,
        shape=(layout.groups, layout.size),
        conv=conv,
        weight=None if weight is None else weight.values.ravel(),
        bias=None if bias is None else bias.values.ravel(),
        widx=layout.widx,
        given=given,
    )


def plain(x: Operand, layout: layouts.Layout) -> LinComb:
    return [(Fraction(1), (layout.to_groups(x.values),))]


def finish(
    p: groups.Problem,
    layout: layouts.Layout,
    x: Operand,
    out: Format,
    return_stats: bool,
) -> Any:
    y = answer(layout.from_groups(groups.forward(p, out)), out, x)
    if not return_stats:
        return y
    fmt = stats_format(x)
    mean, rstd = groups.statistics(p, fmt)
    as_stats = lambda v: answer(v.reshape(layout.stats_shape), fmt, x)  # noqa: E731
    return NormOutput(y, None if mean is None else as_stats(mean), as_stats(rstd))


# -- LayerNorm and RMSNorm --------------------------------------------------------------------
def layer_norm(
    input: Any,
    normalized_shape: int | Sequence[int],
    weight: Any = None,
    bias: Any = None,
    eps: float = 1e-5,
    *,
    variance: str = "biased",
    eps_placement: str = "inside",
    weight_offset: float = 0.0,
    out_dtype: object = None,
    return_stats: bool = False,
) -> Any:
    """LayerNorm over the trailing ``normalized_shape`` dims: ``(x - mu) r w + b``."""
    x = operand(input, "input")
    layout = layouts.trailing(x.shape, normalized_shape)
    w, b = affine(weight, bias, layout)
    conv = convention(
        center=True,
        variance=variance,
        eps=eps,
        eps_placement=eps_placement,
        weight_offset=weight_offset,
    )
    p = problem(plain(x, layout), layout, conv, w, b)
    return finish(p, layout, x, output_format(out_dtype, x), return_stats)


def rms_norm(
    input: Any,
    normalized_shape: int | Sequence[int],
    weight: Any = None,
    eps: float | None = None,
    *,
    variance: str = "biased",
    eps_placement: str = "inside",
    weight_offset: float = 0.0,
    out_dtype: object = None,
    return_stats: bool = False,
) -> Any:
    """RMSNorm: ``x r w`` with ``r = 1/sqrt(mean(x**2) + eps)``; ``eps=None`` as PyTorch."""
    x = operand(input, "input")
    layout = layouts.trailing(x.shape, normalized_shape)
    w, _ = affine(weight, None, layout)
    conv = convention(
        center=False,
        variance=variance,
        eps=rms_norm_default_eps(x.fmt) if eps is None else eps,
        eps_placement=eps_placement,
        weight_offset=weight_offset,
    )
    p = problem(plain(x, layout), layout, conv, w, None)
    return finish(p, layout, x, output_format(out_dtype, x), return_stats)


# -- GroupNorm, BatchNorm, InstanceNorm -------------------------------------------------------
def group_norm(
    input: Any,
    num_groups: int,
    weight: Any = None,
    bias: Any = None,
    eps: float = 1e-5,
    *,
    variance: str = "biased",
    eps_placement: str = "inside",
    weight_offset: float = 0.0,
    out_dtype: object = None,
    return_stats: bool = False,
) -> Any:
    """GroupNorm: statistics over each group of ``C / num_groups`` channels and the spatial
    dims; per-channel affine."""
    x = operand(input, "input")
    layout = layouts.grouped(x.shape, num_groups)
    w, b = affine(weight, bias, layout)
    conv = convention(
        center=True,
        variance=variance,
        eps=eps,
        eps_placement=eps_placement,
        weight_offset=weight_offset,
    )
    p = problem(plain(x, layout), layout, conv, w, b)
    return finish(p, layout, x, output_format(out_dtype, x), return_stats)


def momentum_factors(
    momentum: float | None, num_batches_tracked: int | None, momentum_weights: str
) -> tuple[Fraction, Fraction]:
    """``(weight of the old value, weight of the new statistic)``, exact."""
    if momentum is None:
        if not isinstance(num_batches_tracked, int | np.integer) or num_batches_tracked < 1:
            raise ValueError(
                "momentum=None (cumulative average) needs num_batches_tracked, the number of "
                f"batches including this one, as a positive int; got {num_batches_tracked!r}"
            )
        m = Fraction(1, int(num_batches_tracked))
    else:
        m = Fraction(finite_float("momentum", momentum))
    if choice("momentum_weights", momentum_weights, MOMENTUM_WEIGHTS) == "running":
        return m, 1 - m
    return 1 - m, m


def update_running_stats(
    p: groups.Problem,
    running_mean: Any,
    running_var: Any,
    members: np.ndarray,
    momentum: float | None,
    num_batches_tracked: int | None,
    momentum_weights: str,
    running_variance: str,
) -> None:
    keep, new = momentum_factors(momentum, num_batches_tracked, momentum_weights)
    estimator = choice("running_variance", running_variance, VARIANCES)
    for target, which in ((running_mean, "mean"), (running_var, estimator)):
        if target is None:
            continue
        old = operand(target, "running statistic")
        if old.shape != (members.shape[0],):
            raise ValueError(
                f"running statistics have shape {list(old.shape)}, expected [{members.shape[0]}]"
            )
        write_back(target, groups.running_update(p, old.values, which, new, keep, old.fmt, members))


def _given(
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


def batch_norm(
    input: Any,
    running_mean: Any,
    running_var: Any,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    variance: str = "biased",
    eps_placement: str = "inside",
    weight_offset: float = 0.0,
    running_variance: str = "unbiased",
    momentum_weights: str = "new",
    num_batches_tracked: int | None = None,
    out_dtype: object = None,
    return_stats: bool = False,
) -> Any:
    """BatchNorm over N and the spatial dims per channel; updates running stats in place when
    ``training``; normalises with them otherwise."""
    x = operand(input, "input")
    layout = layouts.per_channel(x.shape)
    w, b = affine(weight, bias, layout)
    conv = convention(
        center=True,
        variance=variance,
        eps=eps,
        eps_placement=eps_placement,
        weight_offset=weight_offset,
    )
    channels = layout.groups
    given = None if training else _given(running_mean, running_var, channels, 1)
    p = problem(plain(x, layout), layout, conv, w, b, given)
    if training:
        update_running_stats(
            p,
            running_mean,
            running_var,
            np.arange(channels)[:, None],
            momentum,
            num_batches_tracked,
            momentum_weights,
            running_variance,
        )
    return finish(p, layout, x, output_format(out_dtype, x), return_stats)


def instance_norm(
    input: Any,
    running_mean: Any = None,
    running_var: Any = None,
    weight: Any = None,
    bias: Any = None,
    use_input_stats: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    variance: str = "biased",
    eps_placement: str = "inside",
    weight_offset: float = 0.0,
    running_variance: str = "unbiased",
    momentum_weights: str = "new",
    num_batches_tracked: int | None = None,
    out_dtype: object = None,
    return_stats: bool = False,
) -> Any:
    """InstanceNorm: per sample and channel over the spatial dims. With running statistics and
    ``use_input_stats``, each is updated with the batch average of the instance statistics."""
    x = operand(input, "input")
    layout = layouts.per_instance(x.shape)
    w, b = affine(weight, bias, layout)
    conv = convention(
        center=True,
        variance=variance,
        eps=eps,
        eps_placement=eps_placement,
        weight_offset=weight_offset,
    )
    n, c = x.shape[0], x.shape[1]
    given = None if use_input_stats else _given(running_mean, running_var, c, n)
    p = problem(plain(x, layout), layout, conv, w, b, given)
    if use_input_stats and (running_mean is not None or running_var is not None):
        members = (np.arange(n)[None, :] * c + np.arange(c)[:, None]).astype(np.int64)
        update_running_stats(
            p,
            running_mean,
            running_var,
            members,
            momentum,
            num_batches_tracked,
            momentum_weights,
            running_variance,
        )
    return finish(p, layout, x, output_format(out_dtype, x), return_stats)


# -- DeepNorm and the fused residual adds -----------------------------------------------------
def add_operands(
    x: Operand, other: Any, other_name: str, alpha: float, scaled: str
) -> tuple[Operand, Fraction]:
    """Check the second summand and return it with the exact scale ``alpha``."""
    y = operand(other, other_name)
    if y.shape != x.shape:
        raise ValueError(f"{other_name} has shape {list(y.shape)}, expected {list(x.shape)}")
    return y, Fraction(finite_float(f"alpha ({scaled})", alpha))


def rounded_sum(a: Operand, scale_a: Fraction, b: Operand, scale_b: Fraction) -> np.ndarray:
    """``scale_a * a + scale_b * b`` correctly rounded into ``a``'s format (float64 values)."""
    w = FLOAT64_WORKING
    fmt = a.fmt
    with np.errstate(invalid="ignore", over="ignore"):
        total = Approx.exact(a.values, w) * float(scale_a) + Approx.exact(b.values, w) * float(
            scale_b
        )
        if Fraction(float(scale_a)) != scale_a or Fraction(float(scale_b)) != scale_b:
            raise AssertionError("scales are binary64 values")
        values, decided = (
            certify(total, fmt)
            if fmt.precision < 53
            else (np.zeros(a.shape), np.zeros(a.shape, dtype=bool))
        )
    finite = np.isfinite(a.values) & np.isfinite(b.values)
    ieee = float(scale_a) * a.values + float(scale_b) * b.values
    values = np.where(finite, values, ieee)
    for index in zip(*np.nonzero(~decided & finite), strict=True):
        exact = scale_a * Fraction(float(a.values[index])) + scale_b * Fraction(
            float(b.values[index])
        )
        values[index] = round_fraction(exact, fmt)
    return values


def normalised_sum(
    x: Operand,
    scale_x: Fraction,
    y: Operand,
    scale_y: Fraction,
    layout: layouts.Layout,
    add_rounding: str,
) -> tuple[LinComb, np.ndarray]:
    """The values to normalise (exact) and the sum rounded into ``x``'s dtype."""
    rounded = rounded_sum(x, scale_x, y, scale_y)
    if choice("add_rounding", add_rounding, ADD_ROUNDINGS) == "dtype":
        return [(Fraction(1), (layout.to_groups(rounded),))], rounded
    return [
        (scale_x, (layout.to_groups(x.values),)),
        (scale_y, (layout.to_groups(y.values),)),
    ], rounded


def deep_norm(
    input: Any,
    sublayer_output: Any,
    normalized_shape: int | Sequence[int],
    weight: Any = None,
    bias: Any = None,
    alpha: float = 1.0,
    eps: float = 1e-5,
    *,
    variance: str = "biased",
    eps_placement: str = "inside",
    weight_offset: float = 0.0,
    add_rounding: str = "dtype",
    out_dtype: object = None,
    return_stats: bool = False,
) -> Any:
    """DeepNorm (Wang et al., 2022): ``layer_norm(alpha * input + sublayer_output)``.

    ``add_rounding="dtype"`` rounds the sum once into the input dtype before normalising (what a
    model that stores the residual stream computes); ``"exact"`` normalises the exact sum.
    """
    x = operand(input, "input")
    f, scale = add_operands(x, sublayer_output, "sublayer_output", alpha, "scales input")
    layout = layouts.trailing(x.shape, normalized_shape)
    w, b = affine(weight, bias, layout)
    conv = convention(
        center=True,
        variance=variance,
        eps=eps,
        eps_placement=eps_placement,
        weight_offset=weight_offset,
    )
    z, _ = normalised_sum(x, scale, f, Fraction(1), layout, add_rounding)
    p = problem(z, layout, conv, w, b)
    return finish(p, layout, x, output_format(out_dtype, x), return_stats)


def _fused_add(
    input: Any,
    residual: Any,
    normalized_shape: int | Sequence[int],
    weight: Any,
    bias: Any,
    eps: float,
    alpha: float,
    center: bool,
    variance: str,
    eps_placement: str,
    weight_offset: float,
    add_rounding: str,
    out_dtype: object,
    return_stats: bool,
) -> tuple[Any, Any]:
    x = operand(input, "input")
    r, scale = add_operands(x, residual, "residual", alpha, "scales residual")
    layout = layouts.trailing(x.shape, normalized_shape)
    w, b = affine(weight, bias, layout)
    conv = convention(
        center=center,
        variance=variance,
        eps=eps,
        eps_placement=eps_placement,
        weight_offset=weight_offset,
    )
    z, rounded = normalised_sum(x, Fraction(1), r, scale, layout, add_rounding)
    p = problem(z, layout, conv, w, b)
    out = finish(p, layout, x, output_format(out_dtype, x), return_stats)
    return out, answer(rounded, x.fmt, x)


def fused_add_rms_norm(
    input: Any,
    residual: Any,
    normalized_shape: int | Sequence[int],
    weight: Any = None,
    eps: float | None = None,
    *,
    alpha: float = 1.0,
    variance: str = "biased",
    eps_placement: str = "inside",
    weight_offset: float = 0.0,
    add_rounding: str = "dtype",
    out_dtype: object = None,
    return_stats: bool = False,
) -> tuple[Any, Any]:
    """Residual add + RMSNorm: ``z = input + alpha * residual``; returns ``(rms_norm(z), z)``
    with the new residual ``z`` correctly rounded into the input dtype."""
    fmt = operand(input, "input").fmt
    return _fused_add(
        input,
        residual,
        normalized_shape,
        weight,
        None,
        rms_norm_default_eps(fmt) if eps is None else eps,
        alpha,
        False,
        variance,
        eps_placement,
        weight_offset,
        add_rounding,
        out_dtype,
        return_stats,
    )


def fused_add_layer_norm(
    input: Any,
    residual: Any,
    normalized_shape: int | Sequence[int],
    weight: Any = None,
    bias: Any = None,
    eps: float = 1e-5,
    *,
    alpha: float = 1.0,
    variance: str = "biased",
    eps_placement: str = "inside",
    weight_offset: float = 0.0,
    add_rounding: str = "dtype",
    out_dtype: object = None,
    return_stats: bool = False,
) -> tuple[Any, Any]:
    """Residual add + LayerNorm: ``z = input + alpha * residual``; returns ``(layer_norm(z), z)``
    (DeepNorm's post-LN block with ``alpha`` its residual scale)."""
    return _fused_add(
        input,
        residual,
        normalized_shape,
        weight,
        bias,
        eps,
        alpha,
        True,
        variance,
        eps_placement,
        weight_offset,
        add_rounding,
        out_dtype,
        return_stats,
    )
