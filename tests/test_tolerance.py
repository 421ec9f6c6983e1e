"""The tolerance model against model kernels: correct ones pass with margin, known bugs fail.

The calibration K.sweep runs every kernel of ``tests/model_kernels.py`` on rows of mean ``m`` and
unit spread, ``m`` chosen for a target condition number ``κ = rms(x)/s``, over row lengths from
1 to 8192, and compares each output with the correctly rounded reference under the model's
bound. Run ``pytest tests/test_tolerance.py -s -k table`` to print the table of max ratios that
the docstring of :mod:`conformance.tolerance` records.

The margin (``calibration_margin`` in the model's table) is applied to the error-analysis part
of the bound — the model is evaluated with the unit roundoff scaled by it — while the ulp
granted for rounding is not: a faithful half-precision element sits at ratio ≈ 1 by design.
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass

import ml_dtypes
import model_kernels as K
import numpy as np
import pytest

import references as R
from conformance import metrics, tolerance
from references.formats import FORMATS, round_array

CORRECT = ("two_pass", "welford", "float64_once", "sequential")
#: The condition number from which E[x²]-E[x]² must fail (DESIGN.md).
FAILING_KAPPA = 100
#: ... in every (κ, n) cell: for float32 outputs from FAILING_KAPPA; a float16 output's ulp
#: (2**-11 relative) hides the cancellation error u·κ² (u = 2**-24) up to κ ≈ 2**6.5, so its
#: cells fail reliably a decade later. bfloat16 rows cannot reach that κ with any spread.
CELL_FAILING_KAPPA = {"float32": FAILING_KAPPA, "float16": 10 * FAILING_KAPPA}


# -- calibration: forward ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(K.KAPPAS))
@pytest.mark.parametrize("kernel", CORRECT)
def test_correct_kernels_pass_with_margin(kernel: str, dtype: str) -> None:
    cells = K.sweep(dtype)
    bad = K.failures(cells, kernel)
    assert not bad, f"{kernel} ({dtype}) exceeds the margined bound:\n" + "\n".join(bad)
    if dtype == "float32":
        # With float32 outputs the plain ratio keeps the margin too: an element one ulp off
        # has E >= 3u|y| >= 1.5 ulp beside the rounding ulp, so a ratio of at most 0.4.
        worst = K.max_ratio(cells, kernel)
        assert worst <= K.MARGIN, f"{kernel} float32 max ratio {worst:.3g} > {K.MARGIN}"


@pytest.mark.parametrize("dtype", list(CELL_FAILING_KAPPA))
def test_naive_moments_fail_in_every_cell(dtype: str) -> None:
    """E[x²]-E[x]² fails in every cell from its dtype's threshold, for every n ≥ 2 (n = 1 has
    no variance to lose)."""
    cells = K.sweep(dtype)
    passed = [
        f"κ={k:g} n={n}: ratio {c.metrics.max_ratio:.3g}"
        for (name, k, n), c in cells.items()
        if name == "naive_moments"
        and k >= CELL_FAILING_KAPPA[dtype]
        and n > 1
        and c.metrics.mismatched == 0
    ]
    assert not passed, "E[x²]-E[x]² passed where it must fail:\n" + "\n".join(passed)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_naive_moments_fail_at_kappa_100_in_half_precision(dtype: str) -> None:
    """Half outputs hide part of the cancellation below their ulp; at κ = 100 the failure is
    certain over the K.sweep, not in every cell."""
    assert K.max_ratio(K.sweep(dtype), "naive_moments", lambda k, n: k >= FAILING_KAPPA) > 1


@pytest.mark.parametrize("dtype", list(K.KAPPAS))
def test_naive_moments_pass_when_well_conditioned(dtype: str) -> None:
    """At κ = 1 there is nothing to cancel: the model must not fail the kernel for its form."""
    assert K.max_ratio(K.sweep(dtype), "naive_moments", lambda k, n: k == 1) <= 1


def test_calibration_table(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints kernel x κ -> max ratio per dtype; the float32 one is in the model's docstring."""
    tables = {dtype: K.calibration_table(dtype) for dtype in K.KAPPAS}
    with capsys.disabled():
        for dtype, table in tables.items():
            print(f"\n{dtype}\n{table}")
    assert all(len(t.splitlines()) == 1 + len(K.FORWARD_KERNELS) for t in tables.values())


# -- calibration: conventions, RMSNorm, statistics -----------------------------------------------

