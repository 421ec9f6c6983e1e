"""One test per case of the battery: every check of the case must pass."""

from __future__ import annotations

from typing import Any

import pytest

from conformance.checks import run_case
from conformance.messages import failure_message


def test_case(conformance_target: Any, conformance_case: Any) -> None:
    __tracebackhide__ = True
    results = run_case(conformance_target, conformance_case)
    if all(r.verdict == "skip" for r in results):
        pytest.skip(results[0].message)
    failed = [r for r in results if r.verdict == "fail"]
    if failed:
        text = "\n\n".join(f"[{r.kind} {r.output}]\n{failure_message(r)}" for r in failed)
        pytest.fail(f"{len(failed)} of {len(results)} checks failed\n\n{text}", pytrace=False)
