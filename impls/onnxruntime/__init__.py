"""onnxruntime's CPU execution provider running the ONNX normalization operators.

Each call builds (once, then cached) a one-node ONNX model (:mod:`impls.onnxruntime.graphs`) and
runs it on the torch tensors' memory (:mod:`impls.onnxruntime.sessions`). What each norm computes:

- ``layer_norm``: LayerNormalization (opset 17), ``axis = -len(normalized_shape)``;
- ``rms_norm``: RMSNormalization (opset 23); ``eps=None`` is PyTorch's, the machine epsilon of
  the opmath type (``2**-23``, ``2**-52`` for float64);
- ``group_norm``: GroupNormalization (opset 21: per-channel scale and bias, as PyTorch). The CPU
  execution provider has no kernel for it and runs the operator's ONNX function body, which
  computes ``Var = ReduceMean(X * X) - Mean * Mean`` (seen: NaN for a float32 group of mean 1000
  and spread 0.05);
- ``instance_norm``: InstanceNormalization; ONNX keeps no running statistics, so passing
  ``running_mean``/``running_var`` or ``use_input_stats=False`` raises ``ValueError``;
- ``batch_norm``: BatchNormalization (opset 15), ``training_mode=1`` when training, with ONNX's
  running update ``running = momentum * running + (1 - momentum) * batch`` (momentum weights the
  RUNNING value) and the BIASED batch variance, written back into the caller's running tensors;
  ``momentum=None`` (a cumulative average) has no ONNX form and raises ``ValueError``;
- ``deep_norm``, ``fused_add_layer_norm``: ``Mul`` and ``Add``, then LayerNormalization;
  ``fused_add_rms_norm``: ``Mul`` and ``Add``, then RMSNormalization.

Conventions, as declared in ``normconf_conventions``: PyTorch's (biased variance, eps inside the
root) except BatchNorm's running statistics, ``running_variance="biased"`` and
``momentum_weights="running"`` (preset ``onnx.batch_norm``). Not declarable, hence left to the
tolerance model: eps and momentum are FLOAT attributes, so the runtime uses their float32
roundings; the statistics of float16 inputs are computed in float32 (``stash_type=1``), of
float64 inputs in float64 (``stash_type=11`` is set for them); an alpha other than 1 is rounded
into the input dtype and ``alpha * r`` is rounded before the sum (float16 ``Mul`` and ``Add`` run
in float32 between casts that the runtime inserts, so there the sum reaches float16 in one step).

A missing weight or bias is fed as ones or zeros of the input dtype; weights, biases and running
statistics of another dtype are converted to the input dtype. ``normconf_dtypes`` is what the CPU
execution provider actually runs: found by running each norm on a tiny input in each dtype, once,
when the attribute is first read (when the adapter is loaded). No backward (``normconf_backward =
False``). ``normconf_reduction = "sequential"``: the conservative length term, since nothing
documents the CPU kernels' loops as tree (pairwise) sums.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from impls.adapter import NORMS, AdapterError, normalized_dims

try:
    import onnx  # noqa: F401  (the graphs need it; fail here with the install hint)
    import onnxruntime  # type: ignore[import-untyped]  # noqa: F401
except ImportError:
    raise AdapterError("onnxruntime is not installed: pip install onnxruntime onnx") from None

from impls.onnxruntime.graphs import GraphKey
from impls.onnxruntime.sessions import dtype_name, run

normconf_name = "onnxruntime (CPU execution provider)"
normconf_devices = ("cpu",)
normconf_backward = False
normconf_reduction = "sequential"
normconf_conventions = {
    "batch_norm": {"running_variance": "biased", "momentum_weights": "running"},
}

# ONNX TensorProto.DataType codes for the statistics' precision (LayerNormalization et al.).
_STASH_FLOAT, _STASH_DOUBLE = 1, 11


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    shape = tuple(normalized_dims(normalized_shape))
    attributes = {"axis": -len(shape), "epsilon": eps, "stash_type": _stash(input)}
    params = _affine(input, shape, weight, bias)
    return _run("layer_norm", input, len(shape), attributes, [input, *params])[0]


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    shape = tuple(normalized_dims(normalized_shape))
    attributes = {"axis": -len(shape), "epsilon": _rms_eps(input, eps), "stash_type": _stash(input)}
    scale = _affine(input, shape, weight, None)[0]
    return _run("rms_norm", input, len(shape), attributes, [input, scale])[0]


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    attributes = {"num_groups": num_groups, "epsilon": eps, "stash_type": _stash(input)}
    params = _affine(input, (input.shape[1],), weight, bias)
    return _run("group_norm", input, 1, attributes, [input, *params])[0]


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    if running_mean is not None or running_var is not None or not use_input_stats:
        raise ValueError(
            "onnxruntime adapter: ONNX InstanceNormalization keeps no running statistics; call "
            "instance_norm without running_mean/running_var and with use_input_stats=True"
        )
    params = _affine(input, (input.shape[1],), weight, bias)
    return _run("instance_norm", input, 1, {"epsilon": eps}, [input, *params])[0]


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    channels = input.shape[1]
    params = _affine(input, (channels,), weight, bias)
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(
                "batch_norm: running_mean and running_var are required unless training"
            )
        inputs = [input, *params, running_mean, running_var]
        return _run("batch_norm", input, 1, {"epsilon": eps}, inputs)[0]
    if momentum is None:
        raise ValueError(
            "onnxruntime adapter: momentum=None (a cumulative average) has no ONNX "
            "BatchNormalization form; pass a float momentum"
        )
    mean = running_mean if running_mean is not None else input.new_zeros(channels)
    var = running_var if running_var is not None else input.new_ones(channels)
    attributes = {"epsilon": eps, "momentum": momentum, "training_mode": 1}
    y, new_mean, new_var = _run(
        "batch_norm_train",
        input,
        1,
        attributes,
        [input, *params, mean, var],
        (channels,),
        (channels,),
    )
    with torch.no_grad():  # in place, as torch.nn.functional.batch_norm updates them
        for target, value in ((running_mean, new_mean), (running_var, new_var)):
            if target is not None:
                target.copy_(value)
    return y


def deep_norm(
    input: Tensor,
    sublayer_output: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    alpha: float = 1.0,
    eps: float = 1e-5,
) -> Tensor:
    shape = tuple(normalized_dims(normalized_shape))
    attributes = {"axis": -len(shape), "epsilon": eps, "stash_type": _stash(input)}
    inputs = [input, sublayer_output, _scalar(input, alpha), *_affine(input, shape, weight, bias)]
    return _run("deep_norm", input, len(shape), attributes, inputs)[0]


def fused_add_rms_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    alpha: float = 1.0,
) -> tuple[Tensor, Tensor]:
    shape = tuple(normalized_dims(normalized_shape))
    attributes = {"axis": -len(shape), "epsilon": _rms_eps(input, eps), "stash_type": _stash(input)}
    scale = _affine(input, shape, weight, None)[0]
    inputs = [input, residual, _scalar(input, alpha), scale]
    y, z = _run("fused_add_rms_norm", input, len(shape), attributes, inputs, input.shape)
    return y, z


def fused_add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    alpha: float = 1.0,
) -> tuple[Tensor, Tensor]:
    shape = tuple(normalized_dims(normalized_shape))
    attributes = {"axis": -len(shape), "epsilon": eps, "stash_type": _stash(input)}
    inputs = [input, residual, _scalar(input, alpha), *_affine(input, shape, weight, bias)]
    y, z = _run("fused_add_layer_norm", input, len(shape), attributes, inputs, input.shape)
    return y, z


# -- plumbing ----------------------------------------------------------------------------------


def _run(
    kind: str,
    input: Tensor,
    param_rank: int,
    attributes: dict[str, Any],
    inputs: Sequence[Tensor],
    *extra_shapes: Sequence[int],
) -> list[Tensor]:
    """Run ``kind`` on ``inputs``; outputs: Y (``input``'s shape), then ``extra_shapes``."""
    key = GraphKey(
        kind, dtype_name(input), input.dim(), param_rank, tuple(sorted(attributes.items()))
    )
    shapes = [tuple(input.shape), *(tuple(shape) for shape in extra_shapes)]
    return run(key, inputs, shapes)


def _stash(input: Tensor) -> int:
    return _STASH_DOUBLE if input.dtype == torch.float64 else _STASH_FLOAT


def _rms_eps(input: Tensor, eps: float | None) -> float:
    """PyTorch's ``eps=None``: the machine epsilon of the opmath type."""
    if eps is not None:
        return float(eps)
    return float(torch.finfo(torch.float64 if input.dtype == torch.float64 else torch.float32).eps)


def _scalar(input: Tensor, value: float) -> Tensor:
    return torch.tensor(value, dtype=input.dtype)


def _affine(
    input: Tensor, shape: Sequence[int], weight: Tensor | None, bias: Tensor | None
) -> list[Tensor]:
    """Scale and bias of ``shape``: ones and zeros where absent."""
    scale = weight if weight is not None else torch.ones(tuple(shape), dtype=input.dtype)
    shift = bias if bias is not None else torch.zeros(tuple(shape), dtype=input.dtype)
    return [scale, shift]


def _probe(norm: str, dtype: torch.dtype) -> bool:
    """Whether ``norm`` runs in ``dtype`` on the CPU execution provider (a tiny real call)."""
    x = torch.linspace(-1.0, 1.0, 2 * 4 * 3).reshape(2, 4, 3).to(dtype)
    c = torch.ones(4, dtype=dtype)
    calls: dict[str, Callable[[], object]] = {
        "layer_norm": lambda: layer_norm(x, (3,)),
        "rms_norm": lambda: rms_norm(x, (3,)),
        "group_norm": lambda: group_norm(x, 2),
        "instance_norm": lambda: instance_norm(x),
        "batch_norm": lambda: (
            batch_norm(x, c - 1, c.clone()),
            batch_norm(x, c - 1, c.clone(), training=True),
        ),
        "deep_norm": lambda: deep_norm(x, x, (3,), alpha=0.5),
        "fused_add_rms_norm": lambda: fused_add_rms_norm(x, x, (3,), alpha=0.5),
        "fused_add_layer_norm": lambda: fused_add_layer_norm(x, x, (3,), alpha=0.5),
    }
    try:
        calls[norm]()
    except Exception:  # any failure means: not runnable in this dtype here
        return False
    return True


@functools.cache
def supported_dtypes() -> dict[str, tuple[str, ...]]:
    """Per norm, the dtypes the CPU execution provider really runs (probed once)."""
    from impls.onnxruntime.sessions import TORCH_DTYPES

    return {
        norm: tuple(name for dtype, name in TORCH_DTYPES.items() if _probe(norm, dtype))
        for norm in NORMS
    }


def __getattr__(name: str) -> Any:
    # normconf_dtypes is computed when first read, so importing this module runs nothing.
    if name == "normconf_dtypes":
        return supported_dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
