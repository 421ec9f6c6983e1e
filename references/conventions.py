"""The convention keywords shared by every norm, validated in one place.

=================  =====================  =====================================================
keyword            values                 meaning
=================  =====================  =====================================================
``variance``       "biased", "unbiased"   divide the sum of squared deviations by n or n - 1
``eps_placement``  "inside", "outside"    (x - mu) / sqrt(var + eps)  or  (x - mu) / (std + eps)
``weight_offset``  a finite float         the scale is weight_offset + weight (Gemma: 1.0)
``add_rounding``   "dtype", "exact"       fused adds: round the sum into the input dtype first
=================  =====================  =====================================================

``eps`` is taken as the exact binary64 value of the float given. ``rms_norm``'s ``eps=None`` is
what PyTorch's ATen code uses (not what its docstring says): the machine epsilon of the *opmath*
type, float32's ``2**-23`` for float32, float16 and bfloat16 inputs and ``2**-52`` for float64.
Named conventions found in the wild live in :mod:`references.presets`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from references.formats import FLOAT64, Format
from references.problem import Convention

VARIANCES = ("biased", "unbiased")
EPS_PLACEMENTS = ("inside", "outside")
ADD_ROUNDINGS = ("dtype", "exact")
MOMENTUM_WEIGHTS = ("new", "running")


def choice(keyword: str, value: object, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(
            f"unknown {keyword}={value!r}: expected one of {', '.join(map(repr, allowed))}"
        )
    return str(value)


def finite_float(keyword: str, value: object, *, non_negative: bool = False) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{keyword} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{keyword} must be finite, got {value!r}")
    if non_negative and number < 0:
        raise ValueError(f"{keyword} must be >= 0, got {value!r}")
    return number


def convention(
    *, center: bool, variance: str, eps: float, eps_placement: str, weight_offset: float
) -> Convention:
    return Convention(
        center=center,
        unbiased=choice("variance", variance, VARIANCES) == "unbiased",
        eps=finite_float("eps", eps, non_negative=True),
        eps_outside=choice("eps_placement", eps_placement, EPS_PLACEMENTS) == "outside",
        weight_offset=finite_float("weight_offset", weight_offset),
    )


def rms_norm_default_eps(fmt: Format) -> float:
    """PyTorch's ``rms_norm`` epsilon when ``eps=None``: that of its opmath type."""
    return 2.0**-52 if fmt is FLOAT64 else 2.0**-23
