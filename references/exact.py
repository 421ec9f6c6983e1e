"""Exact arithmetic: the ground truth that every fast result is certified against.

Every quantity the references produce is an algebraic number of a simple kind. The inputs are
binary floating-point numbers, hence dyadic rationals; sums, products and quotients of them are
rationals; the only irrational operation is one square root per normalised group. So each output
element lies in Q(sqrt(D)) for the D of its group, and a reduction across groups (a weight
gradient) is a sum ``a + c_1 sqrt(D_1) + ... + c_m sqrt(D_m)`` with rational ``a, c_k, D_k``.

:class:`Surd` holds such sums exactly (``fractions.Fraction`` coefficients). Rounding one into a
target format (:func:`round_surd`) follows Ziv's strategy with mpmath's raw layer (``libmp``),
precision passed per call, never set globally:

1. enclose the value in an interval with outward (floor/ceiling) rounding at ``P`` bits;
2. if both ends round to the same target value, that value is the correctly rounded result,
   because rounding to nearest is monotonic;
3. otherwise double ``P`` and repeat.

The loop ends whenever the value is not itself a rounding boundary (a midpoint between two target
numbers) or a target number with an interval straddling it. Such values are dyadic rationals, so
the loop can only stall on a rational value. Square roots of rationals from distinct square
classes (``D_j / D_k`` not the square of a rational) are linearly independent over Q
(Besicovitch), so after merging terms whose radicands differ by a rational square factor, the sum
is rational exactly when no irrational term is left; then it is rounded exactly. Hence every value
is rounded correctly and the loop terminates.

Exact sums of float arrays (:func:`exact_sum`) shift integer significands to a common exponent and
add Python integers: no rounding anywhere.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

import numpy as np
from mpmath import libmp

from references.fast import two_product
from references.formats import Format, round_fraction

#: Extra bits over the target precision for the first enclosure; enough that the first try
#: decides all but ~2**-GUARD_BITS of random elements.
GUARD_BITS = 40
#: Precision (bits) past which an undecided sum is checked for being rational.
RATIONALITY_CHECK_BITS = 1024


def _significands(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Exact decomposition ``values = m * 2**e`` with int64 ``m`` of as few bits as will do
    (11, 24 or 53: the narrow formats' values need no more); returns ``(m, e, bits)``."""
    fraction, exponent = np.frexp(np.asarray(values, dtype=np.float64).ravel())
    for bits in (11, 24):
        significand = np.ldexp(fraction, bits)
        if bool((significand == np.rint(significand)).all()):
            return significand.astype(np.int64), exponent.astype(np.int64) - bits, bits
    return np.ldexp(fraction, 53).astype(np.int64), exponent.astype(np.int64) - 53, 53


def exact_sum(*factors: np.ndarray) -> Fraction:
    """``sum_i prod_f factors[f][i]`` exactly; the factors are finite float arrays (broadcast).

    Significand products that fit in 62 bits are added in int64 per distinct exponent (chunked so
    no partial sum can overflow); wider ones go through Python integers.
    """
    arrays = np.broadcast_arrays(*[np.asarray(f, dtype=np.float64) for f in factors])
    if arrays[0].size == 0:
        return Fraction(0)
    decomposed = [_significands(a) for a in arrays]
    bits = sum(b for _, _, b in decomposed)
    if len(arrays) == 2 and bits > 61:
        # Two wide factors: a*b = hi + lo exactly (Dekker) wherever that is valid, leaving two
        # sums of 53-bit significands; Python integers only for the rest.
        a, b = (x.ravel() for x in arrays)
        hi, lo, valid = two_product(a, b)
        if valid.all():
            return exact_sum(hi) + exact_sum(lo)
        rest = ~valid
        return (
            exact_sum(hi[valid]) + exact_sum(lo[valid]) + exact_sum(a[rest], b[rest])
            if (valid.any())
            else _object_sum(decomposed)
        )
    if bits <= 61:
        significand = decomposed[0][0]
        for m, _, _ in decomposed[1:]:
            significand = significand * m
        return _bucket_sum(significand, sum_exponents(decomposed), 62 - bits)
    return _object_sum(decomposed)


def sum_exponents(decomposed: list[tuple[np.ndarray, np.ndarray, int]]) -> np.ndarray:
    return sum((e for _, e, _ in decomposed), np.zeros(decomposed[0][1].size, dtype=np.int64))


def _object_sum(decomposed: list[tuple[np.ndarray, np.ndarray, int]]) -> Fraction:
    """The exact sum of products of significands as Python integers (any width)."""
    exponent = sum_exponents(decomposed)
    product = decomposed[0][0].astype(object)
    for m, _, _ in decomposed[1:]:
        product = product * m.astype(object)
    nonzero = product != 0
    if not nonzero.any():
        return Fraction(0)
    base = int(exponent[nonzero].min())
    shifts = (exponent[nonzero] - base).astype(object)
    return Fraction(int(np.sum(product[nonzero] * (2**shifts)))) * Fraction(2) ** base


