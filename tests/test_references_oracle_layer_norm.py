"""layer_norm and rms_norm of the references against the exact oracle, element for element.

The references promise the exact result for the exactly represented inputs, rounded once (to
nearest, ties to even) into the output dtype. ``tests/oracles.py`` computes that value with
integers and fractions only, so the comparison here is equality: no tolerance at all.

Every test takes a ``Case`` drawn by hypothesis (dtype, shape, values, conventions); the
``@example`` cases are the inputs that hurt: large mean with small spread, variance near eps,
float16 inputs whose squares overflow, subnormals, constant rows, n = 1 with the unbiased
estimator, NaN/Inf in a group, empty tensors, exact ties, cancelling biases. Separately,
``test_*_near_midpoint`` builds rows whose exact result lies within ~2**-60 (relative) of a
rounding midpoint of the output dtype, where a float64 fast path cannot decide the rounding.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from oracle_cases import (
    BACKENDS,
    SLOW,
    Case,
    arr,
    check_output,
    check_stats,
    expected_layer_norm,
    run_layer_norm,
    with_examples,
    with_shape,
)
from oracles import (
    FMT_NAMES,
    as_backend,
    assert_matches_oracle,
    group_moments,
    layer_norm,
    round_fraction,
    sqrt_bracket,
    ulp_of,
)
from reference_strategies import layer_norm_cases

import references as R

# ---------------------------------------------------------------------------------------------
# Adversarial rows (each dtype at its own edge)


def _large_mean_rows() -> list[Case]:
    """A mean near the top of the exact-integer range, spread of a few units."""
    return [
        Case("float32", arr([[2.0**23 + k for k in (0, 1, 2, 3)]]), label="f32-large-mean"),
        Case("float32", arr([[2.0**24 + 2 * k for k in (0, 1, 1, 5)]]), label="f32-2^24"),
        Case("float16", arr([[2048.0 + 2 * k for k in (0, 1, 2, 3)]]), label="f16-large-mean"),
        Case("float16", arr([[1024.0 + k for k in (0, 1, 2, 7)]]), label="f16-1024"),
        Case("bfloat16", arr([[256.0 + 2 * k for k in (0, 1, 2, 3)]]), label="bf16-large-mean"),
        Case("float64", arr([[2.0**52 + k for k in (0, 1, 2, 3)]]), label="f64-large-mean"),
        Case(
            "float32",
            arr([[2.0**23 + k for k in (0, 1, 2, 3)]]),
            eps=0.0,
            variance="unbiased",
            eps_placement="outside",
            label="f32-large-mean-eps0",
        ),
    ]


def _edge_rows() -> list[Case]:
    a = float(np.float32(1e-5**0.5))  # a**2 is within float32 rounding of eps = 1e-5
    tie_weight = arr([1 + 2.0**-24, 1 + 3 * 2.0**-24, 1 + 5 * 2.0**-24, -(1 + 2.0**-24)])
    return [
        Case("float32", arr([[-a, a], [-a, 2 * a]]), label="var-near-eps"),
        Case("float32", arr([[-a, a]]), eps_placement="outside", label="sigma-near-eps-outside"),
        Case("float16", arr([[300.0, -300.0, 500.0, 1000.0]]), label="f16-squares-overflow"),
        Case("float16", arr([[60000.0, -60000.0, 65504.0]]), label="f16-near-max"),
        Case("float32", arr([[1.0, 3.0, 0.0, 2.0]]) * 2.0**-149, eps=0.0, label="f32-subnormal0"),
        Case("float32", arr([[1.0, 3.0, 0.0, 2.0]]) * 2.0**-149, label="f32-subnormal"),
        Case("float64", arr([[5e-324, 1e-323, 0.0, 1.5e-323]]), eps=0.0, label="f64-subnormal"),
        Case("float16", arr([[2.0**-24, 3 * 2.0**-24, 0.0]]), eps=0.0, label="f16-subnormal"),
        Case("bfloat16", arr([[2.0**-133, 2.0**-132, 0.0]]), eps=0.0, label="bf16-subnormal"),
        Case(
            "float32",
            arr([[3.0] * 4, [-7.0] * 4]),
            weight=arr([2.0, -1.0, 0.5, 3.0]),
            bias=arr([1.0, 2.0, 3.0, 4.0]),
            label="constant-rows-give-bias",
        ),
        Case("float32", arr([[3.0] * 4]), eps=0.0, label="constant-row-eps0-nan"),
        Case("float64", arr([[3.0] * 3]), eps=0.0, eps_placement="outside", label="const-out-0"),
        Case("float32", arr([[1.0], [2.0], [-3.0]]), variance="unbiased", label="n1-unbiased"),
        Case("float32", arr([[1.0], [2.0]]), label="n1-biased"),
        Case(
            "float32",
            arr([[1.0, math.nan, 2.0], [math.inf, 1.0, 0.0], [1.0, 2.0, 4.0], [-math.inf] * 3]),
            label="nan-inf-groups",
        ),
        Case("float32", np.zeros((0, 4)), label="empty-batch"),
        Case("bfloat16", np.zeros((2, 0, 3)), label="empty-middle"),
        Case(
            "float64",
            arr([[-1.0, 1.0, 1.0, -1.0]]),
            weight=tie_weight,
            eps=0.0,
            out_fmt="float32",
            label="f64-to-f32-exact-ties",
        ),
        Case(
            "float32",
            arr([[1.0, 2.0, 3.0, 4.0]]),
            weight=arr([2.0, 2.0, 2.0, 2.0]),
            weight_offset=1.0,
            label="gemma-offset",
        ),
    ]


def _cancelling_bias_row(fmt: str) -> Case:
    """bias_i = -(y_i rounded): the output is y_i's own rounding error, far below y_i."""
    x = arr([[0.0, 1.0, 2.0, 3.0, 5.0]])
    plain = layer_norm(x, (5,), fmt=fmt)
    bias = -plain.output[0]
    return Case(fmt, x, weight=np.ones(5), bias=bias, label=f"{fmt}-cancelling-bias")


