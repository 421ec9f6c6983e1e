"""Write every report of a run into one directory.

``report.json`` (the record, :mod:`conformance.report_json`), ``report.md``
(:mod:`conformance.report_markdown`), ``junit.xml`` (:mod:`conformance.report_junit`) and
``report.html`` (:mod:`conformance.report_html`: one self-contained page with the figures). Each
file is written atomically, so a directory never holds a truncated report.
"""

from __future__ import annotations

import os
from pathlib import Path

from conformance.report_html import render_html
from conformance.report_json import dumps, write_text_atomic
from conformance.report_junit import render_junit
from conformance.report_markdown import render_markdown
from conformance.results import RunRecord

#: File name of each report, by format.
REPORT_FILES = {
    "json": "report.json",
    "markdown": "report.md",
    "junit": "junit.xml",
    "html": "report.html",
}


def write_reports(record: RunRecord, directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the four reports of ``record`` into ``directory`` (created with its parents).

    Returns the path of each, keyed ``"json"``, ``"markdown"``, ``"junit"``, ``"html"``. Every
    text is rendered before the first file is written, so a rendering error leaves no partial
    set.
    """
    texts = {
        "json": dumps(record),
        "markdown": render_markdown(record),
        "junit": render_junit(record),
        "html": render_html(record),
    }
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    return {fmt: write_text_atomic(target / REPORT_FILES[fmt], text) for fmt, text in texts.items()}
