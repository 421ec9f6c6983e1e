"""Broken on purpose: LayerNorm whose variance is ``E[x²] - E[x]²``, in float32.

One pass over the data is tempting (both sums at once), but the difference of two numbers of
size ``E[x²]`` loses everything once the mean is large against the spread: its error is about
``u·E[x²]``, i.e. ``u·κ²`` relative to the variance. The clamp at 0 keeps rows finite, as such
kernels do. Computes in float32 (float64 for float64 inputs), rounds once into the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

normconf_name = "zoo: E[x^2] - E[x]^2"


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
    mean_of_squares = (x * x).mean(dims, keepdim=True)
    var = (mean_of_squares - mean * mean).clamp_min(0.0)  # the defect: cancellation
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(input.dtype)
