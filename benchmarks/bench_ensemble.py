"""The cost of an ensemble: n prompts (prompt tuning) or n LoRA adapters scored over B inputs in one batch
of n × B rows (`fastpeft.ensemble`, rows routed by prompt_index / adapter_names) against one batch of the
same n × B rows through a single prompt or adapter: the ratio is what the ensemble adds.  Forward passes
(no grad) of the bench's tiny Llama, interleaved rounds, medians.

    python benchmarks/bench_ensemble.py                  # CPU (or the GPU when there is one)
    python benchmarks/bench_ensemble.py --members 3 --batch 8 --seq 64 --out ensemble.json
"""

from __future__ import annotations

import argparse
import sys

import torch

import fastpeft
from fastpeft.bench.e2e import build_model
from fastpeft.bench.overhead import interleaved_medians
from fastpeft.bench.presets import PRESETS
from fastpeft.bench.suite import write_results


def _model(method: str, n: int, device: str):
    preset = PRESETS["tiny" if device == "cpu" else "small"]
    cfg = (lambda: fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=preset.virtual_tokens)) \
        if method == "prompt" else (lambda: fastpeft.LoraConfig(task_type="CAUSAL_LM", r=preset.rank,
                                                                target_modules="all-linear", init_lora_weights=False))
    model = fastpeft.get_peft_model(build_model(preset, torch.float32, device), cfg(), adapter_name="m0")
    for k in range(1, n):
        model.add_adapter(f"m{k}", cfg())
    return model.eval(), preset


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="inputs B (the batch is members × B rows)")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for method in ("prompt", "lora"):
        model, preset = _model(method, args.members, device)
        names = [f"m{k}" for k in range(args.members)]
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, preset.model.vocab, (args.batch, args.seq), generator=g).to(device)
        mask = torch.ones_like(ids)
        kind = dict(prompts=names) if method == "prompt" else dict(adapters=names)
        ens = fastpeft.ensemble(model, **kind)
        big = ids.repeat(args.members, 1)
        big_mask = mask.repeat(args.members, 1)

        def ensemble_call():
            ens.next_token_logprobs(ids, mask)

        def single_call():
            model.set_adapter("m0")
            with torch.no_grad():
                logits = model(input_ids=big, attention_mask=big_mask).logits[:, -1]
                torch.log_softmax(logits.float(), -1)

        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        t_ens, t_one = interleaved_medians([lambda: (ensemble_call(), sync()), lambda: (single_call(), sync())],
                                           rounds=args.rounds, calls=args.calls)
        rows.append({"method": method, "members": args.members, "batch": args.batch, "seq": args.seq,
                     "device": device, "ensemble_ms": round(t_ens / 1e3, 3), "single_ms": round(t_one / 1e3, 3),
                     "ratio": round(t_ens / t_one, 3)})
    print(f"{'method':8s} {'rows':>5s} {'ensemble ms':>12s} {'one adapter ms':>15s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['method']:8s} {r['members'] * r['batch']:5d} {r['ensemble_ms']:12.3f} {r['single_ms']:15.3f} "
              f"{r['ratio']:6.2f}x")
    if args.out:
        write_results(args.out, "ensemble", rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
