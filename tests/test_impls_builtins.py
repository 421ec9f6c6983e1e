"""The built-in adapters load, declare what they run, and agree with the references.

Agreement is checked element by element against the correctly rounded reference computed with
the adapter's declared convention, inside a bound from forward error analysis (no tolerance
literals). For a norm output ``y = w * (x - mu) * r + b`` (``r`` the reciprocal deviation) that
sums with unit roundoff ``u_acc`` and rounds into a dtype of unit roundoff ``u_out`` (half the
machine epsilon), every rounding contributes at most ``u`` relative to what it rounds:

    |y_adapter - y_ref| <= (L(n) u_acc + ROUNDED_STEPS u_out) (|w| (|xhat| + |mu| r) + |b|)
                           + RESIDUAL_ROUNDINGS u_out |w| r (|a| + |c| + mean(|a| + |c|))

``L(n)`` is the reduction length term, ceil(log2 n) for a tree sum and n for a sequential one
(the adapter's ``reduction``); ``|mu| r`` is the cancellation in ``x - mu``; the last term is the
rounding of a residual sum ``z = a + c`` (DeepNorm, fused adds), measured against its summands
because ``z`` itself may cancel. The inputs are standard normal, so the condition number stays
near 1 and the bound is some tens of ulps where the output does not cancel.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

import references as R
from conformance.geometry import grouping
from impls import NORMS, Adapter, load_adapter
from references.gradients import layer_norm_backward

#: Rounded elementwise steps an output may take beyond the sums, counted generously: the
#: residual product and sum, the mean's division, x - mu, the variance's division, + eps, the
#: square root, its reciprocal (or a division), the products with r and w, + b, and the
#: reference's own rounding into the output dtype.
ROUNDED_STEPS = 12
#: Roundings between the exact residual sum and a reported one: alpha * r, the sum, and the
#: reference's own rounding, each at most u times a magnitude <= |a| + |c|.
RESIDUAL_ROUNDINGS = 3

EXPECTED_NORMS = {
    "torch": NORMS,
    "torch-compile": NORMS,
    "onnxruntime": NORMS,
    "handwritten": ("layer_norm",),
}
DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
#: eps and momentum exactly representable in float32: ONNX stores both as FLOAT attributes, so
#: onnxruntime adds float32(1e-5), not 1e-5 (invisible in float32 outputs, thousands of ulps in
#: float64 ones). These tests check each adapter against the values it actually uses.
EPS, RMS_EPS, MOMENTUM = 2.0**-17, 2.0**-20, 0.125
SLOW_SPECS = ("torch-compile",)  # a cold Inductor compile takes 20-30 s, then 2-4 s per norm


@functools.cache
def adapter(spec: str) -> Adapter:
    return load_adapter(spec)


def spec_param(spec: str, *rest: Any) -> Any:
    marks = [pytest.mark.slow] if spec in SLOW_SPECS else []
    return pytest.param(spec, *rest, marks=marks, id="-".join(map(str, (spec, *rest))))


# -- cases -------------------------------------------------------------------------------------


@dataclass
class Case:
    """One call of one norm and what the error bound needs to know about it."""

    norm: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    summands: tuple[torch.Tensor, torch.Tensor] | None = None  # exact a, c of z = a + c
    norm_dims: int = 1
    num_groups: int = 1
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    eps: float = 1e-5
    center: bool = True
    given_stats: tuple[torch.Tensor, torch.Tensor] | None = None  # BatchNorm evaluation

    def reference(self, convention: dict[str, Any]) -> Any:
        return getattr(R, self.norm)(*_clone(self.args), **self.kwargs, **convention)


def _clone(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Fresh running statistics for every call: the norms update them in place."""
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def make_case(norm: str, dtype: torch.dtype = torch.float32, training: bool = True) -> Case:
    g = torch.Generator().manual_seed(sum(map(ord, norm)))

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    x, w, b = randn(4, 3, 32), randn(32), randn(32)
    eps, rms_eps, momentum = EPS, RMS_EPS, MOMENTUM
    images, cw, cb = randn(4, 6, 24), randn(6), randn(6)
    alpha = 0.8125  # not a power of two: alpha * r rounds
    if norm == "layer_norm":
        w2, b2 = randn(3, 32), randn(3, 32)
        return Case(norm, (x, (3, 32), w2, b2, eps), norm_dims=2, weight=w2, bias=b2, eps=eps)
    if norm == "rms_norm":
        return Case(norm, (x, (32,), w, rms_eps), weight=w, eps=rms_eps, center=False)
    if norm == "group_norm":
        return Case(norm, (images, 3, cw, cb, eps), num_groups=3, weight=cw, bias=cb, eps=eps)
    if norm == "instance_norm":
        args = (images, None, None, cw, cb, True, momentum, eps)
        return Case(norm, args, weight=cw, bias=cb, eps=eps)
    if norm == "batch_norm":
        mean, var = randn(6), randn(6).abs() + 0.5
        stats = None if training else (mean, var)
        args = (images, mean, var, cw, cb, training, momentum, eps)
        return Case(norm, args, weight=cw, bias=cb, eps=eps, given_stats=stats)
    r = randn(4, 3, 32)
    if norm == "deep_norm":
        terms = (alpha * x.double(), r.double())
        args = (x, r, (32,), w, b, alpha, eps)
        return Case(norm, args, summands=terms, weight=w, bias=b, eps=eps)
    terms = (x.double(), alpha * r.double())
    if norm == "fused_add_rms_norm":
        kwargs = {"alpha": alpha}
        args = (x, r, (32,), w, rms_eps)
        return Case(norm, args, kwargs, summands=terms, weight=w, eps=rms_eps, center=False)
    args = (x, r, (32,), w, b, eps)
    return Case(norm, args, {"alpha": alpha}, summands=terms, weight=w, bias=b, eps=eps)


