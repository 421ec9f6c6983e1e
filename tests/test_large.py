"""GPU-sized cases (``--large``), run here on shapes a CPU affords with small row blocks: the
streamed checks agree with the whole-tensor ones, find a row index that wraps, merge their
metrics exactly, and hold memory per block, not per tensor."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from conformance import large, metrics
from conformance.cases import Case, parse_case_id, with_norm_defaults
from conformance.checks import Target, run_case
from conformance.engine import select_cases
from impls.loader import load_adapter

ROOT = Path(__file__).resolve().parent.parent
ZOO = Path(__file__).parent / "zoo" / "geometry_bugs.py"


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(large, "BLOCK_ELEMENTS", 2**13)


def _large(norm: str, dtype: str, shape: tuple[int, ...]) -> Case:
    return with_norm_defaults(Case(norm, dtype, shape, "normal", 11, large=True))


def _run(spec: str, case: Case) -> dict[tuple[str, str], object]:
    adapter = load_adapter(spec)
    results = run_case(Target(adapter, "cpu", adapter.conventions, lambda c: "repro"), case)
    return {(r.kind, r.output): r for r in results}


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_a_correct_kernel_passes_a_streamed_case(norm: str) -> None:
    case = _large(norm, "float32", (3000, 70))
    assert len(list(large.blocks(case))) > 20
    checks = _run("torch", case)
    assert {k for k, r in checks.items() if r.verdict != "pass"} == set()  # type: ignore[attr-defined]
    assert ("forward", "output") in checks
    assert ("backward", "grad_input") in checks
    weight = checks["backward", "grad_weight"]
    assert weight.grade == "within_tolerance"  # type: ignore[attr-defined]
    assert "float64 value" in weight.message  # type: ignore[attr-defined]
    assert weight.metrics.n == 70  # type: ignore[attr-defined]
    assert checks["forward", "output"].metrics.n == 3000 * 70  # type: ignore[attr-defined]


@pytest.mark.usefixtures("small_blocks")
def test_a_row_index_that_wraps_is_found_and_located() -> None:
    case = _large("layer_norm", "float32", (70000, 3))
    checks = _run(f"{ZOO}:row_wrap", case)
    forward = checks["forward", "output"]
    assert forward.verdict == "fail"  # type: ignore[attr-defined]
    row = forward.metrics.worst_index[0]  # type: ignore[attr-defined]
    assert row >= 2**16
    assert f"row {row}" in forward.diagnosis  # type: ignore[attr-defined]
    assert "element offset" in forward.diagnosis  # type: ignore[attr-defined]


def test_blocks_are_drawn_from_their_own_seeds() -> None:
    case = _large("rms_norm", "bfloat16", (100, 8))
    parameters = large.case_parameters(case)
    a = large.block_inputs(case, 0, 10, parameters)
    b = large.block_inputs(case, 0, 10, parameters)
    c = large.block_inputs(case, 10, 20, parameters)
    assert np.array_equal(a.arrays["input"], b.arrays["input"])
    assert not np.array_equal(a.arrays["input"], c.arrays["input"])
    assert a.arrays["weight"] is parameters["weight"]


def test_metrics_merged_over_blocks_are_the_whole_tensors() -> None:
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(40, 16)).astype(np.float32).astype(np.float64)
    actual = reference.copy()
    actual[31, 5] = np.nextafter(np.float32(actual[31, 5]), np.float32(9), dtype=np.float32)
    actual[3, 2] += 1e-3
    bound = np.full(reference.shape, 1e-6)
    whole = metrics.compare(actual, reference, bound, "float32")
    parts = [
        (start, metrics.compare(actual[start : start + 7], reference[start : start + 7],
                                bound[start : start + 7], "float32"))
        for start in range(0, 40, 7)
    ]  # fmt: skip
    merged = metrics.merge(parts)
    for field in ("n", "mismatched", "max_ulp", "max_abs_error", "max_abs_index", "max_ratio",
                  "worst_index", "worst_ulp", "ulp_histogram", "nonfinite_mismatches"):  # fmt: skip
        assert getattr(merged, field) == getattr(whole, field), field
    assert merged.frac_faithful == pytest.approx(whole.frac_faithful)
    assert merged.p99_ulp >= whole.p99_ulp  # the upper edge of its histogram bin


def test_a_streamed_case_holds_memory_per_block_not_per_tensor(small_blocks: None) -> None:
    case = _large("rms_norm", "float32", (2**14, 64))  # 2^20 elements, 128 blocks
    tracemalloc.start()
    try:
        checks = _run("torch", case)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(r.verdict == "pass" for r in checks.values())  # type: ignore[attr-defined]
    whole = case.elements * 8  # one float64 copy of the tensor
    assert peak < whole, f"peak {peak / 2**20:.1f} MiB, one float64 tensor {whole / 2**20:.1f} MiB"


def test_the_large_battery_and_its_estimate() -> None:
    cases = large.large_cases(["layer_norm", "rms_norm", "group_norm"], ["bfloat16", "float64"], 0)
    assert {c.norm for c in cases} == {"layer_norm", "rms_norm"}
    assert {c.dtype for c in cases} == {"bfloat16"}
    biggest = max(c.elements for c in cases)
    assert biggest > 2**31
    assert any(c.shape[0] > 65535 * 16 for c in cases)
    assert any(c.shape[-1] > 2**20 for c in cases)
    for case in cases:
        assert parse_case_id(case.case_id) == case
        assert "large" in case.case_id.split("-")
    line = large.estimate(cases, "cpu")
    assert f"--large: {len(cases)} cases" in line
    assert "GiB" in line
    assert "min on one core" in line
    with_large = select_cases(norms=["rms_norm"], dtypes=["bfloat16"], quick=True, large=True)
    assert [c for c in with_large if c.large] == [c for c in cases if c.norm == "rms_norm"]


def test_the_cli_says_what_large_cases_cost_and_runs_one(tmp_path: Path) -> None:
    case_id = "rms_norm-float32-3000x70-normal-large-s1"
    run = subprocess.run(
        [sys.executable, "-m", "conformance", "certify", "--adapter", "torch", "--device", "cpu",
         "--large", "--case", case_id, "--no-progress", "--report-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "--large: 1 case, the largest 2.1e+05 elements" in run.stderr
    assert "verdict: PASS" in run.stdout
