"""Block sizes: how much of a tensor one program instance holds at a time.

Every block size is a power of two (``tl.arange`` needs one) and every load and store is masked,
so any shape runs with any block. The choices:

* **Rows** (LayerNorm, RMSNorm and the add-norms). A row of ``n`` elements is held whole in one
  tile of ``next_pow2(n)`` columns when ``n <= MAX_TILE_COLUMNS``: its statistics, its output and
  its gradients then come from one read. Wider rows are walked in chunks of ``CHUNK_COLUMNS``.
  A program takes ``block_m`` rows at once, as many as fit ``TILE_ELEMENTS`` (at most
  ``MAX_BLOCK_M``; both scaled under the interpreter): narrow rows are many to a program, which
  keeps the GPU's lanes busy and the interpreter's NumPy calls few.
* **Groups** (GroupNorm). A group of ``channels_per_group x spatial`` elements is a row of
  ``block_c * block_s`` columns (``block_c`` channels by ``block_s`` positions), held whole when
  it fits ``MAX_GROUP_TILE``, ``block_r`` groups to a program; a larger group is walked chunk by
  chunk by a program of its own.
* **Partials** (the weight and bias gradients): ``[PARTIAL_ROWS, PARTIAL_COLUMNS]`` tiles.

Under the interpreter a program instance costs milliseconds however small, so the tiles there are
larger (:data:`INTERPRETED_SCALE` times the element budgets); the code paths are the same. The
constants are read at each launch, so a test may lower them to walk a small row in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

from impls.triton import runtime

MAX_TILE_COLUMNS = 8192
CHUNK_COLUMNS = 4096
TILE_ELEMENTS = 4096
MAX_BLOCK_M = 64
MIN_BLOCK = 16
MAX_GROUP_TILE = 8192
PARTIAL_ROWS = 32
PARTIAL_COLUMNS = 128
INTERPRETED_SCALE = 16
#: Elements per warp that keep a tile's registers in bounds on a GPU.
ELEMENTS_PER_WARP = 512
MAX_WARPS = 16


def next_power_of_2(n: int) -> int:
    """The least power of two >= ``max(n, 1)``."""
    return 1 << max(n - 1, 0).bit_length()


def _budget(elements: int) -> int:
    return elements * INTERPRETED_SCALE if runtime.INTERPRETED else elements


def warps(tile_elements: int) -> int:
    """``num_warps`` for a tile: about :data:`ELEMENTS_PER_WARP` elements per warp."""
    return max(1, min(MAX_WARPS, tile_elements // ELEMENTS_PER_WARP))


@dataclass(frozen=True)
class RowTiling:
    """How a trailing norm's (rows, n) matrix is cut: ``block_m`` rows by ``block_n`` columns;
    ``single_tile`` when a row fits one tile (else ``chunks`` chunks of ``block_n``)."""

    block_m: int
    block_n: int
    single_tile: bool
    chunks: int
    num_warps: int


def row_tiling(n: int) -> RowTiling:
    """The tiling for rows of ``n`` elements."""
    single = n <= MAX_TILE_COLUMNS
    block_n = max(MIN_BLOCK, next_power_of_2(n)) if single else CHUNK_COLUMNS
    block_m = max(1, min(_budget(MAX_BLOCK_M), _budget(TILE_ELEMENTS) // block_n))
    chunks = -(-n // block_n)
    return RowTiling(block_m, block_n, single, chunks, warps(block_m * block_n))


@dataclass(frozen=True)
class GroupTiling:
    """How GroupNorm's groups (``channels x spatial`` each) are cut: ``block_r`` groups by
    ``[block_c, block_s]`` channels and positions; ``single_tile`` when a group fits one."""

    block_r: int
    block_c: int
    block_s: int
    single_tile: bool
    num_warps: int


def group_tiling(channels: int, spatial: int) -> GroupTiling:
    """The tiling for groups of ``channels`` channels of ``spatial`` elements each."""
    budget = _budget(MAX_GROUP_TILE)
    block_s = min(max(MIN_BLOCK, next_power_of_2(spatial)), budget)
    block_c = max(1, min(next_power_of_2(channels), budget // block_s))
    single = block_c >= channels and block_s >= spatial
    tile = block_c * block_s
    block_r = max(1, min(MAX_BLOCK_M, budget // tile)) if single else 1
    return GroupTiling(block_r, block_c, block_s, single, warps(block_r * tile))


@dataclass(frozen=True)
class PartialTiling:
    """How the ``(programs, n)`` partial sums are reduced: ``block_p`` rows at a time by
    ``block_n`` columns per program."""

    block_p: int
    block_n: int
    num_warps: int


def partial_tiling(n: int) -> PartialTiling:
    """The tiling for reducing partial sums of ``n`` columns."""
    block_n = min(max(MIN_BLOCK, next_power_of_2(n)), _budget(PARTIAL_COLUMNS))
    return PartialTiling(PARTIAL_ROWS, block_n, warps(PARTIAL_ROWS * block_n))
