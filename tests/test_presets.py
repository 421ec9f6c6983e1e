"""Tests of references.presets: the table, its lookups, ``Preset.arguments()`` and the type.

The expected presets and the API keywords (``preset_expectations``) are transcribed independently
of the module (from the API document and the sources each preset cites), so a drift on either
side fails here. DeepNorm's constants are tested in ``test_presets_deepnorm.py``, the presets run
through the reference functions and the cited implementations in
``test_presets_against_implementations.py``.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import FrozenInstanceError

import pytest
from preset_expectations import (
    ALL_PRESETS,
    API_KEYWORDS,
    CHOICES,
    CONVENTION_KEYWORDS,
    EXPECTED,
    ONNX_EPS,
    by_name,
)

from references.presets import (
    OP_KEYWORDS,
    OPS,
    PRESET_KEYWORDS,
    PRESETS,
    Preset,
    get_preset,
    presets_for,
)

# --- the table ------------------------------------------------------------------------------


def test_module_keyword_table_matches_the_api() -> None:
    assert set(OPS) == set(API_KEYWORDS)
    assert {op: set(keys) for op, keys in OP_KEYWORDS.items()} == API_KEYWORDS
    assert set(PRESET_KEYWORDS) == CONVENTION_KEYWORDS


def test_the_table_holds_exactly_the_expected_presets() -> None:
    assert sorted(PRESETS) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_matches_its_source(name: str) -> None:
    op, kwargs = EXPECTED[name]
    preset = get_preset(name)
    assert preset.op == op
    assert dict(preset.kwargs) == kwargs


def test_onnx_epsilon_is_the_float32_value() -> None:
    # 1e-5 is not a binary32 number; the value ONNX stores is 2.5e-13 below it.
    assert ONNX_EPS != 1e-5
    assert get_preset("onnx.layer_norm").kwargs["eps"] == 9.999999747378752e-06
    assert get_preset("onnx.batch_norm").kwargs["momentum"] == 0.8999999761581421


@by_name
def test_preset_keys_are_convention_keywords_of_its_op(preset: Preset) -> None:
    assert preset.op in API_KEYWORDS
    assert set(preset.kwargs) <= API_KEYWORDS[preset.op] & CONVENTION_KEYWORDS


@by_name
def test_preset_values_are_valid(preset: Preset) -> None:
    __tracebackhide__ = True
    for key, value in preset.kwargs.items():
        if key in CHOICES:
            assert value in CHOICES[key], f"{preset.name}: {key}={value!r}"
        elif key == "eps" and value is None:
            assert preset.op in {"rms_norm", "fused_add_rms_norm"}, f"{preset.name}: eps=None"
        elif key in {"eps", "momentum", "weight_offset"}:
            assert isinstance(value, float), f"{preset.name}: {key}={value!r} is not a float"
            assert math.isfinite(value), f"{preset.name}: {key}={value!r}"
            if key != "weight_offset":
                assert 0 <= value <= 1, f"{preset.name}: {key}={value!r} out of [0, 1]"


@by_name
def test_preset_is_looked_up_by_its_name(preset: Preset) -> None:
    assert get_preset(preset.name) is preset
    assert PRESETS[preset.name] is preset
    assert preset in presets_for(preset.op)


@by_name
def test_provenance_is_substantive(preset: Preset) -> None:
    # Each provenance names a source and what the reference does not model.
    assert len(preset.provenance) > 200
    assert "Not modelled" in preset.provenance


def test_names_are_unique_and_keyed_consistently() -> None:
    names = [preset.name for preset in ALL_PRESETS]
    assert len(names) == len(set(names))
    assert names == list(PRESETS)


@pytest.mark.parametrize("op", OPS)
def test_presets_for_returns_exactly_the_op(op: str) -> None:
    expected = [name for name, (preset_op, _) in EXPECTED.items() if preset_op == op]
    found = presets_for(op)
    assert all(preset.op == op for preset in found)
    assert sorted(preset.name for preset in found) == sorted(expected)


def test_presets_for_partitions_the_table() -> None:
    assert sum(len(presets_for(op)) for op in OPS) == len(PRESETS)


@pytest.mark.parametrize("op", ["layernorm", "LayerNorm", "", "torch.layer_norm"])
def test_presets_for_unknown_op(op: str) -> None:
    with pytest.raises(ValueError, match="unknown op"):
        presets_for(op)


@pytest.mark.parametrize("name", ["pytorch.LayerNorm", "torch.layer_norm", "", " seed.layer_norm"])
def test_get_preset_unknown_name_lists_the_known_ones(name: str) -> None:
    with pytest.raises(ValueError, match="unknown preset") as info:
        get_preset(name)
    message = str(info.value)
    assert all(known in message for known in PRESETS)


def test_get_preset_rejects_non_strings() -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset(None)  # type: ignore[arg-type]


# --- arguments() ----------------------------------------------------------------------------


@by_name
def test_arguments_is_a_fresh_copy(preset: Preset) -> None:
    first = preset.arguments()
    assert first == dict(preset.kwargs)
    assert type(first) is dict
    first["eps"] = 123.0
    first["extra"] = 1
    second = preset.arguments()
    assert second == dict(preset.kwargs)
    assert second is not first


def test_arguments_applies_overrides() -> None:
    preset = get_preset("pytorch.layer_norm")
    arguments = preset.arguments(eps=1e-6, out_dtype="float32", return_stats=True)
    assert arguments == {
        "eps": 1e-6,
        "variance": "biased",
        "eps_placement": "inside",
        "weight_offset": 0.0,
        "out_dtype": "float32",
        "return_stats": True,
    }
    assert preset.kwargs["eps"] == 1e-5


def test_arguments_takes_keywords_outside_the_preset() -> None:
    assert get_preset("deepnet.deep_norm").arguments(alpha=2.5)["alpha"] == 2.5
    arguments = get_preset("pytorch.batch_norm").arguments(training=True, momentum=None)
    assert arguments["training"] is True
    assert arguments["momentum"] is None
    assert get_preset("hf.llama.rms_norm").arguments(eps=None)["eps"] is None


@pytest.mark.parametrize(
    ("name", "overrides", "named"),
    [
        ("pytorch.layer_norm", {"epsilon": 1e-6}, ["epsilon"]),
        ("pytorch.layer_norm", {"alpha": 2.0, "momentum": 0.1}, ["alpha", "momentum"]),
        ("pytorch.rms_norm", {"training": True}, ["training"]),
        ("deepnet.deep_norm", {"running_variance": "biased"}, ["running_variance"]),
        ("onnx.instance_norm", {"add_rounding": "dtype"}, ["add_rounding"]),
    ],
)
def test_arguments_rejects_unknown_keys_naming_them(
    name: str, overrides: dict[str, object], named: list[str]
) -> None:
    with pytest.raises(ValueError, match="unknown keyword") as info:
        get_preset(name).arguments(**overrides)
    assert all(key in str(info.value) for key in named)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("pytorch.layer_norm", {"variance": "sample"}),
        ("pytorch.layer_norm", {"eps_placement": "outer"}),
        ("pytorch.layer_norm", {"eps": -1e-5}),
        ("pytorch.layer_norm", {"eps": math.nan}),
        ("pytorch.layer_norm", {"eps": None}),
        ("pytorch.layer_norm", {"eps": "1e-5"}),
        ("hf.gemma.rms_norm", {"weight_offset": math.inf}),
        ("pytorch.batch_norm", {"momentum": 1.5}),
        ("pytorch.batch_norm", {"momentum_weights": "old"}),
        ("pytorch.batch_norm", {"running_variance": True}),
        ("deepnet.deep_norm", {"add_rounding": "float32"}),
    ],
)
def test_arguments_rejects_invalid_values(name: str, overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(overrides))):
        get_preset(name).arguments(**overrides)


# --- the Preset type ------------------------------------------------------------------------


def test_preset_is_immutable() -> None:
    preset = get_preset("seed.layer_norm")
    with pytest.raises(TypeError):
        preset.kwargs["eps"] = 1.0  # type: ignore[index]
    with pytest.raises(FrozenInstanceError):
        preset.eps = 1.0  # type: ignore[attr-defined]


def test_preset_copies_the_given_mapping() -> None:
    kwargs: dict[str, object] = {"eps": 1e-6}
    preset = Preset("test.layer_norm", "layer_norm", kwargs, "made up for a test")
    kwargs["eps"] = 1.0
    assert preset.kwargs["eps"] == 1e-6


@by_name
def test_preset_pickles(preset: Preset) -> None:
    restored = pickle.loads(pickle.dumps(preset))
    assert restored == preset
    assert hash(restored) == hash(preset)


@pytest.mark.parametrize(
    ("op", "kwargs", "message"),
    [
        ("layernorm", {}, "op"),
        ("layer_norm", {"momentum": 0.1}, "momentum"),
        ("layer_norm", {"alpha": 1.0}, "alpha"),
        ("batch_norm", {"add_rounding": "dtype"}, "add_rounding"),
        ("layer_norm", {"variance": "population"}, "variance"),
        ("layer_norm", {"eps": None}, "eps"),
        ("rms_norm", {"eps": -0.5}, "eps"),
        ("batch_norm", {"momentum": -0.1}, "momentum"),
    ],
)
def test_preset_validates_on_construction(op: str, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Preset("test.bad", op, kwargs, "made up for a test")


@pytest.mark.parametrize(("name", "provenance"), [("", "source"), (" x ", "source"), ("x", " ")])
def test_preset_needs_a_name_and_a_provenance(name: str, provenance: str) -> None:
    with pytest.raises(ValueError, match=r"name|provenance"):
        Preset(name, "layer_norm", {}, provenance)
