"""The words of a failure: one place that turns a :class:`CheckResult` into text.

The pytest plugin, the terminal summary and every report show the same text, shaped like
``numpy.testing``'s assertion messages::

    Mismatched elements: 3 / 4096 (0.07%)
    Max abs error: 1.20e-03 at index (17, 4001)
    Max rel error: 2.35e-03 at index (17, 4001)
    Worst element (ratio 3.1 to tolerance) at (17, 4001):
      ACTUAL 0.51234 DESIRED 0.5111 (24 ulp; tolerance 7.7 ulp)
    Grade: fail; 41.2% correctly rounded, 93.0% faithful; max 24 ulp, p99 3 ulp
    Diagnosis: ...
    Reproduce: normconf certify --adapter torch --case ... --seed 0

A check without metrics (an exception, a wrong shape or dtype) shows its ``message`` instead of
the metric lines. :func:`reproduction_command` is the one way to build the command line that
reruns a check; the engine stores its result in ``CheckResult.reproduce``.
"""

from __future__ import annotations

import math
import shlex
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

from conformance.results import CheckResult, Metrics

#: How each grade reads in words (the grade names themselves are identifiers).
GRADE_WORDS = {
    "correctly_rounded": "correctly rounded",
    "faithful": "faithful",
    "within_tolerance": "within tolerance",
    "fail": "fail",
}


def reproduction_command(
    case_id: str, adapter_spec: str, seed: int, extra: Sequence[str] = ()
) -> str:
    """The copy-pasteable command that reruns one case of one adapter.

    ``normconf certify --adapter SPEC --case CASE_ID --seed N [EXTRA...]``, every argument
    quoted for a POSIX shell, so that a spec with spaces or shell metacharacters (a file path,
    ``pkg.module:attr``) survives the paste unchanged.
    """
    argv = [
        "normconf",
        "certify",
        "--adapter",
        adapter_spec,
        "--case",
        case_id,
        "--seed",
        str(int(seed)),
        *extra,
    ]
    return shlex.join(argv)


def grade_words(grade: str | None) -> str:
    """A grade in words; ``None`` (an ungraded check) reads as ``ungraded``."""
    if grade is None:
        return "ungraded"
    return GRADE_WORDS.get(grade, grade)


def failure_message(check: CheckResult, *, include_reproduction: bool = True) -> str:
    """The full explanation of a check's outcome, one fact per line.

    Metric lines first (when the check has metrics), then the check's own ``message`` when it
    adds something, then ``Diagnosis:`` and ``Reproduce:``. The first line alone is a fair
    one-line summary (JUnit's ``message`` attribute uses it). Reports that show the
    reproduction separately pass ``include_reproduction=False``. The message, the diagnosis and
    the command (whose adapter spec is a path the adapter's author chose) pass through
    :func:`visible`, so the text is safe to print to a terminal.
    """
    lines: list[str] = []
    if check.metrics is not None:
        lines.extend(metric_lines(check.metrics, check.dtype, check.grade))
    if check.message:
        lines.extend(visible(check.message).splitlines())
    if not lines:
        lines.append(f"{check.kind} check of {check.output}: {check.verdict}")
    if check.diagnosis:
        lines.append(f"Diagnosis: {visible(check.diagnosis)}")
    if include_reproduction and check.reproduce:
        lines.append(f"Reproduce: {visible(check.reproduce)}")
    return "\n".join(lines)


def is_control(ch: str) -> bool:
    """Whether ``ch`` is a control, format or line/paragraph separator character."""
    category = unicodedata.category(ch)
    return category[0] == "C" or category in ("Zl", "Zp")


def visible(text: str) -> str:
    """``text`` with control and format characters other than newline and tab written as
    escapes (``\\x1b``, ``\\u202e``): an adapter's exception text cannot drive the terminal or
    reorder what is shown, and the reader still sees what was there."""
    text = text.replace("\r\n", "\n")
    return "".join(ch if ch in "\n\t" or not is_control(ch) else ascii(ch)[1:-1] for ch in text)


def first_line(check: CheckResult) -> str:
    """The one-line summary of :func:`failure_message`."""
    return failure_message(check, include_reproduction=False).split("\n", 1)[0]


def metric_lines(metrics: Metrics, dtype: str, grade: str | None) -> list[str]:
    """The numpy.testing-style lines for one comparison's metrics."""
    m = metrics
    lines = [
        f"Mismatched elements: {m.mismatched} / {m.n} ({_percent(m.mismatched, m.n, 2)})",
        f"Max abs error: {_error(m.max_abs_error)} at index {_index(m.max_abs_index)}",
        f"Max rel error: {_error(m.max_rel_error)} at index {_index(m.max_rel_index)}",
        f"Worst element (ratio {_short(m.max_ratio)} to tolerance) at {_index(m.worst_index)}:",
        f"  ACTUAL {format_value(m.worst_actual, dtype)} "
        f"DESIRED {format_value(m.worst_reference, dtype)} "
        f"({_short(m.worst_ulp)} ulp; tolerance {_short(m.worst_tolerance_ulp)} ulp)",
    ]
    if m.nonfinite_mismatches:
        lines.append(f"Non-finite mismatches: {m.nonfinite_mismatches} / {m.n}")
    lines.append(
        f"Grade: {grade_words(grade)}; "
        f"{_fraction(m.frac_correctly_rounded)} correctly rounded, "
        f"{_fraction(m.frac_faithful)} faithful; "
        f"max {_short(m.max_ulp)} ulp, p99 {_short(m.p99_ulp)} ulp"
    )
    return lines


def format_value(value: float, dtype: str) -> str:
    """``value`` with as few digits as identify it in ``dtype`` (float64's repr otherwise).

    Falls back to the float64 form when ``dtype`` is unknown or ``value`` is not a value of it
    (an output written in another dtype), so the text never shows a value that was not there.
    """
    np_dtype = _numpy_dtype(dtype)
    if np_dtype is not None and math.isfinite(value):
        with np.errstate(over="ignore"):  # a value beyond the dtype's range is not of it
            narrowed: Any = np.asarray(value, dtype=np.float64).astype(np_dtype)[()]
        if float(narrowed) == value:
            return str(narrowed)
    return repr(float(value))


def _numpy_dtype(name: str) -> np.dtype[Any] | None:
    if name == "bfloat16":
        import ml_dtypes  # registers bfloat16 with numpy only once imported

        bfloat16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bfloat16
    try:
        dtype = np.dtype(name)
    except TypeError:
        return None
    return dtype if dtype.kind == "f" else None


def _index(index: Sequence[int]) -> str:
    return str(tuple(int(i) for i in index))


def _error(x: float) -> str:
    return f"{x:.2e}" if math.isfinite(x) else str(x)


def _short(x: float) -> str:
    return f"{x:.3g}"


def _fraction(frac: float) -> str:
    return _percent_text(100.0 * frac, frac < 1.0, frac > 0.0, 1)


def _percent(part: int, whole: int, digits: int) -> str:
    if whole <= 0:
        return "n/a"
    return _percent_text(100.0 * part / whole, part < whole, part > 0, digits)


def _percent_text(percent: float, below_all: bool, above_none: bool, digits: int) -> str:
    # Rounding must not claim "100%" of elements when one is missing, nor "0%" when one is there.
    text = f"{percent:.{digits}f}"
    unit = 10.0**-digits
    if below_all and float(text) >= 100.0:
        return f">{100.0 - unit:.{digits}f}%"
    if above_none and float(text) <= 0.0:
        return f"<{unit:.{digits}f}%"
    return f"{text}%"
