"""Double-double evaluation from exact group statistics: the step before the exact path.

For float64 outputs the long double fast path leaves some elements undecided (11 extra bits are
not many). Before the exact path takes them one by one, this step evaluates all of them at once
in double-double arithmetic (about 106 bits), with each group's constants (mean, rstd, and for
the backward pass the reduced sums) taken from the exact statistics, computed once per group and
split into two float64 words. A double-double value ``(hi, lo)`` carries an absolute error
bound ``e`` on ``hi + lo``. Every step is an error-free transformation (TwoSum, Dekker's
product) or a single rounding, so each bound follows from the rounding model
``|fl(x) - x| <= u|fl(x)|`` plus ``eta`` for a product that may underflow:

- sum ``a + b``: ``s + e0 = ah + bh`` exactly, ``l1 = fl(e0 + al)``, ``lo = fl(l1 + bl)``;
  error ``e_a + e_b + u(|l1| + |lo|)``.
- product ``a b``: ``ph + p0 = ah bh`` exactly, ``c1 = fl(ah bl)``, ``c2 = fl(al bh)``,
  ``c3 = fl(c1 + c2)``, ``lo = fl(p0 + c3)``; with ``A = |ah| + |al|``, ``B = |bh| + |bl|``:
  error ``|al bl| + e_a(B + e_b) + A e_b + u(|c1| + |c2| + |c3| + |lo|) + 3 eta``.

The result ``yh + yl`` is certified as :func:`references.fast.decide` does: ``fl(yh + fl(yl -+
E))`` are single roundings of exact sums, so when they agree (sign of zero included) every value
in between rounds the same. Only float64 targets: into a narrower format ``fl(yh + c)`` would
round twice.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import numpy as np

from references.exact import Surd, enclose_surd
from references.fast import BOUND_SAFETY, two_product, two_sum
from references.formats import FLOAT64, Format
from references.problem import GroupStats, Problem, values_at

U = 2.0**-53
ETA = float(np.finfo(np.float64).smallest_subnormal)
#: Bits of the enclosure of each group's irrational constants: far below the 106 of the arithmetic.
CONSTANT_BITS = 160

#: A double-double array ``(hi, lo, error bound)``.
DD = tuple[np.ndarray, np.ndarray, np.ndarray]


def _split(q: Fraction) -> tuple[float, float, float]:
    """``q`` as ``hi + lo`` and the size of the remainder, rounded up (OverflowError if huge)."""
    hi = float(q)
    lo = float(q - Fraction(hi))
    rest = abs(q - Fraction(hi) - Fraction(lo))
    return hi, lo, float(rest) * (1 + 2.0**-50) + (ETA if rest else 0.0)


def _split_surd(value: Surd | Fraction) -> tuple[float, float, float]:
    if not isinstance(value, Surd):
        return _split(value)
    lo, hi = enclose_surd(value, CONSTANT_BITS)
    head, tail, rest = _split((lo + hi) / 2)
    return head, tail, float((hi - lo) / 2) * 1.01 + rest


def exact_dd(values: np.ndarray) -> DD:
    return values, np.zeros_like(values), np.zeros_like(values)


def dd_neg(a: DD) -> DD:
    return -a[0], -a[1], a[2]


def dd_add(a: DD, b: DD) -> DD:
    s, e0 = two_sum(a[0], b[0])
    l1 = e0 + a[1]
    lo = l1 + b[1]
    return s, lo, a[2] + b[2] + U * (np.abs(l1) + np.abs(lo))


def dd_mul(a: DD, b: DD, valid: np.ndarray) -> DD:
    """The product; clears ``valid`` where Dekker's product is not exact."""
    ph, p0, exact = two_product(a[0], b[0])
    valid &= exact
    c1, c2 = a[0] * b[1], a[1] * b[0]
    c3 = c1 + c2
    lo = p0 + c3
    size_a, size_b = np.abs(a[0]) + np.abs(a[1]), np.abs(b[0]) + np.abs(b[1])
    error = (
        np.abs(a[1]) * np.abs(b[1]) * (1 + 2 * U)
        + a[2] * (size_b + b[2])
        + size_a * b[2]
        + U * (np.abs(c1) + np.abs(c2) + np.abs(c3) + np.abs(lo))
        + 4 * ETA
    )
    return ph, lo, error


