"""Compiled fastpeft against compiled PEFT: one training step (forward + backward) of a tiny Llama
(2 layers, hidden 128, MLP 352, 4 heads / 2 KV heads, vocab 256, batch 2 x 64, fp32) for every method
and the options that change the code path, eager and `torch.compile` (inductor) side by side in one
process, one CPU thread, medians of interleaved rounds.  The compiled fastpeft / compiled PEFT ratio
is the bar of issue "Under torch.compile".

    python benchmarks/bench_compile.py                       # every config (a few minutes: 12 compiles)
    python benchmarks/bench_compile.py --configs lora,lora_dropout --rounds 9 --out compile.json
    python benchmarks/bench_compile.py --preset tiny   # the model and batch of `fastpeft bench`'s CPU preset
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

import fastpeft
from fastpeft.bench.overhead import interleaved_medians
from fastpeft.bench.saved_bytes import batch, tiny_llama
from fastpeft.bench.suite import write_results

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "lora": lambda lib: lib.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules=LINEARS),
    "lora_dropout": lambda lib: lib.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05,
                                               target_modules=LINEARS),
    "ia3": lambda lib: lib.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                     feedforward_modules=["down_proj"]),
    "prefix": lambda lib: lib.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16),
    "prompt": lambda lib: lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16),
    "ptuning": lambda lib: lib.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=16,
                                                   encoder_hidden_size=128),
}


def _step(model, data):
    def step():
        model(**data).loss.backward()
    return step


def _model_and_batch(preset: str | None):
    """This script's tiny Llama and batch, or those of a `fastpeft bench` preset (its e2e model and batch)."""
    if preset is None:
        return tiny_llama(), batch(B=2, T=64)
    from fastpeft.bench.e2e import build_model
    from fastpeft.bench.presets import PRESETS

    p = PRESETS[preset]
    ids = torch.randint(0, p.model.vocab, (p.batch, p.seq), generator=torch.Generator().manual_seed(500))
    return build_model(p, torch.float32, "cpu"), {"input_ids": ids, "labels": ids}


def measure(config: str, rounds: int, calls: int, preset: str | None = None) -> dict:
    import peft

    base, data = _model_and_batch(preset)
    models = {}
    for name, lib in (("peft", peft), ("fastpeft", fastpeft)):
        model = lib.get_peft_model(copy.deepcopy(base), CONFIGS[config](lib)).train()
        models[name] = model
        models[name + "_compiled"] = torch.compile(model, fullgraph=True)
    steps = {name: _step(m, data) for name, m in models.items()}
    # compiled and warmed up before any is timed, then timed in interleaved rounds
    ms = dict(zip(steps, (us / 1e3 for us in interleaved_medians(list(steps.values()), rounds, calls, warmup=3))))
    torch._dynamo.reset()
    return {"config": config, "model": preset or "tiny Llama (hidden 128, 2 x 64)", **{k: round(v, 3) for k, v in ms.items()},
            "compiled_ratio": round(ms["fastpeft_compiled"] / ms["peft_compiled"], 3),
            "eager_ratio": round(ms["fastpeft"] / ms["peft"], 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (the median is reported)")
    ap.add_argument("--calls", type=int, default=5, help="steps per round")
    ap.add_argument("--preset", default=None, help="time the model and batch of this `fastpeft bench` preset "
                    "(tiny: its CPU preset) instead of this script's tiny Llama")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown config {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    torch.set_num_threads(1)
    rows = []
    print(f"{'config':<14} {'PEFT':>8} {'compile(PEFT)':>14} {'fastpeft':>9} {'compile(fastpeft)':>18} "
          f"{'compiled ratio':>15} {'eager ratio':>12}   (ms per step)")
    for config in configs:
        r = measure(config, args.rounds, args.calls, args.preset)
        rows.append(r)
        print(f"{config:<14} {r['peft']:>8.2f} {r['peft_compiled']:>14.2f} {r['fastpeft']:>9.2f} "
              f"{r['fastpeft_compiled']:>18.2f} {r['compiled_ratio']:>14.2f}x {r['eager_ratio']:>11.2f}x", flush=True)
    if args.out:
        write_results(args.out, "compile", rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
