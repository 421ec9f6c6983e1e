"""Failure messages and reproduction commands (conformance.messages)."""

from __future__ import annotations

import dataclasses
import math
import shlex
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from conformance.messages import (
    failure_message,
    first_line,
    format_value,
    reproduction_command,
    visible,
)
from conformance.results import CheckResult, Metrics

# A float32 value and its float64 image: the message must show it with float32's digits.
ACTUAL32 = float(np.float32(0.51234))
DESIRED32 = float(np.float32(0.5111))


def make_metrics(**changes: Any) -> Metrics:
    base = Metrics(
        n=4096,
        mismatched=3,
        max_ulp=24.0,
        p50_ulp=0.0,
        p99_ulp=3.0,
        frac_correctly_rounded=0.412,
        frac_faithful=0.93,
        max_abs_error=1.2e-3,
        max_abs_index=(17, 4001),
        max_rel_error=2.5e-3,
        max_rel_index=(3, 9),
        max_ratio=3.1,
        worst_index=(17, 4001),
        worst_actual=ACTUAL32,
        worst_reference=DESIRED32,
        worst_ulp=24.0,
        worst_tolerance_ulp=7.7,
    )
    return dataclasses.replace(base, **changes)


def make_check(**changes: Any) -> CheckResult:
    base = CheckResult(
        case_id="layer_norm-float32-17x4096-large_mean",
        norm="layer_norm",
        dtype="float32",
        kind="forward",
        output="output",
        shape=(17, 4096),
        distribution="large_mean",
        layout="contiguous",
        seed=7,
        verdict="fail",
        grade="fail",
        metrics=make_metrics(),
        diagnosis="matches E[x^2] - E[x]^2 variance (catastrophic cancellation)",
        reproduce="normconf certify --adapter torch --case c --seed 7",
    )
    return dataclasses.replace(base, **changes)


def test_reproduction_command_shape() -> None:
    command = reproduction_command("rms_norm-bfloat16-4x64-randn", "torch", 3, ["--quick"])
    assert shlex.split(command) == [
        "normconf",
        "certify",
        "--adapter",
        "torch",
        "--case",
        "rms_norm-bfloat16-4x64-randn",
        "--seed",
        "3",
        "--quick",
    ]


@given(
    spec=st.text(st.characters(codec="utf-8", exclude_characters="\x00")),
    case_id=st.text(st.characters(codec="utf-8", exclude_characters="\x00")),
    seed=st.integers(0, 2**63),
)
@example(spec="my dir/adapter.py:Impl", case_id="c", seed=0)
@example(spec="x; rm -rf ~ `id` $(id) 'q\"", case_id="a b", seed=1)
def test_reproduction_command_survives_the_shell(spec: str, case_id: str, seed: int) -> None:
    argv = shlex.split(reproduction_command(case_id, spec, seed, []))
    assert argv == [
        "normconf",
        "certify",
        "--adapter",
        spec,
        "--case",
        case_id,
        "--seed",
        str(seed),
    ]


def test_metrics_lines_in_numpy_testing_shape() -> None:
    lines = failure_message(make_check()).splitlines()
    assert lines[0] == "Mismatched elements: 3 / 4096 (0.07%)"
    assert lines[1] == "Max abs error: 1.20e-03 at index (17, 4001)"
    assert lines[2] == "Max rel error: 2.50e-03 at index (3, 9)"
    assert lines[3] == "Worst element (ratio 3.1 to tolerance) at (17, 4001):"
    assert lines[4] == "  ACTUAL 0.51234 DESIRED 0.5111 (24 ulp; tolerance 7.7 ulp)"
    assert lines[5] == "Grade: fail; 41.2% correctly rounded, 93.0% faithful; max 24 ulp, p99 3 ulp"
    assert lines[6].startswith("Diagnosis: matches E[x^2] - E[x]^2")
    assert lines[7] == "Reproduce: normconf certify --adapter torch --case c --seed 7"
    assert len(lines) == 8


