"""The zoo: deliberately broken adapters that the suite must reject with the right diagnosis,
and correct implementations by other routes that it must pass.

Each zoo adapter (``tests/zoo/*.py``) is a plausible kernel with one known defect. Its
certification is restricted to the norms, dtypes and input distributions that expose the
defect; the test asserts the verdict, that the defect is named in the diagnosis of a failing
check, and on which kinds of check it shows (forward, backward, running_stats, nonfinite).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conformance.engine import certify, select_cases
from conformance.results import CheckResult, RunRecord
from impls.adapter import from_object
from impls.loader import load_adapter

ZOO = Path(__file__).parent / "zoo"


@dataclass(frozen=True)
class Broken:
    """A zoo adapter, where its defect shows, and the words that must name it."""

    name: str
    norms: tuple[str, ...]
    dtypes: tuple[str, ...]
    distributions: tuple[str, ...]
    phrase: str
    #: Kinds of check that must carry the phrase in a failing check's diagnosis.
    diagnosed: tuple[str, ...]
    #: Kinds of check allowed to fail at all (a defect in the backward leaves forward alone).
    failing: tuple[str, ...]
    #: Whether every failing check must carry the phrase.
    every: bool = True

    def __str__(self) -> str:
        return self.name


BROKEN = (
    Broken(
        "eps_outside",
        ("layer_norm",),
        ("float32",),
        ("near_eps", "normal"),
        "ε added to the standard deviation",
        ("forward", "backward"),
        ("forward", "backward"),
    ),
    Broken(
        "unbiased_variance",
        ("layer_norm",),
        ("float32",),
        ("normal",),
        "unbiased variance",
        ("forward", "backward"),
        ("forward", "backward"),
    ),
    Broken(
        "naive_moments",
        ("layer_norm",),
        ("float32",),
        ("large_mean_k1e3",),
        "E[x²] - E[x]²",
        ("forward",),
        ("forward", "backward"),
        every=False,  # autograd through the cancelled variance: no model of its gradient
    ),
    Broken(
        "missing_bias",
        ("layer_norm",),
        ("float32",),
        ("normal",),
        "bias ignored",
        ("forward",),
        ("forward", "backward"),
        every=False,  # grad_bias: "autograd gave no gradient", a contract-style failure
    ),
    Broken(
        "eps_ignored",
        ("layer_norm", "rms_norm"),
        ("float32",),
        ("near_eps",),
        "ε ignored",
        ("forward", "backward"),
        ("forward", "backward"),
    ),
    Broken(
        "wrong_groups",
        ("group_norm",),
        ("float32",),
        ("normal",),
        "wrong group boundaries",
        ("forward", "backward"),
        ("forward", "backward"),
    ),
    Broken(
        "biased_running_var",
        ("batch_norm",),
        ("float32",),
        ("normal",),
        "biased running variance",
        ("running_stats",),
        ("running_stats",),
    ),
    Broken(
        "fp16_sum_of_squares",
        ("rms_norm", "layer_norm"),
        ("float16",),
        ("overflow_squares",),
        "float16 overflow of the sum of squares",
        ("forward", "backward"),
        ("forward", "backward"),
    ),
    Broken(
        "backward_drops_term",
        ("layer_norm", "rms_norm"),
        ("float32",),
        ("normal",),
        "drops the gradient through the variance",
        ("backward",),
        ("backward",),
    ),
    Broken(
        "nan_swallowed",
        ("layer_norm",),
        ("float32",),
        ("nonfinite",),
        "NaN swallowed",
        ("nonfinite",),
        ("nonfinite",),
    ),
)


def run(
    spec: str,
    norms: Sequence[str],
    dtypes: Sequence[str],
    distributions: Sequence[str] | None = None,
    conventions: Mapping[str, Mapping[str, Any]] | None = None,
) -> RunRecord:
    # The value battery: these defects are of values; tests/test_geometry_zoo.py takes the
    # boundary battery's classes.
    cases = select_cases(
        norms=norms, dtypes=dtypes, quick=True, distributions=distributions, boundary=False
    )
    assert cases, f"no cases for {norms} x {dtypes} x {distributions}"
    return certify(load_adapter(spec), cases, device="cpu", conventions=conventions)


def failures(record: RunRecord) -> list[CheckResult]:
    return [c for c in record.checks if c.verdict == "fail"]


def listing(checks: Sequence[CheckResult]) -> str:
    return "\n".join(f"  {c.case_id} {c.kind} {c.output}: {c.diagnosis}" for c in checks)


@pytest.mark.parametrize("broken", BROKEN, ids=str)
def test_broken_adapter_is_rejected_with_its_diagnosis(broken: Broken) -> None:
    record = run(str(ZOO / f"{broken.name}.py"), broken.norms, broken.dtypes, broken.distributions)
    failed = failures(record)
    assert record.verdict == "fail", f"{broken.name} passed every check"
    shown = listing(failed)
    kinds = {c.kind for c in failed}
    assert kinds <= set(broken.failing), f"unexpected kinds of failure {kinds}:\n{shown}"
    for kind in broken.diagnosed:
        named = [c for c in failed if c.kind == kind and broken.phrase in (c.diagnosis or "")]
        assert named, f"no failing {kind} check diagnosed {broken.phrase!r}:\n{shown}"
    if broken.every:
        unnamed = [c for c in failed if broken.phrase not in (c.diagnosis or "")]
        assert not unnamed, f"failing checks not diagnosed {broken.phrase!r}:\n{listing(unnamed)}"


def test_naive_moments_pass_where_the_mean_is_small() -> None:
    """E[x²] - E[x]² is harmless at κ ≈ 1: the defect shows only on large-mean rows."""
    record = run(str(ZOO / "naive_moments.py"), ["layer_norm"], ["float32"], ["normal", "uniform"])
    assert record.verdict == "pass", listing(failures(record))


def test_float16_accumulation_without_overflow_is_not_called_overflow() -> None:
    """Rows whose sum of squares stays in range fail only by float16 rounding of the sum."""
    record = run(str(ZOO / "fp16_sum_of_squares.py"), ["rms_norm"], ["float16"], ["normal"])
    failed = failures(record)
    assert failed, "a float16 running sum of 127 squares should be visible"
    for check in failed:
        text = check.diagnosis or ""
        assert "overflow" not in text, listing([check])
        assert "rounded to float16" in text, listing([check])


@pytest.mark.parametrize(
    ("name", "norms", "dtypes"),
    [
        (
            "float64_once",
            ("layer_norm", "rms_norm", "group_norm"),
            ("float32", "float16", "bfloat16", "float64"),
        ),
        ("welford_fp32", ("layer_norm",), ("float32", "float16", "bfloat16")),
    ],
)
def test_correct_implementation_passes_every_check(
    name: str, norms: tuple[str, ...], dtypes: tuple[str, ...]
) -> None:
    record = run(str(ZOO / f"{name}.py"), norms, dtypes)
    assert record.checks
    assert record.verdict == "pass", listing(failures(record))
    assert all(c.verdict == "pass" for c in record.checks if c.verdict != "skip")


def test_handwritten_passes_with_its_declared_convention() -> None:
    """The seed LayerNorm in float32 and float64 (in half types it rounds every step to the
    half type, which the tolerance for float32 accumulation rejects: see below)."""
    record = run("handwritten", ["layer_norm"], ["float32", "float64"])
    assert record.verdict == "pass", listing(failures(record))


def test_handwritten_run_in_half_types_is_diagnosed_as_half_arithmetic() -> None:
    # The built-in declares float32 and float64 only; the same code on float16 inputs computes
    # every step in float16, which the diagnosis must name.
    import impls.handwritten as seed

    adapter = from_object(
        SimpleNamespace(layer_norm=seed.layer_norm, normconf_conventions=seed.normconf_conventions),
        "seed layer_norm on float16",
    )
    cases = select_cases(
        norms=["layer_norm"],
        dtypes=["float16"],
        quick=True,
        distributions=["normal", "uniform"],
        boundary=False,
    )
    failed = failures(certify(adapter, cases, device="cpu"))
    assert failed
    unnamed = [c for c in failed if "rounded to float16" not in (c.diagnosis or "")]
    assert not unnamed, listing(unnamed)


def test_handwritten_skips_the_half_types_it_does_not_declare() -> None:
    record = run("handwritten", ["layer_norm"], ["float16", "bfloat16"], ["normal"])
    assert record.checks
    assert {c.verdict for c in record.checks} == {"skip"}


def test_handwritten_against_pytorch_is_diagnosed_as_eps_outside() -> None:
    record = run("handwritten", ["layer_norm"], ["float32"], conventions={})
    failed = failures(record)
    assert record.verdict == "fail"
    assert {"forward", "backward"} <= {c.kind for c in failed}
    phrase = "ε added to the standard deviation"
    unnamed = [c for c in failed if phrase not in (c.diagnosis or "")]
    assert not unnamed, listing(unnamed)


def _zoo_module(name: str) -> Any:
    """A zoo file imported as a module, to reuse its functions under other declarations."""
    import importlib.util

    source = importlib.util.spec_from_file_location(f"zoo_{name}", ZOO / f"{name}.py")
    assert source is not None
    assert source.loader is not None
    module = importlib.util.module_from_spec(source)
    source.loader.exec_module(module)
    return module


def _contract_failures(record: RunRecord, *phrases: str) -> None:
    """Every contract check of ``record`` failed, naming each phrase."""
    contract = [c for c in record.checks if c.kind == "contract"]
    assert contract
    for check in contract:
        assert check.verdict == "fail"
        for phrase in phrases:
            assert phrase in check.message, check.message


def _determinism(record: RunRecord) -> list[CheckResult]:
    return [c for c in record.checks if c.kind == "determinism"]


def test_racy_weight_gradient_fails_the_determinism_check() -> None:
    """dW summed in an order that changes from call to call: every value is accurate, the bits
    are not reproducible, and the adapter claims (by default) that they are."""
    record = run(str(ZOO / "racy_weight_grad.py"), ["layer_norm"], ["float32"], ["normal"])
    failed = failures(record)
    assert failed, "a dW summed in a changing order passed the determinism check"
    assert {c.kind for c in failed} == {"determinism"}, listing(failed)
    differing = {
        name
        for check in failed
        for name in (check.message or "").split("different bits in ", 1)[1].split(", ")
    }
    assert differing <= {"grad_weight", "grad_bias"}, listing(failed)


def test_declared_nondeterministic_backward_is_reported_not_failed() -> None:
    racy = _zoo_module("racy_weight_grad")
    adapter = from_object(
        SimpleNamespace(layer_norm=racy.layer_norm, normconf_deterministic=False), "racy, declared"
    )
    cases = select_cases(norms=["layer_norm"], dtypes=["float32"], quick=True, boundary=False)
    record = certify(adapter, cases, device="cpu")
    assert record.verdict == "pass", listing(failures(record))
    reported = [c for c in _determinism(record) if "different bits" in (c.message or "")]
    assert reported, "the racy dW was not reported"
    assert all("declares itself nondeterministic" in (c.message or "") for c in reported)


def test_nondeterministic_forward_fails_even_when_declared() -> None:
    calls = iter(range(1_000_000))

    def drifting(
        x: Any, shape: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5
    ) -> Any:
        import torch.nn.functional as F

        out = F.layer_norm(x, shape, weight, bias, eps)
        # the last bit of one element flips on every other call: accurate, not reproducible
        if next(calls) % 2:
            flat = out.detach().view(-1)
            flat[0] = flat[0].nextafter(flat[0] + 1)
        return out

    adapter = from_object(
        SimpleNamespace(layer_norm=drifting, normconf_deterministic=False, normconf_backward=False),
        "drifting forward",
    )
    cases = select_cases(
        norms=["layer_norm"],
        dtypes=["float32"],
        quick=True,
        distributions=["normal"],
        boundary=False,
    )
    record = certify(adapter, cases, device="cpu")
    failed = failures(record)
    assert failed
    assert {c.kind for c in failed} == {"determinism"}, listing(failed)
    assert all("different bits in output" in (c.message or "") for c in failed)


def test_deterministic_builtins_pass_the_determinism_check() -> None:
    record = run("torch", ["layer_norm", "group_norm"], ["float32", "bfloat16"], ["normal"])
    checks = _determinism(record)
    assert checks
    assert all(c.verdict == "pass" for c in checks), listing(checks)


def test_an_output_written_over_its_input_fails_the_contract() -> None:
    record = run(str(ZOO / "aliased_output.py"), ["rms_norm"], ["float32"], ["normal"])
    _contract_failures(
        record,
        "output shares memory with its argument 'input'",
        "changed its argument 'input' in place",
    )


def test_a_declared_in_place_residual_passes_and_undeclared_fails() -> None:
    declared = run(str(ZOO / "inplace_residual.py"), ["fused_add_rms_norm"], ["float32"])
    assert declared.verdict == "pass", listing(failures(declared))

    module = _zoo_module("inplace_residual")
    undeclared = from_object(
        SimpleNamespace(
            fused_add_rms_norm=module.fused_add_rms_norm,
            normconf_backward=False,
            normconf_dtypes=("float32",),
        ),
        "in place, undeclared",
    )
    cases = select_cases(
        norms=["fused_add_rms_norm"], dtypes=["float32"], quick=True, boundary=False
    )
    _contract_failures(
        certify(undeclared, cases, device="cpu"),
        "residual_out shares memory with its argument 'residual'",
        "changed its argument 'residual' in place",
    )
