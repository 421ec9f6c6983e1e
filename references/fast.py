"""The certified fast path: floating-point evaluation with a rigorous running error bound.

An :class:`Approx` is an array of computed values ``v`` with an array of bounds ``e`` such that the
exact value ``x`` satisfies ``|x - v| <= e`` elementwise. Each operation computes its value in the
working precision (float64, or x87 long double for float64 targets) and propagates the bound with
the standard model of rounding to nearest, ``fl(a op b) = (a op b)(1 + d)``, ``|d| <= u``, which
gives ``|fl(s) - s| <= u |fl(s)|`` (Higham, *Accuracy and Stability of Numerical Algorithms*,
§2.2), plus ``eta`` (the smallest subnormal) for products and quotients that may underflow:

====================  ==========================================================================
operation              bound on the result
====================  ==========================================================================
``x + y``              ``e_x + e_y + u|v|``
``x * y``              ``e_x|y| + e_y|x| + e_x e_y + u|v| + eta``
``x / y``              ``(e_x + |v| e_y) / (|y| - e_y) + u|v| + eta``   (needs ``|y| > e_y``)
``sqrt(x)``            ``e_x / (sqrt(x) + sqrt(x - e_x)) + u|v|``   (needs ``x > e_x``; else
                       ``sqrt(x + e_x)``, which bounds both sides)
``sum of n terms``     ``(sum e + g_(n-1) sum|v|)(1 + g_n)``, ``g_k = k u / (1 - k u)``, valid for
                       any summation order (Higham, Lemma 3.1/§4.2)
====================  ==========================================================================

The bounds are themselves computed in floating point. Apart from two subtractions, every bound
is a sum of products of non-negative computed quantities, each op adding at most a relative
``u``; with fewer than 2**20 operations along any chain the computed bound is low by less than a
factor ``1 + 2**-30``, which :func:`certify` multiplies back in (``BOUND_SAFETY``). The
subtractions are the margins ``|y| - e_y`` of a quotient and ``x - e_x`` of a square root: a
single rounding of a difference of two computed numbers, relative error ``u`` of the result, so
they too lose at most a factor ``1 + u`` (however small the margin: a small margin makes the
bound huge and the element undecided anyway). The same factor covers the use of the rounded
quotient ``v`` for the exact one in the quotient bound, and of ``fl(x - e_x)`` in the square
root's.

:func:`certify` decides each element: with ``E`` the inflated bound, if ``v - E`` and ``v + E``
round to the same target value then so does every number between them, the exact value included
(rounding is monotonic). Elements it cannot decide are left to the exact path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from references.formats import FLOAT64, Format, round_array

#: Multiplier that covers the rounding of the bound computations themselves (see above).
BOUND_SAFETY = 1.0 + 2.0**-30


@dataclass(frozen=True)
class Working:
    """A working precision: its NumPy type, unit roundoff ``u`` and underflow term ``eta``."""

    dtype: Any
    u: float
    eta: Any  # a scalar of ``dtype``: long double's subnormals are below float's range


FLOAT64_WORKING = Working(np.float64, 2.0**-53, np.finfo(np.float64).smallest_subnormal)
_LD = np.finfo(np.longdouble)
LONG_DOUBLE_WORKING = Working(np.longdouble, float(2.0 ** -(_LD.nmant + 1)), _LD.smallest_subnormal)


def working_for(fmt: Format) -> Working | None:
    """The working precision that can certify roundings into ``fmt``, or None if none can.

    float64 targets need more than float64: x87 long double (64-bit significand) where the
    platform has it, else the exact path decides every element.
    """
    if fmt is not FLOAT64:
        return FLOAT64_WORKING
    if _LD.nmant >= 63:
        return LONG_DOUBLE_WORKING
    return None


class Approx:
    """Values with rigorous absolute error bounds (see the module docstring)."""

    __slots__ = ("e", "v", "w")

    def __init__(self, v: Any, e: Any, w: Working):
        self.v = np.asarray(v, dtype=w.dtype)
        self.e = np.asarray(e, dtype=w.dtype)
        self.w = w

    @classmethod
    def exact(cls, v: Any, w: Working) -> Approx:
        return cls(v, 0.0, w)

    @classmethod
    def of_fraction(cls, q: Fraction, w: Working) -> Approx:
        """A rational in the working precision, with the exact size of its representation
        error (rounded up): a float64 head plus tail, summed in ``w.dtype``."""
        head = float(q)
        value = w.dtype(head) + w.dtype(float(q - Fraction(head)))
        error = abs(q - Fraction(*value.as_integer_ratio()))
        if not error:
            return cls.exact(value, w)
        bound = float(error) * (1 + 2.0**-50) + float(np.finfo(np.float64).smallest_subnormal)
        return cls(value, bound, w)

    def _lift(self, other: Approx | float | np.ndarray) -> Approx:
        return other if isinstance(other, Approx) else Approx.exact(other, self.w)

    def __add__(self, other: Approx | float | np.ndarray) -> Approx:
        other = self._lift(other)
        v = self.v + other.v
        return Approx(v, self.e + other.e + self.w.u * np.abs(v), self.w)

    def __sub__(self, other: Approx | float | np.ndarray) -> Approx:
        other = self._lift(other)
        v = self.v - other.v
        return Approx(v, self.e + other.e + self.w.u * np.abs(v), self.w)

    def __mul__(self, other: Approx | float | np.ndarray) -> Approx:
        other = self._lift(other)
        v = self.v * other.v
        e = self.e * np.abs(other.v) + other.e * np.abs(self.v) + self.e * other.e
        return Approx(v, e + (self.w.u * np.abs(v) + self.w.eta), self.w)

    def __truediv__(self, other: Approx | float | np.ndarray) -> Approx:
        other = self._lift(other)
        with np.errstate(divide="ignore", invalid="ignore"):
            v = self.v / other.v
            margin = np.abs(other.v) - other.e
            e = (self.e + np.abs(v) * other.e) / margin + (self.w.u * np.abs(v) + self.w.eta)
            e = np.where(margin > 0, e, np.inf)
        return Approx(v, e, self.w)

    def sqrt(self) -> Approx:
        with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 where not decided
            clipped = np.maximum(self.v, 0)
            v = np.sqrt(clipped)
            decided = self.v > self.e
            tight = self.e / (v + np.sqrt(np.where(decided, self.v - self.e, 0)))
            loose = np.sqrt(clipped + self.e)
            e = np.where(decided, tight, loose) + self.w.u * v
        return Approx(v, e, self.w)

    def sum(self, axis: int, keepdims: bool = True) -> Approx:
        """Sum along ``axis`` with the bound of :func:`blocked_sum`, or of :func:`cascaded_sum`
        in a working precision that is only a few bits wider than its targets."""
        moved = np.moveaxis(self.v, axis, -1)
        summed = cascaded_sum if self.w.dtype is np.longdouble else blocked_sum
        total, magnitude, coefficient = summed(moved)
        assert total is not None
        assert magnitude is not None
        errors = np.moveaxis(np.broadcast_to(self.e, self.v.shape), axis, -1).sum(axis=-1)
        bound = (errors + coefficient * magnitude) * (1 + _gamma(moved.shape[-1], self.w.u))
        if keepdims:
            total, bound = np.expand_dims(total, axis), np.expand_dims(bound, axis)
        return Approx(total, bound, self.w)

    def sum_by(self, index: np.ndarray, count: int) -> Approx:
        """Sums of the elements sharing each value of ``index`` (0..count-1), as a 1-D Approx."""
        index = np.broadcast_to(index, self.v.shape).ravel()
        if self.w.dtype is not np.float64:
            # bincount accumulates in float64 only; long double sums go row by row instead.
            return _sum_by_sorting(self, index, count)
        n = int(np.bincount(index, minlength=count).max(initial=0))
        gamma_prev, gamma = _gamma(max(n - 1, 0), self.w.u), _gamma(n, self.w.u)

        def by(values: np.ndarray) -> np.ndarray:
            flat = np.broadcast_to(values, self.v.shape).ravel()
            return np.bincount(index, weights=flat, minlength=count)

        e = (by(self.e) + gamma_prev * by(np.abs(self.v))) * (1 + gamma)
        return Approx(by(self.v), e, self.w)


def _sum_by_sorting(a: Approx, index: np.ndarray, count: int) -> Approx:
    order = np.argsort(index, kind="stable")
    starts = np.searchsorted(index[order], np.arange(count))
    ends = np.searchsorted(index[order], np.arange(count), side="right")
    v, e, mag = (np.broadcast_to(x, a.v.shape).ravel()[order] for x in (a.v, a.e, np.abs(a.v)))
    n = int((ends - starts).max(initial=0))
    gamma_prev, gamma = _gamma(max(n - 1, 0), a.w.u), _gamma(n, a.w.u)
    sums = [
        np.array([x[s:t].sum() for s, t in zip(starts, ends, strict=True)], dtype=a.w.dtype)
        for x in (v, e, mag)
    ]
    return Approx(sums[0], (sums[1] + gamma_prev * sums[2]) * (1 + gamma), a.w)


def blocked_sum(
    values: np.ndarray, *, signed: bool = True, magnitude: bool = True, nonnegative: bool = False
) -> tuple[np.ndarray | None, np.ndarray | None, float]:
    """Sum the last axis in two levels; returns ``(sum, sum of |values|, c)``, either sum None
    when not asked for (``signed``/``magnitude``).

    Blocks of ``b ~ sqrt(n)`` terms are summed, then the ``m`` block sums. Whatever order NumPy
    adds in, the error is at most ``c * sum|v|`` with ``c = g_(b-1) + g_(m-1)(1 + g_(b-1))``:
    about ``2 sqrt(n) u`` instead of recursive summation's ``n u`` (Higham, §4.2). The computed
    ``sum|v|`` is low by at most a factor ``1 + g_n``, which callers multiply in.
    """
    n = values.shape[-1]
    u = 2.0 ** -(np.finfo(values.dtype).nmant + 1)
    block = _block_length(n)
    blocks = -(-n // block) if n else 0
    if blocks * block != n:
        pad = np.zeros((*values.shape[:-1], blocks * block - n), values.dtype)
        values = np.concatenate([values, pad], axis=-1)
    shaped = values.reshape(*values.shape[:-1], blocks, block)
    total = shaped.sum(axis=-1).sum(axis=-1) if signed or nonnegative else None
    if nonnegative:  # the caller knows values >= 0: the sum is its own magnitude
        absolute = total
    else:
        absolute = np.abs(shaped).sum(axis=-1).sum(axis=-1) if magnitude else None
    inner, outer = _gamma(block - 1, u), _gamma(max(blocks - 1, 0), u)
    return total, absolute, inner + outer * (1 + inner)


def cascaded_sum(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """An almost exact sum of the last axis; same contract as :func:`blocked_sum`.

    Pairwise, level by level, with Knuth's error-free TwoSum: ``s = fl(a + b)`` and the exact
    ``e = (a + b) - s``. The exact sum is ``s_final + sum(all e)``; the ``e`` are at most
    ``u |s|`` each, so adding them with :func:`blocked_sum` (coefficient ``c``) errs by at most
    ``c u L sum|v|`` over ``L`` levels, and the final addition by ``u(1 + u)`` of the sum:
    ``coefficient = u(1 + 2 c L)`` covers both, the callers' factor ``1 + g_n`` the ``u^2``.
    Used where the working precision is only a few bits wider than the target (long double for
    float64 outputs), so every bit of the sum counts.
    """
    n = values.shape[-1]
    u = 2.0 ** -(np.finfo(values.dtype).nmant + 1)
    magnitude = blocked_sum(values, signed=False)[1]
    errors: list[np.ndarray] = []
    level = values
    while level.shape[-1] > 1:
        if level.shape[-1] % 2:
            level = np.concatenate([level, np.zeros_like(level[..., :1])], axis=-1)
        level, error = two_sum(level[..., 0::2], level[..., 1::2])
        errors.append(error)
    head = level[..., 0] if n else np.zeros(values.shape[:-1], values.dtype)
    if not errors:
        return head, magnitude, 0.0  # type: ignore[return-value]
    tails = np.concatenate(errors, axis=-1)
    tail, _, c = blocked_sum(tails, magnitude=False)
    assert tail is not None
    return head + tail, magnitude, u * (1 + 2 * c * len(errors))  # type: ignore[return-value]


def _block_length(n: int) -> int:
    """A block length near sqrt(n), preferring a divisor of n (no padding copy)."""
    root = math.isqrt(max(n - 1, 0)) + 1
    for length in range(root, min(n, 2 * root) + 1):
        if n % length == 0:
            return length
    return root


def two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Knuth's error-free sum: ``a + b = s + e`` exactly, ``s = fl(a + b)`` (no overflow)."""
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


