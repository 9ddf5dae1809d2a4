"""IA3 models vs HF PEFT: logits, every adapter gradient, merge/unmerge, SEQ_CLS, GPT-2 Conv1D."""

import pytest
import torch

import fastpeft
from fastpeft.nn import IA3Linear
from tests.models import lm_batch, tiny_gpt2, tiny_llama, tiny_llama_cls
from tests.peft_parity import assert_same_outputs_and_grads, build_pair
from tests.utils import assert_close


def _randomise_ia3(ours, theirs):
    """IA3 starts at ones (identity): move both models' vectors to the same random values."""
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    ours.load_state_dict(theirs.state_dict(), strict=False)


IA3_LLAMA = {
    "default-targets": dict(),
    "attn-and-ff": dict(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                        feedforward_modules=["up_proj", "down_proj"]),
    "regex": dict(target_modules=r".*\.(k_proj|gate_proj)", feedforward_modules=r".*gate_proj"),
}


@pytest.mark.parametrize("name", list(IA3_LLAMA))
def test_llama_ia3_matches_peft(name):
    ours, theirs = build_pair(tiny_llama, fastpeft.IA3Config(task_type="CAUSAL_LM", **IA3_LLAMA[name]))
    n_layers = sum(isinstance(m, IA3Linear) for m in ours.modules())
    assert n_layers == sum(type(m).__name__ == "Linear" and hasattr(m, "ia3_l") for m in theirs.modules()) > 0
    _randomise_ia3(ours, theirs)
    assert_same_outputs_and_grads(ours, theirs, lm_batch())


def test_gpt2_ia3_conv1d_matches_peft():
    cfg = fastpeft.IA3Config(task_type="CAUSAL_LM", target_modules=["c_attn", "mlp.c_proj"],
                             feedforward_modules=["mlp.c_proj"])
    ours, theirs = build_pair(tiny_gpt2, cfg)
    _randomise_ia3(ours, theirs)
    assert_same_outputs_and_grads(ours, theirs, lm_batch())


def test_sequence_classification_ia3_matches_peft():
    cfg = fastpeft.IA3Config(task_type="SEQ_CLS", target_modules=["k_proj", "v_proj", "down_proj"],
                             feedforward_modules=["down_proj"])
    ours, theirs = build_pair(tiny_llama_cls, cfg)
    _randomise_ia3(ours, theirs)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable), "SEQ_CLS must train the classification head (modules_to_save)"
    batch = lm_batch(labels=False)
    batch["labels"] = torch.randint(0, 3, (2,))
    assert_same_outputs_and_grads(ours, theirs, batch)


def test_merge_unmerge_and_merge_and_unload_match_peft():
    cfg = fastpeft.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"])
    ours, theirs = build_pair(tiny_llama, cfg)
    _randomise_ia3(ours, theirs)
    ours.eval(), theirs.eval()
    batch = lm_batch(labels=False)
    with torch.no_grad():
        adapted = ours(**batch).logits
        assert_close(adapted, theirs(**batch).logits, torch.float32)
        ours.merge_adapter()
        assert_close(ours(**batch).logits, adapted, torch.float32, what="merged")
        ours.unmerge_adapter()
        assert_close(ours(**batch).logits, adapted, torch.float32, what="unmerged")
        merged_theirs = theirs.merge_and_unload()
        merged_ours = ours.merge_and_unload()
        assert not any(isinstance(m, IA3Linear) for m in merged_ours.modules())
        assert type(merged_ours) is type(merged_theirs)
        assert_close(merged_ours(**batch).logits, merged_theirs(**batch).logits, torch.float32)
        sd_a, sd_b = merged_ours.state_dict(), merged_theirs.state_dict()
        assert sd_a.keys() == sd_b.keys()
        for k in sd_b:
            assert_close(sd_a[k].float(), sd_b[k].float(), torch.float32, what=k)


def test_disable_adapter_gives_base_model():
    base = tiny_llama(seed=3)
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        want = base(input_ids=ids).logits
    pm = fastpeft.get_peft_model(base, fastpeft.IA3Config(target_modules=["v_proj"], feedforward_modules=[]))
    with torch.no_grad():
        for m in pm.modules():
            if isinstance(m, IA3Linear):
                m.ia3_l["default"].mul_(3.0)
        changed = pm(input_ids=ids).logits
        with pm.disable_adapter():
            off = pm(input_ids=ids).logits
    assert not torch.allclose(changed, want)
    torch.testing.assert_close(off, want)
