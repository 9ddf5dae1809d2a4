"""Training API: loss falls, PEFT interop of the saved adapter, exact resume, data rules, HF Trainer."""

import json
import math
import os

import pytest
import torch

import fastpeft
from fastpeft.training import (DEFAULT_DATA, ByteTokenizer, DataError, TrainArgs, Trainer, build_preset,
                               find_checkpoint, load_examples, train)
from fastpeft.training.data import IGNORE_INDEX, collate, epoch_order
from fastpeft.training.trainer import lr_lambda

ALL_LINEAR = "all-linear"


pytestmark = pytest.mark.usefixtures("one_thread")


def _lora(dropout=0.0, r=8):
    return fastpeft.LoraConfig(r=r, lora_alpha=16, lora_dropout=dropout, target_modules=ALL_LINEAR,
                               task_type="CAUSAL_LM")


def _ia3():
    return fastpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                              task_type="CAUSAL_LM")


def _adapter_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _records(n=48):
    with open(DEFAULT_DATA, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh][:n]


# ---------------------------------------------------------------------------- tokenizer
def test_byte_tokenizer_roundtrip_and_call():
    tok = ByteTokenizer()
    text = "héllo ∑ 3+4=7"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and all(0 <= i < 256 for i in ids[1:])
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=False).endswith("</s>")
    batch = tok(["ab", "abcd"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 5)
    assert batch["input_ids"][0, -1].item() == tok.pad_token_id
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert len(tok) == 259 == build_preset("tiny").config.vocab_size


# ---------------------------------------------------------------------------- data
def test_prompt_completion_masks_the_prompt():
    tok = ByteTokenizer()
    (ex,) = load_examples([{"prompt": "2 + 2 =", "completion": " 4"}], tok, 64)
    n_prompt = 1 + len("2 + 2 =")  # BOS + prompt bytes
    assert ex.input_ids == [tok.bos_token_id] + list(b"2 + 2 = 4") + [tok.eos_token_id]
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.labels[n_prompt:] == list(b" 4") + [tok.eos_token_id]
    assert ex.num_targets == 3
    (text,) = load_examples([{"text": "ab"}], tok, 64)
    assert text.labels == [IGNORE_INDEX, ord("a"), ord("b"), tok.eos_token_id]
    batch = collate([ex, text], tok.pad_token_id)
    assert batch["labels"][1, 4:].tolist() == [IGNORE_INDEX] * (batch["labels"].shape[1] - 4)
    assert batch["attention_mask"][1].sum().item() == 4


def test_prompt_completion_loss_ignores_prompt_tokens():
    """Changing the prompt's tokens' predictions must not change the loss: only completion tokens count."""
    tok = ByteTokenizer()
    model = build_preset("tiny")
    (ex,) = load_examples([{"prompt": "the cat", "completion": " sat"}], tok, 64)
    batch = collate([ex], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
        loss = model(**batch).loss
    targets = torch.tensor(ex.input_ids[1:])
    per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    n_prompt = 1 + len("the cat")
    assert torch.allclose(loss, per_token[n_prompt - 1:].mean(), atol=1e-6)


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("lines, where, what", [
    (['{"text": "ok"}', '{"text": "ok"', '{"text": "x"}'], ":2", "not valid JSON"),
    (['{"text": "ok"}', '{"body": "x"}'], ":2", "no 'text' field"),
    (['{"prompt": "a"}'], ":1", "no 'completion'"),
    (['{"text": 5}'], ":1", "must be a string"),
    (['{"text": ""}'], ":1", "is empty"),
    (['[1, 2]'], ":1", "expected a JSON object"),
])
def test_bad_data_names_file_and_line(tmp_path, lines, where, what):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as err:
        load_examples(path, ByteTokenizer(), 64)
    assert f"{path}{where}" in str(err.value) and what in str(err.value)


def test_empty_and_missing_files(tmp_path):
    empty = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="empty.jsonl holds no records"):
        load_examples(empty, ByteTokenizer(), 64)
    with pytest.raises(DataError, match="does not exist"):
        load_examples(str(tmp_path / "nope.jsonl"), ByteTokenizer(), 64)
    with pytest.raises(DataError, match=r"train\[1\]: no 'text' field"):
        load_examples([{"text": "a"}, {"txt": "b"}], ByteTokenizer(), 64, name="train")


def test_over_long_sequences_truncated_or_skipped_with_a_count():
    records = [{"text": "x" * 100}, {"text": "short"}, {"prompt": "p" * 100, "completion": "c"},
               {"prompt": "p" * 10, "completion": "c" * 100}]
    with pytest.warns(UserWarning, match=r"3 sequence\(s\) longer than max_seq_len=32 .* truncated; 1 of them "
                                         r"were skipped"):
        examples = load_examples(records, ByteTokenizer(), 32)
    assert [len(e.input_ids) for e in examples] == [32, 7, 32]
    assert examples[2].num_targets == 32 - 11  # completion kept after BOS + 10 prompt bytes


def test_epoch_order_is_a_seeded_permutation():
    a, b = epoch_order(50, 3, 0), epoch_order(50, 3, 1)
    assert sorted(a) == list(range(50)) and a != b and a == epoch_order(50, 3, 0)


def test_lr_schedule_warmup_then_cosine():
    values = [lr_lambda(s, 4, 20, 0.1) for s in range(21)]
    assert values[0] == pytest.approx(0.2) and values[3] == pytest.approx(0.8)
    assert values[4] == pytest.approx(1.0) and values[20] == pytest.approx(0.1)
    assert all(x >= y for x, y in zip(values[4:], values[5:]))
    assert values[12] == pytest.approx(0.1 + 0.9 * 0.5)


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_tiny_preset_loss_falls(method):
    config = _lora() if method == "lora" else _ia3()
    model = train(build_preset("tiny"), config, DEFAULT_DATA, max_steps=40, batch_size=16, learning_rate=1e-2,
                  log_every=5, progress=False)
    losses = [h["loss"] for h in model.train_result.history if "loss" in h]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - (1.0 if method == "lora" else 0.1), losses
    assert model.train_result.trainable_params == model.get_nb_trainable_parameters()[0]


def test_eval_loss_and_summary(tmp_path, capsys):
    model = train(build_preset("tiny"), _lora(), DEFAULT_DATA, max_steps=10, batch_size=8, learning_rate=1e-2,
                  eval_fraction=0.1, eval_every=5, output_dir=str(tmp_path), log_every=5)
    result = model.train_result
    evals = [h["eval_loss"] for h in result.history if "eval_loss" in h]
    assert len(evals) == 2 and all(math.isfinite(x) for x in evals) and result.eval_loss == evals[-1]
    err = capsys.readouterr().err
    assert "step 5/10 | loss" in err and "tok/s" in err and "eval loss" in err
    assert "done: 10 steps" in err and "trainable params" in err and "peak" in err
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json"} <= set(os.listdir(tmp_path))


def test_grad_accum_matches_one_big_batch():
    """batch 4 × accum 2 = batch 8 × accum 1: the same global batch and token-mean loss."""
    data = _records(32)
    a = train(build_preset("tiny"), _lora(), data, max_steps=3, batch_size=4, grad_accum=2, learning_rate=1e-2,
              progress=False)
    b = train(build_preset("tiny"), _lora(), data, max_steps=3, batch_size=8, grad_accum=1, learning_rate=1e-2,
              progress=False)
    ta, tb = _adapter_tensors(a), _adapter_tensors(b)
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_matches_plain():
    data = _records(16)
    a = train(build_preset("tiny"), _lora(), data, max_steps=2, batch_size=8, learning_rate=1e-2, progress=False,
              gradient_checkpointing=True)
    b = train(build_preset("tiny"), _lora(), data, max_steps=2, batch_size=8, learning_rate=1e-2, progress=False)
    ta, tb = _adapter_tensors(a), _adapter_tensors(b)
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], rtol=1e-5, atol=1e-6)
    base = a.get_base_model()
    on = getattr(base, "is_activation_checkpointing", None)
    assert not (on if on is not None else base.is_gradient_checkpointing)  # switched off again after training


