"""Report writers: report.json, report.md, junit.xml and the terminal summary."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from conformance.messages import failure_message
from conformance.report_json import dumps, read_json, write_json
from conformance.report_junit import render_junit
from conformance.report_markdown import escape, render_markdown
from conformance.reports import write_reports
from conformance.results import SCHEMA_VERSION, CheckResult, Metrics, RunRecord
from conformance.summary import summary_table

HOSTILE = "<script>alert('x')</script> | *bold* _em_ `code` [link](http://e.x) ~~s~~ $x$\n# Heading"


def make_metrics(**changes: Any) -> Metrics:
    base = Metrics(
        n=64,
        mismatched=0,
        max_ulp=0.5,
        p50_ulp=0.0,
        p99_ulp=0.5,
        frac_correctly_rounded=1.0,
        frac_faithful=1.0,
        max_abs_error=0.0,
        max_abs_index=(0, 0),
        max_rel_error=0.0,
        max_rel_index=(0, 0),
        max_ratio=0.1,
        worst_index=(1, 2),
        worst_actual=0.25,
        worst_reference=0.25,
        worst_ulp=0.0,
        worst_tolerance_ulp=4.0,
    )
    return dataclasses.replace(base, **changes)


def make_check(
    norm: str, dtype: str, verdict: str, grade: str | None, **changes: Any
) -> CheckResult:
    base = CheckResult(
        case_id=f"{norm}-{dtype}-4x16-randn",
        norm=norm,
        dtype=dtype,
        kind="forward",
        output="output",
        shape=(4, 16),
        distribution="randn",
        layout="contiguous",
        seed=11,
        verdict=verdict,
        grade=grade,
        metrics=make_metrics() if grade is not None else None,
        duration_s=0.25,
    )
    return dataclasses.replace(base, **changes)


def make_record(checks: list[CheckResult], name: str = "torch") -> RunRecord:
    return RunRecord(
        adapter={"name": name, "spec": "torch", "conventions": {"variance": "biased"}},
        hardware={"cpu": "x86_64, 2 cores", "gpu": None},
        software={"python": "3.11.9", "torch": "2.13.0", "normconf": "0.1.0"},
        seed=11,
        quick=True,
        started="2025-01-01T00:00:00+00:00",
        finished="2025-01-01T00:00:42+00:00",
        command="normconf certify --adapter torch --quick --seed 11",
        checks=checks,
    )


def mixed_record(name: str = "torch", message: str = "boom") -> RunRecord:
    """Two passes, a failure with metrics and a NaN, a failure without metrics, a skip."""
    bad = make_metrics(
        mismatched=5,
        max_ulp=math.inf,
        worst_actual=math.nan,
        nonfinite_mismatches=1,
        max_ratio=math.inf,
    )
    return make_record(
        [
            make_check("layer_norm", "float32", "pass", "correctly_rounded"),
            make_check("layer_norm", "bfloat16", "pass", "faithful", kind="backward"),
            make_check(
                "rms_norm",
                "float16",
                "fail",
                "fail",
                metrics=bad,
                diagnosis="matches eps outside the square root",
                reproduce="normconf certify --adapter torch --case rms_norm-float16-4x16-randn",
            ),
            make_check(
                "rms_norm", "float32", "fail", None, kind="contract", output="call", message=message
            ),
            make_check("group_norm", "float32", "skip", None, message="not implemented"),
        ],
        name=name,
    )


# --- report.json -------------------------------------------------------------------------------


def test_json_round_trips_exactly(tmp_path: Path) -> None:
    record = mixed_record()
    path = write_json(record, tmp_path / "report.json")
    again = read_json(path)
    assert dumps(again) == dumps(record)
    metrics = again.checks[2].metrics
    assert metrics is not None
    assert math.isnan(metrics.worst_actual)
    assert metrics.max_ulp == math.inf
    assert metrics.worst_index == (1, 2)
    assert again.checks[0] == record.checks[0]
    assert again.checks[3] == record.checks[3]


def test_json_is_strict(tmp_path: Path) -> None:
    path = write_json(mixed_record(), tmp_path / "report.json")

    def reject(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


def test_json_has_the_documented_fields(tmp_path: Path) -> None:
    data = json.loads(write_json(mixed_record(), tmp_path / "r.json").read_text(encoding="utf-8"))
    assert data["schema"] == "normconf.report"
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["verdict"] == "fail"
    assert data["summary"] == {"pass": 2, "fail": 2, "skip": 1}
    assert data["adapter"]["name"] == "torch"
    assert data["hardware"]["cpu"] == "x86_64, 2 cores"
    assert data["software"]["torch"] == "2.13.0"
    assert data["seed"] == 11
    for check in data["checks"]:
        for key in ("check_id", "norm", "dtype", "kind", "verdict", "metrics", "diagnosis"):
            assert key in check
    failed = data["checks"][2]
    assert failed["diagnosis"] == "matches eps outside the square root"
    assert failed["metrics"]["worst_actual"] == "nan"
    assert failed["metrics"]["max_ulp"] == "inf"


def test_json_write_replaces_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text("old", encoding="utf-8")
    write_json(mixed_record(), path)
    assert read_json(path).verdict == "fail"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def _valid() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(dumps(mixed_record()))
    return data


def _with(**changes: Any) -> str:
    data = _valid()
    data.update(changes)
    return json.dumps(data)


def _check_with(**changes: Any) -> str:
    data = _valid()
    data["checks"][0].update(changes)
    return json.dumps(data)


def _without(key: str) -> str:
    data = _valid()
    del data[key]
    return json.dumps(data)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        pytest.param("{not json", "not valid JSON", id="syntax"),
        pytest.param("[1, 2]", "JSON object", id="array"),
        pytest.param(_with(schema="other"), "not a normconf report", id="schema"),
        pytest.param(_with(schema_version=SCHEMA_VERSION + 1), "schema version", id="version"),
        pytest.param(_without("hardware"), "missing field 'hardware'", id="missing"),
        pytest.param(_check_with(verdict="maybe"), "verdict 'maybe'", id="check-verdict"),
        pytest.param(_check_with(grade="superb"), "grade 'superb'", id="grade"),
        pytest.param(_check_with(metrics={"n": 1}), "not a valid normconf report", id="metrics"),
        pytest.param(_with(verdict="pass"), "disagrees", id="stored-verdict"),
    ],
)
def test_read_json_rejects_bad_files(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(reason)) as info:
        read_json(path)
    assert str(path) in str(info.value)


# --- report.md ---------------------------------------------------------------------------------


def _matrix_row(markdown: str, norm: str) -> list[str]:
    """The cells of ``norm``'s row in the grade matrix (the first table listing it)."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells and cells[0] == escape(norm):
            return cells[1:]
    raise AssertionError(f"no row for {norm}")


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        pytest.param([("pass", "correctly_rounded")], "✅ correctly rounded", id="cr"),
        pytest.param(
            [("pass", "correctly_rounded"), ("pass", "faithful")], "🟢 faithful", id="faithful"
        ),
        pytest.param(
            [("pass", "faithful"), ("pass", "within_tolerance"), ("pass", "correctly_rounded")],
            "🟡 within tolerance",
            id="within",
        ),
        pytest.param([("pass", "correctly_rounded"), ("fail", "fail")], "❌ fail", id="fail"),
        pytest.param([("pass", "correctly_rounded"), ("fail", None)], "❌ fail", id="exception"),
        pytest.param([("skip", None), ("pass", "faithful")], "🟢 faithful", id="skip-ignored"),
        pytest.param([("skip", None)], "— skipped", id="skipped"),
    ],
)
def test_matrix_cell_is_the_worst_grade(
    outcomes: list[tuple[str, str | None]], expected: str
) -> None:
    checks = [
        make_check("layer_norm", "float32", v, g, output=f"o{i}")
        for i, (v, g) in enumerate(outcomes)
    ]
    checks.append(make_check("rms_norm", "float16", "pass", "correctly_rounded"))
    markdown = render_markdown(make_record(checks))
    assert _matrix_row(markdown, "layer_norm") == [expected, "— not run"]
    assert _matrix_row(markdown, "rms_norm") == ["— not run", "✅ correctly rounded"]


