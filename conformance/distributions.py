"""Input distributions: the classes of inputs that hurt normalization kernels.

Values are drawn on the ``(rows, n)`` matrix whose rows are the norm's reduction groups (see
:mod:`conformance.geometry`), so a distribution's promise about a row — its mean, its spread,
where its non-finite values sit — is a promise about each reduction group. Every value is
returned as float64 and is exactly representable in the target dtype (rounded once, to nearest
even, by :func:`references.formats.round_array`).

The condition number of a row ``x`` of length ``n`` with ``ε`` added to the variance ``v`` is

    κ(x, ε) = rms(x) / √(v + ε),   rms(x)² = Σ xᵢ² / n,   v = Σ (xᵢ - μ)² / n,

the factor by which rounding errors of size ``u·rms(x)²`` in a variance computed as
``E[x²] - E[x]²`` are amplified relative to the true ``v + ε``. The ``large_mean_*`` classes
aim at a κ: a row ``μ + s·z`` with ``z`` standardized (mean 0, spread 1) has
``κ = √(μ² + s²)/s ≈ |μ|/s`` while ``s² ≫ ε``. The spread has to stay resolvable in the dtype:
at ``|μ|/s = κ`` it spans ``s/ulp(μ) ≥ 2^(p-1)/κ`` ulps of the mean for a ``p``-bit
significand, so κ is capped at ``2^(p-3)`` (at least 4 ulps of spread) and a larger target is
clamped to the cap (float16: 256, bfloat16: 32, float32: 2^21, float64: 2^50).

Every draw is a deterministic function of the generator's state; ``draw`` for n == 1 returns
valid (trivially constant) rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from references.formats import Format, format_of, round_array

Array = npt.NDArray[np.float64]

DISTRIBUTIONS = (
    "normal",
    "uniform",
    "large_mean_k1e1",
    "large_mean_k1e3",
    "large_mean_k1e5",
    "large_mean_kmax",
    "constant",
    "near_eps",
    "overflow_squares",
    "subnormal",
    "nonfinite",
)

#: Every class of :data:`DISTRIBUTIONS`, with two of the four large-mean targets.
QUICK_DISTRIBUTIONS = (
    "normal",
    "uniform",
    "large_mean_k1e3",
    "large_mean_kmax",
    "constant",
    "near_eps",
    "overflow_squares",
    "subnormal",
    "nonfinite",
)

#: Nominal κ per large-mean class, before clamping to :func:`kappa_cap`.
KAPPA_TARGETS: dict[str, float] = {
    "large_mean_k1e1": 1e1,
    "large_mean_k1e3": 1e3,
    "large_mean_k1e5": 1e5,
    "large_mean_kmax": math.inf,
}

#: ``near_eps`` promises v / ε (v the variance) inside this range; draws use 10**±0.9 to keep
#: a margin for rounding the values into the dtype.
NEAR_EPS_FACTOR = (0.1, 10.0)
_NEAR_EPS_LOG10 = 0.9

#: ε that ``near_eps`` aims at when the case's ε is 0 (there is nothing to be near): float32's
#: machine epsilon, PyTorch's default for ``rms_norm(eps=None)`` below float64.
NEAR_EPS_FALLBACK = 2.0**-23

#: Magnitudes of ``overflow_squares``: 256² = 65536 already exceeds float16's largest finite
#: value 65504, and 30000 keeps every value (rounded to bfloat16's grid) below it.
OVERFLOW_SQUARES_RANGE = (256.0, 30000.0)

#: Row kinds of ``nonfinite``, cycled over the rows in this order (see :func:`nonfinite_kinds`).
NONFINITE_ROW_KINDS = ("nan", "+inf", "-inf", "+-inf", "clean")

_DESCRIPTIONS = {
    "normal": "normal values, per-row offset N(0, 1) and scale 2^U(-1, 1)",
    "uniform": "uniform values, per-row centre U(-2, 2) and half-width 2^U(-2, 2)",
    "large_mean_k1e1": "large mean, small spread: kappa = rms/sqrt(var + eps) ~ 1e1",
    "large_mean_k1e3": "large mean, small spread: kappa ~ 1e3 (clamped to 2^(p-3))",
    "large_mean_k1e5": "large mean, small spread: kappa ~ 1e5 (clamped to 2^(p-3))",
    "large_mean_kmax": "large mean, small spread: kappa at the dtype's cap 2^(p-3)",
    "constant": "constant rows: 0, 1, a large value, a negative value, then random constants",
    "near_eps": "variance within a factor 0.1-10 of eps (eps matters), mean within one spread",
    "overflow_squares": "magnitudes 256..30000: squares overflow float16 (65504), values do not",
    "subnormal": "values in the dtype's subnormal range, odd rows mixed with zeros",
    "nonfinite": "normal rows with NaN, +inf, -inf, both infinities injected, and clean rows",
}


@dataclass(frozen=True)
class _Request:
    rows: int
    n: int
    fmt: Format
    rng: np.random.Generator
    eps: float


def kappa_cap(dtype: object) -> float:
    """The largest κ a ``large_mean`` row aims at in ``dtype``: ``2^(p-3)`` (≥ 4 ulps of spread)."""
    return 2.0 ** (format_of(dtype).precision - 3)


def target_kappa(name: str, dtype: object) -> float:
    """The κ that the large-mean class ``name`` aims at in ``dtype`` (its target, clamped)."""
    if name not in KAPPA_TARGETS:
        raise ValueError(f"{name!r} is not a large-mean distribution: {sorted(KAPPA_TARGETS)}")
    return min(KAPPA_TARGETS[name], kappa_cap(dtype))


def describe(name: str) -> str:
    """One line that says what the distribution ``name`` draws (for reports)."""
    _check_name(name)
    return _DESCRIPTIONS[name]


def draw(
    name: str, rows: int, n: int, dtype: object, rng: np.random.Generator, *, eps: float
) -> Array:
    """A ``(rows, n)`` float64 matrix of distribution ``name``, every value exact in ``dtype``.

    ``eps`` is the ε of the norm the values are for: ``large_mean_*`` keeps the variance
    v ≥ 100·ε so that κ reaches its target, ``near_eps`` sets v near ``ε``. Values other than
    those of ``nonfinite`` are finite. Deterministic given the state of ``rng``.
    """
    _check_name(name)
    if rows < 0 or n < 0:
        raise ValueError(f"need rows >= 0 and n >= 0, got rows={rows}, n={n}")
    if not rows * n:
        return np.zeros((rows, n))  # an empty batch: BatchNorm's groups of no element
    request = _Request(int(rows), int(n), format_of(dtype), rng, float(eps))
    values = _GENERATORS[name](request)
    exact = round_array(values, request.fmt)
    if name != "nonfinite" and not np.isfinite(exact).all():
        raise AssertionError(f"{name} drew values that do not fit in {request.fmt.name}")
    return exact


def draw_affine(
    kind: str, params: int | tuple[int, ...], dtype: object, rng: np.random.Generator
) -> Array:
    """Affine parameters of shape ``params``, exact in ``dtype``.

    ``"weight"``: magnitudes 2^U(-1, 1) (so within [0.5, 2], never 0) with about one sign in
    eight negative; both signs are present whenever there are at least two parameters.
    ``"bias"``: N(0, 0.5²), centred on 0.
    """
    fmt = format_of(dtype)
    shape = (params,) if isinstance(params, int) else tuple(params)
    size = math.prod(shape)
    if kind == "bias":
        return round_array(rng.normal(0.0, 0.5, size).reshape(shape), fmt)
    if kind != "weight":
        raise ValueError(f"unknown affine kind {kind!r}: 'weight' or 'bias'")
    magnitude = 2.0 ** rng.uniform(-1.0, 1.0, size)
    negative = rng.random(size) < 0.125
    if size >= 2:
        # Force one of each sign at two distinct positions so a sign-dropping kernel shows.
        first = int(rng.integers(size))
        second = (first + 1 + int(rng.integers(size - 1))) % size
        negative[first], negative[second] = True, False
    weight = np.where(negative, -magnitude, magnitude)
    return round_array(weight.reshape(shape), fmt)


def draw_grad(shape: tuple[int, ...], dtype: object, rng: np.random.Generator) -> Array:
    """An upstream gradient of ``shape``: N(0, 1) values exact in ``dtype``, never all zero."""
    grad = round_array(rng.normal(0.0, 1.0, shape), format_of(dtype))
    if grad.size and not grad.any():
        grad.reshape(-1)[0] = 1.0
    return grad


def kappa(rows: npt.ArrayLike, eps: float, *, center: bool = True) -> Array:
    """Per-row κ = rms(x)/√(v + ε), v the biased variance, of a ``(rows, n)`` matrix.

    A 1-D array is one row. Two-pass float64 statistics on rows scaled by a power of two,
    which is exact and leaves κ unchanged when ε is scaled by its square
    (``κ(2ᵏx, 4ᵏε) = κ(x, ε)``), so that squares of tiny or huge rows neither underflow nor
    overflow. ``center=False`` is the RMSNorm case:
    the second moment about 0 replaces the variance, so κ ≤ 1. A row whose ``v + ε`` is 0 has
    κ = inf; a row with a non-finite value has κ = NaN.
    """
    x = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore", under="ignore"):
        peak = np.max(np.abs(x), axis=1)
        usable = np.isfinite(peak) & (peak > 0)
        exponent = np.frexp(np.where(usable, peak, 1.0))[1]
        y = np.ldexp(x, -exponent[:, None])
        scaled_eps = np.ldexp(np.full(x.shape[0], float(eps)), -2 * exponent)
        second = np.mean(y * y, axis=1)
        if center:
            deviation = y - np.mean(y, axis=1, keepdims=True)
            spread = np.mean(deviation * deviation, axis=1)
        else:
            spread = second
        denominator = np.sqrt(spread + scaled_eps)
        result = np.sqrt(second) / denominator
        result = np.where(denominator == 0, np.inf, result)
        return np.where(np.isfinite(x).all(axis=1), result, np.nan)


def nonfinite_kinds(rows: int, n: int) -> tuple[str, ...]:
    """The kind of each row of a ``nonfinite`` draw: :data:`NONFINITE_ROW_KINDS` cycled.

    A ``"+-inf"`` row needs two elements; for ``n == 1`` it holds ``+inf`` only (``"+inf"``).
    """
    kinds = tuple(NONFINITE_ROW_KINDS[i % len(NONFINITE_ROW_KINDS)] for i in range(rows))
    return tuple("+inf" if k == "+-inf" and n == 1 else k for k in kinds)


def _check_name(name: str) -> None:
    if name not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {name!r}; known: {', '.join(DISTRIBUTIONS)}")


def _standardized(r: _Request) -> Array:
    """Normal deviates with each row shifted and scaled to mean 0 and biased spread 1 exactly
    (up to float64 rounding), so a row's spread is the one asked for at any ``n``."""
    z = r.rng.normal(0.0, 1.0, (r.rows, r.n))
    if r.n < 2:
        return np.zeros_like(z)
    z -= z.mean(axis=1, keepdims=True)
    spread = np.sqrt(np.mean(z * z, axis=1, keepdims=True))
    return np.asarray(z / np.where(spread > 0, spread, 1.0), dtype=np.float64)


