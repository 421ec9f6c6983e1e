"""Unit tests of the diagnosis: which candidates count, and the defect signatures.

Each signature is checked on the zoo kernel it is meant to recognise, over several seeds (it
must not depend on one draw), and on outputs that fail for other reasons, where it must stay
silent. Candidates are checked through :func:`conformance.fingerprint.diagnose` with
hand-made candidates, so the rule itself is under test, not one convention.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conformance import bounds, fingerprint, metrics, signatures
from conformance.calls import call_adapter
from conformance.cases import Case, parse_case_id
from conformance.engine import certify, select_cases
from conformance.expected import Expected, compute
from conformance.inputs import CaseInputs, build_inputs
from conformance.specs import spec
from impls.loader import load_adapter

ZOO = Path(__file__).parent / "zoo"
SEEDS = (0, 1, 2, 3)


@dataclass
class Forward:
    """One forward call graded as the engine grades it."""

    inputs: CaseInputs
    convention: dict[str, Any]
    actual: np.ndarray
    exp: Expected
    model: bounds.CaseModel

    @property
    def reference(self) -> np.ndarray:
        return self.exp.values["output"]

    def bound_for(self, m: bounds.CaseModel) -> np.ndarray:
        return bounds.forward(m, self.reference)

    @property
    def bound(self) -> np.ndarray:
        return self.bound_for(self.model)

    def explain(self, actual: np.ndarray | None = None) -> str | None:
        a = self.actual if actual is None else actual
        kind = "nonfinite" if self.inputs.case.distribution == "nonfinite" else "forward"
        return signatures.explain(
            kind, "output", self.inputs, a, self.reference, self.bound, self.model
        )

    def diagnose(self, actual: np.ndarray | None = None) -> str:
        a = self.actual if actual is None else actual
        failed = metrics.compare(a, self.reference, self.bound, self.inputs.case.dtype)
        assert failed.mismatched, "the output under test must fail its check"
        return fingerprint.diagnose(
            "forward",
            "output",
            self.inputs,
            self.convention,
            a,
            self.exp,
            self.model,
            failed,
            self.bound_for,
        )

    def affine(self, x_hat: np.ndarray) -> np.ndarray:
        """``w·x̂ + b`` from rows, rounded into the case's dtype."""
        m = self.model
        return signatures.in_dtype(
            m.back(m.signed_scale * x_hat + m.signed_shift), self.inputs.case.dtype
        )


def forward(
    kernel: str | None,
    case: Case,
    inputs: CaseInputs | None = None,
    declared: Mapping[str, Any] | None = None,
) -> Forward:
    """Run ``kernel`` (a zoo file or adapter spec; None: no call, ``actual`` is the reference)
    on ``case`` under the ``declared`` convention (default PyTorch's)."""
    inputs = build_inputs(case) if inputs is None else inputs
    convention = spec(case.norm).convention(declared or {})
    exp = compute(inputs, convention, backward=False)  # no cache: inputs may be edited
    model = bounds.case_model(inputs, convention, exp.values, accumulation=None, reduction="tree")
    actual = exp.values["output"]
    if kernel is not None:
        path = ZOO / f"{kernel}.py"
        function = load_adapter(str(path) if path.exists() else kernel).functions[case.norm]
        actual = call_adapter(function, inputs, "cpu", grad=False).values["output"]
    return Forward(inputs, convention, actual, exp, model)


def quick_case(norm: str, dtype: str, distribution: str, seed: int = 0) -> Case:
    """The affine case of the quick battery for ``distribution``; for a distribution only the
    full battery has, an ``(8, 127)`` case of it with the seed ``seed``."""
    cases = select_cases(
        norms=[norm], dtypes=[dtype], quick=True, seed=seed, distributions=[distribution]
    )
    cases = [c for c in cases if c.affine]
    if cases:
        return cases[0]
    return parse_case_id(f"{norm}-{dtype}-8x127-{distribution}-s{seed}")


# -- E[x²] - E[x]² --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    ("dtype", "distribution"),
    [
        ("float32", "large_mean_k1e3"),
        ("float32", "large_mean_k1e5"),
        ("float64", "large_mean_k1e3"),
        ("float16", "large_mean_kmax"),
    ],
)
def test_cancellation_is_recognised_on_every_seed(seed: int, dtype: str, distribution: str) -> None:
    result = forward("naive_moments", quick_case("layer_norm", dtype, distribution, seed))
    text = result.diagnose()
    assert text.startswith(signatures.CANCELLATION), text