def _bucket_sum(significand: np.ndarray, exponent: np.ndarray, headroom: int) -> Fraction:
    """Exact sum of ``significand * 2**exponent`` with int64 significands of ``62 - headroom``
    bits: add within each exponent in chunks of ``2**headroom`` terms, then in Python ints."""
    nonzero = significand != 0
    significand, exponent = significand[nonzero], exponent[nonzero]
    if not significand.size:
        return Fraction(0)
    order = np.argsort(exponent.astype(np.int16), kind="stable")  # radix sort: exponents fit
    significand, exponent = significand[order], exponent[order]
    chunk = 1 << min(headroom, 40)
    # Start a partial sum at each new exponent and every ``chunk`` terms within one.
    new_exponent = np.flatnonzero(np.diff(exponent)) + 1
    starts = np.union1d(np.concatenate(([0], new_exponent)), np.arange(0, exponent.size, chunk))
    partial = np.add.reduceat(significand, starts)
    base = int(exponent[0])
    total = sum(int(m) << int(e - base) for m, e in zip(partial, exponent[starts], strict=True))
    return Fraction(total) * Fraction(2) ** base


#: A linear combination of elementwise products of float arrays:
#: ``sum_k coef_k * prod(arrays_k)``. It represents values such as ``alpha*x + f`` exactly.
LinComb = list[tuple[Fraction, tuple[np.ndarray, ...]]]


def lincomb_sum(terms: LinComb) -> Fraction:
    """The exact sum over all elements of a :data:`LinComb`."""
    return sum((coef * exact_sum(*arrays) for coef, arrays in terms if coef), Fraction(0))


def lincomb_product(left: LinComb, right: LinComb) -> LinComb:
    return [(a * b, xs + ys) for a, xs in left for b, ys in right]


def lincomb_at(terms: LinComb, index: tuple[int, ...]) -> Fraction:
    """The exact value of one element of a :data:`LinComb`."""
    total = Fraction(0)
    for coef, arrays in terms:
        term = coef
        for array in arrays:
            term *= Fraction(float(np.broadcast_to(array, _shape(terms))[index]))
        total += term
    return total


def _shape(terms: LinComb) -> tuple[int, ...]:
    return np.broadcast_shapes(*[a.shape for _, arrays in terms for a in arrays])


def _square_root(q: Fraction) -> Fraction | None:
    """The rational square root of ``q`` if it has one."""
    if q < 0:
        return None
    num, den = math.isqrt(q.numerator), math.isqrt(q.denominator)
    if num * num == q.numerator and den * den == q.denominator:
        return Fraction(num, den)
    return None


class Surd:
    """An exact number ``rational + sum_k coef_k * sqrt(radicand_k)`` (radicands > 0, non-square).

    Sums and differences are unrestricted. Products and quotients are supported when at most one
    radicand is involved (the elements of one group's field Q(sqrt(D))), which is all the
    normalisation formulas need.
    """

    __slots__ = ("rational", "roots")

    def __init__(self, rational: Fraction | int = 0, roots: dict[Fraction, Fraction] | None = None):
        self.rational = Fraction(rational)
        self.roots = {d: c for d, c in (roots or {}).items() if c}

    @classmethod
    def sqrt(cls, radicand: Fraction) -> Surd:
        if radicand < 0:
            raise ValueError("square root of a negative number")
        root = _square_root(radicand)
        if root is not None:
            return cls(root)
        return cls(0, {radicand: Fraction(1)})

    # -- arithmetic ---------------------------------------------------------------------------
    @staticmethod
    def _lift(other: Surd | Fraction | int) -> Surd:
        return other if isinstance(other, Surd) else Surd(other)

    def __add__(self, other: Surd | Fraction | int) -> Surd:
        other = self._lift(other)
        roots = dict(self.roots)
        for d, c in other.roots.items():
            roots[d] = roots.get(d, Fraction(0)) + c
        return Surd(self.rational + other.rational, roots)

    __radd__ = __add__

    def __neg__(self) -> Surd:
        return Surd(-self.rational, {d: -c for d, c in self.roots.items()})

    def __sub__(self, other: Surd | Fraction | int) -> Surd:
        return self + (-self._lift(other))

    def __rsub__(self, other: Surd | Fraction | int) -> Surd:
        return self._lift(other) - self

    def _single(self) -> tuple[Fraction, Fraction, Fraction | None]:
        if len(self.roots) > 1:
            raise ArithmeticError("product of sums over several radicands is not supported")
        if not self.roots:
            return self.rational, Fraction(0), None
        ((d, c),) = self.roots.items()
        return self.rational, c, d

    def __mul__(self, other: Surd | Fraction | int) -> Surd:
        other = self._lift(other)
        a, b, d = self._single()
        c, e, d2 = other._single()
        if d is not None and d2 is not None and d != d2:
            raise ArithmeticError("product of surds over different radicands is not supported")
        radicand = d if d is not None else d2
        if radicand is None:
            return Surd(a * c)
        # (a + b r)(c + e r) = ac + be r^2 + (ae + bc) r
        return Surd(a * c + b * e * radicand, {radicand: a * e + b * c})

    __rmul__ = __mul__

    def __truediv__(self, other: Surd | Fraction | int) -> Surd:
        other = self._lift(other)
        c, e, d = other._single()
        if d is None:
            return self * (1 / c)  # raises ZeroDivisionError for 0
        # 1/(c + e r) = (c - e r) / (c^2 - e^2 D); the norm is non-zero as r is irrational.
        norm = c * c - e * e * d
        return self * Surd(c / norm, {d: -e / norm})

    def __rtruediv__(self, other: Surd | Fraction | int) -> Surd:
        return self._lift(other) / self

    def is_zero(self) -> bool:
        return not self.rational and not self.roots

    def __repr__(self) -> str:
        terms = " + ".join(f"{c}*sqrt({d})" for d, c in self.roots.items())
        return f"Surd({self.rational}{' + ' + terms if terms else ''})"

    # -- exactness ----------------------------------------------------------------------------
    def canonical(self) -> Surd:
        """The same number with radicands merged by square class (see the module docstring)."""
        rational = self.rational
        classes: list[tuple[Fraction, Fraction]] = []  # (representative radicand, coefficient)
        for d, c in self.roots.items():
            root = _square_root(d)
            if root is not None:
                rational += c * root
                continue
            for k, (rep, coef) in enumerate(classes):
                ratio = _square_root(d / rep)
                if ratio is not None:  # sqrt(d) = ratio * sqrt(rep)
                    classes[k] = (rep, coef + c * ratio)
                    break
            else:
                classes.append((d, c))
        return Surd(rational, dict(classes))


