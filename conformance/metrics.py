"""Element-wise comparison of an output with its correctly rounded reference, and its grade.

Distances are counted in floats of the output dtype: :func:`ulp_distance` maps each float to its
position on the ordered integer line of its bit pattern (sign-magnitude, so ``+0`` and ``-0``
share position 0) and subtracts. :func:`ulp` is the spacing of the dtype at a value, the
subnormal spacing below the normal range.

:func:`compare` turns an ``actual``/``reference``/``bound`` triple into
:class:`conformance.results.Metrics`:

* non-finite rules: a NaN reference needs a NaN, an infinite reference the same infinity, a
  finite reference a finite value; each violation is a *non-finite mismatch* (ratio ``inf``,
  error ``inf``, distance ``inf``); a matching non-finite pair counts as correctly rounded;
* finite pairs: ``error = |a - r|``, ``ratio = error / bound`` (``0/0 = 0``, ``e/0 = inf``),
  ``mismatched = #(ratio > 1)``;
* the worst element is the one with the largest ratio, ties going to the larger distance;
  ``worst_tolerance_ulp`` is the bound there in ulps of the reference.

Everything is vectorized; ten million elements take a fraction of a second.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from conformance.results import GRADES, ULP_HISTOGRAM_EDGES, Metrics
from references.formats import FORMATS, Format

#: Signed integer type of each dtype's bit pattern, by width in bits.
_SIGNED: dict[int, type[np.signedinteger[Any]]] = {32: np.int32, 16: np.int16}

#: Largest distance the quantile search gallops to before it sorts (a search step, not a
#: tolerance).
_GALLOP_LIMIT = 1023


def _format(dtype: str) -> Format:
    if dtype not in FORMATS:
        raise ValueError(f"unsupported dtype {dtype!r}: expected one of {sorted(FORMATS)}")
    return FORMATS[dtype]


def _stored(values: np.ndarray, fmt: Format) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).astype(fmt.numpy_dtype)


def _ordered(values: np.ndarray, fmt: Format) -> np.ndarray:
    """Position of each float of a format of at most 32 bits on the ordered integer line:
    the magnitude bits, negated for negative values (as float64, exact below 2**53)."""
    bits = _stored(values, fmt).view(_SIGNED[fmt.numpy_dtype.itemsize * 8])
    # A negative float's pattern is sign bit | magnitude: xor with all-ones below the sign
    # gives -1 - magnitude; subtracting the sign (-1, by the arithmetic shift) gives -magnitude.
    sign = bits >> (fmt.numpy_dtype.itemsize * 8 - 1)
    bits ^= sign & np.iinfo(bits.dtype).max
    bits -= sign
    return bits.astype(np.float64)


def _distance64(actual: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """float64 distances through unsigned magnitudes (an int64 difference could wrap)."""
    sign = np.uint64(1 << 63)
    bits_a, bits_r = actual.view(np.uint64), reference.view(np.uint64)
    mag_a, mag_r = bits_a & ~sign, bits_r & ~sign
    same = (bits_a & sign) == (bits_r & sign)
    # The larger magnitude first, so that the uint64 difference cannot wrap.
    apart = np.maximum(mag_a, mag_r) - np.minimum(mag_a, mag_r)
    return np.where(same, apart, mag_a + mag_r).astype(np.float64)


def ulp_distance(actual: np.ndarray, reference: np.ndarray, dtype: str) -> np.ndarray:
    """Number of floats of ``dtype`` between ``actual`` and ``reference`` (float64 result).

    Both arrays hold values representable in ``dtype`` (finite; the caller handles NaN and
    infinities). Same sign: the difference of the magnitude bit patterns; opposite signs: their
    sum (the path through zero, where ``+0`` and ``-0`` coincide). Exact below ``2**53``.
    """
    fmt = _format(dtype)
    if fmt.name == "float64":
        return _distance64(
            np.asarray(actual, dtype=np.float64), np.asarray(reference, dtype=np.float64)
        )
    ordered = _ordered(actual, fmt)
    ordered -= _ordered(reference, fmt)
    distance: np.ndarray = np.abs(ordered, out=ordered)
    return distance


def ulp(reference: np.ndarray, dtype: str) -> np.ndarray:
    """Spacing of ``dtype`` at ``|reference|``: ``2**(e - p + 1)`` with ``e`` the binade's
    exponent, clamped at ``emin`` (subnormal spacing; at 0 the smallest subnormal).
    Infinite values give ``inf``, NaN gives NaN."""
    fmt = _format(dtype)
    r = np.abs(np.asarray(reference, dtype=np.float64))
    finite = np.isfinite(r)
    exponent = np.frexp(np.where(finite, r, 1.0))[1].astype(np.int64) - 1
    exponent = np.where(r == 0, fmt.emin, np.maximum(exponent, fmt.emin))
    spacing = np.ldexp(1.0, exponent - (fmt.precision - 1))
    return np.where(finite, spacing, r)


def _nonfinite_mismatch(a: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Non-finite mismatches under the rules in the module docstring."""
    a_finite, r_finite = np.isfinite(a), np.isfinite(r)
    ok_nonfinite = np.where(np.isnan(r), np.isnan(a), a == r)  # inf needs the same inf
    bad: np.ndarray = np.where(r_finite, ~a_finite, ~ok_nonfinite)
    return bad


