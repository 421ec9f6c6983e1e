"""Tests of references.presets' DeepNorm constants against the DeepNet paper's formulas.

alpha and beta per architecture are compared with the paper's table evaluated to 40 significant
digits, within a few ulps (libm's pow is faithful, not correctly rounded).
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from references.presets import DEEPNORM_ARCHITECTURES, deepnorm_constants

# --- DeepNorm constants ---------------------------------------------------------------------

# libm's pow is faithful, not correctly rounded, and the encoder side multiplies by a constant:
# a few ulps between the float result and the 40-digit value of the paper's formula.
_ULPS = 4


def _paper_constants(architecture: str, n: int, m: int) -> tuple[Decimal, Decimal]:
    """alpha and beta from the DeepNet paper's table, to 40 significant digits."""
    with localcontext() as context:
        context.prec = 40
        quarter, sixteenth = Decimal(1) / 4, Decimal(1) / 16
        if architecture == "encoder-only":
            return Decimal(2 * n) ** quarter, Decimal(8 * n) ** -quarter
        if architecture == "decoder-only":
            return Decimal(2 * m) ** quarter, Decimal(8 * m) ** -quarter
        if architecture == "encoder-decoder/encoder":
            base = Decimal(n**4 * m)
            return Decimal("0.81") * base**sixteenth, Decimal("0.87") * base**-sixteenth
        return Decimal(3 * m) ** quarter, Decimal(12 * m) ** -quarter


def _assert_close_to(value: float, exact: Decimal, what: str) -> None:
    __tracebackhide__ = True
    error = abs(Decimal(value) - exact)
    assert error <= _ULPS * Decimal(math.ulp(value)), (
        f"{what}: got {value!r}, paper's formula gives {exact:.20g} "
        f"(off by {error / Decimal(math.ulp(value)):.2f} ulp)"
    )


DEEPNORM_CASES = [
    ("encoder-only", 6, 0),
    ("encoder-only", 18, 0),
    ("encoder-only", 100, 0),
    ("decoder-only", 0, 6),
    ("decoder-only", 0, 18),
    ("encoder-decoder/encoder", 6, 6),
    ("encoder-decoder/encoder", 18, 18),
    ("encoder-decoder/encoder", 12, 6),
    ("encoder-decoder/decoder", 6, 6),
    ("encoder-decoder/decoder", 18, 18),
    ("encoder-decoder/decoder", 12, 6),
]


@pytest.mark.parametrize(
    ("architecture", "n", "m"), DEEPNORM_CASES, ids=[f"{a}-N{n}-M{m}" for a, n, m in DEEPNORM_CASES]
)
def test_deepnorm_constants_follow_the_paper(architecture: str, n: int, m: int) -> None:
    alpha, beta = deepnorm_constants(architecture, encoder_layers=n, decoder_layers=m)
    exact_alpha, exact_beta = _paper_constants(architecture, n, m)
    _assert_close_to(alpha, exact_alpha, f"{architecture} alpha (N={n}, M={m})")
    _assert_close_to(beta, exact_beta, f"{architecture} beta (N={n}, M={m})")


def test_deepnorm_constants_closed_forms() -> None:
    # (2 * 18)^(1/4) = sqrt(6), (8 * 18)^(-1/4) = 1 / sqrt(12); (2 * 2)^(1/4) = sqrt(2), 16^(-1/4).
    _assert_close_to(deepnorm_constants("encoder-only", 18)[0], Decimal(6).sqrt(), "alpha")
    _assert_close_to(deepnorm_constants("encoder-only", 18)[1], 1 / Decimal(12).sqrt(), "beta")
    assert deepnorm_constants("decoder-only", decoder_layers=2)[1] == 0.5
    _assert_close_to(
        deepnorm_constants("encoder-decoder/decoder", 1, 12)[0], Decimal(6).sqrt(), "alpha"
    )


def test_deepnorm_constants_match_published_example() -> None:
    # The worked example N = 12, M = 6 as quoted to four places in write-ups of the paper.
    encoder = deepnorm_constants("encoder-decoder/encoder", 12, 6)
    decoder = deepnorm_constants("encoder-decoder/decoder", 12, 6)
    assert [round(value, 4) for value in (*encoder, *decoder)] == [1.6862, 0.4179, 2.0598, 0.3433]


@given(layers=st.integers(min_value=1, max_value=100_000))
@example(layers=1)
def test_deepnorm_alpha_times_beta_is_depth_free(layers: int) -> None:
    # (2L)^(1/4) (8L)^(-1/4) = (3L)^(1/4) (12L)^(-1/4) = 4^(-1/4) = 1/sqrt(2) for every L.
    for alpha, beta in (
        deepnorm_constants("encoder-only", encoder_layers=layers),
        deepnorm_constants("decoder-only", decoder_layers=layers),
        deepnorm_constants("encoder-decoder/decoder", 1, layers),
    ):
        _assert_close_to(alpha * beta, 1 / Decimal(2).sqrt(), "alpha * beta")
        assert alpha > 1 > beta
    alpha, beta = deepnorm_constants("encoder-decoder/encoder", layers, layers)
    _assert_close_to(alpha * beta, Decimal("0.81") * Decimal("0.87"), "encoder alpha * beta")


@given(n=st.integers(min_value=1, max_value=10_000), m=st.integers(min_value=1, max_value=10_000))
def test_deepnorm_alpha_grows_with_depth(n: int, m: int) -> None:
    alpha, beta = deepnorm_constants("encoder-decoder/encoder", n, m)
    deeper_alpha, deeper_beta = deepnorm_constants("encoder-decoder/encoder", n + 1, m)
    assert deeper_alpha > alpha
    assert deeper_beta < beta


def test_deepnorm_constants_accept_numpy_integers() -> None:
    # Not in the annotation (int), but any integer that supports __index__ is taken as one.
    numpy_six: Any = np.int64(6)
    assert deepnorm_constants("encoder-only", numpy_six) == deepnorm_constants("encoder-only", 6)


LAYERS_FOR = {"encoder-only": (6, 0), "decoder-only": (0, 6)}


@pytest.mark.parametrize("architecture", DEEPNORM_ARCHITECTURES)
def test_deepnorm_architectures_are_all_accepted(architecture: str) -> None:
    alpha, beta = deepnorm_constants(architecture, *LAYERS_FOR.get(architecture, (6, 6)))
    assert alpha > 1 > beta > 0


@pytest.mark.parametrize(
    ("architecture", "n", "m"),
    [
        ("encoder", 6, 0),
        ("Encoder-Only", 6, 0),
        (None, 6, 0),
        ("encoder-only", 0, 0),
        ("encoder-only", 6, 6),
        ("encoder-only", -1, 0),
        ("decoder-only", 0, 0),
        ("decoder-only", 6, 6),
        ("encoder-decoder/encoder", 6, 0),
        ("encoder-decoder/encoder", 0, 6),
        ("encoder-decoder/decoder", 0, 6),
        ("encoder-decoder/decoder", 6, -6),
        ("encoder-only", 6.0, 0),
        ("encoder-only", True, 0),
        ("encoder-only", "6", 0),
        ("decoder-only", 0, None),
    ],
)
def test_deepnorm_constants_reject_bad_input(architecture: Any, n: Any, m: Any) -> None:
    with pytest.raises(ValueError, match=r"architecture|layers"):
        deepnorm_constants(architecture, n, m)
