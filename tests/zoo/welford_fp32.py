"""Correct by another route: LayerNorm with float32 Welford statistics merged by a tree.

The shape of a GPU kernel's reduction: a block of ``THREADS`` threads, thread ``t`` running
Welford's update over elements ``t, t + THREADS, ...`` of the row::

    count += 1;  delta = x - mean;  mean += delta / count;  m2 += delta * (x - mean)

then the partials merged pairwise in a tree (thread ``t`` with ``t + half``) by Chan et al.'s
update ``mean = mean_a + delta·n_b/n``, ``m2 = m2_a + m2_b + delta²·n_a·n_b/n``. Everything is
float32 (16-bit inputs are widened, the output rounded once); the backward pass is the usual
``dx = r·(g - mean(g) - x̂·mean(g·x̂))``, ``g = dy·w``, also in float32. The suite must pass it
with ``normconf_reduction = "tree"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

normconf_name = "zoo: float32 Welford + tree merge (correct)"
normconf_dtypes = ("float32", "float16", "bfloat16")
normconf_reduction = "tree"

#: Threads of the modelled block (a power of two, so the merge tree is complete).
THREADS = 128


def _welford(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per thread (last dim) count, mean and M2 of the strided slices of each row."""
    r, n = rows.shape
    shape = (r, THREADS)
    count, mean, m2 = (torch.zeros(shape, dtype=torch.float32) for _ in range(3))
    for start in range(0, n, THREADS):
        chunk = rows[:, start : start + THREADS]
        width = chunk.shape[1]
        c, mu, q = count[:, :width] + 1, mean[:, :width], m2[:, :width]
        delta = chunk - mu
        mu = mu + delta / c
        q = q + delta * (chunk - mu)
        count = torch.cat([c, count[:, width:]], 1)
        mean = torch.cat([mu, mean[:, width:]], 1)
        m2 = torch.cat([q, m2[:, width:]], 1)
    return count, mean, m2


def _merge(count: Tensor, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan et al.'s pairwise merge, thread t with t + half, until one partial is left."""
    while count.shape[1] > 1:
        half = count.shape[1] // 2
        na, nb = count[:, :half], count[:, half:]
        ma, mb = mean[:, :half], mean[:, half:]
        total = na + nb
        share = torch.where(total > 0, nb / total.clamp_min(1), torch.zeros_like(total))
        delta = mb - ma
        mean = ma + delta * share
        m2 = m2[:, :half] + m2[:, half:] + delta * delta * na * share
        count = total
    return count, mean, m2


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, rows: Tensor, weight: Tensor, bias: Tensor, eps: float
    ) -> Tensor:
        x = rows.float()
        count, mean, m2 = _merge(*_welford(x))
        rstd = torch.rsqrt(m2 / count + eps)
        x_hat = (x - mean) * rstd
        ctx.save_for_backward(x_hat, rstd, weight)
        ctx.dtype = rows.dtype
        return (x_hat * weight + bias).to(rows.dtype)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:  # type: ignore[override]
        x_hat, rstd, weight = ctx.saved_tensors
        dy = dy.float()
        g = dy * weight
        projection = (g * x_hat).mean(-1, keepdim=True)
        dx = rstd * (g - g.mean(-1, keepdim=True) - x_hat * projection)
        return dx.to(ctx.dtype), (dy * x_hat).sum(0), dy.sum(0), None


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    count = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    trailing = input.shape[input.dim() - count :]
    rows = input.reshape(-1, trailing.numel())
    w = torch.ones(trailing) if weight is None else weight.float()
    b = torch.zeros(trailing) if bias is None else bias.float()
    out = _LayerNorm.apply(rows, w.reshape(-1), b.reshape(-1), eps)
    return out.reshape(input.shape)
