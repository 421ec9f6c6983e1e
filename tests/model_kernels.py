"""Model LayerNorm/RMSNorm kernels in NumPy float32, the calibration set of the tolerance model.

Each kernel works on a ``(rows, n)`` matrix in the input dtype (float32, float16 or bfloat16),
computes in float32 with every reduction written out, and rounds its output into the input
dtype, as a GPU kernel would. They differ in how they reduce:

=====================  ==========================================================  ==========
kernel                 statistics                                                  correct?
=====================  ==========================================================  ==========
``two_pass``           mean by a pairwise tree, then the tree sum of (x - mean)^2  yes
``welford``            Welford per thread (strided, as a block of threads would),  yes
                       partials merged by a tree of Chan et al.'s pairwise updates
``naive_moments``      E[x^2] - E[x]^2 from tree sums (clamped at 0)               no
``float64_once``       everything in float64, one rounding at the end              yes
``sequential``         two-pass with left-to-right sums                            yes
=====================  ==========================================================  ==========

RMS norms (``center=False``) have no mean: every kernel then divides by the root of the tree
(or sequential) mean of squares. The backward kernels compute ``dx = rstd (g - mean(g) -
x_hat mean(g x_hat))`` with ``g = dy w`` in float32 (``drop`` drops the last term,
a known bug), and ``dw = sum dy x_hat``, ``db = sum dy`` over the rows.

The calibration sweep at the end runs the forward kernels on rows of mean ``√(κ² - 1)`` and unit
spread (target condition number ``κ``) for a grid of ``κ`` and row lengths, grades them against
the references under :func:`conformance.tolerance.forward_bound` and tabulates the max ratios.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

import references as R
from conformance import metrics, tolerance
from conformance.results import Metrics
from references.formats import FORMATS, round_array

F32 = np.float32
DTYPES: dict[str, Any] = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
}
#: Threads of the Welford kernel's block: each reduces every THREADS-th element of a row.
THREADS = 128


@dataclass(frozen=True)
class Convention:
    center: bool = True
    unbiased: bool = False
    eps_outside: bool = False


@dataclass
class Forward:
    """Output in the input dtype; mean and rstd per row in float32 (mean None for RMS)."""

    y: np.ndarray
    mean: np.ndarray | None
    rstd: np.ndarray


# -- reductions ----------------------------------------------------------------------------------


def tree_sum(a: np.ndarray) -> np.ndarray:
    """Pairwise float32 sum over the last axis: element i meets element i + half at each level,
    the order of a shared-memory tree; zero padding to a power of two adds nothing."""
    a = a.astype(F32)
    width = 1 << max(a.shape[-1] - 1, 0).bit_length()
    if width != a.shape[-1]:
        pad = np.zeros((*a.shape[:-1], width - a.shape[-1]), dtype=F32)
        a = np.concatenate([a, pad], axis=-1)
    while a.shape[-1] > 1:
        half = a.shape[-1] // 2
        a = a[..., :half] + a[..., half:]
    return a[..., 0]


def sequential_sum(a: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sum over the last axis."""
    total = np.zeros(a.shape[:-1], dtype=F32)
    for j in range(a.shape[-1]):
        total = total + a[..., j].astype(F32)
    return total


def _divisor(n: int, conv: Convention) -> Any:
    return F32(n - 1 if conv.unbiased else n)


def _normalize(
    x: np.ndarray,
    mean: np.ndarray | None,
    var: np.ndarray,
    eps: float,
    conv: Convention,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
) -> Forward:
    """y = (x - mean) rstd w + b in float32, rounded into x's dtype."""
    with np.errstate(invalid="ignore", divide="ignore"):
        if conv.eps_outside:
            rstd = F32(1) / (np.sqrt(var) + F32(eps))
        else:
            rstd = F32(1) / np.sqrt(var + F32(eps))
    d = x.astype(F32) if mean is None else x.astype(F32) - mean[:, None]
    y = d * rstd[:, None]
    if weight is not None:
        y = y * weight.astype(F32)
    if bias is not None:
        y = y + bias.astype(F32)
    return Forward(y.astype(x.dtype), mean, rstd)


