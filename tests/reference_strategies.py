"""Hypothesis strategies for the forward tests: dtypes, shapes, values, conventions, cases.

Values are finite values of the input dtype, of every magnitude (subnormals included) or small
integers; float16 values reach past 256 so that their squares overflow float16.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from hypothesis import strategies as st
from oracle_cases import Case, arr
from oracles import FMT_NAMES, round_fraction

#: Largest magnitude drawn per dtype: float16 reaches past 256 so that squares overflow float16.
MAX_ABS = {"float64": 1e6, "float32": 1e6, "float16": 1000.0, "bfloat16": 1e6}
FLOAT_WIDTH = {"float64": 64, "float32": 32, "float16": 16, "bfloat16": 32}


def element_values(fmt: str, max_abs: float | None = None) -> st.SearchStrategy[float]:
    """Finite values of ``fmt`` (floats of every magnitude, subnormals included, or small ints)."""
    limit = MAX_ABS[fmt] if max_abs is None else max_abs
    floats = st.floats(-limit, limit, width=FLOAT_WIDTH[fmt])
    if fmt == "bfloat16":
        floats = floats.map(lambda v: round_fraction(Fraction(v), "bfloat16"))
    return st.one_of(floats, st.integers(-6, 6).map(float))


def arrays_in(fmt: str, shape: tuple[int, ...], max_abs: float | None = None):
    n = math.prod(shape)
    values = st.lists(element_values(fmt, max_abs), min_size=n, max_size=n)
    return values.map(lambda v: arr(v, shape))


eps_values = st.one_of(
    st.sampled_from([1e-5, 1e-6, 0.0, 1e-2, 1.0, 2.0**-40]), st.floats(0, 1, exclude_min=True)
)


@st.composite
def conventions(draw, *, offset: bool) -> dict:
    """The convention keywords and the output dtype (and how out_dtype is spelled)."""
    out_fmt = draw(st.one_of(st.none(), st.sampled_from(FMT_NAMES)))
    return {
        "variance": draw(st.sampled_from(["biased", "unbiased"])),
        "eps_placement": draw(st.sampled_from(["inside", "outside"])),
        "weight_offset": draw(st.sampled_from([0.0, 1.0])) if offset else 0.0,
        "out_fmt": out_fmt,
        "out_spelling": draw(st.sampled_from(["str", "torch", "numpy"])),
    }


@st.composite
def layer_norm_cases(draw, *, rms: bool = False, residual: bool = False) -> Case:
    fmt = draw(st.sampled_from(FMT_NAMES))
    normalized_shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    batch_shape = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    x = draw(arrays_in(fmt, batch_shape + normalized_shape))
    weight = bias = None
    if draw(st.booleans()):
        weight = draw(arrays_in(fmt, normalized_shape, max_abs=100.0))
        if not rms and draw(st.booleans()):
            bias = draw(arrays_in(fmt, normalized_shape, max_abs=100.0))
    eps = draw(st.one_of(st.none(), eps_values) if rms else eps_values)
    conv = draw(conventions(offset=weight is not None))
    extra: dict = {"normalized_shape": normalized_shape}
    if residual:
        extra["other"] = draw(arrays_in(fmt, x.shape))
        extra["alpha"] = draw(st.sampled_from([1.0, 0.5, 2.0, 1 / 3, 8**0.25]))
        extra["add_rounding"] = draw(st.sampled_from(["dtype", "exact"]))
    return Case(fmt, x, weight, bias, eps, extra=extra, **conv)


@st.composite
def channel_cases(draw, *, kind: str) -> Case:
    """(N, C, *spatial) inputs for group_norm, batch_norm and instance_norm."""
    fmt = draw(st.sampled_from(FMT_NAMES))
    groups = draw(st.integers(1, 3)) if kind == "group" else 1
    channels = groups * draw(st.integers(1, 2)) if kind == "group" else draw(st.integers(1, 3))
    spatial = tuple(
        draw(st.lists(st.integers(1, 3), min_size=1 if kind == "instance" else 0, max_size=2))
    )
    shape = (draw(st.integers(1, 3)), channels, *spatial)
    x = draw(arrays_in(fmt, shape))
    weight = bias = None
    if draw(st.booleans()):
        weight = draw(arrays_in(fmt, (channels,), max_abs=100.0))
        bias = draw(arrays_in(fmt, (channels,), max_abs=100.0))
    conv = draw(conventions(offset=weight is not None))
    extra: dict = {"num_groups": groups} if kind == "group" else {}
    return Case(fmt, x, weight, bias, draw(eps_values), extra=extra, **conv)


@st.composite
def running_stat_options(draw, case: Case) -> dict:
    """Running statistics and the update conventions for a batch_norm training call."""
    channels = case.x.shape[1]
    running_fmt = draw(st.sampled_from([case.fmt, "float32"]))
    momentum = draw(st.sampled_from([0.1, 0.5, 1 / 3, 0.0, 1.0, None]))
    return {
        "running_fmt": running_fmt,
        "running_mean": draw(arrays_in(running_fmt, (channels,), max_abs=100.0)),
        "running_var": np.abs(draw(arrays_in(running_fmt, (channels,), max_abs=100.0))),
        "momentum": momentum,
        "num_batches_tracked": draw(st.integers(1, 7)) if momentum is None else None,
        "running_variance": draw(st.sampled_from(["unbiased", "biased"])),
        "momentum_weights": draw(st.sampled_from(["new", "running"])),
    }


@st.composite
def batch_norm_training_cases(draw) -> Case:
    case = draw(channel_cases(kind="batch"))
    per_channel = case.x.size // case.x.shape[1]
    if per_channel >= 2 and draw(st.booleans()):
        case.extra.update(draw(running_stat_options(case)))
    return case


@st.composite
def batch_norm_eval_cases(draw) -> Case:
    case = draw(channel_cases(kind="batch"))
    channels = case.x.shape[1]
    running_fmt = draw(st.sampled_from([case.fmt, "float32"]))
    rv = np.abs(draw(arrays_in(running_fmt, (channels,), max_abs=100.0)))
    if case.eps == 0:
        rv[rv == 0] = 1.0  # a zero denominator (rv = eps = 0) is outside the contract
    case.extra.update(
        running_fmt=running_fmt,
        running_mean=draw(arrays_in(running_fmt, (channels,), max_abs=100.0)),
        running_var=rv,
    )
    return case
