"""fastpeft.accelerate(peft_model): run a live HF PEFT model's LoRA / IA3 layers on fastpeft's ops.

Each PEFT `lora.Linear` / `ia3.Linear` keeps its identity, parameters, names and PEFT's own
bookkeeping (set_adapter, disable_adapter, merge, save): only its class is switched to a
subclass whose forward takes the fused op for the common case (one active vanilla adapter,
not merged, no per-row adapter_names) and defers to PEFT's forward otherwise.

A PEFT prompt-learning model (prefix tuning, prompt tuning, P-tuning) keeps its encoders and
parameters; its `forward` and `generate` become fastpeft's (prefix read inside attention, soft prompt
inside the embedding gather), whose generation is right on every supported transformers release
(PEFT 0.21's is not on transformers 5.24, which renamed the cache argument).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from .nn._base import linear_geometry
from .ops import ia3_linear, lora_linear

_FAST_CLASSES: dict[type, type] = {}


def _weight_nk(layer: nn.Module) -> torch.Tensor | None:
    base = layer.get_base_layer()
    try:
        _, _, is_conv1d = linear_geometry(base)
    except TypeError:
        return None
    w = base.weight
    return w.t() if (is_conv1d or getattr(layer, "fan_in_fan_out", False)) else w


def _single_active(layer: nn.Module, container: Any) -> str | None:
    active = [a for a in layer.active_adapters if a in container]
    return active[0] if len(active) == 1 else None


def _lora_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = None
    if not args and not kwargs and not self.disable_adapters and not self.merged:
        name = _single_active(self, self.lora_A)
    w = _weight_nk(self) if name is not None else None
    if w is None or name in getattr(self, "lora_variant", {}) or getattr(self, "lora_bias", {}).get(name, False):
        return super(type(self), self).forward(x, *args, **kwargs)
    drop = self.lora_dropout[name]
    p = drop.p if isinstance(drop, nn.Dropout) else 0.0
    return lora_linear(x, w, self.get_base_layer().bias, self.lora_A[name].weight, self.lora_B[name].weight,
                       self.scaling[name], p, self.training)


def _ia3_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    active = [a for a in self.active_adapters if a in self.ia3_l]
    w = _weight_nk(self)
    if args or kwargs or self.disable_adapters or self.merged or not active or w is None:
        return super(type(self), self).forward(x, *args, **kwargs)
    scale = self.ia3_l[active[0]]
    for name in active[1:]:
        scale = scale * self.ia3_l[name]
    return ia3_linear(x, w, self.get_base_layer().bias, scale, self.is_feedforward)


def _fast_class(cls: type, forward) -> type:
    if cls not in _FAST_CLASSES:
        _FAST_CLASSES[cls] = type(f"Fast{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    return _FAST_CLASSES[cls]


PROMPT_LEARNING = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")


def _prompt_learning_type(peft_model: nn.Module) -> str | None:
    config = getattr(peft_model, "active_peft_config", None) if hasattr(peft_model, "prompt_encoder") else None
    kind = getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", None))
    return kind if kind in PROMPT_LEARNING else None


def _prompt_forward(self, *args: Any, task_ids: Any = None, **kwargs: Any):
    from . import prompt_learning

    if task_ids is not None:
        raise NotImplementedError("fastpeft.accelerate: multitask prompt tuning (task_ids) is not supported")
    return prompt_learning.forward(self, *args, **kwargs)


def _prompt_generate(self, *args: Any, **kwargs: Any):
    from . import prompt_learning

    return prompt_learning.generate(self, *args, **kwargs)


def _accelerate_prompt_learning(peft_model: nn.Module, kind: str) -> nn.Module:
    from .integrations import transformers_attention as attn

    if peft_model.active_peft_config.num_transformer_submodules not in (None, 1):
        raise NotImplementedError("fastpeft.accelerate: prompt learning on encoder-decoder models is not supported")
    if kind == "PREFIX_TUNING":
        attn.install(peft_model.base_model)
    # instance attributes, as PEFT's own disable_adapter() swaps them (and puts them back)
    peft_model.forward = types.MethodType(_prompt_forward, peft_model)
    peft_model.generate = types.MethodType(_prompt_generate, peft_model)
    return peft_model


def accelerate(peft_model: nn.Module) -> nn.Module:
    """Switch, in place, every PEFT LoRA / IA3 linear layer of `peft_model` to fastpeft's fused ops,
    keeping the same parameter objects, names and values.  Returns `peft_model`.

    Layers fastpeft does not fuse (DoRA, embeddings, convolutions, quantised bases) stay as they are.
    A prompt-learning PEFT model gets fastpeft's forward and generate (see the module docstring)."""
    try:
        from peft.tuners import ia3 as peft_ia3
        from peft.tuners import lora as peft_lora
    except ImportError:
        raise ImportError("fastpeft.accelerate() converts a Hugging Face PEFT model and needs the `peft` package "
                          "(pip install peft); to use fastpeft alone, call fastpeft.get_peft_model") from None
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"accelerate() takes a PEFT model (torch.nn.Module), got {type(peft_model).__name__}")
    kind = _prompt_learning_type(peft_model)
    if kind is not None:
        return _accelerate_prompt_learning(peft_model, kind)
    swapped = 0
    for module in peft_model.modules():
        cls = type(module)
        if cls in _FAST_CLASSES.values():
            continue
        if cls is peft_lora.Linear:
            module.__class__ = _fast_class(cls, _lora_forward)
            swapped += 1
        elif cls is peft_ia3.Linear:
            module.__class__ = _fast_class(cls, _ia3_forward)
            swapped += 1
    already = any(type(m) in _FAST_CLASSES.values() for m in peft_model.modules())
    if not swapped and not already:
        raise ValueError(f"accelerate() found no PEFT LoRA or IA3 linear layer (nor prompt learning) in {type(peft_model).__name__}; "
                         "pass the model returned by peft.get_peft_model / PeftModel.from_pretrained")
    return peft_model
