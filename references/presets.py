"""Named presets: the normalization conventions found in the wild, with their provenance.

A *preset* names one implementation's convention for one reference function — which variance
estimator it divides by, where ε goes, what ε is, whether the scale is ``w`` or ``1 + w``, how the
running statistics move — and says where that knowledge comes from. It holds only the
convention keywords of the reference functions (see ``references`` and its API): ``eps``,
``variance``, ``eps_placement``, ``weight_offset``, ``running_variance``, ``momentum``,
``momentum_weights`` and ``add_rounding``. Tensors, shapes and depth-dependent constants stay
with the caller.

Use a preset by spreading its arguments into the reference function it names (``Preset.op``)::

    from references import deep_norm, layer_norm
    from references.presets import deepnorm_constants, get_preset

    y = layer_norm(x, shape, w, b, **get_preset("seed.layer_norm").arguments())
    y = layer_norm(x, shape, w, b, **get_preset("pytorch.layer_norm").arguments(eps=1e-6))

    alpha, _beta = deepnorm_constants("decoder-only", decoder_layers=24)
    y = deep_norm(x, fx, shape, w, b, **get_preset("deepnet.deep_norm").arguments(alpha=alpha))

``arguments()`` returns a fresh dict each time; keyword overrides replace preset values and may
add any other keyword the function takes (``alpha``, ``out_dtype``, ``training``, …). A key the
function does not take, or an invalid convention value, raises ``ValueError``.

What ε is. A preset's ``eps`` is the value the implementation's own interface stores, taken by
the reference as that exact binary64 number. ONNX stores every ``epsilon``/``momentum``
attribute as a 32-bit float in the model, so the ONNX presets carry ``float32(1e-5)`` =
9.999999747378752e-06 (and ``float32(0.9)``): no conforming runtime can add anything else, whatever
the input dtype. PyTorch and Keras keep ε as a Python float and kernels convert it to their
accumulation type later; that conversion depends on the input dtype and, like every other
intermediate rounding, is an implementation numeric that the references do not model. Each
preset's ``provenance`` lists such numerics, so a report can explain a mismatch of an ulp or two
without calling it a different convention.

Reading ``provenance``: it names the project, the file or spec section and the version that was
read, states what the code computes, and ends with what the references do not model.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, SupportsIndex

from references.known_presets import KNOWN_PRESETS
from references.preset_model import OP_KEYWORDS, OPS, PRESET_KEYWORDS, Preset

__all__ = [
    "DEEPNORM_ARCHITECTURES",
    "OPS",
    "OP_KEYWORDS",
    "PRESETS",
    "PRESET_KEYWORDS",
    "Preset",
    "deepnorm_constants",
    "get_preset",
    "presets_for",
]


def _index(presets: tuple[Preset, ...]) -> Mapping[str, Preset]:
    by_name: dict[str, Preset] = {}
    for preset in presets:
        if preset.name in by_name:
            raise ValueError(f"duplicate preset name {preset.name!r}")
        by_name[preset.name] = preset
    return MappingProxyType(by_name)


PRESETS: Final[Mapping[str, Preset]] = _index(KNOWN_PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name raises ValueError listing the known ones."""
    if isinstance(name, str) and name in PRESETS:
        return PRESETS[name]
    raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")


def presets_for(op: str) -> list[Preset]:
    """The presets of reference function ``op``, in PRESETS order (possibly none).

    An ``op`` that is not a reference function raises ValueError.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
    return [preset for preset in PRESETS.values() if preset.op == op]


DEEPNORM_ARCHITECTURES: Final[tuple[str, ...]] = (
    "encoder-only",
    "decoder-only",
    "encoder-decoder/encoder",
    "encoder-decoder/decoder",
)


def _layer_count(argument: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, SupportsIndex):
        raise ValueError(f"{argument} must be an integer number of layers, got {value!r}")
    count = operator.index(value)
    if count < 0:
        raise ValueError(f"{argument} must be >= 0, got {count}")
    return count


def deepnorm_constants(
    architecture: str, encoder_layers: int = 0, decoder_layers: int = 0
) -> tuple[float, float]:
    """DeepNorm's (alpha, beta) for an N-layer encoder and/or M-layer decoder.

    alpha scales the residual inside the norm, x_{l+1} = LN(alpha * x_l + G_l(x_l)); beta is the
    Xavier-initialisation gain of the FFN, value-projection and output-projection weights. From
    the DeepNet paper (Wang et al., 2022, arXiv:2203.00555), per architecture:

    ==========================  ======================  =====================  ==============
    architecture                alpha                   beta                   layers needed
    ==========================  ======================  =====================  ==============
    "encoder-only"              (2N)^(1/4)              (8N)^(-1/4)            N >= 1, M = 0
    "decoder-only"              (2M)^(1/4)              (8M)^(-1/4)            M >= 1, N = 0
    "encoder-decoder/encoder"   0.81 (N^4 M)^(1/16)     0.87 (N^4 M)^(-1/16)   N, M >= 1
    "encoder-decoder/decoder"   (3M)^(1/4)              (12M)^(-1/4)           N, M >= 1
    ==========================  ======================  =====================  ==============

    microsoft/torchscale computes the same alphas and the same betas except on the encoder side
    of an encoder-decoder, where it divides the weights by (N^4 M)^(1/16) / 1.15, a gain of
    1.15 (N^4 M)^(-1/16); this function follows the paper. Layer counts must be integers; an
    unknown architecture or counts that do not fit it raise ValueError.
    """
    n = _layer_count("encoder_layers", encoder_layers)
    m = _layer_count("decoder_layers", decoder_layers)
    if architecture == "encoder-only":
        if n < 1 or m != 0:
            raise ValueError(f"{architecture!r} needs encoder_layers >= 1 and decoder_layers == 0")
        return math.pow(2 * n, 0.25), math.pow(8 * n, -0.25)
    if architecture == "decoder-only":
        if m < 1 or n != 0:
            raise ValueError(f"{architecture!r} needs decoder_layers >= 1 and encoder_layers == 0")
        return math.pow(2 * m, 0.25), math.pow(8 * m, -0.25)
    if architecture in ("encoder-decoder/encoder", "encoder-decoder/decoder"):
        if n < 1 or m < 1:
            raise ValueError(f"{architecture!r} needs encoder_layers >= 1 and decoder_layers >= 1")
        if architecture == "encoder-decoder/decoder":
            return math.pow(3 * m, 0.25), math.pow(12 * m, -0.25)
        # (N^4 M)^(1/16) = N^(1/4) M^(1/16), evaluated without forming N^4 M.
        scale = math.pow(n, 0.25) * math.pow(m, 0.0625)
        return 0.81 * scale, 0.87 / scale
    raise ValueError(
        f"unknown architecture {architecture!r}; known: {', '.join(DEEPNORM_ARCHITECTURES)}"
    )
