"""The figures of ``report.html``, rendered off-screen to PNG bytes.

Each function takes a :class:`RunRecord` (or several, labelled) and returns the PNG image, or
``None`` when the record holds nothing to plot (a version-1 report has no histograms and no κ; a
run without ``--speed`` has no timings). Figures are built on :class:`matplotlib.figure.Figure`
objects with the Agg canvas and never touch pyplot's global state, so rendering works without a
display and from several threads at once.

- :func:`ulp_histograms`: the error in ulps, per norm x dtype (small multiples), summed over the
  checks' ``metrics.ulp_histogram`` (bins of :data:`ULP_HISTOGRAM_EDGES`), one bar per direction
  (forward, backward, statistics), counts on a log scale.
- :func:`error_vs_kappa`: each check's ``max_ratio`` (error / tolerance; above 1 fails) against
  its case's κ, log-log, one colour per norm, failures drawn as crosses.
- :func:`bandwidth` / :func:`bandwidth_of_runs`: GB/s against bytes moved per norm, dtype and
  direction, with each run's measured copy-bandwidth ceiling and, when known, the datasheet peak.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogLocator, NullLocator

from conformance.results import (
    DIRECTIONS,
    ULP_HISTOGRAM_EDGES,
    CheckResult,
    RunRecord,
    SpeedResult,
)
from conformance.summary import DTYPE_ORDER, NORM_ORDER, ordered, printable

#: Resolution of every figure (pixels per inch).
DPI = 100

#: Which histogram series each check kind adds to; kinds not listed compare no numbers.
HISTOGRAM_SERIES = {
    "forward": "forward",
    "nonfinite": "forward",
    "backward": "backward",
    "statistics": "statistics",
    "running_stats": "statistics",
}
_SERIES_COLOURS = {"forward": "#0969da", "backward": "#e16f24", "statistics": "#8250df"}

#: Colours for series (norms, runs): Okabe-Ito's colour-blind-safe set (without its yellow, too
#: faint on white), then tab10's.
PALETTE = (
    "#0072b2",
    "#e69f00",
    "#009e73",
    "#cc79a7",
    "#56b4e9",
    "#d55e00",
    "#000000",
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)

_SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def bin_labels() -> list[str]:
    """Labels of the histogram's bins: ``0``, ``1``, ``2``, ``≤4``, ..., ``≤2²⁰``, ``>2²⁰``."""
    labels = []
    for edge in ULP_HISTOGRAM_EDGES:
        if edge <= 2:
            labels.append(str(edge))
        elif edge < 2**7:
            labels.append(f"≤{edge}")
        else:
            labels.append(f"≤2{_power(edge)}")
    labels.append(f">2{_power(ULP_HISTOGRAM_EDGES[-1])}")
    return labels


def label(text: object, limit: int = 60) -> str:
    """``text`` from a record made safe for a figure: control characters replaced, cut to
    ``limit`` characters, and ``$`` escaped so that it is never read as mathematical markup."""
    return printable(str(text), limit).replace("$", r"\$")


def _power(value: int) -> str:
    return str(value.bit_length() - 1).translate(_SUPERSCRIPT)