def certify_dd(y: DD, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round ``y`` into float64 where its bound proves the rounding: (values, decided)."""
    yh, yl, error = y
    bound = error * BOUND_SAFETY
    bound += 2 * U * (np.abs(yl) + bound)  # the rounding of yl -+ bound
    lo, hi = yh + (yl - bound), yh + (yl + bound)
    decided = (lo == hi) & (np.signbit(lo) == np.signbit(hi)) & valid
    decided &= np.isfinite(bound) & np.isfinite(lo)
    return np.where(decided, lo, np.nan), decided


def _constants(
    p: Problem,
    rows: np.ndarray,
    count: int,
    per_group: Callable[[int, GroupStats], list[Surd | Fraction]],
) -> tuple[list[DD], np.ndarray]:
    """Each group's constants as double-double arrays over the elements of ``rows``, and the
    mask of elements whose group has them (undefined or beyond float64: left to the exact
    path)."""
    groups_used, local = np.unique(rows, return_inverse=True)
    table: list[list[float]] = []
    for g in groups_used:
        if p.bad_groups[g]:
            table.append([])
            continue
        st = p.exact_stats(int(g))
        try:
            values = [] if st.r is None else per_group(int(g), st)
            table.append([x for value in values for x in _split_surd(value)])
        except OverflowError:
            table.append([])
    width = 3 * count
    array = np.array([row if row else [np.nan] * width for row in table]).reshape(-1, width)
    columns = array[local].T
    dds = [(columns[i], columns[i + 1], columns[i + 2]) for i in range(0, width, 3)]
    return dds, np.isfinite(array[local]).all(axis=1)


def _deviation(p: Problem, mean: DD, rows: np.ndarray, cols: np.ndarray) -> DD:
    return dd_add(exact_dd(np.broadcast_to(p.z[0][1][0], p.shape)[rows, cols]), dd_neg(mean))


def _weight(p: Problem, rows: np.ndarray, cols: np.ndarray) -> DD | None:
    """The effective weight ``weight_offset + w``, split exactly."""
    weight = values_at(p, p.weight, rows, cols)
    if weight is None:
        return None
    hi, lo = two_sum(weight, np.full_like(weight, p.conv.weight_offset))
    return hi, lo, np.zeros_like(hi)


@np.errstate(all="ignore")
def outputs(
    p: Problem, rows: np.ndarray, cols: np.ndarray, out: Format
) -> tuple[np.ndarray, np.ndarray]:
    """``(values, decided)`` of the forward output at the elements ``(rows, cols)``."""
    if out is not FLOAT64 or not p.plain or not rows.size:
        return np.full(rows.size, np.nan), np.zeros(rows.size, dtype=bool)
    (mean, r), valid = _constants(p, rows, 2, lambda g, st: [st.mean, st.r])  # type: ignore[list-item]
    y = dd_mul(_deviation(p, mean, rows, cols), r, valid)
    weight = _weight(p, rows, cols)
    if weight is not None:
        y = dd_mul(y, weight, valid)
    bias = values_at(p, p.bias, rows, cols)
    if bias is not None:
        y = dd_add(y, exact_dd(bias))
    return certify_dd(y, valid)


@np.errstate(all="ignore")
def grad_inputs(
    p: Problem,
    grad: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    out: Format,
    sums: Callable[[int], tuple[Fraction, Fraction]],
) -> tuple[np.ndarray, np.ndarray]:
    """``(values, decided)`` of ``dz`` at ``(rows, cols)``: ``r (h - c mean(h)) - t K r^2 r'/dv``
    with ``h = grad * weight``; ``sums(g)`` gives the group's exact ``(sum(h), K)``."""
    if out is not FLOAT64 or not p.plain or not rows.size or p.given is not None:
        return np.full(rows.size, np.nan), np.zeros(rows.size, dtype=bool)

    def constants(g: int, st: GroupStats) -> list[Surd | Fraction]:
        sum_h, k = sums(g)
        assert st.r is not None
        mean_h = sum_h / p.n if p.conv.center else Fraction(0)
        coefficient = Fraction(0)
        if st.r_prime is not None and k:
            coefficient = st.r * st.r * st.r_prime * (k / p.dv)  # type: ignore[assignment]
        return [st.mean, st.r, mean_h, coefficient]

    (mean, r, mean_h, coefficient), valid = _constants(p, rows, 4, constants)
    h = exact_dd(grad[rows, cols])
    weight = _weight(p, rows, cols)
    if weight is not None:
        h = dd_mul(h, weight, valid)
    term = dd_mul(dd_add(h, dd_neg(mean_h)), r, valid)
    correction = dd_mul(_deviation(p, mean, rows, cols), coefficient, valid)
    return certify_dd(dd_add(term, dd_neg(correction)), valid)


@np.errstate(all="ignore")
def weight_grads(
    p: Problem, grad: np.ndarray, columns: np.ndarray, out: Format
) -> tuple[np.ndarray, np.ndarray]:
    """``(values, decided)`` of ``dw_j = sum over groups of grad t r`` for the weight columns
    ``columns`` of a one-weight-per-column layout (LayerNorm, RMSNorm): the products in
    double-double, summed group by group with :func:`dd_add`, vectorised across the columns."""
    G = p.shape[0]
    if out is not FLOAT64 or not p.plain or not columns.size or not G:
        return np.full(columns.size, np.nan), np.zeros(columns.size, dtype=bool)
    rows_all, cols_all = np.repeat(np.arange(G), columns.size), np.tile(columns, G)
    (mean, r), valid = _constants(p, rows_all, 2, lambda g, st: [st.mean, st.r])  # type: ignore[list-item]
    t = _deviation(p, mean, rows_all, cols_all)
    term = dd_mul(dd_mul(t, r, valid), exact_dd(grad[rows_all, cols_all]), valid)
    parts = [x.reshape(G, columns.size) for x in term]
    total: DD = (parts[0][0], parts[1][0], parts[2][0])
    for g in range(1, G):
        total = dd_add(total, (parts[0][g], parts[1][g], parts[2][g]))
    return certify_dd(total, np.asarray(valid.reshape(G, columns.size).all(axis=0)))
