"""Memory layouts: where each element of a case's tensor sits in its storage.

Kernels break on layouts as often as on values: a row stride taken for the row length, a last
dimension assumed to be of stride 1, a data pointer assumed aligned to the vector width, a
stride-0 (expanded) ``grad_output`` read as dense. A :class:`Layout` says how one tensor of a
case is laid out, as a composition of five independent choices:

==============  ===========  =================================================================
choice          token        the tensor
==============  ===========  =================================================================
memory order    ``cl``       channels-last (4-D and 5-D: ``N, spatial..., C`` in memory)
                ``tr``       the last two dimensions swapped in memory (column-major rows)
                ``pPERM``    any order, outermost dimension first (``p021``: dim 0, then 2, 1)
gaps            ``nc``       every other element of the innermost memory line (stride 2)
                ``padK``     K unused elements after each innermost line (a row pitch)
storage offset  ``oK``       starts K elements into its storage (misaligned for K % 4 ≠ 0
                             in float32 by the 16-byte vectors kernels load)
stride 0        ``bDIMS``    expanded along the dimensions listed (``b0``: dim 0; ``b01``...)
==============  ===========  =================================================================

A case id carries the input's tokens as they are, the upstream gradients' with the prefix ``g``
(``gnc``, ``gtr``, ``gb01``) and the affine parameters' with the prefix ``w`` (``wb``: weight and
bias expanded from one value; ``wo1``). Every storage element that the tensor does not view —
the gaps, the padding, the elements before the offset, what a dense reading of an expanded
tensor would reach — holds NaN, so a kernel that ignores a stride or the offset reads poison,
never a plausible value. The values along an expanded dimension are equal by construction
(:func:`replicate`), as they are in ``x.expand(...)`` or in the ``grad_output`` that
``y.sum().backward()`` hands a kernel.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Coverage classes of a layout (what the report counts), in table order.
LAYOUT_CLASSES = (
    "contiguous",
    "strided",
    "padded",
    "transposed",
    "channels_last",
    "permuted",
    "offset",
    "expanded",
)

_TOKEN = re.compile(r"^(?:(cl|tr|nc)|p(\d+)|pad(\d+)|o(\d+)|b(\d*))$")


@dataclass(frozen=True)
class Layout:
    """How one tensor sits in memory (see the module docstring); the default is contiguous.

    ``order``: memory order, outermost dimension first (empty: C order); ``channels_last`` and
    ``transposed`` are resolved against the tensor's rank when it is placed. ``step``: the stride
    of the innermost memory dimension. ``pad``: unused elements after each innermost line.
    ``offset``: the storage offset. ``broadcast``: dimensions of stride 0, ``None`` meaning
    every dimension (whatever the rank), as ``y.sum().backward()`` gives.
    """

    order: tuple[int, ...] | str = ()
    step: int = 1
    pad: int = 0
    offset: int = 0
    broadcast: tuple[int, ...] | None = ()

    def __post_init__(self) -> None:
        if isinstance(self.order, str) and self.order not in ("channels_last", "transposed"):
            raise ValueError(f"unknown memory order {self.order!r}")
        if self.step not in (1, 2) or self.pad < 0 or self.offset < 0:
            raise ValueError(f"bad layout: step {self.step}, pad {self.pad}, offset {self.offset}")

    # -- names ----------------------------------------------------------------------------------
    @property
    def contiguous(self) -> bool:
        return self == CONTIGUOUS

    def parts(self) -> list[tuple[str, str, str]]:
        """``(token, word, class)`` of each choice this layout makes, in token order: the one
        table the case-id tokens, the report's words and the coverage classes are read from."""
        out = []
        if isinstance(self.order, str):
            token = "cl" if self.order == "channels_last" else "tr"
            out.append((token, self.order, self.order))
        elif self.order:
            digits = "".join(map(str, self.order))
            out.append((f"p{digits}", f"permuted({','.join(digits)})", "permuted"))
        if self.step == 2:
            out.append(("nc", "noncontiguous", "strided"))
        if self.pad:
            out.append((f"pad{self.pad}", f"padded({self.pad})", "padded"))
        if self.offset:
            out.append((f"o{self.offset}", f"offset({self.offset})", "offset"))
        if self.broadcast is None:
            out.append(("b", "expanded(all)", "expanded"))
        elif self.broadcast:
            digits = "".join(map(str, self.broadcast))
            out.append((f"b{digits}", f"expanded({','.join(digits)})", "expanded"))
        return out

    def tokens(self, prefix: str = "") -> list[str]:
        """The case-id tokens of this layout, each with ``prefix`` (see the module docstring)."""
        return [prefix + token for token, _, _ in self.parts()]

    @property
    def name(self) -> str:
        """Words for reports: ``contiguous``, ``noncontiguous``, ``channels_last``,
        ``offset(1)``, ``expanded(0)``, joined by ``+``."""
        return "+".join(word for _, word, _ in self.parts()) or "contiguous"

    def classes(self) -> tuple[str, ...]:
        """The coverage classes this layout exercises (:data:`LAYOUT_CLASSES`)."""
        found = {c for _, _, c in self.parts()} or {"contiguous"}
        return tuple(c for c in LAYOUT_CLASSES if c in found)

    # -- geometry -------------------------------------------------------------------------------
    def memory_order(self, rank: int) -> tuple[int, ...]:
        """The dimensions outermost first, for a tensor of ``rank`` dimensions."""
        if self.order == "channels_last":
            if rank not in (4, 5):
                raise ValueError(f"channels-last needs a 4-D or 5-D tensor, not {rank}-D")
            return (0, *range(2, rank), 1)
        if self.order == "transposed":
            if rank < 2:
                raise ValueError("a transposed layout needs at least 2 dimensions")
            return (*range(rank - 2), rank - 1, rank - 2)
        if isinstance(self.order, tuple) and self.order:
            if sorted(self.order) != list(range(rank)):
                raise ValueError(f"memory order {self.order} is not a permutation of {rank} dims")
            return self.order
        return tuple(range(rank))

    def expanded_dims(self, rank: int) -> tuple[int, ...]:
        if self.broadcast is None:
            return tuple(range(rank))
        bad = [d for d in self.broadcast if d >= rank]
        if bad:
            raise ValueError(f"cannot expand dimension {bad[0]} of a {rank}-D tensor")
        return tuple(sorted(set(self.broadcast)))

    def strides(self, shape: Sequence[int]) -> tuple[tuple[int, ...], int]:
        """``(strides, storage_size)`` of a tensor of ``shape`` in this layout, in elements.

        The storage is as large as the tensor would be without its stride-0 dimensions, so
        that a dense reading of an expanded tensor stays inside it and reads NaN."""
        rank = len(shape)
        expanded = self.expanded_dims(rank)
        strides = [0] * rank
        span = 1
        for position, dim in enumerate(reversed(self.memory_order(rank))):
            extent = max(int(shape[dim]), 1)
            if position == 0:
                strides[dim] = self.step
                span = extent * self.step + self.pad
            else:
                strides[dim] = span
                span *= extent
        for dim in expanded:
            strides[dim] = 0
        return tuple(strides), self.offset + span

    def validate(self, shape: Sequence[int]) -> None:
        """A ValueError saying why this layout cannot hold a tensor of ``shape``."""
        self.strides(shape)


