"""``report.json``: the report of record, read and written.

The document is :meth:`RunRecord.to_dict` (schema ``normconf.report``, version
:data:`SCHEMA_VERSION`; the README documents every field) with the run's ``coverage``
(:mod:`conformance.coverage`, derived from the checks, ignored on reading) beside the checks,
written as strict JSON: the float
fields of the metrics and ``duration_s`` may be NaN or infinite (an adapter that returned NaN),
and JSON has no such numbers, so they are written as the strings ``"nan"``, ``"inf"`` and
``"-inf"`` and turned back into floats on reading. Writing is atomic: a reader (or a crashed
run) never sees half a report.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

from conformance.coverage import coverage
from conformance.results import GRADES, VERDICTS, Metrics, RunRecord, SpeedResult

#: The Metrics fields that hold floats (and so may hold NaN or infinities).
_METRIC_FLOATS = frozenset(f.name for f in fields(Metrics) if f.type == "float")
#: The SpeedResult fields that hold floats (NaN where a timed call raised).
_SPEED_FLOATS = frozenset(f.name for f in fields(SpeedResult) if "float" in str(f.type))
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def dumps(record: RunRecord) -> str:
    """The JSON text of ``record`` (strict JSON, two-space indent, trailing newline)."""
    document = encode_nonfinite({**record.to_dict(), "coverage": coverage(record.checks)})
    text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False, default=_scalar)
    return text + "\n"


def loads(text: str, source: str = "report") -> RunRecord:
    """The record in JSON ``text``; ``ValueError`` naming ``source`` if it is not a valid report."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a report is a JSON object, not {type(data).__name__}")
    try:
        record = RunRecord.from_dict(decode_nonfinite(data))
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{source}: not a valid normconf report ({_describe(exc)})") from None
    _validate(record, data, source)
    return record


def write_json(record: RunRecord, path: str | os.PathLike[str]) -> Path:
    """Write ``record`` to ``path`` atomically; returns the path."""
    return write_text_atomic(path, dumps(record))


def read_json(path: str | os.PathLike[str]) -> RunRecord:
    """The record stored at ``path``.

    Raises ``ValueError`` (with the path and the reason) when the file is not a normconf report
    of this schema version; ``OSError`` when it cannot be read at all.
    """
    text = Path(path).read_text(encoding="utf-8")
    return loads(text, source=os.fspath(path))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file in the same directory and
    ``os.replace``, so the path holds either the old content or the new, never a part."""
    target = Path(path)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp makes the file private (0600); a report is as readable as any new file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return target


def encode_nonfinite(value: Any) -> Any:
    """``value`` (a JSON-able document) with every non-finite float as its string."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: encode_nonfinite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [encode_nonfinite(item) for item in value]
    return value


def _scalar(value: Any) -> Any:
    # NumPy scalars (an index or a count that slipped through as np.int64) become Python ones.
    item = getattr(value, "item", None)
    if callable(item):
        return encode_nonfinite(item())
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def decode_nonfinite(data: dict[str, Any]) -> dict[str, Any]:
    """A report document with the non-finite strings of its checks' metrics, durations and
    speed results turned back into floats."""
    speed = data.get("speed")
    if isinstance(speed, list):
        data = {
            **data,
            "speed": [
                {k: _float(v) if k in _SPEED_FLOATS else v for k, v in r.items()}
                if isinstance(r, dict)
                else r
                for r in speed
            ],
        }
    checks = data.get("checks")
    if not isinstance(checks, list):
        return data
    decoded = []
    for check in checks:
        if isinstance(check, dict):
            check = dict(check)
            check["duration_s"] = _float(check.get("duration_s", 0.0))
            if isinstance(check.get("metrics"), dict):
                check["metrics"] = {
                    k: _float(v) if k in _METRIC_FLOATS else v for k, v in check["metrics"].items()
                }
        decoded.append(check)
    return {**data, "checks": decoded}


def _float(value: Any) -> Any:
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    return value


def _validate(record: RunRecord, data: dict[str, Any], source: str) -> None:
    """Values the dataclasses do not check themselves: verdicts, grades, the stored verdict."""
    for i, check in enumerate(record.checks):
        if check.verdict not in VERDICTS:
            raise ValueError(
                f"{source}: check {i} has verdict {check.verdict!r}, not in {VERDICTS}"
            )
        if check.grade is not None and check.grade not in GRADES:
            raise ValueError(f"{source}: check {i} has grade {check.grade!r}, not in {GRADES}")
    for i, result in enumerate(record.speed):
        if result.verdict not in VERDICTS:
            raise ValueError(
                f"{source}: speed result {i} has verdict {result.verdict!r}, not in {VERDICTS}"
            )
    if data.get("verdict") != record.verdict:
        raise ValueError(
            f"{source}: stored verdict {data.get('verdict')!r} disagrees with its checks "
            f"({record.verdict!r})"
        )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}"
    return str(exc)
