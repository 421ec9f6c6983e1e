"""Correct rounding of float64 arrays into each format, against exact rational rounding."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from references.formats import FORMATS, round_array, round_fraction


def _values(fmt_name: str) -> np.ndarray:
    fmt = FORMATS[fmt_name]
    rng = np.random.default_rng(17)
    spread = rng.standard_normal(3000) * np.exp2(rng.integers(fmt.emin - 12, fmt.emax + 2, 3000))
    # Exact ties between neighbours of the format, and their float64 neighbours.
    odd = rng.integers(2 ** (fmt.precision - 1), 2**fmt.precision, 500) * 2 + 1
    ties = odd * np.exp2(rng.integers(fmt.emin, fmt.emax - 1, 500) - fmt.precision)
    near = np.concatenate([ties, np.nextafter(ties, 0), np.nextafter(ties, np.inf)])
    edges = [0.0, fmt.max_finite, np.nextafter(fmt.max_finite, np.inf), 2.0**fmt.emin]
    edges += [2.0 ** (fmt.emin - fmt.precision), 1.5 * 2.0 ** (fmt.emin - fmt.precision)]
    finite = np.concatenate([spread, near, edges])
    return np.concatenate([finite, -finite])


@pytest.mark.parametrize("fmt_name", ["bfloat16", "float16", "float32"])
def test_round_array_is_correct_rounding(fmt_name: str) -> None:
    fmt = FORMATS[fmt_name]
    values = _values(fmt_name)
    with np.errstate(over="ignore"):
        rounded = round_array(values, fmt)
    expected = np.array([round_fraction(Fraction(v), fmt) for v in values.tolist()])
    expected = np.where(values == 0, values, expected)  # a signed zero stays as it is (IEEE)
    mismatched = ~((rounded == expected) & (np.signbit(rounded) == np.signbit(expected)))
    assert not mismatched.any(), (
        f"{mismatched.sum()} / {values.size} mismatched; first: {values[mismatched][:3]!r} -> "
        f"{rounded[mismatched][:3]!r}, expected {expected[mismatched][:3]!r}"
    )


def test_round_array_keeps_non_finite_values() -> None:
    special = np.array([np.nan, np.inf, -np.inf])
    for fmt in FORMATS.values():
        rounded = round_array(special, fmt)
        assert np.isnan(rounded[0])
        assert rounded[1:].tolist() == [np.inf, -np.inf]
