"""Broken on purpose: LayerNorm that adds ε to the standard deviation, ``(x - μ) / (√v + ε)``.

The interview LayerNorm's habit: the biased variance is right, but ε lands outside the square
root, so rows whose variance is comparable to ε are scaled wrongly (PyTorch: ``√(σ² + ε)``).
Computes in float32 (float64 for float64 inputs) and rounds once into the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

normconf_name = "zoo: eps added to the std"


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
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    std = (centred * centred).mean(dims, keepdim=True).sqrt()
    y = centred / (std + eps)  # the defect: eps belongs under the square root
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(input.dtype)
