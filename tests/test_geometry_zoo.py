"""The geometry zoo: LayerNorms right on every value and wrong on one class of shape or layout
(``tests/zoo/geometry_bugs.py``). The quick and the full battery must each reject every one with
failing checks confined to exactly the cases its defect touches, whose ids name the class; the
control, a hand-written backward that honours every stride, must pass both."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conformance.cases import Case
from conformance.engine import certify, select_cases
from conformance.inputs import build_inputs, layout_of, to_tensor
from conformance.results import RunRecord
from impls.loader import load_adapter

ZOO = Path(__file__).parent / "zoo" / "geometry_bugs.py"
PLAIN = ("normal", "uniform")


def _grad_read_dense_differs(case: Case) -> bool:
    """Whether reading ``grad_output`` densely from its offset gives other values: it is laid
    out with gaps, padding or another memory order (an expanded one is made contiguous)."""
    grad = build_inputs(case).grads["grad_output"]
    assert grad is not None
    tensor = to_tensor(grad, "cpu", layout_of(case, "grad_output"))
    return tensor.numel() > 1 and 0 not in tensor.stride() and not tensor.is_contiguous()


def _grad_expanded(case: Case) -> bool:
    shape, dims = case.shape, case.grad_layout.expanded_dims(len(case.shape))
    return case.elements > 0 and any(shape[d] > 1 for d in dims)


def _n(case: Case) -> int:
    return case.grouping.n


@dataclass(frozen=True)
class Defect:
    name: str
    #: The cases the defect makes wrong, from the case alone.
    touches: Callable[[Case], bool]
    #: Case-id words of which every failing case carries one.
    named_by: tuple[str, ...]
    #: Kinds of check that fail.
    kinds: frozenset[str]


DEFECTS = (
    Defect("row_wrap", lambda c: c.grouping.groups > 2**16, ("many_rows",),
           frozenset({"forward", "backward"})),
    Defect("tail_dropped", lambda c: _n(c) > 1024 and _n(c) % 1024 != 0,
           ("tile_edge", "model_size"), frozenset({"forward", "backward"})),
    Defect("wide_row_partials", lambda c: _n(c) > 16384, ("wide_row",),
           frozenset({"forward", "backward"})),
    Defect("empty_crash", lambda c: c.elements == 0, ("empty",), frozenset({"contract"})),
    Defect("grad_strides_ignored", _grad_read_dense_differs, ("gnc", "gtr", "gpad1", "gpad3",
           "gcl"), frozenset({"backward"})),
    Defect("grad_expanded_as_dense", _grad_expanded, ("gb", "gb0"), frozenset({"backward"})),
)  # fmt: skip


def _run(name: str, quick: bool) -> tuple[RunRecord, list[Case]]:
    cases = select_cases(norms=["layer_norm"], dtypes=["float32"], quick=quick)
    return certify(load_adapter(f"{ZOO}:{name}"), cases, device="cpu"), cases


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
@pytest.mark.parametrize("defect", DEFECTS, ids=lambda d: d.name)
def test_each_geometry_defect_fails_exactly_the_cases_of_its_class(
    defect: Defect, quick: bool
) -> None:
    record, cases = _run(defect.name, quick)
    failed = {c.case_id for c in record.checks if c.verdict == "fail"}
    touched = {c.case_id for c in cases if defect.touches(c)}
    # A large mean (κ = 10³) earns a tolerance of about 17·u·κ, above the 1/n that a statistic
    # off by one element costs; on plain values every touched case must fail.
    plain = {c.case_id for c in cases if defect.touches(c) and c.distribution in PLAIN}
    assert plain, f"the {'quick' if quick else 'full'} battery has no case of {defect.name}"
    assert failed <= touched, f"failing but untouched: {sorted(failed - touched)}"
    assert plain <= failed, f"touched but passing: {sorted(plain - failed)}"
    for case_id in failed:
        words = case_id.split("-")
        assert any(w in words for w in defect.named_by), f"{case_id} does not name its class"
    kinds = {c.kind for c in record.checks if c.verdict == "fail"}
    assert kinds == defect.kinds


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_a_hand_written_backward_that_honours_strides_passes_both_batteries(quick: bool) -> None:
    record, cases = _run("correct", quick)
    failed = [
        f"{c.case_id} {c.kind} {c.output}: {c.message}"
        for c in record.checks
        if c.verdict == "fail"
    ]
    assert not failed, "\n".join(failed)
    assert {k for c in cases for k in c.shape_classes} >= {"many_rows", "tile_edge", "empty"}


def test_the_empty_batch_crash_names_the_call_that_raised() -> None:
    record, _ = _run("empty_crash", True)
    (failed,) = [c for c in record.checks if c.verdict == "fail"]
    assert failed.kind == "contract"
    assert "empty" in failed.case_id.split("-")
    assert "invalid configuration argument" in failed.message


@pytest.mark.parametrize(
    ("name", "phrase"),
    [
        ("row_wrap", "from 65536 = 2^16 on"),
        (
            "grad_strides_ignored",
            "right with the same values in contiguous tensors, wrong with grad_output",
        ),
        ("grad_expanded_as_dense", "wrong with grad_output expanded"),
    ],
)
def test_the_diagnosis_names_the_boundary_or_the_layout(name: str, phrase: str) -> None:
    """A row index that wraps is located at 2^16; a layout bug is found by running the same
    values again in contiguous tensors, and named by the role whose layout breaks it (the NaN a
    stride-0 grad_output read as dense returns is not blamed on the math)."""
    record, _ = _run(name, True)
    failed = [c for c in record.checks if c.verdict == "fail"]
    assert failed
    unnamed = [
        f"{c.case_id} {c.output}: {c.diagnosis}"
        for c in failed
        if phrase not in (c.diagnosis or "")
    ]
    assert not unnamed, "\n".join(unnamed)
