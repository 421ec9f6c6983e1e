"""Adapters run in a worker process, so that a kernel that crashes or hangs fails a check
instead of ending the run.

:class:`Isolated` starts a worker (``multiprocessing``'s *forkserver*: forked from a clean server
process that has imported torch and the suite but never touched CUDA; *spawn* where there is no
fork), which loads the adapter by its spec and then runs cases (every check of a case, as
:func:`conformance.checks.run_case` does in process) and speed cases on request
(:mod:`conformance.worker_main`). The parent watches it:

- **a crash** (SIGSEGV, SIGABRT, SIGBUS, an exit): the case gets one failed check, "crashed with
  SIGSEGV (Segmentation fault) in the forward call", with the Python stack ``faulthandler``
  wrote at the moment of the crash as its diagnosis (:mod:`conformance.deaths`);
- **a hang**: the worker marks each call into the adapter's code (:mod:`conformance.watch`); one
  that goes on longer than ``timeout`` seconds is asked for its stack (SIGUSR1), killed, and the
  case fails with "no answer in 60 s from the forward call". A request that goes on ten times
  that (at least 10 minutes) outside any marked call — in a finalizer or a thread of the
  adapter's — is killed the same way;
- **a CUDA error**: it poisons the process's CUDA context, so the worker is replaced after the
  case it happened in;
- **a death between requests** (a thread the adapter left behind faulting after its call
  returned): the request goes to a fresh worker, and the death is reported as a failed check of
  that case, "… after the previous request had been answered".

After any of these a fresh worker takes the next case. The worker ignores SIGINT (Ctrl-C is the
parent's: the run stops without waiting for the case in flight), leads its own process group
(killed whole, with whatever the adapter started) and dies with its parent
(``PR_SET_PDEATHSIG``, Linux). Messages travel over a ``multiprocessing`` pipe, pickled: cases
and inputs in, :class:`CheckResult` lists and :class:`SpeedResult` out.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conformance import watch, worker_main
from conformance.cases import Case
from conformance.deaths import Death, Idle, innermost_frames
from conformance.results import CheckResult, SpeedResult
from conformance.specs import spec as norm_spec
from impls.adapter import AdapterError

DEFAULT_TIMEOUT_S = 60.0  # per call into the adapter: a cold torch.compile took 24 s here
_POLL_S = 0.05
_TRACE_WAIT_S = 2.0  # how long a hung worker gets to write its traceback before SIGKILL
_START_TIMEOUT_S = 600.0  # importing torch, triton and the adapter: slow, but not forever
_REQUEST_LIMIT_S = 600.0


class WorkerError(AdapterError):
    """The worker could not load the adapter that the parent loaded (it must be importable
    again by its spec)."""


@dataclass(frozen=True)
class Plan:
    """What a worker needs to stand in for the parent: the adapter by spec, where it runs, the
    conventions it is graded against, and how its failures are reproduced."""

    spec: str
    device: str
    conventions: Mapping[str, Mapping[str, Any]] | None  # None: the adapter's declared ones
    seed: int = 0
    extra: tuple[str, ...] = ()  # further arguments of the reproduction command
    baseline: str | None = None  # the speed battery's baseline adapter, by spec
    environment: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    def reproduce(self, case: Case) -> str:
        from conformance.messages import reproduction_command

        return reproduction_command(case.case_id, self.spec, self.seed, list(self.extra))


# -- the parent's side ---------------------------------------------------------------------------


@contextmanager
def open_runner(
    target: Any,
    *,
    timeout: float | None,
    seed: int = 0,
    extra: Sequence[str] = (),
    baseline: Any = None,
) -> Iterator[InProcess | Isolated]:
    """What runs cases and speed cases for ``target`` (a :class:`conformance.checks.Target`):
    a worker process with a ``timeout`` per call into the adapter, or (``timeout`` None) this
    process. ``extra``: the reproduction command's arguments after the seed."""
    if timeout is None:
        yield InProcess(target, baseline)
        return
    plan = plan_for(
        target.adapter,
        target.device,
        target.conventions,
        seed,
        ["--device", target.device, *extra],
        baseline,
    )
    with Isolated(plan, timeout) as worker:
        yield worker


class InProcess:
    """Cases run in this process: a crash ends the run, a hang hangs it (``--in-process``, for a
    debugger)."""

    def __init__(self, target: Any, baseline: Any = None) -> None:
        self.target, self.baseline = target, baseline

    def run_case(self, case: Case, inputs: Any = None) -> list[CheckResult]:
        from conformance.checks import run_case

        try:
            return run_case(self.target, case, inputs)
        except Exception as exc:  # the suite's own failure on one case must not end the run
            return [suite_error(self.target, case, exc)]

    def timer(self, adapter: Any, baseline: Any, sc: Any, **options: Any) -> SpeedResult:
        from conformance.speed import time_one

        return time_one(adapter, baseline, sc, **options)


