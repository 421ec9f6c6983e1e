"""The CUDA adapter (``impls.cuda``): its sources compile, it loads without a GPU, its Python
layer and its kernels are right, and on a GPU they agree with the references.

- build: the compile check (nvcc, no GPU) succeeds on the sources and fails, with nvcc's
  message, on a broken one; without nvcc it exits 2 with one line;
- loading: importing builds nothing, the adapter validates and declares CUDA only, and
  ``normconf certify`` without a GPU exits 2 with one line;
- the Python layer: :class:`ReferenceOps` stands in for the compiled operators (the kernels'
  math in float64 torch), so the layout, shape and autograd code runs anywhere, checked against
  ``torch.nn.functional`` in float64;
- the kernels on the CPU (needs nvcc, no GPU): the kernels and launchers under the emulation of
  :mod:`impls.cuda.emulation`, against float64 PyTorch for every dtype, row width (one row per
  warp and per block, full packs and the scalar fallback), misaligned and row-strided inputs,
  κ = 1e5, NaN and ±inf, bitwise determinism; and the whole adapter, emulated, through the
  engine's checks;
- GPU (skipped when torch sees none): the same comparisons on the device, the engine's checks
  for wide rows, widths that are not a multiple of the packs, κ = 1e5, misaligned and
  row-strided inputs, and bitwise determinism.

The emulated kernels are cached under ``$NORMCONF_CACHE/cuda/emulation`` (default
``~/.cache/normconf``), like the GPU build.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import impls.cuda as cuda
from conformance.cases import Case
from conformance.checks import Target, run_case
from impls import from_object, load_adapter
from impls.cuda import build, emulation

ROOT = Path(__file__).resolve().parent.parent


def _has_nvcc() -> bool:
    try:
        build.find_nvcc()
    except build.NvccNotFound:
        return False
    return True


HAS_NVCC = _has_nvcc()
HAS_GPU = torch.cuda.is_available()
needs_nvcc = pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not installed")
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="torch sees no CUDA GPU")

#: Relative error of the CPU stand-in against float64 torch: its statistics are rounded to
#: float32 (as the kernels return them) and backward works from those, so about 2**-24 per use,
#: a few uses deep; 2**-16 leaves a wide margin and still catches any wrong formula.
STANDIN_RTOL = 2.0**-16
#: Error allowed the kernels (on the GPU or emulated) against float64 PyTorch, in unit roundoffs
#: times the magnitude the error scales with (``scale`` in :func:`assert_near`): float32 sums of
#: short per-thread runs under up to 15 tree levels plus the elementwise steps, generously 64
#: float32 roundoffs; plus the roundings into the output dtype (the result's own, and the 16-bit
#: rstd-times-weight products), 4 of the output dtype's.
ACCUMULATION_ROUNDOFFS = 64
OUTPUT_ROUNDOFFS = 4
#: float64 PyTorch's own error, in float64 roundoffs of the magnitudes before cancellation
#: (``|x| * rstd`` where ours has ``|x - mean| * rstd``): its normalized values of one-element
#: rows, for example, are float64 roundings around 0, not 0.
REFERENCE_ROUNDOFFS = 64


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=environment, capture_output=True, text=True
    )


def without_nvcc(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH holds no nvcc and that names no CUDA toolkit."""
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    return {"PATH": str(empty), "CUDA_HOME": "", "CUDA_PATH": ""}


# -- build -------------------------------------------------------------------------------------


@needs_nvcc
@pytest.mark.slow
def test_compile_check_succeeds() -> None:
    seconds = build.compile_check()
    assert seconds > 0


@needs_nvcc
def test_broken_source_fails_with_nvcc_message(tmp_path: Path) -> None:
    broken = tmp_path / "broken.cu"
    broken.write_text(
        '#include "common.cuh"\n__global__ void broken(float* p) { p[0] = 1.0f }\n',
        encoding="utf-8",
    )
    with pytest.raises(build.CompileError) as caught:
        build.compile_check([broken], archs=("90",))
    message = str(caught.value)
    assert "broken.cu" in message
    assert "error" in message, message


def test_check_without_nvcc_exits_2_with_one_line(tmp_path: Path) -> None:
    done = run("-m", "impls.cuda.build", "--check", env=without_nvcc(tmp_path))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "nvcc not found" in lines[0]


def test_check_and_build_share_the_flags() -> None:
    command = build.compile_command("nvcc", build.CSRC / "forward.cu", Path("f.o"), ("90",))
    for flag in build.nvcc_flags(("90",)):
        assert flag in command
    assert "-gencode=arch=compute_90,code=sm_90" in command
    assert not any("fast_math" in flag or flag == "--ftz=true" for flag in command)


# -- loading -----------------------------------------------------------------------------------


