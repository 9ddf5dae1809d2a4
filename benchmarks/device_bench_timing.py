"""GPU check of the bench's timing and plots (issue 18), for the device machine:

    python benchmarks/device_bench_timing.py --out "$OUT/bench_timing"      # about 2-4 minutes

1. `fastpeft.bench.timing.measure` on CUDA (triton.testing.do_bench) for a bf16 matmul: q20 <= q50 <= q80,
   the median within 25 % of a plain CUDA-event median of the same call, a peak-memory figure.
2. `fastpeft bench --quick --preset small --no-compile --out DIR`: every timed record has q20/q80 and
   timer "triton.testing.do_bench", peak memory is reported, speed.png and memory.png are written.
Prints one line per check and exits 1 when one fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="device_out/bench_timing")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("device_bench_timing: no CUDA device")
        return 1
    from fastpeft.bench.cli import main as bench_main
    from fastpeft.bench.timing import measure

    failures = []

    def check(ok: bool, what: str) -> None:
        print(("ok   " if ok else "FAIL ") + what, flush=True)
        if not ok:
            failures.append(what)

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    fn = lambda: a @ a  # noqa: E731
    m = measure(fn, warmup=5, repeats=20, device="cuda")
    times = []
    for _ in range(30):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    ref = statistics.median(times)
    check(m.timer == "triton.testing.do_bench", f"timer {m.timer}")
    check(m.q20_ms <= m.median_ms <= m.q80_ms, f"quantiles {m.q20_ms:.4f} <= {m.median_ms:.4f} <= {m.q80_ms:.4f} ms")
    check(abs(m.median_ms - ref) <= 0.25 * ref, f"do_bench median {m.median_ms:.4f} ms vs CUDA events {ref:.4f} ms")
    check(m.peak_mib is not None and m.peak_mib >= 31, f"peak {m.peak_mib} MiB (output 32 MiB)")

    os.makedirs(args.out, exist_ok=True)
    code = bench_main(["--quick", "--preset", "small", "--no-compile", "--out", args.out])
    check(code == 0, f"fastpeft bench exit {code}")
    with open(os.path.join(args.out, "results.json")) as f:
        doc = json.load(f)
    timed = [c for c in doc["cases"] if c["status"] == "ok"]
    check(bool(timed) and all(c["timer"] == "triton.testing.do_bench" and c["q20_ms"] <= c["median_ms"] <= c["q80_ms"]
                              for c in timed), f"{len(timed)} timed records carry do_bench quantiles")
    check(all(c["peak_mib"] is not None for c in timed), "every timed record has a peak")
    for name in ("speed.png", "memory.png"):
        check(os.path.isfile(os.path.join(args.out, name)), f"{name} written")
    print(f"device_bench_timing: {'FAILED ' + str(len(failures)) if failures else 'all checks passed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