CONVENTIONS = {
    "float32-unbiased": ("float32", K.Convention(unbiased=True)),
    "float32-eps_outside": ("float32", K.Convention(eps_outside=True)),
    "float32-rms": ("float32", K.Convention(center=False)),
    "float32-rms-unbiased-outside": (
        "float32",
        K.Convention(center=False, unbiased=True, eps_outside=True),
    ),
    "bfloat16-rms": ("bfloat16", K.Convention(center=False)),
}


@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_conventions_calibrate(name: str) -> None:
    dtype, conv = CONVENTIONS[name]
    cells = K.sweep(dtype, conv, n_values=(7, 768, 4096))
    for kernel in CORRECT:
        bad = K.failures(cells, kernel)
        assert not bad, f"{kernel} ({name}) exceeds the margined bound:\n" + "\n".join(bad)
    if conv.center:
        worst = [
            c.metrics.max_ratio
            for (kernel, k, _), c in cells.items()
            if kernel == "naive_moments" and k >= FAILING_KAPPA
        ]
        assert min(worst) > 1, f"E[x²]-E[x]² passed a cell at κ >= {FAILING_KAPPA} ({name})"


def _statistics_checks(dtype: str, kernel: str, margin: float) -> list[int]:
    """Mismatches of the returned (mean, rstd) per target κ, both in float32."""
    mismatches = []
    for seed, n in enumerate((7, 768, 4096)):
        block = K.make_block(dtype, n, seed)
        ref = R.layer_norm(block.x, n, block.w, block.b, K.EPS, return_stats=True)
        out = K.FORWARD_KERNELS[kernel](block.x, block.w, block.b, K.EPS, K.PYTORCH)
        stats = tolerance.row_statistics(
            K.f64(block.x), K.EPS, center=True, unbiased=False, eps_outside=False
        )
        u = tolerance.accumulation_unit(dtype) * margin
        bounds = tolerance.statistics_bound(
            stats, out_dtype="float32", acc_unit=u, reduction="tree"
        )
        for kappa in K.KAPPAS[dtype]:
            sel = block.kappa == kappa
            pairs = zip((out.mean, out.rstd), (ref.mean, ref.rstd), bounds, strict=True)
            mismatches.append(
                sum(
                    metrics.compare(
                        K.f64(a)[sel], K.f64(r).reshape(-1)[sel], b[sel], "float32"
                    ).mismatched
                    for a, r, b in pairs
                )
            )
    return mismatches


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kernel", ["two_pass", "welford", "float64_once"])
def test_returned_statistics_pass_with_margin(kernel: str, dtype: str) -> None:
    assert not any(_statistics_checks(dtype, kernel, K.MARGIN))


def test_naive_rstd_fails_from_kappa_100() -> None:
    mismatches = _statistics_checks("float32", "naive_moments", 1.0)
    per_kappa = np.array(mismatches).reshape(3, -1)  # (n, κ)
    failing = np.array(K.KAPPAS["float32"]) >= FAILING_KAPPA
    assert per_kappa[:, failing].all(), per_kappa


# -- calibration: backward -----------------------------------------------------------------------

BACKWARD_KAPPAS = (1, 100, 1e4)


@dataclass
class BackwardRun:
    """Per target κ: mismatches of dx (correct, projection dropped), dw and db (correct)."""

    dx: list[int]
    dx_dropped: list[int]
    dw: int
    db: int


