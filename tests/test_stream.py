"""Results stream to DIR/results.jsonl as each case finishes: a run killed midway leaves a
record that ``normconf report DIR`` turns into reports, and ``certify --resume DIR`` finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conformance.cli import main
from conformance.engine import certify, select_cases
from conformance.stream import STREAM_FILE, StreamWriter, read_stream
from impls.loader import load_adapter

ROOT = Path(__file__).resolve().parent.parent
SELECTION = ["--norm", "layer_norm", "--dtype", "float32", "--dtype", "bfloat16", "--quick"]


def _certify(*extra: str) -> list[str]:
    argv = [sys.executable, "-m", "conformance", "certify", "--adapter", "torch"]
    return [*argv, "--device", "cpu", "--no-progress", *SELECTION, *extra]


def _written_run(tmp_path: Path) -> Path:
    cases = select_cases(norms=["layer_norm"], dtypes=["float32"], quick=True)[:3]
    directory = tmp_path / "run"
    writer: list[StreamWriter] = []

    def started(record: object) -> None:
        writer.append(StreamWriter(directory, record, resume=False))  # type: ignore[arg-type]

    record = certify(
        load_adapter("torch"),
        cases,
        device="cpu",
        started=started,
        progress=lambda _d, _t, case, results: writer[0].case(case.case_id, results),
    )
    writer[0].end(record.finished)
    return directory


def test_a_streamed_run_reads_back_whole(tmp_path: Path) -> None:
    directory = _written_run(tmp_path)
    stream = read_stream(directory)
    assert stream.finished
    record = stream.record()
    assert len(stream.cases) == 3
    assert [c.check_id for c in record.checks] == [
        c.check_id for checks in stream.cases.values() for c in checks
    ]
    assert record.adapter["spec"] == "torch"


def test_a_line_cut_short_at_the_end_is_ignored(tmp_path: Path) -> None:
    directory = _written_run(tmp_path)
    path = directory / STREAM_FILE
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    # drop the end line and cut the last case line in half, as a kill during a write would
    path.write_text("".join(lines[:-2]) + lines[-2][: len(lines[-2]) // 2], encoding="utf-8")
    stream = read_stream(directory)
    assert not stream.finished
    assert len(stream.cases) == 2


def test_a_damaged_line_inside_the_file_is_an_error(tmp_path: Path) -> None:
    directory = _written_run(tmp_path)
    path = directory / STREAM_FILE
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[1] = "{not json\n"
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=r"results.jsonl:2: not a result line"):
        read_stream(directory)


def test_report_and_resume_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "results.jsonl: no such file" in capsys.readouterr().err
    directory = _written_run(tmp_path)
    argv = ["certify", "--adapter", "handwritten", "--device", "cpu", "--quick"]
    assert main([*argv, "--resume", str(directory)]) == 2
    err = capsys.readouterr().err
    assert "holds a run of adapter 'torch', not 'handwritten'" in err
    assert err.count("\n") == 1
    # the run streamed by _written_run graded torch against its declared conventions
    argv = ["certify", "--adapter", "torch", "--device", "cpu", "--convention", "pytorch"]
    assert main([*argv, "--resume", str(directory)]) == 2
    err = capsys.readouterr().err
    assert "graded against the declared conventions: resume with --convention declared" in err


def test_a_run_killed_midway_leaves_a_record_and_resumes(tmp_path: Path) -> None:
    """SIGKILL after a few cases: ``normconf report`` rebuilds the reports of what finished;
    ``--resume`` runs the rest, and every case of the battery is in the record exactly once."""
    directory = tmp_path / "run"
    env = {**os.environ, "NORMCONF_CACHE": "off"}  # slow enough to be caught midway
    process = subprocess.Popen(
        _certify("--report-dir", str(directory)),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    path = directory / STREAM_FILE
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and path.read_text(encoding="utf-8").count("\n") >= 6:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not (directory / "report.json").exists()

    run = subprocess.run(
        [sys.executable, "-m", "conformance", "report", str(directory)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "interrupted run" in run.stdout
    partial = json.loads((directory / "report.json").read_text(encoding="utf-8"))
    assert partial["finished"] == ""
    finished_cases = {c["case_id"] for c in partial["checks"]}
    assert len(finished_cases) >= 5
    assert (directory / "report.html").exists()

    battery = {
        c.case_id
        for c in select_cases(norms=["layer_norm"], dtypes=["float32", "bfloat16"], quick=True)
    }
    assert finished_cases < battery
    resumed = subprocess.run(
        _certify("--resume", str(directory), "--exit-zero"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr
    stream = read_stream(directory)
    assert stream.finished
    # One entry holds the explorer's search of layer_norm (kind explore), after the battery.
    explored = {k for k, checks in stream.cases.items() if all(c.kind == "explore" for c in checks)}
    assert len(explored) == 1
    assert set(stream.cases) - explored == battery
    lines = path.read_text(encoding="utf-8").splitlines()
    case_lines = [json.loads(line)["case_id"] for line in lines if '"type": "case"' in line]
    assert len(case_lines) == len(set(case_lines)), "a finished case ran again"
    final = json.loads((directory / "report.json").read_text(encoding="utf-8"))
    assert {c["case_id"] for c in final["checks"] if c["kind"] != "explore"} == battery
    assert sum(c["output"] == "search" for c in final["checks"]) == 1
    assert final["started"] == partial["started"]  # one run, resumed
