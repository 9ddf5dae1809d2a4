"""FSDP2 on the CPU: two `gloo` ranks with the frozen base sharded (`Trainer(fsdp=True)`) train the same
adapter as one process on the same global batch (LoRA with dropout, IA3, QLoRA on an NF4 base), each holding
half the frozen weights (the 4-bit codes and their quantisation state included); the adapter file is PEFT's and loads in HF PEFT; a rank killed mid-save leaves the previous
checkpoint whole and the run resumes from it bit for bit (with activation checkpointing per layer).  `fastpeft train --fsdp` under torchrun gives
the DDP run's adapter, and twenty runs of the distributed CLI in a row exit 0."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.utils import launch_ranks, launch_ranks_any

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

STEPS = 20
WORKER = textwrap.dedent('''
    import json, os, sys, torch
    torch.set_num_threads(1)
    import fastpeft
    from fastpeft.training import DEFAULT_DATA, TrainArgs, Trainer, build_preset
    from fastpeft.training import fsdp as F

    out, use_fsdp, mode = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    with open(DEFAULT_DATA) as fh:
        records = [json.loads(line) for line in fh][:50]
    configs = {
        "lora": lambda: fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear",
                                            task_type="CAUSAL_LM"),
        "ia3": lambda: fastpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                          feedforward_modules=["down_proj"], task_type="CAUSAL_LM"),
    }
    def base(method):
        model = build_preset("tiny")
        if method == "qlora":  # a 4-bit NF4 base (double quantisation), as `fastpeft train --quantize nf4`
            from fastpeft.quant import prepare_model_for_kbit_training, quantize
            model = prepare_model_for_kbit_training(quantize(model, "nf4", double_quant=True),
                                                    use_gradient_checkpointing=False)
        return model
    configs["qlora"] = configs["lora"]
    methods = ["lora", "ia3", "qlora"] if mode == "both" else ["lora"]
    if mode == "kill" and rank == 1:  # this rank dies while writing its shards of checkpoint 10
        real = F.save_sharded
        def dying(folder, *args):
            if "checkpoint-000010" in folder:
                os._exit(9)
            return real(folder, *args)
        F.save_sharded = dying
    for method in methods:
        folder = os.path.join(out, method)
        args = TrainArgs(output_dir=folder, max_steps=%d, batch_size=2, grad_accum=4 // world,
                         learning_rate=1e-2, warmup_steps=2, save_every=5 if method == "lora" else None,
                         log_every=5, seed=0, fsdp=use_fsdp, eval_fraction=0.1,
                         # the resumed half recomputes every layer: checkpointing changes nothing either
                         gradient_checkpointing=mode == "resume", resume="latest" if mode == "resume" else None)
        trainer = Trainer(base(method), args, records, peft_config=configs[method]())
        result = trainer.train()
        trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
        params = F.full_tensors(trainable)
        torch.save({"params": params, "world": trainer.world_size, "sharded": trainer.fsdp,
                    "eval_loss": result.eval_loss, "n_eval": len(trainer.eval_examples),
                    "bytes": trainer.parameter_bytes()}, os.path.join(folder, f"rank{rank}.pt"))
''' % STEPS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (2 examples × 4 micro-batches) and two FSDP ranks (2 × 2 × 2 ranks), LoRA and IA3."""
    root = tmp_path_factory.mktemp("fsdp")
    script = root / "worker.py"
    script.write_text(WORKER)
    single, sharded = root / "single", root / "fsdp"
    launch_ranks(script, [single, 0, "both"], world=1)
    launch_ranks(script, [sharded, 1, "both"], world=2)
    return root, script, single, sharded


def _load(folder, rank=0):
    return torch.load(folder / f"rank{rank}.pt")


