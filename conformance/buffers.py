"""The provided-buffer check's pieces: ``out=`` buffers poisoned with NaN, and what a call given
them must have done with them.

An adapter that declares ``normconf_out`` for a norm (:mod:`impls.adapter`) is called once more
with ``out=`` buffers — contiguous, of the case's shape, dtype and device — filled with NaN
(:func:`conformance.checks.run_case`). The call must return the very tensors it was given and
write every element of them. A fresh ``torch.empty`` output hides a skipped element (a partial
last block, a row the grid misses): its garbage is often zero, or the right value left by the
previous call in the same memory. A poisoned buffer does not: an element still NaN where the
reference is not was never written. The buffers' contents are then graded like the main output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from conformance.cases import Case
from conformance.inputs import torch_dtype
from conformance.specs import spec


def poisoned(case: Case, device: str, *, inplace: bool) -> dict[str, Any]:
    """NaN-filled buffers for ``case``, by the output each receives: ``output``, and
    ``residual_out`` for a fused add-norm unless the adapter updates its residual in place
    (``normconf_inplace``: the residual argument is then the new residual's buffer)."""
    import torch

    fused = spec(case.norm).fused and not inplace
    names = ("output", "residual_out") if fused else ("output",)
    dtype = torch_dtype(case.dtype)
    return {name: torch.full(case.shape, math.nan, dtype=dtype, device=device) for name in names}


def argument(given: Mapping[str, Any]) -> Any:
    """``out=`` as the adapter takes it: one tensor, or the tuple ``(output, residual_out)``."""
    tensors = tuple(given.values())
    return tensors if len(tensors) > 1 else tensors[0]


def label(name: str, given: Mapping[str, Any]) -> str:
    """How messages name the buffer for ``name``: ``out=``, or ``out=[i] (name)`` in a tuple."""
    if len(given) == 1:
        return "out="
    return f"out=[{list(given).index(name)}] ({name})"


def not_returned(returned: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """One problem per buffer whose place in the result holds another tensor."""
    return [
        f"{name}: returned a new tensor instead of writing into {label(name, given)}"
        for name, buffer in given.items()
        if name in returned and returned[name] is not buffer
    ]


def unwritten(
    actual: np.ndarray, reference: np.ndarray, ungraded: np.ndarray | None, where: str
) -> str | None:
    """What is wrong with a buffer whose elements are still NaN where the reference is not
    (elements left ungraded, of groups holding ±inf, aside); None where every one was written."""
    left = np.isnan(actual) & ~np.isnan(reference)
    if ungraded is not None:
        left &= ~ungraded
    count = int(left.sum())
    if not count:
        return None
    return (
        f"{count} of {actual.size} elements of {where} left unwritten "
        "(still the NaN the suite wrote there)"
    )
