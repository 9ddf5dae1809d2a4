"""fastpeft.accelerate(): the fused path for every vanilla LoRA / IA3 forward PEFT runs (several active adapters,
adapter_names batches, lora_bias, disabled / merged layers), PEFT's numbers, forward and gradients, and the
layers' repr unchanged.  tools/peft_suite_coverage.py measures the same over PEFT's own test suite."""

import importlib

import pytest
import torch

peft = pytest.importorskip("peft")

import fastpeft  # noqa: E402
from tests.models import tiny_gpt2, tiny_llama, twin  # noqa: E402
from tests.utils import assert_close  # noqa: E402

accel_mod = importlib.import_module("fastpeft.accelerate")


@pytest.fixture
def paths(monkeypatch):
    """Count fused-op calls and PEFT fallbacks of the accelerated layers."""
    calls = {"fused": 0, "fallback": 0}

    def counting(key, fn):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(accel_mod, "lora_linear", counting("fused", accel_mod.lora_linear))
    monkeypatch.setattr(accel_mod, "ia3_linear", counting("fused", accel_mod.ia3_linear))
    monkeypatch.setattr(accel_mod, "grouped_lora_linear", counting("fused", accel_mod.grouped_lora_linear))
    monkeypatch.setattr(accel_mod, "_fallback", counting("fallback", accel_mod._fallback))
    return calls


def _pair(builder, config, second=None):
    base_a, base_b = twin(builder)
    plain, fast = peft.get_peft_model(base_a, config), peft.get_peft_model(base_b, config)
    if second is not None:
        plain.add_adapter("b", second)
        fast.add_adapter("b", second)
    with torch.no_grad():
        for (n, p), (_, q) in zip(plain.named_parameters(), fast.named_parameters()):
            if "lora_" in n or "ia3_" in n:
                p.add_(0.2 * torch.randn_like(p))
        fast.load_state_dict(plain.state_dict())
    fastpeft.accelerate(fast)
    return plain, fast


def _all_adapter_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n or "ia3_" in n}


def _step(model, ids, **kw):
    for p in _all_adapter_params(model).values():
        p.requires_grad_(True)
        p.grad = None
    out = model(input_ids=ids, labels=ids, **kw)
    out.loss.backward()
    return out.logits, {n: p.grad for n, p in _all_adapter_params(model).items() if p.grad is not None}


def _same_step(plain, fast, ids, what, **kw):
    la, ga = _step(plain, ids, **kw)
    lb, gb = _step(fast, ids, **kw)
    assert_close(lb, la, torch.float32, what=f"{what}: logits")
    assert ga.keys() == gb.keys() and ga, what
    for n in ga:
        assert_close(gb[n], ga[n], torch.float32, scale=5, what=f"{what}: grad of {n}")


def test_repr_is_peft_s():
    for builder, config in [(tiny_llama, peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"])),
                            (tiny_gpt2, peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                                                       feedforward_modules=["mlp.c_proj"]))]:
        plain, fast = _pair(builder, config)
        assert repr(fast) == repr(plain)
        layer = next(m for m in fast.modules() if isinstance(m, (peft.tuners.lora.Linear, peft.tuners.ia3.Linear)))
        assert type(layer).__name__ == "Linear"
        assert repr(layer) == repr(next(m for m in plain.modules() if type(m) is type(layer).__mro__[1]))
        if isinstance(layer, peft.tuners.lora.Linear):
            assert repr(layer).startswith("lora.Linear(")


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_several_active_adapters_one_fused_call_per_layer(builder, paths):
    targets = ["q_proj", "v_proj"] if builder is tiny_llama else ["c_attn"]
    plain, fast = _pair(builder, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets),
                        peft.LoraConfig(r=2, lora_alpha=6, use_rslora=True, target_modules=targets[:1]))
    for m in (plain, fast):
        m.base_model.set_adapter(["default", "b"])
    layers = sum(isinstance(m, peft.tuners.lora.Linear) for m in fast.modules())
    ids = torch.randint(0, 97, (2, 6))
    _same_step(plain, fast, ids, "two active adapters")
    assert paths == {"fused": layers, "fallback": 0}


