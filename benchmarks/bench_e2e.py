"""End-to-end training step (forward + backward + AdamW) of a Llama-style model built from a
config, per method: fastpeft vs PEFT eager vs torch.compile(PEFT) vs the frozen model floor.

The same code as `fastpeft bench --e2e-only`; every option of `fastpeft bench` applies:

    python benchmarks/bench_e2e.py                          # ANCHORS model on a GPU, tiny on a CPU
    python benchmarks/bench_e2e.py --methods lora --preset 7b --out results/
"""

import sys

from fastpeft.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--e2e-only", *sys.argv[1:]]))
