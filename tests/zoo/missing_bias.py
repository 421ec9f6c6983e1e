"""Broken on purpose: LayerNorm that accepts ``bias`` and never adds it.

Computes in float32 (float64 for float64 inputs) and rounds once into the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

normconf_name = "zoo: bias ignored"


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
    x = input.to(acc)
    var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(acc)
    # the defect: bias is never added
    return y.to(input.dtype)
