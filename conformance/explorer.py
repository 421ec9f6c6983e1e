"""The shape and stride explorer: hypothesis draws cases the catalogue does not name.

For each norm, :func:`explore` draws cases — a dtype, a shape (rows and row lengths around the
tiles, the 16-bit row limit, model sizes, empty and one-element extremes), the input's memory
order, gaps, padding, storage offset and stride-0 dimensions, the gradients' and the
parameters' layouts — within an element budget, runs each through the adapter like any
catalogue case, and on the first failure lets hypothesis shrink it to the smallest failing case
it can find (fewer rows, shorter rows, plainer layouts). Every drawn case is an ordinary
:class:`conformance.cases.Case`: its id says everything (``--case ID`` and ``normconf replay``
take it), and its seed is hashed from the run seed and what it is, as the catalogue's are.

The draws derive from the run seed (``@seed``; no example database), so a run is reproducible
and each seed explores a fresh region. The checks of every drawn case are recorded as kind
``explore`` (``forward: output: within tolerance``), except those of the failing cases met
while shrinking, which only the last, smallest one stands for; one more ``explore`` check per
norm (output ``search``) says what was drawn and what the search found.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from hypothesis import HealthCheck, Phase, Verbosity, given, reject, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from conformance.cases import FLOAT64_CHANNEL_ELEMENTS, Case, case_seed, with_norm_defaults
from conformance.layouts import CONTIGUOUS, Layout
from conformance.results import CheckResult
from conformance.shape_classes import MANY_ROWS, TILES
from conformance.specs import spec


@dataclass(frozen=True)
class Budget:
    """How much one norm's search may run: drawn cases, elements over all of them, elements in
    one case, and adapter runs spent shrinking a failure."""

    examples: int
    elements: int
    per_case: int
    shrinks: int


#: ``--quick``: a small fixed search; the full battery: a larger one.
QUICK = Budget(examples=4, elements=2**17, per_case=2**14, shrinks=16)
FULL = Budget(examples=24, elements=2**23, per_case=2**18, shrinks=64)


def budget(*, quick: bool, elements: int | None = None) -> Budget | None:
    """The search's budget for a run: :data:`QUICK` or :data:`FULL`, with ``elements`` in
    place of its element budget when given (0: no search)."""
    if elements == 0:
        return None
    chosen = QUICK if quick else FULL
    return chosen if elements is None else replace(chosen, elements=elements)


def dtypes_for(
    adapter: Any, norm: str, device: str, wanted: Sequence[str] | None = None
) -> list[str]:
    """The dtypes a search of ``norm`` draws from: those the adapter supports on ``device``
    (and of ``wanted``, when given)."""
    return [
        d
        for d in adapter.dtypes[norm]
        if adapter.supports(norm, d, device) and (not wanted or d in wanted)
    ]


#: Row lengths worth drawing more often than chance would: one off every tile, model sizes.
EDGE_SIZES = tuple(sorted({t + d for t in TILES[:10] for d in (-1, 1)} | {768, 2560, 5120}))
EDGE_ROWS = (MANY_ROWS, MANY_ROWS + 1, MANY_ROWS + 2)
DISTRIBUTIONS = ("normal", "uniform")


class _Failed(Exception):
    """A drawn case failed; hypothesis shrinks towards the smallest one that does."""

    def __init__(self, case: Case) -> None:
        super().__init__(case.case_id)
        self.case = case


@st.composite
def _trailing_shape(draw: st.DrawFn, per_case: int) -> tuple[tuple[int, ...], int]:
    n = draw(
        st.one_of(
            st.sampled_from(EDGE_SIZES),
            st.integers(1, min(per_case, 4096)),
            st.integers(1, min(per_case, 2**17)),
        ),
        label="n",
    )
    n = min(n, max(per_case, 1))  # an edge size past the case's budget: the budget
    most = per_case // n
    kind = draw(st.sampled_from(("few", "few", "few", "many", "one", "none")), label="rows")
    if kind == "many" and most > EDGE_ROWS[0]:
        rows = draw(st.sampled_from([r for r in EDGE_ROWS if r <= most]))
    elif kind == "one" or (kind == "many" and most >= 1):
        rows = 1
    elif kind == "none":
        rows = 0
    else:
        rows = draw(st.integers(2, max(2, min(most, 64)))) if most >= 2 else most
    leading = [rows]
    if rows > 1 and draw(st.booleans(), label="split rows"):
        first = draw(st.sampled_from([d for d in range(2, 9) if rows % d == 0] or [1]))
        leading = [first, rows // first]
    if n > 1 and draw(st.booleans(), label="two normalized dims"):
        factors = [d for d in range(2, 17) if n % d == 0]
        if factors:
            first = draw(st.sampled_from(factors))
            return (*leading, first, n // first), 2
    return (*leading, n), 1


@st.composite
def _channel_shape(draw: st.DrawFn, norm: str, per_case: int) -> tuple[tuple[int, ...], int]:
    groups = draw(st.integers(1, 4)) if norm == "group_norm" else 1
    per_group = draw(st.integers(1, 6)) if norm == "group_norm" else 1
    channels = groups * per_group * (1 if norm == "group_norm" else draw(st.integers(1, 6)))
    spatial_dims = draw(st.integers(0 if norm == "group_norm" else 1, 3))
    budget = max(per_case // channels, 1)
    batch = draw(st.integers(0 if norm != "batch_norm" else 1, min(4, budget)))
    budget //= max(batch, 1)
    spatial = []
    for _ in range(spatial_dims):
        extent = draw(st.integers(1, max(1, min(budget, 300))))
        budget //= extent
        spatial.append(extent)
    if norm != "group_norm" and math.prod(spatial) * (batch if norm == "batch_norm" else 1) < 2:
        spatial = [2, *spatial[1:]] if spatial else [2]  # PyTorch needs two values per group
    return (batch, channels, *spatial), groups


@st.composite
def _layout(draw: st.DrawFn, rank: int, *, expand: Sequence[int], grad: bool) -> Layout:
    orders: list[object] = [()]
    if rank >= 2:
        orders.append("transposed")
        orders.append(tuple(draw(st.permutations(range(rank)))))
    if rank in (4, 5):
        orders.append("channels_last")
    order = draw(st.sampled_from(orders), label="order")
    broadcast: tuple[int, ...] | None = ()
    if expand and draw(st.sampled_from((False, False, True)), label="any stride 0"):
        choices: list[tuple[int, ...] | None] = [(d,) for d in expand]
        broadcast = draw(st.sampled_from([*choices, None] if grad else choices))
    return Layout(
        order=order,  # type: ignore[arg-type]
        step=draw(st.sampled_from((1, 2)), label="step"),
        pad=draw(st.sampled_from((0, 0, 1, 3)), label="pad"),
        offset=draw(st.integers(0, 7), label="offset"),
        broadcast=broadcast,
    )


@st.composite
def cases_for(
    draw: st.DrawFn, norm: str, dtypes: Sequence[str], per_case: int, run_seed: int
) -> Case:
    """One case of ``norm``: a dtype of ``dtypes``, a shape of at most ``per_case`` elements,
    drawn layouts."""
    s = spec(norm)
    dtype = draw(st.sampled_from(tuple(dtypes)), label="dtype")
    if dtype == "float64":  # the battery's float64 cap (its references' exact steps)
        per_case = min(per_case, FLOAT64_CHANNEL_ELEMENTS)
    if s.trailing:
        shape, dims = draw(_trailing_shape(per_case), label="shape")
        extra = {"norm_dims": dims}
        leading = range(len(shape) - dims)
    else:
        shape, groups = draw(_channel_shape(norm, per_case), label="shape")
        extra = {"num_groups": groups} if norm == "group_norm" else {}
        leading = range(1)
    rank = len(shape)
    layout = draw(_layout(rank, expand=tuple(leading), grad=False), label="input layout")
    grad = draw(_layout(rank, expand=tuple(range(rank)), grad=True), label="grad layout")
    params = CONTIGUOUS
    if draw(st.booleans(), label="parameter layout"):
        params = Layout(offset=draw(st.integers(0, 3)), broadcast=draw(st.sampled_from(((), None))))
    distribution = draw(st.sampled_from(DISTRIBUTIONS), label="distribution")
    case = Case(norm, dtype, shape, distribution, 0, layout=layout, **extra)  # type: ignore[arg-type]
    try:
        case = with_norm_defaults(replace(case, grad_layout=grad, param_layout=params))
    except ValueError:
        reject()  # a layout this shape cannot hold (a permutation of the wrong rank, ...)
    return replace(case, seed=case_seed(run_seed, case.case_id))


@dataclass
class Search:
    """What one norm's search drew and found."""

    norm: str
    drawn: list[Case]
    results: dict[str, list[CheckResult]]
    failing: Case | None = None
    first_failing: Case | None = None
    failing_runs: int = 0
    #: Cases run after the first failure, while hypothesis shrank it.
    shrinking_runs: int = 0

    def recorded(self) -> list[CheckResult]:
        """The checks of the drawn cases that passed and of the smallest failing case, as kind
        ``explore``, then the search's own check."""
        out = []
        for case in self.drawn:
            results = self.results[case.case_id]
            failed = any(r.verdict == "fail" for r in results)
            if failed and (self.failing is None or case.case_id != self.failing.case_id):
                continue
            out += [_as_explored(r) for r in results]
        return [*out, self._summary()]

    def _summary(self) -> CheckResult:
        elements = sum(c.elements for c in self.drawn)
        count = len(self.drawn) - self.shrinking_runs
        drawn = f"drew {count} case{'s' if count != 1 else ''}"
        if self.shrinking_runs:
            drawn += f" and ran {self.shrinking_runs} more while shrinking"
        drawn += f" ({elements} elements)"
        if self.failing is None:
            last = self.drawn[-1] if self.drawn else None
            verdict, message = "pass", f"{drawn}: every one passed"
        else:
            last, verdict = self.failing, "fail"
            assert self.first_failing is not None
            shrunk = (
                f"shrunk from {self.first_failing.case_id} through {self.failing_runs} failing "
                "cases"
                if self.first_failing.case_id != self.failing.case_id
                else "the first failing case drawn, which did not shrink"
            )
            message = f"{drawn}; smallest failing case: {self.failing.case_id} ({shrunk})"
        template = self.results[last.case_id][0] if last is not None else None
        if template is None:
            raise ValueError(f"the {self.norm} search drew no case")
        return replace(
            template,
            kind="explore",
            output="search",
            verdict=verdict,
            grade=None,
            metrics=None,
            diagnosis=None,
            message=message,
            duration_s=0.0,
        )


