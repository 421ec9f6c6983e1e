"""What a check produces: metrics, a grade, a verdict, and the words that explain a failure.

These records are the one currency between the engine, the report writers and the pytest plugin.
``to_dict``/``from_dict`` give the JSON form documented in the README (report schema version
:data:`SCHEMA_VERSION`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1

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

    @property
    def verdict(self) -> str:
        return "fail" if any(c.verdict == "fail" for c in self.checks) else "pass"

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
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunRecord:
        if d.get("schema") != "normconf.report":
            raise ValueError("not a normconf report: missing schema 'normconf.report'")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"report schema version {d.get('schema_version')!r} is not {SCHEMA_VERSION}"
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
        )
