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
from references.arguments import Setup, Summand, given_statistics, output_format, setup
from references.tensors import Operand, answer, operand


class Gradients(NamedTuple):
    """Gradients of a norm's inputs; a field is None where the norm has no such input."""

    input: Any
    weight: Any = None
    bias: Any = None
    residual: Any = None
    sublayer_output: Any = None


def _grad_operand(grad: Any, x: Operand, name: str = "grad_output") -> Operand:
    g = operand(grad, name)
    if g.shape != x.shape:
        raise ValueError(f"{name} has shape {list(g.shape)}, expected {list(x.shape)}")
    return g


def _backward(
    s: Setup,
    p: groups.Problem,
    grad_output: Any,
    out_dtype: object,
    *,
    targets: Sequence[tuple[Operand, Fraction]] = (),
    addend: Any = None,
) -> tuple[Gradients, list[Any]]:
    """Gradients of the weight and bias, of the input (``Gradients.input``), and of each other
    summand in ``targets``: ``scale * (dz + addend)`` rounded into that operand's dtype."""
    layout = s.layout
    g = layout.to_groups(_grad_operand(grad_output, s.x).values)
    extra = None
    if addend is not None:
        extra = layout.to_groups(_grad_operand(addend, s.x, "grad_residual_out").values)
    wanted = [(s.x, Fraction(1)), *targets]
    formats = [output_format(out_dtype, operand) for operand, _ in wanted]
    dzs = backprop.grad_inputs(
        p, g, [(fmt, scale) for fmt, (_, scale) in zip(formats, wanted, strict=True)], extra
    )
    answers = [
        answer(layout.from_groups(dz), fmt, operand)
        for dz, fmt, (operand, _) in zip(dzs, formats, wanted, strict=True)
    ]
    w, b = s.weight, s.bias
    dw, db = backprop.grad_affine(
        p, g, layout.weights, None if w is None else w.fmt, None if b is None else b.fmt
    )
    grads = Gradients(
        input=answers[0],
        weight=None if dw is None or w is None else answer(dw.reshape(w.shape), w.fmt, w),
        bias=None if db is None or b is None else answer(db.reshape(b.shape), b.fmt, b),
    )
    return grads, answers[1:]


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
    return _backward(s, s.problem(), grad_output, out_dtype)[0]


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
    return _backward(s, s.problem(), grad_output, out_dtype)[0]


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
    return _backward(s, s.problem(), grad_output, out_dtype)[0]


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
    given = None if training else given_statistics(running_mean, running_var, channels, 1)
    return _backward(s, s.problem(given), grad_output, out_dtype)[0]


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
    given = None if use_input_stats else given_statistics(running_mean, running_var, c, n)
    return _backward(s, s.problem(given), grad_output, out_dtype)[0]


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
    assert s.other is not None
    # z = alpha * input + sublayer_output: the input's share is alpha * dz.
    grads, (of_input,) = _backward(
        s, s.problem(), grad_output, out_dtype, targets=[(s.x, s.scales[0])]
    )
    return grads._replace(input=of_input, sublayer_output=grads.input)


def _fused_add_backward(
    grad_output: Any,
    grad_residual_out: Any,
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
) -> Gradients:
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
    assert s.other is not None
    # z = input + alpha * residual: the residual's share is alpha * dz.
    grads, (of_residual,) = _backward(
        s,
        s.problem(),
        grad_output,
        out_dtype,
        targets=[(s.other, s.scales[1])],
        addend=grad_residual_out,
    )
    return grads._replace(residual=of_residual)


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
    return _fused_add_backward(
        grad_output,
        grad_residual_out,
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
        True,
        alpha,
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
