"""The crash zoo: adapters that crash, hang, return the wrong thing or cheat, each certified by
``normconf certify`` in its worker process. Every one must get the right verdict and reason on
exactly the cases it breaks, while the run completes: every case reported, the good cases
passing after a crash, the streamed record finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from conformance.checks import Target
from conformance.cli import main
from conformance.engine import select_cases
from conformance.speed import Thresholds, run_speed, speed_cases
from conformance.stream import read_stream
from conformance.worker import Isolated, Plan, open_runner
from impls.loader import load_adapter

ROOT = Path(__file__).resolve().parent.parent
ZOO = Path(__file__).parent / "zoo"
HANG_TIMEOUT_S = 2  # the endless loop's limit: far above a LayerNorm call on these shapes


def _layer_norm_cases(dtype: str, *distributions: str) -> list[str]:
    cases = select_cases(
        norms=["layer_norm"],
        dtypes=[dtype],
        quick=True,
        distributions=list(distributions),
        boundary=False,  # the value battery: PyTorch (the good path) fails a boundary case
    )
    return [c.case_id for c in cases]


GOOD = _layer_norm_cases("float32", "normal", "uniform")


def _interleaved(bad: list[str]) -> list[str]:
    """Bad and good cases alternating, a bad one first: a good case after each crash."""
    return [case for pair in zip(bad, GOOD, strict=False) for case in pair]


@dataclass(frozen=True)
class Faulty:
    """A zoo adapter, the cases it is run on, which of them it breaks, and how."""

    name: str  # a file of tests/zoo, or crashes:ATTRIBUTE
    cases: tuple[str, ...]
    broken: tuple[str, ...]  # the case ids that must fail
    kind: str  # the kind of the check that must fail with the reason
    reason: str  # words the failed check's message must hold
    trace: str | None = None  # a function the diagnosis's stack must name
    options: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.name


def _faulty(name: str, bad: list[str], kind: str, reason: str, **more: Any) -> Faulty:
    cases = _interleaved(bad)
    return Faulty(name, tuple(cases), tuple(bad), kind, reason, **more)


NEAR_EPS = _layer_norm_cases("float32", "near_eps")
ZOO_RUNS = (
    _faulty(
        "crashes:segfault",
        _layer_norm_cases("float16", "normal", "uniform"),
        "contract",
        "crashed with SIGSEGV (Segmentation fault) in the forward call",
        trace="_read_null",
    ),
    _faulty(
        "crashes:aborts",
        _layer_norm_cases("float16", "normal", "uniform"),
        "contract",
        "crashed with SIGABRT",
    ),
    _faulty(
        "crashes:endless_loop",
        _layer_norm_cases("bfloat16", "normal", "uniform"),
        "contract",
        f"no answer in {HANG_TIMEOUT_S} s from the forward call",
        trace="_spin",
        options=("--timeout", str(HANG_TIMEOUT_S)),
    ),
    _faulty(
        "crashes:exits",
        _layer_norm_cases("float16", "normal", "uniform"),
        "contract",
        "raised SystemExit: 3",
    ),
    _faulty(
        "crashes:quits",
        _layer_norm_cases("float16", "normal", "uniform"),
        "contract",
        "the worker process exited with status 3 in the forward call",
    ),
    Faulty(
        "tensor_subclass",
        tuple(GOOD),
        tuple(GOOD),
        "contract",
        ".AlwaysEqual, a torch.Tensor subclass",
    ),
    _faulty(
        "wrong_dtype",
        _layer_norm_cases("float16", "normal", "uniform"),
        "contract",
        "output: dtype torch.float32, expected torch.float16",
    ),
    Faulty(
        "numpy_output",
        tuple(GOOD),
        tuple(GOOD),
        "contract",
        "output: returned a numpy.ndarray, not a torch.Tensor",
    ),
    Faulty(
        "input_mutation",
        tuple(GOOD),
        tuple(GOOD),
        "contract",
        "changed its argument 'input' in place",
    ),
    Faulty(  # the near-ε case has the shape of the first normal case, which it gets back
        "result_cache",
        (GOOD[0], *NEAR_EPS),
        tuple(NEAR_EPS),
        "forward",
        "output: fail",
    ),
    Faulty(
        "nondeterministic",
        tuple(GOOD),
        tuple(GOOD),
        "determinism",
        "the same inputs twice gave different bits in output",
    ),
    Faulty(
        "raises",
        tuple(GOOD),
        tuple(GOOD),
        "contract",
        "raised RuntimeError: too many resources requested for launch",
    ),
)


def _spec(name: str) -> str:
    file, _, attribute = name.partition(":")
    return str(ZOO / f"{file}.py") + (f":{attribute}" if attribute else "")


def _certify(faulty: Faulty, directory: Path) -> int:
    argv = ["certify", "--adapter", _spec(faulty.name), "--device", "cpu"]
    argv += ["--no-progress", "--report-dir", str(directory), *faulty.options]
    for case in faulty.cases:
        argv += ["--case", case]
    return main(argv)


@pytest.mark.parametrize("faulty", ZOO_RUNS, ids=str)
def test_faulty_adapter_fails_where_it_breaks_and_the_run_completes(
    faulty: Faulty, tmp_path: Path
) -> None:
    assert _certify(faulty, tmp_path / "run") == 1
    stream = read_stream(tmp_path / "run")
    assert stream.finished, "the streamed record has no end line"
    assert list(stream.cases) == list(faulty.cases), "a case is missing from the record"
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["verdict"] == "fail"
    for case_id, checks in stream.cases.items():
        failed = [c for c in checks if c.verdict == "fail"]
        if case_id not in faulty.broken:
            assert not failed, f"{case_id} (not broken) failed: {[c.message for c in failed]}"
            continue
        reasons = [c for c in failed if c.kind == faulty.kind and faulty.reason in c.message]
        assert reasons, f"{case_id}: no {faulty.kind} failure saying {faulty.reason!r} in " + str(
            [(c.kind, c.message) for c in failed]
        )
        if faulty.trace is not None:
            assert faulty.trace in (reasons[0].diagnosis or ""), reasons[0].diagnosis
        assert (tmp_path / "run" / "inputs" / f"{case_id}.npz").exists(), "inputs not saved"


def test_a_crashing_case_replays_in_a_worker_of_its_own(tmp_path: Path) -> None:
    segfault = ZOO_RUNS[0]
    crashing = replace(segfault, cases=segfault.broken[:1])
    assert _certify(crashing, tmp_path / "run") == 1
    replay = ["replay", crashing.cases[0], "--dir", str(tmp_path / "run")]
    assert main(replay) == 2, "replayed adapter code the user did not name"
    assert main([*replay, "--adapter", _spec(crashing.name)]) == 1  # the crash, reported


def test_a_hang_in_the_speed_battery_fails_that_timing_and_the_battery_goes_on() -> None:
    adapter = load_adapter(_spec("crashes:endless_loop"))
    battery = [
        sc
        for sc in speed_cases(adapter, "cpu", norms=["layer_norm"], quick=True)
        if sc.direction == "forward" and sc.dtype in ("bfloat16", "float32")
    ]
    lenient = Thresholds(
        min_fraction_forward=0.0, min_fraction_backward=0.0, min_ratio=0.0, fraction_min_row=0
    )
    target = Target(adapter, "cpu", adapter.conventions, lambda case: "")
    with open_runner(target, timeout=HANG_TIMEOUT_S) as runner:
        results = run_speed(
            adapter,
            None,
            battery,
            device="cpu",
            conventions=adapter.conventions,
            thresholds=lenient,
            failed_accuracy=set(),
            reproduce=lambda sc: "",
            ceiling=None,
            timer=runner.timer,
        )
    assert {r.dtype for r in results} == {"bfloat16", "float32"}
    for result in results:
        if result.dtype == "bfloat16":
            assert result.verdict == "fail"
            assert f"no answer in {HANG_TIMEOUT_S} s from the timed forward" in result.message
            assert "_spin" in result.message
        else:
            assert result.verdict == "pass", result.message
            assert result.gbps is not None
            assert result.gbps > 0


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (its workers, and the fork server that forks them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _hanging_run(tmp_path: Path) -> tuple[subprocess.Popen[bytes], set[int]]:
    """``normconf certify`` on the endless loop, stuck in a bfloat16 case, and the processes it
    started."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "conformance", "certify", "--adapter"]
    argv += [_spec("crashes:endless_loop"), "--device", "cpu", "--no-progress", "--timeout", "600"]
    argv += ["--report-dir", str(tmp_path / "run"), "--case", GOOD[0]]
    argv += ["--case", _layer_norm_cases("bfloat16", "normal")[0]]
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        results = tmp_path / "run" / "results.jsonl"
        if results.exists() and results.read_text().count('"case_id"') >= 1:
            time.sleep(1)  # into the hanging case
            return process, _descendants(process.pid)
        time.sleep(0.2)
    process.kill()
    raise AssertionError("the run never reached its hanging case")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_parent_killed_with_sigkill_takes_its_hung_worker_with_it(tmp_path: Path) -> None:
    process, started = _hanging_run(tmp_path)
    assert started, "the run started no worker"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    deadline = time.monotonic() + 10
    while any(map(_alive, started)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, started)), "a worker outlived its killed parent"
    assert read_stream(tmp_path / "run").cases, "the finished case is lost"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_stops_a_hung_run_at_once_and_keeps_what_finished(tmp_path: Path) -> None:
    process, started = _hanging_run(tmp_path)
    interrupted = time.monotonic()
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 130
    # The parent kills the busy worker instead of waiting for it; a few seconds of slack for a
    # loaded machine, far below the 600 s the hung call would take.
    assert time.monotonic() - interrupted < 4, "Ctrl-C waited for the hung worker"
    deadline = time.monotonic() + 10
    while any(map(_alive, started)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, started)), "a worker outlived the interrupted run"
    assert process.stderr is not None
    assert b"normconf: interrupted" in process.stderr.read()
    assert list(read_stream(tmp_path / "run").cases) == [GOOD[0]]


