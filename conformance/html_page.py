"""The pieces every HTML page of normconf is built from: the page itself (inline style sheet,
a Content-Security-Policy that lets nothing load, the one hashed script), escaping, tables,
badges, outcome cells and figures. :mod:`conformance.report_html` (a run) and
:mod:`conformance.merge` (several runs) put their sections together with them.

Every string placed in a page may come from the adapter under test, so each goes through
:func:`esc` (``html.escape`` after :func:`~conformance.messages.visible` has written control
characters as escapes).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from conformance.messages import GRADE_WORDS, visible
from conformance.results import RunRecord
from conformance.summary import NOT_RUN, SKIPPED, UNGRADED_PASS

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
table.coverage td.o { min-width: 44px; font-weight: 500; }
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
    return "; ".join(f"{esc(k)}: {esc(plain(v))}" for k, v in values.items() if v is not None)


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


def plain(value: Any) -> str:
    """A value as text: strings as they are, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
