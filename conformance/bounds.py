"""Per-element tolerance bounds for every output of a case, from :mod:`conformance.tolerance`.

This module only arranges a case's data the way the tolerance model wants it (the grouped
``(groups, n)`` matrix, the row statistics of what is normalised, the affine parameters spread
per element) and maps the bounds back to the output's shape. The model itself — every constant
and its reason — lives in :mod:`conformance.tolerance`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from conformance import tolerance
from conformance.cases import Case
from conformance.geometry import Grouping
from conformance.inputs import CaseInputs, effective_eps, round_into
from conformance.specs import spec


@dataclass
class CaseModel:
    """What the tolerance model needs about one case, computed once."""

    case: Case
    grouping: Grouping
    stats: Any
    scale_rows: np.ndarray
    shift_rows: np.ndarray
    acc_unit: float
    reduction: str
    eps: float
    signed_scale: np.ndarray
    signed_shift: np.ndarray
    convention: Mapping[str, Any]

    def rows(self, a: np.ndarray) -> np.ndarray:
        return self.grouping.to_rows(np.asarray(a, dtype=np.float64))

    def back(self, rows: np.ndarray) -> np.ndarray:
        return self.grouping.from_rows(rows)


def _eps(case: Case) -> float:
    return effective_eps(case)


def normalised_input(
    inputs: CaseInputs, convention: Mapping[str, Any], expected: Mapping[str, np.ndarray]
) -> np.ndarray:
    """The tensor the norm normalises: the input, or the sum for DeepNorm and the add-norms
    (rounded into the input dtype under ``add_rounding="dtype"``)."""
    case, a = inputs.case, inputs.arrays
    x = np.asarray(a["input"], dtype=np.float64)
    if "residual_out" in expected:
        return np.asarray(expected["residual_out"])
    s = spec(case.norm)
    if s.summand is None:
        return x
    other = np.asarray(a[s.summand], dtype=np.float64)
    z = case.alpha * x + other if case.norm == "deep_norm" else x + case.alpha * other
    if convention.get("add_rounding", "dtype") == "dtype":
        z = round_into(z, case.dtype)
    return z


def case_model(
    inputs: CaseInputs,
    convention: Mapping[str, Any],
    expected: Mapping[str, np.ndarray],
    *,
    accumulation: str | None,
    reduction: str,
) -> CaseModel:
    case, s = inputs.case, spec(inputs.case.norm)
    g = case.grouping
    eps = _eps(case)
    with np.errstate(all="ignore"):
        z_rows = g.to_rows(normalised_input(inputs, convention, expected))
    center = s.center
    if case.norm == "batch_norm" and not case.training:
        stats = tolerance.fixed_statistics(
            z_rows,
            np.asarray(inputs.arrays["running_mean"], dtype=np.float64),
            np.asarray(inputs.arrays["running_var"], dtype=np.float64),
            eps,
            eps_outside=convention.get("eps_placement") == "outside",
        )
    else:
        stats = tolerance.row_statistics(
            z_rows,
            eps,
            center=center,
            unbiased=convention.get("variance") == "unbiased",
            eps_outside=convention.get("eps_placement") == "outside",
        )
    offset = float(convention.get("weight_offset", 0.0))
    w, b = inputs.arrays.get("weight"), inputs.arrays.get("bias")
    ones = np.ones((g.groups, g.n))
    signed_scale = ones if w is None else offset + g.param_rows(w)
    signed_shift = ones * 0.0 if b is None else g.param_rows(b)
    return CaseModel(
        case,
        g,
        stats,
        np.abs(signed_scale),
        np.abs(signed_shift),
        tolerance.accumulation_unit(case.dtype, accumulation),
        reduction,
        eps,
        signed_scale,
        signed_shift,
        convention,
    )


def forward(m: CaseModel, reference: np.ndarray) -> np.ndarray:
    return m.back(
        tolerance.forward_bound(
            m.stats,
            m.scale_rows,
            m.shift_rows,
            m.rows(reference),
            out_dtype=m.case.dtype,
            acc_unit=m.acc_unit,
            reduction=m.reduction,
            n=m.grouping.n,
        )
    )


def residual(m: CaseModel, inputs: CaseInputs) -> np.ndarray:
    a = inputs.arrays
    x = np.asarray(a["input"], dtype=np.float64)
    r = np.asarray(a["residual"], dtype=np.float64)
    return tolerance.residual_bound(x, r, m.case.alpha, out_dtype=m.case.dtype, acc_unit=m.acc_unit)


def grad_input(m: CaseModel, grad_output: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return m.back(
        tolerance.backward_bound(
            m.stats,
            m.signed_scale,
            m.rows(grad_output),
            m.rows(reference),
            out_dtype=m.case.dtype,
            acc_unit=m.acc_unit,
            reduction=m.reduction,
            n=m.grouping.n,
            center=spec(m.case.norm).center,
        )
    )


def param_grad(
    m: CaseModel, which: str, grad_output: np.ndarray, reference: np.ndarray
) -> np.ndarray:
    g = m.grouping
    fn = tolerance.weight_grad_bound if which == "weight" else tolerance.bias_grad_bound
    bound = fn(
        m.stats,
        m.rows(grad_output),
        g.param_index(),
        g.params,
        np.asarray(reference, dtype=np.float64).reshape(-1),
        out_dtype=m.case.dtype,
        acc_unit=m.acc_unit,
        reduction=m.reduction,
    )
    return np.asarray(bound).reshape(np.shape(reference))


def gradient(
    model: CaseModel, name: str, g_out: np.ndarray, inputs: CaseInputs, reference: np.ndarray
) -> np.ndarray:
    """The bound of the gradient ``name`` (``grad_input``, ``grad_weight``, ``grad_bias``,
    ``grad_residual``, ``grad_sublayer_output``) of ``model``'s case, for upstream gradient
    ``g_out``: DeepNorm's input gradient is scaled by alpha, the fused adds' summands receive the
    new residual's upstream gradient too."""
    case = model.case
    if name in ("grad_weight", "grad_bias"):
        return param_grad(model, name.removeprefix("grad_"), g_out, reference)
    dz = grad_input(model, g_out, reference)
    if case.norm == "deep_norm" and name == "grad_input":
        return tolerance.scaled_gradient_bound(
            dz, case.alpha, reference, out_dtype=case.dtype, acc_unit=model.acc_unit
        )
    if spec(case.norm).fused:
        g2 = np.asarray(inputs.grads["grad_residual_out"], dtype=np.float64)
        return tolerance.scaled_gradient_bound(
            dz,
            case.alpha if name == "grad_residual" else 1.0,
            reference,
            out_dtype=case.dtype,
            acc_unit=model.acc_unit,
            addend=g2,
        )
    return dz
