"""Caches results: a LayerNorm that remembers its first output for each shape and dtype and
returns it again, as a benchmark-gaming kernel does when inputs repeat. The first case of a shape
passes; every later case of that shape, drawn independently, must fail its forward check (and a
timed run fails re-verification).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor

normconf_name = "zoo: LayerNorm that caches its result by shape"
normconf_dtypes = ("float32",)
normconf_backward = False

_cache: dict[tuple[Any, ...], Tensor] = {}


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    **_: Any,
) -> Tensor:
    key = (tuple(input.shape), input.dtype, tuple(normalized_shape))
    if key not in _cache:
        _cache[key] = F.layer_norm(input, normalized_shape, weight, bias, eps)
    return _cache[key].clone()
