"""normconf's own CUDA kernels for LayerNorm and RMSNorm, forward and backward.

``layer_norm`` and ``rms_norm`` take ``torch.nn.functional``'s arguments and normalize over the
trailing ``normalized_shape`` dims (an int or a sequence), in float32, float16 and bfloat16
(output in the input's dtype; weight and bias, when given, in the input's dtype and on its
device). ``rms_norm(eps=None)`` uses ``torch.finfo(torch.float32).eps`` for all three dtypes,
PyTorch's convention: the kernels compute in float32. ``layer_norm_with_stats`` and
``rms_norm_with_stats`` also return the float32 ``mean`` (None for RMSNorm) and ``rstd``, shaped
as ``torch.native_layer_norm`` shapes them: the batch dims followed by ones.

Math, per row ``x`` of ``n`` elements (the normalized dims flattened), float32 accumulation:

LayerNorm forward (biased variance, ε under the root)::

    s = x_0,  d_i = x_i - s,  c = Σ d_i / n          mean = s + c
    σ² = Σ (d_i - c)² / n,    r = 1 / √(σ² + ε)      (rstd)
    x̂_i = (d_i - c)·r,        y_i = x̂_i·w_i + b_i

RMSNorm forward::

    r = 1 / √(Σ x_i² / n + ε),   x̂_i = x_i·r,   y_i = x̂_i·w_i

Backward, with ``g_i = dy_i·w_i`` (``w = 1`` without a weight) and means over the row::

    LayerNorm:  dx_i = r·(g_i - mean(g) - x̂_i·mean(g·x̂))
    RMSNorm:    dx_i = r·(g_i - x̂_i·mean(g·x̂))
    dw_j = Σ_rows dy_j·x̂_j,   db_j = Σ_rows dy_j

The statistics are two-pass (the mean, then the spread about it), never E[x²] - E[x]². The
shift by the row's first element makes ``d_i`` exact wherever ``x_i`` is within a factor of two
of ``x_0`` (Sterbenz's lemma), which holds for rows whose mean is large against their spread;
the sums then carry rounding errors of the size of the spread, not of the mean, and the
normalized values stay accurate at condition numbers of 10⁵ and beyond. Backward recomputes
``x̂`` the same way from the saved ``c`` and ``r``.

The kernels (``csrc/``): 16-byte vector loads with a scalar fallback when a row pointer is not
16-byte aligned or ``n`` is not a multiple of the vector width; one row per warp up to
``n = 1024``, one row per block beyond; fixed-order tree sums (warp shuffles, then across warps
through shared memory). The weight and bias gradients are summed per chunk of rows into a
float32 workspace and the chunks are then summed in a fixed order by a second kernel: no
atomics, so the same inputs give bitwise the same outputs and gradients.

Layouts: the input (and the upstream gradient) is viewed as a ``[rows, n]`` matrix. Where no
such view has unit stride along the rows — the normalized dims are not contiguous, or the batch
dims do not collapse to one stride — it is copied to a contiguous tensor first; otherwise it is
read in place, with its row stride. Outputs are contiguous.

The kernels are built on the first call (see :mod:`impls.cuda.build`), never at import:
importing this module needs neither a GPU nor nvcc. :mod:`impls.cuda.emulation` runs the same
kernels on the CPU, for tests and debugging without a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from impls.adapter import normalized_dims

normconf_name = "cuda (normconf C++)"
normconf_devices = ("cuda",)
normconf_dtypes = ("float32", "float16", "bfloat16")
normconf_reduction = "tree"

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``torch.nn.functional.layer_norm`` on the normconf CUDA kernels."""
    return _normalize(input, normalized_shape, weight, bias, eps, center=True)[0]


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """``torch.nn.functional.rms_norm`` on the normconf CUDA kernels."""
    return _normalize(input, normalized_shape, weight, None, _rms_eps(eps), center=False)[0]