def _backward_run(n: int, center: bool, seed: int) -> BackwardRun:
    rng = np.random.default_rng(seed)
    rows = K.rows_per_cell(n)
    x = np.concatenate([K.make_rows(rng, rows, n, k, "float32") for k in BACKWARD_KAPPAS])
    target = np.repeat(np.array(BACKWARD_KAPPAS, dtype=np.float64), rows)
    w, b = K.make_affine(rng, n, "float32")
    dy = rng.standard_normal(x.shape).astype(np.float32)
    conv = K.Convention(center=center)
    if center:
        ref = R.layer_norm_backward(dy, x, n, w, b, K.EPS)
    else:
        ref = R.rms_norm_backward(dy, x, n, w, K.EPS)
    stats = tolerance.row_statistics(
        K.f64(x), K.EPS, center=center, unbiased=False, eps_outside=False
    )
    u = tolerance.accumulation_unit("float32")
    common = {"out_dtype": "float32", "reduction": "tree"}
    w_rows = np.broadcast_to(K.f64(w), x.shape)

    def dx_bound(unit: float) -> np.ndarray:
        return tolerance.backward_bound(
            stats, w_rows, K.f64(dy), K.f64(ref.input), acc_unit=unit, n=n, center=center, **common
        )

    good, dropped = K.backward(dy, x, w, K.EPS, conv), K.backward(dy, x, w, K.EPS, conv, drop=True)
    strict, plain = dx_bound(u * K.MARGIN), dx_bound(u)
    index = np.broadcast_to(np.arange(n), x.shape)
    dw_bound = tolerance.weight_grad_bound(
        stats, K.f64(dy), index, n, K.f64(ref.weight), acc_unit=u * K.MARGIN, **common
    )
    db_bound = tolerance.bias_grad_bound(
        stats,
        K.f64(dy),
        index,
        n,
        None if ref.bias is None else K.f64(ref.bias),
        acc_unit=u * K.MARGIN,
        **common,
    )

    def mismatched(actual: np.ndarray, bound: np.ndarray) -> list[int]:
        return [
            metrics.compare(
                K.f64(actual)[target == k],
                K.f64(ref.input)[target == k],
                bound[target == k],
                "float32",
            ).mismatched
            for k in BACKWARD_KAPPAS
        ]

    return BackwardRun(
        dx=mismatched(good.dx, strict),
        dx_dropped=mismatched(dropped.dx, plain),
        dw=metrics.compare(K.f64(good.dw), K.f64(ref.weight), dw_bound, "float32").mismatched,
        db=0
        if ref.bias is None
        else metrics.compare(K.f64(good.db), K.f64(ref.bias), db_bound, "float32").mismatched,
    )


