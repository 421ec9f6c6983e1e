"""Adapters that crash or hang their process on one dtype and are correct (PyTorch's) on the
others, as kernels with a null pointer, a failed internal assertion or a wrong loop bound are.
Each is an attribute: ``--adapter tests/zoo/crashes.py:segfault``.

- ``segfault``: float16 reads address 8 through ctypes (SIGSEGV);
- ``aborts``: float16 calls ``abort()`` (SIGABRT);
- ``endless_loop``: bfloat16 spins forever;
- ``exits``: float16 calls ``sys.exit(3)`` (an exception: the check fails, the worker lives on);
- ``quits``: float16 calls ``os._exit(3)`` (the process ends at once);
- ``hangs_in_a_finalizer``: correct, but its outputs carry an object whose finalizer never
  returns, so the worker hangs outside any call into the adapter.

Run in the suite's worker process, each broken case must fail with "crashed with SIGSEGV …" or
"no answer in S s from the forward call" and the stack of the fault, the worker must be
replaced, and the other cases must pass.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _read_null() -> None:
    # Address 8 lies in the first page, which no process maps: a null pointer plus an offset.
    ctypes.c_int64.from_address(8).value  # noqa: B018 (the read is the point)


def _spin() -> None:
    step = 0
    while step >= 0:  # the bound a kernel forgot to advance
        step = (step + 1) % 1_000_003


class _FaultyLayerNorm:
    """PyTorch's LayerNorm, except that ``fault`` runs first on inputs of ``dtype``."""

    def __init__(self, what: str, dtype: torch.dtype, fault: Callable[[], None]) -> None:
        self.normconf_name = f"zoo: LayerNorm that {what} in {str(dtype).removeprefix('torch.')}"
        self.normconf_dtypes = ("float32", "float16", "bfloat16")
        self.dtype, self.fault = dtype, fault

    def layer_norm(
        self,
        input: Tensor,
        normalized_shape: Sequence[int],
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        eps: float = 1e-5,
        **_: Any,
    ) -> Tensor:
        if input.dtype == self.dtype:
            self.fault()
        return F.layer_norm(input, normalized_shape, weight, bias, eps)


segfault = _FaultyLayerNorm("segfaults", torch.float16, _read_null)
aborts = _FaultyLayerNorm("aborts", torch.float16, os.abort)
endless_loop = _FaultyLayerNorm("never returns", torch.bfloat16, _spin)


def _exit_politely() -> None:
    sys.exit(3)  # raises SystemExit: a finding like any exception, not the end of the run


def _exit_at_once() -> None:
    os._exit(3)  # no exception, no cleanup: the process is gone


class _Spinner:
    def __del__(self) -> None:
        _spin()


class _LeavesAFinalizer(_FaultyLayerNorm):
    """Correct outputs, each carrying an object whose finalizer never returns: the worker hangs
    when the suite drops the output, outside any call into the adapter."""

    def layer_norm(self, *args: Any, **kwargs: Any) -> Tensor:
        output = super().layer_norm(*args, **kwargs)
        output.spinner = _Spinner()  # type: ignore[attr-defined]
        return output


exits = _FaultyLayerNorm("calls sys.exit", torch.float16, _exit_politely)
quits = _FaultyLayerNorm("calls os._exit", torch.float16, _exit_at_once)
hangs_in_a_finalizer = _LeavesAFinalizer("hangs in a finalizer", torch.float32, lambda: None)
