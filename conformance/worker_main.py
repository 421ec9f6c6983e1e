"""The worker process's side of :mod:`conformance.worker`: load the adapter by its spec, then
answer the parent's requests — a case, or a speed case — until it says stop.

Every request is acknowledged ("started") before it runs, so that the parent can tell a worker
that died working on it from one that died idle. Every answer is sent as "done", or as "retire"
when the case left the CUDA context broken (a CUDA error is sticky: the process must go). The
suite's own failure on a request is answered as that request's failure, never by dying.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from conformance import watch


def serve(conn: Any, shared: Any, plan: Any, trace_path: str) -> None:
    """The worker's main loop (``plan``: a :class:`conformance.worker.Plan`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
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
        from conformance.calls import first_line

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
        answer = _answer(request, target, baseline)
        kind = "retire" if _cuda_broken(plan.device, answer) else "done"
        try:
            conn.send((kind, answer))
        except Exception as exc:  # an answer that does not pickle: the suite's failure
            conn.send((kind, _suite_failure(request, target, exc)))


def _load(plan: Any) -> tuple[Any, Any]:
    from conformance.checks import Target
    from impls.loader import load_adapter

    with watch.calling("loading of the adapter"):
        adapter = load_adapter(plan.spec)
        baseline = None
        if plan.baseline is not None:
            baseline = adapter if plan.baseline == plan.spec else load_adapter(plan.baseline)
    conventions = adapter.conventions if plan.conventions is None else plan.conventions
    return Target(adapter, plan.device, conventions, plan.reproduce), baseline


def _answer(request: Sequence[Any], target: Any, baseline: Any) -> Any:
    from conformance.worker import InProcess

    here = InProcess(target, baseline)
    try:
        if request[0] == "case":
            _, case, inputs = request
            return here.run_case(case, inputs)
        _, sc, options = request
        return here.timer(target.adapter, baseline, sc, **options)
    except Exception as exc:  # the suite's own failure on one request must not end the run
        return _suite_failure(request, target, exc)


def _suite_failure(request: Sequence[Any], target: Any, exc: Exception) -> Any:
    from conformance.calls import first_line
    from conformance.speed import failed_timing
    from conformance.worker import suite_error

    if request[0] == "case":
        return [suite_error(target, request[1], exc)]
    why = f"the suite could not time this case: {type(exc).__name__}: {first_line(exc)}"
    return failed_timing(request[1], target.device, why, request[2].get("reproduce", ""))


def _cuda_broken(device: str, answer: Any) -> bool:
    """Whether the request left a CUDA error behind (the context is then unusable for good)."""
    if device != "cuda":
        return False
    answers = answer if isinstance(answer, list) else [answer]
    if any("CUDA error" in (getattr(a, "message", "") or "") for a in answers):
        return True
    import torch

    try:
        with watch.calling("device check after the case"):
            torch.cuda.synchronize()
    except Exception:
        return True
    return False


def _die_with_parent() -> None:
    """Put this process in a process group of its own (so that the parent can kill whatever
    the adapter started along with it), and ask Linux to SIGKILL it when its parent dies (a run
    killed with SIGKILL cannot stop a hung worker itself).

    A forked worker's parent is the fork server, which exits when the run dies, but only once
    no process holds its keep-alive pipe; every forked child inherits that pipe's write end, so
    the worker closes its copy (a private attribute of ``multiprocessing.forkserver``, hence the
    guard): otherwise a hung worker and the server would keep each other alive.
    """
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
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
