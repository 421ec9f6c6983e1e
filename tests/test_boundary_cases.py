"""The boundary battery and the shape classes: every class and layout the bug threads name is
in both batteries, each case id names what its case exercises, and a named id means it."""

from __future__ import annotations

import math

import pytest

from conformance.cases import DTYPES, Case, catalogue, parse_case_id, with_norm_defaults
from conformance.coverage import AXES
from conformance.shape_classes import SHAPE_CLASSES, shape_classes
from conformance.specs import NORM_NAMES, spec

TRAILING_CLASSES = {
    "many_rows",
    "tile_edge",
    "model_size",
    "wide_row",
    "empty",
    "one_row",
    "n1",
    "high_rank",
}
CHANNEL_CLASSES = {"big_group", "empty", "one_row", "odd_spatial", "high_rank"}


@pytest.mark.parametrize(
    ("norm", "shape", "extra", "expected"),
    [
        ("layer_norm", (65537, 2), 1, {"many_rows"}),
        ("layer_norm", (65535, 2), 1, set()),
        ("layer_norm", (3, 1025), 1, {"tile_edge"}),
        ("layer_norm", (3, 1024), 1, set()),
        ("layer_norm", (2, 2560), 1, {"model_size"}),
        ("layer_norm", (1, 16385), 1, {"tile_edge", "wide_row", "one_row"}),
        ("layer_norm", (0, 768), 1, {"model_size", "empty"}),
        ("layer_norm", (2, 0), 1, {"empty"}),
        ("layer_norm", (4, 1), 1, {"n1"}),
        ("layer_norm", (2, 3, 4), 2, {"high_rank"}),
        ("rms_norm", (3, 5, 205), 2, {"tile_edge", "high_rank"}),
        ("group_norm", (1, 3, 151, 151), 1, {"big_group", "one_row", "odd_groups", "odd_spatial"}),
        ("group_norm", (2, 8, 4), 2, set()),
        ("group_norm", (4, 4, 1), 4, {"n1"}),
        ("batch_norm", (3, 2, 151, 151), 1, {"big_group", "odd_spatial"}),
        ("instance_norm", (2, 3, 3, 5, 7), 1, {"odd_spatial", "high_rank"}),
    ],
)
def test_shape_classes_follow_from_the_shape(
    norm: str, shape: tuple[int, ...], extra: int, expected: set[str]
) -> None:
    key = "num_groups" if norm == "group_norm" else "norm_dims"
    found = shape_classes(norm, shape, **{key: extra})
    assert set(found) == expected
    assert list(found) == [c for c in SHAPE_CLASSES if c in expected]  # in table order


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_every_class_and_layout_is_in_the_battery_of_every_norm_and_dtype(quick: bool) -> None:
    cases = catalogue(quick=quick)
    for norm in NORM_NAMES:
        wanted = TRAILING_CLASSES if spec(norm).trailing else CHANNEL_CLASSES
        if norm == "group_norm":
            wanted = wanted | {"odd_groups"}
        for dtype in DTYPES:
            mine = [c for c in cases if c.norm == norm and c.dtype == dtype]
            classes = {k for c in mine for k in c.shape_classes}
            missing = wanted - classes
            if dtype == "float64":  # the float64 cap (cases.FLOAT64_CHANNEL_ELEMENTS)
                missing -= {"many_rows", "big_group"}
            assert not missing, (norm, dtype, missing)
            inputs = {k for c in mine for k in c.layout.classes()}
            grads = {k for c in mine for k in c.grad_layout.classes()}
            params = {k for c in mine for k in c.param_layout.classes()}
            assert {"contiguous", "strided", "offset", "expanded"} <= inputs, (norm, dtype)
            assert {"contiguous", "strided", "transposed", "expanded"} <= grads, (norm, dtype)
            assert {"contiguous", "expanded"} <= params, (norm, dtype)
            if not spec(norm).trailing:
                assert "channels_last" in inputs & grads or dtype == "float64", (norm, dtype)
            if not quick:
                assert {"padded", "transposed"} <= inputs or not spec(norm).trailing
                assert {2, 3} <= {c.layout.offset for c in mine} | {
                    c.grad_layout.offset for c in mine
                }


