"""fastpeft in the Hugging Face stack: transformers' Trainer, TRL's SFTTrainer, the Hub (a local cache and a
mocked HfApi, never the network), PEFT's state-dict functions, add_weighted_adapter, AutoPeftModel*, file modes
and configs written by a newer PEFT."""

import copy
import json
import os
import shutil
import warnings

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch.utils.data import Dataset

import fastpeft
from tests.models import tiny_llama, tiny_llama_cls
from tests.utils import assert_close

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _perturb(model, scale=0.1):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(scale * torch.randn_like(p))


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------- a PEFT model
def test_fastpeft_model_is_a_peft_model_with_peft_s_attributes():
    ours = fastpeft.get_peft_model(tiny_llama(seed=0), fastpeft.LoraConfig(**LORA))
    theirs = peft.get_peft_model(tiny_llama(seed=0), peft.LoraConfig(**LORA))
    assert isinstance(ours, peft.PeftModel) and isinstance(ours, fastpeft.PeftModelForCausalLM)
    assert type(ours).__name__ == type(theirs).__name__ == "PeftModelForCausalLM"
    assert ours.active_adapters == theirs.active_adapters == ["default"]
    assert ours.active_adapter == theirs.active_adapter == "default"
    assert type(ours.get_base_model()) is type(theirs.get_base_model()) is transformers.LlamaForCausalLM
    assert ours.base_model.model is ours.get_base_model()        # PEFT: base_model is the tuner, .model the LM
    assert ours.base_model.config is ours.get_base_model().config  # the tuner forwards attributes, as LoraModel
    assert ours.has_active_enabled_adapter and ours.modules_to_save is None
    assert ours.base_model_torch_dtype == theirs.base_model_torch_dtype == torch.float32
    from transformers.trainer_utils import _is_peft_model, unwrap_peft_model

    assert _is_peft_model(ours) and unwrap_peft_model(ours) is ours.get_base_model()
    _perturb(ours)
    ids = torch.randint(0, 97, (2, 7))
    with ours.disable_adapter():
        assert not ours.has_active_enabled_adapter
        off = _logits(ours, ids)
    with theirs.disable_adapter():
        assert_close(off, _logits(theirs, ids), torch.float32, what="disable_adapter = the base model")
    assert not torch.allclose(_logits(ours, ids), off)
    clone = copy.deepcopy(ours)
    assert isinstance(clone, peft.PeftModel) and torch.equal(_logits(clone, ids), _logits(ours, ids))
    with pytest.raises(NotImplementedError, match="get_model_status is not implemented by fastpeft"):
        ours.get_model_status()  # PEFT's code would run on fastpeft's internals: it says so instead


def test_without_the_peft_class_switch_the_model_is_plain(monkeypatch):
    monkeypatch.setenv("FASTPEFT_PEFT_CLASS", "0")
    ours = fastpeft.get_peft_model(tiny_llama(seed=0), fastpeft.LoraConfig(**LORA))
    assert not isinstance(ours, peft.PeftModel) and type(ours) is fastpeft.PeftModelForCausalLM


# ---------------------------------------------------------------------------------------------- Trainer
class _Tokens(Dataset):
    def __init__(self, n=8, t=12):
        self.x = torch.randint(1, 97, (n, t), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _train(model, out, resume=None, steps=4):
    args = transformers.TrainingArguments(str(out), max_steps=steps, per_device_train_batch_size=2, save_steps=2,
                                          report_to=[], use_cpu=True, logging_steps=1, learning_rate=1e-2,
                                          disable_tqdm=True, seed=0, data_seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens())
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out / "final"))
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _adapter_files(folder):
    return sorted(f for f in os.listdir(folder) if f.startswith("adapter_") or f.startswith("model"))


