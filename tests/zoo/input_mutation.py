"""Changes its input: a LayerNorm that centres ``input`` in place to save a buffer. Its output is
right; the contract check must fail it with "changed its argument 'input' in place".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

normconf_name = "zoo: LayerNorm that centres its input in place"
normconf_dtypes = ("float32",)
normconf_backward = False


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    **_: Any,
) -> Tensor:
    dims = tuple(range(input.dim() - len(normalized_shape), input.dim()))
    with torch.no_grad():
        input.sub_(input.mean(dim=dims, keepdim=True))  # the caller's tensor, overwritten
        y = input / torch.sqrt(input.pow(2).mean(dim=dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y