#: Veltkamp's splitting constant for float64: 2**27 + 1.
_SPLITTER = 134217729.0


def two_product(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dekker's error-free product in float64: ``a * b = hi + lo`` exactly where ``valid``.

    Valid when nothing overflows in the splitting (|a|, |b| < 2**995) and no partial product
    underflows (|a b| >= 2**-960, or an exact zero product of a zero factor).
    """
    with np.errstate(all="ignore"):
        hi = a * b
        ca, cb = _SPLITTER * a, _SPLITTER * b
        a_hi, b_hi = ca - (ca - a), cb - (cb - b)
        a_lo, b_lo = a - a_hi, b - b_hi
        lo = ((a_hi * b_hi - hi) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo
        big = 2.0**995
        valid = (np.abs(a) < big) & (np.abs(b) < big) & np.isfinite(lo)
        valid &= (np.abs(hi) >= 2.0**-960) | (a == 0) | (b == 0)
    return hi, np.where(valid, lo, 0.0), valid


def _gamma(n: int, u: float) -> float:
    if n * u >= 0.5:
        return float("inf")
    return n * u / (1 - n * u)


_NATIVE_BITS = {"float32": np.int32, "float16": np.int16}


def certify(a: Approx, fmt: Format) -> tuple[np.ndarray, np.ndarray]:
    """Round ``a`` into ``fmt`` where provably correct: (values as float64, decided mask)."""
    with np.errstate(invalid="ignore", over="ignore"):
        # BOUND_SAFETY covers the rounding of the bound's computation; 2u|v| the rounding of
        # v -+ bound below.
        bound = a.e * BOUND_SAFETY + 2 * a.w.u * np.abs(a.v)
        return decide(a.v, bound, a.w, fmt)


def decide(
    v: np.ndarray,
    bound: np.ndarray,
    w: Working,
    fmt: Format,
    *,
    native: bool = False,
    exact_possible: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Round ``v`` where ``[v - bound, v + bound]`` (computed as is, so ``bound`` must already
    cover its own rounding and that of ``v -+ bound``) rounds to one value of ``fmt``.

    ``bound`` must be non-finite wherever ``v`` is (every bound here has a ``u|v|`` term).
    ``native=True`` may return the values in ``fmt``'s own NumPy dtype (float32, float16)
    instead of float64; ``exact_possible=False`` promises ``bound > 0`` everywhere."""
    with np.errstate(invalid="ignore", over="ignore"):
        if w.dtype is np.float64 and fmt.name in _NATIVE_BITS:
            # NumPy's float64 -> float32/float16 casts round once; equal bit patterns also
            # tell -0 from +0 (and would call two equal NaNs decided: hence isfinite).
            lo = np.subtract(v, bound).astype(fmt.numpy_dtype)
            hi = np.add(v, bound).astype(fmt.numpy_dtype)
            bits = _NATIVE_BITS[fmt.name]
            decided = lo.view(bits) == hi.view(bits)
            decided &= bound < np.inf  # False for NaN too
            values = lo if native else lo.astype(np.float64)
        else:
            values = round_array(v - bound, fmt)
            hi = round_array(v + bound, fmt)
            # -0 == +0 numerically, but the sign of a rounded zero is part of the answer: an
            # interval reaching both sides of zero is undecided.
            decided = (values == hi) & (np.signbit(values) == np.signbit(hi))
            decided &= np.isfinite(bound) & np.isfinite(v)
        exact = bound == 0 if exact_possible else None
        if exact is not None and exact.any():
            # v is exact: decided as it rounds (v - 0 keeps v's sign; v + 0 would turn -0 into
            # +0 and look undecided), and a value known to be exactly 0 is +0.
            decided |= exact & np.isfinite(v)
            values[exact & (v == 0)] = 0.0
    return values, decided