def test_markdown_has_the_run_facts_and_failures() -> None:
    record = mixed_record()
    markdown = render_markdown(record)
    assert markdown.startswith("# normconf report: torch\n")
    assert "FAIL" in markdown.split("\n\n")[1]
    assert "torch: 2.13.0" in markdown
    assert record.command in markdown
    failures = markdown.split("## Failures (2)", 1)[1]
    assert failures.index("### rms\\_norm") < failures.index(escape(record.checks[2].check_id))
    assert "Mismatched elements: 5 / 64" in failures
    assert record.checks[2].reproduce in failures
    assert "boom" in failures
    assert escape(record.checks[0].check_id) not in failures  # passes are not listed


def test_markdown_kind_table_counts() -> None:
    markdown = render_markdown(mixed_record())
    rows = {cells[0]: cells[1:] for cells in map(_cells, markdown.splitlines()) if cells}
    assert rows["forward"] == ["3", "1", "1", "1", "❌ fail"]
    assert rows["backward"] == ["1", "1", "0", "0", "🟢 faithful"]
    assert rows["contract"] == ["1", "0", "1", "0", "❌ fail"]


def _cells(line: str) -> list[str]:
    if not line.startswith("|"):
        return []
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]


def _outside_code_blocks(markdown: str) -> str:
    """The text outside fenced code blocks (a fence closes only with a run at least as long)."""
    kept, fence = [], ""
    for line in markdown.splitlines():
        run = re.match(r"^(`{3,})", line)
        if fence:
            if run and line.strip() == "`" * len(line.strip()) and len(run.group(1)) >= len(fence):
                fence = ""
            continue
        if run:
            fence = run.group(1)
            continue
        kept.append(line)
    assert not fence, "a code block was left open"
    return "\n".join(kept)


