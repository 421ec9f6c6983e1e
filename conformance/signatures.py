"""Defects without a reference model, recognised by what they do to a row.

:mod:`conformance.fingerprint` tries candidate explanations that the references can compute;
this module recognises the defects they cannot, each by a model of what the defect does to a
reduction group (a row of the ``(groups, n)`` matrix), checked against the check's own tolerance
and tied to a quantity the row itself determines:

* *NaN swallowed*: elements whose group holds a NaN come back finite.
* *NaN gradient at zero variance*: the input gradient is NaN exactly on rows of zero variance,
  where it is finite (``1/√v`` or ``d√v/dv`` at ``v = 0``).
* *float16 overflow of Σx²*: every row whose sum of squares (of ``x``, or of ``x - μ``) must
  overflow float16 comes back as ``w·0 + b`` (the scale ``1/√inf`` is 0; the input gradient
  0), or NaN, no row whose sum cannot overflow does, and the weight gradient is ``Σ dy·x̂``
  without those rows.
* *E[x²] - E[x]²*: every failing row is ``w·c·x̂ + b`` for a per-row factor ``c`` (the mean is
  right, the scale is not), the variance that ``c`` implies is off by no more than cancellation
  can do, ``(3(k + 1) + 2)·u·E[x²]`` for sums of depth ``k``, and for most of them by more than
  that many roundings of ``σ²`` itself: an error that grows with ``E[x²] = μ² + σ²``.
* *reduced precision*: a half-precision result within the tolerance for arithmetic in its own
  dtype but not for float32 accumulation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from conformance import metrics, tolerance
from conformance.bounds import CaseModel
from conformance.inputs import CaseInputs, round_into
from conformance.results import Metrics

FLOAT16_MAX = 65504.0
#: The smallest value that rounds to inf in float16 (round to nearest: 65504 + ulp/2).
FLOAT16_OVERFLOW = 65520.0
OVERFLOW = "float16 overflow of the sum of squares"
CANCELLATION = "E[x²] - E[x]² cancellation"


def summary(m: Metrics, of: str = "") -> str:
    """``all of N elements within tolerance[of], max X ulp`` (or ``K (P%) of N ...``)."""
    within = m.n - m.mismatched
    share = "all" if within == m.n else f"{within} ({100.0 * within / max(m.n, 1):.4g}%)"
    return f"{share} of {m.n} elements within tolerance{of}, max {m.max_ulp:.4g} ulp"


def in_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    return round_into(values, dtype)


def bad_elements(actual: np.ndarray, reference: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """Elements that fail under :func:`conformance.metrics.compare`'s rules: a finite reference
    needs a value within ``bound``, a NaN a NaN, an infinity the same infinity."""
    a, r = np.asarray(actual, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        within = (np.abs(a - r) <= bound) | (a == r)  # a NaN bound fails any error but 0
    matching = np.where(np.isnan(r), np.isnan(a), a == r)
    return np.asarray(np.where(np.isfinite(r), ~within, ~matching))


def _row_any(model: CaseModel, mask: np.ndarray) -> np.ndarray:
    return np.asarray(model.rows(np.asarray(mask, dtype=np.float64)).any(axis=1))


def _row_all(model: CaseModel, mask: np.ndarray) -> np.ndarray:
    return np.asarray(model.rows(np.asarray(mask, dtype=np.float64)).all(axis=1))


def explain(
    kind: str,
    output: str,
    inputs: CaseInputs,
    actual: np.ndarray,
    reference: np.ndarray,
    bound: np.ndarray,
    model: CaseModel,
) -> str | None:
    """The signature a failed check's ``actual`` output shows, in words, or None."""
    nan_ref = np.isnan(reference)
    swallowed = int(np.count_nonzero(nan_ref & np.isfinite(actual)))
    if swallowed:
        return (
            f"NaN swallowed: {swallowed} of {int(nan_ref.sum())} elements whose group "
            "contains NaN came back finite (NaN must propagate)"
        )
    if model.case.norm == "batch_norm" and not model.case.training:
        return None  # statistics given, not reduced: neither sum can go wrong
    if kind == "backward" and output == "grad_weight":
        return _overflow_weight(inputs, actual, bound, model)
    if kind == "backward" and output == "grad_input":
        text = _zero_variance_gradient(actual, reference, bound, model)
        if text:
            return text
    forward = kind in ("forward", "nonfinite") and output == "output"
    if not forward and not (kind == "backward" and output == "grad_input"):
        return None
    text = _overflow(forward, actual, reference, bound, model)
    if text or not forward:
        return text
    return _cancellation(actual, reference, bound, model)


