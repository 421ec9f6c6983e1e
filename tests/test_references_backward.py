"""Backward functions of the references against numerical differentiation in mpmath.

The reference gradient must equal the correctly rounded derivative of the loss
L = sum(grad_output * y) (+ sum(grad_residual_out * z) for the fused adds), computed by
``mpmath.diff`` at two precisions (``numerical_gradients``), unless the derivative is within the
numerical error of a rounding boundary, where either neighbour is accepted. One test per backward
function: hypothesis cases (``backward_cases``) plus the rows that matter for derivatives.
"""

from __future__ import annotations

import numpy as np
import pytest
from backward_cases import BackwardCase, backward_cases, check_backward
from hypothesis import example, given, settings
from hypothesis import strategies as st

#: Each example differentiates every element (tens of high-precision evaluations of L each);
#: no per-example deadline (the profile decides how many examples).
BACKWARD = settings(deadline=None)


# ---------------------------------------------------------------------------------------------
# Tests: one per backward function, hypothesis cases plus the rows that matter for derivatives


def _row(norm, fmt, x, g, weight=None, bias=None, eps=1e-5, backend="torch", **kw):
    def a(v):
        return None if v is None else np.array(v, dtype=np.float64)

    extra = {k: a(v) if isinstance(v, list) else v for k, v in kw.pop("extra", {}).items()}
    return BackwardCase(norm, fmt, backend, a(x), a(g), a(weight), a(bias), eps, extra=extra, **kw)


def with_examples(*cases):
    def decorate(test):
        for c in reversed(cases):
            test = example(case=c)(test)
        return test

    return decorate


CONSTANT_ROW_OUTSIDE = {  # sigma = 0, eps outside: differentiable, dL/dx = (g w - mean(g w))/eps
    "x": [[3.0, 3.0, 3.0]],
    "g": [[1.0, -2.0, 0.5]],
    "eps": 0.5,
    "eps_placement": "outside",
}


@BACKWARD
@given(case=backward_cases("layer"))
@with_examples(
    _row("layer", "float64", weight=[2.0, 1.0, -1.0], bias=[0.0, 1.0, 0.0], **CONSTANT_ROW_OUTSIDE),
    _row(
        "layer",
        "float32",
        [[2.0**23, 2.0**23 + 1, 2.0**23 + 2]],
        [[1.0, 0.25, -3.0]],
        backend="numpy",
    ),
    _row(
        "layer",
        "float64",
        [[1.0, 2.0, 4.0, 8.0]],
        [[1.0, 1.0, 1.0, 1.0]],
        weight=[0.5, 1.0, 2.0, 3.0],
        eps=0.0,
        variance="unbiased",
        weight_offset=1.0,
    ),
    _row(
        "layer",
        "float32",
        [[-1.0, 1.0], [0.0, 0.0]],
        [[1.0, 1.0], [2.0, -1.0]],
        eps=0.5,
        eps_placement="outside",
        variance="unbiased",
        backend="numpy",
    ),
)
def test_layer_norm_backward(case: BackwardCase) -> None:
    check_backward(case)


@BACKWARD
@given(case=backward_cases("rms"))
@with_examples(
    _row("rms", "float32", [[0.0, 0.0, 0.0]], [[1.0, 2.0, 3.0]], eps=0.5, eps_placement="outside"),
    _row(
        "rms",
        "float64",
        [[1.0, -2.0, 3.0]],
        [[1.0, 2.0, 3.0]],
        weight=[1.0, 0.5, -2.0],
        eps=None,
        weight_offset=1.0,
        backend="numpy",
    ),
    _row("rms", "float32", [[1.0, -2.0, 3.0]], [[1.0, 2.0, 3.0]], eps=None, variance="unbiased"),
)
def test_rms_norm_backward(case: BackwardCase) -> None:
    check_backward(case)


