"""Throughput of the references: correctly rounded outputs per second on real shapes.

Run with ``tox -e bench`` (or ``pytest benchmarks --benchmark-only``). Each benchmark reports
``Melem/s`` (output elements per second, from the median round) in its extra info; the README
quotes the figures with the machine they were measured on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import references as R
from references import gradients

ROWS, WIDTH = 4096, 4096


def _inputs(rows: int, width: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(2024)
    draw = lambda *shape: torch.from_numpy(rng.standard_normal(shape)).to(dtype)  # noqa: E731
    return {"x": draw(rows, width), "w": draw(width), "b": draw(width), "g": draw(rows, width)}


def _run(benchmark: Any, fn: Callable[[], object], elements: int) -> None:
    benchmark.pedantic(fn, rounds=10, iterations=1, warmup_rounds=1)
    benchmark.extra_info["elements"] = elements
    benchmark.extra_info["Melem/s"] = round(elements / benchmark.stats.stats.median / 1e6, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_forward(benchmark: Any, dtype: torch.dtype) -> None:
    t = _inputs(ROWS, WIDTH, dtype)
    _run(benchmark, lambda: R.layer_norm(t["x"], WIDTH, t["w"], t["b"]), ROWS * WIDTH)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_forward(benchmark: Any, dtype: torch.dtype) -> None:
    t = _inputs(ROWS, WIDTH, dtype)
    _run(benchmark, lambda: R.rms_norm(t["x"], WIDTH, t["w"]), ROWS * WIDTH)


def test_layer_norm_forward_float64(benchmark: Any) -> None:
    """float64 outputs go through the long double path: a smaller shape."""
    t = _inputs(1024, 1024, torch.float64)
    _run(benchmark, lambda: R.layer_norm(t["x"], 1024, t["w"], t["b"]), 1024 * 1024)


def test_layer_norm_backward(benchmark: Any) -> None:
    t = _inputs(1024, 1024, torch.float32)
    _run(
        benchmark,
        lambda: gradients.layer_norm_backward(t["g"], t["x"], 1024, t["w"], t["b"]),
        1024 * 1024,
    )
