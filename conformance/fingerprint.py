"""Say why a failure fails: which convention or known defect the implementation matches.

When a check fails, the same inputs are evaluated under every *candidate* explanation — each
known convention (the references with one keyword changed, or a named preset), and each known
defect that has a clean model (ε ignored, bias ignored, groups formed from interleaved channels,
a backward that drops a term, a biased running variance, ...) — and the actual output is graded
against each with the same tolerance model. The first candidate it passes is the diagnosis
("matches ε added to the standard deviation (eps_placement='outside')"). Defects without a
clean model are recognised by their signature: NaN that stops propagating, rows whose sum of
squares exceeds float16's range, and a variance whose error scales with E[x²] rather than σ²
(the cancellation of E[x²] - E[x]²). Candidates are ordered simplest first.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from conformance import metrics, tolerance
from conformance.bounds import CaseModel
from conformance.expected import Expected, backward_references, compute
from conformance.inputs import CaseInputs
from conformance.results import Metrics
from conformance.specs import spec
from references.presets import presets_for

FLOAT16_MAX = 65504.0
#: A candidate explains a failure only if it is graded no worse than "within tolerance".
_ALTERNATIVES = {
    "variance": ("biased", "unbiased"),
    "eps_placement": ("inside", "outside"),
    "weight_offset": (0.0, 1.0),
    "add_rounding": ("dtype", "exact"),
    "running_variance": ("unbiased", "biased"),
    "momentum_weights": ("new", "running"),
}
_WORDS = {
    ("variance", "unbiased"): "unbiased variance, divided by n - 1",
    ("variance", "biased"): "biased variance, divided by n",
    ("eps_placement", "outside"): "ε added to the standard deviation",
    ("eps_placement", "inside"): "ε under the square root",
    ("weight_offset", 1.0): "scale 1 + weight (Gemma's)",
    ("weight_offset", 0.0): "scale = weight",
    ("add_rounding", "exact"): "the unrounded sum normalised",
    ("add_rounding", "dtype"): "the sum rounded into the input dtype before normalising",
    ("running_variance", "biased"): "biased running variance",
    ("running_variance", "unbiased"): "unbiased running variance",
    ("momentum_weights", "running"): "momentum weighting the running value (ONNX, Keras)",
    ("momentum_weights", "new"): "momentum weighting the new batch statistic (PyTorch)",
}


@dataclass(frozen=True)
class Candidate:
    """An explanation and how to compute what an implementation following it returns."""

    words: str
    values: Callable[[], Mapping[str, np.ndarray]]


def convention_words(changes: Mapping[str, Any]) -> str:
    parts = [f"{_WORDS.get((k, v), f'{k}={v!r}')} ({k}={v!r})" for k, v in changes.items()]
    return " and ".join(parts)


def _reference(
    inputs: CaseInputs, convention: Mapping[str, Any], backward: bool, **arrays: Any
) -> Callable[[], Mapping[str, np.ndarray]]:
    def run() -> Mapping[str, np.ndarray]:
        changed = replace(inputs, arrays={**inputs.arrays, **arrays})
        if "eps" in arrays:
            changed.arrays.pop("eps")
            changed.params = {**inputs.params, "eps": arrays["eps"]}
        values = dict(compute(changed, convention, backward=False).values)
        if backward:
            values.update(
                {k: v for k, v in backward_references(changed, convention).items() if v is not None}
            )
        return values

    return run


def _convention_candidates(
    inputs: CaseInputs, declared: Mapping[str, Any], backward: bool
) -> Iterator[Candidate]:
    keys = [k for k in declared if k in _ALTERNATIVES]
    for size in (1, 2):
        for combo in itertools.combinations(keys, size):
            changes = {}
            for k in combo:
                options = [v for v in _ALTERNATIVES[k] if v != declared[k]]
                changes[k] = options[0]
            yield Candidate(
                convention_words(changes), _reference(inputs, {**declared, **changes}, backward)
            )


def _defect_candidates(
    inputs: CaseInputs, declared: Mapping[str, Any], backward: bool
) -> Iterator[Candidate]:
    a, case = inputs.arrays, inputs.case
    if case.eps:
        yield Candidate("ε ignored (eps=0)", _reference(inputs, declared, backward, eps=0.0))
    if a.get("bias") is not None:
        yield Candidate("bias ignored", _reference(inputs, declared, backward, bias=None))
    if a.get("weight") is not None:
        yield Candidate("weight ignored", _reference(inputs, declared, backward, weight=None))
    for eps in (1e-6, 1e-5, 1e-3, 1e-12):
        if case.eps is not None and eps != case.eps:
            yield Candidate(
                f"ε = {eps:g} used instead of the eps argument ({case.eps:g})",
                _reference(inputs, declared, backward, eps=eps),
            )
    if case.norm == "group_norm":
        yield Candidate(
            "groups formed from interleaved channels (channel c in group c mod G)",
            lambda: _interleaved_groups(inputs, declared),
        )
        channels = case.shape[1]
        for groups, words in (
            (channels, "one group per channel"),
            (1, "one group of all channels"),
        ):
            if groups != case.num_groups:
                changed = replace(inputs, params={**inputs.params, "num_groups": groups})
                yield Candidate(
                    f"wrong group boundaries: {words} (num_groups={groups})",
                    _reference(changed, declared, backward),
                )


def _preset_candidates(inputs: CaseInputs, backward: bool) -> Iterator[Candidate]:
    op = inputs.case.norm
    for preset in (
        presets_for(op)
        if op in ("layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm")
        else []
    ):
        kwargs = dict(preset.arguments())
        eps = kwargs.pop("eps", inputs.params["eps"])
        convention = {k: v for k, v in kwargs.items() if k in spec(op).conventions}
        full = spec(op).convention(convention)
        words = f"the {preset.name} preset ({preset.source if hasattr(preset, 'source') else ''})"
        yield Candidate(words.replace(" ()", ""), _reference(inputs, full, backward, eps=eps))


def _constant(values: Mapping[str, np.ndarray]) -> Callable[[], Mapping[str, np.ndarray]]:
    return lambda: values


def _given(arrays: Mapping[str, np.ndarray | None], key: str) -> np.ndarray:
    value = arrays[key]
    if value is None:
        raise KeyError(key)
    return value


def _interleaved_groups(
    inputs: CaseInputs, declared: Mapping[str, Any]
) -> Mapping[str, np.ndarray]:
    case = inputs.case
    channels, groups = case.shape[1], case.num_groups
    order = np.argsort(np.arange(channels) % groups, kind="stable")
    inverse = np.argsort(order)
    arrays = dict(inputs.arrays)
    arrays["input"] = np.take(_given(inputs.arrays, "input"), order, axis=1)
    for key in ("weight", "bias"):
        given = arrays.get(key)
        if given is not None:
            arrays[key] = given[order]
    values = compute(replace(inputs, arrays=arrays), declared, backward=False).values
    return {"output": np.take(values["output"], inverse, axis=1)}


def _grad_drop_candidates(model: CaseModel, inputs: CaseInputs) -> Iterator[Candidate]:
    """Backward passes that treat part of the statistics as constants."""
    g_rows = model.rows(_given(inputs.grads, "grad_output")) * model.signed_scale
    x_hat = np.asarray(model.stats.x_hat)
    s = np.asarray(model.stats.s)[:, None]
    mean_g = g_rows.mean(axis=1, keepdims=True)
    mean_gx = (g_rows * x_hat).mean(axis=1, keepdims=True)
    center = spec(inputs.case.norm).center
    variants = [("the backward drops the gradient through the variance", g_rows - mean_g)]
    if center:
        variants.insert(
            0, ("the backward drops the gradient through the mean", g_rows - x_hat * mean_gx)
        )
    variants.append(("the backward treats the statistics as constants", g_rows))
    for words, rows in variants:
        yield Candidate(words, _constant({"grad_input": model.back(rows / s)}))


def _running_candidates(inputs: CaseInputs) -> Iterator[Candidate]:
    original = {
        k: np.asarray(inputs.arrays[k], dtype=np.float64) for k in ("running_mean", "running_var")
    }
    yield Candidate("running statistics not updated", lambda: original)


def candidates(
    kind: str, output: str, inputs: CaseInputs, declared: Mapping[str, Any], model: CaseModel
) -> Iterator[Candidate]:
    backward = kind == "backward"
    if backward and output == "grad_input" and not inputs.case.norm.startswith(("fused", "deep")):
        yield from _grad_drop_candidates(model, inputs)
    if kind == "running_stats":
        yield from _running_candidates(inputs)
    yield from _convention_candidates(inputs, declared, backward)
    yield from _defect_candidates(inputs, declared, backward)
    if not backward:
        yield from _preset_candidates(inputs, backward)


def _summary(m: Metrics) -> str:
    share = 100.0 * (m.n - m.mismatched) / max(m.n, 1)
    return f"{share:.4g}% of {m.n} elements within tolerance, max {m.max_ulp:.4g} ulp"


def diagnose(
    kind: str,
    output: str,
    inputs: CaseInputs,
    declared: Mapping[str, Any],
    actual: np.ndarray,
    exp: Expected,
    model: CaseModel,
    failed: Metrics,
    bound_for: Callable[[CaseModel], np.ndarray],
) -> str:
    """Words for a failed check: the candidate the output matches, or the defect's signature.

    ``bound_for`` computes the check's per-element bound for a case model, so a candidate is
    graded exactly as the implementation was.
    """
    dtype = inputs.case.dtype if output not in ("mean", "rstd") else "float32"
    bound = bound_for(model)
    best: tuple[float, str, Metrics] | None = None
    for cand in candidates(kind, output, inputs, declared, model):
        try:
            values = cand.values()
        except (ValueError, ArithmeticError, KeyError):
            continue  # a candidate that does not apply to these inputs explains nothing
        if output not in values or np.shape(values[output]) != np.shape(actual):
            continue
        candidate = _in_dtype(values[output], dtype)
        if not metrics.compare(candidate, exp.values[output], bound, dtype).mismatched:
            continue  # indistinguishable from the declared convention on these inputs
        m = metrics.compare(actual, candidate, bound, dtype)
        if m.mismatched == 0:
            return f"matches {cand.words}: {_summary(m)}"
        if best is None or m.max_ratio < best[0]:
            best = (m.max_ratio, cand.words, m)
    explained = _reduced_precision(output, actual, exp, model, bound_for) or _signature(
        kind, output, inputs, actual, exp.values[output], model, failed
    )
    if explained:
        return explained
    text = f"no known convention or defect explains it ({_summary(failed)})"
    if best is not None and best[0] < failed.max_ratio / 4:
        text += f"; closest: {best[1]} ({_summary(best[2])})"
    return text


def _reduced_precision(
    output: str,
    actual: np.ndarray,
    exp: Expected,
    model: CaseModel,
    bound_for: Callable[[CaseModel], np.ndarray],
) -> str | None:
    """A half-precision result that fails the model for float32 arithmetic but passes it for
    arithmetic in its own dtype: intermediates were rounded to the half type."""
    dtype = model.case.dtype
    if dtype not in ("float16", "bfloat16"):
        return None
    half = replace(model, acc_unit=tolerance.unit_roundoff(dtype))
    reference = exp.values[output]
    m = metrics.compare(actual, reference, bound_for(half), dtype)
    if m.mismatched:
        return None
    return (
        f"within the tolerance for arithmetic in {dtype} (u = {half.acc_unit:g}) but not "
        f"for float32 accumulation (u = {model.acc_unit:g}): intermediates (statistics, "
        f"partial sums or the affine step) are rounded to {dtype}; {_summary(m)}"
    )


def _in_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    from conformance.inputs import NUMPY_DTYPES

    return np.asarray(values, dtype=np.float64).astype(NUMPY_DTYPES[dtype]).astype(np.float64)


def _signature(
    kind: str,
    output: str,
    inputs: CaseInputs,
    actual: np.ndarray,
    reference: np.ndarray,
    model: CaseModel,
    failed: Metrics,
) -> str | None:
    nan_ref = np.isnan(reference)
    swallowed = int(np.count_nonzero(nan_ref & np.isfinite(actual)))
    if swallowed:
        return (
            f"NaN swallowed: {swallowed} of {int(nan_ref.sum())} elements whose group "
            "contains NaN came back finite (NaN must propagate)"
        )
    if kind in ("forward", "nonfinite") and output == "output":
        return _overflow_signature(inputs, actual, reference, model) or _cancellation_signature(
            actual, reference, model, failed
        )
    return None


def _failing_rows(actual: np.ndarray, reference: np.ndarray, model: CaseModel) -> np.ndarray:
    from conformance import bounds

    bound = bounds.forward(model, reference)
    bad = ~(np.abs(actual - reference) <= bound) & ~np.isnan(reference)
    return np.asarray(model.rows(bad.astype(np.float64)).any(axis=1))


def _overflow_signature(
    inputs: CaseInputs, actual: np.ndarray, reference: np.ndarray, model: CaseModel
) -> str | None:
    rows = model.rows(_given(inputs.arrays, "input"))
    finite = np.isfinite(rows).all(axis=1)
    sums = np.where(finite, (rows * rows).sum(axis=1), 0.0)
    dev = rows - rows.mean(axis=1, keepdims=True)
    dsums = np.where(finite, (dev * dev).sum(axis=1), 0.0)
    over = finite & ((sums > FLOAT16_MAX) | (dsums > FLOAT16_MAX))
    failing = _failing_rows(actual, reference, model)
    if not failing.any() or not over.any():
        return None
    if failing[over].all() and over[failing].mean() >= 0.5:
        return (
            f"fails on the {int((failing & over).sum())} rows whose sum of squares exceeds "
            f"float16's maximum ({FLOAT16_MAX:g}): the sum of squares is accumulated in "
            "float16 and overflows"
        )
    return None


def _cancellation_signature(
    actual: np.ndarray, reference: np.ndarray, model: CaseModel, failed: Metrics
) -> str | None:
    """Implied per-row variance from a least-squares fit of the output against x̂; its error
    relative to u·E[x²] is O(1) for E[x²] - E[x]² and far below for a two-pass variance."""
    stats = model.stats
    x_hat = np.asarray(stats.x_hat)
    with np.errstate(all="ignore"):
        target = (model.rows(actual) - model.signed_shift) / model.signed_scale
        slope = (target * x_hat).sum(axis=1) / (x_hat * x_hat).sum(axis=1)
        var = np.asarray(stats.s) ** 2
        implied = var / slope**2
        ex2 = np.asarray(stats.rms) ** 2
        u = model.acc_unit
        err = np.abs(implied - var)
        vs_ex2 = err / (u * ex2)
        vs_var = err / (u * var)
    failing = _failing_rows(actual, reference, model) & np.isfinite(vs_ex2)
    if failing.sum() == 0:
        return None
    median_ex2 = float(np.median(vs_ex2[failing]))
    median_var = float(np.median(vs_var[failing]))
    if median_var > 100 and median_ex2 > 0.01:
        kappa = float(np.median(np.asarray(stats.kappa)[failing]))
        return (
            f"the variance is off by about {median_ex2:.3g}·u·E[x²] (u = {u:.3g}) on the "
            f"failing rows (median κ {kappa:.3g}), {median_var:.3g} times the rounding error of "
            "a two-pass variance: the signature of computing it as E[x²] - E[x]², which "
            "cancels catastrophically when the mean is large"
        )
    return None
