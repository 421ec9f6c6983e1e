"""Cases that once went wrong, each checked against a value worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import torch

import references as R
from references import fastpath, norms
from references.fast import working_for
from references.formats import FLOAT32
from references.layouts import trailing


def test_exact_path_keeps_the_sign_of_a_tiny_positive_result() -> None:
    """y0 = (0 - 1/2) / sqrt(1/4 + 2**-70) + 1 = +1.7e-21 > 0: it rounds to +0 in float16, and
    the enclosure around 0 must not be taken for a decision (-0.0 == +0.0 in Python)."""
    x = np.array([[0, 1]], np.float16)
    y = R.layer_norm(x, 2, np.ones(2, np.float16), np.ones(2, np.float16), eps=2.0**-70)
    assert y[0, 0] == 0
    assert not np.signbit(y[0, 0])
    assert y[0, 1] == 2


def test_overflowing_fast_path_is_not_taken_for_a_decision() -> None:
    """t r = 1e300 / sqrt(5e-324) overflows float64; with weight 0 the exact answer is the bias,
    while the fast path computes inf * 0 = NaN (with a NaN bound)."""
    x = np.array([[1e300], [2.0]])
    y = R.batch_norm(
        x,
        np.zeros(1),
        np.array([5e-324]),
        weight=np.array([0.0]),
        bias=np.array([0.5]),
        eps=0.0,
        out_dtype=np.float32,
    )
    assert y.ravel().tolist() == [0.5, 0.5]


def test_bias_gradient_is_the_sum_of_grad_even_in_nan_groups() -> None:
    """dL/dbias = sum(grad) does not depend on the input, NaN or not."""
    x = torch.randn(3, 4, dtype=torch.float64)
    x[1, 0] = math.nan
    g = torch.randn(3, 4, dtype=torch.float64)
    w, b = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    grads = R.layer_norm_backward(g, x, 4, w, b)
    exact = [math.fsum(column) for column in g.T.tolist()]  # correctly rounded column sums
    assert grads.bias.tolist() == exact
    assert torch.isnan(grads.weight).all()  # row 1's xhat is NaN, and it feeds every column


def test_negative_running_variance_gives_nan_not_an_exception() -> None:
    x = torch.randn(3, 2)
    out = R.batch_norm(x, torch.zeros(2), torch.tensor([-1.0, 1.0]), return_stats=True)
    assert torch.isnan(out.output[:, 0]).all()
    assert torch.isfinite(out.output[:, 1]).all()
    assert math.isnan(out.rstd[0])


def test_zeros_of_rms_norm_are_decided_on_the_fast_path() -> None:
    """RMSNorm of ReLU outputs: every zero input gives an exactly zero output, which the fast
    path must certify itself (the exact path would take ~0.1 ms per element)."""
    x = torch.relu(torch.randn(16, 256))
    s = norms.setup(
        x,
        lambda shape: trailing(shape, 256),
        torch.randn(256),
        None,
        None,
        center=False,
        variance="biased",
        eps_placement="inside",
        weight_offset=0.0,
    )
    values, decided = fastpath.fast_output(s.problem(), FLOAT32, working_for(FLOAT32))
    zeros = (x == 0).numpy()
    assert zeros.any()
    assert decided[zeros].all()
    assert not np.signbit(values[zeros]).any()


def test_constant_rows_of_layer_norm_are_decided_on_the_fast_path() -> None:
    """A constant row has t = 0 exactly (the shift is the row's own value), so y = bias exactly;
    constant (and zero-padded) rows are a named input class of the conformance battery."""
    x = torch.randn(8, 128)
    x[::2] = 3.0
    bias = torch.randn(128)
    s = norms.setup(
        x,
        lambda shape: trailing(shape, 128),
        torch.randn(128),
        bias,
        1e-5,
        center=True,
        variance="biased",
        eps_placement="inside",
        weight_offset=0.0,
    )
    values, decided = fastpath.fast_output(s.problem(), FLOAT32, working_for(FLOAT32))
    assert decided[::2].all()
    assert (values[::2] == bias.numpy()).all()
