"""FSDP2 on GPUs: per-rank peak memory of `Trainer(fsdp=True)` against DDP on the bench preset.

    torchrun --nproc-per-node 2 benchmarks/device_fsdp.py --out $OUT/fsdp      # needs >= 2 GPUs
    python benchmarks/device_fsdp.py --out $OUT/fsdp                            # one GPU: DDP-free baseline only

Each rank trains the bench preset (bf16 base, LoRA r16 all-linear, dropout 0.05, 8 × 1024 tokens a rank)
for a few steps, once unsharded (DDP; one process: plain) and once with fsdp=True, and reports
torch.cuda.max_memory_allocated per rank beside `fastpeft.training.memory_plan`'s plan.  The issue's
target: FSDP peak at two ranks <= 0.6x the one-GPU peak.  Writes OUT/fsdp_rank{R}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random

import torch


def _records(n: int, length: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"input_ids": [rng.randrange(3, 259) for _ in range(length)]} for _ in range(n)]


def run(fsdp: bool, steps: int, batch: int, seq: int) -> dict:
    import fastpeft
    from fastpeft.training import TrainArgs, Trainer, build_preset
    from fastpeft.training.memory_plan import SHAPES, plan

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = build_preset("bench", dtype=torch.bfloat16)
    config = fastpeft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    args = TrainArgs(max_steps=steps, batch_size=batch, max_seq_len=seq, mixed_precision="bf16", fsdp=fsdp,
                     warmup_steps=0, log_every=steps, progress=False)
    trainer = Trainer(model, args, _records(batch * world * steps, seq - 2), peft_config=config)
    torch.cuda.synchronize()
    result = trainer.train()
    planned = plan(SHAPES["bench"], world, fsdp=fsdp, tokens=batch * seq)
    out = {"fsdp": trainer.fsdp, "world": world, "rank": trainer.rank, "peak_bytes": result.peak_memory_bytes,
           "step_s": result.seconds / steps, "planned_total_bytes": planned["total"],
           "param_bytes": trainer.parameter_bytes(), "loss": result.train_loss}
    del trainer
    torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("device_fsdp.py needs CUDA")
    os.makedirs(a.out, exist_ok=True)
    rows = [run(False, a.steps, a.batch, a.seq)]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.cuda.reset_peak_memory_stats()
        rows.append(run(True, a.steps, a.batch, a.seq))
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(a.out, f"fsdp_rank{rank}.json"), "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, fh, indent=2)
    for row in rows:
        print(f"rank {rank} {'fsdp' if row['fsdp'] else 'unsharded'} x{row['world']}: peak "
              f"{row['peak_bytes'] / 2**30:.2f} GiB (plan {row['planned_total_bytes'] / 2**30:.2f}), "
              f"{row['step_s'] * 1e3:.0f} ms/step", flush=True)


if __name__ == "__main__":
    main()
