"""Poisoned provided buffers: adapters that declare ``normconf_out`` are called once more with
``out=`` buffers filled with NaN, and must return those buffers with every element written.

What is tested: the declaration's validation; an adapter that skips the last row of ``out=``
fails a ``contract`` check naming how many elements it left unwritten; one that writes a new
tensor instead fails naming that; correct writers — plain, fused with an ``(output,
residual_out)`` tuple, fused with an in-place residual — pass every check, their buffers graded
as outputs; an adapter that declares nothing is never handed ``out=``. The Triton adapter's
``out=`` is tested with its kernels, in ``test_impls_triton.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_zoo import ZOO, _zoo_module, failures, listing, run

from conformance.cases import parse_case_id
from conformance.engine import certify, select_cases
from conformance.results import CheckResult, RunRecord
from impls.adapter import AdapterError, from_object

UNWRITTEN = "left unwritten (still the NaN the suite wrote there)"
NEW_TENSOR = "returned a new tensor instead of writing into out="

exact_layer_norm = _zoo_module("unwritten_out").exact_layer_norm


def _certify(
    candidate: Any, norms: Sequence[str], dtypes: Sequence[str], **select: Any
) -> RunRecord:
    cases = select_cases(norms=norms, dtypes=dtypes, quick=True, boundary=False, **select)
    assert cases, f"no cases for {norms} x {dtypes}"
    adapter = from_object(candidate, getattr(candidate, "normconf_name", "candidate"))
    return certify(adapter, cases, device="cpu")


def _provided(record: RunRecord) -> list[CheckResult]:
    """The checks of the provided-buffer call."""
    return [c for c in record.checks if c.output == "out" or c.output.endswith(" (out=)")]


def _assert_every_check_passes(record: RunRecord, outputs: set[str]) -> None:
    __tracebackhide__ = True
    assert record.verdict == "pass", listing(failures(record))
    provided = _provided(record)
    assert {c.output for c in provided} == {"out", *outputs}, listing(provided)
    assert all(c.verdict == "pass" for c in provided), listing(provided)
    contract = [c for c in provided if c.output == "out"]
    assert all(c.message.startswith("wrote every element of out=") for c in contract)


# -- the declaration -------------------------------------------------------------------------------


def _layer_norm(input: Any, normalized_shape: Any, *args: Any, out: Any = None) -> Any:
    return input


@pytest.mark.parametrize(
    ("declared", "fragment"),
    [
        ("layer_norm", "normconf_out must be a bool or a tuple of norm names, got 'layer_norm'"),
        ({"layer_norm": True}, "normconf_out must be a bool or a tuple of norm names"),
        ((1,), "normconf_out must be a bool or a tuple of norm names, got (1,)"),
        (("rms_norm",), "normconf_out names 'rms_norm', which the adapter does not implement"),
        (("layer_norm", "layernorm"), "normconf_out names 'layernorm'"),
    ],
    ids=["str", "dict", "int", "unimplemented", "typo"],
)
def test_a_bad_declaration_is_named(declared: object, fragment: str) -> None:
    candidate = SimpleNamespace(layer_norm=_layer_norm, normconf_out=declared)
    with pytest.raises(AdapterError) as info:
        from_object(candidate, "candidate")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("adapter 'candidate': normconf_out")
    assert fragment in message


@pytest.mark.parametrize(
    ("declared", "norms"),
    [
        (None, ()),
        (False, ()),
        (True, ("layer_norm", "rms_norm")),
        (["rms_norm", "layer_norm"], ("layer_norm", "rms_norm")),
        (("rms_norm",), ("rms_norm",)),
    ],
    ids=["absent", "false", "true", "list", "tuple"],
)
def test_a_declaration_names_implemented_norms_in_order(
    declared: object, norms: tuple[str, ...]
) -> None:
    candidate = SimpleNamespace(layer_norm=_layer_norm, rms_norm=_layer_norm)
    if declared is not None:
        candidate.normconf_out = declared
    adapter = from_object(candidate, "candidate")
    assert adapter.out == norms
    assert adapter.describe()["out"] == list(norms)


# -- adapters that misuse out= ---------------------------------------------------------------------


def test_rows_left_unwritten_fail_with_their_count() -> None:
    """The zoo's LayerNorm skips the last row of out=: the contract check counts the row's
    elements, the buffer's forward check fails with that for its diagnosis, and the call
    without out= passes."""
    record = run(str(ZOO / "unwritten_out.py"), ["layer_norm"], ["float32"], ["normal", "uniform"])
    failed = failures(record)
    assert record.verdict == "fail"
    assert {(c.kind, c.output) for c in failed} == {
        ("contract", "out"),
        ("forward", "output (out=)"),
    }, listing(failed)
    contract = [c for c in failed if c.kind == "contract"]
    assert len(contract) == len({c.case_id for c in record.checks})
    for check in contract:
        case = parse_case_id(check.case_id)
        row = math.prod(case.shape[len(case.shape) - case.norm_dims :])
        expected = f"{row} of {math.prod(case.shape)} elements of out= {UNWRITTEN}"
        assert check.message == expected, listing([check])
    graded = [c for c in failed if c.kind == "forward"]
    assert all(c.diagnosis and UNWRITTEN in c.diagnosis for c in graded), listing(graded)


def _fresh(
    input: Any,
    normalized_shape: Any,
    weight: Any = None,
    bias: Any = None,
    eps: float = 1e-5,
    *,
    out: Any = None,
) -> Any:
    """Takes out= and ignores it, as a wrapper that drops the keyword does."""
    return exact_layer_norm(input, normalized_shape, weight, bias, eps)


def test_a_new_tensor_in_place_of_the_buffer_fails_the_contract() -> None:
    candidate = SimpleNamespace(
        layer_norm=_fresh, normconf_out=True, normconf_backward=False, normconf_name="fresh"
    )
    record = _certify(candidate, ["layer_norm"], ["float32"], distributions=["normal"])
    contract = [c for c in _provided(record) if c.output == "out"]
    assert contract
    for check in contract:
        assert check.verdict == "fail"
        assert f"output: {NEW_TENSOR}" in check.message, check.message
        size = math.prod(check.shape)
        assert f"{size} of {size} elements of out= {UNWRITTEN}" in check.message, check.message
    main = [c for c in record.checks if (c.kind, c.output) == ("forward", "output")]
    assert all(c.verdict == "pass" for c in main), listing(main)


def test_a_declared_function_without_out_fails_with_what_it_raised() -> None:
    candidate = SimpleNamespace(
        layer_norm=exact_layer_norm, normconf_out=True, normconf_backward=False
    )
    record = _certify(candidate, ["layer_norm"], ["float32"], distributions=["normal"])
    provided = _provided(record)
    assert provided
    for check in provided:
        assert (check.output, check.verdict) == ("out", "fail"), listing([check])
        assert check.message.startswith("with out=: raised TypeError"), check.message
        assert "'out'" in check.message


# -- adapters that write out= ----------------------------------------------------------------------


def _writer(
    input: Any,
    normalized_shape: Any,
    weight: Any = None,
    bias: Any = None,
    eps: float = 1e-5,
    *,
    out: Any = None,
) -> Any:
    result = exact_layer_norm(input, normalized_shape, weight, bias, eps)
    return result if out is None else out.copy_(result)


def test_a_buffer_written_whole_passes_every_check() -> None:
    """Every quick distribution, NaN and Inf inputs included: an element NaN by right (the
    reference's NaN, a group holding ±inf) is not taken for one left unwritten."""
    candidate = SimpleNamespace(
        layer_norm=_writer, normconf_out=("layer_norm",), normconf_backward=False
    )
    record = _certify(candidate, ["layer_norm"], ["float32", "float16"])
    assert "nonfinite" in {c.kind for c in record.checks}
    _assert_every_check_passes(record, {"output (out=)"})


def _fused_add_layer_norm(
    input: Any,
    residual: Any,
    normalized_shape: Any,
    weight: Any = None,
    bias: Any = None,
    eps: float = 1e-5,
    *,
    alpha: float = 1.0,
    out: tuple[Any, Any] | None = None,
) -> tuple[Any, Any]:
    """z rounded into the dtype, then normalised exactly: ``add_rounding="dtype"``."""
    z = (input.double() + alpha * residual.double()).to(input.dtype)
    y = exact_layer_norm(z, normalized_shape, weight, bias, eps)
    if out is None:
        return y, z
    return out[0].copy_(y), out[1].copy_(z)


def test_a_fused_add_norm_writes_the_tuple_it_is_given() -> None:
    candidate = SimpleNamespace(
        fused_add_layer_norm=_fused_add_layer_norm,
        normconf_out=True,
        normconf_backward=False,
        normconf_dtypes=("float32", "bfloat16"),
    )
    record = _certify(candidate, ["fused_add_layer_norm"], ["float32", "bfloat16"])
    _assert_every_check_passes(record, {"output (out=)", "residual_out (out=)"})
    message = next(c.message for c in _provided(record) if c.output == "out")
    assert message == "wrote every element of out=[0] (output), out=[1] (residual_out)"


def test_an_in_place_residual_takes_the_output_buffer_alone() -> None:
    """``normconf_inplace``: the residual argument is the new residual's buffer, so ``out=``
    is the output's tensor alone."""
    in_place = _zoo_module("inplace_residual").fused_add_rms_norm

    def fused_add_rms_norm(*args: Any, out: torch.Tensor | None = None, **kw: Any) -> Any:
        y, z = in_place(*args, **kw)
        return (y, z) if out is None else (out.copy_(y), z)

    candidate = SimpleNamespace(
        fused_add_rms_norm=fused_add_rms_norm,
        normconf_out=True,
        normconf_inplace=True,
        normconf_backward=False,
        normconf_dtypes=("float32",),
    )
    record = _certify(candidate, ["fused_add_rms_norm"], ["float32"])
    _assert_every_check_passes(record, {"output (out=)"})


def test_an_adapter_that_declares_nothing_is_never_given_out() -> None:
    given: list[object] = []

    def layer_norm(*args: Any, **kw: Any) -> Any:
        given.append(kw.get("out"))
        return exact_layer_norm(*args, **kw)

    candidate = SimpleNamespace(layer_norm=layer_norm, normconf_backward=False)
    record = _certify(candidate, ["layer_norm"], ["float32"], distributions=["normal"])
    assert record.verdict == "pass", listing(failures(record))
    assert given
    assert given == [None] * len(given)
    assert not _provided(record)
