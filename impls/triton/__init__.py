"""Our own Triton kernels for LayerNorm, RMSNorm, GroupNorm, DeepNorm and the fused residual
add + norm, forward and backward: the ``triton`` adapter (its Gemma twin is
:mod:`impls.triton.gemma`).

Devices. Importing this package decides where the kernels run (:mod:`impls.triton.runtime`).
When ``TRITON_INTERPRET`` is unset and torch sees no CUDA GPU, it sets ``TRITON_INTERPRET=1``
before ``triton`` is imported — Triton reads the variable when ``@triton.jit`` decorates a
function, its own library (``tl.sum``) included, at its import — and the kernels run under
Triton's interpreter, as NumPy code on CPU tensors: ``normconf_devices = ("cpu",)``. Otherwise
the variable is left as it is and, unless it says ``1``, the kernels compile for the GPU:
``("cuda",)``. A process that imported triton for compiled kernels before this package cannot
interpret them (an :class:`~impls.adapter.AdapterError` says to set ``TRITON_INTERPRET=1``);
without triton installed the error is "the triton adapter needs the triton package: pip install
'normconf[triton]'". ``python -m impls.triton.compile_check`` compiles every kernel variant for
a GPU architecture on a machine without one.

Numerics. float32, float16 and bfloat16 in and out (``normconf_dtypes``), float32 inside, each
output and gradient rounded once, to nearest even, into its dtype. Statistics by two passes
over a tile held in registers (the mean, then the sum of squared deviations), with Chan et al.'s
merge across the chunks of rows or groups wider than a tile; never ``E[x^2] - E[x]^2``. Every
sum is a tree (``tl.sum``: a few elements per thread in sequence, then a butterfly across
threads): ``normconf_reduction = "tree"``. The kernels' math is in the docstrings of
:mod:`impls.triton.row_kernels` and :mod:`impls.triton.group_kernels`.

Conventions: PyTorch's — biased variance, eps under the square root, no weight offset (Gemma's
``1 + w`` is the other adapter's). ``rms_norm``'s ``eps=None`` is float32's machine epsilon
``2**-23``, what ATen uses for these dtypes (the references agree). The add-norms (``deep_norm``,
``fused_add_*``) compute ``z`` in float32 and round it into the input dtype before normalising
it (``add_rounding="dtype"``), as a model that stores its residual stream does; the fused adds
return that rounded ``z``.

Gradients. Each norm is one ``torch.autograd.Function``: ``grad_input``, ``grad_weight``,
``grad_bias``; the fused adds' ``grad_input = dz`` and ``grad_residual = alpha * dz``, where
``dz`` includes the upstream gradient of the returned ``z``; DeepNorm's
``grad_sublayer_output = dz`` and ``grad_input = alpha * dz``. Weight and bias gradients are
reduced from per-program float32 partial sums in a fixed order, without atomics: the same
inputs give bitwise the same outputs and gradients (``normconf_deterministic``, by default).

Layouts. Strided inputs are read in place where the normalised dims collapse to one stride
(and the others to one more): row- or column-strided views, expanded gradients, channels-last
GroupNorm inputs. Other layouts are copied to contiguous first. Outputs are contiguous, except
that GroupNorm's keep a dense input's layout (channels-last stays channels-last).

Provided buffers. The trailing norms (``layer_norm``, ``rms_norm``, ``deep_norm``, the fused
adds) take a keyword ``out=``: a tensor like the input (the fused adds: the tuple ``(output,
residual_out)``), written by the kernel and returned itself (``normconf_out``). As torch's
``out=`` variants, these calls build no autograd graph and refuse arguments that require grad
while grad mode is on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from impls.triton import runtime
from impls.triton.groups import normalize_groups
from impls.triton.rows import RowNorm, normalize_rows

normconf_name = "triton (normconf kernels)"
normconf_devices = runtime.DEVICES
normconf_dtypes = ("float32", "float16", "bfloat16")
normconf_reduction = "tree"
normconf_out = ("layer_norm", "rms_norm", "deep_norm", "fused_add_rms_norm", "fused_add_layer_norm")
normconf_conventions: dict[str, dict[str, object]] = {
    "deep_norm": {"add_rounding": "dtype"},
    "fused_add_rms_norm": {"add_rounding": "dtype"},
    "fused_add_layer_norm": {"add_rounding": "dtype"},
}

#: ``rms_norm``'s ``eps=None``: the machine epsilon of float32, the kernels' opmath type.
RMS_NORM_DEFAULT_EPS = torch.finfo(torch.float32).eps


def rms_eps(eps: float | None) -> float:
    """``eps``, or PyTorch's default for ``rms_norm`` when None."""
    return RMS_NORM_DEFAULT_EPS if eps is None else float(eps)


def layer_norm_with_stats(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over the trailing dims, with its float32 mean and rstd per row."""
    r = normalize_rows(RowNorm(center=True), input, None, normalized_shape, weight, bias, eps)
    return r.output, r.mean, r.rstd


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the trailing dims."""
    norm, given = RowNorm(center=True), None if out is None else (out,)
    return normalize_rows(norm, input, None, normalized_shape, weight, bias, eps, given).output


def rms_norm_with_stats(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> tuple[Tensor, None, Tensor]:
    """RMSNorm over the trailing dims, with its float32 rstd per row (no mean)."""
    norm = RowNorm(center=False)
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
    """``x / sqrt(mean(x^2) + eps) * weight`` over the trailing dims."""
    norm, given = RowNorm(center=False), None if out is None else (out,)
    r = normalize_rows(norm, input, None, normalized_shape, weight, None, rms_eps(eps), given)
    return r.output


def group_norm_with_stats(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    """GroupNorm with its float32 mean and rstd per (sample, group)."""
    return normalize_groups(input, num_groups, weight, bias, eps)


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """GroupNorm of an ``(N, C, *spatial)`` input, per-channel weight and bias."""
    return normalize_groups(input, num_groups, weight, bias, eps)[0]


def deep_norm(
    input: Tensor,
    sublayer_output: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    alpha: float = 1.0,
    eps: float = 1e-5,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """``layer_norm(alpha * input + sublayer_output)``, the sum rounded into the dtype."""
    norm = RowNorm(center=True, summand="sublayer_output", alpha=float(alpha))
    given = None if out is None else (out,)
    r = normalize_rows(norm, input, sublayer_output, normalized_shape, weight, bias, eps, given)
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
    """``(rms_norm(z), z)`` with ``z = input + alpha * residual`` rounded into the dtype."""
    norm = RowNorm(center=False, summand="residual", alpha=float(alpha))
    r = normalize_rows(norm, input, residual, normalized_shape, weight, None, rms_eps(eps), out)
    assert r.residual is not None
    return r.output, r.residual


def fused_add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    alpha: float = 1.0,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(layer_norm(z), z)`` with ``z = input + alpha * residual`` rounded into the dtype."""
    norm = RowNorm(center=True, summand="residual", alpha=float(alpha))
    r = normalize_rows(norm, input, residual, normalized_shape, weight, bias, eps, out)
    assert r.residual is not None
    return r.output, r.residual
