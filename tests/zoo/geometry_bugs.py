"""LayerNorms that are right on every value and wrong on one class of shape or layout, as the
kernels of the public bug threads were. Each is an attribute: ``--adapter
tests/zoo/geometry_bugs.py:row_wrap``.

- ``correct``: the control. Forward and backward written by hand (an ``autograd.Function``, not
  autograd through torch's own LayerNorm), float64 inside and one rounding, every stride,
  offset and stride-0 dimension of its arguments honoured through torch's indexing;
- ``row_wrap``: the row index is 16 bits wide, so row r ≥ 65536 computes row r - 65536 (apex
  FusedLayerNorm's batch ≥ 2^16, a grid dimension past CUDA's 65535);
- ``tail_dropped``: rows are walked in tiles of 1024 and the statistics skip a partial last
  tile (a mask that is right when n is a multiple of the tile);
- ``wide_row_partials``: rows longer than 16384 switch to a split reduction whose partial sums
  after the first chunk are lost;
- ``empty_crash``: an empty batch launches a grid of zero blocks, which CUDA refuses;
- ``grad_strides_ignored``: the backward pass reads ``grad_output`` as if it were laid out
  densely from its storage offset (the strides of ``x`` taken for those of ``dy``, quack#88),
  though it makes an expanded ``grad_output`` contiguous first;
- ``grad_expanded_as_dense``: the backward pass honours ``grad_output``'s strides, but a stride
  of 0 is replaced by the dense one, so the ``grad_output`` of ``y.sum().backward()`` is read
  as a full tensor.

Only ``layer_norm``, in float32; every other path is the control's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

TILE = 1024
WIDE = 16384
ROW_BITS = 16


def _dense_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for extent in reversed(shape):
        strides.append(step)
        step *= max(int(extent), 1)
    return tuple(reversed(strides))


def _read_dense(t: Tensor, strides: Sequence[int]) -> Tensor:
    """``t``'s storage read with ``strides`` from its storage offset, as a kernel given only a
    data pointer and strides of its own choosing reads it."""
    storage = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage())
    return storage.as_strided(t.shape, tuple(strides), t.storage_offset())


def _statistics(rows: Tensor, bug: str | None) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of float64 rows, over the columns the buggy kernel sees."""
    n = rows.shape[1]
    seen = rows
    if bug == "tail_dropped" and n > TILE and n % TILE:
        seen = rows[:, : n - n % TILE]
    elif bug == "wide_row_partials" and n > WIDE:
        seen = rows[:, :WIDE]
    mean = seen.mean(1, keepdim=True)
    return mean, (seen - mean).square().mean(1, keepdim=True)


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, n: int, eps: float, bug: Any
    ) -> Tensor:
        if bug == "empty_crash" and x.numel() == 0:
            raise RuntimeError("CUDA error: invalid configuration argument (a grid of 0 blocks)")
        rows = x.detach().reshape(-1, n).double()
        if bug == "row_wrap" and rows.shape[0] > 2**ROW_BITS:
            rows = rows[torch.arange(rows.shape[0]) % 2**ROW_BITS]
        mean, var = _statistics(rows, bug)
        rstd = (var + eps).rsqrt()
        xhat = (rows - mean) * rstd
        ctx.save_for_backward(xhat, rstd, weight.detach())
        ctx.shape, ctx.bug = x.shape, bug
        out = xhat * weight.detach().double().reshape(1, n) + bias.detach().double().reshape(1, n)
        return out.to(x.dtype).reshape(x.shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        xhat, rstd, weight = ctx.saved_tensors
        n = xhat.shape[1]
        if ctx.bug == "grad_strides_ignored":
            if 0 in grad.stride():
                grad = grad.contiguous()
            grad = _read_dense(grad, _dense_strides(grad.shape))
        elif ctx.bug == "grad_expanded_as_dense":
            dense = _dense_strides(grad.shape)
            strides = [s if s else d for s, d in zip(grad.stride(), dense, strict=True)]
            grad = _read_dense(grad, strides)
        g = grad.reshape(-1, n).double()
        gw = g * weight.double().reshape(1, n)
        dx = rstd * (gw - gw.mean(1, keepdim=True) - xhat * (gw * xhat).mean(1, keepdim=True))
        dweight = (g * xhat).sum(0).reshape(weight.shape).to(weight.dtype)
        dbias = g.sum(0).reshape(weight.shape).to(weight.dtype)
        return dx.to(grad.dtype).reshape(ctx.shape), dweight, dbias, None, None, None


class _Zoo:
    """One adapter: ``layer_norm`` with one defect (``bug``), or none."""

    def __init__(self, bug: str | None, what: str) -> None:
        self.bug = bug
        self.normconf_name = f"zoo: LayerNorm, {what}"
        self.normconf_dtypes = ("float32",)

    def layer_norm(
        self,
        input: Tensor,
        normalized_shape: Sequence[int],
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        eps: float = 1e-5,
    ) -> Tensor:
        n = 1
        for extent in normalized_shape:
            n *= int(extent)
        shape = tuple(normalized_shape)
        ones = torch.ones(shape, dtype=input.dtype, device=input.device)
        weight = ones if weight is None else weight
        bias = torch.zeros_like(ones) if bias is None else bias
        return _LayerNorm.apply(input, weight, bias, n, eps, self.bug)


correct = _Zoo(None, "hand-written backward that honours every stride")
row_wrap = _Zoo("row_wrap", "a 16-bit row index")
tail_dropped = _Zoo("tail_dropped", "statistics skip a partial last tile of 1024")
wide_row_partials = _Zoo("wide_row_partials", "rows past 16384 lose their later partial sums")
empty_crash = _Zoo("empty_crash", "crashes on an empty batch")
grad_strides_ignored = _Zoo("grad_strides_ignored", "backward ignores grad_output's strides")
grad_expanded_as_dense = _Zoo("grad_expanded_as_dense", "backward reads a stride-0 grad as dense")
