"""What a run covered: per norm and dtype, which shape classes, input layouts, gradient layouts
and parameter layouts ran, and which of them passed.

A pass means what this table says, no more: a norm certified without a ``many_rows`` case says
nothing about a grid of 65536 rows. Counts are of cases (a case passes when none of its checks
failed; a case whose every check was skipped did not run), read from each check's record
(:attr:`conformance.results.CheckResult.shape_classes` and its layouts), so a report of record,
a resumed run and a merged shard count the same way. Gradient layouts count only the cases with
a backward check, parameter layouts only the cases with affine parameters (a case without
records its parameter layout as ``none``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from conformance.layouts import LAYOUT_CLASSES, classes_of_name
from conformance.results import CheckResult
from conformance.shape_classes import SHAPE_CLASSES, classes_for

#: The axes of the coverage table, their classes in table order, and what each axis is called.
AXES: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "shape": ("shape classes", SHAPE_CLASSES),
    "input": ("input layouts", LAYOUT_CLASSES),
    "grad": ("gradient layouts", LAYOUT_CLASSES),
    "params": ("parameter layouts", ("contiguous", "offset", "expanded")),
}

#: ``coverage[norm][dtype][axis][class] = {"cases": n, "passed": m}``.
Coverage = dict[str, dict[str, dict[str, dict[str, dict[str, int]]]]]


def _case_classes(checks: list[CheckResult]) -> dict[str, tuple[str, ...]]:
    first = checks[0]
    backward = any(c.kind == "backward" for c in checks)
    return {
        "shape": tuple(first.shape_classes),
        "input": classes_of_name(first.layout),
        "grad": classes_of_name(first.grad_layout) if backward else (),
        "params": classes_of_name(first.param_layout),  # "none" without affine parameters
    }


def coverage(checks: Iterable[CheckResult]) -> Coverage:
    """The coverage table of a run's checks (see the module docstring)."""
    by_case: dict[str, list[CheckResult]] = {}
    for check in checks:
        by_case.setdefault(check.case_id, []).append(check)
    table: Coverage = {}
    for results in by_case.values():
        if all(r.verdict == "skip" for r in results):
            continue
        passed = not any(r.verdict == "fail" for r in results)
        cell = table.setdefault(results[0].norm, {}).setdefault(results[0].dtype, {})
        for axis, classes in _case_classes(results).items():
            counts = cell.setdefault(axis, {})
            for name in classes:
                entry = counts.setdefault(name, {"cases": 0, "passed": 0})
                entry["cases"] += 1
                entry["passed"] += passed
    return table


def missing(table: Coverage) -> dict[str, list[str]]:
    """Per axis, the classes that no case of the run exercised at all (shape classes: of those
    the run's norms can have, :func:`conformance.shape_classes.classes_for`)."""
    seen: dict[str, set[str]] = {axis: set() for axis in AXES}
    for dtypes in table.values():
        for axes in dtypes.values():
            for axis, counts in axes.items():
                seen[axis].update(counts)
    possible = {c for norm in table for c in classes_for(norm)}
    out = {axis: [c for c in AXES[axis][1] if c not in seen[axis]] for axis in AXES}
    out["shape"] = [c for c in out["shape"] if c in possible]
    return out


def cell_text(entry: Mapping[str, Any] | None) -> str:
    """``passed/cases`` (``—`` where none ran)."""
    if not entry:
        return "—"
    return f"{entry['passed']}/{entry['cases']}"


def cell_state(entry: Mapping[str, Any] | None) -> str:
    """``pass`` (every case passed), ``fail`` (at least one failed) or ``none`` (none ran)."""
    if not entry:
        return "none"
    return "pass" if entry["passed"] == entry["cases"] else "fail"
