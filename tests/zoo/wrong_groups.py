"""Broken on purpose: GroupNorm whose groups interleave the channels.

GroupNorm's group ``g`` is the contiguous block of channels ``[g·C/G, (g + 1)·C/G)``. Viewing
the channels as ``(C/G, G)`` instead of ``(G, C/G)`` puts channel ``c`` in group ``c mod G``:
the same statistics code, the wrong reduction boundaries. Computes in float32 (float64 for
float64 inputs) and rounds once into the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

normconf_name = "zoo: interleaved groups"


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    n, channels = input.shape[0], input.shape[1]
    acc = torch.promote_types(input.dtype, torch.float32)
    x = input.to(acc)
    # the defect: (channels // groups, groups) where (groups, channels // groups) is meant
    grouped = x.reshape(n, channels // num_groups, num_groups, -1)
    var, mean = torch.var_mean(grouped, (1, 3), correction=0, keepdim=True)
    y = ((grouped - mean) * torch.rsqrt(var + eps)).reshape(input.shape)
    per_channel = (1, channels) + (1,) * (input.dim() - 2)
    if weight is not None:
        y = y * weight.to(acc).reshape(per_channel)
    if bias is not None:
        y = y + bias.to(acc).reshape(per_channel)
    return y.to(input.dtype)