def test_trainer_saves_the_adapter_only_as_peft_and_resumes(tmp_path, one_thread):
    ours = fastpeft.get_peft_model(tiny_llama(seed=0).train(), fastpeft.LoraConfig(**LORA))
    theirs = peft.get_peft_model(tiny_llama(seed=0).train(), peft.LoraConfig(**LORA))
    peft.set_peft_model_state_dict(theirs, fastpeft.get_peft_model_state_dict(ours))  # same random LoRA-A
    loss_ours, loss_theirs = _train(ours, tmp_path / "ours"), _train(theirs, tmp_path / "theirs")
    assert torch.allclose(torch.tensor(loss_ours), torch.tensor(loss_theirs), rtol=1e-4), (loss_ours, loss_theirs)
    for sub in ("final", "checkpoint-2", "checkpoint-4"):
        mine, peft_s = tmp_path / "ours" / sub, tmp_path / "theirs" / sub
        assert _adapter_files(mine) == _adapter_files(peft_s) == ["adapter_config.json", "adapter_model.safetensors"]
        # every other file Trainer writes (optimizer, scheduler, rng, state) is there too, PEFT's README.md model
        # card included: the same set of files
        assert set(os.listdir(peft_s)) == set(os.listdir(mine))
        a, b = load_file(mine / "adapter_model.safetensors"), load_file(peft_s / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert_close(a[k], b[k], torch.float32, scale=10.0, what=f"{sub}: {k}")
    # PEFT loads what Trainer saved from the fastpeft model, with the same logits
    ids = torch.randint(0, 97, (2, 9))
    loaded = peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path / "ours" / "final"))
    assert_close(_logits(loaded, ids), _logits(ours, ids), torch.float32, what="PEFT loading Trainer's save")
    # resume from checkpoint-2 in a fresh model: the remaining steps and the final adapter are the uninterrupted run's
    again = fastpeft.get_peft_model(tiny_llama(seed=0).train(), fastpeft.LoraConfig(**LORA))
    resumed = _train(again, tmp_path / "ours", resume=str(tmp_path / "ours" / "checkpoint-2"))
    # (the log history of steps 1-2 comes back from the checkpoint's trainer_state.json)
    assert torch.allclose(torch.tensor(resumed), torch.tensor(loss_ours), rtol=1e-5), (resumed, loss_ours)
    final = fastpeft.get_peft_model_state_dict(again)
    for k, v in fastpeft.get_peft_model_state_dict(ours).items():
        assert torch.allclose(final[k], v, rtol=1e-5, atol=1e-7), k


def test_load_adapter_into_an_existing_name_needs_is_trainable(tmp_path):
    ours = fastpeft.get_peft_model(tiny_llama(seed=0), fastpeft.LoraConfig(**LORA))
    _perturb(ours)
    ours.save_pretrained(tmp_path)
    saved = fastpeft.get_peft_model_state_dict(ours)
    _perturb(ours)
    with pytest.raises(ValueError, match="already exists"):
        ours.load_adapter(tmp_path, "default")
    ours.load_adapter(tmp_path, "default", is_trainable=True)  # transformers' resume path
    assert all(torch.equal(v, fastpeft.get_peft_model_state_dict(ours)[k]) for k, v in saved.items())


# ---------------------------------------------------------------------------------------------- TRL
@pytest.mark.parametrize("how", ["model", "config"])
def test_sft_trainer_trains_the_tiny_preset_and_peft_loads_the_adapter(tmp_path, how, one_thread):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from fastpeft.training.models import build_preset
    from fastpeft.training.tokenizer import preset_tokenizer

    data = datasets.Dataset.from_dict({"text": [f"fastpeft example number {i}, some text" for i in range(8)]})
    args = trl.SFTConfig(str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                         logging_steps=1, learning_rate=5e-2, max_length=32, disable_tqdm=True, save_strategy="no")
    config = fastpeft.LoraConfig(**LORA)
    if how == "model":
        model = fastpeft.get_peft_model(build_preset("tiny", seed=0), config)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=preset_tokenizer())
    else:
        from fastpeft.integrations.trl import SFTTrainer

        with pytest.raises(TypeError, match="peft.PeftConfig"):  # TRL itself takes peft configs only
            trl.SFTTrainer(model=build_preset("tiny", seed=0), args=args, train_dataset=data,
                           processing_class=preset_tokenizer(), peft_config=config)
        trainer = SFTTrainer(model=build_preset("tiny", seed=0), args=args, train_dataset=data,
                             processing_class=preset_tokenizer(), peft_config=config)
        model = trainer.model
    assert isinstance(model, fastpeft.PeftModel)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert not os.path.exists(tmp_path / "final" / "model.safetensors")
    trained = fastpeft.get_peft_model_state_dict(model)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in trained.items())  # it learned
    saved = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    # (the live model is not compared: TRL patches its LM head for the fused loss, PEFT's model alike)
    ids = torch.randint(0, 200, (2, 10))
    theirs = peft.PeftModel.from_pretrained(build_preset("tiny", seed=0), str(tmp_path / "final"))
    mine = fastpeft.PeftModel.from_pretrained(build_preset("tiny", seed=0), tmp_path / "final")
    assert_close(_logits(theirs, ids), _logits(mine, ids), torch.float32, what="PEFT loading SFTTrainer's adapter")


