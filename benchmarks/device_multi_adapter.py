"""GPU rows of issue 15 (mixed-adapter LoRA), for the lent H100: one script, one process.

1. Correctness at real sizes first: the grouped op through "triton" and "cuda" against the torch
   path (bf16 activations, fp32 adapters, prefill and decode sizes, forward and gradients).
2. ANCHORS' mixed-adapter model (Llama-style, 8 layers, hidden 2048, MLP 5632, 16 heads, vocab 32000,
   random weights, bf16, r16 on all linears): B32 × 256 prefill for the bare model, one adapter and
   2/4/8 adapters mixed (rows round-robin), fastpeft and PEFT; then generate 64 tokens at B32, one
   adapter vs 8 mixed.  CUDA-event medians after warm-up (20/80 percentiles), outputs checked first.
3. The targets: 8 mixed prefill ≤ 1.15x bare, mixed ≤ 1.05x single, decode 8 mixed ≤ 1.2x one adapter.

    python benchmarks/device_multi_adapter.py --out device_out/multi_adapter.json
    python benchmarks/device_multi_adapter.py --quick        # 2 layers, fewer rounds
Exit status 1 when a correctness check fails (the timings still print); targets are reported, not enforced.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch

import fastpeft
from fastpeft import backend
from fastpeft.ops.grouped_lora import grouped_lora_linear, plan_groups


def cuda_time(fn, rounds: int, warmup: int = 3) -> tuple[float, float, float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return statistics.median(times), q[0], q[-1]


def check_backends() -> list[str]:
    failures = []
    torch.manual_seed(0)
    K, N = 2048, 5632
    for tokens, rows in ((256, 32), (1, 32)):
        x = torch.randn(rows, tokens, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(torch.bfloat16)
        ranks = [16, 8, 16, 32, 16, 4, 16, 16]
        A = [(torch.randn(r, K, device="cuda") / K ** 0.5).requires_grad_() for r in ranks]
        B = [(torch.randn(N, r, device="cuda") * 0.1).requires_grad_() for r in ranks]
        names = [f"a{b % 9}" if b % 9 < 8 else "__base__" for b in range(rows)]
        plan = plan_groups(names, tokens, "cuda")
        idx = [int(n[1:]) for n in plan.names]
        args = ([A[i] for i in idx], [B[i] for i in idx], [2.0] * len(idx))
        gy = torch.randn(rows, tokens, N, device="cuda", dtype=torch.bfloat16)
        results = {}
        for name in ("torch", "triton", "cuda"):
            with backend.use_backend(name):
                y = grouped_lora_linear(x, w, None, plan, *args)
                ran = backend.last_backend("grouped_lora")
                grads = torch.autograd.grad(y, [x, *args[0], *args[1]], gy)
            if ran != name:
                why = backend.why_not("grouped_lora", name, x, w, None, args[0], args[1], (0.0,) * len(idx))
                failures.append(f"{name} did not run (ran {ran}): {why}")
                continue
            results[name] = (y, grads)
        ref_y, ref_g = results["torch"]
        for name, (y, grads) in results.items():
            err = ((y.float() - ref_y.float()).norm() / ref_y.float().norm()).item()
            gerr = max(((g.float() - r.float()).norm() / r.float().norm().clamp_min(1e-30)).item()
                       for g, r in zip(grads, ref_g))
            ok = err < 2e-2 and gerr < 2e-2
            print(f"check {name:6s} tokens/row {tokens:4d}: output rel err {err:.2e}, worst grad rel err {gerr:.2e}"
                  f" {'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append(f"{name} at {tokens} tokens/row: errors {err:.2e} / {gerr:.2e}")
    return failures


def build(layers: int, n: int, with_peft: bool):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                   num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                                   max_position_embeddings=4096)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    lora = dict(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    names = [f"a{i}" for i in range(n)]
    theirs = None
    if with_peft:
        import copy

        import peft

        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora), adapter_name=names[0])
        for name in names[1:]:
            theirs.add_adapter(name, peft.LoraConfig(**lora))
        theirs.eval()
    ours = fastpeft.get_peft_model(base, fastpeft.LoraConfig(**lora), adapter_name=names[0])
    for name in names[1:]:
        ours.add_adapter(name, fastpeft.LoraConfig(**lora))
    if theirs is not None:
        ours.load_state_dict(theirs.state_dict(), strict=False)
    return ours.eval(), theirs, names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-peft", dest="peft", action="store_false")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 2
    layers, rounds, decode = (2, 5, 16) if args.quick else (8, 10, 64)
    failures = check_backends()
    rows, B, T = {}, 32, 256
    ids = torch.randint(1, 32000, (B, T), device="cuda")
    ours, theirs, names = build(layers, 8, args.peft)
    with torch.no_grad():
        def bare():
            with ours.disable_adapter():
                ours(input_ids=ids)
        rows["prefill bare"] = cuda_time(bare, rounds)
        rows["prefill fastpeft single"] = cuda_time(lambda: ours(input_ids=ids), rounds)
        if theirs is not None:
            rows["prefill peft single"] = cuda_time(lambda: theirs(input_ids=ids), rounds)
        for n in (2, 4, 8):
            rn = [names[b % n] for b in range(B)]
            if theirs is not None:
                a = ours(input_ids=ids, adapter_names=rn).logits.float()
                b = theirs(input_ids=ids, adapter_names=rn).logits.float()
                err = ((a - b).norm() / b.norm()).item()
                print(f"{n} mixed: fastpeft vs PEFT logits rel err {err:.2e}")
                if err > 3e-2:
                    failures.append(f"{n} mixed logits differ from PEFT ({err:.2e})")
                rows[f"prefill peft mixed {n}"] = cuda_time(lambda: theirs(input_ids=ids, adapter_names=rn), rounds)
            rows[f"prefill fastpeft mixed {n}"] = cuda_time(lambda: ours(input_ids=ids, adapter_names=rn), rounds)
            print(f"backend for the mixed layers: {backend.last_backend('grouped_lora')}")
        kw = dict(max_new_tokens=decode, min_new_tokens=decode, do_sample=False, pad_token_id=0)
        prompt = ids[:, :16]
        r8 = [names[b % 8] for b in range(B)]
        rows["decode fastpeft single"] = cuda_time(lambda: ours.generate(input_ids=prompt, **kw), 3, 1)
        rows["decode fastpeft mixed 8"] = cuda_time(
            lambda: ours.generate(input_ids=prompt, adapter_names=r8, **kw), 3, 1)
        if theirs is not None:
            rows["decode peft single"] = cuda_time(lambda: theirs.generate(input_ids=prompt, **kw), 3, 1)
            rows["decode peft mixed 8"] = cuda_time(
                lambda: theirs.generate(input_ids=prompt, adapter_names=r8, **kw), 3, 1)
    print(f"\n| case (B{B}x{T}, {layers} layers, bf16) | median ms | p20 | p80 |\n|---|---|---|---|")
    for k, (m, lo, hi) in rows.items():
        print(f"| {k} | {m:.2f} | {lo:.2f} | {hi:.2f} |")
    bare_ms = rows["prefill bare"][0]
    targets = {
        "8 mixed prefill / bare (<= 1.15)": rows["prefill fastpeft mixed 8"][0] / bare_ms,
        "8 mixed prefill / single (<= 1.05)": rows["prefill fastpeft mixed 8"][0] / rows["prefill fastpeft single"][0],
        f"decode {decode}: 8 mixed / single (<= 1.2)":
            rows["decode fastpeft mixed 8"][0] / rows["decode fastpeft single"][0],
    }
    print()
    for k, v in targets.items():
        print(f"target {k}: {v:.3f}x")
    if args.out:
        meta = {"bench": "device_multi_adapter", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "fastpeft": fastpeft.__version__,
                "git": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows, "targets": targets, "failures": failures}, f, indent=1)
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
