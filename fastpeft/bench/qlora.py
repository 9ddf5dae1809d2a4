"""QLoRA cases: LoRA on a frozen 4-bit NF4 base (double quantisation), fastpeft beside PEFT on
bitsandbytes' `Linear4bit`, per layer and end to end.

Both bases are quantised from the same 16-bit weights, so they hold the same NF4 codes bit for bit
(fastpeft's format is bitsandbytes'); the check compares outputs and gradients as for LoRA.  The
frozen floor is the 4-bit model (fastpeft's) without an adapter.  No torch.compile columns:
bitsandbytes' layers break torch.compile's graph, so compiled PEFT + bitsandbytes would not be a
whole-graph reference.

bitsandbytes 0.50's AVX-512 CPU dequantise reads the absmax wrongly when in_features % 16 == 0 but
in_features % 64 != 0 (the tiny preset's MLP, 176): on a CPU the end-to-end case rounds the MLP
width up to a multiple of 64 (the description says so) rather than time a wrong reference.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
from torch import nn

from .common import Case, NotAvailable, Runner, copy_adapters, peft_module, perturb_adapters, randn, trainable
from .e2e import _train_runner, build_model
from .layers import _layer_runner
from .presets import Preset

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _bnb():
    try:
        import bitsandbytes
    except ImportError as exc:
        raise NotAvailable("bitsandbytes is not installed (pip install bitsandbytes)") from exc
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return bitsandbytes


def bnb_linear(linear: nn.Linear, compute_dtype: torch.dtype, device: str) -> nn.Module:
    """bitsandbytes' NF4 `Linear4bit` (double quantisation) holding `linear`'s weights, quantised on `device`."""
    bnb = _bnb()
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(linear.weight.data.detach().clone().cpu(), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.detach().clone(), requires_grad=False)
    layer = layer.to(device)
    if hasattr(layer, "support_avx512bf16_for_cpu"):  # keep the standard packing (no repacking at eval)
        layer.support_avx512bf16_for_cpu = False
    return layer


def bnb_quantize(model: nn.Module, compute_dtype: torch.dtype, device: str) -> nn.Module:
    """Every decoder nn.Linear of a causal LM replaced by bitsandbytes' NF4 layer (the output layer
    stays 16-bit, as transformers' BitsAndBytesConfig(load_in_4bit=True) leaves it)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], bnb_linear(module, compute_dtype, device))
    return model


class _Proj4bit(nn.Module):
    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _lora_config(lib, preset: Preset, targets):
    return lib.LoraConfig(r=preset.rank, lora_alpha=preset.alpha, lora_dropout=0.0, target_modules=targets)


def qlora_layer_case(preset: Preset, dtype: torch.dtype, device: str) -> Case:
    m, h, r = preset.tokens, preset.layer_hidden, preset.rank
    case_id = f"layer/qlora/M{m} {h}->{h}"

    def setup():
        from ..nn.linear4bit import Linear4bit

        linear = nn.Linear(h, h, bias=False, dtype=dtype, device=device)
        with torch.no_grad():
            linear.weight.copy_(randn((h, h), seed=400, dtype=dtype, device=device, scale=h ** -0.5))
        x = randn((m, h), seed=401, dtype=dtype, device=device, requires_grad=True)
        dy = randn((m, h), seed=402, dtype=dtype, device=device)
        shared: dict = {}

        def ours_4bit():
            return Linear4bit.from_linear(linear, "nf4", 64, True, dtype).to(device)

        def floor():
            return _layer_runner(_Proj4bit(ours_4bit()), x, dy)

        def peft_model():
            peft = peft_module()
            model = peft.get_peft_model(_Proj4bit(bnb_linear(linear, dtype, device)),
                                        _lora_config(peft, preset, ["proj"]))
            perturb_adapters(model, 403)
            shared["adapters"] = {n: p.detach().clone() for n, p in trainable(model)}
            return _layer_runner(model, x, dy)

        def fastpeft_model():
            import fastpeft

            model = fastpeft.get_peft_model(_Proj4bit(ours_4bit()), _lora_config(fastpeft, preset, ["proj"]))
            if "adapters" in shared:
                if not copy_adapters(model, shared["adapters"]):
                    raise RuntimeError("fastpeft's QLoRA adapter parameters do not match PEFT's")
            else:
                perturb_adapters(model, 403)
            return _layer_runner(model, x, dy)

        return {"floor": floor, "peft": peft_model, "fastpeft": fastpeft_model}

    return Case(case_id, "layer", "qlora", f"QLoRA r={r} M{m} {h}->{h}: LoRA on an NF4 base (double quantisation), "
                f"fwd+bwd", m, ("qlora_linear",), setup, floor_note="frozen NF4 layer, gradient w.r.t. the input only")


def qlora_e2e_case(preset: Preset, dtype: torch.dtype, device: str) -> Case:
    b, t = preset.batch, preset.seq
    s = preset.model
    mlp = s.mlp if device == "cuda" or s.mlp % 64 == 0 or s.mlp % 16 else -(-s.mlp // 64) * 64
    shaped = dataclasses.replace(preset, model=dataclasses.replace(s, mlp=mlp))
    note = "" if mlp == s.mlp else f" (MLP {s.mlp} rounded up to {mlp}: bitsandbytes' CPU dequantise bug)"
    desc = (f"QLoRA r={preset.rank} on q,k,v,o,gate,up,down over an NF4 base (double quantisation){note}; "
            f"{s.layers} layers, hidden {s.hidden}, MLP {mlp}, batch {b} x {t}; fwd+bwd+AdamW")

    def setup():
        import fastpeft

        base = build_model(shaped, dtype, device)
        ids = torch.randint(0, s.vocab, (b, t), generator=torch.Generator().manual_seed(500)).to(device)
        shared: dict = {}

        def ours_4bit():
            return fastpeft.quantize(copy.deepcopy(base), "nf4", double_quant=True, compute_dtype=dtype)

        def floor():
            model = ours_4bit().requires_grad_(False)
            embed = model.get_input_embeddings()

            def loss_of():
                emb = embed(ids).detach().requires_grad_()
                return model(inputs_embeds=emb, labels=ids).loss

            return Runner(lambda: loss_of().backward(), lambda: {"loss": loss_of().detach().float().reshape(1)},
                          keep=[model])

        def peft_model():
            peft = peft_module()
            model = peft.get_peft_model(bnb_quantize(copy.deepcopy(base), dtype, device),
                                        _lora_config(peft, preset, LLAMA_LINEARS)).train()
            perturb_adapters(model, seed=600)
            shared["adapters"] = {n: p.detach().clone() for n, p in trainable(model)}
            return _train_runner(model, model, ids)

        def fastpeft_model():
            model = fastpeft.get_peft_model(ours_4bit(), _lora_config(fastpeft, preset, LLAMA_LINEARS)).train()
            if "adapters" in shared:
                if not copy_adapters(model, shared["adapters"]):
                    raise RuntimeError("fastpeft's QLoRA adapter parameters do not match PEFT's")
            else:
                perturb_adapters(model, seed=600)
            return _train_runner(model, model, ids)

        return {"floor": floor, "peft": peft_model, "fastpeft": fastpeft_model}

    return Case("e2e/qlora", "e2e", "qlora", desc, b * t, ("qlora_linear",), setup,
                floor_note="the frozen NF4 model, no adapter, gradients to the input embeddings only")