@pytest.mark.parametrize("seed", SEEDS)
def test_cancellation_envelope_holds_for_the_naive_kernel(seed: int) -> None:
    """Every row of a real E[x²] - E[x]² kernel, failing or not, has a variance error within
    ``cancellation_factor·u·E[x²]``: the envelope is an upper bound, not a fitted constant."""
    result = forward("naive_moments", quick_case("layer_norm", "float32", "large_mean_k1e3", seed))
    fits, delta, tau = signatures.implied_variance_error(result.actual, result.bound, result.model)
    m = result.model
    factor = signatures.cancellation_factor(m.grouping.n, m.reduction)
    envelope = factor * m.acc_unit * np.asarray(m.stats.rms) ** 2
    assert fits.all()
    assert (np.abs(delta) - tau <= envelope).all()


def test_a_scale_error_at_small_kappa_is_not_cancellation() -> None:
    """A 1% scale error on rows of κ ≈ 1 is far beyond what cancellation can do there."""
    result = forward(None, quick_case("layer_norm", "float32", "normal"))
    actual = result.affine(np.asarray(result.model.stats.x_hat) * 1.01)
    assert result.explain(actual) is None
    assert signatures.CANCELLATION not in result.diagnose(actual)


def test_a_wrong_mean_on_large_mean_rows_is_not_cancellation() -> None:
    """Cancellation leaves the mean alone; a shifted x̂ does not fit ``w·c·x̂ + b``."""
    result = forward(None, quick_case("layer_norm", "float32", "large_mean_k1e3"))
    actual = result.affine(np.asarray(result.model.stats.x_hat) + 0.05)
    assert result.explain(actual) is None


@pytest.mark.parametrize("distribution", ["large_mean_k1e3", "large_mean_kmax"])
def test_half_precision_arithmetic_is_not_cancellation(distribution: str) -> None:
    """The seed LayerNorm rounds every step to float16: its mean is off, so the row is not a
    pure scale error, and the diagnosis is the half-precision one."""
    case = quick_case("layer_norm", "float16", distribution)
    result = forward("handwritten", case, declared={"eps_placement": "outside"})
    text = result.diagnose()
    assert not text.startswith(signatures.CANCELLATION), text
    assert "rounded to float16" in text


# -- float16 overflow of the sum of squares -------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("norm", ["rms_norm", "layer_norm"])
def test_overflow_is_recognised_on_every_seed(norm: str, seed: int) -> None:
    result = forward("fp16_sum_of_squares", quick_case(norm, "float16", "overflow_squares", seed))
    text = result.diagnose()
    assert text.startswith(signatures.OVERFLOW), text


