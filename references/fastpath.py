"""The certified fast path of the group engine: statistics and outputs with rigorous bounds.

The formulas are in :mod:`references.groups`, the error model in :mod:`references.fast`. Row
blocks run in parallel threads; each element's rounding is certified or left to the later steps
(long double, double-double, exact) that :func:`references.groups.forward` chains.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from references.fast import (
    BOUND_SAFETY,
    LONG_DOUBLE_WORKING,
    Approx,
    Working,
    _gamma,
    blocked_sum,
    cascaded_sum,
    decide,
)
from references.formats import Format
from references.problem import Problem


@dataclass(frozen=True)
class FastStats:
    """Statistics on the fast path. The deviations ``t`` carry an affine error bound,
    ``|t - t_exact| <= t_alpha |t| + t_beta`` (``t_beta`` per group), which is what makes the
    forward pass cheap: no error array per element."""

    w: Working
    mean: Approx | None
    total: Approx | None
    var: Approx
    t_value: np.ndarray
    t_alpha: float
    t_beta: np.ndarray
    r: Approx
    r_prime: Approx
    t_abs: np.ndarray | None = None  # |t|, kept when the statistics needed it anyway

    @functools.cached_property  # read several times by the backward pass
    def t(self) -> Approx:
        return Approx(self.t_value, self.t_alpha * np.abs(self.t_value) + self.t_beta, self.w)


def _approx_z(p: Problem, w: Working) -> Approx:
    acc: Approx | None = None
    for coef, arrays in p.finite_terms():
        term = Approx.exact(arrays[0], w)
        for a in arrays[1:]:
            term = term * Approx.exact(a, w)
        if coef != 1:
            term = term * Approx.of_fraction(coef, w)
        acc = term if acc is None else acc + term
    assert acc is not None
    return acc


def _row_sum(
    values: np.ndarray, w: Working, *, nonnegative: bool = False
) -> tuple[np.ndarray | None, np.ndarray | None, float]:
    """Row sums for the statistics: blocked (~2 sqrt(n) u) in float64, where the targets are
    narrow; cascaded with error-free TwoSum (~u) in long double, where every bit counts."""
    if w is LONG_DOUBLE_WORKING:
        return cascaded_sum(values)
    return blocked_sum(values, nonnegative=nonnegative, magnitude=not nonnegative)


class GroupFastStats(NamedTuple):
    """The per-group part of :class:`FastStats`: what statistics and running updates need."""

    mean: Approx | None
    total: Approx | None
    r: Approx


def group_stats(p: Problem, w: Working) -> GroupFastStats:
    """Per-group fast statistics: those the forward pass's row blocks left behind, if any."""
    if w not in p._group_fast_stats:
        st = fast_stats(p, w)
        p._group_fast_stats[w] = GroupFastStats(st.mean, st.total, st.r)
    return p._group_fast_stats[w]


class GroupStatsRecorder:
    """Collects the per-group fast statistics of the forward pass's row blocks into the whole
    problem's cache, so that statistics and running updates after it do not compute them
    again."""

    def __init__(self, p: Problem, w: Working):
        self.p, self.w = p, w
        # Allocated here, before the worker threads write their rows: which statistics exist
        # is known up front (a mean when centred or given, a sum of squares unless given).
        names = ["r"]
        if p.conv.center or p.given is not None:
            names.append("mean")
        if p.given is None:
            names.append("total")
        self.parts = {
            name + part: np.empty((p.shape[0], 1), dtype=w.dtype)
            for name in names
            for part in ("v", "e")
        }
        self.recorded: list[tuple[str, int]] = []  # (name, rows): appends are atomic

    def record(self, block: Problem, rows: slice) -> None:
        st = fast_stats(block, self.w)  # cached on the block: no recomputation
        for name, value in (("mean", st.mean), ("total", st.total), ("r", st.r)):
            if value is not None and name + "v" in self.parts:
                self.parts[name + "v"][rows] = value.v
                self.parts[name + "e"][rows] = np.broadcast_to(value.e, value.v.shape)
                self.recorded.append((name, block.shape[0]))

    def publish(self) -> None:
        """Store the collected statistics (call once every block has been recorded)."""

        names = {key[:-1] for key in self.parts}
        for name in names:  # all or nothing: a statistic with unwritten rows is not published
            if sum(rows for n, rows in self.recorded if n == name) != self.p.shape[0]:
                return

        def get(name: str) -> Approx | None:
            if name not in names:
                return None
            return Approx(self.parts[name + "v"], self.parts[name + "e"], self.w)

        r = get("r")
        assert r is not None
        self.p._group_fast_stats[self.w] = GroupFastStats(get("mean"), get("total"), r)


