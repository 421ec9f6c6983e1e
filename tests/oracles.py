"""An exact oracle for normalization layers, independent of ``references``.

Everything here is written from the mathematics, with Python integers and ``fractions.Fraction``
only; square roots are bracketed with ``math.isqrt`` on scaled integers. No float takes part in the
arithmetic: floats enter as their exact values (``Fraction(float(v))``) and leave as the correctly
rounded value of an exact quantity.

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

Normalisation of one group x_1..x_n (``normalize_group``):
    mu  = (1/n) sum x_i                    (0 when not centring: RMSNorm)
    var = sum (x_i - mu)**2 / (n or n - 1) (biased or unbiased)
    y_i = b_i + w_i (x_i - mu) / sqrt(var + eps)      (eps inside)
    y_i = b_i + w_i (x_i - mu) / (sqrt(var) + eps)    (eps outside)
A group with NaN or Inf is all NaN; n - 1 = 0 with the unbiased estimator is NaN; a zero
denominator (constant group, eps = 0) gives 0/0 = NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np

NAN = float("nan")
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


# ---------------------------------------------------------------------------------------------
# Carrying exact values in and out of the four dtypes, and comparing with the oracle.

FMT_NAMES = tuple(FORMATS)


def torch_dtype(fmt: str):
    import torch

    return getattr(torch, fmt)


def numpy_dtype(fmt: str):
    if fmt == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(fmt)


def as_backend(values: np.ndarray | None, fmt: str, backend: str):
    """float64 values exactly representable in ``fmt`` -> a torch tensor or numpy array of fmt."""
    if values is None:
        return None
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        back = values.astype(numpy_dtype(fmt)).astype(np.float64)
    if not np.array_equal(back, values, equal_nan=True):
        raise ValueError(f"test input not exactly representable in {fmt}: {values!r}")
    if backend == "torch":
        import torch

        return torch.tensor(values, dtype=torch.float64).to(torch_dtype(fmt))
    return values.astype(numpy_dtype(fmt))


def to_float64(arr) -> np.ndarray:
    """The exact values of a torch tensor or numpy array of any of the four dtypes."""
    if hasattr(arr, "detach"):
        import torch

        return arr.detach().to(torch.float64).cpu().numpy()
    return np.asarray(arr).astype(np.float64)


def fmt_of(arr) -> str:
    """The format name of a torch tensor's or numpy array's dtype."""
    if hasattr(arr, "detach"):
        return str(arr.dtype).removeprefix("torch.")
    return np.asarray(arr).dtype.name


def ulp_of(value: float, fmt: str) -> float:
    """The spacing of ``fmt`` at ``value`` (the quantum of the binade, subnormals included)."""
    spec = FORMATS[fmt]
    exponent = spec.emin if value == 0 else max(_floor_log2(Fraction(abs(value))), spec.emin)
    return math.ldexp(1.0, exponent - spec.precision + 1)


def assert_matches_oracle(
    actual, expected: np.ndarray, *, fmt: str, backend: str, what: str, context: str = ""
) -> None:
    """``actual``: a ``backend`` array of dtype ``fmt``, equal element for element to ``expected``.

    NaN must meet NaN; zeros compare equal whatever their sign (an exact zero has no sign).
    """
    __tracebackhide__ = True
    kind = "torch.Tensor" if backend == "torch" else "numpy.ndarray"
    if (backend == "torch") != hasattr(actual, "detach") or not hasattr(actual, "shape"):
        raise AssertionError(f"{what}: expected a {kind}, got {type(actual).__name__}\n{context}")
    if fmt_of(actual) != fmt:
        raise AssertionError(f"{what}: dtype {fmt_of(actual)}, expected {fmt}\n{context}")
    got = to_float64(actual)
    expected = np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        raise AssertionError(f"{what}: shape {got.shape}, expected {expected.shape}\n{context}")
    both_nan = np.isnan(got) & np.isnan(expected)
    with np.errstate(invalid="ignore"):
        bad = ~((got == expected) | both_nan)
    if not bad.any():
        return
    ulps = np.zeros(got.shape)
    for idx in zip(*np.nonzero(bad), strict=True):
        g, e = got[idx], expected[idx]
        ulps[idx] = (
            math.inf if not (np.isfinite(g) and np.isfinite(e)) else (abs(g - e) / ulp_of(e, fmt))
        )
    worst = tuple(int(i) for i in np.unravel_index(np.argmax(ulps), ulps.shape))
    count = int(bad.sum())
    raise AssertionError(
        f"{what}: not the correctly rounded result\n"
        f"Mismatched elements: {count} / {bad.size} ({100 * count / bad.size:.3g}%)\n"
        f"Worst element at index {worst}: {ulps[worst]:.3g} ulp of {fmt}\n"
        f" ACTUAL:  {got[worst]!r} ({float(got[worst]).hex()})\n"
        f" DESIRED: {expected[worst]!r} ({float(expected[worst]).hex()})\n{context}"
    )
