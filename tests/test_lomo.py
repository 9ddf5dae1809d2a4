"""LoMo / AdaLomo: the update fused into the backward (post-accumulate-grad hooks), one gradient alive at once."""

import copy

import pytest
import torch

from fastpeft.optim import AdaLomo, GradientPeak, LoMo

from tests.models import tiny_llama


def _batches(n, B=2, T=9, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (B, T), generator=g) for _ in range(n)]


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _assert_params_close(a, b, atol):
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=lambda m: f"{n}: {m}")


def test_lomo_equals_sgd_full_finetune_and_holds_one_gradient():
    torch.manual_seed(0)
    a = tiny_llama(seed=1).train()
    b = copy.deepcopy(a)
    ta, tb = GradientPeak(a), GradientPeak(b)  # before the optimizers: see every gradient before it is freed
    lomo = LoMo(a, lr=0.05)
    sgd = torch.optim.SGD(b.parameters(), lr=0.05)
    start = copy.deepcopy(a)
    for ids in _batches(20):
        la = _loss(a, ids)
        lomo.fused_backward(la, lr=0.05)
        assert all(p.grad is None for p in a.parameters()), "LoMo left a gradient behind"
        lb = _loss(b, ids)
        lb.backward()
        sgd.step()
        sgd.zero_grad()
        torch.testing.assert_close(la, lb, atol=1e-6, rtol=0)
    _assert_params_close(a, b, atol=1e-6)
    moved = max((p - q).abs().max().item() for p, q in zip(a.parameters(), start.parameters()))
    assert moved > 1e-3, "the parameters did not move: the comparison would be vacuous"
    sizes = [p.numel() * p.element_size() for p in a.parameters()]
    assert ta.peak <= max(sizes), (ta.peak, max(sizes))
    assert tb.peak == sum(sizes)  # SGD holds every gradient at once
    assert ta.peak < tb.peak / 4


@pytest.mark.parametrize("clip", ["norm", "value"])
def test_lomo_clipping_equals_sgd_with_torch_clipping(clip):
    a = tiny_llama(seed=2).train()
    b = copy.deepcopy(a)
    kw = {"clip_grad_norm": 0.5} if clip == "norm" else {"clip_grad_value": 0.01}
    lomo = LoMo(a, lr=0.1, weight_decay=0.01, **kw)
    sgd = torch.optim.SGD(b.parameters(), lr=0.1, weight_decay=0.0)
    for ids in _batches(6, seed=3):
        la = _loss(a, ids)
        if clip == "norm":
            norm = lomo.grad_norm(la)  # the norm pass: nothing updated, gradients freed
            assert all(p.grad is None for p in a.parameters())
        lomo.fused_backward(la, lr=0.1)
        lb = _loss(b, ids)
        lb.backward()
        if clip == "norm":
            ref = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5, error_if_nonfinite=True)
            torch.testing.assert_close(norm, ref, rtol=1e-5, atol=0)
            assert ref > 0.5  # clipping is active
        else:
            torch.nn.utils.clip_grad_value_(b.parameters(), 0.01)
        with torch.no_grad():  # LoMo's decoupled decay: p·(1 - lr·wd) - lr·g
            for p in b.parameters():
                p.mul_(1 - 0.1 * 0.01)
        sgd.step()
        sgd.zero_grad()
    _assert_params_close(a, b, atol=1e-6)


def test_lomo_static_loss_scale_is_undone():
    a = tiny_llama(seed=4).train()
    b = copy.deepcopy(a)
    la_opt, lb_opt = LoMo(a, lr=0.05, loss_scale=1024.0), LoMo(b, lr=0.05)
    for ids in _batches(3, seed=5):
        la_opt.fused_backward(_loss(a, ids))
        lb_opt.fused_backward(_loss(b, ids))
    _assert_params_close(a, b, atol=1e-6)


