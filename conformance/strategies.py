"""Hypothesis strategies for conformance tests: dtypes, sizes, shapes, values and ε.

Each strategy shrinks towards the simplest case (float32, one element, one row of zeros,
ε = 1e-5), so a failing property is reported on a minimal input. The module constants are the
edge cases worth pinning with ``@example``::

    @given(shape=layer_norm_shapes(max_elements=4096), eps=epsilons())
    @example(shape=EDGE_LAYER_NORM_SHAPES[3], eps=1e-12)
    def test_layer_norm(shape, eps): ...

    @given(x=rows("bfloat16", 8))
    @example(x=edge_rows("bfloat16", 8)["large_mean"])
    def test_rows(x): ...

Values are float64 arrays exact in the dtype they are drawn for (rounded once, to nearest even,
by :func:`references.formats.round_array`), with the ``(rows, n)`` layout of
:mod:`conformance.distributions`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conformance.distributions import DISTRIBUTIONS, Array, draw
from conformance.geometry import CHANNEL_NORMS
from references.formats import format_of, round_array

#: Dtypes in shrinking order: float32, the usual one, first.
DTYPES = ("float32", "float64", "float16", "bfloat16")

#: Reduction lengths that break kernels: 1 (zero variance), sizes just off a power of two,
#: 127 and 1023 (odd, below a warp/block multiple), 768 (BERT/GPT-2 hidden size).
EDGE_HIDDEN_SIZES = (1, 2, 7, 8, 127, 128, 129, 768, 1023, 1024, 4096, 4097)

#: ε worth pinning: PyTorch's 1e-5, the seed document's 1e-6, a negligible 1e-12, float32's
#: machine epsilon (rms_norm's eps=None), a large 1e-3 and 1.0 (ε dominates).
EDGE_EPSILONS = (1e-5, 1e-6, 1e-12, 2.0**-23, 1e-3, 1.0)

#: ``(shape, normalized_shape_len)``: one element, odd hidden sizes, 768, a 2-D normalized shape.
EDGE_LAYER_NORM_SHAPES: tuple[tuple[tuple[int, ...], int], ...] = (
    ((1,), 1),
    ((3, 7), 1),
    ((2, 127), 1),
    ((2, 768), 1),
    ((2, 3, 4), 2),
    ((5, 1), 1),
)

#: ``(shape, num_groups)`` per channel norm: 2-D, 4-D and 5-D inputs, odd spatial sizes, group
#: sizes of one channel and of all channels.
EDGE_CHANNEL_SHAPES: dict[str, tuple[tuple[tuple[int, ...], int], ...]] = {
    "batch_norm": (((2, 3), 1), ((2, 3, 5, 5), 1), ((1, 4, 2, 3, 3), 1)),
    "instance_norm": (((1, 3, 2), 1), ((2, 3, 5, 5), 1), ((2, 2, 2, 3, 3), 1)),
    "group_norm": (((2, 6), 3), ((2, 6, 5, 5), 3), ((1, 4, 2, 2, 3), 2), ((2, 32, 3, 3), 32)),
}

Shape = tuple[tuple[int, ...], int]


def dtypes(*, only: Sequence[str] | None = None) -> st.SearchStrategy[str]:
    """Names of the dtypes (all of :data:`DTYPES`, or those of ``only`` in their order)."""
    return st.sampled_from(tuple(only) if only is not None else DTYPES)


def hidden_sizes(*, max_elements: int = 4096) -> st.SearchStrategy[int]:
    """Reduction lengths in ``[1, max_elements]``: the edge sizes, odd sizes, any size."""
    if max_elements < 1:
        raise ValueError(f"max_elements must be at least 1, got {max_elements}")
    edges = tuple(s for s in EDGE_HIDDEN_SIZES if s <= max_elements)
    odd = st.integers(0, (max_elements - 1) // 2).map(lambda k: 2 * k + 1)
    return st.one_of(st.sampled_from(edges), odd, st.integers(1, max_elements))


def layer_norm_shapes(
    *, max_elements: int = 4096, max_batch_dims: int = 2, max_norm_dims: int = 3
) -> st.SearchStrategy[Shape]:
    """``(shape, normalized_shape_len)`` with ``prod(shape) ≤ max_elements``.

    The last dimension is a :func:`hidden_sizes` value; up to ``max_norm_dims - 1`` more
    dimensions join it in the normalized shape and up to ``max_batch_dims`` lead (none: a 1-D
    input).
    """
    return _layer_norm_shape(max_elements, max_batch_dims, max_norm_dims)


@st.composite
def _layer_norm_shape(
    draw: st.DrawFn, max_elements: int, max_batch_dims: int, max_norm_dims: int
) -> Shape:
    norm_len = draw(st.integers(1, max_norm_dims))
    hidden = draw(hidden_sizes(max_elements=max_elements))
    budget = max_elements // hidden
    leading: list[int] = []
    batch_dims = draw(st.integers(0, max_batch_dims))
    for _ in range(norm_len - 1 + batch_dims):
        extent = draw(st.integers(1, min(budget, 16)))
        budget //= extent
        leading.append(extent)
    # The normalized dims drawn first sit right before the hidden size, the batch dims lead.
    inner, batch = leading[: norm_len - 1], leading[norm_len - 1 :]
    return (*batch, *inner, hidden), norm_len


def channel_shapes(
    norm: str,
    *,
    max_elements: int = 4096,
    max_spatial_dims: int = 3,
    min_group_size: int | None = None,
) -> st.SearchStrategy[Shape]:
    """``(shape, num_groups)`` for ``batch_norm``, ``instance_norm`` or ``group_norm``.

    ``shape`` is ``(N, C, *spatial)`` with 0..``max_spatial_dims`` spatial dims (2-D to 5-D
    inputs) and ``prod(shape) ≤ max_elements``. ``num_groups`` divides C for ``group_norm`` and
    is 1 for the other two. Every reduction group holds at least ``min_group_size`` elements;
    the default is 2 for batch_norm and instance_norm (PyTorch refuses one value per channel
    in training) and 1 for group_norm.
    """
    if norm not in CHANNEL_NORMS:
        raise ValueError(f"{norm!r} is not one of the channel norms {CHANNEL_NORMS}")
    minimum = min_group_size if min_group_size is not None else (norm != "group_norm") + 1
    if minimum < 1 or max_elements < minimum:
        raise ValueError(f"need 1 <= min_group_size <= max_elements, got {minimum}")
    return _channel_shape(norm, max_elements, max_spatial_dims, minimum)


@st.composite
def _channel_shape(
    draw: st.DrawFn, norm: str, max_elements: int, max_spatial_dims: int, minimum: int
) -> Shape:
    # Draw freely within max_elements / minimum, then grow one dimension by a factor of at
    # most ``minimum`` to reach the minimum group size: the total stays within bounds.
    free = max_elements // minimum
    lowest_spatial = 1 if norm == "instance_norm" and minimum > 1 else 0
    spatial_dims = draw(st.integers(lowest_spatial, max(max_spatial_dims, lowest_spatial)))
    groups = draw(st.integers(1, min(8, free))) if norm == "group_norm" else 1
    per_group = draw(st.integers(1, min(8 if norm == "group_norm" else 16, free // groups)))
    budget = free // (groups * per_group)
    batch = draw(st.integers(1, min(4, budget)))
    budget //= batch
    spatial = []
    for _ in range(spatial_dims):
        extent = draw(st.integers(1, min(budget, 16)))
        budget //= extent
        spatial.append(extent)
    size = math.prod(spatial) * {"batch_norm": batch, "group_norm": per_group}.get(norm, 1)
    factor = -(-minimum // size)
    if factor > 1 and spatial:
        spatial[-1] *= factor
    elif factor > 1 and norm == "batch_norm":
        batch *= factor
    elif factor > 1:
        per_group *= factor
    return (batch, groups * per_group, *spatial), groups


def epsilons(*, allow_zero: bool = False) -> st.SearchStrategy[float]:
    """ε values: :data:`EDGE_EPSILONS`, then log-uniform in ``[1e-12, 1]``.

    0 only with ``allow_zero``: with ε = 0 a constant row divides 0 by 0.
    """
    strategies = [
        st.sampled_from(EDGE_EPSILONS),
        st.floats(0.0, 12.0).map(lambda t: 10.0**-t),
    ]
    if allow_zero:
        strategies.append(st.just(0.0))
    return st.one_of(*strategies)


def rows(
    dtype: str,
    n: int,
    *,
    num_rows: int = 1,
    mean: float | st.SearchStrategy[float] | None = None,
    spread: float | st.SearchStrategy[float] | None = None,
    max_abs: float | None = None,
) -> st.SearchStrategy[Array]:
    """``(num_rows, n)`` float64 matrices exact in ``dtype``: row ``i`` is
    ``round(meanᵢ + spreadᵢ · u)`` with ``u`` in [-4, 4].

    ``mean`` and ``spread`` are fixed values or strategies drawn once per row; by default the
    mean is any value in ``[-max_abs/2, max_abs/2]`` and the spread any value in
    ``[0, max_abs/8]`` (0: constant rows; a large mean with a small spread: a large κ).
    ``max_abs`` defaults to 16384 for float16 and 1e6 otherwise. Shrinks towards rows of zeros
    (mean 0, spread 0, deviates 0). Examples whose values would overflow are rejected.
    """
    limit = max_abs if max_abs is not None else (16384.0 if dtype == "float16" else 1e6)
    means = _per_row(mean, _default_means(limit / 2), num_rows)
    spreads = _per_row(spread, _default_spreads(limit / 8), num_rows)
    deviates = hnp.arrays(
        np.float64, (num_rows, n), elements=st.floats(-4.0, 4.0, allow_subnormal=False)
    )
    fmt = format_of(dtype)

    def combine(parts: tuple[list[float], list[float], Array]) -> Array:
        row_means, row_spreads, u = parts
        centre = np.asarray(row_means, dtype=np.float64)[:, None]
        width = np.asarray(row_spreads, dtype=np.float64)[:, None]
        with np.errstate(over="ignore", invalid="ignore"):
            values = round_array(centre + width * u, fmt)
        assume(bool(np.isfinite(values).all()))
        return values

    return st.tuples(means, spreads, deviates).map(combine)


def distribution_rows(
    dtype: str,
    n: int,
    *,
    num_rows: int = 1,
    eps: float = 1e-5,
    names: Sequence[str] = DISTRIBUTIONS,
) -> st.SearchStrategy[tuple[str, Array]]:
    """``(name, matrix)``: a :func:`conformance.distributions.draw` of one of ``names`` from a
    drawn seed. Shrinks to the first name and seed 0; values do not shrink."""

    def drawn(choice: tuple[str, int]) -> tuple[str, Array]:
        name, seed = choice
        return name, draw(name, num_rows, n, dtype, np.random.default_rng(seed), eps=eps)

    return st.tuples(st.sampled_from(tuple(names)), st.integers(0, 2**32 - 1)).map(drawn)


def edge_rows(dtype: str, n: int) -> dict[str, Array]:
    """Named ``(1, n)`` matrices exact in ``dtype``, for ``@example``.

    ``zeros``; ``ones``; ``spike`` (zeros and a final 1); ``alternating`` (±1, a zero last for
    odd n); ``ramp`` (0, 1, ..., n-1, rounded); ``large_mean``: 2^(p-1) ± 4 alternating, whose
    spread is 4 ulps of the mean, so κ ≈ 2^(p-3), the cap of the large-mean distributions.
    """
    fmt = format_of(dtype)
    index = np.arange(n, dtype=np.float64)
    alternating = np.where(index % 2 == 0, 1.0, -1.0)
    if n % 2:
        alternating[-1] = 0.0
    spike = np.zeros(n)
    spike[-1] = 1.0
    values = {
        "zeros": np.zeros(n),
        "ones": np.ones(n),
        "spike": spike,
        "alternating": alternating,
        "ramp": index,
        "large_mean": 2.0 ** (fmt.precision - 1) + 4.0 * alternating,
    }
    return {name: round_array(v, fmt)[None, :] for name, v in values.items()}


def _per_row(
    value: float | st.SearchStrategy[float] | None, default: st.SearchStrategy[float], count: int
) -> st.SearchStrategy[list[float]]:
    if value is None:
        strategy = default
    elif isinstance(value, st.SearchStrategy):
        strategy = value
    else:
        strategy = st.just(float(value))
    return st.lists(strategy, min_size=count, max_size=count)


def _default_means(limit: float) -> st.SearchStrategy[float]:
    # One float strategy, no sampled edge branch: hypothesis already favours 0, ±1 and the
    # bounds, and a single branch shrinks straight to the simplest failing mean.
    return st.floats(-limit, limit)


def _default_spreads(limit: float) -> st.SearchStrategy[float]:
    return st.floats(0.0, limit)