def reduced_precision(
    actual: np.ndarray,
    reference: np.ndarray,
    model: CaseModel,
    bound_for: Callable[[CaseModel], np.ndarray],
) -> str | None:
    """A half-precision result that fails the model for float32 arithmetic but passes it for
    arithmetic in its own dtype: intermediates were rounded to the half type."""
    dtype = model.case.dtype
    if dtype not in ("float16", "bfloat16"):
        return None
    half = replace(model, acc_unit=tolerance.unit_roundoff(dtype))
    m = metrics.compare(actual, reference, bound_for(half), dtype)
    if m.mismatched:
        return None
    return (
        f"within the tolerance for arithmetic in {dtype} (u = {half.acc_unit:g}) but not "
        f"for float32 accumulation (u = {model.acc_unit:g}): intermediates (statistics, "
        f"partial sums or the affine step) are rounded to {dtype}; {summary(m)}"
    )


def where_wrong(
    actual: np.ndarray, reference: np.ndarray, bound: np.ndarray, model: CaseModel, output: str
) -> str | None:
    """Where the wrong elements of an elementwise output lie, when that names a boundary: every
    wrong group at index 2^k or beyond and none before (a row index, count or grid dimension
    that stops or wraps there), or every wrong element at column 2^k or beyond of its group and
    none before (a tail past a tile of 2^k)."""
    if output in ("grad_weight", "grad_bias", "mean", "rstd", "running_mean", "running_var"):
        return None
    bad = model.rows(bad_elements(actual, reference, bound).astype(np.float64)) > 0
    if not bad.any():
        return None
    rows, columns = bad.any(axis=1), bad.any(axis=0)
    first_row, first_column = int(np.argmax(rows)), int(np.argmax(columns))
    if first_row >= 2**10 and first_row & (first_row - 1) == 0:
        k = first_row.bit_length() - 1
        return (
            f"every wrong element is in the groups from {first_row} = 2^{k} on (of "
            f"{rows.size}), none before: a row index, count or grid dimension that stops or "
            f"wraps at 2^{k}"
        )
    n = bad.shape[1]
    if 32 <= first_column < n and first_column & (first_column - 1) == 0:
        return (
            f"every wrong element is in columns {first_column} to {n - 1} of its group, none "
            f"before: the tail past a tile of {first_column}"
        )
    return None


def sequential_reduction(
    actual: np.ndarray,
    reference: np.ndarray,
    model: CaseModel,
    bound_for: Callable[[CaseModel], np.ndarray],
    output: str = "output",
) -> str | None:
    """A result that fails the model for tree reductions (depth ~16) but passes it for a
    sequential one (depth n - 1): the kernel sums its reduction groups (for a weight or bias
    gradient: the terms of each parameter, across the groups) left to right."""
    if model.reduction != "tree":
        return None
    sequential = replace(model, reduction="sequential")
    m = metrics.compare(actual, reference, bound_for(sequential), model.case.dtype)
    if m.mismatched:
        return None
    g = model.grouping
    if output in ("grad_weight", "grad_bias"):
        terms = g.groups * g.n // max(g.params, 1)
        what = f"the {terms} terms summed into each element of {output}"
    else:
        what = f"the {g.n} elements of a group"
    return (
        f"within the tolerance for a sequential (left-to-right) reduction of {what}, but not "
        f"for a tree reduction: the sums are accumulated sequentially (declare "
        f"normconf_reduction = 'sequential' if intended); {summary(m)}"
    )