ADVERSARIAL_LAYER_NORM = (
    _large_mean_rows() + _edge_rows() + [_cancelling_bias_row(f) for f in FMT_NAMES]
)


# ---------------------------------------------------------------------------------------------
# layer_norm and rms_norm


@pytest.mark.parametrize("backend", BACKENDS)
@SLOW
@given(case=layer_norm_cases(), return_stats=st.booleans())
@with_examples([with_shape(c) for c in ADVERSARIAL_LAYER_NORM], return_stats=True)
def test_layer_norm_matches_oracle(backend: str, case: Case, return_stats: bool) -> None:
    result = run_layer_norm(case, backend, return_stats=return_stats)
    expected = expected_layer_norm(case)
    check_output(result.output if return_stats else result, expected.output, case, backend)
    if return_stats:
        check_stats(result, expected, case, backend, centered=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("x", "variance", "eps", "mean", "rstd"),
    [
        pytest.param([[1.0], [-3.0]], "unbiased", 1e-5, [1.0, -3.0], math.nan, id="n1-unbiased"),
        pytest.param([[2.0, 2.0]], "biased", 0.0, [2.0], math.inf, id="constant-eps0"),
        pytest.param([[2.0, 2.0]], "unbiased", 0.0, [2.0], math.inf, id="constant-eps0-unbiased"),
    ],
)
def test_stats_of_degenerate_groups(backend, x, variance, eps, mean, rstd) -> None:
    """The mean of a group is its exact mean whatever the variance does.

    rstd = 1/sqrt(var + eps): NaN when the unbiased variance of one element is 0/0, +inf when
    var + eps = 0 (1/0). The API fixes the normalised output in these cases (NaN) but not the
    statistics; these are the values of the formulas it states.
    """
    values = arr(x)
    case = Case("float32", values, eps=eps, variance=variance, extra={"normalized_shape": (-1,)})
    result = R.layer_norm(
        as_backend(values, "float32", backend),
        values.shape[-1:],
        None,
        None,
        eps,
        variance=variance,
        return_stats=True,
    )
    rows = values.shape[0]
    check = {"fmt": "float32", "backend": backend, "context": case.describe()}
    assert_matches_oracle(result.mean, arr(mean, (rows, 1)), what="mean", **check)
    assert_matches_oracle(result.rstd, np.full((rows, 1), rstd), what="rstd", **check)
    assert_matches_oracle(result.output, np.full(values.shape, math.nan), what="output", **check)