def layer_norm_with_stats(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(output, mean, rstd)``; the statistics float32, one per row."""
    output, mean, rstd = _normalize(input, normalized_shape, weight, bias, eps, center=True)
    return output, mean, rstd


def rms_norm_with_stats(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> tuple[Tensor, None, Tensor]:
    """``(output, None, rstd)``; ``rstd`` float32, one per row."""
    output, _, rstd = _normalize(input, normalized_shape, weight, None, _rms_eps(eps), center=False)
    return output, None, rstd


def _rms_eps(eps: float | None) -> float:
    return torch.finfo(torch.float32).eps if eps is None else eps


def _normalize(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    center: bool,
    ops: Any = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Check the arguments, then run the autograd function. ``ops`` stands in for the
    ``torch.ops.normconf_cuda`` operators (built on first use when None)."""
    dims = normalized_dims(normalized_shape)
    _check_shapes(input, dims, weight, bias)
    if ops is None:
        _check_tensors(input, weight, bias)
        from impls.cuda import build

        ops = build.load()
    return _RowNorm.apply(input, weight, bias, len(dims), float(eps), center, ops)


def _check_shapes(
    input: Tensor, dims: list[int], weight: Tensor | None, bias: Tensor | None
) -> None:
    """Raise as torch does when ``normalized_shape`` does not end ``input``'s shape or does
    not match the weight's or bias's shape."""
    if not dims:
        raise RuntimeError("normalized_shape must have at least one dimension")
    trailing = list(input.shape[max(input.dim() - len(dims), 0) :])
    if input.dim() < len(dims) or trailing != dims:
        raise RuntimeError(
            f"normalized_shape {dims} does not match the trailing dims of an input of shape "
            f"{list(input.shape)}"
        )
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and list(param.shape) != dims:
            raise RuntimeError(
                f"{name} of shape {list(param.shape)} does not match normalized_shape {dims}"
            )


def _check_tensors(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> None:
    """The kernels take CUDA tensors of one of three dtypes; weight and bias like the input."""
    if input.device.type != "cuda":
        raise RuntimeError(f"impls.cuda runs on CUDA tensors, got an input on {input.device}")
    if input.dtype not in _DTYPES:
        raise TypeError(f"impls.cuda takes float32, float16 or bfloat16, got {input.dtype}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        if param.device != input.device:
            raise RuntimeError(f"{name} is on {param.device}, the input on {input.device}")
        if param.dtype != input.dtype:
            raise TypeError(f"{name} is {param.dtype}, the input {input.dtype}: use one dtype")


def _rows(tensor: Tensor, rows: int, n: int) -> Tensor:
    """``tensor`` as a ``[rows, n]`` matrix with unit stride along its rows: a view where the
    layout allows one, else a contiguous copy."""
    matrix = tensor.reshape(rows, n)
    if n > 1 and matrix.stride(1) != 1:
        matrix = matrix.contiguous()
    return matrix


class _RowNorm(torch.autograd.Function):
    """LayerNorm (``center``) or RMSNorm over the last ``ndim`` dims; math in the module
    docstring. Returns ``(output, mean, rstd)``; ``mean`` and ``rstd`` are not differentiable
    (``mean`` is an empty placeholder for RMSNorm), and neither is the backward pass (no
    second derivatives)."""

    @staticmethod
    def forward(
        ctx: Any,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        ndim: int,
        eps: float,
        center: bool,
        ops: Any,
    ) -> tuple[Tensor, Tensor, Tensor]:
        shape = input.shape
        batch, dims = shape[: len(shape) - ndim], shape[len(shape) - ndim :]
        rows, n = math.prod(batch), math.prod(dims)
        stat_shape = (*batch, *(1,) * ndim)
        x = _rows(input, rows, n)
        w = None if weight is None else weight.reshape(n).contiguous()
        b = None if bias is None else bias.reshape(n).contiguous()
        if rows == 0 or n == 0:
            y, mean, centre, rstd = _empty_forward(x, center)
        else:
            y, mean, centre, rstd = ops.forward(x, w, b, eps, center)
        ctx.save_for_backward(x, w, centre, rstd)
        ctx.shape, ctx.dims, ctx.center, ctx.ops = shape, dims, center, ops
        mean_out = mean.view(stat_shape) if center else mean
        rstd_out = rstd.view(stat_shape)
        ctx.mark_non_differentiable(mean_out, rstd_out)
        return y.view(shape), mean_out, rstd_out

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_output: Tensor, *unused: Any
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None, None]:
        x, w, centre, rstd = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        rows, n = x.shape
        if rows == 0 or n == 0:
            dx, dw, db = _empty_backward(x)
        else:
            dy = _rows(grad_output, rows, n)
            centre = centre if ctx.center else None
            dx, dw, db = ctx.ops.backward(
                dy, x, w, centre, rstd, ctx.center, need_dx, need_dw, need_db
            )
        return (
            dx.view(ctx.shape) if need_dx else None,
            dw.view(ctx.dims) if need_dw else None,
            db.view(ctx.dims) if need_db else None,
            None,
            None,
            None,
            None,
        )


def _empty_forward(x: Tensor, center: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Outputs for zero rows or zero-width rows: nothing to normalize, and the statistics of an
    empty row are 0/0 = NaN."""
    rows, n = x.shape
    rstd = torch.full((rows,), math.nan, device=x.device, dtype=torch.float32)
    mean = rstd.clone() if center else rstd.new_empty(0)
    return x.new_empty((rows, n)), mean, mean.clone(), rstd


def _empty_backward(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for zero rows (sums over no rows are 0) or zero-width rows (empty)."""
    rows, n = x.shape
    return x.new_empty((rows, n)), x.new_zeros(n), x.new_zeros(n)
