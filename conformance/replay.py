"""The inputs of failed cases, saved beside the report, and ``normconf replay CASE_ID``.

When a case has a failed check, :func:`save_inputs` writes every input array and upstream
gradient of the case to ``DIR/inputs/<case_id>.npz`` (each array in its own dtype, bfloat16 as
its 16-bit patterns, with the dtype's name beside it; directories written before kept float64
copies, which still load), so the failure can be rerun from the report directory alone, without
drawing the inputs again. :func:`replay` loads them, runs the case through the adapter of the
run (or another), and returns the checks with their comparisons.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from conformance.cases import Case, parse_case_id
from conformance.checks import Target
from conformance.inputs import NUMPY_DTYPES, CaseInputs, build_inputs
from conformance.results import CheckResult
from conformance.worker import open_runner

INPUTS_DIR = "inputs"
_GRAD = "grad:"
_DTYPE = "dtype:"


def inputs_path(directory: str | os.PathLike[str], case_id: str) -> Path:
    return Path(directory) / INPUTS_DIR / f"{case_id}.npz"


def save_inputs(directory: str | os.PathLike[str], inputs: CaseInputs) -> Path:
    """Write ``inputs`` to ``DIR/inputs/<case_id>.npz`` (atomically: a temporary name, then a
    rename)."""
    path = inputs_path(directory, inputs.case.case_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for prefix, group in (("", inputs.arrays), (_GRAD, inputs.grads)):
        for name, array in group.items():
            if array is None:
                continue
            dtype = np.dtype(array.dtype).name
            stored = np.ascontiguousarray(array)
            arrays[prefix + name] = stored.view(np.uint16) if dtype == "bfloat16" else stored
            arrays[_DTYPE + prefix + name] = np.array(dtype)
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("wb") as handle:
        np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]
    os.replace(temporary, path)
    return path


def load_inputs(directory: str | os.PathLike[str], case_id: str) -> CaseInputs:
    """The saved inputs of ``case_id``; ``ValueError`` (one line) when there are none."""
    case = parse_case_id(case_id)
    path = inputs_path(directory, case_id)
    if not path.is_file():
        raise ValueError(f"{path}: no saved inputs for this case (only failed cases are saved)")
    template = build_inputs(case)  # which arrays the case has; the values come from the file
    with np.load(path) as saved:
        arrays = {name: _typed(saved, name) for name in template.arrays}
        grads = {name: _typed(saved, _GRAD + name) for name in template.grads}
    return CaseInputs(case, arrays, case.parameters(), grads)


def _typed(saved: Any, key: str) -> np.ndarray | None:
    if key not in saved.files:
        return None
    dtype = str(saved[_DTYPE + key])
    if dtype not in NUMPY_DTYPES:
        raise ValueError(f"saved array {key!r} has dtype {dtype!r}, not a case dtype")
    stored = np.asarray(saved[key])
    if stored.dtype == np.uint16 and dtype == "bfloat16":
        return stored.view(NUMPY_DTYPES[dtype])
    return stored.astype(NUMPY_DTYPES[dtype])


def replay(
    target: Target, case: Case, inputs: CaseInputs, *, timeout: float | None = None, seed: int = 0
) -> list[CheckResult]:
    """Every check of ``case`` on the saved ``inputs``; with ``timeout``, in a worker process as
    a certification runs it (a case that crashed the run's worker crashes only the replay's)."""
    with open_runner(target, timeout=timeout, seed=seed) as runner:
        return runner.run_case(case, inputs)
