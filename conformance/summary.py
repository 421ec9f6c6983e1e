"""Grades at a glance: the norm x dtype matrix of worst grades, and its terminal table.

A cell of the matrix is the worst outcome over every check of that norm and dtype:

* ``fail`` when any check failed (whatever its grade, e.g. an exception has none);
* else the worst grade of the passing, graded checks, in :data:`GRADES` order;
* else ``pass`` when checks passed that carry no grade (a correct shape or dtype);
* else ``skip`` (only skipped checks) or ``not_run`` (no check at all).

:func:`cell_outcome` is that rule; the Markdown report and :func:`summary_table` both use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from conformance.messages import is_control
from conformance.results import GRADES, KINDS, CheckResult, RunRecord

#: Norms and dtypes in the order reports show them; names not listed follow in order of appearance.
NORM_ORDER = (
    "layer_norm",
    "rms_norm",
    "deep_norm",
    "fused_add_layer_norm",
    "fused_add_rms_norm",
    "group_norm",
    "instance_norm",
    "batch_norm",
)
DTYPE_ORDER = ("float64", "float32", "float16", "bfloat16")

#: Cell outcomes besides the grades.
UNGRADED_PASS = "pass"
SKIPPED = "skip"
NOT_RUN = "not_run"

_WIDTH = 100
_SHORT = {
    "correctly_rounded": "rounded",
    "faithful": "faithful",
    "within_tolerance": "in-tol",
    "fail": "FAIL",
    UNGRADED_PASS: "pass",
    SKIPPED: "skip",
    NOT_RUN: "-",
}


def ordered(names: Iterable[str], preferred: Sequence[str]) -> list[str]:
    """The distinct ``names``: those in ``preferred`` in its order, then the rest as they came."""
    seen = list(dict.fromkeys(names))
    known = [n for n in preferred if n in seen]
    return known + [n for n in seen if n not in preferred]


def cell_outcome(checks: Iterable[CheckResult]) -> str:
    """The worst outcome over ``checks`` (see the module docstring for the rule)."""
    checks = list(checks)
    if any(c.verdict == "fail" for c in checks):
        return "fail"
    passed = [c for c in checks if c.verdict == "pass"]
    graded = [GRADES.index(c.grade) for c in passed if c.grade in GRADES]
    if graded:
        return GRADES[max(graded)]
    if passed:
        return UNGRADED_PASS
    return SKIPPED if checks else NOT_RUN


def grade_matrix(record: RunRecord) -> tuple[list[str], list[str], dict[tuple[str, str], str]]:
    """Norms (rows), dtypes (columns) and the outcome of each ``(norm, dtype)`` cell."""
    norms = ordered((c.norm for c in record.checks), NORM_ORDER)
    dtypes = ordered((c.dtype for c in record.checks), DTYPE_ORDER)
    cells = {
        (norm, dtype): cell_outcome(c for c in record.checks if (c.norm, c.dtype) == (norm, dtype))
        for norm in norms
        for dtype in dtypes
    }
    return norms, dtypes, cells


def kinds_in(record: RunRecord) -> list[str]:
    """The check kinds present in ``record``, in :data:`KINDS` order."""
    return ordered((c.kind for c in record.checks), KINDS)


def printable(text: str, limit: int = _WIDTH) -> str:
    """``text`` safe for a terminal: control and format characters (escape sequences, bidi
    overrides, newlines) become ``?``, and it is cut to ``limit`` characters."""
    safe = "".join("?" if is_control(ch) else ch for ch in text)
    return safe if len(safe) <= limit else safe[: max(limit - 3, 0)] + "..."


def summary_table(record: RunRecord) -> str:
    """A compact plain-text summary, at most 100 columns wide.

    A title line (adapter, seed), the norm x dtype grade table (split into several tables when
    the dtypes do not fit side by side), the pass/fail/skip counts and the verdict.
    """
    name = str(record.adapter.get("name") or record.adapter.get("spec") or "adapter")
    lines = [printable(f"normconf: {name} (seed {record.seed})")]
    norms, dtypes, cells = grade_matrix(record)
    if not norms:
        lines.append("no checks ran")
    norm_width = min(max((len(n) for n in norms), default=4), 30)
    for chunk in _column_chunks(dtypes, norm_width):
        widths = [max(len(_SHORT["faithful"]), len(printable(d, 20))) for d in chunk]
        lines.append("")
        lines.append(_row("norm", norm_width, [printable(d, 20) for d in chunk], widths))
        lines.append(_row("-" * norm_width, norm_width, ["-" * w for w in widths], widths))
        for norm in norms:
            outcomes = [_SHORT.get(cells[norm, d], cells[norm, d]) for d in chunk]
            lines.append(_row(printable(norm, norm_width), norm_width, outcomes, widths))
    counts = record.summary()
    total = len(record.checks)
    lines.append("")
    lines.append(
        f"{total} checks: {counts['pass']} passed, {counts['fail']} failed, "
        f"{counts['skip']} skipped"
    )
    lines.append(f"verdict: {record.verdict.upper()}")
    return "\n".join(lines)


def _row(first: str, first_width: int, cells: Sequence[str], widths: Sequence[int]) -> str:
    parts = [first.ljust(first_width), *(c.ljust(w) for c, w in zip(cells, widths, strict=True))]
    return "  ".join(parts).rstrip()


def _column_chunks(dtypes: Sequence[str], norm_width: int) -> list[list[str]]:
    """Split the dtype columns so that each table stays within the width."""
    chunks: list[list[str]] = []
    used = _WIDTH + 1  # start a new chunk on the first column
    for dtype in dtypes:
        width = 2 + max(len(_SHORT["faithful"]), len(printable(dtype, 20)))
        if used + width > _WIDTH:
            chunks.append([])
            used = norm_width
        chunks[-1].append(dtype)
        used += width
    return chunks


def speed_table(record: RunRecord) -> str:
    """The speed results as a plain-text table, and the speed verdict."""
    ceiling = record.ceiling or {}
    lines = [
        "",
        printable(
            f"speed on {ceiling.get('name', '?')}: ceiling {ceiling.get('gbps', float('nan')):.1f}"
            f" GB/s ({ceiling.get('method', 'not measured')})",
            200,
        ),
    ]
    header = ["speed case", "GB/s", "of ceiling", "vs baseline", "verdict"]
    rows = []
    for r in record.speed:
        fraction = "-" if r.fraction_of_ceiling is None else f"{r.fraction_of_ceiling:.0%}"
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        rows.append([printable(r.speed_id, 60), f"{r.gbps:.1f}", fraction, ratio, r.verdict])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    failed = sum(r.verdict == "fail" for r in record.speed)
    lines.append("")
    lines.append(f"{len(record.speed)} speed results: {failed} failed")
    lines.append(f"speed verdict: {(record.speed_verdict or 'not measured').upper()}")
    return "\n".join(lines)