CONTIGUOUS = Layout()
NONCONTIGUOUS = Layout(step=2)
CHANNELS_LAST = Layout(order="channels_last")
_LEGACY = {"contiguous": CONTIGUOUS, "noncontiguous": NONCONTIGUOUS, "channels_last": CHANNELS_LAST}


#: The class each word of :attr:`Layout.name` stands for.
_CLASS_OF_WORD = {
    "contiguous": "contiguous",
    "noncontiguous": "strided",
    "padded": "padded",
    "transposed": "transposed",
    "channels_last": "channels_last",
    "permuted": "permuted",
    "offset": "offset",
    "expanded": "expanded",
}


def classes_of_name(name: str) -> tuple[str, ...]:
    """:meth:`Layout.classes` from a layout's :attr:`Layout.name` (as a report records it)."""
    words = {word.split("(", 1)[0] for word in name.split("+")}
    found = {_CLASS_OF_WORD[w] for w in words if w in _CLASS_OF_WORD}
    return tuple(c for c in LAYOUT_CLASSES if c in found)


def as_layout(value: Layout | str) -> Layout:
    """A :class:`Layout` from itself or one of the names ``contiguous``, ``noncontiguous``,
    ``channels_last``."""
    if isinstance(value, Layout):
        return value
    try:
        return _LEGACY[value]
    except KeyError:
        raise ValueError(
            f"unknown layout {value!r}: expected one of {', '.join(_LEGACY)}"
        ) from None


