"""The built-in adapters by name, and those that installed packages register.

A built-in is a module of this package; naming one imports nothing until it is loaded. Installed
packages add adapters under the entry-point group :data:`ENTRY_POINT_GROUP`, each entry point a
name -> ``"pkg.module:attr"``, e.g. in ``pyproject.toml``::

    [project.entry-points."normconf.adapters"]
    mykernels = "mykernels.normconf_adapter:adapter"
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

ENTRY_POINT_GROUP = "normconf.adapters"


@dataclass(frozen=True)
class Builtin:
    """A built-in adapter: the module that is the adapter, and one line saying what it is."""

    module: str
    description: str


BUILTINS: dict[str, Builtin] = {
    "torch": Builtin("impls.torch", "eager PyTorch (torch.nn.functional), CPU and CUDA"),
    "torch-compile": Builtin(
        "impls.torch_compile", "the eager functions compiled by torch.compile (Inductor)"
    ),
    "onnxruntime": Builtin(
        "impls.onnxruntime", "one-node ONNX graphs run by onnxruntime's CPU execution provider"
    ),
    "triton": Builtin(
        "impls.triton",
        "normconf's Triton kernels (LayerNorm, RMSNorm, add-norms, DeepNorm, GroupNorm); "
        "interpreted on the CPU",
    ),
    "triton-gemma": Builtin(
        "impls.triton.gemma", "normconf's Triton RMSNorm with Gemma's (1 + weight) scale"
    ),
    "cuda": Builtin("impls.cuda", "normconf's CUDA C++ LayerNorm and RMSNorm (GPU only)"),
    "handwritten": Builtin(
        "impls.handwritten",
        "the seed document's LayerNorm: w * (x - mean) / (std + eps) + b, biased std, eps 1e-6",
    ),
}


def entry_points() -> dict[str, str]:
    """Adapters registered by installed packages: name -> ``"pkg.module:attr"``."""
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    # A value may carry extras ("pkg.module:attr [gpu]"); they choose dependencies, not objects.
    return {point.name: point.value.split("[", 1)[0].strip() for point in found}


def available() -> dict[str, str]:
    """Every adapter name a spec may use: built-ins first, then installed entry points
    (name -> one-line description; an entry point is described by its target)."""
    names = {name: builtin.description for name, builtin in BUILTINS.items()}
    for name, target in entry_points().items():
        names.setdefault(name, f"installed entry point {target}")
    return names
