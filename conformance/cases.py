"""The case catalogue: norm x dtype x shape x input distribution x layout, each with its seed.

A :class:`Case` fully determines its inputs (they are drawn from the case's own seed), so a case
id is enough to reproduce a check anywhere: ``normconf certify --adapter SPEC --case ID``.

Case ids read ``norm-dtype-shape-distribution[-options]-sSEED``, e.g.
``layer_norm-float32-3x1025-normal-nc-gtr-tile_edge-s12``. The options, in this order:

- the input's memory layout (:mod:`conformance.layouts`): ``nc`` (every other element),
  ``padK`` (a row pitch), ``cl`` (channels-last), ``tr`` (transposed), ``pPERM`` (any memory
  order), ``oK`` (storage offset K), ``bDIMS`` (stride 0 along DIMS);
- the upstream gradients' layout, the same tokens prefixed ``g`` (``gnc``, ``gtr``, ``gb``: stride
  0 everywhere, as ``y.sum().backward()`` gives), and the affine parameters', prefixed ``w``
  (``wb``: weight and bias expanded from one value);
- ``gG`` (GroupNorm's groups), ``ndK`` (normalized_shape has K dims), ``eval`` (BatchNorm with
  running statistics), ``noaffine`` (no weight and bias), ``large`` (a GPU-sized case, drawn and
  checked in row blocks: :mod:`conformance.large`);
- the shape classes of :mod:`conformance.shape_classes` (``many_rows``, ``tile_edge``, …), which
  follow from the shape and are written out so that an id says what it exercises.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from conformance import boundary_cases, layouts
from conformance.distributions import DISTRIBUTIONS, QUICK_DISTRIBUTIONS
from conformance.geometry import Grouping, grouping
from conformance.layouts import CONTIGUOUS, Layout
from conformance.shape_classes import SHAPE_CLASSES, shape_classes
from conformance.specs import NORM_NAMES, spec

DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclass(frozen=True)
class Case:
    """One set of inputs for one norm; ``seed`` drives every random draw of the case."""

    norm: str
    dtype: str
    shape: tuple[int, ...]
    distribution: str
    seed: int
    layout: Layout = CONTIGUOUS
    num_groups: int = 1
    norm_dims: int = 1
    training: bool = True
    affine: bool = True
    eps: float | None = 1e-5
    alpha: float = 1.0
    momentum: float = 0.1
    #: The upstream gradients' layout (``grad_output``, and ``grad_residual_out`` of the adds).
    grad_layout: Layout = CONTIGUOUS
    #: The weight's and bias's layout.
    param_layout: Layout = CONTIGUOUS
    #: A GPU-sized case, drawn and checked row block by row block (:mod:`conformance.large`).
    large: bool = False

    def __post_init__(self) -> None:
        for name in ("layout", "grad_layout", "param_layout"):
            object.__setattr__(self, name, layouts.as_layout(getattr(self, name)))

    @property
    def case_id(self) -> str:
        parts = [self.norm, self.dtype, "x".join(map(str, self.shape)), self.distribution]
        for role, prefix in layouts.ROLE_PREFIX.items():
            parts += getattr(self, role).tokens(prefix)
        if self.norm == "group_norm":
            parts.append(f"g{self.num_groups}")
        if self.norm_dims != 1:
            parts.append(f"nd{self.norm_dims}")
        if self.norm == "batch_norm" and not self.training:
            parts.append("eval")
        if not self.affine:
            parts.append("noaffine")
        if self.large:
            parts.append("large")
        parts += self.shape_classes
        parts.append(f"s{self.seed}")
        return "-".join(parts)

    def result_fields(self) -> dict[str, Any]:
        """What a :class:`conformance.results.CheckResult` of this case records about it."""
        return {
            "case_id": self.case_id,
            "norm": self.norm,
            "dtype": self.dtype,
            "shape": self.shape,
            "distribution": self.distribution,
            "layout": self.layout.name,
            "grad_layout": self.grad_layout.name,
            "param_layout": self.param_layout.name if self.affine else "none",
            "shape_classes": list(self.shape_classes),
            "seed": self.seed,
        }

    @property
    def shape_classes(self) -> tuple[str, ...]:
        return shape_classes(
            self.norm, self.shape, norm_dims=self.norm_dims, num_groups=self.num_groups
        )

    def validate(self) -> None:
        """A ValueError saying what is wrong with the case (shape, groups, layouts)."""
        g = self.grouping
        s = spec(self.norm)
        for role, layout in (("input", self.layout), ("grad_output", self.grad_layout)):
            try:
                layout.validate(self.shape)
            except ValueError as exc:
                raise ValueError(f"{role} layout {layout.name}: {exc}") from None
        expanded = self.layout.expanded_dims(len(self.shape))
        leading = len(self.shape) - self.norm_dims if s.trailing else 1
        if any(d >= leading for d in expanded):
            what = "leading (batch) dims" if s.trailing else "the batch dim"
            raise ValueError(
                f"{self.norm} takes an expanded input along {what} only, not {expanded}"
            )
        if not self.param_layout.contiguous:
            if not self.affine:
                raise ValueError("a parameter layout needs affine parameters (not noaffine)")
            shape = self.shape[len(self.shape) - self.norm_dims :] if s.trailing else (g.params,)
            try:
                self.param_layout.validate(shape)
            except ValueError as exc:
                raise ValueError(f"parameter layout {self.param_layout.name}: {exc}") from None

    @property
    def grouping(self) -> Grouping:
        return grouping(self.norm, self.shape, norm_dims=self.norm_dims, num_groups=self.num_groups)

    @property
    def elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def parameters(self) -> dict[str, object]:
        """The scalar arguments of the call (see :func:`conformance.specs.call_arguments`)."""
        return {
            "eps": self.eps,
            "normalized_shape": list(self.shape[len(self.shape) - self.norm_dims :]),
            "num_groups": self.num_groups,
            "training": self.training,
            "momentum": self.momentum,
            "alpha": self.alpha,
        }


def parse_case_id(case_id: str) -> Case:
    """Inverse of :attr:`Case.case_id`; a ValueError saying what is wrong otherwise."""
    parts = case_id.strip().split("-")
    if len(parts) < 5:
        raise ValueError(f"case id {case_id!r} is not norm-dtype-shape-distribution-...-sSEED")
    norm, dtype, shape_text, distribution, *options = parts
    spec(norm)
    if dtype not in DTYPES:
        raise ValueError(f"case id {case_id!r}: unknown dtype {dtype!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"case id {case_id!r}: unknown distribution {distribution!r}")
    try:
        shape = tuple(int(d) for d in shape_text.split("x"))
    except ValueError:
        raise ValueError(f"case id {case_id!r}: bad shape {shape_text!r}") from None
    fields: dict[str, object] = {}
    tokens: list[str] = []
    named: list[str] = []
    for option in options:
        if layouts.is_case_token(option):
            tokens.append(option)
        elif option in SHAPE_CLASSES:
            named.append(option)
        elif option == "eval":
            fields["training"] = False
        elif option == "noaffine":
            fields["affine"] = False
        elif option == "large":
            fields["large"] = True
        elif option[:1] in ("g", "s") and option[1:].isdigit():
            fields["num_groups" if option[0] == "g" else "seed"] = int(option[1:])
        elif option.startswith("nd") and option[2:].isdigit():
            fields["norm_dims"] = int(option[2:])
        else:
            raise ValueError(f"case id {case_id!r}: unknown option {option!r}")
    if "seed" not in fields:
        raise ValueError(f"case id {case_id!r} has no seed (…-sN)")
    try:
        fields.update(layouts.case_layouts(tokens))
        case = with_norm_defaults(Case(norm, dtype, shape, distribution, **fields))  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"case id {case_id!r}: {exc}") from None
    wrong = set(named) ^ set(case.shape_classes)
    if named and wrong:
        which = ", ".join(sorted(wrong))
        raise ValueError(
            f"case id {case_id!r}: its shape classes ({which}) do not follow from shape "
            f"{shape_text}, whose classes are {', '.join(case.shape_classes) or 'none'}"
        )
    return case


def with_norm_defaults(case: Case) -> Case:
    s = spec(case.norm)
    eps = s.default_eps
    alpha = 1.0
    if case.norm == "deep_norm":
        alpha = (
            2.0  # DeepNet's alpha for a 2-layer model is (2N)**0.25; 2.0 is exact in every dtype
        )
    elif s.fused:
        alpha = 0.5
    case = replace(case, eps=eps, alpha=alpha)
    case.validate()
    return case


def case_seed(run_seed: int, key: str) -> int:
    """A case's seed: a stable hash of the run seed and what the case is (not its position)."""
    digest = hashlib.sha256(f"{run_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100_000


# -- the catalogue ------------------------------------------------------------------------------
#: Trailing-norm shapes: (shape, normalized dims). Hidden sizes 1, 7, 127, 768, 4096, 8192, 16384.
TRAILING_SHAPES: tuple[tuple[tuple[int, ...], int], ...] = (
    ((5, 1), 1),
    ((3, 7), 1),
    ((8, 127), 1),
    ((2, 3, 768), 1),
    ((4, 6, 10), 2),
    ((4, 4096), 1),
    ((2, 8192), 1),
    ((1, 16384), 1),
)
QUICK_TRAILING = (((3, 7), 1), ((8, 127), 1), ((2, 3, 768), 1), ((4, 6, 10), 2), ((2, 4096), 1))
#: Channel-norm shapes (N, C, spatial...): 3-D, 4-D and 5-D; GroupNorm's groups beside each.
CHANNEL_SHAPES: tuple[tuple[tuple[int, ...], int], ...] = (
    ((4, 6, 33), 3),
    ((2, 6, 5, 7), 2),
    ((2, 4, 3, 4, 5), 2),
    ((3, 8, 16, 16), 4),
    ((8, 32, 32, 32), 8),
)
QUICK_CHANNEL = (((4, 6, 33), 3), ((2, 6, 5, 7), 2), ((2, 4, 3, 4, 5), 2))


FULL_SHAPES_PER_DISTRIBUTION = 3


#: float64 channel norms, and float64 boundary cases, stop at this many elements: their exact
#: group statistics (one per row in the double-double steps of the float64 references) and
#: weight gradients (one sum of N·spatial terms per channel) would dominate the run.
FLOAT64_CHANNEL_ELEMENTS = 2**16


def _shapes(norm: str, quick: bool, dtype: str) -> Sequence[tuple[tuple[int, ...], int]]:
    if spec(norm).trailing:
        return QUICK_TRAILING if quick else TRAILING_SHAPES
    shapes = QUICK_CHANNEL if quick else CHANNEL_SHAPES
    if dtype == "float64":
        shapes = tuple(s for s in shapes if math.prod(s[0]) <= FLOAT64_CHANNEL_ELEMENTS)
    return shapes


def _layout(norm: str, shape: tuple[int, ...], turn: int) -> str:
    """Every third case is non-contiguous; 4-D and 5-D channel-norm inputs alternate with
    channels-last."""
    if turn % 3 != 2:
        return "contiguous"
    if not spec(norm).trailing and len(shape) in (4, 5) and turn % 2:
        return "channels_last"
    return "noncontiguous"


def _make(
    norm: str,
    dtype: str,
    shape_g: tuple[tuple[int, ...], int],
    dist: str,
    turn: int,
    run_seed: int,
    **options: object,
) -> Case:
    shape, extra = shape_g
    fields: dict[str, object] = {"layout": _layout(norm, shape, turn), **options}
    if norm == "group_norm":
        fields["num_groups"] = extra
    elif spec(norm).trailing:
        fields["norm_dims"] = extra
    case = Case(norm, dtype, shape, dist, 0, **fields)  # type: ignore[arg-type]
    case = with_norm_defaults(case)
    return replace(case, seed=case_seed(run_seed, case.case_id))


def catalogue(
    *,
    norms: Iterable[str] = NORM_NAMES,
    dtypes: Iterable[str] = DTYPES,
    quick: bool = False,
    seed: int = 0,
    boundary: bool = True,
) -> list[Case]:
    """Every case of the battery (``quick``: every distribution class and check kind, fewer
    shapes and seeds), in a stable order; ``boundary=False`` leaves out the boundary battery
    (:mod:`conformance.boundary_cases`)."""
    cases: list[Case] = []
    distributions = QUICK_DISTRIBUTIONS if quick else DISTRIBUTIONS
    seeds = (0,) if quick else (0, 1)
    for norm, dtype in itertools.product(norms, dtypes):
        shapes = _shapes(norm, quick, dtype)
        for turn, dist in enumerate(distributions):
            offset = DTYPES.index(dtype) if dtype in DTYPES else 0
            # Each distribution on one shape (quick) or three (full), rotating so that every
            # shape meets many distributions without the product of all of them.
            per = 1 if quick else FULL_SHAPES_PER_DISTRIBUTION
            picks = [shapes[(turn * per + offset + j) % len(shapes)] for j in range(per)]
            for shape_g, repeat in itertools.product(picks, seeds):
                if repeat and dist not in ("normal", "large_mean_k1e3"):
                    continue
                cases.append(_make(norm, dtype, shape_g, dist, turn + repeat, seed + repeat))
        if norm == "batch_norm":
            cases.append(_make(norm, dtype, shapes[0], "normal", 0, seed, training=False))
        cases.append(_make(norm, dtype, shapes[0], "normal", 1, seed, affine=False))
        if boundary:
            cases += _boundary_cases(norm, dtype, quick, seed)
    return cases


def _boundary_cases(norm: str, dtype: str, quick: bool, seed: int) -> list[Case]:
    """The boundary battery of :mod:`conformance.boundary_cases` for one norm and dtype."""
    out = []
    rotation = boundary_cases.QUICK_DISTRIBUTIONS if quick else boundary_cases.DISTRIBUTIONS
    for turn, b in enumerate(boundary_cases.boundaries(norm, spec(norm).trailing, quick)):
        if dtype == "float64" and math.prod(b.shape) > FLOAT64_CHANNEL_ELEMENTS:
            continue
        dist = rotation[(turn + DTYPES.index(dtype)) % len(rotation)]
        options: dict[str, object] = {**b.layouts()}
        if not b.training:
            options["training"] = False
        out.append(_make(norm, dtype, (b.shape, b.extra), dist, 0, seed, **options))
    return out
