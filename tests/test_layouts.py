"""Memory layouts: the tensors the suite hands an adapter really have the strides, offsets and
stride-0 dimensions their case id names, and the storage around them is poison."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conformance.calls import call_adapter
from conformance.cases import parse_case_id
from conformance.inputs import build_inputs, layout_of, to_tensor
from conformance.layouts import (
    CHANNELS_LAST,
    CONTIGUOUS,
    NONCONTIGUOUS,
    Layout,
    as_layout,
    classes_of_name,
    from_tokens,
    place,
    replicate,
)


def _values(shape: tuple[int, ...], layout: Layout) -> torch.Tensor:
    rng = np.random.default_rng(sum(shape))
    return torch.from_numpy(replicate(rng.normal(size=shape), layout)).float()


@pytest.mark.parametrize(
    ("tokens", "shape", "strides", "offset"),
    [
        ((), (3, 5), (5, 1), 0),
        (("nc",), (3, 5), (10, 2), 0),
        (("pad3",), (3, 5), (8, 1), 0),
        (("o1",), (3, 5), (5, 1), 1),
        (("o3", "nc"), (2, 4), (8, 2), 3),
        (("tr",), (3, 5), (1, 3), 0),
        (("tr",), (2, 3, 5), (15, 1, 3), 0),
        (("cl",), (2, 3, 4, 5), (60, 1, 15, 3), 0),
        (("cl",), (2, 3, 2, 4, 5), (120, 1, 60, 15, 3), 0),
        (("p021",), (2, 3, 4), (12, 1, 3), 0),
        (("b0",), (4, 5), (0, 1), 0),
        (("b",), (4, 5), (0, 0), 0),
        (("b01",), (2, 3, 4), (0, 0, 1), 0),
        (("o2", "b0"), (4, 5), (0, 1), 2),
    ],
)
def test_placed_tensors_have_the_layout_their_tokens_name(
    tokens: tuple[str, ...], shape: tuple[int, ...], strides: tuple[int, ...], offset: int
) -> None:
    layout = from_tokens(tokens)
    values = _values(shape, layout)
    tensor = place(values, layout, "cpu")
    assert tensor.stride() == strides
    assert tensor.storage_offset() == offset
    assert torch.equal(tensor, values)
    assert layout.tokens() == list(tokens) or sorted(layout.tokens()) == sorted(tokens)
    assert from_tokens(layout.tokens()) == layout


def test_storage_a_layout_does_not_view_is_nan() -> None:
    """Gaps, padding, the elements before the offset and what a dense reading of an expanded
    tensor reaches all hold NaN: a kernel that ignores a stride reads poison."""
    for tokens, shape in [(("nc",), (3, 4)), (("pad2", "o3"), (3, 4)), (("b",), (3, 4))]:
        layout = from_tokens(tokens)
        tensor = place(_values(shape, layout), layout, "cpu")
        storage = torch.empty(0).set_(tensor.untyped_storage())
        viewed = torch.zeros(storage.numel(), dtype=torch.bool)
        viewed.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset()).fill_(True)
        assert storage[~viewed].isnan().all(), tokens
        assert not storage[viewed].isnan().any(), tokens
        # A dense reading from the offset stays inside the storage.
        assert storage.numel() >= tensor.storage_offset() + math.prod(shape)


def test_an_expanded_tensor_reads_as_stride_zero() -> None:
    layout = from_tokens(["b"])
    tensor = place(_values((6, 7), layout), layout, "cpu")
    assert tensor.stride() == (0, 0)
    assert bool((tensor == tensor[0, 0]).all())


def test_legacy_layout_names_still_name_layouts() -> None:
    assert as_layout("contiguous") is CONTIGUOUS
    assert as_layout("noncontiguous") == NONCONTIGUOUS == Layout(step=2)
    assert as_layout("channels_last") == CHANNELS_LAST
    with pytest.raises(ValueError, match="unknown layout 'diagonal'"):
        as_layout("diagonal")


@pytest.mark.parametrize(
    ("name", "classes"),
    [
        ("contiguous", ("contiguous",)),
        ("noncontiguous", ("strided",)),
        ("transposed+padded(3)+offset(1)", ("padded", "transposed", "offset")),
        ("channels_last+expanded(all)", ("channels_last", "expanded")),
        ("permuted(0,2,1)", ("permuted",)),
        ("none", ()),
    ],
)
def test_layout_names_map_back_to_their_classes(name: str, classes: tuple[str, ...]) -> None:
    assert classes_of_name(name) == classes


def test_every_layout_names_its_classes_in_its_name() -> None:
    for tokens in (["nc", "o1"], ["tr", "pad2"], ["cl", "b0"], ["p10"], []):
        layout = from_tokens(tokens)
        assert classes_of_name(layout.name) == layout.classes()


@pytest.mark.parametrize(
    ("tokens", "shape", "message"),
    [
        (["cl"], (3, 4), "channels-last needs a 4-D or 5-D tensor"),
        (["tr"], (5,), "needs at least 2 dimensions"),
        (["p01"], (2, 3, 4), "not a permutation of 3 dims"),
        (["b3"], (2, 3), "cannot expand dimension 3"),
    ],
)
def test_a_layout_a_shape_cannot_hold_says_why(
    tokens: list[str], shape: tuple[int, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        from_tokens(tokens).validate(shape)


def test_repeated_or_unknown_tokens_are_refused() -> None:
    with pytest.raises(ValueError, match="repeats a choice"):
        from_tokens(["o1", "o2"])
    with pytest.raises(ValueError, match="not a layout token"):
        from_tokens(["zz"])


def test_the_adapter_receives_the_layouts_of_the_case_id() -> None:
    """What an adapter sees: the input at its offset and strides, the weight expanded, and in
    the backward pass the upstream gradient autograd hands it, stride 0 and all."""
    case = parse_case_id("layer_norm-float32-4x1025-normal-o3-gb-wb-tile_edge-s5")
    inputs = build_inputs(case)
    seen: dict[str, object] = {}

    class Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
            return x * 1

        @staticmethod
        def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
            seen["grad"] = (g.stride(), g.storage_offset())
            return g

    def layer_norm(x, shape, weight=None, bias=None, eps=1e-5):  # type: ignore[no-untyped-def]
        seen["input"] = (x.stride(), x.storage_offset(), x.data_ptr() % 16)
        seen["weight"] = weight.stride()
        return Spy.apply(torch.nn.functional.layer_norm(x, shape, weight, bias, eps))

    outcome = call_adapter(layer_norm, inputs, "cpu", grad=True)
    assert not outcome.problems
    from conformance.calls import backpropagate

    backpropagate(outcome, inputs, "cpu")
    assert seen["input"][:2] == ((1025, 1), 3)
    assert seen["input"][2] != 0  # the data pointer is not 16-byte aligned
    assert seen["weight"] == (0,)
    assert seen["grad"] == ((0, 0), 0)


def test_the_other_summand_takes_the_input_layout_but_not_its_stride_zero() -> None:
    case = parse_case_id("fused_add_rms_norm-float32-6x33-normal-o1-b0-tile_edge-s2")
    assert layout_of(case, "input") == Layout(offset=1, broadcast=(0,))
    assert layout_of(case, "residual") == Layout(offset=1)
    assert layout_of(case, "running_mean") == CONTIGUOUS
    inputs = build_inputs(case)
    x = np.asarray(inputs.arrays["input"], dtype=np.float64)
    assert (x == x[0]).all()  # expanded rows hold equal values
    residual = to_tensor(inputs.arrays["residual"], "cpu", layout_of(case, "residual"))
    assert residual.stride() == (33, 1)
