"""Timing and memory measurement shared by every benchmark.

CUDA: `triton.testing.do_bench` (CUDA events, L2 cache flushed before each repeat, warm-up first)
with its quantiles 20 / 50 / 80; peak memory from the allocator's statistics reset per case, taken
on one extra call.  CPU: `torch.utils.benchmark.Timer` (`blocked_autorange`, with the thread count
torch uses, not the Timer's default of one), the same quantiles over its per-block times; no memory
figure (there is no allocator to ask).  The CPU figures are reference figures, not kernel figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

QUANTILES = (0.2, 0.5, 0.8)


@dataclass
class Measurement:
    median_ms: float
    peak_mib: float | None  # peak allocated during one call, above what was allocated before it
    repeats: int
    q20_ms: float | None = None
    q80_ms: float | None = None
    timer: str = ""  # what measured it: "triton.testing.do_bench" or "torch.utils.benchmark"
    times_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def quantiles_ms(self) -> dict[str, float | None]:
        return {"q20": self.q20_ms, "q50": self.median_ms, "q80": self.q80_ms}


def quantiles(times: list[float], qs: tuple[float, ...] = QUANTILES) -> list[float]:
    """Quantiles of `times` by linear interpolation (numpy's and `triton.testing.do_bench`'s rule)."""
    if not times:
        raise ValueError("no times to take quantiles of")
    ordered = sorted(times)
    out = []
    for q in qs:
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        out.append(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))
    return out


def _cuda_measure(fn: Callable[[], object], warmup: int, repeats: int, memory_baseline: int | None) -> Measurement:
    """do_bench flushes the L2 cache before every repeat (what a training step meets), always."""
    import triton.testing

    for _ in range(max(1, warmup)):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated() if memory_baseline is None else memory_baseline
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    estimate = max(start.elapsed_time(end), 1e-3)
    # do_bench takes its warm-up and measuring budgets in ms and repeats the call to fill them: at
    # least `repeats` calls, and at least 100 ms of them so that short kernels get a stable median
    rep_ms = max(estimate * repeats, 100.0)
    q20, q50, q80 = triton.testing.do_bench(fn, warmup=max(estimate * warmup, 25.0), rep=rep_ms,
                                            quantiles=list(QUANTILES))
    return Measurement(float(q50), peak, max(repeats, int(rep_ms / estimate)), float(q20), float(q80),
                       "triton.testing.do_bench")


def _cpu_measure(fn: Callable[[], object], warmup: int, repeats: int) -> Measurement:
    from torch.utils import benchmark

    for _ in range(max(1, warmup // 2)):
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    # at least min(repeats, max(3, repeats / 4)) samples, more (blocks of several calls for fast
    # functions) for about 0.2 s: a stable median on a busy CPU, and slow cases do not take minutes
    least = min(repeats, max(3, repeats // 4))
    m = timer.blocked_autorange(min_run_time=0.2)
    times = [t * 1e3 for t in m.times]
    while len(times) < least:
        times += [t * 1e3 for t in timer.timeit(1).times]
    q20, q50, q80 = quantiles(times)
    return Measurement(q50, None, len(times), q20, q80, "torch.utils.benchmark", times)


def measure_interleaved_cpu(fns: list[Callable[[], object]], *, warmup: int = 5, repeats: int = 20,
                            min_run_time: float = 0.2) -> list[Measurement]:
    """CPU: the medians of several functions timed side by side, in rounds that call each in turn (a
    block of calls each), so that a busy or drifting machine slows all of them alike and their ratios
    hold; each gets about `min_run_time` seconds over at least `repeats` rounds, as `measure` does."""
    import time

    for fn in fns:
        for _ in range(max(1, warmup // 2)):
            fn()
    once = []
    for fn in fns:
        t0 = time.perf_counter()
        fn()
        once.append(max(time.perf_counter() - t0, 1e-6))
    calls = [max(1, int(0.01 / t)) for t in once]  # blocks of about 10 ms
    rounds = max(repeats, int(min_run_time / max(c * t for c, t in zip(calls, once))))
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(calls[i]):
                fn()
            times[i].append((time.perf_counter() - t0) / calls[i] * 1e3)
    out = []
    for ts in times:
        q20, q50, q80 = quantiles(ts)
        out.append(Measurement(q50, None, len(ts), q20, q80, "interleaved rounds (time.perf_counter)", ts))
    return out


def measure(fn: Callable[[], object], *, warmup: int = 5, repeats: int = 20, device: str = "cuda",
            memory_baseline: int | None = None) -> Measurement:
    """Median time of `fn()` with its 20 % and 80 % quantiles, and its peak memory (CUDA only).

    The peak is counted above what was allocated just before the measured call, or above
    `memory_baseline` (bytes, e.g. `torch.cuda.memory_allocated()` taken before a model was
    built) when given, so that a training step's peak includes its model and optimizer state."""
    if device == "cuda" and torch.cuda.is_available():
        return _cuda_measure(fn, warmup, repeats, memory_baseline)
    return _cpu_measure(fn, warmup, repeats)


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
