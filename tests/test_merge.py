"""Merged reports: runs of several adapters and machines in one matrix, read back and re-merged."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from conformance import merge as merging
from conformance.engine import certify, select_cases
from conformance.merge import (
    MERGED_SCHEMA,
    column_labels,
    load_runs,
    merge,
    read_merged,
    write_merged,
)
from conformance.report_json import dumps, write_json
from conformance.results import RunRecord, SpeedResult
from conformance.summary import NOT_RUN, grade_matrix
from impls.loader import load_adapter

SCRIPT_NAME = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def torch_run() -> RunRecord:
    cases = select_cases(
        norms=["layer_norm", "rms_norm"],
        dtypes=["float32", "bfloat16"],
        quick=True,
        distributions=["normal"],
        boundary=False,  # the reports' rendering; tests/test_coverage.py has the boundaries
    )
    return certify(load_adapter("torch"), cases, device="cpu", quick=True)


@pytest.fixture(scope="module")
def handwritten_run() -> RunRecord:
    cases = select_cases(norms=["layer_norm"], dtypes=["float32"], quick=True)
    return certify(load_adapter("handwritten"), cases, device="cpu", quick=True)


def saved(run: RunRecord, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_json(run, directory / "report.json")
    return directory


def timed(run: RunRecord, gbps: tuple[float, ...] = (5.0, 20.0)) -> RunRecord:
    """``run`` with forward timings of layer_norm float32 at sizes growing with ``gbps``."""
    results = [
        SpeedResult(
            speed_id=f"layer_norm-float32-{2**i}x1024::forward",
            norm="layer_norm",
            dtype="float32",
            direction="forward",
            shape=(2**i, 1024),
            device="cpu",
            bytes=2**i * 1024 * 8,
            method="perf_counter",
            rounds=3,
            median_s=2**i * 1024 * 8 / (g * 1e9),
            p25_s=0.0,
            p75_s=0.0,
            min_s=0.0,
            gbps=g,
            fraction_of_ceiling=g / 40.0,
            verdict="pass",
        )
        for i, g in enumerate(gbps, start=6)
    ]
    ceiling = {"gbps": 40.0, "method": "copy", "bytes": 2**26, "device": "cpu"}
    return dataclasses.replace(run, speed=results, ceiling=ceiling)


# --- the matrix --------------------------------------------------------------------------------


def test_one_column_per_run_and_each_cell_is_that_runs_worst_grade(
    torch_run: RunRecord, handwritten_run: RunRecord
) -> None:
    runs = [torch_run, handwritten_run]
    document = merge(runs)
    assert document["schema"] == MERGED_SCHEMA
    assert document["schema_version"] == 1
    assert [c["label"] for c in document["columns"]] == column_labels(runs)
    assert len(document["columns"]) == 2
    assert document["columns"][0]["label"].startswith("torch (eager) @ cpu/")
    assert document["verdict"] == "fail"
    rows = {(r["norm"], r["dtype"]): r["cells"] for r in document["matrix"]}
    for i, run in enumerate(runs):
        _, _, cells = grade_matrix(run)
        for key, row in rows.items():
            assert len(row) == 2
            assert row[i]["outcome"] == cells.get(key, NOT_RUN), (key, i)
            assert row[i]["speed"] is None
    assert rows["rms_norm", "float32"][1]["outcome"] == NOT_RUN  # handwritten has no RMSNorm
    assert [(r["norm"], r["dtype"]) for r in document["matrix"]][:2] == [
        ("layer_norm", "float32"),
        ("layer_norm", "bfloat16"),
    ]
    json.dumps(document, allow_nan=False)  # strict JSON as it stands


def test_speed_cells_show_the_largest_size(torch_run: RunRecord) -> None:
    document = merge([timed(torch_run, (5.0, 30.0, 20.0)), torch_run])
    row = next(
        r for r in document["matrix"] if (r["norm"], r["dtype"]) == ("layer_norm", "float32")
    )
    assert row["cells"][0]["speed"] == {
        "forward": {
            "gbps": 20.0,
            "fraction_of_ceiling": 0.5,
            "shape": [256, 1024],
            "verdict": "pass",
        }
    }
    assert row["cells"][1]["speed"] is None
    assert document["speed_verdict"] == "pass"


def test_labels_are_unique(torch_run: RunRecord) -> None:
    later = dataclasses.replace(torch_run, started="2030-01-01T00:00:00+00:00")
    labels = column_labels([torch_run, later, torch_run])
    assert len(set(labels)) == 3
    assert "2030-01-01T00:00:00+00:00" in labels[1]
    assert labels[2].endswith("#2")
    gpu = dataclasses.replace(
        torch_run, hardware={"device": "cuda", "gpu": "NVIDIA H100", "cpu": "x"}
    )
    assert column_labels([gpu]) == ["torch (eager) @ cuda/NVIDIA H100"]


# --- files -------------------------------------------------------------------------------------


def test_write_merged_and_read_it_back(
    tmp_path: Path, torch_run: RunRecord, handwritten_run: RunRecord
) -> None:
    runs = load_runs([saved(torch_run, tmp_path / "a"), saved(handwritten_run, tmp_path / "b")])
    paths = write_merged(runs, tmp_path / "out" / "merged")
    assert {k: p.name for k, p in paths.items()} == {
        "json": "report.json",
        "markdown": "report.md",
        "html": "report.html",
    }
    again = read_merged(paths["json"])
    assert [dumps(r) for r in again] == [dumps(r) for r in (torch_run, handwritten_run)]
    labels = column_labels(runs)
    markdown = paths["markdown"].read_text(encoding="utf-8")
    html = paths["html"].read_text(encoding="utf-8")
    for label in labels:
        assert label.replace("(", "").split(" @ ")[0] in markdown.replace("(", "")
    assert "❌ fail" in markdown
    assert html.count('<table class="matrix">') == 1
    assert "<img" not in html  # no speed measured: no bandwidth plot
    assert "http://" not in html
    assert "https://" not in html


def test_merged_html_shows_the_runs_bandwidth_together(
    tmp_path: Path, torch_run: RunRecord, handwritten_run: RunRecord
) -> None:
    runs = [timed(torch_run), timed(handwritten_run, (3.0, 4.0, 8.0))]
    html = write_merged(runs, tmp_path)["html"].read_text(encoding="utf-8")
    (encoded,) = [part.split('"', 1)[0] for part in html.split('src="data:image/png;base64,')[1:]]
    image = Image.open(io.BytesIO(base64.b64decode(encoded)))
    assert image.format == "PNG"
    assert "fwd 20.0 GB/s (50%)" in html
    assert "speed: PASS" in html


def test_a_merged_directory_merges_again(
    tmp_path: Path, torch_run: RunRecord, handwritten_run: RunRecord
) -> None:
    write_merged([torch_run], tmp_path / "first")
    third = dataclasses.replace(torch_run, started="2030-01-01T00:00:00+00:00")
    runs = load_runs(
        [tmp_path / "first", saved(handwritten_run, tmp_path / "b"), saved(third, tmp_path / "c")]
    )
    assert [r.started for r in runs] == [torch_run.started, handwritten_run.started, third.started]
    document = merge(runs)
    assert len(document["columns"]) == 3
    # A run that arrives twice (alone and inside the merged report) is taken once.
    again = load_runs([tmp_path / "first", saved(torch_run, tmp_path / "a")])
    assert len(again) == 1


def test_reports_of_schema_versions_1_and_2_merge(
    tmp_path: Path, torch_run: RunRecord, handwritten_run: RunRecord
) -> None:
    old: dict[str, Any] = json.loads(dumps(handwritten_run))
    old["schema_version"] = 1
    for key in ("speed", "ceiling", "speed_verdict"):
        del old[key]
    for c in old["checks"]:
        del c["kappa"]
        if c["metrics"] is not None:
            del c["metrics"]["ulp_histogram"]
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "report.json").write_text(json.dumps(old), encoding="utf-8")
    runs = load_runs([tmp_path / "v1", saved(timed(torch_run), tmp_path / "v2")])
    assert runs[0].checks[0].kappa is None
    paths = write_merged(runs, tmp_path / "out")
    document = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert [c["adapter"] for c in document["columns"]] == [
        "handwritten (seed LayerNorm)",
        "torch (eager)",
    ]
    assert len(read_merged(paths["json"])) == 2


def test_hostile_names_are_escaped(tmp_path: Path, torch_run: RunRecord) -> None:
    hostile = dataclasses.replace(
        torch_run,
        adapter={**torch_run.adapter, "name": SCRIPT_NAME},
        hardware={"device": "cpu", "cpu": "</td><img src=x onerror=alert(1)>"},
        command="</code><script>alert(2)</script>",
    )
    paths = write_merged([timed(hostile)], tmp_path)
    html = paths["html"].read_text(encoding="utf-8")
    assert "<script>alert" not in html
    assert "<img src=x" not in html
    assert html.count("<script>") == 1
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert "<script>" not in markdown


def test_nothing_is_written_when_rendering_fails(
    tmp_path: Path, torch_run: RunRecord, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object) -> str:
        raise RuntimeError("cannot render")

    monkeypatch.setattr(merging, "render_merged_html", broken)
    with pytest.raises(RuntimeError):
        write_merged([torch_run], tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- errors ------------------------------------------------------------------------------------


def _valid(run: RunRecord) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(dumps(run))
    return data


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        pytest.param(None, "no such directory", id="missing-dir"),
        pytest.param("", "no report.json", id="missing-file"),
        pytest.param("{not json", "not valid JSON", id="syntax"),
        pytest.param('{"schema": "other"}', "not a normconf report", id="schema"),
        pytest.param("bad-run", "missing field 'hardware'", id="bad-run"),
        pytest.param("bad-merged", "run 1", id="bad-merged-run"),
        pytest.param(
            '{"schema": "normconf.merged", "schema_version": 9}', "version 9", id="merged-version"
        ),
        pytest.param(
            '{"schema": "normconf.merged", "schema_version": 1}',
            "'runs' must be a list",
            id="no-runs",
        ),
    ],
)
def test_load_errors_are_one_line_naming_the_path(
    tmp_path: Path, torch_run: RunRecord, content: str | None, reason: str
) -> None:
    directory = tmp_path / "report"
    if content is not None:
        directory.mkdir()
    if content == "bad-run":
        data = _valid(torch_run)
        del data["hardware"]
        content = json.dumps(data)
    elif content == "bad-merged":
        run = _valid(torch_run)
        run["checks"][0]["verdict"] = "maybe"
        content = json.dumps({"schema": MERGED_SCHEMA, "schema_version": 1, "runs": [run]})
    if content:
        (directory / "report.json").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=reason) as info:
        load_runs([directory])
    message = str(info.value)
    assert "\n" not in message
    assert str(directory) in message


def test_no_directories_or_no_runs_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no report directories"):
        load_runs([])
    (tmp_path / "report.json").write_text(
        json.dumps({"schema": MERGED_SCHEMA, "schema_version": 1, "runs": []}), encoding="utf-8"
    )
    with pytest.raises(ValueError, match="hold no runs"):
        load_runs([tmp_path])


def test_read_merged_rejects_a_plain_report(tmp_path: Path, torch_run: RunRecord) -> None:
    path = write_json(torch_run, tmp_path / "report.json")
    with pytest.raises(ValueError, match="not a merged normconf report"):
        read_merged(path)
