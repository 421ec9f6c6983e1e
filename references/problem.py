"""A normalisation problem in the engine's ``(G, K)`` layout, and its exact group statistics.

See :mod:`references.groups` for the formulas. A :class:`Problem` holds the values to normalise
exactly (a linear combination of float arrays), the convention, and the per-element weight and
bias; :meth:`Problem.exact_stats` gives a group's statistics exactly (rationals, and the
square root as a :class:`~references.exact.Surd`), computed once per group.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from references.exact import LinComb, Surd, lincomb_product, lincomb_sum

if TYPE_CHECKING:
    from references.fast import Working
    from references.fastpath import FastStats, GroupFastStats


@dataclass(frozen=True)
class Convention:
    """The convention of a normalisation, validated (see :mod:`references.conventions`)."""

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
    _group_fast_stats: dict[Working, GroupFastStats] = field(default_factory=dict, repr=False)

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

    @property
    def plain(self) -> bool:
        """Whether ``z`` is one float array as it is (not a sum such as ``alpha*x + f``)."""
        return len(self.z) == 1 and self.z[0][0] == 1 and len(self.z[0][1]) == 1

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
        # The group masks are computed once, for the whole problem, and sliced.
        sub.__dict__["nonfinite_groups"] = self.nonfinite_groups[which]
        sub.__dict__["bad_groups"] = self.bad_groups[which]
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


def group_row(terms: LinComb, g: int, shape: tuple[int, int]) -> LinComb:
    return [(c, tuple(np.broadcast_to(a, shape)[g] for a in arrays)) for c, arrays in terms]


def _exact_group_stats(p: Problem, g: int) -> GroupStats:
    conv, eps = p.conv, Fraction(p.conv.eps)
    if p.given is not None:
        mean, var, total = Fraction(float(p.given[0][g])), Fraction(float(p.given[1][g])), None
    else:
        row = group_row(p.z, g, p.shape)
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


# -- per-element weight and bias -----------------------------------------------------------------


def values_at(
    p: Problem, vector: np.ndarray | None, rows: np.ndarray | int, cols: np.ndarray | int
) -> np.ndarray | None:
    """The values of a per-weight vector at the elements ``(rows, cols)``, or None."""
    if vector is None:
        return None
    assert p.widx is not None
    return vector[np.broadcast_to(p.widx, p.shape)[rows, cols]]


def value_at(p: Problem, vector: np.ndarray | None, g: int, k: int) -> float | None:
    """One element's value of a per-weight vector (bias, weight), or None."""
    value = values_at(p, vector, g, k)
    return None if value is None else float(value)


def exact_weight(p: Problem, index: tuple[int, int]) -> Fraction | None:
    weight = value_at(p, p.weight, *index)
    if weight is None:
        return None
    return Fraction(weight) + Fraction(p.conv.weight_offset)
