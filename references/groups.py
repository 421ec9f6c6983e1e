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

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from references.exact import LinComb, Surd, lincomb_at, lincomb_product, lincomb_sum, round_surd
from references.fast import (
    BOUND_SAFETY,
    FLOAT64_WORKING,
    LONG_DOUBLE_WORKING,
    Approx,
    Working,
    _gamma,
    blocked_sum,
    cascaded_sum,
    certify,
    decide,
    working_for,
)
from references.formats import FLOAT64, Format


@dataclass(frozen=True)
class Convention:
    center: bool
    unbiased: bool
    eps: float
    eps_outside: bool
    weight_offset: float = 0.0


@dataclass
class Problem:
    """A normalisation in the ``(G, K)`` layout.

    ``z`` is exact (a :data:`~references.exact.LinComb` of arrays broadcastable to ``(G, K)``);
    ``weight``/``bias`` are 1-D, indexed per element by ``widx`` (broadcastable to ``(G, K)``);
    ``given`` holds ``(mean, var)`` per group when the statistics are inputs rather than computed.
    """

    z: LinComb
    shape: tuple[int, int]
    conv: Convention
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    widx: np.ndarray | None = None
    given: tuple[np.ndarray, np.ndarray] | None = None
    _exact_stats: dict[int, GroupStats] = field(default_factory=dict, repr=False)
    _fast_stats: dict[Working, FastStats] = field(default_factory=dict, repr=False)

    # -- layout helpers -----------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.shape[1]

    @property
    def dv(self) -> int:
        return self.n - 1 if self.conv.unbiased else self.n

    def elementwise(self, vector: np.ndarray | None) -> np.ndarray | None:
        """A per-weight vector as a read-only ``(G, K)`` view, one value per element."""
        compact = self.compact(vector)
        return None if compact is None else np.broadcast_to(compact, self.shape)

    def compact(self, vector: np.ndarray | None) -> np.ndarray | None:
        """A per-weight vector in the smallest shape that broadcasts to ``(G, K)``."""
        if vector is None:
            return None
        assert self.widx is not None
        return vector[self.widx]

    @functools.cached_property
    def nonfinite_groups(self) -> np.ndarray:
        """Groups holding a NaN or infinity (in ``z`` or in given statistics)."""
        bad = np.zeros(self.shape[0], dtype=bool)
        for _, arrays in self.z:
            for a in arrays:
                finite = np.broadcast_to(np.isfinite(a), self.shape)
                bad |= ~finite.all(axis=1)
        if self.given is not None:
            bad |= ~np.isfinite(self.given[0]) | ~np.isfinite(self.given[1])
        return bad

    @functools.cached_property
    def bad_groups(self) -> np.ndarray:
        """Groups whose normalised output is NaN by definition: a non-finite value, or an
        undefined variance (n - 1 = 0 with the unbiased estimator). Their mean may exist."""
        if self.given is None and self.dv <= 0:
            return np.ones(self.shape[0], dtype=bool)
        return self.nonfinite_groups

    def finite_terms(self) -> list[tuple[Fraction, tuple[np.ndarray, ...]]]:
        """``z`` with the non-finite groups zeroed, so that the fast path stays finite."""
        if not self.nonfinite_groups.any():
            return self.z
        bad = self.nonfinite_groups[:, None]
        return [
            (c, tuple(np.where(bad, 0.0, np.broadcast_to(a, self.shape)) for a in arrays))
            for c, arrays in self.z
        ]

    def rows(self, which: slice | np.ndarray) -> Problem:
        """The sub-problem of the groups ``which`` selects (a slice or an index array)."""
        G = self.shape[0]

        def cut(a: np.ndarray) -> np.ndarray:
            return a[which] if a.ndim == 2 and a.shape[0] == G else a

        given = None if self.given is None else (self.given[0][which], self.given[1][which])
        count = len(range(G)[which]) if isinstance(which, slice) else len(which)
        sub = Problem(
            z=[(c, tuple(cut(a) for a in arrays)) for c, arrays in self.z],
            shape=(count, self.shape[1]),
            conv=self.conv,
            weight=self.weight,
            bias=self.bias,
            widx=None if self.widx is None else cut(self.widx),
            given=given,
        )
        for cached in ("nonfinite_groups", "bad_groups"):  # computed once for the whole
            if cached in self.__dict__:
                sub.__dict__[cached] = self.__dict__[cached][which]
        return sub

    # -- exact statistics ---------------------------------------------------------------------
    def exact_stats(self, g: int) -> GroupStats:
        if g not in self._exact_stats:
            self._exact_stats[g] = _exact_group_stats(self, g)
        return self._exact_stats[g]


@dataclass(frozen=True)
class GroupStats:
    mean: Fraction
    total: Fraction | None  # sum of squared deviations (None with given statistics)
    var: Fraction | None  # None when undefined (dv = 0)
    s: Surd | None  # None when undefined (no variance, or a negative given one): NaN
    r: Surd | None  # None when s is undefined or 0 (rstd +inf, output NaN)
    r_prime: Surd | None  # 1/s' for the backward (0 where the term vanishes)