# -- the error bound and the comparison --------------------------------------------------------


def length_term(n: int, reduction: str) -> int:
    return max(1, math.ceil(math.log2(max(n, 2)))) if reduction == "tree" else n


def roundoffs(dtype: torch.dtype) -> tuple[float, float]:
    """(accumulation, output) unit roundoffs, half the machine epsilons; 16-bit types
    accumulate in float32."""
    accumulate = torch.float32 if torch.finfo(dtype).bits == 16 else dtype
    return torch.finfo(accumulate).eps / 2, torch.finfo(dtype).eps / 2


def forward_bound(case: Case, adapter: Adapter, dtype: torch.dtype) -> np.ndarray:
    terms = [t.numpy() for t in case.summands] if case.summands else [case.args[0].double().numpy()]
    z = sum(terms[1:], terms[0])
    rows_of = grouping(case.norm, z.shape, norm_dims=case.norm_dims, num_groups=case.num_groups)
    rows = rows_of.to_rows(z)
    if case.given_stats is not None:
        mean, var = (s.double().numpy()[:, None] for s in case.given_stats)
    elif case.center:
        mean, var = rows.mean(1, keepdims=True), rows.var(1, keepdims=True)
    else:
        mean, var = np.zeros((len(rows), 1)), (rows**2).mean(1, keepdims=True)
    convention = adapter.convention(case.norm)
    outside = convention.get("eps_placement") == "outside"
    r = 1 / (np.sqrt(var) + case.eps if outside else np.sqrt(var + case.eps))
    offset = convention.get("weight_offset", 0.0)
    w = (
        1.0
        if case.weight is None
        else np.abs(rows_of.param_rows(case.weight.double().numpy()) + offset)
    )
    b = 0.0 if case.bias is None else np.abs(rows_of.param_rows(case.bias.double().numpy()))
    scale = w * (np.abs((rows - mean) * r) + np.abs(mean) * r) + b
    u_acc, u_out = roundoffs(dtype)
    bound = (length_term(rows_of.n, adapter.reduction) * u_acc + ROUNDED_STEPS * u_out) * scale
    if case.summands:
        size = rows_of.to_rows(np.abs(terms[0]) + np.abs(terms[1]))
        bound += RESIDUAL_ROUNDINGS * u_out * w * r * (size + size.mean(1, keepdims=True))
    return rows_of.from_rows(bound)


def assert_within(actual: Any, desired: Any, bound: np.ndarray, what: str) -> None:
    """Every element of ``actual`` within ``bound`` of ``desired`` (same shape and dtype)."""
    __tracebackhide__ = True
    assert isinstance(actual, torch.Tensor), f"{what}: got {type(actual).__name__}"
    assert actual.dtype == desired.dtype, f"{what}: dtype {actual.dtype}, not {desired.dtype}"
    assert actual.shape == desired.shape, f"{what}: shape {actual.shape}, not {desired.shape}"
    a, d = actual.detach().double().numpy(), desired.double().numpy()
    error = np.abs(a - d)
    bad = ~(error <= bound)
    if bad.any():
        worst = np.unravel_index(np.argmax(np.where(bad, error / bound, 0)), a.shape)
        pytest.fail(
            f"{what}: Mismatched elements: {bad.sum()} / {bad.size} "
            f"({100 * bad.mean():.3g}%) · max abs error {error.max():.3g} · worst at index "
            f"{tuple(map(int, worst))}: ACTUAL {a[worst]:.9g} DESIRED {d[worst]:.9g} "
            f"BOUND {bound[worst]:.3g}"
        )


