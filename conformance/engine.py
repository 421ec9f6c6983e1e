"""The certification run: cases through an adapter, results in order, a record at the end.

:func:`certify` is the library entry point used by the CLI, the pytest plugin and the tests. It
never raises for an adapter's misbehaviour (that is a failed check); it raises
:class:`impls.adapter.AdapterError` only when the adapter cannot run here at all.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from conformance import explorer
from conformance.cases import DTYPES, Case, catalogue
from conformance.checks import Target
from conformance.large import large_cases
from conformance.messages import reproduction_command
from conformance.results import CheckResult, RunRecord
from conformance.specs import NORM_NAMES
from conformance.worker import open_runner

Progress = Callable[[int, int, Case, list[CheckResult]], None]


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def hardware(device: str) -> dict[str, Any]:
    """Where the run happened: CPU model and cores, and the GPU when one was used."""
    info: dict[str, Any] = {
        "device": device,
        "machine": platform.machine(),
        "system": platform.system(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    if device == "cuda":
        import torch

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def software() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("normconf", "torch", "numpy", "mpmath", "gmpy2", "onnxruntime", "triton"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def select_cases(
    *,
    norms: Sequence[str] | None = None,
    dtypes: Sequence[str] | None = None,
    quick: bool = False,
    seed: int = 0,
    case_ids: Sequence[str] = (),
    distributions: Sequence[str] | None = None,
    large: bool = False,
    boundary: bool = True,
) -> list[Case]:
    """The cases of a run: named case ids, or the catalogue filtered by norm, dtype and
    distribution, and with ``large`` the GPU-sized cases of :mod:`conformance.large` after it
    (``boundary=False``: without the boundary battery)."""
    from conformance.cases import parse_case_id

    if case_ids:
        return [parse_case_id(c) for c in case_ids]
    for name in norms or ():
        if name not in NORM_NAMES:
            raise ValueError(f"unknown norm {name!r}: expected one of {', '.join(NORM_NAMES)}")
    for name in dtypes or ():
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPES)}")
    cases = catalogue(
        norms=norms or NORM_NAMES,
        dtypes=dtypes or DTYPES,
        quick=quick,
        seed=seed,
        boundary=boundary,
    )
    if large:
        cases += large_cases(norms or NORM_NAMES, dtypes or DTYPES, seed)
    if distributions:
        cases = [c for c in cases if c.distribution in distributions]
    return cases


def certify(
    adapter: Any,
    cases: Iterable[Case],
    *,
    device: str = "cpu",
    conventions: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    quick: bool = False,
    command: str | None = None,
    progress: Progress | None = None,
    started: Callable[[RunRecord], None] | None = None,
    timeout: float | None = None,
    explore: explorer.Budget | None = None,
    explore_norms: Sequence[str] | None = None,
    explore_dtypes: Sequence[str] | None = None,
) -> RunRecord:
    """Run every case through ``adapter`` (an :class:`impls.adapter.Adapter`), then, with an
    ``explore`` budget, the explorer (:mod:`conformance.explorer`) on each of ``explore_norms``
    (default: every norm the adapter implements) over ``explore_dtypes`` (default: all).

    ``conventions`` overrides what the adapter declares (``{}`` certifies against PyTorch's
    conventions whatever the adapter says). ``started`` sees the record before the first case
    (its facts filled in, no checks yet); ``progress`` sees each case's checks as it finishes.
    ``timeout``: run the adapter in a worker process (:mod:`conformance.worker`) that may spend
    at most this many seconds in one call, and that a crash or hang fails one case instead of
    ending the run; None runs it in this process.
    """
    cases = [c for c in cases if c.norm in adapter.norms()]
    declared = adapter.conventions if conventions is None else conventions
    extra = (
        []
        if conventions is None or conventions == adapter.conventions
        else ["--convention", "pytorch"]
    )
    target = Target(
        adapter,
        device,
        declared,
        lambda case: reproduction_command(
            case.case_id, adapter.spec, seed, ["--device", device, *extra]
        ),
    )
    record = RunRecord(
        adapter=adapter.describe(),
        hardware=hardware(device),
        software=software(),
        seed=seed,
        quick=quick,
        started=now(),
        finished="",
        command=command or " ".join(shlex.quote(a) for a in sys.argv),
    )
    if started is not None:
        started(record)
    searches = []
    if explore is not None:
        searches = [n for n in (explore_norms or adapter.norms()) if n in adapter.norms()]
    total = len(cases) + len(searches)
    with open_runner(target, timeout=timeout, seed=seed, extra=extra) as runner:
        for done, case in enumerate(cases, 1):
            results = runner.run_case(case)
            record.checks.extend(results)
            if progress is not None:
                progress(done, total, case, results)
        for done, norm in enumerate(searches, len(cases) + 1):
            assert explore is not None
            search = _explore(adapter, runner, norm, device, explore_dtypes, seed, explore)
            if search is None:
                continue
            results = search.recorded()
            record.checks.extend(results)
            if progress is not None:
                progress(done, total, search.failing or search.drawn[-1], results)
    record.finished = now()
    return record


def _explore(
    adapter: Any,
    runner: Any,
    norm: str,
    device: str,
    dtypes: Sequence[str] | None,
    seed: int,
    budget: explorer.Budget,
) -> explorer.Search | None:
    """One norm's search over the dtypes the adapter supports here (None: it supports none)."""
    supported = explorer.dtypes_for(adapter, norm, device, dtypes)
    if not supported:
        return None
    search = explorer.explore(runner.run_case, norm, supported, seed=seed, budget=budget)
    return search if search.drawn else None


def certify_speed(
    record: RunRecord,
    adapter: Any,
    *,
    device: str,
    baseline: Any | None,
    thresholds: Any,
    norms: Sequence[str] | None = None,
    dtypes: Sequence[str] | None = None,
    quick: bool = False,
    conventions: Mapping[str, Mapping[str, Any]] | None = None,
    progress: Callable[[int, int, Any], None] | None = None,
    timeout: float | None = None,
) -> RunRecord:
    """Add the speed battery (:mod:`conformance.speed`) to ``record``, a finished accuracy run
    of ``adapter``: the ceiling measured now, then every speed case timed, re-verified and
    judged against ``thresholds`` and the ``baseline`` adapter (None: no ratio). ``timeout``:
    as :func:`certify`'s, each speed case timed in the worker."""
    from conformance import speed, timing

    battery = speed.speed_cases(adapter, device, norms=norms, dtypes=dtypes, quick=quick)
    declared = adapter.conventions if conventions is None else conventions
    record.ceiling = timing.measure_ceiling(device)
    extra = ["--quick"] if quick else []

    def reproduce(sc: Any) -> str:
        argv = ["normconf", "certify", "--adapter", adapter.spec, "--device", device, "--speed"]
        argv += [*extra, "--norm", sc.norm, "--dtype", sc.dtype]
        return shlex.join(argv)

    target = Target(adapter, device, declared, lambda case: "")
    with open_runner(target, timeout=timeout, seed=record.seed, baseline=baseline) as runner:
        record.speed = speed.run_speed(
            adapter,
            baseline,
            battery,
            device=device,
            conventions=declared,
            thresholds=thresholds,
            failed_accuracy=speed.accuracy_failures(record.checks),
            reproduce=reproduce,
            ceiling=record.ceiling,
            progress=progress,
            timer=runner.timer,
        )
    record.finished = now()
    return record