def test_adapter_names_batches_run_fused(paths):
    plain, fast = _pair(tiny_llama, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                        peft.LoraConfig(r=2, target_modules=["q_proj"]))  # "b" lacks v_proj: its rows get the base
    plain.eval(), fast.eval()
    ids = torch.randint(0, 97, (4, 5))
    names = ["b", "__base__", "default", "b"]
    with torch.no_grad():
        want = plain(input_ids=ids, adapter_names=names).logits
        got = fast(input_ids=ids, adapter_names=names).logits
    assert_close(got, want, torch.float32, what="mixed batch")
    assert paths["fallback"] == 0 and paths["fused"] > 0
    with torch.no_grad():  # every row one adapter: one call per layer
        single = fast(input_ids=ids, adapter_names=["default"] * 4).logits
        assert_close(single, plain(input_ids=ids).logits, torch.float32, what="one adapter named per row")
    with pytest.raises(ValueError, match="Length of `adapter_names`"):  # PEFT's own check, unchanged
        fast(input_ids=ids, adapter_names=["default"])


def test_lora_bias_disabled_and_merged_layers_need_no_fallback(paths):
    # GPT-2's Conv1D has a bias (PEFT merges lora_bias only into a layer that has one)
    plain, fast = _pair(tiny_gpt2, peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], lora_bias=True,
                                                   fan_in_fan_out=True))
    ids = torch.randint(0, 97, (2, 6))
    _same_step(plain, fast, ids, "lora_bias")
    with plain.disable_adapter(), fast.disable_adapter(), torch.no_grad():
        assert_close(fast(input_ids=ids).logits, plain(input_ids=ids).logits, torch.float32, what="disabled")
    plain.merge_adapter()
    fast.merge_adapter()
    with torch.no_grad():
        assert_close(fast(input_ids=ids).logits, plain(input_ids=ids).logits, torch.float32, what="merged")
    assert paths["fallback"] == 0


def test_ia3_several_adapters_and_disabled(paths):
    config = peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    plain, fast = _pair(tiny_llama, config, config)
    for m in (plain, fast):
        m.base_model.set_adapter(["default", "b"])
    ids = torch.randint(0, 97, (2, 6))
    _same_step(plain, fast, ids, "IA3 two active")
    with plain.disable_adapter(), fast.disable_adapter(), torch.no_grad():
        assert_close(fast(input_ids=ids).logits, plain(input_ids=ids).logits, torch.float32, what="IA3 disabled")
    assert paths["fallback"] == 0 and paths["fused"] > 0


def test_what_is_not_fused_falls_back_to_peft_with_peft_s_numbers(paths):
    plain, fast = _pair(tiny_llama, peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    ids = torch.randint(0, 97, (2, 6))
    _same_step(plain, fast, ids, "DoRA")
    assert paths["fallback"] > 0 and paths["fused"] == 0
    # several active adapters with different dropout, in training: PEFT's independent masks
    plain, fast = _pair(tiny_llama, peft.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.1),
                        peft.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.0))
    fast.base_model.set_adapter(["default", "b"])
    paths["fallback"] = 0
    fast.train()
    fast(input_ids=ids)
    assert paths["fallback"] == 2


def test_ia3_fp32_adapters_on_a_bf16_model(paths):
    """PEFT keeps IA3 vectors in fp32 on a bf16 model (autocast_adapter_dtype): the op does PEFT's arithmetic."""
    config = peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    base_a, base_b = twin(tiny_llama)
    plain = peft.get_peft_model(base_a.to(torch.bfloat16), config)
    fast = peft.get_peft_model(base_b.to(torch.bfloat16), config)
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if "ia3_" in n:
                assert p.dtype == torch.float32
                p.add_(0.2 * torch.randn_like(p))
        fast.load_state_dict(plain.state_dict())
    fastpeft.accelerate(fast)
    ids = torch.randint(0, 97, (2, 6))
    la, ga = _step(plain, ids)
    lb, gb = _step(fast, ids)
    assert_close(lb.float(), la.float(), torch.bfloat16, what="bf16 logits")
    for n in ga:
        assert gb[n].dtype == torch.float32
        assert_close(gb[n], ga[n], torch.bfloat16, scale=5, what=f"grad of {n}")
    assert paths["fallback"] == 0 and paths["fused"] > 0


def test_adapter_names_batches_in_training_and_with_lora_bias(paths):
    """Gradients through a mixed batch reach each row's adapter only (PEFT allows adapter_names in eval mode
    only), and lora_bias adapters mix."""
    for extra in ({}, {"lora_bias": True}):
        config = peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, **extra)
        plain, fast = _pair(tiny_gpt2, config, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                                               **extra))
        plain.eval(), fast.eval()
        ids = torch.randint(0, 97, (3, 5))
        _same_step(plain, fast, ids, f"mixed batch {extra}", adapter_names=["b", "default", "__base__"])
    assert paths["fallback"] == 0 and paths["fused"] > 0