def _as_explored(result: CheckResult) -> CheckResult:
    return replace(result, kind="explore", message=f"{result.kind}: {result.message}")


def explore(
    run_case: Callable[[Case], list[CheckResult]],
    norm: str,
    dtypes: Sequence[str],
    *,
    seed: int,
    budget: Budget,
    progress: Callable[[Case, list[CheckResult]], None] | None = None,
) -> Search:
    """Search ``norm`` over ``dtypes`` from the run seed ``seed`` (see the module docstring);
    ``run_case`` runs one case (in the run's worker) and ``progress`` sees each case run."""
    search = Search(norm, [], {})
    spent = {"elements": 0, "shrinks": 0}

    def run(case: Case) -> list[CheckResult]:
        if case.case_id not in search.results:
            search.results[case.case_id] = run_case(case)
            search.drawn.append(case)
            spent["elements"] += case.elements
            if progress is not None:
                progress(case, search.results[case.case_id])
        return search.results[case.case_id]

    @settings(
        max_examples=budget.examples,
        database=None,
        deadline=None,
        derandomize=False,
        phases=(Phase.generate, Phase.shrink),
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
    )
    @hypothesis_seed(case_seed(seed, f"explore:{norm}"))
    @given(case=cases_for(norm, dtypes, budget.per_case, seed))
    def probe(case: Case) -> None:
        known = case.case_id in search.results
        if not known:
            if search.failing is not None:
                if spent["shrinks"] >= budget.shrinks:
                    return  # shrinking has spent its runs: the smallest so far stands
                spent["shrinks"] += 1
                search.shrinking_runs += 1
            elif spent["elements"] + case.elements > budget.elements:
                return
        results = run(case)
        if any(r.verdict == "fail" for r in results):
            if search.first_failing is None:
                search.first_failing = case
            if search.failing is None or _smaller(case, search.failing):
                search.failing = case
            search.failing_runs += not known
            raise _Failed(case)

    try:
        probe()
    except _Failed:
        pass
    return search


def _smaller(a: Case, b: Case) -> bool:
    """Whether ``a`` is a smaller failure than ``b``: fewer elements, then plainer layouts."""

    def size(c: Case) -> tuple[int, int, int]:
        plain = sum(not x.contiguous for x in (c.layout, c.grad_layout, c.param_layout))
        return c.elements, plain, len(c.shape)

    return size(a) < size(b)