RMS_EXAMPLES = [
    with_shape(replace(c, eps=None if c.eps == 1e-5 else c.eps, bias=None))
    for c in ADVERSARIAL_LAYER_NORM
    if "cancelling" not in c.label
] + [
    with_shape(Case("float16", arr([[300.0, 400.0, 60000.0]]), eps=None, label="f16-rms-ovf")),
    with_shape(Case("float32", arr([[0.0, 0.0]]), eps=0.0, label="zero-row-eps0-nan")),
    with_shape(Case("float64", arr([[0.0, 0.0]]), eps=None, label="zero-row-default-eps")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@SLOW
@given(case=layer_norm_cases(rms=True), return_stats=st.booleans())
@with_examples(RMS_EXAMPLES, return_stats=True)
def test_rms_norm_matches_oracle(backend: str, case: Case, return_stats: bool) -> None:
    result = run_layer_norm(case, backend, return_stats=return_stats, rms=True)
    expected = expected_layer_norm(case, rms=True)
    check_output(result.output if return_stats else result, expected.output, case, backend)
    if return_stats:
        check_stats(result, expected, case, backend, centered=False)


# ---------------------------------------------------------------------------------------------
# Rows whose exact result is next to a rounding midpoint of the output dtype


def near_midpoint_eps(xs, index: int, out_fmt: str, *, center: bool, unbiased: bool, outside: bool):
    """An eps (binary64) putting y = dev / sqrt(var + eps) (or dev / (sigma + eps)) on a midpoint.

    Aim at a midpoint M of ``out_fmt`` just below dev/sigma and solve for eps; rounding eps into
    binary64 moves the denominator by at most 2**-53 * eps, that is ~2**-54 * eps/var relative
    in y: with eps ~ 2**-20 var, y sits within ~2**-70 (relative) of M.
    """
    q = [Fraction(v) for v in xs]
    mu, var = group_moments(q, center=center, unbiased=unbiased)
    dev = q[index] - mu
    sigma, _ = sqrt_bracket(var, 400)
    cap = dev / sigma
    t = Fraction(round_fraction(cap * (1 - Fraction(1, 2**21)), out_fmt))
    u = Fraction(ulp_of(float(t), out_fmt))
    midpoint = max(m for m in (t - 3 * u / 2, t - u / 2, t + u / 2) if m < cap * (1 - 2**-30))
    exact_eps = dev**2 / midpoint**2 - var if not outside else dev / midpoint - sigma
    return round_fraction(exact_eps, "float64"), midpoint


def midpoint_cases() -> list:
    """LayerNorm/RMSNorm rows (every dtype, placement, estimator), one y next to a midpoint."""
    params = []
    formats = [*((f, None) for f in FMT_NAMES), ("float64", "float32")]
    placements, estimators = ("inside", "outside"), ("biased", "unbiased")
    xs = [0.0, 1.0, 2.0, 3.0, 5.0]
    for (fmt, out_fmt), rms, placement, variance in itertools.product(
        formats, (False, True), placements, estimators
    ):
        eps, _ = near_midpoint_eps(
            xs,
            4,
            out_fmt or fmt,
            center=not rms,
            unbiased=variance == "unbiased",
            outside=placement == "outside",
        )
        case = Case(
            fmt,
            arr([xs, [4.0, -1.0, 2.0, 0.5, 3.0]]),
            eps=eps,
            variance=variance,
            eps_placement=placement,
            out_fmt=out_fmt,
            extra={"normalized_shape": (5,)},
        )
        norm = "rms" if rms else "ln"
        name = f"{norm}-{fmt}-to-{out_fmt or fmt}-{placement}-{variance}"
        params.append(pytest.param(case, rms, id=name))
    return params


MIDPOINT_CASES = midpoint_cases()


@pytest.mark.parametrize(("case", "rms"), MIDPOINT_CASES)
def test_near_midpoint_rows_sit_on_midpoints(case: Case, rms: bool) -> None:
    """The construction works: the exact y[0, 4] is within 2**-60 relative of a midpoint."""
    q = [Fraction(v) for v in case.x[0]]
    unbiased = case.variance == "unbiased"
    mu, var = group_moments(q, center=not rms, unbiased=unbiased)
    eps = Fraction(case.eps)
    _, midpoint = near_midpoint_eps(
        case.x[0],
        4,
        case.result_fmt,
        center=not rms,
        unbiased=unbiased,
        outside=case.eps_placement == "outside",
    )
    lo, hi = sqrt_bracket(var + eps if case.eps_placement == "inside" else var, 400)
    if case.eps_placement == "outside":
        lo, hi = lo + eps, hi + eps
    y_hi, y_lo = (q[4] - mu) / lo, (q[4] - mu) / hi
    distance = max(abs(y_hi - midpoint), abs(y_lo - midpoint)) / midpoint
    assert distance < Fraction(1, 2**60), f"only {float(distance):.3g} from the midpoint"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("case", "rms"), MIDPOINT_CASES)
def test_norm_near_midpoint_matches_oracle(backend: str, case: Case, rms: bool) -> None:
    result = run_layer_norm(case, backend, return_stats=False, rms=rms)
    check_output(result, expected_layer_norm(case, rms=rms).output, case, backend)
