"""Bad arguments raise ValueError with a message that says what is wrong.

A message says what is wrong when it names the offending argument (and, for an unknown
convention value, repeats the value): that is the key phrase each case asserts on,
case-insensitively.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest
import torch

import references as R


def _x(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.arange(float(np.prod(shape)), dtype=torch.float64).reshape(shape).to(dtype)


X = _x(2, 3)
IMAGE = _x(2, 4, 3)  # (N, C, L)
C4 = torch.ones(4)


def case(fn: Callable[[], object], *phrases: str, id: str):
    return pytest.param(fn, phrases, id=id)


SHAPE_CASES = [
    case(lambda: R.layer_norm(X, (4,)), "normalized_shape", id="layer_norm-normalized_shape"),
    case(lambda: R.layer_norm(X, (2, 3, 1)), "normalized_shape", id="layer_norm-too-many-dims"),
    case(lambda: R.rms_norm(X, (2,)), "normalized_shape", id="rms_norm-normalized_shape"),
    case(lambda: R.layer_norm(X, (3,), torch.ones(4)), "weight", id="layer_norm-weight"),
    case(lambda: R.layer_norm(X, (3,), None, torch.ones(2)), "bias", id="layer_norm-bias"),
    case(lambda: R.rms_norm(X, (3,), torch.ones(3, 1)), "weight", id="rms_norm-weight"),
    case(lambda: R.group_norm(IMAGE, 3), "num_groups", id="group_norm-groups-not-dividing-C"),
    case(lambda: R.group_norm(IMAGE, 0), "num_groups", id="group_norm-zero-groups"),
    case(lambda: R.group_norm(IMAGE, 2, torch.ones(3)), "weight", id="group_norm-weight"),
    case(lambda: R.group_norm(IMAGE, 2, C4, torch.ones(5)), "bias", id="group_norm-bias"),
    case(
        lambda: R.batch_norm(IMAGE, torch.zeros(3), torch.ones(4)),
        "running_mean",
        id="batch_norm-running_mean",
    ),
    case(
        lambda: R.batch_norm(IMAGE, torch.zeros(4), torch.ones(2)),
        "running_var",
        id="batch_norm-running_var",
    ),
    case(
        lambda: R.batch_norm(IMAGE, None, None, torch.ones(2), training=True),
        "weight",
        id="batch_norm-weight",
    ),
    case(
        lambda: R.instance_norm(IMAGE, None, None, C4, torch.ones(2)),
        "bias",
        id="instance_norm-bias",
    ),
    case(
        lambda: R.fused_add_rms_norm(X, _x(2, 4), (3,)),
        "residual",
        id="fused_add_rms_norm-residual",
    ),
    case(
        lambda: R.fused_add_layer_norm(X, _x(3, 3), (3,)),
        "residual",
        id="fused_add_layer_norm-residual",
    ),
    case(
        lambda: R.deep_norm(X, _x(2, 2), (3,)),
        "sublayer_output",
        id="deep_norm-sublayer_output",
    ),
]


@pytest.mark.parametrize(("call", "phrases"), SHAPE_CASES)
def test_shape_mismatch_is_named(call, phrases) -> None:
    expect_value_error(call, phrases)


NEGATIVE_EPS = [
    case(lambda: R.layer_norm(X, (3,), eps=-1e-5), "eps", id="layer_norm"),
    case(lambda: R.rms_norm(X, (3,), eps=-1.0), "eps", id="rms_norm"),
    case(lambda: R.group_norm(IMAGE, 2, eps=-1e-5), "eps", id="group_norm"),
    case(lambda: R.batch_norm(IMAGE, None, None, training=True, eps=-1e-5), "eps", id="batch"),
    case(lambda: R.instance_norm(IMAGE, eps=-1e-5), "eps", id="instance_norm"),
    case(lambda: R.deep_norm(X, X, (3,), eps=-1e-5), "eps", id="deep_norm"),
    case(lambda: R.fused_add_layer_norm(X, X, (3,), eps=-1e-5), "eps", id="fused_add_ln"),
]


@pytest.mark.parametrize(("call", "phrases"), NEGATIVE_EPS)
def test_negative_eps_is_rejected(call, phrases) -> None:
    expect_value_error(call, phrases)


UNKNOWN_VALUES = [
    case(lambda: R.layer_norm(X, (3,), variance="sample"), "variance", "sample", id="variance"),
    case(
        lambda: R.rms_norm(X, (3,), eps_placement="middle"),
        "eps_placement",
        "middle",
        id="eps_placement",
    ),
    case(
        lambda: R.deep_norm(X, X, (3,), add_rounding="never"),
        "add_rounding",
        "never",
        id="deep_norm-add_rounding",
    ),
    case(
        lambda: R.fused_add_rms_norm(X, X, (3,), add_rounding="bf16"),
        "add_rounding",
        "bf16",
        id="fused_add_rms_norm-add_rounding",
    ),
    case(
        lambda: R.batch_norm(
            IMAGE, torch.zeros(4), torch.ones(4), training=True, running_variance="sample"
        ),
        "running_variance",
        "sample",
        id="running_variance",
    ),
    case(
        lambda: R.batch_norm(
            IMAGE, torch.zeros(4), torch.ones(4), training=True, momentum_weights="old"
        ),
        "momentum_weights",
        "old",
        id="momentum_weights",
    ),
    case(
        lambda: R.group_norm(IMAGE, 2, variance="population"),
        "variance",
        "population",
        id="group_norm-variance",
    ),
]


@pytest.mark.parametrize(("call", "phrases"), UNKNOWN_VALUES)
def test_unknown_convention_value_is_named(call, phrases) -> None:
    expect_value_error(call, phrases)


UNSUPPORTED_DTYPES = [
    case(lambda: R.layer_norm(torch.ones(2, 3, dtype=torch.int64), (3,)), "dtype", id="torch-int"),
    case(lambda: R.rms_norm(np.ones((2, 3), dtype=np.int32), (3,)), "dtype", id="numpy-int"),
    case(
        lambda: R.group_norm(torch.ones(1, 2, 2, dtype=torch.complex64), 1),
        "dtype",
        id="torch-complex",
    ),
    case(lambda: R.layer_norm(X, (3,), out_dtype="int8"), "dtype", id="out_dtype-int8"),
    case(lambda: R.layer_norm(X, (3,), out_dtype="float8"), "dtype", id="out_dtype-unknown-name"),
]


@pytest.mark.parametrize(("call", "phrases"), UNSUPPORTED_DTYPES)
def test_unsupported_dtype_is_rejected(call, phrases) -> None:
    expect_value_error(call, phrases)


def test_cumulative_momentum_needs_num_batches_tracked() -> None:
    """momentum=None averages cumulatively: m = 1/num_batches_tracked, which must be given."""
    expect_value_error(
        lambda: R.batch_norm(IMAGE, torch.zeros(4), torch.ones(4), training=True, momentum=None),
        ("num_batches_tracked",),
    )


BACKWARD_CASES = [
    case(
        lambda: R.layer_norm_backward(_x(2, 4), X, (3,)),
        "grad_output",
        id="layer_norm_backward-grad_output",
    ),
    case(
        lambda: R.rms_norm_backward(X, X, (3,), eps=-1.0),
        "eps",
        id="rms_norm_backward-negative-eps",
    ),
    case(
        lambda: R.group_norm_backward(IMAGE, IMAGE, 3),
        "num_groups",
        id="group_norm_backward-num_groups",
    ),
    case(
        lambda: R.fused_add_rms_norm_backward(X, X, X, _x(2, 4), (3,)),
        "residual",
        id="fused_add_rms_norm_backward-residual",
    ),
    case(
        lambda: R.deep_norm_backward(X, X, _x(1, 3), (3,)),
        "sublayer_output",
        id="deep_norm_backward-sublayer_output",
    ),
    case(
        lambda: R.layer_norm_backward(X, X, (3,), variance="sample"),
        "variance",
        "sample",
        id="layer_norm_backward-variance",
    ),
]


@pytest.mark.parametrize(("call", "phrases"), BACKWARD_CASES)
def test_backward_bad_arguments(call, phrases) -> None:
    expect_value_error(call, phrases)


def expect_value_error(call: Callable[[], object], phrases: tuple[str, ...]) -> None:
    """``call()`` raises ValueError whose message contains every phrase (any case)."""
    __tracebackhide__ = True
    with pytest.raises(ValueError) as info:  # noqa: PT011 - the message is checked below
        call()
    message = str(info.value)
    missing = [p for p in phrases if not re.search(re.escape(p), message, re.IGNORECASE)]
    assert not missing, f"ValueError message {message!r} does not mention {missing}"
