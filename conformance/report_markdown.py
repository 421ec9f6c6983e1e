"""``report.md``: the human-readable report (GitHub-flavoured Markdown).

Layout: title with the adapter's name and the verdict; the run's facts (adapter, hardware,
software, seed, timing, command); the norm x dtype matrix of worst grades (the rule is in
:mod:`conformance.summary`); the coverage tables (:mod:`conformance.coverage`: which shape
classes and layouts ran and passed); a table per check kind; then every failure, grouped by
norm, with its :func:`~conformance.messages.failure_message` and its reproduction command.

Every string in a report may come from the adapter under test (its name, its spec, exception
texts, diagnoses built from its output) or from a ``report.json`` written elsewhere, so none is
trusted as markup: inline text goes through :func:`escape` (HTML-significant characters become
entities, Markdown punctuation is backslash-escaped, line breaks become spaces, a block marker
at its start is escaped, and control and format characters, ANSI escapes and bidi overrides
among them, are written as escapes by :func:`~conformance.messages.visible`), and multi-line
text goes into :func:`code_block`, whose fence is longer than any backtick run inside.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from conformance import coverage
from conformance.messages import failure_message, grade_words, visible
from conformance.results import CheckResult, RunRecord
from conformance.summary import (
    DTYPE_ORDER,
    NORM_ORDER,
    NOT_RUN,
    SKIPPED,
    UNGRADED_PASS,
    cell_outcome,
    grade_matrix,
    kinds_in,
    ordered,
)

#: How each cell outcome is shown: a symbol (for scanning) and words (for reading).
OUTCOME_LABELS = {
    "correctly_rounded": "✅ correctly rounded",
    "faithful": "🟢 faithful",
    "within_tolerance": "🟡 within tolerance",
    "fail": "❌ fail",
    UNGRADED_PASS: "✔️ pass",
    SKIPPED: "— skipped",
    NOT_RUN: "— not run",
}

_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
# Characters that open or close inline constructs: code spans, emphasis, links and images,
# table cells, strikethrough, GitHub's math. A backslash before ASCII punctuation is a literal.
_BACKSLASHED = frozenset("\\`*_[]|~$")
# What starts a block when a line begins with it: a heading, a bullet, a setext underline or a
# thematic break (#, +, -, =), an ordered list item (1. or 1) then a space). Some escaped text
# is placed at the start of a line, so its first marker is escaped.
_BLOCK_START = re.compile(r"^( {0,3})([#+=-]|\d{1,9}[.)](?= |$))")


def escape(text: object) -> str:
    """``text`` as inline Markdown that renders literally, wherever on a line it is placed, and
    stays on one line: line breaks become spaces, other control and format characters read as
    their escapes (``\\x1b``, ``\\u202e``), as in :func:`~conformance.messages.visible`."""
    out = []
    for ch in visible(str(text)):
        if ch in _ENTITIES:
            out.append(_ENTITIES[ch])
        elif ch in _BACKSLASHED:
            out.append("\\" + ch)
        elif ch in "\t\n":
            out.append(" ")
        else:
            out.append(ch)
    return _BLOCK_START.sub(_escape_marker, "".join(out), count=1)


def _escape_marker(match: re.Match[str]) -> str:
    indent, marker = match.groups()
    return f"{indent}{marker[:-1]}\\{marker[-1]}"


def code_block(text: str, info: str = "") -> str:
    """``text`` in a fenced code block that nothing inside it can close; control and format
    characters other than newline and tab read as their escapes (:func:`visible`)."""
    clean = visible(text)
    longest = max((len(run) for run in re.findall(r"`+", clean)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{clean}\n{fence}"


def render_markdown(record: RunRecord) -> str:
    """The whole report as Markdown text (ends with a newline)."""
    sections = [
        _header(record),
        _facts(record),
        _matrix(record),
        _coverage(record),
        _kinds(record),
        _speed(record),
        _failures(record),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def adapter_name(record: RunRecord) -> str:
    """The adapter's display name, falling back to its spec."""
    return str(record.adapter.get("name") or record.adapter.get("spec") or "unnamed adapter")


def _header(record: RunRecord) -> str:
    counts = record.summary()
    verdict = "✅ PASS" if record.verdict == "pass" else "❌ FAIL"
    text = (
        f"# normconf report: {escape(adapter_name(record))}\n\n"
        f"**Verdict: {verdict}**: {len(record.checks)} checks, {counts['pass']} passed, "
        f"{counts['fail']} failed, {counts['skip']} skipped"
    )
    if record.speed_verdict is not None:
        failed = sum(r.verdict == "fail" for r in record.speed)
        mark = "✅ PASS" if record.speed_verdict == "pass" else "❌ FAIL"
        text += f"\n\n**Speed: {mark}**: {len(record.speed)} timings, {failed} failed"
    return text


def _speed(record: RunRecord) -> str:
    """The speed battery: the ceiling, then one row per timing with its verdict and reasons."""
    if not record.speed:
        return ""
    ceiling = record.ceiling or {}
    datasheet = ceiling.get("datasheet_gbps")
    lines = [
        "## Speed",
        "",
        f"Ceiling: **{_gbps(ceiling.get('gbps'))} GB/s**, {escape(ceiling.get('method', ''))} "
        f"on {escape(ceiling.get('name', ''))}"
        + (f"; datasheet peak {_gbps(datasheet)} GB/s" if datasheet else "")
        + ". Bandwidth is the bytes model's count (conformance/speed.py) per median call.",
    ]
    header = ["timing", "median", "spread (p25 to p75)", "GB/s", "of ceiling", "vs baseline", ""]
    rows = []
    for r in record.speed:
        fraction = "—" if r.fraction_of_ceiling is None else f"{r.fraction_of_ceiling:.0%}"
        ratio = "—" if r.ratio is None else f"{r.ratio:.2f}x {escape(r.baseline or '')}"
        mark = "✅" if r.verdict == "pass" else "❌"
        rows.append(
            [
                escape(r.speed_id),
                _seconds(r.median_s),
                f"{_seconds(r.p25_s)} to {_seconds(r.p75_s)}",
                _gbps(r.gbps),
                fraction,
                ratio,
                mark,
            ]
        )
    failed = [r for r in record.speed if r.verdict == "fail"]
    body = "\n".join(lines) + "\n\n" + _table(header, rows)
    if failed:
        reasons = "\n".join(f"- {escape(r.speed_id)}: {escape(r.message)}" for r in failed)
        body += f"\n\nWhy each failed timing fails:\n\n{reasons}"
    return body


