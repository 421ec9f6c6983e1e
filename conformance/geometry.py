"""How each norm groups its elements: the reduction groups as rows of a matrix.

Every norm reduces over groups of elements; the tolerance model, the input distributions and
the fingerprints all work on a ``(groups, n)`` matrix whose rows are those groups. A
:class:`Grouping` converts between an array of the norm's input shape and that matrix, and
says which affine parameter (weight/bias element) each element uses.

=================  ==============================  ======================================
norm               a row is                        affine parameter of element
=================  ==============================  ======================================
layer/rms-like     the trailing normalized_shape   its position in the row
group_norm         (C/G channels) x spatial         its channel
instance_norm      one (sample, channel) plane      its channel
batch_norm         one channel over (N, spatial)    its channel (= the row)
=================  ==============================  ======================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TRAILING_NORMS = (
    "layer_norm",
    "rms_norm",
    "deep_norm",
    "fused_add_rms_norm",
    "fused_add_layer_norm",
)
CHANNEL_NORMS = ("group_norm", "instance_norm", "batch_norm")


@dataclass(frozen=True)
class Grouping:
    """Rows of the reduction groups of an array of ``shape`` for ``norm``."""

    norm: str
    shape: tuple[int, ...]
    groups: int
    n: int
    params: int
    num_groups: int = 1
    norm_dims: int = 1

    def _channel_view(self) -> tuple[int, int, int]:
        batch, channels = self.shape[0], self.shape[1]
        return batch, channels, math.prod(self.shape[2:])

    def to_rows(self, a: np.ndarray) -> np.ndarray:
        """The ``(groups, n)`` matrix of ``a`` (a copy where a transpose is needed)."""
        if a.shape != self.shape:
            raise ValueError(f"array of shape {a.shape} is not of the grouping's {self.shape}")
        if self.norm == "batch_norm":
            batch, channels, spatial = self._channel_view()
            return a.reshape(batch, channels, spatial).transpose(1, 0, 2).reshape(channels, -1)
        return a.reshape(self.groups, self.n)

    def from_rows(self, rows: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_rows`."""
        if self.norm == "batch_norm":
            batch, channels, spatial = self._channel_view()
            return rows.reshape(channels, batch, spatial).transpose(1, 0, 2).reshape(self.shape)
        return rows.reshape(self.shape)

    def param_index(self) -> np.ndarray:
        """``(groups, n)`` integer matrix: the affine parameter each element uses."""
        if self.norm in TRAILING_NORMS:
            return np.broadcast_to(np.arange(self.n), (self.groups, self.n))
        batch, channels, spatial = self._channel_view()
        if self.norm == "batch_norm":
            return np.broadcast_to(np.arange(channels)[:, None], (self.groups, self.n))
        if self.norm == "instance_norm":
            rows = np.tile(np.arange(channels), batch)
            return np.broadcast_to(rows[:, None], (self.groups, self.n))
        per_group = channels // self.num_groups
        within = np.arange(self.n) // spatial
        first = (np.arange(self.groups) % self.num_groups) * per_group
        return first[:, None] + within[None, :]

    def param_rows(self, param: np.ndarray) -> np.ndarray:
        """A per-parameter vector (weight or bias) spread over the ``(groups, n)`` matrix."""
        return np.asarray(param, dtype=np.float64).reshape(-1)[self.param_index()]


def grouping(
    norm: str, shape: tuple[int, ...], *, norm_dims: int = 1, num_groups: int = 1
) -> Grouping:
    """The grouping of ``norm`` for an input of ``shape``.

    ``norm_dims`` is the length of ``normalized_shape`` for the layer/rms-like norms,
    ``num_groups`` the number of groups of ``group_norm``.
    """
    shape = tuple(int(d) for d in shape)
    if norm in TRAILING_NORMS:
        n = math.prod(shape[len(shape) - norm_dims :])
        return Grouping(norm, shape, math.prod(shape) // max(n, 1), n, n, norm_dims=norm_dims)
    if norm not in CHANNEL_NORMS:
        raise ValueError(f"unknown norm {norm!r}")
    if len(shape) < 2:
        raise ValueError(f"{norm} needs an input of at least 2 dimensions, got shape {shape}")
    batch, channels, spatial = shape[0], shape[1], math.prod(shape[2:])
    if norm == "batch_norm":
        return Grouping(norm, shape, channels, batch * spatial, channels)
    if norm == "instance_norm":
        return Grouping(norm, shape, batch * channels, spatial, channels)
    if channels % num_groups:
        raise ValueError(f"group_norm: {channels} channels do not split into {num_groups} groups")
    return Grouping(
        norm,
        shape,
        batch * num_groups,
        channels // num_groups * spatial,
        channels,
        num_groups=num_groups,
    )