def _row(terms: LinComb, g: int, shape: tuple[int, int]) -> LinComb:
    return [(c, tuple(np.broadcast_to(a, shape)[g] for a in arrays)) for c, arrays in terms]


def _exact_group_stats(p: Problem, g: int) -> GroupStats:
    conv, eps = p.conv, Fraction(p.conv.eps)
    if p.given is not None:
        mean, var, total = Fraction(float(p.given[0][g])), Fraction(float(p.given[1][g])), None
    else:
        row = _row(p.z, g, p.shape)
        s1 = lincomb_sum(row)
        s2 = lincomb_sum(lincomb_product(row, row))
        mean = s1 / p.n if conv.center else Fraction(0)
        total = s2 - s1 * s1 / p.n if conv.center else s2
        if p.dv <= 0:
            return GroupStats(mean, total, None, None, None, None)
        var = total / p.dv
    if (var if conv.eps_outside else var + eps) < 0:  # only given statistics can be negative
        return GroupStats(mean, total, var, None, None, None)
    if conv.eps_outside:
        root = Surd.sqrt(var)
        s = root + eps
        r_prime = None if root.is_zero() else 1 / root
    else:
        s = Surd.sqrt(var + eps)
        r_prime = None if s.is_zero() else 1 / s
    if s.is_zero():
        return GroupStats(mean, total, var, s, None, None)
    return GroupStats(mean, total, var, s, 1 / s, r_prime)


# -- fast statistics --------------------------------------------------------------------------
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

    @property
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
    plain = len(terms) == 1 and terms[0][0] == 1 and len(terms[0][1]) == 1
    if not plain:
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
def _effective_weight(p: Problem, w: Working) -> Approx | None:
    weight = p.elementwise(p.weight)
    if weight is None:
        return None
    approx = Approx.exact(np.where(np.isfinite(weight), weight, 0.0), w)
    if p.conv.weight_offset:
        approx = approx + Approx.exact(p.conv.weight_offset, w)
    return approx


def _at(p: Problem, vector: np.ndarray | None, g: int, k: int) -> float | None:
    """One element's value of a per-weight vector (bias, weight), or None."""
    compact = p.compact(vector)
    if compact is None:
        return None
    return float(compact[g if compact.shape[0] > 1 else 0, k if compact.shape[1] > 1 else 0])


def _at_vector(
    p: Problem, vector: np.ndarray | None, rows: np.ndarray, cols: np.ndarray
) -> np.ndarray | None:
    """The values of a per-weight vector at the elements ``(rows, cols)``, or None."""
    compact = p.compact(vector)
    if compact is None:
        return None
    return np.broadcast_to(compact, p.shape)[rows, cols]


def _exact_weight(p: Problem, index: tuple[int, int]) -> Fraction | None:
    weight = _at(p, p.weight, *index)
    if weight is None:
        return None
    return Fraction(weight) + Fraction(p.conv.weight_offset)


def _nan_outputs(p: Problem) -> np.ndarray | None:
    """Where the output is NaN by definition (bad groups, non-finite weight or bias), in a shape
    that broadcasts to ``(G, K)``; None when nowhere."""
    bad: np.ndarray = p.bad_groups[:, None]
    for vector in (p.weight, p.bias):
        element = p.compact(vector)
        if element is not None and not np.isfinite(element).all():
            bad = bad | ~np.isfinite(element)
    return bad if bad.any() else None


#: Elements per row block on the fast path: small enough that a block's temporaries stay in
#: cache, large enough to amortise NumPy's per-call overhead.
BLOCK_ELEMENTS = 1 << 16


def by_row_blocks(
    p: Problem,
    fast: Callable[[Problem], tuple[np.ndarray, np.ndarray]],
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
            values[block], decided[block] = fast(p.rows(block))

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


def _fast_output(
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
        _ = p.bad_groups  # computed once here, then sliced for the row blocks
        result, decided = by_row_blocks(p, lambda block: _fast_output(block, out, w), container)
    else:
        result, decided = np.full(p.shape, np.nan, container), np.zeros(p.shape, dtype=bool)
    nan = _nan_outputs(p)
    if nan is not None:
        nan = np.broadcast_to(nan, p.shape)
        decided |= nan
        result[nan] = np.nan
    rows, cols = undecided(decided)
    if w is FLOAT64_WORKING and LONG_DOUBLE_WORKING.u < w.u and rows.size:
        # Ziv's second step before the exact path: redo the undecided elements in long double,
        # whose bound is ~2**11 times tighter (their groups' statistics included).
        groups_used, local = np.unique(rows, return_inverse=True)
        again, again_decided = _fast_output(
            p.rows(groups_used), out, LONG_DOUBLE_WORKING, at=(local, cols)
        )
        result[rows[again_decided], cols[again_decided]] = again[again_decided]
        rows, cols = rows[~again_decided], cols[~again_decided]
    if out is FLOAT64 and fast and rows.size:
        # Third step for float64 outputs: double-double from exact group statistics.
        from references import doubled  # imports this module

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
    weight = _exact_weight(p, (g, k))
    bias = _at(p, p.bias, g, k)
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
        stats = fast_stats(p, w)
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
        stats = fast_stats(p, w)
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
