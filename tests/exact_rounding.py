"""Correct rounding of exact rationals and surds into binary formats, with integers only.

Written from the mathematics, with Python integers and ``fractions.Fraction`` only; square roots
are bracketed with ``math.isqrt`` on scaled integers. No float takes part in the arithmetic: the
result leaves as the Python float of the correctly rounded value of an exact quantity.

Rounding (``round_fraction``): round to nearest, ties to even, into a binary format with precision
p and minimum normal exponent emin (subnormals have the fixed quantum 2**(emin - p + 1)). A value
rounds to infinity exactly when it rounds, with an unbounded exponent range, to 2**(emax + 1); that
is, when it is at least max + ulp(max)/2.

Irrational results (``round_sqrt_expr``): a normalised element is A + B/r with r = sqrt(D) (eps
inside) or r = sqrt(V) + e (eps outside), A, B, D, V, e rational. f(r) = A + B/r is monotone in
r > 0, so bracketing r in [lo, hi] brackets f(r) between f(lo) and f(hi). Rounding is monotone, so
once f(lo) and f(hi) round to the same value the exact f(r) rounds to it too (Ziv's strategy).
The bracket tightens until that happens; it must, unless f(r) is exactly a rounding midpoint,
which can only happen when r is rational (B != 0). So a rational square root is detected first and
that case is rounded exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

INF = float("inf")


@dataclass(frozen=True)
class BinaryFormat:
    """An IEEE-754 style binary format: precision in bits (with the hidden bit) and exponents."""

    name: str
    precision: int
    emin: int
    emax: int

    @property
    def quantum_exponent_min(self) -> int:
        """Exponent of the smallest subnormal, the finest spacing of the format."""
        return self.emin - self.precision + 1

    @property
    def max_value(self) -> Fraction:
        return Fraction((1 << self.precision) - 1) * _pow2(self.emax - self.precision + 1)


FORMATS: dict[str, BinaryFormat] = {
    "float64": BinaryFormat("float64", 53, -1022, 1023),
    "float32": BinaryFormat("float32", 24, -126, 127),
    "float16": BinaryFormat("float16", 11, -14, 15),
    "bfloat16": BinaryFormat("bfloat16", 8, -126, 127),
}


def _pow2(k: int) -> Fraction:
    return Fraction(1 << k) if k >= 0 else Fraction(1, 1 << -k)


def _floor_log2(a: Fraction) -> int:
    """The integer e with 2**e <= a < 2**(e + 1), for a > 0."""
    num, den = a.numerator, a.denominator
    e = num.bit_length() - den.bit_length()
    if (num << -e if e < 0 else num) < (den << e if e > 0 else den):
        e -= 1
    return e


def round_fraction(q: Fraction, fmt: str) -> float:
    """``q`` rounded to nearest (ties to even) into ``fmt``, as the Python float of that value."""
    spec = FORMATS[fmt]
    if q == 0:
        return 0.0
    a = abs(q)
    quantum = max(_floor_log2(a), spec.emin) - spec.precision + 1
    num, den = a.numerator, a.denominator
    if quantum <= 0:
        num <<= -quantum
    else:
        den <<= quantum
    m, rest = divmod(num, den)
    if 2 * rest > den or (2 * rest == den and m & 1):
        m += 1
    negative = q < 0
    if m.bit_length() + quantum > spec.emax + 1:
        return -INF if negative else INF
    magnitude = math.ldexp(float(m), quantum)
    return -magnitude if negative else magnitude


# ---------------------------------------------------------------------------------------------
# Square roots: exact detection and certified brackets.


def rational_sqrt(q: Fraction) -> Fraction | None:
    """sqrt(q) when it is rational (q >= 0 with square numerator and denominator), else None."""
    if q < 0:
        raise ValueError(f"square root of a negative number {q}")
    num, den = q.numerator, q.denominator
    rn, rd = math.isqrt(num), math.isqrt(den)
    if rn * rn == num and rd * rd == den:
        return Fraction(rn, rd)
    return None


@lru_cache(maxsize=4096)
def sqrt_bracket(q: Fraction, k: int) -> tuple[Fraction, Fraction]:
    """(lo, hi) with lo <= sqrt(q) <= hi and hi - lo = 2**-k.

    floor(sqrt(floor(q * 4**k))) = floor(sqrt(q * 4**k)) = floor(2**k sqrt(q)) =: s, so
    s / 2**k <= sqrt(q) < (s + 1) / 2**k.
    """
    num, den = q.numerator, q.denominator
    if k >= 0:
        scaled = (num << (2 * k)) // den
    else:
        scaled = num // (den << (-2 * k))
    s = math.isqrt(scaled)
    step = _pow2(-k)
    return s * step, (s + 1) * step


def _round_a_plus_b_over_r(
    a: Fraction, b: Fraction, radicand: Fraction, offset: Fraction, fmt: str
) -> float:
    """Round a + b / (sqrt(radicand) + offset) into ``fmt``; radicand >= 0, offset >= 0."""
    if b == 0:
        return round_fraction(a, fmt)
    root = rational_sqrt(radicand)
    if root is not None:
        r = root + offset
        if r == 0:
            return INF if b > 0 else -INF  # a + b/0 (callers handle 0/0 first)
        return round_fraction(a + b / r, fmt)
    # sqrt(radicand) is irrational, so radicand > 0; start with ~80 significant bits of the root.
    k = 80 - _floor_log2(radicand) // 2
    for _ in range(64):
        lo, hi = sqrt_bracket(radicand, k)
        r_lo = lo + offset
        if r_lo > 0:
            v1 = round_fraction(a + b / r_lo, fmt)
            v2 = round_fraction(a + b / (hi + offset), fmt)
            if v1 == v2 and math.copysign(1.0, v1) == math.copysign(1.0, v2):
                return v1
        k += max(32, k // 2)
    raise ArithmeticError("square-root bracket did not converge")  # pragma: no cover


def round_sqrt_expr(a: Fraction, b: Fraction, d: Fraction, fmt: str) -> float:
    """a + b / sqrt(d), correctly rounded into ``fmt`` (d >= 0)."""
    return _round_a_plus_b_over_r(Fraction(a), Fraction(b), Fraction(d), Fraction(0), fmt)


def round_sqrt_plus_expr(a: Fraction, b: Fraction, v: Fraction, e: Fraction, fmt: str) -> float:
    """a + b / (sqrt(v) + e), correctly rounded into ``fmt`` (v >= 0, e >= 0)."""
    return _round_a_plus_b_over_r(Fraction(a), Fraction(b), Fraction(v), Fraction(e), fmt)


def round_normalized(
    a: Fraction, b: Fraction, var: Fraction, eps: Fraction, eps_outside: bool, fmt: str
) -> float:
    """a + b / sqrt(var + eps) or a + b / (sqrt(var) + eps), correctly rounded into ``fmt``."""
    if eps_outside:
        return round_sqrt_plus_expr(a, b, var, eps, fmt)
    return round_sqrt_expr(a, b, var + eps, fmt)


def ulp_of(value: float, fmt: str) -> float:
    """The spacing of ``fmt`` at ``value`` (the quantum of the binade, subnormals included)."""
    spec = FORMATS[fmt]
    exponent = spec.emin if value == 0 else max(_floor_log2(Fraction(abs(value))), spec.emin)
    return math.ldexp(1.0, exponent - spec.precision + 1)
