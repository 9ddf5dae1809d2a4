"""IA3 layer benchmark: fastpeft's fused kernels vs the frozen base layer, PEFT's eager IA3 layer
and torch.compile(PEFT layer), both modes (output scaling; feed-forward input scaling), forward +
backward and forward alone, with peak memory.

    python benchmarks/bench_ia3.py                  # the full grid (GPU)
    python benchmarks/bench_ia3.py --quick          # the ANCHORS subset (GPU) / tiny cases (CPU)
    python benchmarks/bench_ia3.py --out ia3.json

Outputs and gradients are checked against PEFT before timing.  On a machine without CUDA the tiny
cases run the torch reference: CPU figures, not kernel figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lora import Proj, Row, check, print_table, time_provider, try_compile, write_json  # noqa: E402

from fastpeft.backend import last_backend  # noqa: E402
from fastpeft.ops import ia3_linear  # noqa: E402


def ia3_case(m: int, k: int, n: int, feedforward: bool, dtype: torch.dtype, device: str, repeats: int,
             with_compile: bool) -> Row:
    from peft import IA3Config, get_peft_model

    mode = "feedforward" if feedforward else "output"
    row = Row({"M": m, "K": k, "N": n, "mode": mode, "dtype": str(dtype).split(".")[-1]})
    torch.manual_seed(0)
    model = Proj(k, n, device, dtype)
    nn.init.normal_(model.proj.weight, std=k ** -0.5)
    base = model.proj
    base.weight.requires_grad_(False)
    config = IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if feedforward else [])
    layer = get_peft_model(model, config).base_model.model.proj  # peft.tuners.ia3.Linear
    layer.train()
    ia3_l = layer.ia3_l["default"]
    with torch.no_grad():
        ia3_l.add_(0.1 * torch.randn_like(ia3_l))  # PEFT starts at 1: move away so scaling shows
    weight = base.weight
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, n, device=device, dtype=dtype)
    l = ia3_l.detach().clone().requires_grad_(True)

    def fast():
        return ia3_linear(x, weight, None, l, feedforward)

    def results(fn, vec):
        y = fn()
        y.backward(dy)
        out = {"y": y.detach(), "dx": x.grad.clone(), "dl": vec.grad.clone()}
        x.grad = vec.grad = None
        return out

    got = results(fast, l)
    ran = last_backend("ia3_linear")
    if device == "cuda" and ran == "torch":
        raise AssertionError("fastpeft ran its torch reference on CUDA: the kernels did not apply")
    row.notes.append(f"fastpeft backend: {ran}")
    check("fastpeft vs PEFT", got, results(lambda: layer(x), ia3_l), dtype)

    time_provider(row, "base", lambda: base(x), dy, [x], device, repeats)
    time_provider(row, "peft", lambda: layer(x), dy, [x, ia3_l], device, repeats)
    if with_compile:
        compiled = try_compile(layer, x, row)
        if compiled is not None:
            time_provider(row, "compile", lambda: compiled(x), dy, [x, ia3_l], device, repeats)
    time_provider(row, "fastpeft", fast, dy, [x, l], device, repeats)
    return row


def ia3_grid(quick: bool, device: str) -> list[tuple]:
    if device != "cuda":
        return [(64, 96, 80, False), (64, 96, 80, True)]
    if quick:  # the ANCHORS rows
        return [(8192, 4096, 4096, False), (8192, 4096, 4096, True)]
    return [(m, k, n, ff) for m in (2048, 8192) for k, n in ((4096, 4096), (4096, 11008), (11008, 4096))
            for ff in (False, True)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the ANCHORS subset (tiny cases on a CPU)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile(PEFT) provider")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda":
        print("No CUDA device: tiny cases through the torch reference backend; these are CPU "
              "reference figures, not kernel figures (torch.compile skipped).")
    warnings.filterwarnings("ignore", module="peft")
    rows = []
    for m, k, n, ff in ia3_grid(args.quick, device):
        rows.append(ia3_case(m, k, n, ff, torch.bfloat16, device, args.repeats,
                             with_compile=device == "cuda" and not args.no_compile))
        print(f"done M{m} {k}->{n} {'feedforward' if ff else 'output'}", file=sys.stderr)
    print_table(rows, ["base", "fastpeft", "peft", "compile"], lambda c: f"M{c['M']} {c['K']}->{c['N']} {c['mode']}")
    if args.out:
        write_json(args.out, "ia3", rows, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
