"""deep_norm and the fused residual-add norms of the references against the exact oracle.

The normalised tensor is z = alpha_x x + alpha_y other, rounded into the input dtype
(add_rounding="dtype") or kept exact (add_rounding="exact"); the output must be the correctly
rounded norm of that z, and the fused adds' residual_out the rounded z, element for element.
"""

from __future__ import annotations

import math
from dataclasses import replace
from fractions import Fraction

import pytest
from hypothesis import given
from oracle_cases import BACKENDS, SLOW, Case, arr, check_output, with_examples, with_shape
from oracles import (
    add_scaled,
    add_scaled_exact,
    as_backend,
    assert_matches_oracle,
    layer_norm,
    normalize_exact_rows,
)
from reference_strategies import layer_norm_cases

import references as R


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
