"""The coverage table: which shape classes and layouts a run exercised and passed, per norm and
dtype, in report.json, report.md and report.html."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from conformance.cases import parse_case_id
from conformance.coverage import AXES, cell_state, cell_text, coverage, missing
from conformance.engine import certify, select_cases
from conformance.reports import write_reports
from conformance.results import CheckResult, RunRecord
from impls.loader import load_adapter


def _check(case_id: str, kind: str = "forward", output: str = "output", verdict: str = "pass"):
    case = parse_case_id(case_id)
    return CheckResult(**case.result_fields(), kind=kind, output=output, verdict=verdict)


BIG = "layer_norm-float32-65537x2-normal-o1-gb-many_rows-s7"
EDGE = "layer_norm-float32-3x1025-uniform-nc-gtr-tile_edge-s1"
PLAIN = "layer_norm-float32-3x7-normal-noaffine-s2"


def test_cases_not_checks_are_counted_and_a_failed_check_fails_its_case() -> None:
    checks = [
        _check(BIG),
        _check(BIG, "backward", "grad_input", "fail"),
        _check(EDGE),
        _check(EDGE, "backward", "grad_input"),
        _check(PLAIN),
    ]
    cell = coverage(checks)["layer_norm"]["float32"]
    assert cell["shape"]["many_rows"] == {"cases": 1, "passed": 0}
    assert cell["shape"]["tile_edge"] == {"cases": 1, "passed": 1}
    assert cell["input"] == {
        "offset": {"cases": 1, "passed": 0},
        "strided": {"cases": 1, "passed": 1},
        "contiguous": {"cases": 1, "passed": 1},
    }
    assert cell["grad"] == {
        "expanded": {"cases": 1, "passed": 0},
        "transposed": {"cases": 1, "passed": 1},
    }  # PLAIN has no backward check: its gradient layout is not counted
    assert cell["params"] == {"contiguous": {"cases": 2, "passed": 1}}  # PLAIN has none


def test_skipped_cases_did_not_run() -> None:
    assert coverage([_check(BIG, verdict="skip")]) == {}


def test_what_no_case_covered_is_listed() -> None:
    absent = missing(coverage([_check(PLAIN)]))
    assert "many_rows" in absent["shape"]
    assert "odd_groups" not in absent["shape"]  # not a class LayerNorm can have
    assert "expanded" in absent["input"]
    assert set(absent["grad"]) == set(AXES["grad"][1])


def test_cell_words() -> None:
    assert cell_text(None) == "—"
    assert cell_text({"cases": 4, "passed": 3}) == "3/4"
    assert cell_state({"cases": 4, "passed": 3}) == "fail"
    assert cell_state({"cases": 2, "passed": 2}) == "pass"
    assert cell_state(None) == "none"


def test_every_report_carries_the_coverage_of_a_real_run(tmp_path: Path) -> None:
    cases = select_cases(norms=["rms_norm"], dtypes=["float32"], quick=True)
    record = certify(load_adapter("torch"), cases, device="cpu")
    paths = write_reports(record, tmp_path)
    document = json.loads(paths["json"].read_text(encoding="utf-8"))
    table = document["coverage"]["rms_norm"]["float32"]
    classes = {k for c in cases for k in c.shape_classes}
    assert set(table["shape"]) == classes
    assert table["shape"]["many_rows"]["cases"] == sum(
        "many_rows" in c.shape_classes for c in cases
    )
    assert table["grad"]["expanded"]["passed"] >= 1
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert "## Coverage" in markdown
    assert "| rms\\_norm · float32 |" in markdown
    html = paths["html"].read_text(encoding="utf-8")
    assert '<section id="coverage">' in html
    assert "many_rows" in html


def test_version_two_reports_read_as_contiguous_and_classless() -> None:
    check = _check(EDGE).to_dict()
    for key in ("grad_layout", "param_layout", "shape_classes"):
        del check[key]
    old = CheckResult.from_dict(check)
    assert old.grad_layout == "contiguous"
    assert old.shape_classes == []
    record = RunRecord({}, {}, {}, 0, True, "", "", "", checks=[replace(old)])
    assert coverage(record.checks)["layer_norm"]["float32"]["shape"] == {}