def test_lomo_dynamic_loss_scale_skips_overflowing_step():
    a = tiny_llama(seed=6).train()
    before = copy.deepcopy(a)
    opt = LoMo(a, lr=0.05, loss_scale="dynamic", scale_window=2)
    opt.loss_scale = 3e38  # the scaled gradients overflow fp32
    ids = _batches(1, seed=7)[0]
    loss = _loss(a, ids)
    assert not torch.isfinite(opt.grad_norm(loss))
    opt.fused_backward(loss)
    assert opt.skipped_steps == 1 and opt.loss_scale == 1.5e38 and opt.step_num == 0
    _assert_params_close(a, before, atol=0)
    assert all(p.grad is None for p in a.parameters())
    opt.loss_scale = 8.0
    for _ in range(2):
        loss = _loss(a, ids)
        assert torch.isfinite(opt.grad_norm(loss))
        opt.fused_backward(loss)
    assert opt.step_num == 2 and opt.loss_scale == 16.0  # doubled after scale_window clean steps
    assert max((p - q).abs().max().item() for p, q in zip(a.parameters(), before.parameters())) > 0


def test_lomo_errors_name_the_problem():
    a = tiny_llama(seed=8).train()
    with pytest.raises(ValueError, match="clip_grad_norm"):
        LoMo(a, clip_grad_norm=0.0)
    with pytest.raises(ValueError, match="loss_scale"):
        LoMo(a, loss_scale="sometimes")
    with pytest.raises(TypeError, match="nn.Module"):
        LoMo(list(a.parameters()))
    opt = LoMo(a, clip_grad_norm=1.0)
    ids = _batches(1)[0]
    with pytest.raises(ValueError, match="grad_norm"):
        opt.fused_backward(_loss(a, ids))
    with pytest.raises(RuntimeError, match="fused_backward"):
        _loss(a, ids).backward()
    opt.remove_hooks()
    _loss(a, ids).backward()  # detached: plain backward works again
    frozen = tiny_llama(seed=8).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        AdaLomo(frozen)


def test_lomo_trains_adapter_parameters_only():
    from fastpeft import LoraConfig, get_peft_model

    base = tiny_llama(seed=9)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    a = get_peft_model(copy.deepcopy(base), cfg).train()
    b = get_peft_model(copy.deepcopy(base), cfg).train()
    b.load_state_dict(a.state_dict())
    opt = LoMo(a, lr=0.05)
    sgd = torch.optim.SGD([p for p in b.parameters() if p.requires_grad], lr=0.05)
    for ids in _batches(5, seed=10):
        opt.fused_backward(_loss(a, ids))
        _loss(b, ids).backward()
        sgd.step()
        sgd.zero_grad()
    _assert_params_close(a, b, atol=1e-6)
    frozen = {n: p for n, p in a.named_parameters() if not p.requires_grad}
    for n, p in base.named_parameters():
        key = next(k for k in frozen if k.endswith(n.replace(".weight", ".base_layer.weight")) or k.endswith(n))
        torch.testing.assert_close(frozen[key], p, atol=0, rtol=0)


def test_lomo_bf16_parameters_update_in_fp32():
    a = tiny_llama(seed=11).train()
    b = copy.deepcopy(a).to(torch.bfloat16)
    ids = _batches(1, seed=12)[0]
    opt = LoMo(b, lr=0.05)
    opt.fused_backward(_loss(b, ids))
    assert all(p.dtype == torch.bfloat16 for p in b.parameters())
    a_opt = LoMo(a, lr=0.05)
    a_opt.fused_backward(_loss(a, ids))
    for p, q in zip(a.parameters(), b.parameters()):  # bf16 model vs fp32 model: bf16 rounding, not drift
        torch.testing.assert_close(q.float(), p, atol=3e-2, rtol=2e-2)


def _lomo_optim(monkeypatch):
    lomo_optim = pytest.importorskip("lomo_optim")
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # its state is allocated with .cuda()
    return lomo_optim


@pytest.mark.parametrize("clip", [None, 0.3])
def test_adalomo_matches_lomo_optim(monkeypatch, clip):
    lomo_optim = _lomo_optim(monkeypatch)
    a = tiny_llama(seed=13).train()
    b = copy.deepcopy(a)
    start = copy.deepcopy(a)
    ours = AdaLomo(a, lr=1e-2, loss_scale=2 ** 10, clip_grad_norm=clip, weight_decay=0.01)
    ref = lomo_optim.AdaLomo(b, lr=1e-2, loss_scale=2 ** 10, clip_grad_norm=clip, weight_decay=0.01)
    for ids in _batches(10, seed=14):
        la, lb = _loss(a, ids), _loss(b, ids)
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=0)
        if clip is not None:
            ours.grad_norm(la)
            ref.grad_norm(lb)
        ours.fused_backward(la, lr=1e-2)
        ref.fused_backward(lb, lr=1e-2)
    _assert_params_close(a, b, atol=1e-5)
    moved = max((p - q).abs().max().item() for p, q in zip(a.parameters(), start.parameters()))
    assert moved > 1e-3


