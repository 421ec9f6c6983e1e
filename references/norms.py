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
from references.arguments import (
    Setup,
    Summand,
    given_statistics,
    output_format,
    setup,
    stats_format,
)
from references.conventions import MOMENTUM_WEIGHTS, VARIANCES, choice, finite_float
from references.tensors import answer, operand, write_back


class NormOutput(NamedTuple):
    """A normalised output with its statistics (``mean`` is None for RMS norms)."""

    output: Any
    mean: Any
    rstd: Any


# -- shared plumbing --------------------------------------------------------------------------


def finish(s: Setup, out_dtype: object, return_stats: bool, p: groups.Problem | None = None) -> Any:
    """Run the forward pass and answer in the input's kind: output, or NormOutput with stats."""
    p = s.problem() if p is None else p
    x, layout, out = s.x, s.layout, output_format(out_dtype, s.x)
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
    s = setup(
        input,
        lambda shape: layouts.trailing(shape, normalized_shape),
        weight,
        bias,
        eps,
        center=True,
        variance=variance,
        eps_placement=eps_placement,
        weight_offset=weight_offset,
    )
    return finish(s, out_dtype, return_stats)


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
    s = setup(
        input,
        lambda shape: layouts.trailing(shape, normalized_shape),
        weight,
        None,
        eps,
        center=False,
        variance=variance,
        eps_placement=eps_placement,
        weight_offset=weight_offset,
    )
    return finish(s, out_dtype, return_stats)


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
    s = setup(
        input,
        lambda shape: layouts.grouped(shape, num_groups),
        weight,
        bias,
        eps,
        center=True,
        variance=variance,
        eps_placement=eps_placement,
        weight_offset=weight_offset,
    )
    return finish(s, out_dtype, return_stats)


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
    factors: tuple[Fraction, Fraction],
    running_variance: str,
) -> None:
    """Update the running statistics in place: ``factors`` = (weight of old, weight of new)."""
    keep, new = factors
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
    s = setup(
        input,
        layouts.per_channel,
        weight,
        bias,
        eps,
        center=True,
        variance=variance,
        eps_placement=eps_placement,
        weight_offset=weight_offset,
    )
    channels = s.layout.groups
    p = s.problem(None if training else given_statistics(running_mean, running_var, channels, 1))
    result = finish(s, out_dtype, return_stats, p)  # first: its statistics are reused below
    if training:
        update_running_stats(
            p,
            running_mean,
            running_var,
            np.arange(channels)[:, None],
            momentum_factors(momentum, num_batches_tracked, momentum_weights),
            running_variance,
        )
    return result


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
    s = setup(
        input,
        layouts.per_instance,
        weight,
        bias,
        eps,
        center=True,
        variance=variance,
        eps_placement=eps_placement,
        weight_offset=weight_offset,
    )
    n, c = s.x.shape[0], s.x.shape[1]
    p = s.problem(None if use_input_stats else given_statistics(running_mean, running_var, c, n))
    result = finish(s, out_dtype, return_stats, p)  # first: its statistics are reused below
    if use_input_stats and (running_mean is not None or running_var is not None):
        members = (np.arange(n)[None, :] * c + np.arange(c)[:, None]).astype(np.int64)
        update_running_stats(
            p,
            running_mean,
            running_var,
            members,
            momentum_factors(momentum, num_batches_tracked, momentum_weights),
            running_variance,
        )
    return result


# -- DeepNorm and the fused residual adds -----------------------------------------------------


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
    s = setup(
        input,
        lambda shape: layouts.trailing(shape, normalized_shape),
        weight,
        bias,
        eps,
        center=True,
        variance=variance,
        eps_placement=eps_placement,
        weight_offset=weight_offset,
        summand=Summand(sublayer_output, "sublayer_output", alpha, True, add_rounding),
    )
    return finish(s, out_dtype, return_stats)


def _fused_add(
    input: Any,
    residual: Any,
    normalized_shape: int | Sequence[int],
    weight: Any,
    bias: Any,
    eps: float | None,
    center: bool,
    alpha: float,
    variance: str,
    eps_placement: str,
    weight_offset: float,
    add_rounding: str,
    out_dtype: object,
    return_stats: bool,
) -> tuple[Any, Any]:
    s = setup(
        input,
        lambda shape: layouts.trailing(shape, normalized_shape),
        weight,
        bias,
        eps,
        center=center,
        variance=variance,
        eps_placement=eps_placement,
        weight_offset=weight_offset,
        summand=Summand(residual, "residual", alpha, False, add_rounding),
    )
    assert s.rounded_sum is not None
    return finish(s, out_dtype, return_stats), answer(s.rounded_sum, s.x.fmt, s.x)


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
    return _fused_add(
        input,
        residual,
        normalized_shape,
        weight,
        None,
        eps,
        False,
        alpha,
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
        True,
        alpha,
        variance,
        eps_placement,
        weight_offset,
        add_rounding,
        out_dtype,
        return_stats,
    )
