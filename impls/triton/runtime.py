"""Where the kernels run: compiled for a CUDA GPU, or interpreted on the CPU.

Triton reads ``TRITON_INTERPRET`` when a function is decorated with ``@triton.jit`` — its own
standard library (``tl.sum``, ``tl.zeros``, …) included, which is decorated when ``triton`` is
first imported. So the choice is made here, before that import: when ``TRITON_INTERPRET`` is
unset and torch sees no CUDA GPU, it is set to ``1`` and the kernels run under Triton's
interpreter (NumPy, on CPU tensors); otherwise it is left alone, and the kernels compile for the
GPU unless it says ``1``.

A process that imported ``triton`` for compiled kernels before this module ran cannot interpret
afterwards (the standard library is already compiled-mode): that is an
:class:`~impls.adapter.AdapterError` asking for ``TRITON_INTERPRET=1`` in the environment.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

import numpy as np
import torch

from impls.adapter import AdapterError

MISSING = "the triton adapter needs the triton package: pip install 'normconf[triton]'"


def _choose_interpreter() -> None:
    """Ask for the interpreter where nothing else could run the kernels."""
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_choose_interpreter()
_imported_before = "triton" in sys.modules

try:
    import triton
    import triton.language as tl
except ImportError:
    raise AdapterError(MISSING) from None

#: True when the kernels run under Triton's interpreter (on the CPU), False when compiled.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

#: The devices whose tensors the kernels take.
DEVICES: tuple[str, ...] = ("cpu",) if INTERPRETED else ("cuda",)


def _check_standard_library() -> None:
    """An interpreted kernel can call only interpreted library functions (``tl.sum``)."""
    from triton.runtime.interpreter import InterpretedFunction

    interpreted_library = isinstance(tl.standard.sum, InterpretedFunction)
    if INTERPRETED and not interpreted_library:
        raise AdapterError(
            "triton was imported for compiled kernels before the triton adapter could choose "
            "its interpreter: set TRITON_INTERPRET=1 in the environment"
        )


if _imported_before:
    _check_standard_library()


@functools.cache
def _multiprocessors(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


#: Programs per core the backward kernels aim at on a GPU (two resident per SM hide latency).
PROGRAMS_PER_MULTIPROCESSOR = 2
#: Programs the backward kernels use at most under the interpreter: each runs in turn, so more
#: only add partial rows to reduce.
INTERPRETED_PROGRAMS = 2


def program_slots(device: torch.device) -> int:
    """How many programs a persistent kernel (one that loops over row blocks) should launch."""
    if device.type != "cuda":
        return INTERPRETED_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return PROGRAMS_PER_MULTIPROCESSOR * _multiprocessors(index)


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """Run ``kernel`` on ``grid``. Under the interpreter NumPy's floating-point warnings are
    silenced: NaN and inf arriving in the data are IEEE results there, not accidents."""
    if INTERPRETED:
        with np.errstate(all="ignore"):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)
