"""report.html in a real browser: headless Chromium loads it offline, every figure decodes, and
the page draws the report's colours.

Needs Chromium (``chromium`` on the PATH, e.g. Debian's package). Without it the test is
skipped, unless ``NORMCONF_REQUIRE_BROWSER=1`` (CI sets it), which makes a missing browser a
failure.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
from PIL import Image

from conformance.engine import certify, select_cases
from conformance.report_html import OUTCOME_COLOURS, VERDICT_COLOURS
from conformance.reports import write_reports
from conformance.results import RunRecord, SpeedResult
from conformance.summary import grade_matrix
from impls.loader import load_adapter

TIMEOUT_S = 60
WINDOW = (1400, 3000)
#: Colours of the ulp histogram's forward and backward bars (conformance.plots).
PLOT_COLOURS = ("#0969da", "#e16f24")


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("NORMCONF_REQUIRE_BROWSER") == "1":
        pytest.fail("NORMCONF_REQUIRE_BROWSER=1 but no chromium on the PATH: install Chromium")
    pytest.skip("no chromium on the PATH")


def median_seconds(call: Callable[[], object], rounds: int = 5) -> float:
    call()  # warm-up: allocation, first-call dispatch
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measured_speed(record: RunRecord) -> RunRecord:
    """``record`` with a copy-bandwidth ceiling and layer_norm timings measured here and now."""
    ceiling_gbps, ceiling_bytes = 0.0, 0
    for numel in (2**16, 2**20, 2**22):
        source, target = torch.randn(numel), torch.empty(numel)
        moved = 2 * numel * source.element_size()
        gbps = moved / median_seconds(partial(target.copy_, source)) / 1e9
        if gbps > ceiling_gbps:
            ceiling_gbps, ceiling_bytes = gbps, moved
    record.ceiling = {
        "gbps": ceiling_gbps,
        "method": "torch copy_ on the CPU, median of 5",
        "bytes": ceiling_bytes,
        "device": "cpu",
    }
    for rows in (16, 256, 2048):
        x = torch.randn(rows, 1024)
        seconds = median_seconds(partial(torch.nn.functional.layer_norm, x, (1024,)))
        moved = 2 * x.numel() * x.element_size()
        gbps = moved / seconds / 1e9
        record.speed.append(
            SpeedResult(
                speed_id=f"layer_norm-float32-{rows}x1024::forward",
                norm="layer_norm",
                dtype="float32",
                direction="forward",
                shape=(rows, 1024),
                device="cpu",
                bytes=moved,
                method="perf_counter",
                rounds=5,
                median_s=seconds,
                p25_s=seconds,
                p75_s=seconds,
                min_s=seconds,
                gbps=gbps,
                fraction_of_ceiling=gbps / ceiling_gbps,
                verdict="pass",
            )
        )
    return record


def run_browser(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def pixels_near(counts: dict[tuple[int, int, int], int], colour: str, slack: int = 3) -> int:
    target = rgb(colour)
    return sum(
        n
        for c, n in counts.items()
        if all(abs(a - b) <= slack for a, b in zip(c, target, strict=True))
    )


def test_report_renders_in_a_browser(tmp_path: Path) -> None:
    browser = chromium()
    cases = select_cases(
        norms=["layer_norm", "group_norm"],
        dtypes=["float32", "bfloat16"],
        quick=True,
        distributions=["normal"],
        boundary=False,  # the reports' rendering; tests/test_coverage.py has the boundaries
    )
    record = certify(load_adapter("torch"), cases, device="cpu", quick=True)
    assert record.verdict == "fail", "torch's bfloat16 CPU kernels were expected to fail a check"
    record = measured_speed(record)
    page = write_reports(record, tmp_path / "report")["html"]
    url = page.resolve().as_uri()

    dom = run_browser(browser, tmp_path / "profile-dom", "--dump-dom", url).stdout
    body = re.search(r"<body[^>]*\bdata-images-rendered=\"(\d+)/(\d+)\"", dom)
    assert body, "the page's script did not run (no data-images-rendered on <body>)"
    rendered, total = int(body.group(1)), int(body.group(2))
    assert rendered == total
    assert total >= 3  # ulp histograms, error against kappa, bandwidth

    shot = tmp_path / "screenshot.png"
    run_browser(browser, tmp_path / "profile-shot", f"--screenshot={shot}", url)
    with Image.open(shot) as image:
        assert image.size == WINDOW
        colours = image.convert("RGB").getcolors(maxcolors=WINDOW[0] * WINDOW[1])
    assert colours is not None
    counts = {c: n for n, c in colours}
    assert len(counts) > 500, f"only {len(counts)} colours: the page looks blank"
    _, _, cells = grade_matrix(record)
    expected = {OUTCOME_COLOURS[o][0] for o in cells.values()}
    expected |= {VERDICT_COLOURS["fail"], *PLOT_COLOURS}
    for colour in sorted(expected):
        assert pixels_near(counts, colour) >= 100, f"{colour} is missing from the screenshot"
