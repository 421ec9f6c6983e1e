"""The hypothesis strategies stay inside their bounds, draw values exact in the dtype, reach
their edge cases, and shrink a failing property to a minimal example."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from conformance.distributions import DISTRIBUTIONS, kappa
from conformance.geometry import grouping
from conformance.strategies import (
    DTYPES,
    EDGE_CHANNEL_SHAPES,
    EDGE_EPSILONS,
    EDGE_HIDDEN_SIZES,
    EDGE_LAYER_NORM_SHAPES,
    channel_shapes,
    distribution_rows,
    dtypes,
    edge_rows,
    epsilons,
    hidden_sizes,
    layer_norm_shapes,
    rows,
)

NUMPY_TYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
}
CHANNEL_NORMS = ("batch_norm", "instance_norm", "group_norm")
#: find() searches without the example database, so a search is reproducible and leaves no files.
SEARCH = settings(database=None, max_examples=2000, suppress_health_check=list(HealthCheck))


def assert_exact(values: np.ndarray, dtype: str) -> None:
    __tracebackhide__ = True
    back = values.astype(NUMPY_TYPES[dtype]).astype(np.float64)
    same = np.array_equal(back, values, equal_nan=True)
    assert same, f"values not exact in {dtype}: {values[back != values]}"


def reaches(strategy: st.SearchStrategy[Any], condition: Callable[[Any], bool]) -> None:
    """``strategy`` draws a value satisfying ``condition`` (find raises when it cannot)."""
    __tracebackhide__ = True
    find(strategy, condition, settings=SEARCH)


@given(dtypes())
def test_dtypes_are_known(dtype: str) -> None:
    assert dtype in DTYPES


@given(dtypes(only=["bfloat16", "float16"]))
def test_dtypes_can_be_restricted(dtype: str) -> None:
    assert dtype in ("bfloat16", "float16")


@given(st.data(), st.integers(1, 5000))
def test_hidden_sizes_respect_the_bound(data: st.DataObject, max_elements: int) -> None:
    n = data.draw(hidden_sizes(max_elements=max_elements))
    assert 1 <= n <= max_elements


@pytest.mark.parametrize("size", [1, 7, 127, 768, 4097])
def test_hidden_sizes_reach_the_edge_sizes(size: int) -> None:
    assert size in EDGE_HIDDEN_SIZES
    reaches(hidden_sizes(max_elements=8192), lambda n: n == size)


def test_hidden_sizes_reach_odd_sizes_off_the_edge_list() -> None:
    reaches(hidden_sizes(), lambda n: n % 2 == 1 and n > 200 and n not in EDGE_HIDDEN_SIZES)


@given(st.data(), st.integers(1, 3000), st.integers(0, 3), st.integers(1, 3))
def test_layer_norm_shapes_respect_the_bounds(
    data: st.DataObject, max_elements: int, max_batch: int, max_norm: int
) -> None:
    shape, norm_len = data.draw(
        layer_norm_shapes(
            max_elements=max_elements, max_batch_dims=max_batch, max_norm_dims=max_norm
        )
    )
    assert all(d >= 1 for d in shape)
    assert math.prod(shape) <= max_elements
    assert 1 <= norm_len <= max_norm
    assert norm_len <= len(shape) <= norm_len + max_batch
    g = grouping("layer_norm", shape, norm_dims=norm_len)
    assert g.groups * g.n == math.prod(shape)


def test_layer_norm_shapes_reach_batched_multi_dim_norms() -> None:
    reaches(layer_norm_shapes(), lambda s: s[1] == 2 and len(s[0]) == 4)
    reaches(layer_norm_shapes(), lambda s: s[0][-1] == 768 and len(s[0]) >= 2)


@pytest.mark.parametrize("norm", CHANNEL_NORMS)
@given(data=st.data(), max_elements=st.integers(8, 3000))
def test_channel_shapes_respect_the_bounds(
    norm: str, data: st.DataObject, max_elements: int
) -> None:
    shape, num_groups = data.draw(channel_shapes(norm, max_elements=max_elements))
    assert 2 <= len(shape) <= 5
    assert all(d >= 1 for d in shape)
    assert math.prod(shape) <= max_elements
    assert shape[1] % num_groups == 0
    if norm != "group_norm":
        assert num_groups == 1
    g = grouping(norm, shape, num_groups=num_groups)
    assert g.n >= (1 if norm == "group_norm" else 2), f"a reduction group of {g.n} element(s)"


@pytest.mark.parametrize("norm", CHANNEL_NORMS)
def test_channel_shapes_honour_a_minimum_group_size(norm: str) -> None:
    @given(channel_shapes(norm, max_elements=600, min_group_size=5))
    def check(drawn: tuple[tuple[int, ...], int]) -> None:
        shape, num_groups = drawn
        assert math.prod(shape) <= 600
        assert grouping(norm, shape, num_groups=num_groups).n >= 5

    check()


@pytest.mark.parametrize("norm", CHANNEL_NORMS)
def test_channel_shapes_reach_4d_and_5d(norm: str) -> None:
    reaches(channel_shapes(norm), lambda s: len(s[0]) == 4)
    reaches(channel_shapes(norm), lambda s: len(s[0]) == 5)


def test_group_norm_shapes_reach_several_groups_of_several_channels() -> None:
    reaches(channel_shapes("group_norm"), lambda s: s[1] >= 2 and s[0][1] // s[1] >= 2)


def test_channel_shapes_refuse_other_norms() -> None:
    with pytest.raises(ValueError, match="channel norms"):
        channel_shapes("layer_norm")


@pytest.mark.parametrize("norm", CHANNEL_NORMS)
def test_edge_channel_shapes_are_valid(norm: str) -> None:
    for shape, num_groups in EDGE_CHANNEL_SHAPES[norm]:
        assert grouping(norm, shape, num_groups=num_groups).n >= 2 or norm == "group_norm"


def test_edge_layer_norm_shapes_are_valid() -> None:
    for shape, norm_len in EDGE_LAYER_NORM_SHAPES:
        assert 1 <= norm_len <= len(shape)


@given(epsilons())
def test_epsilons_are_positive_and_at_most_one(eps: float) -> None:
    assert 0 < eps <= 1


def test_epsilons_reach_zero_only_when_allowed() -> None:
    reaches(epsilons(allow_zero=True), lambda e: e == 0)
    reaches(epsilons(), lambda e: e not in EDGE_EPSILONS and e < 1e-8)


@pytest.mark.parametrize("dtype", list(NUMPY_TYPES))
@given(data=st.data(), n=st.integers(1, 64), num_rows=st.integers(1, 4))
def test_rows_are_exact_and_finite(dtype: str, data: st.DataObject, n: int, num_rows: int) -> None:
    x = data.draw(rows(dtype, n, num_rows=num_rows))
    assert x.shape == (num_rows, n)
    assert x.dtype == np.float64
    assert np.isfinite(x).all()
    assert_exact(x, dtype)


@pytest.mark.parametrize("dtype", list(NUMPY_TYPES))
@given(data=st.data())
def test_rows_follow_the_given_mean_and_spread(dtype: str, data: st.DataObject) -> None:
    # 100 ± 4·0.25 spans [99, 101], both exact in every dtype: rounding cannot leave it.
    x = data.draw(rows(dtype, 16, num_rows=3, mean=100.0, spread=0.25))
    assert ((x >= 99) & (x <= 101)).all()
    constant = data.draw(rows(dtype, 16, num_rows=2, mean=st.sampled_from([3.0, -7.0]), spread=0))
    assert (constant == constant[:, :1]).all()
    assert set(constant[:, 0]) <= {3.0, -7.0}


def test_rows_reach_large_kappa() -> None:
    reaches(rows("float32", 32), lambda x: bool(kappa(x, 1e-5)[0] > 1e3))


@pytest.mark.parametrize("dtype", list(NUMPY_TYPES))
def test_edge_rows(dtype: str) -> None:
    edges = edge_rows(dtype, 9)
    for name, x in edges.items():
        assert x.shape == (1, 9), name
        assert_exact(x, dtype)
    cap = 2.0 ** (int(ml_dtypes.finfo(NUMPY_TYPES[dtype]).nmant) - 2)
    k = kappa(edge_rows(dtype, 8)["large_mean"], 0.0)[0]
    assert cap <= k <= 2 * cap


@given(distribution_rows("float16", 12, num_rows=3))
def test_distribution_rows(drawn: tuple[str, np.ndarray]) -> None:
    name, x = drawn
    assert name in DISTRIBUTIONS
    assert x.shape == (3, 12)
    assert_exact(x, "float16")


def test_a_failing_property_shrinks_to_the_minimal_rows() -> None:
    """Deliberately false: "no value reaches 3". A minimal counterexample holds the boundary
    value 3 and nothing but 3 and 0 (a constant row of 3, or a 3 among zeros)."""
    seen: list[np.ndarray] = []

    @settings(database=None, max_examples=300, derandomize=True)
    @given(rows("float32", 16))
    def no_value_reaches_three(x: np.ndarray) -> None:
        seen.append(x)
        assert (x < 3).all()

    with pytest.raises(AssertionError):
        no_value_reaches_three()
    minimal = seen[-1]  # hypothesis replays the shrunk example last
    assert minimal.max() == 3.0
    assert set(np.unique(minimal)) <= {0.0, 3.0}


def test_a_failing_shape_property_shrinks_to_the_smallest_shape() -> None:
    """Deliberately false: "layer norm rows are shorter than 100". Minimal: a 1-D input whose
    length is the smallest reachable size of at least 100."""
    shape, norm_len = find(layer_norm_shapes(), lambda s: s[0][-1] >= 100, settings=SEARCH)
    assert norm_len == 1
    assert len(shape) == 1
    assert shape[0] in (100, 101, 127)
