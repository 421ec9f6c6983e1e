"""How a worker process ended, in words: the signal or exit status, the stage it was in, and the
stack ``faulthandler`` wrote at the moment (see :mod:`conformance.worker`)."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

_SUITE = str(Path(__file__).resolve().parent) + os.sep


@dataclass(frozen=True)
class Death:
    """How a worker ended: an exit code (negative: the signal), or no answer within
    ``timeout`` seconds; ``stage``: the call into the adapter it was in (None: none)."""

    code: int | None
    stage: str | None
    trace: str
    timeout: float | None = None

    def reason(self) -> str:
        where = f"in the {self.stage}" if self.stage else "outside any call into the adapter"
        if self.timeout is not None:
            return f"no answer in {self.timeout:g} s {where.replace('in the', 'from the', 1)}"
        if self.code is not None and self.code < 0:
            try:
                sig = signal.Signals(-self.code)
                name = f"{sig.name} ({signal.strsignal(sig) or sig.name})"
            except ValueError:
                name = f"signal {-self.code}"
            return f"crashed with {name} {where}"
        return f"the worker process exited with status {self.code} {where}"

    def diagnosis(self) -> str | None:
        """The stack, introduced, or None where there is none."""
        if not self.trace:
            return None
        return f"where the adapter was (most recent call first):\n{self.trace}"


@dataclass(frozen=True)
class Idle:
    """A worker that died before it took up the request it was sent (after its last answer)."""

    death: Death


def innermost_frames(text: str, limit: int = 8) -> str:
    """faulthandler's dump cut to one thread's innermost frames (most recent call first), up to
    the first frame of the suite's own code: where in the adapter it was. The thread is the one
    that runs the suite (a frame of the suite's code in its stack), else the first listed."""
    blocks: list[list[str]] = []
    header = ""
    for line in (raw.strip() for raw in text.splitlines()):
        if line.startswith(("Thread 0x", "Current thread 0x")):
            blocks.append([])  # one thread's stack follows
        elif line.startswith("File "):
            if not blocks:
                blocks.append([])
            blocks[-1].append(line)
        elif line.startswith("Fatal Python error"):
            header = header or line
    blocks = [b for b in blocks if b]
    if not blocks:
        return header
    chosen = next((b for b in blocks if any(_SUITE in f for f in b)), blocks[0])
    frames: list[str] = []
    for frame in chosen:
        frames.append(frame)
        if len(frames) == limit or _SUITE in frame:
            break
    return "\n".join(([header] if header else []) + frames)
