"""A case's inputs: drawn from its seed, exact in its dtype, then laid out as the case says.

Inputs are made once as NumPy arrays of the case's dtype (the references take them as they
are) and converted to torch tensors for the adapter in the case's memory layouts
(:mod:`conformance.layouts`): the input's (and the other summand's), the affine parameters' and
the upstream gradients'. Storage the tensor does not view holds NaN, so a kernel that ignores a
stride or an offset reads poison. Values along an expanded (stride-0) dimension are drawn equal.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

import ml_dtypes
import numpy as np

from conformance.cases import Case
from conformance.distributions import draw, draw_affine, draw_grad
from conformance.layouts import CONTIGUOUS, Layout, as_layout, place, replicate
from conformance.specs import spec
from references.conventions import rms_norm_default_eps
from references.formats import format_of

NUMPY_DTYPES: dict[str, Any] = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
}


@dataclass
class CaseInputs:
    """Typed NumPy arrays (``arrays``) and the case's scalar parameters (``params``)."""

    case: Case
    arrays: dict[str, np.ndarray | None]
    params: dict[str, Any]
    grads: dict[str, np.ndarray | None] = field(default_factory=dict)


def _typed(values: np.ndarray, dtype: str) -> np.ndarray:
    typed = np.asarray(values, dtype=np.float64).astype(NUMPY_DTYPES[dtype])
    if not np.array_equal(typed.astype(np.float64), values, equal_nan=True):
        raise AssertionError(f"drawn values are not exact in {dtype}")
    return typed


def effective_eps(case: Case) -> float:
    """The ε in effect: the case's, or ``rms_norm``'s ``eps=None`` default for its dtype."""
    if case.eps is not None:
        return float(case.eps)
    return rms_norm_default_eps(format_of(np.dtype(NUMPY_DTYPES[case.dtype])))


def build_inputs(case: Case) -> CaseInputs:
    """Draw every input of ``case`` from its seed (same case, same inputs, on any machine)."""
    rng = np.random.default_rng(case.seed)
    s, g = spec(case.norm), case.grouping
    eps = effective_eps(case)
    x = g.from_rows(draw(case.distribution, g.groups, g.n, case.dtype, rng, eps=eps))
    x = replicate(x, case.layout)
    arrays: dict[str, np.ndarray | None] = {"input": _typed(x, case.dtype)}
    if s.summand is not None:
        # The other summand is a modest perturbation, so the sum keeps the distribution's shape.
        other = draw_grad(case.shape, case.dtype, rng) * 2.0**-4
        arrays[s.summand] = _typed(round_into(other, case.dtype), case.dtype)
    arrays["weight"] = None
    arrays["bias"] = None
    if case.affine:
        shape = case.shape[len(case.shape) - case.norm_dims :] if s.trailing else (g.params,)
        weight = draw_affine("weight", g.params, case.dtype, rng).reshape(shape)
        arrays["weight"] = _typed(replicate(weight, case.param_layout), case.dtype)
        if s.has_bias:
            bias = draw_affine("bias", g.params, case.dtype, rng).reshape(shape)
            arrays["bias"] = _typed(replicate(bias, case.param_layout), case.dtype)
    if case.norm == "batch_norm":
        channels = case.shape[1]
        mean = draw_affine("bias", channels, case.dtype, rng)
        var = np.abs(draw_affine("weight", channels, case.dtype, rng)) + 0.25
        arrays["running_mean"] = _typed(round_into(mean, case.dtype), case.dtype)
        arrays["running_var"] = _typed(round_into(var, case.dtype), case.dtype)

    def upstream() -> np.ndarray:
        return _typed(
            replicate(draw_grad(case.shape, case.dtype, rng), case.grad_layout), case.dtype
        )

    grads: dict[str, np.ndarray | None] = {"grad_output": upstream()}
    if s.fused:
        grads["grad_residual_out"] = upstream()
    return CaseInputs(case, arrays, case.parameters(), grads)


def layout_of(case: Case, name: str) -> Layout:
    """The layout of the tensor ``name`` of ``case``: the input's for the input (the other
    summand takes it too, except its stride-0 dimensions: an in-place residual must be
    writable), the parameters' for weight and bias, the gradients' for the upstream gradients;
    running statistics are contiguous."""
    if name == "input":
        return case.layout
    if name in ("residual", "sublayer_output"):
        return replace(case.layout, broadcast=())
    if name in ("weight", "bias"):
        return case.param_layout
    if name.startswith("grad_"):
        return case.grad_layout
    return CONTIGUOUS


def round_into(values: Any, dtype: str) -> np.ndarray:
    """Float64 values rounded (to nearest) into ``dtype`` and back: exact float64 values of it."""
    return np.asarray(values, dtype=np.float64).astype(NUMPY_DTYPES[dtype]).astype(np.float64)


def inputs_digest(inputs: CaseInputs) -> str:
    """The case (but for its layouts, which change no value) and every input value (inputs
    need not come from the case's seed): the same values in other layouts, as the layout
    diagnosis reruns them, share their references."""
    plain = replace(inputs.case, layout=CONTIGUOUS, grad_layout=CONTIGUOUS, param_layout=CONTIGUOUS)
    h = hashlib.sha256(plain.case_id.encode())
    for name, array in sorted({**inputs.arrays, **inputs.grads}.items()):
        h.update(name.encode())
        if array is not None:
            h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


# -- torch side -----------------------------------------------------------------------------------
def torch_dtype(dtype: str) -> Any:
    import torch

    return getattr(torch, dtype)


def to_tensor(
    array: np.ndarray,
    device: str,
    layout: Layout | str = CONTIGUOUS,
    requires_grad: bool = False,
) -> Any:
    """``array`` as a leaf tensor of its dtype on ``device`` in ``layout``
    (:func:`conformance.layouts.place`: a fresh storage, never shared with ``array``)."""
    import torch

    dtype = torch_dtype(np.dtype(array.dtype).name)
    base = torch.from_numpy(np.asarray(array, dtype=np.float64)).to(dtype)
    tensor = place(base, as_layout(layout), device).detach()
    return tensor.requires_grad_(requires_grad)


def to_numpy(tensor: Any) -> np.ndarray:
    """Exact float64 values of a torch tensor of any supported dtype."""
    import torch

    t = tensor.detach().to("cpu")
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.to(torch.float32)
    return np.asarray(t.numpy(), dtype=np.float64)
