"""Broken: an RMSNorm that normalises its input in place and returns the input tensor itself.

The values are right; the contract is not: the caller's ``input`` is overwritten, and the
output aliases it (a caller that reuses ``input`` reads the normalised values). Forward only,
so that autograd does not refuse the in-place write first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

normconf_name = "zoo: RMSNorm written over its input"
normconf_dtypes = ("float32",)
normconf_backward = False


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    dims = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    axes = tuple(range(-dims, 0))
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    wide = input.double()
    scale = (wide.square().mean(axes, keepdim=True) + eps).rsqrt()
    result = wide * scale if weight is None else wide * scale * weight.double()
    return input.copy_(result)
