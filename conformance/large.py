"""GPU-sized cases (``--large``): tensors past 2^31 elements, more rows than 65535 tiles, the
widest rows, certified in bounded memory.

A kernel's 32-bit element offset wraps past 2^31 elements; a grid of ``rows / tile`` blocks in y
overflows CUDA's 65535; a row wider than any its authors tried takes a path nobody tested. None
of these fits the ordinary pipeline, which holds every input, reference and bound of a case in
float64 at once (17 GB for one 2^31-element tensor). A large case (its id carries ``large``)
is streamed instead, row block by row block of at most :data:`BLOCK_ELEMENTS` elements:

1. each block's inputs are drawn from its own seed (the case seed and the block's first row),
   so the same case gives the same tensors anywhere, and copied into the adapter's tensors on
   the device; the weight and bias are drawn once, from the case seed;
2. the adapter runs once on the whole tensors, forward and backward (through autograd);
3. each block's inputs are drawn again and the references of the block computed (rows are
   independent given the upstream gradient, so the block's output, input gradient and new
   residual are exactly those of the whole tensor): the block of each output is graded with the
   tolerance model, and the blocks' metrics are merged (the median and 99th percentile read off
   the merged ulp histogram, as the upper edge of their bin);
4. the weight and bias gradients sum over every row, so no block holds their reference: the
   tolerance model's terms for them (:class:`conformance.tolerance.ParamTerms`) are summed over
   the blocks, and the reference is their float64 value ``S = Σ dy·x̂`` (``Σ dy``), the rows'
   ``x̂`` computed in float64 by two passes. Its error is bounded a priori — first order, with a
   factor 8 for what that neglects — by ``δ = 8·(n + M + 4)·u₆₄·(κ·Σ|dy| + Σ|dy·x̂|)`` for ``M``
   rows of ``n`` with condition number at most ``κ`` (Higham, *Accuracy and Stability*, §3 and
   §4), and ``δ`` widens the tolerance. ``S`` is not a correctly rounded reference, so these
   checks grade at best *within tolerance*, and say so.

Memory: the adapter's tensors (input, output, upstream and input gradients, weight) on the
device, plus per block a few float64 copies of the block. On a machine without a GPU, large
cases run on the CPU; :func:`estimate` says how long and how much memory they need, and a case
that needs more memory than the machine has is skipped with that reason, rather than killed.

Only LayerNorm and RMSNorm, the norms every kernel library writes its own kernels for, and not
float64 (17 GB tensors, and references that cannot stream at those sizes yet).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from conformance import bounds, metrics, tolerance, watch
from conformance.calls import first_line, settle, tensor_problem
from conformance.cases import Case, case_seed, with_norm_defaults
from conformance.expected import compute
from conformance.inputs import (
    NUMPY_DTYPES,
    CaseInputs,
    build_inputs,
    to_numpy,
    to_tensor,
    torch_dtype,
)
from conformance.results import CheckResult, Metrics
from conformance.specs import call_arguments, call_keywords

#: The most elements one block of a large case holds (its float64 copies: 8 bytes each).
BLOCK_ELEMENTS = 2**22
#: The norms and dtypes with large cases.
NORMS = ("layer_norm", "rms_norm")
DTYPES = ("float32", "float16", "bfloat16")
#: Shapes: past 2^31 elements (bfloat16 only: 4.3 GB a tensor), rows past 65535 tiles of 16,
#: and rows past 2^20 elements.
INT32_SHAPE = (2**21 + 1, 1024)
SHAPES = ((65535 * 16 + 1, 64), (4, 2**20 + 1))
#: Throughput of the references assumed by :func:`estimate`, elements per second on one core
#: (the README's benchmarks): forward, and forward plus backward.
_REFERENCE_RATE = {"forward": 2e7, "backward": 3e6}
_U64 = 2.0**-53


def large_cases(norms: Sequence[str], dtypes: Sequence[str], seed: int) -> list[Case]:
    """The large cases of ``norms`` and ``dtypes`` (those of :data:`NORMS` and
    :data:`DTYPES`)."""
    out = []
    for norm in (n for n in norms if n in NORMS):
        for dtype in (d for d in dtypes if d in DTYPES):
            shapes = ((INT32_SHAPE,) if dtype == "bfloat16" else ()) + SHAPES
            for shape in shapes:
                case = with_norm_defaults(Case(norm, dtype, shape, "normal", 0, large=True))
                out.append(replace(case, seed=case_seed(seed, case.case_id)))
    return out


def estimate(cases: Sequence[Case], device: str) -> str:
    """One line: how many large cases, the largest tensor, and (on the CPU) the time the
    references take and the memory the adapter's tensors need."""
    if not cases:
        return "--large: no large cases for the selected norms and dtypes"
    largest = max(cases, key=lambda c: c.elements)
    itemsize = np.dtype(NUMPY_DTYPES[largest.dtype]).itemsize
    line = (
        f"--large: {len(cases)} case{'s' if len(cases) > 1 else ''}, the largest "
        f"{largest.elements:.3g} elements "
        f"({largest.elements * itemsize / 2**30:.1f} GiB a tensor)"
    )
    seconds = sum(
        c.elements * (1 / _REFERENCE_RATE["forward"] + 1 / _REFERENCE_RATE["backward"])
        for c in cases
    )
    need = max(needed_bytes(c) for c in cases) / 2**30
    line += f"; the references take about {seconds / 60:.0f} min on one core"
    if device == "cpu":
        line += f", and the adapter's tensors up to {need:.0f} GiB of memory here"
    return line


