"""One test per case of the battery: every check of the case must pass."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conformance import strategies
from conformance.cases import Case, parse_case_id
from conformance.inputs import build_inputs
from conformance.messages import failure_message


def _assert_passed(results: list[Any]) -> None:
    __tracebackhide__ = True
    if all(r.verdict == "skip" for r in results):
        pytest.skip(results[0].message)
    failed = [r for r in results if r.verdict == "fail"]
    if failed:
        text = "\n\n".join(f"[{r.kind} {r.output}]\n{failure_message(r)}" for r in failed)
        pytest.fail(f"{len(failed)} of {len(results)} checks failed\n\n{text}", pytrace=False)


def test_case(conformance_runner: Any, conformance_case: Any) -> None:
    __tracebackhide__ = True
    _assert_passed(conformance_runner.run_case(conformance_case))


def _drawn_case(target: Any, data: Any) -> tuple[Case, Any]:
    adapter = target.adapter
    norms = [n for n in ("layer_norm", "rms_norm") if n in adapter.norms()]
    if not norms:
        pytest.skip(f"{adapter.name} implements neither layer_norm nor rms_norm")
    norm = data.draw(st.sampled_from(norms), label="norm")
    supported = [d for d in adapter.dtypes[norm] if adapter.supports(norm, d, target.device)]
    dtype = data.draw(strategies.dtypes(only=supported), label="dtype")
    shape, dims = data.draw(strategies.layer_norm_shapes(max_elements=2048), label="shape")
    n = math.prod(shape[len(shape) - dims :])
    values = data.draw(strategies.rows(dtype, n, num_rows=math.prod(shape) // n), label="rows")
    # Weight, bias and upstream gradients from a catalogue-style case; the rows replace x.
    options = f"-nd{dims}" if dims != 1 else ""
    case = parse_case_id(f"{norm}-{dtype}-{'x'.join(map(str, shape))}-normal{options}-s0")
    inputs = build_inputs(case)
    template = inputs.arrays["input"]
    assert template is not None
    inputs.arrays["input"] = values.reshape(shape).astype(template.dtype)
    return case, inputs


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_layer_norms_on_drawn_rows(
    conformance_target: Any, conformance_runner: Any, data: Any
) -> None:
    """LayerNorm and RMSNorm on rows hypothesis draws (size, mean, spread, dtype); a failure
    shrinks to a minimal matrix of rows, printed with the failing checks."""
    __tracebackhide__ = True
    case, inputs = _drawn_case(conformance_target, data)
    results = conformance_runner.run_case(case, inputs)
    _assert_passed([replace(r, reproduce=_hypothesis_reproduce(case)) for r in results])


def _hypothesis_reproduce(case: Case) -> str:
    return "rerun this test: hypothesis replays the falsifying example printed with it"


def test_explore(
    conformance_target: Any, conformance_runner: Any, conformance_explore_norm: str, request: Any
) -> None:
    """The shape and stride explorer on one norm (:mod:`conformance.explorer`): hypothesis draws
    shapes, strides, offsets and gradient layouts from the run seed and shrinks a failure to the
    smallest failing case, whose id ``--case`` reruns."""
    __tracebackhide__ = True
    from conformance.explorer import FULL, QUICK, dtypes_for, explore

    target, norm = conformance_target, conformance_explore_norm
    adapter = target.adapter
    dtypes = dtypes_for(adapter, norm, target.device, request.config.getoption("--dtype"))
    if not dtypes:
        pytest.skip(f"{adapter.name} supports {norm} in no selected dtype on {target.device}")
    seed = request.config.getoption("--conformance-seed")
    budget = QUICK if request.config.getoption("--quick") else FULL
    search = explore(conformance_runner.run_case, norm, dtypes, seed=seed, budget=budget)
    _assert_passed(search.recorded())


@pytest.mark.speed
def test_speed(
    conformance_target: Any,
    conformance_runner: Any,
    conformance_speed: Any,
    conformance_speed_case: Any,
) -> None:
    """One timing of the speed battery: the adapter's bandwidth against the ceiling and the
    baseline, its outputs checked again after timing, and no pass where accuracy failed."""
    __tracebackhide__ = True
    from conformance.engine import select_cases
    from conformance.speed import run_speed

    target, shared, sc = conformance_target, conformance_speed, conformance_speed_case
    key = (sc.norm, sc.dtype)
    if key not in shared["accuracy"]:
        cases = select_cases(norms=[sc.norm], dtypes=[sc.dtype], quick=True)
        shared["accuracy"][key] = any(
            r.verdict == "fail" for case in cases for r in conformance_runner.run_case(case)
        )
    failed = {key} if shared["accuracy"][key] else set()
    (result,) = run_speed(
        target.adapter,
        shared["baseline"],
        [sc],
        device=target.device,
        conventions=target.conventions,
        thresholds=shared["thresholds"],
        failed_accuracy=failed,
        reproduce=lambda _sc: "",
        ceiling=shared["ceiling"],
        timer=conformance_runner.timer,
    )
    if result.verdict == "fail":
        pytest.fail(f"{sc.speed_id}: {result.message}", pytrace=False)
