"""The pytest face of the engine: ``pytest conformance --adapter SPEC``.

Options (all under ``--adapter``'s group): ``--adapter SPEC`` (required to run anything),
``--norm``/``--dtype`` (repeatable filters), ``--quick``, ``--device``, ``--conformance-seed``,
``--convention declared|pytorch``. ``HYPOTHESIS_PROFILE=dev|ci`` picks the hypothesis profile of
the drawn-rows test. Every case of the catalogue becomes one test whose id is the
case id (``norm-dtype-shape-distribution-…``); a failure prints, per failed check, the
numpy-style comparison and the command that reproduces it.

``--speed`` adds the speed battery (:mod:`conformance.speed`): one test per timing, marked
``speed`` (``-m speed`` runs only them, ``-m "not speed"`` none), judged like ``normconf
certify --speed`` against ``--baseline SPEC`` (default ``torch``) and the thresholds of
``conformance/speed.toml``.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import settings

# Hypothesis profiles for the drawn-rows test; HYPOTHESIS_PROFILE picks one (default ``dev``).
# Each example certifies a whole case, so the counts are smaller than the suite's own tests'.
settings.register_profile("conformance-dev", max_examples=25, deadline=None)
settings.register_profile(
    "conformance-ci", max_examples=50, deadline=None, derandomize=True, print_blob=True
)
settings.load_profile(f"conformance-{os.environ.get('HYPOTHESIS_PROFILE', 'dev')}")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("normconf", "normconf conformance")
    group.addoption("--adapter", metavar="SPEC", help="adapter to certify")
    group.addoption("--norm", action="append", default=None, help="only this norm")
    group.addoption("--dtype", action="append", default=None, help="only this dtype")
    group.addoption("--quick", action="store_true", help="the quick battery")
    group.addoption("--device", default="auto", choices=("auto", "cpu", "cuda"))
    group.addoption("--conformance-seed", type=int, default=0, help="run seed")
    group.addoption("--convention", default="declared", choices=("declared", "pytorch"))
    group.addoption("--speed", action="store_true", help="add the speed battery")
    group.addoption("--baseline", default="torch", help="baseline adapter of the speed battery")
    group.addoption(
        "--adapter-timeout",
        type=_positive_seconds,
        default=None,
        metavar="S",
        help="seconds one call into the adapter may take in its worker process (default: as "
        "normconf certify's --timeout)",
    )
    group.addoption(
        "--in-process",
        action="store_true",
        help="run the adapter in the pytest process, not in a worker (for a debugger)",
    )


def _positive_seconds(text: str) -> float:
    from conformance.cli import _positive

    return _positive(text)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "speed: a timing of the speed battery (needs --speed)")


def _adapter(config: pytest.Config) -> Any:
    spec = config.getoption("--adapter")
    if not spec:
        return None
    cache = config.stash.get(_ADAPTER_KEY, None)
    if cache is None:
        from impls.loader import load_adapter, resolve_device

        try:
            adapter = load_adapter(spec)
            device = resolve_device(adapter, config.getoption("--device"))
        except Exception as exc:
            raise pytest.UsageError(f"--adapter {spec}: {exc}") from None
        cache = (adapter, device)
        config.stash[_ADAPTER_KEY] = cache
    return cache


_ADAPTER_KEY = pytest.StashKey[Any]()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "conformance_speed_case" in metafunc.fixturenames:
        _speed_cases(metafunc)
    if "conformance_explore_norm" in metafunc.fixturenames:
        _explore_norms(metafunc)
    if "conformance_case" not in metafunc.fixturenames:
        return
    loaded = _adapter(metafunc.config)
    if loaded is None:
        metafunc.parametrize(
            "conformance_case",
            [
                pytest.param(
                    None,
                    marks=pytest.mark.skip(
                        reason="no --adapter given: pytest conformance --adapter SPEC"
                    ),
                )
            ],
            ids=["no-adapter"],
        )
        return
    from conformance.engine import select_cases

    adapter, _ = loaded
    opt = metafunc.config.getoption
    cases = select_cases(
        norms=opt("--norm"),
        dtypes=opt("--dtype"),
        quick=opt("--quick"),
        seed=opt("--conformance-seed"),
    )
    cases = [c for c in cases if c.norm in adapter.norms()]
    metafunc.parametrize("conformance_case", cases, ids=[c.case_id for c in cases])


@pytest.fixture(scope="session")
def conformance_target(request: pytest.FixtureRequest) -> Any:
    from conformance.checks import Target
    from conformance.messages import reproduction_command

    adapter, device = _adapter(request.config)
    seed = request.config.getoption("--conformance-seed")
    pytorch = request.config.getoption("--convention") == "pytorch"
    extra = ["--device", device] + (["--convention", "pytorch"] if pytorch else [])
    return Target(
        adapter,
        device,
        {} if pytorch else adapter.conventions,
        lambda case: reproduction_command(case.case_id, adapter.spec, seed, extra),
    )


@pytest.fixture(scope="session")
def conformance_runner(request: pytest.FixtureRequest, conformance_target: Any) -> Any:
    """What runs the cases: a worker process that a crash or hang of the adapter fails one test
    in, replaced after it (``--in-process``: this process)."""
    from conformance.worker import DEFAULT_TIMEOUT_S, open_runner
    from impls.loader import load_adapter

    opt = request.config.getoption
    timeout = None if opt("--in-process") else opt("--adapter-timeout") or DEFAULT_TIMEOUT_S
    baseline = None
    if opt("--speed") and opt("--baseline").strip().lower() != "none":
        spec = opt("--baseline")
        baseline = conformance_target.adapter if spec == conformance_target.adapter.spec else None
        baseline = baseline or load_adapter(spec)
    extra = ["--convention", "pytorch"] if opt("--convention") == "pytorch" else []
    seed = opt("--conformance-seed")
    with open_runner(
        conformance_target, timeout=timeout, seed=seed, extra=extra, baseline=baseline
    ) as runner:
        yield runner


def _explore_norms(metafunc: pytest.Metafunc) -> None:
    """One explorer search per norm the adapter implements (and ``--norm`` selects)."""
    loaded = _adapter(metafunc.config)
    if loaded is None:
        skipped = pytest.param(None, marks=pytest.mark.skip(reason="no --adapter given"))
        metafunc.parametrize("conformance_explore_norm", [skipped], ids=["no-adapter"])
        return
    adapter, _ = loaded
    wanted = metafunc.config.getoption("--norm")
    norms = [n for n in adapter.norms() if not wanted or n in wanted]
    metafunc.parametrize("conformance_explore_norm", norms, ids=[f"explore-{n}" for n in norms])


def _speed_cases(metafunc: pytest.Metafunc) -> None:
    loaded = _adapter(metafunc.config)
    opt = metafunc.config.getoption
    if loaded is None or not opt("--speed"):
        why = "the speed battery needs --adapter SPEC and --speed"
        skipped = pytest.param(None, marks=pytest.mark.skip(reason=why))
        metafunc.parametrize("conformance_speed_case", [skipped], ids=["no-speed"])
        return
    from conformance.speed import speed_cases

    adapter, device = loaded
    battery = speed_cases(
        adapter, device, norms=opt("--norm"), dtypes=opt("--dtype"), quick=opt("--quick")
    )
    metafunc.parametrize("conformance_speed_case", battery, ids=[c.speed_id for c in battery])


@pytest.fixture(scope="session")
def conformance_speed(request: pytest.FixtureRequest) -> Any:
    """What every speed test shares: thresholds, the baseline, the ceiling measured once, and
    the accuracy verdict of each norm and dtype (from the quick battery, run once each)."""
    from conformance.speed import load_thresholds
    from conformance.timing import measure_ceiling
    from impls.loader import load_adapter

    adapter, device = _adapter(request.config)
    spec = request.config.getoption("--baseline")
    baseline = None
    if spec.strip().lower() != "none":
        baseline = adapter if spec == adapter.spec else load_adapter(spec)
    return {
        "thresholds": load_thresholds(device),
        "baseline": baseline,
        "ceiling": measure_ceiling(device),
        "accuracy": {},
    }