def test_import_builds_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    script = (
        "import sys, impls.cuda, impls.cuda.build as b\n"
        "assert b._loaded is None and b._failure is None\n"
        "assert 'torch.utils.cpp_extension' not in sys.modules\n"
        "print('ok')\n"
    )
    done = run("-c", script, env={**without_nvcc(tmp_path), "NORMCONF_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert not cache.exists()


def test_adapter_validates_and_declares_cuda_only() -> None:
    adapter = from_object(cuda, "impls.cuda")
    assert adapter.name == "cuda (normconf C++)"
    assert adapter.devices == ("cuda",)
    assert adapter.norms() == ("layer_norm", "rms_norm")
    assert adapter.dtypes == dict.fromkeys(adapter.norms(), ("float32", "float16", "bfloat16"))
    assert adapter.reduction == "tree"
    assert adapter.deterministic
    assert set(adapter.statistics) == {"layer_norm", "rms_norm"}
    assert load_adapter("impls.cuda").devices == ("cuda",)


@pytest.mark.skipif(HAS_GPU, reason="checks the behaviour without a GPU")
@pytest.mark.parametrize(
    "device", [[], ["--device", "cpu"], ["--device", "cuda"]], ids=["auto", "cpu", "cuda"]
)
def test_certify_without_gpu_exits_2_with_one_line(device: list[str], tmp_path: Path) -> None:
    done = run(
        "-m",
        "conformance",
        "certify",
        "--adapter",
        "impls.cuda",
        "--quick",
        "--report-dir",
        str(tmp_path / "report"),
        *device,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "cuda" in lines[0].lower()
    assert not (tmp_path / "report").exists()


@pytest.mark.skipif(HAS_GPU, reason="checks the behaviour without a GPU")
def test_cpu_tensor_is_refused_before_any_build() -> None:
    with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
        cuda.layer_norm(torch.ones(2, 4), 4)
    assert build._loaded is None
    assert build._failure is None


def test_rms_norm_default_eps_is_float32_epsilon() -> None:
    assert cuda._rms_eps(None) == torch.finfo(torch.float32).eps == 2.0**-23
    assert cuda._rms_eps(1e-6) == 1e-6


# -- the Python layer, with the operators' math on the CPU -----------------------------------------


class ReferenceOps:
    """``torch.ops.normconf_cuda`` in float64 torch on the CPU: the kernels' formulas (module
    docstring of :mod:`impls.cuda`), the operators' argument checks and outputs. Records the eps
    of each forward call."""

    def __init__(self) -> None:
        self.eps: list[float] = []

    @staticmethod
    def _check_rows(t: torch.Tensor) -> None:
        assert t.dim() == 2, t.shape
        assert t.size(1) <= 1 or t.stride(1) == 1, (t.shape, t.stride())

    def forward(
        self,
        x: torch.Tensor,
        w: torch.Tensor | None,
        b: torch.Tensor | None,
        eps: float,
        center: bool,
    ) -> tuple[torch.Tensor, ...]:
        self._check_rows(x)
        for p in (w, b):
            assert p is None or (p.dim() == 1 and p.is_contiguous() and p.numel() == x.size(1))
        self.eps.append(eps)
        v = x.double()
        shift = v[:, :1]
        c = (v - shift).mean(1, keepdim=True) if center else torch.zeros_like(shift)
        d = (v - shift) - c if center else v
        r = 1 / torch.sqrt((d * d).mean(1, keepdim=True) + eps)
        y = d * r * (1 if w is None else w.double()) + (0 if b is None else b.double())
        stat = (shift + c).squeeze(1).float() if center else x.new_empty(0, dtype=torch.float32)
        centre = c.squeeze(1).float() if center else stat
        return y.to(x.dtype), stat, centre, r.squeeze(1).float()

    def backward(
        self,
        dy: torch.Tensor,
        x: torch.Tensor,
        w: torch.Tensor | None,
        centre: torch.Tensor | None,
        rstd: torch.Tensor,
        center: bool,
        need_dx: bool,
        need_dw: bool,
        need_db: bool,
    ) -> tuple[torch.Tensor, ...]:
        self._check_rows(x)
        self._check_rows(dy)
        assert (centre is not None) == center
        v, r = x.double(), rstd.double()[:, None]
        xhat = ((v - v[:, :1]) - centre.double()[:, None]) * r if centre is not None else v * r
        g = dy.double() * (1 if w is None else w.double())
        mean_g = g.mean(1, keepdim=True) if center else 0
        dx = r * (g - mean_g - xhat * (g * xhat).mean(1, keepdim=True))
        empty = x.new_empty(0)
        return (
            dx.to(x.dtype) if need_dx else empty,
            (dy.double() * xhat).sum(0).to(x.dtype) if need_dw else empty,
            dy.double().sum(0).to(x.dtype) if need_db else empty,
        )


def _transposed(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(*reversed(shape), dtype=torch.float64).transpose(0, -1)


LAYOUTS: dict[str, Callable[[tuple[int, ...]], torch.Tensor]] = {
    "contiguous": lambda shape: torch.randn(*shape, dtype=torch.float64),
    "every_other": lambda shape: torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64)[
        ..., ::2
    ],
    "row_strided": lambda shape: torch.randn(*shape[:-1], shape[-1] + 3, dtype=torch.float64)[
        ..., : shape[-1]
    ],
    "transposed": _transposed,
    "expanded_rows": lambda shape: torch.randn(shape[-1], dtype=torch.float64).expand(shape),
}

SHAPES = {
    "2d": ((5, 7), (7,)),
    "3d_two_dims": ((2, 3, 4), (3, 4)),
    "int_shape": ((4, 6), 6),
    "one_column": ((3, 1), (1,)),
    "zero_rows": ((0, 5), (5,)),
}


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _call_both(
    norm: str,
    x: torch.Tensor,
    normalized_shape: Any,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    ops: ReferenceOps,
) -> tuple[Any, Any]:
    """(ours through the stand-in, torch.nn.functional) on separate leaves of the same values."""
    ours_leaves = [None if t is None else _leaf(t) for t in (x, weight, bias)]
    torch_leaves = [None if t is None else _leaf(t) for t in (x, weight, bias)]
    center = norm == "layer_norm"
    eps = 1e-5 if center else cuda._rms_eps(None)
    dims = [int(d) for d in np.atleast_1d(normalized_shape)]
    xo, wo, bo = ours_leaves
    ours = cuda._normalize(xo, normalized_shape, wo, bo, eps, center, ops)
    xt, wt, bt = torch_leaves
    theirs = F.layer_norm(xt, dims, wt, bt, eps) if center else F.rms_norm(xt, dims, wt, eps)
    return (ours, ours_leaves), (theirs, torch_leaves)


def assert_relatively_close(actual: torch.Tensor, desired: torch.Tensor, what: str) -> None:
    __tracebackhide__ = True
    assert actual.shape == desired.shape, f"{what}: shape {actual.shape}, not {desired.shape}"
    scale = desired.abs().max().item() if desired.numel() else 0.0
    error = (actual - desired).abs().max().item() if desired.numel() else 0.0
    assert error <= STANDIN_RTOL * max(scale, 1.0), f"{what}: max error {error:.3g}"


#: (norm, affine parameters): RMSNorm has no bias.
AFFINE = [
    *(("layer_norm", affine) for affine in ("weight_bias", "weight", "bias", "none")),
    *(("rms_norm", affine) for affine in ("weight", "none")),
]


@pytest.mark.parametrize(("norm", "affine"), AFFINE, ids=["-".join(a) for a in AFFINE])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape_name", SHAPES)
def test_python_layer_matches_torch(norm: str, affine: str, layout: str, shape_name: str) -> None:
    shape, normalized_shape = SHAPES[shape_name]
    torch.manual_seed(len(shape_name) * 31 + len(layout))
    x = LAYOUTS[layout](shape)
    dims = list(np.atleast_1d(normalized_shape))
    weight = torch.randn(dims, dtype=torch.float64) if "weight" in affine else None
    bias = torch.randn(dims, dtype=torch.float64) if affine in ("weight_bias", "bias") else None
    ops = ReferenceOps()
    (ours, ours_leaves), (theirs, torch_leaves) = _call_both(
        norm, x, normalized_shape, weight, bias, ops
    )
    output, mean, rstd = ours
    assert_relatively_close(output, theirs, "output")
    batch = shape[: len(shape) - len(dims)]
    assert tuple(rstd.shape) == (*batch, *(1,) * len(dims))
    # _normalize's mean is an empty placeholder for RMSNorm (rms_norm_with_stats gives None).
    assert mean.numel() == 0 if norm == "rms_norm" else mean.shape == rstd.shape
    assert not rstd.requires_grad
    upstream = torch.randn(shape, dtype=torch.float64)
    output.backward(upstream)
    theirs.backward(upstream)
    names = ("input", "weight", "bias")
    for name, mine, reference in zip(names, ours_leaves, torch_leaves, strict=True):
        if mine is None:
            continue
        assert mine.grad is not None, f"no gradient for {name}"
        assert_relatively_close(mine.grad, reference.grad, f"grad_{name}")


def test_python_layer_asks_only_for_needed_gradients() -> None:
    calls: list[tuple[bool, bool, bool]] = []

    class Recording(ReferenceOps):
        def backward(self, *args: Any) -> tuple[torch.Tensor, ...]:
            calls.append(tuple(args[-3:]))
            return super().backward(*args)

    x = torch.randn(3, 8, dtype=torch.float64)
    weight = _leaf(torch.randn(8, dtype=torch.float64))
    bias = torch.randn(8, dtype=torch.float64)
    output, _, _ = cuda._normalize(x, 8, weight, bias, 1e-5, True, Recording())
    output.sum().backward()
    assert calls == [(False, True, False)]
    assert weight.grad is not None
    assert x.grad is None


def test_statistics_are_not_differentiable_and_rms_eps_reaches_the_kernel() -> None:
    ops = ReferenceOps()
    x = _leaf(torch.randn(2, 5, dtype=torch.float64))
    output, mean, rstd = cuda._normalize(x, 5, None, None, cuda._rms_eps(None), False, ops)
    assert mean.numel() == 0
    assert rstd.shape == (2, 1)
    assert ops.eps == [2.0**-23]
    assert output.requires_grad
    assert not rstd.requires_grad


def test_mismatched_shapes_are_refused() -> None:
    x = torch.randn(2, 5)
    with pytest.raises(RuntimeError, match="does not match"):
        cuda._normalize(x, 4, None, None, 1e-5, True, ReferenceOps())
    with pytest.raises(RuntimeError, match="weight"):
        cuda._normalize(x, 5, torch.ones(4), None, 1e-5, True, ReferenceOps())


# -- comparisons with float64 PyTorch ---------------------------------------------------------


def unit_roundoff(dtype: Any) -> float:
    """Half the machine epsilon of a torch or NumPy dtype."""
    if isinstance(dtype, torch.dtype):
        return torch.finfo(dtype).eps / 2
    return float(ml_dtypes.finfo(dtype).eps) / 2


def as_float64(values: Any) -> torch.Tensor:
    """Exact float64 CPU values of a tensor or array of any of the three dtypes."""
    if isinstance(values, torch.Tensor):
        return values.detach().double().cpu()
    return torch.from_numpy(np.asarray(values, dtype=np.float64))


def assert_near(
    actual: Any,
    desired: torch.Tensor,
    scale: torch.Tensor,
    reference_scale: torch.Tensor,
    what: str,
) -> None:
    """``|actual - desired| <= (ACCUMULATION_ROUNDOFFS u32 + OUTPUT_ROUNDOFFS u) scale +
    REFERENCE_ROUNDOFFS u64 reference_scale``, ``u`` the unit roundoff of ``actual``'s dtype; a
    numpy.testing-style message otherwise."""
    __tracebackhide__ = True
    u = unit_roundoff(actual.dtype)
    ours = ACCUMULATION_ROUNDOFFS * unit_roundoff(torch.float32) + OUTPUT_ROUNDOFFS * u
    bound = ours * scale + REFERENCE_ROUNDOFFS * unit_roundoff(torch.float64) * reference_scale
    values = as_float64(actual)
    assert values.shape == desired.shape, f"{what}: shape {values.shape}, not {desired.shape}"
    error = (values - desired).abs()
    bad = ~(error <= bound)
    if bad.any():
        worst = int(torch.argmax(torch.where(bad, error / bound, 0)).item())
        index = tuple(int(i) for i in np.unravel_index(worst, tuple(error.shape)))
        pytest.fail(
            f"{what}: Mismatched elements: {int(bad.sum())} / {bad.numel()} "
            f"({100 * bad.double().mean().item():.3g}%) · worst at index {index}: "
            f"ACTUAL {values[index].item():.9g} DESIRED {desired[index].item():.9g} "
            f"BOUND {bound[index].item():.3g}"
        )


@dataclass
class Float64Reference:
    """float64 PyTorch's results, the magnitude our error scales with for each (``scales``),
    and the magnitude of float64 PyTorch's own error (``reference_scales``)."""

    values: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]
    reference_scales: dict[str, torch.Tensor]


def _magnitudes(
    xhat: torch.Tensor, r: torch.Tensor, w: torch.Tensor, b: torch.Tensor, dy: torch.Tensor
) -> dict[str, torch.Tensor]:
    """What each result's rounding error is proportional to, for normalized values of
    magnitude ``xhat`` (cancellation in the sums of the gradients included)."""
    g = (dy * w).abs()
    return {
        "output": w.abs() * (xhat + 1) + b.abs(),
        "grad_input": r * (g + g.mean(1, keepdim=True) + xhat * (g * xhat).mean(1, True)),
        "grad_weight": (dy.abs() * xhat).sum(0),
        "grad_bias": dy.abs().sum(0),
    }


def float64_reference(
    center: bool,
    x: torch.Tensor,
    w: torch.Tensor | None,
    b: torch.Tensor | None,
    dy: torch.Tensor,
    eps: float,
) -> Float64Reference:
    """float64 PyTorch (autograd) on ``[rows, n]`` float64 CPU tensors."""
    n = x.shape[1]
    # Absent parameters are ones and zeros, as leaves: their gradients are what the kernels
    # compute whether or not the call had them.
    x64 = _leaf(x)
    w64 = _leaf(w if w is not None else torch.ones(n, dtype=torch.float64))
    b64 = _leaf(b if b is not None else torch.zeros(n, dtype=torch.float64))
    if center:
        y = F.layer_norm(x64, [n], w64, b64, eps)
        mu = x.mean(1, keepdim=True)
        r = 1 / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + eps)
    else:
        y = F.rms_norm(x64, [n], w64, eps)
        mu = torch.zeros_like(x[:, :1])
        r = 1 / torch.sqrt((x**2).mean(1, keepdim=True) + eps)
    y.backward(dy)
    xhat = ((x - mu) * r).abs()
    values = {
        "output": y.detach(),
        "mean": mu[:, 0],
        "rstd": r[:, 0],
        "grad_input": x64.grad,
        "grad_weight": w64.grad,
        "grad_bias": b64.grad if center else dy.sum(0),
    }
    w_abs, b_abs = w64.detach(), b64.detach()
    # The mean to a roundoff of itself and of the spread; rstd to roundoffs of itself.
    statistics = {"mean": mu[:, 0].abs() + 1 / r[:, 0], "rstd": r[:, 0]}
    return Float64Reference(
        values,
        {**_magnitudes(xhat, r, w_abs, b_abs, dy), **statistics},
        {**_magnitudes(xhat + x.abs() * r, r, w_abs, b_abs, dy), **statistics},
    )


# -- the kernels on the CPU (csrc/ under the emulation of csrc/emulation.h) ---------------------

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
#: Row widths: a single element; odd; one row per warp with full packs; not a multiple of the
#: packs; the warp/block threshold and one past it (128-thread blocks, no full packs); one row
#: per block with full packs (128 threads).
EMULATED_WIDTHS = (1, 7, 256, 1000, 1024, 1025, 2048)
#: Rows: more than the 32 rows of one weight-gradient chunk, so the chunks are summed too.
EMULATED_ROWS = 37
#: Element offsets and extra row stride of each input layout (NaN fills every gap).
INPUT_LAYOUTS = {
    "dense": (0, 0),
    "misaligned": (1, 0),
    "row_stride_plus_8": (0, 8),
    "row_stride_plus_1": (0, 1),
}


@pytest.fixture(scope="module")
def kernels() -> emulation.Kernels:
    """The emulated kernels, built on first use (cached, see :mod:`impls.cuda.emulation`)."""
    if not HAS_NVCC:
        pytest.skip("nvcc is not installed")
    return emulation.load()


def laid_out(values: np.ndarray, dtype: Any, layout: str) -> np.ndarray:
    """``values`` (float64, exact in ``dtype``) as a ``[rows, n]`` array of ``dtype`` in
    ``layout``, inside a NaN-filled buffer (a read past a row or the matrix gives NaN)."""
    rows, n = values.shape
    offset, pad = INPUT_LAYOUTS[layout]
    stride = n + pad
    buffer = emulation.aligned_empty(offset + rows * stride + emulation.GUARD, np.dtype(dtype))
    itemsize = buffer.itemsize
    matrix = np.lib.stride_tricks.as_strided(
        buffer[offset:], shape=(rows, n), strides=(stride * itemsize, itemsize)
    )
    matrix[...] = values.astype(dtype)
    return matrix


def draw(rng: np.random.Generator, dtype: Any, *shape: int, loc: float = 0.0) -> np.ndarray:
    """Normal values rounded into ``dtype``, as float64."""
    return rng.normal(loc, 1.0, shape).astype(dtype).astype(np.float64)


def emulated_run(
    kernels: emulation.Kernels,
    norm: str,
    dtype: str,
    x: np.ndarray,
    dy: np.ndarray,
    w: np.ndarray | None,
    b: np.ndarray | None,
    layout: str = "dense",
) -> dict[str, np.ndarray]:
    """Forward, input gradient and parameter gradients of the emulated kernels."""
    center, t = norm == "layer_norm", NP_DTYPES[dtype]
    eps = 1e-5 if center else cuda._rms_eps(None)
    xs, dys = laid_out(x, t, layout), laid_out(dy, t, layout)
    wt, bt = (None if p is None else laid_out(p[None], t, "dense")[0] for p in (w, b))
    y, mean, centre, rstd = kernels.forward(xs, wt, bt, eps, center)
    centre_or_none = centre if center else None
    dx = kernels.backward_input(dys, xs, wt, centre_or_none, rstd, center)
    dw, db = kernels.param_grads(dys, xs, centre_or_none, rstd, center)
    names = ("output", "mean", "rstd", "grad_input", "grad_weight", "grad_bias")
    return dict(zip(names, (y, mean, rstd, dx, dw, db), strict=True))


def assert_matches_float64(
    got: dict[str, Any], norm: str, x: np.ndarray, dy: np.ndarray, w: Any, b: Any
) -> None:
    """Every result in ``got`` (None: not computed) near float64 PyTorch's. The kernels give
    dw = sum(dy * xhat) and db = sum(dy) with or without a weight or bias; RMSNorm has no mean
    and no bias gradient."""
    __tracebackhide__ = True
    center = norm == "layer_norm"
    eps = 1e-5 if center else cuda._rms_eps(None)
    tensors = [None if v is None else torch.from_numpy(v) for v in (x, w, b, dy)]
    want = float64_reference(center, tensors[0], tensors[1], tensors[2], tensors[3], eps)
    skip = () if center else ("mean", "grad_bias")
    for name, value in got.items():
        if value is None or name in skip:
            continue
        scales = want.scales[name], want.reference_scales[name]
        assert_near(value, want.values[name], *scales, name)


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", NP_DTYPES)
@pytest.mark.parametrize("n", EMULATED_WIDTHS)
def test_emulated_kernels_match_float64_torch(
    kernels: emulation.Kernels, norm: str, dtype: str, n: int
) -> None:
    rng = np.random.default_rng(n)
    t = NP_DTYPES[dtype]
    x, dy = draw(rng, t, EMULATED_ROWS, n), draw(rng, t, EMULATED_ROWS, n)
    w, b = draw(rng, t, n), (draw(rng, t, n) if norm == "layer_norm" else None)
    got = emulated_run(kernels, norm, dtype, x, dy, w, b)
    assert_matches_float64(got, norm, x, dy, w, b)


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", NP_DTYPES)
@pytest.mark.parametrize("n", [64, 1000, 1040])
@pytest.mark.parametrize("layout", [name for name in INPUT_LAYOUTS if name != "dense"])
def test_emulated_kernels_read_any_layout(
    kernels: emulation.Kernels, norm: str, dtype: str, n: int, layout: str
) -> None:
    """Misaligned rows and other row strides: the scalar path, or packs with a row stride."""
    rng = np.random.default_rng(n + len(layout))
    t = NP_DTYPES[dtype]
    x, dy = draw(rng, t, EMULATED_ROWS, n), draw(rng, t, EMULATED_ROWS, n)
    w, b = draw(rng, t, n), (draw(rng, t, n) if norm == "layer_norm" else None)
    got = emulated_run(kernels, norm, dtype, x, dy, w, b, layout)
    assert_matches_float64(got, norm, x, dy, w, b)


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("n", [4100, 8192])
def test_emulated_kernels_on_wide_rows(kernels: emulation.Kernels, norm: str, n: int) -> None:
    """Blocks of 512 threads: a row is read in several passes of the block."""
    rng = np.random.default_rng(n)
    x, dy = draw(rng, np.float16, 3, n), draw(rng, np.float16, 3, n)
    w, b = draw(rng, np.float16, n), (draw(rng, np.float16, n) if norm == "layer_norm" else None)
    got = emulated_run(kernels, norm, "float16", x, dy, w, b)
    assert_matches_float64(got, norm, x, dy, w, b)


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("n", [64, 2048])
def test_emulated_kernels_without_weight_or_bias(
    kernels: emulation.Kernels, norm: str, n: int
) -> None:
    rng = np.random.default_rng(n)
    x, dy = draw(rng, np.float32, EMULATED_ROWS, n), draw(rng, np.float32, EMULATED_ROWS, n)
    got = emulated_run(kernels, norm, "float32", x, dy, None, None)
    assert_matches_float64(got, norm, x, dy, None, None)


@pytest.mark.parametrize("n", [128, 1000, 1040])
def test_emulated_statistics_at_kappa_1e5(kernels: emulation.Kernels, n: int) -> None:
    """Rows with mean = 1e5 x spread: outputs accurate to the spread, not to the mean (the
    shift by the row's first element); E[x^2] - E[x]^2 would lose every digit here."""
    rng = np.random.default_rng(n)
    x = draw(rng, np.float32, EMULATED_ROWS, n, loc=1e5)
    dy, w, b = draw(rng, np.float32, EMULATED_ROWS, n), draw(rng, np.float32, n), None
    got = emulated_run(kernels, "layer_norm", "float32", x, dy, w, b)
    assert_matches_float64(got, "layer_norm", x, dy, w, b)


@pytest.mark.parametrize("n", [7, 1000, 1040])
def test_emulated_nonfinite_rows_stay_in_their_row(kernels: emulation.Kernels, n: int) -> None:
    rng = np.random.default_rng(n)
    x, dy = draw(rng, np.float32, 4, n), draw(rng, np.float32, 4, n)
    x[0, n // 2], x[1, n - 1] = np.nan, np.inf
    got = emulated_run(kernels, "layer_norm", "float32", x, dy, None, None)
    for name in ("output", "grad_input"):
        assert np.isnan(got[name][0]).all(), name
        assert np.isfinite(got[name][2:]).all(), name
    assert np.isnan(got["mean"][0])
    assert np.isfinite(got["rstd"][2:]).all()


@pytest.mark.parametrize("n", [256, 1000, 1040])
def test_emulated_kernels_are_bitwise_deterministic(kernels: emulation.Kernels, n: int) -> None:
    """Fixed-order sums: repeated runs agree bit for bit, however the threads were scheduled."""
    rng = np.random.default_rng(n)
    t = NP_DTYPES["bfloat16"]
    x, dy = draw(rng, t, EMULATED_ROWS, n), draw(rng, t, EMULATED_ROWS, n)
    w, b = draw(rng, t, n), draw(rng, t, n)
    first, second = (emulated_run(kernels, "layer_norm", "bfloat16", x, dy, w, b) for _ in "ab")
    for name, values in first.items():
        assert values.tobytes() == second[name].tobytes(), name


@pytest.mark.parametrize("wanted", [(True, False), (False, True)], ids=["dw", "db"])
def test_emulated_parameter_gradients_one_at_a_time(
    kernels: emulation.Kernels, wanted: tuple[bool, bool]
) -> None:
    rng = np.random.default_rng(3)
    x, dy = draw(rng, np.float32, 300, 96), draw(rng, np.float32, 300, 96)
    xs, dys = laid_out(x, np.float32, "dense"), laid_out(dy, np.float32, "dense")
    _, _, centre, rstd = kernels.forward(xs, None, None, 1e-5, True)
    both = kernels.param_grads(dys, xs, centre, rstd, True)
    alone = kernels.param_grads(dys, xs, centre, rstd, True, wanted)
    for computed, full, one in zip(wanted, both, alone, strict=True):
        if computed:
            assert one.tobytes() == full.tobytes()
        else:
            assert np.isnan(one).all()


@pytest.mark.parametrize(
    ("rows", "n"), [(1, 1), (5, 7), (37, 4096), (300, 64), (100_000, 768), (10**7, 16)]
)
def test_weight_gradient_chunks_cover_the_rows(
    kernels: emulation.Kernels, rows: int, n: int
) -> None:
    chunks, per_chunk = kernels.plan(rows, n)
    assert 1 <= chunks <= 512
    assert (chunks - 1) * per_chunk < rows <= chunks * per_chunk
    assert kernels.plan(0, n) == (0, 0)


def test_emulation_detects_a_misaligned_pack(kernels: emulation.Kernels) -> None:
    """The check behind every emulated call: a 16-byte pack from a misaligned address (a fault
    on the GPU) is reported; the launchers never send one."""
    assert kernels.detects_misaligned_pack()


@pytest.fixture(scope="module")
def emulated_adapter(kernels: emulation.Kernels) -> Any:
    adapter = emulation.Emulated()
    adapter._operators = emulation.Operators(kernels)
    return from_object(adapter, "impls.cuda.emulation:Emulated")


@pytest.mark.parametrize(
    ("norm", "dtype", "shape", "distribution", "layout"),
    [
        ("layer_norm", "float32", (4, 1040), "large_mean_kmax", "contiguous"),
        ("layer_norm", "bfloat16", (3, 4, 100), "constant", "noncontiguous"),
        ("layer_norm", "float16", (6, 1000), "overflow_squares", "contiguous"),
        ("layer_norm", "float32", (5, 64), "subnormal", "contiguous"),
        ("rms_norm", "float16", (4, 1040), "near_eps", "noncontiguous"),
        ("rms_norm", "bfloat16", (6, 1000), "nonfinite", "contiguous"),
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v),
)
def test_emulated_adapter_passes_the_engine_checks(
    emulated_adapter: Any,
    norm: str,
    dtype: str,
    shape: tuple[int, ...],
    distribution: str,
    layout: str,
) -> None:
    """The whole adapter — Python layer and kernels, emulated — against the correctly rounded
    references and the tolerance model, on inputs that hurt."""
    eps = 1e-5 if norm == "layer_norm" else None
    case = Case(norm, dtype, shape, distribution, seed=sum(shape), layout=layout, eps=eps)
    target = Target(emulated_adapter, "cpu", {}, lambda c: c.case_id)
    failed = [r for r in run_case(target, case) if r.verdict == "fail"]
    assert not failed, "; ".join(f"{r.kind} {r.output}: {r.message} {r.diagnosis}" for r in failed)


#: The emulation runs each thread in turn: the quick battery's cases up to this many elements
#: (its 65537-row and 16385-wide cases would take minutes each).
EMULATED_ELEMENTS = 2**13


@pytest.mark.slow
def test_emulated_adapter_passes_the_quick_battery(emulated_adapter: Any) -> None:
    from conformance.engine import certify, select_cases

    cases = select_cases(norms=["layer_norm", "rms_norm"], quick=True)
    cases = [c for c in cases if c.elements <= EMULATED_ELEMENTS]
    # Still the layouts that break vector loads: misaligned, strided, transposed, expanded.
    inputs = {k for c in cases for k in c.layout.classes()}
    grads = {k for c in cases for k in c.grad_layout.classes()}
    assert {"offset", "strided", "transposed", "expanded"} <= inputs | grads
    assert {"tile_edge", "empty", "n1"} <= {k for c in cases for k in c.shape_classes}
    record = certify(emulated_adapter, cases, device="cpu", quick=True)
    failed = [c for c in record.checks if c.verdict == "fail"]
    assert record.verdict == "pass", "; ".join(f"{c.check_id}: {c.message}" for c in failed[:5])


# -- GPU ---------------------------------------------------------------------------------------

GPU_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Row widths: narrow (one row per warp), at the warp/block threshold, just past it, wide; and
#: widths that are not multiples of the 8-element packs (scalar fallback).
GPU_WIDTHS = (7, 768, 1000, 1024, 1025, 4096, 8192)


@needs_gpu
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("n", GPU_WIDTHS)
def test_gpu_matches_float64_torch(norm: str, dtype: str, n: int) -> None:
    torch.manual_seed(n)
    t, center = GPU_DTYPES[dtype], norm == "layer_norm"
    x, w, b, dy = (torch.randn(*s, device="cuda").to(t) for s in ((33, n), (n,), (n,), (33, n)))
    xc, wc, bc = (_leaf(v) for v in (x, w, b))
    if center:
        y, mean, rstd = cuda.layer_norm_with_stats(xc, [n], wc, bc)
    else:
        (y, mean, rstd), bc = cuda.rms_norm_with_stats(xc, [n], wc), None
    y.backward(dy)
    got = {
        "output": y,
        "mean": None if mean is None else mean.view(-1),
        "rstd": rstd.view(-1),
        "grad_input": xc.grad,
        "grad_weight": wc.grad,
        "grad_bias": None if bc is None else bc.grad,
    }
    x64, dy64, w64, b64 = (as_float64(v).numpy() for v in (x, dy, w, b))
    assert_matches_float64(got, norm, x64, dy64, w64, b64 if center else None)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` copied to one element past a 16-byte boundary: contiguous, but no row pointer is
    16-byte aligned (the scalar path), gradients flowing back to ``t``."""
    buffer = t.new_empty(t.numel() + 1)
    buffer[1:].view(t.shape).copy_(t)
    return buffer[1:].view(t.shape)


def _row_padded(pad: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``t`` inside a NaN-filled buffer whose rows are ``pad`` elements longer: read in place
    with that row stride (a multiple of 8 keeps the vector path, an odd pad forces the scalar
    one); a read past a row's end would poison the results."""

    def relayout(t: torch.Tensor) -> torch.Tensor:
        buffer = t.new_full((*t.shape[:-1], t.shape[-1] + pad), float("nan"))
        buffer[..., : t.shape[-1]].copy_(t)
        return buffer[..., : t.shape[-1]]

    return relayout


class Relaid:
    """impls.cuda with every input moved to another memory layout before the call."""

    normconf_devices = ("cuda",)
    normconf_dtypes = ("float32", "float16", "bfloat16")

    def __init__(self, relayout: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.relayout = relayout

    def layer_norm(self, input: torch.Tensor, *args: Any) -> torch.Tensor:
        return cuda.layer_norm(self.relayout(input), *args)

    def rms_norm(self, input: torch.Tensor, *args: Any) -> torch.Tensor:
        return cuda.rms_norm(self.relayout(input), *args)


RELAYOUTS: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "as_given": None,
    "misaligned": _misaligned,
    "row_stride_plus_8": _row_padded(8),
    "row_stride_plus_1": _row_padded(1),
}


def assert_engine_passes(
    norm: str, dtype: str, shape: tuple[int, ...], distribution: str, relayout: str
) -> None:
    """Every check the engine makes of one case (forward, statistics, backward, determinism)
    passes against the correctly rounded references and the tolerance model."""
    __tracebackhide__ = True
    how = RELAYOUTS[relayout]
    adapter = from_object(cuda if how is None else Relaid(how), f"impls.cuda ({relayout})")
    target = Target(adapter, "cuda", {}, lambda c: c.case_id)
    eps = 1e-5 if norm == "layer_norm" else None
    case = Case(norm, dtype, shape, distribution, seed=sum(shape), eps=eps)
    failed = [r for r in run_case(target, case) if r.verdict == "fail"]
    assert not failed, "; ".join(f"{r.kind} {r.output}: {r.message} {r.diagnosis}" for r in failed)


#: Row shapes for the engine's checks: wide (one row per block), not a multiple of the packs,
#: narrow (one row per warp), and just past the warp/block threshold with two batch dims.
ENGINE_SHAPES = [(2, 8192), (6, 1000), (16, 768), (3, 4, 1025)]


@needs_gpu
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", ENGINE_SHAPES)
@pytest.mark.parametrize("distribution", ["normal", "large_mean_k1e5", "near_eps", "nonfinite"])
def test_gpu_passes_the_engine_checks(
    norm: str, dtype: str, shape: tuple[int, ...], distribution: str
) -> None:
    assert_engine_passes(norm, dtype, shape, distribution, "as_given")


@needs_gpu
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", ENGINE_SHAPES[:2])
@pytest.mark.parametrize("relayout", [name for name in RELAYOUTS if name != "as_given"])
def test_gpu_passes_the_engine_checks_in_other_layouts(
    norm: str, dtype: str, shape: tuple[int, ...], relayout: str
) -> None:
    assert_engine_passes(norm, dtype, shape, "large_mean_k1e5", relayout)


@needs_gpu
@pytest.mark.slow
def test_gpu_quick_battery_passes() -> None:
    from conformance.engine import certify, select_cases

    adapter = load_adapter("impls.cuda")
    cases = select_cases(norms=["layer_norm", "rms_norm"], quick=True)
    record = certify(adapter, cases, device="cuda", quick=True)
    failed = [c for c in record.checks if c.verdict == "fail"]
    assert record.verdict == "pass", "; ".join(f"{c.check_id}: {c.message}" for c in failed[:5])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


@needs_gpu
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", [(4096, 768), (512, 8192), (300, 1000)])
def test_gpu_is_bitwise_deterministic(norm: str, dtype: str, shape: tuple[int, int]) -> None:
    torch.manual_seed(shape[1])
    t = GPU_DTYPES[dtype]
    n = shape[1]
    x, w, b, dy = (torch.randn(*s, device="cuda").to(t) for s in (shape, (n,), (n,), shape))
    results = []
    for _ in range(2):
        xc, wc, bc = (_leaf(v.clone()) for v in (x, w, b))
        if norm == "layer_norm":
            y, mean, rstd = cuda.layer_norm_with_stats(xc, n, wc, bc)
        else:
            y, mean, rstd = cuda.rms_norm_with_stats(xc, n, wc)
        y.backward(dy)
        outputs = [y, rstd, xc.grad, wc.grad]
        if norm == "layer_norm":
            outputs += [mean, bc.grad]
        results.append([_bits(o) for o in outputs])
    for first, second in zip(*results, strict=True):
        assert torch.equal(first, second)


@needs_gpu
@pytest.mark.parametrize("n", [128, 1000, 4096])
def test_gpu_statistics_at_kappa_1e5(n: int) -> None:
    """Rows with mean = 1e5 x spread: outputs accurate to the spread, not to the mean."""
    rng = np.random.default_rng(n)
    x = draw(rng, np.float32, 64, n, loc=1e5)
    dy, w = draw(rng, np.float32, 64, n), draw(rng, np.float32, n)
    xc, wc = (_leaf(torch.from_numpy(v).float().cuda()) for v in (x, w))
    y, mean, rstd = cuda.layer_norm_with_stats(xc, n, wc)
    y.backward(torch.from_numpy(dy).float().cuda())
    got = {
        "output": y,
        "mean": mean.view(-1),
        "rstd": rstd.view(-1),
        "grad_input": xc.grad,
        "grad_weight": wc.grad,
        "grad_bias": None,
    }
    assert_matches_float64(got, "layer_norm", x, dy, w, None)
