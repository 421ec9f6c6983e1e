"""``report.html``: the report for people, one self-contained HTML5 file.

Layout: a title with the adapter's name and the verdicts as badges (accuracy; speed when it was
measured); the run's facts; the norm x dtype matrix of worst grades, colour-coded, with its legend
(the rule is :func:`conformance.summary.cell_outcome`, as in ``report.md``); the checks by kind;
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

import base64
import hashlib
import html
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from conformance import plots
from conformance.messages import GRADE_WORDS, grade_words, metric_lines, visible
from conformance.report_markdown import adapter_name
from conformance.results import DIRECTIONS, CheckResult, RunRecord, SpeedResult
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

#: How each cell outcome reads, best first; the CSS class ``o-<outcome>`` gives its colour.
OUTCOME_WORDS = {
    **GRADE_WORDS,
    UNGRADED_PASS: "pass (ungraded)",
    SKIPPED: "skipped",
    NOT_RUN: "not run",
}

#: Background and text colour of each outcome (and of the verdict badges).
OUTCOME_COLOURS = {
    "correctly_rounded": ("#1a7f37", "#ffffff"),
    "faithful": ("#4ac26b", "#0b2e13"),
    "within_tolerance": ("#f2cc60", "#3b2300"),
    "fail": ("#cf222e", "#ffffff"),
    UNGRADED_PASS: ("#54aeff", "#0a2540"),
    SKIPPED: ("#d0d7de", "#24292f"),
    NOT_RUN: ("#f6f8fa", "#8c959f"),
}
VERDICT_COLOURS = {"pass": "#1a7f37", "fail": "#cf222e"}

_SCRIPT = (
    'window.addEventListener("load",function(){'
    "var s=document.images,k=0;"
    "for(var i=0;i<s.length;i++){if(s[i].complete&&s[i].naturalWidth>0){k++;}}"
    'document.body.setAttribute("data-images-rendered",k+"/"+s.length);});'
)
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode("ascii")).digest()).decode("ascii")
#: Nothing may load from anywhere; images only from data: URLs, script only the one above.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{_SCRIPT_HASH}'; base-uri 'none'; form-action 'none'"
)

_CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
  color: #24292f; background: #ffffff; margin: 0 auto; padding: 24px 32px; max-width: 1320px; }
h1 { font-size: 26px; margin: 0 0 8px; word-break: break-word; }
h2 { font-size: 20px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 16px; margin: 20px 0 8px; }
h4 { font-size: 14px; margin: 0 0 6px; word-break: break-all; }
nav a { margin-right: 14px; color: #0969da; text-decoration: none; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #d0d7de; padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.facts { width: 100%; }
table.facts th { width: 170px; }
table.matrix td.o { text-align: center; min-width: 120px; font-weight: 600; }
td.o small { display: block; font-weight: 400; opacity: 0.85; }
code, pre { font: 12.5px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono",
  monospace; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 6px; padding: 8px 10px;
  overflow-x: auto; white-space: pre-wrap; word-break: break-all; margin: 4px 0 8px; }
.badge { display: inline-block; padding: 4px 12px; border-radius: 14px; color: #ffffff;
  font-weight: 700; margin-right: 8px; letter-spacing: 0.02em; white-space: nowrap; }
.legend span.o { display: inline-block; padding: 2px 9px; border-radius: 4px; margin: 2px 6px 2px 0;
  font-weight: 600; }
figure { margin: 12px 0 24px; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 13px; margin-top: 4px; max-width: 1000px; }
details { border: 1px solid #d0d7de; border-radius: 6px; margin: 8px 0; padding: 4px 12px; }
summary { cursor: pointer; font-weight: 600; padding: 4px 0; }
article.failure { border-top: 1px solid #d0d7de; padding: 10px 0 4px; }
.meta { color: #57606a; margin: 0 0 6px; }
.diagnosis { background: #fff8c5; border-left: 4px solid #d4a72c; padding: 6px 10px;
  margin: 6px 0; }
.muted { color: #57606a; }
"""


def esc(value: object) -> str:
    """``value`` as HTML text: control characters written as escapes, markup characters as
    entities (quotes included, so the result is safe in an attribute value too)."""
    text = str(value)
    # isprintable() is False for every character visible() rewrites (and for newline and tab,
    # which it keeps): the common case skips the per-character pass.
    return html.escape(text if text.isprintable() else visible(text), quote=True)


def render_html(record: RunRecord) -> str:
    """The whole report as one HTML document (ends with a newline)."""
    name = adapter_name(record)
    sections = [
        _header(record, name),
        _nav(record),
        _facts(record),
        _matrix(record),
        _kinds(record),
        _figures(record),
        _speed(record),
        _failures(record),
    ]
    return page(f"normconf report: {name}", "\n".join(s for s in sections if s))


