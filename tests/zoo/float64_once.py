"""Correct by another route: LayerNorm, RMSNorm and GroupNorm computed in float64.

Every input is converted to float64, the norm is evaluated there (two-pass statistics, ε under
the root, PyTorch's conventions) and the result is rounded once into the input dtype; autograd
differentiates the float64 graph and rounds each gradient once into its leaf's dtype. float64's
53 bits leave the narrower dtypes' results all but correctly rounded; for float64 inputs it is
ordinary float64 arithmetic. The suite must pass it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

normconf_name = "zoo: float64 once (correct)"


def _dims(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    count = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    return tuple(range(-count, 0))


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, shape: Sequence[int]) -> Tensor:
    if weight is not None:
        y = y * weight.double().reshape(shape)
    if bias is not None:
        y = y + bias.double().reshape(shape)
    return y


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    x = input.double()
    dims = _dims(normalized_shape)
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dims, keepdim=True)
    y = centred / torch.sqrt(var + eps)
    trailing = input.shape[input.dim() - len(dims) :]
    return _affine(y, weight, bias, trailing).to(input.dtype)


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    x = input.double()
    dims = _dims(normalized_shape)
    # PyTorch's eps=None: the machine epsilon of the type it computes in (float32 below float64).
    if eps is None:
        eps = torch.finfo(torch.promote_types(input.dtype, torch.float32)).eps
    y = x / torch.sqrt((x * x).mean(dims, keepdim=True) + eps)
    trailing = input.shape[input.dim() - len(dims) :]
    return _affine(y, weight, None, trailing).to(input.dtype)


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    x = input.double()
    grouped = x.reshape(input.shape[0], num_groups, math.prod(input.shape[1:]) // num_groups)
    mean = grouped.mean(-1, keepdim=True)
    centred = grouped - mean
    var = (centred * centred).mean(-1, keepdim=True)
    y = (centred / torch.sqrt(var + eps)).reshape(input.shape)
    per_channel = (input.shape[1],) + (1,) * (input.dim() - 2)
    return _affine(y, weight, bias, per_channel).to(input.dtype)
