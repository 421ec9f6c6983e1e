"""Cases for the forward tests against the exact oracle, and the checks of one call.

A ``Case`` is one call of a forward function: its inputs as float64 arrays of exact values of the
input dtype, the conventions, and a copy-pasteable description for failure messages. The checks
compare a result with the oracle's correctly rounded values by equality: no tolerance at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from hypothesis import example, settings
from oracles import as_backend, assert_matches_oracle, layer_norm, numpy_dtype, torch_dtype

import references as R

BACKENDS = ["torch", "numpy"]
SIXTEEN_BIT = ("float16", "bfloat16")
#: eps=None in rms_norm is the epsilon of the opmath type (float32 for 16-bit inputs).
OPMATH_EPS = {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-23, "bfloat16": 2.0**-23}
SLOW = settings(deadline=None)  # the oracle is exact rational arithmetic: no per-example deadline


@dataclass
class Case:
    """One call of a forward function: inputs as float64 arrays of exact ``fmt`` values."""

    fmt: str
    x: np.ndarray
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    eps: float | None = 1e-5
    variance: str = "biased"
    eps_placement: str = "inside"
    weight_offset: float = 0.0
    out_fmt: str | None = None
    out_spelling: str = "str"  # how out_dtype is passed: "str", "torch" or "numpy"
    extra: dict = field(default_factory=dict)  # norm-specific arguments
    label: str = ""

    @property
    def result_fmt(self) -> str:
        return self.out_fmt or self.fmt

    @property
    def stats_fmt(self) -> str:
        return "float32" if self.fmt in SIXTEEN_BIT else self.fmt

    def eps_value(self) -> float:
        return OPMATH_EPS[self.fmt] if self.eps is None else self.eps

    def out_dtype(self):
        if self.out_fmt is None or self.out_spelling == "str":
            return self.out_fmt
        if self.out_spelling == "torch":
            return torch_dtype(self.out_fmt)
        return numpy_dtype(self.out_fmt)

    def keywords(self) -> dict:
        """The convention keywords shared by every norm."""
        return {
            "variance": self.variance,
            "eps_placement": self.eps_placement,
            "weight_offset": self.weight_offset,
            "out_dtype": self.out_dtype(),
        }

    def oracle_conventions(self) -> dict:
        return {
            "variance": self.variance,
            "eps_placement": self.eps_placement,
            "weight_offset": self.weight_offset,
            "fmt": self.result_fmt,
            "stats_fmt": self.stats_fmt,
        }

    def describe(self) -> str:
        """A copy-pasteable reproduction of the inputs."""
        arrays = {"x": self.x, "weight": self.weight, "bias": self.bias}
        arrays |= {k: v for k, v in self.extra.items() if isinstance(v, np.ndarray)}
        lines = [
            f"case {self.label or '(drawn)'}: dtype={self.fmt} eps={self.eps!r} "
            f"variance={self.variance!r} eps_placement={self.eps_placement!r} "
            f"weight_offset={self.weight_offset!r} out_dtype={self.out_fmt!r}"
        ]
        lines += [f"  {k}={v!r}" for k, v in self.extra.items() if not isinstance(v, np.ndarray)]
        lines += [
            f"  {k} = np.array({v.tolist()!r}).reshape({v.shape})"
            for k, v in arrays.items()
            if v is not None
        ]
        return "\n".join(lines)


def arr(values, shape=None) -> np.ndarray:
    a = np.array(values, dtype=np.float64)
    return a if shape is None else a.reshape(shape)


def with_examples(cases, **fixed):
    """Decorate a hypothesis test with ``@example(case=c, **fixed)`` for each case."""

    def decorate(test):
        for c in reversed(cases):
            test = example(case=c, **fixed)(test)
        return test

    return decorate


def with_shape(case: Case, **extra) -> Case:
    return replace(case, extra={"normalized_shape": case.x.shape[-1:], **extra})


# ---------------------------------------------------------------------------------------------
# Checking one call


def check_output(actual, expected, case: Case, backend: str, what: str = "output") -> None:
    __tracebackhide__ = True
    assert_matches_oracle(
        actual,
        expected,
        fmt=case.result_fmt,
        backend=backend,
        what=what,
        context=case.describe(),
    )


def check_stats(result, expected, case: Case, backend: str, *, centered: bool) -> None:
    """Mean and rstd, rounded into the stats dtype, of the groups where both are finite numbers.

    Groups with NaN/Inf inputs have no defined statistics; groups with an undefined variance
    (n = 1, unbiased) or a zero denominator are checked by ``test_stats_of_degenerate_groups``.
    """
    __tracebackhide__ = True
    assert hasattr(result, "rstd"), f"return_stats=True returned {type(result).__name__}"
    stats = [("rstd", result.rstd, expected.rstd)]
    if centered:
        stats.append(("mean", result.mean, expected.mean))
    else:
        assert result.mean is None, "RMS norms have no mean: NormOutput.mean must be None"
    mask = expected.finite & np.isfinite(expected.rstd)
    for name, got, want in stats:
        assert tuple(got.shape) == mask.shape, f"{name} shape {tuple(got.shape)} != {mask.shape}"
        got = got[torch.from_numpy(mask)] if backend == "torch" else np.asarray(got)[mask]
        assert_matches_oracle(
            got,
            want[mask],
            fmt=case.stats_fmt,
            backend=backend,
            what=name,
            context=case.describe(),
        )


# ---------------------------------------------------------------------------------------------
# Calling layer_norm / rms_norm and the oracle for the same case


def run_layer_norm(case: Case, backend: str, *, return_stats: bool, rms: bool = False):
    fn = R.rms_norm if rms else R.layer_norm
    args = [as_backend(case.x, case.fmt, backend), case.extra["normalized_shape"]]
    args.append(as_backend(case.weight, case.fmt, backend))
    if not rms:
        args.append(as_backend(case.bias, case.fmt, backend))
    return fn(*args, case.eps, **case.keywords(), return_stats=return_stats)


def expected_layer_norm(case: Case, *, rms: bool = False):
    return layer_norm(
        case.x,
        case.extra["normalized_shape"],
        case.weight,
        None if rms else case.bias,
        case.eps_value(),
        center=not rms,
        **case.oracle_conventions(),
    )
