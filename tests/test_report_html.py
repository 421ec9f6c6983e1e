"""report.html and its figures: escaping, self-containment, content, and the plots themselves."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import re
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from conformance import plots
from conformance.engine import certify, select_cases
from conformance.report_html import CONTENT_SECURITY_POLICY, render_html
from conformance.reports import REPORT_FILES, write_reports
from conformance.results import ULP_HISTOGRAM_EDGES, CheckResult, Metrics, RunRecord, SpeedResult
from conformance.summary import grade_matrix
from impls.loader import load_adapter

SCRIPT_NAME = "<script>alert(1)</script>"
BREAKOUT = "</details><img src=x onerror=alert(1)>"
PNG_PREFIX = "data:image/png;base64,"


class Page(HTMLParser):
    """The parts of a page the tests look at: every start tag with its attributes, the text,
    the scripts' contents, and the rows of ``table.matrix``."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.chunks: list[str] = []
        self.scripts: list[str] = []
        self.matrix: list[list[tuple[str, str]]] = []  # per row: (tag, class or text)
        self._in_script = self._in_matrix = False
        self._cell: tuple[str, str] | None = None
        self.feed(text)
        self.close()

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def elements(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for t, attrs in self.tags if t == tag]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        self._in_script = tag == "script"
        if tag == "table" and attributes.get("class") == "matrix":
            self._in_matrix = True
        elif self._in_matrix and tag == "tr":
            self.matrix.append([])
        elif self._in_matrix and tag in ("th", "td"):
            self._cell = (tag, attributes.get("class") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_matrix = False
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        self.chunks.append(data)
        if self._in_script:
            self.scripts.append(data)
        if self._cell is not None and self.matrix:
            tag, css = self._cell
            self.matrix[-1].append((tag, data if tag == "th" else css))
            self._cell = None


@pytest.fixture(scope="module")
def real_run() -> RunRecord:
    """A small real run of torch on the CPU; its bfloat16 checks include failures."""
    cases = select_cases(
        norms=["layer_norm", "group_norm"],
        dtypes=["float32", "bfloat16"],
        quick=True,
        distributions=["normal"],
        boundary=False,  # the reports' rendering; tests/test_coverage.py has the boundaries
    )
    record = certify(load_adapter("torch"), cases, device="cpu", quick=True)
    assert record.verdict == "fail", "torch's bfloat16 CPU kernels were expected to fail a check"
    return record


@pytest.fixture(scope="module")
def real_page(real_run: RunRecord) -> str:
    return render_html(real_run)


def metrics(**changes: object) -> Metrics:
    base = Metrics(
        n=64,
        mismatched=0,
        max_ulp=1.0,
        p50_ulp=0.0,
        p99_ulp=1.0,
        frac_correctly_rounded=0.9,
        frac_faithful=1.0,
        max_abs_error=1e-7,
        max_abs_index=(0, 1),
        max_rel_error=1e-7,
        max_rel_index=(0, 1),
        max_ratio=0.2,
        worst_index=(0, 1),
        worst_actual=0.5,
        worst_reference=0.5,
        worst_ulp=1.0,
        worst_tolerance_ulp=5.0,
        ulp_histogram=[60, 4] + [0] * (len(ULP_HISTOGRAM_EDGES) - 1),
    )
    return dataclasses.replace(base, **changes)


def check(norm: str, dtype: str, kind: str = "forward", **changes: object) -> CheckResult:
    base = CheckResult(
        case_id=f"{norm}-{dtype}-4x16-normal-s1",
        norm=norm,
        dtype=dtype,
        kind=kind,
        output="output" if kind == "forward" else "grad_input",
        shape=(4, 16),
        distribution="normal",
        layout="contiguous",
        seed=1,
        verdict="pass",
        grade="faithful",
        metrics=metrics(),
        reproduce=f"normconf certify --adapter torch --case {norm}-{dtype}-4x16-normal-s1",
        kappa=3.0,
    )
    return dataclasses.replace(base, **changes)


def speed_result(rows: int, gbps: float, **changes: object) -> SpeedResult:
    base = SpeedResult(
        speed_id=f"layer_norm-float32-{rows}x1024::forward",
        norm="layer_norm",
        dtype="float32",
        direction="forward",
        shape=(rows, 1024),
        device="cpu",
        bytes=rows * 1024 * 8,
        method="perf_counter",
        rounds=5,
        median_s=rows * 1024 * 8 / (gbps * 1e9),
        p25_s=0.0,
        p75_s=0.0,
        min_s=0.0,
        gbps=gbps,
        fraction_of_ceiling=gbps / 40.0,
        verdict="pass" if gbps >= 20 else "fail",
        message="" if gbps >= 20 else "below half the ceiling",
        baseline="torch",
        ratio=1.25,
    )
    return dataclasses.replace(base, **changes)


def record(checks: list[CheckResult], name: str = "toy", **changes: object) -> RunRecord:
    base = RunRecord(
        adapter={"name": name, "spec": "toy.py", "conventions": {"layer_norm": {}}},
        hardware={"device": "cpu", "cpu": "test CPU", "cpu_count": 2},
        software={"python": "3.11", "torch": "2.13.0"},
        seed=1,
        quick=True,
        started="2026-01-01T00:00:00+00:00",
        finished="2026-01-01T00:01:05+00:00",
        command="normconf certify --adapter toy.py --quick",
        checks=checks,
    )
    return dataclasses.replace(base, **changes)


def with_speed(base: RunRecord) -> RunRecord:
    return dataclasses.replace(
        base,
        speed=[speed_result(64, 10.0), speed_result(4096, 30.0)],
        ceiling={"gbps": 40.0, "method": "device-to-device copy", "bytes": 2**28, "device": "cpu"},
    )


def images(page: Page) -> list[Image.Image]:
    decoded = []
    for attrs in page.elements("img"):
        src = attrs.get("src") or ""
        assert src.startswith(PNG_PREFIX), src[:40]
        image = Image.open(io.BytesIO(base64.b64decode(src[len(PNG_PREFIX) :], validate=True)))
        image.load()
        decoded.append(image)
    return decoded


# --- escaping ----------------------------------------------------------------------------------


def hostile_record() -> RunRecord:
    failed = check(
        "layer_norm",
        "float32",
        kind="contract",
        output="call",
        verdict="fail",
        grade=None,
        metrics=None,
        message=BREAKOUT,
        diagnosis=f"matches {SCRIPT_NAME}",
        reproduce=f"normconf certify --adapter '{SCRIPT_NAME}'",
        convention={"eps_placement": BREAKOUT},
        case_id=f"layer_norm-{BREAKOUT}",
    )
    base = record(
        [failed, check(SCRIPT_NAME, BREAKOUT)],
        name=SCRIPT_NAME,
        hardware={"device": BREAKOUT, "cpu": SCRIPT_NAME, "gpu": {"name": BREAKOUT}},
        software={SCRIPT_NAME: BREAKOUT},
        command=f"normconf certify --adapter '{SCRIPT_NAME}' # {BREAKOUT}",
        adapter={"name": SCRIPT_NAME, "spec": BREAKOUT, "conventions": {"x": {"y": BREAKOUT}}},
    )
    speed = with_speed(base)
    speed.speed[0].message = BREAKOUT
    speed.speed[1].norm = SCRIPT_NAME
    assert speed.ceiling is not None
    speed.ceiling.update(method=BREAKOUT, name=SCRIPT_NAME, datasheet_gbps=50.0)
    return speed


def test_strings_from_the_record_are_escaped() -> None:
    text = render_html(hostile_record())
    page = Page(text)
    assert "<script>alert" not in text
    assert "<img src=x" not in text
    assert len(page.elements("script")) == 1
    assert all(not key.startswith("on") for _, attrs in page.tags for key in attrs)
    assert all((a.get("src") or "").startswith(PNG_PREFIX) for a in page.elements("img"))
    # Shown as text, exactly as the adapter wrote it.
    assert f"normconf report: {SCRIPT_NAME}" in page.text
    assert BREAKOUT in page.text
    assert f"matches {SCRIPT_NAME}" in page.text
    # Every <details> the page opens is closed by the page, not by a message.
    assert text.count("<details") == text.count("</details>")


def test_control_characters_are_shown_as_escapes() -> None:
    nasty = "bell\x07 escape\x1b[2J bidi\u202e nul\x00"
    text = render_html(record([check("layer_norm", "float32", verdict="fail", message=nasty)]))
    assert not re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\u202e]", text)
    assert "escape\\x1b[2J" in text