def test_bf16_autocast_trains():
    model = train(build_preset("tiny"), _lora(), _records(32), max_steps=4, batch_size=8, learning_rate=1e-2,
                  mixed_precision="bf16", progress=False)
    assert all(p.dtype == torch.float32 for p in _adapter_tensors(model).values())
    assert math.isfinite(model.train_result.train_loss)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_saved_adapter_loads_in_peft_with_same_logits(tmp_path, method):
    peft = pytest.importorskip("peft")
    config = _lora() if method == "lora" else _ia3()
    model = train(build_preset("tiny"), config, _records(64), max_steps=8, batch_size=8, learning_rate=1e-2,
                  output_dir=str(tmp_path), progress=False)
    ref = peft.PeftModel.from_pretrained(build_preset("tiny"), str(tmp_path))
    batch = ByteTokenizer()(["3 + 4 = 7", "count: 1 2 3"], padding=True, return_tensors="pt")
    model.eval()
    ref.eval()
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = ref(**batch).logits
        base = build_preset("tiny")(**batch).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - base).abs().max() > 1e-3  # the trained adapter does something


def _resume_args(out, **kw):
    return TrainArgs(output_dir=str(out), max_steps=12, batch_size=4, grad_accum=2, learning_rate=1e-2,
                     save_every=5, warmup_steps=3, progress=False, seed=7, **kw)