# ---------------------------------------------------------------------------------------------- state dicts
def test_get_and_set_peft_model_state_dict_match_peft():
    ours = fastpeft.get_peft_model(tiny_llama(seed=1), fastpeft.LoraConfig(**LORA))
    theirs = peft.get_peft_model(tiny_llama(seed=1), peft.LoraConfig(**LORA))
    _perturb(ours)
    mine = fastpeft.get_peft_model_state_dict(ours)
    assert mine.keys() == peft.get_peft_model_state_dict(theirs).keys()
    peft.set_peft_model_state_dict(theirs, mine)
    ids = torch.randint(0, 97, (2, 6))
    assert_close(_logits(ours, ids), _logits(theirs, ids), torch.float32, what="PEFT with fastpeft's state dict")
    fresh = fastpeft.get_peft_model(tiny_llama(seed=1), fastpeft.LoraConfig(**LORA))
    result = fastpeft.set_peft_model_state_dict(fresh, peft.get_peft_model_state_dict(theirs))
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(_logits(fresh, ids), _logits(ours, ids))
    assert fastpeft.get_peft_model_state_dict(ours, state_dict=ours.state_dict()).keys() == mine.keys()
    bad = dict(mine)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing 1 key"):
        fastpeft.set_peft_model_state_dict(fresh, bad)
    with pytest.raises(ValueError, match="unknown adapter"):
        fastpeft.set_peft_model_state_dict(fresh, mine, adapter_name="nope")


# ---------------------------------------------------------------------------------------------- add_weighted_adapter
def _two_adapter_pair(r2=4, rslora=False):
    cfg1 = dict(LORA, use_rslora=rslora)
    cfg2 = dict(LORA, r=r2, lora_alpha=16, target_modules=["q_proj", "k_proj"], use_rslora=rslora)
    ours = fastpeft.get_peft_model(tiny_llama(seed=3), fastpeft.LoraConfig(**cfg1))
    ours.add_adapter("other", fastpeft.LoraConfig(**cfg2))
    _perturb(ours, 0.3)
    theirs = peft.get_peft_model(tiny_llama(seed=3), peft.LoraConfig(**cfg1))
    theirs.add_adapter("other", peft.LoraConfig(**cfg2))
    for name in ("default", "other"):
        peft.set_peft_model_state_dict(theirs, fastpeft.get_peft_model_state_dict(ours, adapter_name=name), name)
    return ours, theirs


@pytest.mark.parametrize("combination,r2,rslora", [("linear", 4, False), ("cat", 2, False), ("svd", 2, False),
                                                   ("svd", 4, True), ("cat", 4, True)])
def test_add_weighted_adapter_matches_peft(combination, r2, rslora):
    ours, theirs = _two_adapter_pair(r2, rslora)
    kw = dict(svd_rank=3) if combination == "svd" and not rslora else {}
    weights = [0.7, -0.4]
    ours.add_weighted_adapter(["default", "other"], weights, "mix", combination_type=combination, **kw)
    theirs.add_weighted_adapter(["default", "other"], weights, "mix", combination_type=combination, **kw)
    mine = fastpeft.get_peft_model_state_dict(ours, adapter_name="mix")
    peft_s = peft.get_peft_model_state_dict(theirs, adapter_name="mix")
    assert mine.keys() == peft_s.keys()
    for k in mine:
        if combination == "svd":  # singular vectors are defined up to sign: compare the product B·A per layer
            continue
        assert_close(mine[k], peft_s[k], torch.float32, what=f"{combination}: {k}")
    if combination == "svd":
        for k in [k for k in mine if "lora_A" in k]:
            kb = k.replace("lora_A", "lora_B")
            assert_close(mine[kb] @ mine[k], peft_s[kb] @ peft_s[k], torch.float32, scale=10.0, what=k)
    ids = torch.randint(0, 97, (2, 6))
    ours.set_adapter("mix")
    theirs.set_adapter("mix")
    assert_close(_logits(ours, ids), _logits(theirs, ids), torch.float32, scale=10.0, what=f"{combination} logits")
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r