def test_reproduction_can_be_left_out() -> None:
    text = failure_message(make_check(), include_reproduction=False)
    assert "Reproduce:" not in text
    assert "Diagnosis:" in text


def test_no_reproduce_line_without_a_command() -> None:
    assert "Reproduce:" not in failure_message(make_check(reproduce=""))


def test_nonfinite_mismatches_are_reported() -> None:
    metrics = make_metrics(worst_actual=math.nan, nonfinite_mismatches=2, max_ulp=math.inf)
    text = failure_message(make_check(metrics=metrics))
    assert "Non-finite mismatches: 2 / 4096" in text
    assert "ACTUAL nan DESIRED 0.5111" in text
    assert "max inf ulp" in text


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param({"frac_correctly_rounded": 0.99999}, ">99.9% correctly rounded", id="not-100"),
        pytest.param({"frac_faithful": 1e-6}, "<0.1% faithful", id="not-0"),
        pytest.param({"frac_faithful": 1.0}, "100.0% faithful", id="all"),
        pytest.param({"frac_correctly_rounded": 0.0}, "0.0% correctly rounded", id="none"),
    ],
)
def test_percentages_never_round_to_all_or_none(changes: dict[str, float], expected: str) -> None:
    assert expected in failure_message(make_check(metrics=make_metrics(**changes)))


def test_one_mismatch_in_a_million_is_not_zero_percent() -> None:
    metrics = make_metrics(n=10**6, mismatched=1)
    assert first_line(make_check(metrics=metrics)) == "Mismatched elements: 1 / 1000000 (<0.01%)"


def test_check_without_metrics_shows_its_message() -> None:
    check = make_check(
        kind="contract",
        output="call",
        grade=None,
        metrics=None,
        message="RuntimeError: expected dtype float32, got float16\n  at kernel.py:12",
        diagnosis=None,
    )
    text = failure_message(check)
    assert text.splitlines()[:2] == [
        "RuntimeError: expected dtype float32, got float16",
        "  at kernel.py:12",
    ]
    assert "Mismatched" not in text
    assert "Diagnosis" not in text
    assert first_line(check) == "RuntimeError: expected dtype float32, got float16"


def test_check_without_metrics_or_message_still_says_something() -> None:
    check = make_check(kind="contract", output="call", metrics=None, message="", diagnosis=None)
    assert first_line(check) == "contract check of call: fail"


def test_control_characters_are_made_visible() -> None:
    check = make_check(
        metrics=None,
        message="boom\x1b[2J\r\nnext\u202eline",
        diagnosis="bell\x07",
    )
    text = failure_message(check)
    assert "\x1b" not in text
    assert "\u202e" not in text
    assert "\x07" not in text
    assert "\r" not in text
    assert text.splitlines()[:2] == ["boom\\x1b[2J", "next\\u202eline"]
    assert "Diagnosis: bell\\x07" in text


def test_visible_keeps_ordinary_text() -> None:
    text = "LayerNorm: ε = 1e-5, tab\there\nnew line, ünïcode"
    assert visible(text) == text


_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


@given(
    dtype=st.sampled_from(sorted(_DTYPES)),
    value=st.floats(allow_nan=False, allow_infinity=False, width=32),
)
@example(dtype="float32", value=1e-45)  # smallest subnormal
@example(dtype="float16", value=65504.0)  # largest finite
@example(dtype="bfloat16", value=-0.0)
def test_format_value_identifies_the_value_in_its_dtype(dtype: str, value: float) -> None:
    with np.errstate(over="ignore"):  # float32 values beyond float16's range become inf
        exact = float(np.asarray(value).astype(_DTYPES[dtype]))
    if not math.isfinite(exact):
        return
    text = format_value(exact, dtype)
    assert float(np.asarray(float(text)).astype(_DTYPES[dtype])) == exact
    assert math.copysign(1.0, float(text)) == math.copysign(1.0, exact)


def test_format_value_falls_back_for_values_outside_the_dtype() -> None:
    value = 0.1  # not a float32
    assert float(format_value(value, "float32")) == value
    assert float(format_value(value, "not_a_dtype")) == value