def page(title: str, body: str) -> str:
    """An HTML document titled ``title`` (plain text) around ``body`` (HTML)."""
    style = _CSS + "".join(
        f".o-{outcome} {{ background: {bg}; color: {fg}; }}\n"
        for outcome, (bg, fg) in OUTCOME_COLOURS.items()
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f"<title>{esc(title)}</title>\n<style>{style}</style>\n</head>\n"
        f"<body>\n{body}\n<script>{_SCRIPT}</script>\n</body>\n</html>\n"
    )


def verdict_badge(label: str, verdict: str | None) -> str:
    """A coloured badge ``label: PASS`` (just ``PASS`` without a label; ``not measured`` for a
    None verdict)."""
    colour = VERDICT_COLOURS.get(verdict or "", "#8c959f")
    words = "not measured" if verdict is None else verdict.upper()
    text = f"{label}: {words}" if label else words
    return f'<span class="badge" style="background: {colour}">{esc(text)}</span>'


def outcome_cell(outcome: str, note: str = "") -> str:
    """A ``<td>`` showing a cell outcome in its colour; ``note`` (HTML) in small print below."""
    words = OUTCOME_WORDS.get(outcome, outcome)
    css = f"o o-{outcome}" if outcome in OUTCOME_COLOURS else "o"
    small = f"<small>{note}</small>" if note else ""
    return f'<td class="{css}">{esc(words)}{small}</td>'


def verdict_cell(verdict: str) -> str:
    """A ``<td>`` showing a verdict (``pass``, ``fail``, ``skip``) in its colour."""
    colour = VERDICT_COLOURS.get(verdict)
    style = f' style="background: {colour}; color: #ffffff"' if colour else ""
    return f'<td class="o"{style}>{esc(verdict)}</td>'


def outcome_legend() -> str:
    """The colours of the outcomes, best first, with their meaning."""
    meaning = {
        "correctly_rounded": "every element equals the correctly rounded reference",
        "faithful": "every element within 1 ulp",
        "within_tolerance": "every element inside the tolerance model's bound",
        "fail": "a check failed",
        UNGRADED_PASS: "passed checks that compare no numbers",
        SKIPPED: "only skipped checks",
        NOT_RUN: "no check",
    }
    items = "".join(
        f'<span class="o o-{o}" title="{esc(meaning[o])}">{esc(OUTCOME_WORDS[o])}</span>'
        for o in OUTCOME_COLOURS
    )
    return f'<p class="legend">{items}</p>'


def figure_html(image: bytes, alt: str, caption: str) -> str:
    """A ``<figure>`` with ``image`` (PNG bytes) inline as a data: URL; ``caption`` is HTML."""
    data = base64.b64encode(image).decode("ascii")
    return (
        f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def table(header: Sequence[str] | None, rows: Iterable[Sequence[str]], css: str = "") -> str:
    """A table; ``header`` is plain text (None: no header row), each row's cells are HTML
    (``<td>`` or ``<th>`` elements, or text, which is wrapped in a ``<td>``)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header or ())
    head = f"<thead><tr>{head}</tr></thead>" if header is not None else ""
    body = "".join(
        "<tr>"
        + "".join(c if c.startswith(("<td", "<th")) else f"<td>{c}</td>" for c in row)
        + "</tr>"
        for row in rows
    )
    klass = f' class="{css}"' if css else ""
    return f"<table{klass}>{head}<tbody>{body}</tbody></table>"


def mapping_text(values: Mapping[str, Any]) -> str:
    """``key: value; ...`` as HTML text (values that are not strings as compact JSON)."""
    return "; ".join(f"{esc(k)}: {esc(_plain(v))}" for k, v in values.items() if v is not None)


def counts_text(record: RunRecord) -> str:
    """``N checks: a passed, b failed, c skipped`` (plus the timings when speed was measured)."""
    counts = record.summary()
    text = (
        f"{len(record.checks)} checks: {counts['pass']} passed, {counts['fail']} failed, "
        f"{counts['skip']} skipped"
    )
    if record.speed:
        slow = sum(s.verdict == "fail" for s in record.speed)
        text += f"; {len(record.speed)} timings, {slow} failed"
    return text


def _plain(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)


def _header(record: RunRecord, name: str) -> str:
    badges = verdict_badge("accuracy", record.verdict)
    if record.speed_verdict is not None:
        badges += verdict_badge("speed", record.speed_verdict)
    return (
        f"<header><h1>normconf report: {esc(name)}</h1>\n"
        f"<p>{badges}</p>\n<p>{esc(counts_text(record))}</p></header>"
    )


def _nav(record: RunRecord) -> str:
    links = [("facts", "Run"), ("grades", "Grades"), ("kinds", "Checks by kind")]
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
    declared = table(["declared", "value"], [[esc(k), esc(_plain(v))] for k, v in adapter.items()])
    body = table(None, [[f"<th>{k}</th>", v] for k, v in rows], "facts")
    return (
        f'<section id="facts"><h2>Run</h2>{body}'
        f"<details><summary>Everything the adapter declares</summary>{declared}</details>"
        "</section>"
    )


def _conventions(declared: Any) -> str:
    if not isinstance(declared, Mapping):
        return esc(_plain(declared)) if declared else "PyTorch's"
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
