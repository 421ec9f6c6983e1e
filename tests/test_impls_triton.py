"""Our Triton kernels (``impls.triton`` and its Gemma twin ``impls.triton.gemma``).

Without a GPU they run under Triton's interpreter on the CPU, so shapes stay small. What is
tested: every function's output and gradients against float64 autograd in every dtype; rows and
groups wider than one tile; layouts (strided views with NaN in the gaps, channels-last) giving
bitwise the results of contiguous inputs; bitwise determinism, the weight and bias gradients of
a multi-program backward included; Gemma's ``1 + w``; DeepNorm's ``alpha``; ``normalized_shape``
as an int or a sequence; ``rms_norm``'s ``eps=None``; ``out=`` buffers written whole and
returned, without autograd; the adapters' declarations; the error without triton; and
certification through the engine, large means (κ = 1e5) and provided buffers included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from impls.adapter import AdapterError

try:  # first: the adapter chooses Triton's interpreter before triton is imported
    import impls.triton as adapter
    from impls.triton import gemma, runtime, tiling
except AdapterError:
    pytest.importorskip("triton")  # skips only where triton is missing
    raise

ROOT = Path(__file__).resolve().parents[1]
DEVICE = runtime.DEVICES[0]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT32_EPS = torch.finfo(torch.float32).eps

#: Allowed error against float64 autograd on well-conditioned inputs (κ about 1), in units of
#: ``eps(dtype) * scale``, with the reason for each; ``scale`` is the largest expected magnitude
#: or :data:`NATURAL_SCALE`, whichever is larger.
TOLERANCE_EPS: dict[torch.dtype, tuple[float, str]] = {
    torch.float32: (
        16.0,
        "float32 throughout: tree sums of up to 2**13 terms and about ten roundings in the "
        "statistics, the affine step and dx = rstd*(g - mean(g) - x_hat*mean(g*x_hat)), whose "
        "cancellation can double them; a dropped term errs by O(1)",
    ),
    torch.float16: (
        2.0,
        "one rounding into float16 (half an eps of the largest value) dominates; the float32 "
        "arithmetic before it adds 2**-13 of an eps",
    ),
    torch.bfloat16: (2.0, "as float16: the final rounding into bfloat16 dominates"),
}
#: Inputs, weights and upstream gradients here are O(1) by construction, so every output and
#: gradient is judged on a scale of at least 1: a result that cancels to 0 exactly (a one-element
#: row's x_hat) is 1e-15 in float64 autograd, not 0, and relative error means nothing there.
NATURAL_SCALE = 1.0

ALPHA = {"fused": 0.5, "deep": 2.0}  # exact in every dtype: z's rounding is then the reference's


# -- helpers ---------------------------------------------------------------------------------------


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    """``actual`` within :data:`TOLERANCE_EPS` of the float64 ``expected``."""
    __tracebackhide__ = True
    assert actual.shape == expected.shape, (
        f"{what}: shape {actual.shape}, expected {expected.shape}"
    )
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    expected = expected.detach().cpu()
    error = (actual.detach().double().cpu() - expected).abs()
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, NATURAL_SCALE)
    bound = TOLERANCE_EPS[dtype][0] * torch.finfo(dtype).eps * scale
    bad = ~(error <= bound)
    if bad.any():
        index = tuple(
            int(i) for i in torch.unravel_index(error.nan_to_num(math.inf).argmax(), error.shape)
        )
        pytest.fail(
            f"{what} ({dtype}): mismatched elements: {int(bad.sum())} / {error.numel()} · max abs "
            f"error {float(error.max()):.3e} at index {index} · bound {bound:.3e} · ACTUAL "
            f"{float(actual[index]):.9g} · DESIRED {float(expected[index]):.9g}"
        )


def assert_bitwise_equal(first: torch.Tensor, second: torch.Tensor, what: str) -> None:
    """The same bits (NaN and signed zeros included)."""
    __tracebackhide__ = True
    assert first.dtype == second.dtype, f"{what}: {first.dtype} vs {second.dtype}"
    assert first.shape == second.shape, f"{what}: {first.shape} vs {second.shape}"
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    a = first.detach().contiguous().view(ints[first.dtype])
    b = second.detach().contiguous().view(ints[second.dtype])
    differ = a != b
    if differ.any():
        pytest.fail(f"{what}: {int(differ.sum())} / {a.numel()} elements differ in their bits")


def draw(
    shape: tuple[int, ...], dtype: torch.dtype, seed: int, offset: float = 0.0
) -> torch.Tensor:
    """Normal values plus ``offset``, rounded into ``dtype``, on the kernels' device."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator, dtype=torch.float64) + offset
    return values.to(dtype).to(DEVICE)