class _Killed(Exception):
    pass


def _kill_at(step):
    def cb(trainer, logs):
        if logs["step"] == step:
            raise _Killed()
    return cb


def _killed_and_resumed(tmp_path, data, config):
    """(an uninterrupted 12-step run, a run killed after step 8 and resumed from its newest checkpoint
    (step 5: steps 6-8 are lost), the killed run's folder)."""
    full = Trainer(build_preset("tiny"), _resume_args(tmp_path / "full"), data, peft_config=config())
    full.train()
    out = tmp_path / "killed"
    first = Trainer(build_preset("tiny"), _resume_args(out), data, peft_config=config(), callbacks=[_kill_at(8)])
    with pytest.raises(_Killed):
        first.train()
    assert os.path.basename(find_checkpoint(str(out))) == "checkpoint-000005"  # steps 6-8 are lost
    resumed = Trainer(build_preset("tiny"), _resume_args(out, resume="latest"), data, peft_config=config())
    resumed.train()
    return full, resumed, out


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_resume_after_kill_equals_uninterrupted_run(tmp_path, method):
    """40 examples / global batch 8 = 5 steps per epoch: the run crosses two epoch boundaries; LoRA has
    dropout, so the RNG stream must be restored too."""
    data = _records(40)
    config = (lambda: _lora(dropout=0.1)) if method == "lora" else _ia3
    full, resumed, out = _killed_and_resumed(tmp_path, data, config)
    assert os.path.basename(find_checkpoint(str(out))) == "checkpoint-000012"  # went on from step 5 to the end
    assert resumed.global_step == 12
    a, b = _adapter_tensors(full.model), _adapter_tensors(resumed.model)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed.optimizer.param_groups[0]["lr"] == full.optimizer.param_groups[0]["lr"]
    # the checkpoint is an ordinary PEFT adapter folder plus the trainer state
    ckpt = find_checkpoint(str(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"} <= set(os.listdir(ckpt))


def _two_datasets():
    recs = _records(48)
    return {"left": recs[:24], "right": recs[24:]}


def test_several_adapters_in_one_run_train_each_on_its_own_rows_and_resume(tmp_path):
    """A dict of datasets trains one LoRA adapter per name in one run (mixed-adapter batches, one
    optimizer): a row's loss reaches only its adapter (one step's gradient of each adapter equals the
    gradient of its own rows alone); checkpoints hold every adapter and a killed run resumes to the
    uninterrupted result bit for bit; the adapters are written to OUT/NAME."""
    data = _two_datasets()
    cfg = lambda: _lora(dropout=0.1, r=4)  # noqa: E731
    probe = Trainer(build_preset("tiny"), TrainArgs(batch_size=8, progress=False), data, peft_config=cfg())
    assert set(probe.adapter_names) == {"left", "right"}
    trainable = {n for n, p in probe.model.named_parameters() if p.requires_grad}
    assert any(".left." in n for n in trainable) and any(".right." in n for n in trainable)
    examples = probe.train_examples[:3] + probe.train_examples[-3:]
    assert [e.adapter for e in examples] == ["left"] * 3 + ["right"] * 3
    model = probe.model.eval()  # dropout off: the gradients are deterministic

    def grads(batch_examples):
        model.zero_grad(set_to_none=True)
        probe._forward_loss_sum(model, collate(batch_examples, probe.pad_id)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    mixed = grads(examples)
    for side, rows in (("left", examples[:3]), ("right", examples[3:])):
        alone = grads(rows)
        assert alone and all(f".{side}." in n for n in alone), "a row's loss reached another adapter"
        for n, g in alone.items():
            torch.testing.assert_close(mixed[n], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")

    full, resumed, out = _killed_and_resumed(tmp_path, data, cfg)
    a, b = _adapter_tensors(full.model), _adapter_tensors(resumed.model)
    assert a.keys() == b.keys() and any(".left." in n for n in a) and any(".right." in n for n in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for side in ("left", "right"):
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out / side))
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(find_checkpoint(str(out)) + "/"
                                                                                      + side))


def test_several_adapters_refused_where_they_cannot_work():
    data = _two_datasets()
    with pytest.raises(ValueError, match="needs LoRA"):
        Trainer(build_preset("tiny"), TrainArgs(progress=False), data, peft_config=_ia3())
    with pytest.raises(ValueError, match="same adapter names"):
        Trainer(build_preset("tiny"), TrainArgs(progress=False), data, eval_dataset={"left": _records(4)},
                peft_config=_lora())
    with pytest.raises(ValueError, match="reserved"):
        Trainer(build_preset("tiny"), TrainArgs(progress=False), {"default": _records(8)}, peft_config=_lora())
    with pytest.raises(ValueError, match="cannot be used"):
        Trainer(build_preset("tiny"), TrainArgs(progress=False), {"../x": _records(8)}, peft_config=_lora())


def test_keep_checkpoints(tmp_path):
    train(build_preset("tiny"), _lora(), _records(32), max_steps=6, batch_size=4, save_every=2, keep_checkpoints=2,
          output_dir=str(tmp_path), progress=False)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint-")) == ["checkpoint-000004",
                                                                                     "checkpoint-000006"]


def test_argument_errors():
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainArgs(mixed_precision="fp8")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        TrainArgs(batch_size=0)
    with pytest.raises(TypeError, match="unknown training option"):
        train(build_preset("tiny"), _lora(), _records(8), max_step=3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(build_preset("tiny"), _lora(), _records(8), batch_size=16, progress=False)
    with pytest.raises(ValueError, match="base model together with peft_config"):
        Trainer(build_preset("tiny"), TrainArgs(), _records(8))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        train(build_preset("tiny"), _lora(), [{"input_ids": [1, 2, 999]}] * 8, batch_size=8, progress=False)


# ---------------------------------------------------------------------------- prompt learning
def _prompt_config(method):
    cls = {"prefix": fastpeft.PrefixTuningConfig, "prompt": fastpeft.PromptTuningConfig,
           "ptuning": fastpeft.PromptEncoderConfig}[method]
    config = cls(num_virtual_tokens=4, task_type="CAUSAL_LM")
    try:
        fastpeft.get_peft_model(build_preset("tiny"), config)
    except (ImportError, NotImplementedError) as err:
        pytest.skip(f"{method} is not implemented in fastpeft yet: {err}")
    return cls(num_virtual_tokens=4, task_type="CAUSAL_LM")


@pytest.mark.parametrize("method", ["prefix", "prompt", "ptuning"])
def test_prompt_learning_methods_train_and_resume(tmp_path, method):
    data = _records(40)
    full = Trainer(build_preset("tiny"), _resume_args(tmp_path / "full"), data, peft_config=_prompt_config(method))
    result = full.train()
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert all(math.isfinite(x) for x in losses)
    out = tmp_path / "killed"
    first = Trainer(build_preset("tiny"), _resume_args(out), data, peft_config=_prompt_config(method),
                    callbacks=[_kill_at(6)])
    with pytest.raises(_Killed):
        first.train()
    resumed = Trainer(build_preset("tiny"), _resume_args(out, resume="latest"), data,
                      peft_config=_prompt_config(method))
    resumed.train()
    a, b = _adapter_tensors(full.model), _adapter_tensors(resumed.model)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    reloaded = fastpeft.PeftModel.from_pretrained(build_preset("tiny"), str(out / "checkpoint-000012"))
    ids = torch.tensor([ByteTokenizer().encode("3 + 4 =")])
    full.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, full.model(input_ids=ids).logits)


def test_prefix_refuses_gradient_checkpointing():
    with pytest.raises(ValueError, match="gradient checkpointing does not work with prefix"):
        Trainer(build_preset("tiny"), TrainArgs(gradient_checkpointing=True), _records(8),
                peft_config=_prompt_config("prefix"))


# ---------------------------------------------------------------------------- HF Trainer
@pytest.mark.parametrize("remove_unused_columns", [False, True], ids=["keep-columns", "hf-default"])
def test_works_inside_hf_trainer(tmp_path, remove_unused_columns):
    transformers = pytest.importorskip("transformers")
    import inspect

    model = fastpeft.get_peft_model(build_preset("tiny"), _lora())
    assert "input_ids" in inspect.signature(model.forward).parameters  # what remove_unused_columns reads
    before = _adapter_tensors(model)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    tok = ByteTokenizer()
    examples = load_examples(_records(32), tok, 32)
    dataset = [{k: v[0] for k, v in collate([e], tok.pad_token_id).items()} for e in examples]

    def collator(rows):
        width = max(len(r["input_ids"]) for r in rows)
        pad = lambda t, v: torch.nn.functional.pad(t, (0, width - len(t)), value=v)  # noqa: E731
        return {"input_ids": torch.stack([pad(r["input_ids"], tok.pad_token_id) for r in rows]),
                "attention_mask": torch.stack([pad(r["attention_mask"], 0) for r in rows]),
                "labels": torch.stack([pad(r["labels"], IGNORE_INDEX) for r in rows])}

    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4,
                                          learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                                          logging_steps=1, disable_tqdm=True,
                                          remove_unused_columns=remove_unused_columns)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    out = trainer.train()
    assert math.isfinite(out.training_loss)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)
    after = _adapter_tensors(model)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    frozen_after = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert all(torch.equal(frozen_before[n], frozen_after[n]) for n in frozen_before)