def test_the_storage_offsets_one_two_and_three_are_in_the_full_battery() -> None:
    cases = catalogue(norms=["layer_norm"], dtypes=["float32"])
    assert {1, 2, 3} <= {c.layout.offset for c in cases}


def test_boundary_cases_stay_small() -> None:
    """Each case keeps its element count small: the classes cost seconds, not minutes."""
    cases = catalogue(quick=False)
    assert max(c.elements for c in cases) <= 2**18
    many = [c for c in cases if "many_rows" in c.shape_classes]
    assert many
    assert all(c.shape[-1] <= 3 for c in many)


def test_float64_boundary_cases_stop_at_the_float64_cap() -> None:
    cases = catalogue(dtypes=["float64"])
    assert max(c.elements for c in cases) <= 2**16


@pytest.mark.parametrize(
    "case_id",
    [
        "layer_norm-float32-65537x2-normal-o1-gb-many_rows-s7",
        "layer_norm-float32-3x1025-uniform-nc-gtr-tile_edge-s1",
        "layer_norm-float32-2x3x2560-normal-b0-gb0-wb-model_size-high_rank-s2",
        "group_norm-float32-1x3x151x151-normal-cl-gcl-g1-big_group-one_row-odd_groups-odd_spatial-s3",
        "batch_norm-float32-3x2x5x3-normal-pad1-o3-gnc-eval-odd_spatial-s4",
        "rms_norm-float32-2x5x129-normal-p102-go5-wo2-tile_edge-high_rank-s9",
    ],
)
def test_case_ids_round_trip_with_layouts_and_classes(case_id: str) -> None:
    case = parse_case_id(case_id)
    assert case.case_id == case_id
    assert list(case.shape_classes) == [t for t in case_id.split("-") if t in SHAPE_CLASSES]


def test_a_case_id_without_its_class_tags_is_the_same_case() -> None:
    tagged = parse_case_id("layer_norm-float32-3x1025-normal-nc-tile_edge-s1")
    assert parse_case_id("layer_norm-float32-3x1025-normal-nc-s1") == tagged


@pytest.mark.parametrize(
    ("case_id", "message"),
    [
        ("layer_norm-float32-3x7-normal-many_rows-s1", "do not follow from shape 3x7"),
        ("layer_norm-float32-3x7-normal-cl-s1", "channels-last needs a 4-D or 5-D tensor"),
        ("layer_norm-float32-3x7-normal-b1-s1", "expanded input along leading"),
        ("layer_norm-float32-3x7-normal-wb-noaffine-s1", "needs affine parameters"),
        ("layer_norm-float32-3x7-normal-o1-o2-s1", "repeats a choice"),
        ("group_norm-float32-2x6x4-normal-b2-g3-s1", "along the batch dim only"),
    ],
)
def test_case_ids_that_contradict_themselves_say_why(case_id: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_case_id(case_id)


def test_case_fields_recorded_with_each_check_name_the_layouts_and_classes() -> None:
    case = parse_case_id("layer_norm-float32-2x3x2560-normal-b0-gb0-wb-model_size-high_rank-s2")
    fields = case.result_fields()
    assert fields["layout"] == "expanded(0)"
    assert fields["grad_layout"] == "expanded(0)"
    assert fields["param_layout"] == "expanded(all)"
    assert fields["shape_classes"] == ["model_size", "high_rank"]
    plain = with_norm_defaults(Case("layer_norm", "float32", (3, 7), "normal", 1, affine=False))
    assert plain.result_fields()["param_layout"] == "none"


def test_the_coverage_axes_list_every_class() -> None:
    assert AXES["shape"][1] == SHAPE_CLASSES
    assert math.prod(len(AXES[a][1]) for a in AXES) > 0