@contextlib.contextmanager
def lowered_tiles(**limits: int) -> Iterator[None]:
    """Smaller tile limits (:mod:`impls.triton.tiling`), taken as they are also under the
    interpreter, so that small rows and groups take the chunked paths; restored afterwards."""
    limits = {"INTERPRETED_SCALE": 1, **limits}
    saved = {name: getattr(tiling, name) for name in limits}
    for name, value in limits.items():
        setattr(tiling, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(tiling, name, value)


@dataclasses.dataclass(frozen=True)
class Norm:
    """One adapter function, and its float64 reference written with torch ops.

    ``ours(t)`` and ``reference(t, dtype)`` take the same leaves by argument name (``input``,
    ``other`` for the residual or sublayer output, ``weight``, ``bias``) and return a tuple of
    outputs; ``dtype`` is the dtype under test (the add-norms round ``z`` into it).
    """

    name: str
    ours: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ...]]
    reference: Callable[[dict[str, torch.Tensor], torch.dtype], tuple[torch.Tensor, ...]]
    inputs: tuple[str, ...]
    shape: tuple[int, ...] = (4, 40)


def _rounded(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``z`` rounded into ``dtype`` and back (autograd passes gradients through unchanged)."""
    return z.to(dtype).to(torch.float64)


def _rms(x: torch.Tensor, weight: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + FLOAT32_EPS)
    return x * rstd * (weight + offset)


def _width(t: dict[str, torch.Tensor]) -> int:
    return t["input"].shape[-1]


NORMS = (
    Norm(
        "layer_norm",
        lambda t: (adapter.layer_norm(t["input"], _width(t), t["weight"], t["bias"]),),
        lambda t, _: (F.layer_norm(t["input"], (_width(t),), t["weight"], t["bias"]),),
        ("input", "weight", "bias"),
    ),
    Norm(
        "rms_norm",
        lambda t: (adapter.rms_norm(t["input"], [_width(t)], t["weight"]),),
        lambda t, _: (_rms(t["input"], t["weight"]),),
        ("input", "weight"),
    ),
    Norm(
        "deep_norm",
        lambda t: (
            adapter.deep_norm(
                t["input"], t["other"], (_width(t),), t["weight"], t["bias"], ALPHA["deep"]
            ),
        ),
        lambda t, dtype: (
            F.layer_norm(
                _rounded(ALPHA["deep"] * t["input"] + t["other"], dtype),
                (_width(t),),
                t["weight"],
                t["bias"],
            ),
        ),
        ("input", "other", "weight", "bias"),
    ),
    Norm(
        "fused_add_layer_norm",
        lambda t: adapter.fused_add_layer_norm(
            t["input"], t["other"], _width(t), t["weight"], t["bias"], alpha=ALPHA["fused"]
        ),
        lambda t, dtype: _fused_reference(t, dtype, center=True),
        ("input", "other", "weight", "bias"),
    ),
    Norm(
        "fused_add_rms_norm",
        lambda t: adapter.fused_add_rms_norm(
            t["input"], t["other"], _width(t), t["weight"], alpha=ALPHA["fused"]
        ),
        lambda t, dtype: _fused_reference(t, dtype, center=False),
        ("input", "other", "weight"),
    ),
    Norm(
        "group_norm",
        lambda t: (adapter.group_norm(t["input"], 3, t["weight"], t["bias"]),),
        lambda t, _: (F.group_norm(t["input"], 3, t["weight"], t["bias"]),),
        ("input", "weight", "bias"),
        (2, 6, 3, 5),
    ),
    Norm(
        "gemma.rms_norm",
        lambda t: (gemma.rms_norm(t["input"], _width(t), t["weight"]),),
        lambda t, _: (_rms(t["input"], t["weight"], offset=1.0),),
        ("input", "weight"),
    ),
    Norm(
        "gemma.fused_add_rms_norm",
        lambda t: gemma.fused_add_rms_norm(
            t["input"], t["other"], _width(t), t["weight"], alpha=ALPHA["fused"]
        ),
        lambda t, dtype: _fused_reference(t, dtype, center=False, offset=1.0),
        ("input", "other", "weight"),
    ),
)
NORMS_BY_NAME = {norm.name: norm for norm in NORMS}


def _fused_reference(
    t: dict[str, torch.Tensor], dtype: torch.dtype, *, center: bool, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    z = _rounded(t["input"] + ALPHA["fused"] * t["other"], dtype)
    if center:
        return F.layer_norm(z, (_width(t),), t["weight"], t["bias"]), z
    return _rms(z, t["weight"], offset), z


def _leaves(norm: Norm, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    channels = norm.shape[1] if norm.name == "group_norm" else norm.shape[-1]
    values = {
        "input": draw(norm.shape, dtype, seed, offset=0.5),
        "other": draw(norm.shape, dtype, seed + 1),
        "weight": 1.0 + 0.5 * draw((channels,), dtype, seed + 2).float(),
        "bias": draw((channels,), dtype, seed + 3),
    }
    return {name: values[name].to(dtype).requires_grad_() for name in norm.inputs}


def run_with_gradients(
    fn: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ...]],
    leaves: dict[str, torch.Tensor],
    upstream: list[torch.Tensor],
) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """The outputs of ``fn`` and the gradients of every leaf for the given upstream gradients."""
    outputs = fn(leaves)
    torch.autograd.backward(
        list(outputs), [u.to(o.dtype) for u, o in zip(upstream, outputs, strict=True)]
    )
    grads = {}
    for name, leaf in leaves.items():
        assert leaf.grad is not None, f"no gradient for {name}"
        grads[name] = leaf.grad
    return outputs, grads


def _outputs_and_grads(
    fn: Callable[..., Any], inputs: list[torch.Tensor], upstream: torch.Tensor
) -> list[torch.Tensor]:
    """``fn``'s outputs, then the gradients of its positional ``inputs`` (as fresh leaves),
    ``upstream`` flowing into every output."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward(list(outputs), [upstream] * len(outputs))
    return [*outputs, *(leaf.grad for leaf in leaves if leaf.grad is not None)]


def _upstream(norm: Norm, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    count = 2 if "fused" in norm.name else 1
    return [draw(norm.shape, dtype, seed + 10 + i) for i in range(count)]


def check_against_float64(norm: Norm, dtype: torch.dtype, seed: int) -> None:
    """Outputs and gradients of ``norm`` within tolerance of float64 autograd."""
    __tracebackhide__ = True
    leaves = _leaves(norm, dtype, seed)
    upstream = _upstream(norm, dtype, seed)
    outputs, grads = run_with_gradients(norm.ours, leaves, upstream)
    exact = {k: v.detach().double().cpu().requires_grad_() for k, v in leaves.items()}
    expected, expected_grads = run_with_gradients(
        lambda t: norm.reference(t, dtype), exact, [u.double().cpu() for u in upstream]
    )
    for index, (got, want) in enumerate(zip(outputs, expected, strict=True)):
        assert_close(got, want, dtype, f"{norm.name} output {index}")
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], leaves[name].dtype, f"{norm.name} grad of {name}")


