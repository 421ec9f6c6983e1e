"""Broken on purpose: LayerNorm that "sanitises" its input with ``torch.nan_to_num``.

NaN becomes 0 and ±inf the largest finite value before the statistics, so a group holding a NaN
comes back finite instead of NaN: the poison is hidden from everything downstream. Otherwise
PyTorch's LayerNorm, computed in float32 (float64 for float64 inputs), rounded once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

normconf_name = "zoo: NaN swallowed"


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    count = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    dims = tuple(range(-count, 0))
    acc = torch.promote_types(input.dtype, torch.float32)
    x = torch.nan_to_num(input.to(acc))  # the defect: NaN must propagate
    var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(input.dtype)
