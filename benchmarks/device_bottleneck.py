"""GPU rows of issue 25 (bottleneck adapters, LoMo), for a lent H100/H200: one script, one process.

1. Correctness at the real size first: the Triton bottleneck kernels (forward and backward) against the
   fp64 reference, error ≤ 2x torch's own bf16 error (+1e-2 of the output scale), for relu / silu / gelu.
2. The layer row (ANCHORS-style: bf16, M8192, hidden 4096, bottleneck 64): fused op vs the unfused
   `h + nn.Sequential(Linear, act, Linear)(h)` and torch.compile of it, fwd+bwd, peak memory, saved bytes
   (benchmarks/bench_bottleneck.py's cases).  Target (reported, not enforced): fused ≤ 0.7x unfused.
3. LoMo / AdaLomo vs SGD / AdamW: full fine-tuning step of an 8-layer Llama (hidden 2048), step time and
   the most gradient bytes alive at once.

    python benchmarks/device_bottleneck.py --out device_out/bottleneck.json
Exit status 1 when a correctness check fails (timings still print).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_bottleneck  # noqa: E402

from fastpeft import backend  # noqa: E402
from fastpeft.ops.bottleneck import bottleneck_adapter, reference_forward  # noqa: E402


def check_kernels() -> bool:
    ok = True
    for act in ("relu", "silu", "gelu"):
        for m, hidden, r in ((8192, 4096, 64), (1001, 4000, 48)):
            torch.manual_seed(0)
            dt = torch.bfloat16
            h = torch.randn(m, hidden, device="cuda", dtype=dt, requires_grad=True)
            ws = [(torch.randn(s, device="cuda") * s[-1] ** -0.5).to(dt).requires_grad_()
                  for s in ((r, hidden), (r,), (hidden, r), (hidden,))]
            dy = torch.randn(m, hidden, device="cuda", dtype=dt)
            y64 = reference_forward(h.double(), *[w.double() for w in ws], act)
            g64 = torch.autograd.grad(y64, [h, *ws], dy.double())
            y_pt = reference_forward(h, *ws, act)
            g_pt = torch.autograd.grad(y_pt, [h, *ws], dy)
            with backend.use_backend("triton"):
                y = bottleneck_adapter(h, *ws, act=act)
            used = backend.last_backend("bottleneck_adapter")
            g = torch.autograd.grad(y, [h, *ws], dy)
            for name, a, b, c in zip(("y", "dh", "dW_d", "db_d", "dW_u", "db_u"), (y, *g), (y64, *g64),
                                     (y_pt, *g_pt)):
                err = (a.double() - b).abs().max().item()
                ref = (c.double() - b).abs().max().item()
                good = err <= 2 * ref + 1e-2 * b.abs().max().item()
                ok &= good and used == "triton"
                print(f"{'ok ' if good else 'BAD'} {act} M{m} H{hidden} r{r} {name}: err {err:.3e} torch {ref:.3e}"
                      f" backend {used}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 1
    ok = check_kernels()
    bench_bottleneck.main(["--out", args.out] if args.out else [])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
