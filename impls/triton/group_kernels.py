r"""Triton kernels for GroupNorm.

The input ``(N, C, *spatial)`` is seen as ``(N, C, S)`` with ``S`` the spatial size; group ``g``
of sample ``n`` holds the ``channels = C / G`` channels ``g * channels, ...`` at every position,
``K = channels * S`` elements. With ``w'_c = w_c + weight_offset``::

    mean  = sum(x) / K                     over the group
    var   = sum((x - mean)^2) / K          (biased; eps inside the root)
    rstd  = 1 / sqrt(var + eps)
    x_hat = (x - mean) * rstd
    y     = x_hat * w'_c + b_c             (per channel)

Backward, with ``g = dy * w'_c`` and group means ``c1 = sum(g * x_hat) / K``, ``c2 = sum(g) / K``::

    dx    = rstd * (g - c2 - x_hat * c1)
    dw_c  = sum over samples and positions of dy * x_hat
    db_c  = sum over samples and positions of dy

The groups are the rows of a matrix: row ``r = n * G + g``. A tile is ``BLOCK_R`` rows by
``BLOCK_C * BLOCK_S`` columns, column ``k`` standing for channel ``c0 + k // BLOCK_S`` at position
``s0 + k % BLOCK_S`` of the row's group, so the row statistics and their chunk merge are those
of the trailing norms (:mod:`impls.triton.primitives`) and the per-channel weight is gathered
per column. Every tensor is addressed through its three strides (sample, channel, position):
channels-last and strided inputs are read in place.

Groups that fit one tile (``SINGLE_TILE``) are read once, ``BLOCK_R`` of them per program
(statistics by two passes over the registers). A larger group takes a program of its own and is
walked in tiles, channel chunks outside, position chunks inside: the forward merges tile
statistics with Chan et al.'s update, then normalises tile by tile; the backward sums ``c1`` and
``c2`` over the tiles, then computes ``dx`` tile by tile.

Weight and bias gradients: the tile viewed as ``[BLOCK_R, BLOCK_C, BLOCK_S]`` is summed over
positions, giving each row's per-channel sums of ``dy * x_hat`` and ``dy``; row ``(n, g)``
writes them to its own channels of row ``n`` of float32 ``(N, C)`` partial buffers (no two rows
share an entry), which :func:`impls.triton.primitives.reduce_partials` adds over the samples in
a fixed order. Sums are float32 trees (``tl.sum``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from impls.triton.primitives import load_float32, merge_chunk, row_moments, store_rounded


@triton.jit
def _group_rows(groups, channels, total_rows, BLOCK_R: tl.constexpr):
    """This program's rows: validity, sample index and first channel of each, int64."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < total_rows
    sample = (rows // groups).to(tl.int64)
    first = ((rows % groups) * channels).to(tl.int64)
    return row_ok, sample, first


@triton.jit
def _tile(
    c0,
    s0,
    row_ok,
    channels,
    S,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Channel (within the group) and position of each column of the tile at ``(c0, s0)``,
    and the tile's mask."""
    k = tl.arange(0, BLOCK_C * BLOCK_S)
    ch = c0 + k // BLOCK_S
    sp = s0 + k % BLOCK_S
    mask = row_ok[:, None] & ((ch < channels) & (sp < S))[None, :]
    return ch, sp, mask


@triton.jit
def _offsets(
    sample,
    first,
    ch,
    sp,
    stride_n,  # sample stride, in elements
    stride_c,  # channel stride, in elements
    stride_s,  # position stride, in elements
):
    """Element offsets of a tile: rows (sample, first channel) by columns (channel, position)."""
    rows = sample * stride_n + first * stride_c
    return rows[:, None] + (ch.to(tl.int64) * stride_c + sp.to(tl.int64) * stride_s)[None, :]


@triton.jit
def _per_channel(
    P,  # per-channel parameter: C contiguous elements
    first,
    ch,
    mask,
    offset,
    INTERPRETED: tl.constexpr,
):
    """``P[first + ch] + offset`` gathered over the tile, float32."""
    return load_float32(P + first[:, None] + ch[None, :], mask, INTERPRETED) + offset


@triton.jit
def _group_moments(
    X,  # input: element (n, c, s) at X + n * stride_n + c * stride_c + s * stride_s
    sample,
    first,
    row_ok,
    channels,
    S,
    stride_n,  # X's sample stride, in elements
    stride_c,  # X's channel stride, in elements
    stride_s,  # X's position stride, in elements
    eps,
    INTERPRETED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """``(mean, rstd)`` of groups larger than a tile: tile statistics, merged."""
    mean = tl.zeros([BLOCK_R], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_R], dtype=tl.float32)
    spatial = S.to(tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        here = tl.minimum(channels - c0, BLOCK_C).to(tl.float32)
        for s0 in range(0, S, BLOCK_S):
            ch, sp, mask = _tile(c0, s0, row_ok, channels, S, BLOCK_C, BLOCK_S)
            offsets = _offsets(sample, first, ch, sp, stride_n, stride_c, stride_s)
            x = load_float32(X + offsets, mask, INTERPRETED)
            n_tile = here * tl.minimum(S - s0, BLOCK_S).to(tl.float32)
            seen = c0 * spatial + here * s0
            mean, m2 = merge_chunk(mean, m2, seen, x, mask, n_tile, True)
    var = tl.div_rn(m2, channels.to(tl.float32) * spatial)
    return mean, tl.div_rn(1.0, tl.sqrt_rn(var + eps))


@triton.jit
def _write_tile(
    Y,  # output: element (n, c, s) at Y + n * stride_n + c * stride_c + s * stride_s
    W,  # weight: C contiguous elements; read with HAS_W
    B,  # bias: C contiguous elements; read with HAS_B
    x,
    mean,
    rstd,
    sample,
    first,
    ch,
    sp,
    mask,
    stride_n,  # Y's sample stride, in elements
    stride_c,  # Y's channel stride, in elements
    stride_s,  # Y's position stride, in elements
    weight_offset,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    y = (x - mean[:, None]) * rstd[:, None]
    if HAS_W:
        y = y * _per_channel(W, first, ch, mask, weight_offset, INTERPRETED)
    if HAS_B:
        y = y + _per_channel(B, first, ch, mask, 0.0, INTERPRETED)
    offsets = _offsets(sample, first, ch, sp, stride_n, stride_c, stride_s)
    store_rounded(Y + offsets, y, mask, INTERPRETED)


@triton.jit(do_not_specialize=["channels", "S", "total_rows"])
def group_forward_kernel(
    X,  # input: element (n, c, s) at X + n * stride_xn + c * stride_xc + s * stride_xs
    W,  # weight: C contiguous elements; read with HAS_W
    B,  # bias: C contiguous elements; read with HAS_B
    Y,  # output: element (n, c, s) at Y + n * stride_yn + c * stride_yc + s * stride_ys
    MEAN,  # float32 (N * G,): each group's mean, row r = n * G + g
    RSTD,  # float32 (N * G,): each group's 1 / sqrt(var + eps)
    stride_xn,  # X's sample stride, in elements
    stride_xc,  # X's channel stride, in elements
    stride_xs,  # X's position stride, in elements
    stride_yn,  # Y's sample stride, in elements
    stride_yc,  # Y's channel stride, in elements
    stride_ys,  # Y's position stride, in elements
    groups,
    channels,
    S,
    total_rows,
    eps,
    weight_offset,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    row_ok, sample, first = _group_rows(groups, channels, total_rows, BLOCK_R)
    if SINGLE_TILE:
        ch, sp, mask = _tile(0, 0, row_ok, channels, S, BLOCK_C, BLOCK_S)
        offsets = _offsets(sample, first, ch, sp, stride_xn, stride_xc, stride_xs)
        x = load_float32(X + offsets, mask, INTERPRETED)
        count = channels.to(tl.float32) * S.to(tl.float32)
        mean, rstd = row_moments(x, mask, count, eps, True)
        _write_tile(
            Y, W, B, x, mean, rstd, sample, first, ch, sp, mask,
            stride_yn, stride_yc, stride_ys, weight_offset, HAS_W, HAS_B, INTERPRETED,
        )  # fmt: skip
    else:
        mean, rstd = _group_moments(
            X, sample, first, row_ok, channels, S, stride_xn, stride_xc, stride_xs, eps,
            INTERPRETED, BLOCK_R, BLOCK_C, BLOCK_S,
        )  # fmt: skip
        for c0 in range(0, channels, BLOCK_C):
            for s0 in range(0, S, BLOCK_S):
                ch, sp, mask = _tile(c0, s0, row_ok, channels, S, BLOCK_C, BLOCK_S)
                offsets = _offsets(sample, first, ch, sp, stride_xn, stride_xc, stride_xs)
                x = load_float32(X + offsets, mask, INTERPRETED)
                _write_tile(
                    Y, W, B, x, mean, rstd, sample, first, ch, sp, mask,
                    stride_yn, stride_yc, stride_ys, weight_offset, HAS_W, HAS_B, INTERPRETED,
                )  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _grad_tile(
    X,  # input: element (n, c, s) at X + n * stride_xn + c * stride_xc + s * stride_xs
    DY,  # output gradient: element (n, c, s) at DY + n * stride_dn + c * stride_dc + s * stride_ds
    W,  # weight: C contiguous elements; read with HAS_W
    mean,
    rstd,
    sample,
    first,
    ch,
    sp,
    mask,
    stride_xn,  # X's sample stride, in elements
    stride_xc,  # X's channel stride, in elements
    stride_xs,  # X's position stride, in elements
    stride_dn,  # DY's sample stride, in elements
    stride_dc,  # DY's channel stride, in elements
    stride_ds,  # DY's position stride, in elements
    weight_offset,
    HAS_W: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """``(x_hat, dy, g)`` of a tile, float32, 0 where masked."""
    x_offsets = _offsets(sample, first, ch, sp, stride_xn, stride_xc, stride_xs)
    x = load_float32(X + x_offsets, mask, INTERPRETED)
    x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    dy_offsets = _offsets(sample, first, ch, sp, stride_dn, stride_dc, stride_ds)
    dy = load_float32(DY + dy_offsets, mask, INTERPRETED)
    g = dy
    if HAS_W:
        g = dy * _per_channel(W, first, ch, mask, weight_offset, INTERPRETED)
    return x_hat, dy, g


@triton.jit
def _channel_sums(t, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per row and channel, the sum over the tile's positions: ``[BLOCK_R, BLOCK_C]``."""
    return tl.sum(tl.reshape(t, [BLOCK_R, BLOCK_C, BLOCK_S]), axis=2)


@triton.jit
def _store_channel_sums(
    PW,  # float32 (N, C) contiguous: per-sample sums of dy * x_hat per channel; ACC_W
    PB,  # float32 (N, C) contiguous: per-sample sums of dy per channel; ACC_B
    acc_w,
    acc_b,
    sample,
    first,
    row_ok,
    c0,
    channels,
    C,
    ACC_W: tl.constexpr,
    ACC_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    ch = c0 + tl.arange(0, BLOCK_C)
    offsets = (sample * C + first)[:, None] + ch[None, :]
    mask = row_ok[:, None] & (ch < channels)[None, :]
    if ACC_W:
        tl.store(PW + offsets, acc_w, mask=mask)
    if ACC_B:
        tl.store(PB + offsets, acc_b, mask=mask)


@triton.jit(do_not_specialize=["channels", "S", "total_rows"])
def group_backward_kernel(
    X,  # input: element (n, c, s) at X + n * stride_xn + c * stride_xc + s * stride_xs
    DY,  # output gradient: element (n, c, s) at DY + n * stride_dn + c * stride_dc + s * stride_ds
    W,  # weight: C contiguous elements; read with HAS_W
    MEAN,  # float32 (N * G,): the forward's group means
    RSTD,  # float32 (N * G,): the forward's group rstd
    DX,  # input gradient: element (n, c, s) at DX + n * stride_gn + c * stride_gc + s * stride_gs
    PW,  # float32 (N, C) contiguous: row n, the sums of dy * x_hat over positions; ACC_W
    PB,  # float32 (N, C) contiguous: row n, the sums of dy over positions; ACC_B
    stride_xn,  # X's sample stride, in elements
    stride_xc,  # X's channel stride, in elements
    stride_xs,  # X's position stride, in elements
    stride_dn,  # DY's sample stride, in elements
    stride_dc,  # DY's channel stride, in elements
    stride_ds,  # DY's position stride, in elements
    stride_gn,  # DX's sample stride, in elements
    stride_gc,  # DX's channel stride, in elements
    stride_gs,  # DX's position stride, in elements
    groups,
    channels,
    S,
    C,
    total_rows,
    weight_offset,
    HAS_W: tl.constexpr,
    ACC_W: tl.constexpr,
    ACC_B: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    row_ok, sample, first = _group_rows(groups, channels, total_rows, BLOCK_R)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    count = channels.to(tl.float32) * S.to(tl.float32)
    if SINGLE_TILE:
        ch, sp, mask = _tile(0, 0, row_ok, channels, S, BLOCK_C, BLOCK_S)
        x_hat, dy, g = _grad_tile(
            X, DY, W, mean, rstd, sample, first, ch, sp, mask,
            stride_xn, stride_xc, stride_xs, stride_dn, stride_dc, stride_ds,
            weight_offset, HAS_W, INTERPRETED,
        )  # fmt: skip
        c1 = tl.div_rn(tl.sum(g * x_hat, axis=1), count)
        c2 = tl.div_rn(tl.sum(g, axis=1), count)
        dx = (g - c2[:, None] - x_hat * c1[:, None]) * rstd[:, None]
        offsets = _offsets(sample, first, ch, sp, stride_gn, stride_gc, stride_gs)
        store_rounded(DX + offsets, dx, mask, INTERPRETED)
        _store_channel_sums(
            PW, PB,
            _channel_sums(dy * x_hat, BLOCK_R, BLOCK_C, BLOCK_S),
            _channel_sums(dy, BLOCK_R, BLOCK_C, BLOCK_S),
            sample, first, row_ok, 0, channels, C, ACC_W, ACC_B, BLOCK_C,
        )  # fmt: skip
    else:
        s1 = tl.zeros([BLOCK_R], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c0 in range(0, channels, BLOCK_C):
            for s0 in range(0, S, BLOCK_S):
                ch, sp, mask = _tile(c0, s0, row_ok, channels, S, BLOCK_C, BLOCK_S)
                x_hat, dy, g = _grad_tile(
                    X, DY, W, mean, rstd, sample, first, ch, sp, mask,
                    stride_xn, stride_xc, stride_xs, stride_dn, stride_dc, stride_ds,
                    weight_offset, HAS_W, INTERPRETED,
                )  # fmt: skip
                s1 += tl.sum(g * x_hat, axis=1)
                s2 += tl.sum(g, axis=1)
        c1 = tl.div_rn(s1, count)
        c2 = tl.div_rn(s2, count)
        for c0 in range(0, channels, BLOCK_C):
            acc_w = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
            acc_b = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
            for s0 in range(0, S, BLOCK_S):
                ch, sp, mask = _tile(c0, s0, row_ok, channels, S, BLOCK_C, BLOCK_S)
                x_hat, dy, g = _grad_tile(
                    X, DY, W, mean, rstd, sample, first, ch, sp, mask,
                    stride_xn, stride_xc, stride_xs, stride_dn, stride_dc, stride_ds,
                    weight_offset, HAS_W, INTERPRETED,
                )  # fmt: skip
                dx = (g - c2[:, None] - x_hat * c1[:, None]) * rstd[:, None]
                offsets = _offsets(sample, first, ch, sp, stride_gn, stride_gc, stride_gs)
                store_rounded(DX + offsets, dx, mask, INTERPRETED)
                acc_w += _channel_sums(dy * x_hat, BLOCK_R, BLOCK_C, BLOCK_S)
                acc_b += _channel_sums(dy, BLOCK_R, BLOCK_C, BLOCK_S)
            _store_channel_sums(
                PW, PB, acc_w, acc_b, sample, first, row_ok, c0, channels, C,
                ACC_W, ACC_B, BLOCK_C,
            )  # fmt: skip