def png(figure: Figure) -> bytes:
    """``figure`` as PNG bytes (rendered by Agg, without pyplot)."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    # "tight": a legend wider than the axes (many series) is kept whole, not cut at the edge.
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None}, bbox_inches="tight")
    return buffer.getvalue()


# --- ulp histograms ----------------------------------------------------------------------------


def histogram_totals(
    checks: Iterable[CheckResult],
) -> dict[tuple[str, str], dict[str, list[int]]]:
    """Summed ulp histograms, ``{(norm, dtype): {series: counts}}``, of the ``checks`` with one."""
    size = len(ULP_HISTOGRAM_EDGES) + 1
    totals: dict[tuple[str, str], dict[str, list[int]]] = defaultdict(dict)
    for check in checks:
        series = HISTOGRAM_SERIES.get(check.kind)
        histogram = check.metrics.ulp_histogram if check.metrics is not None else None
        # A histogram of another length was written with other edges: not comparable.
        if series is None or not histogram or len(histogram) != size or not any(histogram):
            continue
        counts = totals[check.norm, check.dtype].setdefault(series, [0] * size)
        for i, count in enumerate(histogram):
            counts[i] += count
    return dict(totals)


def ulp_histograms(record: RunRecord) -> bytes | None:
    """Small multiples of the error in ulps: rows are norms, columns dtypes; None without data."""
    totals = histogram_totals(record.checks)
    if not totals:
        return None
    norms = ordered((n for n, _ in totals), NORM_ORDER)
    dtypes = ordered((d for _, d in totals), DTYPE_ORDER)
    series = [s for s in _SERIES_COLOURS if any(s in t for t in totals.values())]
    # Fixed margins in inches (not a layout engine: on a 32-panel grid that triples the time).
    width, height, gap_x, gap_y = 2.9, 1.25, 0.6, 0.45
    left, right, bottom, top = 0.75, 0.2, 0.95, 0.6
    size_x = left + right + len(dtypes) * width + (len(dtypes) - 1) * gap_x
    size_y = bottom + top + len(norms) * height + (len(norms) - 1) * gap_y
    figure = Figure(figsize=(size_x, size_y))
    figure.subplots_adjust(
        left=left / size_x,
        right=1 - right / size_x,
        bottom=bottom / size_y,
        top=1 - top / size_y,
        wspace=gap_x / width,
        hspace=gap_y / height,
    )
    axes = figure.subplots(len(norms), len(dtypes), squeeze=False)
    labels = bin_labels()
    for row, norm in enumerate(norms):
        for col, dtype in enumerate(dtypes):
            ax = axes[row][col]
            ax.text(0, 1.04, f"{label(norm)} · {label(dtype)}", fontsize=8, transform=ax.transAxes)
            _histogram_panel(ax, totals.get((norm, dtype)), series)
            if row == len(norms) - 1:
                ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6.5)
            else:
                ax.xaxis.set_major_locator(NullLocator())
        axes[row][0].set_ylabel("elements", fontsize=8)
    handles = [Line2D([], [], color=_SERIES_COLOURS[s], lw=6) for s in series]
    figure.legend(handles, series, loc="upper center", ncols=len(series), fontsize=8, frameon=False)
    figure.text(0.5, 0.01, "error in ulps (bin upper edge)", ha="center", va="bottom", fontsize=8)
    return png(figure)


def _histogram_panel(ax: Axes, cell: dict[str, list[int]] | None, series: list[str]) -> None:
    """Side-by-side bars, one collection per series (thousands of Rectangle artists are slow)."""
    bins = len(ULP_HISTOGRAM_EDGES) + 1
    floor, top = 0.5, 1.0
    width = 0.84 / len(series)
    for i, name in enumerate(series):
        counts = (cell or {}).get(name)
        if not counts:
            continue
        left = (i - len(series) / 2) * width
        boxes = [
            [(b + left, floor), (b + left, n), (b + left + width, n), (b + left + width, floor)]
            for b, n in enumerate(counts)
            if n > 0
        ]
        ax.add_collection(PolyCollection(boxes, facecolors=_SERIES_COLOURS[name], linewidths=0))
        top = max(top, *counts)
    ax.set_yscale("log")
    ax.set_xlim(-0.6, bins - 0.4)
    ax.set_ylim(floor, top * 3)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_locator(LogLocator(numticks=4))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", alpha=0.3, lw=0.5)
    if cell is None:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


# --- error against kappa -----------------------------------------------------------------------


def error_vs_kappa(record: RunRecord) -> bytes | None:
    """``max_ratio`` against the case's κ, log-log; None when no check has both."""
    points = [
        (c.norm, c.kappa, c.metrics.max_ratio, c.verdict == "fail")
        for c in record.checks
        if c.kappa is not None and c.metrics is not None and c.kappa > 0
    ]
    points = [p for p in points if math.isfinite(p[1]) and not math.isnan(p[2])]
    if not points:
        return None
    finite = [r for _, _, r, _ in points if 0 < r < math.inf]
    low = 10.0 ** math.floor(math.log10(min(finite))) if finite else 1e-3
    low = min(low, 1e-2)
    high = 10.0 ** math.ceil(math.log10(max([*finite, 10.0]))) * 10
    zeros = any(r <= 0 for _, _, r, _ in points)
    infinite = any(r == math.inf for _, _, r, _ in points)

    figure = Figure(figsize=(10, 5.6), layout="constrained")
    ax = figure.add_subplot()
    norms = ordered((p[0] for p in points), NORM_ORDER)
    for i, norm in enumerate(norms):
        colour = PALETTE[i % len(PALETTE)]
        for failed in (False, True):
            mine = [(k, r) for n, k, r, f in points if n == norm and f == failed]
            if not mine:
                continue
            ax.scatter(
                [k for k, _ in mine],
                [min(max(r, low), high) for _, r in mine],
                s=46 if failed else 14,
                marker="X" if failed else "o",
                color=colour,
                alpha=0.95 if failed else 0.45,
                edgecolors="black" if failed else "none",
                linewidths=0.6,
                zorder=3 if failed else 2,
            )
    ax.axhline(1.0, color="#cf222e", lw=1.2, zorder=1)
    ax.text(
        1.0,
        1.0,
        " tolerance (ratio = 1)",
        color="#cf222e",
        fontsize=8,
        va="bottom",
        ha="right",
        transform=ax.get_yaxis_transform(),
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(low / 2, high * 2)
    ax.grid(alpha=0.3, lw=0.5, which="major")
    ax.set_xlabel("κ = rms(x) / √(σ² + ε) of the case (largest over its groups)")
    notes = [
        n for n, present in (("0 at the bottom", zeros), ("∞ at the top", infinite)) if present
    ]
    suffix = f"  ({'; '.join(notes)})" if notes else ""
    ax.set_ylabel(f"max error ÷ tolerance{suffix}")
    handles = [
        Line2D([], [], ls="", marker="o", color=PALETTE[i % len(PALETTE)], label=label(n))
        for i, n in enumerate(norms)
    ]
    handles.append(
        Line2D([], [], ls="", marker="X", color="#888888", mec="black", ms=8, label="failed check")
    )
    figure.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    return png(figure)


# --- bandwidth against size --------------------------------------------------------------------

_DIRECTION_STYLE = {"forward": ("-", "o"), "backward": (":", "s")}


def bandwidth(record: RunRecord) -> bytes | None:
    """GB/s against bytes moved for ``record``'s speed results; None without any."""
    return bandwidth_of_runs([("", record)])


def bandwidth_of_runs(runs: Sequence[tuple[str, RunRecord]]) -> bytes | None:
    """GB/s against bytes moved for several labelled runs on one plot; None without results.

    One series per run, norm, direction and dtype; each run's measured ceiling a horizontal
    line labelled with how it was measured, and its datasheet peak dashed when the run has one.
    With one run, colours tell the norm x dtype series apart; with several, colours are runs.
    A non-empty label prefixes the run's entries in the legend.
    """
    labelled = [(name, run) for name, run in runs if _usable(run.speed)]
    if not labelled:
        return None
    figure = Figure(figsize=(11, 6.5), layout="constrained")
    ax = figure.add_subplot()
    several = len(labelled) > 1
    handles: list[Any] = []
    for r, (run_label, run) in enumerate(labelled):
        groups = _speed_series(run.speed)
        run_colour = PALETTE[r % len(PALETTE)]
        pairs = list(dict.fromkeys((norm, dtype) for norm, dtype, _ in groups))
        for (norm, dtype, direction), results in groups.items():
            s = pairs.index((norm, dtype))
            line, marker = _DIRECTION_STYLE.get(direction, ("--", "^"))
            colour = run_colour if several else PALETTE[s % len(PALETTE)]
            name = label(f"{norm} {dtype} {direction}")
            (handle,) = ax.plot(
                [x.bytes for x in results],
                [x.gbps for x in results],
                ls=line,
                marker=marker if not several else "osD^v<>ph*"[s % 10],
                color=colour,
                ms=5,
                lw=1.4,
                label=f"{label(run_label)}: {name}" if run_label else name,
            )
            handles.append(handle)
        handles.extend(_ceiling_lines(ax, run.ceiling, run_label, run_colour if several else ""))
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("bytes moved per call (bytes model)")
    ax.set_ylabel("GB/s")
    ax.grid(alpha=0.3, lw=0.5, which="both")
    figure.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=7.5, frameon=False)
    return png(figure)