# --- self-containment --------------------------------------------------------------------------


def test_page_needs_nothing_from_the_network(real_page: str) -> None:
    page = Page(real_page)
    for tag, attrs in page.tags:
        for key in ("src", "href", "action", "srcset", "poster", "data"):
            value = (attrs.get(key) or "").strip().lower()
            assert not value.startswith(("http:", "https:", "//", "ftp:")), (tag, key, value)
        assert not (tag == "link" and attrs.get("href")), attrs
        assert not (tag == "script" and attrs.get("src")), attrs
    assert "@import" not in real_page
    assert "url(" not in real_page
    assert "http://" not in real_page
    assert "https://" not in real_page


def test_the_only_script_is_the_one_the_policy_allows(real_page: str) -> None:
    page = Page(real_page)
    (script,) = page.scripts
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in CONTENT_SECURITY_POLICY
    (meta,) = [m for m in page.elements("meta") if m.get("http-equiv")]
    assert meta.get("content") == CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY


# --- content -----------------------------------------------------------------------------------


def test_every_failure_shows_its_case_and_reproduction(real_run: RunRecord, real_page: str) -> None:
    text = Page(real_page).text
    failed = [c for c in real_run.checks if c.verdict == "fail"]
    assert failed
    for c in failed:
        assert c.case_id in text
        assert c.reproduce in text
        if c.diagnosis:
            assert c.diagnosis in text
    assert f"Failures ({len(failed)})" in text
    passed = next(c for c in real_run.checks if c.verdict == "pass")
    assert passed.check_id not in text