def _gbps(value: Any) -> str:
    return "—" if not isinstance(value, int | float) or value != value else f"{value:.1f}"


def _seconds(value: float) -> str:
    if value != value:
        return "—"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value / 1e-9:.3g} ns"


def _facts(record: RunRecord) -> str:
    rows = [
        ("Adapter", _mapping(record.adapter)),
        ("Hardware", _mapping(record.hardware)),
        ("Software", _mapping(record.software)),
        ("Seed", escape(record.seed)),
        ("Battery", "quick" if record.quick else "full"),
        ("Started", escape(record.started)),
        ("Finished", escape(record.finished)),
    ]
    table = _table(["", ""], [[f"**{k}**", v or "—"] for k, v in rows])
    return f"{table}\n\nCommand:\n\n{code_block(record.command, 'sh')}"


def _mapping(values: Mapping[str, Any]) -> str:
    return "; ".join(f"{escape(k)}: {escape(_plain(v))}" for k, v in values.items())


def _plain(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _matrix(record: RunRecord) -> str:
    norms, dtypes, cells = grade_matrix(record)
    if not norms:
        return "## Grades\n\nNo checks ran."
    rows = [
        [
            escape(norm),
            *(OUTCOME_LABELS.get(cells[norm, d], escape(cells[norm, d])) for d in dtypes),
        ]
        for norm in norms
    ]
    table = _table(["norm", *(escape(d) for d in dtypes)], rows)
    return f"## Grades by norm and dtype\n\nWorst grade over each cell's checks.\n\n{table}"


_COVERAGE_MARKS = {"pass": "✅ ", "fail": "❌ ", "none": ""}


def _coverage(record: RunRecord) -> str:
    """One table per axis of :data:`conformance.coverage.AXES`: a row per norm and dtype, a
    column per class, ``passed/cases`` in each cell."""
    table = coverage.coverage(record.checks)
    if not table:
        return ""
    parts = [
        "## Coverage\n\nCases that ran and passed, by shape class and memory layout: a pass "
        "covers these, no more (— : none ran)."
    ]
    norms = ordered(table, NORM_ORDER)
    for axis, (title, classes) in coverage.AXES.items():
        rows = []
        for norm in norms:
            for dtype in ordered(table[norm], DTYPE_ORDER):
                counts = table[norm][dtype].get(axis, {})
                cells = [
                    _COVERAGE_MARKS[coverage.cell_state(counts.get(c))]
                    + coverage.cell_text(counts.get(c))
                    for c in classes
                ]
                rows.append([f"{escape(norm)} · {escape(dtype)}", *cells])
        header = ["norm · dtype", *(escape(c) for c in classes)]
        parts.append(f"### {title.capitalize()}\n\n{_table(header, rows)}")
    absent = {axis: names for axis, names in coverage.missing(table).items() if names}
    if absent:
        lines = [
            f"- {escape(coverage.AXES[a][0])}: {escape(', '.join(names))}"
            for a, names in absent.items()
        ]
        parts.append("Not covered by any case of this run:\n\n" + "\n".join(lines))
    return "\n\n".join(parts)


def _kinds(record: RunRecord) -> str:
    if not record.checks:
        return ""
    rows = []
    for kind in kinds_in(record):
        checks = [c for c in record.checks if c.kind == kind]
        counts = {v: sum(c.verdict == v for c in checks) for v in ("pass", "fail", "skip")}
        worst = cell_outcome(checks)
        rows.append(
            [
                escape(kind),
                str(len(checks)),
                str(counts["pass"]),
                str(counts["fail"]),
                str(counts["skip"]),
                OUTCOME_LABELS.get(worst, escape(worst)),
            ]
        )
    table = _table(["kind", "checks", "passed", "failed", "skipped", "worst grade"], rows)
    return f"## Checks by kind\n\n{table}"


def _failures(record: RunRecord) -> str:
    failed = [c for c in record.checks if c.verdict == "fail"]
    if not failed:
        return "## Failures\n\nNone."
    parts = [f"## Failures ({len(failed)})"]
    for norm in ordered((c.norm for c in failed), NORM_ORDER):
        parts.append(f"### {escape(norm)}")
        parts.extend(_failure(c) for c in failed if c.norm == norm)
    return "\n\n".join(parts)


def _failure(check: CheckResult) -> str:
    title = (
        f"#### {escape(check.check_id)}\n\n"
        f"{escape(check.dtype)} · {escape(check.kind)} · {escape(check.output)} · "
        f"shape {escape(check.shape)} · {escape(check.distribution)} · "
        f"grade: {escape(grade_words(check.grade))}"
    )
    body = code_block(failure_message(check, include_reproduction=False))
    if check.reproduce:
        body += f"\n\nReproduce:\n\n{code_block(check.reproduce, 'sh')}"
    return f"{title}\n\n{body}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)