def test_lomo_matches_lomo_optim(monkeypatch):
    lomo_optim = _lomo_optim(monkeypatch)
    a = tiny_llama(seed=15).train()
    b = copy.deepcopy(a)
    ours = LoMo(a, lr=0.05, clip_grad_norm=1.0)
    ref = lomo_optim.Lomo(b, lr=0.05, clip_grad_norm=1.0)
    for ids in _batches(5, seed=16):
        la, lb = _loss(a, ids), _loss(b, ids)
        ours.grad_norm(la)
        ref.grad_norm(lb)
        ours.fused_backward(la, lr=0.05)
        ref.fused_backward(lb, lr=0.05)
    _assert_params_close(a, b, atol=1e-6)


def test_plain_backward_is_the_update_pass():
    """loss.backward() with a LoMo/AdaLomo attached (no clipping, no loss scale) = fused_backward."""
    for cls in (LoMo, AdaLomo):
        a = tiny_llama(seed=19).train()
        b = copy.deepcopy(a)
        oa, ob = cls(a, lr=1e-2), cls(b, lr=1e-2)
        for ids in _batches(3, seed=20):
            oa.fused_backward(_loss(a, ids))
            _loss(b, ids).backward()
            ob.step()
            ob.zero_grad()
        assert oa.step_num == ob.step_num == 3
        _assert_params_close(a, b, atol=0)


def _trainer_run(tmp_path, optim, seed=17):
    import transformers

    from fastpeft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(seed=seed), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False))
    g = torch.Generator().manual_seed(18)
    rows = [torch.randint(0, 97, (9,), generator=g) for _ in range(8)]
    data = [{"input_ids": x, "labels": x} for x in rows]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kw = {"optim": optim} if isinstance(optim, str) else {}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-2, max_steps=3,
                                          per_device_train_batch_size=2, report_to=[], use_cpu=True,
                                          save_strategy="no", disable_tqdm=True, max_grad_norm=0.0, **kw)
    optimizers = (optim(model, lr=1e-2), None) if not isinstance(optim, str) else (None, None)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=optimizers)
    trainer.train()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert moved and moved <= trainable  # adapters moved, the frozen base did not
    assert all(p.grad is None for p in model.parameters())
    return trainer, model


def test_fastpeft_model_with_transformers_trainer_lomo(tmp_path):
    """Trainer(optim="lomo") builds lomo-optim's Lomo and drives a fastpeft model; Trainer given
    fastpeft.optim.LoMo (its loss.backward() is the update pass) ends at the same parameters."""
    pytest.importorskip("lomo_optim")
    ref_trainer, ref = _trainer_run(tmp_path / "a", "lomo")
    assert type(ref_trainer.optimizer.optimizer).__name__ == "Lomo"
    ours_trainer, ours = _trainer_run(tmp_path / "b", LoMo)
    assert ours_trainer.optimizer.optimizer.step_num == 3
    _assert_params_close(ours, ref, atol=1e-6)


def test_lomo_tied_embeddings_update_once_per_step():
    """A parameter used twice (tied input/output embeddings) gets one post-accumulate hook call with the
    summed gradient: still plain SGD."""
    a = tiny_llama(seed=21, tie_word_embeddings=True).train()
    assert a.lm_head.weight is a.model.embed_tokens.weight
    b = copy.deepcopy(a)
    lomo = LoMo(a, lr=0.05)
    sgd = torch.optim.SGD(b.parameters(), lr=0.05)
    for ids in _batches(4, seed=22):
        lomo.fused_backward(_loss(a, ids))
        _loss(b, ids).backward()
        sgd.step()
        sgd.zero_grad()
    _assert_params_close(a, b, atol=1e-6)


# ---------------------------------------------------------------------------- fastpeft's Trainer / train CLI
def _records(n=40):
    import json

    from fastpeft.training import DEFAULT_DATA

    with open(DEFAULT_DATA, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh][:n]


