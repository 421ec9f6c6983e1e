"""Adapters that crash or hang their process on one dtype and are correct (PyTorch's) on the
others, as kernels with a null pointer, a failed internal assertion or a wrong loop bound are.
Each is an attribute: ``--adapter tests/zoo/crashes.py:segfault``.

- ``segfault``: float16 reads address 8 through ctypes (SIGSEGV);
- ``aborts``: float16 calls ``abort()`` (SIGABRT);
- ``endless_loop``: bfloat16 spins forever.

Run in the suite's worker process, each broken case must fail with "crashed with SIGSEGV …" or
"no answer in S s from the forward call" and the stack of the fault, the worker must be
replaced, and the other cases must pass.
"""

from __future__ import annotations

import ctypes
import os
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