def needed_bytes(case: Case) -> int:
    """Memory the adapter's tensors of ``case`` take: input, output, upstream gradient, input
    gradient and what autograd saves (about one more), in the case's dtype."""
    return 5 * case.elements * np.dtype(NUMPY_DTYPES[case.dtype]).itemsize


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# -- the blocks ---------------------------------------------------------------------------------


def blocks(case: Case) -> Iterator[tuple[int, int]]:
    """``(first_row, end_row)`` of each block of ``case``'s rows."""
    rows, n = case.shape[0], case.shape[-1]
    step = max(1, BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def block_inputs(case: Case, start: int, end: int, parameters: Mapping[str, Any]) -> CaseInputs:
    """The inputs of rows ``start:end`` of ``case``, drawn from the block's own seed, with the
    case's ``parameters`` (weight and bias)."""
    block = replace(case, shape=(end - start, *case.shape[1:]), large=False)
    block = replace(block, seed=case_seed(case.seed, f"rows {start}"))
    inputs = build_inputs(block)
    inputs.arrays.update(parameters)
    return inputs


def case_parameters(case: Case) -> dict[str, np.ndarray | None]:
    """The weight and bias of ``case``: those of its first row, drawn from the case seed."""
    first = build_inputs(replace(case, shape=(1, *case.shape[1:]), large=False))
    return {k: first.arrays[k] for k in ("weight", "bias") if k in first.arrays}


# -- running one case ---------------------------------------------------------------------------


def run_large_case(target: Any, case: Case) -> list[CheckResult]:
    """Every check of a large case (see the module docstring) that the adapter supports; never
    raises for an adapter's misbehaviour."""
    import torch

    adapter, device, norm = target.adapter, target.device, case.norm
    convention = target.convention(norm)
    fields: dict[str, Any] = {**case.result_fields(), "reproduce": target.reproduce(case)}

    def check(kind: str, output: str, verdict: str, **more: Any) -> CheckResult:
        return CheckResult(
            **fields, kind=kind, output=output, verdict=verdict, convention=convention, **more
        )

    available = _available_bytes() if device == "cpu" else None
    if available is not None and needed_bytes(case) > available:
        why = (
            f"needs about {needed_bytes(case) / 2**30:.0f} GiB for the adapter's tensors, "
            f"{available / 2**30:.0f} GiB are available here"
        )
        return [check("forward", "call", "skip", message=why)]
    parameters = case_parameters(case)
    tensors, upstream = _assemble(case, parameters, device)
    backward = bool(adapter.backward.get(norm, False))
    args = call_arguments(norm, tensors, case.parameters())
    try:
        with watch.calling("forward call"):
            output = adapter.functions[norm](*args, **call_keywords(norm, case.parameters()))
            settle(device)
        problem = tensor_problem(output, case, device)
        if problem is None and backward:
            with watch.calling("backward pass"):
                torch.autograd.backward([output], [upstream])
                settle(device)
    except (Exception, SystemExit) as exc:
        why = f"raised {type(exc).__name__}: {first_line(exc)}"
        return [check("contract", "call", "fail", message=why)]
    if problem is not None:
        return [check("contract", "call", "fail", message=f"output: {problem}")]
    results = [check("contract", "call", "pass", message="a tensor of the right shape, dtype")]
    del upstream
    actual = {"output": output}
    if backward:
        actual["grad_input"] = tensors["input"].grad
        for name in ("weight", "bias"):
            if tensors.get(name) is not None:
                actual[f"grad_{name}"] = tensors[name].grad
    for name, (kind, m, note) in _grade(case, convention, parameters, actual, adapter).items():
        grade = metrics.grade(m)
        if note and grade in ("correctly_rounded", "faithful"):
            grade = "within_tolerance"  # against a float64 value, not a rounded exact one
        verdict = "fail" if grade == "fail" else "pass"
        results.append(
            check(
                kind,
                name,
                verdict,
                grade=grade,
                metrics=m,
                message=f"{name}: {grade.replace('_', ' ')}{note}",
                diagnosis=None if verdict == "pass" else _where(name, m, case),
            )
        )
    return results


def _where(name: str, m: Metrics, case: Case) -> str:
    """Where a large case went wrong: its worst element's row and element offset."""
    outside = f"{m.mismatched} of {m.n} elements are outside the tolerance"
    if not m.worst_index or name in ("grad_weight", "grad_bias"):
        column = f", the worst at {m.worst_index[0]}" if m.worst_index else ""
        return f"{outside}{column} (a sum over all {case.shape[0]} rows)"
    row = m.worst_index[0]
    offset = row * case.shape[-1]
    return f"{outside}; the worst is in row {row}, at element offset {offset} (2^31 = {2**31})"


def _assemble(
    case: Case, parameters: Mapping[str, np.ndarray | None], device: str
) -> tuple[dict[str, Any], Any]:
    """The adapter's tensors (leaves that require grad) and the upstream gradient, filled block
    by block."""
    import torch

    dtype = torch_dtype(case.dtype)
    x = torch.empty(case.shape, dtype=dtype, device=device)
    dy = torch.empty(case.shape, dtype=dtype, device=device)
    for start, end in blocks(case):
        inputs = block_inputs(case, start, end, parameters)
        x[start:end] = to_tensor(inputs.arrays["input"], device)  # type: ignore[arg-type]
        dy[start:end] = to_tensor(inputs.grads["grad_output"], device)  # type: ignore[arg-type]
    tensors: dict[str, Any] = {"input": x.requires_grad_(), "weight": None, "bias": None}
    for name, array in parameters.items():
        if array is not None:
            tensors[name] = to_tensor(array, device, requires_grad=True)
    return tensors, dy


@dataclass
class _Sums:
    """The parameter gradients' terms summed over the blocks so far."""

    terms: dict[str, tolerance.ParamTerms]
    abs_dy: dict[str, np.ndarray]
    kappa: float = 0.0
    rows: int = 0


def _grade(
    case: Case,
    convention: Mapping[str, Any],
    parameters: Mapping[str, np.ndarray | None],
    actual: Mapping[str, Any],
    adapter: Any,
) -> dict[str, tuple[str, Metrics, str]]:
    """Every output graded: block by block, the parameter gradients from their summed terms."""
    parts: dict[str, list[tuple[int, Metrics]]] = {
        n: [] for n in actual if n in ("output", "grad_input")
    }
    sums = _Sums({}, {})
    model = None
    for start, end in blocks(case):
        inputs = block_inputs(case, start, end, parameters)
        exp = compute(inputs, convention, backward="grad_input" in actual, statistics=False)
        model = bounds.case_model(
            inputs,
            convention,
            exp.values,
            accumulation=getattr(adapter, "accumulation", None),
            reduction=adapter.reduction,
        )
        g_out = np.asarray(inputs.grads["grad_output"], dtype=np.float64)
        for name in parts:
            reference = exp.values[name]
            if name == "output":
                bound = bounds.forward(model, reference)
            else:
                bound = bounds.grad_input(model, g_out, reference)
            got = to_numpy(actual[name][start:end])
            with np.errstate(all="ignore"):
                bound = np.broadcast_to(bound, reference.shape)
                parts[name].append((start, metrics.compare(got, reference, bound, case.dtype)))
        _add_terms(sums, model, g_out, actual)
    graded = {
        name: ("forward" if name == "output" else "backward", metrics.merge(found), "")
        for name, found in parts.items()
    }
    if model is not None:
        for name in actual:
            if name in ("grad_weight", "grad_bias"):
                graded[name] = (
                    "backward",
                    _param_metrics(name, actual[name], sums, case, model),
                    _F64,
                )
    return graded


_F64 = "; graded against its float64 value, with that value's error bound added"


def _add_terms(
    sums: _Sums, model: bounds.CaseModel, g_out: np.ndarray, actual: Mapping[str, Any]
) -> None:
    g = model.grouping
    rows = model.rows(g_out)
    for name in ("grad_weight", "grad_bias"):
        if name not in actual:
            continue
        which = name.removeprefix("grad_")
        t = tolerance.param_grad_terms(
            which,
            model.stats,
            rows,
            g.param_index(),
            g.params,
            acc_unit=model.acc_unit,
            reduction=model.reduction,
        )
        sums.terms[which] = t if which not in sums.terms else sums.terms[which] + t
        sums.abs_dy[which] = sums.abs_dy.get(which, 0.0) + np.abs(rows).sum(axis=0)
    kappa = np.asarray(model.stats.kappa, dtype=np.float64)
    if kappa.size and np.isfinite(kappa).any():
        sums.kappa = max(sums.kappa, float(np.nanmax(kappa)))
    sums.rows += g.groups


def _param_metrics(
    name: str, tensor: Any, sums: _Sums, case: Case, model: bounds.CaseModel
) -> Metrics:
    """A parameter gradient against its float64 value ``S``, the tolerance widened by ``δ``
    and by the rounding of ``S`` into the gradient's dtype."""
    which = name.removeprefix("grad_")
    t = sums.terms[which]
    dtype = str(tensor.dtype).removeprefix("torch.")
    value = np.asarray(t.value, dtype=np.float64)
    reference = value.astype(NUMPY_DTYPES[dtype]).astype(np.float64)
    n = case.shape[-1]
    delta = 8 * (n + sums.rows + 4) * _U64 * (sums.kappa * sums.abs_dy[which] + t.magnitude)
    bound = tolerance.param_grad_from_terms(
        which,
        t,
        reference,
        out_dtype=dtype,
        acc_unit=model.acc_unit,
        reduction=model.reduction,
        extra=delta + np.abs(reference - value),
    )
    got = to_numpy(tensor).reshape(-1)
    with np.errstate(all="ignore"):
        return metrics.compare(got, reference, bound, dtype)
