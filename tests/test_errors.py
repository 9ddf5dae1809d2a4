"""Bad input fails loudly, and the message names the problem (module, file, field, shape)."""

import json
import os

import pytest
import torch

import fastpeft
from fastpeft import ops
from tests.models import tiny_llama


def _lora(**kw):
    return fastpeft.LoraConfig(**{"r": 4, "target_modules": ["q_proj"], **kw})


# ---------------------------------------------------------------- configs and injection
def test_unknown_target_module_is_named():
    with pytest.raises(ValueError, match="qkv_proj"):
        fastpeft.get_peft_model(tiny_llama(seed=0), _lora(target_modules=["qkv_proj"]))
    with pytest.raises(ValueError, match="no_such_layer"):
        fastpeft.get_peft_model(tiny_llama(seed=0), fastpeft.IA3Config(target_modules=["no_such_layer"],
                                                                       feedforward_modules=[]))


@pytest.mark.parametrize("r", [0, -2, 2.5])
def test_rank_must_be_a_positive_integer(r):
    with pytest.raises(ValueError, match="r must be a positive integer"):
        fastpeft.LoraConfig(r=r)
    with pytest.raises(ValueError, match="rank_pattern"):
        fastpeft.LoraConfig(r=4, rank_pattern={"q_proj": r})


def test_other_bad_config_fields():
    with pytest.raises(ValueError, match="lora_dropout"):
        fastpeft.LoraConfig(lora_dropout=1.0)
    with pytest.raises(ValueError, match="bias"):
        fastpeft.LoraConfig(bias="some")
    with pytest.raises(ValueError, match="feedforward_modules"):
        fastpeft.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        fastpeft.PrefixTuningConfig(num_virtual_tokens=0)


def test_unsupported_peft_options_are_refused_not_ignored(tmp_path):
    data = _lora().to_dict()
    data["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(NotImplementedError, match="use_dora"):
        fastpeft.PeftConfig.from_pretrained(tmp_path)
    data.pop("use_dora")
    # a field fastpeft does not know (a newer PEFT's): warned about by name and kept, not fatal (PEFT warns too)
    data["lora_rank_typo"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="lora_rank_typo"):
        config = fastpeft.PeftConfig.from_pretrained(tmp_path)
    assert config.to_dict()["lora_rank_typo"] == 3


def test_config_of_another_method(tmp_path):
    pm = fastpeft.get_peft_model(tiny_llama(seed=0), fastpeft.IA3Config(target_modules=["v_proj"], feedforward_modules=[]))
    pm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="IA3 config, not LORA"):
        fastpeft.LoraConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="cannot add a LORA adapter"):
        pm.add_adapter("lora", _lora())
    with pytest.raises(TypeError, match="dict"):
        fastpeft.get_peft_model(tiny_llama(seed=0), {"r": 4})


def test_hf_peft_config_objects_are_accepted():
    peft = pytest.importorskip("peft")
    pm = fastpeft.get_peft_model(tiny_llama(seed=0), peft.LoraConfig(r=2, target_modules=["v_proj"]))
    assert isinstance(pm.peft_config["default"], fastpeft.LoraConfig) and pm.peft_config["default"].r == 2
    with pytest.raises(NotImplementedError, match="use_dora"):
        fastpeft.get_peft_model(tiny_llama(seed=0), peft.LoraConfig(r=2, target_modules=["v_proj"], use_dora=True))


# ---------------------------------------------------------------- adapter files
@pytest.fixture
def saved(tmp_path):
    pm = fastpeft.get_peft_model(tiny_llama(seed=0), _lora(init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    return tmp_path


def test_truncated_weights_file_is_named(saved):
    path = saved / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is corrupt or truncated"):
        fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), saved)


def test_garbage_weights_file_is_named(saved):
    (saved / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors"):
        fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), saved)


def test_missing_files_are_named(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "nowhere")
    os.remove(saved / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), saved)
    os.remove(saved / "adapter_config.json")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), saved)


def test_corrupt_config_json_is_named(saved):
    (saved / "adapter_config.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON"):
        fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), saved)


def test_adapter_for_another_base_model(saved):
    with pytest.raises(ValueError, match="has shape .* but the model expects"):
        fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0, hidden_size=48, intermediate_size=64), saved)
    config = json.loads((saved / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "k_proj"]
    (saved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing .* key"):
        fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), saved)