def residual_bound(case: Case, dtype: torch.dtype) -> np.ndarray:
    assert case.summands is not None
    a, c = (np.abs(t.numpy()) for t in case.summands)
    return RESIDUAL_ROUNDINGS * roundoffs(dtype)[1] * (a + c)


def check_forward(spec: str, case: Case, dtype: torch.dtype = torch.float32) -> None:
    __tracebackhide__ = True
    a = adapter(spec)
    actual = a.functions[case.norm](*_clone(case.args), **case.kwargs)
    desired = case.reference(a.convention(case.norm))
    if case.norm.startswith("fused_add"):
        assert_within(actual[1], desired[1], residual_bound(case, dtype), f"{spec} residual_out")
        actual, desired = actual[0], desired[0]
    assert_within(actual, desired, forward_bound(case, a, dtype), f"{spec} {case.norm}")


# -- loading and declarations ------------------------------------------------------------------


@pytest.mark.parametrize("spec", list(EXPECTED_NORMS))
def test_builtin_loads_and_lists_its_norms(spec: str) -> None:
    a = adapter(spec)
    assert a.norms() == EXPECTED_NORMS[spec]
    assert a.name != spec  # each built-in declares a display name
    assert all("float32" in a.dtypes[norm] for norm in a.norms())


def test_onnxruntime_declares_what_it_runs() -> None:
    a = adapter("onnxruntime")
    assert a.devices == ("cpu",)
    assert not any(a.backward.values())
    assert a.reduction == "sequential"
    assert a.convention("batch_norm") == {
        "running_variance": "biased",
        "momentum_weights": "running",
    }
    # Every declared dtype runs; every undeclared one fails (the declaration is a probe result).
    x = torch.randn(2, 4, 8)
    for name, dtype in DTYPES.items():
        call = (x.to(dtype), (8,), torch.ones(8, dtype=dtype))
        if name in a.dtypes["rms_norm"]:
            assert a.functions["rms_norm"](*call).dtype == dtype
        else:
            with pytest.raises(Exception):  # noqa: B017, PT011  (whatever onnxruntime raises)
                a.functions["rms_norm"](*call)


def test_handwritten_declares_the_seed_convention() -> None:
    assert adapter("handwritten").convention("layer_norm") == {"eps_placement": "outside"}


# -- forward agreement -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "norm"),
    [spec_param(spec, norm) for spec, norms in EXPECTED_NORMS.items() for norm in norms],
)
def test_forward_matches_reference(spec: str, norm: str) -> None:
    check_forward(spec, make_case(norm))


@pytest.mark.parametrize("spec", [spec_param(s) for s in ("torch", "onnxruntime", "torch-compile")])
def test_batch_norm_evaluation_matches_reference(spec: str) -> None:
    check_forward(spec, make_case("batch_norm", training=False))