def _signs(r: _Request, shape: tuple[int, ...]) -> Array:
    return np.where(r.rng.random(shape) < 0.5, -1.0, 1.0)


def _normal(r: _Request) -> Array:
    offset = r.rng.normal(0.0, 1.0, (r.rows, 1))
    scale = 2.0 ** r.rng.uniform(-1.0, 1.0, (r.rows, 1))
    return np.asarray(offset + scale * r.rng.normal(0.0, 1.0, (r.rows, r.n)), dtype=np.float64)


def _uniform(r: _Request) -> Array:
    centre = r.rng.uniform(-2.0, 2.0, (r.rows, 1))
    half = 2.0 ** r.rng.uniform(-2.0, 2.0, (r.rows, 1))
    return np.asarray(centre + half * r.rng.uniform(-1.0, 1.0, (r.rows, r.n)), dtype=np.float64)


def _large_mean(r: _Request, target: float) -> Array:
    """Rows μ + (|μ|/κ)·z. |μ| is log-uniform over 6 binades starting where s² ≥ 100·ε (and
    at least 1/4), ending 3 binades below the dtype's overflow; a huge ε pins |μ| to that top
    and κ then falls short of its target."""
    k = min(target, 2.0 ** (r.fmt.precision - 3))
    top = math.log2(r.fmt.max_finite) - 3
    low = math.log2(10.0 * k * math.sqrt(r.eps)) if r.eps > 0 else -2.0
    low = min(max(low, -2.0), top)
    high = min(low + 6.0, top)
    magnitude = 2.0 ** r.rng.uniform(low, high, (r.rows, 1))
    mean = _signs(r, (r.rows, 1)) * magnitude
    return np.asarray(mean + (magnitude / k) * _standardized(r), dtype=np.float64)


