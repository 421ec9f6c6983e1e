"""normconf references: certified, correctly rounded normalisation layers, forward and backward.

Every function returns the exact mathematical result for its exactly represented inputs, rounded
once (to nearest, ties to even) into the output dtype. See :mod:`references.norms`,
:mod:`references.gradients`, :mod:`references.conventions` and :mod:`references.presets`.
"""

from references.gradients import (
    Gradients,
    batch_norm_backward,
    deep_norm_backward,
    fused_add_layer_norm_backward,
    fused_add_rms_norm_backward,
    group_norm_backward,
    instance_norm_backward,
    layer_norm_backward,
    rms_norm_backward,
)
from references.norms import (
    NormOutput,
    batch_norm,
    deep_norm,
    fused_add_layer_norm,
    fused_add_rms_norm,
    group_norm,
    instance_norm,
    layer_norm,
    rms_norm,
)

__all__ = [
    "Gradients",
    "NormOutput",
    "batch_norm",
    "batch_norm_backward",
    "deep_norm",
    "deep_norm_backward",
    "fused_add_layer_norm",
    "fused_add_layer_norm_backward",
    "fused_add_rms_norm",
    "fused_add_rms_norm_backward",
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "layer_norm",
    "layer_norm_backward",
    "rms_norm",
    "rms_norm_backward",
]
