"""Which layout a kernel mishandles: the same values again, laid out contiguously.

When a case whose input, upstream gradient or parameters are laid out other than contiguously
(:mod:`conformance.layouts`) fails a graded check, it is run again with the same values in
contiguous tensors. A failed check that passes there failed because of the layout, so its
diagnosis says so first, keeping what the values suggested (E[x²] - E[x]² on a channels-last
path) unless that rests on a NaN — a stride-0 ``grad_output`` read as dense returns the NaN
poison around it, which a value diagnosis would blame on the math;
each non-contiguous role is then tried alone to name the one at fault: "right with the same
values in contiguous tensors, wrong with grad_output transposed". One rerun per failing case of
such a layout, one more per role when the layout is the cause; none for contiguous cases.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from conformance.cases import Case
from conformance.inputs import CaseInputs
from conformance.layouts import CONTIGUOUS
from conformance.results import CheckResult

#: The check kinds whose values a layout can make wrong.
_GRADED = ("forward", "backward", "nonfinite", "statistics", "running_stats")
_ROLES = (("input", "layout"), ("grad_output", "grad_layout"), ("weight and bias", "param_layout"))

Rerun = Callable[[Case, CaseInputs], list[CheckResult]]
#: How the fingerprint begins a diagnosis it has no explanation for.
UNEXPLAINED = "no known convention or defect explains it"


def explain_layout(
    results: list[CheckResult], case: Case, inputs: CaseInputs, rerun: Rerun
) -> None:
    """Rewrite the diagnosis of each failed check of ``results`` that the layout causes
    (``rerun`` runs the graded checks of a case on given inputs, without diagnoses)."""
    failed = [r for r in results if r.verdict == "fail" and r.kind in _GRADED]
    laid_out = [(role, key) for role, key in _ROLES if not getattr(case, key).contiguous]
    if not failed or not laid_out:
        return

    def failing(**layouts: object) -> set[tuple[str, str]]:
        variant = replace(case, **layouts)  # type: ignore[arg-type]
        again = rerun(variant, replace(inputs, case=variant))
        return {(r.kind, r.output) for r in again if r.verdict == "fail"}

    contiguous = failing(layout=CONTIGUOUS, grad_layout=CONTIGUOUS, param_layout=CONTIGUOUS)
    caused = [r for r in failed if (r.kind, r.output) not in contiguous]
    if not caused:
        return  # wrong in contiguous tensors too: the values, not the layout
    keys = {(r.kind, r.output) for r in caused}
    culprits = []
    for role, key in laid_out:
        if len(laid_out) == 1 or keys & failing(**{k: CONTIGUOUS for _, k in _ROLES if k != key}):
            culprits.append(f"{role} {getattr(case, key).name}")
    if not culprits:  # only the layouts together
        culprits = [" + ".join(f"{role} {getattr(case, key).name}" for role, key in laid_out)]
    words = (
        "right with the same values in contiguous tensors, wrong with "
        f"{' and with '.join(culprits)}: the kernel's handling of that layout is at fault (its "
        "strides, storage offset or stride-0 dimensions, or a separate code path for it)"
    )
    for r in caused:
        m = r.metrics
        outside = f" ({m.mismatched} of {m.n} elements outside the tolerance)" if m else ""
        # What the values alone suggested still describes that layout's path, unless it
        # explains nothing or rests on a NaN, which a misread layout returns from the poison.
        kept = r.diagnosis or ""
        poisoned = m is not None and m.nonfinite_mismatches > 0
        if kept.startswith(UNEXPLAINED) or poisoned or not kept:
            r.diagnosis = words + outside
        else:
            r.diagnosis = f"{words}; on that layout the output is {kept}"
