"""Cached inference sessions, run on torch tensors through I/O binding (no copies).

Inputs are bound to the memory of contiguous CPU torch tensors and outputs to freshly allocated
torch tensors, by pointer and ONNX element type. That is also how bfloat16 crosses the boundary:
numpy has no bfloat16, and onnxruntime's numpy conversion refuses the type.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import onnxruntime as ort  # type: ignore[import-untyped]
import torch

from impls.onnxruntime.graphs import ELEMENT_TYPES, GraphKey, build, input_names, output_names

TORCH_DTYPES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
PROVIDERS = ["CPUExecutionProvider"]

_sessions: dict[GraphKey, ort.InferenceSession] = {}
_lock = threading.Lock()


def session(key: GraphKey) -> ort.InferenceSession:
    """The session of ``key``, built and cached on first use."""
    with _lock:
        found = _sessions.get(key)
        if found is None:
            options = ort.SessionOptions()
            options.log_severity_level = 3  # errors reach the caller as exceptions anyway
            # Idle worker threads sleep instead of spinning: between two runs the references
            # compute on the same cores.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            found = ort.InferenceSession(build(key), options, providers=PROVIDERS)
            _sessions[key] = found
        return found


def run(
    key: GraphKey, inputs: Sequence[torch.Tensor], output_shapes: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """Run ``key``'s model on ``inputs`` (in :func:`input_names` order, all of ``key.dtype``),
    returning new tensors of ``output_shapes`` (in :func:`output_names` order)."""
    dtype = _torch_dtype(key.dtype)
    element = ELEMENT_TYPES[key.dtype]
    binding = session(key).io_binding()
    # Contiguous CPU copies only where needed; kept referenced until the run has finished.
    held = [t.detach().to(device="cpu", dtype=dtype).contiguous() for t in inputs]
    # An empty tensor's data pointer is null, which a binding refuses ("Pointer to data memory
    # is not valid"): it is bound to one element of its own that nothing reads or writes.
    placeholder = torch.empty(1, dtype=dtype)

    def pointer(tensor: torch.Tensor) -> int:
        return tensor.data_ptr() if tensor.numel() else placeholder.data_ptr()

    for name, tensor in zip(input_names(key.kind), held, strict=True):
        binding.bind_input(name, "cpu", 0, element, list(tensor.shape), pointer(tensor))
    outputs = [torch.empty(tuple(shape), dtype=dtype) for shape in output_shapes]
    for name, tensor in zip(output_names(key.kind), outputs, strict=True):
        binding.bind_output(name, "cpu", 0, element, list(tensor.shape), pointer(tensor))
    session(key).run_with_iobinding(binding)
    return outputs


def dtype_name(tensor: torch.Tensor) -> str:
    """The dtype name of a floating tensor this adapter can feed."""
    name = TORCH_DTYPES.get(tensor.dtype)
    if name is None:
        raise TypeError(f"onnxruntime adapter: unsupported input dtype {tensor.dtype}")
    if tensor.device.type != "cpu":
        raise ValueError(
            f"onnxruntime adapter runs on the CPU execution provider; got a {tensor.device} tensor"
        )
    return name


def _torch_dtype(name: str) -> torch.dtype:
    return next(dtype for dtype, known in TORCH_DTYPES.items() if known == name)