def is_token(token: str, prefix: str = "") -> bool:
    """Whether ``token`` is a layout token of the role whose prefix is ``prefix``."""
    return token.startswith(prefix) and bool(_TOKEN.match(token[len(prefix) :]))


def from_tokens(tokens: Sequence[str], prefix: str = "") -> Layout:
    """The layout that :meth:`Layout.tokens` wrote as ``tokens`` (each with ``prefix``)."""
    fields: dict[str, Any] = {}
    for token in tokens:
        m = _TOKEN.match(token[len(prefix) :])
        if m is None or not token.startswith(prefix):
            raise ValueError(f"{token!r} is not a layout token")
        named, perm, pad, offset, broadcast = m.groups()
        if named in ("cl", "tr"):
            _once(fields, "order", "channels_last" if named == "cl" else "transposed", token)
        elif named == "nc":
            _once(fields, "step", 2, token)
        elif perm is not None:
            _once(fields, "order", tuple(int(c) for c in perm), token)
        elif pad is not None:
            _once(fields, "pad", int(pad), token)
        elif offset is not None:
            _once(fields, "offset", int(offset), token)
        else:
            dims = None if broadcast == "" else tuple(int(c) for c in broadcast)
            _once(fields, "broadcast", dims, token)
    return Layout(**fields)


#: A case's layout fields and the prefix of each one's tokens in a case id.
ROLE_PREFIX = {"layout": "", "grad_layout": "g", "param_layout": "w"}


def is_case_token(token: str) -> bool:
    """Whether ``token`` is a layout token of any of a case's roles."""
    return any(is_token(token, prefix) for prefix in ROLE_PREFIX.values())


def case_layouts(tokens: Sequence[str]) -> dict[str, Layout]:
    """A case's layout fields (``layout``, ``grad_layout``, ``param_layout``) from its layout
    tokens, each told by its prefix."""
    by_role: dict[str, list[str]] = {role: [] for role in ROLE_PREFIX}
    for token in tokens:
        # The input's tokens have no prefix: a token is the gradients' or the parameters'
        # only when the rest of it is a token.
        role = next(
            (r for r in ("grad_layout", "param_layout") if is_token(token, ROLE_PREFIX[r])),
            "layout",
        )
        by_role[role].append(token)
    return {role: from_tokens(words, ROLE_PREFIX[role]) for role, words in by_role.items()}


def _once(fields: dict[str, Any], key: str, value: Any, token: str) -> None:
    if key in fields:
        raise ValueError(f"layout token {token!r} repeats a choice already made")
    fields[key] = value


def replicate(values: np.ndarray, layout: Layout) -> np.ndarray:
    """``values`` made equal along ``layout``'s expanded dimensions (the first slice copied),
    as an expanded tensor's values are."""
    dims = layout.expanded_dims(values.ndim)
    if not dims or values.size == 0:
        return values
    first = tuple(slice(0, 1) if d in dims else slice(None) for d in range(values.ndim))
    return np.broadcast_to(values[first], values.shape).copy()


def place(values: Any, layout: Layout, device: str) -> Any:
    """A tensor on ``device`` holding ``values`` (a CPU tensor) in ``layout``, the rest of its
    storage NaN. Built on the host and moved whole, so that the device copy keeps the strides."""
    import torch

    shape = tuple(values.shape)
    strides, size = layout.strides(shape)
    storage = torch.full((size,), math.nan, dtype=values.dtype)
    dims = layout.expanded_dims(len(shape))
    stored_shape = tuple(1 if d in dims else n for d, n in enumerate(shape))
    first = values[tuple(slice(0, 1) if d in dims else slice(None) for d in range(len(shape)))]
    if first.numel():
        storage.as_strided(stored_shape, strides, layout.offset).copy_(first)
    return storage.to(device).as_strided(shape, strides, layout.offset)
