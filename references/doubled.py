"""Double-double evaluation of float64 outputs from exact group statistics.

For float64 outputs the long double fast path leaves a few percent of the elements undecided: 11
extra bits are not many. Before the exact path takes them one by one, this step evaluates all of
them at once in double-double arithmetic (about 106 bits), with each group's mean and ``rstd``
taken from the exact statistics (computed once per group) and split into two float64 words. Every
step is an error-free transformation or a single rounding, so the bound is explicit:

- ``s + e = x - mu_hi`` (TwoSum) is exact; ``t_lo = fl(e - mu_lo)`` leaves
  ``e_t = u|t_lo| + e_mu``.
- ``t r``: ``ph + pl0 = s r_hi`` exactly (Dekker), ``c1 = fl(s r_lo)``, ``c2 = fl(t_lo r_hi)``,
  ``c3 = fl(c1 + c2)``, ``pl = fl(pl0 + c3)``; error ``|t_lo r_lo| + e_t(|r_hi| + |r_lo| + e_r)
  + (|s| + |t_lo|) e_r + u(|c1| + |c2| + |c3| + |pl|) + 3 eta``.
- ``q = p (w_hi + w_lo)`` (the weight plus its offset, split exactly by TwoSum) likewise:
  ``|pl w_lo| + e_p(|w_hi| + |w_lo|) + u(|d1| + |d2| + |d3| + |ql|) + 3 eta``.
- ``y = q + b``: TwoSum, then ``yl = fl(yl0 + ql)`` adds ``u|yl|``.

The result ``yh + yl`` is certified as :func:`references.fast.decide` does: ``fl(yh + fl(yl -+
E))`` are single roundings of exact sums, so if they agree (sign of zero included) every value in
between rounds the same. Only float64 targets: into a narrower format ``fl(yh + c)`` would round
twice.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from references.exact import enclose_surd
from references.fast import BOUND_SAFETY, two_product
from references.formats import FLOAT64, Format
from references.groups import Problem, _at_vector

U = 2.0**-53
ETA = float(np.finfo(np.float64).smallest_subnormal)
#: Bits of the enclosure of each group's rstd: far below the double-double's own 106.
RSTD_BITS = 160


def _split(q: Fraction) -> tuple[float, float, float]:
    """``q`` as ``hi + lo`` with the size of the remainder, rounded up."""
    hi = float(q)
    lo = float(q - Fraction(hi))
    rest = abs(q - Fraction(hi) - Fraction(lo))
    return hi, lo, float(rest) * (1 + 2.0**-50) + (ETA if rest else 0.0)


def _two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


def outputs(
    p: Problem, rows: np.ndarray, cols: np.ndarray, out: Format
) -> tuple[np.ndarray, np.ndarray]:
    """``(values, decided)`` for the elements ``(rows, cols)`` of a float64-output problem."""
    values, decided = np.full(rows.size, np.nan), np.zeros(rows.size, dtype=bool)
    plain = len(p.z) == 1 and p.z[0][0] == 1 and len(p.z[0][1]) == 1
    if out is not FLOAT64 or not plain or not rows.size:
        return values, decided
    groups_used, local = np.unique(rows, return_inverse=True)
    table = np.full((groups_used.size, 6), np.nan)  # mu_hi, mu_lo, e_mu, r_hi, r_lo, e_r
    for i, g in enumerate(groups_used):
        st = p.exact_stats(int(g))
        if st.r is None:
            continue
        lo, hi = enclose_surd(st.r, RSTD_BITS)
        try:
            r_hi, r_lo, r_rest = _split((lo + hi) / 2)
            table[i] = (*_split(st.mean), r_hi, r_lo, float((hi - lo) / 2) * 1.01 + r_rest)
        except OverflowError:  # rstd beyond float64 (subnormal spread, eps = 0): exact path
            continue
    mu_hi, mu_lo, e_mu, r_hi, r_lo, e_r = table[local].T
    x = np.broadcast_to(p.z[0][1][0], p.shape)[rows, cols]
    with np.errstate(all="ignore"):
        s, e = _two_sum(x, -mu_hi)
        t_lo = e - mu_lo
        e_t = U * np.abs(t_lo) + e_mu
        ph, pl0, valid = two_product(s, r_hi)
        c1, c2 = s * r_lo, t_lo * r_hi
        c3 = c1 + c2
        pl = pl0 + c3
        error = (
            np.abs(t_lo) * np.abs(r_lo) * (1 + 2 * U)
            + e_t * (np.abs(r_hi) + np.abs(r_lo) + e_r)
            + (np.abs(s) + np.abs(t_lo)) * e_r
            + U * (np.abs(c1) + np.abs(c2) + np.abs(c3) + np.abs(pl))
            + 3 * ETA
        )
        yh, yl = ph, pl
        weight = _at_vector(p, p.weight, rows, cols)
        if weight is not None:
            w_hi, w_lo = _two_sum(weight, np.full_like(weight, p.conv.weight_offset))
            qh, ql0, valid_q = two_product(ph, w_hi)
            valid &= valid_q
            d1, d2 = pl * w_hi, ph * w_lo
            d3 = d1 + d2
            yl = ql0 + d3
            error = (
                np.abs(pl) * np.abs(w_lo) * (1 + 2 * U)
                + error * (np.abs(w_hi) + np.abs(w_lo))
                + U * (np.abs(d1) + np.abs(d2) + np.abs(d3) + np.abs(yl))
                + 3 * ETA
            )
            yh = qh
        bias = _at_vector(p, p.bias, rows, cols)
        if bias is not None:
            yh, yl0 = _two_sum(yh, bias)
            yl = yl0 + yl
            error = error + U * np.abs(yl)
        bound = error * BOUND_SAFETY
        bound += 2 * U * (np.abs(yl) + bound)  # the rounding of yl -+ bound
        lo_v, hi_v = yh + (yl - bound), yh + (yl + bound)
        decided = (lo_v == hi_v) & (np.signbit(lo_v) == np.signbit(hi_v)) & valid
        decided &= np.isfinite(bound) & np.isfinite(lo_v)
    return np.where(decided, lo_v, np.nan), decided
