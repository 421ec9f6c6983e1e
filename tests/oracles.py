"""An exact oracle for normalization layers, independent of ``references``.

Everything here is written from the mathematics, with Python integers and ``fractions.Fraction``
only. No float takes part in the arithmetic: floats enter as their exact values
(``Fraction(float(v))``) and leave as the correctly rounded value of an exact quantity, rounded by
``exact_rounding`` (round to nearest even; A + B/sqrt(D) and A + B/(sqrt(V) + e) by Ziv's
strategy on certified square-root brackets).

Normalisation of one group x_1..x_n (``normalize_group``):
    mu  = (1/n) sum x_i                    (0 when not centring: RMSNorm)
    var = sum (x_i - mu)**2 / (n or n - 1) (biased or unbiased)
    y_i = b_i + w_i (x_i - mu) / sqrt(var + eps)      (eps inside)
    y_i = b_i + w_i (x_i - mu) / (sqrt(var) + eps)    (eps outside)
A group with NaN or Inf is all NaN; n - 1 = 0 with the unbiased estimator is NaN; a zero
denominator (constant group, eps = 0) gives 0/0 = NaN.

The rounding primitives (``exact_rounding``) and the dtype carrying and comparison helpers
(``oracle_comparison``) live in their own modules; this module re-exports them, so that
``from oracles import round_fraction, as_backend, ...`` names the whole oracle in one place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from exact_rounding import (
    FORMATS,
    BinaryFormat,
    rational_sqrt,
    round_fraction,
    round_normalized,
    round_sqrt_expr,
    round_sqrt_plus_expr,
    sqrt_bracket,
    ulp_of,
)
from oracle_comparison import (
    FMT_NAMES,
    as_backend,
    assert_matches_oracle,
    fmt_of,
    numpy_dtype,
    to_float64,
    torch_dtype,
)

__all__ = [
    "FMT_NAMES",
    "FORMATS",
    "BinaryFormat",
    "OracleResult",
    "add_scaled",
    "add_scaled_exact",
    "as_backend",
    "assert_matches_oracle",
    "batch_norm_eval",
    "batch_norm_training",
    "batch_statistics",
    "fmt_of",
    "group_moments",
    "group_norm",
    "group_stats",
    "instance_norm",
    "layer_norm",
    "normalize_exact_rows",
    "normalize_group",
    "normalize_rows",
    "numpy_dtype",
    "rational_sqrt",
    "round_fraction",
    "round_normalized",
    "round_sqrt_expr",
    "round_sqrt_plus_expr",
    "running_stat_update",
    "sqrt_bracket",
    "to_float64",
    "torch_dtype",
    "ulp_of",
]

NAN = float("nan")


# ---------------------------------------------------------------------------------------------
# One group.


def group_moments(
    xs: Sequence[Fraction], *, center: bool, unbiased: bool
) -> tuple[Fraction, Fraction | None]:
    """(mu, var) exactly; var is None when the estimator divides by zero (n - 1 = 0)."""
    n = len(xs)
    mu = sum(xs, Fraction(0)) / n if center else Fraction(0)
    divisor = n - 1 if unbiased else n
    if divisor == 0:
        return mu, None
    return mu, sum(((x - mu) ** 2 for x in xs), Fraction(0)) / divisor


def normalize_group(
    xs: Sequence[Fraction],
    weights: Sequence[Fraction] | None,
    biases: Sequence[Fraction] | None,
    eps: Fraction,
    *,
    center: bool,
    unbiased: bool,
    eps_outside: bool,
    fmt: str,
) -> list[float]:
    """The normalised group, each element correctly rounded into ``fmt`` (see module docstring)."""
    n = len(xs)
    mu, var = group_moments(xs, center=center, unbiased=unbiased)
    if var is None or (var == 0 and eps == 0):
        return [NAN] * n
    out = []
    for i, x in enumerate(xs):
        w = weights[i] if weights is not None else Fraction(1)
        b = biases[i] if biases is not None else Fraction(0)
        out.append(round_normalized(b, w * (x - mu), var, eps, eps_outside, fmt))
    return out


def group_stats(
    xs: Sequence[Fraction],
    eps: Fraction,
    *,
    center: bool,
    unbiased: bool,
    eps_outside: bool,
    fmt: str,
) -> tuple[float, float]:
    """(mean, rstd) correctly rounded into ``fmt``; rstd = 1/sqrt(var+eps) or 1/(sqrt(var)+eps).

    A zero denominator gives rstd = +inf (1/0); an undefined variance gives NaN.
    """
    mu, var = group_moments(xs, center=center, unbiased=unbiased)
    mean = round_fraction(mu, fmt) if center else NAN
    if var is None:
        return mean, NAN
    return mean, round_normalized(Fraction(0), Fraction(1), var, eps, eps_outside, fmt)


# ---------------------------------------------------------------------------------------------
# Layouts: numpy arrays of exact values (float64 holds every value of the four formats).


@dataclass
class OracleResult:
    """Rounded output and per-group statistics (float64 arrays holding the rounded values).

    ``finite`` marks the groups whose inputs are all finite: only their statistics are defined.
    """

    output: np.ndarray
    mean: np.ndarray
    rstd: np.ndarray
    finite: np.ndarray

    def reshaped(self, out_shape, stats_shape) -> OracleResult:
        return OracleResult(
            self.output.reshape(out_shape),
            self.mean.reshape(stats_shape),
            self.rstd.reshape(stats_shape),
            self.finite.reshape(stats_shape),
        )


def _fractions(values: np.ndarray) -> list[Fraction]:
    return [Fraction(float(v)) for v in values]


def normalize_rows(
    x: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    eps: float,
    *,
    center: bool = True,
    variance: str = "biased",
    eps_placement: str = "inside",
    weight_offset: float = 0.0,
    fmt: str,
    stats_fmt: str | None = None,
) -> OracleResult:
    """Normalise each row of a 2-D array ``x`` (one group per row).

    ``weight``/``bias`` have the shape of ``x`` (already broadcast per element) or are None; the
    scale is weight_offset + weight, and 1 without a weight (no affine transform at all).
    """
    x = np.asarray(x, dtype=np.float64)
    rows = x.shape[0]
    out = np.full(x.shape, NAN)
    mean = np.full(rows, NAN)
    rstd = np.full(rows, NAN)
    finite = np.isfinite(x).all(axis=1)
    eps_q = Fraction(float(eps))
    offset = Fraction(float(weight_offset))
    conv = {
        "center": center,
        "unbiased": variance == "unbiased",
        "eps_outside": eps_placement == "outside",
    }
    for r in range(rows):
        if x.shape[1] == 0 or not finite[r]:
            continue
        xs = _fractions(x[r])
        ws = [offset + w for w in _fractions(weight[r])] if weight is not None else None
        bs = _fractions(bias[r]) if bias is not None else None
        out[r] = normalize_group(xs, ws, bs, eps_q, fmt=fmt, **conv)
        mean[r], rstd[r] = group_stats(xs, eps_q, fmt=stats_fmt or fmt, **conv)
    return OracleResult(out, mean, rstd, finite)


def _prod(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def layer_norm(
    x: np.ndarray, normalized_shape: Sequence[int], weight=None, bias=None, eps=1e-5, **conv
) -> OracleResult:
    """LayerNorm/RMSNorm (center=False) over the trailing ``normalized_shape`` dims.

    Stats come back shaped batch_shape + (1,) * k as in the API.
    """
    k = len(normalized_shape)
    batch_shape = x.shape[: x.ndim - k]
    n = _prod(normalized_shape)
    rows = x.reshape(_prod(batch_shape), n)

    def per_element(p):
        if p is None:
            return None
        return np.broadcast_to(np.asarray(p, np.float64).reshape(1, n), rows.shape)

    res = normalize_rows(rows, per_element(weight), per_element(bias), eps, **conv)
    return res.reshaped(x.shape, tuple(batch_shape) + (1,) * k)


def _channel_broadcast(p, shape: tuple[int, ...]) -> np.ndarray | None:
    """A per-channel (dim 1) parameter broadcast to an (N, C, *spatial) shape."""
    if p is None:
        return None
    per_channel = np.asarray(p, np.float64).reshape((1, shape[1]) + (1,) * (len(shape) - 2))
    return np.broadcast_to(per_channel, shape)


def _grouped(x: np.ndarray, weight, bias, eps, rows_shape, to_rows, **conv) -> OracleResult:
    """Normalise ``x`` whose groups are the rows of ``to_rows(x)`` (per-channel affine)."""
    w = _channel_broadcast(weight, x.shape)
    b = _channel_broadcast(bias, x.shape)
    return normalize_rows(
        to_rows(x).reshape(rows_shape),
        None if w is None else to_rows(w).reshape(rows_shape),
        None if b is None else to_rows(b).reshape(rows_shape),
        eps,
        **conv,
    )


def group_norm(
    x: np.ndarray, num_groups: int, weight=None, bias=None, eps=1e-5, **conv
) -> OracleResult:
    """GroupNorm over (N, C, *spatial); groups of C/G consecutive channels; stats (N, G)."""
    n_batch, channels = x.shape[0], x.shape[1]
    rows_shape = (n_batch * num_groups, channels // num_groups * _prod(x.shape[2:]))
    res = _grouped(x, weight, bias, eps, rows_shape, lambda a: a, **conv)
    return res.reshaped(x.shape, (n_batch, num_groups))


def _channels_first(a: np.ndarray) -> np.ndarray:
    return np.moveaxis(a, 1, 0)


def batch_norm_training(x: np.ndarray, weight=None, bias=None, eps=1e-5, **conv) -> OracleResult:
    """BatchNorm with batch statistics: one group per channel over N and the spatial dims."""
    rows_shape = (x.shape[1], x.size // x.shape[1] if x.shape[1] else 0)
    res = _grouped(x, weight, bias, eps, rows_shape, _channels_first, **conv)
    moved = (x.shape[1], x.shape[0], *x.shape[2:])
    out = np.moveaxis(res.output.reshape(moved), 0, 1)
    return OracleResult(out, res.mean, res.rstd, res.finite)


def instance_norm(x: np.ndarray, weight=None, bias=None, eps=1e-5, **conv) -> OracleResult:
    """InstanceNorm: one group per (n, c) over the spatial dims; stats (N, C)."""
    n_batch, channels = x.shape[0], x.shape[1]
    rows_shape = (n_batch * channels, _prod(x.shape[2:]))
    res = _grouped(x, weight, bias, eps, rows_shape, lambda a: a, **conv)
    return res.reshaped(x.shape, (n_batch, channels))


def batch_norm_eval(
    x: np.ndarray,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    eps=1e-5,
    *,
    eps_placement: str = "inside",
    weight_offset: float = 0.0,
    fmt: str,
) -> np.ndarray:
    """BatchNorm with given statistics: y = b + w (x - rm) / sqrt(rv + eps) (or sqrt(rv) + eps).

    Callers keep rv + eps > 0 (or sqrt(rv) + eps > 0): a zero denominator is outside the API.
    """
    out = np.full(x.shape, NAN)
    eps_q = Fraction(float(eps))
    offset = Fraction(float(weight_offset))
    for idx in np.ndindex(*x.shape):
        c = idx[1]
        rm, rv, xv = float(running_mean[c]), float(running_var[c]), float(x[idx])
        if not (math.isfinite(rm) and math.isfinite(rv) and math.isfinite(xv)):
            continue
        w = offset + (Fraction(float(weight[c])) if weight is not None else 1)
        b = Fraction(float(bias[c])) if bias is not None else Fraction(0)
        dev = Fraction(xv) - Fraction(rm)
        out[idx] = round_normalized(
            b, w * dev, Fraction(rv), eps_q, eps_placement == "outside", fmt
        )
    return out


def batch_statistics(x: np.ndarray, *, unbiased: bool) -> tuple[list[Fraction], list[Fraction]]:
    """Exact per-channel batch mean and variance (over N and the spatial dims)."""
    means, variances = [], []
    for row in _channels_first(x).reshape(x.shape[1], -1):
        mu, var = group_moments(_fractions(row), center=True, unbiased=unbiased)
        means.append(mu)
        variances.append(var if var is not None else Fraction(0))
    return means, variances


def running_stat_update(
    old: np.ndarray,
    stat: Sequence[Fraction],
    momentum: float | None,
    *,
    fmt: str,
    num_batches_tracked: int | None = None,
    momentum_weights: str = "new",
) -> np.ndarray:
    """new = (1 - m) old + m stat ("new") or m old + (1 - m) stat ("running"), rounded once.

    m is the exact binary64 value of ``momentum``, or 1/num_batches_tracked when it is None.
    """
    m = Fraction(float(momentum)) if momentum is not None else Fraction(1, num_batches_tracked)
    keep, take = (1 - m, m) if momentum_weights == "new" else (m, 1 - m)
    return np.array(
        [
            round_fraction(keep * Fraction(float(o)) + take * s, fmt)
            for o, s in zip(old, stat, strict=True)
        ],
        dtype=np.float64,
    )


def add_scaled(
    x: np.ndarray, y: np.ndarray, alpha_x: float, alpha_y: float, fmt: str
) -> np.ndarray:
    """alpha_x * x + alpha_y * y elementwise, exact, then rounded once into ``fmt``.

    Non-finite operands follow IEEE arithmetic (the sum is then Inf or NaN, exactness moot).
    """
    out = np.empty(x.shape, dtype=np.float64)
    for idx in np.ndindex(*x.shape):
        xv, yv = float(x[idx]), float(y[idx])
        if not (math.isfinite(xv) and math.isfinite(yv)):
            out[idx] = alpha_x * xv + alpha_y * yv
            continue
        q = Fraction(alpha_x) * Fraction(xv) + Fraction(alpha_y) * Fraction(yv)
        out[idx] = round_fraction(q, fmt)
    return out


def add_scaled_exact(
    x: np.ndarray, y: np.ndarray, alpha_x: float, alpha_y: float
) -> list[Fraction]:
    """alpha_x * x + alpha_y * y elementwise as exact rationals (flattened, C order)."""
    ax, ay = Fraction(float(alpha_x)), Fraction(float(alpha_y))
    return [
        ax * Fraction(float(a)) + ay * Fraction(float(b))
        for a, b in zip(x.ravel(), y.ravel(), strict=True)
    ]


def normalize_exact_rows(
    rows: Sequence[Sequence[Fraction]],
    weight: Sequence[Fraction] | None,
    bias: Sequence[Fraction] | None,
    eps: float,
    *,
    center: bool,
    variance: str = "biased",
    eps_placement: str = "inside",
    weight_offset: float = 0.0,
    fmt: str,
) -> np.ndarray:
    """Like ``normalize_rows`` for rows given as exact rationals (the add_rounding="exact" case).

    ``weight``/``bias`` are per element of a row (the normalised shape, flattened).
    """
    eps_q = Fraction(float(eps))
    offset = Fraction(float(weight_offset))
    ws = [offset + w for w in weight] if weight is not None else None
    out = [
        normalize_group(
            list(r),
            ws,
            bias,
            eps_q,
            center=center,
            unbiased=variance == "unbiased",
            eps_outside=eps_placement == "outside",
            fmt=fmt,
        )
        for r in rows
    ]
    return np.array(out, dtype=np.float64).reshape(len(rows), -1)
