"""``results.jsonl``: every result written to the report directory the moment it exists.

A run that is interrupted — Ctrl-C, ``kill -9``, a power cut — leaves a readable partial record:
``normconf report DIR`` rebuilds ``report.json``, ``report.md``, ``report.html`` and
``junit.xml`` from it, and ``normconf certify --resume DIR`` runs only the cases it lacks.

One JSON object per line (the encoding of :mod:`conformance.report_json`: NaN and infinities as
strings), each line written whole, flushed and synced before the run goes on:

``{"type": "run", ...}``
    first line: the run's facts (adapter, hardware, software, seed, quick, started, command).
``{"type": "case", "case_id": ID, "checks": [...]}``
    one line per finished case, with all its checks: a case is in the record whole or not at all.
``{"type": "ceiling", ...}``, ``{"type": "speed", ...}``
    the speed battery's ceiling and each timing (:class:`conformance.results.SpeedResult`).
``{"type": "end", "finished": TIME}``
    last line of a run that completed.

A line cut short by the interruption (the last one) is ignored; any other line that is not a
valid record makes the file unreadable, with the line number in the error.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from conformance.report_json import decode_nonfinite, encode_nonfinite
from conformance.results import CheckResult, RunRecord, SpeedResult

STREAM_FILE = "results.jsonl"
#: The run facts a ``run`` line carries (the fields of :class:`RunRecord` but the results).
RUN_FIELDS = ("adapter", "hardware", "software", "seed", "quick", "started", "command")


@dataclass
class Stream:
    """What a ``results.jsonl`` holds."""

    run: dict[str, Any]
    cases: dict[str, list[CheckResult]] = field(default_factory=dict)
    #: by speed id: a resumed run times its speed battery again, and the later result stands
    speed: dict[str, SpeedResult] = field(default_factory=dict)
    ceiling: dict[str, Any] | None = None
    finished: str = ""

    def record(self) -> RunRecord:
        """The run as far as it got (``finished`` empty when it did not complete)."""
        return RunRecord(
            **{k: self.run[k] for k in RUN_FIELDS},
            finished=self.finished,
            checks=[check for checks in self.cases.values() for check in checks],
            speed=list(self.speed.values()),
            ceiling=self.ceiling,
        )


class StreamWriter:
    """Appends results to ``DIR/results.jsonl`` as they are produced."""

    def __init__(self, directory: str | os.PathLike[str], record: RunRecord, *, resume: bool):
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        self.path = target / STREAM_FILE
        if not resume:
            self.path.unlink(missing_ok=True)
        self._file: IO[str] = self.path.open("a", encoding="utf-8", newline="\n")
        if not resume:
            self._line({"type": "run", **{k: getattr(record, k) for k in RUN_FIELDS}})

    def case(self, case_id: str, checks: list[CheckResult]) -> None:
        self._line({"type": "case", "case_id": case_id, "checks": [c.to_dict() for c in checks]})

    def speed(self, result: SpeedResult) -> None:
        self._line({"type": "speed", **result.to_dict()})

    def ceiling(self, ceiling: dict[str, Any]) -> None:
        self._line({"type": "ceiling", **ceiling})

    def end(self, finished: str) -> None:
        self._line({"type": "end", "finished": finished})
        self._file.close()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def _line(self, document: dict[str, Any]) -> None:
        text = json.dumps(encode_nonfinite(document), ensure_ascii=False, allow_nan=False)
        self._file.write(text + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())


def read_stream(directory: str | os.PathLike[str]) -> Stream:
    """The contents of ``DIR/results.jsonl``; ``ValueError`` (one line, with the path) when
    there is none or it is damaged anywhere but its last line."""
    path = Path(directory) / STREAM_FILE
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file: not a report directory of a run") from None
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last complete line
    stream: Stream | None = None
    for number, line in enumerate(lines, 1):
        try:
            document = json.loads(line)
            stream = _apply(stream, document)
        except (ValueError, KeyError, TypeError) as exc:
            if number == len(lines):  # cut short by the interruption
                break
            raise ValueError(f"{path}:{number}: not a result line ({exc})") from None
    if stream is None:
        raise ValueError(f"{path}: holds no run line: the run did not start")
    return stream


def _apply(stream: Stream | None, document: Any) -> Stream:
    kind = document["type"]
    if kind == "run":
        if stream is not None:
            raise ValueError("a second run line")
        return Stream(run={k: document[k] for k in RUN_FIELDS})
    if stream is None:
        raise ValueError(f"a {kind!r} line before the run line")
    if kind == "case":
        decoded = decode_nonfinite({"checks": document["checks"]})["checks"]
        stream.cases[document["case_id"]] = [CheckResult.from_dict(c) for c in decoded]
    elif kind == "speed":
        speed = decode_nonfinite({"speed": [{k: v for k, v in document.items() if k != "type"}]})
        result = SpeedResult.from_dict(speed["speed"][0])
        stream.speed[result.speed_id] = result
    elif kind == "ceiling":
        stream.ceiling = {k: v for k, v in document.items() if k != "type"}
    elif kind == "end":
        stream.finished = str(document["finished"])
    else:
        raise ValueError(f"unknown line type {kind!r}")
    return stream


def check_resumable(
    run: Mapping[str, Any], spec: str, seed: int, quick: bool, convention: str
) -> None:
    """A run resumes only with the adapter, seed, battery and conventions it started with;
    ``ValueError`` (to follow the directory's name) says which differs."""
    adapter = run.get("adapter")
    started_with = adapter.get("spec") if isinstance(adapter, dict) else None
    if started_with != spec:
        raise ValueError(f"holds a run of adapter {started_with!r}, not {spec!r}")
    if run.get("seed") != seed or run.get("quick") != quick:
        raise ValueError(
            f"holds a run with seed {run.get('seed')} and "
            f"{'the quick' if run.get('quick') else 'the full'} battery: resume with the same"
        )
    tokens = shlex.split(str(run.get("command", "")))
    started = "declared"
    if "--convention" in tokens[:-1]:
        started = tokens[tokens.index("--convention") + 1]
    if started != convention:
        raise ValueError(
            f"holds a run graded against the {started} conventions: resume with --convention "
            f"{started}"
        )
