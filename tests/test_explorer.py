"""The shape and stride explorer: draws from the run seed within its budget, shrinks a failure
to a small failing case, and every failure it reports has an id that ``--case`` and ``normconf
replay`` take."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conformance.cases import parse_case_id
from conformance.checks import Target, run_case
from conformance.explorer import Budget, explore
from impls.loader import load_adapter

ROOT = Path(__file__).resolve().parent.parent
ZOO = Path(__file__).parent / "zoo" / "geometry_bugs.py"
SMALL = Budget(examples=6, elements=2**17, per_case=2**13, shrinks=16)
#: Enough draws that seed 0 meets a grad_output laid out with gaps (checked below).
SEARCH = Budget(examples=16, elements=2**18, per_case=2**13, shrinks=24)


def _runner(spec: str):  # type: ignore[no-untyped-def]
    adapter = load_adapter(spec)
    target = Target(adapter, "cpu", adapter.conventions, lambda case: "")
    return lambda case: run_case(target, case)


def test_the_search_is_a_function_of_the_run_seed_and_keeps_its_budget() -> None:
    run = _runner("torch")
    first = explore(run, "rms_norm", ["float32"], seed=3, budget=SMALL)
    again = explore(run, "rms_norm", ["float32"], seed=3, budget=SMALL)
    other = explore(run, "rms_norm", ["float32"], seed=4, budget=SMALL)
    ids = [c.case_id for c in first.drawn]
    assert ids == [c.case_id for c in again.drawn]
    assert ids != [c.case_id for c in other.drawn]
    assert len(first.drawn) <= SMALL.examples
    assert sum(c.elements for c in first.drawn) <= SMALL.elements
    assert all(c.elements <= SMALL.per_case for c in first.drawn)
    for case in first.drawn:
        assert parse_case_id(case.case_id) == case


def test_a_passing_search_records_every_drawn_case_as_explore_checks() -> None:
    search = explore(_runner("torch"), "rms_norm", ["float32"], seed=0, budget=SMALL)
    recorded = search.recorded()
    assert search.failing is None
    assert {c.kind for c in recorded} == {"explore"}
    summary = recorded[-1]
    assert summary.output == "search"
    assert summary.verdict == "pass"
    assert f"drew {len(search.drawn)} cases" in summary.message
    assert {c.case_id for c in recorded[:-1]} == {c.case_id for c in search.drawn}
    assert all(c.message.split(":")[0] in ("contract", "forward", "backward", "determinism")
               for c in recorded[:-1])  # fmt: skip


def test_a_failure_is_shrunk_and_only_the_smallest_failing_case_is_recorded() -> None:
    search = explore(
        _runner(f"{ZOO}:grad_strides_ignored"), "layer_norm", ["float32"], seed=0, budget=SEARCH
    )
    assert search.failing is not None
    assert search.first_failing is not None
    assert search.failing.elements <= search.first_failing.elements
    assert not search.failing.grad_layout.contiguous  # the class it is built for
    recorded = search.recorded()
    failing_ids = {c.case_id for c in recorded if c.verdict == "fail"}
    assert failing_ids == {search.failing.case_id}
    summary = recorded[-1]
    assert summary.verdict == "fail"
    assert search.failing.case_id in summary.message


def test_an_explored_failure_reruns_by_case_id_and_replays(tmp_path: Path) -> None:
    report = tmp_path / "run"
    base = [
        sys.executable,
        "-m",
        "conformance",
        "certify",
        "--adapter",
        f"{ZOO}:grad_strides_ignored",
    ]
    base += ["--device", "cpu", "--no-progress", "--norm", "layer_norm", "--dtype", "float32"]
    run = subprocess.run(
        [*base, "--report-dir", str(report)],  # the full battery's search: 24 draws
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    checks = json.loads((report / "report.json").read_text(encoding="utf-8"))["checks"]
    (summary,) = [c for c in checks if c["output"] == "search"]
    assert summary["verdict"] == "fail"
    failing = summary["case_id"]
    assert failing in summary["message"]
    again = subprocess.run(
        [*base, "--case", failing, "--report-dir", str(tmp_path / "again")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert again.returncode == 1, again.stdout + again.stderr
    replayed = subprocess.run(
        [sys.executable, "-m", "conformance", "replay", failing, "--dir", str(report),
         "--adapter", f"{ZOO}:grad_strides_ignored"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert replayed.returncode == 1, replayed.stdout + replayed.stderr
    assert "[backward grad_input] FAIL" in replayed.stdout


def test_the_pytest_plugin_runs_one_search_per_norm() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "conformance", "-p", "no:cacheprovider", "-q",
         "--adapter", f"{ZOO}:grad_strides_ignored", "--norm", "layer_norm", "--dtype",
         "float32", "-k", "explore"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    assert "test_explore[explore-layer_norm]" in run.stdout
    assert "smallest failing case: layer_norm-float32-" in run.stdout
