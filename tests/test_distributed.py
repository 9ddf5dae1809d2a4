"""Data parallelism on the CPU: two `gloo` processes (launched the way torchrun does, through RANK /
WORLD_SIZE / MASTER_PORT) end with identical adapters, equal to one process on the same global batch."""

import os
import sys
import textwrap

import pytest
import torch

from tests.utils import launch_ranks

WORKER = textwrap.dedent('''
    import atexit, json, os, sys, torch
    torch.set_num_threads(1)

    def probe():  # registered first, so it runs after the trainer's exit handler (atexit is LIFO)
        with open(os.path.join(sys.argv[1], f"exit{os.environ.get('RANK', '0')}.txt"), "w") as fh:
            fh.write(str(torch.distributed.is_initialized()))
    atexit.register(probe)
    import fastpeft
    from fastpeft.training import DEFAULT_DATA, TrainArgs, Trainer, build_preset

    out, batch_size = sys.argv[1], int(sys.argv[2])
    with open(DEFAULT_DATA) as fh:
        records = [json.loads(line) for line in fh][:72]
    config = fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    args = TrainArgs(output_dir=out, max_steps=5, batch_size=batch_size, grad_accum=2, learning_rate=1e-2,
                     warmup_steps=1, save_every=2, eval_fraction=0.1, log_every=1, seed=0)
    trainer = Trainer(build_preset("tiny"), args, records, peft_config=config)
    result = trainer.train()
    state = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    torch.save({"params": state, "eval_loss": result.eval_loss, "world": trainer.world_size,
                "loss": result.train_loss}, f"{out}/rank{trainer.rank}.pt")
''')


def _launch(script, out, batch_size, world):
    return [stderr for _, stderr in launch_ranks(script, [out, batch_size], world)]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_equal_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    _launch(script, single, batch_size=4, world=1)          # global batch 4 × 2 accum = 8
    logs = _launch(script, ddp, batch_size=2, world=2)      # global batch 2 × 2 accum × 2 ranks = 8

    ref = torch.load(single / "rank0.pt")
    r0, r1 = torch.load(ddp / "rank0.pt"), torch.load(ddp / "rank1.pt")
    assert r0["world"] == r1["world"] == 2 and ref["world"] == 1
    for name, value in ref["params"].items():
        assert torch.equal(r0["params"][name], r1["params"][name]), f"ranks disagree on {name}"
        torch.testing.assert_close(r0["params"][name], value, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert r0["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert r0["eval_loss"] == r1["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)
    # only rank 0 prints and writes
    assert "step 5/5" in logs[0] and "2 process(es)" in logs[0] and "step" not in logs[1]
    assert sorted(n for n in os.listdir(ddp) if n.startswith("checkpoint-")) == [
        "checkpoint-000002", "checkpoint-000004", "checkpoint-000005"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(ddp))
    # the process group is destroyed before the interpreter exits (a live gloo group aborted ~1 run in 8:
    # "terminate called without an active exception")
    assert [(ddp / f"exit{r}.txt").read_text() for r in (0, 1)] == ["False", "False"]