def _mixed_rows(norm: str) -> CaseInputs:
    """``overflow_squares`` rows, the first half scaled by 2**-12 (exact in float16) so that
    their sums of squares stay far inside float16's range."""
    inputs = build_inputs(quick_case(norm, "float16", "overflow_squares"))
    x = np.array(inputs.arrays["input"], dtype=np.float64)
    rows = x.reshape(-1, x.shape[-1])
    rows[: len(rows) // 2] *= 2.0**-12
    arrays = {**inputs.arrays, "input": rows.reshape(x.shape).astype(np.float16)}
    return replace(inputs, arrays=arrays)


def test_overflow_rows_are_those_whose_sum_of_squares_exceeds_float16() -> None:
    inputs = _mixed_rows("rms_norm")
    result = forward("fp16_sum_of_squares", inputs.case, inputs)
    [(must, may)] = signatures.float16_overflow_rows(result.model)  # RMS: Σx² only
    half = len(must) // 2
    assert not may[:half].any()
    assert must[half:].all()
    text = result.explain() or ""
    assert text.startswith(signatures.OVERFLOW), text
    assert f"none of the {half} rows whose sum stays in range" in text


def test_a_collapse_where_no_sum_can_overflow_is_not_overflow() -> None:
    """Rows returned as the bias where Σx² is small: some other defect, not float16 overflow."""
    inputs = _mixed_rows("layer_norm")
    result = forward(None, inputs.case, inputs)
    m = result.model
    rows = m.rows(result.reference)
    assert not any(may.all() for _, may in signatures.float16_overflow_rows(m))
    actual = signatures.in_dtype(m.back(np.broadcast_to(m.signed_shift, rows.shape)), "float16")
    assert result.explain(actual) is None


def test_an_overflow_row_that_did_not_collapse_is_not_overflow() -> None:
    """Every row whose sum must overflow has to collapse; one that kept its values rules the
    signature out (only some of the overflowing rows collapsed: something else)."""
    result = forward("fp16_sum_of_squares", quick_case("rms_norm", "float16", "overflow_squares"))
    m = result.model
    rows = m.rows(result.actual).copy()
    rows[0] = m.rows(result.reference)[0] * 1.5  # a failing row that did not collapse
    actual = signatures.in_dtype(m.back(rows), "float16")
    assert result.explain(actual) is None


# -- other signatures -----------------------------------------------------------------------------


def test_nan_swallowed_is_recognised() -> None:
    result = forward("nan_swallowed", quick_case("layer_norm", "float32", "nonfinite"))
    text = result.explain() or ""
    assert text.startswith("NaN swallowed"), text


def test_nan_gradient_on_zero_variance_rows_is_recognised() -> None:
    """√v + ε through autograd: d√v/dv at v = 0 on rows of one element."""
    cases = select_cases(case_ids=["layer_norm-float32-5x1-normal-s3"])
    record = certify(load_adapter(str(ZOO / "eps_outside.py")), cases)
    failed = [c for c in record.checks if c.verdict == "fail"]
    assert [c.output for c in failed] == ["grad_input"]
    assert "rows of zero variance" in (failed[0].diagnosis or "")


# -- which candidates count -----------------------------------------------------------------------


def _only(*made: fingerprint.Candidate) -> Callable[..., Iterator[fingerprint.Candidate]]:
    def candidates(*args: Any) -> Iterator[fingerprint.Candidate]:
        yield from made

    return candidates


def _given(values: Mapping[str, np.ndarray]) -> Callable[[], Mapping[str, np.ndarray]]:
    return lambda: values


@pytest.fixture
def graded(monkeypatch: pytest.MonkeyPatch) -> Forward:
    monkeypatch.setattr(fingerprint, "_MEMO", {})  # hand-made candidates must not be cached
    return forward(None, quick_case("layer_norm", "float32", "normal"))


def test_a_candidate_indistinguishable_from_the_declared_convention_is_not_reported(
    graded: Forward, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A candidate within tolerance of the declared reference explains nothing, even when the
    failing output happens to pass against it."""
    r, b = graded.reference, graded.bound
    actual = r + 1.5 * b  # fails the check everywhere
    close = fingerprint.Candidate("a close candidate", _given({"output": r + 0.9 * b}))
    monkeypatch.setattr(fingerprint, "candidates", _only(close))
    assert metrics.compare(actual, r + 0.9 * b, b, "float32").mismatched == 0
    assert "a close candidate" not in graded.diagnose(actual)


def test_a_distinguishable_candidate_that_the_output_passes_is_reported(
    graded: Forward, monkeypatch: pytest.MonkeyPatch
) -> None:
    r, b = graded.reference, graded.bound
    actual = r + 3.0 * b
    far = fingerprint.Candidate("a far candidate", _given({"output": r + 2.5 * b}))
    monkeypatch.setattr(fingerprint, "candidates", _only(far))
    assert graded.diagnose(actual).startswith("matches a far candidate")


def test_agreement_only_on_nan_is_weaker_than_a_finite_match(
    graded: Forward, monkeypatch: pytest.MonkeyPatch
) -> None:
    r, b = graded.reference, graded.bound
    actual = np.where(np.arange(r.size).reshape(r.shape) % 2 == 0, np.nan, r + 3.0 * b)
    nan_only = fingerprint.Candidate("a NaN candidate", _given({"output": np.full_like(r, np.nan)}))
    finite = fingerprint.Candidate("a finite candidate", _given({"output": actual}))
    monkeypatch.setattr(fingerprint, "candidates", _only(nan_only, finite))
    assert graded.diagnose(actual).startswith("matches a finite candidate")
    nan_actual = np.full_like(r, np.nan)
    monkeypatch.setattr(fingerprint, "candidates", _only(nan_only))
    text = graded.diagnose(nan_actual)
    assert text.startswith("NaN where the declared convention gives finite values"), text
    assert "a NaN candidate" in text