def _usable(results: Iterable[SpeedResult]) -> bool:
    return any(_plottable(x) for x in results)


def _plottable(result: SpeedResult) -> bool:
    return result.bytes > 0 and math.isfinite(result.gbps) and result.gbps >= 0


def _speed_series(
    results: Iterable[SpeedResult],
) -> dict[tuple[str, str, str], list[SpeedResult]]:
    groups: dict[tuple[str, str, str], list[SpeedResult]] = defaultdict(list)
    for result in results:
        if _plottable(result):
            groups[result.norm, result.dtype, result.direction].append(result)
    norms = ordered((n for n, _, _ in groups), NORM_ORDER)
    dtypes = ordered((d for _, d, _ in groups), DTYPE_ORDER)
    directions = ordered((d for _, _, d in groups), DIRECTIONS)
    return {
        key: sorted(groups[key], key=lambda x: x.bytes)
        for key in sorted(
            groups,
            key=lambda k: (norms.index(k[0]), dtypes.index(k[1]), directions.index(k[2])),
        )
    }


def ceiling_words(ceiling: dict[str, Any] | None) -> str | None:
    """``"612.3 GB/s, device-to-device copy"``: the ceiling and how it was measured."""
    gbps = _number((ceiling or {}).get("gbps"))
    if ceiling is None or gbps is None:
        return None
    method = ceiling.get("method")
    return f"{gbps:.1f} GB/s" + (f", {method}" if method else "")


