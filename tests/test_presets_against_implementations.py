"""The presets run through the reference functions and compared with the cited implementations.

Where the reference functions or torch are importable, each preset is run through its reference
function and compared with what the implementation it cites computes (torch.nn.functional, the
seed's and the Annotated Transformer's hand-written LayerNorms, Gemma's RMSNorm, the ONNX and
Keras running-statistics updates); otherwise these tests skip.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from preset_expectations import by_name

from references.presets import OP_KEYWORDS, OPS, Preset, get_preset

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
