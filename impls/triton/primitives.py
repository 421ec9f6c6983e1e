"""Building blocks shared by the kernels: rounding into a storage dtype, the statistics of a
tile, the merge of chunk statistics, and the fixed-order reduction of partial sums.

Conversions. Every value is widened exactly to float32 when loaded, computed in float32, and
rounded once, to nearest even, into the dtype it is stored in. Compiled, ``x.to(dtype)`` does
exactly that (``cvt.rn``). Triton's interpreter (3.x) gets bfloat16 wrong both ways: it truncates
float32 -> bfloat16, and it mis-scales bfloat16 subnormals on the way to float32. So there
(``INTERPRETED``) bfloat16 goes through its bits: widening shifts them 16 places left (exact,
subnormals included); rounding adds ``0x7FFF`` plus the lowest kept bit to the float32 bits and
drops the low 16 (a carry into the exponent gives inf, as round-to-nearest does), NaN kept NaN.

Statistics of a tile (rows of a ``[BLOCK_M, BLOCK_N]`` tile, ``n`` valid columns; masked
columns hold 0)::

    mean = sum(z) / n            (LayerNorm; RMSNorm: mean = 0)
    d    = z - mean              (0 where masked)
    var  = sum(d * d) / n
    rstd = 1 / sqrt(var + eps)

Two passes over registers, each sum a tree (``tl.sum``); the divisions and the square root are
the correctly rounded ``div_rn``/``sqrt_rn``. No ``E[z^2] - E[z]^2``: its cancellation loses
everything at a condition number ``rms(z) / std(z)`` of ``2**12`` in float32.

Chunks. A row or group wider than one tile is read in chunks; each chunk's ``(mean_c, M2_c)``
comes from the two-pass formula above and is merged into the running ``(count, mean, M2)`` with
Chan, Golub and LeVeque's pairwise update::

    delta = mean_c - mean
    mean' = mean + delta * (n_c / (count + n_c))
    M2'   = M2 + M2_c + delta^2 * (count * n_c / (count + n_c))

(for RMSNorm just ``M2' = M2 + sum(z^2)``), then ``var = M2 / n``. The merge squares a difference
of means, not of raw sums: its error grows like ``u * rms / std``, not its square.

Partial sums. The weight and bias gradients are sums over rows (or over samples and positions).
Each program writes the sums of its own rows to its own row of a float32 ``(programs, n)``
buffer; :func:`reduce_partials` then adds the buffer's rows in a fixed order (a tree over
``PARTIAL_ROWS`` rows, those trees in sequence) and rounds into the parameter's dtype. No atomics:
the same inputs give bitwise the same gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from impls.triton import runtime, tiling


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """``x`` (float32) rounded to nearest even into ``dtype``."""
    rounded = x.to(dtype)
    if INTERPRETED:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            kept = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            kept = tl.where(x != x, 0x7FC0, kept)
            rounded = kept.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return rounded


@triton.jit
def widen(x, INTERPRETED: tl.constexpr):
    """``x`` converted exactly to float32."""
    wide = x.to(tl.float32)
    if INTERPRETED:
        if x.dtype == tl.bfloat16:
            bits = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
            wide = bits.to(tl.float32, bitcast=True)
    return wide


@triton.jit
def load_float32(pointers, mask, INTERPRETED: tl.constexpr):
    """Load, 0 where masked, widened to float32."""
    return widen(tl.load(pointers, mask=mask, other=0.0), INTERPRETED)


@triton.jit
def store_rounded(pointers, x, mask, INTERPRETED: tl.constexpr):
    """Store float32 ``x`` rounded into the pointers' element type."""
    tl.store(pointers, round_to(x, pointers.dtype.element_ty, INTERPRETED), mask=mask)


@triton.jit
def row_moments(z, mask, n, eps, CENTER: tl.constexpr):
    """Per row of a tile: ``(mean, rstd)`` by two passes over the registers."""
    if CENTER:
        mean = tl.div_rn(tl.sum(z, axis=1), n)
        d = tl.where(mask, z - mean[:, None], 0.0)
    else:
        mean = tl.zeros([z.shape[0]], dtype=tl.float32)
        d = z
    var = tl.div_rn(tl.sum(d * d, axis=1), n)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    return mean, rstd


