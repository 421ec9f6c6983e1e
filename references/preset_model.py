"""What a preset is: the operations, their keywords, and the validated :class:`Preset` type.

The table of presets is :mod:`references.known_presets`; the look-ups are in
:mod:`references.presets`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from references.conventions import ADD_ROUNDINGS, EPS_PLACEMENTS, MOMENTUM_WEIGHTS, VARIANCES

OPS: Final[tuple[str, ...]] = (
    "layer_norm",
    "rms_norm",
    "group_norm",
    "batch_norm",
    "instance_norm",
    "deep_norm",
    "fused_add_rms_norm",
    "fused_add_layer_norm",
)

# The keywords of the reference API that are neither tensors nor shapes, per function. These are
# the keys ``Preset.arguments`` accepts as overrides; a preset itself stores only the convention
# subset, PRESET_KEYWORDS.
_SHARED: Final = ("eps", "variance", "eps_placement", "weight_offset", "out_dtype", "return_stats")
_RUNNING: Final = ("momentum", "running_variance", "momentum_weights", "num_batches_tracked")
OP_KEYWORDS: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {
        "layer_norm": frozenset(_SHARED),
        "rms_norm": frozenset(_SHARED),
        "group_norm": frozenset(_SHARED),
        "batch_norm": frozenset({*_SHARED, "training", *_RUNNING}),
        "instance_norm": frozenset({*_SHARED, "use_input_stats", *_RUNNING}),
        "deep_norm": frozenset({*_SHARED, "alpha", "add_rounding"}),
        "fused_add_rms_norm": frozenset({*_SHARED, "alpha", "add_rounding"}),
        "fused_add_layer_norm": frozenset({*_SHARED, "alpha", "add_rounding"}),
    }
)

PRESET_KEYWORDS: Final[frozenset[str]] = frozenset(
    {
        "eps",
        "variance",
        "eps_placement",
        "weight_offset",
        "running_variance",
        "momentum",
        "momentum_weights",
        "add_rounding",
    }
)

_CHOICES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "variance": VARIANCES,
        "eps_placement": EPS_PLACEMENTS,
        "running_variance": VARIANCES,
        "momentum_weights": MOMENTUM_WEIGHTS,
        "add_rounding": ADD_ROUNDINGS,
    }
)

# eps=None has a meaning (PyTorch's opmath epsilon) only for the RMS norms.
_EPS_NONE_OPS: Final = frozenset({"rms_norm", "fused_add_rms_norm"})


def _real(value: object) -> float | None:
    """``value`` as a float when it is a real number (bool excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _check_value(op: str, key: str, value: object) -> None:
    """Raise ValueError when ``value`` is not a valid ``key`` for ``op``; other keys pass."""
    if key in _CHOICES:
        choices = _CHOICES[key]
        if not (isinstance(value, str) and value in choices):
            raise ValueError(f"{key}={value!r} is not one of {', '.join(map(repr, choices))}")
        return
    number = _real(value)
    if key == "eps":
        if value is None:
            if op not in _EPS_NONE_OPS:
                raise ValueError(
                    f"eps=None is meaningful only for {' and '.join(sorted(_EPS_NONE_OPS))}"
                )
        elif number is None or not math.isfinite(number) or number < 0:
            raise ValueError(f"eps={value!r} is not a finite number >= 0 (or None)")
    elif key == "weight_offset":
        if number is None or not math.isfinite(number):
            raise ValueError(f"weight_offset={value!r} is not a finite number")
    elif key == "momentum" and value is not None:
        if number is None or not 0 <= number <= 1:
            raise ValueError(f"momentum={value!r} is not a number in [0, 1] (or None)")


def float32_value(value: float) -> float:
    """``value`` rounded to the nearest binary32 number (ties to even), as a Python float."""
    rounded: float = struct.unpack("<f", struct.pack("<f", value))[0]
    return rounded


@dataclass(frozen=True)
class Preset:
    """One implementation's convention for one reference function.

    ``kwargs`` are keyword arguments for ``references.<op>`` (a read-only mapping holding only
    PRESET_KEYWORDS that ``op`` takes); ``provenance`` says where they come from and which of the
    implementation's numerics the references do not model.
    """

    name: str
    op: str
    kwargs: Mapping[str, object] = field(hash=False)
    provenance: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name != self.name.strip():
            raise ValueError(f"preset name {self.name!r} must be a non-empty, unpadded string")
        if self.op not in OPS:
            raise ValueError(f"preset {self.name!r}: op {self.op!r} is not one of {', '.join(OPS)}")
        allowed = PRESET_KEYWORDS & OP_KEYWORDS[self.op]
        unknown = sorted(set(self.kwargs) - allowed)
        if unknown:
            raise ValueError(
                f"preset {self.name!r}: {', '.join(unknown)} not allowed in a {self.op} preset "
                f"(allowed: {', '.join(sorted(allowed))})"
            )
        for key, value in self.kwargs.items():
            try:
                _check_value(self.op, key, value)
            except ValueError as error:
                raise ValueError(f"preset {self.name!r}: {error}") from None
        if not isinstance(self.provenance, str) or not self.provenance.strip():
            raise ValueError(f"preset {self.name!r}: provenance must be a non-empty string")
        # A private copy behind a read-only view: neither the caller's dict nor users can change it.
        object.__setattr__(self, "kwargs", MappingProxyType(dict(self.kwargs)))

    def __reduce__(self) -> tuple[object, ...]:
        # mappingproxy does not pickle; rebuild from a plain dict (re-validated on load).
        return (Preset, (self.name, self.op, dict(self.kwargs), self.provenance))

    def arguments(self, **overrides: object) -> dict[str, Any]:
        """A fresh dict of this preset's keyword arguments with ``overrides`` applied.

        Overrides may replace preset values or add any other keyword ``op`` takes (OP_KEYWORDS);
        an unknown key or an invalid convention value raises ValueError.
        """
        unknown = sorted(set(overrides) - OP_KEYWORDS[self.op])
        if unknown:
            raise ValueError(
                f"preset {self.name!r} ({self.op}) got unknown keyword(s) {', '.join(unknown)}; "
                f"{self.op} takes {', '.join(sorted(OP_KEYWORDS[self.op]))}"
            )
        for key, value in overrides.items():
            try:
                _check_value(self.op, key, value)
            except ValueError as error:
                raise ValueError(f"preset {self.name!r}: {error}") from None
        return {**self.kwargs, **overrides}
