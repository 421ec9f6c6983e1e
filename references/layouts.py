"""How each norm's tensor maps onto the engine's ``(G, K)`` groups and weight indices.

================  =====================  ==================  ==========================  ========
norm              groups (G)             group size (K)      weight index of an element  stats
================  =====================  ==================  ==========================  ========
layer/rms norm    prod(batch dims)       prod(normalized)    its position in the row     (*B,1..)
group_norm        N * num_groups         C/groups * spatial  its channel                 (N, G)
batch_norm        C                      N * spatial         its channel (= the group)   (C,)
instance_norm     N * C                  spatial             its channel                 (N, C)
================  =====================  ==================  ==========================  ========
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    shape: tuple[int, ...]  # the tensor's shape
    groups: int
    size: int
    widx: np.ndarray  # broadcastable to (groups, size)
    weights: int  # length of the weight/bias vectors
    weight_shape: tuple[int, ...]
    stats_shape: tuple[int, ...]
    channels_first: bool = False  # batch_norm: groups are channels, so transpose

    def to_groups(self, values: np.ndarray) -> np.ndarray:
        if self.channels_first:
            values = np.moveaxis(values, 1, 0)
        return np.ascontiguousarray(values).reshape(self.groups, self.size)

    def from_groups(self, values: np.ndarray) -> np.ndarray:
        if self.channels_first:
            moved = (self.shape[1], self.shape[0], *self.shape[2:])
            return np.moveaxis(values.reshape(moved), 0, 1)
        return values.reshape(self.shape)


def normalized_shape_of(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(normalized_shape, int | np.integer):
        return (int(normalized_shape),)
    try:
        dims = tuple(int(d) for d in normalized_shape)
    except (TypeError, ValueError):
        raise ValueError(
            f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}"
        ) from None
    if not dims or any(d < 0 for d in dims):
        raise ValueError(f"normalized_shape must be non-empty and non-negative, got {dims}")
    return dims


def trailing(shape: tuple[int, ...], normalized_shape: int | Sequence[int]) -> Layout:
    dims = normalized_shape_of(normalized_shape)
    if len(shape) < len(dims) or shape[len(shape) - len(dims) :] != dims:
        raise ValueError(
            f"normalized_shape {list(dims)} does not match the trailing dimensions of the input "
            f"shape {list(shape)}"
        )
    batch = shape[: len(shape) - len(dims)]
    size = math.prod(dims)
    return Layout(
        shape,
        math.prod(batch),
        size,
        np.arange(size)[None, :],
        size,
        dims,
        (*batch, *([1] * len(dims))),
    )


def _channels(shape: tuple[int, ...], norm: str) -> tuple[int, int, int]:
    if len(shape) < 2:
        raise ValueError(f"{norm} expects an input of shape (N, C, ...), got {list(shape)}")
    return shape[0], shape[1], math.prod(shape[2:])


def grouped(shape: tuple[int, ...], num_groups: int) -> Layout:
    n, c, spatial = _channels(shape, "group_norm")
    if not isinstance(num_groups, int | np.integer) or num_groups <= 0:
        raise ValueError(f"num_groups must be a positive integer, got {num_groups!r}")
    if c % num_groups:
        raise ValueError(f"num_groups={num_groups} does not divide the number of channels C={c}")
    per_group = c // num_groups
    size = per_group * spatial
    first_channel = (np.arange(n * num_groups) % num_groups * per_group)[:, None]
    widx = first_channel + (np.arange(size) // max(spatial, 1))[None, :]
    return Layout(shape, n * num_groups, size, widx, c, (c,), (n, num_groups))


def per_channel(shape: tuple[int, ...]) -> Layout:
    n, c, spatial = _channels(shape, "batch_norm")
    return Layout(shape, c, n * spatial, np.arange(c)[:, None], c, (c,), (c,), True)


def per_instance(shape: tuple[int, ...]) -> Layout:
    n, c, spatial = _channels(shape, "instance_norm")
    return Layout(shape, n * c, spatial, (np.arange(n * c) % c)[:, None], c, (c,), (n, c))
