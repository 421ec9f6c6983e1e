"""Raises: a LayerNorm whose launcher rejects every shape, as a kernel does when it asks for more
shared memory than a block may have. The contract check must fail each case with "raised
RuntimeError: …" and the run must go on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

normconf_name = "zoo: LayerNorm whose launch always fails"
normconf_dtypes = ("float32",)


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    **_: Any,
) -> Tensor:
    raise RuntimeError(f"too many resources requested for launch: rows of {input.shape[-1]}")