@pytest.mark.parametrize("method", ["lora", "ia3", "qlora"])
def test_fsdp_equals_one_process(runs, method):
    _, _, single, sharded = runs
    ref, r0, r1 = _load(single / method), _load(sharded / method), _load(sharded / method, 1)
    assert ref["world"] == 1 and not ref["sharded"] and r0["world"] == 2 and r0["sharded"]
    assert set(ref["params"]) == set(r0["params"])
    moved = 0.0
    for name, value in ref["params"].items():
        assert torch.equal(r0["params"][name], r1["params"][name]), f"ranks disagree on {name}"
        torch.testing.assert_close(r0["params"][name], value, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
        if method == "qlora":  # lora_B starts at zero (its A: the same draw as LoRA's, on another base)
            moved = max(moved, float(value.abs().max()) if "lora_B" in name else 0.0)
        else:
            moved = max(moved, float((value - _initial(method)[name]).abs().max()))
    assert moved > 1e-2, "the adapter did not train: the comparison would prove nothing"
    # evaluation under FSDP: an odd number of eval examples, so one rank runs an extra (empty) forward
    assert r0["n_eval"] % 2 == 1 and r0["eval_loss"] == r1["eval_loss"]
    assert r0["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)


def _initial(method, cache={}):
    """The adapter before training (the trainer seeds the initialisation with seed 0)."""
    if method not in cache:
        import fastpeft
        from fastpeft.training import build_preset

        torch.manual_seed(0)
        config = (fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear",
                                      task_type="CAUSAL_LM") if method == "lora" else
                  fastpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                     feedforward_modules=["down_proj"], task_type="CAUSAL_LM"))
        model = fastpeft.get_peft_model(build_preset("tiny"), config)
        cache[method] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return cache[method]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_each_rank_holds_half_the_frozen_weights(runs, method):
    _, _, single, sharded = runs
    b0, b1 = _load(sharded / method)["bytes"], _load(sharded / method, 1)["bytes"]
    total = b0["frozen_total"]
    assert total == b1["frozen_total"] > 0
    assert b0["frozen_local"] + b1["frozen_local"] == total  # shards, nothing replicated
    for b in (b0, b1):
        assert 0.45 * total <= b["frozen_local"] <= 0.55 * total, b
    if method == "qlora":
        # the 4-bit base and its quantisation state are parameters FSDP shards: the per-block absmax counts
        # (with the 4-bit codes, about a fifth of the fp32 base's bytes here, where embeddings and norms stay fp32)
        one = _load(single / "qlora")["bytes"]["frozen_total"]
        assert total == one, "the sharded layout must hold the same bytes as the unsharded 4-bit model"
        assert total < 0.5 * _load(sharded / "lora")["bytes"]["frozen_total"]


def test_saved_adapter_is_a_single_process_peft_file(runs):
    from safetensors.torch import load_file

    _, _, single, sharded = runs
    for method in ("lora", "ia3", "qlora"):
        ours, ref = load_file(sharded / method / "adapter_model.safetensors"), \
            load_file(single / method / "adapter_model.safetensors")
        assert sorted(ours) == sorted(ref)
        for key, value in ref.items():
            assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
            torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-5)
        a = json.loads((sharded / method / "adapter_config.json").read_text())
        b = json.loads((single / method / "adapter_config.json").read_text())
        assert a == b
    # a checkpoint's adapter is the same gathered PEFT file
    ours = load_file(sharded / "lora" / "adapter_model.safetensors")
    ckpt = load_file(sharded / "lora" / "checkpoint-000020" / "adapter_model.safetensors")
    assert sorted(ckpt) == sorted(ours) and all(torch.equal(ckpt[k], ours[k]) for k in ours)


def test_saved_adapter_loads_in_hf_peft(runs):
    peft = pytest.importorskip("peft")
    import fastpeft
    from fastpeft.training import build_preset

    _, _, single, sharded = runs
    ids = torch.randint(3, 259, (3, 17))
    for method in ("lora", "ia3"):
        theirs = peft.PeftModel.from_pretrained(build_preset("tiny"), str(sharded / method)).eval()
        ours = fastpeft.PeftModel.from_pretrained(build_preset("tiny"), str(single / method)).eval()
        base = build_preset("tiny").eval()
        with torch.no_grad():
            a, b, c = theirs(input_ids=ids).logits, ours(input_ids=ids).logits, base(input_ids=ids).logits
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
        assert (a - c).abs().max() > 1e-3, "the adapter changes nothing: the comparison would prove nothing"


def test_rank_killed_mid_save_then_resume_is_bit_exact(runs):
    """Rank 1 dies writing checkpoint 10: checkpoint 5 stays whole; resumed from it (with per-layer
    activation checkpointing on), the run ends bit for bit where the uninterrupted one did."""
    from fastpeft.training.checkpoints import list_checkpoints, read_state

    root, script, _, sharded = runs
    run = root / "killed"
    results = launch_ranks_any(script, [run, 1, "kill"], world=2, timeout=120)
    assert results[1][0] == -9 or results[1][0] == 9, results[1][2][-2000:]
    assert results[0][0] not in (0, None), "rank 0 must fail, not hang or succeed, when its peer dies"
    folder = run / "lora"
    assert [os.path.basename(p) for p in list_checkpoints(folder)] == ["checkpoint-000005"]
    state = read_state(folder / "checkpoint-000005")  # whole: readable, with every rank's shards
    assert state["fsdp"] and state["step"] == 5
    shards = sorted(os.listdir(folder / "checkpoint-000005" / "sharded"))
    assert len([s for s in shards if s.endswith(".safetensors")]) == 2, shards
    assert not (folder / "adapter_model.safetensors").exists()

    launch_ranks(script, [run, 1, "resume"], world=2)
    resumed, uninterrupted = _load(folder), _load(sharded / "lora")
    for name, value in uninterrupted["params"].items():
        assert torch.equal(resumed["params"][name], value), f"{name} differs after resume"


