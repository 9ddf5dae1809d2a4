"""Timing and memory measurement shared by every benchmark.

CUDA: median of CUDA-event timings after warm-up, L2 flushed before each repeat, peak memory
from the allocator's statistics reset per case.  CPU: median of perf_counter timings (the
figures are then reference figures, not kernel figures).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Measurement:
    median_ms: float
    peak_mib: float | None  # peak allocated during one call, above what was allocated before it
    repeats: int


_L2_FLUSH: torch.Tensor | None = None


def _flush_l2() -> None:
    global _L2_FLUSH
    if _L2_FLUSH is None:
        _L2_FLUSH = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    _L2_FLUSH.zero_()


def measure(fn: Callable[[], object], *, warmup: int = 5, repeats: int = 20, device: str = "cuda",
            flush_l2: bool = True, memory_baseline: int | None = None) -> Measurement:
    """Median time of `fn()` and its peak memory.

    The peak is counted above what was allocated just before the measured call, or above
    `memory_baseline` (bytes, e.g. `torch.cuda.memory_allocated()` taken before a model was
    built) when given, so that a training step's peak includes its model and optimizer state."""
    if device == "cuda" and torch.cuda.is_available():
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() if memory_baseline is None else memory_baseline
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        times = []
        for _ in range(repeats):
            if flush_l2:
                _flush_l2()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return Measurement(statistics.median(times), peak, repeats)
    for _ in range(max(1, warmup // 2)):
        fn()
    # at least min(repeats, max(3, repeats / 4)) calls, more (up to `repeats`) while under 0.2 s:
    # fast calls get enough samples for a stable median on a busy CPU, slow ones do not take minutes
    times: list[float] = []
    spent = 0.0
    least = min(repeats, max(3, repeats // 4))
    while len(times) < least or (len(times) < repeats and spent < 200.0):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        spent += times[-1]
    return Measurement(statistics.median(times), None, len(times))


def memory_allocated(device: str) -> int | None:
    """Bytes the CUDA allocator holds for tensors now (None on the CPU)."""
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return None


def release_memory(device: str) -> None:
    """Free what the previous case left behind so that the next one starts clean."""
    import gc

    gc.collect()
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
