"""Tests of references.presets: the table, its lookups, and DeepNorm's constants.

The expected presets and the API keywords below are transcribed independently of the module
(from the API document and the sources each preset cites), so a drift on either side fails here.
Where the reference functions or torch are importable, the presets are also run through them and
compared with what the cited implementation computes.
"""

from __future__ import annotations

import inspect
import math
import pickle
from collections.abc import Callable
from dataclasses import FrozenInstanceError
from decimal import Decimal, localcontext
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from references.presets import (
    DEEPNORM_ARCHITECTURES,
    OP_KEYWORDS,
    OPS,
    PRESET_KEYWORDS,
    PRESETS,
    Preset,
    deepnorm_constants,
    get_preset,
    presets_for,
)

# --- the API, as its document states it ------------------------------------------------------

# Keywords of each reference function that are neither tensors nor shapes.
_COMMON = {"eps", "variance", "eps_placement", "weight_offset", "out_dtype", "return_stats"}
_STATS = {"momentum", "running_variance", "momentum_weights", "num_batches_tracked"}
API_KEYWORDS: dict[str, set[str]] = {
    "layer_norm": _COMMON,
    "rms_norm": _COMMON,
    "group_norm": _COMMON,
    "batch_norm": _COMMON | _STATS | {"training"},
    "instance_norm": _COMMON | _STATS | {"use_input_stats"},
    "deep_norm": _COMMON | {"alpha", "add_rounding"},
    "fused_add_rms_norm": _COMMON | {"alpha", "add_rounding"},
    "fused_add_layer_norm": _COMMON | {"alpha", "add_rounding"},
}
CONVENTION_KEYWORDS = {
    "eps",
    "variance",
    "eps_placement",
    "weight_offset",
    "running_variance",
    "momentum",
    "momentum_weights",
    "add_rounding",
}
CHOICES = {
    "variance": {"biased", "unbiased"},
    "eps_placement": {"inside", "outside"},
    "running_variance": {"biased", "unbiased"},
    "momentum_weights": {"new", "running"},
    "add_rounding": {"dtype", "exact"},
}

# --- the presets, as their sources state them --------------------------------------------------

# ONNX attributes are 32-bit floats in the model file.
ONNX_EPS = float(np.float32(1e-5))
ONNX_MOMENTUM = float(np.float32(0.9))


def _conv(
    eps: float | None, variance: str = "biased", placement: str = "inside", offset: float = 0.0
) -> dict[str, object]:
    return {"eps": eps, "variance": variance, "eps_placement": placement, "weight_offset": offset}


def _running(kind: str, momentum: float, weights: str) -> dict[str, object]:
    return {"running_variance": kind, "momentum": momentum, "momentum_weights": weights}


EXPECTED: dict[str, tuple[str, dict[str, object]]] = {
    "pytorch.layer_norm": ("layer_norm", _conv(1e-5)),
    "pytorch.rms_norm": ("rms_norm", _conv(None)),
    "pytorch.group_norm": ("group_norm", _conv(1e-5)),
    "pytorch.batch_norm": ("batch_norm", _conv(1e-5) | _running("unbiased", 0.1, "new")),
    "pytorch.instance_norm": ("instance_norm", _conv(1e-5) | _running("unbiased", 0.1, "new")),
    "onnx.layer_norm": ("layer_norm", _conv(ONNX_EPS)),
    "onnx.batch_norm": (
        "batch_norm",
        _conv(ONNX_EPS) | _running("biased", ONNX_MOMENTUM, "running"),
    ),
    "onnx.instance_norm": ("instance_norm", _conv(ONNX_EPS)),
    "onnx.group_norm": ("group_norm", _conv(ONNX_EPS)),
    "onnx.rms_norm": ("rms_norm", _conv(ONNX_EPS)),
    "keras.layer_norm": ("layer_norm", _conv(1e-3)),
    "keras.batch_norm": ("batch_norm", _conv(1e-3) | _running("biased", 0.99, "running")),
    "keras.group_norm": ("group_norm", _conv(1e-3)),
    "seed.layer_norm": ("layer_norm", _conv(1e-6, "biased", "outside")),
    "annotated_transformer.layer_norm": ("layer_norm", _conv(1e-6, "unbiased", "outside")),
    "hf.llama.rms_norm": ("rms_norm", _conv(1e-6)),
    "hf.gemma.rms_norm": ("rms_norm", _conv(1e-6, offset=1.0)),
    "t5.layer_norm": ("rms_norm", _conv(1e-6)),
    "deepnet.deep_norm": ("deep_norm", _conv(1e-5) | {"add_rounding": "dtype"}),
}

ALL_PRESETS = list(PRESETS.values())
by_name = pytest.mark.parametrize("preset", ALL_PRESETS, ids=[p.name for p in ALL_PRESETS])


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


# --- against the reference functions and the cited implementations ---------------------------

# Float64 results on rows of at most a few dozen elements: torch's and numpy's own rounding
# errors stay far below this relative bound, while any convention difference (n vs n - 1, eps
# inside vs outside, momentum weighting) shows up at 1e-3 or more.
_FLOAT64_AGREEMENT = 1e-12


def _reference(op: str) -> Callable[..., Any]:
    try:
        import references
    except Exception as error:  # the package is built alongside; its absence is not our failure
        pytest.skip(f"references is not importable: {error}")
    function: Callable[..., Any] | None = getattr(references, op, None)
    if function is None:
        pytest.skip(f"references.{op} is not available")
    return function


def _rng() -> np.random.Generator:
    return np.random.default_rng(20220301)


