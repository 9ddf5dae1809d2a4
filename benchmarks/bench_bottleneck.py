"""Bottleneck adapter and LoMo benchmarks.

Bottleneck layer: fastpeft's fused op vs the unfused torch module (h + Sequential(Linear, act, Linear)(h))
and torch.compile of it, forward + backward (adapter weights and h trained), with peak memory (CUDA) and
saved-for-backward bytes.  LoMo: a full fine-tuning step of a Llama-style model with LoMo / AdaLomo vs
SGD and AdamW, step time and the most gradient bytes alive at once (post-accumulate-grad hooks).

    python benchmarks/bench_bottleneck.py                 # GPU: the ANCHORS case (bf16, M8192, hidden 4096, r64)
    python benchmarks/bench_bottleneck.py --quick         # tiny cases (CPU: torch backend, reference figures)
    python benchmarks/bench_bottleneck.py --out bn.json

Each provider's output and gradients are checked against the unfused module before it is timed.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

import fastpeft
from fastpeft.backend import last_backend
from fastpeft.bench.saved_bytes import saved_bytes
from fastpeft.bench.suite import write_results
from fastpeft.bench.timing import measure, release_memory
from fastpeft.ops.bottleneck import bottleneck_adapter
from fastpeft.optim import GradientPeak


class Unfused(nn.Module):
    def __init__(self, hidden: int, r: int, act: str, device, dtype) -> None:
        super().__init__()
        acts = {"relu": nn.ReLU(), "silu": nn.SiLU(), "gelu": nn.GELU()}
        self.seq = nn.Sequential(nn.Linear(hidden, r, device=device, dtype=dtype), acts[act],
                                 nn.Linear(r, hidden, device=device, dtype=dtype))

    def forward(self, h):
        return h + self.seq(h)


def bottleneck_case(m: int, hidden: int, r: int, act: str, dtype: torch.dtype, device: str, repeats: int,
                    with_compile: bool) -> dict:
    torch.manual_seed(0)
    mod = Unfused(hidden, r, act, device, dtype)
    with torch.no_grad():
        mod.seq[2].weight.normal_(0, 0.02)
    down, up = mod.seq[0], mod.seq[2]
    h = torch.randn(m, hidden, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, hidden, device=device, dtype=dtype)
    params = [down.weight, down.bias, up.weight, up.bias]

    def fused():
        return bottleneck_adapter(h, down.weight, down.bias, up.weight, up.bias, act)

    providers = {"fastpeft": fused, "unfused": lambda: mod(h)}
    if with_compile:
        compiled = torch.compile(mod)
        providers["torch.compile(unfused)"] = lambda: compiled(h)

    def grads(fn):
        y = fn()
        g = torch.autograd.grad(y, [h, *params], dy)
        return y.detach(), g

    ref_y, ref_g = grads(providers["unfused"])
    row = {"M": m, "hidden": hidden, "bottleneck": r, "act": act, "dtype": str(dtype).split(".")[-1]}
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for name, fn in providers.items():
        y, g = grads(fn)
        scale = ref_y.abs().max().item()
        err = (y.float() - ref_y.float()).abs().max().item()
        if err > tol * max(1.0, scale):
            raise AssertionError(f"{name}: output differs from the unfused module by {err}")
        for a, b in zip(g, ref_g):
            e = (a.float() - b.float()).abs().max().item()
            if e > tol * max(1.0, b.abs().max().item()):
                raise AssertionError(f"{name}: a gradient differs from the unfused module by {e}")
        if name == "fastpeft":
            row["backend"] = last_backend("bottleneck_adapter")

        def step(fn=fn):
            y = fn()
            torch.autograd.grad(y, [h, *params], dy)

        t = measure(step, repeats=repeats, device=device)
        n_saved, out = saved_bytes(fn, exclude=params)
        del out
        row[f"{name}_ms"] = round(t.median_ms, 4)
        row[f"{name}_q20_q80_ms"] = [t.q20_ms, t.q80_ms]
        row[f"{name}_peak_mib"] = t.peak_mib
        row[f"{name}_saved_mib"] = round(n_saved / 2**20, 3)
        release_memory(device)
    row["fused_vs_unfused"] = round(row["fastpeft_ms"] / row["unfused_ms"], 3)
    row["one_input_mib"] = round(m * hidden * h.element_size() / 2**20, 3)
    return row


def lomo_case(layers: int, hidden: int, inter: int, vocab: int, batch: int, seq: int, dtype, device: str,
              repeats: int) -> list[dict]:
    import transformers

    rows = []
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=max(1, hidden // 128),
                                   num_key_value_heads=max(1, hidden // 128))
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    for name in ("sgd", "adamw", "lomo", "adalomo"):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).train()
        tracker = GradientPeak(model)
        if name == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        elif name == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        elif name == "lomo":
            opt = fastpeft.optim.LoMo(model, lr=1e-4)
        else:
            opt = fastpeft.optim.AdaLomo(model, lr=1e-4)

        def step():
            loss = model(input_ids=ids, labels=ids).loss
            if name in ("lomo", "adalomo"):
                opt.fused_backward(loss)
            else:
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        t = measure(step, repeats=repeats, device=device, warmup=2)
        largest = max(p.numel() * p.element_size() for p in model.parameters())
        rows.append({"optimizer": name, "step_ms": round(t.median_ms, 3), "peak_mib": t.peak_mib,
                     "grad_peak_mib": round(tracker.peak / 2**20, 3),
                     "largest_param_mib": round(largest / 2**20, 3), "layers": layers, "hidden": hidden,
                     "tokens": batch * seq, "dtype": str(dtype).split(".")[-1]})
        del model, opt
        release_memory(device)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-lomo", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not args.quick:
        bn = [(8192, 4096, 64, "relu", torch.bfloat16), (8192, 4096, 64, "silu", torch.bfloat16),
              (2048, 4096, 64, "relu", torch.bfloat16), (8192, 4096, 256, "relu", torch.bfloat16)]
        lomo = (8, 2048, 5632, 32000, 4, 1024, torch.bfloat16)
        repeats = 50
    else:
        bn = [(256, 128, 16, "relu", torch.float32), (509, 192, 24, "silu", torch.float32)]
        lomo = (2, 128, 256, 512, 2, 64, torch.float32)
        repeats = 10
    rows = [bottleneck_case(*c, device=device, repeats=repeats, with_compile=not args.no_compile and device == "cuda")
            for c in bn]
    for r in rows:
        print(json.dumps(r))
    lomo_rows = [] if args.no_lomo else lomo_case(*lomo, device=device, repeats=max(3, repeats // 10))
    for r in lomo_rows:
        print(json.dumps(r))
    if args.out:
        write_results(args.out, "bottleneck", device,
                      figures="kernel" if device == "cuda" else "CPU reference (torch backend), not kernel figures",
                      bottleneck=rows, lomo=lomo_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
