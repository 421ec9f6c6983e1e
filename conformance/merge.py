"""Merged reports: several runs (adapters, machines) in one matrix.

``normconf report merge DIR... --out DIR`` reads each ``DIR/report.json`` (:func:`load_runs`) and
writes ``report.json``, ``report.md`` and ``report.html`` into the output directory
(:func:`write_merged`). A directory may also hold a merged report, whose runs are taken, so merges
compose; a run that arrives twice (the same report given twice, or also inside a merged report)
is taken once.

The merged matrix has one row per norm x dtype and one column per run, labelled
``"<adapter name> @ <device>/<hardware name>"`` (the start time, then a number, is appended where
two labels would be equal). A cell is the run's worst outcome over its checks of that norm and
dtype, by the rule of :func:`conformance.summary.cell_outcome` (``not_run`` where the run has
none), and, where the run measured speed, per direction the timing of the largest size: GB/s
and the fraction of the run's own ceiling.

**Schema ``normconf.merged``, version 1** (:func:`merge`): ``schema``, ``schema_version``;
``verdict`` (``"fail"`` when any run failed) and ``speed_verdict`` (None when no run measured
speed); ``columns``, one object per run (``label``, ``adapter``, ``spec``, ``device``,
``hardware``, ``started``, ``verdict``, ``speed_verdict``, ``summary``); ``matrix``, one object per
row (``norm``, ``dtype``, ``cells``: one per column, ``{"outcome", "speed"}`` with ``speed`` null
or ``{direction: {"gbps", "fraction_of_ceiling", "shape", "verdict"}}``); and ``runs``, each run's
report document (:meth:`RunRecord.to_dict`, non-finite numbers as in ``report.json``).
:func:`read_merged` reads the runs back.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from conformance import plots, report_markdown
from conformance.html_page import (
    counts_text,
    esc,
    figure_html,
    outcome_cell,
    outcome_legend,
    page,
    table,
    verdict_badge,
)
from conformance.report_json import dumps, loads, write_text_atomic
from conformance.report_markdown import adapter_name
from conformance.results import CheckResult, RunRecord, SpeedResult
from conformance.summary import DTYPE_ORDER, NORM_ORDER, cell_outcome, ordered

_Grouped = TypeVar("_Grouped", CheckResult, SpeedResult)

MERGED_SCHEMA = "normconf.merged"
MERGED_SCHEMA_VERSION = 1
#: File name of each merged report, by format.
MERGED_FILES = {"json": "report.json", "markdown": "report.md", "html": "report.html"}


# --- reading -----------------------------------------------------------------------------------


def load_runs(dirs: Iterable[str | os.PathLike[str]]) -> list[RunRecord]:
    """The runs in ``DIR/report.json`` for each of ``dirs`` (or in the file, where one names
    a file), in order: a merged report gives all its runs; a run seen before is skipped.

    Raises ``ValueError`` with one line naming the path and the problem when a directory or its
    ``report.json`` is missing, unreadable, or not a normconf report.
    """
    paths = [Path(d) for d in dirs]
    if not paths:
        raise ValueError("no report directories given")
    runs: list[RunRecord] = []
    seen: set[str] = set()
    for path in paths:
        for run in _load_dir(path):
            key = _identity(run)
            if key not in seen:
                seen.add(key)
                runs.append(run)
    if not runs:
        raise ValueError(f"{paths[0]}: the merged reports given hold no runs")
    return runs


def _identity(run: RunRecord) -> str:
    """What tells runs apart: where, when, how and what ran, and what each check gave."""
    return json.dumps(
        [
            run.adapter,
            run.hardware,
            run.software,
            run.seed,
            run.quick,
            run.started,
            run.finished,
            run.command,
            [(c.check_id, c.verdict, c.grade, c.diagnosis, c.message) for c in run.checks],
            [(s.speed_id, s.verdict, repr(s.median_s)) for s in run.speed],
        ],
        sort_keys=True,
        default=repr,
    )


def read_merged(path: str | os.PathLike[str]) -> list[RunRecord]:
    """The runs of the merged report at ``path``; ``ValueError`` naming the path otherwise."""
    source = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{source}: cannot read ({exc.strerror or exc})") from None
    return _merged_runs(_parse(text, source), source)


def _load_dir(directory: Path) -> list[RunRecord]:
    if not directory.exists():
        raise ValueError(f"{directory}: no such directory")
    path = directory if directory.is_file() else directory / "report.json"
    if not path.is_file():
        raise ValueError(f"{path}: no report.json in this directory")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ValueError(f"{path}: cannot read ({reason or exc})") from None
    data = _parse(text, str(path))
    if isinstance(data, dict) and data.get("schema") == MERGED_SCHEMA:
        return _merged_runs(data, str(path))
    try:
        return [loads(text, source=str(path))]
    except ValueError as exc:
        raise ValueError(_one_line(str(exc))) from None


def _parse(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON ({_one_line(str(exc))})") from None


def _merged_runs(data: Any, source: str) -> list[RunRecord]:
    if not isinstance(data, dict) or data.get("schema") != MERGED_SCHEMA:
        raise ValueError(f"{source}: not a merged normconf report (schema {MERGED_SCHEMA!r})")
    if data.get("schema_version") != MERGED_SCHEMA_VERSION:
        raise ValueError(
            f"{source}: merged report schema version {data.get('schema_version')!r} is not "
            f"{MERGED_SCHEMA_VERSION}"
        )
    runs = data.get("runs")
    if not isinstance(runs, list):
        raise ValueError(f"{source}: a merged report's 'runs' must be a list")
    try:
        return [
            loads(json.dumps(run, allow_nan=False), source=f"{source}: run {i + 1}")
            for i, run in enumerate(runs)
        ]
    except ValueError as exc:
        raise ValueError(_one_line(str(exc))) from None


def _one_line(text: str) -> str:
    return " ".join(text.split("\n"))


# --- the merged document -----------------------------------------------------------------------


def run_label(run: RunRecord) -> str:
    """``"<adapter name> @ <device>/<hardware name>"``: the GPU for CUDA runs, else the CPU."""
    hardware = run.hardware
    device = str(hardware.get("device") or "?")
    name = hardware.get("gpu") if device.startswith("cuda") else None
    name = name or hardware.get("cpu") or hardware.get("machine") or "unknown hardware"
    return f"{adapter_name(run)} @ {device}/{name}"


def column_labels(runs: Sequence[RunRecord]) -> list[str]:
    """:func:`run_label` of each run, made unique: the start time is appended to labels that
    several runs share, and a number where even that is shared."""
    base = [run_label(r) for r in runs]
    labels = [
        f"{b} ({r.started})" if base.count(b) > 1 else b for b, r in zip(base, runs, strict=True)
    ]
    unique: list[str] = []
    for label in labels:
        candidate, n = label, 1
        while candidate in unique:
            n += 1
            candidate = f"{label} #{n}"
        unique.append(candidate)
    return unique


def merge(runs: Sequence[RunRecord]) -> dict[str, Any]:
    """The merged document (JSON-able; schema in the module docstring)."""
    labels = column_labels(runs)
    speed_verdicts = [r.speed_verdict for r in runs if r.speed_verdict is not None]
    return {
        "schema": MERGED_SCHEMA,
        "schema_version": MERGED_SCHEMA_VERSION,
        "verdict": "fail" if any(r.verdict == "fail" for r in runs) else "pass",
        "speed_verdict": (
            None if not speed_verdicts else ("fail" if "fail" in speed_verdicts else "pass")
        ),
        "columns": [_column(label, run) for label, run in zip(labels, runs, strict=True)],
        "matrix": merged_matrix(runs),
        "runs": [json.loads(dumps(run)) for run in runs],
    }


def _column(label: str, run: RunRecord) -> dict[str, Any]:
    return {
        "label": label,
        "adapter": adapter_name(run),
        "spec": run.adapter.get("spec"),
        "device": run.hardware.get("device"),
        "hardware": run.hardware,
        "started": run.started,
        "verdict": run.verdict,
        "speed_verdict": run.speed_verdict,
        "summary": run.summary(),
    }


def merged_matrix(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """Rows norm x dtype over every run; in each, one cell per run (module docstring)."""
    checks: list[dict[tuple[str, str], list[CheckResult]]] = []
    speeds: list[dict[tuple[str, str], list[SpeedResult]]] = []
    for run in runs:
        checks.append(_grouped(run.checks))
        speeds.append(_grouped(run.speed))
    present = {k for groups in checks for k in groups} | {k for groups in speeds for k in groups}
    keys = [k for groups in checks for k in groups] + [k for groups in speeds for k in groups]
    norms = ordered((n for n, _ in keys), NORM_ORDER)
    dtypes = ordered((d for _, d in keys), DTYPE_ORDER)
    rows = []
    for norm in norms:
        for dtype in dtypes:
            if (norm, dtype) not in present:
                continue
            cells = [
                {
                    "outcome": cell_outcome(c.get((norm, dtype), [])),
                    "speed": _speed_cell(s.get((norm, dtype), [])),
                }
                for c, s in zip(checks, speeds, strict=True)
            ]
            rows.append({"norm": norm, "dtype": dtype, "cells": cells})
    return rows


def _grouped(items: Iterable[_Grouped]) -> dict[tuple[str, str], list[_Grouped]]:
    groups: dict[tuple[str, str], list[_Grouped]] = defaultdict(list)
    for item in items:
        groups[item.norm, item.dtype].append(item)
    return groups


def _speed_cell(results: Sequence[SpeedResult]) -> dict[str, Any] | None:
    """Per direction, the timing of the largest size (the smaller ones measure latency)."""
    cell: dict[str, Any] = {}
    for direction in ordered((r.direction for r in results), ("forward", "backward")):
        largest = max((r for r in results if r.direction == direction), key=lambda r: r.bytes)
        cell[direction] = {
            "gbps": _finite(largest.gbps),
            "fraction_of_ceiling": _finite(largest.fraction_of_ceiling),
            "shape": list(largest.shape),
            "verdict": largest.verdict,
        }
    return cell or None


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


# --- writing -----------------------------------------------------------------------------------


def write_merged(runs: Sequence[RunRecord], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the merged ``report.json``, ``report.md`` and ``report.html`` of ``runs`` into
    ``out_dir`` (created with its parents); returns their paths keyed ``"json"``,
    ``"markdown"``, ``"html"``. Everything is rendered before the first file is written."""
    if not runs:
        raise ValueError("no runs to merge")
    document = merge(runs)
    texts = {
        "json": json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
        "markdown": render_merged_markdown(document),
        "html": render_merged_html(document, runs),
    }
    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    return {fmt: write_text_atomic(target / MERGED_FILES[fmt], text) for fmt, text in texts.items()}


