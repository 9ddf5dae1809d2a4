"""Mixed-adapter LoRA batches on the CPU: fastpeft vs HF PEFT, same process, same weights.

For 1/2/4/8 LoRA adapters mixed in one batch (rows assigned round-robin, so no adapter's rows are
contiguous — the harder case for the grouped path), a Llama-style model with random weights, r16 on
all linears: prefill (forward, no grad) and greedy decode, each against the bare model and a single
adapter; plus fastpeft's multi-adapter training step (PEFT refuses adapter_names in training mode).
Outputs of fastpeft and PEFT are checked equal before anything is timed; times are medians of
interleaved rounds (spread: 20th/80th percentiles).

    python benchmarks/bench_multi_adapter.py                   # default sizes, 1 thread
    python benchmarks/bench_multi_adapter.py --quick           # smaller, for a smoke run
    python benchmarks/bench_multi_adapter.py --out multi.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

import fastpeft
from fastpeft.bench.suite import write_results


def _model(args, seed=0):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.heads, max_position_embeddings=4096)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def _configs(n, r):
    return [dict(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False) for _ in range(n)]


def build(args, n_adapters):
    """(fastpeft model, PEFT model or None) with n adapters "a0".."a{n-1}" of identical weights."""
    names = [f"a{i}" for i in range(n_adapters)]
    ours = fastpeft.get_peft_model(_model(args), fastpeft.LoraConfig(**_configs(1, args.r)[0]), adapter_name=names[0])
    for name in names[1:]:
        ours.add_adapter(name, fastpeft.LoraConfig(**_configs(1, args.r)[0]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    theirs = None
    try:
        import peft

        theirs = peft.get_peft_model(_model(args), peft.LoraConfig(**_configs(1, args.r)[0]), adapter_name=names[0])
        for name in names[1:]:
            theirs.add_adapter(name, peft.LoraConfig(**_configs(1, args.r)[0]))
        theirs.load_state_dict(ours.state_dict())
        theirs.eval()
    except ImportError:
        pass
    return ours.eval(), theirs, names


def timed(fns: dict, rounds: int) -> dict:
    """{name: (median, p20, p80) seconds}, the providers interleaved round by round."""
    samples = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    out = {}
    for k, v in samples.items():
        q = statistics.quantiles(v, n=5) if len(v) > 1 else v * 4
        out[k] = (statistics.median(v), q[0], q[-1])
    return out


def run(args) -> list[dict]:
    rows = []
    ids = torch.randint(1, args.vocab, (args.batch, args.tokens), generator=torch.Generator().manual_seed(2))
    gen_kw = dict(max_new_tokens=args.decode, do_sample=False, pad_token_id=0, min_new_tokens=args.decode)
    for n in args.adapters:
        ours, theirs, names = build(args, n)
        row_names = [names[b % n] for b in range(args.batch)]
        with torch.no_grad():
            mixed = ours(input_ids=ids, adapter_names=row_names).logits
            if theirs is not None:
                ref = theirs(input_ids=ids, adapter_names=row_names).logits
                err = ((mixed - ref).norm() / ref.norm()).item()
                if err > 1e-4:
                    raise SystemExit(f"{n} adapters: fastpeft and PEFT mixed outputs differ (rel err {err:.2e})")

            def bare():
                with ours.disable_adapter():
                    ours(input_ids=ids)

            fns = {"bare": bare, "fastpeft single": lambda: ours(input_ids=ids),
                   "fastpeft mixed": lambda: ours(input_ids=ids, adapter_names=row_names)}
            if theirs is not None:
                fns["peft single"] = lambda: theirs(input_ids=ids)
                fns["peft mixed"] = lambda: theirs(input_ids=ids, adapter_names=row_names)
            prefill = timed(fns, args.rounds)
            dec = {}
            if args.decode:
                dfns = {"fastpeft single": lambda: ours.generate(input_ids=ids, **gen_kw),
                        "fastpeft mixed": lambda: ours.generate(input_ids=ids, adapter_names=row_names, **gen_kw)}
                if theirs is not None:
                    dfns["peft single"] = lambda: theirs.generate(input_ids=ids, **gen_kw)
                    dfns["peft mixed"] = lambda: theirs.generate(input_ids=ids, adapter_names=row_names, **gen_kw)
                dec = timed(dfns, max(3, args.rounds // 3))
        train = {}
        if args.train:
            ours.train()
            params = [p for k, p in ours.named_parameters() if "lora_" in k]
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.AdamW(params, lr=1e-4)

            def step():
                opt.zero_grad(set_to_none=True)
                ours(input_ids=ids, adapter_names=row_names, labels=ids).loss.backward()
                opt.step()
            train = timed({"fastpeft mixed train step": step}, max(3, args.rounds // 3))
            ours.eval()
        rows.append({"adapters": n, "prefill": prefill, "decode": dec, "train": train})
    return rows


def table(rows) -> str:
    lines = ["| adapters | bare | fastpeft single | fastpeft mixed | PEFT single | PEFT mixed | fastpeft/PEFT mixed |"
             " decode mixed fastpeft / PEFT | train step (mixed) |",
             "|---|---|---|---|---|---|---|---|---|"]

    def ms(d, k):
        return f"{d[k][0] * 1e3:.2f} ms" if k in d else "-"
    for r in rows:
        p, d, t = r["prefill"], r["decode"], r["train"]
        ratio = f"{p['fastpeft mixed'][0] / p['peft mixed'][0]:.2f}x" if "peft mixed" in p else "-"
        dratio = (f"{ms(d, 'fastpeft mixed')} / {ms(d, 'peft mixed')}" if d else "-")
        lines.append(f"| {r['adapters']} | {ms(p, 'bare')} | {ms(p, 'fastpeft single')} | {ms(p, 'fastpeft mixed')} | "
                     f"{ms(p, 'peft single')} | {ms(p, 'peft mixed')} | {ratio} | {dratio} | "
                     f"{ms(t, 'fastpeft mixed train step') if t else '-'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", default="1,2,4,8", help="comma-separated adapter counts")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--decode", type=int, default=8, help="new tokens for the decode rows (0: skip)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--mlp", type=int, default=704)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-train", dest="train", action="store_false")
    ap.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.mlp, args.rounds, args.decode = 32, 128, 352, 5, 4
    args.adapters = [int(a) for a in args.adapters.split(",") if a]
    torch.set_num_threads(args.threads)
    rows = run(args)
    print(f"mixed-adapter LoRA, CPU ({platform.processor() or platform.machine()}, {args.threads} thread(s)), "
          f"B{args.batch}x{args.tokens}, hidden {args.hidden}, {args.layers} layers, r{args.r} all-linear; "
          f"medians of {args.rounds} rounds")
    print(table(rows))
    if args.out:
        write_results(args.out, "multi_adapter", args={k: v for k, v in vars(args).items() if k != "out"}, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
