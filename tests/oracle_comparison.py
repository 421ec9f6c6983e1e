"""Carrying exact values in and out of the four dtypes, and comparing results with the oracle.

Test inputs are float64 arrays holding values exactly representable in the dtype under test
(``as_backend`` refuses any other); results come back as their exact values (``to_float64``) and
must equal the oracle's correctly rounded values element for element (``assert_matches_oracle``).
"""

from __future__ import annotations

import math

import numpy as np
from exact_rounding import FORMATS, ulp_of

FMT_NAMES = tuple(FORMATS)


def torch_dtype(fmt: str):
    import torch

    return getattr(torch, fmt)


def numpy_dtype(fmt: str):
    if fmt == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(fmt)


def as_backend(values: np.ndarray | None, fmt: str, backend: str):
    """float64 values exactly representable in ``fmt`` -> a torch tensor or numpy array of fmt."""
    if values is None:
        return None
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        back = values.astype(numpy_dtype(fmt)).astype(np.float64)
    if not np.array_equal(back, values, equal_nan=True):
        raise ValueError(f"test input not exactly representable in {fmt}: {values!r}")
    if backend == "torch":
        import torch

        return torch.tensor(values, dtype=torch.float64).to(torch_dtype(fmt))
    return values.astype(numpy_dtype(fmt))


def to_float64(arr) -> np.ndarray:
    """The exact values of a torch tensor or numpy array of any of the four dtypes."""
    if hasattr(arr, "detach"):
        import torch

        return arr.detach().to(torch.float64).cpu().numpy()
    return np.asarray(arr).astype(np.float64)


def fmt_of(arr) -> str:
    """The format name of a torch tensor's or numpy array's dtype."""
    if hasattr(arr, "detach"):
        return str(arr.dtype).removeprefix("torch.")
    return np.asarray(arr).dtype.name


def assert_matches_oracle(
    actual, expected: np.ndarray, *, fmt: str, backend: str, what: str, context: str = ""
) -> None:
    """``actual``: a ``backend`` array of dtype ``fmt``, equal element for element to ``expected``.

    NaN must meet NaN; zeros compare equal whatever their sign (an exact zero has no sign).
    """
    __tracebackhide__ = True
    kind = "torch.Tensor" if backend == "torch" else "numpy.ndarray"
    if (backend == "torch") != hasattr(actual, "detach") or not hasattr(actual, "shape"):
        raise AssertionError(f"{what}: expected a {kind}, got {type(actual).__name__}\n{context}")
    if fmt_of(actual) != fmt:
        raise AssertionError(f"{what}: dtype {fmt_of(actual)}, expected {fmt}\n{context}")
    got = to_float64(actual)
    expected = np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        raise AssertionError(f"{what}: shape {got.shape}, expected {expected.shape}\n{context}")
    both_nan = np.isnan(got) & np.isnan(expected)
    with np.errstate(invalid="ignore"):
        bad = ~((got == expected) | both_nan)
    if not bad.any():
        return
    ulps = np.zeros(got.shape)
    for idx in zip(*np.nonzero(bad), strict=True):
        g, e = got[idx], expected[idx]
        ulps[idx] = (
            math.inf if not (np.isfinite(g) and np.isfinite(e)) else (abs(g - e) / ulp_of(e, fmt))
        )
    worst = tuple(int(i) for i in np.unravel_index(np.argmax(ulps), ulps.shape))
    count = int(bad.sum())
    raise AssertionError(
        f"{what}: not the correctly rounded result\n"
        f"Mismatched elements: {count} / {bad.size} ({100 * count / bad.size:.3g}%)\n"
        f"Worst element at index {worst}: {ulps[worst]:.3g} ulp of {fmt}\n"
        f" ACTUAL:  {got[worst]!r} ({float(got[worst]).hex()})\n"
        f" DESIRED: {expected[worst]!r} ({float(expected[worst]).hex()})\n{context}"
    )
