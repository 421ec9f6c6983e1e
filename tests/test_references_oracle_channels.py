"""group_norm, instance_norm and batch_norm of the references against the exact oracle.

Equality with the correctly rounded result, element for element, of the output, the statistics
(return_stats=True) and, for batch_norm, the running statistics: updated in place in training
(new = (1 - m) old + m stat, or m old + (1 - m) stat, rounded once), left alone in eval.
The ``@example`` cases are the inputs that hurt: large mean with small spread, float16 squares that
overflow, NaN next to a constant group, empty tensors, the exact 1 - momentum.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from oracle_cases import BACKENDS, SLOW, Case, arr, check_output, check_stats, with_examples
from oracles import (
    as_backend,
    assert_matches_oracle,
    batch_norm_eval,
    batch_norm_training,
    batch_statistics,
    group_norm,
    instance_norm,
    running_stat_update,
)
from reference_strategies import batch_norm_eval_cases, batch_norm_training_cases, channel_cases

import references as R

# ---------------------------------------------------------------------------------------------
# group_norm and instance_norm


def _channel_args(case: Case, backend: str):
    return (
        as_backend(case.weight, case.fmt, backend),
        as_backend(case.bias, case.fmt, backend),
    )


GROUP_EXAMPLES = [
    Case(
        "float32",
        arr([2.0**23 + k for k in range(8)], (1, 4, 2)),
        extra={"num_groups": 2},
        label="gn-large-mean",
    ),
    Case(
        "float16",
        arr([300.0, -300.0, 1.0, 2.0, 500.0, 1000.0], (1, 6)),
        weight=arr([1.0, 2.0, 3.0, -1.0, 0.5, 0.25]),
        bias=arr([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
        extra={"num_groups": 3},
        label="gn-f16-overflow",
    ),
    Case(
        "float32",
        arr([1.0, math.nan, 2.0, 3.0, 4.0, 4.0, 4.0, 4.0], (2, 2, 2)),
        eps=0.0,
        extra={"num_groups": 2},
        label="gn-nan-and-constant",
    ),
    Case("float64", np.zeros((0, 4, 3)), extra={"num_groups": 2}, label="gn-empty"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@SLOW
@given(case=channel_cases(kind="group"), return_stats=st.booleans())
@with_examples(GROUP_EXAMPLES, return_stats=True)
def test_group_norm_matches_oracle(backend: str, case: Case, return_stats: bool) -> None:
    x = as_backend(case.x, case.fmt, backend)
    groups = case.extra["num_groups"]
    result = R.group_norm(
        x,
        groups,
        *_channel_args(case, backend),
        case.eps,
        **case.keywords(),
        return_stats=return_stats,
    )
    expected = group_norm(
        case.x, groups, case.weight, case.bias, case.eps, **case.oracle_conventions()
    )
    check_output(result.output if return_stats else result, expected.output, case, backend)
    if return_stats:
        check_stats(result, expected, case, backend, centered=True)


INSTANCE_EXAMPLES = [
    Case("float32", arr([2.0**23 + k for k in range(8)], (2, 1, 4)), label="in-large-mean"),
    Case("float32", arr([5.0, 5.0, 1.0, 2.0], (1, 2, 2)), eps=0.0, label="in-constant-eps0"),
    Case("float16", arr([300.0, 400.0, -500.0, 0.0], (1, 1, 2, 2)), label="in-f16-overflow"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@SLOW
@given(case=channel_cases(kind="instance"), return_stats=st.booleans())
@with_examples(INSTANCE_EXAMPLES, return_stats=True)
def test_instance_norm_matches_oracle(backend: str, case: Case, return_stats: bool) -> None:
    x = as_backend(case.x, case.fmt, backend)
    w, b = _channel_args(case, backend)
    result = R.instance_norm(
        x, None, None, w, b, True, 0.1, case.eps, **case.keywords(), return_stats=return_stats
    )
    expected = instance_norm(case.x, case.weight, case.bias, case.eps, **case.oracle_conventions())
    check_output(result.output if return_stats else result, expected.output, case, backend)
    if return_stats:
        check_stats(result, expected, case, backend, centered=True)


# ---------------------------------------------------------------------------------------------
# batch_norm: training (batch statistics, running update) and eval


BATCH_EXAMPLES = [
    Case(
        "float32",
        arr([2.0**23 + k for k in (0, 1, 2, 3, 5, 8)], (3, 2)),
        extra={
            "running_fmt": "float32",
            "running_mean": arr([2.0**23, 0.0]),
            "running_var": arr([1.0, 0.0]),
            "momentum": 0.1,
            "num_batches_tracked": None,
            "running_variance": "unbiased",
            "momentum_weights": "new",
        },
        label="bn-large-mean",
    ),
    Case(
        "bfloat16",
        arr([1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0], (2, 2, 2)),
        weight=arr([1.5, -2.0]),
        bias=arr([0.25, 3.0]),
        extra={
            "running_fmt": "float32",
            "running_mean": arr([0.0, 1.0]),
            "running_var": arr([1.0, 1.0]),
            "momentum": None,
            "num_batches_tracked": 3,
            "running_variance": "unbiased",
            "momentum_weights": "running",
        },
        label="bn-cumulative-bf16",
    ),
    Case("float16", arr([300.0, -300.0, 600.0, 900.0], (2, 2)), label="bn-f16-overflow"),
    *(
        # 1 - m must be the exact 1 - 0.1000000000000000055..., not the binary64 0.9: here
        # (1 - m) * 7.75 = 6.97499999999999995698 rounds to 0x1.be66666666666p+2, whereas
        # fl(0.9) * 7.75 rounds to 0x1.be66666666667p+2.
        Case(
            "float64",
            arr([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 31.0], (2, 2, 2)),
            extra={
                "running_fmt": "float64",
                "running_mean": arr([0.0, 7.75 * (weights == "new")]),
                "running_var": arr([0.0, 0.0]),
                "momentum": 0.1,
                "num_batches_tracked": None,
                "running_variance": "unbiased",
                "momentum_weights": weights,
            },
            label=f"bn-exact-one-minus-momentum-{weights}",
        )
        for weights in ("new", "running")
    ),
]


def _call_batch_norm_training(case: Case, backend: str, return_stats: bool):
    x = as_backend(case.x, case.fmt, backend)
    extra = case.extra
    running = "running_mean" in extra
    rm = as_backend(extra.get("running_mean"), extra.get("running_fmt", case.fmt), backend)
    rv = as_backend(extra.get("running_var"), extra.get("running_fmt", case.fmt), backend)
    update = {}
    if running:
        update = {
            "running_variance": extra["running_variance"],
            "momentum_weights": extra["momentum_weights"],
            "num_batches_tracked": extra["num_batches_tracked"],
        }
    result = R.batch_norm(
        x,
        rm,
        rv,
        *_channel_args(case, backend),
        True,
        extra.get("momentum", 0.1),
        case.eps,
        **case.keywords(),
        **update,
        return_stats=return_stats,
    )
    return result, rm, rv


@pytest.mark.parametrize("backend", BACKENDS)
@SLOW
@given(case=batch_norm_training_cases(), return_stats=st.booleans())
@with_examples(BATCH_EXAMPLES, return_stats=True)
def test_batch_norm_training_matches_oracle(backend: str, case: Case, return_stats: bool) -> None:
    result, rm, rv = _call_batch_norm_training(case, backend, return_stats)
    expected = batch_norm_training(
        case.x, case.weight, case.bias, case.eps, **case.oracle_conventions()
    )
    check_output(result.output if return_stats else result, expected.output, case, backend)
    if return_stats:
        check_stats(result, expected, case, backend, centered=True)
    if "running_mean" in case.extra:
        check_running_stats(case, backend, rm, rv)


def check_running_stats(case: Case, backend: str, rm, rv) -> None:
    """In-place update new = (1-m) old + m stat (or m old + (1-m) stat), rounded once."""
    __tracebackhide__ = True
    extra = case.extra
    means, variances = batch_statistics(case.x, unbiased=extra["running_variance"] == "unbiased")
    update = {
        "fmt": extra["running_fmt"],
        "num_batches_tracked": extra["num_batches_tracked"],
        "momentum_weights": extra["momentum_weights"],
    }
    for name, got, old, stat in [
        ("running_mean", rm, extra["running_mean"], means),
        ("running_var", rv, extra["running_var"], variances),
    ]:
        want = running_stat_update(old, stat, extra["momentum"], **update)
        assert_matches_oracle(
            got,
            want,
            fmt=extra["running_fmt"],
            backend=backend,
            what=f"{name} after the in-place update",
            context=case.describe(),
        )


@pytest.mark.parametrize("backend", BACKENDS)
@SLOW
@given(case=batch_norm_eval_cases())
@example(
    case=Case(
        "float32",
        arr([2.0**23 + 1, 2.0**23 + 3], (1, 2)),
        extra={
            "running_fmt": "float32",
            "running_mean": arr([2.0**23, 2.0**23 + 2]),
            "running_var": arr([2.0**-100, 0.0]),
        },
        label="bn-eval-tiny-var",
    )
)
def test_batch_norm_eval_matches_oracle(backend: str, case: Case) -> None:
    extra = case.extra
    rm = as_backend(extra["running_mean"], extra["running_fmt"], backend)
    rv = as_backend(extra["running_var"], extra["running_fmt"], backend)
    result = R.batch_norm(
        as_backend(case.x, case.fmt, backend),
        rm,
        rv,
        *_channel_args(case, backend),
        False,
        0.1,
        case.eps,
        **case.keywords(),
    )
    expected = batch_norm_eval(
        case.x,
        extra["running_mean"],
        extra["running_var"],
        case.weight,
        case.bias,
        case.eps,
        eps_placement=case.eps_placement,
        weight_offset=case.weight_offset,
        fmt=case.result_fmt,
    )
    check_output(result, expected, case, backend)
    for name, got, before in [
        ("running_mean", rm, "running_mean"),
        ("running_var", rv, "running_var"),
    ]:
        assert_matches_oracle(
            got,
            extra[before],
            fmt=extra["running_fmt"],
            backend=backend,
            what=f"{name} (eval must not update it)",
            context=case.describe(),
        )
