"""Failed cases' inputs saved beside the report, and ``normconf replay CASE_ID``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conformance.cases import parse_case_id
from conformance.inputs import build_inputs
from conformance.replay import inputs_path, load_inputs, save_inputs

ROOT = Path(__file__).resolve().parent.parent


def _normconf(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env_path = {"PYTHONPATH": str(ROOT)}
    import os

    return subprocess.run(
        [sys.executable, "-m", "conformance", *argv],
        cwd=cwd,
        env={**os.environ, **env_path},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed LayerNorm graded against PyTorch's convention: some cases fail."""
    directory = tmp_path_factory.mktemp("run")
    run = _normconf(
        "certify", "--adapter", "handwritten", "--convention", "pytorch", "--device", "cpu",
        "--quick", "--dtype", "float32", "--no-progress", "--report-dir", str(directory),
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    return directory


def test_only_failed_cases_have_their_inputs_saved(failed_run: Path) -> None:
    report = json.loads((failed_run / "report.json").read_text(encoding="utf-8"))
    failed = {c["case_id"] for c in report["checks"] if c["verdict"] == "fail"}
    saved = {p.name.removesuffix(".npz") for p in (failed_run / "inputs").iterdir()}
    assert failed
    assert saved == failed


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
def test_saved_inputs_load_back_bit_for_bit(tmp_path: Path, dtype: str) -> None:
    case = parse_case_id(f"fused_add_layer_norm-{dtype}-4x96-large_mean_k1e3-s7")
    inputs = build_inputs(case)
    save_inputs(tmp_path, inputs)
    loaded = load_inputs(tmp_path, case.case_id)
    assert loaded.case == case
    for group, back in ((inputs.arrays, loaded.arrays), (inputs.grads, loaded.grads)):
        assert group.keys() == back.keys()
        for name, array in group.items():
            if array is None:
                assert back[name] is None
                continue
            again = back[name]
            assert again is not None
            assert again.dtype == array.dtype
            assert np.array_equal(again.view(np.uint8), array.view(np.uint8)), name


def test_replay_reruns_a_failed_case_from_the_report_directory(failed_run: Path) -> None:
    case_id = sorted(p.name.removesuffix(".npz") for p in (failed_run / "inputs").iterdir())[0]
    run = _normconf("replay", case_id, cwd=failed_run)
    assert run.returncode == 1, run.stderr
    assert f"replay of {case_id} on handwritten" in run.stdout
    assert "FAIL" in run.stdout
    assert "Diagnosis: matches ε added to the standard deviation" in run.stdout
    # the same saved inputs through another adapter, which has PyTorch's convention
    other = _normconf("replay", case_id, "--dir", str(failed_run), "--adapter", "torch")
    assert other.returncode == 0, other.stdout + other.stderr
    assert "FAIL" not in other.stdout


def test_replay_of_a_case_without_saved_inputs_is_one_line(failed_run: Path) -> None:
    report = json.loads((failed_run / "report.json").read_text(encoding="utf-8"))
    failed = {c["case_id"] for c in report["checks"] if c["verdict"] == "fail"}
    passed = next(c["case_id"] for c in report["checks"] if c["case_id"] not in failed)
    assert not inputs_path(failed_run, passed).exists()
    run = _normconf("replay", passed, "--dir", str(failed_run))
    assert run.returncode == 2
    assert "no saved inputs for this case" in run.stderr
    assert run.stderr.count("\n") == 1


def test_replay_runs_no_adapter_code_a_report_directory_names_unless_told(
    failed_run: Path, tmp_path: Path
) -> None:
    """A report directory is data: one whose record points at a file of code does not get it
    imported by replay until the user names that adapter."""
    planted = tmp_path / "planted.py"
    witness = tmp_path / "imported"
    planted.write_text(f"open({str(witness)!r}, 'w').close()\nlayer_norm = None\n")
    forged = tmp_path / "forged"
    shutil.copytree(failed_run, forged)
    stream = forged / "results.jsonl"
    lines = stream.read_text().splitlines()
    head = json.loads(lines[0])
    head["adapter"]["spec"] = str(planted)
    stream.write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    case_id = next(p.stem for p in (forged / "inputs").glob("*.npz"))
    run = _normconf("replay", case_id, "--dir", str(forged))
    assert run.returncode == 2
    assert f"add --adapter {planted}" in run.stderr
    assert not witness.exists(), "replay imported the file the report named"
