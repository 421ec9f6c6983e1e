"""LayerNorm, RMSNorm, DeepNorm and the fused add-norms: launchers and the autograd Function
over :mod:`impls.triton.row_kernels` (whose docstring has the math).

Strided inputs are read in place when the trailing dimensions collapse into one column stride
and the leading ones into one row stride (``Tensor.reshape`` returns a view: contiguous tensors,
a slice with a last-dimension step, expanded gradients); any other layout is copied to
contiguous first. Outputs and gradients are contiguous.

``out=``: the forward alone, without an autograd graph, written into the caller's buffers (the
output, and ``z`` for the fused adds) and returned, as torch's ``out=`` variants do; like them it
refuses arguments that require grad while grad mode is on. Contiguous buffers are written by the
kernel itself; any other layout receives a copy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import triton
from torch import Tensor
from torch.autograd.function import once_differentiable

from impls.adapter import normalized_dims
from impls.triton import runtime, tiling
from impls.triton.primitives import reduce_partials
from impls.triton.row_kernels import backward_kernel, backward_sums_kernel, forward_kernel

#: The dtypes the kernels take; every one accumulates in float32.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class RowNorm:
    """What a trailing norm computes.

    ``center``: LayerNorm (subtract the mean) or RMSNorm. ``summand``: None, ``"residual"`` (the
    fused adds: ``z = input + alpha * residual``, returned beside the output) or
    ``"sublayer_output"`` (DeepNorm: ``z = alpha * input + sublayer_output``). ``weight_offset``:
    the scale is ``weight_offset + weight`` (Gemma: 1.0).
    """

    center: bool
    summand: str | None = None
    alpha: float = 1.0
    weight_offset: float = 0.0

    @property
    def scales(self) -> tuple[float, float]:
        """The factors of ``input`` and of the summand in ``z``."""
        return (self.alpha, 1.0) if self.summand == "sublayer_output" else (1.0, self.alpha)

    @property
    def returns_sum(self) -> bool:
        return self.summand == "residual"


class RowResult(NamedTuple):
    """A trailing norm's results: the output, the sum ``z`` (fused adds, else None), and the
    float32 statistics shaped like the input with the normalised dims kept as 1."""

    output: Tensor
    residual: Tensor | None
    mean: Tensor
    rstd: Tensor


def check_tensor(t: Tensor, name: str) -> None:
    """Reject what the kernels cannot take, in one line."""
    if t.dtype not in DTYPES:
        raise TypeError(
            f"{name}: the triton kernels take float32, float16, bfloat16; got {t.dtype}"
        )
    if not runtime.INTERPRETED and t.device.type != "cuda":
        raise ValueError(f"{name}: compiled triton kernels need CUDA tensors, got {t.device}")


def _trailing_count(input: Tensor, normalized_shape: int | Sequence[int]) -> int:
    dims = normalized_dims(normalized_shape)
    k = len(dims)
    if k == 0 or k > input.dim() or list(input.shape[input.dim() - k :]) != dims:
        raise ValueError(
            f"normalized_shape {dims} does not match the trailing dims of an input of shape "
            f"{list(input.shape)}"
        )
    return k


def _check_parameter(t: Tensor | None, name: str, shape: torch.Size) -> None:
    if t is None:
        return
    check_tensor(t, name)
    if t.shape != shape:
        raise ValueError(f"{name} has shape {list(t.shape)}, expected {list(shape)}")


def as_rows(t: Tensor, k: int) -> Tensor:
    """``t`` as a 2-D (rows, elements of the last ``k`` dims) view, or a contiguous copy."""
    n = math.prod(t.shape[t.dim() - k :])
    return t.reshape(math.prod(t.shape[: t.dim() - k]), n)


def _vector(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.reshape(-1).contiguous()


def launch_forward(
    norm: RowNorm,
    x: Tensor,
    other: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    into: tuple[Tensor | None, Tensor | None] = (None, None),
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """``(y, z, mean, rstd)`` for a 2-D ``x`` (and summand); ``z`` None without a summand.
    ``into``: contiguous 2-D tensors like ``x`` to write ``y`` and ``z`` into (None: new ones)."""
    m, n = x.shape
    y = into[0] if into[0] is not None else torch.empty((m, n), dtype=x.dtype, device=x.device)
    z = None
    if other is not None:
        z = into[1] if into[1] is not None else torch.empty((m, n), dtype=x.dtype, device=x.device)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if m == 0 or n == 0:
        mean.fill_(math.nan)
        rstd.fill_(math.nan)
        return y, z, mean, rstd
    t = tiling.row_tiling(n)
    r = other if other is not None else x
    scale_x, scale_r = norm.scales
    runtime.launch(
        forward_kernel,
        (triton.cdiv(m, t.block_m),),
        x,
        r,
        weight if weight is not None else y,
        bias if bias is not None else y,
        y,
        z if z is not None else y,
        mean,
        rstd,
        x.stride(0),
        x.stride(1),
        r.stride(0),
        r.stride(1),
        y.stride(0),
        m,
        n,
        eps,
        scale_x,
        scale_r,
        norm.weight_offset,
        CENTER=norm.center,
        HAS_R=other is not None,
        STORE_Z=z is not None,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        SINGLE_TILE=t.single_tile,
        INTERPRETED=runtime.INTERPRETED,
        BLOCK_M=t.block_m,
        BLOCK_N=t.block_n,
        num_warps=t.num_warps,
    )
    return y, z, mean, rstd


class Gradients(NamedTuple):
    input: Tensor
    other: Tensor | None
    weight: Tensor | None
    bias: Tensor | None


def launch_backward(
    norm: RowNorm,
    z: Tensor,
    grad_output: Tensor,
    grad_sum: Tensor | None,
    saved: tuple[Tensor | None, Tensor, Tensor],
    dtypes: tuple[torch.dtype, torch.dtype | None],
    wanted: tuple[torch.dtype | None, torch.dtype | None],
) -> Gradients:
    """The gradients for 2-D ``z`` (what was normalised) and upstream ``grad_output`` (and
    ``grad_sum``, of the returned z). ``saved``: weight, mean, rstd; ``dtypes``: of the input
    and of the summand (None: no summand); ``wanted``: the dtypes of the weight's and the
    bias's gradients, None where not wanted."""
    weight, mean, rstd = saved
    m, n = z.shape
    device = z.device
    dx = torch.empty((m, n), dtype=dtypes[0], device=device)
    dr = torch.empty((m, n), dtype=dtypes[1], device=device) if dtypes[1] is not None else None
    w_dtype, b_dtype = wanted
    want_w, want_b = w_dtype is not None, b_dtype is not None
    if m == 0 or n == 0:
        dx.zero_()
        if dr is not None:
            dr.zero_()
        return Gradients(
            dx,
            dr,
            torch.zeros(n, dtype=w_dtype, device=device) if w_dtype is not None else None,
            torch.zeros(n, dtype=b_dtype, device=device) if b_dtype is not None else None,
        )
    t = tiling.row_tiling(n)
    blocks = triton.cdiv(m, t.block_m)
    programs = max(1, min(blocks, runtime.program_slots(device)))
    pw = torch.empty((programs, n), dtype=torch.float32, device=device) if want_w else None
    pb = torch.empty((programs, n), dtype=torch.float32, device=device) if want_b else None
    c1 = c2 = mean
    grid: tuple[int, ...] = (programs,)
    if not t.single_tile:
        c1, c2 = torch.empty_like(mean), torch.empty_like(mean)
        runtime.launch(
            backward_sums_kernel,
            (blocks,),
            z,
            grad_output,
            weight if weight is not None else mean,
            mean,
            rstd,
            c1,
            c2,
            z.stride(0),
            z.stride(1),
            grad_output.stride(0),
            grad_output.stride(1),
            m,
            n,
            norm.weight_offset,
            HAS_W=weight is not None,
            INTERPRETED=runtime.INTERPRETED,
            BLOCK_M=t.block_m,
            BLOCK_N=t.block_n,
            num_warps=t.num_warps,
        )
        grid = (programs, t.chunks)
    dzo = grad_sum if grad_sum is not None else grad_output
    scale_x, scale_r = norm.scales
    runtime.launch(
        backward_kernel,
        grid,
        z,
        grad_output,
        dzo,
        weight if weight is not None else mean,
        mean,
        rstd,
        c1,
        c2,
        dx,
        dr if dr is not None else dx,
        pw if pw is not None else mean,
        pb if pb is not None else mean,
        z.stride(0),
        z.stride(1),
        grad_output.stride(0),
        grad_output.stride(1),
        dzo.stride(0),
        dzo.stride(1),
        dx.stride(0),
        m,
        n,
        scale_x,
        scale_r,
        norm.weight_offset,
        CENTER=norm.center,
        HAS_W=weight is not None,
        HAS_DZO=grad_sum is not None,
        HAS_R=dr is not None,
        ACC_W=want_w,
        ACC_B=want_b,
        SUMS_GIVEN=not t.single_tile,
        INTERPRETED=runtime.INTERPRETED,
        BLOCK_M=t.block_m,
        BLOCK_N=t.block_n,
        num_warps=t.num_warps,
    )
    dw, db = reduce_partials(pw, pb, wanted)
    return Gradients(dx, dr, dw, db)


