"""fastpeft.accelerate(peft_model): run a live HF PEFT model's LoRA / IA3 layers on fastpeft's ops.

Each PEFT `lora.Linear` / `ia3.Linear` keeps its identity, parameters, names, repr and PEFT's own
bookkeeping (set_adapter, disable_adapter, merge, save): only its class is switched to a subclass of
the same name whose forward takes the fused op for every vanilla forward PEFT runs: one or several
active adapters (LoRA: one op of the summed rank, [s_1·B_1 .. s_n·B_n]·[A_1; ..; A_n]; IA3: the product
of the scalings), `adapter_names` batches (each adapter's rows through the op), PEFT's lora_bias (folded
into the op's bias), adapters in another dtype than the base (IA3).  Disabled or merged layers run the
frozen layer alone, as PEFT's do.  LoRA variants (DoRA, ...), extra forward arguments PEFT would pass to
the base layer, and several active adapters with different dropout in training defer to PEFT's forward.
`tools/peft_suite_coverage.py` counts which path each forward took over PEFT's own test suite.

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
from .ops import grouped_lora_linear, ia3_linear, lora_linear, plan_groups

_FAST_CLASSES: dict[type, type] = {}


def _weight_nk(layer: nn.Module) -> torch.Tensor | None:
    base = layer.get_base_layer()
    try:
        _, _, is_conv1d = linear_geometry(base)
    except TypeError:
        return None
    w = base.weight
    return w.t() if (is_conv1d or getattr(layer, "fan_in_fan_out", False)) else w


def _fallback(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT's own forward of the layer (for what fastpeft does not fuse)."""
    return super(type(self), self).forward(x, *args, **kwargs)


def _base_only(self, x: torch.Tensor) -> torch.Tensor:
    """The frozen layer alone: disabled adapters, merged weights, or no active adapter in this layer
    (PEFT runs the same base_layer call)."""
    return self.base_layer(x)


def _lora_vanilla(self, name: str) -> bool:
    return name not in getattr(self, "lora_variant", {})


def _lora_bias(self, names: list[str], bias: torch.Tensor | None) -> torch.Tensor | None:
    """The layer's bias plus, for adapters with PEFT's lora_bias (a bias on lora_B), scaling·b_B:
    (B·A·x + b_B)·s = s·B·A·x + s·b_B, so the fused op adds it with the frozen bias."""
    for name in names:
        b = self.lora_B[name].bias
        if b is not None:
            extra = b * self.scaling[name]
            bias = extra if bias is None else bias + extra.to(bias.dtype)
    return bias


def _dropout_p(self, name: str) -> float:
    drop = self.lora_dropout[name]
    return drop.p if isinstance(drop, nn.Dropout) else 0.0


def _extra(kwargs: dict) -> bool:
    """Forward arguments PEFT would pass on to the base layer (adapter_names and PEFT's variant keywords
    left unset are consumed by PEFT itself)."""
    return any(v is not None for k, v in kwargs.items() if k != "adapter_names")


def _lora_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    w = _weight_nk(self)
    if w is None or args or _extra(kwargs) or x.dtype != w.dtype:
        return _fallback(self, x, *args, **kwargs)
    adapter_names = kwargs.get("adapter_names")
    if self.disable_adapters:
        if self.merged:
            self.unmerge()  # as PEFT's forward does
        return _base_only(self, x)
    if adapter_names is not None:
        if self.merged or len(adapter_names) != len(x) or not all(_lora_vanilla(self, n) for n in set(adapter_names)
                                                                  if n in self.lora_A):
            return _fallback(self, x, *args, **kwargs)  # PEFT's own checks and errors
        return _lora_mixed(self, x, w, list(adapter_names))
    if self.merged:
        return _base_only(self, x)
    active = [a for a in self.active_adapters if a in self.lora_A]
    if not active:
        return _base_only(self, x)
    if not all(_lora_vanilla(self, a) for a in active):
        return _fallback(self, x, *args, **kwargs)
    bias = _lora_bias(self, active, self.get_base_layer().bias)
    if len(active) == 1:
        name = active[0]
        return lora_linear(x, w, bias, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                           _dropout_p(self, name), self.training)
    # several active adapters: sum_i s_i·B_i·A_i·x = [s_1·B_1 .. s_n·B_n]·[A_1; ..; A_n]·x, one LoRA of the
    # summed rank (one dropout mask shared by the adapters: the same only when they have the same p)
    p = {_dropout_p(self, a) for a in active}
    dtypes = {self.lora_A[a].weight.dtype for a in active} | {self.lora_B[a].weight.dtype for a in active}
    if len(p) != 1 or len(dtypes) != 1 or (self.training and p != {0.0}):
        return _fallback(self, x, *args, **kwargs)
    a_cat = torch.cat([self.lora_A[a].weight for a in active], dim=0)
    b_cat = torch.cat([self.lora_B[a].weight * self.scaling[a] for a in active], dim=1)
    return lora_linear(x, w, bias, a_cat, b_cat, 1.0, p.pop(), self.training)


