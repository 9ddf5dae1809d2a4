"""QLoRA: fastpeft's 4-bit linear, whole-model quantisation and LoRA on a 4-bit base, against
transformers + bitsandbytes + PEFT on the CPU (tiny models built from configs)."""

import logging
import os
import warnings

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.nn.linear4bit import Linear4bit
from fastpeft.nn.lora4bit import LoraLinear4bit
from fastpeft.quant import dequantize_model, load_pretrained_4bit, nf4, save_pretrained_4bit

from models import tiny_llama

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bnb():
    """bitsandbytes with its portable dequantise on the CPU: its AVX-512 kernel (0.50.x) reads the absmax
    by (row, column // blocksize), wrong whenever in_features % 16 == 0 but in_features % blocksize != 0
    (e.g. the tiny preset's down_proj, 176 inputs); test_nf4.py checks the difference is only that."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    def generic(A, absmax, blocksize, quant_type, shape, dtype):
        A = A.view(torch.uint8) if A.dtype != torch.uint8 else A
        return _dequantize_4bit_compute(A.reshape(-1), absmax, _get_4bit_code(quant_type, A.device), blocksize,
                                        shape, dtype)

    lib = torch.library.Library("bitsandbytes", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lib.impl("dequantize_4bit", generic, "CPU", allow_override=True)
    yield bnb
    lib._destroy()


def _portable(model):
    """bitsandbytes layers keep the standard packing (no AVX-512 repacking at the first eval forward)."""
    for m in model.modules():
        if type(m).__name__ == "Linear4bit" and hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def _bnb_load(path, compute_dtype=torch.float32, double_quant=True, quant_type="nf4"):
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                          bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)
    return _portable(transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg,
                                                                        device_map="cpu")).eval()


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(19, 72), (40, 33)])
def test_linear4bit_forward_and_input_grad_match_bitsandbytes(bnb, compute_dtype, wdtype, shape):
    out_f, in_f = shape
    lin = nn.Linear(in_f, out_f, dtype=wdtype)
    ref = bnb.nn.Linear4bit(in_f, out_f, compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
    ref.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                   compress_statistics=True)
    ref.bias = nn.Parameter(lin.bias.data.clone())
    ref = _portable(ref.to("cpu"))
    ours = Linear4bit.from_linear(lin, "nf4", 64, True, compute_dtype)
    x = torch.randn(3, 5, in_f, dtype=wdtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, y = ref(x2), ours(x)
    assert y.dtype == y_ref.dtype == wdtype
    assert torch.equal(y, y_ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert torch.equal(x.grad, x2.grad)
    # the math: dX = dY·W with W dequantised, nothing else saved
    w = nf4.dequantize_4bit(ours.weight, ours.quant_state).to(compute_dtype)
    torch.testing.assert_close(x.grad, (dy.to(compute_dtype) @ w).to(wdtype))
    assert not ours.weight.requires_grad and ours.weight.dtype == torch.uint8


def test_linear4bit_state_dict_is_bitsandbytes(bnb):
    lin = nn.Linear(72, 24)
    ours = Linear4bit.from_linear(lin, double_quant=True)
    ref = bnb.nn.Linear4bit(72, 24, compress_statistics=True, quant_type="nf4")
    sd = ours.state_dict()  # bitsandbytes reads ours (as transformers hands it a pre-quantised checkpoint) ...
    ref.weight = bnb.nn.Params4bit.from_prequantized(
        sd["weight"], {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}, device="cpu",
        module=ref)
    ref.bias = nn.Parameter(sd["bias"].clone())
    ref = _portable(ref)
    sd, sd_ref = ours.state_dict(), ref.state_dict()
    assert sorted(sd) == sorted(sd_ref) == sorted(
        ["weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
         "weight.quant_state.bitsandbytes__nf4"])
    for k in sd:
        assert torch.equal(sd[k], sd_ref[k]), k
    back = Linear4bit.from_linear(nn.Linear(72, 24), double_quant=False)
    back.load_state_dict(sd_ref)  # ... and we read bitsandbytes'
    x = torch.randn(4, 72)
    assert torch.equal(back(x), ref(x)) and back.quant_state.nested


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_tiny_llama_saved_by_bitsandbytes_loads_here_and_back(bnb, tmp_path, compute_dtype):
    base = tiny_llama(seed=1, hidden_size=64, intermediate_size=128)
    base.save_pretrained(tmp_path / "fp32")
    ids = torch.randint(0, 97, (2, 9))
    q = _bnb_load(tmp_path / "fp32", compute_dtype)
    with torch.no_grad():
        ref = q(input_ids=ids).logits
    q.save_pretrained(tmp_path / "bnb")
    ours = load_pretrained_4bit(str(tmp_path / "bnb"))
    assert isinstance(ours.model.layers[0].mlp.down_proj, Linear4bit)
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in ours.modules())
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, ref)
    # the reverse: quantised here, saved here, loaded by transformers + bitsandbytes
    mine = fastpeft.quantize(tiny_llama(seed=1, hidden_size=64, intermediate_size=128), "nf4", double_quant=True,
                             compute_dtype=compute_dtype)
    with torch.no_grad():
        logits = mine(input_ids=ids).logits
    assert torch.equal(logits, ref)  # quantised bit for bit as bitsandbytes does
    save_pretrained_4bit(mine, str(tmp_path / "ours"))
    theirs = _portable(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu")).eval()
    assert type(theirs.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")
    with torch.no_grad():
        assert torch.equal(theirs(input_ids=ids).logits, logits)


def test_bitsandbytes_model_taken_over_without_its_kernels(bnb, tmp_path):
    tiny_llama(seed=2, hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    q = _bnb_load(tmp_path)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        ref = q(input_ids=ids).logits
    fastpeft.quantize(q)
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in q.modules())
    with torch.no_grad():
        assert torch.equal(q(input_ids=ids).logits, ref)
    # get_peft_model straight on a bitsandbytes model takes its layers over too
    pm = fastpeft.get_peft_model(_bnb_load(tmp_path), fastpeft.LoraConfig(r=2, target_modules="all-linear"))
    layer = pm.base_model.model.model.layers[0].self_attn.v_proj
    assert isinstance(layer, LoraLinear4bit) and isinstance(layer.base_layer, Linear4bit)
    with torch.no_grad():
        assert torch.equal(pm(input_ids=ids).logits, ref)  # B = 0 at init


def test_prepare_model_for_kbit_training():
    m = tiny_llama(seed=3, hidden_size=64, intermediate_size=128).to(torch.bfloat16)
    fastpeft.quantize(m, compute_dtype=torch.bfloat16, quant_storage=torch.bfloat16)
    codes = m.model.layers[0].self_attn.q_proj.weight.detach().clone()
    fastpeft.prepare_model_for_kbit_training(m, use_gradient_checkpointing=True)
    assert all(not p.requires_grad for p in m.parameters())
    assert m.model.norm.weight.dtype == torch.float32 and m.lm_head.weight.dtype == torch.float32
    q = m.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16  # 4-bit codes viewed as bf16, untouched
    assert torch.equal(nf4.packed_bytes(q.weight.detach()), nf4.packed_bytes(codes))
    m.half()  # moves and casts the module, never the codes
    assert q.weight.dtype == torch.bfloat16 and torch.equal(nf4.packed_bytes(q.weight.detach()), nf4.packed_bytes(codes))
    assert q.quant_state.absmax.dtype == torch.uint8 and q.quant_state.nested_absmax.dtype == torch.float32
    assert m.is_gradient_checkpointing
    out = m.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert out.requires_grad


def _peft_qlora(path, adapter_dir=None, seed=0):
    import peft

    q = _bnb_load(path)
    if adapter_dir is not None:
        return peft.PeftModel.from_pretrained(q, adapter_dir).eval()
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    return peft.get_peft_model(q, cfg)


@pytest.fixture(scope="module")
def trained_qlora(tmp_path_factory):
    """QLoRA on the tiny preset (fastpeft.quantize + prepare_model_for_kbit_training + LoRA all-linear),
    25 AdamW steps on the CPU; the base saved in 16 bits beside the adapter."""
    from fastpeft.training.models import build_preset

    tmp = tmp_path_factory.mktemp("qlora")
    build_preset("tiny", seed=0).save_pretrained(tmp / "base")
    model = fastpeft.quantize(build_preset("tiny", seed=0), "nf4", double_quant=True, compute_dtype=torch.float32)
    fastpeft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    cfg = fastpeft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                              task_type="CAUSAL_LM")
    pm = fastpeft.get_peft_model(model, cfg)
    layer = pm.base_model.model.model.layers[0].mlp.down_proj
    codes = layer.base_layer.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-3)
    torch.manual_seed(0)
    ids = torch.randint(3, 259, (4, 24))
    pm.train()
    losses = []
    for _ in range(25):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    pm.save_pretrained(tmp / "adapter")
    return dict(pm=pm.eval(), ids=ids, losses=losses, codes=codes, layer=layer, dir=tmp)


def test_qlora_tiny_preset_training_lowers_the_loss(trained_qlora):
    t = trained_qlora
    assert isinstance(t["layer"], LoraLinear4bit) and isinstance(t["layer"].base_layer, Linear4bit)
    assert t["losses"][-1] < 0.6 * t["losses"][0], t["losses"]
    assert torch.equal(t["layer"].base_layer.weight, t["codes"])  # the 4-bit base stayed frozen
    assert sorted(os.listdir(t["dir"] / "adapter")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_qlora_adapter_loads_in_peft_bitsandbytes_with_the_same_logits(bnb, trained_qlora):
    pytest.importorskip("peft")
    t = trained_qlora
    with torch.no_grad():
        ours = t["pm"](input_ids=t["ids"]).logits
    theirs_model = _peft_qlora(t["dir"] / "base", t["dir"] / "adapter")
    assert type(theirs_model.base_model.model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        theirs = theirs_model(input_ids=t["ids"]).logits
    assert torch.equal(ours, theirs)


def test_qlora_forward_and_grads_match_peft_and_load_peft_adapter(bnb, tmp_path):
    pytest.importorskip("peft")
    tiny_llama(seed=4, hidden_size=64, intermediate_size=96).save_pretrained(tmp_path / "base")
    theirs = _peft_qlora(tmp_path / "base", seed=5)
    with torch.no_grad():  # non-zero B, so the LoRA terms count
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = fastpeft.PeftModel.from_pretrained(
        fastpeft.quantize(tiny_llama(seed=4, hidden_size=64, intermediate_size=96), compute_dtype=torch.float32),
        str(tmp_path / "adapter"), is_trainable=True)
    ids = torch.randint(0, 97, (2, 11))
    theirs.train()
    ours.train()
    lo = ours(input_ids=ids, labels=ids).loss
    lt = theirs(input_ids=ids, labels=ids).loss
    assert torch.equal(lo, lt)
    lo.backward()
    lt.backward()
    g_ours = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    g_theirs = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert sorted(g_ours) == sorted(g_theirs) and g_ours
    for n in g_ours:
        torch.testing.assert_close(g_ours[n], g_theirs[n], rtol=1e-5, atol=1e-7)


def test_peft_qlora_model_runs_on_fastpeft_base_layers(bnb, tmp_path):
    """fastpeft.quantize on a live PEFT QLoRA model swaps bitsandbytes' base layers for fastpeft's."""
    pytest.importorskip("peft")
    tiny_llama(seed=6, hidden_size=64, intermediate_size=96).save_pretrained(tmp_path)
    pm = _peft_qlora(tmp_path, seed=7).eval()
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    fastpeft.quantize(pm.base_model.model)
    assert isinstance(pm.base_model.model.model.layers[1].mlp.up_proj.base_layer, Linear4bit)
    with torch.no_grad():
        assert torch.equal(pm(input_ids=ids).logits, ref)


@pytest.mark.parametrize("to_16bit", [False, True])
def test_merge_and_unload(to_16bit):
    torch.manual_seed(8)
    model = fastpeft.quantize(tiny_llama(seed=8, hidden_size=64, intermediate_size=96), compute_dtype=torch.float32)
    pm = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.eval()
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    if to_16bit:
        dequantize_model(pm.base_model.model)
    merged = pm.merge_and_unload()
    layer = merged.model.layers[0].self_attn.q_proj
    assert isinstance(layer, nn.Linear if to_16bit else Linear4bit)
    with torch.no_grad():
        out = merged(input_ids=ids).logits
    if to_16bit:  # exact up to fp32 rounding of W + ΔW
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    else:  # re-quantised base: NF4 error of one more rounding
        assert (out - ref).abs().max() < 0.25 * ref.abs().max()
        assert not torch.equal(out, ref)


def test_errors_name_the_problem():
    m = fastpeft.quantize(tiny_llama(seed=9))
    with pytest.raises(NotImplementedError, match="4-bit"):
        fastpeft.get_peft_model(m, fastpeft.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="features"):
        m.model.layers[0].self_attn.q_proj(torch.randn(2, 31))
    with pytest.raises(ValueError, match="nf4"):
        fastpeft.quantize(tiny_llama(seed=9), "int8")


def test_mixed_adapter_batch_on_a_4bit_base_equals_each_row_alone():
    """`adapter_names` on a QLoRA model: each row (and its gradients) as if it ran through its adapter alone."""
    torch.manual_seed(0)
    model = fastpeft.get_peft_model(fastpeft.quantize(tiny_llama(seed=1), compute_dtype=torch.float32),
                                    fastpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", fastpeft.LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights=False))
    trainable = lambda: [p.requires_grad_(".a." in n or ".b." in n) for n, p in model.named_parameters()]
    trainable()  # set_adapter / add_adapter make only one adapter trainable
    ids = torch.randint(1, 97, (3, 5))
    names = ["a", "__base__", "b"]
    mixed = model(input_ids=ids, adapter_names=names).logits
    mixed.pow(2).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    want_grads: dict[str, torch.Tensor] = {}
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = model(input_ids=ids[row:row + 1]).logits
        else:
            model.set_adapter(name)
            trainable()
            alone = model(input_ids=ids[row:row + 1]).logits
            alone.pow(2).sum().backward()
            for n, p in model.named_parameters():
                if p.grad is not None:
                    want_grads[n] = want_grads.get(n, 0) + p.grad
            model.zero_grad(set_to_none=True)
        torch.testing.assert_close(mixed[row:row + 1], alone, rtol=1e-5, atol=1e-5)
    assert got.keys() == want_grads.keys() and got
    for n in got:
        torch.testing.assert_close(got[n], want_grads[n], rtol=1e-5, atol=1e-5, msg=n)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (codes viewed as bf16 hold NaN patterns, which torch.equal calls unequal)."""
    return a.dtype == b.dtype and a.shape == b.shape and \
        torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [True, False])
