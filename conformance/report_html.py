"""``report.html``: the report for people, one self-contained HTML5 file.

Layout: a title with the adapter's name and the verdicts as badges (accuracy; speed when it was
measured); the run's facts; the norm x dtype matrix of worst grades, colour-coded, with its legend
(the rule is :func:`conformance.summary.cell_outcome`, as in ``report.md``); the coverage tables
(:mod:`conformance.coverage`); the checks by kind;
the figures of :mod:`conformance.plots`; the speed table when speed was measured; and every
failure, grouped by norm in collapsible sections, with its explanation and the command that
reproduces it.

The file needs nothing but itself: the style sheet is inline, the figures are PNG ``data:`` URLs,
and nothing is fetched from anywhere (a Content-Security-Policy says so to the browser, too). One
small inline script, allowed by its hash, counts on ``load`` the images that decoded and writes
``data-images-rendered="k/n"`` on ``<body>``, for tests and for anyone curious.

Every string in a record may come from the adapter under test (its name, exception texts,
diagnoses built from its output), so each goes through :func:`esc` (``html.escape`` after
:func:`~conformance.messages.visible` has written control characters as escapes) before it is
placed in the page.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from conformance import coverage, plots
from conformance.html_page import (
    CONTENT_SECURITY_POLICY,
    OUTCOME_COLOURS,
    VERDICT_COLOURS,
    counts_text,
    esc,
    figure_html,
    mapping_text,
    outcome_cell,
    outcome_legend,
    page,
    plain,
    table,
    verdict_badge,
    verdict_cell,
)
from conformance.messages import grade_words, metric_lines, visible
from conformance.report_markdown import adapter_name
from conformance.results import DIRECTIONS, CheckResult, RunRecord, SpeedResult
from conformance.summary import (
    DTYPE_ORDER,
    NORM_ORDER,
    cell_outcome,
    grade_matrix,
    kinds_in,
    ordered,
)

__all__ = ["CONTENT_SECURITY_POLICY", "OUTCOME_COLOURS", "VERDICT_COLOURS", "render_html"]


def render_html(record: RunRecord) -> str:
    """The whole report as one HTML document (ends with a newline)."""
    name = adapter_name(record)
    sections = [
        _header(record, name),
        _nav(record),
        _facts(record),
        _matrix(record),
        _coverage(record),
        _kinds(record),
        _figures(record),
        _speed(record),
        _failures(record),
    ]
    return page(f"normconf report: {name}", "\n".join(s for s in sections if s))


def _header(record: RunRecord, name: str) -> str:
    badges = verdict_badge("accuracy", record.verdict)
    if record.speed_verdict is not None:
        badges += verdict_badge("speed", record.speed_verdict)
    return (
        f"<header><h1>normconf report: {esc(name)}</h1>\n"
        f"<p>{badges}</p>\n<p>{esc(counts_text(record))}</p></header>"
    )


def _nav(record: RunRecord) -> str:
    links = [("facts", "Run"), ("grades", "Grades"), ("coverage", "Coverage")]
    links.append(("kinds", "Checks by kind"))
    links.append(("figures", "Figures"))
    if record.speed:
        links.append(("speed", "Speed"))
    links.append(("failures", "Failures"))
    return "<nav>" + "".join(f'<a href="#{a}">{t}</a>' for a, t in links) + "</nav>"


def _facts(record: RunRecord) -> str:
    adapter = record.adapter
    spec = adapter.get("spec")
    hardware = dict(record.hardware)
    device = hardware.pop("device", None)
    rows = [
        ("Adapter", esc(adapter_name(record)) + (f" (<code>{esc(spec)}</code>)" if spec else "")),
        ("Conventions", _conventions(adapter.get("conventions"))),
        ("Device", esc(device) if device is not None else "—"),
        ("Hardware", mapping_text(hardware) or "—"),
        ("Software", mapping_text(record.software) or "—"),
        ("Seed", esc(record.seed)),
        ("Battery", "quick" if record.quick else "full"),
        ("Started", esc(record.started) or "—"),
        ("Finished", esc(record.finished) + _duration(record.started, record.finished)),
        ("Command", f"<code>{esc(record.command)}</code>"),
    ]
    ceiling = plots.ceiling_words(record.ceiling)
    if record.ceiling is not None and ceiling is not None:
        rows.append(("Bandwidth ceiling", _ceiling_text(record.ceiling, ceiling)))
    declared = table(["declared", "value"], [[esc(k), esc(plain(v))] for k, v in adapter.items()])
    body = table(None, [[f"<th>{k}</th>", v] for k, v in rows], "facts")
    return (
        f'<section id="facts"><h2>Run</h2>{body}'
        f"<details><summary>Everything the adapter declares</summary>{declared}</details>"
        "</section>"
    )


def _conventions(declared: Any) -> str:
    if not isinstance(declared, Mapping):
        return esc(plain(declared)) if declared else "PyTorch's"
    given = {norm: values for norm, values in declared.items() if values}
    return mapping_text(given) if given else "PyTorch's for every norm"


def _ceiling_text(ceiling: Mapping[str, Any], words: str) -> str:
    details = [f"on {esc(ceiling['name'])}"] if ceiling.get("name") else []
    if ceiling.get("device"):
        details.append(f"device {esc(ceiling['device'])}")
    if isinstance(ceiling.get("bytes"), int):
        details.append(f"{ceiling['bytes']:,} bytes per copy")
    datasheet = plots.ceiling_words({"gbps": ceiling.get("datasheet_gbps")})
    if datasheet is not None:
        details.append(f"datasheet peak {esc(datasheet)}")
    extra = "; ".join(details)
    return f'{esc(words)} <span class="muted">({extra})</span>' if extra else esc(words)


def _duration(started: str, finished: str) -> str:
    try:
        seconds = (
            datetime.fromisoformat(finished) - datetime.fromisoformat(started)
        ).total_seconds()
    except (TypeError, ValueError):
        return ""
    if seconds < 0:
        return ""
    minutes, rest = divmod(round(seconds), 60)
    took = f"{minutes} min {rest} s" if minutes else f"{rest} s"
    return f' <span class="muted">({took})</span>'


def _matrix(record: RunRecord) -> str:
    norms, dtypes, cells = grade_matrix(record)
    if not norms:
        return (
            '<section id="grades"><h2>Grades by norm and dtype</h2><p>No checks ran.</p></section>'
        )
    totals = Counter((c.norm, c.dtype) for c in record.checks)
    failed = Counter((c.norm, c.dtype) for c in record.checks if c.verdict == "fail")
    rows = []
    for norm in norms:
        row = [f"<th>{esc(norm)}</th>"]
        for dtype in dtypes:
            n, bad = totals[norm, dtype], failed[norm, dtype]
            note = "" if not n else (f"{bad} of {n} failed" if bad else f"{n} checks")
            row.append(outcome_cell(cells[norm, dtype], note))
        rows.append(row)
    body = table(["norm", *dtypes], rows, "matrix")
    return (
        '<section id="grades"><h2>Grades by norm and dtype</h2>'
        "<p>Worst grade over each cell's checks.</p>"
        f"{body}{outcome_legend()}</section>"
    )


#: The colour of a coverage cell by its state (:func:`conformance.coverage.cell_state`).
_COVERAGE_OUTCOME = {"pass": "correctly_rounded", "fail": "fail", "none": "not_run"}


def _coverage(record: RunRecord) -> str:
    """The coverage tables: per axis, a row per norm and dtype, ``passed/cases`` per class."""
    found = coverage.coverage(record.checks)
    if not found:
        return ""
    parts = [
        '<section id="coverage"><h2>Coverage</h2><p>Cases that ran and passed, by shape class '
        "and memory layout: a pass covers these, no more (— : none ran).</p>"
    ]
    for axis, (title, classes) in coverage.AXES.items():
        rows = []
        for norm in ordered(found, NORM_ORDER):
            for dtype in ordered(found[norm], DTYPE_ORDER):
                counts = found[norm][dtype].get(axis, {})
                cells = []
                for name in classes:
                    entry = counts.get(name)
                    css = _COVERAGE_OUTCOME[coverage.cell_state(entry)]
                    cells.append(f'<td class="o o-{css}">{esc(coverage.cell_text(entry))}</td>')
                rows.append([f"<th>{esc(norm)} · {esc(dtype)}</th>", *cells])
        parts.append(f"<h3>{esc(title.capitalize())}</h3>")
        parts.append(table(["norm · dtype", *classes], rows, "matrix coverage"))
    absent = [(a, names) for a, names in coverage.missing(found).items() if names]
    if absent:
        items = "".join(
            f"<li>{esc(coverage.AXES[a][0])}: {esc(', '.join(names))}</li>" for a, names in absent
        )
        parts.append(f"<p>Not covered by any case of this run:</p><ul>{items}</ul>")
    return "".join(parts) + "</section>"


def _kinds(record: RunRecord) -> str:
    if not record.checks:
        return ""
    rows = []
    for kind in kinds_in(record):
        checks = [c for c in record.checks if c.kind == kind]
        counts = Counter(c.verdict for c in checks)
        rows.append(
            [
                esc(kind),
                f'<td class="num">{len(checks)}</td>',
                f'<td class="num">{counts["pass"]}</td>',
                f'<td class="num">{counts["fail"]}</td>',
                f'<td class="num">{counts["skip"]}</td>',
                outcome_cell(cell_outcome(checks)),
            ]
        )
    header = ["kind", "checks", "passed", "failed", "skipped", "worst grade"]
    return f'<section id="kinds"><h2>Checks by kind</h2>{table(header, rows)}</section>'


#: The figures of a run report: (function, alt text, caption).
FIGURES: tuple[tuple[Callable[[RunRecord], bytes | None], str, str], ...] = (
    (
        plots.ulp_histograms,
        "Histograms of the error in ulps per norm and dtype",
        "Error in ulps against the correctly rounded reference, per norm and dtype: the number "
        "of output elements in each bin (log scale), summed over the checks, forward outputs, "
        "gradients and statistics side by side.",
    ),
    (
        plots.error_vs_kappa,
        "Error over tolerance against the condition number kappa",
        "Each check's largest error divided by its tolerance against its case's condition "
        "number κ; above the red line (ratio 1) a check fails, and failed checks are crosses.",
    ),
    (
        plots.bandwidth,
        "Bandwidth against bytes moved",
        "Achieved bandwidth against the bytes each call moves, per norm, dtype and direction, "
        "with the copy bandwidth measured in the same run and the datasheet peak (dashed).",
    ),
)


def _figures(record: RunRecord) -> str:
    parts = []
    for render, alt, caption in FIGURES:
        image = render(record)
        if image is not None:
            parts.append(figure_html(image, alt, esc(caption)))
    if not parts:
        parts.append("<p>Nothing to plot: the report holds no histograms, κ or timings.</p>")
    return '<section id="figures"><h2>Figures</h2>' + "".join(parts) + "</section>"


def _speed(record: RunRecord) -> str:
    if not record.speed:
        return ""
    header = ["norm", "dtype", "direction", "shape", "GB/s", "of ceiling", "vs baseline"]
    rows = []
    for s in sorted_speed(record.speed):
        rows.append(
            [
                esc(s.norm),
                esc(s.dtype),
                esc(s.direction),
                esc(_shape(s.shape)),
                f'<td class="num">{_number(s.gbps, ".1f")}</td>',
                f'<td class="num">{_percent(s.fraction_of_ceiling)}</td>',
                _ratio(s),
                verdict_cell(s.verdict),
                esc(s.message),
            ]
        )
    body = table([*header, "verdict", "message"], rows)
    ceiling = plots.ceiling_words(record.ceiling)
    lead = f"<p>Ceiling: {esc(ceiling)}.</p>" if ceiling else "<p>No ceiling was measured.</p>"
    return f'<section id="speed"><h2>Speed</h2>{lead}{body}</section>'


def sorted_speed(results: Iterable[SpeedResult]) -> list[SpeedResult]:
    """Speed results by norm, dtype (report order), direction and size."""
    results = list(results)
    norms = ordered((s.norm for s in results), NORM_ORDER)
    dtypes = ordered((s.dtype for s in results), DTYPE_ORDER)
    directions = ordered((s.direction for s in results), DIRECTIONS)
    return sorted(
        results,
        key=lambda s: (
            norms.index(s.norm),
            dtypes.index(s.dtype),
            directions.index(s.direction),
            s.bytes,
        ),
    )


def _ratio(result: SpeedResult) -> str:
    if result.ratio is None:
        return "—"
    against = f" vs {esc(result.baseline)}" if result.baseline else ""
    return f'<td class="num">{_number(result.ratio, ".2f")}&times;{against}</td>'


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _number(value: float | None, spec: str) -> str:
    if value is None:
        return "—"
    return format(value, spec) if math.isfinite(value) else esc(value)


def _percent(fraction: float | None) -> str:
    return "—" if fraction is None or not math.isfinite(fraction) else f"{100 * fraction:.0f}%"


def _failures(record: RunRecord) -> str:
    failed = [c for c in record.checks if c.verdict == "fail"]
    if not failed:
        return '<section id="failures"><h2>Failures</h2><p>None.</p></section>'
    parts = [f'<section id="failures"><h2>Failures ({len(failed)})</h2>']
    for norm in ordered((c.norm for c in failed), NORM_ORDER):
        mine = [c for c in failed if c.norm == norm]
        by_dtype = Counter(c.dtype for c in mine)
        split = ", ".join(f"{esc(d)}: {by_dtype[d]}" for d in ordered(by_dtype, DTYPE_ORDER))
        opened = " open" if len(failed) <= 20 else ""
        parts.append(
            f"<details{opened}><summary>{esc(norm)}: {len(mine)} failed ({split})</summary>"
            + "".join(failure_html(c) for c in mine)
            + "</details>"
        )
    parts.append("</section>")
    return "".join(parts)


def failure_html(check: CheckResult) -> str:
    """One failed check: what was checked, its metric lines and message, the diagnosis, and
    the command that reproduces it."""
    facts = [
        f"case <code>{esc(check.case_id)}</code>",
        f"kind <b>{esc(check.kind)}</b>",
        f"output <b>{esc(check.output)}</b>",
        esc(check.dtype),
        "shape " + esc(_shape(check.shape)),
        esc(check.distribution),
        esc(check.layout),
        "grade " + esc(grade_words(check.grade)),
    ]
    if check.kappa is not None:
        facts.append(f"κ {check.kappa:.3g}")
    lines = [] if check.metrics is None else metric_lines(check.metrics, check.dtype, check.grade)
    if check.message:
        lines.extend(visible(check.message).splitlines())
    if not lines:
        lines.append(f"{check.kind} check of {check.output}: {check.verdict}")
    parts = [
        f'<article class="failure"><h4><code>{esc(check.check_id)}</code></h4>',
        f'<p class="meta">{" · ".join(facts)}</p>',
    ]
    if check.diagnosis:
        parts.append(f'<p class="diagnosis"><b>Diagnosis:</b> {esc(check.diagnosis)}</p>')
    parts.append(f'<pre class="message">{chr(10).join(map(esc, lines))}</pre>')
    if check.reproduce:
        parts.append(f'Reproduce:<pre class="reproduce"><code>{esc(check.reproduce)}</code></pre>')
    parts.append("</article>")
    return "".join(parts)
