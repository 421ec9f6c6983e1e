"""The pytest face of the engine: ``pytest conformance --adapter SPEC``.

Options (all under ``--adapter``'s group): ``--adapter SPEC`` (required to run anything),
``--norm``/``--dtype`` (repeatable filters), ``--quick``, ``--device``, ``--conformance-seed``,
``--convention declared|pytorch``. ``HYPOTHESIS_PROFILE=dev|ci`` picks the hypothesis profile of
the drawn-rows test. Every case of the catalogue becomes one test whose id is the
case id (``norm-dtype-shape-distribution-…``); a failure prints, per failed check, the
numpy-style comparison and the command that reproduces it.
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
