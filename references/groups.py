"""One engine for every norm: normalise groups of values, then a per-element affine map.

Every norm in this package reduces to the same computation on a ``(G, K)`` layout: ``G`` groups of
``K`` values ``z`` (a LayerNorm row, a GroupNorm group, a BatchNorm channel over the batch, ...),
and a weight/bias vector indexed per element by ``widx``. With ``c = 1`` when the mean is
subtracted (``c = 0`` for RMS norms) and ``dv = n`` or ``n - 1`` (biased/unbiased):

    mu  = c * sum(z) / n                    t_i = z_i - mu
    V   = sum(t_i**2) / dv                  s   = sqrt(V + eps)       (eps inside)
                                            s   = sqrt(V) + eps       (eps outside)
    r   = 1 / s   (rstd)                    y_i = t_i * r * w_i + b_i   (w_i = weight_offset + w)

and, given the upstream gradient ``g``, with ``h_i = g_i w_i``, ``K = sum(h_i t_i)`` and ``s'`` the
derivative's square root (``s`` inside, ``sqrt(V)`` outside, where ``ds/dV = 1 / (2 s')``):

    dz_i = r (h_i - c mean(h)) - t_i K r**2 / (dv s')
    dw_j = sum over elements with widx = j of g_i t_i r        db_j = sum of g_i likewise

(at ``V = 0`` outside the square root the second term of ``dz`` is 0: its numerator vanishes to
second order). With given statistics (BatchNorm in evaluation) ``mu`` and ``V`` are inputs and
``dz_i = r h_i``.

Each result is first computed on the fast path (:mod:`references.fast`) and certified; elements it
cannot decide are computed exactly (:mod:`references.exact`), group statistics once per group.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from references import doubled
from references.exact import lincomb_at, round_surd
from references.fast import FLOAT64_WORKING, LONG_DOUBLE_WORKING, Approx, certify, working_for
from references.fastpath import (
    GroupStatsRecorder,
    by_row_blocks,
    fast_output,
    group_stats,
    undecided,
)
from references.formats import FLOAT64, Format
from references.problem import Convention, GroupStats, Problem, exact_weight, value_at

__all__ = ["Convention", "GroupStats", "Problem", "forward", "running_update", "statistics"]


def _nan_outputs(p: Problem) -> np.ndarray | None:
    """Where the output is NaN by definition (bad groups, non-finite weight or bias), in a shape
    that broadcasts to ``(G, K)``; None when nowhere."""
    bad: np.ndarray = p.bad_groups[:, None]
    for vector in (p.weight, p.bias):
        element = p.compact(vector)
        if element is not None and not np.isfinite(element).all():
            bad = bad | ~np.isfinite(element)
    return bad if bad.any() else None


#: How many group elements the long double step may recompute per element it is to decide.
LONG_DOUBLE_STEP_ELEMENTS = 4096


@np.errstate(all="ignore")
def forward(p: Problem, out: Format, *, fast: bool = True) -> np.ndarray:
    """The correctly rounded normalised output, ``(G, K)``, in ``out``'s NumPy dtype (float32
    for bfloat16, whose values it holds exactly).

    ``fast=False`` skips the fast path: every element is computed exactly (for tests)."""
    G, K = p.shape
    w = working_for(out) if fast else None
    # Results are kept in the output's own NumPy dtype where it has one (bfloat16 values in
    # float32): every value stored is exactly representable, and no conversion pass follows.
    container = np.float32 if out.name == "bfloat16" else out.numpy_dtype
    if w is not None and G * K:
        recorder = GroupStatsRecorder(p, w)

        def block_output(block: Problem, rows: slice) -> tuple[np.ndarray, np.ndarray]:
            values = fast_output(block, out, w)
            recorder.record(block, rows)
            return values

        result, decided = by_row_blocks(p, block_output, container)
        recorder.publish()
    else:
        result, decided = np.full(p.shape, np.nan, container), np.zeros(p.shape, dtype=bool)
    nan = _nan_outputs(p)
    if nan is not None:
        nan = np.broadcast_to(nan, p.shape)
        decided |= nan
        result[nan] = np.nan
    rows, cols = undecided(decided)
    groups_used, local = np.unique(rows, return_inverse=True)
    # Ziv's second step before the exact path: redo the undecided elements in long double, whose
    # bound is ~2**11 times tighter. Their groups' statistics are recomputed too, so the step is
    # worth it only while that costs less than the exact path would (~100 ns per group element
    # against ~0.3 ms per exact element: a BatchNorm channel of 10**6 values is not redone in
    # long double for one undecided element).
    worth_it = groups_used.size * K <= LONG_DOUBLE_STEP_ELEMENTS * rows.size
    if w is FLOAT64_WORKING and LONG_DOUBLE_WORKING.u < w.u and rows.size and worth_it:
        again, again_decided = fast_output(
            p.rows(groups_used), out, LONG_DOUBLE_WORKING, at=(local, cols)
        )
        result[rows[again_decided], cols[again_decided]] = again[again_decided]
        rows, cols = rows[~again_decided], cols[~again_decided]
    if out is FLOAT64 and fast and rows.size:
        # Third step for float64 outputs: double-double from exact group statistics.
        again, again_decided = doubled.outputs(p, rows, cols, out)
        result[rows[again_decided], cols[again_decided]] = again[again_decided]
        rows, cols = rows[~again_decided], cols[~again_decided]
    for g, k in zip(rows, cols, strict=True):
        result[g, k] = _exact_output(p, int(g), int(k), out)
    return result


def _exact_output(p: Problem, g: int, k: int, out: Format) -> float:
    st = p.exact_stats(g)
    if st.r is None:
        return float("nan")
    weight = exact_weight(p, (g, k))
    bias = value_at(p, p.bias, g, k)
    value = (lincomb_at(p.z, (g, k)) - st.mean) * st.r
    if weight is not None:
        value = value * weight
    if bias is not None:
        value = value + Fraction(bias)
    return round_surd(value, out)


@np.errstate(all="ignore")
def statistics(
    p: Problem, fmt: Format, *, fast: bool = True
) -> tuple[np.ndarray | None, np.ndarray]:
    """Correctly rounded per-group ``mean`` (None for RMS norms) and ``rstd``."""
    G = p.shape[0]
    mean = np.full(G, np.nan) if p.conv.center else None
    rstd = np.full(G, np.nan)
    mean_ok = np.zeros(G, dtype=bool)
    rstd_ok = np.zeros(G, dtype=bool)
    w = working_for(fmt) if fast else None
    if w is not None and G and p.n:
        stats = group_stats(p, w)
        if mean is not None and stats.mean is not None:
            mean, mean_ok = (x.ravel() for x in certify(stats.mean, fmt))
        rstd, rstd_ok = (x.ravel() for x in certify(stats.r, fmt))
    nonfinite = p.nonfinite_groups
    undefined = p.bad_groups & ~nonfinite  # the variance is undefined, the mean is not
    for g in range(G):
        if nonfinite[g]:
            rstd[g] = np.nan
            if mean is not None:
                mean[g] = np.nan
            continue
        if undefined[g]:
            rstd[g], rstd_ok[g] = np.nan, True
        if rstd_ok[g] and (mean is None or mean_ok[g]):
            continue
        st = p.exact_stats(g)
        if not rstd_ok[g]:
            if st.r is not None:
                rstd[g] = round_surd(st.r, fmt)
            else:
                rstd[g] = np.nan if st.s is None else np.inf
        if mean is not None and not mean_ok[g]:
            mean[g] = round_surd(st.mean, fmt)
    return mean, rstd


def running_update(
    p: Problem,
    old: np.ndarray,
    which: str,
    momentum: Fraction,
    keep: Fraction,
    fmt: Format,
    members: np.ndarray,
    *,
    fast: bool = True,
) -> np.ndarray:
    """``keep * old + momentum * stat`` per running entry, correctly rounded.

    ``which`` picks the statistic: "mean", "biased" or "unbiased" variance; entry ``c`` averages
    it over the groups ``members[c]`` (one group for BatchNorm, the batch for InstanceNorm). An
    undefined statistic (non-finite input, n - 1 = 0) gives NaN.
    """
    divisor = {"mean": 1, "biased": p.n, "unbiased": p.n - 1}[which]
    entries, pooled = members.shape
    result, decided = np.full(entries, np.nan), np.zeros(entries, dtype=bool)
    undefined = p.nonfinite_groups[members].any(axis=1) | ~np.isfinite(old) | (divisor <= 0)
    w = working_for(fmt) if fast else None
    if w is not None and entries and pooled and divisor > 0 and p.n:
        stats = group_stats(p, w)
        stat = stats.mean if which == "mean" else stats.total
        assert stat is not None
        per_group = Approx(stat.v.ravel()[members], stat.e.ravel()[members], w)
        average = per_group.sum(axis=1, keepdims=False) / Approx.exact(float(divisor * pooled), w)
        new = Approx.of_fraction(keep, w) * Approx.exact(np.where(undefined, 0, old), w) + (
            Approx.of_fraction(momentum, w) * average
        )
        result, decided = certify(new, fmt)
    result[undefined] = np.nan
    for c in np.nonzero(~decided & ~undefined)[0]:
        total = Fraction(0)
        for g in members[c]:
            st = p.exact_stats(int(g))
            assert st.total is not None
            total += st.mean if which == "mean" else st.total / divisor
        value = keep * Fraction(float(old[c])) + momentum * total / pooled
        result[c] = round_surd(value, fmt)
    return result