@BACKWARD
@given(case=backward_cases("group"))
@with_examples(
    _row(
        "group",
        "float64",
        [[[1.0, 2.0], [3.0, 5.0], [1.0, 1.0], [1.0, 1.0]]],
        [[[1.0, 2.0], [3.0, 4.0], [1.0, -1.0], [0.5, 2.0]]],
        weight=[1.0, 2.0, 3.0, 4.0],
        bias=[0.0, 0.0, 1.0, 1.0],
        eps=0.25,
        eps_placement="outside",
        extra={"num_groups": 2},
    ),
)
def test_group_norm_backward(case: BackwardCase) -> None:
    check_backward(case)


@BACKWARD
@given(case=backward_cases("batch_train"))
@with_examples(
    _row(
        "batch_train",
        "float32",
        [[[1.0, 2.0], [0.0, 1.0]], [[4.0, 8.0], [2.0, 2.0]]],
        [[[1.0, 0.0], [1.0, 1.0]], [[-1.0, 2.0], [0.5, 0.5]]],
        weight=[2.0, 3.0],
        bias=[1.0, -1.0],
        variance="unbiased",
        backend="numpy",
    ),
)
def test_batch_norm_training_backward(case: BackwardCase) -> None:
    check_backward(case)


@BACKWARD
@given(case=backward_cases("batch_eval"))
@with_examples(
    _row(
        "batch_eval",
        "float64",
        [[[1.0, 2.0], [0.0, 1.0]]],
        [[[1.0, 0.0], [1.0, 3.0]]],
        weight=[2.0, 3.0],
        bias=[1.0, -1.0],
        eps=0.0,
        extra={"running_mean": [0.5, 1.0], "running_var": [2.0, 0.25]},
    ),
)
def test_batch_norm_eval_backward(case: BackwardCase) -> None:
    check_backward(case)


@BACKWARD
@given(case=backward_cases("instance"))
@with_examples(
    _row(
        "instance",
        "float32",
        [[[1.0, 2.0, 4.0], [7.0, 7.0, 7.0]]],
        [[[1.0, 0.0, 2.0], [1.0, 3.0, -1.0]]],
        weight=[2.0, 3.0],
        bias=[0.0, 1.0],
        eps=0.25,
        eps_placement="outside",
    ),
)
def test_instance_norm_backward(case: BackwardCase) -> None:
    check_backward(case)


def _add_extra(alpha: float, rounding: str, fused: bool) -> dict:
    extra = {
        "other": [[0.5, 2.0**-30, -1.0]],
        "alpha": alpha,
        "add_rounding": rounding,
    }
    if fused:
        extra["grad_residual_out"] = [[1.0, -1.0, 0.25]]
    return extra


@BACKWARD
@given(case=backward_cases("deep"))
@with_examples(
    *(
        _row(
            "deep",
            "float32",
            [[1.0, 2.0, 4.0]],
            [[1.0, 0.5, -2.0]],
            weight=[1.0, 2.0, 3.0],
            bias=[0.0, 0.5, 0.0],
            extra=_add_extra(8**0.25, r, fused=False),
        )
        for r in ("dtype", "exact")
    )
)
def test_deep_norm_backward(case: BackwardCase) -> None:
    check_backward(case)


@pytest.mark.parametrize("norm", ["fused_ln", "fused_rms"])
@BACKWARD
@given(data=st.data())
def test_fused_add_norm_backward(norm: str, data: st.DataObject) -> None:
    check_backward(data.draw(backward_cases(norm), label="case"))


@pytest.mark.parametrize("norm", ["fused_ln", "fused_rms"])
@pytest.mark.parametrize("rounding", ["dtype", "exact"])
def test_fused_add_norm_backward_rounded_add(norm: str, rounding: str) -> None:
    """The add loses 2**-30 in float32 ("dtype"): the backward differentiates at the rounded z."""
    case = _row(
        norm,
        "float32",
        [[1.0, 2.0, 4.0]],
        [[1.0, 0.5, -2.0]],
        weight=[1.0, 2.0, 3.0],
        eps=1e-2,
        extra=_add_extra(0.5, rounding, fused=True),
    )
    check_backward(case)
