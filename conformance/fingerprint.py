"""Say why a failure fails: which convention or known defect the implementation matches.

When a check fails, the same inputs are evaluated under every *candidate* explanation — each
known convention (the references with one or two keywords changed, or a named preset), and each
known defect that has a clean model (ε ignored, bias ignored, groups with the wrong boundaries,
a backward that drops a term, a biased running variance, ...). A candidate counts only if it is
distinguishable from the declared convention on these inputs (it fails the check's tolerance
against the declared reference) and the actual output passes against it under the tolerance
model of the candidate's own convention and ε (with ε added to the standard deviation, errors
scale with √v + ε, not √(v + ε)). The first such candidate, simplest first, is the diagnosis
("matches ε added to the standard deviation (eps_placement='outside')"). Defects that the
references cannot compute are recognised by their signatures (:mod:`conformance.signatures`).

Candidate results are memoised per input values, convention and candidate, so the outputs of
one case (output, grad_input, grad_weight, ...) share one evaluation of each candidate.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from conformance import bounds, metrics, signatures
from conformance.bounds import CaseModel
from conformance.differential import UNEXPLAINED
from conformance.expected import Expected, backward_references, compute
from conformance.inputs import CaseInputs, inputs_digest
from conformance.specs import spec
from references.presets import presets_for

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
Values = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Candidate:
    """An explanation and how to compute what an implementation following it returns.

    ``inputs`` and ``convention``, when given, are what the candidate runs the references on:
    its output is graded under their tolerance model. Otherwise the check's model is used.
    """

    words: str
    values: Callable[[], Values]
    inputs: CaseInputs | None = None
    convention: Mapping[str, Any] | None = None


def convention_words(changes: Mapping[str, Any]) -> str:
    parts = [f"{_WORDS.get((k, v), f'{k}={v!r}')} ({k}={v!r})" for k, v in changes.items()]
    return " and ".join(parts)


# -- candidates -----------------------------------------------------------------------------------


def _reference(
    words: str,
    inputs: CaseInputs,
    convention: Mapping[str, Any],
    backward: bool,
    **arrays: Any,
) -> Candidate:
    """The references on ``inputs`` with some arrays replaced (``eps=`` replaces the parameter
    instead): the gradients for a backward check, else the forward outputs."""
    params = dict(inputs.params)
    case = inputs.case
    if "eps" in arrays:
        params["eps"] = arrays.pop("eps")
        case = replace(case, eps=params["eps"])
    if "momentum" in arrays:
        params["momentum"] = arrays.pop("momentum")
        case = replace(case, momentum=params["momentum"])
    changed = replace(inputs, case=case, arrays={**inputs.arrays, **arrays}, params=params)

    def run() -> Values:
        if backward:
            grads = backward_references(changed, convention)
            return {k: v for k, v in grads.items() if v is not None}
        return compute(changed, convention, backward=False, statistics=False).values

    return Candidate(words, run, changed, convention)


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
            words = convention_words(changes)
            yield _reference(words, inputs, {**declared, **changes}, backward)


def _defect_candidates(
    inputs: CaseInputs, declared: Mapping[str, Any], backward: bool, eps: float
) -> Iterator[Candidate]:
    """``eps`` is the ε in effect (``rms_norm``'s ``eps=None`` resolved)."""
    a, case = inputs.arrays, inputs.case
    if eps:
        yield _reference("ε ignored (eps=0)", inputs, declared, backward, eps=0.0)
    single = float(np.float32(eps))
    if eps and single != eps:
        words = (
            f"ε rounded to float32 ({single!r} for {eps!r}; ONNX stores it as a float attribute)"
        )
        yield _reference(words, inputs, declared, backward, eps=single)
    if a.get("bias") is not None:
        yield _reference("bias ignored", inputs, declared, backward, bias=None)
    if a.get("weight") is not None:
        yield _reference("weight ignored", inputs, declared, backward, weight=None)
    given = "None, i.e. " if case.eps is None else ""
    for other in (1e-6, 1e-5, 1e-3, 1e-12):
        if other != eps:
            words = f"ε = {other:g} used instead of the eps argument ({given}{eps:.3g})"
            yield _reference(words, inputs, declared, backward, eps=other)
    if case.norm == "group_norm":
        yield from _group_candidates(inputs, declared, backward)


def _group_candidates(
    inputs: CaseInputs, declared: Mapping[str, Any], backward: bool
) -> Iterator[Candidate]:
    case = inputs.case
    yield Candidate(
        "wrong group boundaries: channel c in group c mod G (the channels interleaved, "
        f"G = {case.num_groups}) instead of contiguous blocks of C/G channels",
        lambda: _interleaved_groups(inputs, declared, backward),
    )
    channels = case.shape[1]
    for groups, words in ((channels, "one group per channel"), (1, "one group of all channels")):
        if groups != case.num_groups:
            changed = replace(inputs, params={**inputs.params, "num_groups": groups})
            words = f"wrong group boundaries: {words} (num_groups={groups}, not {case.num_groups})"
            # Graded under the check's model: the declared grouping is the one it knows.
            yield replace(_reference(words, changed, declared, backward), inputs=None)


def _preset_candidates(inputs: CaseInputs) -> Iterator[Candidate]:
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
        source = getattr(preset, "source", "")
        words = f"the {preset.name} preset" + (f" ({source})" if source else "")
        yield _reference(words, inputs, full, False, eps=eps)


def _given(arrays: Mapping[str, np.ndarray | None], key: str) -> np.ndarray:
    value = arrays[key]
    if value is None:
        raise KeyError(key)
    return value


def _interleaved_groups(inputs: CaseInputs, declared: Mapping[str, Any], backward: bool) -> Values:
    """GroupNorm with channel ``c`` in group ``c mod G``: the channels permuted so that those
    groups are contiguous, the references run, and every result permuted back."""
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
    grads: dict[str, np.ndarray | None] = {
        "grad_output": np.take(_given(inputs.grads, "grad_output"), order, axis=1)
    }
    permuted = replace(inputs, arrays=arrays, grads=grads)
    if not backward:
        values = compute(permuted, declared, backward=False, statistics=False).values
        return {"output": np.take(values["output"], inverse, axis=1)}
    result = {}
    for name, value in backward_references(permuted, declared).items():
        if value is not None:
            # grad_input is (N, C, ...); grad_weight and grad_bias are per channel.
            result[name] = np.take(value, inverse, axis=1 if name == "grad_input" else 0)
    return result


def _grad_drop_candidates(model: CaseModel, inputs: CaseInputs) -> Iterator[Candidate]:
    """Backward passes that treat part of the statistics as constants: with ``g = dy·w``,
    ``dx = (g - mean(g) - x̂·mean(g·x̂)) / s`` (RMS norms: ``(g - x̂·mean(g·x̂)) / s``) less
    one or more of its terms."""
    g_rows = model.rows(_given(inputs.grads, "grad_output")) * model.signed_scale
    x_hat = np.asarray(model.stats.x_hat)
    s = np.asarray(model.stats.s)[:, None]
    projection = x_hat * (g_rows * x_hat).mean(axis=1, keepdims=True)
    if spec(inputs.case.norm).center:
        formula = "of dx = (g - mean(g) - x̂·mean(g·x̂)) / s, g = dy·w"
        variants = [
            (f"the backward drops the gradient through the mean (the term mean(g) {formula})",
             g_rows - projection),
            (f"the backward drops the gradient through the variance (the term x̂·mean(g·x̂) "
             f"{formula})", g_rows - g_rows.mean(axis=1, keepdims=True)),
            ("the backward treats the mean and variance as constants (dx = g / s)", g_rows),
        ]  # fmt: skip
    else:
        formula = "of dx = (g - x̂·mean(g·x̂)) / s, g = dy·w"
        words = "the backward drops the gradient through the variance (the term x̂·mean(g·x̂) "
        variants = [(f"{words}{formula})", g_rows)]
    for words, rows in variants:
        yield Candidate(words, _constant({"grad_input": model.back(rows / s)}))


def _constant(values: Values) -> Callable[[], Values]:
    return lambda: values


def _running_candidates(inputs: CaseInputs, declared: Mapping[str, Any]) -> Iterator[Candidate]:
    original = {
        k: np.asarray(inputs.arrays[k], dtype=np.float64) for k in ("running_mean", "running_var")
    }
    yield Candidate("running statistics not updated", lambda: original)
    momentum = inputs.case.momentum
    single = float(np.float32(momentum))
    for eps in {inputs.case.eps, float(np.float32(inputs.case.eps or 0.0))} - {None}:
        if single != momentum:
            words = (
                f"momentum rounded to float32 ({single!r} for {momentum!r}; ONNX stores it as a "
                "float attribute)"
            )
            if eps != inputs.case.eps:
                words += " and ε rounded to float32 too"
            yield _reference(words, inputs, declared, False, momentum=single, eps=eps)


def candidates(
    kind: str, output: str, inputs: CaseInputs, declared: Mapping[str, Any], model: CaseModel
) -> Iterator[Candidate]:
    """Every explanation worth trying for a failed ``kind``/``output`` check, simplest first."""
    backward = kind == "backward"
    if backward and output == "grad_input" and not inputs.case.norm.startswith(("fused", "deep")):
        yield from _grad_drop_candidates(model, inputs)
    if kind == "running_stats":
        yield from _running_candidates(inputs, declared)
    yield from _convention_candidates(inputs, declared, backward)
    yield from _defect_candidates(inputs, declared, backward, model.eps)
    if not backward:
        yield from _preset_candidates(inputs)


_MEMO: dict[tuple[Any, ...], Values] = {}
_MEMO_LIMIT = 64


def _memoised(key: tuple[Any, ...], compute_values: Callable[[], Values]) -> Values:
    if key not in _MEMO:
        if len(_MEMO) >= _MEMO_LIMIT:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[key] = compute_values()
    return _MEMO[key]


# -- the diagnosis --------------------------------------------------------------------------------


def candidate_bound(
    cand: Candidate, model: CaseModel, bound_for: Callable[[CaseModel], np.ndarray]
) -> np.ndarray:
    """The check's bound under the candidate's own tolerance model (its convention, its ε),
    or under the check's model when the candidate changes neither."""
    if cand.inputs is None or cand.convention is None:
        return bound_for(model)
    with np.errstate(all="ignore"):
        own = bounds.case_model(
            cand.inputs,
            spec(model.case.norm).convention(cand.convention),
            {},
            accumulation=None,
            reduction=model.reduction,
        )
        return bound_for(replace(own, acc_unit=model.acc_unit))


#: The largest case (in elements) on which candidates are evaluated: each one recomputes the
#: references (the backward ones at a few million elements per second). Larger cases get the
#: signatures only; every distribution also runs on the battery's smaller shapes.
CANDIDATE_ELEMENTS = {"forward": 2**16, "backward": 2**15}


def diagnose(
    kind: str,
    output: str,
    inputs: CaseInputs,
    declared: Mapping[str, Any],
    actual: np.ndarray,
    exp: Expected,
    model: CaseModel,
    failed: metrics.Metrics,
    bound_for: Callable[[CaseModel], np.ndarray],
) -> str:
    """Words for a failed check: the candidate the output matches, or the defect's signature.

    ``bound_for`` computes the check's per-element bound for a case model, so a candidate is
    graded exactly as the implementation was.
    """
    reference = exp.values[output]
    bound = np.broadcast_to(bound_for(model), np.shape(actual))
    search = _Search(kind, output, inputs, declared, actual, reference, bound)
    budget = CANDIDATE_ELEMENTS["backward" if kind == "backward" else "forward"]
    found = search.run(model, bound_for) if inputs.case.elements <= budget else None
    if found and "used instead of the eps argument" in found:
        # In a half type a different ε moves the scale by about one rounding of the type:
        # arithmetic in that type explains the same output without assuming a wrong ε.
        reduced = signatures.reduced_precision(actual, reference, model, bound_for)
        if reduced:
            return f"{reduced}; it also {found}"
    if found:
        return found
    text = _signature(kind, output, inputs, actual, reference, bound, model, bound_for)
    as_under = " or under ".join(search.only_nan)
    if text:
        return f"{text}; the same NaN as under {as_under}" if search.only_nan else text
    if search.only_nan:
        return f"NaN where the declared convention gives finite values, as under {as_under}"
    text = f"{UNEXPLAINED} ({signatures.summary(failed)})"
    where = signatures.where_wrong(actual, reference, bound, model, output)
    if where:
        text += f"; {where}"
    if search.best is not None and search.best[0] < failed.max_ratio / 4:
        _, words, m = search.best
        text += f"; closest: {words} ({signatures.summary(m, ' of that result')})"
    return text


@dataclass
class _Search:
    """The candidates tried for one failed check, and what they left behind."""

    kind: str
    output: str
    inputs: CaseInputs
    declared: Mapping[str, Any]
    actual: np.ndarray
    reference: np.ndarray
    bound: np.ndarray
    #: Candidates the output matches only where both are NaN (weak evidence).
    only_nan: list[str] = field(default_factory=list)
    #: The closest candidate that does not match: (max ratio, words, metrics).
    best: tuple[float, str, metrics.Metrics] | None = None

    def run(self, model: CaseModel, bound_for: Callable[[CaseModel], np.ndarray]) -> str | None:
        """``matches ...`` for the first distinguishable candidate the output passes."""
        dtype = self.inputs.case.dtype
        if self.output in ("mean", "rstd") and dtype in ("float16", "bfloat16"):
            dtype = "float32"  # statistics of half inputs are returned in float32
        shape, output = np.shape(self.actual), self.output
        backward = self.kind == "backward"  # forward-kind checks share forward values
        memo = (inputs_digest(self.inputs), tuple(sorted(self.declared.items())), backward)
        for cand in candidates(self.kind, output, self.inputs, self.declared, model):
            try:
                values = _memoised((*memo, cand.words), cand.values)
            except (ValueError, ArithmeticError, KeyError):
                continue  # a candidate that does not apply to these inputs explains nothing
            if output not in values or np.size(values[output]) != np.size(self.actual):
                continue
            # Statistics are compared flat, one per reduction group.
            candidate = signatures.in_dtype(np.reshape(values[output], shape), dtype)
            differs = signatures.bad_elements(candidate, self.reference, self.bound)
            if not differs.any():
                continue  # indistinguishable from the declared convention on these inputs
            own = np.broadcast_to(candidate_bound(cand, model, bound_for), shape)
            m = metrics.compare(self.actual, candidate, own, dtype)
            if m.mismatched == 0 and np.isfinite(candidate[differs]).any():
                return f"matches {cand.words}: {signatures.summary(m, ' of that result')}"
            if m.mismatched == 0:
                # A combination adds nothing to a simpler candidate already listed.
                if not any(words in cand.words for words in self.only_nan):
                    self.only_nan.append(cand.words)
            elif self.best is None or m.max_ratio < self.best[0]:
                self.best = (m.max_ratio, cand.words, m)
        return None


def _signature(
    kind: str,
    output: str,
    inputs: CaseInputs,
    actual: np.ndarray,
    reference: np.ndarray,
    bound: np.ndarray,
    model: CaseModel,
    bound_for: Callable[[CaseModel], np.ndarray],
) -> str | None:
    explained = signatures.explain(kind, output, inputs, actual, reference, bound, model)
    reduced = signatures.reduced_precision(actual, reference, model, bound_for)
    if explained and reduced and explained.startswith(signatures.CANCELLATION):
        # κ ≤ 2**(p-3) for half inputs: both explanations can predict errors of one size.
        half = reduced.split(":")[0]
        explained += f"; the output is also {half}, which would explain it as well"
    return (
        explained
        or reduced
        or signatures.sequential_reduction(actual, reference, model, bound_for, output)
    )
