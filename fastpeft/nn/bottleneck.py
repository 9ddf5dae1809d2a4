"""Bottleneck adapters (Houlsby / Pfeiffer): y = h + up(act(down(h))) after a sub-block's output.

`BottleneckWrapper` wraps a decoder layer's attention and/or feed-forward module (`base_layer`), and
applies each active adapter of its `bottleneck_adapters` ModuleDict to the module's output (the first
element when it returns a tuple) through the fused op `fastpeft.ops.bottleneck.bottleneck_adapter`.
The decoder's own residual stream is untouched: with a pre-LN model (Llama), the adapter's residual
is the sub-block output, as AdapterHub's `residual_before_ln=True`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.bottleneck import bottleneck_adapter, canonical_activation
from ._base import AdapterLayer

# where the adapters go, per model family: (attention module, feed-forward module), matched on the last name
PLACEMENT = {"llama": ("self_attn", "mlp"), "mistral": ("self_attn", "mlp"), "qwen2": ("self_attn", "mlp"),
             "qwen3": ("self_attn", "mlp"), "gpt2": ("attn", "mlp"),
             # T5 (encoder and decoder): after self-attention and after the feed-forward, inside their
             # pre-LN residual blocks (cross-attention is left alone, as AdapterHub's default cross_adapter=False)
             "t5": ("SelfAttention", "DenseReluDense"), "mt5": ("SelfAttention", "DenseReluDense")}


class BottleneckAdapter(nn.Module):
    """down: Linear(hidden, bottleneck), up: Linear(bottleneck, hidden); `forward` is the fused op."""

    def __init__(self, hidden: int, bottleneck: int, non_linearity: str, init_weights: str,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.non_linearity = canonical_activation(non_linearity)
        self.down = nn.Linear(hidden, bottleneck, device=device, dtype=dtype)
        self.up = nn.Linear(bottleneck, hidden, device=device, dtype=dtype)
        with torch.no_grad():
            if init_weights == "identity":  # down as nn.Linear's default, up and both biases zero: y = h
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
                self.down.bias.zero_()
                self.up.weight.zero_()
                self.up.bias.zero_()
            elif init_weights == "bert":  # AdapterHub's default: N(0, 0.02²) weights, zero biases
                for lin in (self.down, self.up):
                    lin.weight.normal_(0.0, 0.02)
                    lin.bias.zero_()
            elif init_weights != "random":
                raise ValueError(f"init_weights must be 'identity', 'bert' or 'random', got {init_weights!r}")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        ws = (self.down.weight, self.down.bias, self.up.weight, self.up.bias)
        if ws[0].dtype != h.dtype:  # fp32 adapter on 16-bit activations (or autocast): compute in h's dtype
            ws = tuple(w.to(h.dtype) for w in ws)
        return bottleneck_adapter(h, *ws, self.non_linearity)


class BottleneckWrapper(AdapterLayer):
    adapter_layer_names = ("bottleneck_adapters",)

    def __init__(self, base_layer: nn.Module, hidden: int, name: str = "") -> None:
        nn.Module.__init__(self)  # not a linear: AdapterLayer's geometry checks do not apply
        self.base_layer = base_layer
        self.hidden = hidden
        self.name = name
        self.fan_in_fan_out = False
        self.in_features = self.out_features = hidden
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.bottleneck_adapters = nn.ModuleDict()

    @property
    def weight(self):  # pragma: no cover - not a linear
        raise AttributeError(f"{self.name or 'BottleneckWrapper'} wraps a {type(self.base_layer).__name__}")

    @property
    def bias(self):  # pragma: no cover
        return None

    def update_layer(self, adapter_name: str, bottleneck: int, non_linearity: str, init_weights: str) -> None:
        p = next(self.base_layer.parameters())
        dtype = p.dtype if p.is_floating_point() else torch.float32
        self.bottleneck_adapters[adapter_name] = BottleneckAdapter(self.hidden, bottleneck, non_linearity,
                                                                   init_weights, device=p.device, dtype=dtype)

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        if self.disable_adapters:
            return out
        h = out[0] if isinstance(out, tuple) else out
        rows = self._row_names
        if rows is not None:
            h = self._mixed(h, rows)
        else:
            for name in self._active():  # several active adapters are stacked, as AdapterHub's Stack
                h = self.bottleneck_adapters[name](h)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    # ---------------------------------------------------------------- mixed-adapter batches
    _row_names: list[str] | None = None

    def _mixed(self, h: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Row b of h through adapter names[b] ("__base__", or an adapter this layer lacks: unchanged)."""
        if h.shape[0] != len(names):
            k = h.shape[0] // len(names)
            if self._row_expand and k * len(names) == h.shape[0]:  # generate(): rows repeated k times
                names = [n for n in names for _ in range(k)]
            else:
                raise ValueError(f"adapter_names has {len(names)} entries but the batch has {h.shape[0]} rows")
        present = set(self.adapters())
        choice = [n if n in present else "__base__" for n in names]
        out = h
        for name in dict.fromkeys(choice):
            if name == "__base__":
                continue
            if all(c == name for c in choice):
                return self.bottleneck_adapters[name](h)
            idx = torch.tensor([i for i, c in enumerate(choice) if c == name], device=h.device)
            out = out.index_copy(0, idx, self.bottleneck_adapters[name](h.index_select(0, idx)))
        return out

    def route_rows(self, names: list[str], expand: bool):
        """Until the returned handle's `remove()`: each batch row through its own adapter (PEFT's
        `adapter_names` forward argument, as for LoRA)."""
        self._row_names, self._row_expand = list(names), expand
        wrapper = self

        class _Handle:
            def remove(self) -> None:
                wrapper._row_names = None

        return _Handle()

    def _merge_one(self, name: str) -> None:
        raise ValueError("bottleneck adapters add a non-linear block: they cannot be merged into the base weights")