def case_failure(
    case: Case, message: str, reproduce: str, convention: Any = None, diagnosis: str | None = None
) -> CheckResult:
    """The one failed check a case gets when it could not be checked at all."""
    return CheckResult(
        **case.result_fields(),
        kind="contract",
        output="call",
        verdict="fail",
        message=message,
        diagnosis=diagnosis,
        reproduce=reproduce,
        convention=convention,
    )


def suite_error(target: Any, case: Case, exc: Exception) -> CheckResult:
    """A case the suite itself could not run (its bug, not the adapter's)."""
    from conformance.calls import first_line

    why = f"the suite could not run this case: {type(exc).__name__}: {first_line(exc)}"
    return case_failure(case, why, target.reproduce(case), target.convention(case.norm))


class Isolated:
    """A worker process running ``plan``'s adapter; a new one after every crash or hang.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self, plan: Plan, timeout: float = DEFAULT_TIMEOUT_S, request_limit: float | None = None
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.plan, self.timeout = plan, timeout
        # A request that runs this long outside any call into the adapter (its finalizers,
        # its threads, the suite's own references) is hung too.
        self.request_limit = request_limit or max(10 * timeout, _REQUEST_LIMIT_S)
        self.restarts = 0
        self._context = _context()
        self._process: Any = None
        self._conn: Any = None
        self._shared: Any = None
        self._trace: Path | None = None
        self._busy = False  # a request is in flight: closing must not wait for its answer
        self._scratch = Path(tempfile.mkdtemp(prefix="normconf-worker-"))

    @property
    def pid(self) -> int | None:
        """The running worker's process id (None before the first request)."""
        return None if self._process is None else int(self._process.pid)

    def __enter__(self) -> Isolated:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests

    def run_case(self, case: Case, inputs: Any = None) -> list[CheckResult]:
        """Every check of ``case`` (on ``inputs`` when given), or one failed check saying how
        the worker died; after them, a failed check for each worker that died idle before it."""
        answer, idle = self._ask(("case", case, inputs))
        results = [self._crash_result(case, answer)] if isinstance(answer, Death) else answer
        after = "; a fresh worker ran this case" if not isinstance(answer, Death) else ""
        for death in idle:
            why = f"{death.reason()} after the previous request had been answered{after}"
            results.append(self._crash_result(case, death, why))
        return list(results)

    def time_case(self, sc: Any, **options: Any) -> SpeedResult:
        """One speed case timed in the worker (see :func:`conformance.speed.time_one`); a crash
        or hang is the case's failure."""
        from conformance.speed import failed_timing

        answer, idle = self._ask(("speed", sc, options))
        deaths = [answer] if isinstance(answer, Death) else []
        deaths += idle
        if not deaths:
            assert isinstance(answer, SpeedResult)
            return answer
        why = "; ".join(
            d.reason() + (" / ".join(["", *d.trace.splitlines()[:4]]) if d.trace else "")
            for d in deaths
        )
        return failed_timing(sc, self.plan.device, why, options["reproduce"])

    def timer(self, adapter: Any, baseline: Any, sc: Any, **options: Any) -> SpeedResult:
        """:func:`conformance.speed.time_one`'s signature, timed in the worker (whose adapter
        and baseline are loaded from the plan's specs, which must be these ones')."""
        if adapter.spec != self.plan.spec or getattr(baseline, "spec", None) != self.plan.baseline:
            raise ValueError("the worker runs another adapter or baseline than the one timed")
        return self.time_case(sc, **options)

    def close(self) -> None:
        """Stop the worker (politely when it is idle; at once when a request is in flight, as
        when Ctrl-C interrupted the wait) and remove its scratch files."""
        if self._process is not None:
            if not self._busy and self._conn is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._conn.send(("stop",))
                self._process.join(timeout=5)
            self._kill()
        for path in self._scratch.glob("*"):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self._scratch.rmdir()

    # -- the watchdog

    def _ask(self, request: tuple[Any, ...]) -> tuple[Any, list[Death]]:
        """Send ``request``; its answer (or how the worker died on it), and the deaths of
        workers that died idle first (a native thread or finalizer the adapter left behind,
        faulting after its call returned): the request then goes to a fresh worker, once."""
        idle: list[Death] = []
        while True:
            if self._process is None:
                self._start()
            self._busy = True  # stays set if the wait is interrupted: close() must not wait
            with contextlib.suppress(OSError):  # a dead reader: found by the wait below
                self._conn.send(request)
            answer = self._await()
            self._busy = False
            if not isinstance(answer, Idle):
                return answer, idle
            idle.append(answer.death)
            if len(idle) == 2:
                return answer.death, idle[:1]

    def _await(self) -> Any:
        acknowledged = False
        started = time.monotonic()
        while True:
            if self._conn.poll(_POLL_S):
                try:
                    kind, payload = self._conn.recv()
                except (EOFError, OSError):
                    death = self._died()
                    return death if acknowledged else Idle(death)
                if kind == "started":
                    acknowledged = True
                    continue
                if kind == "retire":  # a CUDA error: the answer stands, the process does not
                    self._retire()
                return payload
            if not self._process.is_alive():
                if self._conn.poll(0):
                    continue  # what it sent before it died comes first
                death = self._died()
                return death if acknowledged else Idle(death)
            calling = watch.read(self._shared)
            if calling is not None and time.monotonic() - calling[1] > self.timeout:
                return self._hung(calling[0], self.timeout)
            if calling is None and time.monotonic() - started > self.request_limit:
                return self._hung(None, self.request_limit)

    def _start(self) -> None:
        self._trace = self._scratch / f"trace-{self.restarts}.txt"
        self._shared = self._context.Array("d", 2, lock=False)
        parent, child = self._context.Pipe()
        self._process = self._context.Process(
            target=worker_main.serve,
            args=(child, self._shared, self.plan, str(self._trace)),
            name="normconf-worker",
            daemon=True,
        )
        self._process.start()
        child.close()  # the parent's copy: a dead worker must read as end-of-file
        self._conn = parent
        if not parent.poll(_START_TIMEOUT_S):
            self._kill()
            raise WorkerError(f"the worker did not load adapter {self.plan.spec!r} in time")
        try:
            kind, payload = parent.recv()
        except EOFError:
            death = self._died()
            raise WorkerError(
                f"the worker died loading adapter {self.plan.spec!r}: {death.reason()}"
                f"{' at ' + death.trace.splitlines()[-1] if death.trace else ''}"
            ) from None
        if kind != "ready":
            self._kill()
            raise WorkerError(payload)

    def _died(self) -> Death:
        stage = watch.read(self._shared)
        self._process.join(timeout=5)
        code = self._process.exitcode
        death = Death(code=code, stage=stage[0] if stage else None, trace=self._read_trace())
        self._retire()
        return death

    def _hung(self, stage: str | None, limit: float) -> Death:
        size = self._trace.stat().st_size if self._trace and self._trace.exists() else 0
        with contextlib.suppress(OSError):
            os.kill(self._process.pid, signal.SIGUSR1)  # faulthandler writes every thread's stack
        deadline = time.monotonic() + _TRACE_WAIT_S
        while time.monotonic() < deadline:
            time.sleep(_POLL_S)
            if self._trace and self._trace.exists() and self._trace.stat().st_size > size:
                time.sleep(_POLL_S)  # let it finish the dump
                break
        death = Death(code=None, stage=stage, trace=self._read_trace(), timeout=limit)
        self._retire()
        return death

    def _retire(self) -> None:
        self._kill()
        self.restarts += 1

    def _kill(self) -> None:
        """SIGKILL the worker and every process it started (its process group)."""
        if self._process is None:
            return
        with contextlib.suppress(OSError, TypeError):
            os.killpg(self._process.pid, signal.SIGKILL)
        if self._process.is_alive():
            self._process.kill()
        self._process.join(timeout=5)
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
        self._process = self._conn = None

    def _read_trace(self) -> str:
        if self._trace is None or not self._trace.exists():
            return ""
        return innermost_frames(self._trace.read_text(encoding="utf-8", errors="replace"))

    def _crash_result(self, case: Case, death: Death, why: str | None = None) -> CheckResult:
        conventions = self.plan.conventions or {}
        return case_failure(
            case,
            why or death.reason() + "; the worker was replaced and the run went on",
            self.plan.reproduce(case),
            norm_spec(case.norm).convention(dict(conventions.get(case.norm, {}))),
            diagnosis=death.diagnosis(),
        )


# Imported once by the fork server, so that a new worker (after each crash) starts in a fraction
# of a second instead of importing torch again; none of them touches CUDA at import.
_PRELOAD = ["numpy", "torch", "conformance.checks", "conformance.speed", "impls.loader"]


def _context() -> Any:
    """*forkserver* where the platform has it (a clean server process, never the parent's
    threads or CUDA context, forks each worker), else *spawn*."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)
        return context
    return multiprocessing.get_context("spawn")


def plan_for(
    adapter: Any,
    device: str,
    conventions: Mapping[str, Mapping[str, Any]] | None,
    seed: int,
    extra: Sequence[str] = (),
    baseline: Any = None,
) -> Plan:
    """The :class:`Plan` of a loaded adapter (and baseline)."""
    return Plan(
        spec=adapter.spec,
        device=device,
        conventions=None if conventions is None else {k: dict(v) for k, v in conventions.items()},
        seed=seed,
        extra=tuple(extra),
        baseline=None if baseline is None else baseline.spec,
    )