def test_save_into_a_file_path(tmp_path):
    pm = fastpeft.get_peft_model(tiny_llama(seed=0), _lora())
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        pm.save_pretrained(tmp_path / "f")
    with pytest.raises(ValueError, match="unknown adapter"):
        pm.save_pretrained(tmp_path / "d", selected_adapters=["nope"])


# ---------------------------------------------------------------- ops
def _lora_args(M=5, K=8, N=6, r=2, dtype=torch.float32, device="cpu"):
    t = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    return dict(x=t(M, K), weight=t(N, K), bias=t(N), lora_A=t(r, K), lora_B=t(N, r), scaling=2.0)


@pytest.mark.parametrize("change, match", [
    (dict(x=torch.randn(5, 7)), "x has 7 features but the layer's in_features is 8"),
    (dict(lora_A=torch.randn(2, 9)), "lora_A"),
    (dict(lora_B=torch.randn(6, 3)), "lora_B"),
    (dict(bias=torch.randn(5)), "bias"),
    (dict(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)), "rank"),
    (dict(x=torch.randint(0, 3, (5, 8))), "x must be a floating tensor"),
    (dict(x=torch.randn(5, 8, dtype=torch.float64)), "x is torch.float64 but the frozen weight is torch.float32"),
    (dict(lora_A=torch.randn(2, 8, device="meta")), "one device"),
    (dict(dropout_p=1.0), "dropout_p"),
])
def test_lora_linear_bad_arguments(change, match):
    with pytest.raises(ValueError, match=match):
        ops.lora_linear(**{**_lora_args(), **change})


def test_ia3_linear_bad_arguments():
    x, w = torch.randn(3, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match=r"ia3_l has 8 elements but the layer's out_features \(output scaling\) is 6"):
        ops.ia3_linear(x, w, None, torch.ones(8), False)
    with pytest.raises(ValueError, match=r"ia3_l has 6 elements but the layer's in_features .* is 8"):
        ops.ia3_linear(x, w, None, torch.ones(6), True)
    with pytest.raises(ValueError, match="x has 5 features"):
        ops.ia3_linear(torch.randn(3, 5), w, None, torch.ones(6), False)


def test_prefix_attention_bad_arguments():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    pk = pv = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        ops.prefix_attention(q, torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8), torch.randn(3, 3, 8),
                             torch.randn(3, 3, 8))
    with pytest.raises(ValueError, match="prefix"):
        ops.prefix_attention(q, k, v, torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="prefix_index"):
        ops.prefix_attention(q, k, v, pk[None].expand(3, -1, -1, -1), pv[None].expand(3, -1, -1, -1),
                             prefix_index=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="attention_mask"):
        ops.prefix_attention(q, k, v, pk, pv, attention_mask=torch.ones(2, 4))


def test_soft_prompt_embed_bad_arguments():
    ids, emb = torch.randint(0, 10, (2, 4)), torch.randn(10, 6)
    with pytest.raises(ValueError, match="prompt_table"):
        ops.soft_prompt_embed(ids, emb, torch.randn(3, 5))  # hidden size 5 != 6
    with pytest.raises(ValueError, match="prompt_index"):
        ops.soft_prompt_embed(ids, emb, torch.randn(2, 3, 6), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        ops.soft_prompt_embed(torch.tensor([[0, 10]]), emb, torch.randn(3, 6))
    with pytest.raises(ValueError, match="integer tensor"):
        ops.soft_prompt_embed(ids.float(), emb, torch.randn(3, 6))


def test_unknown_backend_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="nosuch"):
        fastpeft.set_backend("nosuch")
    monkeypatch.setenv("FASTPEFT_BACKEND", "nosuch")
    with pytest.raises(ValueError, match="FASTPEFT_BACKEND"):
        ops.lora_linear(**_lora_args())


def test_fastpeft_imports_and_trains_without_peft():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['peft'] = None\n"  # as if peft were not installed
        "import torch, fastpeft\n"
        "from tests.models import tiny_llama\n"
        "pm = fastpeft.get_peft_model(tiny_llama(seed=0), fastpeft.LoraConfig(r=2, target_modules=['q_proj']))\n"
        "ids = torch.randint(0, 97, (1, 4)); pm(input_ids=ids, labels=ids).loss.backward()\n"
        "try:\n    fastpeft.accelerate(pm)\nexcept ImportError as e:\n    print('ImportError:', e)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ImportError: fastpeft.accelerate() converts a Hugging Face PEFT model" in out.stdout
