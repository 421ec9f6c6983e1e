r"""Triton kernels for the norms over trailing dimensions: LayerNorm, RMSNorm, DeepNorm and the
fused residual add + norm.

The input is seen as a matrix of ``M`` rows of ``N`` elements (the normalised trailing
dimensions flattened), each row normalised on its own. With ``w' = w + weight_offset`` (Gemma's
``1 + w``; the offset only applies where there is a weight) the forward pass is::

    z     = x                                   LayerNorm, RMSNorm
    z     = rnd(scale_x * x + scale_r * r)      add-norms, rnd: to nearest in x's dtype
                                                (fused adds: 1, alpha; DeepNorm: alpha, 1)
    mean  = sum(z) / N                          (RMSNorm: 0)
    var   = sum((z - mean)^2) / N               (biased)
    rstd  = 1 / sqrt(var + eps)                 (eps inside the root)
    x_hat = (z - mean) * rstd
    y     = x_hat * w' + b

and the fused adds also return ``z``. The backward pass, with ``g = dy * w'`` (``dy`` without a
weight) and row means ``c1 = sum(g * x_hat) / N``, ``c2 = sum(g) / N``::

    dz = rstd * (g - c2 - x_hat * c1)           (RMSNorm: rstd * (g - x_hat * c1))
       + dz_out                                 (fused adds: the gradient of the returned z)
    dx = scale_x * dz,  dr = scale_r * dz       (the rounding of z passes gradients unchanged)
    dw = sum over rows of dy * x_hat,  db = sum over rows of dy

Every sum runs in float32 as a tree (``tl.sum``); results are rounded once into their dtype
(:mod:`impls.triton.primitives`).

Layout. Each kernel takes every tensor it reads through a row stride and a column stride, so a
strided view (a non-contiguous slice, an expanded gradient) is read in place; what it writes is
contiguous. Row offsets are computed in int64.

Forward (:func:`forward_kernel`): one program per ``BLOCK_M`` rows. A row that fits one tile
(``SINGLE_TILE``) is read once: statistics by two passes over the registers, then the output.
A wider row is read twice: chunks of ``BLOCK_N`` merged by Chan et al.'s update for the
statistics, then the chunks again for the output.

Backward (:func:`backward_kernel`): a persistent grid of ``P`` programs (a few per GPU core),
program ``p`` taking row blocks ``p, p + P, ...``; it accumulates ``dy * x_hat`` and ``dy`` for
its rows in registers — a tree sum within each block, compensated (Neumaier) sums across the
blocks, so that a program's thousands of rows cost no more accuracy than a tree — and writes
them to row ``p`` of float32 ``(P, N)`` partial buffers, which
:func:`impls.triton.primitives.reduce_partials` sums, compensated too, in a fixed order. A row
that fits one tile is read once. Wider rows take two kernels: :func:`backward_sums_kernel`
computes ``c1`` and ``c2`` per row, then :func:`backward_kernel` runs on a ``(P, chunks)``
grid, each program on one chunk of columns with the row sums given.
"""

from __future__ import annotations

import triton
import triton.language as tl

from impls.triton.primitives import (
    column_sum,
    compensated_add,
    load_float32,
    merge_chunk,
    round_to,
    row_moments,
    store_rounded,
    widen,
)


@triton.jit
def _load_tile(
    X,  # base pointer: element (m, n) at X + m * stride_m + n * stride_n
    rows,
    cols,
    mask,
    stride_m,  # row stride, in elements
    stride_n,  # column stride, in elements
    INTERPRETED: tl.constexpr,
):
    """A float32 ``[rows, cols]`` tile of a strided matrix, 0 where masked."""
    offsets = rows[:, None] * stride_m + cols.to(tl.int64)[None, :] * stride_n
    return load_float32(X + offsets, mask, INTERPRETED)


