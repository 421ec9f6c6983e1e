"""Speed certification: how fast an adapter's norms run, against the hardware and a baseline.

**What is timed.** For each norm the adapter implements and each of float32, float16 and
bfloat16 it declares, on a few shapes per device (:data:`TRAILING_SHAPES`,
:data:`CHANNEL_SHAPES`; ``--quick`` takes the first two), the forward pass (no autograd) and,
where the adapter has one, the backward pass (``torch.autograd.grad`` of every differentiable
input, through a graph an untimed forward builds afresh before each call). Calls are timed by
:mod:`conformance.timing` with independently drawn input sets rotated so that they outgrow the
cache. float64 is not timed.

**The bytes model** (:func:`bytes_moved`) counts the compulsory traffic of a pass: every tensor
the pass must read or write, once. With ``E`` elements of the input, ``P`` affine parameters
(the normalized size for the trailing norms, the channels for the channel norms), ``G``
reduction groups and ``s`` bytes per element of the dtype (statistics are float32, 4 bytes):

========================  ==============================================================
forward reads             x (E·s); residual or sublayer output (E·s) for the add-norms and
                          DeepNorm; weight and bias (P·s each, where the norm has them);
                          BatchNorm's running mean and variance (P·s each)
forward writes            y (E·s); the new residual z (E·s) for the add-norms; the saved
                          statistics (mean and rstd, G·4 each; rstd only for the RMS norms);
                          BatchNorm's running statistics (P·s each)
backward reads            dy (E·s); dz (E·s) for the add-norms; x, or z for the add-norms
                          and DeepNorm (E·s); weight (P·s); the statistics (as written)
backward writes           dx (E·s); d residual or d sublayer (E·s) for the add-norms and
                          DeepNorm; dweight and dbias (P·s each)
========================  ==============================================================

Effective bandwidth = bytes / median time; ``fraction_of_ceiling`` divides it by the copy
bandwidth measured in the same run (:func:`conformance.timing.measure_ceiling`).

**Verdicts** (one per norm, dtype, shape and direction; separate from accuracy): fail when the
outputs of the timed calls, checked again after timing against a float64 evaluation
(:mod:`conformance.reverify`) under the tolerance model, are wrong (a kernel fast because it
skips work); when any accuracy check of that norm and dtype failed in the run (a kernel that
fails accuracy never gets a speed pass); when the fraction of the ceiling is below the
threshold (rows narrower than ``fraction_min_row`` are exempt: launch-bound, they are judged
by the ratio alone); or when the baseline (default ``torch``, timed in the same run on the
same inputs) is faster by more than the ratio threshold allows. Thresholds come from
:data:`CONFIG_FILE`; flags override them.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from conformance import watch
from conformance.calls import first_line
from conformance.cases import Case, case_seed, with_norm_defaults
from conformance.inputs import torch_dtype
from conformance.results import CheckResult, SpeedResult
from conformance.reverify import DIFFERENTIABLE, reverify
from conformance.specs import call_arguments, call_keywords, spec

SPEED_DTYPES = ("float32", "float16", "bfloat16")
#: (rows, normalized size) of the trailing norms, per device.
TRAILING_SHAPES: Mapping[str, tuple[tuple[int, ...], ...]] = {
    "cuda": ((16384, 1024), (16384, 4096), (16384, 8192)),
    "cpu": ((1024, 1024), (4096, 1024), (4096, 4096)),
}
#: (batch, channels, height, width) of the channel norms, per device (GroupNorm: 32 groups).
CHANNEL_SHAPES: Mapping[str, tuple[tuple[int, ...], ...]] = {
    "cuda": ((16, 256, 64, 64), (32, 512, 64, 64), (64, 512, 64, 64)),
    "cpu": ((4, 64, 64, 64), (16, 64, 64, 64), (16, 256, 64, 64)),
}
GROUPS = 32
DIRECTIONS = ("forward", "backward")
CONFIG_FILE = Path(__file__).with_name("speed.toml")
_STAT_BYTES = 4


@dataclass(frozen=True)
class Thresholds:
    """The speed thresholds of one device (see ``speed.toml``)."""

    min_fraction_forward: float
    min_fraction_backward: float
    min_ratio: float
    fraction_min_row: int

    def min_fraction(self, direction: str) -> float:
        return self.min_fraction_forward if direction == "forward" else self.min_fraction_backward


def load_thresholds(
    device: str,
    path: Path | None = None,
    *,
    min_fraction: float | None = None,
    min_ratio: float | None = None,
) -> Thresholds:
    """The thresholds for ``device`` from the config file, overridden by the flags given."""
    path = path or CONFIG_FILE
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))[device]
        thresholds = Thresholds(
            min_fraction_forward=float(table["min_fraction_forward"]),
            min_fraction_backward=float(table["min_fraction_backward"]),
            min_ratio=float(table["min_ratio"]),
            fraction_min_row=int(table["fraction_min_row"]),
        )
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"speed thresholds {path}: [{device}] is unreadable ({exc!r})") from None
    if min_fraction is not None:
        thresholds = replace(
            thresholds, min_fraction_forward=min_fraction, min_fraction_backward=min_fraction
        )
    if min_ratio is not None:
        thresholds = replace(thresholds, min_ratio=min_ratio)
    return thresholds


@dataclass(frozen=True)
class SpeedCase:
    """One timed configuration: a norm in a dtype at a shape, forward or backward."""

    norm: str
    dtype: str
    shape: tuple[int, ...]
    direction: str

    @property
    def speed_id(self) -> str:
        return f"{self.norm}-{self.dtype}-{'x'.join(map(str, self.shape))}-{self.direction}"

    def case(self, seed: int = 0) -> Case:
        """The accuracy case of the same norm, dtype and shape (its parameters, its tolerance
        model); normal inputs."""
        groups = GROUPS if self.norm == "group_norm" else 1
        return with_norm_defaults(
            Case(self.norm, self.dtype, self.shape, "normal", seed, num_groups=groups)
        )


def speed_cases(
    adapter: Any,
    device: str,
    *,
    norms: Sequence[str] | None = None,
    dtypes: Sequence[str] | None = None,
    quick: bool = False,
) -> list[SpeedCase]:
    """The speed battery for ``adapter`` on ``device``, filtered like the accuracy battery."""
    chosen = []
    for norm in adapter.norms():
        if norms and norm not in norms:
            continue
        shapes = (TRAILING_SHAPES if spec(norm).trailing else CHANNEL_SHAPES)[device]
        shapes = shapes[:2] if quick else shapes
        for dtype in SPEED_DTYPES:
            if (dtypes and dtype not in dtypes) or not adapter.supports(norm, dtype, device):
                continue
            for shape in shapes:
                directions = DIRECTIONS if adapter.backward.get(norm, False) else DIRECTIONS[:1]
                chosen += [SpeedCase(norm, dtype, shape, d) for d in directions]
    return chosen


def bytes_moved(case: Case, direction: str) -> int:
    """The compulsory traffic of one ``direction`` pass of ``case`` (see the module table)."""
    s, g = spec(case.norm), case.grouping
    size = int(np.dtype(np.float16 if case.dtype == "bfloat16" else case.dtype).itemsize)
    elements, params, groups = case.elements, g.params, g.groups
    affine = (1 + int(s.has_bias)) if case.affine else 0
    stats = (2 if s.center else 1) * groups * _STAT_BYTES
    summand = int(s.summand is not None)
    running = 2 * params * size if case.norm == "batch_norm" else 0
    if direction == "forward":
        reads = (1 + summand) * elements * size + affine * params * size + running
        writes = (1 + int(s.fused)) * elements * size + stats + running
        return reads + writes
    reads = (2 + int(s.fused)) * elements * size + int(case.affine) * params * size + stats
    writes = (1 + summand) * elements * size + affine * params * size
    return reads + writes


# -- inputs and calls ----------------------------------------------------------------------------


@dataclass
class InputSet:
    """One independently drawn set of tensors for a case, and what the calls left in it."""

    tensors: dict[str, Any]
    upstream: dict[str, Any]
    outputs: Any = None
    leaves: dict[str, Any] | None = None
    graph_outputs: list[Any] | None = None


def draw_sets(case: Case, device: str, count: int, seed: int) -> list[InputSet]:
    """``count`` sets of tensors for ``case``, each drawn independently from a normal
    distribution (no set is a shift or scaling of another; no tensor is zeros)."""
    import torch

    dtype = torch_dtype(case.dtype)
    s, g = spec(case.norm), case.grouping
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(shape: tuple[int, ...], scale: float = 1.0, mean: float = 0.0) -> Any:
        values = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        return (values * scale + mean).to(dtype)

    param_shape = tuple(case.shape[-case.norm_dims :]) if s.trailing else (g.params,)
    sets = []
    for _ in range(count):
        t: dict[str, Any] = {"input": normal(case.shape)}
        if s.summand is not None:
            t[s.summand] = normal(case.shape, 0.5)
        t["weight"] = normal(param_shape, 0.25, 1.0) if case.affine else None
        t["bias"] = normal(param_shape, 0.25) if case.affine and s.has_bias else None
        if case.norm == "batch_norm":
            t["running_mean"] = normal((g.params,), 0.1)
            t["running_var"] = (normal((g.params,), 0.1).float().abs() + 0.5).to(dtype)
        up = {"grad_output": normal(case.shape)}
        if s.fused:
            up["grad_residual_out"] = normal(case.shape)
        sets.append(InputSet(t, up))
    return sets


class Runner:
    """The calls of one adapter on one case's input sets: forward (no autograd), or backward
    through a graph that an untimed forward builds afresh before each timed backward (so no
    backward ever runs twice through one graph: compiled backward passes may donate their
    buffers)."""

    def __init__(self, fn: Callable[..., Any], case: Case, sets: list[InputSet]) -> None:
        self.fn, self.case, self.sets = fn, case, sets
        self.args = [call_arguments(case.norm, st.tensors, case.parameters()) for st in sets]
        self.keywords = call_keywords(case.norm, case.parameters())

    def forward(self, i: int) -> Any:
        import torch

        watch.begin("timed forward")  # each call restarts the watchdog's clock
        with torch.no_grad():
            out = self.fn(*self.args[i], **self.keywords)
        self.sets[i].outputs = out
        return out

    def graph(self, i: int) -> None:
        """Set ``i``'s leaves (requiring grad) and one forward through autograd, kept for the
        next :meth:`backward` of the set (untimed)."""
        st = self.sets[i]
        leaves = {
            k: v.detach().clone().requires_grad_(True)
            for k, v in st.tensors.items()
            if v is not None and k in DIFFERENTIABLE
        }
        args = call_arguments(self.case.norm, {**st.tensors, **leaves}, self.case.parameters())
        if self.case.norm == "batch_norm":  # the running statistics: the set's own copies
            args[1], args[2] = st.tensors["running_mean"].clone(), st.tensors["running_var"].clone()
        watch.begin("forward before a timed backward")
        out = self.fn(*args, **self.keywords)
        st.leaves = leaves
        st.graph_outputs = list(out) if isinstance(out, tuple | list) else [out]

    def backward(self, i: int) -> Any:
        import torch

        st = self.sets[i]
        assert st.leaves is not None
        assert st.graph_outputs is not None
        upstream = [st.upstream["grad_output"]]
        if len(st.graph_outputs) > 1:
            upstream.append(st.upstream["grad_residual_out"])
        watch.begin("timed backward")
        grads = torch.autograd.grad(st.graph_outputs, list(st.leaves.values()), upstream)
        st.outputs = dict(zip(st.leaves, grads, strict=True))
        st.graph_outputs = None  # the graph is spent
        return grads


# -- the battery ---------------------------------------------------------------------------------


def accuracy_failures(checks: Sequence[CheckResult]) -> set[tuple[str, str]]:
    """The (norm, dtype) pairs with a failed accuracy check."""
    return {(c.norm, c.dtype) for c in checks if c.verdict == "fail"}


def judge(
    result: SpeedResult,
    thresholds: Thresholds,
    *,
    accuracy_failed: bool,
    reverify_problem: str | None,
    row: int,
) -> SpeedResult:
    """``result`` with its verdict and a message that gives every reason."""
    reasons = []
    if reverify_problem is not None:
        reasons.append(f"outputs after timing are wrong: {reverify_problem}")
    if accuracy_failed:
        reasons.append(f"{result.norm} {result.dtype} failed accuracy checks in this run")
    need = thresholds.min_fraction(result.direction)
    fraction = result.fraction_of_ceiling
    if fraction is not None and row >= thresholds.fraction_min_row and fraction < need:
        reasons.append(f"{fraction:.0%} of the copy bandwidth, below the {need:.0%} required")
    if result.ratio is not None and result.ratio < thresholds.min_ratio:
        reasons.append(
            f"{1 / result.ratio:.2f}x the baseline {result.baseline}'s time (at most "
            f"{1 / thresholds.min_ratio:.2f}x allowed)"
        )
    figures = f"{result.gbps:.1f} GB/s"
    if fraction is not None:
        figures += f", {fraction:.0%} of the ceiling"
    if result.ratio is not None:
        figures += f", {result.ratio:.2f}x {result.baseline}'s speed"
    verdict = "fail" if reasons else "pass"
    message = figures + ("; " + "; ".join(reasons) if reasons else "")
    return replace(result, verdict=verdict, message=message, reverified=reverify_problem is None)


def time_case(
    adapter: Any,
    sc: SpeedCase,
    device: str,
    sets: list[InputSet],
    budget: Any = None,
) -> tuple[Any, InputSet]:
    """Time one adapter on one speed case: the timing, and the input set of the last call."""
    from conformance.timing import time_calls

    case = sc.case()
    runner = Runner(adapter.functions[sc.norm], case, sets)
    last = [0]
    backward = sc.direction == "backward"

    def call(i: int) -> Any:
        last[0] = i
        return runner.backward(i) if backward else runner.forward(i)

    prepare = runner.graph if backward else None
    try:
        timing = time_calls(call, len(sets), device, budget, prepare=prepare)
        if device == "cuda":
            import torch

            torch.cuda.synchronize()
    finally:
        watch.end()
    return timing, sets[last[0]]


def result_of(
    sc: SpeedCase, device: str, timing: Any, ceiling: Mapping[str, Any] | None, reproduce: str
) -> SpeedResult:
    """The figures of one timing, not yet judged."""
    moved = bytes_moved(sc.case(), sc.direction)
    gbps = moved / timing.median / 1e9
    fraction = gbps / ceiling["gbps"] if ceiling and ceiling.get("gbps") else None
    return replace(
        _blank(sc, device, reproduce),
        method=timing.method,
        rounds=timing.rounds,
        median_s=timing.median,
        p25_s=timing.p25,
        p75_s=timing.p75,
        min_s=timing.minimum,
        gbps=gbps,
        fraction_of_ceiling=fraction,
    )


def _blank(sc: SpeedCase, device: str, reproduce: str) -> SpeedResult:
    """A result with no figures (NaN times), verdict ``skip``."""
    nan = math.nan
    return SpeedResult(
        speed_id=sc.speed_id,
        norm=sc.norm,
        dtype=sc.dtype,
        direction=sc.direction,
        shape=sc.shape,
        device=device,
        bytes=bytes_moved(sc.case(), sc.direction),
        method="",
        rounds=0,
        median_s=nan,
        p25_s=nan,
        p75_s=nan,
        min_s=nan,
        gbps=nan,
        fraction_of_ceiling=None,
        verdict="skip",
        reproduce=reproduce,
    )


def row_length(sc: SpeedCase) -> int:
    return sc.case().grouping.n


def run_speed(
    adapter: Any,
    baseline: Any | None,
    speed_battery: Sequence[SpeedCase],
    *,
    device: str,
    conventions: Mapping[str, Mapping[str, Any]],
    thresholds: Thresholds,
    failed_accuracy: set[tuple[str, str]],
    reproduce: Callable[[SpeedCase], str],
    ceiling: Mapping[str, Any] | None,
    progress: Callable[[int, int, SpeedResult], None] | None = None,
    budget: Any = None,
    timer: Callable[..., SpeedResult] | None = None,
) -> list[SpeedResult]:
    """Time every speed case for ``adapter`` (and ``baseline`` on the same inputs), re-verify
    and judge each. ``timer`` replaces :func:`time_one` (an isolated run times each case in its
    worker process)."""
    results = []
    for done, sc in enumerate(speed_battery, 1):
        result = (timer or time_one)(
            adapter,
            baseline,
            sc,
            device=device,
            conventions=conventions,
            thresholds=thresholds,
            accuracy_failed=(sc.norm, sc.dtype) in failed_accuracy,
            reproduce=reproduce(sc),
            ceiling=ceiling,
            budget=budget,
        )
        results.append(result)
        if progress is not None:
            progress(done, len(speed_battery), result)
    return results


def time_one(
    adapter: Any,
    baseline: Any | None,
    sc: SpeedCase,
    *,
    device: str,
    conventions: Mapping[str, Mapping[str, Any]],
    thresholds: Thresholds,
    accuracy_failed: bool,
    reproduce: str,
    ceiling: Mapping[str, Any] | None,
    budget: Any = None,
) -> SpeedResult:
    """One speed case: timed (with the baseline on the same inputs), re-verified, judged."""
    from conformance.timing import sets_needed

    same = baseline is None or baseline.spec == adapter.spec
    case = sc.case()
    convention = spec(sc.norm).convention(conventions.get(sc.norm, {}))
    count = sets_needed(bytes_moved(case, sc.direction), device)
    seed = case_seed(0, sc.speed_id)
    try:
        sets = draw_sets(case, device, count, seed)
        timing, last = time_case(adapter, sc, device, sets, budget)
        problem = reverify(case, last, sc.direction, convention, adapter.reduction)
    except Exception as exc:  # the adapter's failure is a finding; the battery goes on
        return failed_timing(
            sc, device, f"the timed call raised {type(exc).__name__}: {first_line(exc)}", reproduce
        )
    result = result_of(sc, device, timing, ceiling, reproduce)
    result = _with_baseline(result, adapter, baseline, sc, device, case, count, seed, same, budget)
    return judge(
        result,
        thresholds,
        accuracy_failed=accuracy_failed,
        reverify_problem=problem,
        row=row_length(sc),
    )


def _with_baseline(
    result: SpeedResult,
    adapter: Any,
    baseline: Any | None,
    sc: SpeedCase,
    device: str,
    case: Case,
    count: int,
    seed: int,
    same: bool,
    budget: Any,
) -> SpeedResult:
    if baseline is None:
        return result
    if same:
        return replace(result, baseline=baseline.name, baseline_median_s=result.median_s, ratio=1.0)
    if not baseline.supports(sc.norm, sc.dtype, device) or (
        sc.direction == "backward" and not baseline.backward.get(sc.norm, False)
    ):
        return result
    try:
        sets = draw_sets(case, device, count, seed)  # the same draws as the adapter's
        timing, _ = time_case(baseline, sc, device, sets, budget)
    except Exception:  # a baseline that cannot run this case gives no ratio
        return result
    return replace(
        result,
        baseline=baseline.name,
        baseline_median_s=timing.median,
        ratio=timing.median / result.median_s,
    )


def failed_timing(sc: SpeedCase, device: str, why: str, reproduce: str) -> SpeedResult:
    """A speed case that produced no timing, and ``why``."""
    return replace(_blank(sc, device, reproduce), verdict="fail", message=why)
