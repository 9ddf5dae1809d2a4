"""Whole-model 4-bit: `quantize`, taking over bitsandbytes layers, `prepare_model_for_kbit_training`,
and loading / saving checkpoints in transformers + bitsandbytes' pre-quantised format."""

from __future__ import annotations

import os

import torch
from torch import nn



def _nn():
    from ..nn import linear4bit  # fastpeft.nn imports fastpeft.quant: resolved at call time

    return linear4bit


def _output_names(model: nn.Module) -> set[str]:
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    names = {n for n, m in model.named_modules() if out is not None and m is out}
    return names or {"lm_head"}


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _skipped(name: str, skip: set[str]) -> bool:
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip)


def quantize(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
             compute_dtype: torch.dtype | None = None, blocksize: int = 64, skip_modules: list[str] | None = None,
             quant_storage: torch.dtype = torch.uint8) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by a frozen fastpeft `Linear4bit` (bitsandbytes'
    format: transformers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
    bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)`); the output layer
    and `skip_modules` stay as they are. bitsandbytes `Linear4bit` layers are taken over as they are."""
    Linear4bit, is_4bit_linear = _nn().Linear4bit, _nn().is_4bit_linear
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"fastpeft.quantize supports 'nf4' and 'fp4', got {quant_type!r}")
    skip = set(skip_modules) if skip_modules is not None else _output_names(model)
    count = 0
    for name, module in list(model.named_modules()):
        if not name or _skipped(name, skip) or isinstance(module, Linear4bit):
            continue
        if is_4bit_linear(module):
            _set(model, name, Linear4bit.from_bnb(module))
        elif isinstance(module, nn.Linear) and module.weight.dtype.is_floating_point:
            layer = Linear4bit.from_linear(module, quant_type, blocksize, double_quant, compute_dtype, quant_storage)
            _set(model, name, layer)
        else:
            continue
        count += 1
    if count == 0 and not any(isinstance(m, Linear4bit) for m in model.modules()):
        raise ValueError(f"fastpeft.quantize found no linear layer to quantise in {type(model).__name__}")
    _mark(model, quant_type, double_quant, compute_dtype, blocksize, quant_storage, skip)
    return model


def _mark(model, quant_type, double_quant, compute_dtype, blocksize, quant_storage, skip) -> None:
    model.is_loaded_in_4bit = True  # what PEFT's prepare_model_for_kbit_training reads
    config = getattr(model, "config", None)
    if config is not None and blocksize == 64:  # transformers' config knows blocksize 64 only
        config.quantization_config = bnb_quantization_config(quant_type, double_quant, compute_dtype,
                                                             quant_storage, sorted(skip))


def bnb_quantization_config(quant_type: str = "nf4", double_quant: bool = True,
                            compute_dtype: torch.dtype | None = None, quant_storage: torch.dtype = torch.uint8,
                            skip_modules: list[str] | None = None) -> dict:
    """The `quantization_config` entry of config.json that transformers + bitsandbytes read."""
    name = (lambda d: str(d).replace("torch.", ""))
    return {"_load_in_4bit": True, "_load_in_8bit": False,
            "bnb_4bit_compute_dtype": name(compute_dtype or torch.float32),
            "bnb_4bit_quant_storage": name(quant_storage),
            "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": skip_modules, "llm_int8_threshold": 6.0, "load_in_4bit": True,
            "load_in_8bit": False, "quant_method": "bitsandbytes"}


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every 4-bit linear (fastpeft's or bitsandbytes') by an nn.Linear with its dequantised
    weight, in place (e.g. before merge_and_unload into a 16-bit base)."""
    Linear4bit, is_4bit_linear = _nn().Linear4bit, _nn().is_4bit_linear
    for name, module in list(model.named_modules()):
        if name and is_4bit_linear(module):
            layer = module if isinstance(module, Linear4bit) else Linear4bit.from_bnb(module)
            _set(model, name, layer.to_linear(dtype))
    if getattr(model, "is_loaded_in_4bit", False):
        model.is_loaded_in_4bit = False
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    return model


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """PEFT's `prepare_model_for_kbit_training`: freeze every parameter, cast 16-bit ones (not the 4-bit
    codes) to float32, and with gradient checkpointing make the input embeddings' output require grad."""
    Linear4bit, is_4bit_linear = _nn().Linear4bit, _nn().is_4bit_linear
    for p in model.parameters():
        p.requires_grad_(False)
    codes = {id(m.weight) for m in model.modules() if is_4bit_linear(m)}
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16) and id(p) not in codes:
            p.data = p.data.to(torch.float32)
    if use_gradient_checkpointing:
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.get("use_reentrant", True):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
        if hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def save_pretrained_4bit(model: nn.Module, path: str) -> None:
    """Write `model` (quantised by `quantize`) as transformers + bitsandbytes write a 4-bit model:
    model.safetensors with bitsandbytes' keys and config.json with its quantization_config."""
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if config is None or getattr(config, "quantization_config", None) is None:
        raise ValueError("save_pretrained_4bit needs a transformers model quantised by fastpeft.quantize "
                         "(blocksize 64, which transformers' config can describe)")
    os.makedirs(path, exist_ok=True)
    tensors, seen = {}, {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.shape, v.dtype)
        if v.numel() and key in seen:
            continue  # a tied tensor (e.g. embeddings): transformers drops it too
        seen[key] = k
        tensors[k] = v.detach().contiguous().cpu()
    tmp = os.path.join(path, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    config.save_pretrained(path)
    os.replace(tmp, os.path.join(path, "model.safetensors"))


def load_pretrained_4bit(path: str, model_class=None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a transformers + bitsandbytes 4-bit checkpoint (config.json with a bitsandbytes
    quantization_config, model.safetensors) into a model with fastpeft `Linear4bit` layers;
    bitsandbytes is not needed. Weights are read with safetensors (no pickle)."""
    import transformers
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(path)
    qc = getattr(config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    if not qc or qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit", qc.get("_load_in_4bit")):
        raise ValueError(f"{path} holds no bitsandbytes 4-bit checkpoint (config.json quantization_config: {qc!r})")
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    state = {}
    for f in files:
        state.update(load_file(os.path.join(path, f), device=str(device)))
    model_class = model_class or transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = model_class.from_config(config)
    compute = qc.get("bnb_4bit_compute_dtype")
    compute_dtype = getattr(torch, compute) if isinstance(compute, str) else None
    skip = qc.get("llm_int8_skip_modules") or sorted(_output_names(model))
    for name, module in list(model.named_modules()):
        if name and isinstance(module, nn.Linear) and not _skipped(name, set(skip)) \
                and name + ".weight.absmax" in state:
            shell = _shell(module.out_features, module.in_features, module.bias is not None, compute_dtype, device)
            _set(model, name, shell)
    model = model.to_empty(device=device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit {type(model).__name__}: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    _reinit_buffers(model, config, device)
    model.is_loaded_in_4bit = True
    return model.eval()


def _shell(out_f: int, in_f: int, bias: bool, compute_dtype, device) -> Linear4bit:
    Linear4bit = _nn().Linear4bit
    from ..quant.nf4 import QuantState4bit

    n = out_f * in_f
    state = QuantState4bit(absmax=torch.zeros(-(n // -64), device=device), shape=(out_f, in_f), dtype=torch.float32)
    b = torch.zeros(out_f, device=device) if bias else None
    return Linear4bit(torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device), state, b, compute_dtype)


def _reinit_buffers(model: nn.Module, config, device) -> None:
    """Non-persistent buffers (rotary inv_freq) are not in the checkpoint: take them from a fresh
    instance of the module that owns them, built from its config as transformers builds it."""
    for name, module in model.named_modules():
        own = [b for b in getattr(module, "_non_persistent_buffers_set", ()) if module._buffers.get(b) is not None]
        if not own:
            continue
        cfg = getattr(module, "config", None)
        if cfg is None:
            raise ValueError(f"cannot rebuild the non-persistent buffers {own} of {name!r} "
                             f"({type(module).__name__}): it holds no config")
        with torch.device(device):
            fresh = type(module)(cfg)
        for b in own:
            module._buffers[b] = fresh._buffers[b]
        for attr in ("attention_scaling", ):
            if hasattr(fresh, attr):
                setattr(module, attr, getattr(fresh, attr))


def load_quantized(path: str, quant_type: str = "nf4", double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None, dtype: torch.dtype | None = None, model_class=None,
                   skip_modules: list[str] | None = None, quant_storage: torch.dtype = torch.uint8,
                   device: str | torch.device = "cpu") -> nn.Module:
    """A 16-bit (or fp32) transformers checkpoint in `path` (config.json + *.safetensors) loaded straight into
    a 4-bit model, one linear layer at a time: the model is built on the meta device, each linear weight is
    read from its safetensors file, quantised (`quantize`'s rounding, bit for bit) and dropped before the next
    is read, so the whole model never exists in 16 bits (peak: the 4-bit model plus one layer's weight).
    Other tensors (embeddings, norms, the output layer) are read as stored, in `dtype` when given.  No
    pickle: safetensors only.  What each rank of an FSDP run calls before sharding (QLoRA)."""
    import json

    import transformers
    from safetensors import safe_open

    Linear4bit = _nn().Linear4bit
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"load_quantized supports 'nf4' and 'fp4', got {quant_type!r}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_quantized reads a local model folder; {path!r} is not one")
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path} (load_quantized reads safetensors only)")
    config = transformers.AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None):
        raise ValueError(f"{path} is already quantised ({config.quantization_config!r}); load it with "
                         f"load_pretrained_4bit")
    handles = {f: safe_open(os.path.join(path, f), framework="pt", device=str(device)) for f in files}
    where = {key: f for f, h in handles.items() for key in h.keys()}

    def read(key: str) -> torch.Tensor:
        if key not in where:
            raise KeyError(key)
        t = handles[where[key]].get_tensor(key)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    model_class = model_class or transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = model_class.from_config(config, **({"torch_dtype": dtype} if dtype is not None else {}))
    skip = set(skip_modules) if skip_modules is not None else _output_names(model)
    prefixes = _checkpoint_prefixes(model, where)
    found = lambda name: next((p + name for p in prefixes if p + name in where), None)  # noqa: E731
    count = 0
    for name, module in list(model.named_modules()):
        if not name or _skipped(name, skip) or not isinstance(module, nn.Linear):
            continue
        wkey = found(name + ".weight")
        if wkey is None:
            continue
        weight = read(wkey)
        bkey = found(name + ".bias") if module.bias is not None else None
        bias = None if bkey is None else read(bkey)
        packed, state = _quantize_weight(weight, quant_type, double_quant, quant_storage)
        del weight  # one layer's 16-bit weight alive at a time
        _set(model, name, Linear4bit(packed, state, bias, compute_dtype))
        count += 1
    if count == 0:
        raise ValueError(f"load_quantized found no linear weight to quantise in {path}")
    missing = []
    for mname, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            key = found(f"{mname}.{pname}" if mname else pname)
            if key is None:
                missing.append(f"{mname}.{pname}")
                continue
            module._parameters[pname] = nn.Parameter(read(key), requires_grad=p.requires_grad)
        for bname, b in list(module._buffers.items()):
            if b is not None and b.is_meta and bname not in module._non_persistent_buffers_set:
                key = found(f"{mname}.{bname}" if mname else bname)
                if key is not None:
                    module._buffers[bname] = read(key)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        missing = [m for m in missing if m not in {n for n, _ in _tied_names(model)}]
        model.tie_weights()
    if missing:
        raise ValueError(f"checkpoint {path} does not fit {type(model).__name__}: missing {missing[:8]}")
    _reinit_buffers(model, config, device)
    _mark(model, quant_type, double_quant, compute_dtype, 64, quant_storage, skip)
    index = os.path.join(path, "generation_config.json")
    if os.path.isfile(index) and hasattr(model, "generation_config"):
        with open(index) as fh:
            model.generation_config = transformers.GenerationConfig.from_dict(json.load(fh))
    return model.eval()


def _quantize_weight(weight: torch.Tensor, quant_type: str, double_quant: bool, quant_storage: torch.dtype):
    from .nf4 import quantize_4bit

    return quantize_4bit(weight, 64, quant_type, double_quant, quant_storage)


def _checkpoint_prefixes(model: nn.Module, keys: dict) -> list[str]:
    """Key prefixes under which the checkpoint may name the model's tensors ('' or the base model's prefix)."""
    base = getattr(model, "base_model_prefix", "") or ""
    return ["", base + "."] if base else [""]


def _tied_names(model: nn.Module):
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [] if out is None else [(n + ".weight", m) for n, m in model.named_modules() if m is out]
