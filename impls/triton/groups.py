"""GroupNorm: the launchers and the autograd Function over :mod:`impls.triton.group_kernels`
(whose docstring has the math).

The input ``(N, C, *spatial)`` is read through a ``(N, C, S)`` view when its spatial dims
collapse to one stride (contiguous, channels-last, a slice with a last-dimension step), else
from a contiguous copy. The output and the input gradient take a dense input's layout
(channels-last stays channels-last) and are contiguous otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
from torch import Tensor
from torch.autograd.function import once_differentiable

from impls.triton import runtime, tiling
from impls.triton.group_kernels import group_backward_kernel, group_forward_kernel
from impls.triton.primitives import reduce_partials
from impls.triton.rows import check_tensor


def _as_channels(t: Tensor) -> Tensor:
    """``t`` as ``(N, C, S)``: a view where the spatial dims collapse, else a copy."""
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def _empty_like_layout(t: Tensor) -> tuple[Tensor, Tensor]:
    """An empty tensor shaped like ``t`` (channels-last when ``t`` is) and its ``(N, C, S)``
    view."""
    out = torch.empty_like(t)  # keeps a dense tensor's strides, else contiguous
    try:
        return out, out.view(t.shape[0], t.shape[1], math.prod(t.shape[2:]))
    except RuntimeError:
        out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        return out, out.view(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def launch_group_forward(
    x: Tensor,
    groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    weight_offset: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, rstd)``: y shaped like ``x``, statistics float32 ``(N, groups)``."""
    x3 = _as_channels(x)
    samples, channels, spatial = x3.shape
    y, y3 = _empty_like_layout(x)
    mean = torch.empty((samples, groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    per_group = channels // groups
    if mean.numel() == 0 or per_group * spatial == 0:
        mean.fill_(math.nan)
        rstd.fill_(math.nan)
        return y, mean, rstd
    t = tiling.group_tiling(per_group, spatial)
    runtime.launch(
        group_forward_kernel,
        (triton.cdiv(samples * groups, t.block_r),),
        x3,
        weight if weight is not None else mean,
        bias if bias is not None else mean,
        y3,
        mean,
        rstd,
        *x3.stride(),
        *y3.stride(),
        groups,
        per_group,
        spatial,
        samples * groups,
        eps,
        weight_offset,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        SINGLE_TILE=t.single_tile,
        INTERPRETED=runtime.INTERPRETED,
        BLOCK_R=t.block_r,
        BLOCK_C=t.block_c,
        BLOCK_S=t.block_s,
        num_warps=t.num_warps,
    )
    return y, mean, rstd


def launch_group_backward(
    x: Tensor,
    grad_output: Tensor,
    saved: tuple[Tensor | None, Tensor, Tensor],
    wanted: tuple[torch.dtype | None, torch.dtype | None],
    weight_offset: float = 0.0,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(dx, dw, db)``; ``wanted``: the dtypes of dw and db, None where not wanted."""
    weight, mean, rstd = saved
    x3, dy3 = _as_channels(x), _as_channels(grad_output)
    samples, channels, spatial = x3.shape
    groups = mean.shape[1]
    per_group = channels // groups
    dx, dx3 = _empty_like_layout(x)
    w_dtype, b_dtype = wanted
    partial = (samples, channels)
    # Every entry is written: row (n, g) writes its group's channels of sample n.
    pw = torch.empty(partial, dtype=torch.float32, device=x.device) if w_dtype else None
    pb = torch.empty(partial, dtype=torch.float32, device=x.device) if b_dtype else None
    if x.numel() == 0:
        dx.zero_()
    else:
        t = tiling.group_tiling(per_group, spatial)
        runtime.launch(
            group_backward_kernel,
            (triton.cdiv(samples * groups, t.block_r),),
            x3,
            dy3,
            weight if weight is not None else mean,
            mean,
            rstd,
            dx3,
            pw if pw is not None else mean,
            pb if pb is not None else mean,
            *x3.stride(),
            *dy3.stride(),
            *dx3.stride(),
            groups,
            per_group,
            spatial,
            channels,
            samples * groups,
            weight_offset,
            HAS_W=weight is not None,
            ACC_W=w_dtype is not None,
            ACC_B=b_dtype is not None,
            SINGLE_TILE=t.single_tile,
            INTERPRETED=runtime.INTERPRETED,
            BLOCK_R=t.block_r,
            BLOCK_C=t.block_c,
            BLOCK_S=t.block_s,
            num_warps=t.num_warps,
        )
    dw, db = reduce_partials(pw, pb, wanted)
    return dx, dw, db


class GroupNormFunction(torch.autograd.Function):
    """GroupNorm with its backward. Returns ``(output, mean, rstd)``, the statistics float32
    ``(N, groups)`` and not differentiable."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        groups: int,
        eps: float,
        weight_offset: float,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        w = weight.contiguous() if weight is not None else None
        b = bias.contiguous() if bias is not None else None
        y, mean, rstd = launch_group_forward(input, groups, w, b, eps, weight_offset)
        ctx.weight_offset = weight_offset
        ctx.params = [(p.dtype if p is not None else None) for p in (weight, bias)]
        ctx.save_for_backward(input, w, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)
        return y, mean, rstd

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor, *unused: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        wanted = tuple(
            dtype if needed else None for dtype, needed in zip(ctx.params, need[4:6], strict=True)
        )
        dx, dw, db = launch_group_backward(
            x,
            grad_output,
            (weight, mean, rstd),
            wanted,  # type: ignore[arg-type]
            ctx.weight_offset,
        )
        return None, None, None, dx if need[3] else None, dw, db


def normalize_groups(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    weight_offset: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """GroupNorm of ``input`` ``(N, C, *spatial)``: ``(output, mean, rstd)``."""
    check_tensor(input, "input")
    if input.dim() < 2:
        raise ValueError(f"group_norm needs an (N, C, *spatial) input, got {list(input.shape)}")
    channels = input.shape[1]
    if num_groups <= 0 or channels % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the {channels} channels")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(p, name)
            if tuple(p.shape) != (channels,):
                raise ValueError(f"{name} has shape {list(p.shape)}, expected [{channels}]")
    y, mean, rstd = GroupNormFunction.apply(
        int(num_groups), float(eps), float(weight_offset), input, weight, bias
    )
    return y, mean, rstd
