"""Adapters run in a worker process, so that a kernel that crashes or hangs fails a check
instead of ending the run.

:class:`Isolated` starts a worker (``multiprocessing``'s *forkserver*: forked from a clean server
process that has imported torch and the suite but never touched CUDA; *spawn* where there is no
fork), which loads the adapter by its spec and then runs cases (every check of a case, as
:func:`conformance.checks.run_case` does in process) and speed cases on request. The parent
watches it:

- **a crash** (SIGSEGV, SIGABRT, SIGBUS, an ``os._exit``): the case gets one failed check,
  "crashed with SIGSEGV (Segmentation fault) in the forward call", with the Python traceback
  ``faulthandler`` wrote at the moment of the crash as its diagnosis;
- **a hang**: the worker marks each call into the adapter's code (:mod:`conformance.watch`); one
  that goes on longer than ``timeout`` seconds is asked for its traceback (SIGUSR1), killed, and
  the case fails with "no answer in 20 s from the forward call";
- **a CUDA error**: it poisons the process's CUDA context, so the worker is replaced after the
  case it happened in.

After any of these a fresh worker takes the next case. The worker ignores SIGINT (Ctrl-C is the
parent's) and dies with its parent (``PR_SET_PDEATHSIG`` on Linux). Messages travel over a
``multiprocessing`` pipe, pickled: cases and inputs in, :class:`CheckResult` lists and
:class:`SpeedResult` out.
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conformance import watch
from conformance.cases import Case
from conformance.results import CheckResult, SpeedResult
from conformance.specs import spec as norm_spec
from impls.adapter import AdapterError

DEFAULT_TIMEOUT_S = 60.0  # per call into the adapter: a cold torch.compile took 24 s here
_POLL_S = 0.05
_TRACE_WAIT_S = 2.0  # how long a hung worker gets to write its traceback before SIGKILL
_START_TIMEOUT_S = 600.0  # importing torch, triton and the adapter: slow, but not forever


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
        case_id=case.case_id,
        norm=case.norm,
        dtype=case.dtype,
        kind="contract",
        output="call",
        shape=case.shape,
        distribution=case.distribution,
        layout=case.layout,
        seed=case.seed,
        verdict="fail",
        message=message,
        diagnosis=diagnosis,
        reproduce=reproduce,
        convention=convention,
    )


def suite_error(target: Any, case: Case, exc: Exception) -> CheckResult:
    """A case the suite itself could not run (its bug, not the adapter's)."""
    from conformance.checks import first_line

    why = f"the suite could not run this case: {type(exc).__name__}: {first_line(exc)}"
    return case_failure(case, why, target.reproduce(case), target.convention(case.norm))


class Isolated:
    """A worker process running ``plan``'s adapter; a new one after every crash or hang.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, plan: Plan, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.plan, self.timeout = plan, timeout
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
        the worker died."""
        answer = self._ask(("case", case, inputs))
        if isinstance(answer, _Death):
            return [self._crash_result(case, answer)]
        return list(answer)

    def time_case(self, sc: Any, **options: Any) -> SpeedResult:
        """One speed case timed in the worker (see :func:`conformance.speed.time_one`); a crash
        or hang is the case's failure."""
        from conformance.speed import failed_timing

        answer = self._ask(("speed", sc, options))
        if isinstance(answer, _Death):
            why = answer.reason()
            if answer.trace:
                why += "; " + " / ".join(answer.trace.splitlines()[:4])
            return failed_timing(sc, self.plan.device, why, options["reproduce"])
        assert isinstance(answer, SpeedResult)
        return answer

    def timer(self, adapter: Any, baseline: Any, sc: Any, **options: Any) -> SpeedResult:
        """:func:`conformance.speed.time_one`'s signature, timed in the worker (whose adapter
        and baseline are loaded from the plan's specs)."""
        return self.time_case(sc, **options)

    def close(self) -> None:
        """Stop the worker (politely, then not) and remove its scratch files."""
        if self._process is not None:
            if not self._busy:
                with contextlib.suppress(OSError, ValueError):
                    self._conn.send(("stop",))
                self._process.join(timeout=5)
            self._kill()
        for path in self._scratch.glob("*"):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self._scratch.rmdir()

    # -- the watchdog

    def _ask(self, request: tuple[Any, ...]) -> Any:
        """Send ``request`` and wait for its answer. A worker that dies before it acknowledges
        the request died idle (a native thread the adapter left behind, faulting after its call
        returned): the request goes to a fresh worker, once, and the death is not its fault."""
        for attempt in (1, 2):
            if self._process is None:
                self._start()
            self._busy = True
            try:
                with contextlib.suppress(OSError):  # a dead reader: found by the wait below
                    self._conn.send(request)
                answer = self._await()
            finally:
                self._busy = False
            if not isinstance(answer, _Idle):
                return answer
            if attempt == 2:
                return answer.death
        raise AssertionError("unreachable")

    def _await(self) -> Any:
        acknowledged = False
        while True:
            if self._conn.poll(_POLL_S):
                try:
                    kind, payload = self._conn.recv()
                except (EOFError, OSError):
                    death = self._died()
                    return death if acknowledged else _Idle(death)
                if kind == "started":
                    acknowledged = True
                    continue
                if kind == "retire":  # a CUDA error: the answer stands, the process does not
                    self._kill()
                return payload
            if not self._process.is_alive():
                death = self._died()
                return death if acknowledged else _Idle(death)
            calling = watch.read(self._shared)
            if calling is not None and time.monotonic() - calling[1] > self.timeout:
                return self._hung(calling[0])

    def _start(self) -> None:
        self._trace = self._scratch / f"trace-{self.restarts}.txt"
        self._shared = self._context.Array("d", 2, lock=False)
        parent, child = self._context.Pipe()
        self._process = self._context.Process(
            target=serve,
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
            ) from None
        if kind != "ready":
            self._kill()
            raise WorkerError(payload)

    def _died(self) -> _Death:
        stage = watch.read(self._shared)
        self._process.join(timeout=5)
        code = self._process.exitcode
        death = _Death(code=code, stage=stage[0] if stage else None, trace=self._read_trace())
        self._retire()
        return death

    def _hung(self, stage: str) -> _Death:
        size = self._trace.stat().st_size if self._trace and self._trace.exists() else 0
        with contextlib.suppress(OSError):
            os.kill(self._process.pid, signal.SIGUSR1)  # faulthandler writes every thread's stack
        deadline = time.monotonic() + _TRACE_WAIT_S
        while time.monotonic() < deadline:
            time.sleep(_POLL_S)
            if self._trace and self._trace.exists() and self._trace.stat().st_size > size:
                time.sleep(_POLL_S)  # let it finish the dump
                break
        death = _Death(code=None, stage=stage, trace=self._read_trace(), timeout=self.timeout)
        self._retire()
        return death

    def _retire(self) -> None:
        self._kill()
        self.restarts += 1

    def _kill(self) -> None:
        if self._process is None:
            return
        if self._process.is_alive():
            self._process.kill()
        self._process.join(timeout=5)
        with contextlib.suppress(OSError):
            self._conn.close()
        self._process = self._conn = None

    def _read_trace(self) -> str:
        if self._trace is None or not self._trace.exists():
            return ""
        return _innermost_frames(self._trace.read_text(encoding="utf-8", errors="replace"))

    def _crash_result(self, case: Case, death: _Death) -> CheckResult:
        trace = death.trace and f"where the adapter was (most recent call first):\n{death.trace}"
        conventions = self.plan.conventions or {}
        return case_failure(
            case,
            death.reason() + "; the worker was replaced and the run went on",
            self.plan.reproduce(case),
            norm_spec(case.norm).convention(dict(conventions.get(case.norm, {}))),
            diagnosis=trace or None,
        )


@dataclass(frozen=True)
class _Death:
    """How a worker ended: an exit code (negative: the signal), or a timeout."""

    code: int | None
    stage: str | None
    trace: str
    timeout: float | None = None

    def reason(self) -> str:
        where = f"in the {self.stage}" if self.stage else "between calls into the adapter"
        if self.timeout is not None:
            return f"no answer in {self.timeout:g} s from the {self.stage}"
        if self.code is not None and self.code < 0:
            try:
                sig = signal.Signals(-self.code)
                name = f"{sig.name} ({signal.strsignal(sig) or sig.name})"
            except ValueError:
                name = f"signal {-self.code}"
            return f"crashed with {name} {where}"
        return f"the worker process exited with status {self.code} {where}"


@dataclass(frozen=True)
class _Idle:
    """A worker that died before it took up the request it was sent."""

    death: _Death


def _innermost_frames(text: str, limit: int = 8) -> str:
    """faulthandler's dump cut to the first thread's innermost frames (it prints the most recent
    call first), up to the first frame of the suite's own code: where in the adapter it was."""
    suite = str(Path(__file__).parent)
    frames: list[str] = []
    header = ""
    for line in (raw.strip() for raw in text.splitlines()):
        if line.startswith("File "):
            frames.append(line)
            if len(frames) == limit or suite in line:
                break
        elif frames and line:
            break  # the next thread's block
        elif line.startswith("Fatal Python error"):
            header = header or line
    return "\n".join(([header] if header else []) + frames)


# -- the worker's side ---------------------------------------------------------------------------


def serve(conn: Any, shared: Any, plan: Plan, trace_path: str) -> None:
    """The worker's main loop: load the adapter, then answer requests until "stop"."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.clear()  # the parent's environment now, not the fork server's when it started
    os.environ.update(plan.environment)
    _die_with_parent()
    trace = open(trace_path, "w", encoding="utf-8")  # open for the life of the process
    faulthandler.enable(file=trace, all_threads=False)
    faulthandler.register(signal.SIGUSR1, file=trace, all_threads=True)
    watch.install(shared)
    try:
        target, baseline = _load(plan)
    except Exception as exc:
        from conformance.checks import first_line

        conn.send(("error", f"{type(exc).__name__}: {first_line(exc)}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return  # the parent is gone
        if request[0] == "stop":
            return
        conn.send(("started", None))
        answer = _answer(request, target, baseline, plan)
        conn.send(("retire" if _cuda_broken(plan.device, answer) else "done", answer))


def _load(plan: Plan) -> tuple[Any, Any]:
    from conformance.checks import Target
    from impls.loader import load_adapter

    with watch.calling("loading of the adapter"):
        adapter = load_adapter(plan.spec)
        baseline = None
        if plan.baseline is not None:
            baseline = adapter if plan.baseline == plan.spec else load_adapter(plan.baseline)
    conventions = adapter.conventions if plan.conventions is None else plan.conventions
    return Target(adapter, plan.device, conventions, plan.reproduce), baseline


def _answer(request: Sequence[Any], target: Any, baseline: Any, plan: Plan) -> Any:
    here = InProcess(target, baseline)
    if request[0] == "case":
        _, case, inputs = request
        return here.run_case(case, inputs)
    _, sc, options = request
    return here.timer(target.adapter, baseline, sc, **options)


def _cuda_broken(device: str, answer: Any) -> bool:
    """Whether the case left a CUDA error behind (the context is then unusable for good)."""
    if device != "cuda":
        return False
    texts = [getattr(r, "message", "") or "" for r in (answer if isinstance(answer, list) else [])]
    texts.append(getattr(answer, "message", "") or "")
    if any("CUDA error" in t or "cudaError" in t for t in texts):
        return True
    import torch

    try:
        torch.cuda.synchronize()
    except Exception:
        return True
    return False


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


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a run killed with SIGKILL cannot
    stop a hung worker itself).

    A forked worker's parent is the fork server, which exits when the run dies, but only once
    no process holds its keep-alive pipe; every forked child inherits that pipe's write end, so
    the worker closes its copy (a private attribute of ``multiprocessing.forkserver``, hence the
    guard): otherwise a hung worker and the server would keep each other alive.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    with contextlib.suppress(Exception):
        from multiprocessing import forkserver

        server = forkserver._forkserver
        alive = getattr(server, "_forkserver_alive_fd", None)
        if alive is not None:
            os.close(alive)
            setattr(server, "_forkserver_alive_fd", None)  # noqa: B010 (private, maybe absent)


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
