"""Floating-point formats and correct rounding into them.

A :class:`Format` is a binary floating-point format with precision ``p`` (significand bits, the
hidden bit included) and exponent range ``[emin, emax]``. Rounding is IEEE 754 round to nearest,
ties to even, with gradual underflow (subnormals) and overflow to infinity: a value whose magnitude
is at least ``max_finite + ulp(max_finite)/2`` rounds to infinity.

Two rounding entry points, both exact:

* :func:`round_array` rounds float64 (or long double) arrays elementwise. float32 and float16 use
  NumPy's conversions, which round once from the source bits; bfloat16 and any other format use
  the scaling identity ``round(v) = rint(v * 2**-q) * 2**q`` with ``q`` the exponent of the target
  ulp at ``v``, which is exact because scaling by a power of two is exact and ``rint`` rounds to
  nearest even.
* :func:`round_fraction` rounds an exact rational with integer arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class Format:
    """A binary floating-point format: ``p`` significand bits, normal exponents ``emin..emax``."""

    name: str
    precision: int
    emin: int
    emax: int

    @property
    def max_finite(self) -> float:
        return float((2 - Fraction(1, 2 ** (self.precision - 1))) * Fraction(2) ** self.emax)

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        return np.dtype(_NUMPY_DTYPES[self.name])

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.name)

    def ulp(self, value: float) -> float:
        """The spacing of this format at ``value`` (the quantum of the binade holding it)."""
        exponent = max(int(np.frexp(abs(value))[1]) - 1, self.emin) if value else self.emin
        return 2.0 ** (exponent - self.precision + 1)


FLOAT64 = Format("float64", 53, -1022, 1023)
FLOAT32 = Format("float32", 24, -126, 127)
FLOAT16 = Format("float16", 11, -14, 15)
BFLOAT16 = Format("bfloat16", 8, -126, 127)

FORMATS: dict[str, Format] = {f.name: f for f in (FLOAT64, FLOAT32, FLOAT16, BFLOAT16)}
_NUMPY_DTYPES: dict[str, Any] = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
}


def format_of(dtype: object) -> Format:
    """The :class:`Format` of a torch dtype, a NumPy dtype or a format name.

    Raises ``ValueError`` for anything that is not float64, float32, float16 or bfloat16.
    """
    name = str(dtype).removeprefix("torch.")
    if name in FORMATS:
        return FORMATS[name]
    try:
        name = np.dtype(dtype).name  # type: ignore[call-overload]
    except TypeError:
        pass
    if name in FORMATS:
        return FORMATS[name]
    raise ValueError(
        f"unsupported dtype {dtype!r}: the references take float64, float32, float16 or bfloat16"
    )


def round_array(values: np.ndarray, fmt: Format) -> np.ndarray:
    """Round ``values`` (float64 or long double) to nearest-even in ``fmt``; returns float64.

    NaN stays NaN; infinities stay infinite; finite values past the overflow threshold become
    infinite with their sign.
    """
    if fmt is FLOAT64:
        return np.asarray(values, dtype=np.float64)
    if fmt is FLOAT32 or fmt is FLOAT16:
        source = np.asarray(values)
        if source.dtype != np.float64:
            # Only a float64 source is rounded once by NumPy's casts; long double goes through
            # the exact scaling path below.
            return _round_by_scaling(source, fmt)
        with np.errstate(over="ignore"):
            return source.astype(fmt.numpy_dtype).astype(np.float64)
    source = np.asarray(values)
    if source.dtype == np.float64:
        return _round_bits(source, fmt)
    return _round_by_scaling(source, fmt)


def _round_bits(values: np.ndarray, fmt: Format) -> np.ndarray:
    """Round float64 to nearest-even at ``fmt``'s precision on the bit pattern: add half an
    ulp less one, plus the kept lowest bit (ties to even), then clear the dropped bits. A carry
    into the exponent is the right result. Exact for values in ``fmt``'s normal range; the rest
    (its subnormals, zeros, non-finite values, overflow) is decided by the scaling path."""
    drop = 53 - fmt.precision
    bits = values.view(np.uint64)
    kept_lsb = (bits >> np.uint64(drop)) & np.uint64(1)
    rounded_bits = (bits + (np.uint64((1 << (drop - 1)) - 1) + kept_lsb)) & np.uint64(
        ~((1 << drop) - 1) & (2**64 - 1)
    )
    rounded = rounded_bits.view(np.float64)
    magnitude = np.abs(values)
    normal = (magnitude >= 2.0**fmt.emin) & (np.abs(rounded) <= fmt.max_finite)
    if normal.all():
        return rounded
    result = rounded.copy()
    result[~normal] = _round_by_scaling(values[~normal], fmt)
    return result


def _round_by_scaling(values: np.ndarray, fmt: Format) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(values)
        safe = np.where(finite, values, 0)
        exponent = np.frexp(safe)[1].astype(np.int64) - 1  # leading-bit exponent; 0 -> -1
        quantum = np.maximum(exponent, fmt.emin) - (fmt.precision - 1)
        rounded = np.ldexp(np.rint(np.ldexp(safe, -quantum)), quantum)
        rounded = np.where(np.abs(rounded) > fmt.max_finite, np.copysign(np.inf, safe), rounded)
        return np.where(finite, rounded, values).astype(np.float64)


def round_fraction(value: Fraction, fmt: Format) -> float:
    """Round an exact rational to nearest-even in ``fmt``, returned as the float holding it."""
    if value == 0:
        return 0.0
    sign = -1.0 if value < 0 else 1.0
    num, den = abs(value.numerator), value.denominator
    exponent = num.bit_length() - den.bit_length()
    if (num << max(-exponent, 0)) < (den << max(exponent, 0)):
        exponent -= 1  # now 2**exponent <= |value| < 2**(exponent+1)
    quantum = max(exponent, fmt.emin) - (fmt.precision - 1)
    # |value| / 2**quantum = q + rem/den_scaled, rounded to nearest even.
    if quantum >= 0:
        scaled_num, scaled_den = num, den << quantum
    else:
        scaled_num, scaled_den = num << -quantum, den
    q, rem = divmod(scaled_num, scaled_den)
    if 2 * rem > scaled_den or (2 * rem == scaled_den and q & 1):
        q += 1
    # q * 2**quantum with q <= 2**p: past the largest finite value only by reaching 2**(emax+1).
    if q.bit_length() + quantum > fmt.emax + 1:
        return sign * float("inf")
    return sign * math.ldexp(q, quantum)  # exact: q has at most p bits
