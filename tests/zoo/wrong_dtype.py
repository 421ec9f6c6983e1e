"""Returns the wrong dtype: a LayerNorm that computes in float32 and forgets to cast back, so a
float16 input gets a float32 output. Its values are accurate; the contract check must fail it
with "dtype torch.float32, expected torch.float16".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

normconf_name = "zoo: LayerNorm returning float32 for float16"
normconf_dtypes = ("float32", "float16")


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    **_: Any,
) -> Tensor:
    wide = [t if t is None else t.to(torch.float32) for t in (input, weight, bias)]
    return F.layer_norm(wide[0], normalized_shape, wide[1], wide[2], eps)
