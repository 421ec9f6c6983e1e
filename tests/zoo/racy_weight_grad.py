"""Accurate but racy: a LayerNorm whose weight and bias gradients are summed in a different
order from call to call, as a kernel does that adds per-row partials to dW with atomics.

Forward and the input gradient are float64 then one rounding (correct, and the same every
time). The weight and bias gradients are float32 sums over rows taken in an order that
alternates, so their last bits change from call to call while every value stays inside the
tolerance. The determinism check must catch it where the adapter declares itself deterministic
(the default), and report it without failing where ``normconf_deterministic = False``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

normconf_name = "zoo: LayerNorm with dW summed in a changing order"
normconf_dtypes = ("float32",)


_calls = [0]


def _order_dependent_sum(rows: Tensor, backwards: bool) -> Tensor:
    """Sum of the rows of a 2-D float32 tensor, one row at a time, first to last or (as the
    arrival order of atomic adds may change) last to first."""
    order = reversed(range(rows.shape[0])) if backwards else range(rows.shape[0])
    total = torch.zeros(rows.shape[1], dtype=torch.float32)
    for index in order:
        total = total + rows[index]
    return total


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        n = weight.numel()
        rows = x.detach().reshape(-1, n).double()
        mean = rows.mean(1, keepdim=True)
        rstd = ((rows - mean).square().mean(1, keepdim=True) + eps).rsqrt()
        xhat = (rows - mean) * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.shape = x.shape
        out = xhat * weight.double().reshape(1, n) + bias.double().reshape(1, n)
        return out.to(x.dtype).reshape(x.shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        xhat, rstd, weight = ctx.saved_tensors
        n = xhat.shape[1]
        g = grad.reshape(-1, n).double()
        gw = g * weight.double().reshape(1, n)
        dx = rstd * (gw - gw.mean(1, keepdim=True) - xhat * (gw * xhat).mean(1, keepdim=True))
        _calls[0] += 1  # every other backward pass sums the rows in the other order
        flip = bool(_calls[0] % 2)
        dweight = _order_dependent_sum((g * xhat).float(), flip).reshape(weight.shape)
        dbias = _order_dependent_sum(g.float(), flip).reshape(weight.shape)
        return dx.to(grad.dtype).reshape(ctx.shape), dweight, dbias, None


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    dims = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    trailing = input.shape[input.dim() - dims :]
    weight = torch.ones(trailing, dtype=input.dtype) if weight is None else weight
    bias = torch.zeros(trailing, dtype=input.dtype) if bias is None else bias
    return _LayerNorm.apply(input, weight, bias, eps)