@triton.jit
def merge_chunk(mean, m2, seen, z, mask, n_chunk, CENTER: tl.constexpr):
    """Fold a chunk ``z`` (``n_chunk`` valid columns per row) into each row's running
    ``(mean, M2)`` over ``seen`` elements: Chan et al.'s pairwise update."""
    if CENTER:
        chunk_mean = tl.div_rn(tl.sum(z, axis=1), n_chunk)
        d = tl.where(mask, z - chunk_mean[:, None], 0.0)
        chunk_m2 = tl.sum(d * d, axis=1)
        total = seen + n_chunk
        delta = chunk_mean - mean
        mean = mean + delta * tl.div_rn(n_chunk, total)
        m2 = m2 + chunk_m2 + delta * delta * tl.div_rn(seen * n_chunk, total)
    else:
        m2 = m2 + tl.sum(z * z, axis=1)
    return mean, m2


@triton.jit
def column_sum(x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRETED: tl.constexpr):
    """The sum over axis 0 (the rows) of a ``[BLOCK_M, BLOCK_N]`` tile, by a tree. On a GPU
    ``tl.sum`` is one; the interpreter's is NumPy's reduction across rows, which adds them one
    after another (6·10⁻⁴ off for 65536 equal float32 values), so there the tree is spelled out:
    the two halves added, ``log2(BLOCK_M)`` times."""
    if INTERPRETED:
        while x.shape[0] > 1:
            x = tl.sum(tl.reshape(x, [2, x.shape[0] // 2, BLOCK_N]), axis=0)
        return tl.reshape(x, [BLOCK_N])
    else:
        return tl.sum(x, axis=0)


@triton.jit
def compensated_add(total, compensation, value):
    """Neumaier's step: ``total + value``, the rounding error of that addition added to
    ``compensation``. A long run of such steps is off by about ``2u·|sum| + O(k u²)·Σ|v|``
    instead of the ``k·u·Σ|v|`` of a plain running sum of ``k`` terms (Higham, §4.3), so the
    partial sums of dW and dB over many row blocks stay as accurate as a tree."""
    t = total + value
    big = tl.abs(total) >= tl.abs(value)
    compensation += tl.where(big, (total - t) + value, (value - t) + total)
    return t, compensation


@triton.jit
def _column_sums(
    PARTIALS,  # float32 (rows, n) contiguous: one row of partial sums per program
    OUT,  # (n,) contiguous, the parameter's dtype: written, the column sums
    cols,
    col_ok,
    rows,
    n,
    INTERPRETED: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    compensation = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, rows, BLOCK_P):
        r = start + tl.arange(0, BLOCK_P)
        mask = (r < rows)[:, None] & col_ok[None, :]
        offsets = r.to(tl.int64)[:, None] * n + cols[None, :]
        loaded = tl.load(PARTIALS + offsets, mask=mask, other=0.0)
        block = column_sum(loaded, BLOCK_P, BLOCK_N, INTERPRETED)
        total, compensation = compensated_add(total, compensation, block)
    store_rounded(OUT + cols, total + compensation, col_ok, INTERPRETED)


@triton.jit
def _sum_partials_kernel(
    PW,  # float32 (rows, n) contiguous: partial sums for the weight gradient; read with SUM_W
    PB,  # float32 (rows, n) contiguous: partial sums for the bias gradient; read with SUM_B
    DW,  # (n,) contiguous, the weight's dtype: written with SUM_W
    DB,  # (n,) contiguous, the bias's dtype: written with SUM_B
    rows,
    n,
    SUM_W: tl.constexpr,
    SUM_B: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n
    if SUM_W:
        _column_sums(PW, DW, cols, col_ok, rows, n, INTERPRETED, BLOCK_P, BLOCK_N)
    if SUM_B:
        _column_sums(PB, DB, cols, col_ok, rows, n, INTERPRETED, BLOCK_P, BLOCK_N)


def reduce_partials(
    pw: torch.Tensor | None,
    pb: torch.Tensor | None,
    dtypes: tuple[torch.dtype | None, torch.dtype | None],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The column sums of float32 ``(rows, n)`` partial buffers for the weight and the bias
    gradients (either may be None), in a fixed order, rounded into ``dtypes``."""
    present = pw if pw is not None else pb
    if present is None:
        return None, None
    rows, n = present.shape
    device = present.device
    dw = torch.empty(n, dtype=dtypes[0], device=device) if pw is not None else None
    db = torch.empty(n, dtype=dtypes[1], device=device) if pb is not None else None
    if n == 0:
        return dw, db
    t = tiling.partial_tiling(n)
    runtime.launch(
        _sum_partials_kernel,
        (triton.cdiv(n, t.block_n),),
        pw if pw is not None else present,
        pb if pb is not None else present,
        dw if dw is not None else present,
        db if db is not None else present,
        rows,
        n,
        SUM_W=pw is not None,
        SUM_B=pb is not None,
        INTERPRETED=runtime.INTERPRETED,
        BLOCK_P=t.block_p,
        BLOCK_N=t.block_n,
        num_warps=t.num_warps,
    )
    return dw, db
