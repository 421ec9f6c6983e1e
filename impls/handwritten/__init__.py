"""The seed document's hand-written LayerNorm, as its author meant it to run.

The project's seed notes (``seed-normalization-notes.txt``, an interview answer) write::

    mean = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True, unbiased=False)
    return self.gamma * (x - mean) / (std + self.eps) + self.beta      # eps = 1e-6

that is ``y = w * (x - mean) / (std + eps) + b`` with the BIASED standard deviation and eps added
to it, outside the square root (the references' ``eps_placement="outside"``, preset
``seed.layer_norm``), where PyTorch computes ``(x - mean) / sqrt(var + eps)``. Only
``layer_norm``. Here the statistics run over the trailing ``normalized_shape`` dims (the seed
normalises the last dim only), every step is a plain torch op in the input dtype evaluated in the
seed's order (``w * (x - mean)``, then the division, then ``+ b``), and the default eps is the
seed's 1e-6. A missing weight or bias is skipped, not multiplied by ones or added as zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

normconf_name = "handwritten (seed LayerNorm)"
normconf_devices = ("cpu", "cuda")
# The seed document's code is float32 (and float64) code: run on half inputs it computes every
# step in the half type, which no tolerance for float32 accumulation admits.
normconf_dtypes = ("float32", "float64")
normconf_conventions = {"layer_norm": {"eps_placement": "outside"}}


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """``weight * (x - mean) / (std + eps) + bias``, biased std over the trailing dims."""
    count = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    dims = tuple(range(-count, 0))
    mean = input.mean(dims, keepdim=True)
    std = input.std(dims, keepdim=True, correction=0)
    centred = input - mean
    scaled = centred if weight is None else weight * centred
    out = scaled / (std + eps)
    return out if bias is None else out + bias