def _zero_variance_gradient(
    actual: np.ndarray, reference: np.ndarray, bound: np.ndarray, model: CaseModel
) -> str | None:
    """NaN input gradients exactly on rows of zero variance, where the reference is finite:
    ``1/√v`` or autograd through ``√v`` at ``v = 0`` (``0·∞``), ε missing from that root."""
    failing = bad_elements(actual, reference, bound)
    zero = np.asarray(model.stats.var) == 0
    rows = _row_any(model, failing)
    nan = np.isnan(actual) & np.isfinite(reference)
    if not rows.any() or (rows & ~zero).any() or not nan[failing].all():
        return None
    return (
        f"NaN input gradient on the {int(rows.sum())} rows of zero variance (constant rows, "
        "or one element), where the exact gradient is finite: the backward evaluates 1/√v or "
        "d√v/dv at v = 0 (0·∞ = NaN), with ε left out of that root"
    )


# -- float16 overflow of the sum of squares -------------------------------------------------------


def float16_overflow_rows(model: CaseModel) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row, whether a float16 sum of its squares *must* and whether it *may* overflow:
    ``(must, may)`` for ``Σx²`` (one-pass kernels), then for ``Σ(x - μ)²`` (two-pass; centred
    norms only).

    A float16 running sum of ``n`` squares errs by at most ``g = n·u16`` relative (first order,
    the squares' own rounding included) and is inf once it rounds past
    :data:`FLOAT16_OVERFLOW`; a sum of non-negative terms never drops below its largest term.
    So it must overflow where one square, or ``(1 - g)`` times the sum, reaches that, and may
    where ``(1 + g)`` times the sum does. Rows with non-finite values are neither.
    """
    stats, n = model.stats, model.grouping.n
    g = min(1.0, n * tolerance.unit_roundoff("float16"))
    s, mean = np.asarray(stats.s)[:, None], np.asarray(stats.mean)[:, None]
    deviations = np.asarray(stats.x_hat) * s  # x - μ (x for RMS norms)
    finite = np.isfinite(s[:, 0])
    terms = [deviations + mean, deviations] if stats.center else [deviations]
    schemes = []
    with np.errstate(invalid="ignore", over="ignore"):
        for values in terms:
            squares = values * values
            total = squares.sum(axis=1)
            largest = np.max(squares, axis=1, initial=0.0)
            must = (largest >= FLOAT16_OVERFLOW) | ((1 - g) * total >= FLOAT16_OVERFLOW)
            schemes.append((must & finite, ((1 + g) * total >= FLOAT16_OVERFLOW) & finite))
    return schemes


def _overflow(
    forward: bool, actual: np.ndarray, reference: np.ndarray, bound: np.ndarray, model: CaseModel
) -> str | None:
    """Rows that collapsed because a float16 sum of squares overflowed: the scale ``1/√inf``
    is 0, so a row comes back as ``w·0 + b`` (its input gradient as 0), or NaN where
    ``inf - inf`` occurred. The signature, for the sum of ``x²`` or of ``(x - μ)²``
    (:func:`float16_overflow_rows`): every row that must overflow collapsed, some of them
    failing, and every collapsed failing row may overflow."""
    collapse = model.back(model.signed_shift) if forward else np.zeros(np.shape(actual))
    with np.errstate(invalid="ignore", over="ignore"):
        near = np.abs(actual - collapse) <= bound
    nonfinite = _row_all(model, ~np.isfinite(actual))
    collapsed = _row_all(model, near) | nonfinite
    failing = _row_any(model, bad_elements(actual, reference, bound))
    hit = collapsed & failing
    for must, may in float16_overflow_rows(model):
        if (hit & must).any() and not (hit & ~may).any() and not (must & ~collapsed).any():
            break
    else:
        return None
    if nonfinite[hit].all():
        what = "NaN (inf - inf)"
    elif forward:
        what = "w·0 + b, the bias alone" if model.signed_shift.any() else "0"
    else:
        what = "a zero input gradient"
    in_range = int((~may & np.isfinite(np.asarray(model.stats.s))).sum())
    contrast = (
        f", and none of the {in_range} rows whose sum stays in range does" if in_range else ""
    )
    others = int((failing & ~collapsed).sum())
    tail = f"; {others} other failing rows did not collapse" if others else ""
    return (
        f"{OVERFLOW}: the {int(hit.sum())} failing rows whose sum of squares exceeds "
        f"float16's largest value ({FLOAT16_MAX:g}) come back as {what} (the scale 1/√inf is "
        f"0){contrast}: the sum of squares is accumulated in float16 and overflows{tail}"
    )


def _overflow_weight(
    inputs: CaseInputs, actual: np.ndarray, bound: np.ndarray, model: CaseModel
) -> str | None:
    """``dw_j = Σ dy·x̂`` with the rows that must overflow float16 contributing nothing (their
    ``x̂`` collapsed to 0); it explains the weight gradient if ``actual`` passes against it."""
    grad_output = inputs.grads.get("grad_output")
    if grad_output is None:
        return None
    dy = model.rows(grad_output)
    index = np.asarray(model.grouping.param_index()).reshape(-1)
    params = model.grouping.params
    for must, may in float16_overflow_rows(model):
        if not must.any() or (may & ~must).any():
            continue  # no overflow, or rows whose fate is unknown
        products = np.where(must[:, None], 0.0, dy * np.asarray(model.stats.x_hat))
        dw = np.bincount(index, weights=products.reshape(-1), minlength=params)[:params]
        expected = in_dtype(dw.reshape(np.shape(actual)), model.case.dtype)
        if not bad_elements(actual, expected, bound).any():
            return (
                f"{OVERFLOW}: the weight gradient is Σ dy·x̂ with the {int(must.sum())} rows "
                f"whose sum of squares exceeds float16's largest value ({FLOAT16_MAX:g}) "
                "contributing nothing (their scale 1/√inf is 0): the sum of squares is "
                "accumulated in float16 and overflows"
            )
    return None


# -- E[x²] - E[x]² --------------------------------------------------------------------------------


def cancellation_factor(n: int, reduction: str) -> float:
    """Roundings, in units of ``u·E[x²]``, that ``E[x²] - E[x]²`` may err by: the sum of
    squares and the mean (depth ``k`` plus the division each), the mean squared (twice the
    mean's error plus a rounding) and the difference: ``3·(k + mean) + 2``."""
    k = float(tolerance.reduction_factor(n, reduction)) * tolerance.constant("tree_depth")
    return 3 * (k + tolerance.constant("mean")) + 2


def implied_variance_error(
    actual: np.ndarray, bound: np.ndarray, model: CaseModel
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: whether the output is ``w·c·x̂ + b`` for some factor ``c`` (a right mean and a
    wrong scale), the variance error ``δ = v' - v`` that ``c`` implies, and its uncertainty.

    ``c = Σ t·x̂ / Σ x̂²`` with ``t = (y - b) / w``. A kernel's ``x̂`` errs within the bound,
    and a wrong scale amplifies that by ``c``: the fit is checked against ``max(1, |c|)`` times
    the bound, which also gives ``c``'s uncertainty ``Δc = Σ |x̂|·that / |w| / Σ x̂²``, carried
    into ``δ`` to first order. ``v'`` solves ``√(v' + ε) = s / c`` (``√v' + ε`` for ε outside).
    """
    stats, eps = model.stats, model.eps
    x_hat, w, b = np.asarray(stats.x_hat), model.signed_scale, model.signed_shift
    a_rows, s = model.rows(actual), np.asarray(stats.s)
    with np.errstate(all="ignore"):
        sxx = (x_hat * x_hat).sum(axis=1)
        c = ((a_rows - b) / w * x_hat).sum(axis=1) / sxx
        allowed = model.rows(bound) * np.fmax(1.0, np.abs(c))[:, None]
        dc = (np.abs(x_hat) * allowed / np.abs(w)).sum(axis=1) / sxx
        fits = (np.abs(a_rows - (w * c[:, None] * x_hat + b)) <= allowed).all(axis=1)
        scale = s / c  # the kernel's √(v' + ε), or √v' + ε
        if stats.eps_outside:
            implied, slope = (scale - eps) ** 2, 2 * np.abs(scale - eps) * s / c**2
        else:
            implied, slope = scale**2 - eps, 2 * s**2 / np.abs(c) ** 3
    return fits, implied - np.asarray(stats.var), slope * dc


def _cancellation(
    actual: np.ndarray, reference: np.ndarray, bound: np.ndarray, model: CaseModel
) -> str | None:
    """The variance of ``E[x²] - E[x]²`` (module docstring), row by row.

    A failing row fits it when its output is ``w·c·x̂ + b`` (:func:`implied_variance_error`)
    with ``|δ|`` within ``cancellation_factor·u·E[x²]``, or it came back NaN where the variance
    can cancel below ``-ε``. It is *beyond* a stable formula when ``|δ|`` exceeds the same
    factor times ``u·σ²``. The signature: every failing row fits, and most are beyond.
    """
    stats = model.stats
    if not stats.center:
        return None
    fits, delta, tau = implied_variance_error(actual, bound, model)
    v, u = np.asarray(stats.var), model.acc_unit
    factor = cancellation_factor(model.grouping.n, model.reduction)
    unit = u * np.asarray(stats.rms) ** 2  # u·E[x²]
    with np.errstate(invalid="ignore"):
        low = np.abs(delta) - tau
        nan_rows = _row_all(model, np.isnan(actual)) & _row_all(model, np.isfinite(reference))
        negative = nan_rows & (v + (0.0 if stats.eps_outside else model.eps) <= factor * unit)
        within = (fits & (low <= factor * unit)) | negative
        beyond = (fits & (low > factor * u * v)) | negative
        zeroed = fits & (np.abs(delta + v) <= tau)  # v' = 0: a cancelled variance clamped
    failing = _row_any(model, bad_elements(actual, reference, bound)) & np.isfinite(v)
    if not failing.any() or not within[failing].all() or beyond[failing].mean() < 0.5:
        return None
    return _cancellation_words(model, failing, delta, fits & ~zeroed, failing & zeroed, negative)


def _cancellation_words(
    model: CaseModel,
    failing: np.ndarray,
    delta: np.ndarray,
    measured: np.ndarray,
    zeroed: np.ndarray,
    negative: np.ndarray,
) -> str:
    stats, u = model.stats, model.acc_unit
    kappa = float(np.median(np.asarray(stats.kappa)[failing]))
    measured = measured & failing
    count = int(failing.sum())
    parts = []
    if measured.any():
        with np.errstate(all="ignore"):
            error = np.abs(delta)[measured]
            per_ex2 = float(np.median(error / (u * np.asarray(stats.rms)[measured] ** 2)))
            per_var = float(np.median(error / (u * np.asarray(stats.var)[measured])))
        rows = "" if measured.sum() == count else f"on {int(measured.sum())} of them "
        parts.append(
            f"{rows}the variance is off by {per_ex2:.2g}·u·E[x²] = {per_var:.3g}·u·σ² (medians)"
        )
    if zeroed.any():
        how_many = "all" if zeroed.sum() == count else str(int(zeroed.sum()))
        parts.append(
            f"{how_many} are normalised as if their variance were 0 (the difference came out "
            "at or below 0 and was clamped)"
        )
    if negative.any():
        parts.append(f"{int(negative.sum())} came back NaN (the variance cancelled below -ε)")
    return (
        f"{CANCELLATION}: on the {count} failing rows (median κ {kappa:.3g}, u = {u:.3g}), "
        f"{'; '.join(parts)}: an error that grows with E[x²] = μ² + σ², not with σ², is the "
        "signature of computing the variance as E[x²] - E[x]², which cancels when the mean is "
        "large against the spread"
    )
