"""Correct when declared: a fused add + RMSNorm that updates ``residual`` in place, as serving
kernels do, and returns it as the new residual (``normconf_inplace = True``).

``z = input + alpha * residual`` rounded once into the dtype is written over ``residual`` and
normalised (float64 inside, one rounding). Without the declaration the same function fails the
contract: its second output shares memory with an argument, and it changes that argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

normconf_name = "zoo: fused add + RMSNorm, residual updated in place"
normconf_dtypes = ("float32", "bfloat16")
normconf_backward = False
normconf_inplace = True


def fused_add_rms_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    alpha: float = 1.0,
) -> tuple[Tensor, Tensor]:
    dims = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    axes = tuple(range(-dims, 0))
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    residual.copy_(input.double() + alpha * residual.double())
    z = residual.double()
    y = z * (z.square().mean(axes, keepdim=True) + eps).rsqrt()
    if weight is not None:
        y = y * weight.double()
    return y.to(input.dtype), residual
