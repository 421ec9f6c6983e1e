"""The case catalogue and the grouping of elements into reduction groups."""

from __future__ import annotations

import numpy as np
import pytest

from conformance.cases import DTYPES, catalogue, parse_case_id
from conformance.distributions import DISTRIBUTIONS, QUICK_DISTRIBUTIONS
from conformance.geometry import grouping
from conformance.inputs import build_inputs
from conformance.specs import NORM_NAMES


def test_case_ids_round_trip_through_the_parser() -> None:
    cases = catalogue(quick=False, seed=3)
    for case in cases:
        assert parse_case_id(case.case_id) == case, case.case_id
    assert len({c.case_id for c in cases}) == len(cases)


def test_quick_battery_keeps_every_distribution_layout_and_norm_dtype_pair() -> None:
    cases = catalogue(quick=True)
    assert {c.distribution for c in cases} == set(QUICK_DISTRIBUTIONS)
    assert {(c.norm, c.dtype) for c in cases} == {(n, d) for n in NORM_NAMES for d in DTYPES}
    names = {c.layout.name for c in cases}
    assert {"contiguous", "noncontiguous", "channels_last", "offset(1)"} <= names
    assert any(not c.training for c in cases)
    assert any(not c.affine for c in cases)
    assert len(cases) < len(catalogue(quick=False))


def test_full_battery_has_every_distribution_and_hidden_size() -> None:
    cases = catalogue(norms=["layer_norm"], dtypes=["float32"])
    assert {c.distribution for c in cases} == set(DISTRIBUTIONS)
    assert {c.shape[-1] for c in cases} >= {1, 7, 127, 768, 4096, 8192, 16384}


def test_case_seed_depends_on_run_seed_not_position() -> None:
    a = {c.case_id.rsplit("-", 1)[0]: c.seed for c in catalogue(quick=True, seed=0)}
    b = {c.case_id.rsplit("-", 1)[0]: c.seed for c in catalogue(quick=True, seed=1)}
    c = {
        x.case_id.rsplit("-", 1)[0]: x.seed
        for x in catalogue(quick=True, seed=0, norms=["rms_norm"])
    }
    assert a != b
    assert all(a[k] == v for k, v in c.items())


@pytest.mark.parametrize(
    "bad",
    [
        "layer_norm-float32",
        "nope-float32-2x3-normal-s1",
        "layer_norm-float8-2x3-normal-s1",
        "layer_norm-float32-2xz-normal-s1",
        "layer_norm-float32-2x3-normal-zz-s1",
        "layer_norm-float32-2x3-normal",
        "group_norm-float32-2x5x3-normal-g2-s1",
    ],
)
def test_bad_case_ids_are_rejected_with_a_reason(bad: str) -> None:
    with pytest.raises(ValueError, match=r"case id|group_norm|unknown norm"):
        parse_case_id(bad)


def test_inputs_are_drawn_from_the_case_seed_and_exact_in_dtype() -> None:
    case = catalogue(quick=True, norms=["fused_add_layer_norm"], dtypes=["bfloat16"])[0]
    a, b = build_inputs(case), build_inputs(case)
    for name, array in a.arrays.items():
        if array is not None:
            assert str(array.dtype) == "bfloat16"
            assert np.array_equal(array, b.arrays[name], equal_nan=True)
    assert a.arrays["residual"] is not None


@pytest.mark.parametrize(
    ("norm", "shape", "kw", "rows"),
    [
        ("batch_norm", (2, 3, 4, 5), {}, (3, 40)),
        ("group_norm", (2, 6, 3), {"num_groups": 3}, (6, 6)),
        ("instance_norm", (2, 3, 4), {}, (6, 4)),
        ("layer_norm", (3, 4, 5), {"norm_dims": 2}, (3, 20)),
    ],
)
def test_grouping_rows_are_the_reduction_groups(
    norm: str, shape: tuple[int, ...], kw: dict[str, int], rows: tuple[int, int]
) -> None:
    g = grouping(norm, shape, **kw)
    a = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    r = g.to_rows(a)
    assert r.shape == rows
    assert np.array_equal(g.from_rows(r), a)
    # Every element of a row uses a parameter of the row's channels, checked element by element.
    index = g.param_index()
    for row in range(rows[0]):
        for k in range(0, rows[1], max(1, rows[1] // 7)):
            flat = int(r[row, k])
            position = np.unravel_index(flat, shape)
            expected = position[-1] if norm == "layer_norm" else position[1]
            if norm == "layer_norm":
                expected = flat % 20
            assert index[row, k] == expected
