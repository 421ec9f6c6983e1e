"""The references' forward results against the exact oracle, element for element.

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
from dataclasses import dataclass, field, replace
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from oracles import (
    FMT_NAMES,
    add_scaled,
    add_scaled_exact,
    as_backend,
    assert_matches_oracle,
    batch_norm_eval,
    batch_norm_training,
    batch_statistics,
    group_moments,
    group_norm,
    instance_norm,
    layer_norm,
    normalize_exact_rows,
    numpy_dtype,
    round_fraction,
    running_stat_update,
    sqrt_bracket,
    torch_dtype,
    ulp_of,
)

import references as R

BACKENDS = ["torch", "numpy"]
SIXTEEN_BIT = ("float16", "bfloat16")
#: eps=None in rms_norm is the epsilon of the opmath type (float32 for 16-bit inputs).
OPMATH_EPS = {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-23, "bfloat16": 2.0**-23}
#: Largest magnitude drawn per dtype: float16 reaches past 256 so that squares overflow float16.
MAX_ABS = {"float64": 1e6, "float32": 1e6, "float16": 1000.0, "bfloat16": 1e6}
FLOAT_WIDTH = {"float64": 64, "float32": 32, "float16": 16, "bfloat16": 32}
SLOW = settings(deadline=None)  # the oracle is exact rational arithmetic: no per-example deadline


# ---------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    """One call of a forward function: inputs as float64 arrays of exact ``fmt`` values."""

    fmt: str
    x: np.ndarray
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    eps: float | None = 1e-5
    variance: str = "biased"
    eps_placement: str = "inside"
    weight_offset: float = 0.0
    out_fmt: str | None = None
    out_spelling: str = "str"  # how out_dtype is passed: "str", "torch" or "numpy"
    extra: dict = field(default_factory=dict)  # norm-specific arguments
    label: str = ""

    @property
    def result_fmt(self) -> str:
        return self.out_fmt or self.fmt

    @property
    def stats_fmt(self) -> str:
        return "float32" if self.fmt in SIXTEEN_BIT else self.fmt

    def eps_value(self) -> float:
        return OPMATH_EPS[self.fmt] if self.eps is None else self.eps

    def out_dtype(self):
        if self.out_fmt is None or self.out_spelling == "str":
            return self.out_fmt
        if self.out_spelling == "torch":
            return torch_dtype(self.out_fmt)
        return numpy_dtype(self.out_fmt)

    def keywords(self) -> dict:
        """The convention keywords shared by every norm."""
        return {
            "variance": self.variance,
            "eps_placement": self.eps_placement,
            "weight_offset": self.weight_offset,
            "out_dtype": self.out_dtype(),
        }

    def oracle_conventions(self) -> dict:
        return {
            "variance": self.variance,
            "eps_placement": self.eps_placement,
            "weight_offset": self.weight_offset,
            "fmt": self.result_fmt,
            "stats_fmt": self.stats_fmt,
        }

    def describe(self) -> str:
        """A copy-pasteable reproduction of the inputs."""
        arrays = {"x": self.x, "weight": self.weight, "bias": self.bias}
        arrays |= {k: v for k, v in self.extra.items() if isinstance(v, np.ndarray)}
        lines = [
            f"case {self.label or '(drawn)'}: dtype={self.fmt} eps={self.eps!r} "
            f"variance={self.variance!r} eps_placement={self.eps_placement!r} "
            f"weight_offset={self.weight_offset!r} out_dtype={self.out_fmt!r}"
        ]
        lines += [f"  {k}={v!r}" for k, v in self.extra.items() if not isinstance(v, np.ndarray)]
        lines += [
            f"  {k} = np.array({v.tolist()!r}).reshape({v.shape})"
            for k, v in arrays.items()
            if v is not None
        ]
        return "\n".join(lines)


def arr(values, shape=None) -> np.ndarray:
    a = np.array(values, dtype=np.float64)
    return a if shape is None else a.reshape(shape)


def element_values(fmt: str, max_abs: float | None = None) -> st.SearchStrategy[float]:
    """Finite values of ``fmt`` (floats of every magnitude, subnormals included, or small ints)."""
    limit = MAX_ABS[fmt] if max_abs is None else max_abs
    floats = st.floats(-limit, limit, width=FLOAT_WIDTH[fmt])
    if fmt == "bfloat16":
        floats = floats.map(lambda v: round_fraction(Fraction(v), "bfloat16"))
    return st.one_of(floats, st.integers(-6, 6).map(float))


def arrays_in(fmt: str, shape: tuple[int, ...], max_abs: float | None = None):
    n = math.prod(shape)
    values = st.lists(element_values(fmt, max_abs), min_size=n, max_size=n)
    return values.map(lambda v: arr(v, shape))


eps_values = st.one_of(
    st.sampled_from([1e-5, 1e-6, 0.0, 1e-2, 1.0, 2.0**-40]), st.floats(0, 1, exclude_min=True)
)


@st.composite
def conventions(draw, *, offset: bool) -> dict:
    """The convention keywords and the output dtype (and how out_dtype is spelled)."""
    out_fmt = draw(st.one_of(st.none(), st.sampled_from(FMT_NAMES)))
    return {
        "variance": draw(st.sampled_from(["biased", "unbiased"])),
        "eps_placement": draw(st.sampled_from(["inside", "outside"])),
        "weight_offset": draw(st.sampled_from([0.0, 1.0])) if offset else 0.0,
        "out_fmt": out_fmt,
        "out_spelling": draw(st.sampled_from(["str", "torch", "numpy"])),
    }


@st.composite
def layer_norm_cases(draw, *, rms: bool = False, residual: bool = False) -> Case:
    fmt = draw(st.sampled_from(FMT_NAMES))
    normalized_shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    batch_shape = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    x = draw(arrays_in(fmt, batch_shape + normalized_shape))
    weight = bias = None
    if draw(st.booleans()):
        weight = draw(arrays_in(fmt, normalized_shape, max_abs=100.0))
        if not rms and draw(st.booleans()):
            bias = draw(arrays_in(fmt, normalized_shape, max_abs=100.0))
    eps = draw(st.one_of(st.none(), eps_values) if rms else eps_values)
    conv = draw(conventions(offset=weight is not None))
    extra: dict = {"normalized_shape": normalized_shape}
    if residual:
        extra["other"] = draw(arrays_in(fmt, x.shape))
        extra["alpha"] = draw(st.sampled_from([1.0, 0.5, 2.0, 1 / 3, 8**0.25]))
        extra["add_rounding"] = draw(st.sampled_from(["dtype", "exact"]))
    return Case(fmt, x, weight, bias, eps, extra=extra, **conv)


@st.composite
def channel_cases(draw, *, kind: str) -> Case:
    """(N, C, *spatial) inputs for group_norm, batch_norm and instance_norm."""
    fmt = draw(st.sampled_from(FMT_NAMES))
    groups = draw(st.integers(1, 3)) if kind == "group" else 1
    channels = groups * draw(st.integers(1, 2)) if kind == "group" else draw(st.integers(1, 3))
    spatial = tuple(
        draw(st.lists(st.integers(1, 3), min_size=1 if kind == "instance" else 0, max_size=2))
    )
    shape = (draw(st.integers(1, 3)), channels, *spatial)
    x = draw(arrays_in(fmt, shape))
    weight = bias = None
    if draw(st.booleans()):
        weight = draw(arrays_in(fmt, (channels,), max_abs=100.0))
        bias = draw(arrays_in(fmt, (channels,), max_abs=100.0))
    conv = draw(conventions(offset=weight is not None))
    extra: dict = {"num_groups": groups} if kind == "group" else {}
    return Case(fmt, x, weight, bias, draw(eps_values), extra=extra, **conv)


# ---------------------------------------------------------------------------------------------
# Checking one call


def check_output(actual, expected, case: Case, backend: str, what: str = "output") -> None:
    __tracebackhide__ = True
    assert_matches_oracle(
        actual,
        expected,
        fmt=case.result_fmt,
        backend=backend,
        what=what,
        context=case.describe(),
    )


def check_stats(result, expected, case: Case, backend: str, *, centered: bool) -> None:
    """Mean and rstd, rounded into the stats dtype, of the groups where both are finite numbers.

    Groups with NaN/Inf inputs have no defined statistics; groups with an undefined variance
    (n = 1, unbiased) or a zero denominator are checked by ``test_stats_of_degenerate_groups``.
    """
    __tracebackhide__ = True
    assert hasattr(result, "rstd"), f"return_stats=True returned {type(result).__name__}"
    stats = [("rstd", result.rstd, expected.rstd)]
    if centered:
        stats.append(("mean", result.mean, expected.mean))
    else:
        assert result.mean is None, "RMS norms have no mean: NormOutput.mean must be None"
    mask = expected.finite & np.isfinite(expected.rstd)
    for name, got, want in stats:
        assert tuple(got.shape) == mask.shape, f"{name} shape {tuple(got.shape)} != {mask.shape}"
        got = got[torch.from_numpy(mask)] if backend == "torch" else np.asarray(got)[mask]
        assert_matches_oracle(
            got,
            want[mask],
            fmt=case.stats_fmt,
            backend=backend,
            what=name,
            context=case.describe(),
        )


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


def with_examples(cases, **fixed):
    """Decorate a hypothesis test with ``@example(case=c, **fixed)`` for each case."""

    def decorate(test):
        for c in reversed(cases):
            test = example(case=c, **fixed)(test)
        return test

    return decorate


def with_shape(case: Case, **extra) -> Case:
    return replace(case, extra={"normalized_shape": case.x.shape[-1:], **extra})


# ---------------------------------------------------------------------------------------------
# layer_norm and rms_norm


def run_layer_norm(case: Case, backend: str, *, return_stats: bool, rms: bool = False):
    fn = R.rms_norm if rms else R.layer_norm
    args = [as_backend(case.x, case.fmt, backend), case.extra["normalized_shape"]]
    args.append(as_backend(case.weight, case.fmt, backend))
    if not rms:
        args.append(as_backend(case.bias, case.fmt, backend))
    return fn(*args, case.eps, **case.keywords(), return_stats=return_stats)


def expected_layer_norm(case: Case, *, rms: bool = False):
    return layer_norm(
        case.x,
        case.extra["normalized_shape"],
        case.weight,
        None if rms else case.bias,
        case.eps_value(),
        center=not rms,
        **case.oracle_conventions(),
    )


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


# ---------------------------------------------------------------------------------------------
# group_norm, instance_norm, batch_norm


def _channel_args(case: Case, backend: str):
    return (
        as_backend(case.weight, case.fmt, backend),
        as_backend(case.bias, case.fmt, backend),
    )


GROUP_EXAMPLES = [
    Case(
        "float32",
        arr([2.0**23 + k for k in range(8)], (1, 4, 2)),
        extra={"num_groups": 2},
        label="gn-large-mean",
    ),
    Case(
        "float16",
        arr([300.0, -300.0, 1.0, 2.0, 500.0, 1000.0], (1, 6)),
        weight=arr([1.0, 2.0, 3.0, -1.0, 0.5, 0.25]),
        bias=arr([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
        extra={"num_groups": 3},
        label="gn-f16-overflow",
    ),
    Case(
        "float32",
        arr([1.0, math.nan, 2.0, 3.0, 4.0, 4.0, 4.0, 4.0], (2, 2, 2)),
        eps=0.0,
        extra={"num_groups": 2},
        label="gn-nan-and-constant",
    ),
    Case("float64", np.zeros((0, 4, 3)), extra={"num_groups": 2}, label="gn-empty"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@SLOW
@given(case=channel_cases(kind="group"), return_stats=st.booleans())
@with_examples(GROUP_EXAMPLES, return_stats=True)
def test_group_norm_matches_oracle(backend: str, case: Case, return_stats: bool) -> None:
    x = as_backend(case.x, case.fmt, backend)
    groups = case.extra["num_groups"]
    result = R.group_norm(
        x,
        groups,
        *_channel_args(case, backend),
        case.eps,
        **case.keywords(),
        return_stats=return_stats,
    )
    expected = group_norm(
        case.x, groups, case.weight, case.bias, case.eps, **case.oracle_conventions()
    )
    check_output(result.output if return_stats else result, expected.output, case, backend)
    if return_stats:
        check_stats(result, expected, case, backend, centered=True)


INSTANCE_EXAMPLES = [
    Case("float32", arr([2.0**23 + k for k in range(8)], (2, 1, 4)), label="in-large-mean"),
    Case("float32", arr([5.0, 5.0, 1.0, 2.0], (1, 2, 2)), eps=0.0, label="in-constant-eps0"),
    Case("float16", arr([300.0, 400.0, -500.0, 0.0], (1, 1, 2, 2)), label="in-f16-overflow"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@SLOW
@given(case=channel_cases(kind="instance"), return_stats=st.booleans())
@with_examples(INSTANCE_EXAMPLES, return_stats=True)
def test_instance_norm_matches_oracle(backend: str, case: Case, return_stats: bool) -> None:
    x = as_backend(case.x, case.fmt, backend)
    w, b = _channel_args(case, backend)
    result = R.instance_norm(
        x, None, None, w, b, True, 0.1, case.eps, **case.keywords(), return_stats=return_stats
    )
    expected = instance_norm(case.x, case.weight, case.bias, case.eps, **case.oracle_conventions())
    check_output(result.output if return_stats else result, expected.output, case, backend)
    if return_stats:
        check_stats(result, expected, case, backend, centered=True)


@st.composite
def running_stat_options(draw, case: Case) -> dict:
    """Running statistics and the update conventions for a batch_norm training call."""
    channels = case.x.shape[1]
    running_fmt = draw(st.sampled_from([case.fmt, "float32"]))
    momentum = draw(st.sampled_from([0.1, 0.5, 1 / 3, 0.0, 1.0, None]))
    return {
        "running_fmt": running_fmt,
        "running_mean": draw(arrays_in(running_fmt, (channels,), max_abs=100.0)),
        "running_var": np.abs(draw(arrays_in(running_fmt, (channels,), max_abs=100.0))),
        "momentum": momentum,
        "num_batches_tracked": draw(st.integers(1, 7)) if momentum is None else None,
        "running_variance": draw(st.sampled_from(["unbiased", "biased"])),
        "momentum_weights": draw(st.sampled_from(["new", "running"])),
    }


@st.composite
def batch_norm_training_cases(draw) -> Case:
    case = draw(channel_cases(kind="batch"))
    per_channel = case.x.size // case.x.shape[1]
    if per_channel >= 2 and draw(st.booleans()):
        case.extra.update(draw(running_stat_options(case)))
    return case


BATCH_EXAMPLES = [
    Case(
        "float32",
        arr([2.0**23 + k for k in (0, 1, 2, 3, 5, 8)], (3, 2)),
        extra={
            "running_fmt": "float32",
            "running_mean": arr([2.0**23, 0.0]),
            "running_var": arr([1.0, 0.0]),
            "momentum": 0.1,
            "num_batches_tracked": None,
            "running_variance": "unbiased",
            "momentum_weights": "new",
        },
        label="bn-large-mean",
    ),
    Case(
        "bfloat16",
        arr([1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0], (2, 2, 2)),
        weight=arr([1.5, -2.0]),
        bias=arr([0.25, 3.0]),
        extra={
            "running_fmt": "float32",
            "running_mean": arr([0.0, 1.0]),
            "running_var": arr([1.0, 1.0]),
            "momentum": None,
            "num_batches_tracked": 3,
            "running_variance": "unbiased",
            "momentum_weights": "running",
        },
        label="bn-cumulative-bf16",
    ),
    Case("float16", arr([300.0, -300.0, 600.0, 900.0], (2, 2)), label="bn-f16-overflow"),
    *(
        # 1 - m must be the exact 1 - 0.1000000000000000055..., not the binary64 0.9: here
        # (1 - m) * 7.75 = 6.97499999999999995698 rounds to 0x1.be66666666666p+2, whereas
        # fl(0.9) * 7.75 rounds to 0x1.be66666666667p+2.
        Case(
            "float64",
            arr([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 31.0], (2, 2, 2)),
            extra={
                "running_fmt": "float64",
                "running_mean": arr([0.0, 7.75 * (weights == "new")]),
                "running_var": arr([0.0, 0.0]),
                "momentum": 0.1,
                "num_batches_tracked": None,
                "running_variance": "unbiased",
                "momentum_weights": weights,
            },
            label=f"bn-exact-one-minus-momentum-{weights}",
        )
        for weights in ("new", "running")
    ),
]


def _call_batch_norm_training(case: Case, backend: str, return_stats: bool):
    x = as_backend(case.x, case.fmt, backend)
    extra = case.extra
    running = "running_mean" in extra
    rm = as_backend(extra.get("running_mean"), extra.get("running_fmt", case.fmt), backend)
    rv = as_backend(extra.get("running_var"), extra.get("running_fmt", case.fmt), backend)
    update = {}
    if running:
        update = {
            "running_variance": extra["running_variance"],
            "momentum_weights": extra["momentum_weights"],
            "num_batches_tracked": extra["num_batches_tracked"],
        }
    result = R.batch_norm(
        x,
        rm,
        rv,
        *_channel_args(case, backend),
        True,
        extra.get("momentum", 0.1),
        case.eps,
        **case.keywords(),
        **update,
        return_stats=return_stats,
    )
    return result, rm, rv


@pytest.mark.parametrize("backend", BACKENDS)
@SLOW
@given(case=batch_norm_training_cases(), return_stats=st.booleans())
@with_examples(BATCH_EXAMPLES, return_stats=True)
def test_batch_norm_training_matches_oracle(backend: str, case: Case, return_stats: bool) -> None:
    result, rm, rv = _call_batch_norm_training(case, backend, return_stats)
    expected = batch_norm_training(
        case.x, case.weight, case.bias, case.eps, **case.oracle_conventions()
    )
    check_output(result.output if return_stats else result, expected.output, case, backend)
    if return_stats:
        check_stats(result, expected, case, backend, centered=True)
    if "running_mean" in case.extra:
        check_running_stats(case, backend, rm, rv)


def check_running_stats(case: Case, backend: str, rm, rv) -> None:
    """In-place update new = (1-m) old + m stat (or m old + (1-m) stat), rounded once."""
    __tracebackhide__ = True
    extra = case.extra
    means, variances = batch_statistics(case.x, unbiased=extra["running_variance"] == "unbiased")
    update = {
        "fmt": extra["running_fmt"],
        "num_batches_tracked": extra["num_batches_tracked"],
        "momentum_weights": extra["momentum_weights"],
    }
    for name, got, old, stat in [
        ("running_mean", rm, extra["running_mean"], means),
        ("running_var", rv, extra["running_var"], variances),
    ]:
        want = running_stat_update(old, stat, extra["momentum"], **update)
        assert_matches_oracle(
            got,
            want,
            fmt=extra["running_fmt"],
            backend=backend,
            what=f"{name} after the in-place update",
            context=case.describe(),
        )


@st.composite
def batch_norm_eval_cases(draw) -> Case:
    case = draw(channel_cases(kind="batch"))
    channels = case.x.shape[1]
    running_fmt = draw(st.sampled_from([case.fmt, "float32"]))
    rv = np.abs(draw(arrays_in(running_fmt, (channels,), max_abs=100.0)))
    if case.eps == 0:
        rv[rv == 0] = 1.0  # a zero denominator (rv = eps = 0) is outside the contract
    case.extra.update(
        running_fmt=running_fmt,
        running_mean=draw(arrays_in(running_fmt, (channels,), max_abs=100.0)),
        running_var=rv,
    )
    return case


@pytest.mark.parametrize("backend", BACKENDS)
@SLOW
@given(case=batch_norm_eval_cases())
@example(
    case=Case(
        "float32",
        arr([2.0**23 + 1, 2.0**23 + 3], (1, 2)),
        extra={
            "running_fmt": "float32",
            "running_mean": arr([2.0**23, 2.0**23 + 2]),
            "running_var": arr([2.0**-100, 0.0]),
        },
        label="bn-eval-tiny-var",
    )
)
def test_batch_norm_eval_matches_oracle(backend: str, case: Case) -> None:
    extra = case.extra
    rm = as_backend(extra["running_mean"], extra["running_fmt"], backend)
    rv = as_backend(extra["running_var"], extra["running_fmt"], backend)
    result = R.batch_norm(
        as_backend(case.x, case.fmt, backend),
        rm,
        rv,
        *_channel_args(case, backend),
        False,
        0.1,
        case.eps,
        **case.keywords(),
    )
    expected = batch_norm_eval(
        case.x,
        extra["running_mean"],
        extra["running_var"],
        case.weight,
        case.bias,
        case.eps,
        eps_placement=case.eps_placement,
        weight_offset=case.weight_offset,
        fmt=case.result_fmt,
    )
    check_output(result, expected, case, backend)
    for name, got, before in [
        ("running_mean", rm, "running_mean"),
        ("running_var", rv, "running_var"),
    ]:
        assert_matches_oracle(
            got,
            extra[before],
            fmt=extra["running_fmt"],
            backend=backend,
            what=f"{name} (eval must not update it)",
            context=case.describe(),
        )


# ---------------------------------------------------------------------------------------------
# deep_norm and the fused residual-add norms


def expected_after_add(case: Case, z_dtype_rounded, *, alpha_x: float, alpha_y: float, rms: bool):
    """The norm of z = alpha_x x + alpha_y other, z rounded into the input dtype or kept exact."""
    shape = case.extra["normalized_shape"]
    if case.extra["add_rounding"] == "dtype":
        return layer_norm(
            z_dtype_rounded,
            shape,
            case.weight,
            None if rms else case.bias,
            case.eps_value(),
            center=not rms,
            **case.oracle_conventions(),
        ).output
    n = math.prod(shape)
    z = add_scaled_exact(case.x, case.extra["other"], alpha_x, alpha_y)
    rows = [z[i : i + n] for i in range(0, len(z), n)]
    out = normalize_exact_rows(
        rows,
        None if case.weight is None else [Fraction(v) for v in case.weight.ravel()],
        None if case.bias is None or rms else [Fraction(v) for v in case.bias.ravel()],
        case.eps_value(),
        center=not rms,
        variance=case.variance,
        eps_placement=case.eps_placement,
        weight_offset=case.weight_offset,
        fmt=case.result_fmt,
    )
    return out.reshape(case.x.shape)


def residual_examples() -> list[Case]:
    base = [
        Case(
            "float32",
            arr([[2.0**23, 2.0**23 + 1, 2.0**23 + 2, 2.0**23 + 3]]),
            extra={"other": arr([[0.5, 0.25, -0.5, 0.125]])},
            label="add-rounds-away-spread",
        ),
        Case(
            "float16",
            arr([[300.0, -300.0, 500.0]]),
            extra={"other": arr([[100.0, 0.5, 1.0]])},
            label="f16-add-overflowing-squares",
        ),
        Case(
            "bfloat16",
            arr([[1.0, 2.0, 3.0]]),
            extra={"other": arr([[2.0**-9, -(2.0**-9), 2.0**-8]])},
            label="bf16-add-ties",
        ),
        Case(
            "float16",
            arr([[60000.0, 1.0]]),
            extra={"other": arr([[60000.0, 1.0]])},
            label="f16-add-overflows",
        ),
    ]
    out = []
    for c in base:
        for rounding in ("dtype", "exact"):
            for alpha in (1.0, 0.5):
                extra = {**c.extra, "alpha": alpha, "add_rounding": rounding}
                out.append(with_shape(replace(c, label=f"{c.label}-{rounding}-a{alpha}"), **extra))
    return out


RESIDUAL_EXAMPLES = residual_examples()


@pytest.mark.parametrize("backend", BACKENDS)
@SLOW
@given(case=layer_norm_cases(residual=True))
@with_examples(RESIDUAL_EXAMPLES)
def test_deep_norm_matches_oracle(backend: str, case: Case) -> None:
    """deep_norm = layer_norm(alpha * input + sublayer_output)."""
    extra = case.extra
    result = R.deep_norm(
        as_backend(case.x, case.fmt, backend),
        as_backend(extra["other"], case.fmt, backend),
        extra["normalized_shape"],
        as_backend(case.weight, case.fmt, backend),
        as_backend(case.bias, case.fmt, backend),
        extra["alpha"],
        case.eps,
        **case.keywords(),
        add_rounding=extra["add_rounding"],
    )
    z = add_scaled(case.x, extra["other"], extra["alpha"], 1.0, case.fmt)
    expected = expected_after_add(case, z, alpha_x=extra["alpha"], alpha_y=1.0, rms=False)
    check_output(result, expected, case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True], ids=["fused_add_layer_norm", "fused_add_rms_norm"])
@SLOW
@given(case=layer_norm_cases(residual=True))
@with_examples(RESIDUAL_EXAMPLES)
def test_fused_add_norm_matches_oracle(backend: str, rms: bool, case: Case) -> None:
    """z = input + alpha * residual; residual_out = z rounded into the input dtype."""
    extra = case.extra
    args = [
        as_backend(case.x, case.fmt, backend),
        as_backend(extra["other"], case.fmt, backend),
        extra["normalized_shape"],
        as_backend(case.weight, case.fmt, backend),
    ]
    if not rms:
        args.append(as_backend(case.bias, case.fmt, backend))
    fn = R.fused_add_rms_norm if rms else R.fused_add_layer_norm
    output, residual_out = fn(
        *args,
        case.eps,
        alpha=extra["alpha"],
        **case.keywords(),
        add_rounding=extra["add_rounding"],
    )
    z = add_scaled(case.x, extra["other"], 1.0, extra["alpha"], case.fmt)
    assert_matches_oracle(
        residual_out,
        z,
        fmt=case.fmt,
        backend=backend,
        what="residual_out",
        context=case.describe(),
    )
    expected = expected_after_add(case, z, alpha_x=1.0, alpha_y=extra["alpha"], rms=rms)
    check_output(output, expected, case, backend)
