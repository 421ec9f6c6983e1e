r"""The tolerance model: how far a correct kernel may land from the correctly rounded result.

Every bound is absolute, per element, and a function of the data: the output dtype's ulp, the
accumulation precision ``u``, the row's condition number ``κ = rms(x) / s`` with
``s = sqrt(v + ε)`` (or ``√v + ε``), the element's normalized value ``x̂ = (x - μ) / s``, the
affine parameters and the reduction length. Every constant is in :data:`CONSTANTS` with its
reason; the formulas themselves hold no other number but 0, 1 and 2 (a test checks it).

Derivation (first-order rounding-error analysis; a rounding contributes at most ``u`` relative)
---------------------------------------------------------------------------------------------

Rows are the reduction groups of :mod:`conformance.geometry`. A reduction of depth ``k`` (the
longest chain of roundings one summand goes through) errs by at most ``k·u·Σ|x|``. Pairwise and
Welford-with-tree-merge reductions have ``k ≈ log2 n``; the constants absorb ``k = 16``
(``tree_depth``: trees up to ``n = 2**16``, or trees over short per-thread runs) and
:func:`reduction_factor` scales beyond. A sequential (left-to-right) reduction has ``k = n - 1``
and its error really is linear in ``n``, not ``√n``: summing a row of large mean and small
spread, the partial sum's ulp outgrows the spread and the rounding errors stop being random
(stagnation). Measured on fp32 sums of 32768 elements: up to ``0.25·n·u·rms``, 45x the ``√n``
estimate. So ``k = n - 1``.

1. *Mean.* ``|μ̂ - μ| ≤ (k + 1)·u·mean|x| ≤ (k + 1)·u·rms(x)`` (the sum, the division:
   ``mean`` = 1). In units of ``s`` it shifts every ``x̂`` of the row by ``e_μ = (k + 1)·u·κ``,
   whatever ``x̂``: the inherent error of a mean is ``u·rms(x)``, and normalizing divides by ``s``.
2. *Variance.* About the computed mean, ``Σ(x - μ̂)² = Σ(x - μ)² + n·δμ²`` exactly. Roundings:
   the deviation (squared: 2), the square, the division, adding ``ε``, ``ε`` itself
   (``variance`` = 6) plus the sum's ``k``: ``v + ε`` errs by ``(k + 6)·u`` relative, and the
   shifted mean adds ``e_μ²`` (second order).
3. *Running means.* Welford and Chan et al.'s merges square deviations from running means, each
   off by up to ``k·u·rms(x)``: ``M2`` errs by up to ``2k·u·κ`` relative, the scale ``1/s`` by
   ``k·u·κ`` (``welford`` = 1). First order in ``κ``, so the model needs it: measured, Welford's
   ``rstd`` errs by up to ``0.5·u·κ``, two-pass ``rstd`` by at most ``15·u`` up to ``κ = 1e4``.
   ``E[x²] - E[x]²`` errs by ``(k + 2)·u·rms²`` absolute, ``≈ u·κ²`` relative, which overtakes
   ``k·u·κ`` once ``κ`` passes a few tens: the bug the model must catch.
4. *Scale.* ``1/s`` takes half the variance's relative error; the root and reciprocal (or an
   ``rsqrt`` within 2 ulps), the product ``d·rstd`` and the deviation's own rounding add
   ``normalize`` = 6. A mean off by ``δμ`` enlarges the standard deviation ``sd`` by at most
   ``min(δμ, δμ²/(2·sd))``: ``min(e_μ, e_μ²/2)`` relative to ``s`` (ε inside the root),
   ``min(e_μ, e_μ²·s/(2·sd))`` (ε outside). So ``|x̂' - x̂| ≤ e_μ + e_s·|x̂|`` with
   ``e_s = u·((k + 6)/2 + 6) + k·u·κ + min(e_μ, e_μ²/2)``. RMS norms: ``e_μ = 0``, no step 3.
5. *Affine.* ``y = w·x̂ + β``: ``|w|·(e_μ + e_s·|x̂|)`` plus ``affine`` = 3 roundings of
   ``|w·x̂| + |β|`` (``weight_offset + w``, the product, the sum).
6. *Rounding.* The kernel rounds ``ŷ`` (``|ŷ - y| ≤ E``), the reference rounds ``y``: so
   ``|a - r| ≤ E + ulp(|r| + E)`` (``rounding`` = 1 ulp: half for each). Faithful never fails.

7. *Underflow.* A rounding whose result is subnormal errs by up to ``q/2`` absolute, ``q`` the
   accumulation format's smallest subnormal (the ``η`` of the standard model with underflow):
   the mean of a subnormal row is off by ``(k + 1)·q`` whatever its size, ``e_μ`` gains
   ``(k + 1)·q/s``, and ``x̂``, the affine step and the gradients gain ``underflow·q`` absolute
   (``dw_j``: ``(k_j + 1)·q`` per element summed).

Forward: ``bound = ulp(|r| + E) + E``, ``E = |w|·(e_μ + e_s·|x̂|) + 3u·(|w·x̂| + |β|)``. At
``k = 16`` and ``κ ≥ 1``, ``E ≈ 17·u·κ·|w|·(1 + |x̂|)``: the published form ``½ulp(y) +
c·u·κ·(1 + |x̂|)·|w| + 2u·(|w·x̂| + |β|)`` with ``c = 17`` (worst case at depth 16) for
``c = 4..8``, and three corrections: a whole ulp for rounding (against a *rounded* reference,
½ ulp fails faithful results); ``κ·|x̂|`` is needed only for running-mean kernels (two-pass has
none), and at their measured ``0.5·u·κ`` the worst case is 30x loose; the second-order
``min(e_μ, e_μ²/2)`` dominates near the fp32 limit ``κ ≈ 2**22``, where no fp32 kernel knows
``x̂`` to better than ``O(1)``. 3u instead of 2u covers a rounded ``1 + w``.

Other outputs, same analysis (``g = dy·w``, ``a = mean(g)``, ``b = Σ g·x̂ / N`` with ``N`` the
variance divisor, ``c = s/sd`` for ε outside, else 1; ``E_x̂ = e_μ + e_s·|x̂|``):

* ``dx = (g - a - c·x̂·b) / s`` (RMS: no ``a``). ``a`` errs by ``(k + 2)·u·mean|g|``
  (``backward_mean``), ``b`` by ``c·(Σ|g|·E_x̂ + (k + 3)·u·Σ|g·x̂|) / N``
  (``backward_projection``); then ``|x̂|·δb + c·|b|·E_x̂ + u|g| + 3u·(|g - a| + c·|x̂·b|)``,
  divided by ``s``, plus ``e_s`` relative.
* ``dw_j = Σ dy·x̂`` over the ``m_j`` elements of parameter ``j``: ``Σ|dy|·E_x̂ +
  (k_j + 1)·u·Σ|dy·x̂|``; ``db_j = Σ dy``: ``k_j·u·Σ|dy|``; ``k_j`` the depth of ``m_j``.
* returned mean ``e_μ·s``; returned ``rstd`` ``e_s·rstd``; ``z = x + alpha·r``:
  ``3u·(|x| + |alpha·r|)``.
* running statistics ``(1 - m)·old + m·stat``: ``m·δstat + 3u·(|(1 - m)·old| + |m·stat|)``,
  ``δmean = e_μ·s``, ``δvar = (k + 6)·u·v + 2k·u·rms·sd + (e_μ·s)²`` (times ``n/(n - 1)``, plus
  a rounding, for the unbiased estimate).

Calibration (``tests/test_tolerance.py`` with ``tests/model_kernels.py``): LayerNorm, weight
``1 + N(0, 1)/2``, bias ``N(0, 1)/2``, ``ε = 1e-5``; rows ``√(κ² - 1) + N(0, 1)``, 8 to 64 per
cell, ``n`` in {1, 7, 127, 768, 4096, 8192}; NumPy float32 kernels graded against
``references.layer_norm`` with ``u = 2**-24`` (``reduction="sequential"`` for the sequential
kernel, else ``"tree"``). Max ``error / bound`` over all ``n``, fp32 in and out:

    ==============  =====  =====  =====  ======  ======  ======  =======
    kernel          κ=1    κ=10   κ=100  κ=1e3   κ=1e4   κ=1e5   κ=2**22
    ==============  =====  =====  =====  ======  ======  ======  =======
    two_pass        0.30   0.23   0.12   0.076   0.15    0.13    0.064
    welford         0.29   0.23   0.14   0.064   0.13    0.10    0.074
    naive_moments   0.30   1.2    22     3.1e4   3.5e4   3.7e3   71
    float64_once    0      0      0      0       1.4e-9  1.8e-7  4.0e-8
    sequential      0.22   0.11   0.096  0.094   0.14    0.098   0.088
    ==============  =====  =====  =====  ======  ======  ======  =======

fp16 and bf16 inputs (fp32 kernels, one rounding into the input dtype): correct kernels reach
0.999 — an element one ulp off where the fp32 error is a sliver of an ulp (step 6) — and none
fails with the unit roundoff halved (``calibration_margin``); E[x²]-E[x]² reaches 3.9 (fp16)
and 3.2 (bf16) at ``κ = 100``, 44 at ``κ = 1000`` (fp16). Backward (fp32, ``n ≤ 4096``,
``κ`` in {1, 100, 1e4}): two-pass ``dx`` 0.17, ``dw`` 0.05; ``dx`` without ``x̂·mean(g·x̂)``
1.8 at ``κ = 1e4``, ``n = 4096`` (the bound grows with ``κ``), 8000 to 3e5 at ``κ = 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

import numpy as np

from conformance.metrics import ulp
from references.formats import FORMATS

#: Every constant of the model: name -> (value, reason). Roundings are counted in units of
#: the accumulation dtype's unit roundoff u.
CONSTANTS: Final = MappingProxyType(
    {
        "tree_depth": (
            16.0,
            "reduction depth absorbed in the constants: pairwise/Welford-tree reductions of up "
            "to 2**16 elements; longer reductions scale by reduction_factor",
        ),
        "mean": (1.0, "roundings of the mean beyond the sum's depth: the division by n"),
        "variance": (
            6.0,
            "roundings of sigma^2 + eps beyond the sum's depth: the deviation (2, squared), the "
            "square, the division, adding eps, eps itself in the accumulation dtype",
        ),
        "normalize": (
            6.0,
            "roundings from sigma^2 + eps to x_hat: an rsqrt within 2 ulps (or sqrt and "
            "reciprocal; 4), the product d*rstd, the deviation's own rounding",
        ),
        "welford": (
            1.0,
            "relative error of 1/s per unit of depth and of kappa from squaring deviations "
            "about running means (Welford, Chan et al.'s merge); measured <= 0.5 u kappa",
        ),
        "affine": (
            3.0,
            "roundings of p*q + t with p rounded to the accumulation dtype: weight_offset + w "
            "(or alpha, or the momentum), the product, the sum",
        ),
        "backward_mean": (2.0, "roundings of mean(g) beyond the sum's depth: g = dy*w, division"),
        "backward_projection": (
            3.0,
            "roundings of sum(g*x_hat)/N beyond the sum's depth: g = dy*w, g*x_hat, division",
        ),
        "rounding": (
            1.0,
            "ulps of the output dtype for rounding: 1/2 for the kernel's final rounding and 1/2 "
            "for the reference's (a faithful result is never a failure)",
        ),
        "underflow": (
            2.0,
            "absolute rounding errors, in units of the accumulation dtype's smallest subnormal "
            "q: a rounding into the subnormal range errs by up to q/2 whatever the value (the "
            "eta of the standard model with underflow), and a step takes at most 4 of them",
        ),
        "calibration_margin": (
            0.5,
            "correct kernels must pass with the error-analysis part of every bound scaled by "
            "this; the rounding ulp is exact bookkeeping and is not scaled",
        ),
    }
)

REDUCTIONS = ("tree", "sequential")


def constant(name: str) -> float:
    """The value of the model constant ``name`` (see :data:`CONSTANTS`)."""
    return CONSTANTS[name][0]


def unit_roundoff(dtype: str) -> float:
    """``2**-p`` for a dtype of ``p`` significand bits: float64, float32, float16, bfloat16."""
    if dtype not in FORMATS:
        raise ValueError(f"unsupported dtype {dtype!r}: expected one of {sorted(FORMATS)}")
    return math.ldexp(1.0, -FORMATS[dtype].precision)


def accumulation_unit(dtype: str, accumulation: str | None = None) -> float:
    """Unit roundoff of the accumulation: ``accumulation`` when given, else float32 for half
    types (as every mainstream kernel does) and the input dtype itself otherwise."""
    if accumulation is None:
        accumulation = "float32" if dtype in ("float16", "bfloat16") else dtype
    return unit_roundoff(accumulation)


def underflow_quantum(acc_unit: float) -> float:
    """The smallest subnormal of the accumulation format: the supported format whose unit
    roundoff is nearest ``acc_unit`` (the calibration scales ``u``, not the format)."""
    exponent = math.log2(acc_unit)
    fmt = min(FORMATS.values(), key=lambda f: abs(exponent + f.precision))
    return math.ldexp(1.0, fmt.emin - fmt.precision + 1)


# -- row statistics ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowStats:
    """Exact-enough (float64) statistics of each row of a ``(groups, n)`` matrix.

    ``s = sqrt(var + eps)`` (or ``sqrt(var) + eps``); ``rms = sqrt(mean(x**2))`` about 0, also
    for centred norms; ``kappa = rms / s``; ``x_hat = (x - mean) / s``.
    Rows with non-finite values are NaN.
    """

    mean: np.ndarray
    var: np.ndarray
    s: np.ndarray
    rms: np.ndarray
    kappa: np.ndarray
    x_hat: np.ndarray
    center: bool
    unbiased: bool
    eps_outside: bool

    @property
    def n(self) -> int:
        return int(self.x_hat.shape[1])


def _pow2_scale(a: np.ndarray) -> np.ndarray:
    """A power of two near each row's max |a| (1 for zero rows), so squares cannot overflow."""
    top = np.max(np.abs(a), axis=1, initial=0.0)
    exponent = np.frexp(np.where(np.isfinite(top) & (top > 0), top, 1.0))[1]
    return np.ldexp(1.0, exponent)


