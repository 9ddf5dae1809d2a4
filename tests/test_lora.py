"""LoRA models against HF PEFT: logits, gradients, merge/unmerge, mixed batches, save/load both ways."""

import peft
import pytest
import torch

import fastpeft
from fastpeft.nn import LoraLinear
from tests.models import lm_batch, tiny_gpt2, tiny_llama, tiny_llama_cls, tiny_mistral, tiny_qwen2
from tests.peft_parity import assert_same_outputs_and_grads, build_pair
from tests.utils import assert_close


LLAMA_CONFIGS = {
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj"]),
    "all-linear-r1": dict(r=1, lora_alpha=3, target_modules="all-linear"),
    "regex": dict(r=3, target_modules=r".*\.mlp\.(gate|up)_proj"),
    "patterns": dict(r=4, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 2},
                     alpha_pattern={"layers.1.self_attn.q_proj": 32}),
    "modules_to_save": dict(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"]),
    "gaussian": dict(r=4, target_modules=["up_proj"], init_lora_weights="gaussian"),
}


@pytest.mark.parametrize("name", list(LLAMA_CONFIGS))
def test_llama_lora_matches_peft(name):
    cfg = fastpeft.LoraConfig(task_type="CAUSAL_LM", **{"init_lora_weights": False, **LLAMA_CONFIGS[name]})
    ours, theirs = build_pair(tiny_llama, cfg)
    assert_same_outputs_and_grads(ours, theirs, lm_batch())


@pytest.mark.parametrize("builder", [tiny_qwen2, tiny_mistral], ids=["qwen2", "mistral"])
def test_other_gqa_families_match_peft(builder):
    cfg = fastpeft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=16, target_modules="all-linear",
                              init_lora_weights=False)
    ours, theirs = build_pair(builder, cfg)
    assert_same_outputs_and_grads(ours, theirs, lm_batch())


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_gpt2_conv1d_fan_in_fan_out_matches_peft(bias):
    cfg = fastpeft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                              bias=bias, init_lora_weights=False)
    ours, theirs = build_pair(tiny_gpt2, cfg)
    assert_same_outputs_and_grads(ours, theirs, lm_batch())


def test_default_init_is_identity_and_dropout_only_in_training():
    model = tiny_llama(seed=0)
    ids = lm_batch(labels=False)
    with torch.no_grad():
        base_logits = model(**ids).logits
    pm = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        torch.testing.assert_close(pm(**ids).logits, base_logits)  # B = 0 at init: the adapter starts as identity
    for m in pm.modules():
        if isinstance(m, LoraLinear):
            torch.nn.init.normal_(m.lora_B["default"].weight)
    pm.eval()
    with torch.no_grad():
        eval_a, eval_b = pm(**ids).logits, pm(**ids).logits
    assert torch.equal(eval_a, eval_b)
    pm.train()
    with torch.no_grad():
        train_a, train_b = pm(**ids).logits, pm(**ids).logits
    assert not torch.equal(train_a, train_b)  # fresh dropout masks each step


def test_merge_unmerge_merge_and_unload_and_unload():
    cfg = fastpeft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    ours, _ = build_pair(tiny_llama, cfg)
    batch = lm_batch(labels=False)
    weights = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        expect = ours(**batch).logits
        ours.merge_adapter()
        assert_close(ours(**batch).logits, expect, torch.float32, scale=5, what="merged logits")
        ours.unmerge_adapter()
        for n, p in ours.named_parameters():
            if n in weights:
                torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
        with ours.disable_adapter():
            base = ours(**batch).logits
        assert not torch.allclose(base, expect)
        merged = ours.merge_and_unload()
        assert not any(isinstance(m, LoraLinear) for m in merged.modules())
        assert_close(merged(**batch).logits, expect, torch.float32, scale=5, what="merge_and_unload logits")

    ours2, _ = build_pair(tiny_llama, cfg)
    with torch.no_grad():
        with ours2.disable_adapter():
            base2 = ours2(**batch).logits
        plain = ours2.unload()
        assert_close(plain(**batch).logits, base2, torch.float32)


