"""The backward pass of the group engine: gradients w.r.t. ``z``, weight and bias.

The formulas are in :mod:`references.groups`. As for the forward pass, each gradient element is
computed on the certified fast path first and exactly where that cannot decide it. Non-finite
values propagate as NaN: a non-finite input or upstream gradient in a group makes that group's
``dz`` NaN, and makes NaN every weight/bias gradient it contributes to.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from references import doubled
from references.exact import (
    LinComb,
    Surd,
    exact_sum,
    lincomb_at,
    lincomb_product,
    lincomb_sum,
    round_surd,
    surd_sum,
)
from references.fast import Approx, Working, certify, working_for
from references.fastpath import effective_weight, fast_stats, undecided
from references.formats import Format, round_fraction
from references.problem import Problem, exact_weight, group_row


def _bad_grad_groups(p: Problem, grad: np.ndarray) -> np.ndarray:
    bad = p.bad_groups | ~np.isfinite(grad).all(axis=1)
    weight = p.elementwise(p.weight)
    if weight is not None:
        bad |= ~np.isfinite(weight).all(axis=1)
    return bad


@np.errstate(all="ignore")
def grad_input(
    p: Problem,
    grad: np.ndarray,
    fmt: Format,
    scale: Fraction = Fraction(1),
    addend: np.ndarray | None = None,
    *,
    fast: bool = True,
) -> np.ndarray:
    """``scale * (dL/dz + addend)`` for upstream gradient ``grad`` (``(G, K)``), correctly
    rounded into ``fmt``. ``addend`` is a second upstream gradient reaching ``z`` directly (the
    fused adds' residual output); ``scale`` is the exact factor of the summand (``alpha``)."""
    return grad_inputs(p, grad, [(fmt, scale)], addend, fast=fast)[0]


@np.errstate(all="ignore")
def grad_inputs(
    p: Problem,
    grad: np.ndarray,
    targets: Sequence[tuple[Format, Fraction]],
    addend: np.ndarray | None = None,
    *,
    fast: bool = True,
) -> list[np.ndarray]:
    """:func:`grad_input` for several ``(fmt, scale)`` targets at once (DeepNorm and the fused
    adds send ``dz`` to both summands): ``dz`` is computed once, on the fast path and exactly."""
    bad = _bad_grad_groups(p, grad)
    if addend is not None:
        bad |= ~np.isfinite(addend).all(axis=1)
    clean = np.where(bad[:, None], 0, grad)
    fast_dz: dict[Working, Approx] = {}
    exact_dz: dict[tuple[int, int], Surd | None] = {}
    cache: dict[int, tuple[Fraction, Fraction]] = {}
    results = []
    for fmt, scale in targets:
        result = np.full(p.shape, np.nan)
        decided = np.zeros(p.shape, dtype=bool)
        w = working_for(fmt) if fast else None
        if w is not None and grad.size:
            if w not in fast_dz:
                dz = _fast_grad_input(p, clean, w)
                if addend is not None:
                    dz = dz + Approx.exact(np.where(bad[:, None], 0, addend), w)
                fast_dz[w] = dz
            dz = fast_dz[w]
            result, decided = certify(dz if scale == 1 else dz * Approx.of_fraction(scale, w), fmt)
        decided |= bad[:, None]
        result[bad] = np.nan
        rows, cols = undecided(decided)
        if fast and scale == 1 and addend is None and rows.size:
            # Before the exact path: double-double from exact group constants (float64).
            again, again_decided = doubled.grad_inputs(
                p, grad, rows, cols, fmt, lambda g: _group_sums(p, grad, g, cache)
            )
            result[rows[again_decided], cols[again_decided]] = again[again_decided]
            rows, cols = rows[~again_decided], cols[~again_decided]
        for g, k in zip(rows.tolist(), cols.tolist(), strict=True):
            if (g, k) not in exact_dz:
                value = _exact_grad_input(p, grad, g, k, cache)
                if value is not None and addend is not None:
                    value = value + Fraction(float(addend[g, k]))
                exact_dz[g, k] = value
            value = exact_dz[g, k]
            result[g, k] = np.nan if value is None else round_surd(value * scale, fmt)
        results.append(result)
    return results


def _fast_grad_input(p: Problem, grad: np.ndarray, w: Working) -> Approx:
    stats = fast_stats(p, w)
    h = Approx.exact(grad, w)
    weight = effective_weight(p, w)
    if weight is not None:
        h = h * weight
    if p.given is not None:
        return h * stats.r
    centred = h - h.sum(axis=1) / Approx.exact(float(p.n), w) if p.conv.center else h
    k = (h * stats.t).sum(axis=1)
    coef = k * stats.r * stats.r * stats.r_prime / Approx.exact(float(p.dv), w)
    return centred * stats.r - stats.t * coef


def _h_terms(p: Problem, grad: np.ndarray, g: int) -> LinComb:
    """``h = grad * (weight_offset + weight)`` on row ``g`` as an exact linear combination."""
    row = grad[g]
    weight = p.elementwise(p.weight)
    if weight is None:
        return [(Fraction(1), (row,))]
    terms: LinComb = [(Fraction(1), (row, weight[g]))]
    if p.conv.weight_offset:
        terms.append((Fraction(p.conv.weight_offset), (row,)))
    return terms


def _group_sums(
    p: Problem, grad: np.ndarray, g: int, cache: dict[int, tuple[Fraction, Fraction]]
) -> tuple[Fraction, Fraction]:
    """A group's exact ``(sum(h), K = sum(h t))``, computed once."""
    if g not in cache:
        h = _h_terms(p, grad, g)
        sum_h = lincomb_sum(h)
        sum_hz = lincomb_sum(lincomb_product(h, group_row(p.z, g, p.shape)))
        cache[g] = (sum_h, sum_hz - p.exact_stats(g).mean * sum_h)
    return cache[g]


def _exact_grad_input(
    p: Problem, grad: np.ndarray, g: int, k: int, cache: dict[int, tuple[Fraction, Fraction]]
) -> Surd | None:
    """The exact ``dz`` element, or None where it is NaN (a group with ``s = 0``)."""
    st = p.exact_stats(g)
    if st.r is None:
        return None
    h_i = Fraction(float(grad[g, k]))
    weight = exact_weight(p, (g, k))
    if weight is not None:
        h_i *= weight
    if p.given is not None:
        return st.r * h_i
    sum_h, k_sum = _group_sums(p, grad, g, cache)
    centred = h_i - sum_h / p.n if p.conv.center else h_i
    value = st.r * centred
    if st.r_prime is not None and k_sum:
        t_i = lincomb_at(p.z, (g, k)) - st.mean
        value = value - st.r * st.r * st.r_prime * (t_i * k_sum / p.dv)
    return value


@np.errstate(all="ignore")
def grad_affine(
    p: Problem,
    grad: np.ndarray,
    count: int,
    weight_fmt: Format | None,
    bias_fmt: Format | None,
    *,
    fast: bool = True,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(dL/dweight, dL/dbias)``, each of length ``count``, correctly rounded (None if not
    asked for)."""
    if weight_fmt is None and bias_fmt is None:
        return None, None
    assert p.widx is not None
    index = np.broadcast_to(p.widx, p.shape)
    bad_element = np.broadcast_to(p.bad_groups[:, None], p.shape) | ~np.isfinite(grad)
    poisoned = np.bincount(index.ravel(), weights=bad_element.ravel(), minlength=count) > 0
    clean = np.where(bad_element, 0.0, grad)
    dw = db = None
    if weight_fmt is not None:
        dw = _reduce(p, clean, index, count, weight_fmt, with_xhat=True, fast=fast)
        dw[poisoned] = np.nan
    if bias_fmt is not None:
        # dL/dbias = sum of grad, whatever the inputs: only a non-finite grad poisons it.
        finite = np.isfinite(grad)
        db = _reduce(p, np.where(finite, grad, 0.0), index, count, bias_fmt, False, fast)
        db[np.bincount(index.ravel(), weights=~finite.ravel(), minlength=count) > 0] = np.nan
    return dw, db


def _reduce(
    p: Problem,
    grad: np.ndarray,
    index: np.ndarray,
    count: int,
    fmt: Format,
    with_xhat: bool,
    fast: bool,
) -> np.ndarray:
    result, decided = np.full(count, np.nan), np.zeros(count, dtype=bool)
    by_column = _one_weight_per_column(p, count)  # LayerNorm's layout: column sums
    w = working_for(fmt) if fast else None
    if w is not None and grad.size:
        term = Approx.exact(grad, w)
        if with_xhat:
            stats = fast_stats(p, w)
            term = term * (stats.t * stats.r)
        if by_column:
            summed = term.sum(axis=0, keepdims=False)
        else:
            summed = term.sum_by(index, count)
        result, decided = certify(summed, fmt)
    columns = np.flatnonzero(~decided)
    if fast and with_xhat and columns.size and by_column:
        again, again_decided = doubled.weight_grads(p, grad, columns, fmt)
        result[columns[again_decided]] = again[again_decided]
        columns = columns[~again_decided]
    for j in columns:
        rows, cols = np.nonzero(index == j)
        if with_xhat:
            terms = [
                _exact_xhat_term(p, grad, int(g), int(k)) for g, k in zip(rows, cols, strict=True)
            ]
            result[j] = np.nan if None in terms else round_surd(surd_sum(terms), fmt)  # type: ignore[arg-type]
        else:
            result[j] = round_fraction(exact_sum(grad[rows, cols]), fmt)
    return result


def _one_weight_per_column(p: Problem, count: int) -> bool:
    assert p.widx is not None
    K = p.shape[1]
    return p.widx.shape == (1, K) and count == K and bool((p.widx[0] == np.arange(K)).all())


def _exact_xhat_term(p: Problem, grad: np.ndarray, g: int, k: int) -> Surd | None:
    """``grad * xhat`` at one element exactly; None where ``xhat`` is NaN (``s = 0``)."""
    if p.bad_groups[g]:
        return None
    st = p.exact_stats(g)
    gk = Fraction(float(grad[g, k]))
    if st.r is None:
        return None
    if not gk:
        return Surd(0)
    return st.r * ((lincomb_at(p.z, (g, k)) - st.mean) * gk)