def fast_stats(p: Problem, w: Working) -> FastStats:
    """The statistics on the fast path, computed once per problem and working precision."""
    if w not in p._fast_stats:
        p._fast_stats[w] = _fast_stats(p, w)
    return p._fast_stats[w]


def _deviations(p: Problem, w: Working) -> tuple[Approx | None, np.ndarray, float, np.ndarray]:
    """``(mean, t, alpha, beta)`` with ``|t - t_exact| <= alpha |t| + beta``.

    With ``z`` exact (one float array) and ``m1`` any shift (a rough mean), ``a = fl(z - m1)``
    has error ``u|a|``; ``c = fl(sum(a)/n)`` then has error
    ``e_c = (u + c_sum) sum|a| (1 + g_n)/n + u|c| + eta``; and ``t = fl(a - c)`` has error
    ``u|a| + e_c + u|t| <= (2u + u^2)|t| + u|c| + e_c`` since ``|a| <= (1 + u)|t| + |c|``.
    Subtracting a rough mean first means a large mean costs nothing, whatever the condition.
    Other ``z`` (an inexact sum such as ``alpha*x + f``) take the general bound of
    :class:`~references.fast.Approx`.
    """
    u, n = w.u, p.n
    terms = p.finite_terms()
    if not p.plain:
        z = _approx_z(p, w)
        if p.given is not None:
            t = z - Approx.exact(np.where(p.nonfinite_groups, 0, p.given[0])[:, None], w)
            return None, t.v, 0.0, t.e
        if not p.conv.center:
            return None, z.v, 0.0, z.e
        shift = np.asarray(z.v.mean(axis=1, keepdims=True), dtype=w.dtype)
        a = z - shift
        c = a.sum(axis=1) / Approx.exact(float(n), w)
        t = a - c
        return c + shift, t.v, 0.0, t.e
    z_values = np.asarray(terms[0][1][0], dtype=w.dtype)
    zero = np.zeros((p.shape[0], 1), dtype=w.dtype)
    if p.given is not None:
        given_mean = np.where(p.nonfinite_groups, 0, p.given[0])[:, None].astype(w.dtype)
        return Approx.exact(given_mean, w), z_values - given_mean, u, zero
    if not p.conv.center:
        return None, z_values, 0.0, zero
    rough = z_values[:, :1]  # any shift will do; a row's own value is as good as its mean
    shifted = z_values - rough
    total, magnitude, coefficient = _row_sum(shifted, w)
    assert total is not None
    assert magnitude is not None
    correction = total[:, None] / n
    e_c = (u + coefficient) * magnitude[:, None] * (1 + _gamma(n, u)) / n + u * np.abs(correction)
    e_c = e_c + np.where(correction != 0, w.eta, 0)  # 0 / n cannot underflow: constant rows
    mean = Approx(correction, e_c, w) + rough
    return mean, shifted - correction, 2 * u + u * u, u * np.abs(correction) + e_c


