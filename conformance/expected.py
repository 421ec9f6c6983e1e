"""The correctly rounded answers of a case, computed once and reused.

Every check of a case, for every adapter certified in a process, compares against the same
reference results; they are kept in memory and on disk (``$NORMCONF_CACHE``, default
``~/.cache/normconf``), keyed by the case id, the convention and a digest of the references'
source code, so a change to the references never serves a stale answer.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

import references
from conformance.inputs import CaseInputs, inputs_digest
from conformance.specs import call_arguments, call_keywords, spec

_GRADIENT_NAMES = {
    "input": "grad_input",
    "weight": "grad_weight",
    "bias": "grad_bias",
    "residual": "grad_residual",
    "sublayer_output": "grad_sublayer_output",
}


@dataclass
class Expected:
    """Float64 values of the correctly rounded results, by output name (see CheckResult)."""

    values: dict[str, np.ndarray]


@cache
def references_digest() -> str:
    root = Path(references.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _cache_dir() -> Path | None:
    configured = os.environ.get("NORMCONF_CACHE")
    if configured == "off":
        return None
    return Path(configured) if configured else Path.home() / ".cache" / "normconf"


_MEMORY: dict[str, Expected] = {}
_MEMORY_LIMIT = 256


def _key(inputs: CaseInputs, convention: Mapping[str, Any], backward: bool) -> str:
    """The case and its input values, the convention and the references' code, so inputs that
    do not come from the case's seed never meet a stale answer."""
    text = json.dumps(
        [inputs_digest(inputs), sorted(convention.items()), backward, references_digest()]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def expected(inputs: CaseInputs, convention: Mapping[str, Any], *, backward: bool) -> Expected:
    """The reference results of ``inputs`` under ``convention`` (forward, and backward too)."""
    key = _key(inputs, convention, backward)
    if key in _MEMORY:
        return _MEMORY[key]
    directory = _cache_dir()
    path = None if directory is None else directory / f"{key}.npz"
    result: Expected | None = None
    if path is not None and path.exists():
        try:
            with np.load(path) as stored:
                result = Expected({name: stored[name] for name in stored.files})
        except (OSError, ValueError):
            result = None  # a damaged cache entry is recomputed, never trusted
    if result is None:
        result = compute(inputs, convention, backward=backward)
        if path is not None:
            _store(path, result)
    if len(_MEMORY) >= _MEMORY_LIMIT:
        _MEMORY.pop(next(iter(_MEMORY)))
    _MEMORY[key] = result
    return result


def _store(path: Path, result: Expected) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **result.values)  # type: ignore[arg-type]
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs recomputation


def _f64(a: Any) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def compute(
    inputs: CaseInputs,
    convention: Mapping[str, Any],
    *,
    backward: bool,
    statistics: bool = True,
) -> Expected:
    """Run the references (no cache). ``statistics``: also the mean and rstd of each group
    (their exact fallbacks cost one exact evaluation per undecided group)."""
    case, s = inputs.case, spec(inputs.case.norm)
    arrays = {k: (None if v is None else v.copy()) for k, v in inputs.arrays.items()}
    args = call_arguments(case.norm, arrays, inputs.params)
    result = s.forward(
        *args, **call_keywords(case.norm, inputs.params), **convention, return_stats=statistics
    )
    values: dict[str, np.ndarray] = {}
    if s.fused:
        result, residual_out = result
        values["residual_out"] = _f64(residual_out)
    if statistics:
        values["output"] = _f64(result.output)
        if result.mean is not None:
            values["mean"] = _f64(result.mean)
        values["rstd"] = _f64(result.rstd)
    else:
        values["output"] = _f64(result)
    if case.norm == "batch_norm" and case.training:
        values["running_mean"] = _f64(arrays["running_mean"])
        values["running_var"] = _f64(arrays["running_var"])
    if backward:
        grads = backward_references(inputs, convention)
        values.update({k: v for k, v in grads.items() if v is not None})
    return Expected(values)


def backward_references(
    inputs: CaseInputs, convention: Mapping[str, Any]
) -> dict[str, np.ndarray | None]:
    """Reference gradients for the case's upstream gradients, by CheckResult output name."""
    case, a, p = inputs.case, inputs.arrays, inputs.params
    g, x, w, b, eps = inputs.grads["grad_output"], a["input"], a["weight"], a["bias"], p["eps"]
    conv = dict(convention)
    basic = {k: conv[k] for k in ("variance", "eps_placement", "weight_offset")}
    norm, shape = case.norm, p["normalized_shape"]
    if norm == "layer_norm":
        r = references.layer_norm_backward(g, x, shape, w, b, eps, **basic)
    elif norm == "rms_norm":
        r = references.rms_norm_backward(g, x, shape, w, eps, **basic)
    elif norm == "group_norm":
        r = references.group_norm_backward(g, x, p["num_groups"], w, b, eps, **basic)
    elif norm == "batch_norm":
        r = references.batch_norm_backward(
            g, x, a["running_mean"], a["running_var"], w, b, p["training"], eps, **basic
        )
    elif norm == "instance_norm":
        r = references.instance_norm_backward(g, x, None, None, w, b, True, eps, **basic)
    elif norm == "deep_norm":
        r = references.deep_norm_backward(
            g, x, a["sublayer_output"], shape, w, b, p["alpha"], eps, **conv
        )
    else:
        g2 = inputs.grads["grad_residual_out"]
        if norm == "fused_add_rms_norm":
            r = references.fused_add_rms_norm_backward(
                g, g2, x, a["residual"], shape, w, eps, alpha=p["alpha"], **conv
            )
        else:
            r = references.fused_add_layer_norm_backward(
                g, g2, x, a["residual"], shape, w, b, eps, alpha=p["alpha"], **conv
            )
    return {
        name: (None if getattr(r, field) is None else _f64(getattr(r, field)))
        for field, name in _GRADIENT_NAMES.items()
    }
