"""Adapter folders move both ways between fastpeft and HF PEFT (LoRA, IA3) with the same logits."""

import json
import os

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from tests.models import tiny_gpt2, tiny_llama, tiny_llama_cls, twin
from tests.peft_parity import build_pair
from tests.utils import assert_close

CASES = {
    "lora": (tiny_llama, lambda: fastpeft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=False,
                                                     target_modules=["q_proj", "v_proj", "down_proj"])),
    "lora-rslora-patterns-bias": (tiny_llama, lambda: fastpeft.LoraConfig(
        task_type="CAUSAL_LM", r=4, use_rslora=True, init_lora_weights=False, target_modules="all-linear",
        rank_pattern={"o_proj": 2}, alpha_pattern={"layers.0.self_attn.q_proj": 16})),
    "lora-modules_to_save": (tiny_llama, lambda: fastpeft.LoraConfig(
        task_type="CAUSAL_LM", r=2, init_lora_weights=False, target_modules=["k_proj"], modules_to_save=["lm_head"])),
    "lora-gpt2": (tiny_gpt2, lambda: fastpeft.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False,
                                                         target_modules=["c_attn"], fan_in_fan_out=True, bias="lora_only")),
    "lora-seq-cls": (tiny_llama_cls, lambda: fastpeft.LoraConfig(task_type="SEQ_CLS", r=4, init_lora_weights=False,
                                                                 target_modules=["q_proj", "v_proj"])),
    "ia3": (tiny_llama, lambda: fastpeft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"])),
    "ia3-seq-cls": (tiny_llama_cls, lambda: fastpeft.IA3Config(task_type="SEQ_CLS")),
}


def _perturb(model):
    """Make every adapter tensor non-trivial (IA3 starts at ones, LoRA-B / heads at zero or random)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad or "lora_" in name or "ia3_l" in name or "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("case", list(CASES))
def test_save_here_load_in_peft_and_back(case, tmp_path):
    builder, make_cfg = CASES[case]
    ours, theirs = build_pair(builder, make_cfg())
    _perturb(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=False)
    ids = torch.randint(1, 97, (2, 6))
    want = _logits(theirs, ids)
    assert_close(_logits(ours, ids), want, torch.float32, what="before saving")

    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    # same files: PEFT's key names and config fields
    keys_ours = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    keys_theirs = set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert keys_ours == keys_theirs
    cfg_ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    cfg_theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert cfg_ours["peft_type"] == cfg_theirs["peft_type"] and cfg_ours["task_type"] == cfg_theirs["task_type"]
    assert not [f for f in os.listdir(tmp_path / "ours") if f.startswith(".") or f.endswith(".tmp")], "temp files left"

    base_a, base_b = twin(builder)  # fresh bases: same weights as each other, not as the saved pair
    in_peft = peft.PeftModel.from_pretrained(base_b, tmp_path / "ours")
    in_ours = fastpeft.PeftModel.from_pretrained(base_a, tmp_path / "theirs")
    assert_close(_logits(in_ours, ids), _logits(in_peft, ids), torch.float32, what="cross-loaded")
    assert not any(p.requires_grad for p in in_ours.parameters()), "is_trainable=False must freeze the adapter"


def test_is_trainable_and_named_adapters_roundtrip(tmp_path):
    cfg = fastpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    ours = fastpeft.get_peft_model(tiny_llama(seed=1), cfg)
    ours.add_adapter("extra", fastpeft.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "extra" / "adapter_config.json").exists()
    ids = torch.randint(0, 97, (1, 5))
    ours.set_adapter("extra")
    want_extra = _logits(ours, ids)

    loaded = fastpeft.PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path, is_trainable=True)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    loaded.load_adapter(tmp_path / "extra", adapter_name="extra")
    loaded.set_adapter("extra")
    assert_close(_logits(loaded, ids), want_extra, torch.float32)

    theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path)
    theirs.load_adapter(str(tmp_path / "extra"), adapter_name="extra")
    theirs.set_adapter("extra")
    assert_close(_logits(theirs, ids), want_extra, torch.float32, what="PEFT loading a named adapter")


def test_save_is_lossless_for_bf16_and_overwrites_atomically(tmp_path):
    model = tiny_llama(seed=2).to(torch.bfloat16)
    pm = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    pm.save_pretrained(tmp_path)  # second write replaces the first
    saved = load_file(tmp_path / "adapter_model.safetensors")
    live = pm.adapter_state_dict()
    assert saved.keys() == live.keys()
    for k in saved:
        assert saved[k].dtype == live[k].dtype and torch.equal(saved[k], live[k]), k
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
