"""The speed battery: the bytes model, the timer, thresholds and verdicts, re-verification of
timed outputs (a kernel fast because it skips work fails), and the CLI and pytest faces."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conformance import oracle64, speed, timing
from conformance.cases import Case, with_norm_defaults
from conformance.engine import select_cases
from conformance.expected import expected
from conformance.inputs import build_inputs, round_into
from conformance.results import SpeedResult
from conformance.specs import spec
from impls.adapter import from_object
from impls.loader import load_adapter

ROOT = Path(__file__).resolve().parent.parent


def _case(norm: str, dtype: str, shape: tuple[int, ...], groups: int = 1) -> Case:
    return with_norm_defaults(Case(norm, dtype, shape, "normal", 1, num_groups=groups))


# -- the bytes model, counted by hand -------------------------------------------------------------


def test_layer_norm_bytes_by_hand() -> None:
    case = _case("layer_norm", "float32", (4, 8))
    # forward: x 4*8*4 + weight, bias 2*8*4 read; y 4*8*4 + mean, rstd 2*4*4 written
    assert speed.bytes_moved(case, "forward") == 128 + 64 + 128 + 32
    # backward: dy, x 2*128 + weight 32 + stats 32 read; dx 128 + dweight, dbias 64 written
    assert speed.bytes_moved(case, "backward") == 256 + 32 + 32 + 128 + 64


def test_fused_add_rms_norm_bytes_by_hand() -> None:
    case = _case("fused_add_rms_norm", "bfloat16", (2, 16))
    e = 2 * 16 * 2  # one tensor of the input's size, in bytes
    # forward: x, residual, weight read; y, z, rstd (2 rows, float32) written
    assert speed.bytes_moved(case, "forward") == 2 * e + 16 * 2 + 2 * e + 2 * 4
    # backward: dy, dz, z, weight, rstd read; dx, d residual, dweight written
    assert speed.bytes_moved(case, "backward") == 3 * e + 32 + 8 + 2 * e + 32


def test_batch_norm_counts_its_running_statistics() -> None:
    case = _case("batch_norm", "float16", (2, 3, 4))
    e, p = 2 * 3 * 4 * 2, 3 * 2
    forward = e + 2 * p + 2 * p + e + 2 * 3 * 4 + 2 * p  # x, w, b, running; y, stats, running
    assert speed.bytes_moved(case, "forward") == forward


# -- the timer ------------------------------------------------------------------------------------


def test_time_calls_rotates_through_every_set_and_times_each_call() -> None:
    seen: list[int] = []

    def call(i: int) -> None:
        seen.append(i)
        time.sleep(0.002)

    budget = timing.Budget(warmup=2, min_rounds=7, max_rounds=7, seconds=0.0)
    result = timing.time_calls(call, 3, "cpu", budget)
    assert result.rounds == 7
    assert seen == [0, 1] + [i % 3 for i in range(7)]
    assert result.minimum >= 0.002
    assert result.p25 <= result.median <= result.p75


def test_prepare_runs_untimed_before_every_call() -> None:
    events: list[str] = []

    def prepare(i: int) -> None:
        events.append(f"prepare {i}")
        time.sleep(0.02)  # far longer than the call: must not show in the timing

    def call(i: int) -> None:
        events.append(f"call {i}")

    budget = timing.Budget(warmup=1, min_rounds=4, max_rounds=4, seconds=0.0)
    result = timing.time_calls(call, 2, "cpu", budget, prepare=prepare)
    expected = [f"{what} {i}" for i in (0, 0, 1, 0, 1) for what in ("prepare", "call")]
    assert events == expected
    assert result.median < 0.02


def test_sets_needed_outgrow_the_cache() -> None:
    cache = timing.cache_bytes("cpu")
    per_set = 1 << 20
    sets = timing.sets_needed(per_set, "cpu", limit=10_000)
    assert sets * per_set >= 2 * cache
    assert timing.sets_needed(10 * cache, "cpu") == 2


def test_ceiling_is_measured_on_this_machine() -> None:
    ceiling = timing.measure_ceiling("cpu", timing.Budget(warmup=1, min_rounds=3, seconds=0.0))
    assert ceiling["device"] == "cpu"
    assert ceiling["bytes"] >= 2 * 256 * 2**20
    assert ceiling["gbps"] == pytest.approx(ceiling["bytes"] / ceiling["median_s"] / 1e9)
    assert ceiling["datasheet_gbps"] is None


def test_datasheet_names_match_specific_gpus_first() -> None:
    def peak(name: str) -> float | None:
        return next((g for key, g in timing.DATASHEET_GBPS if key in name), None)

    assert peak("NVIDIA H100 PCIe") == 2000.0
    assert peak("NVIDIA H100 80GB HBM3") == 3350.0
    assert peak("NVIDIA H200") == 4800.0
    assert peak("NVIDIA A100-SXM4-80GB") == 2039.0


# -- thresholds and verdicts ----------------------------------------------------------------------


def test_thresholds_come_from_the_config_and_flags_override(tmp_path: Path) -> None:
    cpu = speed.load_thresholds("cpu")
    cuda = speed.load_thresholds("cuda")
    assert cuda.min_fraction("forward") == 0.90
    assert cuda.min_fraction("backward") == 0.75
    assert 0 < cpu.min_ratio <= 1
    changed = speed.load_thresholds("cpu", min_fraction=0.5, min_ratio=2.0)
    assert changed.min_fraction("forward") == changed.min_fraction("backward") == 0.5
    assert changed.min_ratio == 2.0
    broken = tmp_path / "speed.toml"
    broken.write_text("[cpu]\nmin_ratio = 1\n")
    with pytest.raises(ValueError, match=r"\[cpu\] is unreadable") as info:
        speed.load_thresholds("cpu", broken)
    assert "\n" not in str(info.value)


def _result(**fields: Any) -> SpeedResult:
    base: dict[str, Any] = {
        "speed_id": "layer_norm-float32-8x4096-forward",
        "norm": "layer_norm",
        "dtype": "float32",
        "direction": "forward",
        "shape": (8, 4096),
        "device": "cpu",
        "bytes": 1000,
        "method": "cpu-perf-counter",
        "rounds": 10,
        "median_s": 1e-6,
        "p25_s": 1e-6,
        "p75_s": 1e-6,
        "min_s": 1e-6,
        "gbps": 1.0,
        "fraction_of_ceiling": 0.5,
        "verdict": "skip",
        "baseline": "torch (eager)",
        "ratio": 1.0,
    }
    return SpeedResult(**{**base, **fields})


THRESHOLDS = speed.Thresholds(0.4, 0.3, 0.9, 1024)


@pytest.mark.parametrize(
    ("fields", "kwargs", "reason"),
    [
        ({}, {}, None),
        ({"fraction_of_ceiling": 0.39}, {}, "below the 40% required"),
        ({"fraction_of_ceiling": 0.39}, {"row": 512}, None),  # narrow rows: ratio only
        ({"direction": "backward", "fraction_of_ceiling": 0.35}, {}, None),
        ({"ratio": 0.8}, {}, "1.25x the baseline"),
        ({}, {"accuracy_failed": True}, "failed accuracy checks"),
        ({}, {"reverify_problem": "output: 3 of 9 elements"}, "outputs after timing are wrong"),
    ],
)
def test_judge(fields: dict[str, Any], kwargs: dict[str, Any], reason: str | None) -> None:
    options: dict[str, Any] = {"accuracy_failed": False, "reverify_problem": None, "row": 4096}
    judged = speed.judge(_result(**fields), THRESHOLDS, **{**options, **kwargs})
    assert judged.verdict == ("pass" if reason is None else "fail")
    if reason is not None:
        assert reason in judged.message


# -- the float64 yardstick and re-verification ----------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [c for c in select_cases(quick=True, dtypes=["float32"], distributions=["normal"])],
    ids=lambda c: c.case_id,
)
def test_float64_evaluation_rounds_to_the_references(case: Case) -> None:
    """Forward and backward of the float64 evaluation, rounded into float32, are within one
    float32 ulp of the correctly rounded references."""
    inputs = build_inputs(case)
    convention = spec(case.norm).convention({})
    exact = expected(inputs, convention, backward=True).values
    wide = {
        k: torch.from_numpy(np.asarray(v, dtype=np.float64)).requires_grad_(
            k in ("input", "weight", "bias", "residual", "sublayer_output")
        )
        for k, v in inputs.arrays.items()
        if v is not None
    }
    produced = oracle64.evaluate(case, wide, convention)
    outputs = [produced["output"]]
    upstream = [torch.from_numpy(np.asarray(inputs.grads["grad_output"], dtype=np.float64))]
    if "residual_out" in produced and inputs.grads.get("grad_residual_out") is not None:
        outputs.append(produced["residual_out"])
        g2 = np.asarray(inputs.grads["grad_residual_out"], dtype=np.float64)
        upstream.append(torch.from_numpy(g2))
    torch.autograd.backward(outputs, upstream)
    values = {"output": produced["output"].detach().numpy()}
    values |= {f"grad_{k}": t.grad.numpy() for k, t in wide.items() if t.grad is not None}
    for name, value in values.items():
        if name not in exact:
            continue
        ulps = np.abs(round_into(value, "float32") - exact[name])
        spacing = np.spacing(np.abs(exact[name]).astype(np.float32)).astype(np.float64)
        assert (ulps <= spacing).all(), f"{case.case_id} {name}"


def _cheat(first_results: dict[Any, Any]) -> Any:
    """A LayerNorm that computes the first call per shape and returns that result ever after:
    fast, and right only for the first input set."""

    def layer_norm(x: Any, shape: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5):
        key = tuple(x.shape)
        if key not in first_results:
            first_results[key] = F.layer_norm(x, shape, weight, bias, eps)
        return first_results[key]

    return from_object(SimpleNamespace(layer_norm=layer_norm, normconf_backward=False), "cheat")


FAST = timing.Budget(warmup=1, min_rounds=3, max_rounds=6, seconds=0.0)


def test_a_kernel_that_skips_work_fails_after_timing() -> None:
    sc = speed.SpeedCase("layer_norm", "float32", (1024, 1024), "forward")
    (result,) = speed.run_speed(
        _cheat({}),
        None,
        [sc],
        device="cpu",
        conventions={},
        thresholds=speed.Thresholds(0.0, 0.0, 0.0, 0),
        failed_accuracy=set(),
        reproduce=lambda _sc: "",
        ceiling=None,
        budget=FAST,
    )
    assert result.verdict == "fail"
    assert "outputs after timing are wrong: output:" in result.message
    assert not result.reverified


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_torch_layer_norm_is_reverified_and_compared_with_itself(direction: str) -> None:
    torch_adapter = load_adapter("torch")
    sc = speed.SpeedCase("layer_norm", "float32", (1024, 1024), direction)
    (result,) = speed.run_speed(
        torch_adapter,
        torch_adapter,
        [sc],
        device="cpu",
        conventions={},
        thresholds=speed.Thresholds(0.0, 0.0, 0.5, 0),
        failed_accuracy={("layer_norm", "float32")} if direction == "backward" else set(),
        reproduce=lambda _sc: "again",
        ceiling={"gbps": 1.0},
        budget=FAST,
    )
    assert result.reverified
    assert result.ratio == 1.0
    assert result.bytes == speed.bytes_moved(sc.case(), direction)
    assert result.gbps == pytest.approx(result.bytes / result.median_s / 1e9)
    assert result.fraction_of_ceiling == pytest.approx(result.gbps)
    assert result.reproduce == "again"
    # a kernel that fails accuracy never gets a speed pass
    assert result.verdict == ("pass" if direction == "forward" else "fail")


def test_the_battery_follows_what_the_adapter_declares() -> None:
    seed = load_adapter("handwritten")  # layer_norm only, float32/float64, with backward
    battery = speed.speed_cases(seed, "cpu", quick=True)
    assert {sc.norm for sc in battery} == {"layer_norm"}
    assert {sc.dtype for sc in battery} == {"float32"}  # float64 is not timed
    assert {sc.direction for sc in battery} == {"forward", "backward"}
    assert len({sc.shape for sc in battery}) == 2
    ort = SimpleNamespace(layer_norm=F.layer_norm, normconf_backward=False)
    battery = speed.speed_cases(from_object(ort, "fwd"), "cpu", dtypes=["bfloat16"])
    assert {(sc.dtype, sc.direction) for sc in battery} == {("bfloat16", "forward")}
    assert len(battery) == 3


def test_input_sets_are_independent_draws_without_zeros() -> None:
    case = _case("fused_add_layer_norm", "bfloat16", (64, 256))
    first, second = speed.draw_sets(case, "cpu", 2, seed=3)
    for name in ("input", "residual", "weight", "bias"):
        a, b = first.tensors[name].float(), second.tensors[name].float()
        assert (a != 0).float().mean() > 0.99
        # not a shift or scaling of each other: the correlation of independent draws is small
        corr = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
        assert abs(corr) < 0.2, name


# -- the faces: CLI and pytest --------------------------------------------------------------------


def test_certify_with_speed_writes_the_speed_results_and_exits_1_on_a_missed_threshold(
    tmp_path: Path,
) -> None:
    out = tmp_path / "report"
    argv = [sys.executable, "-m", "conformance", "certify", "--adapter", "torch"]
    argv += ["--device", "cpu", "--quick", "--norm", "rms_norm", "--dtype", "float32"]
    argv += ["--speed", "--min-ratio", "2", "--no-progress", "--report-dir", str(out)]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    # torch's float32 RMSNorm passes its accuracy checks; as its own baseline its ratio is 1,
    # never the 2 asked for
    assert run.returncode == 1, run.stdout + run.stderr
    assert "verdict: PASS" in run.stdout
    assert "speed verdict: FAIL" in run.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "pass"
    assert report["speed_verdict"] == "fail"
    assert report["ceiling"]["gbps"] > 0
    ids = {r["speed_id"] for r in report["speed"]}
    assert ids == {
        f"rms_norm-float32-{shape}-{d}"
        for shape in ("1024x1024", "4096x1024")
        for d in ("forward", "backward")
    }
    for result in report["speed"]:
        assert result["reverified"], result
        assert "1.00x the baseline torch (eager)'s time (at most 0.50x" in result["message"]
        assert result["ratio"] == 1.0  # torch is its own baseline
    assert "## Speed" in (out / "report.md").read_text()


def test_bad_speed_flags_are_one_line_errors() -> None:
    from conformance.cli import main

    assert main(["certify", "--adapter", "torch", "--speed", "--min-fraction", "1.5"]) == 2
    assert main(["certify", "--adapter", "torch", "--speed", "--min-ratio", "-1"]) == 2


def test_pytest_speed_marker_selects_the_timings() -> None:
    argv = [sys.executable, "-m", "pytest", "conformance", "-p", "no:cacheprovider", "-q"]
    argv += ["--adapter", "torch", "--device", "cpu", "--quick", "--norm", "rms_norm"]
    argv += ["--dtype", "float32", "--speed", "-m", "speed", "--baseline", "none"]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode in (0, 1), out  # a pass, or a missed threshold: both are verdicts
    counts = dict(
        (word, int(n)) for n, word in re.findall(r"(\d+) (passed|failed|deselected)", out)
    )
    # rms_norm float32, quick: two shapes, forward and backward; every accuracy test deselected
    assert counts.get("passed", 0) + counts.get("failed", 0) == 4, out
    assert counts.get("deselected", 0) > 0, out