@pytest.mark.parametrize("spec", ["torch", "onnxruntime", "handwritten"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_layer_norm_in_every_declared_dtype(spec: str, dtype: str) -> None:
    if dtype not in adapter(spec).dtypes["layer_norm"]:
        pytest.skip(f"{spec} does not declare layer_norm in {dtype}")
    check_forward(spec, make_case("layer_norm", DTYPES[dtype]), DTYPES[dtype])


@pytest.mark.parametrize("spec", [spec_param(s) for s in ("torch", "onnxruntime", "torch-compile")])
def test_batch_norm_running_statistics_follow_the_declared_convention(spec: str) -> None:
    a = adapter(spec)
    case = make_case("batch_norm")
    args, expected = _clone(case.args), _clone(case.args)
    a.functions["batch_norm"](*args)
    convention = a.convention("batch_norm")
    R.batch_norm(*expected, **convention)
    momentum = case.args[6]
    new_weight = momentum if convention.get("momentum_weights", "new") == "new" else 1 - momentum
    rows_of = grouping("batch_norm", tuple(case.args[0].shape))
    rows = rows_of.to_rows(case.args[0].double().numpy())
    steps = (length_term(rows_of.n, a.reduction) + ROUNDED_STEPS) * roundoffs(torch.float32)[0]
    old_mean, old_var = (t.double().numpy() for t in case.args[1:3])
    mean_scale = (1 - new_weight) * np.abs(old_mean) + new_weight * np.abs(rows).mean(1)
    var_scale = (1 - new_weight) * np.abs(old_var) + new_weight * 2 * (rows**2).mean(1)
    assert_within(args[1], expected[1], steps * mean_scale, f"{spec} running_mean")
    assert_within(args[2], expected[2], steps * var_scale, f"{spec} running_var")
    assert not torch.equal(args[1], case.args[1])  # the caller's tensors were updated in place


def test_onnxruntime_instance_norm_refuses_running_statistics() -> None:
    images = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="keeps no running statistics"):
        adapter("onnxruntime").functions["instance_norm"](images, torch.zeros(3), torch.ones(3))


# -- the hand-written LayerNorm ----------------------------------------------------------------


def test_handwritten_default_eps_is_the_seeds() -> None:
    case = make_case("layer_norm")
    x, shape, w, b, _ = case.args
    actual = adapter("handwritten").functions["layer_norm"](x, shape, w, b)  # eps left out
    desired = R.layer_norm(x, shape, w, b, eps=1e-6, eps_placement="outside")
    case.eps = 1e-6
    assert_within(actual, desired, forward_bound(case, adapter("handwritten"), x.dtype), "seed")


def test_handwritten_is_told_apart_from_pytorch_by_the_bound() -> None:
    # With a large eps the two placements differ by far more than the bound: the comparison
    # itself must reject the convention the adapter does not have.
    case = make_case("layer_norm")
    x, shape, w, b, _ = case.args
    case.eps = 0.5
    actual = adapter("handwritten").functions["layer_norm"](x, shape, w, b, case.eps)
    bound = forward_bound(case, adapter("handwritten"), x.dtype)
    outside = R.layer_norm(x, shape, w, b, case.eps, eps_placement="outside")
    assert_within(actual, outside, bound, "outside")
    inside = R.layer_norm(x, shape, w, b, case.eps)
    with pytest.raises(pytest.fail.Exception, match="Mismatched elements"):
        assert_within(actual, inside, bound, "inside")


# -- backward ----------------------------------------------------------------------------------


def layer_norm_gradient_bounds(
    x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, eps: float, reduction: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bounds on dx, dw, db of LayerNorm over the last dim from the same error model:
    dx = r (g w - mean(g w) - xhat mean(g w xhat)), dw = sum over rows of g xhat, db = sum g."""
    x64, w64, g64 = (t.double().numpy() for t in (x, w, g))
    mean, var = x64.mean(-1, keepdims=True), x64.var(-1, keepdims=True)
    r = 1 / np.sqrt(var + eps)
    k = np.abs((x64 - mean) * r) + np.abs(mean) * r  # |xhat| with its cancellation term
    gw = np.abs(g64 * w64)
    n, rows = x.shape[-1], x.numel() // x.shape[-1]
    u = roundoffs(torch.float32)[0]
    along = (length_term(n, reduction) + ROUNDED_STEPS) * u
    across = (length_term(rows, reduction) + ROUNDED_STEPS) * u
    dx = along * r * (gw + gw.mean(-1, keepdims=True) + k * (gw * k).mean(-1, keepdims=True))
    dw = (along + across) * (np.abs(g64) * k).reshape(rows, n).sum(0)
    db = across * np.abs(g64).reshape(rows, n).sum(0)
    return dx, dw, db


@pytest.mark.parametrize("spec", [spec_param(s) for s in ("torch", "handwritten", "torch-compile")])
def test_layer_norm_backward_matches_reference(spec: str) -> None:
    gen = torch.Generator().manual_seed(7)
    x, g = torch.randn(6, 40, generator=gen), torch.randn(6, 40, generator=gen)
    w, b = torch.randn(40, generator=gen), torch.randn(40, generator=gen)
    a = adapter(spec)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    a.functions["layer_norm"](leaves[0], (40,), leaves[1], leaves[2], EPS).backward(g)
    convention = a.convention("layer_norm")
    expected = layer_norm_backward(g, x, (40,), w, b, EPS, **convention)
    bounds = layer_norm_gradient_bounds(x, w, g, EPS, a.reduction)
    names = ("input", "weight", "bias")
    for leaf, want, bound, name in zip(leaves, expected[:3], bounds, names, strict=True):
        assert leaf.grad is not None, f"{spec}: no gradient for {name}"
        assert_within(leaf.grad, want, bound, f"{spec} grad_{name}")


@pytest.mark.slow
def test_torch_compile_reuses_its_compilation_across_shapes() -> None:
    import torch._dynamo.utils

    compiled: Callable[..., Any] = adapter("torch-compile").functions["rms_norm"]
    graphs = torch._dynamo.utils.counters["stats"]

    def call(rows: int) -> None:
        x = torch.randn(rows, 16)
        assert torch.equal(compiled(x, (16,), None, None), compiled(x, (16,), None, None))

    call(3)
    after_first = graphs["unique_graphs"]
    for rows in (5, 11, 64):  # dynamic=True: one compilation serves every row count
        call(rows)
    assert graphs["unique_graphs"] == after_first
