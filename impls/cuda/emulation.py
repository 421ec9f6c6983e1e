"""The CUDA kernels on the CPU, for tests and debugging without a GPU.

``csrc/emulation.cpp`` compiles the kernels and launchers of ``forward.cu`` and ``backward.cu``
unchanged against ``csrc/emulation.h``, a CPU emulation of the CUDA execution model: a block's
threads are fibers on one CPU thread, switched at every ``__syncthreads()`` and warp shuffle,
blocks one after another. The launchers pick the row mapping and the pack width exactly as on
the GPU, and the same kernel code runs; results agree with the GPU's to rounding, not bitwise
(the host compiler contracts multiply-adds differently).

- :class:`Kernels`: the launchers through ctypes, on NumPy arrays.
- :class:`Operators`: the same, shaped like the ``torch.ops.normconf_cuda`` operators, on CPU
  tensors.
- :class:`Emulated`: the ``impls.cuda`` adapter on those operators, ``normconf_devices =
  ("cpu",)``: ``normconf certify --adapter impls.cuda.emulation:Emulated --device cpu``
  certifies the kernels' logic on a machine without a GPU (slowly: one fiber per CUDA thread).

Checked on every call, and raised as :class:`EmulationError`: a 16-byte pack at a misaligned
address (a fault on the GPU), threads of a block or warp that diverge around a barrier or
shuffle (a hang or undefined behaviour on the GPU), a partial shuffle mask, a block that is not
a whole number of warps, and any write outside an output (each output sits between guard zones
that must come back untouched).

Building needs nvcc, as the host compiler's driver for the CUDA headers of the 16-bit types;
the library is cached under ``build.cache_dir() / "emulation"``, named by a hash of the sources
and the command.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import torch

import impls.cuda as cuda
from impls.cuda import build

#: Kernel dtype codes (``normconf::Dtype``).
DTYPE_CODES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(ml_dtypes.bfloat16): 2}
#: Elements of poison on each side of every output.
GUARD = 64
#: Alignment of fresh buffers, as from torch's allocator (which gives at least 256 bytes).
ALIGNMENT = 256

_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "nc_forward": [_INT, _INT, _P, _I64, _P, _P, _P, _P, _P, _P, _I64, _INT, _F],
    "nc_backward_input": [_INT, _INT, _P, _I64, _P, _I64, _P, _P, _P, _P, _I64, _INT],
    "nc_param_grad": [_INT, _INT, _P, _I64, _P, _I64, _P, _P, _P, _P, _P, _P, _I64, _INT],
    "nc_plan": [_I64, _INT, ctypes.POINTER(_I64), ctypes.POINTER(_I64)],
}


class EmulationError(RuntimeError):
    """The emulated kernels did something that would fault or be wrong on the GPU."""


def aligned_empty(count: int, dtype: np.dtype, offset: int = 0) -> np.ndarray:
    """A 1-D array of ``count`` elements starting ``offset`` elements past an
    :data:`ALIGNMENT`-byte boundary, filled with NaN."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty((count + offset) * itemsize + ALIGNMENT, dtype=np.uint8)
    skip = (-raw.ctypes.data) % ALIGNMENT + offset * itemsize
    array = raw[skip : skip + count * itemsize].view(dtype)
    array[...] = np.nan
    return array


