"""Broken on purpose: a LayerNorm that takes ``out=`` and never writes the buffer's last row.

Without ``out=`` every value is right (float64 inside, rounded once into the dtype); with it,
the result is copied into every row of ``out`` but the last — a launch grid one row block short
— and ``out`` is returned. In a buffer from ``torch.empty`` the missing row holds whatever the
memory held; the suite's buffer holds NaN, so the row shows. Forward only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

normconf_name = "zoo: LayerNorm that leaves the last row of out= unwritten"
normconf_dtypes = ("float32",)
normconf_backward = False
normconf_out = ("layer_norm",)


def exact_layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """LayerNorm in float64 (biased variance, eps under the root), rounded once into the dtype."""
    count = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    dims = tuple(range(-count, 0))
    wide = input.double()
    var, mean = torch.var_mean(wide, dims, correction=0, keepdim=True)
    y = (wide - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y.to(input.dtype)


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    out: Tensor | None = None,
) -> Tensor:
    result = exact_layer_norm(input, normalized_shape, weight, bias, eps)
    if out is None:
        return result
    count = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    width = result.shape[result.dim() - count :].numel()
    # the defect: the last row of out= is never written
    out.view(-1, width)[:-1] = result.reshape(-1, width)[:-1]
    return out