def _fast_stats(p: Problem, w: Working) -> FastStats:
    conv, u = p.conv, w.u
    mean, t, alpha, beta = _deviations(p, w)
    t_abs = None
    if p.given is not None:
        var = Approx.exact(np.where(p.nonfinite_groups, 0, p.given[1])[:, None], w)
        total = None
    else:
        # |t^2 - t_exact^2| <= e_t (2|t| + e_t) with e_t = alpha|t| + beta, summed; plus the
        # rounding of each square (u t^2 + eta) and of the sum.
        squares = t * t
        sum_sq, _, coefficient = _row_sum(squares, w, nonnegative=True)
        assert sum_sq is not None
        sum_sq = sum_sq[:, None]
        sum_abs: Any = 0.0
        t_abs = None
        if np.any(beta) and beta.shape[1] == 1:
            t_abs = np.abs(t)
            sum_abs = blocked_sum(t_abs, signed=False, magnitude=False, nonnegative=True)[0]
            sum_abs = sum_abs[:, None]
        beta_sum = (
            (beta * beta).sum(axis=1, keepdims=True) if beta.shape[1] > 1 else (p.n * beta * beta)
        )
        cross = (
            2 * (beta * np.abs(t)).sum(axis=1, keepdims=True) * (1 + alpha)
            if (beta.shape[1] > 1)
            else 2 * beta * (1 + alpha) * sum_abs
        )
        e_total = (2 * alpha + alpha * alpha + u + coefficient) * sum_sq + cross + beta_sum
        e_total = (e_total + p.n * w.eta) * (1 + _gamma(p.n, u))
        total = Approx(sum_sq, e_total, w)
        var = total / Approx.exact(float(max(p.dv, 1)), w)
    eps = Approx.exact(conv.eps, w)
    one = Approx.exact(1.0, w)
    if conv.eps_outside:
        root = var.sqrt()
        r = one / (root + eps)
        r_prime = one / root
    else:
        r = one / (var + eps).sqrt()
        r_prime = r
    return FastStats(w, mean, total, var, t, alpha, beta, r, r_prime, t_abs)


# -- the forward pass -------------------------------------------------------------------------
def effective_weight(p: Problem, w: Working) -> Approx | None:
    weight = p.elementwise(p.weight)
    if weight is None:
        return None
    approx = Approx.exact(np.where(np.isfinite(weight), weight, 0.0), w)
    if p.conv.weight_offset:
        approx = approx + Approx.exact(p.conv.weight_offset, w)
    return approx


#: Elements per row block on the fast path: small enough that a block's temporaries stay in
#: cache, large enough to amortise NumPy's per-call overhead.
BLOCK_ELEMENTS = 1 << 16


