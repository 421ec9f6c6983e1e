"""The boundary battery: the shapes, strides, offsets and gradient layouts where kernels break.

The value battery (:mod:`conformance.cases`) draws hard inputs on a few well-behaved shapes; this
one puts plain inputs on the shapes and layouts of the bug classes that real kernels have (see
:mod:`conformance.shape_classes` and :mod:`conformance.layouts`): more rows than a 16-bit index
holds, row lengths one past a tile, model sizes no tile divides, wide rows past the sizes kernel
authors try, empty batches, groups of one element, channel groups past 2^16 elements, storage
offsets that misalign a vector load, strided, padded, transposed and channels-last inputs,
expanded (stride-0) inputs and parameters, and upstream gradients that are sliced, transposed,
channels-last or expanded as ``y.sum().backward()`` gives them.

Each case crosses several boundaries at once, and keeps its element count small (at most about
2·10^5 elements). Every case exists for every dtype; the quick battery keeps one case per bug
class and norm family, the full battery adds the neighbouring sizes and the other layouts.
float64 cases stop at :data:`conformance.cases.FLOAT64_CHANNEL_ELEMENTS` (2^16) elements, like the
value battery's channel norms (the float64 references' exact per-row statistics would dominate
the run), so ``many_rows`` and ``big_group`` are not covered in float64; the report's coverage
table says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from conformance import layouts

#: The distributions the boundary cases rotate through: plain values, so that a failure is the
#: geometry's, and (in the full battery) a large mean, so that a geometry bug that also loses
#: accuracy shows.
DISTRIBUTIONS = ("normal", "uniform", "large_mean_k1e3")
QUICK_DISTRIBUTIONS = ("normal", "uniform")


@dataclass(frozen=True)
class Boundary:
    """One boundary case before its norm, dtype and seed: a shape, the extra argument of its
    norm family (normalized dims, or GroupNorm's groups), its layouts as case-id tokens
    (``"o1 gb wb"``), and whether the quick battery keeps it."""

    shape: tuple[int, ...]
    extra: int
    tokens: str = ""
    quick: bool = False
    training: bool = True

    def layouts(self) -> dict[str, layouts.Layout]:
        return layouts.case_layouts(self.tokens.split())


def _b(shape: Sequence[int], extra: int, tokens: str = "", **options: bool) -> Boundary:
    return Boundary(tuple(shape), extra, tokens, **options)


#: Layer/RMS-like norms (and DeepNorm, the fused adds): ``(shape, normalized dims, layouts)``.
TRAILING: tuple[Boundary, ...] = (
    # Rows of 3, not 2: the mean of two floats is a tie as often as not, which the references
    # settle exactly, row by row (four times the time).
    _b((65537, 3), 1, "o1 gb", quick=True),  # many rows, misaligned, grad of y.sum()
    _b((2, 32769, 3), 1, "nc gnc"),  # many rows at rank 3, strided input and grad
    _b((3, 1025), 1, "nc gtr", quick=True),  # one past a tile of 1024, transposed grad
    _b((2, 4097), 1, "pad3 gnc"),  # one past 4096, a row pitch, sliced grad
    _b((2, 1023), 1, "o2 wb gb0"),  # one short of 1024, expanded weight, row-expanded grad
    _b((1, 2049), 1, "o3 gpad1"),  # one row one past 2048, misaligned by 3
    _b((2, 2560), 1, "tr go1"),  # a model size, last dim not of stride 1
    _b((2, 6144), 1, "b0 gb0"),  # a model size, rows expanded from one
    _b((1, 11008), 1, "o1"),  # LLaMA-7B's MLP width, misaligned
    _b((1, 16385), 1, "pad1 gnc", quick=True),  # past the wide-row switch by one
    _b((2, 32768), 1, "o1 gtr"),  # a wide row of 32768
    _b((1, 65536), 1, "nc gb"),  # the widest
    _b((0, 768), 1, quick=True),  # no rows
    _b((2, 0, 129), 1),  # no rows at rank 3
    _b((4, 1), 1, "o3 gb", quick=True),  # rows of one element, misaligned
    _b((2, 3, 768), 1, "b0 wb gb0", quick=True),  # rank 3, expanded input and parameters
    _b((2, 3, 2560), 1, "b0 wb gb0"),  # the same at a larger model size
    _b((2, 3, 5, 129), 1, "tr gtr", quick=True),  # rank 4, transposed input and grad
    _b((3, 5, 205), 2, "pad2 go2"),  # two normalized dims of 1025 elements
    _b((5, 1025), 1, "b0 wo1"),  # expanded rows, misaligned parameters
)

#: GroupNorm: ``(shape, groups, layouts)``.
GROUP: tuple[Boundary, ...] = (
    _b((1, 3, 151, 151), 1, "cl gcl", quick=True),  # a group of 68403, C/G = 3, odd H, W
    _b((2, 6, 7, 5), 2, "o1 b0 gb", quick=True),  # C/G = 3, misaligned, expanded, y.sum()
    _b((3, 10, 9), 5, "nc gtr wb", quick=True),  # C/G = 2, strided, expanded parameters
    _b((2, 12, 3, 5, 7), 4, "cl gcl"),  # 5-D channels-last, C/G = 3
    _b((0, 6, 4), 3, quick=True),  # an empty batch
    _b((4, 4, 1), 4, "o2 gnc", quick=True),  # groups of one element
    _b((1, 6, 9, 7), 1, "pad2 go1 gb0", quick=True),  # one group of C/G = 6 channels
    _b((5, 6, 33), 3, "b0 o3 gnc"),  # one sample expanded over the batch
)

#: BatchNorm: ``(shape, 1, layouts)``.
BATCH: tuple[Boundary, ...] = (
    _b((3, 2, 151, 151), 1, "cl gcl", quick=True),  # a channel of 68403 elements
    _b((2, 3, 5, 7), 1, "o1 b0 gb", quick=True),
    _b((4, 5, 9), 1, "nc gtr wb", quick=True),
    _b((2, 4, 3, 5, 7), 1, "cl gcl"),
    _b((0, 3, 4), 1, quick=True, training=False),  # empty, with running statistics
    _b((6, 4, 9), 1, "b0 o2 gb0"),
    _b((3, 2, 5, 3), 1, "pad1 o3 gnc", quick=True, training=False),
    _b((5, 1, 3, 7), 1, "tr go2", quick=True),  # one channel
)

#: InstanceNorm: ``(shape, 1, layouts)``.
INSTANCE: tuple[Boundary, ...] = (
    _b((1, 2, 257, 257), 1, "cl gcl", quick=True),  # planes of 66049 elements
    _b((2, 3, 5, 7), 1, "o1 b0 gb", quick=True),
    _b((3, 4, 9), 1, "nc gtr wb", quick=True),
    _b((2, 3, 3, 5, 7), 1, "cl o3 gcl"),
    _b((0, 3, 4), 1, quick=True),
    _b((4, 3, 33), 1, "b0 o2 gnc", quick=True),
    _b((1, 1, 9, 7), 1, "pad1 gb0", quick=True),  # one plane
)

_BY_NORM = {"group_norm": GROUP, "batch_norm": BATCH, "instance_norm": INSTANCE}


def boundaries(norm: str, trailing: bool, quick: bool) -> tuple[Boundary, ...]:
    """The boundary cases of ``norm`` (a trailing norm when ``trailing``)."""
    table = TRAILING if trailing else _BY_NORM[norm]
    return tuple(b for b in table if b.quick or not quick)
