"""fastpeft.accelerate(peft_model): PEFT's own model, same parameters, fastpeft's ops, PEFT's numbers."""

import importlib
import sys

import pytest
import torch

peft = pytest.importorskip("peft")

import fastpeft  # noqa: E402
from tests.models import tiny_gpt2, tiny_llama, twin  # noqa: E402
from tests.peft_parity import trainable  # noqa: E402
from tests.utils import assert_close  # noqa: E402

accel_mod = importlib.import_module("fastpeft.accelerate")  # the module (fastpeft.accelerate is also the function)


@pytest.fixture
def op_calls(monkeypatch):
    """Count calls of the fused ops made from the accelerated layers."""
    calls = {"lora": 0, "ia3": 0}

    def counting(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(accel_mod, "lora_linear", counting("lora", accel_mod.lora_linear))
    monkeypatch.setattr(accel_mod, "ia3_linear", counting("ia3", accel_mod.ia3_linear))
    return calls


def _pair(builder, config):
    base_a, base_b = twin(builder)
    plain = peft.get_peft_model(base_a, config)
    fast = peft.get_peft_model(base_b, config)
    fast.load_state_dict(plain.state_dict())
    with torch.no_grad():  # non-trivial adapters (LoRA B starts at zero, IA3 at one)
        for (_, p), (_, q) in zip(plain.named_parameters(), fast.named_parameters()):
            if p.requires_grad:
                noise = 0.2 * torch.randn_like(p)
                p.add_(noise)
                q.add_(noise)
    return plain, fast


def _step(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits, {n: p.grad for n, p in trainable(model).items()}


CONFIGS = {
    "lora-llama": (tiny_llama, lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")),
    "lora-rslora-dropout0": (tiny_llama, lambda: peft.LoraConfig(r=8, use_rslora=True, target_modules=["q_proj", "v_proj"])),
    "lora-gpt2-conv1d": (tiny_gpt2, lambda: peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "ia3-llama": (tiny_llama, lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                     feedforward_modules=["down_proj"])),
    "ia3-gpt2": (tiny_gpt2, lambda: peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                                                   feedforward_modules=["mlp.c_proj"])),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_same_numbers_same_parameters_fused_ops(case, op_calls):
    builder, make = CONFIGS[case]
    plain, fast = _pair(builder, make())
    params_before = {n: p for n, p in fast.named_parameters()}
    assert fastpeft.accelerate(fast) is fast
    assert {n: p for n, p in fast.named_parameters()} == params_before  # same names, same objects
    assert isinstance(fast, peft.PeftModel)
    ids = torch.randint(0, 97, (2, 6))
    logits_a, grads_a = _step(plain, ids)
    logits_b, grads_b = _step(fast, ids)
    assert op_calls["lora"] + op_calls["ia3"] > 0, "accelerated model never called a fused op"
    assert_close(logits_b, logits_a, torch.float32, what="logits")
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        assert_close(grads_b[n], grads_a[n], torch.float32, scale=5, what=f"grad of {n}")


def test_peft_features_still_work_after_accelerate(op_calls, tmp_path):
    plain, fast = _pair(tiny_llama, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    fastpeft.accelerate(fast)
    fastpeft.accelerate(fast)  # idempotent
    ids = torch.randint(0, 97, (2, 5))
    plain.eval(), fast.eval()
    with torch.no_grad():
        assert_close(fast(input_ids=ids).logits, plain(input_ids=ids).logits, torch.float32)
        with fast.disable_adapter(), plain.disable_adapter():
            assert_close(fast(input_ids=ids).logits, plain(input_ids=ids).logits, torch.float32, what="disabled")
        fast.merge_adapter()
        plain.merge_adapter()
        assert_close(fast(input_ids=ids).logits, plain(input_ids=ids).logits, torch.float32, what="merged")
        fast.unmerge_adapter()
        plain.unmerge_adapter()
        fast.add_adapter("b", peft.LoraConfig(r=2, target_modules=["q_proj"]))
        plain.add_adapter("b", peft.LoraConfig(r=2, target_modules=["q_proj"]))
        fast.load_state_dict(plain.state_dict())
        names = ["default", "b"]
        assert_close(fast(input_ids=ids, adapter_names=names).logits,  # per-row adapters: PEFT's own path
                     plain(input_ids=ids, adapter_names=names).logits, torch.float32, what="mixed batch")
    fast.save_pretrained(tmp_path / "fast")
    plain.save_pretrained(tmp_path / "plain")
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "fast" / "adapter_model.safetensors"), load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_without_peft_installed_the_error_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    monkeypatch.setitem(sys.modules, "peft.tuners", None)
    with pytest.raises(ImportError, match="pip install peft"):
        fastpeft.accelerate(torch.nn.Linear(2, 2))


def test_a_model_without_peft_layers_is_refused():
    with pytest.raises(ValueError, match="no PEFT LoRA or IA3 linear layer"):
        fastpeft.accelerate(tiny_llama(seed=0))
    with pytest.raises(TypeError, match="takes a PEFT model"):
        fastpeft.accelerate("model")