def _constant(r: _Request) -> Array:
    """Row i < 4 is 0, 1, a large value (squares overflow float16), -2.5; later rows are
    random constants ±2^U(-4, 8)."""
    large = 12288.0 if r.fmt.max_finite < 1e5 else 786432.0  # 3·2^12, 3·2^18: exact everywhere
    special = np.array([0.0, 1.0, large, -2.5])
    value = _signs(r, (r.rows,)) * 2.0 ** r.rng.uniform(-4.0, 8.0, r.rows)
    count = min(r.rows, special.size)
    value[:count] = special[:count]
    return np.repeat(value[:, None], r.n, axis=1)


def _near_eps(r: _Request) -> Array:
    """Rows m + s·z with s² = ε·10^U(-0.9, 0.9) and m = s·U(-1, 1), so that both the variance
    and the mean square are within a small factor of ε (ε matters for LayerNorm and RMSNorm).
    s is kept between 4 subnormal steps and max/64 of the dtype."""
    eps = r.eps if r.eps > 0 else NEAR_EPS_FALLBACK
    ratio = 10.0 ** r.rng.uniform(-_NEAR_EPS_LOG10, _NEAR_EPS_LOG10, (r.rows, 1))
    tiny = 2.0 ** (r.fmt.emin - r.fmt.precision + 3)
    sigma = np.clip(np.sqrt(eps * ratio), tiny, r.fmt.max_finite / 64)
    mean = sigma * r.rng.uniform(-1.0, 1.0, (r.rows, 1))
    return np.asarray(mean + sigma * _standardized(r), dtype=np.float64)


