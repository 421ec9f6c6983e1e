"""Returns a numpy array instead of a tensor: a LayerNorm written against numpy. The values are
right; the contract check must fail it with "returned a numpy.ndarray, not a torch.Tensor".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

normconf_name = "zoo: LayerNorm returning a numpy array"
normconf_dtypes = ("float32",)
normconf_backward = False


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    **_: Any,
) -> np.ndarray:
    x = input.detach().double().numpy()
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(x.var(axis=axes, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.detach().double().numpy()
    if bias is not None:
        y = y + bias.detach().double().numpy()
    return y.astype(np.float32)
