"""What ``normconf certify`` shows while it runs: a progress bar over the cases, and a line per
timed configuration of the speed battery (each also streamed to the report directory)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, TextIO

from conformance.cases import Case
from conformance.results import CheckResult, RunRecord, SpeedResult
from conformance.summary import printable

if TYPE_CHECKING:
    from conformance.stream import StreamWriter


class ProgressBar:
    """One line on a terminal, redrawn; a line every ~10% when not a terminal."""

    def __init__(self, stream: TextIO, enabled: bool = True) -> None:
        self.stream, self.enabled = stream, enabled
        self.tty = stream.isatty()
        self.started = time.perf_counter()
        self.failed = 0
        self.last_decile = -1

    def __call__(self, done: int, total: int, case: Case, results: list[CheckResult]) -> None:
        self.failed += sum(r.verdict == "fail" for r in results)
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        width = 30
        filled = width * done // max(total, 1)
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} cases "
            f"{self.failed} failed {elapsed:5.1f}s  {case.case_id[:60]}"
        )
        if self.tty:
            self.stream.write("\r" + line.ljust(120)[:120])
            if done == total:
                self.stream.write("\n")
        elif 10 * done // max(total, 1) != self.last_decile:
            self.last_decile = 10 * done // max(total, 1)
            self.stream.write(line + "\n")
        self.stream.flush()


class SpeedProgress:
    """One line per timed configuration (the speed battery is short and slow), and each result
    streamed to the report directory."""

    def __init__(
        self,
        out: TextIO,
        enabled: bool = True,
        stream: StreamWriter | None = None,
        record: RunRecord | None = None,
    ) -> None:
        self.stream, self.enabled, self.results, self.record = out, enabled, stream, record

    def __call__(self, done: int, total: int, result: SpeedResult) -> None:
        if self.results is not None:
            if done == 1 and self.record is not None and self.record.ceiling is not None:
                self.results.ceiling(self.record.ceiling)
            self.results.speed(result)
        if self.enabled:
            self.stream.write(
                f"speed {done}/{total} {result.speed_id}: {result.verdict} "
                f"{printable(result.message, 100)}\n"
            )
            self.stream.flush()
