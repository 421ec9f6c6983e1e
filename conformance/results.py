"""What a check produces: metrics, a grade, a verdict, and the words that explain a failure.

These records are the one currency between the engine, the report writers and the pytest plugin.
``to_dict``/``from_dict`` give the JSON form documented in the README (report schema version
:data:`SCHEMA_VERSION`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 3
#: Versions :meth:`RunRecord.from_dict` reads: version 1 lacks the ulp histograms, the case's
#: κ, the speed results and the ceiling (read as empty); versions 1 and 2 lack the gradient and
#: parameter layouts (read as contiguous) and the shape classes (read as none).
READABLE_VERSIONS = (1, 2, 3)

#: Upper edges of the ulp-error histogram's bins: bin 0 holds distance 0, bin ``i`` distances in
#: ``(EDGES[i-1], EDGES[i]]``, the last bin (``len(EDGES)``) everything above ``2**20`` ulps and
#: non-finite mismatches.
ULP_HISTOGRAM_EDGES = (0, 1, 2, *(2**k for k in range(2, 21)))

#: Grades from best to worst. ``correctly_rounded``: every element equals the correctly rounded
#: reference; ``faithful``: every element within 1 ulp of the exact value (one of the two
#: neighbouring floats); ``within_tolerance``: every element inside the tolerance model's bound;
#: ``fail``: at least one element outside it (or a non-finite mismatch).
GRADES = ("correctly_rounded", "faithful", "within_tolerance", "fail")

#: Check kinds, in the order they run for a case.
KINDS = (
    "forward",
    "statistics",
    "backward",
    "running_stats",
    "nonfinite",
    "contract",
    "determinism",
)

VERDICTS = ("pass", "fail", "skip")


@dataclass
class Metrics:
    """Element-wise comparison of one output against its correctly rounded reference.

    Errors are measured against the reference value (a float of the output dtype); ``ulp`` is
    the spacing of the output dtype at the reference (subnormal spacing below the normal
    range). Indices are into the output as the adapter returned it (C order tuple).
    """

    n: int
    mismatched: int
    max_ulp: float
    p50_ulp: float
    p99_ulp: float
    frac_correctly_rounded: float
    frac_faithful: float
    max_abs_error: float
    max_abs_index: tuple[int, ...]
    max_rel_error: float
    max_rel_index: tuple[int, ...]
    max_ratio: float
    worst_index: tuple[int, ...]
    worst_actual: float
    worst_reference: float
    worst_ulp: float
    worst_tolerance_ulp: float
    nonfinite_mismatches: int = 0
    #: Count of elements per bin of :data:`ULP_HISTOGRAM_EDGES` (empty in version-1 reports).
    ulp_histogram: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("max_abs_index", "max_rel_index", "worst_index"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Metrics:
        d = dict(d)
        for key in ("max_abs_index", "max_rel_index", "worst_index"):
            d[key] = tuple(d[key])
        return cls(**d)


@dataclass
class CheckResult:
    """One check of one output of one case.

    ``output`` names what was compared: ``output``, ``residual_out``, ``mean``, ``rstd``,
    ``grad_input``, ``grad_weight``, ``grad_bias``, ``grad_residual``, ``grad_sublayer_output``,
    ``running_mean``, ``running_var``, or ``call`` for checks about the call itself (shape,
    dtype, device, exceptions).
    """

    case_id: str
    norm: str
    dtype: str
    kind: str
    output: str
    shape: tuple[int, ...]
    distribution: str
    layout: str
    seed: int
    verdict: str
    grade: str | None = None
    metrics: Metrics | None = None
    message: str = ""
    diagnosis: str | None = None
    reproduce: str = ""
    convention: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    #: The case's condition number: the largest κ = rms(x)/√(v + ε) over its reduction groups
    #: (None where it is not defined: non-finite inputs, version-1 reports).
    kappa: float | None = None
    #: The upstream gradients' and the affine parameters' layouts (``layout`` is the input's),
    #: by :attr:`conformance.layouts.Layout.name`; version-2 reports read as contiguous.
    grad_layout: str = "contiguous"
    param_layout: str = "contiguous"
    #: The case's classes of :mod:`conformance.shape_classes` (empty in version-2 reports).
    shape_classes: list[str] = field(default_factory=list)

    @property
    def check_id(self) -> str:
        return f"{self.case_id}::{self.kind}::{self.output}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["metrics"] = None if self.metrics is None else self.metrics.to_dict()
        d["check_id"] = self.check_id
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckResult:
        d = dict(d)
        d.pop("check_id", None)
        d["shape"] = tuple(d["shape"])
        if d.get("metrics") is not None:
            d["metrics"] = Metrics.from_dict(d["metrics"])
        return cls(**d)


#: Directions a speed result times.
DIRECTIONS = ("forward", "backward")


@dataclass
class SpeedResult:
    """The timing of one norm, dtype, shape and direction, with its verdict.

    ``bytes`` is the bytes model's count (:mod:`conformance.speed`); ``gbps`` = bytes / median;
    ``fraction_of_ceiling`` = gbps / the run's copy bandwidth; ``ratio`` = the baseline's median
    / this median (above 1: faster than the baseline). Times are seconds per call.
    """

    speed_id: str
    norm: str
    dtype: str
    direction: str
    shape: tuple[int, ...]
    device: str
    bytes: int
    method: str
    rounds: int
    median_s: float
    p25_s: float
    p75_s: float
    min_s: float
    gbps: float
    fraction_of_ceiling: float | None
    verdict: str
    message: str = ""
    baseline: str | None = None
    baseline_median_s: float | None = None
    ratio: float | None = None
    reverified: bool = False
    reproduce: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpeedResult:
        d = dict(d)
        d["shape"] = tuple(d["shape"])
        return cls(**d)


@dataclass
class RunRecord:
    """A whole certification run: who was certified, where, with what, and every check."""

    adapter: dict[str, Any]
    hardware: dict[str, Any]
    software: dict[str, Any]
    seed: int
    quick: bool
    started: str
    finished: str
    command: str
    checks: list[CheckResult] = field(default_factory=list)
    speed: list[SpeedResult] = field(default_factory=list)
    #: The bandwidth ceiling measured in the run (:mod:`conformance.timing`); None without
    #: ``--speed``.
    ceiling: dict[str, Any] | None = None

    @property
    def verdict(self) -> str:
        """The accuracy verdict: ``fail`` when any check failed."""
        return "fail" if any(c.verdict == "fail" for c in self.checks) else "pass"

    @property
    def speed_verdict(self) -> str | None:
        """The speed verdict, separate from accuracy: None when speed was not measured."""
        if not self.speed:
            return None
        return "fail" if any(s.verdict == "fail" for s in self.speed) else "pass"

    def summary(self) -> dict[str, int]:
        counts = {v: 0 for v in VERDICTS}
        for c in self.checks:
            counts[c.verdict] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "normconf.report",
            "schema_version": SCHEMA_VERSION,
            "verdict": self.verdict,
            "summary": self.summary(),
            "adapter": self.adapter,
            "hardware": self.hardware,
            "software": self.software,
            "seed": self.seed,
            "quick": self.quick,
            "started": self.started,
            "finished": self.finished,
            "command": self.command,
            "checks": [c.to_dict() for c in self.checks],
            "speed_verdict": self.speed_verdict,
            "ceiling": self.ceiling,
            "speed": [r.to_dict() for r in self.speed],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunRecord:
        if d.get("schema") != "normconf.report":
            raise ValueError("not a normconf report: missing schema 'normconf.report'")
        if d.get("schema_version") not in READABLE_VERSIONS:
            raise ValueError(
                f"report schema version {d.get('schema_version')!r} is not one of "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
            )
        return cls(
            adapter=d["adapter"],
            hardware=d["hardware"],
            software=d["software"],
            seed=d["seed"],
            quick=d["quick"],
            started=d["started"],
            finished=d["finished"],
            command=d["command"],
            checks=[CheckResult.from_dict(c) for c in d["checks"]],
            speed=[SpeedResult.from_dict(r) for r in d.get("speed", [])],
            ceiling=d.get("ceiling"),
        )