def _enclose(q: Fraction, prec: int) -> tuple[Any, Any]:
    return (
        libmp.from_rational(q.numerator, q.denominator, prec, libmp.round_floor),
        libmp.from_rational(q.numerator, q.denominator, prec, libmp.round_ceiling),
    )


def _interval_mul(x: tuple[Any, Any], y: tuple[Any, Any], prec: int) -> tuple[Any, Any]:
    lows = [libmp.mpf_mul(a, b, prec, libmp.round_floor) for a in x for b in y]
    highs = [libmp.mpf_mul(a, b, prec, libmp.round_ceiling) for a in x for b in y]
    order = functools.cmp_to_key(libmp.mpf_cmp)
    return min(lows, key=order), max(highs, key=order)


def enclose_surd(value: Surd, prec: int) -> tuple[Fraction, Fraction]:
    """An interval ``[lo, hi]`` (exact dyadic endpoints) containing ``value``, ~``prec`` bits."""
    lo, hi = _enclose(value.rational, prec)
    for radicand, coef in value.roots.items():
        r_lo, r_hi = _enclose(radicand, prec)
        root = (
            libmp.mpf_sqrt(r_lo, prec, libmp.round_floor),
            libmp.mpf_sqrt(r_hi, prec, libmp.round_ceiling),
        )
        t_lo, t_hi = _interval_mul(_enclose(coef, prec), root, prec)
        lo = libmp.mpf_add(lo, t_lo, prec, libmp.round_floor)
        hi = libmp.mpf_add(hi, t_hi, prec, libmp.round_ceiling)
    return _to_fraction(lo), _to_fraction(hi)


def _to_fraction(x: Any) -> Fraction:
    p, q = libmp.to_rational(x)
    return Fraction(int(p), int(q))


def round_surd(value: Surd | Fraction, fmt: Format) -> float:
    """Correctly round an exact :class:`Surd` (or rational) into ``fmt``."""
    if not isinstance(value, Surd):
        return round_fraction(Fraction(value), fmt)
    prec = fmt.precision + GUARD_BITS
    checked = False
    while True:
        if not value.roots:
            return round_fraction(value.rational, fmt)
        lo, hi = enclose_surd(value, prec)
        rounded, upper = round_fraction(lo, fmt), round_fraction(hi, fmt)
        # Compare signs too: -0.0 == 0.0, but an enclosure around 0 does not decide the sign.
        if rounded == upper and math.copysign(1, rounded) == math.copysign(1, upper):
            return rounded
        prec *= 2
        if prec > RATIONALITY_CHECK_BITS and not checked:
            value, checked = value.canonical(), True


def surd_sum(values: Iterable[Surd]) -> Surd:
    """Sum many surds, merging equal radicands (cheaper than repeated ``+``)."""
    rational = Fraction(0)
    roots: dict[Fraction, Fraction] = {}
    for v in values:
        rational += v.rational
        for d, c in v.roots.items():
            roots[d] = roots.get(d, Fraction(0)) + c
    return Surd(rational, roots)