def test_markdown_escapes_a_hostile_adapter() -> None:
    record = mixed_record(name=HOSTILE, message=HOSTILE + "\n```\n" + HOSTILE)
    record.checks[2].diagnosis = HOSTILE
    markdown = render_markdown(record)
    prose = _outside_code_blocks(markdown)
    assert "<" not in prose.replace("&lt;", "")  # no raw HTML anywhere outside code
    assert not any(line.startswith("# Heading") for line in prose.splitlines())
    for char in "`_[]~$":
        assert not re.search(rf"(?<!\\){re.escape(char)}", prose), f"unescaped {char!r}"
    # The report's own bold labels are the only emphasis.
    assert not re.search(r"(?<!\\)\*", prose.replace("**", ""))
    title = markdown.splitlines()[0]
    assert title.startswith("# normconf report: &lt;script&gt;")
    # Table rows keep their column count despite the pipes in the name.
    adapter_row = next(line for line in prose.splitlines() if "**Adapter**" in line)
    assert len(_cells(adapter_row)) == 2


def test_markdown_code_block_is_not_closed_by_the_message() -> None:
    record = mixed_record(message="before\n```\n</pre>after\n````")
    markdown = render_markdown(record)
    fence = markdown.split("before", 1)[0].rstrip("\n").rsplit("\n", 1)[-1]
    assert set(fence) == {"`"}
    assert len(fence) >= 5
    assert "after" not in _outside_code_blocks(markdown)


# --- junit.xml ---------------------------------------------------------------------------------


def _parse(xml_text: str) -> ET.Element:
    return ET.fromstring(xml_text.encode("utf-8"))


def test_junit_counts_and_cases() -> None:
    record = mixed_record()
    root = _parse(render_junit(record))
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("5", "2", "1")
    suites = {s.get("name"): s for s in root.iter("testsuite")}
    assert list(suites) == ["normconf.layer_norm", "normconf.rms_norm", "normconf.group_norm"]
    rms = suites["normconf.rms_norm"]
    assert (rms.get("tests"), rms.get("failures"), rms.get("skipped")) == ("2", "2", "0")
    assert float(rms.get("time", "nan")) == pytest.approx(0.5)
    cases = list(root.iter("testcase"))
    assert [c.get("name") for c in cases] == [c.check_id for c in record.checks]
    assert cases[2].get("classname") == "normconf.rms_norm.float16"
    failure = cases[2].find("failure")
    assert failure is not None
    assert failure.text == failure_message(record.checks[2])
    assert failure.get("message") == failure_message(record.checks[2]).splitlines()[0]
    skipped = cases[4].find("skipped")
    assert skipped is not None
    assert skipped.get("message") == "not implemented"
    assert cases[0].find("failure") is None
    assert cases[0].find("skipped") is None


def test_junit_survives_a_hostile_adapter() -> None:
    nasty = HOSTILE + "\x00\x1b[31m</failure>]]><!--"
    record = mixed_record(name=nasty, message=nasty)
    root = _parse(render_junit(record))
    failure = list(root.iter("testcase"))[3].find("failure")
    assert failure is not None
    assert failure.text is not None
    assert "<script>alert('x')</script>" in failure.text  # text, not markup
    assert "</failure>]]><!--" in failure.text
    assert "\x00" not in failure.text
    assert "\x1b" not in failure.text
    assert root.find("testsuite/testcase/script") is None
    adapter = root.find("testsuite/properties/property[@name='adapter']")
    assert adapter is not None
    assert (adapter.get("value") or "").startswith("<script>")


# --- all reports, terminal summary -------------------------------------------------------------


def test_write_reports_writes_all_four(tmp_path: Path) -> None:
    record = mixed_record()
    paths = write_reports(record, tmp_path / "a" / "b")
    names = sorted(p.name for p in paths.values())
    assert names == ["junit.xml", "report.html", "report.json", "report.md"]
    assert dumps(read_json(paths["json"])) == dumps(record)
    assert paths["markdown"].read_text(encoding="utf-8") == render_markdown(record)
    _parse(paths["junit"].read_text(encoding="utf-8"))


def test_summary_table_shows_worst_grades_and_counts() -> None:
    text = summary_table(mixed_record())
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip()}
    assert rows["norm"] == ["float32", "float16", "bfloat16"]
    assert rows["layer_norm"] == ["rounded", "-", "faithful"]
    assert rows["rms_norm"] == ["FAIL", "FAIL", "-"]
    assert rows["group_norm"] == ["skip", "-", "-"]
    assert "5 checks: 2 passed, 2 failed, 1 skipped" in text
    assert text.endswith("verdict: FAIL")


def test_summary_table_fits_100_columns() -> None:
    dtypes = [f"float8_e{i}m{7 - i}fnuz" for i in range(12)]
    checks = [make_check("fused_add_layer_norm", d, "pass", "faithful") for d in dtypes]
    text = summary_table(make_record(checks, name="x" * 300 + "\x1b[2J"))
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "\x1b" not in text
    shown = [d for line in text.splitlines() if line.startswith("norm ") for d in line.split()[1:]]
    assert shown == dtypes  # every column appears once, split over several tables
    assert text.endswith("verdict: PASS")


def test_report_files_are_readable_like_any_new_file(tmp_path: Path) -> None:
    import os
    import stat

    from conformance.report_json import write_text_atomic

    umask = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "report.json", "{}\n")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