def test_merge_in_bf16_within_rounding():
    layer = torch.nn.Linear(64, 48).to(torch.bfloat16)
    w0 = layer.weight.detach().clone()
    lora = LoraLinear(layer, r=4, init_lora_weights=False)
    delta = lora.get_delta_weight("default").float()
    lora.merge()
    err = (layer.weight.float() - (w0.float() + delta)).abs().max()
    assert err <= 2 ** -7 * (w0.float() + delta).abs().max()
    lora.unmerge()
    assert (layer.weight.float() - w0.float()).abs().max() <= 2 ** -6 * w0.float().abs().max()


def test_mixed_adapter_batch_matches_each_alone_and_peft():
    cfg_a = fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    cfg_b = fastpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ours, theirs = build_pair(tiny_llama, cfg_a)
    ours.add_adapter("other", cfg_b)
    theirs.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ours.load_state_dict(theirs.state_dict())
    ours.eval(), theirs.eval()  # PEFT takes adapter_names in eval mode only
    ids = torch.randint(0, 97, (4, 6))
    names = ["default", "other", "__base__", "other"]
    with torch.no_grad():
        mixed = ours(input_ids=ids, adapter_names=names).logits
        assert_close(mixed, theirs(input_ids=ids, adapter_names=names).logits, torch.float32)
        for row, name in enumerate(names):
            if name == "__base__":
                with ours.disable_adapter():
                    alone = ours(input_ids=ids[row:row + 1]).logits
            else:
                ours.set_adapter(name)
                alone = ours(input_ids=ids[row:row + 1]).logits
            assert_close(mixed[row:row + 1], alone, torch.float32, what=f"row {row} ({name})")
    with pytest.raises(ValueError, match="unknown adapter"):
        ours(input_ids=ids, adapter_names=["default", "nope", "other", "other"])


def test_set_adapter_switches_trainable_and_output():
    cfg = fastpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    ours, _ = build_pair(tiny_llama, cfg)
    ours.add_adapter("second", fastpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    ids = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        first = ours(input_ids=ids).logits
        ours.set_adapter("second")
        second = ours(input_ids=ids).logits
    assert not torch.allclose(first, second)
    assert all(".second." in n for n, p in ours.named_parameters() if p.requires_grad)
    ours.delete_adapter("second")
    assert ours.active_adapter == "default" and "second" not in ours.peft_config


def test_print_trainable_parameters_matches_peft(capsys):
    cfg = fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    ours, theirs = build_pair(tiny_llama, cfg)
    ours.print_trainable_parameters()
    mine = capsys.readouterr().out
    theirs.print_trainable_parameters()
    assert mine == capsys.readouterr().out
    assert mine.startswith("trainable params: ")


def test_sequence_classification_lora_matches_peft():
    cfg = fastpeft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ours, theirs = build_pair(tiny_llama_cls, cfg)
    batch = {"input_ids": torch.randint(1, 97, (3, 6)), "labels": torch.tensor([0, 2, 1])}
    assert_same_outputs_and_grads(ours, theirs, batch)
    assert any("score.modules_to_save.default" in n for n, p in ours.named_parameters() if p.requires_grad)


def test_generate_matches_peft():
    cfg = fastpeft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ours, theirs = build_pair(tiny_llama, cfg)
    ids = torch.randint(1, 97, (2, 5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(input_ids=ids, **kw), theirs.generate(input_ids=ids, **kw))


def test_bf16_model_with_fp32_adapter_matches_peft():
    cfg = fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    ours, theirs = build_pair(tiny_llama, cfg)
    for m in (ours, theirs):
        m.get_base_model().to(torch.bfloat16)
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        assert_close(ours(input_ids=ids).logits.float(), theirs(input_ids=ids).logits.float(), torch.bfloat16)