class RowNormFunction(torch.autograd.Function):
    """A trailing norm with its backward. Returns ``(output, [z,] mean, rstd)``; the
    statistics are float32 and not differentiable."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        norm: RowNorm,
        k: int,
        eps: float,
        input: Tensor,
        other: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
    ) -> tuple[Tensor, ...]:
        x = as_rows(input, k)
        r = as_rows(other, k) if other is not None else None
        w, b = _vector(weight), _vector(bias)
        y, z, mean, rstd = launch_forward(norm, x, r, w, b, eps)
        ctx.norm, ctx.k, ctx.shape = norm, k, input.shape
        ctx.dtypes = (input.dtype, other.dtype if other is not None else None)
        ctx.params = [(p.shape, p.dtype) if p is not None else None for p in (weight, bias)]
        ctx.save_for_backward(z if z is not None else x, w, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)
        outputs = [y.view(input.shape)]
        if norm.returns_sum and z is not None:
            outputs.append(z.view(input.shape))
        return (*outputs, mean, rstd)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor, *more: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        z, weight, mean, rstd = ctx.saved_tensors
        norm: RowNorm = ctx.norm
        grad_sum = more[0] if norm.returns_sum else None
        need = ctx.needs_input_grad
        params = ctx.params
        wanted = tuple(
            p[1] if p is not None and needed else None
            for p, needed in zip(params, need[5:7], strict=True)
        )
        grads = launch_backward(
            norm,
            z,
            as_rows(grad_output, ctx.k),
            as_rows(grad_sum, ctx.k) if grad_sum is not None else None,
            (weight, mean, rstd),
            ctx.dtypes,
            wanted,  # type: ignore[arg-type]
        )
        shape = ctx.shape
        return (
            None,
            None,
            None,
            grads.input.view(shape) if need[3] else None,
            grads.other.view(shape) if grads.other is not None and need[4] else None,
            grads.weight.view(params[0][0]) if grads.weight is not None else None,
            grads.bias.view(params[1][0]) if grads.bias is not None else None,
        )


def normalize_rows(
    norm: RowNorm,
    input: Tensor,
    other: Tensor | None,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    out: Sequence[Tensor] | None = None,
) -> RowResult:
    """Run ``norm`` over the trailing ``normalized_shape`` dims of ``input``; with ``out``
    (the output's buffer, and z's for the fused adds), the forward alone, written there."""
    check_tensor(input, "input")
    k = _trailing_count(input, normalized_shape)
    params = input.shape[input.dim() - k :]
    if other is not None:
        check_tensor(other, str(norm.summand))
        if other.shape != input.shape:
            raise ValueError(
                f"{norm.summand} has shape {list(other.shape)}, expected {list(input.shape)}"
            )
    _check_parameter(weight, "weight", params)
    _check_parameter(bias, "bias", params)
    if out is not None:
        *outputs, mean, rstd = _forward_into(norm, k, float(eps), (input, other, weight, bias), out)
    else:
        *outputs, mean, rstd = RowNormFunction.apply(
            norm, k, float(eps), input, other, weight, bias
        )
    stats_shape = (*input.shape[: input.dim() - k], *([1] * k))
    return RowResult(
        outputs[0],
        outputs[1] if norm.returns_sum else None,
        mean.view(stats_shape),
        rstd.view(stats_shape),
    )


def _check_out(norm: RowNorm, input: Tensor, out: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """The ``out=`` buffers, checked against what the call writes; one line when wrong."""
    wanted = ("output", "residual_out") if norm.returns_sum else ("output",)
    if isinstance(out, Tensor) or len(out) != len(wanted):
        what = type(out).__name__ + ("" if isinstance(out, Tensor) else f" of {len(out)}")
        raise TypeError(f"out= must be the tuple ({', '.join(wanted)}), got a {what}")
    for name, buffer in zip(wanted, out, strict=True):
        if not isinstance(buffer, Tensor):
            raise TypeError(f"out= {name}: a {type(buffer).__name__}, not a torch.Tensor")
        if (buffer.shape, buffer.dtype, buffer.device) != (input.shape, input.dtype, input.device):
            raise ValueError(
                f"out= {name} is {list(buffer.shape)} {buffer.dtype} on {buffer.device}; expected "
                f"the input's {list(input.shape)} {input.dtype} on {input.device}"
            )
    return tuple(out)


def _forward_into(
    norm: RowNorm,
    k: int,
    eps: float,
    arguments: tuple[Tensor, Tensor | None, Tensor | None, Tensor | None],
    out: Sequence[Tensor],
) -> tuple[Tensor, ...]:
    """``(output, [z,] mean, rstd)``, the output (and z) written into ``out``'s own tensors."""
    input, other, weight, bias = arguments
    buffers = _check_out(norm, input, out)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (*arguments, *buffers)
    ):
        raise RuntimeError(
            "functions with out= do not support automatic differentiation, but an argument "
            "requires grad: call without out=, or under torch.no_grad()"
        )
    direct = all(b.is_contiguous() for b in buffers)
    into = [as_rows(b, k) if direct else None for b in buffers]
    y, z, mean, rstd = launch_forward(
        norm,
        as_rows(input, k),
        as_rows(other, k) if other is not None else None,
        _vector(weight),
        _vector(bias),
        eps,
        (into[0], into[1] if len(into) > 1 else None),
    )
    if not direct:
        for buffer, result in zip(buffers, (y, z), strict=False):
            assert result is not None
            buffer.copy_(result.view(buffer.shape))
    return (*buffers, mean, rstd)