def _lora():
    import fastpeft

    return fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                               init_lora_weights="gaussian", task_type="CAUSAL_LM")


@pytest.mark.parametrize("clip", [None, 0.5])
def test_trainer_lomo_equals_sgd_under_the_same_schedule(clip):
    """Trainer(optimizer="lomo"): 6 steps equal the same Trainer stepping torch.optim.SGD under its warm-up
    schedule (and torch's norm clipping) within 1e-6; the hooks are gone after train()."""
    from fastpeft.training import TrainArgs, Trainer, build_preset
    from fastpeft.training.trainer import lr_lambda

    def make(optimizer):
        args = TrainArgs(max_steps=6, batch_size=4, learning_rate=0.05, warmup_steps=2, max_grad_norm=clip,
                         optimizer=optimizer, progress=False, seed=3)
        return Trainer(build_preset("tiny"), args, _records(), peft_config=_lora())

    lomo = make("lomo")
    lomo.train()
    ref = make("adamw")
    params = [p for p in ref.model.parameters() if p.requires_grad]
    ref.optimizer = torch.optim.SGD(params, lr=0.05)
    ref.scheduler = torch.optim.lr_scheduler.LambdaLR(ref.optimizer, lambda s: lr_lambda(s, 2, 6, 0.0))
    ref.train()
    ours = {n: p for n, p in lomo.model.named_parameters() if p.requires_grad}
    theirs = {n: p for n, p in ref.model.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys()
    moved = 0
    start = {n: p for n, p in make("adamw").model.named_parameters() if p.requires_grad}
    for n in ours:
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
        moved += not torch.equal(ours[n], start[n])
    assert moved == len(ours)
    ids = torch.randint(1, 200, (1, 6))
    lomo.model(input_ids=ids, labels=ids).loss.backward()  # a plain backward now: gradients stay, nothing moves
    assert all(p.grad is not None for p in ours.values())


def test_trainer_adalomo_resumes_bit_exact(tmp_path):
    from fastpeft.training import TrainArgs, Trainer, build_preset
    from fastpeft.training.trainer import find_checkpoint

    def args(out, **kw):
        return TrainArgs(output_dir=str(out), max_steps=8, batch_size=4, learning_rate=0.05, warmup_steps=2,
                         save_every=3, optimizer="adalomo", progress=False, seed=5, **kw)

    from tests.test_training import _kill_at, _Killed

    full = Trainer(build_preset("tiny"), args(tmp_path / "full"), _records(), peft_config=_lora())
    full.train()
    first = Trainer(build_preset("tiny"), args(tmp_path / "run"), _records(), peft_config=_lora(),
                    callbacks=[_kill_at(5)])
    with pytest.raises(_Killed):
        first.train()
    assert find_checkpoint(str(tmp_path / "run")).endswith("checkpoint-000003")
    resumed = Trainer(build_preset("tiny"), args(tmp_path / "run", resume="latest"), _records(), peft_config=_lora())
    resumed.train()
    assert resumed.optimizer.step_num == full.optimizer.step_num == 8
    a = {n: p for n, p in full.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_trainer_lomo_refuses_what_it_cannot_do():
    from fastpeft.training import TrainArgs

    with pytest.raises(ValueError, match="grad_accum=1"):
        TrainArgs(optimizer="lomo", grad_accum=2)
    with pytest.raises(ValueError, match="fp32 or bf16"):
        TrainArgs(optimizer="adalomo", mixed_precision="fp16")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainArgs(optimizer="sgd")


@pytest.mark.parametrize("optimizer", ["lomo", "adalomo"])
def test_train_cli_optimizer_flag(tmp_path, capsys, optimizer):
    from fastpeft.training.cli import train_main

    out = tmp_path / "run"
    assert train_main(["--optimizer", optimizer, "--steps", "30", "--lr", "0.05", "--out", str(out),
                       "--log-every", "1000"]) == 0
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "at the start ->" in line)
    start, end = float(line.split(" at the start")[0].split()[-1]), float(line.split("-> ")[1].split()[0])
    assert end < start, line
    assert (out / "adapter_model.safetensors").is_file()
    assert train_main(["--optimizer", optimizer, "--grad-accum", "2", "--out", str(tmp_path / "x")]) == 2
    assert "grad_accum=1" in capsys.readouterr().err
