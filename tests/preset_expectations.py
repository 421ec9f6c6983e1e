"""What the preset tests expect: the API's keywords and the presets, transcribed independently.

The expected presets and the API keywords below are transcribed independently of
``references.presets`` (from the API document and the sources each preset cites), so a drift on
either side fails the tests that compare them.
"""

from __future__ import annotations

import numpy as np
import pytest

from references.presets import PRESETS

# --- the API, as its document states it ------------------------------------------------------

# Keywords of each reference function that are neither tensors nor shapes.
_COMMON = {"eps", "variance", "eps_placement", "weight_offset", "out_dtype", "return_stats"}
_STATS = {"momentum", "running_variance", "momentum_weights", "num_batches_tracked"}
API_KEYWORDS: dict[str, set[str]] = {
    "layer_norm": _COMMON,
    "rms_norm": _COMMON,
    "group_norm": _COMMON,
    "batch_norm": _COMMON | _STATS | {"training"},
    "instance_norm": _COMMON | _STATS | {"use_input_stats"},
    "deep_norm": _COMMON | {"alpha", "add_rounding"},
    "fused_add_rms_norm": _COMMON | {"alpha", "add_rounding"},
    "fused_add_layer_norm": _COMMON | {"alpha", "add_rounding"},
}
CONVENTION_KEYWORDS = {
    "eps",
    "variance",
    "eps_placement",
    "weight_offset",
    "running_variance",
    "momentum",
    "momentum_weights",
    "add_rounding",
}
CHOICES = {
    "variance": {"biased", "unbiased"},
    "eps_placement": {"inside", "outside"},
    "running_variance": {"biased", "unbiased"},
    "momentum_weights": {"new", "running"},
    "add_rounding": {"dtype", "exact"},
}

# --- the presets, as their sources state them --------------------------------------------------

# ONNX attributes are 32-bit floats in the model file.
ONNX_EPS = float(np.float32(1e-5))
ONNX_MOMENTUM = float(np.float32(0.9))


def _conv(
    eps: float | None, variance: str = "biased", placement: str = "inside", offset: float = 0.0
) -> dict[str, object]:
    return {"eps": eps, "variance": variance, "eps_placement": placement, "weight_offset": offset}


def _running(kind: str, momentum: float, weights: str) -> dict[str, object]:
    return {"running_variance": kind, "momentum": momentum, "momentum_weights": weights}


EXPECTED: dict[str, tuple[str, dict[str, object]]] = {
    "pytorch.layer_norm": ("layer_norm", _conv(1e-5)),
    "pytorch.rms_norm": ("rms_norm", _conv(None)),
    "pytorch.group_norm": ("group_norm", _conv(1e-5)),
    "pytorch.batch_norm": ("batch_norm", _conv(1e-5) | _running("unbiased", 0.1, "new")),
    "pytorch.instance_norm": ("instance_norm", _conv(1e-5) | _running("unbiased", 0.1, "new")),
    "onnx.layer_norm": ("layer_norm", _conv(ONNX_EPS)),
    "onnx.batch_norm": (
        "batch_norm",
        _conv(ONNX_EPS) | _running("biased", ONNX_MOMENTUM, "running"),
    ),
    "onnx.instance_norm": ("instance_norm", _conv(ONNX_EPS)),
    "onnx.group_norm": ("group_norm", _conv(ONNX_EPS)),
    "onnx.rms_norm": ("rms_norm", _conv(ONNX_EPS)),
    "keras.layer_norm": ("layer_norm", _conv(1e-3)),
    "keras.batch_norm": ("batch_norm", _conv(1e-3) | _running("biased", 0.99, "running")),
    "keras.group_norm": ("group_norm", _conv(1e-3)),
    "seed.layer_norm": ("layer_norm", _conv(1e-6, "biased", "outside")),
    "annotated_transformer.layer_norm": ("layer_norm", _conv(1e-6, "unbiased", "outside")),
    "hf.llama.rms_norm": ("rms_norm", _conv(1e-6)),
    "hf.gemma.rms_norm": ("rms_norm", _conv(1e-6, offset=1.0)),
    "t5.layer_norm": ("rms_norm", _conv(1e-6)),
    "deepnet.deep_norm": ("deep_norm", _conv(1e-5) | {"add_rounding": "dtype"}),
}

ALL_PRESETS = list(PRESETS.values())
by_name = pytest.mark.parametrize("preset", ALL_PRESETS, ids=[p.name for p in ALL_PRESETS])
