"""Re-verification of timed calls: what the last timed call left behind, checked against a
float64 evaluation (:mod:`conformance.oracle64`) under the tolerance model.

A kernel that is fast because it skips work, returns a stale buffer or caches results across
input sets fails here, after timing, on the outputs the timing produced.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from conformance import bounds, metrics
from conformance.cases import Case
from conformance.inputs import CaseInputs, round_into, to_numpy
from conformance.oracle64 import evaluate

DIFFERENTIABLE = ("input", "weight", "bias", "residual", "sublayer_output")


def reverify(
    case: Case,
    st: Any,
    direction: str,
    convention: Mapping[str, Any],
    reduction: str,
) -> str | None:
    """Check what the last timed call left in ``st`` (a :class:`conformance.speed.InputSet`)
    against a float64 evaluation under the tolerance model; None when every output is within
    its bound, else what is wrong."""
    import torch

    arrays = {k: None if v is None else to_numpy(v) for k, v in st.tensors.items()}
    grads: dict[str, np.ndarray | None] = {k: to_numpy(v) for k, v in st.upstream.items()}
    inputs = CaseInputs(case, arrays, case.parameters(), grads)
    wide = {
        k: None
        if v is None
        else v.detach().double().requires_grad_(direction == "backward" and k in DIFFERENTIABLE)
        for k, v in st.tensors.items()
    }
    with torch.enable_grad():
        oracle = evaluate(case, wide, convention)
    expected = {k: round_into(to_numpy(v), case.dtype) for k, v in oracle.items()}
    model = bounds.case_model(inputs, convention, expected, accumulation=None, reduction=reduction)
    if direction == "forward":
        out = st.outputs
        produced = (
            dict(zip(("output", "residual_out"), out, strict=False))
            if isinstance(out, tuple | list)
            else {"output": out}
        )
        checks = {
            "output": (produced.get("output"), bounds.forward(model, expected["output"])),
        }
        if "residual_out" in expected:
            checks["residual_out"] = (produced.get("residual_out"), bounds.residual(model, inputs))
        return _verdict(checks, expected, case.dtype)
    outputs = [oracle["output"]]
    upstream = [st.upstream["grad_output"].double()]
    if "residual_out" in oracle:
        outputs.append(oracle["residual_out"])
        upstream.append(st.upstream["grad_residual_out"].double())
    leaves = {k: v for k, v in wide.items() if v is not None and v.requires_grad}
    exact = torch.autograd.grad(outputs, list(leaves.values()), upstream)
    g_out = np.asarray(grads["grad_output"], dtype=np.float64)
    checks, references = {}, {}
    for leaf, value in zip(leaves, exact, strict=True):
        name = f"grad_{leaf}"
        references[name] = round_into(to_numpy(value), case.dtype)
        bound = bounds.gradient(model, name, g_out, inputs, references[name])
        got = (st.outputs or {}).get(leaf)
        checks[name] = (got, bound)
    return _verdict(checks, references | expected, case.dtype)


def _verdict(
    checks: Mapping[str, tuple[Any, np.ndarray]], references: Mapping[str, np.ndarray], dtype: str
) -> str | None:
    problems = []
    for name, (tensor, bound) in checks.items():
        if tensor is None:
            problems.append(f"{name}: not returned")
            continue
        actual = to_numpy(tensor)
        if actual.shape != references[name].shape:
            problems.append(f"{name}: shape {actual.shape}, expected {references[name].shape}")
            continue
        m = metrics.compare(actual, references[name], bound, dtype)
        if m.mismatched:
            problems.append(
                f"{name}: {m.mismatched} of {m.n} elements outside the tolerance "
                f"(worst {m.max_ratio:.3g}x the bound at {m.worst_index})"
            )
    return "; ".join(problems) or None