def row_statistics(
    x_rows: np.ndarray, eps: float, *, center: bool, unbiased: bool, eps_outside: bool
) -> RowStats:
    """Two-pass float64 statistics per row: ``x_hat`` to about ``2**-52·κ``, far inside any
    tolerance of a narrower dtype. Scaled by a power of two per row, so nothing overflows."""
    x = np.asarray(x_rows, dtype=np.float64)
    groups, n = x.shape
    scale = _pow2_scale(x)
    xs = x / scale[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = xs.mean(axis=1) if center and n else np.zeros(groups)
        d = xs - mean[:, None]
        var = np.einsum("ij,ij->i", d, d) / (n - 1 if unbiased else n)
        rms = np.sqrt(np.einsum("ij,ij->i", xs, xs) / n)
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        # Back to true magnitudes before eps is added: eps / scale**2 overflows for tiny rows.
        # A variance past float64's range is infinite; a subnormal row's underflows to 0.
        big = scale >= 1
        inside = np.where(
            big, np.sqrt(var + eps / scale / scale) * scale, np.sqrt(var * scale * scale + eps)
        )
        s = np.sqrt(var) * scale + eps if eps_outside else inside
        mean, var, rms = mean * scale, var * scale * scale, rms * scale
        x_hat = np.where(big[:, None], d / (s / scale)[:, None], d * scale[:, None] / s[:, None])
        kappa = rms / s
    bad = ~np.isfinite(x).all(axis=1)
    for a in (mean, var, s, rms, kappa, x_hat):
        a[bad] = np.nan
    return RowStats(mean, var, s, rms, kappa, x_hat, center, unbiased, eps_outside)


def fixed_statistics(
    x_rows: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
    *,
    eps_outside: bool = False,
) -> RowStats:
    """Statistics given per row (BatchNorm in evaluation: running mean and variance).

    Nothing is reduced, but kernels fold ``(x - m)·r·w + b`` into ``x·A + B``, which cancels
    like a mean: ``kappa = (max|x| + |m|) / s`` per row covers it.
    """
    x = np.asarray(x_rows, dtype=np.float64)
    m, v = np.asarray(mean, dtype=np.float64), np.asarray(var, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.sqrt(v) + eps if eps_outside else np.sqrt(v + eps)
        kappa = (np.max(np.abs(x), axis=1, initial=0.0) + np.abs(m)) / s
        x_hat = (x - m[:, None]) / s[:, None]
        rms = np.sqrt(np.mean(x * x, axis=1)) if x.shape[1] else np.zeros(len(m))
    return RowStats(m, v, s, rms, kappa, x_hat, True, False, eps_outside)


# -- reductions ----------------------------------------------------------------------------------


def _factors(n: np.ndarray, reduction: str) -> np.ndarray:
    depth = constant("tree_depth")
    n = np.maximum(np.asarray(n, dtype=np.float64), 1.0)
    if reduction == "tree":
        levels: np.ndarray = np.ceil(np.log2(n))
        return np.maximum(1.0, levels / depth)
    if reduction == "sequential":
        return np.maximum(1.0, (n - 1.0) / depth)
    raise ValueError(f"unknown reduction {reduction!r}: expected one of {REDUCTIONS}")


def reduction_factor(n: int, reduction: str) -> float:
    """How much deeper than ``tree_depth`` a reduction of ``n`` elements is (at least 1).

    ``"tree"``: ``ceil(log2 n) / 16``, i.e. 1 up to ``n = 2**16``. ``"sequential"``:
    ``(n - 1) / 16`` — linear, because stagnation makes sequential errors systematic (module
    docstring).
    """
    return float(_factors(np.asarray(n), reduction))


def _depth(n: np.ndarray | int, reduction: str) -> np.ndarray:
    return constant("tree_depth") * _factors(np.asarray(n), reduction)


# -- the normalized value ------------------------------------------------------------------------


def normalization_error(
    stats: RowStats, *, acc_unit: float, reduction: str, n: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per row ``(e_mu, e_s)``: a kernel's ``x̂`` is within ``e_mu + e_s·|x̂|`` of the exact one.

    ``e_mu`` is the mean's error in units of ``s`` (0 for RMS norms); ``e_s`` bounds the
    relative error of the scale ``1/s`` (and of ``rstd``). Module docstring, steps 1-4.
    """
    u = acc_unit
    k = float(_depth(stats.n if n is None else n, reduction))
    e_s = np.full_like(stats.kappa, u * ((k + constant("variance")) / 2 + constant("normalize")))
    if not stats.center:
        return np.zeros_like(stats.kappa), e_s
    with np.errstate(divide="ignore", invalid="ignore"):
        floor = underflow_quantum(u) / stats.s
    e_mu = (k + constant("mean")) * (u * stats.kappa + floor)
    # sqrt(sd² + δμ²) - sd <= min(δμ, δμ²/(2 sd)), in units of s: with ε inside the root sd
    # becomes s; with ε outside, s/sd >= 1 stays (an ε-dominated row keeps e_mu itself).
    with np.errstate(divide="ignore", invalid="ignore"):
        stretch = stats.s / np.sqrt(stats.var) if stats.eps_outside else np.ones_like(e_mu)
    shifted = np.fmin(e_mu, e_mu * e_mu * stretch / 2)  # fmin: 0 * inf (all-zero rows) is 0
    return e_mu, e_s + constant("welford") * k * u * stats.kappa + shifted


def _x_hat_error(stats: RowStats, acc_unit: float, reduction: str, n: int | None) -> np.ndarray:
    e_mu, e_s = normalization_error(stats, acc_unit=acc_unit, reduction=reduction, n=n)
    error: np.ndarray = e_mu[:, None] + e_s[:, None] * np.abs(stats.x_hat)
    return error + constant("underflow") * underflow_quantum(acc_unit)


def _rounded(value: np.ndarray, error: np.ndarray, out_dtype: str) -> np.ndarray:
    """``error`` plus the rounding allowance at ``|value| + error`` (step 6)."""
    bound: np.ndarray = constant("rounding") * ulp(np.abs(value) + error, out_dtype) + error
    return bound


# -- bounds --------------------------------------------------------------------------------------


def forward_bound(
    stats: RowStats,
    scale_rows: np.ndarray,
    shift_rows: np.ndarray,
    reference_rows: np.ndarray,
    *,
    out_dtype: str,
    acc_unit: float,
    reduction: str,
    n: int,
) -> np.ndarray:
    """Absolute bound on ``y = scale·x̂ + shift`` per element of the ``(groups, n)`` matrix.

    ``scale_rows``: ``weight_offset + weight`` spread per element (1 without weight; its sign
    is ignored); ``shift_rows``: the bias (0 without). ``ulp(|r| + E) + E`` with
    ``E = |w|·(e_mu + e_s·|x̂|) + 3u·(|w·x̂| + |β|)``.
    """
    gamma, beta = np.abs(scale_rows), np.abs(shift_rows)
    e = gamma * _x_hat_error(stats, acc_unit, reduction, n)
    e += constant("affine") * acc_unit * (gamma * np.abs(stats.x_hat) + beta)
    e += constant("underflow") * underflow_quantum(acc_unit)
    return _rounded(reference_rows, e, out_dtype)


def statistics_bound(
    stats: RowStats, *, out_dtype: str, acc_unit: float, reduction: str, n: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Bounds on the returned mean and ``rstd = 1/s`` per row, stored in ``out_dtype``
    (float32 for half inputs in PyTorch): ``e_mu·s`` and ``e_s·rstd`` plus the rounding."""
    e_mu, e_s = normalization_error(stats, acc_unit=acc_unit, reduction=reduction, n=n)
    with np.errstate(divide="ignore"):
        rstd = 1.0 / stats.s
    mean_bound = _rounded(stats.mean, e_mu * stats.s, out_dtype)
    return mean_bound, _rounded(rstd, e_s * rstd, out_dtype)


def residual_bound(
    x_rows: np.ndarray,
    addend_rows: np.ndarray,
    alpha: float,
    *,
    out_dtype: str,
    acc_unit: float,
) -> np.ndarray:
    """Bound on ``z = x + alpha·r`` rounded into ``out_dtype`` (any shape):
    ``ulp(|z| + E) + E`` with ``E = 3u·(|x| + |alpha·r|)``."""
    x = np.asarray(x_rows, dtype=np.float64)
    scaled = alpha * np.asarray(addend_rows, dtype=np.float64)
    e = constant("affine") * acc_unit * (np.abs(x) + np.abs(scaled))
    return _rounded(x + scaled, e, out_dtype)


def _backward_terms(
    stats: RowStats, g: np.ndarray, center: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact-enough ``a = mean(g)``, ``b = Σ g·x̂ / N``, the projection factor ``c`` and
    ``t = g - a - c·x̂·b`` (so ``dx = t / s``)."""
    n, x_hat = stats.n, stats.x_hat
    divisor = n - 1 if stats.unbiased else n
    with np.errstate(invalid="ignore", divide="ignore"):
        a = g.sum(axis=1) / n if center else np.zeros(len(g))  # n = 0: an empty batch
        b = np.einsum("ij,ij->i", g, x_hat) / divisor
        c = np.ones(len(g))
        if stats.eps_outside:
            # A zero-variance row has x̂ = 0 and b = 0: the projection term vanishes, and s/0
            # would turn every 0·c into NaN (a NaN bound fails any error).
            c = np.where(stats.var > 0, stats.s / np.sqrt(stats.var), 1.0)
    t = g - a[:, None] - (c * b)[:, None] * x_hat
    return a, b, c, t


def backward_bound(
    stats: RowStats,
    scale_rows: np.ndarray,
    grad_rows: np.ndarray,
    reference_rows: np.ndarray | None = None,
    *,
    out_dtype: str,
    acc_unit: float,
    reduction: str,
    n: int,
    center: bool,
) -> np.ndarray:
    """Bound on ``dx = (g - a - c·x̂·b) / s`` per element, ``g = dy·w`` (``scale_rows`` is the
    *signed* ``weight_offset + weight``). The rounding allowance is taken at the reference
    when given, else at the float64 value of ``dx``. Module docstring, "dx"."""
    u, k = acc_unit, float(_depth(n, reduction))
    g = np.asarray(grad_rows, dtype=np.float64) * np.asarray(scale_rows, dtype=np.float64)
    a, b, c, t = _backward_terms(stats, g, center)
    e_x = _x_hat_error(stats, acc_unit, reduction, n)
    _, e_s = normalization_error(stats, acc_unit=acc_unit, reduction=reduction, n=n)
    divisor = n - 1 if stats.unbiased else n
    abs_g, abs_gx = np.abs(g), np.abs(g * stats.x_hat)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_g = abs_g.sum(axis=1) / n
        da = (k + constant("backward_mean")) * u * mean_g if center else np.zeros_like(a)
        db = c * (
            np.einsum("ij,ij->i", abs_g, e_x) / divisor
            + (k + constant("backward_projection")) * u * abs_gx.sum(axis=1) / divisor
        )
    projection = np.abs((c * b)[:, None] * stats.x_hat)
    dt = u * abs_g + da[:, None] + np.abs(stats.x_hat) * db[:, None]
    dt += np.abs(c * b)[:, None] * e_x
    dt += constant("affine") * u * (np.abs(g - a[:, None]) + projection)
    dt += constant("underflow") * underflow_quantum(u)
    e = (dt + e_s[:, None] * np.abs(t)) / stats.s[:, None]
    value = t / stats.s[:, None] if reference_rows is None else reference_rows
    return _rounded(value, e, out_dtype)


def scaled_gradient_bound(
    bound: np.ndarray,
    scale: float,
    reference: np.ndarray,
    *,
    out_dtype: str,
    acc_unit: float,
    addend: np.ndarray | None = None,
) -> np.ndarray:
    """Bound on ``scale·(dz + addend)`` given ``bound`` on ``dz``: DeepNorm's input gradient
    (``alpha·dz``) and the add-norms' (``dz + g_res``, the residual's ``alpha`` times that).
    The addend adds one rounding of its size, the product one ``rounding`` of the result."""
    extra = 0.0 if addend is None else acc_unit * np.abs(addend)
    scaled: np.ndarray = (bound + extra) * abs(scale)
    return scaled + constant("rounding") * ulp(np.abs(reference), out_dtype)


def _param_sums(
    param_index: np.ndarray, params: int, *values: np.ndarray
) -> tuple[np.ndarray, ...]:
    index = np.asarray(param_index).reshape(-1)
    return tuple(np.bincount(index, weights=np.ravel(v), minlength=params)[:params] for v in values)


@dataclass
class ParamTerms:
    """The sums a weight or bias gradient's bound is made of, per parameter: the element
    count, ``Σ dy·x̂`` (or ``Σ dy``), the propagated error ``Σ|dy|·E_x̂`` and ``Σ|dy·x̂|`` (or
    ``Σ|dy|``). Each is a sum over elements, so the terms of row blocks add up
    (:mod:`conformance.large`)."""

    count: np.ndarray
    value: np.ndarray
    propagated: np.ndarray
    magnitude: np.ndarray

    def __add__(self, other: ParamTerms) -> ParamTerms:
        return ParamTerms(
            self.count + other.count,
            self.value + other.value,
            self.propagated + other.propagated,
            self.magnitude + other.magnitude,
        )


def param_grad_terms(
    which: str,
    stats: RowStats,
    grad_rows: np.ndarray,
    param_index: np.ndarray,
    params: int,
    *,
    acc_unit: float,
    reduction: str,
) -> ParamTerms:
    """The :class:`ParamTerms` of ``dw_j = Σ dy·x̂`` (``which="weight"``) or ``dβ_j = Σ dy``
    over the elements using parameter ``j`` (``param_index``, a ``(groups, n)`` matrix)."""
    dy = np.asarray(grad_rows, dtype=np.float64)
    if which == "weight":
        e_x = _x_hat_error(stats, acc_unit, reduction, stats.n)
        products = dy * stats.x_hat
        sums = _param_sums(
            param_index, params, np.ones_like(dy), products, np.abs(dy) * e_x, np.abs(products)
        )
        return ParamTerms(*sums)
    count, value, magnitude = _param_sums(param_index, params, np.ones_like(dy), dy, np.abs(dy))
    return ParamTerms(count, value, np.zeros_like(value), magnitude)


def param_grad_from_terms(
    which: str,
    terms: ParamTerms,
    reference: np.ndarray | None = None,
    *,
    out_dtype: str,
    acc_unit: float,
    reduction: str,
    extra: np.ndarray | float = 0.0,
) -> np.ndarray:
    """The bound of :func:`weight_grad_bound` or :func:`bias_grad_bound` from its terms;
    ``extra`` is an error of the reference itself, added before the rounding allowance."""
    k = _depth(terms.count, reduction)
    if which == "weight":
        e = terms.propagated + (k + 1) * (
            acc_unit * terms.magnitude + underflow_quantum(acc_unit) * terms.count
        )
    else:
        e = k * acc_unit * terms.magnitude
    value = terms.value if reference is None else np.ravel(reference)
    return _rounded(value, e + extra, out_dtype)


def weight_grad_bound(
    stats: RowStats,
    grad_rows: np.ndarray,
    param_index: np.ndarray,
    params: int,
    reference: np.ndarray | None = None,
    *,
    out_dtype: str,
    acc_unit: float,
    reduction: str,
) -> np.ndarray:
    """Bound on ``dw_j = Σ dy·x̂`` over the elements using parameter ``j`` (``param_index``,
    a ``(groups, n)`` matrix): ``Σ|dy|·E_x̂ + (k_j + 1)·u·Σ|dy·x̂|``, ``k_j`` the depth of
    parameter ``j``'s element count. Shape ``(params,)``."""
    terms = param_grad_terms(
        "weight", stats, grad_rows, param_index, params, acc_unit=acc_unit, reduction=reduction
    )
    return param_grad_from_terms(
        "weight", terms, reference, out_dtype=out_dtype, acc_unit=acc_unit, reduction=reduction
    )


def bias_grad_bound(
    stats: RowStats,
    grad_rows: np.ndarray,
    param_index: np.ndarray,
    params: int,
    reference: np.ndarray | None = None,
    *,
    out_dtype: str,
    acc_unit: float,
    reduction: str,
) -> np.ndarray:
    """Bound on ``dβ_j = Σ dy`` over the elements using parameter ``j``: ``k_j·u·Σ|dy|``.
    ``stats`` is unused but kept for symmetry with :func:`weight_grad_bound`."""
    terms = param_grad_terms(
        "bias", stats, grad_rows, param_index, params, acc_unit=acc_unit, reduction=reduction
    )
    return param_grad_from_terms(
        "bias", terms, reference, out_dtype=out_dtype, acc_unit=acc_unit, reduction=reduction
    )


def running_stats_bound(
    which: str,
    old: np.ndarray,
    reference: np.ndarray,
    stats: RowStats,
    momentum: float | None,
    *,
    out_dtype: str,
    acc_unit: float,
    reduction: str = "tree",
    unbiased: bool = True,
) -> np.ndarray:
    """Bound on BatchNorm's running ``which`` ("running_mean" or "running_var") per row:
    ``new = (1 - m)·old + m·stat`` (``m = momentum``; ``None``, the cumulative average, is
    bounded for every ``m`` in [0, 1]). The running variance uses the unbiased batch variance
    unless ``unbiased=False``; ``stats`` are the batch's (biased) row statistics."""
    e_mu, _ = normalization_error(stats, acc_unit=acc_unit, reduction=reduction)
    n, u, k = stats.n, acc_unit, float(_depth(stats.n, reduction))
    if which == "running_mean":
        stat, d_stat = stats.mean, e_mu * stats.s
    elif which == "running_var":
        correction = n / (n - 1) if unbiased and n > 1 else 1.0
        stat = stats.var * correction
        d_var = (k + constant("variance")) * u * stats.var + (e_mu * stats.s) ** 2
        d_var += 2 * constant("welford") * k * u * stats.rms * np.sqrt(stats.var)
        d_stat = d_var * correction + u * stat
    else:
        raise ValueError(f"unknown running statistic {which!r}")
    keep, take = (1.0, 1.0) if momentum is None else (1.0 - momentum, momentum)
    old = np.abs(np.asarray(old, dtype=np.float64))
    e = take * d_stat + constant("affine") * acc_unit * (keep * old + take * np.abs(stat))
    return _rounded(np.asarray(reference, dtype=np.float64), e, out_dtype)
