"""Shape classes: the sizes at which normalization kernels are known to break.

A case's shape classes follow from its norm and shape alone (through the reduction groups of
:mod:`conformance.geometry`: ``rows`` groups of ``n`` elements each), so every case — from the
catalogue, from the explorer, named by hand — is counted in the classes it really exercises.
Each class is named in the case id and counted in the report's coverage table.

- ``many_rows``: more than 65535 reduction groups (rows): a 16-bit row index, CUDA's limit of
  65535 blocks in y and z (apex FusedLayerNorm, apex#411);
- ``tile_edge``: a group length n = 2^k ± 1 for a tile 2^k from 32 to 2^17: a tail or masking
  bug one element past a tile;
- ``model_size``: n a multiple of 256 that is not a power of two (768, 2560, 5120, 11008): a size
  no power-of-two tile divides;
- ``wide_row``: a trailing-norm row longer than 16384: the wide-row path (split, cluster or
  multi-block reductions);
- ``big_group``: a channel-norm group (BatchNorm's channel over N·H·W, GroupNorm's C/G·H·W)
  longer than 2^16: a 16-bit count;
- ``empty``: no elements at all: a zero grid, a division by the row count;
- ``one_row``: exactly one reduction group;
- ``n1``: groups of one element: zero variance, a degenerate tile;
- ``odd_groups``: GroupNorm with C/G not a power of two: wrong group boundaries;
- ``odd_spatial``: a channel norm with an odd spatial extent above 1: vector loads over H·W;
- ``high_rank``: a trailing norm on 3 or more dimensions, a channel norm on 5: a backward wrong
  at rank 3 while right at rank 2 (FlagGems#5392).
"""

from __future__ import annotations

from conformance.geometry import TRAILING_NORMS, grouping

SHAPE_CLASSES = (
    "many_rows",
    "tile_edge",
    "model_size",
    "wide_row",
    "big_group",
    "empty",
    "one_row",
    "n1",
    "odd_groups",
    "odd_spatial",
    "high_rank",
)

#: More reduction groups than a 16-bit index or CUDA's y/z grid limit holds.
MANY_ROWS = 65535
#: Rows longer than this take the wide-row path of the kernels that have one.
WIDE_ROW = 16384
#: Channel-norm groups longer than this overflow a 16-bit count.
BIG_GROUP = 2**16
#: ``tile_edge`` sizes: one off a power of two in this range of tiles.
TILES = tuple(2**k for k in range(5, 18))


def classes_for(norm: str) -> tuple[str, ...]:
    """The classes a case of ``norm`` can fall in: the wide-row path is the trailing norms',
    groups past 2^16, odd spatial sizes and C/G the channel norms' (C/G GroupNorm's alone)."""
    if norm in TRAILING_NORMS:
        excluded = {"big_group", "odd_groups", "odd_spatial"}
    else:
        excluded = {"wide_row"} | ({"odd_groups"} if norm != "group_norm" else set())
    return tuple(c for c in SHAPE_CLASSES if c not in excluded)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def shape_classes(
    norm: str, shape: tuple[int, ...], *, norm_dims: int = 1, num_groups: int = 1
) -> tuple[str, ...]:
    """The classes of :data:`SHAPE_CLASSES` that a case of ``norm`` on ``shape`` falls in."""
    g = grouping(norm, shape, norm_dims=norm_dims, num_groups=num_groups)
    trailing = norm in TRAILING_NORMS
    elements = 1
    for d in shape:
        elements *= d
    found = set()
    if g.groups > MANY_ROWS:
        found.add("many_rows")
    if any(g.n in (t - 1, t + 1) for t in TILES):
        found.add("tile_edge")
    if g.n and g.n % 256 == 0 and not _power_of_two(g.n):
        found.add("model_size")
    if trailing and g.n > WIDE_ROW:
        found.add("wide_row")
    if not trailing and g.n > BIG_GROUP:
        found.add("big_group")
    if elements == 0:
        found.add("empty")
    if g.groups == 1:
        found.add("one_row")
    if g.n == 1 and elements:
        found.add("n1")
    if norm == "group_norm" and not _power_of_two(shape[1] // num_groups):
        found.add("odd_groups")
    if not trailing and any(d % 2 and d > 1 for d in shape[2:]):
        found.add("odd_spatial")
    if (trailing and len(shape) >= 3) or (not trailing and len(shape) >= 5):
        found.add("high_rank")
    return tuple(c for c in SHAPE_CLASSES if c in found)