def _ratios(error: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """``error / bound`` with ``0/0 = 0``, ``e/0 = inf`` and a NaN bound failing any error."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio: np.ndarray = error / bound
    nan = np.isnan(ratio)
    if nan.any():
        ratio[nan] = np.where(error[nan] == 0, 0.0, np.inf)
    return ratio


def _empty_metrics() -> Metrics:
    return Metrics(
        n=0,
        mismatched=0,
        max_ulp=0.0,
        p50_ulp=0.0,
        p99_ulp=0.0,
        frac_correctly_rounded=1.0,
        frac_faithful=1.0,
        max_abs_error=0.0,
        max_abs_index=(),
        max_rel_error=0.0,
        max_rel_index=(),
        max_ratio=0.0,
        worst_index=(),
        worst_actual=0.0,
        worst_reference=0.0,
        worst_ulp=0.0,
        worst_tolerance_ulp=0.0,
        ulp_histogram=[0] * (len(ULP_HISTOGRAM_EDGES) + 1),
    )


def _index(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(flat, shape))


def _quantile(values: np.ndarray, q: float) -> float:
    """``np.percentile(values, 100 q, method="higher")`` for integer-valued distances.

    Distances of correct outputs are small integers, so a galloping search over counts
    (``#(values <= v)``, one cheap pass each) beats the partition of a full percentile; past
    :data:`_GALLOP_LIMIT` a partition of the larger distances takes over.
    """
    rank = math.ceil(q * (values.size - 1)) + 1  # elements at or below the answer
    low, v = -1, 0
    while v <= _GALLOP_LIMIT:
        if np.count_nonzero(values <= v) >= rank:
            while v - low > 1:  # invariant: count(<= low) < rank <= count(<= v)
                mid = (low + v) // 2
                low, v = (low, mid) if np.count_nonzero(values <= mid) >= rank else (mid, v)
            return float(v)
        low, v = v, 2 * v + 1
    large = values[values > low]
    rank -= values.size - large.size
    return float(np.partition(large, rank - 1)[rank - 1])


def _worst(ratio: np.ndarray, ulps: np.ndarray) -> int:
    """Flat index of the largest ratio; among equal ratios the largest distance."""
    tied = ratio == ratio.max()
    count = np.count_nonzero(tied)
    if count == 1:
        return int(np.argmax(tied))
    if count == ratio.size:  # typically every ratio 0: a correctly rounded output
        return int(np.argmax(ulps))
    return int(np.argmax(np.where(tied, ulps, -1.0)))


class _Elements:
    """Per-element error, distance and ratio of a flat comparison."""

    def __init__(self, a: np.ndarray, r: np.ndarray, b: np.ndarray, dtype: str):
        bad = None
        with np.errstate(invalid="ignore", over="ignore"):
            error = a - r  # finite everywhere iff both are (or an overflow: the slow path)
        if not np.isfinite(error).all():
            bad = _nonfinite_mismatch(a, r)
            both = np.isfinite(a) & np.isfinite(r)
            # Matching non-finite pairs compare as exact zeros; mismatches are set below.
            a, r = np.where(both, a, 0.0), np.where(both, r, 0.0)
            error = a - r
        self.error = np.abs(error, out=error)
        self.ulps = ulp_distance(a, r, dtype)
        self.ratio = _ratios(self.error, b)
        self.rel = np.abs(r)
        with np.errstate(divide="ignore", invalid="ignore"):
            np.divide(self.error, self.rel, out=self.rel)
        zero = r == 0
        if zero.any():
            self.rel[zero] = 0.0  # no relative error against a zero reference
        self.nonfinite = 0
        if bad is not None:
            self.nonfinite = int(np.count_nonzero(bad))
            for values in (self.error, self.ulps, self.ratio, self.rel):
                values[bad] = np.inf


def compare(actual: np.ndarray, reference: np.ndarray, bound: np.ndarray, dtype: str) -> Metrics:
    """Metrics of ``actual`` against ``reference`` under the absolute ``bound`` (see module).

    All three are float64 arrays of one shape; ``dtype`` is the output dtype in which the
    values are stored. Indices are tuples into that shape.
    """
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if a.shape != r.shape:
        raise ValueError(f"actual has shape {a.shape}, reference {r.shape}")
    b = np.broadcast_to(np.asarray(bound, dtype=np.float64), r.shape)
    if r.size == 0:
        return _empty_metrics()
    shape, size = r.shape, r.size
    a, r, b = a.reshape(-1), r.reshape(-1), b.reshape(-1)
    e = _Elements(a, r, b, dtype)
    worst = _worst(e.ratio, e.ulps)
    p50, p99 = _quantile(e.ulps, 0.5), _quantile(e.ulps, 0.99)
    i_abs, i_rel = int(np.argmax(e.error)), int(np.argmax(e.rel))
    spacing = float(ulp(r[worst : worst + 1], dtype)[0])
    return Metrics(
        n=int(size),
        mismatched=int(np.count_nonzero(e.ratio > 1)),
        max_ulp=float(e.ulps.max()),
        p50_ulp=float(p50),
        p99_ulp=float(p99),
        frac_correctly_rounded=np.count_nonzero(e.ulps == 0) / size,
        frac_faithful=np.count_nonzero(e.ulps <= 1) / size,
        max_abs_error=float(e.error[i_abs]),
        max_abs_index=_index(i_abs, shape),
        max_rel_error=float(e.rel[i_rel]),
        max_rel_index=_index(i_rel, shape),
        max_ratio=float(e.ratio[worst]),
        worst_index=_index(worst, shape),
        worst_actual=float(a[worst]),
        worst_reference=float(r[worst]),
        worst_ulp=float(e.ulps[worst]),
        # At a non-finite reference there is no spacing to count the bound in.
        worst_tolerance_ulp=float(b[worst]) / spacing if np.isfinite(spacing) else float("nan"),
        nonfinite_mismatches=e.nonfinite,
        ulp_histogram=ulp_histogram(e.ulps),
    )


_EDGES = np.asarray(ULP_HISTOGRAM_EDGES, dtype=np.float64)


def ulp_histogram(distances: np.ndarray) -> list[int]:
    """Counts of ``distances`` (ulps, ``inf`` for a non-finite mismatch) per bin of
    :data:`conformance.results.ULP_HISTOGRAM_EDGES`."""
    bins = np.searchsorted(_EDGES, distances, side="left")
    return [int(n) for n in np.bincount(bins, minlength=_EDGES.size + 1)]


def grade(metrics: Metrics) -> str:
    """The grade of a comparison, one of :data:`conformance.results.GRADES`.

    ``fail`` if any element is mismatched; ``correctly_rounded`` if every distance is 0;
    ``faithful`` if every distance is at most 1 ulp; ``within_tolerance`` otherwise.
    """
    correctly_rounded, faithful, within_tolerance, fail = GRADES
    if metrics.mismatched > 0:
        return fail
    if metrics.max_ulp == 0:
        return correctly_rounded
    if metrics.max_ulp <= 1:
        return faithful
    return within_tolerance


def merge(parts: list[tuple[int, Metrics]]) -> Metrics:
    """The metrics of a tensor compared in row blocks: ``(first_row, metrics)`` per block, each
    block's indices counted from its first row. Counts, extremes and histograms merge exactly;
    the median and 99th percentile are read off the merged histogram (the upper edge of the bin
    they fall in, the last edge for the open bin)."""
    blocks = [(start, m) for start, m in parts if m.n]
    if not blocks:
        return _empty_metrics()

    def shifted(start: int, index: tuple[int, ...]) -> tuple[int, ...]:
        return (index[0] + start, *index[1:]) if index else index

    n = sum(m.n for _, m in blocks)
    histogram = np.sum([m.ulp_histogram for _, m in blocks], axis=0)
    start_abs, by_abs = max(blocks, key=lambda b: b[1].max_abs_error)
    start_rel, by_rel = max(blocks, key=lambda b: b[1].max_rel_error)
    start_worst, worst = max(blocks, key=lambda b: (b[1].max_ratio, b[1].worst_ulp))
    return Metrics(
        n=n,
        mismatched=sum(m.mismatched for _, m in blocks),
        max_ulp=max(m.max_ulp for _, m in blocks),
        p50_ulp=_histogram_quantile(histogram, 0.5),
        p99_ulp=_histogram_quantile(histogram, 0.99),
        frac_correctly_rounded=sum(m.frac_correctly_rounded * m.n for _, m in blocks) / n,
        frac_faithful=sum(m.frac_faithful * m.n for _, m in blocks) / n,
        max_abs_error=by_abs.max_abs_error,
        max_abs_index=shifted(start_abs, by_abs.max_abs_index),
        max_rel_error=by_rel.max_rel_error,
        max_rel_index=shifted(start_rel, by_rel.max_rel_index),
        max_ratio=worst.max_ratio,
        worst_index=shifted(start_worst, worst.worst_index),
        worst_actual=worst.worst_actual,
        worst_reference=worst.worst_reference,
        worst_ulp=worst.worst_ulp,
        worst_tolerance_ulp=worst.worst_tolerance_ulp,
        nonfinite_mismatches=sum(m.nonfinite_mismatches for _, m in blocks),
        ulp_histogram=[int(c) for c in histogram],
    )


def _histogram_quantile(histogram: np.ndarray, q: float) -> float:
    """The upper edge of the histogram bin holding the ``q`` quantile."""
    rank = math.ceil(q * (int(histogram.sum()) - 1)) + 1
    bin_index = int(np.searchsorted(np.cumsum(histogram), rank))
    edges = ULP_HISTOGRAM_EDGES
    return float(edges[bin_index]) if bin_index < len(edges) else float(edges[-1])