# -- accuracy against float64 autograd -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("norm", NORMS, ids=lambda n: n.name)
def test_outputs_and_gradients_match_float64_autograd(norm: Norm, dtype: torch.dtype) -> None:
    check_against_float64(norm, dtype, seed=7)


@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 70),
    width=st.integers(1, 300),
    name=st.sampled_from(["layer_norm", "rms_norm"]),
)
@example(rows=1, width=1, name="layer_norm")
@example(rows=70, width=129, name="rms_norm")  # several row blocks; a last chunk of one column
@example(rows=3, width=256, name="layer_norm")  # exactly two chunks
def test_any_row_shape_matches_float64_autograd(rows: int, width: int, name: str) -> None:
    """Rows of any width, held whole or (above 128 columns here) walked in chunks of 128."""
    norm = dataclasses.replace(NORMS_BY_NAME[name], shape=(rows, width))
    with lowered_tiles(MAX_TILE_COLUMNS=128, CHUNK_COLUMNS=128):
        check_against_float64(norm, torch.float32, seed=rows * 1000 + width)


# -- wide rows and groups --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "width", "limits"),
    [
        ("layer_norm", 9000, {}),  # above MAX_TILE_COLUMNS: the default chunks
        ("fused_add_layer_norm", 5000, {"MAX_TILE_COLUMNS": 1024, "CHUNK_COLUMNS": 1024}),
        ("fused_add_rms_norm", 5000, {"MAX_TILE_COLUMNS": 1024, "CHUNK_COLUMNS": 1024}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_rows_wider_than_a_tile(
    name: str, width: int, limits: dict[str, int], dtype: torch.dtype
) -> None:
    """Widths that are no power of two: the last chunk is partial."""
    norm = dataclasses.replace(NORMS_BY_NAME[name], shape=(3, width))
    with lowered_tiles(**limits):
        assert not tiling.row_tiling(width).single_tile
        check_against_float64(norm, dtype, seed=11)


@pytest.mark.parametrize("shape", [(2, 6, 9, 9), (3, 12, 40)], ids=["4d", "3d"])
def test_groups_larger_than_a_tile(shape: tuple[int, ...]) -> None:
    norm = dataclasses.replace(NORMS_BY_NAME["group_norm"], shape=shape)
    with lowered_tiles(MAX_GROUP_TILE=64):
        assert not tiling.group_tiling(shape[1] // 3, math.prod(shape[2:])).single_tile
        check_against_float64(norm, torch.float32, seed=13)


# -- layouts ---------------------------------------------------------------------------------------


def _laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``t`` in ``layout``: ``strided``, every other element of a NaN-filled
    buffer (a kernel reading outside the view reads NaN); or ``channels_last``."""
    if layout == "channels_last":
        return t.contiguous(memory_format=_CHANNELS_LAST[t.dim()])
    wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), math.nan, dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


@pytest.mark.parametrize(
    ("name", "shape", "layout"),
    [
        ("layer_norm", (3, 2, 50), "strided"),
        ("fused_add_rms_norm", (5, 33), "strided"),
        ("deep_norm", (2, 3, 20), "strided"),
        ("group_norm", (2, 6, 5, 7), "strided"),
        ("group_norm", (2, 6, 5, 7), "channels_last"),
        ("group_norm", (2, 6, 3, 4, 5), "channels_last"),
    ],
)
def test_layouts_give_the_results_of_contiguous_inputs(
    name: str, shape: tuple[int, ...], layout: str
) -> None:
    """Bit for bit, outputs and gradients: the kernels read views through their strides, with
    the same tiles and sums as for contiguous rows."""
    norm = dataclasses.replace(NORMS_BY_NAME[name], shape=shape)
    upstream = _upstream(norm, torch.bfloat16, 21)
    results = []
    for how in ("contiguous", layout):
        leaves = _leaves(norm, torch.bfloat16, 21)
        for key in ("input", "other"):
            if key in leaves and how != "contiguous":
                leaves[key] = _laid_out(leaves[key].detach(), how).requires_grad_()
        outputs, grads = run_with_gradients(norm.ours, leaves, upstream)
        results.append([*outputs, *grads.values()])
    for index, (got, want) in enumerate(zip(results[1], results[0], strict=True)):
        assert_bitwise_equal(got, want, f"{name} {layout}: result {index}")
    if layout == "channels_last":
        layout_kept = results[1][0].is_contiguous(memory_format=_CHANNELS_LAST[len(shape)])
        assert layout_kept, "the output keeps the input's channels-last layout"


# -- determinism -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        # 3 row blocks of 512 under the interpreter (18 of 64 on a GPU): programs share the
        # backward, and each sums several blocks
        ("layer_norm", (1100, 127)),
        ("fused_add_layer_norm", (1100, 127)),
        ("group_norm", (40, 6, 16)),  # 120 groups, several programs
    ],
)
def test_repeated_calls_are_bitwise_equal(name: str, shape: tuple[int, ...]) -> None:
    norm = dataclasses.replace(NORMS_BY_NAME[name], shape=shape)
    blocks = math.ceil(shape[0] / tiling.row_tiling(shape[-1]).block_m)
    if name != "group_norm":
        assert min(blocks, runtime.program_slots(torch.device(DEVICE))) > 1, "one program only"
    results = []
    for _ in range(2):
        leaves = _leaves(norm, torch.float32, seed=31)
        outputs, grads = run_with_gradients(norm.ours, leaves, _upstream(norm, torch.float32, 31))
        results.append([*outputs, *grads.values()])
    for index, (first, second) in enumerate(zip(*results, strict=True)):
        assert_bitwise_equal(first, second, f"{name}: result {index}")


# -- conventions -----------------------------------------------------------------------------------


def test_gemma_is_the_plain_kernel_with_one_plus_weight() -> None:
    """``gemma.rms_norm(x, w) == rms_norm(x, 1 + w)`` bit for bit in float32 (the kernel adds
    the offset in float32, as torch does), and the weight gradient is that of ``w``."""
    x = draw((6, 40), torch.float32, 41, offset=0.3)
    w = draw((40,), torch.float32, 42)
    upstream = draw((6, 40), torch.float32, 43)
    ours = _outputs_and_grads(lambda a, b: gemma.rms_norm(a, 40, b), [x, w], upstream)
    plain = _outputs_and_grads(lambda a, b: adapter.rms_norm(a, 40, b + 1.0), [x, w], upstream)
    for index, (got, want) in enumerate(zip(ours, plain, strict=True)):
        assert_bitwise_equal(got, want, f"gemma vs plain with 1 + w: result {index}")


def test_gemma_without_a_weight_scales_by_one() -> None:
    x = draw((4, 40), torch.float16, 44)
    assert_bitwise_equal(gemma.rms_norm(x, 40), adapter.rms_norm(x, 40), "no weight")


def test_deep_norm_is_layer_norm_of_alpha_input_plus_sublayer() -> None:
    """float32, ``alpha = 2`` (exact): ``deep_norm(x, f) == layer_norm(2x + f)`` bit for bit,
    and the input gradient is ``alpha`` times the sublayer output's."""
    alpha = 2.0
    x, f = draw((5, 64), torch.float32, 51), draw((5, 64), torch.float32, 52)
    w, b = draw((64,), torch.float32, 53), draw((64,), torch.float32, 54)
    upstream = draw((5, 64), torch.float32, 55)
    deep = _outputs_and_grads(
        lambda a, s: adapter.deep_norm(a, s, 64, w, b, alpha=alpha), [x, f], upstream
    )
    plain = _outputs_and_grads(lambda a: adapter.layer_norm(a, 64, w, b), [alpha * x + f], upstream)
    assert_bitwise_equal(deep[0], plain[0], "output")
    assert_bitwise_equal(deep[2], plain[1], "grad of the sublayer output = dz")
    assert_bitwise_equal(deep[1], plain[1] * alpha, "grad of the input = alpha * dz")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_deep_norm_alpha_need_not_be_exact(dtype: torch.dtype) -> None:
    """DeepNet's ``alpha = (2 * 12) ** 0.25``: ``z`` rounds, within a rounding of the exact
    ``alpha * x + f`` rounded into the dtype."""
    alpha = 24.0**0.25
    norm = dataclasses.replace(
        NORMS_BY_NAME["deep_norm"],
        ours=lambda t: (
            adapter.deep_norm(t["input"], t["other"], 40, t["weight"], t["bias"], alpha),
        ),
        reference=lambda t, d: (
            F.layer_norm(
                _rounded(alpha * t["input"] + t["other"], d), (40,), t["weight"], t["bias"]
            ),
        ),
    )
    check_against_float64(norm, dtype, seed=56)


def test_fused_add_gradients_include_the_returned_sum() -> None:
    """``grad_input = dz``, ``grad_residual = alpha * dz`` with ``dz`` the norm's gradient plus
    the returned ``z``'s upstream gradient."""
    x, r = draw((4, 48), torch.float32, 61), draw((4, 48), torch.float32, 62)
    g_out, g_sum = draw((4, 48), torch.float32, 63), draw((4, 48), torch.float32, 64)
    leaves = [x.clone().requires_grad_(), r.clone().requires_grad_()]
    y, z = adapter.fused_add_rms_norm(leaves[0], leaves[1], 48, alpha=0.5)
    torch.autograd.backward([y, z], [g_out, g_sum])
    z_leaf = z.detach().clone().requires_grad_()
    adapter.rms_norm(z_leaf, 48).backward(g_out)
    grad_input, grad_residual, grad_z = leaves[0].grad, leaves[1].grad, z_leaf.grad
    assert grad_input is not None
    assert grad_residual is not None
    assert grad_z is not None
    dz = grad_z + g_sum
    assert_close(grad_input, dz.double(), torch.float32, "grad of the input")
    assert_bitwise_equal(grad_residual, grad_input * 0.5, "grad of the residual")


@pytest.mark.parametrize(
    "normalized_shape", [40, [40], (40,), torch.Size([40])], ids=["int", "list", "tuple", "size"]
)
def test_normalized_shape_may_be_an_int_or_a_sequence(normalized_shape: Any) -> None:
    x, w = draw((3, 40), torch.float16, 71), draw((40,), torch.float16, 72)
    assert_bitwise_equal(
        adapter.layer_norm(x, normalized_shape, w), adapter.layer_norm(x, [40], w), "int vs list"
    )


def test_two_normalized_dims_are_one_row() -> None:
    """Normalising over ``(4, 10)`` is normalising rows of 40, bit for bit, also from a strided
    view whose two dims cannot merge into one stride (then read from a contiguous copy)."""
    x = draw((3, 4, 10), torch.float32, 73)
    w = draw((4, 10), torch.float32, 74)
    one = adapter.layer_norm(x.reshape(3, 40), 40, w.reshape(40))
    for layout in ("contiguous", "strided"):
        laid = x if layout == "contiguous" else _laid_out(x, "strided")
        two = adapter.layer_norm(laid, (4, 10), w)
        assert_bitwise_equal(two.reshape(3, 40), one, f"over (4, 10), {layout}, vs over 40")


def test_rms_norm_eps_none_is_float32_machine_epsilon() -> None:
    x = draw((4, 32), torch.bfloat16, 81) * 1e-3  # mean(x^2) near eps: eps matters
    assert_bitwise_equal(
        adapter.rms_norm(x, 32), adapter.rms_norm(x, 32, eps=2.0**-23), "eps=None vs 2**-23"
    )
    assert not torch.equal(adapter.rms_norm(x, 32), adapter.rms_norm(x, 32, eps=1e-6))


def test_bad_arguments_say_what_is_wrong() -> None:
    x = draw((3, 40), torch.float32, 91)
    with pytest.raises(ValueError, match="does not match the trailing dims"):
        adapter.layer_norm(x, 39)
    with pytest.raises(ValueError, match="must divide"):
        adapter.group_norm(draw((2, 6, 4), torch.float32, 92), 4)
    with pytest.raises(TypeError, match="float32, float16, bfloat16"):
        adapter.rms_norm(x.double(), 40)


# -- provided buffers (out=) -----------------------------------------------------------------------

#: Each trailing norm called with ``out`` (None: without it), on leaves named as in :data:`NORMS`.
OUT_CALLS: dict[str, Callable[[dict[str, torch.Tensor], Any], Any]] = {
    "layer_norm": lambda t, out: adapter.layer_norm(
        t["input"], _width(t), t["weight"], t["bias"], out=out
    ),
    "rms_norm": lambda t, out: adapter.rms_norm(t["input"], [_width(t)], t["weight"], out=out),
    "deep_norm": lambda t, out: adapter.deep_norm(
        t["input"], t["other"], _width(t), t["weight"], t["bias"], ALPHA["deep"], out=out
    ),
    "fused_add_layer_norm": lambda t, out: adapter.fused_add_layer_norm(
        t["input"], t["other"], _width(t), t["weight"], t["bias"], alpha=ALPHA["fused"], out=out
    ),
    "fused_add_rms_norm": lambda t, out: adapter.fused_add_rms_norm(
        t["input"], t["other"], _width(t), t["weight"], alpha=ALPHA["fused"], out=out
    ),
    "gemma.rms_norm": lambda t, out: gemma.rms_norm(t["input"], _width(t), t["weight"], out=out),
    "gemma.fused_add_rms_norm": lambda t, out: gemma.fused_add_rms_norm(
        t["input"], t["other"], _width(t), t["weight"], alpha=ALPHA["fused"], out=out
    ),
}


def _as_tuple(result: Any) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize(
    ("name", "shape", "layout"),
    [
        *((name, (4, 40), "contiguous") for name in OUT_CALLS),
        ("layer_norm", (70, 300), "contiguous"),  # row blocks and chunks (tiles lowered)
        ("fused_add_rms_norm", (70, 300), "contiguous"),
        ("layer_norm", (3, 2, 50), "strided"),  # a buffer the kernel cannot write: a copy
        ("fused_add_layer_norm", (5, 33), "strided"),
    ],
)
def test_out_receives_bitwise_the_result_and_is_returned(
    name: str, shape: tuple[int, ...], layout: str
) -> None:
    """NaN-filled ``out=`` buffers come back themselves, every element written with bitwise
    the result of the call without ``out=``."""
    norm = dataclasses.replace(NORMS_BY_NAME[name], shape=shape)
    leaves = {key: leaf.detach() for key, leaf in _leaves(norm, torch.bfloat16, 101).items()}
    with lowered_tiles(MAX_TILE_COLUMNS=128, CHUNK_COLUMNS=128):
        expected = _as_tuple(OUT_CALLS[name](leaves, None))
        given = tuple(_laid_out(torch.full_like(e, math.nan), layout) for e in expected)
        got = _as_tuple(OUT_CALLS[name](leaves, given if len(given) > 1 else given[0]))
    assert len(got) == len(given)
    for index, (returned, buffer, want) in enumerate(zip(got, given, expected, strict=True)):
        assert returned is buffer, f"{name}: result {index} is not the out= tensor given"
        assert_bitwise_equal(buffer, want, f"{name} out= {layout}: result {index}")


def test_out_refuses_autograd_as_torch_does() -> None:
    x = draw((3, 40), torch.float32, 111).requires_grad_()
    buffer = torch.empty_like(x, requires_grad=False)
    with pytest.raises(RuntimeError, match="out= do not support automatic differentiation"):
        adapter.layer_norm(x, 40, out=buffer)
    with torch.no_grad():
        assert adapter.layer_norm(x, 40, out=buffer) is buffer


def test_bad_out_buffers_say_what_is_wrong() -> None:
    x, r = draw((3, 40), torch.float32, 121), draw((3, 40), torch.float32, 122)
    with pytest.raises(ValueError, match=r"out= output is \[3, 41\] torch.float32"):
        adapter.rms_norm(x, 40, out=torch.empty(3, 41))
    with pytest.raises(ValueError, match="expected the input's"):
        adapter.layer_norm(x, 40, out=torch.empty(3, 40, dtype=torch.float16))
    with pytest.raises(
        TypeError, match=r"must be the tuple \(output, residual_out\), got a Tensor"
    ):
        adapter.fused_add_rms_norm(x, r, 40, out=torch.empty_like(x))


# -- the adapters ----------------------------------------------------------------------------------


def test_adapters_declare_what_they_do() -> None:
    from impls.loader import load_adapter

    plain, gemma_adapter = load_adapter("impls.triton"), load_adapter("impls.triton.gemma")
    assert plain.norms() == (
        "layer_norm",
        "rms_norm",
        "group_norm",
        "deep_norm",
        "fused_add_rms_norm",
        "fused_add_layer_norm",
    )
    assert set(plain.statistics) == {"layer_norm", "rms_norm", "group_norm"}
    assert gemma_adapter.norms() == ("rms_norm", "fused_add_rms_norm")
    assert plain.out == tuple(n for n in plain.norms() if n != "group_norm")
    assert gemma_adapter.out == gemma_adapter.norms()
    for a in (plain, gemma_adapter):
        assert a.devices == (("cpu",) if runtime.INTERPRETED else ("cuda",))
        assert set(a.dtypes.values()) == {("float32", "float16", "bfloat16")}
        assert a.reduction == "tree"
        assert a.deterministic
    assert plain.convention("rms_norm") == {}
    assert plain.convention("fused_add_layer_norm") == {"add_rounding": "dtype"}
    assert gemma_adapter.convention("rms_norm") == {"weight_offset": 1.0}


def test_without_triton_the_adapter_says_how_to_install_it() -> None:
    probe = (
        "import sys\n"
        "sys.modules['triton'] = None\n"
        "from impls.adapter import AdapterError\n"
        "try:\n"
        "    import impls.triton\n"
        "except AdapterError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    expected = "the triton adapter needs the triton package: pip install 'normconf[triton]'"
    assert done.stdout.strip() == expected


def test_kernels_compile_for_a_gpu() -> None:
    """What the interpreter tolerates the compiler may not: each kernel and tile mode compiled
    to a cubin for sm_90 by Triton's own toolchain (no GPU needed)."""
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend to compile with")
    done = subprocess.run(
        [sys.executable, "-m", "impls.triton.compile_check", "--quick"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "14 of 14 variants compile for sm_90" in done.stdout


# -- through the engine ----------------------------------------------------------------------------

CERTIFIED_CASES = {
    "impls.triton": (
        "layer_norm-float32-4x768-large_mean_k1e5-s1",
        "fused_add_layer_norm-float32-2x3x768-large_mean_k1e5-nc-s2",
        "group_norm-float32-2x6x5x7-large_mean_k1e5-cl-g2-s3",
        "rms_norm-bfloat16-2x4096-subnormal-s4",
        "deep_norm-float16-8x127-overflow_squares-s5",
        "layer_norm-bfloat16-4x6x10-normal-nd2-noaffine-s6",
    ),
    "impls.triton.gemma": (
        "rms_norm-bfloat16-8x127-normal-s7",
        "fused_add_rms_norm-float16-3x7-near_eps-nc-s8",
    ),
}


@pytest.mark.parametrize("spec", sorted(CERTIFIED_CASES))
def test_certification_passes_through_the_engine(spec: str) -> None:
    """Graded by the tolerance model against the correctly rounded references: forward,
    statistics, backward and determinism, large means (κ = 1e5), subnormals, overflowing
    squares, strided and channels-last layouts, and the NaN-poisoned ``out=`` buffers of every
    norm that declares them."""
    from conformance.engine import certify, select_cases
    from impls.loader import load_adapter

    cases = select_cases(case_ids=CERTIFIED_CASES[spec])
    certified = load_adapter(spec)
    record = certify(certified, cases, device=DEVICE)
    failures = [
        f"{c.check_id}: {c.message} {c.diagnosis or ''}"
        for c in record.checks
        if c.verdict == "fail"
    ]
    assert not failures, "\n".join(failures)
    kinds = {c.kind for c in record.checks if c.verdict == "pass"}
    assert {"forward", "backward", "determinism"} <= kinds
    declared = {c.case_id for c in cases if c.norm in certified.out}
    buffers = {c.case_id for c in record.checks if (c.kind, c.output) == ("contract", "out")}
    assert buffers == declared, "provided-buffer checks, where out= is declared"
    assert any(c.output == "output (out=)" for c in record.checks)