def _lora_mixed(self, x: torch.Tensor, w: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
    """PEFT's mixed batch (`adapter_names`, one per row; rows of "__base__" or of an adapter this layer lacks
    get the frozen layer): the mixed-batch op, the base projection once for the batch and the low-rank terms
    grouped by adapter (`ops.grouped_lora_linear`); with PEFT's lora_bias, each adapter's rows through the
    fused op."""
    base_bias = self.get_base_layer().bias
    names = [n if n in self.lora_A else "__base__" for n in adapter_names]
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    if len(groups) == 1:
        (name,) = groups
        if name == "__base__":
            return _base_only(self, x)
        return lora_linear(x, w, _lora_bias(self, [name], base_bias), self.lora_A[name].weight,
                           self.lora_B[name].weight, self.scaling[name], _dropout_p(self, name), self.training)
    if x.dim() >= 2 and all(self.lora_B[n].bias is None for n in groups if n != "__base__"):
        plan = plan_groups(names, x.numel() // (x.shape[0] * x.shape[-1]) if x.numel() else 0, x.device)
        return grouped_lora_linear(x, w, base_bias, plan, [self.lora_A[n].weight for n in plan.names],
                                   [self.lora_B[n].weight for n in plan.names],
                                   [self.scaling[n] for n in plan.names],
                                   [_dropout_p(self, n) for n in plan.names], self.training,
                                   table_cache=self.__dict__.setdefault("_fastpeft_grouped_table", {}))
    out = None
    for name, rows in groups.items():
        index = torch.tensor(rows, device=x.device)
        xs = x.index_select(0, index)
        if name == "__base__":
            ys = _base_only(self, xs)
        else:
            ys = lora_linear(xs, w, _lora_bias(self, [name], base_bias), self.lora_A[name].weight,
                             self.lora_B[name].weight, self.scaling[name], _dropout_p(self, name), self.training)
        out = ys.new_empty((x.shape[0], *ys.shape[1:])) if out is None else out
        out = out.index_copy(0, index, ys)
    return out


def _lora4bit_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT's QLoRA layer (`lora.bnb.Linear4bit` over bitsandbytes' `Linear4bit`): where fastpeft's NF4 kernels
    run (CUDA tensors, see `fastpeft.quant.linear`), one active vanilla adapter takes the fused 4-bit GEMM with
    the LoRA term in its epilogue, reading bitsandbytes' packed weight and quantisation state in place (no
    16-bit copy of the weight, no bitsandbytes kernel); everything else (merged or disabled adapters, several
    adapters, mixed batches, the CPU) is PEFT's forward, bitsandbytes' base layer unchanged."""
    from .quant import linear as qlinear

    base = self.get_base_layer()
    qs = getattr(getattr(base, "weight", None), "quant_state", None)
    if (qs is None or args or _extra(kwargs) or kwargs.get("adapter_names") is not None or self.disable_adapters
            or self.merged or not qlinear._use_triton(x)):
        return _fallback(self, x, *args, **kwargs)
    active = [a for a in self.active_adapters if a in self.lora_A]
    if len(active) != 1 or not _lora_vanilla(self, active[0]) or self.lora_B[active[0]].bias is not None:
        return _fallback(self, x, *args, **kwargs)
    name = active[0]
    cached = self.__dict__.get("_fastpeft_nf4_state")
    if cached is None or cached[0] is not qs:  # bitsandbytes' QuantState as fastpeft's, once per state object
        from .quant.nf4 import state_from_bnb

        cached = self.__dict__["_fastpeft_nf4_state"] = (qs, state_from_bnb(qs))
    return qlinear.qlora_layer(x, base.weight.data, cached[1], base.bias, getattr(base, "compute_dtype", None),
                               self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                               _dropout_p(self, name), self.training)


def _ia3_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    w = _weight_nk(self)
    if w is None or args or _extra(kwargs) or kwargs.get("adapter_names") is not None or x.dtype != w.dtype:
        return _fallback(self, x, *args, **kwargs)
    if self.disable_adapters:
        if self.merged:
            self.unmerge()  # as PEFT's forward does
        return _base_only(self, x)
    if self.merged:
        return _base_only(self, x)
    active = [a for a in self.active_adapters if a in self.ia3_l]
    if not active:  # PEFT: a scaling of 1
        return _base_only(self, x)
    if len({self.ia3_l[a].dtype for a in active}) != 1:
        return _fallback(self, x, *args, **kwargs)
    # an adapter dtype other than x's (PEFT's fp32 adapters on a bf16 model) is PEFT's arithmetic in the op:
    # the scaling in the adapter's dtype, cast back to the base output's / input's dtype
    scale = self.ia3_l[active[0]]
    for name in active[1:]:
        scale = scale * self.ia3_l[name]
    return ia3_linear(x, w, self.get_base_layer().bias, scale, self.is_feedforward)


def _fast_class(cls: type, forward) -> type:
    # the same class name (PEFT's repr says `lora.Linear(...)`), in this module (it is not PEFT's class)
    if cls not in _FAST_CLASSES:
        _FAST_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": __name__,
                                                         "__qualname__": f"fast_{cls.__module__.replace('.', '_')}_"
                                                                         f"{cls.__qualname__}"})
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

    PEFT's QLoRA layers (4-bit bitsandbytes bases) take fastpeft's fused NF4 GEMM where its kernels run.
    Layers fastpeft does not fuse (DoRA, embeddings, convolutions) stay as they are.
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
    try:  # PEFT defines its QLoRA layer only where bitsandbytes is installed
        from peft.tuners.lora import bnb as peft_lora_bnb
        lora_4bit = getattr(peft_lora_bnb, "Linear4bit", None)
    except ImportError:
        lora_4bit = None
    swapped = 0
    for module in peft_model.modules():
        cls = type(module)
        if cls in _FAST_CLASSES.values():
            continue
        if lora_4bit is not None and cls is lora_4bit:
            module.__class__ = _fast_class(cls, _lora4bit_forward)
            swapped += 1
        elif cls is peft_lora.Linear:
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