# -- forward kernels -----------------------------------------------------------------------------


def _two_pass(x: np.ndarray, conv: Convention, reduce: Any) -> tuple[Any, np.ndarray]:
    x32 = x.astype(F32)
    n = x.shape[-1]
    if not conv.center:
        return None, reduce(x32 * x32) / _divisor(n, conv)
    mean = reduce(x32) / F32(n)
    d = x32 - mean[:, None]
    return mean, reduce(d * d) / _divisor(n, conv)


def two_pass(x: np.ndarray, w: Any, b: Any, eps: float, conv: Convention) -> Forward:
    mean, var = _two_pass(x, conv, tree_sum)
    return _normalize(x, mean, var, eps, conv, w, b)


def sequential(x: np.ndarray, w: Any, b: Any, eps: float, conv: Convention) -> Forward:
    mean, var = _two_pass(x, conv, sequential_sum)
    return _normalize(x, mean, var, eps, conv, w, b)


def _welford_partials(x32: np.ndarray, threads: int) -> tuple[np.ndarray, ...]:
    """Per thread (count, mean, M2) of the elements t*threads + thread, in float32."""
    rows, n = x32.shape
    steps = -(-n // threads)
    padded = np.zeros((rows, steps * threads), dtype=F32)
    padded[:, :n] = x32
    padded = padded.reshape(rows, steps, threads)
    count = np.zeros((rows, threads), dtype=F32)
    mean = np.zeros((rows, threads), dtype=F32)
    m2 = np.zeros((rows, threads), dtype=F32)
    for t in range(steps):
        value = padded[:, t, :]
        valid = (t * threads + np.arange(threads)) < n
        new_count = count + F32(1)
        delta = value - mean
        new_mean = mean + delta / new_count
        new_m2 = m2 + delta * (value - new_mean)
        count = np.where(valid, new_count, count)
        mean = np.where(valid, new_mean, mean)
        m2 = np.where(valid, new_m2, m2)
    return count, mean, m2


def _chan_merge(count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> tuple[np.ndarray, ...]:
    """Tree of Chan et al.'s pairwise merges over the last axis (a power of two wide)."""
    while count.shape[-1] > 1:
        half = count.shape[-1] // 2
        na, nb = count[:, :half], count[:, half:]
        ma, mb = mean[:, :half], mean[:, half:]
        total = na + nb
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = mb - ma
            merged_mean = ma + delta * (nb / total)
            merged_m2 = m2[:, :half] + m2[:, half:] + delta * delta * (na * nb / total)
        empty = total == 0
        mean = np.where(empty, F32(0), merged_mean)
        m2 = np.where(empty, F32(0), merged_m2)
        count = total
    return count[:, 0], mean[:, 0], m2[:, 0]


def welford(x: np.ndarray, w: Any, b: Any, eps: float, conv: Convention) -> Forward:
    if not conv.center:
        return two_pass(x, w, b, eps, conv)
    threads = min(THREADS, 1 << (x.shape[-1].bit_length() - 1))
    _, mean, m2 = _chan_merge(*_welford_partials(x.astype(F32), threads))
    return _normalize(x, mean, m2 / _divisor(x.shape[-1], conv), eps, conv, w, b)


def naive_moments(x: np.ndarray, w: Any, b: Any, eps: float, conv: Convention) -> Forward:
    """The cancelling one-pass variance E[x^2] - E[x]^2 (clamped at 0 as such kernels do)."""
    if not conv.center:
        return two_pass(x, w, b, eps, conv)
    x32 = x.astype(F32)
    n = F32(x.shape[-1])
    mean = tree_sum(x32) / n
    var = np.maximum(tree_sum(x32 * x32) / n - mean * mean, F32(0))
    if conv.unbiased:
        var = var * (n / _divisor(x.shape[-1], conv))
    return _normalize(x, mean, var, eps, conv, w, b)


def float64_once(x: np.ndarray, w: Any, b: Any, eps: float, conv: Convention) -> Forward:
    """float64 throughout; the output rounded once (exactly, by references.formats)."""
    x64 = x.astype(np.float64)
    n = x.shape[-1]
    mean = x64.mean(axis=1) if conv.center else np.zeros(x.shape[0])
    d = x64 - mean[:, None]
    var = (d * d).sum(axis=1) / (n - 1 if conv.unbiased else n)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.sqrt(var) + eps if conv.eps_outside else np.sqrt(var + eps)
    y = d / s[:, None]
    if w is not None:
        y = y * w.astype(np.float64)
    if b is not None:
        y = y + b.astype(np.float64)
    name = np.dtype(x.dtype).name
    out = round_array(y, FORMATS[name]).astype(x.dtype)
    return Forward(out, mean.astype(F32) if conv.center else None, (1 / s).astype(F32))


FORWARD_KERNELS = {
    "two_pass": two_pass,
    "welford": welford,
    "naive_moments": naive_moments,
    "float64_once": float64_once,
    "sequential": sequential,
}


# -- backward ------------------------------------------------------------------------------------


@dataclass
class Backward:
    dx: np.ndarray
    dw: np.ndarray
    db: np.ndarray


def backward(
    dy: np.ndarray,
    x: np.ndarray,
    w: np.ndarray,
    eps: float,
    conv: Convention,
    *,
    drop: bool = False,
) -> Backward:
    """Two-pass float32 backward of y = x_hat w + b (biased variance, eps inside the root).

    dx = rstd (g - mean(g) - x_hat mean(g x_hat)), g = dy w; RMS norms have no mean(g) term.
    """
    fwd = two_pass(x, None, None, eps, conv)
    x32, dy32 = x.astype(F32), dy.astype(F32)
    d = x32 if fwd.mean is None else x32 - fwd.mean[:, None]
    x_hat = d * fwd.rstd[:, None]
    g = dy32 * w.astype(F32)
    n = F32(x.shape[-1])
    centred = g if fwd.mean is None else g - (tree_sum(g) / n)[:, None]
    if not drop:
        centred = centred - x_hat * (tree_sum(g * x_hat) / n)[:, None]
    dx = centred * fwd.rstd[:, None]
    dw = tree_sum((dy32 * x_hat).T)
    db = tree_sum(dy32.T)
    return Backward(dx.astype(x.dtype), dw.astype(w.dtype), db.astype(w.dtype))


# -- the calibration sweep -----------------------------------------------------------------------

EPS = 1e-5
N_VALUES = (1, 7, 127, 768, 4096, 8192)
#: Target condition numbers per input dtype: up to the limit where a unit spread is still a few
#: ulps of the mean (2**22 for float32; float16 and bfloat16 run out near 2**10 and 2**7).
KAPPAS = {
    "float32": (1, 10, 100, 1e3, 1e4, 1e5, 2.0**22),
    "float16": (1, 10, 100, 1e3),
    "bfloat16": (1, 10, 100),
}
MARGIN = tolerance.constant("calibration_margin")
PYTORCH = Convention()


def reduction_of(kernel: str) -> str:
    return "sequential" if kernel == "sequential" else "tree"


def rows_per_cell(n: int) -> int:
    """Enough rows for a few thousand elements per cell, at least 8 and at most 64."""
    return max(8, min(64, 16384 // n))


def make_rows(rng: np.random.Generator, rows: int, n: int, kappa: float, dtype: str) -> np.ndarray:
    """Rows ``m + z``, ``z ~ N(0, 1)``, with ``m = √(κ² - 1)`` so that ``rms/sd = κ``."""
    mean = np.sqrt(max(kappa**2 - 1, 0.0))
    return (mean + rng.standard_normal((rows, n))).astype(DTYPES[dtype])


def make_affine(rng: np.random.Generator, n: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    w = 1 + rng.standard_normal(n) / 2
    b = rng.standard_normal(n) / 2
    return w.astype(DTYPES[dtype]), b.astype(DTYPES[dtype])


def f64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


@dataclass
class Cell:
    """One kernel on one (κ, n) block: plain metrics, and mismatches under the margin."""

    metrics: Metrics
    margin_mismatched: int


@dataclass
class Block:
    x: np.ndarray
    w: np.ndarray
    b: np.ndarray
    kappa: np.ndarray  # target κ of each row


def make_block(dtype: str, n: int, seed: int) -> Block:
    rng = np.random.default_rng(seed)
    rows = rows_per_cell(n)
    x = np.concatenate([make_rows(rng, rows, n, k, dtype) for k in KAPPAS[dtype]])
    w, b = make_affine(rng, n, dtype)
    return Block(x, w, b, np.repeat(np.array(KAPPAS[dtype], dtype=np.float64), rows))


def forward_bound(
    block: Block, conv: Convention, reference: np.ndarray, dtype: str, reduction: str, u: float
) -> np.ndarray:
    stats = tolerance.row_statistics(
        f64(block.x),
        EPS,
        center=conv.center,
        unbiased=conv.unbiased,
        eps_outside=conv.eps_outside,
    )
    shape = block.x.shape
    shift = np.zeros(shape) if not conv.center else np.broadcast_to(f64(block.b), shape)
    return tolerance.forward_bound(
        stats,
        np.broadcast_to(f64(block.w), shape),
        shift,
        reference,
        out_dtype=dtype,
        acc_unit=u,
        reduction=reduction,
        n=shape[1],
    )


def reference_output(block: Block, conv: Convention) -> np.ndarray:
    keywords = {
        "variance": "unbiased" if conv.unbiased else "biased",
        "eps_placement": "outside" if conv.eps_outside else "inside",
    }
    n = block.x.shape[1]
    if conv.center:
        return f64(R.layer_norm(block.x, n, block.w, block.b, EPS, **keywords))
    return f64(R.rms_norm(block.x, n, block.w, EPS, **keywords))


Cells = dict[tuple[str, float, int], Cell]


@functools.cache
def sweep(
    dtype: str,
    conv: Convention = PYTORCH,
    kernels: tuple[str, ...] = tuple(FORWARD_KERNELS),
    n_values: tuple[int, ...] = N_VALUES,
) -> Cells:
    """Every kernel on every (κ, n) cell of ``dtype``, cached per session."""
    cells: Cells = {}
    u = tolerance.accumulation_unit(dtype)
    for seed, n in enumerate(n_values):
        block = make_block(dtype, n, seed)
        reference = reference_output(block, conv)
        for name in kernels:
            bias = block.b if conv.center else None
            y = f64(FORWARD_KERNELS[name](block.x, block.w, bias, EPS, conv).y)
            plain = forward_bound(block, conv, reference, dtype, reduction_of(name), u)
            margin = forward_bound(block, conv, reference, dtype, reduction_of(name), u * MARGIN)
            for kappa in KAPPAS[dtype]:
                sel = block.kappa == kappa
                m = metrics.compare(y[sel], reference[sel], plain[sel], dtype)
                strict = metrics.compare(y[sel], reference[sel], margin[sel], dtype)
                cells[name, kappa, n] = Cell(m, strict.mismatched)
    return cells


def failures(cells: Cells, kernel: str) -> list[str]:
    return [
        f"κ={k:g} n={n}: ratio {c.metrics.max_ratio:.3g}, {c.margin_mismatched} over the margin"
        for (name, k, n), c in cells.items()
        if name == kernel and c.margin_mismatched
    ]


def calibration_table(dtype: str = "float32") -> str:
    """Kernel x κ -> max ratio over all n (the table in conformance.tolerance's docstring)."""
    cells = sweep(dtype)
    kappas = KAPPAS[dtype]
    header = "kernel".ljust(14) + "".join(f"κ={k:<9.3g}" for k in kappas)
    lines = [header]
    for name in FORWARD_KERNELS:
        worst = [max_ratio(cells, name, lambda k, _, kappa=kappa: k == kappa) for kappa in kappas]
        lines.append(name.ljust(14) + "".join(f"{r:<11.3g}" for r in worst))
    return "\n".join(lines)


def max_ratio(cells: Cells, kernel: str, where: Any = lambda k, n: True) -> float:
    return max(c.metrics.max_ratio for (m, k, n), c in cells.items() if m == kernel and where(k, n))