@dataclass
class _Guarded:
    """An output between two poisoned guard zones."""

    buffer: np.ndarray
    array: np.ndarray
    name: str

    @classmethod
    def empty(cls, shape: tuple[int, ...], dtype: np.dtype, name: str) -> _Guarded:
        count = int(np.prod(shape))
        guard = max(GUARD, ALIGNMENT // np.dtype(dtype).itemsize)  # keeps the output aligned
        buffer = aligned_empty(count + 2 * guard, dtype)
        return cls(buffer, buffer[guard : guard + count].reshape(shape), name)

    def check(self) -> None:
        start = (self.array.ctypes.data - self.buffer.ctypes.data) // self.buffer.itemsize
        end = start + self.array.size
        outside = np.concatenate([self.buffer[:start], self.buffer[end:]])
        if not np.isnan(outside.astype(np.float64)).all():
            raise EmulationError(f"a kernel wrote outside {self.name}")


def _pointer(array: np.ndarray | None) -> int | None:
    return None if array is None else array.ctypes.data


def _row_stride(rows: np.ndarray) -> int:
    """Elements between rows of a 2-D array with unit stride along its rows."""
    if rows.ndim != 2 or (rows.shape[1] > 1 and rows.strides[1] != rows.itemsize):
        raise ValueError("expected a 2-D array with unit stride along its rows")
    return rows.strides[0] // rows.itemsize if rows.shape[0] > 1 else rows.shape[1]


class Kernels:
    """The emulated operators, on NumPy arrays of float32, float16 or ml_dtypes.bfloat16."""

    def __init__(self, library: Path) -> None:
        self._lib = ctypes.CDLL(str(library))
        for name, arguments in _SIGNATURES.items():
            getattr(self._lib, name).argtypes = arguments
        self._lib.nc_error.restype = ctypes.c_char_p

    def detects_misaligned_pack(self) -> bool:
        """Whether the emulation reports a 16-byte pack read from a misaligned address."""
        return bool(self._lib.nc_detects_misaligned_pack())

    def plan(self, rows: int, n: int) -> tuple[int, int]:
        """``(chunks, rows_per_chunk)`` of the weight and bias gradients."""
        chunks, per_chunk = _I64(), _I64()
        self._lib.nc_plan(rows, n, ctypes.byref(chunks), ctypes.byref(per_chunk))
        return chunks.value, per_chunk.value

    def forward(
        self,
        x: np.ndarray,
        weight: np.ndarray | None,
        bias: np.ndarray | None,
        eps: float,
        center: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(y, mean, centre, rstd)`` as the ``forward`` operator returns them."""
        rows, n = x.shape
        y = _Guarded.empty((rows, n), x.dtype, "y")
        stats = [_Guarded.empty((rows,), np.dtype(np.float32), s) for s in ("mean", "centre")]
        rstd = _Guarded.empty((rows,), np.dtype(np.float32), "rstd")
        mean, centre = (s.array if center else None for s in stats)
        self._call(
            [y, *stats, rstd],
            "nc_forward",
            DTYPE_CODES[x.dtype],
            int(center),
            _pointer(x),
            _row_stride(x),
            _pointer(weight),
            _pointer(bias),
            _pointer(y.array),
            _pointer(mean),
            _pointer(centre),
            _pointer(rstd.array),
            rows,
            n,
            eps,
        )
        return y.array, stats[0].array, stats[1].array, rstd.array

    def backward_input(
        self,
        dy: np.ndarray,
        x: np.ndarray,
        weight: np.ndarray | None,
        centre: np.ndarray | None,
        rstd: np.ndarray,
        center: bool,
    ) -> np.ndarray:
        """The input gradient ``dx`` (dense)."""
        rows, n = x.shape
        dx = _Guarded.empty((rows, n), x.dtype, "dx")
        self._call(
            [dx],
            "nc_backward_input",
            DTYPE_CODES[x.dtype],
            int(center),
            _pointer(dy),
            _row_stride(dy),
            _pointer(x),
            _row_stride(x),
            _pointer(weight),
            _pointer(centre),
            _pointer(rstd),
            _pointer(dx.array),
            rows,
            n,
        )
        return dx.array

    def param_grads(
        self,
        dy: np.ndarray,
        x: np.ndarray,
        centre: np.ndarray | None,
        rstd: np.ndarray,
        center: bool,
        wanted: tuple[bool, bool] = (True, True),
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(dw, db)``, the weight and bias gradients, through the chunked workspace;
        ``wanted`` says which are computed (the other is left NaN)."""
        rows, n = x.shape
        chunks, _ = self.plan(rows, n)
        f32 = np.dtype(np.float32)
        partials = [_Guarded.empty((chunks, n), f32, f"{g} workspace") for g in ("dw", "db")]
        grads = [_Guarded.empty((n,), x.dtype, g) for g in ("dw", "db")]
        pointers = [
            _pointer(g.array) if want else None
            for g, want in zip((*partials, *grads), wanted * 2, strict=True)
        ]
        self._call(
            [*partials, *grads],
            "nc_param_grad",
            DTYPE_CODES[x.dtype],
            int(center),
            _pointer(dy),
            _row_stride(dy),
            _pointer(x),
            _row_stride(x),
            _pointer(centre),
            _pointer(rstd),
            *pointers,
            rows,
            n,
        )
        return grads[0].array, grads[1].array

    def _call(self, outputs: list[_Guarded], name: str, *arguments: object) -> None:
        if getattr(self._lib, name)(*arguments) != 0:
            raise EmulationError(self._lib.nc_error().decode())
        for output in outputs:
            output.check()


def load(directory: Path | None = None, nvcc: str | None = None) -> Kernels:
    """Build the emulation library (cached in ``directory``, default
    ``build.cache_dir() / "emulation"``) and load it."""
    return Kernels(build.build_emulation(directory or build.cache_dir() / "emulation", nvcc))


# -- the operators and the adapter on CPU tensors ------------------------------------------------


def _numpy(tensor: torch.Tensor | None) -> np.ndarray | None:
    """A NumPy view of a CPU tensor's memory, same strides (bfloat16 as ml_dtypes')."""
    if tensor is None:
        return None
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if tensor.dtype not in (torch.float32, torch.float16):
        raise TypeError(
            f"the emulated kernels take float32, float16 or bfloat16, not {tensor.dtype}"
        )
    return tensor.numpy()


def _tensor(array: np.ndarray) -> torch.Tensor:
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


class Operators:
    """``forward`` and ``backward`` with the signatures and results of the
    ``torch.ops.normconf_cuda`` operators (see ``csrc/binding.cpp``), on CPU tensors."""

    def __init__(self, kernels: Kernels) -> None:
        self.kernels = kernels

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        center: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        y, mean, centre, rstd = self.kernels.forward(
            _numpy(x), _numpy(weight), _numpy(bias), eps, center
        )
        if not center:
            mean = centre = np.empty(0, dtype=np.float32)
        return _tensor(y), _tensor(mean), _tensor(centre), _tensor(rstd)

    def backward(
        self,
        dy: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        centre: torch.Tensor | None,
        rstd: torch.Tensor,
        center: bool,
        need_dx: bool,
        need_dw: bool,
        need_db: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        arrays = [_numpy(t) for t in (dy, x, weight, centre, rstd)]
        dy_a, x_a, w_a, centre_a, rstd_a = arrays
        empty = x.new_empty(0)
        dx = empty
        if need_dx:
            dx = _tensor(self.kernels.backward_input(dy_a, x_a, w_a, centre_a, rstd_a, center))
        dw = db = empty
        if need_dw or need_db:
            wanted = (need_dw, need_db)
            grads = self.kernels.param_grads(dy_a, x_a, centre_a, rstd_a, center, wanted)
            dw, db = (_tensor(g) if want else empty for g, want in zip(grads, wanted, strict=True))
        return dx, dw, db


class Emulated:
    """The ``impls.cuda`` adapter with its kernels emulated on the CPU (built on first call)."""

    normconf_name = "cuda (normconf C++), CPU emulation"
    normconf_devices = ("cpu",)
    normconf_dtypes = cuda.normconf_dtypes
    normconf_reduction = cuda.normconf_reduction

    def __init__(self) -> None:
        self._operators: Operators | None = None

    def _ops(self) -> Operators:
        if self._operators is None:
            self._operators = Operators(load())
        return self._operators

    def layer_norm(
        self,
        input: torch.Tensor,
        normalized_shape: int | Sequence[int],
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        eps: float = 1e-5,
    ) -> torch.Tensor:
        return self.layer_norm_with_stats(input, normalized_shape, weight, bias, eps)[0]

    def rms_norm(
        self,
        input: torch.Tensor,
        normalized_shape: int | Sequence[int],
        weight: torch.Tensor | None = None,
        eps: float | None = None,
    ) -> torch.Tensor:
        return self.rms_norm_with_stats(input, normalized_shape, weight, eps)[0]

    def layer_norm_with_stats(
        self,
        input: torch.Tensor,
        normalized_shape: int | Sequence[int],
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        eps: float = 1e-5,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return cuda._normalize(input, normalized_shape, weight, bias, eps, True, self._ops())

    def rms_norm_with_stats(
        self,
        input: torch.Tensor,
        normalized_shape: int | Sequence[int],
        weight: torch.Tensor | None = None,
        eps: float | None = None,
    ) -> tuple[torch.Tensor, None, torch.Tensor]:
        output, _, rstd = cuda._normalize(
            input, normalized_shape, weight, None, cuda._rms_eps(eps), False, self._ops()
        )
        return output, None, rstd
