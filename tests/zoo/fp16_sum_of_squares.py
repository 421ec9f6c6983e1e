"""Broken on purpose: RMSNorm and LayerNorm that keep the running sum of squares in float16.

A half-precision accumulator: each square is formed in float32 and rounded to float16, then
added, left to right, to a float16 running sum (torch reductions would accumulate in float32,
so the loop is written out). Once the sum passes float16's largest value 65504 it is ``inf``,
the scale ``1/√(inf)`` is 0, and the row collapses to the bias (to 0 for RMSNorm). Below that
the sum is only inaccurate. Everything else is float32; one rounding into float16 at the end.
Only float16 inputs: that is the kernel this models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

normconf_name = "zoo: float16 sum of squares"
normconf_dtypes = ("float16",)


def _rows(input: Tensor, normalized_shape: int | Sequence[int]) -> Tensor:
    count = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    return input.float().reshape(*input.shape[: input.dim() - count], -1)


def _half_sum_of_squares(rows: Tensor) -> Tensor:
    """Σ v² over the last dim, the running sum rounded to float16 after every addition."""
    squares = (rows * rows).to(torch.float16)
    total = torch.zeros(rows.shape[:-1], dtype=torch.float16)
    for j in range(rows.shape[-1]):
        total = total + squares[..., j]  # the defect: a float16 accumulator
    return total.float().unsqueeze(-1)


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    rows = _rows(input, normalized_shape)
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    mean_square = _half_sum_of_squares(rows) / rows.shape[-1]
    y = (rows * torch.rsqrt(mean_square + eps)).reshape(input.shape)
    if weight is not None:
        y = y * weight.float()
    return y.to(input.dtype)


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    rows = _rows(input, normalized_shape)
    centred = rows - rows.mean(-1, keepdim=True)
    var = _half_sum_of_squares(centred) / rows.shape[-1]
    y = (centred * torch.rsqrt(var + eps)).reshape(input.shape)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(input.dtype)