def test_fsdp_layout_keeps_the_numbers_the_state_dict_and_survives_casts(storage, double_quant):
    """`Linear4bit.shard_layout` (what FSDP2 shards): codes and per-block absmax become frozen integer
    parameters; forward, input gradient and bitsandbytes' state dict are unchanged, and casting the
    module (as FSDP's bf16 mixed precision casts floating parameters) leaves every byte as it was."""
    torch.manual_seed(int(double_quant))
    lin = nn.Linear(96, 40)  # 3840 weights: 60 blocks of 64 (a ragged nested block of 256)
    layer = Linear4bit.from_linear(lin, "nf4", double_quant=double_quant, quant_storage=storage)
    x = torch.randn(5, 96, requires_grad=True)
    y = layer(x)
    (dx,) = torch.autograd.grad(y.square().sum(), x)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.shard_layout()
    params = dict(layer.named_parameters())
    assert {"weight", "absmax"} <= set(params) and ("nested_absmax" in params) == double_quant
    assert all(not p.is_floating_point() and not p.requires_grad for n, p in params.items() if n != "bias")
    assert layer.quant_state.absmax.numel() == 0  # no second full copy kept beside the shards
    after = layer.state_dict()
    assert sorted(after) == sorted(before)
    for k, v in before.items():
        assert _same_bytes(after[k], v), k
    x2 = x.detach().clone().requires_grad_(True)
    y2 = layer(x2)
    (dx2,) = torch.autograd.grad(y2.square().sum(), x2)
    assert torch.equal(y2, y) and torch.equal(dx2, dx)
    layer.to(torch.bfloat16)  # floating parameters (the bias) cast, the integer views untouched
    assert all(_same_bytes(layer.state_dict()[k], v) for k, v in before.items() if not k.endswith("bias"))
    with pytest.raises(RuntimeError, match="laid out for FSDP"):  # weights are loaded before sharding
        layer.load_state_dict(before)