@pytest.mark.parametrize("op", OPS)
def test_reference_signature_takes_every_keyword(op: str) -> None:
    parameters = inspect.signature(_reference(op)).parameters
    assert OP_KEYWORDS[op] <= set(parameters)


def _call(preset: Preset, **extra: object) -> Any:
    """Run ``preset`` through its reference function on a small float64 input."""
    function, rng = _reference(preset.op), _rng()
    x = rng.standard_normal((2, 4, 6))
    arguments = preset.arguments(**extra)
    if preset.op in {"layer_norm", "rms_norm"}:
        return function(x, (6,), rng.standard_normal(6), **arguments)
    if preset.op == "group_norm":
        return function(x, 2, rng.standard_normal(4), rng.standard_normal(4), **arguments)
    if preset.op == "deep_norm":
        return function(x, rng.standard_normal(x.shape), (6,), **arguments)
    stats = (np.zeros(4), np.ones(4))
    if preset.op == "batch_norm":
        return function(x, *stats, training=True, **arguments)
    return function(x, *stats, **arguments)


@by_name
def test_reference_accepts_every_preset(preset: Preset) -> None:
    extra = {"alpha": 2.0} if preset.op == "deep_norm" else {}
    output = _call(preset, **extra)
    assert np.all(np.isfinite(output))


def _torch() -> Any:
    return pytest.importorskip("torch")


def _agree(actual: Any, desired: Any) -> None:
    np.testing.assert_allclose(np.asarray(actual), np.asarray(desired), rtol=_FLOAT64_AGREEMENT)


def test_pytorch_layer_rms_group_presets_agree_with_torch() -> None:
    torch, rng = _torch(), _rng()
    functional = torch.nn.functional
    x, w, b = rng.standard_normal((3, 4, 6)), rng.standard_normal(6), rng.standard_normal(6)
    tx, tw, tb = (torch.from_numpy(a) for a in (x, w, b))
    layer_norm, rms_norm = _reference("layer_norm"), _reference("rms_norm")
    _agree(
        layer_norm(x, (6,), w, b, **get_preset("pytorch.layer_norm").arguments()),
        functional.layer_norm(tx, (6,), tw, tb),
    )
    _agree(
        rms_norm(x, (6,), w, **get_preset("pytorch.rms_norm").arguments()),
        functional.rms_norm(tx, (6,), tw),
    )
    cw, cb = rng.standard_normal(4), rng.standard_normal(4)
    _agree(
        _reference("group_norm")(x, 2, cw, cb, **get_preset("pytorch.group_norm").arguments()),
        functional.group_norm(tx, 2, torch.from_numpy(cw), torch.from_numpy(cb)),
    )


@pytest.mark.parametrize("op", ["batch_norm", "instance_norm"])
def test_pytorch_running_statistics_agree_with_torch(op: str) -> None:
    torch, rng = _torch(), _rng()
    x = rng.standard_normal((3, 4, 5))
    mean, var = rng.standard_normal(4), 1 + rng.random(4)
    torch_mean, torch_var = torch.from_numpy(mean.copy()), torch.from_numpy(var.copy())
    arguments = get_preset(f"pytorch.{op}").arguments()
    if op == "batch_norm":
        output = _reference(op)(x, mean, var, training=True, **arguments)
        desired = torch.nn.functional.batch_norm(
            torch.from_numpy(x), torch_mean, torch_var, training=True
        )
    else:
        output = _reference(op)(x, mean, var, **arguments)
        desired = torch.nn.functional.instance_norm(torch.from_numpy(x), torch_mean, torch_var)
    _agree(output, desired)
    _agree(mean, torch_mean)
    _agree(var, torch_var)


@pytest.mark.parametrize(
    ("name", "correction"), [("seed.layer_norm", 0), ("annotated_transformer.layer_norm", 1)]
)
def test_hand_written_layer_norms_agree_with_their_code(name: str, correction: int) -> None:
    # Both divide by std + eps; the seed passes unbiased=False, the Annotated Transformer keeps
    # torch's default (correction=1).
    rng = _rng()
    x, a, b = rng.standard_normal((3, 7)), rng.standard_normal(7), rng.standard_normal(7)
    eps = get_preset(name).kwargs["eps"]
    assert isinstance(eps, float)
    mean = x.mean(-1, keepdims=True)
    std = x.std(-1, keepdims=True, ddof=correction)
    desired = a * (x - mean) / (std + eps) + b
    _agree(_reference("layer_norm")(x, (7,), a, b, **get_preset(name).arguments()), desired)


def test_gemma_scales_by_one_plus_weight() -> None:
    rng = _rng()
    x, w = rng.standard_normal((3, 8)), rng.standard_normal(8)
    desired = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * (1 + w)
    _agree(
        _reference("rms_norm")(x, (8,), w, **get_preset("hf.gemma.rms_norm").arguments()), desired
    )


@pytest.mark.parametrize("name", ["onnx.batch_norm", "keras.batch_norm"])
def test_running_weighted_batch_norm_updates_like_the_spec(name: str) -> None:
    # ONNX: running_var = input_var * momentum + ReduceVar(X) * (1 - momentum), population
    # variance; Keras 3 states the same update for its moving variance.
    rng = _rng()
    x = rng.standard_normal((3, 4, 5))
    mean, var = rng.standard_normal(4), 1 + rng.random(4)
    momentum = get_preset(name).kwargs["momentum"]
    assert isinstance(momentum, float)
    axes = (0, 2)
    desired_mean = mean * momentum + x.mean(axes) * (1 - momentum)
    desired_var = var * momentum + x.var(axes) * (1 - momentum)
    _reference("batch_norm")(x, mean, var, training=True, **get_preset(name).arguments())
    _agree(mean, desired_mean)
    _agree(var, desired_var)
