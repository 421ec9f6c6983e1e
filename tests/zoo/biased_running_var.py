"""Broken on purpose: BatchNorm whose running variance takes the biased batch variance.

In training, BatchNorm normalises by the biased batch variance (divided by the N·spatial
values per channel) but folds the *unbiased* one into ``running_var``. This kernel reuses the
biased variance for both, so evaluation later runs on too small a variance. Everything else is
PyTorch's. Computes in float32 (float64 for float64 inputs) and rounds once into the dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

normconf_name = "zoo: biased running variance"


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    acc = torch.promote_types(input.dtype, torch.float32)
    x = input.to(acc)
    dims = (0, *range(2, input.dim()))
    per_channel = (1, input.shape[1]) + (1,) * (input.dim() - 2)
    if training or running_mean is None or running_var is None:
        var, mean = torch.var_mean(x, dims, correction=0)
        if training and running_mean is not None and running_var is not None:
            m = 0.1 if momentum is None else momentum
            with torch.no_grad():
                new_mean = (1 - m) * running_mean.to(acc) + m * mean
                new_var = (1 - m) * running_var.to(acc) + m * var  # the defect: biased var
                running_mean.copy_(new_mean.to(running_mean.dtype))
                running_var.copy_(new_var.to(running_var.dtype))
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    y = (x - mean.reshape(per_channel)) * torch.rsqrt(var + eps).reshape(per_channel)
    if weight is not None:
        y = y * weight.to(acc).reshape(per_channel)
    if bias is not None:
        y = y + bias.to(acc).reshape(per_channel)
    return y.to(input.dtype)