_DIRECTION_SHORT = {"forward": "fwd", "backward": "bwd"}


def _speed_words(speed: dict[str, Any] | None) -> list[str]:
    words = []
    for direction, timing in (speed or {}).items():
        gbps, fraction = timing.get("gbps"), timing.get("fraction_of_ceiling")
        short = _DIRECTION_SHORT.get(direction, direction)
        text = f"{short} " + ("—" if gbps is None else f"{gbps:.1f} GB/s")
        if fraction is not None:
            text += f" ({100 * fraction:.0f}%)"
        words.append(text)
    return words


def render_merged_markdown(document: dict[str, Any]) -> str:
    """The merged report as Markdown: the runs, then the matrix."""
    escape = report_markdown.escape
    columns = document["columns"]
    lines = [
        f"# normconf merged report: {len(columns)} runs",
        "",
        f"**Accuracy: {document['verdict'].upper()}**"
        + (
            f" · **Speed: {document['speed_verdict'].upper()}**"
            if document["speed_verdict"]
            else ""
        ),
        "",
        "## Runs",
        "",
        "| run | accuracy | speed | checks (pass / fail / skip) | started |",
        "|---|---|---|---|---|",
    ]
    for column in columns:
        s = column["summary"]
        lines.append(
            f"| {escape(column['label'])} | {column['verdict']} | "
            f"{column['speed_verdict'] or '—'} | {sum(s.values())} ({s['pass']} / {s['fail']} / "
            f"{s['skip']}) | {escape(column['started'])} |"
        )
    lines += ["", "## Grades by norm and dtype", "", "Worst grade over each cell's checks.", ""]
    lines.append("| norm | dtype | " + " | ".join(escape(c["label"]) for c in columns) + " |")
    lines.append("|---|---|" + "---|" * len(columns))
    for row in document["matrix"]:
        cells = []
        for cell in row["cells"]:
            label = report_markdown.OUTCOME_LABELS.get(cell["outcome"], escape(cell["outcome"]))
            cells.append(" · ".join([label, *map(escape, _speed_words(cell["speed"]))]))
        lines.append(f"| {escape(row['norm'])} | {escape(row['dtype'])} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def render_merged_html(document: dict[str, Any], runs: Sequence[RunRecord]) -> str:
    """The merged report as one self-contained HTML page (see :mod:`conformance.report_html`)."""
    columns = document["columns"]
    badges = verdict_badge("accuracy", document["verdict"])
    if document["speed_verdict"] is not None:
        badges += verdict_badge("speed", document["speed_verdict"])
    parts = [
        f"<header><h1>normconf merged report: {len(columns)} runs</h1><p>{badges}</p></header>",
        '<section id="runs"><h2>Runs</h2>',
        table(
            ["#", "run", "accuracy", "speed", "checks", "battery", "seed", "started", "command"],
            [
                _run_row(i, c["label"], run)
                for i, (c, run) in enumerate(zip(columns, runs, strict=True), 1)
            ],
        ),
        "</section>",
        '<section id="grades"><h2>Grades by norm and dtype</h2>',
        "<p>Worst grade over each cell's checks; where speed was measured, per direction the "
        "bandwidth at the largest size and its fraction of the run's ceiling.</p>",
        table(
            ["norm", "dtype", *(f"#{i} {c['label']}" for i, c in enumerate(columns, 1))],
            [
                [
                    f"<th>{esc(row['norm'])}</th>",
                    f"<th>{esc(row['dtype'])}</th>",
                    *(
                        outcome_cell(cell["outcome"], esc(" · ".join(_speed_words(cell["speed"]))))
                        for cell in row["cells"]
                    ),
                ]
                for row in document["matrix"]
            ],
            "matrix",
        ),
        outcome_legend(),
        "</section>",
    ]
    # The legend names runs by their number in the tables: labels are too long for it.
    image = plots.bandwidth_of_runs([(f"#{i}", run) for i, run in enumerate(runs, 1)])
    if image is not None:
        parts.append('<section id="speed"><h2>Bandwidth</h2>')
        parts.append(
            figure_html(
                image,
                "Bandwidth against bytes moved, every run",
                esc(
                    "Achieved bandwidth against the bytes each call moves, runs by their number "
                    "above (one colour per run where several were timed), with each run's own "
                    "measured ceiling and datasheet peak (dashed)."
                ),
            )
        )
        parts.append("</section>")
    return page(f"normconf merged report: {len(columns)} runs", "\n".join(parts))


def _run_row(number: int, label: str, run: RunRecord) -> list[str]:
    speed = run.speed_verdict
    return [
        f"<th>#{number}</th>",
        f"<th>{esc(label)}</th>",
        verdict_badge("", run.verdict),
        verdict_badge("", speed) if speed is not None else "—",
        esc(counts_text(run)),
        "quick" if run.quick else "full",
        esc(run.seed),
        esc(run.started),
        f"<code>{esc(run.command)}</code>",
    ]
