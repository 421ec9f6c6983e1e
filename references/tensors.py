"""The boundary: torch tensors and NumPy arrays in, exact float64 values inside, same kind out.

Every supported format (float64, float32, float16, bfloat16) embeds exactly in float64, so the
math core sees plain float64 arrays together with the :class:`~references.formats.Format` the
values came from. Results, already correctly rounded, are converted back without a second
rounding: each value is exactly representable in the destination dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from references.formats import Format, format_of


@dataclass(frozen=True)
class Operand:
    """An input converted to exact float64 values, with what is needed to answer in kind."""

    values: np.ndarray
    fmt: Format
    is_torch: bool
    device: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)


def _is_torch(obj: object) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "detach")


def operand(obj: object, name: str) -> Operand:
    """Convert ``obj`` (a torch tensor or NumPy array) named ``name`` in error messages."""
    if _is_torch(obj):
        tensor: Any = obj
        if tensor.is_complex() or not tensor.is_floating_point():
            raise ValueError(f"{name}: unsupported dtype {tensor.dtype}; expected a float tensor")
        fmt = format_of(tensor.dtype)
        cpu = tensor.detach().to("cpu")
        if fmt.name == "bfloat16":
            cpu = cpu.to(dtype=_torch().float32)  # exact; NumPy has no bfloat16 of torch's
        return Operand(cpu.numpy().astype(np.float64), fmt, True, tensor.device)
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind != "f" and obj.dtype.name != "bfloat16":
            raise ValueError(f"{name}: unsupported dtype {obj.dtype}; expected a float array")
        fmt = format_of(obj.dtype)
        return Operand(obj.astype(np.float64), fmt, False)
    raise ValueError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(obj).__name__}")


def optional_operand(obj: object, name: str) -> Operand | None:
    return None if obj is None else operand(obj, name)


def answer(values: np.ndarray, fmt: Format, like: Operand) -> Any:
    """Correctly rounded float64 ``values`` as a tensor/array of ``fmt``, in ``like``'s kind."""
    if not like.is_torch:
        return values.astype(fmt.numpy_dtype)
    torch = _torch()
    # Narrow in NumPy where it has the dtype (exact: the values are representable), so that
    # torch wraps the array without another copy; bfloat16 goes through float32, also exact.
    native = np.float32 if fmt.name == "bfloat16" else fmt.numpy_dtype
    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=native))
    return tensor.to(dtype=fmt.torch_dtype, device=like.device)


def write_back(target: Any, values: np.ndarray) -> None:
    """Store exactly representable ``values`` into ``target`` in place (running statistics)."""
    if _is_torch(target):
        torch = _torch()
        with torch.no_grad():
            target.copy_(torch.from_numpy(values).to(dtype=target.dtype))
    else:
        target[...] = values.astype(target.dtype)


def _torch() -> Any:
    import torch

    return torch
