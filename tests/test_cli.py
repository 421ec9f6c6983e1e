"""``normconf certify``: exit codes, reports, reproduction of one case, and the pytest face."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conformance.cli import main

ROOT = Path(__file__).resolve().parent.parent

CORRECT = """
import torch
import torch.nn.functional as F

normconf_name = "float64 once"
normconf_dtypes = ("float32",)

def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    up = lambda t: None if t is None else t.double()
    return F.layer_norm(input.double(), normalized_shape, up(weight), up(bias), eps).to(input.dtype)
"""

# Ignores the bias: wrong everywhere a bias is given.
BROKEN = CORRECT.replace("up(bias), eps)", "None, eps)").replace("float64 once", "no bias")


def _adapter(tmp_path: Path, text: str, name: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    return str(path)


def _certify(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["certify", "--no-progress", *args])
    out, err = capsys.readouterr()
    return code, out, err


QUICK = ["--quick", "--norm", "layer_norm", "--dtype", "float32", "--distribution", "normal"]


def test_passing_adapter_exits_0_and_writes_the_three_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _adapter(tmp_path, CORRECT, "good")
    report_dir = str(tmp_path / "r")
    code, out, _ = _certify(["--adapter", spec, *QUICK, "--report-dir", report_dir], capsys)
    assert code == 0, out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["verdict"] == "pass"
    assert report["adapter"]["name"] == "float64 once"
    assert {c["kind"] for c in report["checks"]} >= {"contract", "forward", "backward"}
    assert (tmp_path / "r" / "report.md").read_text().startswith("#")
    assert "<testsuites" in (tmp_path / "r" / "junit.xml").read_text()
    assert "verdict: pass" in out.lower()


def test_failing_adapter_exits_1_with_diagnosis_and_a_command_that_reproduces_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _adapter(tmp_path, BROKEN, "nobias")
    code, _, _ = _certify(["--adapter", spec, *QUICK, "--report-dir", str(tmp_path / "r")], capsys)
    assert code == 1
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    failed = [c for c in report["checks"] if c["verdict"] == "fail"]
    assert failed
    assert any("bias ignored" in (c["diagnosis"] or "") for c in failed)
    # The reproduction command re-runs exactly that case, and it fails the same way.
    command = failed[0]["reproduce"].split()
    assert command[:2] == ["normconf", "certify"]
    again = tmp_path / "again"
    code, _, _ = _certify([*command[2:], "--report-dir", str(again)], capsys)
    assert code == 1
    rerun = json.loads((again / "report.json").read_text())
    assert {c["case_id"] for c in rerun["checks"]} == {failed[0]["case_id"]}
    assert [c["metrics"] for c in rerun["checks"] if c["check_id"] == failed[0]["check_id"]] == [
        failed[0]["metrics"]
    ]


def test_exit_zero_keeps_the_verdict_in_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _adapter(tmp_path, BROKEN, "nobias")
    args = ["--adapter", spec, *QUICK, "--exit-zero", "--report-dir", str(tmp_path / "r")]
    code, out, _ = _certify(args, capsys)
    assert code == 0
    assert "verdict: fail" in out.lower()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--adapter", "no-such-builtin"], "no-such-builtin"),
        (["--adapter", "missing/file.py"], "missing/file.py"),
        (["--adapter", "torch", "--norm", "nope"], "nope"),
        (["--adapter", "torch", "--case", "layer_norm-float32-2x3-normal"], "SEED"),
        (["--adapter", "handwritten", "--norm", "rms_norm"], "handwritten"),
        (["--adapter", "torch", "--device", "cuda"], "CUDA"),
    ],
)
def test_errors_exit_2_with_one_line(
    args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if "cuda" in args:
        torch = pytest.importorskip("torch")
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    code, out, err = _certify(args, capsys)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert says in lines[0]
    assert "Traceback" not in err


def test_python_dash_m_conformance_is_the_same_program(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "conformance", "certify", "--adapter", "nope.nothing"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert run.returncode == 2
    assert "nope" in run.stderr


def test_pytest_plugin_runs_the_cases_as_tests_with_readable_ids(tmp_path: Path) -> None:
    spec = _adapter(tmp_path, BROKEN, "nobias")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "conformance", "-p", "no:cacheprovider", "-q",
         "--adapter", spec, "--quick", "--dtype", "float32", "-k", "normal and not noaffine"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    assert "layer_norm-float32-" in run.stdout
    assert "Mismatched elements" in run.stdout
    assert "bias ignored" in run.stdout
    assert "normconf certify --adapter" in run.stdout