@triton.jit
def _load_z(
    X,  # input: element (m, n) at X + m * stride_xm + n * stride_xn
    R,  # second summand: element (m, n) at R + m * stride_rm + n * stride_rn; read with HAS_R
    rows,
    cols,
    mask,
    stride_xm,  # X's row stride, in elements
    stride_xn,  # X's column stride, in elements
    stride_rm,  # R's row stride, in elements
    stride_rn,  # R's column stride, in elements
    scale_x,
    scale_r,
    HAS_R: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """The values to normalise: ``x``, or ``scale_x * x + scale_r * r`` rounded into x's dtype."""
    z = _load_tile(X, rows, cols, mask, stride_xm, stride_xn, INTERPRETED)
    if HAS_R:
        r = _load_tile(R, rows, cols, mask, stride_rm, stride_rn, INTERPRETED)
        z = widen(round_to(z * scale_x + r * scale_r, X.dtype.element_ty, INTERPRETED), INTERPRETED)
    return z


@triton.jit
def _effective_weight(
    W,  # weight: N contiguous elements
    cols,
    col_ok,
    weight_offset,
    INTERPRETED: tl.constexpr,
):
    """``w + weight_offset`` for the tile's columns, float32."""
    return load_float32(W + cols, col_ok, INTERPRETED) + weight_offset


@triton.jit
def _write_output(
    Y,  # output: element (m, n) at Y + m * stride_ym + n
    Z,  # the rounded sum: element (m, n) at Z + m * stride_ym + n; written with STORE_Z
    W,  # weight: N contiguous elements; read with HAS_W
    B,  # bias: N contiguous elements; read with HAS_B
    z,
    mean,
    rstd,
    rows,
    cols,
    mask,
    N,
    stride_ym,  # Y's and Z's row stride, in elements
    weight_offset,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    STORE_Z: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """``y = (z - mean) * rstd * w' + b`` for one tile, and ``z`` itself where asked."""
    y = (z - mean[:, None]) * rstd[:, None]
    col_ok = cols < N
    if HAS_W:
        y = y * _effective_weight(W, cols, col_ok, weight_offset, INTERPRETED)[None, :]
    if HAS_B:
        y = y + load_float32(B + cols, col_ok, INTERPRETED)[None, :]
    offsets = rows[:, None] * stride_ym + cols[None, :]
    store_rounded(Y + offsets, y, mask, INTERPRETED)
    if STORE_Z:
        store_rounded(Z + offsets, z, mask, INTERPRETED)


@triton.jit
def _chunked_moments(
    X,  # input: element (m, n) at X + m * stride_xm + n * stride_xn
    R,  # second summand: element (m, n) at R + m * stride_rm + n * stride_rn; read with HAS_R
    rows,
    row_ok,
    stride_xm,  # X's row stride, in elements
    stride_xn,  # X's column stride, in elements
    stride_rm,  # R's row stride, in elements
    stride_rn,  # R's column stride, in elements
    N,
    eps,
    scale_x,
    scale_r,
    CENTER: tl.constexpr,
    HAS_R: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Per row ``(mean, rstd)`` of rows wider than a tile: chunk statistics, merged."""
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols < N)[None, :]
        z = _load_z(
            X, R, rows, cols, mask, stride_xm, stride_xn, stride_rm, stride_rn,
            scale_x, scale_r, HAS_R, INTERPRETED,
        )  # fmt: skip
        n_chunk = tl.minimum(N - start, BLOCK_N).to(tl.float32)
        mean, m2 = merge_chunk(mean, m2, start * 1.0, z, mask, n_chunk, CENTER)
    var = tl.div_rn(m2, N.to(tl.float32))
    return mean, tl.div_rn(1.0, tl.sqrt_rn(var + eps))


@triton.jit(do_not_specialize=["M", "N"])
def forward_kernel(
    X,  # input: element (m, n) at X + m * stride_xm + n * stride_xn
    R,  # second summand (residual, sublayer output): R + m * stride_rm + n * stride_rn; HAS_R
    W,  # weight: N contiguous elements; read with HAS_W
    B,  # bias: N contiguous elements; read with HAS_B
    Y,  # output, X's dtype: element (m, n) at Y + m * stride_ym + n
    Z,  # the rounded sum z, X's dtype: element (m, n) at Z + m * stride_ym + n; STORE_Z
    MEAN,  # float32 (M,): each row's mean (0 for RMSNorm)
    RSTD,  # float32 (M,): each row's 1 / sqrt(var + eps)
    stride_xm,  # X's row stride, in elements
    stride_xn,  # X's column stride, in elements
    stride_rm,  # R's row stride, in elements
    stride_rn,  # R's column stride, in elements
    stride_ym,  # Y's and Z's row stride, in elements
    M,
    N,
    eps,
    scale_x,
    scale_r,
    weight_offset,
    CENTER: tl.constexpr,
    HAS_R: tl.constexpr,
    STORE_Z: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows = rows.to(tl.int64)
    if SINGLE_TILE:
        cols = tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols < N)[None, :]
        z = _load_z(
            X, R, rows, cols, mask, stride_xm, stride_xn, stride_rm, stride_rn,
            scale_x, scale_r, HAS_R, INTERPRETED,
        )  # fmt: skip
        mean, rstd = row_moments(z, mask, N.to(tl.float32), eps, CENTER)
        _write_output(
            Y, Z, W, B, z, mean, rstd, rows, cols, mask, N, stride_ym, weight_offset,
            HAS_W, HAS_B, STORE_Z, INTERPRETED,
        )  # fmt: skip
    else:
        mean, rstd = _chunked_moments(
            X, R, rows, row_ok, stride_xm, stride_xn, stride_rm, stride_rn, N, eps,
            scale_x, scale_r, CENTER, HAS_R, INTERPRETED, BLOCK_M, BLOCK_N,
        )  # fmt: skip
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols < N)[None, :]
            z = _load_z(
                X, R, rows, cols, mask, stride_xm, stride_xn, stride_rm, stride_rn,
                scale_x, scale_r, HAS_R, INTERPRETED,
            )  # fmt: skip
            _write_output(
                Y, Z, W, B, z, mean, rstd, rows, cols, mask, N, stride_ym, weight_offset,
                HAS_W, HAS_B, STORE_Z, INTERPRETED,
            )  # fmt: skip
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _normalised_and_grad(
    Z,  # values normalised in the forward: element (m, n) at Z + m * stride_zm + n * stride_zn
    DY,  # gradient of the output: element (m, n) at DY + m * stride_dym + n * stride_dyn
    MEAN,  # float32 (M,): the forward's row means
    RSTD,  # float32 (M,): the forward's row rstd
    rows,
    row_ok,
    cols,
    mask,
    stride_zm,  # Z's row stride, in elements
    stride_zn,  # Z's column stride, in elements
    stride_dym,  # DY's row stride, in elements
    stride_dyn,  # DY's column stride, in elements
    INTERPRETED: tl.constexpr,
):
    """``(x_hat, dy, rstd)`` of a tile, float32, 0 where masked."""
    mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    z = _load_tile(Z, rows, cols, mask, stride_zm, stride_zn, INTERPRETED)
    x_hat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
    dy = _load_tile(DY, rows, cols, mask, stride_dym, stride_dyn, INTERPRETED)
    return x_hat, dy, rstd


@triton.jit(do_not_specialize=["M", "N"])
def backward_sums_kernel(
    Z,  # values normalised in the forward: element (m, n) at Z + m * stride_zm + n * stride_zn
    DY,  # gradient of the output: element (m, n) at DY + m * stride_dym + n * stride_dyn
    W,  # weight: N contiguous elements; read with HAS_W
    MEAN,  # float32 (M,): the forward's row means
    RSTD,  # float32 (M,): the forward's row rstd
    C1,  # float32 (M,): written, sum(g * x_hat) / N per row
    C2,  # float32 (M,): written, sum(g) / N per row
    stride_zm,  # Z's row stride, in elements
    stride_zn,  # Z's column stride, in elements
    stride_dym,  # DY's row stride, in elements
    stride_dyn,  # DY's column stride, in elements
    M,
    N,
    weight_offset,
    HAS_W: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows = rows.to(tl.int64)
    s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        x_hat, g, _rstd = _normalised_and_grad(
            Z, DY, MEAN, RSTD, rows, row_ok, cols, mask,
            stride_zm, stride_zn, stride_dym, stride_dyn, INTERPRETED,
        )  # fmt: skip
        if HAS_W:
            g = g * _effective_weight(W, cols, col_ok, weight_offset, INTERPRETED)[None, :]
        s1 += tl.sum(g * x_hat, axis=1)
        s2 += tl.sum(g, axis=1)
    n = N.to(tl.float32)
    tl.store(C1 + rows, tl.div_rn(s1, n), mask=row_ok)
    tl.store(C2 + rows, tl.div_rn(s2, n), mask=row_ok)


@triton.jit(do_not_specialize=["M", "N"])
def backward_kernel(
    Z,  # values normalised in the forward: element (m, n) at Z + m * stride_zm + n * stride_zn
    DY,  # gradient of the output: element (m, n) at DY + m * stride_dym + n * stride_dyn
    DZO,  # gradient of the returned z: DZO + m * stride_dzm + n * stride_dzn; read with HAS_DZO
    W,  # weight: N contiguous elements; read with HAS_W
    MEAN,  # float32 (M,): the forward's row means
    RSTD,  # float32 (M,): the forward's row rstd
    C1,  # float32 (M,): sum(g * x_hat) / N per row; read with SUMS_GIVEN
    C2,  # float32 (M,): sum(g) / N per row; read with SUMS_GIVEN
    DX,  # the input's dtype: element (m, n) at DX + m * stride_gm + n, scale_x * dz
    DR,  # the summand's dtype: element (m, n) at DR + m * stride_gm + n, scale_r * dz; HAS_R
    PW,  # float32 (P, N) contiguous: row p, program p's sum of dy * x_hat; written with ACC_W
    PB,  # float32 (P, N) contiguous: row p, program p's sum of dy; written with ACC_B
    stride_zm,  # Z's row stride, in elements
    stride_zn,  # Z's column stride, in elements
    stride_dym,  # DY's row stride, in elements
    stride_dyn,  # DY's column stride, in elements
    stride_dzm,  # DZO's row stride, in elements
    stride_dzn,  # DZO's column stride, in elements
    stride_gm,  # DX's and DR's row stride, in elements
    M,
    N,
    scale_x,
    scale_r,
    weight_offset,
    CENTER: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_DZO: tl.constexpr,
    HAS_R: tl.constexpr,
    ACC_W: tl.constexpr,
    ACC_B: tl.constexpr,
    SUMS_GIVEN: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    program = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    n = N.to(tl.float32)
    if HAS_W:
        w = _effective_weight(W, cols, col_ok, weight_offset, INTERPRETED)
    acc_w = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    err_w = tl.zeros([BLOCK_N], dtype=tl.float32)
    err_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    for block in range(program, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows = rows.to(tl.int64)
        mask = row_ok[:, None] & col_ok[None, :]
        x_hat, dy, rstd = _normalised_and_grad(
            Z, DY, MEAN, RSTD, rows, row_ok, cols, mask,
            stride_zm, stride_zn, stride_dym, stride_dyn, INTERPRETED,
        )  # fmt: skip
        g = dy
        if HAS_W:
            g = dy * w[None, :]
        if SUMS_GIVEN:
            c1 = tl.load(C1 + rows, mask=row_ok, other=0.0)
            if CENTER:
                c2 = tl.load(C2 + rows, mask=row_ok, other=0.0)
        else:
            c1 = tl.div_rn(tl.sum(g * x_hat, axis=1), n)
            if CENTER:
                c2 = tl.div_rn(tl.sum(g, axis=1), n)
        if CENTER:
            dz = (g - c2[:, None] - x_hat * c1[:, None]) * rstd[:, None]
        else:
            dz = (g - x_hat * c1[:, None]) * rstd[:, None]
        if HAS_DZO:
            dz += _load_tile(DZO, rows, cols, mask, stride_dzm, stride_dzn, INTERPRETED)
        offsets = rows[:, None] * stride_gm + cols[None, :]
        store_rounded(DX + offsets, dz * scale_x, mask, INTERPRETED)
        if HAS_R:
            store_rounded(DR + offsets, dz * scale_r, mask, INTERPRETED)
        dw = column_sum(dy * x_hat, BLOCK_M, BLOCK_N, INTERPRETED)
        acc_w, err_w = compensated_add(acc_w, err_w, dw)
        acc_b, err_b = compensated_add(acc_b, err_b, column_sum(dy, BLOCK_M, BLOCK_N, INTERPRETED))
    partial = program.to(tl.int64) * N + cols
    if ACC_W:
        tl.store(PW + partial, acc_w + err_w, mask=col_ok)
    if ACC_B:
        tl.store(PB + partial, acc_b + err_b, mask=col_ok)
