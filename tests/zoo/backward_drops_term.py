"""Broken on purpose: LayerNorm and RMSNorm with a hand-written backward that drops a term.

With ``g = dy·w``, ``x̂ = (x - μ)·r`` and ``r = 1/√(σ² + ε)`` the input gradient is
``dx = r·(g - mean(g) - x̂·mean(g·x̂))`` (RMSNorm: ``μ = 0``, ``r = 1/√(mean(x²) + ε)``, and no
``mean(g)``); the last term is the gradient that flows through the variance. These
``autograd.Function``s leave it out (``dw = Σ dy·x̂`` and ``db = Σ dy`` are right, and so is the
forward pass). Computes in float32 (float64 for float64 inputs) and rounds once into the input
dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

normconf_name = "zoo: backward drops a term"


class _Norm(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, rows: Tensor, weight: Tensor, bias: Tensor, eps: float, center: bool
    ) -> Tensor:
        x = rows.to(weight.dtype)
        if center:
            var, mean = torch.var_mean(x, -1, correction=0, keepdim=True)
        else:
            var, mean = (x * x).mean(-1, keepdim=True), torch.zeros_like(x[..., :1])
        rstd = torch.rsqrt(var + eps)
        x_hat = (x - mean) * rstd
        ctx.save_for_backward(x_hat, rstd, weight)
        ctx.dtype, ctx.center = rows.dtype, center
        return (x_hat * weight + bias).to(rows.dtype)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, dy: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, None, None]:
        x_hat, rstd, weight = ctx.saved_tensors
        dy = dy.to(weight.dtype)
        g = dy * weight
        centred = g - g.mean(-1, keepdim=True) if ctx.center else g
        dx = rstd * centred  # the defect: - x_hat * mean(g * x_hat) is missing
        return dx.to(ctx.dtype), (dy * x_hat).sum(0), dy.sum(0), None, None


def _apply(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    center: bool,
) -> Tensor:
    count = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    trailing = input.shape[input.dim() - count :]
    acc = torch.promote_types(input.dtype, torch.float32)
    rows = input.reshape(-1, trailing.numel())
    w = torch.ones(trailing, dtype=acc) if weight is None else weight.to(acc)
    b = torch.zeros(trailing, dtype=acc) if bias is None else bias.to(acc)
    out = _Norm.apply(rows, w.reshape(-1), b.reshape(-1), eps, center)
    return out.reshape(input.shape)


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    return _apply(input, normalized_shape, weight, bias, eps, center=True)


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    # PyTorch's eps=None: the machine epsilon of the type it computes in.
    if eps is None:
        eps = torch.finfo(torch.promote_types(input.dtype, torch.float32)).eps
    return _apply(input, normalized_shape, weight, None, eps, center=False)
