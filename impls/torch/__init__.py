"""Eager PyTorch, CPU and CUDA: the baseline adapter.

``layer_norm``, ``rms_norm``, ``group_norm``, ``batch_norm`` and ``instance_norm`` are
``torch.nn.functional``'s own functions, unchanged, so every convention is PyTorch's (biased
variance, eps under the square root, no weight offset; ``rms_norm``'s ``eps=None`` is the opmath
type's machine epsilon; BatchNorm's running variance takes the unbiased batch variance, momentum
weighting the new value). ATen accumulates 16-bit inputs in float32.

The three composed norms are written with torch ops so that the sum is rounded once into the
input dtype before it is normalised (the references' ``add_rounding="dtype"``):

- ``deep_norm``: ``z = alpha * input + sublayer_output`` (``torch.add(sublayer_output, input,
  alpha=alpha)``), then ``F.layer_norm(z)``;
- ``fused_add_rms_norm``: ``z = input + alpha * residual``, returns ``(F.rms_norm(z), z)``;
- ``fused_add_layer_norm``: ``z = input + alpha * residual``, returns ``(F.layer_norm(z), z)``.

``torch.add`` with ``alpha`` computes ``a + alpha * b`` in the opmath type and rounds once (for
16-bit inputs the float32 intermediate may be rounded first: a double rounding that the tolerance
model covers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from impls.adapter import normalized_dims

normconf_name = "torch (eager)"
normconf_devices = ("cpu", "cuda")

layer_norm = F.layer_norm
rms_norm = F.rms_norm
group_norm = F.group_norm
batch_norm = F.batch_norm
instance_norm = F.instance_norm


def deep_norm(
    input: Tensor,
    sublayer_output: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    alpha: float = 1.0,
    eps: float = 1e-5,
) -> Tensor:
    """``layer_norm(alpha * input + sublayer_output)``, the sum rounded once into the dtype."""
    z = torch.add(sublayer_output, input, alpha=alpha)
    return F.layer_norm(z, normalized_dims(normalized_shape), weight, bias, eps)


def fused_add_rms_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    alpha: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """``(rms_norm(z), z)`` with ``z = input + alpha * residual`` rounded once into the dtype."""
    z = torch.add(input, residual, alpha=alpha)
    return F.rms_norm(z, normalized_dims(normalized_shape), weight, eps), z


def fused_add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    alpha: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """``(layer_norm(z), z)`` with ``z = input + alpha * residual`` rounded once into the dtype."""
    z = torch.add(input, residual, alpha=alpha)
    return F.layer_norm(z, normalized_dims(normalized_shape), weight, bias, eps), z


def layer_norm_with_stats(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``F.layer_norm`` with the mean and rstd it saves for backward (``native_layer_norm``)."""
    out, mean, rstd = torch.native_layer_norm(
        input, normalized_dims(normalized_shape), weight, bias, eps
    )
    return out, mean, rstd


def group_norm_with_stats(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``F.group_norm`` with its saved mean and rstd per (sample, group) (``native_group_norm``,
    which, unlike ``F.group_norm``, needs a contiguous input: made so here)."""
    input = input.contiguous()
    batch, channels = input.shape[0], input.shape[1]
    spatial = math.prod(input.shape[2:])
    out, mean, rstd = torch.native_group_norm(
        input, weight, bias, batch, channels, spatial, num_groups, eps
    )
    return out, mean, rstd
