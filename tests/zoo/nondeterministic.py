"""Nondeterministic forward: a LayerNorm whose result depends on how often it was called, as a
kernel does that reads uninitialised scratch memory or races on a reduction. Each call adds a
perturbation of a few ulps that alternates in sign from call to call, so each output stays
inside the tolerance while two calls on the same inputs differ: the determinism check must
fail it ("the same inputs twice gave different bits in output").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

normconf_name = "zoo: LayerNorm whose forward changes from call to call"
normconf_dtypes = ("float32",)
normconf_backward = False

_calls = [0]


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    **_: Any,
) -> Tensor:
    _calls[0] += 1
    y = F.layer_norm(input, normalized_shape, weight, bias, eps)
    toward = torch.full_like(y, float("inf") if _calls[0] % 2 else float("-inf"))
    return torch.nextafter(y, toward)  # one ulp up on odd calls, one down on even ones
