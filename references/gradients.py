"""The backward references: exact gradients, correctly rounded, one function per norm.

Each ``*_backward`` takes the upstream gradient and the forward's arguments and returns a
:class:`Gradients` tuple; every gradient is correctly rounded into the dtype of the tensor it is
the gradient of (the input's for ``input``, ``residual`` and ``sublayer_output``; or
``out_dtype``). In the fused adds the rounding of the sum (``add_rounding="dtype"``) is treated as
the identity, as autograd treats a dtype cast. The math is in :mod:`references.groups`.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any, NamedTuple

from references import backprop, groups, layouts
from references.conventions import convention, rms_norm_default_eps
from references.norms import (
    _given,
    add_operands,
    affine,
    normalised_sum,
    output_format,
    plain,
    problem,
)
from references.tensors import Operand, answer, operand


class Gradients(NamedTuple):
    """Gradients of a norm's inputs; a field is None where the norm has no such input."""

    input: Any
    weight: Any = None
    bias: Any = None
    residual: Any = None
    sublayer_output: Any = None


def _grad_operand(grad_output: Any, x: Operand) -> Operand:
    g = operand(grad_output, "grad_output")
    if g.shape != x.shape:
        raise ValueError(f"grad_output has shape {list(g.shape)}, expected {list(x.shape)}")
    return g


def _backward(
    p: groups.Problem,
    layout: layouts.Layout,
    grad: Operand,
    x: Operand,
    w: Operand | None,
    b: Operand | None,
    out_dtype: object,
    scale: Fraction = Fraction(1),
    addend: Operand | None = None,
) -> Gradients:
    g = layout.to_groups(grad.values)
    fmt = output_format(out_dtype, x)
    extra = None if addend is None else layout.to_groups(addend.values)
    dz = backprop.grad_input(p, g, fmt, scale=scale, addend=extra)
    dw, db = backprop.grad_affine(
        p, g, layout.weights, None if w is None else w.fmt, None if b is None else b.fmt
    )
    return Gradients(
        input=answer(layout.from_groups(dz), fmt, x),
        weight=None if dw is None or w is None else answer(dw.reshape(w.shape), w.fmt, w),
        bias=None if db is None or b is None else answer(db.reshape(b.shape), b.fmt, b),
    )


def layer_norm_backward(
    grad_output: Any,
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
) -> Gradients:
    """Gradients of :func:`references.norms.layer_norm`: input, weight, bias."""
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
    return _backward(p, layout, _grad_operand(grad_output, x), x, w, b, out_dtype)


def rms_norm_backward(
    grad_output: Any,
    input: Any,
    normalized_shape: int | Sequence[int],
    weight: Any = None,
    eps: float | None = None,
    *,
    variance: str = "biased",
    eps_placement: str = "inside",
    weight_offset: float = 0.0,
    out_dtype: object = None,
) -> Gradients:
    """Gradients of :func:`references.norms.rms_norm`: input, weight."""
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
    return _backward(p, layout, _grad_operand(grad_output, x), x, w, None, out_dtype)


def group_norm_backward(
    grad_output: Any,
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
) -> Gradients:
    """Gradients of :func:`references.norms.group_norm`: input, weight, bias."""
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
    return _backward(p, layout, _grad_operand(grad_output, x), x, w, b, out_dtype)


def batch_norm_backward(
    grad_output: Any,
    input: Any,
    running_mean: Any,
    running_var: Any,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    eps: float = 1e-5,
    *,
    variance: str = "biased",
    eps_placement: str = "inside",
    weight_offset: float = 0.0,
    out_dtype: object = None,
) -> Gradients:
    """Gradients of :func:`references.norms.batch_norm` (batch statistics when ``training``,
    else the running statistics, which are constants); running stats are not modified."""
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
    given = None if training else _given(running_mean, running_var, layout.groups, 1)
    p = problem(plain(x, layout), layout, conv, w, b, given)
    return _backward(p, layout, _grad_operand(grad_output, x), x, w, b, out_dtype)


def instance_norm_backward(
    grad_output: Any,
    input: Any,
    running_mean: Any = None,
    running_var: Any = None,
    weight: Any = None,
    bias: Any = None,
    use_input_stats: bool = True,
    eps: float = 1e-5,
    *,
    variance: str = "biased",
    eps_placement: str = "inside",
    weight_offset: float = 0.0,
    out_dtype: object = None,
) -> Gradients:
    """Gradients of :func:`references.norms.instance_norm`."""
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
    given = None
    if not use_input_stats:
        given = _given(running_mean, running_var, x.shape[1], x.shape[0])
    p = problem(plain(x, layout), layout, conv, w, b, given)
    return _backward(p, layout, _grad_operand(grad_output, x), x, w, b, out_dtype)


def deep_norm_backward(
    grad_output: Any,
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
) -> Gradients:
    """Gradients of :func:`references.norms.deep_norm`: ``input`` gets ``alpha * dz``,
    ``sublayer_output`` gets ``dz``."""
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
    grad = _grad_operand(grad_output, x)
    base = _backward(p, layout, grad, f, w, b, out_dtype)
    scaled = _backward(p, layout, grad, x, None, None, out_dtype, scale=scale)
    return base._replace(input=scaled.input, sublayer_output=base.input)


def _fused_add_backward(
    grad_output: Any,
    grad_residual_out: Any,
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
) -> Gradients:
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
    z, _ = normalised_sum(x, Fraction(1), r, scale, layout, add_rounding)
    p = problem(z, layout, conv, w, b)
    grad = _grad_operand(grad_output, x)
    addend = None if grad_residual_out is None else _grad_operand(grad_residual_out, x)
    base = _backward(p, layout, grad, x, w, b, out_dtype, addend=addend)
    scaled = _backward(p, layout, grad, r, None, None, out_dtype, scale=scale, addend=addend)
    return base._replace(residual=scaled.input)


def fused_add_rms_norm_backward(
    grad_output: Any,
    grad_residual_out: Any,
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
) -> Gradients:
    """Gradients of :func:`references.norms.fused_add_rms_norm` for upstream gradients of both
    outputs (``grad_residual_out`` may be None): input gets ``dz``, residual ``alpha * dz``."""
    fmt = operand(input, "input").fmt
    return _fused_add_backward(
        grad_output,
        grad_residual_out,
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
    )


def fused_add_layer_norm_backward(
    grad_output: Any,
    grad_residual_out: Any,
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
) -> Gradients:
    """Gradients of :func:`references.norms.fused_add_layer_norm`, as for the RMS variant."""
    return _fused_add_backward(
        grad_output,
        grad_residual_out,
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
    )


__all__ = [
    "Gradients",
    "batch_norm_backward",
    "deep_norm_backward",
    "fused_add_layer_norm_backward",
    "fused_add_rms_norm_backward",
    "group_norm_backward",
    "instance_norm_backward",
    "layer_norm_backward",
    "rms_norm_backward",
]