def test_matrix_cells_are_the_summary_grades(real_run: RunRecord, real_page: str) -> None:
    norms, dtypes, cells = grade_matrix(real_run)
    page = Page(real_page)
    header, *rows = page.matrix
    assert [cell for tag, cell in header] == ["norm", *dtypes]
    assert [row[0][1] for row in rows] == norms
    for norm, row in zip(norms, rows, strict=True):
        classes = [css for _, css in row[1:]]
        assert classes == [f"o o-{cells[norm, d]}" for d in dtypes]
    assert {cells[n, "bfloat16"] for n in norms} == {"fail"}


def test_title_badges_and_facts(real_run: RunRecord, real_page: str) -> None:
    text = Page(real_page).text
    assert "normconf report: torch (eager)" in text
    assert "accuracy: FAIL" in text
    assert "speed:" not in text
    for fact in (real_run.command, real_run.started, real_run.software["torch"], "quick"):
        assert str(fact) in text


def test_figures_are_png_images(real_page: str) -> None:
    decoded = images(Page(real_page))
    assert len(decoded) == 2  # the ulp histograms and the error against kappa; no timings
    for image in decoded:
        assert image.format == "PNG"
        assert image.width > 300
        assert image.height > 200


def test_no_speed_means_no_bandwidth_plot_and_no_speed_section(
    real_run: RunRecord, real_page: str
) -> None:
    assert plots.bandwidth(real_run) is None
    assert 'id="speed"' not in real_page


