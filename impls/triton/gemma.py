"""Gemma's RMSNorm on the same Triton kernels: the ``triton-gemma`` adapter.

Gemma (Hugging Face ``GemmaRMSNorm``) stores its RMSNorm weight as an offset from one and scales
by ``1 + w``, in float32, before rounding into the input dtype::

    y = x * rstd * (1 + w),    rstd = 1 / sqrt(mean(x^2) + eps)

which is the references' ``weight_offset=1.0``; the kernels of :mod:`impls.triton` take it as
their ``weight_offset`` argument (``w' = w + weight_offset`` in float32; the weight gradient is
unchanged, ``sum dy * x_hat``, and the input gradient uses ``w'``). Without a weight the scale
is 1, as in the references. Only ``rms_norm`` and ``fused_add_rms_norm`` (and
``rms_norm_with_stats``); devices, dtypes, numerics, ``out=`` and everything else as
:mod:`impls.triton`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from impls.triton import normconf_devices, normconf_dtypes, normconf_reduction, rms_eps
from impls.triton.rows import RowNorm, normalize_rows

#: Gemma's scale is ``1 + weight``.
WEIGHT_OFFSET = 1.0

normconf_name = "triton (Gemma RMSNorm, 1 + w)"
normconf_out = True
normconf_conventions: dict[str, dict[str, object]] = {
    "rms_norm": {"weight_offset": WEIGHT_OFFSET},
    "fused_add_rms_norm": {"weight_offset": WEIGHT_OFFSET, "add_rounding": "dtype"},
}
__all__ = [
    "fused_add_rms_norm",
    "normconf_conventions",
    "normconf_devices",
    "normconf_dtypes",
    "normconf_name",
    "normconf_out",
    "normconf_reduction",
    "rms_norm",
    "rms_norm_with_stats",
]


def rms_norm_with_stats(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> tuple[Tensor, None, Tensor]:
    """Gemma's RMSNorm with its float32 rstd per row (no mean)."""
    norm = RowNorm(center=False, weight_offset=WEIGHT_OFFSET)
    r = normalize_rows(norm, input, None, normalized_shape, weight, None, rms_eps(eps))
    return r.output, None, r.rstd


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """``x / sqrt(mean(x^2) + eps) * (1 + weight)`` over the trailing dims."""
    norm = RowNorm(center=False, weight_offset=WEIGHT_OFFSET)
    given = None if out is None else (out,)
    r = normalize_rows(norm, input, None, normalized_shape, weight, None, rms_eps(eps), given)
    return r.output


def fused_add_rms_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    alpha: float = 1.0,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(rms_norm(z), z)`` with Gemma's ``1 + weight`` and ``z = input + alpha * residual``
    rounded into the dtype."""
    norm = RowNorm(
        center=False, summand="residual", alpha=float(alpha), weight_offset=WEIGHT_OFFSET
    )
    r = normalize_rows(norm, input, residual, normalized_shape, weight, None, rms_eps(eps), out)
    assert r.residual is not None
    return r.output, r.residual
