"""What the adapter is doing right now, for the watchdog of an isolated run.

Every call the suite makes into an adapter's code (the forward call, autograd's backward, the
statistics, the determinism re-run, each timed call) is made inside :func:`calling`, which
records in memory shared with the parent process the stage and the moment the call began. The parent
(:mod:`conformance.worker`) reads it to tell a slow adapter from a hung one: a worker that stays
inside one call longer than the ``--timeout`` is killed, and the check fails with "no answer in
S s from the <stage>". Outside a worker (an in-process run) the hooks do nothing.

Marking a call costs two stores into shared memory, under a microsecond: cheap enough to sit
inside a timed call. Adapter code can also run outside these marks (a finalizer, a thread it
started); the parent bounds a whole request too, more loosely (:mod:`conformance.worker`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# The stages a call can be in; the shared memory holds an index into this table.
STAGES = (
    "",
    "forward call",
    "backward pass",
    "statistics call",
    "determinism re-run",
    "determinism backward pass",
    "provided-buffer call",
    "timed forward",
    "timed backward",
    "forward before a timed backward",
    "loading of the adapter",
    "device check after the case",
)

# [stage index, monotonic seconds when the call began]; 0 in the first slot: not calling.
_shared: Any = None


def install(shared: Any) -> None:
    """Report to ``shared`` (a two-slot array of doubles in shared memory) from now on."""
    global _shared
    _shared = shared


def begin(stage: str) -> None:
    """The adapter's code starts (or goes on with another call of) ``stage`` now."""
    if _shared is not None:
        _shared[1] = time.monotonic()
        _shared[0] = STAGES.index(stage)


def end() -> None:
    """The adapter's code returned control to the suite."""
    if _shared is not None:
        _shared[0] = 0


@contextmanager
def calling(stage: str) -> Iterator[None]:
    """Mark the block as a call into the adapter's code, in ``stage``."""
    begin(stage)
    try:
        yield
    finally:
        end()


def read(shared: Any) -> tuple[str, float] | None:
    """(stage, monotonic start) of the call in progress, or None between calls."""
    index = int(shared[0])
    if index == 0:
        return None
    return STAGES[index], float(shared[1])
