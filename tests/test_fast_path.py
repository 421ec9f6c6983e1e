"""The certified fast path against the exact path, element for element.

``fast=False`` makes the engine compute every element exactly (mpmath-backed Ziv rounding of the
exact algebraic value), so equality here checks both the fast path's bounds (a wrong bound would
certify a wrong rounding) and the hand-over to the exact path for the elements it cannot decide.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from references import backprop, fastpath, groups
from references.exact import round_surd
from references.fast import working_for
from references.formats import FORMATS, Format, round_array

CONVENTIONS = {
    "layer": groups.Convention(center=True, unbiased=False, eps=1e-5, eps_outside=False),
    "layer-unbiased-outside": groups.Convention(True, True, 1e-6, True),
    "rms": groups.Convention(center=False, unbiased=False, eps=2.0**-23, eps_outside=False),
    "rms-gemma": groups.Convention(False, False, 1e-6, False, weight_offset=1.0),
    "rms-outside": groups.Convention(False, False, 1e-3, True),
}


def problem(x: np.ndarray, conv: groups.Convention, w=None, b=None) -> groups.Problem:
    G, K = x.shape
    return groups.Problem(
        z=[(Fraction(1), (x,))],
        shape=(G, K),
        conv=conv,
        weight=w,
        bias=b,
        widx=np.arange(K)[None, :],
    )


def assert_same_rounding(fast: np.ndarray, exact: np.ndarray, what: str) -> None:
    """Bitwise equality (NaN with NaN, and the sign of zero)."""
    __tracebackhide__ = True
    same = (fast == exact) & (np.signbit(fast) == np.signbit(exact))
    same |= np.isnan(fast) & np.isnan(exact)
    if not same.all():
        bad = np.argwhere(~same)
        first = tuple(bad[0])
        pytest.fail(
            f"{what}: mismatched elements {len(bad)} / {fast.size}; first at {first}: "
            f"fast path {fast[first]!r}, exact {exact[first]!r}"
        )


def narrow(values: np.ndarray, fmt: Format) -> np.ndarray:
    return round_array(values, fmt)


@pytest.mark.parametrize("conv_name", sorted(CONVENTIONS))
@pytest.mark.parametrize("fmt_name", ["float32", "float16", "bfloat16", "float64"])
def test_forward_fast_equals_exact(conv_name: str, fmt_name: str) -> None:
    fmt = FORMATS[fmt_name]
    rng = np.random.default_rng(hash((conv_name, fmt_name)) % 2**32)
    x = narrow(rng.standard_normal((6, 24)) * 3 + 1, fmt)
    w, b = narrow(rng.standard_normal(24), fmt), narrow(rng.standard_normal(24), fmt)
    p = problem(x, CONVENTIONS[conv_name], w, b if CONVENTIONS[conv_name].center else None)
    assert_same_rounding(groups.forward(p, fmt), groups.forward(p, fmt, fast=False), "output")
    fast_stats = groups.statistics(p, fmt)
    exact_stats = groups.statistics(p, fmt, fast=False)
    assert_same_rounding(fast_stats[1], exact_stats[1], "rstd")
    if fast_stats[0] is not None:
        assert exact_stats[0] is not None
        assert_same_rounding(fast_stats[0], exact_stats[0], "mean")


@pytest.mark.parametrize("conv_name", sorted(CONVENTIONS))
@pytest.mark.parametrize("fmt_name", ["float32", "bfloat16", "float64"])
def test_backward_fast_equals_exact(conv_name: str, fmt_name: str) -> None:
    fmt = FORMATS[fmt_name]
    rng = np.random.default_rng(hash((conv_name, fmt_name, "bw")) % 2**32)
    x = narrow(rng.standard_normal((5, 16)) * 2 - 1, fmt)
    g = narrow(rng.standard_normal((5, 16)), fmt)
    w, b = narrow(rng.standard_normal(16), fmt), narrow(rng.standard_normal(16), fmt)
    p = problem(x, CONVENTIONS[conv_name], w, b)
    assert_same_rounding(
        backprop.grad_input(p, g, fmt), backprop.grad_input(p, g, fmt, fast=False), "dx"
    )
    fast_dw, fast_db = backprop.grad_affine(p, g, 16, fmt, fmt)
    exact_dw, exact_db = backprop.grad_affine(p, g, 16, fmt, fmt, fast=False)
    assert fast_dw is not None
    assert exact_dw is not None
    assert fast_db is not None
    assert exact_db is not None
    assert_same_rounding(fast_dw, exact_dw, "dweight")
    assert_same_rounding(fast_db, exact_db, "dbias")


@given(
    base=st.sampled_from([2.0**23, -(2.0**23), 2.0**20, 1.0]),
    offsets=st.lists(st.integers(-8, 8), min_size=2, max_size=12),
)
@example(base=2.0**23, offsets=[0, 1])
@example(base=2.0**23, offsets=[0, 0, 0, 1])
@example(base=2.0**23, offsets=[3, 3, 3])  # constant row: output = bias exactly
@settings(max_examples=30)
def test_float32_maximal_condition(base: float, offsets: list[int]) -> None:
    """x = 2**23 + small integers: kappa ~ 1e7, the worst fp32 rows; fast must equal exact."""
    fmt = FORMATS["float32"]
    x = narrow(np.array([[base + o for o in offsets]]), fmt)
    for conv in (CONVENTIONS["layer"], CONVENTIONS["layer-unbiased-outside"]):
        p = problem(x, conv)
        assert_same_rounding(groups.forward(p, fmt), groups.forward(p, fmt, fast=False), "output")


def test_rows_at_rounding_boundaries_fall_back_and_agree() -> None:
    """Biases chosen so that each float32 output sits within ~1e-16 of a rounding midpoint: the
    fast path must hand these to the exact path, and the exact path must pick the right side."""
    fmt32 = FORMATS["float32"]
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 32))
    p0 = problem(x, CONVENTIONS["layer"])
    xhat = groups.forward(p0, FORMATS["float64"])  # correctly rounded float64 xhat
    # Midpoints between neighbouring float32 values near a target y.
    target = narrow(rng.standard_normal((4, 32)), fmt32)
    midpoint = target + np.spacing(target.astype(np.float32)).astype(np.float64) / 2
    bias = midpoint - xhat  # y = xhat + bias lands within float64 rounding of the midpoint
    p = groups.Problem(
        z=[(Fraction(1), (x,))],
        shape=x.shape,
        conv=CONVENTIONS["layer"],
        bias=bias.ravel(),
        widx=np.arange(x.size).reshape(x.shape),
    )
    fast = groups.forward(p, fmt32)
    exact = groups.forward(p, fmt32, fast=False)
    assert_same_rounding(fast, exact, "output near midpoints")
    # The construction really did put outputs at boundaries: both neighbours occur.
    assert (exact == target).any()
    assert (exact != target).any()


def test_fast_path_decides_nearly_everything() -> None:
    """On ordinary data the exact path is the exception: at most 1 element in 10**4."""
    fmt = FORMATS["float32"]
    rng = np.random.default_rng(3)
    x = narrow(rng.standard_normal((64, 1024)), fmt)
    p = problem(x, CONVENTIONS["layer"], narrow(rng.standard_normal(1024), fmt))
    _, decided = fastpath.fast_output(p, fmt, working_for(fmt))
    assert (~decided).sum() <= x.size // 10**4


def test_running_update_fast_equals_exact() -> None:
    fmt = FORMATS["float32"]
    rng = np.random.default_rng(11)
    x = narrow(rng.standard_normal((3, 40)) + 5, fmt)  # 3 channels, 40 values each
    p = problem(x, CONVENTIONS["layer"])
    old = narrow(rng.standard_normal(3), fmt)
    members = np.arange(3)[:, None]
    for which in ("mean", "biased", "unbiased"):
        for momentum in (Fraction(0.1), Fraction(1, 3)):
            args = (p, old, which, momentum, 1 - momentum, fmt, members)
            assert_same_rounding(
                groups.running_update(*args), groups.running_update(*args, fast=False), which
            )


@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
def test_double_double_step_agrees_with_exact(weight_offset: float) -> None:
    """float64 outputs: the long double path leaves a few percent undecided (outputs within
    ~2**-60 of a rounding boundary); the double-double step must decide them, correctly."""
    from references import doubled
    from references.fast import LONG_DOUBLE_WORKING

    if LONG_DOUBLE_WORKING.u >= 2.0**-53:
        pytest.skip("no long double wider than float64 on this platform")
    fmt = FORMATS["float64"]
    rng = np.random.default_rng(5)
    x = rng.standard_normal((32, 256))
    conv = groups.Convention(True, False, 1e-5, False, weight_offset=weight_offset)
    p = problem(x, conv, rng.standard_normal(256), rng.standard_normal(256))
    _, decided = fastpath.fast_output(p, fmt, LONG_DOUBLE_WORKING)
    rows, cols = np.nonzero(~decided)
    assert rows.size > 20  # the hard cases exist
    values, dd_decided = doubled.outputs(p, rows, cols, fmt)
    assert dd_decided.mean() > 0.99
    pairs = zip(rows.tolist(), cols.tolist(), strict=True)
    exact = np.array([groups._exact_output(p, g, k, fmt) for g, k in pairs])
    assert_same_rounding(values[dd_decided], exact[dd_decided], "double-double step")


@pytest.mark.parametrize("conv_name", ["layer", "layer-unbiased-outside", "rms-gemma"])
def test_double_double_backward_step_agrees_with_exact(conv_name: str) -> None:
    """float64 dz: the elements the long double path leaves undecided go through the
    double-double step, which must decide nearly all of them, correctly."""
    from references import doubled
    from references.fast import LONG_DOUBLE_WORKING, certify

    if LONG_DOUBLE_WORKING.u >= 2.0**-53:
        pytest.skip("no long double wider than float64 on this platform")
    fmt = FORMATS["float64"]
    rng = np.random.default_rng(9)
    x, g = rng.standard_normal((16, 128)), rng.standard_normal((16, 128))
    p = problem(x, CONVENTIONS[conv_name], rng.standard_normal(128), rng.standard_normal(128))
    _, decided = certify(backprop._fast_grad_input(p, g, LONG_DOUBLE_WORKING), fmt)
    rows, cols = np.nonzero(~decided)
    assert rows.size > 10  # the hard cases exist
    cache: dict[int, tuple[Fraction, Fraction]] = {}
    values, dd_decided = doubled.grad_inputs(
        p, g, rows, cols, fmt, lambda k: backprop._group_sums(p, g, k, cache)
    )
    assert dd_decided.mean() > 0.99
    exact = []
    for k, j in zip(rows.tolist(), cols.tolist(), strict=True):
        value = backprop._exact_grad_input(p, g, k, j, cache)
        assert value is not None
        exact.append(round_surd(value, fmt))
    assert_same_rounding(values[dd_decided], np.array(exact)[dd_decided], "double-double dz")


def test_double_double_weight_gradient_step_agrees_with_exact() -> None:
    """float64 dw: a column sum over groups with cancellation; columns the long double path
    cannot decide go through the double-double step, which must agree with the exact sums."""
    from references import doubled
    from references.fast import LONG_DOUBLE_WORKING

    if LONG_DOUBLE_WORKING.u >= 2.0**-53:
        pytest.skip("no long double wider than float64 on this platform")
    fmt = FORMATS["float64"]
    rng = np.random.default_rng(13)
    x, g = rng.standard_normal((64, 48)), rng.standard_normal((64, 48))
    p = problem(x, CONVENTIONS["layer"], rng.standard_normal(48), rng.standard_normal(48))
    columns = np.arange(48)
    values, decided = doubled.weight_grads(p, g, columns, fmt)
    assert decided.mean() > 0.95
    exact, _ = backprop.grad_affine(p, g, 48, fmt, None, fast=False)
    assert exact is not None
    assert_same_rounding(values[decided], exact[decided], "double-double dweight")


def test_statistics_after_forward_reuse_the_row_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a forward pass, statistics and running updates take the per-group fast statistics
    the row blocks (here many small ones, on worker threads) recorded; they must equal the
    exact ones."""
    monkeypatch.setattr(fastpath, "BLOCK_ELEMENTS", 64)
    fmt = FORMATS["float32"]
    rng = np.random.default_rng(21)
    x = narrow(rng.standard_normal((200, 16)) * 4 + 3, fmt)
    p = problem(x, CONVENTIONS["layer-unbiased-outside"])
    groups.forward(p, fmt)
    assert p._group_fast_stats  # the recorder published
    exact = problem(x, CONVENTIONS["layer-unbiased-outside"])
    for recorded, computed in zip(
        groups.statistics(p, fmt), groups.statistics(exact, fmt, fast=False), strict=True
    ):
        assert recorded is not None
        assert computed is not None
        assert_same_rounding(recorded, computed, "statistics")
    old, members = narrow(rng.standard_normal(200), fmt), np.arange(200)[:, None]
    args = ("unbiased", Fraction(1, 10), Fraction(9, 10), fmt, members)
    assert_same_rounding(
        groups.running_update(p, old, *args),
        groups.running_update(exact, old, *args, fast=False),
        "running variance",
    )
