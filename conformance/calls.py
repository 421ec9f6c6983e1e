"""One call into an adapter, and the contract of what comes back.

:func:`call_adapter` builds fresh tensors from a case's inputs (in the case's layout, leaves that
require grad where a backward pass follows), calls the adapter's function inside
:func:`conformance.watch.calling` (so that a worker's watchdog can time it), waits for the
device, and records what came back as float64 arrays, or why nothing usable did: an exception
(``SystemExit`` included), a non-tensor or a tensor subclass, the wrong shape, dtype or device,
an output sharing memory with an argument, an argument changed in place.
:func:`backpropagate` runs autograd from a call's outputs the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from conformance import watch
from conformance.cases import Case
from conformance.inputs import CaseInputs, layout_of, to_numpy, to_tensor, torch_dtype
from conformance.specs import call_arguments, call_keywords, spec

_DIFFERENTIABLE = ("input", "weight", "bias", "residual", "sublayer_output")


@dataclass
class CallOutcome:
    """What the adapter returned for one call, as float64 arrays, or why there is nothing."""

    values: dict[str, np.ndarray] = field(default_factory=dict)
    tensors: dict[str, Any] = field(default_factory=dict)
    leaves: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    dtypes: dict[str, str] = field(default_factory=dict)
    raised: bool = False


def call_adapter(
    fn: Callable[..., Any],
    inputs: CaseInputs,
    device: str,
    grad: bool,
    returns: tuple[str, ...] | None = None,
    *,
    inplace: bool = False,
    out: Any = None,
    stage: str = "forward call",
) -> CallOutcome:
    """Call ``fn`` on fresh tensors; record the outputs, the leaves and any contract problem.

    ``inplace``: the adapter declares that its fused add-norms update ``residual`` in place
    with the new residual (``normconf_inplace``); the call must then leave in ``residual``
    exactly what it returns as ``residual_out``, and only that output may share its memory.
    ``out``: passed on as the keyword ``out=`` (the provided-buffer check), unless None.
    """
    import torch

    case, outcome = inputs.case, CallOutcome()
    s = spec(case.norm)
    for name, array in inputs.arrays.items():
        if array is None:
            continue
        needs_grad = grad and name in _DIFFERENTIABLE
        outcome.leaves[name] = to_tensor(array, device, layout_of(case, name), needs_grad)
    before = {k: t.detach().clone() for k, t in outcome.leaves.items()}
    args = call_arguments(case.norm, {**inputs.arrays, **outcome.leaves}, inputs.params)
    keywords = call_keywords(case.norm, inputs.params)
    if out is not None:
        keywords["out"] = out
    try:
        with watch.calling(stage):
            result = fn(*args, **keywords)
            settle(device)
    except (Exception, SystemExit) as exc:  # the adapter's failure is a finding, not ours
        outcome.problems.append(f"raised {type(exc).__name__}: {first_line(exc)}")
        outcome.raised = True
        return outcome
    names = returns or (("output", "residual_out") if s.fused else ("output",))
    returned = result if len(names) > 1 else (result,)
    if len(names) > 1 and (not isinstance(result, tuple | list) or len(result) != len(names)):
        outcome.problems.append(f"returned {type(result).__name__}; expected ({', '.join(names)})")
        return outcome
    for name, value in zip(names, returned, strict=True):
        if name in ("mean", "rstd"):
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                outcome.problems.append(f"{name}: a {type(value).__name__}, not a torch.Tensor")
                continue
            if type(value) is not torch.Tensor:
                outcome.problems.append(f"{name}: {subclass_problem(value)}")
                continue
            outcome.values[name] = to_numpy(value)
            outcome.dtypes[name] = str(value.dtype).removeprefix("torch.")
            continue
        problem = tensor_problem(value, case, device)
        if problem:
            outcome.problems.append(f"{name}: {problem}")
            continue
        outcome.tensors[name] = value
        outcome.values[name] = to_numpy(value)
    in_place = inplace and s.fused
    _aliasing_problems(outcome, in_place)
    _mutation_problems(outcome, before, case, in_place)
    return outcome


def _shares_memory(a: Any, b: Any) -> bool:
    """Whether two tensors are views of one storage."""
    left, right = a.untyped_storage(), b.untyped_storage()
    return bool(left.nbytes() and left.data_ptr() == right.data_ptr())


def _aliasing_problems(out: CallOutcome, in_place: bool) -> None:
    """An output that shares memory with an argument (only the declared in-place residual of
    a fused add-norm may)."""
    for name, tensor in out.tensors.items():
        for leaf, argument in out.leaves.items():
            if in_place and (name, leaf) == ("residual_out", "residual"):
                continue
            if _shares_memory(tensor, argument):
                out.problems.append(
                    f"{name} shares memory with its argument {leaf!r} (declare "
                    "normconf_inplace only for a fused add-norm's residual)"
                )


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, cut to 300 characters."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def subclass_problem(value: Any) -> str:
    """Why a tensor subclass is refused: its hooks (``__torch_function__``,
    ``__torch_dispatch__``) could answer the suite's own inspections — equality, storage, the
    copy to the host — with anything, so only plain tensors are graded."""
    kind = type(value)
    return f"returned a {kind.__module__}.{kind.__qualname__}, a torch.Tensor subclass"


def tensor_problem(value: Any, case: Case, device: str) -> str | None:
    import torch

    if not isinstance(value, torch.Tensor):
        return f"returned a {type(value).__module__}.{type(value).__name__}, not a torch.Tensor"
    if type(value) is not torch.Tensor:
        return subclass_problem(value)
    if tuple(value.shape) != case.shape:
        return f"shape {tuple(value.shape)}, expected {case.shape}"
    if value.dtype != torch_dtype(case.dtype):
        return f"dtype {value.dtype}, expected torch.{case.dtype}"
    if value.device.type != torch.device(device).type:
        return f"on device {value.device}, expected {device}"
    return None


def _mutation_problems(
    out: CallOutcome, before: Mapping[str, Any], case: Case, in_place: bool = False
) -> None:
    import torch

    for name, original in before.items():
        if name in ("running_mean", "running_var") and case.norm == "batch_norm" and case.training:
            continue  # updated in place by contract when training
        if in_place and name == "residual":
            returned = out.tensors.get("residual_out")
            if returned is not None and not bitwise_equal(out.leaves[name], returned):
                out.problems.append(
                    "declares normconf_inplace, but 'residual' does not hold the residual_out "
                    "it returned"
                )
            continue
        now = out.leaves[name].detach()
        if not torch.equal(torch.nan_to_num(now), torch.nan_to_num(original)) or not torch.equal(
            now.isnan(), original.isnan()
        ):
            out.problems.append(f"changed its argument {name!r} in place")


def backpropagate(
    outcome: CallOutcome, inputs: CaseInputs, device: str, stage: str = "backward pass"
) -> None:
    """Autograd from a call's outputs (the output, and the new residual of the add-norms)
    with the case's upstream gradients into the call's leaves."""
    import torch

    case = inputs.case
    grads = {
        k: to_tensor(v, device, layout_of(case, k))
        for k, v in inputs.grads.items()
        if v is not None
    }
    outputs = [outcome.tensors["output"]]
    upstream = [grads["grad_output"]]
    if "residual_out" in outcome.tensors and "grad_residual_out" in grads:
        outputs.append(outcome.tensors["residual_out"])
        upstream.append(grads["grad_residual_out"])
    with watch.calling(stage):
        torch.autograd.backward(outputs, upstream)
        settle(device)


def settle(device: str) -> None:
    """Wait for the device's queued work, so that a hung or faulting kernel is caught inside
    the call that launched it (and inside the watchdog's window)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


_SAME_WIDTH_INTEGERS = {8: "int64", 4: "int32", 2: "int16", 1: "int8"}


def bitwise_equal(a: Any, b: Any) -> bool:
    """Whether two tensors hold the same bits (NaN payloads and signed zeros included)."""
    import torch

    if b is None or a.shape != b.shape or a.dtype != b.dtype:
        return False
    ints = getattr(torch, _SAME_WIDTH_INTEGERS[a.element_size()])
    left = a.detach().contiguous().view(ints)
    right = b.detach().contiguous().view(ints)
    return bool(torch.equal(left, right))