# ---------------------------------------------------------------------------- the CLI under torchrun
def _torchrun(out, *flags, timeout=180):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fastpeft", "train", "--steps", "3", "--lr", "0.01", "--dropout", "0.1", "--batch-size", "2",
           "--quiet", "--out", str(out), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


RUNS_IN_A_ROW = 20


def test_cli_fsdp_equals_ddp_and_runs_exit_zero(tmp_path):
    """`torchrun --nproc-per-node 2 -m fastpeft train [--fsdp]`, twenty runs in a row alternating DDP and
    FSDP: the same adapter, and every run exits 0 (a rank leaving with its process group alive used to
    abort: "terminate called without an active exception")."""
    from safetensors.torch import load_file

    outs = {}
    for i, flags in enumerate([(), ("--fsdp",)] * (RUNS_IN_A_ROW // 2)):
        out = tmp_path / f"run{i}"
        proc = _torchrun(out, *flags)
        assert proc.returncode == 0, f"run {i} {flags} exited {proc.returncode}: {proc.stderr[-3000:]}"
        assert "terminate called" not in proc.stderr
        outs.setdefault(flags, []).append(load_file(out / "adapter_model.safetensors"))
    ddp, fsdp = outs[()], outs[("--fsdp",)]
    assert len(ddp) + len(fsdp) == RUNS_IN_A_ROW
    for key, value in ddp[0].items():
        for again in ddp[1:]:
            assert torch.equal(again[key], value), key
        for sharded in fsdp:
            torch.testing.assert_close(sharded[key], value, rtol=0, atol=1e-5, msg=lambda m: f"{key}: {m}")


def test_cli_qlora_fsdp_equals_ddp(tmp_path):
    """`fastpeft train --quantize nf4 --fsdp` under torchrun (the 4-bit base sharded, its quantisation state
    included) gives the DDP run's adapter."""
    from safetensors.torch import load_file

    got = {}
    for flags in ((), ("--fsdp",)):
        out = tmp_path / ("fsdp" if flags else "ddp")
        proc = _torchrun(out, "--quantize", "nf4", *flags)
        assert proc.returncode == 0, f"{flags} exited {proc.returncode}: {proc.stderr[-3000:]}"
        got[flags] = load_file(out / "adapter_model.safetensors")
    ddp, fsdp = got[()], got[("--fsdp",)]
    assert sorted(ddp) == sorted(fsdp) and any(float(v.abs().max()) > 0 for k, v in ddp.items() if "lora_B" in k)
    for key, value in ddp.items():
        torch.testing.assert_close(fsdp[key], value, rtol=0, atol=1e-5, msg=lambda m: f"{key}: {m}")


# ---------------------------------------------------------------------------- the memory plan
def test_memory_plan_counts_the_real_model_and_the_measured_shards(runs):
    import fastpeft
    from fastpeft.training import build_preset
    from fastpeft.training.memory_plan import ModelShape, adapter_params, format_table, frozen_params, memory_table, plan

    tiny = ModelShape("tiny", 64, 2, 4, 2, 176, 259)
    model = build_preset("tiny")
    assert frozen_params(tiny) == sum(p.numel() for p in model.parameters())
    lora = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert adapter_params(tiny, "lora", 4) == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    ia3 = fastpeft.get_peft_model(build_preset("tiny"), fastpeft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"))
    assert adapter_params(tiny, "ia3") == sum(p.numel() for p in ia3.parameters() if p.requires_grad)
    # the plan's per-rank frozen bytes at two ranks against the FSDP run's shards (fp32 weights)
    measured = max(_load(runs[3] / "lora", r)["bytes"]["frozen_local"] for r in (0, 1))
    planned = plan(tiny, 2, weight_bytes=4, method="lora", r=4)["frozen"]
    assert abs(measured - planned) <= 0.02 * planned, (measured, planned)
    rows = memory_table(ranks=(1, 2, 8))
    assert [r["ranks"] for r in rows[:3]] == [1, 2, 8]
    assert rows[2]["frozen"] * 8 >= rows[0]["frozen"] > rows[1]["frozen"] > rows[2]["frozen"]
    assert rows[0]["activations"] == rows[2]["activations"]  # per-rank micro-batch: the same at any rank count
    assert "llama-2-70b" in format_table(rows)