def _ceiling_lines(
    ax: Axes, ceiling: dict[str, Any] | None, run_label: str, colour: str
) -> list[Any]:
    handles = []
    words = ceiling_words(ceiling)
    words = None if words is None else label(words, 80)
    prefix = f"{label(run_label)}: " if run_label else ""
    if ceiling is not None and words is not None:
        gbps = float(ceiling["gbps"])
        line_colour = colour or "#24292f"
        handles.append(
            ax.axhline(
                gbps, color=line_colour, lw=2, alpha=0.8, label=f"{prefix}measured ceiling {words}"
            )
        )
        ax.text(
            0.01,
            gbps,
            f" {prefix}ceiling {words}",
            color=line_colour,
            fontsize=8,
            va="bottom",
            transform=ax.get_yaxis_transform(),
        )
    datasheet = _number((ceiling or {}).get("datasheet_gbps"))
    if ceiling is not None and datasheet is not None:
        name = label(ceiling.get("name") or ceiling.get("device") or "")
        text = f"{prefix}datasheet peak {datasheet:.0f} GB/s" + (f" ({name})" if name else "")
        handles.append(
            ax.axhline(datasheet, color=colour or "#57606a", lw=1.2, ls="--", label=text)
        )
        ax.text(
            0.01,
            datasheet,
            f" {text}",
            color="#57606a",
            fontsize=8,
            va="bottom",
            transform=ax.get_yaxis_transform(),
        )
    return handles


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None