def by_row_blocks(
    p: Problem,
    fast: Callable[[Problem, slice], tuple[np.ndarray, np.ndarray]],
    dtype: np.dtype[Any] | type = np.float64,
) -> tuple[np.ndarray, np.ndarray]:
    """Run a row-local fast computation on blocks of rows, in parallel threads (NumPy releases
    the GIL), each writing its ``(values, decided)`` into the shared ``(G, K)`` results (values
    of ``dtype``)."""
    G, K = p.shape
    step = max(1, BLOCK_ELEMENTS // max(K, 1))
    values, decided = np.empty(p.shape, dtype=dtype), np.empty(p.shape, dtype=bool)

    def run(start: int) -> None:
        block = slice(start, min(start + step, G))
        with np.errstate(all="ignore"):  # error state is per thread
            values[block], decided[block] = fast(p.rows(block), block)

    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        list(pool.map(run, range(0, G, step)))
    return values, decided


def undecided(decided: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero(~decided)`` for a mostly-true ``(G, K)`` mask, looking only at the rows
    that hold a False."""
    rows = np.flatnonzero(~decided.all(axis=1))
    local, cols = np.nonzero(~decided[rows])
    return rows[local], cols


_WORKERS = max(1, min(os.cpu_count() or 1, 8))


def fast_output(
    p: Problem, out: Format, w: Working, at: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``y = t r w + b`` with the affine bound of the deviations carried through:

    ``p = fl(t r)``: ``|p - p*| <= A|t| + B`` with ``A = alpha(|r| + e_r) + e_r + u(1+u)|r|``,
    ``B = beta(|r| + e_r) + eta``; ``q = fl(p w)`` with ``w`` off by at most ``omega|w|``
    (``omega = u`` when the offset is added, else 0): ``|q - q*| <= |w|(A'|t| + B') + eta``,
    ``A' = A(1 + omega) + (omega(1 + u) + u(1 + u)^2)|r|``, ``B' = B(1 + omega)`` (the
    ``(omega + u) eta |w|`` of ``fl(p w)``'s first-order terms is left to ``BOUND_SAFETY``, since
    ``B >= eta``, and the product's own ``eta`` is folded into ``B'`` as ``eta / min|w != 0|``); and
    ``y = fl(q + b)`` adds ``u|y|``. The per-group coefficients absorb ``BOUND_SAFETY`` and the
    ``2u|y|`` that :func:`~references.fast.decide` needs, so no extra pass is spent on them.

    ``at = (rows, cols)`` evaluates those elements only (1-D results); else the whole ``(G, K)``.
    """

    def pick(array: np.ndarray) -> np.ndarray:
        return array if at is None else np.broadcast_to(array, p.shape)[at]

    st = fast_stats(p, w)
    u, eta, safety = w.u, w.eta, BOUND_SAFETY
    r, e_r = st.r.v, st.r.e
    abs_r = np.abs(r)
    a_coef = st.t_alpha * (abs_r + e_r) + e_r + u * (1 + u) * abs_r
    b_coef = st.t_beta * (abs_r + e_r) + eta
    t = pick(st.t_value)
    y = t * pick(r)
    abs_t = np.abs(t) if st.t_abs is None else pick(st.t_abs)
    weight = p.compact(p.weight)
    zero_weight = False
    if weight is None:
        bound = abs_t * pick(a_coef * safety)
        bound += pick(b_coef * safety)
    else:
        weight = np.asarray(np.where(np.isfinite(weight), weight, 0.0), dtype=w.dtype)
        omega = 0.0
        if p.conv.weight_offset:
            weight = weight + p.conv.weight_offset
            omega = u
        a_coef = a_coef * (1 + omega) + (omega * (1 + u) + u * (1 + u) ** 2) * abs_r
        # The underflow term eta of q = fl(p w) is needed only where w != 0, where it is at
        # most |w| * eta / min|w != 0|: folded into B'.
        abs_weight = np.abs(weight)
        nonzero = abs_weight[abs_weight > 0]
        zero_weight = nonzero.size < abs_weight.size
        b_coef = b_coef * (1 + omega) + (eta / nonzero.min() if nonzero.size else 0.0)
        y *= pick(weight)
        bound = abs_t * pick(a_coef * safety)
        bound += pick(b_coef * safety)
        bound *= pick(abs_weight)
    bias = p.compact(p.bias)
    if bias is not None:
        y += pick(np.asarray(np.where(np.isfinite(bias), bias, 0.0), dtype=w.dtype))
    bound += (u * safety + 2 * u) * np.abs(y)
    exact_t = st.t_beta == 0
    if exact_t.any():
        # Where t = 0 with no error (beta = 0: RMS norms, constant rows), t r = 0 exactly,
        # without underflow, so y is exactly the bias: zero bound. (RMSNorm of ReLU outputs or
        # a constant row would otherwise send every such element to the exact path: the bound's
        # eta straddles the sign of zero.)
        bound[(t == 0) & pick(exact_t)] = 0.0
    # bound >= eta > 0 unless set to 0 just above or multiplied by a zero weight.
    exact_possible = bool(exact_t.any()) or zero_weight
    values, decided = decide(y, bound, w, out, native=True, exact_possible=exact_possible)
    coefficients_ok = np.isfinite(a_coef + b_coef + r)
    if not coefficients_ok.all():
        if at is None:
            decided &= np.broadcast_to(coefficients_ok.all(axis=-1, keepdims=True), decided.shape)
        else:
            decided &= pick(coefficients_ok)
    return values, decided
