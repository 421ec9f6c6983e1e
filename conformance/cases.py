"""The case catalogue: norm x dtype x shape x input distribution x layout, each with its seed.

A :class:`Case` fully determines its inputs (they are drawn from the case's own seed), so a case
id is enough to reproduce a check anywhere: ``normconf certify --adapter SPEC --case ID``.

Case ids read ``norm-dtype-shape-distribution[-options]-sSEED``, e.g.
``layer_norm-float32-4x768-large_mean_k1e3-nc-s12``; options are ``nc`` (non-contiguous input),
``cl`` (channels-last), ``gG`` (GroupNorm's groups), ``ndK`` (normalized_shape has K dims),
``eval`` (BatchNorm with running statistics) and ``noaffine`` (no weight and bias).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from conformance.distributions import DISTRIBUTIONS, QUICK_DISTRIBUTIONS
from conformance.geometry import Grouping, grouping
from conformance.specs import NORM_NAMES, spec

DTYPES = ("float32", "float16", "bfloat16", "float64")
LAYOUTS = ("contiguous", "noncontiguous", "channels_last")
_LAYOUT_TAGS = {"noncontiguous": "nc", "channels_last": "cl"}


@dataclass(frozen=True)
class Case:
    """One set of inputs for one norm; ``seed`` drives every random draw of the case."""

    norm: str
    dtype: str
    shape: tuple[int, ...]
    distribution: str
    seed: int
    layout: str = "contiguous"
    num_groups: int = 1
    norm_dims: int = 1
    training: bool = True
    affine: bool = True
    eps: float | None = 1e-5
    alpha: float = 1.0
    momentum: float = 0.1

    @property
    def case_id(self) -> str:
        parts = [self.norm, self.dtype, "x".join(map(str, self.shape)), self.distribution]
        if self.layout != "contiguous":
            parts.append(_LAYOUT_TAGS[self.layout])
        if self.norm == "group_norm":
            parts.append(f"g{self.num_groups}")
        if self.norm_dims != 1:
            parts.append(f"nd{self.norm_dims}")
        if self.norm == "batch_norm" and not self.training:
            parts.append("eval")
        if not self.affine:
            parts.append("noaffine")
        parts.append(f"s{self.seed}")
        return "-".join(parts)

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
    for option in options:
        if option in ("nc", "cl"):
            fields["layout"] = "noncontiguous" if option == "nc" else "channels_last"
        elif option == "eval":
            fields["training"] = False
        elif option == "noaffine":
            fields["affine"] = False
        elif option[:1] in ("g", "s") and option[1:].isdigit():
            fields["num_groups" if option[0] == "g" else "seed"] = int(option[1:])
        elif option.startswith("nd") and option[2:].isdigit():
            fields["norm_dims"] = int(option[2:])
        else:
            raise ValueError(f"case id {case_id!r}: unknown option {option!r}")
    if "seed" not in fields:
        raise ValueError(f"case id {case_id!r} has no seed (…-sN)")
    return _with_norm_defaults(Case(norm, dtype, shape, distribution, **fields))  # type: ignore[arg-type]


def _with_norm_defaults(case: Case) -> Case:
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
    case.grouping  # noqa: B018 - validates the shape for the norm
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


#: float64 channel norms stop at this many elements: their exact weight gradients (one sum of
#: N·spatial terms per channel, no double-double step in the references yet) would dominate.
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
    case = _with_norm_defaults(case)
    return replace(case, seed=case_seed(run_seed, case.case_id))


def catalogue(
    *,
    norms: Iterable[str] = NORM_NAMES,
    dtypes: Iterable[str] = DTYPES,
    quick: bool = False,
    seed: int = 0,
) -> list[Case]:
    """Every case of the battery (``quick``: every distribution class and check kind, fewer
    shapes and seeds), in a stable order."""
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
    return cases