def test_speed_section_and_bandwidth_plot(real_run: RunRecord) -> None:
    timed = with_speed(real_run)
    page = Page(render_html(timed))
    assert len(images(page)) == 3
    text = page.text
    assert "speed: FAIL" in text
    assert "40.0 GB/s, device-to-device copy" in text
    assert "below half the ceiling" in text
    assert "75%" in text  # 30 of 40 GB/s
    assert "1.25\u00d7 vs torch" in text  # 1.25 times


def test_nothing_to_plot_without_histograms_or_kappa() -> None:
    old = record([check("layer_norm", "float32", kappa=None, metrics=metrics(ulp_histogram=[]))])
    assert plots.ulp_histograms(old) is None
    assert plots.error_vs_kappa(old) is None
    assert plots.bandwidth(old) is None
    page = Page(render_html(old))
    assert page.elements("img") == []
    assert "Nothing to plot" in page.text


# --- the plots ---------------------------------------------------------------------------------


def test_bin_labels() -> None:
    labels = plots.bin_labels()
    assert len(labels) == len(ULP_HISTOGRAM_EDGES) + 1
    assert labels[:5] == ["0", "1", "2", "≤4", "≤8"]
    assert labels[-2:] == ["≤2²⁰", ">2²⁰"]


def test_histograms_sum_per_norm_dtype_and_direction() -> None:
    h = [1] * (len(ULP_HISTOGRAM_EDGES) + 1)
    checks = [
        check("layer_norm", "float32", metrics=metrics(ulp_histogram=h)),
        check("layer_norm", "float32", kind="nonfinite", metrics=metrics(ulp_histogram=h)),
        check("layer_norm", "float32", kind="backward", metrics=metrics(ulp_histogram=h)),
        check("rms_norm", "bfloat16", kind="statistics", metrics=metrics(ulp_histogram=h)),
        check("rms_norm", "bfloat16", kind="contract", metrics=None),
        check("rms_norm", "float16", metrics=metrics(ulp_histogram=[1, 2])),  # other edges
    ]
    totals = plots.histogram_totals(checks)
    assert totals == {
        ("layer_norm", "float32"): {"forward": [2] * len(h), "backward": h},
        ("rms_norm", "bfloat16"): {"statistics": h},
    }


def test_plots_render_the_same_from_several_threads(real_run: RunRecord) -> None:
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda _: plots.ulp_histograms(real_run), range(3)))
    assert results[0] is not None
    assert results[0].startswith(b"\x89PNG\r\n\x1a\n")
    assert results.count(results[0]) == 3


def test_error_vs_kappa_handles_zero_and_infinite_ratios() -> None:
    checks = [
        check("layer_norm", "float32", metrics=metrics(max_ratio=0.0)),
        check("layer_norm", "float32", verdict="fail", metrics=metrics(max_ratio=float("inf"))),
        check("rms_norm", "float32", kappa=1e5, metrics=metrics(max_ratio=float("nan"))),
        check("rms_norm", "float32", kappa=None),
    ]
    image = plots.error_vs_kappa(record(checks))
    assert image is not None
    assert Image.open(io.BytesIO(image)).format == "PNG"


def test_plot_labels_from_the_record_are_not_math() -> None:
    # A "$" pair would be parsed as mathematical markup and could fail to render.
    weird = record([check("norm$\\frac{", "dtype$x")], name="$\\sqrt{$")
    weird = with_speed(weird)
    weird.speed[0].norm = "$\\undefinedcommand$"
    assert weird.ceiling is not None
    weird.ceiling["method"] = "$\\nope$"
    for render in (plots.ulp_histograms, plots.error_vs_kappa, plots.bandwidth):
        assert render(weird) is not None


# --- report files ------------------------------------------------------------------------------


def test_write_reports_writes_the_html_page(tmp_path: Path) -> None:
    run = record([check("layer_norm", "float32"), check("layer_norm", "float32", verdict="fail")])
    paths = write_reports(run, tmp_path)
    assert paths["html"] == tmp_path / REPORT_FILES["html"] == tmp_path / "report.html"
    assert paths["html"].read_text(encoding="utf-8") == render_html(run)