def _hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        if cfg is not None and getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__}: its config has no hidden_size")


def resolve_bottleneck_targets(model: nn.Module, config) -> list[str]:
    """Names of the sub-blocks that get an adapter after them."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if config.target_modules is not None:
        wanted = [config.target_modules] if isinstance(config.target_modules, str) else list(config.target_modules)
    else:
        if mtype not in PLACEMENT:
            raise ValueError(f"fastpeft has no bottleneck-adapter placement for model type {mtype!r}; set "
                             f"target_modules (the attention / feed-forward module names) in BottleneckConfig")
        attn, ffn = PLACEMENT[mtype]
        wanted = ([attn] if config.mh_adapter else []) + ([ffn] if config.output_adapter else [])
    if not wanted:
        raise ValueError("BottleneckConfig places no adapter: set mh_adapter and/or output_adapter")
    names = []
    for n, m in model.named_modules():
        if not n or ".bottleneck_adapters" in n or ".base_layer" in n:
            continue
        if n.rsplit(".", 1)[-1] in wanted:
            names.append(n)
    if not names:
        raise ValueError(f"bottleneck target modules {wanted} matched no module of {type(model).__name__}")
    return names


def inject_bottleneck(model: nn.Module, config, adapter_name: str) -> list[str]:
    hidden = _hidden_size(model)
    bottleneck = config.bottleneck_size or max(1, hidden // config.reduction_factor)
    names = resolve_bottleneck_targets(model, config)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, BottleneckWrapper) and adapter_name in module.adapters():
            raise ValueError(f"module {name!r} already holds an adapter named {adapter_name!r}")
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, BottleneckWrapper):
            if isinstance(module, AdapterLayer):
                raise ValueError(f"module {name!r} already holds a {type(module).__name__}; one method per model")
            wrapper = BottleneckWrapper(module, hidden, name)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
            module = wrapper
        module.update_layer(adapter_name, bottleneck, config.non_linearity, config.init_weights)
    return names


__all__ = ["BottleneckAdapter", "BottleneckWrapper", "inject_bottleneck", "PLACEMENT"]