def _overflow_squares(r: _Request) -> Array:
    """Log-uniform magnitudes in :data:`OVERFLOW_SQUARES_RANGE` on bfloat16's grid (the
    coarsest; its values there are float16 values too), drawn the same way for every dtype.
    Row modes cycle: all positive, all negative, random signs."""
    low, high = np.log(OVERFLOW_SQUARES_RANGE)
    magnitude = np.exp(r.rng.uniform(low, high, (r.rows, r.n)))
    magnitude = round_array(magnitude, format_of("bfloat16"))
    mode = np.arange(r.rows)[:, None] % 3
    random_signs = _signs(r, (r.rows, r.n))
    sign = np.where(mode == 0, 1.0, np.where(mode == 1, -1.0, random_signs))
    return np.asarray(sign * magnitude, dtype=np.float64)


def _subnormal(r: _Request) -> Array:
    """Multiples k·2^(emin-p+1) with 1 ≤ k < 2^(p-1) (log-uniform k, random signs): the
    dtype's subnormals. Odd rows are mixed with zeros: about half their elements, with one
    zero and one subnormal guaranteed when n ≥ 2. Independent of ε: such rows have a
    variance far below any ε the dtype can express."""
    p, quantum = r.fmt.precision, r.fmt.emin - r.fmt.precision + 1
    steps = np.floor(2.0 ** r.rng.uniform(0.0, p - 1, (r.rows, r.n)))
    steps = np.clip(steps, 1.0, 2.0 ** (p - 1) - 1)
    values = _signs(r, (r.rows, r.n)) * np.ldexp(steps, quantum)
    zero = r.rng.random((r.rows, r.n)) < 0.5
    keep = r.rng.integers(0, r.n, r.rows)
    index = np.arange(r.rows)
    if r.n >= 2:
        zero[index, (keep + 1 + r.rng.integers(0, r.n - 1, r.rows)) % r.n] = True
    zero[index, keep] = False
    zero[index % 2 == 0] = False
    return np.asarray(np.where(zero, 0.0, values), dtype=np.float64)


def _nonfinite(r: _Request) -> Array:
    """``normal`` rows with NaN/±inf injected at random positions per :func:`nonfinite_kinds`."""
    values = round_array(_normal(r), r.fmt)
    first = r.rng.integers(0, r.n, r.rows)
    second = (first + 1 + r.rng.integers(0, max(r.n - 1, 1), r.rows)) % r.n
    injected: dict[str, tuple[float, float | None]] = {
        "nan": (math.nan, None),
        "+inf": (math.inf, None),
        "-inf": (-math.inf, None),
        "+-inf": (math.inf, -math.inf),
    }
    for row, kind in enumerate(nonfinite_kinds(r.rows, r.n)):
        if kind == "clean":
            continue
        value, other = injected[kind]
        values[row, first[row]] = value
        if other is not None:
            values[row, second[row]] = other
    return values


def _large_mean_generator(name: str) -> Callable[[_Request], Array]:
    target = KAPPA_TARGETS[name]
    return lambda r: _large_mean(r, target)


_GENERATORS: dict[str, Callable[[_Request], Array]] = {
    "normal": _normal,
    "uniform": _uniform,
    **{name: _large_mean_generator(name) for name in KAPPA_TARGETS},
    "constant": _constant,
    "near_eps": _near_eps,
    "overflow_squares": _overflow_squares,
    "subnormal": _subnormal,
    "nonfinite": _nonfinite,
}
