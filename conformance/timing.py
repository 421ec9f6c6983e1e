"""How normconf times a call, and the bandwidth ceiling it measures beside it.

Every timing goes through :func:`time_calls`, the same way every time:

* **Rotating inputs.** The caller prepares several independently drawn input sets whose bytes
  together exceed the last-level cache (the GPU's L2, the CPU's L3), and call ``i`` uses set
  ``i mod sets``: no call finds its inputs in the cache the previous call left behind. Inputs
  are drawn from a normal distribution, never zeros (a kernel may shortcut zeros, and memory
  compression on some GPUs makes zeros cheap to move).
* **CPU**: warm-up calls, then timed rounds (``time.perf_counter`` around each call) until at
  least :attr:`Budget.min_rounds` rounds and :attr:`Budget.seconds` of timing, at most
  :attr:`Budget.max_rounds`.
* **CUDA**: CUDA events around each call, the L2 cache flushed (a buffer of twice its size
  overwritten) before each; a call shorter than :attr:`Budget.graph_below_s` (launch overhead
  would dominate) is captured, once per input set, into a CUDA graph whose replays are timed
  with events around each whole replay, divided by the number of calls in it.
* A ``prepare(i)`` callback runs before each call, untimed: the forward pass that builds the
  graph a timed backward pass consumes (each backward gets a fresh graph).
* The figures are per call: the median, the quartiles (spread) and the minimum.

:func:`measure_ceiling` times a large copy on the same device — device to device on a GPU
(``dst.copy_(src)``), a tensor copy into a preallocated buffer on the CPU, at least twice the
last-level cache and 256 MiB — whose bytes read
plus written per second is the practical ceiling of a memory-bound kernel there; beside it,
:data:`DATASHEET_GBPS` gives the datasheet peak of known GPUs.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Datasheet memory bandwidth (GB/s, 10⁹ bytes per second) of known GPUs, by a substring of
#: ``torch.cuda.get_device_name()``; the first match wins, so specific names come first.
DATASHEET_GBPS: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),
    ("GH200", 4000.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("L40", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
    ("V100", 900.0),
    ("T4", 320.0),
)

#: Assumed last-level cache when the machine does not say (bytes).
DEFAULT_CACHE_BYTES = 32 * 2**20


@dataclass(frozen=True)
class Budget:
    """How long to time one call."""

    warmup: int = 3
    min_rounds: int = 10
    max_rounds: int = 500
    seconds: float = 0.3
    graph_below_s: float = 20e-6


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one timed function."""

    samples: tuple[float, ...]
    method: str

    @property
    def rounds(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p25(self) -> float:
        return _quantile(self.samples, 0.25)

    @property
    def p75(self) -> float:
        return _quantile(self.samples, 0.75)

    @property
    def minimum(self) -> float:
        return min(self.samples)


def _quantile(samples: tuple[float, ...], q: float) -> float:
    ordered = sorted(samples)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def cache_bytes(device: str) -> int:
    """The last-level cache of ``device``: the GPU's L2, or the largest CPU cache sysfs lists."""
    if device == "cuda":
        import torch

        size = int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0))
        return size or 50 * 2**20
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=DEFAULT_CACHE_BYTES)


