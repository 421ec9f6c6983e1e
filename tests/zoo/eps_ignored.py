"""Broken on purpose: LayerNorm and RMSNorm that take ``eps`` and never add it.

Harmless while the variance dwarfs ε; rows whose variance is near ε (or zero) come out wrong
(or NaN). Computes in float32 (float64 for float64 inputs), rounds once into the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

normconf_name = "zoo: eps ignored"


def _dims(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    count = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    return tuple(range(-count, 0))


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    acc = torch.promote_types(input.dtype, torch.float32)
    x = input.to(acc)
    var, mean = torch.var_mean(x, _dims(normalized_shape), correction=0, keepdim=True)
    y = (x - mean) * torch.rsqrt(var)  # the defect: eps is not added
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(input.dtype)


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    acc = torch.promote_types(input.dtype, torch.float32)
    x = input.to(acc)
    mean_square = (x * x).mean(_dims(normalized_shape), keepdim=True)
    y = x * torch.rsqrt(mean_square)  # the defect: eps is not added
    if weight is not None:
        y = y * weight.to(acc)
    return y.to(input.dtype)
