"""Run one case through an adapter and grade every output it returns.

For a case the checks are, in order: ``contract`` (the call returns tensors of the right shape,
dtype and device, raises nothing, leaves its inputs alone), ``forward`` (or ``nonfinite`` for
inputs with NaN/Inf: the output and, for the add-norms, the new residual), ``backward`` (the
gradients autograd gives for the input, weight, bias and residual) and ``running_stats``
(BatchNorm in training), then ``determinism`` (the same inputs again, on fresh tensors: the
outputs and gradients must be bitwise equal to the first call's), and last, for norms the adapter
declares in ``normconf_out``, the provided-buffer checks (a call with ``out=`` buffers poisoned
with NaN, :mod:`conformance.buffers`: a ``contract`` check of ``out`` — the buffers returned, every
element written — and the buffers' contents graded as the outputs are). Every comparison is
against the correctly rounded reference with the tolerance model's per-element bound, and a
failure gets a diagnosis from :mod:`conformance.fingerprint`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from conformance import bounds, buffers, fingerprint, metrics, tolerance
from conformance.calls import (
    CallOutcome,
    backpropagate,
    bitwise_equal,
    call_adapter,
    first_line,
    subclass_problem,
)
from conformance.cases import Case
from conformance.differential import explain_layout
from conformance.expected import Expected, expected
from conformance.inputs import (
    NUMPY_DTYPES,
    CaseInputs,
    build_inputs,
    round_into,
    to_numpy,
)
from conformance.large import run_large_case
from conformance.results import CheckResult
from conformance.specs import spec

#: The tolerance bound of each output, given the case's model.
Graders = dict[str, Callable[[bounds.CaseModel], np.ndarray]]


@dataclass
class Target:
    """What is certified: the adapter, where, and under which convention."""

    adapter: Any
    device: str
    conventions: Mapping[str, Mapping[str, Any]]
    reproduce: Callable[[Case], str]

    def convention(self, norm: str) -> dict[str, Any]:
        return spec(norm).convention(self.conventions.get(norm, {}))


class _Recorder:
    def __init__(
        self, case: Case, target: Target, convention: dict[str, Any], *, diagnose: bool = True
    ) -> None:
        self.case, self.target, self.convention = case, target, convention
        self.diagnose = diagnose
        self.results: list[CheckResult] = []
        self.started = time.perf_counter()
        self.kappa: float | None = None

    def _lap(self) -> float:
        """Seconds since the previous check of the case (the first: since the case began,
        inputs and references included)."""
        now = time.perf_counter()
        elapsed, self.started = now - self.started, now
        return elapsed

    def add(self, kind: str, output: str, verdict: str, **fields: Any) -> CheckResult:
        result = CheckResult(
            **self.case.result_fields(),
            kind=kind,
            output=output,
            verdict=verdict,
            reproduce=self.target.reproduce(self.case),
            convention=self.convention,
            duration_s=self._lap(),
            kappa=self.kappa,
            **fields,
        )
        self.results.append(result)
        return result


def run_case(target: Target, case: Case, inputs: CaseInputs | None = None) -> list[CheckResult]:
    """Every check of ``case`` for ``target``; never raises for an adapter's misbehaviour.

    ``inputs`` replaces the inputs drawn from the case's seed (hypothesis supplies its own).
    Where the checks cannot go on (the suite's own error, or a device that an earlier call into
    the adapter left broken), the checks done so far stand and one failed check says why.
    """
    rec = _Recorder(case, target, target.convention(case.norm))
    adapter = target.adapter
    if not adapter.supports(case.norm, case.dtype, target.device):
        why = f"{adapter.name} does not declare {case.norm} in {case.dtype} on {target.device}"
        rec.add("forward", "call", "skip", message=why)
        return rec.results
    if case.large:
        return run_large_case(target, case)
    try:
        inputs = build_inputs(case) if inputs is None else inputs
        _run_checks(rec, target, case, inputs)
        explain_layout(rec.results, case, inputs, lambda c, i: _rerun(target, c, i))
    except Exception as exc:
        why = f"{type(exc).__name__}: {first_line(exc)}"
        if "CUDA error" in why:
            why += " (a CUDA error an earlier call into the adapter left behind)"
        rec.add("contract", "call", "fail", message=f"the checks of this case stopped: {why}")
    return rec.results


def _rerun(target: Target, case: Case, inputs: CaseInputs) -> list[CheckResult]:
    """The graded checks of ``case`` on ``inputs``, without diagnoses, the determinism check or
    provided buffers (:mod:`conformance.differential`'s second look)."""
    rec = _Recorder(case, target, target.convention(case.norm), diagnose=False)
    _run_checks(rec, target, case, inputs, extras=False)
    return rec.results


def _run_checks(
    rec: _Recorder, target: Target, case: Case, inputs: CaseInputs, *, extras: bool = True
) -> None:
    adapter, norm = target.adapter, case.norm
    want_backward = bool(adapter.backward.get(norm, False))
    inplace = bool(getattr(adapter, "inplace", False))
    outcome = call_adapter(
        adapter.functions[norm], inputs, target.device, want_backward, inplace=inplace
    )
    _contract(rec, inputs, outcome)
    if "output" not in outcome.values:
        return
    exp = expected(inputs, rec.convention, backward=want_backward)
    model = bounds.case_model(
        inputs,
        rec.convention,
        exp.values,
        accumulation=getattr(adapter, "accumulation", None),
        reduction=adapter.reduction,
    )
    rec.kappa = _case_kappa(model)
    kind = "nonfinite" if case.distribution == "nonfinite" else "forward"
    reference = exp.values["output"]
    graders: Graders = {
        "output": lambda m: bounds.forward(m, reference),
        "residual_out": lambda m: bounds.residual(m, inputs),
    }
    for name in ("output", "residual_out"):
        if name in outcome.values:
            _compare(rec, kind, name, outcome, exp, graders[name], inputs, model)
    if norm in getattr(adapter, "statistics", {}) and kind == "forward":
        _statistics(rec, adapter.statistics[norm], inputs, exp, model, target.device)
    if case.norm == "batch_norm" and case.training:
        _running_stats(rec, inputs, outcome, exp, model)
    if want_backward and kind == "forward":
        _backward(rec, inputs, outcome, exp, model, target.device)
    if not extras:
        return
    _determinism(rec, adapter, inputs, outcome, target.device, want_backward and kind == "forward")
    if norm in getattr(adapter, "out", ()):
        _provided_buffers(rec, adapter, inputs, exp, model, graders, target.device, kind)


def _case_kappa(model: bounds.CaseModel) -> float | None:
    """The largest κ over the case's groups; None where any is not finite (NaN/Inf inputs)."""
    kappa = np.asarray(model.stats.kappa, dtype=np.float64)
    if kappa.size == 0 or not np.isfinite(kappa).all():
        return None
    return float(kappa.max())


def _contract(rec: _Recorder, inputs: CaseInputs, outcome: CallOutcome) -> None:
    if outcome.problems:
        rec.add("contract", "call", "fail", message="; ".join(outcome.problems))
    else:
        rec.add("contract", "call", "pass", message="tensors of the right shape, dtype, device")


def _compare(
    rec: _Recorder,
    kind: str,
    name: str,
    outcome: CallOutcome,
    exp: Expected,
    bound_for: Callable[[bounds.CaseModel], np.ndarray],
    inputs: CaseInputs,
    model: bounds.CaseModel,
    dtype: str | None = None,
    label: str | None = None,
    cause: str | None = None,
) -> None:
    """Grade ``outcome``'s ``name`` against the reference. ``label`` names it in the report
    (default: ``name``); ``cause``, where known already, is a failure's diagnosis (no search)."""
    actual, reference = outcome.values[name], exp.values[name]
    dtype = dtype or rec.case.dtype
    ungraded = _undefined_elements(inputs, model, name)
    note = ""
    if ungraded is not None and ungraded.any():
        # A group holding ±inf (and no NaN) has no defined result: the formula's IEEE
        # evaluation and its limit disagree. Those elements are reported, not graded.
        actual = np.where(ungraded, reference, actual)
        note = f"; {int(ungraded.sum())} elements of groups holding ±inf not graded"
    with np.errstate(all="ignore"):
        bound = np.broadcast_to(bound_for(model), reference.shape)
        m = metrics.compare(actual, reference, bound, dtype)
    grade = metrics.grade(m)
    verdict = "fail" if grade == "fail" else "pass"
    diagnosis = cause if verdict == "fail" else None
    if verdict == "fail" and cause is None and rec.diagnose:
        try:
            with np.errstate(all="ignore"):
                diagnosis = fingerprint.diagnose(
                    kind, name, inputs, rec.convention, actual, exp, model, m, bound_for
                )
        except Exception as exc:  # a diagnosis is a courtesy; the verdict stands without it
            diagnosis = f"no diagnosis: the search raised {type(exc).__name__}: {first_line(exc)}"
    label = label or name
    rec.add(
        kind,
        label,
        verdict,
        grade=grade,
        metrics=m,
        diagnosis=diagnosis,
        message=f"{label}: {grade.replace('_', ' ')}{note}",
    )


def _undefined_elements(
    inputs: CaseInputs, model: bounds.CaseModel, name: str
) -> np.ndarray | None:
    if inputs.case.distribution != "nonfinite" or name == "residual_out":
        return None
    rows = model.rows(bounds.normalised_input(inputs, model.convention, {}))
    inf_only = np.isinf(rows).any(axis=1) & ~np.isnan(rows).any(axis=1)
    if name in ("running_mean", "running_var"):
        return inf_only
    return model.back(np.broadcast_to(inf_only[:, None], rows.shape))


def _statistics(
    rec: _Recorder,
    fn: Callable[..., Any],
    inputs: CaseInputs,
    exp: Expected,
    model: bounds.CaseModel,
    device: str,
) -> None:
    """The mean and rstd an adapter returns, one per reduction group."""
    call = call_adapter(
        fn, inputs, device, grad=False, returns=("output", "mean", "rstd"), stage="statistics call"
    )
    if call.problems:
        rec.add("statistics", "call", "fail", message="; ".join(call.problems))
        return
    for index, name in enumerate(("mean", "rstd")):
        if name not in call.values or name not in exp.values:
            continue
        # Compared in the dtype the adapter chose; the float32 reference is rounded into it
        # (a second rounding, inside the model's one-ulp rounding allowance).
        dtype = call.dtypes[name]
        if dtype not in NUMPY_DTYPES:
            rec.add("statistics", name, "fail", message=f"{name}: unsupported dtype {dtype}")
            continue
        bound = tolerance.statistics_bound(
            model.stats,
            out_dtype=dtype,
            acc_unit=model.acc_unit,
            reduction=model.reduction,
            n=model.grouping.n,
        )[index]
        actual = call.values[name].reshape(-1)
        reference = round_into(exp.values[name].reshape(-1), dtype)
        if actual.shape != reference.shape:
            message = f"{name}: {actual.size} values for {reference.size} reduction groups"
            rec.add("statistics", name, "fail", message=message)
            continue
        _compare(
            rec,
            "statistics",
            name,
            CallOutcome(values={name: actual}),
            Expected({name: reference}),
            _fixed(np.asarray(bound)),
            inputs,
            model,
            dtype=dtype,
        )


def _fixed(bound: np.ndarray) -> Callable[[bounds.CaseModel], np.ndarray]:
    return lambda model: bound


def _running_stats(
    rec: _Recorder, inputs: CaseInputs, outcome: CallOutcome, exp: Expected, model: bounds.CaseModel
) -> None:
    for name in ("running_mean", "running_var"):
        actual = to_numpy(outcome.leaves[name])
        outcome.values[name] = actual
        old = np.asarray(inputs.arrays[name], dtype=np.float64)

        def bound(m: bounds.CaseModel, name: str = name, old: np.ndarray = old) -> np.ndarray:
            return tolerance.running_stats_bound(
                name,
                old,
                exp.values[name],
                m.stats,
                rec.case.momentum,
                out_dtype=rec.case.dtype,
                acc_unit=m.acc_unit,
                reduction=m.reduction,
            )

        _compare(rec, "running_stats", name, outcome, exp, bound, inputs, model)


def _backward(
    rec: _Recorder,
    inputs: CaseInputs,
    outcome: CallOutcome,
    exp: Expected,
    model: bounds.CaseModel,
    device: str,
) -> None:
    import torch

    try:
        backpropagate(outcome, inputs, device)
    except (Exception, SystemExit) as exc:
        rec.add(
            "backward",
            "call",
            "fail",
            message=f"backward raised {type(exc).__name__}: {first_line(exc)}",
        )
        return
    g_out = np.asarray(inputs.grads["grad_output"], dtype=np.float64)
    for leaf, name in (
        ("input", "grad_input"),
        ("weight", "grad_weight"),
        ("bias", "grad_bias"),
        ("residual", "grad_residual"),
        ("sublayer_output", "grad_sublayer_output"),
    ):
        if name not in exp.values or leaf not in outcome.leaves:
            continue
        tensor = outcome.leaves[leaf].grad
        if tensor is None:
            rec.add("backward", name, "fail", message=f"{name}: autograd gave no gradient")
            continue
        if type(tensor) is not torch.Tensor:
            rec.add("backward", name, "fail", message=f"{name}: {subclass_problem(tensor)}")
            continue
        outcome.values[name] = to_numpy(tensor)

        def bound(m: bounds.CaseModel, name: str = name) -> np.ndarray:
            return bounds.gradient(m, name, g_out, inputs, exp.values[name])

        _compare(rec, "backward", name, outcome, exp, bound, inputs, model)


def _determinism(
    rec: _Recorder,
    adapter: Any,
    inputs: CaseInputs,
    first: CallOutcome,
    device: str,
    backward: bool,
) -> None:
    """Call the adapter again on fresh tensors holding the same inputs; every output (and, with
    ``backward``, every gradient) must equal the first call's bit for bit.

    A difference fails where the adapter declares itself deterministic (the default); where it
    declares ``normconf_deterministic = False`` a forward difference still fails (no
    convention excuses a forward pass that changes from run to run), a gradient difference is
    reported and passes (racy atomic reductions of dW are a declared trade-off).
    """
    inplace = bool(getattr(adapter, "inplace", False))
    again = call_adapter(
        adapter.functions[rec.case.norm],
        inputs,
        device,
        backward,
        inplace=inplace,
        stage="determinism re-run",
    )
    if again.problems or not first.tensors:
        why = "; ".join(again.problems) or "the first call returned no tensors"
        rec.add("determinism", "call", "fail", message=f"second call: {why}")
        return
    gradients = {leaf: t.grad for leaf, t in first.leaves.items() if t.grad is not None}
    if backward and gradients:
        try:
            backpropagate(again, inputs, device, stage="determinism backward pass")
        except (Exception, SystemExit) as exc:  # the first backward succeeded: a second must too
            rec.add(
                "determinism",
                "call",
                "fail",
                message=f"second backward raised {type(exc).__name__}: {first_line(exc)}",
            )
            return
    pairs = [(name, first.tensors[name], again.tensors.get(name)) for name in first.tensors]
    pairs += [(f"grad_{leaf}", g, again.leaves[leaf].grad) for leaf, g in gradients.items()]
    differing = [name for name, a, b in pairs if not bitwise_equal(a, b)]
    forward_differs = [name for name in differing if not name.startswith("grad_")]
    if not differing:
        rec.add(
            "determinism",
            "call",
            "pass",
            message=f"bitwise equal: {', '.join(n for n, _, _ in pairs)}",
        )
        return
    declared = bool(getattr(adapter, "deterministic", True))
    verdict = "fail" if declared or forward_differs else "pass"
    note = "" if verdict == "fail" else " (the adapter declares itself nondeterministic)"
    rec.add(
        "determinism",
        "call",
        verdict,
        message=f"the same inputs twice gave different bits in {', '.join(differing)}{note}",
    )


def _provided_buffers(
    rec: _Recorder,
    adapter: Any,
    inputs: CaseInputs,
    exp: Expected,
    model: bounds.CaseModel,
    graders: Graders,
    device: str,
    kind: str,
) -> None:
    """Call the adapter once more, with ``out=`` buffers poisoned with NaN
    (:mod:`conformance.buffers`): a ``contract`` check of ``out`` (the call returned the buffers
    and wrote every element), then each buffer graded as the output it holds."""
    import torch

    inplace = bool(getattr(adapter, "inplace", False))
    given = buffers.poisoned(rec.case, device, inplace=inplace)
    with torch.no_grad():
        call = call_adapter(
            adapter.functions[rec.case.norm],
            inputs,
            device,
            grad=False,
            inplace=inplace,
            out=buffers.argument(given),
            stage="provided-buffer call",
        )
    if call.raised:
        rec.add("contract", "out", "fail", message=f"with out=: {'; '.join(call.problems)}")
        return
    values = {name: to_numpy(buffer) for name, buffer in given.items()}
    left: dict[str, str | None] = {}
    for name, actual in values.items():
        ungraded, where = _undefined_elements(inputs, model, name), buffers.label(name, given)
        left[name] = buffers.unwritten(actual, exp.values[name], ungraded, where)
    problems = [*call.problems, *buffers.not_returned(call.tensors, given)]
    problems += [why for why in left.values() if why]
    done = f"wrote every element of {', '.join(buffers.label(n, given) for n in given)}"
    rec.add("contract", "out", "fail" if problems else "pass", message="; ".join(problems) or done)
    for name, actual in values.items():
        found, label = CallOutcome(values={name: actual}), f"{name} (out=)"
        grader, cause = graders[name], left[name]
        _compare(rec, kind, name, found, exp, grader, inputs, model, label=label, cause=cause)