def test_a_worker_that_died_between_cases_is_replaced_before_the_next() -> None:
    """A worker can die idle (a native thread the adapter left behind faults after its call
    returned): the next case must run in a fresh worker, not be blamed for the death."""
    first, second = (select_cases(norms=["layer_norm"], dtypes=["float32"], quick=True))[:2]
    with Isolated(Plan("torch", "cpu", None), HANG_TIMEOUT_S) as worker:
        assert all(r.verdict == "pass" for r in worker.run_case(first))
        os.kill(worker.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(worker.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        results = worker.run_case(second)
        assert worker.restarts == 1
    *checks, death = results
    assert all(r.verdict == "pass" for r in checks), [r.message for r in checks]
    assert death.verdict == "fail"
    assert death.message == (
        "crashed with SIGKILL (Killed) outside any call into the adapter after the previous "
        "request had been answered; a fresh worker ran this case"
    )


def test_a_hang_outside_the_adapters_calls_is_bounded_by_the_request_limit() -> None:
    """Adapter code the suite does not call (here a finalizer of an object the adapter hung on
    its output) cannot hang the run: the whole request has a limit too."""
    cases = select_cases(norms=["layer_norm"], dtypes=["float32"], quick=True)[:1]
    plan = Plan(_spec("crashes:hangs_in_a_finalizer"), "cpu", None)
    with Isolated(plan, HANG_TIMEOUT_S, request_limit=3 * HANG_TIMEOUT_S) as worker:
        (result,) = worker.run_case(cases[0])
    assert result.verdict == "fail"
    assert result.message.startswith(
        f"no answer in {3 * HANG_TIMEOUT_S} s outside any call into the adapter"
    )
    assert "__del__" in (result.diagnosis or "")