@pytest.mark.parametrize("center", [True, False], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("n", [7, 127, 768, 4096])
def test_backward_calibrates(n: int, center: bool) -> None:
    """A float32 two-pass backward passes with margin (dx, dw, db); dropping x̂·mean(g·x̂)
    fails at every κ."""
    run = _backward_run(n, center, seed=n)
    assert run.dx == [0] * len(BACKWARD_KAPPAS), f"correct dx mismatched per κ: {run.dx}"
    assert run.dw == 0
    assert run.db == 0
    assert all(run.dx_dropped), f"dx without the projection passed at some κ: {run.dx_dropped}"


# -- residual add and running statistics ---------------------------------------------------------


def _cancelling_pair(rng: np.random.Generator, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """bfloat16 ``x`` and ``r`` with ``alpha·r ≈ -x`` for half the rows: the sum cancels."""
    x = rng.standard_normal((64, 256))
    r = rng.standard_normal((64, 256))
    r[::2] = -x[::2] / alpha + rng.standard_normal((32, 256)) / 256
    bf16 = K.DTYPES["bfloat16"]
    return x.astype(bf16), r.astype(bf16)


def test_residual_bound() -> None:
    """``z = x + alpha·r`` in float32, rounded once into bfloat16, passes with margin; rounding
    ``alpha·r`` into bfloat16 before the add fails where the sum cancels."""
    alpha = float(np.float32((2 * 24) ** 0.25))  # DeepNet's decoder alpha for 24 layers
    x, r = _cancelling_pair(np.random.default_rng(7), alpha)
    bf16, f32 = K.DTYPES["bfloat16"], np.float32
    exact = K.f64(x) + alpha * K.f64(r)
    reference = round_array(exact, FORMATS["bfloat16"])
    good = K.f64((x.astype(f32) + f32(alpha) * r.astype(f32)).astype(bf16))
    early = K.f64(
        (x.astype(f32) + (f32(alpha) * r.astype(f32)).astype(bf16).astype(f32)).astype(bf16)
    )
    u = tolerance.accumulation_unit("bfloat16")

    def bound(unit: float) -> np.ndarray:
        return tolerance.residual_bound(
            K.f64(x), K.f64(r), alpha, out_dtype="bfloat16", acc_unit=unit
        )

    assert metrics.compare(good, reference, bound(u * K.MARGIN), "bfloat16").mismatched == 0
    assert metrics.compare(early, reference, bound(u), "bfloat16").mismatched > 0


def _batch(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, C) float32 batch, channels of κ from 1 to 1e4; running mean and variance."""
    rng = np.random.default_rng(seed)
    kappas = np.repeat(np.array([1, 100, 1e4]), 8)
    x = np.sqrt(kappas**2 - 1) + rng.standard_normal((64, kappas.size))
    running_mean = rng.standard_normal(kappas.size) * kappas
    running_var = rng.random(kappas.size) + 1 / 2
    return x.astype(np.float32), running_mean.astype(np.float32), running_var.astype(np.float32)


def _running_kernel(
    x: np.ndarray, momentum: float, *, unbiased: bool
) -> tuple[np.ndarray, np.float32, np.float32]:
    """float32 two-pass batch statistic, then ``(1 - m)·old + m·stat`` in float32."""
    columns = np.ascontiguousarray(x.T)
    f32 = np.float32
    n = f32(columns.shape[1])
    mean = K.tree_sum(columns) / n
    d = columns - mean[:, None]
    var = K.tree_sum(d * d) / (n - f32(1) if unbiased else n)
    return np.stack([mean, var]), f32(1 - momentum), f32(momentum)


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_running_stats_bound(which: str) -> None:
    """The float32 update passes with margin; updating the running variance with the biased
    batch variance (a convention bug: off by n/(n-1)) fails."""
    momentum = 0.1
    x, old_mean, old_var = _batch(3)
    new_mean, new_var = old_mean.copy(), old_var.copy()
    R.batch_norm(x, new_mean, new_var, training=True, momentum=momentum)
    old, reference = (old_mean, new_mean) if which == "running_mean" else (old_var, new_var)
    row = 0 if which == "running_mean" else 1
    stats = tolerance.row_statistics(
        K.f64(x.T), K.EPS, center=True, unbiased=False, eps_outside=False
    )
    u = tolerance.accumulation_unit("float32")

    def update(unbiased: bool) -> np.ndarray:
        stat, keep, take = _running_kernel(x, momentum, unbiased=unbiased)
        return K.f64(keep * old + take * stat[row])

    def bound(unit: float) -> np.ndarray:
        return tolerance.running_stats_bound(
            which,
            K.f64(old),
            K.f64(reference),
            stats,
            momentum,
            out_dtype="float32",
            acc_unit=unit,
        )

    assert (
        metrics.compare(update(True), K.f64(reference), bound(u * K.MARGIN), "float32").mismatched
        == 0
    )
    if which == "running_var":
        assert metrics.compare(update(False), K.f64(reference), bound(u), "float32").mismatched > 0


def test_evaluation_batch_norm_folded_kernel() -> None:
    """BatchNorm in evaluation folded into ``x·A + B`` (``A = w·rstd``, ``B = b - m·A``) in
    float32 cancels like a mean when ``|m| >> sd``: fixed statistics must allow for it."""
    rng = np.random.default_rng(9)
    channels, batch = 12, 256
    sd = np.exp(rng.uniform(-2, 2, channels))
    mean = sd * np.repeat([0.0, 1e2, 1e4], channels // 3)
    x = (mean + sd * rng.standard_normal((batch, channels))).astype(np.float32)
    rm, rv = mean.astype(np.float32), (sd**2).astype(np.float32)
    w, b = K.make_affine(rng, channels, "float32")
    reference = K.f64(R.batch_norm(x, rm.copy(), rv.copy(), w, b, training=False, eps=K.EPS))
    f32 = np.float32
    a = w * (f32(1) / np.sqrt(rv + f32(K.EPS)))
    folded = K.f64(x * a + (b - rm * a))
    stats = tolerance.fixed_statistics(K.f64(x.T), K.f64(rm), K.f64(rv), K.EPS)
    bound = tolerance.forward_bound(
        stats,
        np.broadcast_to(K.f64(w)[:, None], (channels, batch)),
        np.broadcast_to(K.f64(b)[:, None], (channels, batch)),
        reference.T,
        out_dtype="float32",
        acc_unit=tolerance.accumulation_unit("float32") * K.MARGIN,
        reduction="tree",
        n=batch,
    )
    m = metrics.compare(folded.T, reference.T, bound, "float32")
    assert m.mismatched == 0, m


# -- the model's own contracts -------------------------------------------------------------------

FINFO = {
    "float64": np.finfo(np.float64),
    "float32": np.finfo(np.float32),
    "float16": np.finfo(np.float16),
    "bfloat16": ml_dtypes.finfo(ml_dtypes.bfloat16),
}


@pytest.mark.parametrize("dtype", list(FINFO))
def test_unit_roundoff_is_half_the_machine_epsilon(dtype: str) -> None:
    assert tolerance.unit_roundoff(dtype) == float(FINFO[dtype].eps) / 2


def test_accumulation_unit_defaults() -> None:
    single = tolerance.unit_roundoff("float32")
    assert tolerance.accumulation_unit("float16") == single
    assert tolerance.accumulation_unit("bfloat16") == single
    assert tolerance.accumulation_unit("float32") == single
    assert tolerance.accumulation_unit("float64") == tolerance.unit_roundoff("float64")
    assert tolerance.accumulation_unit("bfloat16", "float64") == tolerance.unit_roundoff("float64")
    with pytest.raises(ValueError, match="unsupported dtype"):
        tolerance.unit_roundoff("int8")


def test_reduction_factor() -> None:
    depth = int(tolerance.constant("tree_depth"))
    absorbed = [tolerance.reduction_factor(2**k, "tree") for k in range(depth + 1)]
    assert set(absorbed) == {1.0}, "a tree up to 2**depth is absorbed in the constants"
    assert tolerance.reduction_factor(2 ** (2 * depth), "tree") == 2
    sequential = [tolerance.reduction_factor(n, "sequential") for n in (depth + 1, 4 * depth + 1)]
    assert sequential == [1.0, 4.0], "sequential reductions grow linearly"
    with pytest.raises(ValueError, match="unknown reduction"):
        tolerance.reduction_factor(8, "butterfly")


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("eps_outside", [False, True])
def test_row_statistics_match_numpy(unbiased: bool, eps_outside: bool) -> None:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((5, 33)) * 3 + 7
    stats = tolerance.row_statistics(
        x, K.EPS, center=True, unbiased=unbiased, eps_outside=eps_outside
    )
    ddof = int(unbiased)
    var = np.var(x, axis=1, ddof=ddof)
    s = np.std(x, axis=1, ddof=ddof) + K.EPS if eps_outside else np.sqrt(var + K.EPS)
    rms = np.linalg.norm(x, axis=1) / np.sqrt(x.shape[1])
    np.testing.assert_allclose(stats.mean, x.mean(axis=1))
    np.testing.assert_allclose(stats.var, var)
    np.testing.assert_allclose(stats.s, s)
    np.testing.assert_allclose(stats.kappa, rms / s)
    np.testing.assert_allclose(stats.x_hat, (x - x.mean(axis=1, keepdims=True)) / s[:, None])


def test_row_statistics_rms_and_edge_rows() -> None:
    x = np.array([[3.0, 4.0], [1e300, -1e300], [np.nan, 1.0], [2.0, np.inf]])
    stats = tolerance.row_statistics(x, 0.0, center=False, unbiased=False, eps_outside=False)
    assert stats.mean[0] == 0, "RMS norms are not centred"
    np.testing.assert_allclose(stats.s[:2], [np.sqrt(12.5), 1e300])
    np.testing.assert_allclose(stats.kappa[:2], [1.0, 1.0])
    assert np.isnan(stats.s[2:]).all()
    assert np.isnan(stats.x_hat[2:]).all()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_faithful_results_never_fail(dtype: str) -> None:
    """One ulp from the reference is always inside the bound, whatever the data."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((16, 64)) * 1e-3 + 50).astype(K.DTYPES[dtype])
    w, b = K.make_affine(rng, 64, dtype)
    reference = K.f64(R.layer_norm(x, 64, w, b, K.EPS))
    stats = tolerance.row_statistics(
        K.f64(x), K.EPS, center=True, unbiased=False, eps_outside=False
    )
    shape = x.shape
    bound = tolerance.forward_bound(
        stats,
        np.broadcast_to(K.f64(w), shape),
        np.broadcast_to(K.f64(b), shape),
        reference,
        out_dtype=dtype,
        acc_unit=tolerance.unit_roundoff("float64"),
        reduction="tree",
        n=64,
    )
    stored = reference.astype(K.DTYPES[dtype])
    for direction in (np.inf, -np.inf):
        neighbour = K.f64(np.nextafter(stored, np.asarray(direction, dtype=stored.dtype)))
        assert metrics.compare(neighbour, reference, bound, dtype).mismatched == 0


def test_every_constant_has_a_reason_and_no_literal_lives_elsewhere() -> None:
    """All tolerance numbers are in CONSTANTS; the formulas may use only 0, 1 and 2 (a half of
    a root's argument, twice a perturbation), never a tuned number."""
    for name, (value, reason) in tolerance.CONSTANTS.items():
        assert value > 0, name
        assert len(reason) > 20, f"{name} needs its reason"
    tree = ast.parse(inspect.getsource(tolerance))
    table = next(
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "CONSTANTS"
    )
    inside = {id(node) for node in ast.walk(table)}
    stray = [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, int | float)
        and not isinstance(node.value, bool)
        and id(node) not in inside
        and node.value not in (0, 1, 2)
    ]
    assert not stray, f"numeric literals outside CONSTANTS: {stray}"