def sets_needed(bytes_per_set: int, device: str, *, limit: int = 16) -> int:
    """Input sets to rotate through so that together they hold at least twice the cache
    (at least 2, at most ``limit``)."""
    need = -(-2 * cache_bytes(device) // max(bytes_per_set, 1))
    return max(2, min(limit, need))


Prepare = Callable[[int], Any] | None


def time_calls(
    call: Callable[[int], Any],
    sets: int,
    device: str,
    budget: Budget | None = None,
    *,
    prepare: Prepare = None,
) -> Timing:
    """Time ``call(i)``, ``i`` cycling through ``range(sets)`` (see the module docstring).

    ``prepare(i)``, when given, runs before each call, untimed (the forward pass that builds the
    graph a timed backward pass consumes); such calls are never captured into a CUDA graph.
    """
    budget = budget or Budget()
    if device == "cuda":
        return _time_cuda(call, sets, budget, prepare)
    return _time_cpu(call, sets, budget, prepare)


def _time_cpu(call: Callable[[int], Any], sets: int, budget: Budget, prepare: Prepare) -> Timing:
    for i in range(budget.warmup):
        if prepare is not None:
            prepare(i % sets)
        call(i % sets)
    samples: list[float] = []
    started = time.perf_counter()
    i = 0
    while len(samples) < budget.max_rounds:
        if prepare is not None:
            prepare(i % sets)
        t0 = time.perf_counter()
        call(i % sets)
        samples.append(time.perf_counter() - t0)
        i += 1
        if len(samples) >= budget.min_rounds and time.perf_counter() - started >= budget.seconds:
            break
    return Timing(tuple(samples), "cpu-perf-counter")


def _time_cuda(call: Callable[[int], Any], sets: int, budget: Budget, prepare: Prepare) -> Timing:
    import torch

    flush = torch.empty(2 * cache_bytes("cuda"), dtype=torch.uint8, device="cuda")
    for i in range(budget.warmup):
        if prepare is not None:
            prepare(i % sets)
        call(i % sets)
    torch.cuda.synchronize()
    probe = _events_per_call(call, sets, flush, prepare, rounds=min(sets, 5))
    if prepare is None and statistics.median(probe) < budget.graph_below_s:
        return _time_graph(call, sets, budget)
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < budget.max_rounds:
        samples += _events_per_call(
            call, sets, flush, prepare, rounds=min(sets, 10), first=len(samples)
        )
        enough = len(samples) >= budget.min_rounds
        if enough and time.perf_counter() - started >= budget.seconds:
            break
    return Timing(tuple(samples), "cuda-events, L2 flushed")


def _events_per_call(
    call: Callable[[int], Any],
    sets: int,
    flush: Any,
    prepare: Prepare,
    *,
    rounds: int,
    first: int = 0,
) -> list[float]:
    """Seconds of ``rounds`` calls, each between two events, the L2 flushed before each (after
    the untimed ``prepare``)."""
    import torch

    pairs = []
    for k in range(rounds):
        if prepare is not None:
            prepare((first + k) % sets)
        flush.fill_(k & 0xFF)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call((first + k) % sets)
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in pairs]


def _time_graph(call: Callable[[int], Any], sets: int, budget: Budget) -> Timing:
    """Capture one call per input set into a CUDA graph; time whole replays with events."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
        for i in range(sets):
            call(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(sets):
            call(i)
    graph.replay()
    torch.cuda.synchronize()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < budget.max_rounds:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / sets)
        enough = len(samples) >= budget.min_rounds
        if enough and time.perf_counter() - started >= budget.seconds:
            break
    return Timing(tuple(samples), f"cuda-graph replay of {sets} calls")


def measure_ceiling(device: str, budget: Budget | None = None) -> dict[str, Any]:
    """The copy bandwidth of ``device``, measured now (see the module docstring).

    Returns ``{"device", "name", "method", "bytes", "gbps", "median_s", "datasheet_gbps"}``:
    ``bytes`` counts what one copy reads and writes (twice the buffer), ``gbps`` is bytes per
    median second / 10⁹; ``datasheet_gbps`` is None where the GPU is not in
    :data:`DATASHEET_GBPS` (and on the CPU).
    """
    import torch

    buffer_bytes = max(2 * cache_bytes(device), 256 * 2**20)
    if device == "cpu":
        buffer_bytes = min(buffer_bytes, _cpu_copy_cap())
    elements = buffer_bytes // 4
    generator = torch.Generator(device=device).manual_seed(0)
    src = torch.empty(elements, device=device).uniform_(1.0, 2.0, generator=generator)
    dst = torch.empty_like(src)
    budget = budget or Budget(warmup=2, min_rounds=5, seconds=0.5)
    timing = time_calls(lambda _i: dst.copy_(src), 1, device, budget)
    moved = 2 * elements * 4
    name, datasheet = _device_name(device), None
    if device == "cuda":
        datasheet = next((gbps for key, gbps in DATASHEET_GBPS if key in name), None)
    method = "device-to-device copy" if device == "cuda" else "tensor copy, CPU memory"
    return {
        "device": device,
        "name": name,
        "method": f"{method} of {buffer_bytes / 2**20:.0f} MiB ({timing.method})",
        "bytes": moved,
        "median_s": timing.median,
        "gbps": moved / timing.median / 1e9,
        "datasheet_gbps": datasheet,
        "threads": torch.get_num_threads() if device == "cpu" else None,
    }


def _cpu_copy_cap() -> int:
    """At most a quarter of the machine's memory for the CPU copy's two buffers."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 256 * 2**20
    return max(64 * 2**20, pages * size // 8)


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return str(torch.cuda.get_device_name(0))
    from conformance.engine import cpu_model

    return cpu_model()
