"""Host overhead benchmark: microseconds of Python per layer call (forward, forward+backward), one
CPU thread, for each op and backend (torch, torch_philox, Triton with launches stubbed out) side by
side with PEFT eager and the frozen nn.Linear, in one process (see fastpeft/bench/overhead.py).

    python benchmarks/bench_overhead.py                 # all cases
    python benchmarks/bench_overhead.py --rounds 15 --out overhead.json
"""

from __future__ import annotations

import argparse
import sys

from fastpeft.bench.overhead import CASES, measure, table
from fastpeft.bench.suite import write_results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--rounds", type=int, default=11, help="interleaved timing rounds (the median is reported)")
    ap.add_argument("--calls", type=int, default=100, help="calls per round")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    cases = tuple(c for c in args.cases.split(",") if c)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    rows = measure(cases, rounds=args.rounds, calls=args.calls)
    print(table(rows))
    if args.out:
        write_results(args.out, "overhead", rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