def test_add_weighted_adapter_refuses_what_it_cannot_do():
    ours, _ = _two_adapter_pair(2)
    with pytest.raises(ValueError, match="one rank"):
        ours.add_weighted_adapter(["default", "other"], [1.0, 1.0], "x", combination_type="linear")
    with pytest.raises(NotImplementedError, match="ties"):
        ours.add_weighted_adapter(["default", "other"], [1.0, 1.0], "x", combination_type="ties")
    with pytest.raises(ValueError, match="unknown adapter"):
        ours.add_weighted_adapter(["default", "nope"], [1.0, 1.0], "x", combination_type="cat")
    with pytest.raises(ValueError, match="one number per adapter"):
        ours.add_weighted_adapter(["default", "other"], [1.0], "x", combination_type="cat")
    with pytest.raises(ValueError, match="already exists"):
        ours.add_weighted_adapter(["default", "other"], [1.0, 1.0], "other", combination_type="cat")
    assert sorted(ours.peft_config) == ["default", "other"]


# ---------------------------------------------------------------------------------------------- the Hub
def _cache_repo(cache, repo_id, files_by_revision, branch_of=None):
    """A Hugging Face cache as huggingface_hub lays it out: blobs, refs/<branch> -> commit, snapshots/<commit>/."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    for commit, files in files_by_revision.items():
        for rel, src in files.items():
            dst = root / "snapshots" / commit / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for branch, commit in (branch_of or {}).items():
        (root / "refs" / branch).write_text(commit)
    return root


def test_from_pretrained_with_a_repo_id_offline_from_the_cache(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    one = fastpeft.get_peft_model(tiny_llama(seed=0), fastpeft.LoraConfig(**LORA))
    two = fastpeft.get_peft_model(tiny_llama(seed=0), fastpeft.LoraConfig(**LORA))
    _perturb(one)
    _perturb(two)
    one.save_pretrained(tmp_path / "v1")
    two.save_pretrained(tmp_path / "v2")
    files = ("adapter_config.json", "adapter_model.safetensors")
    c1, c2 = "a" * 40, "b" * 40
    cache = tmp_path / "hub"
    _cache_repo(cache, "org/adapter", {c1: {f: tmp_path / "v1" / f for f in files},
                                       c2: {f"sub/{f}": tmp_path / "v2" / f for f in files}},
                {"main": c1, "v2": c2})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seen = []
    real = huggingface_hub.hf_hub_download

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    ids = torch.randint(0, 97, (2, 6))
    loaded = fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), "org/adapter", token="hf_dummy")
    assert torch.equal(_logits(loaded, ids), _logits(one, ids))
    assert seen and all(k["token"] == "hf_dummy" for k in seen)
    for revision in ("v2", c2):  # a branch and a commit hash
        loaded = fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), "org/adapter", revision=revision,
                                                    subfolder="sub")
        assert torch.equal(_logits(loaded, ids), _logits(two, ids))
    loaded.load_adapter("org/adapter", "first")
    loaded.set_adapter("first")
    assert torch.equal(_logits(loaded, ids), _logits(one, ids))
    with pytest.raises(FileNotFoundError, match="not in the local Hub cache"):
        fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), "org/missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path / "no" / "such" / "folder"))
    with pytest.raises(TypeError, match="unexpected keyword"):
        fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), "org/adapter", revison="v2")


class _FakeHfApi:
    """Records what push_to_hub asks of the Hub and keeps a copy of the uploaded folder."""
    calls: list = []
    uploaded: dict = {}

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kw):
        type(self).calls.append(("create_repo", repo_id, kw))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_branch(self, repo_id, branch, **kw):
        type(self).calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, repo_id, folder_path, **kw):
        type(self).calls.append(("upload_folder", repo_id, kw))
        type(self).uploaded = {f: open(os.path.join(folder_path, f), "rb").read() for f in os.listdir(folder_path)}
        return "commit-info"


def test_push_to_hub_uploads_the_adapter_and_a_model_card(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeHfApi)
    _FakeHfApi.calls, _FakeHfApi.uploaded = [], {}
    config = fastpeft.LoraConfig(**LORA, base_model_name_or_path="org/tiny-llama")
    ours = fastpeft.get_peft_model(tiny_llama(seed=0), config)
    assert ours.push_to_hub("me/my-adapter", token="hf_x", revision="dev", private=True) == "commit-info"
    kinds = [c[0] for c in _FakeHfApi.calls]
    assert kinds == ["create_repo", "create_branch", "upload_folder"]
    assert _FakeHfApi.calls[0][2]["private"] is True and _FakeHfApi.calls[2][2]["revision"] == "dev"
    assert sorted(_FakeHfApi.uploaded) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = huggingface_hub.ModelCard(_FakeHfApi.uploaded["README.md"].decode())
    assert card.data.library_name == "peft" and card.data.base_model == "org/tiny-llama"
    assert "lora" in card.data.tags and card.data.pipeline_tag == "text-generation"
    (tmp_path / "card").mkdir()
    (tmp_path / "card" / "README.md").write_text("---\nlicense: mit\n---\n\nMy own words.\n")
    ours.create_or_update_model_card(tmp_path / "card")  # transformers' Trainer.create_model_card calls this
    card = huggingface_hub.ModelCard((tmp_path / "card" / "README.md").read_text())
    assert "My own words." in card.text and card.data.license == "mit" and card.data.library_name == "peft"
    _FakeHfApi.calls = []
    ours.save_pretrained(tmp_path / "my-adapter", push_to_hub=True)
    assert [c[:2] for c in _FakeHfApi.calls] == [("create_repo", "my-adapter"), ("upload_folder", "my-adapter")]
    assert sorted(os.listdir(tmp_path / "my-adapter")) == ["README.md", "adapter_config.json",
                                                           "adapter_model.safetensors"]


def test_auto_peft_models_load_base_and_adapter(tmp_path):
    base = tiny_llama(seed=4)
    base.save_pretrained(tmp_path / "base")
    ours = fastpeft.get_peft_model(base, fastpeft.LoraConfig(**LORA, base_model_name_or_path=str(tmp_path / "base")))
    _perturb(ours)
    ours.save_pretrained(tmp_path / "adapter")
    loaded = fastpeft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded, fastpeft.PeftModelForCausalLM)
    ids = torch.randint(0, 97, (2, 6))
    assert torch.equal(_logits(loaded, ids), _logits(ours, ids))
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    assert_close(_logits(theirs, ids), _logits(loaded, ids), torch.float32, what="PEFT's AutoPeftModelForCausalLM")
    cls_base = tiny_llama_cls(seed=5)
    cls_base.save_pretrained(tmp_path / "cls-base")
    cls = fastpeft.get_peft_model(cls_base, fastpeft.LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS",
                                                                base_model_name_or_path=str(tmp_path / "cls-base")))
    cls.save_pretrained(tmp_path / "cls-adapter")
    loaded_cls = fastpeft.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "cls-adapter")
    assert isinstance(loaded_cls, fastpeft.PeftModelForSequenceClassification)
    assert torch.equal(_logits(loaded_cls, ids), _logits(cls, ids))
    with pytest.raises(ValueError, match="task_type is 'SEQ_CLS'"):
        fastpeft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "cls-adapter")


# ---------------------------------------------------------------------------------------------- files
def test_adapter_files_are_readable_by_others_under_umask_022(tmp_path):
    from fastpeft import io

    old = os.umask(0o022)
    try:
        ours = fastpeft.get_peft_model(tiny_llama(seed=0), fastpeft.LoraConfig(**LORA))
        ours.add_adapter("second", fastpeft.LoraConfig(**LORA))
        ours.save_pretrained(tmp_path / "a")
        io.atomic_write_text(str(tmp_path / "note.txt"), "x")
        io.save_tensors(str(tmp_path / "t.safetensors"), {"x": torch.zeros(2)})
        os.umask(0o077)
        ours.save_pretrained(tmp_path / "private")
    finally:
        os.umask(old)
    paths = [tmp_path / "a" / f for f in ("adapter_config.json", "adapter_model.safetensors")]
    paths += [tmp_path / "a" / "second" / "adapter_model.safetensors", tmp_path / "note.txt",
              tmp_path / "t.safetensors"]
    for p in paths:
        assert oct(os.stat(p).st_mode & 0o777) == oct(0o644), p
    assert oct(os.stat(tmp_path / "private" / "adapter_model.safetensors").st_mode & 0o777) == oct(0o600)


def test_a_config_field_from_a_newer_peft_loads_with_a_warning_and_is_kept(tmp_path):
    ours = fastpeft.get_peft_model(tiny_llama(seed=0), fastpeft.LoraConfig(**LORA))
    _perturb(ours)
    ours.save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    data = json.loads(path.read_text())
    data["lora_shiny_new_option"] = {"x": 1}
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="lora_shiny_new_option"):
        loaded = fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "a")
    ids = torch.randint(0, 97, (2, 6))
    assert torch.equal(_logits(loaded, ids), _logits(ours, ids))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded.save_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["lora_shiny_new_option"] == {"x": 1}