def test_load_quantized_reads_one_layer_at_a_time_and_equals_quantize(tmp_path, monkeypatch):
    """`load_quantized` (what each FSDP rank calls): the same codes, state and logits as quantising the loaded
    16-bit model, while never more than one linear weight is alive in 16 bits."""
    import weakref

    import safetensors
    from transformers import AutoModelForCausalLM

    from fastpeft.quant import load_quantized, quantize

    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path)  # safetensors
    ref = quantize(AutoModelForCausalLM.from_pretrained(tmp_path), "nf4", double_quant=True).eval()
    alive, peak = [], [0]
    real = safetensors.safe_open

    class Counting:
        def __init__(self, *a, **k):
            self.h = real(*a, **k)

        def keys(self):
            return self.h.keys()

        def get_tensor(self, key):
            t = self.h.get_tensor(key)
            if "proj" in key and key.endswith(".weight"):
                alive.append(weakref.ref(t))
                peak[0] = max(peak[0], sum(r() is not None for r in alive))
            return t

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    ours = load_quantized(str(tmp_path), "nf4", double_quant=True)
    assert peak[0] == 1, f"{peak[0]} linear weights alive in 16 bits at once"
    a, b = ours.state_dict(), ref.state_dict()
    assert sorted(a) == sorted(b)
    for k in b:
        assert _same_bytes(a[k], b[k]), k
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="not one"):
        load_quantized(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_quantized(str(tmp_path / "empty"))


def test_fsdp_refuses_a_bitsandbytes_layer_by_name(bnb):
    from fastpeft.training import fsdp

    model = nn.Sequential(bnb.nn.Linear4bit(64, 64, quant_type="nf4"))
    with pytest.raises(ValueError, match="fastpeft.quantize"):
        fsdp.shard_model(model, torch.device("cpu"))


def test_accelerate_runs_a_peft_qlora_model_on_the_fused_nf4_gemm(bnb, tmp_path, monkeypatch):
    """fastpeft.accelerate() on a PEFT QLoRA model (bitsandbytes 4-bit base): each LoRA layer takes the fused NF4
    GEMM (here the Triton kernels in the interpreter, FASTPEFT_NF4_TRITON=force), reading bitsandbytes' packed
    weight in place; logits and adapter gradients as PEFT + bitsandbytes; a merged model falls back to PEFT."""
    peft = pytest.importorskip("peft")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the NF4 kernels run on CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1)")
    tiny_llama(seed=6, hidden_size=64, intermediate_size=96).save_pretrained(tmp_path)
    plain, fast = _peft_qlora(tmp_path, seed=7), _peft_qlora(tmp_path, seed=7)
    with torch.no_grad():
        for (n, p), (_, q) in zip(plain.named_parameters(), fast.named_parameters()):
            if "lora_B" in n:  # B starts at zero: make the adapter change the output
                p.normal_(std=0.05)
                q.copy_(p)
    fastpeft.accelerate(fast)
    layer = fast.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit" and type(layer.base_layer).__module__.startswith("bitsandbytes")
    calls = []
    import fastpeft.quant.linear as qlinear

    real = qlinear.qlora_linear
    monkeypatch.setattr(qlinear, "qlora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("FASTPEFT_NF4_TRITON", "force")
    ids = torch.randint(0, 97, (2, 5))
    out = {}
    for key, model in (("peft", plain), ("fast", fast)):
        model.eval()
        logits = model(input_ids=ids).logits
        logits.float().pow(2).mean().backward()
        out[key] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert len(calls) == 14  # every LoRA layer of the 2-layer model took the fused path
    torch.testing.assert_close(out["fast"][0], out["peft"][0], rtol=2e-4, atol=2e-4)
    assert out["fast"][1].keys() == out["peft"][1].keys() and out["fast"][1]
    for n in out["peft"][1]:
        torch.testing.assert_close(out["fast"][1][n], out["peft"][1][n], rtol=2e-3, atol=2e-5, msg=n)
    calls.clear()
    with fast.disable_adapter(), torch.no_grad():
        fast(input_ids=ids)
    assert not calls  # disabled adapters: PEFT's forward (the bitsandbytes base alone)
