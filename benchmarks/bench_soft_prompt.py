"""Soft-prompt embedding benchmark: fastpeft's one-pass kernel (soft_prompt_embed: prompt rows and
word rows written straight into the (B, P+T, H) output, backward reduced into the prompt table)
vs PEFT's path (embedding lookup + prompt repeated over the batch + torch.cat), forward +
backward, with peak memory.

    python benchmarks/bench_soft_prompt.py              # B8 T1024 H4096 P32 bf16, shared and mixed-task (GPU)
    python benchmarks/bench_soft_prompt.py --quick      # the shared case only (GPU) / tiny shapes (CPU)
    python benchmarks/bench_soft_prompt.py --out soft_prompt.json

Outputs and gradients are checked against PEFT's path before anything is timed.  Without CUDA the
tiny cases run fastpeft's torch reference: CPU figures, not kernel figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
import torch.nn.functional as F

import fastpeft
from fastpeft.backend import last_backend
from fastpeft.bench.timing import measure
from fastpeft.ops import soft_prompt_embed

OP = "soft_prompt_embed"


def peft_path(input_ids, weight, table, prompt_index):
    """What PEFT's prompt tuning does: embed the words, look the prompt up for every row, cat."""
    words = F.embedding(input_ids, weight)
    B = input_ids.shape[0]
    if prompt_index is None:
        prompts = table.unsqueeze(0).expand(B, -1, -1)  # PEFT embeds prompt_tokens repeated B times
    else:
        prompts = table[prompt_index]
    return torch.cat([prompts.to(words.dtype), words], dim=1)


def run_case(B, T, H, P, N, V, dtype, device, train_embeddings, repeats):
    gen = torch.Generator(device="cpu").manual_seed(0)
    input_ids = torch.randint(0, V, (B, T), generator=gen).to(device)
    weight = (torch.randn(V, H, generator=gen) * 0.02).to(device=device, dtype=dtype).requires_grad_(train_embeddings)
    shape = (P, H) if N == 1 else (N, P, H)
    table = (torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=torch.float32).requires_grad_(True)
    prompt_index = None if N == 1 else torch.randint(0, N, (B,), generator=gen).to(device)
    dout = torch.randn(B, P + T, H, generator=gen).to(device=device, dtype=dtype)
    params = [table] + ([weight] if train_embeddings else [])

    def step(fn):
        def run():
            for p in params:
                p.grad = None
            fn(input_ids, weight, table, prompt_index).backward(dout)
        return run

    # check before timing: the same output and gradients as PEFT's path
    results = {}
    for name, fn in (("peft", peft_path), ("fastpeft", soft_prompt_embed)):
        for p in params:
            p.grad = None
        out = fn(input_ids, weight, table, prompt_index)
        out.backward(dout)
        results[name] = (out.detach(), [p.grad.clone() for p in params])
    backend = last_backend(OP)
    if device == "cuda" and backend != "cuda":
        raise SystemExit(f"fastpeft ran its {backend} backend on CUDA: the CUDA kernel did not apply "
                         f"({fastpeft.backend.why_not(OP, 'cuda', input_ids, weight, table, prompt_index)})")
    (out_p, grads_p), (out_f, grads_f) = results["peft"], results["fastpeft"]
    assert torch.equal(out_p, out_f), "fastpeft's output differs from PEFT's path"
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 4e-3}[dtype]
    for name, gp, gf in zip(["d_table", "d_embedding"], grads_p, grads_f):
        err = ((gf.double() - gp.double()).norm() / gp.double().norm().clamp_min(1e-30)).item()
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.1e} against PEFT's path"

    row = {"B": B, "T": T, "H": H, "P": P, "prompts": "shared" if N == 1 else f"mixed-task N={N}", "V": V,
           "dtype": str(dtype).split(".")[-1], "train_embeddings": train_embeddings, "fastpeft_backend": backend}
    for name, fn in (("peft", peft_path), ("fastpeft", soft_prompt_embed)):
        m = measure(step(fn), device=device, repeats=repeats)
        row[f"{name}_ms"] = m.median_ms
        row[f"{name}_peak_mib"] = m.peak_mib
    row["speedup"] = row["peft_ms"] / row["fastpeft_ms"]
    return row


def cases(quick: bool, device: str):
    if device != "cuda":
        # (B, T, H, P, N, V, train_embeddings): tiny, for the torch reference on the CPU
        grid = [(2, 16, 64, 4, 1, 100, False), (2, 16, 64, 4, 3, 100, True)]
        return grid[:1] if quick else grid
    grid = [(8, 1024, 4096, 32, 1, 32000, False), (8, 1024, 4096, 32, 4, 32000, False),
            (8, 1024, 4096, 32, 1, 32000, True)]
    return grid[:1] if quick else grid


def print_table(rows, device):
    cols = ["B", "T", "H", "P", "prompts", "train_embeddings", "peft_ms", "fastpeft_ms", "speedup", "peft_peak_mib",
            "fastpeft_peak_mib"]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
    table = [cols] + [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    for line in table:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths)))
    if device != "cuda":
        print("(no CUDA: fastpeft ran its torch reference on tiny CPU shapes: CPU figures, not kernel figures)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the shared-prompt case only (tiny on the CPU)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if device != "cuda":
        print("no CUDA device: running tiny shapes through fastpeft's torch reference (not the CUDA kernel)")
    rows = []
    for B, T, H, P, N, V, train in cases(args.quick, device):
        rows.append(run_case(B, T, H, P, N, V, dtype, device, train, args.repeats))
    print_table(rows, device)
    if args.out:
        meta = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                "torch": torch.__version__, "fastpeft": fastpeft.__version__,
                "cuda_backend": fastpeft.info(file=None)["backends"]["cuda"]}
        with open(args.out, "w") as f:
            json.dump({"benchmark": "soft_prompt", "meta": meta, "rows": rows}, f, indent=2, default=str)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
