"""Bottleneck adapters (Houlsby / Pfeiffer): y = h + up(act(down(h))) after a sub-block's output.

`BottleneckWrapper` wraps a decoder layer's attention and/or feed-forward module (`base_layer`), and
applies each active adapter of its `bottleneck_adapters` ModuleDict to the module's output (the first
element when it returns a tuple) through the fused op `fastpeft.ops.bottleneck.bottleneck_adapter`.

The placement is AdapterHub's (`adapters.methods.modeling.Adapter.pre_forward` / `forward` /
`post_forward`), with h the sub-block's output and x its residual input:

* pre-LN models (Llama, Mistral, Qwen, GPT-2; T5 without original_ln_before): the wrapper returns y and
  the model adds x itself (x + y, AdapterHub's `original_ln_after` without a layer norm).
  original_ln_before=False: y = h + f(h) (the fused op);
  original_ln_before=True: s = h + x, y = f(s) + h (residual_before_ln=True) or y = f(s) + s (False).
  x is the input of the layer's norm before the sub-block (`input_layernorm` / `post_attention_layernorm`),
  read by a forward pre-hook on that norm, only for adapters with original_ln_before=True.
* post-LN encoders (BERT, RoBERTa, XLM-R): the wrapper replaces `BertSelfOutput` / `BertOutput`
  (dense -> dropout -> LayerNorm(h + x)): h = dropout(dense(.)), then as above with s = LN(h + x) for
  original_ln_before=True, and the block's LN(y + x) last.

Several active adapters are stacked as AdapterHub's `Stack`: each one's pre-step on the previous one's output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.bottleneck import _act, bottleneck_adapter, canonical_activation
from ._base import AdapterLayer

# where the adapters go, per model family: (attention module, feed-forward module), matched on the last name
PLACEMENT = {"llama": ("self_attn", "mlp"), "mistral": ("self_attn", "mlp"), "qwen2": ("self_attn", "mlp"),
             "qwen3": ("self_attn", "mlp"), "gpt2": ("attn", "mlp"),
             # T5 (encoder and decoder): after self-attention and after the feed-forward, inside their
             # pre-LN residual blocks (cross-attention is left alone, as AdapterHub's default cross_adapter=False)
             "t5": ("SelfAttention", "DenseReluDense"), "mt5": ("SelfAttention", "DenseReluDense"),
             # post-LN encoders: the attention's and the feed-forward's output blocks (dense, dropout, LayerNorm),
             # matched on their class names (BertSelfOutput / BertOutput, ...) since both are called "output"
             "bert": ("SelfOutput", "Output"), "roberta": ("SelfOutput", "Output"),
             "xlm-roberta": ("SelfOutput", "Output")}
POST_LN = ("bert", "roberta", "xlm-roberta")
# pre-LN models: the norm (a child of the target's parent) whose input is the sub-block's residual x,
# needed by original_ln_before=True; per (attention, feed-forward) placement
RESIDUAL_NORM = {"llama": ("input_layernorm", "post_attention_layernorm"),
                 "mistral": ("input_layernorm", "post_attention_layernorm"),
                 "qwen2": ("input_layernorm", "post_attention_layernorm"),
                 "qwen3": ("input_layernorm", "post_attention_layernorm"), "gpt2": ("ln_1", "ln_2")}
LOCATIONS = ("mh_adapter", "output_adapter")  # AdapterHub's names of the two places


class BottleneckAdapter(nn.Module):
    """down: Linear(hidden, bottleneck), up: Linear(bottleneck, hidden); `forward` is the fused op."""

    def __init__(self, hidden: int, bottleneck: int, non_linearity: str, init_weights: str,
                 device=None, dtype=None, original_ln_before: bool = False, residual_before_ln: bool = True) -> None:
        super().__init__()
        self.non_linearity = canonical_activation(non_linearity)
        self.original_ln_before = bool(original_ln_before)  # AdapterHub's pre_forward: see the module docstring
        self.residual_before_ln = bool(residual_before_ln)
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

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        ws = (self.down.weight, self.down.bias, self.up.weight, self.up.bias)
        if ws[0].dtype != dtype:  # fp32 adapter on 16-bit activations (or autocast): compute in h's dtype
            ws = tuple(w.to(dtype) for w in ws)
        return ws

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h + up(act(down(h))), the fused op."""
        return bottleneck_adapter(h, *self._weights(h.dtype), self.non_linearity)

    def delta(self, s: torch.Tensor) -> torch.Tensor:
        """up(act(down(s))) alone, for a residual other than the input (original_ln_before with
        residual_before_ln=True); plain torch ops (the M×bottleneck intermediate is small)."""
        wd, bd, wu, bu = self._weights(s.dtype)
        return F.linear(_act(F.linear(s, wd, bd), self.non_linearity), wu, bu)


class BottleneckWrapper(AdapterLayer):
    adapter_layer_names = ("bottleneck_adapters",)

    def __init__(self, base_layer: nn.Module, hidden: int, name: str = "", post_ln: bool = False,
                 location: str | None = None) -> None:
        nn.Module.__init__(self)  # not a linear: AdapterLayer's geometry checks do not apply
        self.base_layer = base_layer
        self.hidden = hidden
        self.name = name
        # post_ln: base_layer is a BertSelfOutput-like block (dense, dropout, LayerNorm(h + x)) whose
        # forward the wrapper runs itself, placing the adapter before the LayerNorm as AdapterHub does
        if post_ln:
            missing = [a for a in ("dense", "dropout", "LayerNorm") if not hasattr(base_layer, a)]
            if missing:
                raise ValueError(f"{name or type(base_layer).__name__}: a post-LN output block needs "
                                 f"dense, dropout and LayerNorm; it has no {missing}")
        self.post_ln = post_ln
        self.location = location  # "mh_adapter" / "output_adapter" (AdapterHub's names), None: a custom target
        self._residual_in: torch.Tensor | None = None  # x of a pre-LN block, stashed by the norm's pre-hook
        self._residual_hook = None
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

    def update_layer(self, adapter_name: str, bottleneck: int, non_linearity: str, init_weights: str,
                     original_ln_before: bool = False, residual_before_ln: bool = True) -> None:
        p = next(self.base_layer.parameters())
        dtype = p.dtype if p.is_floating_point() else torch.float32
        self.bottleneck_adapters[adapter_name] = BottleneckAdapter(
            self.hidden, bottleneck, non_linearity, init_weights, device=p.device, dtype=dtype,
            original_ln_before=original_ln_before, residual_before_ln=residual_before_ln)

    # ---------------------------------------------------------------- the residual x of a pre-LN block
    def attach_residual(self, norm: nn.Module) -> None:
        """Read x (the block's residual input) from `norm`'s input at each forward: the norm before the
        wrapped sub-block in a pre-LN layer.  Once per wrapper; removed when the wrapper is unwrapped."""
        if self._residual_hook is None:
            self._residual_hook = norm.register_forward_pre_hook(self._stash_residual, with_kwargs=True)

    def _stash_residual(self, module, args, kwargs):
        self._residual_in = args[0] if args else next(iter(kwargs.values()), None)

    def _fastpeft_release(self) -> None:
        """The wrapper leaves the model (unload / a failed add): drop the norm hook and the stash."""
        if self._residual_hook is not None:
            self._residual_hook.remove()
            self._residual_hook = None
        self._residual_in = None

    # ---------------------------------------------------------------- forward
    def forward(self, *args, **kwargs):
        if self.post_ln:
            return self._post_ln_forward(*args, **kwargs)
        out = self.base_layer(*args, **kwargs)
        x = self._residual_in
        if x is not None:  # stashed by the norm hook (original_ln_before): not kept past this call
            self._residual_in = None
        if self.disable_adapters:
            return out
        h = out[0] if isinstance(out, tuple) else out
        h = self._adapt(h, x, None)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def _post_ln_forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        """BertSelfOutput / BertOutput with AdapterHub's adapters (its bottleneck_layer_forward)."""
        base = self.base_layer
        h = base.dropout(base.dense(hidden_states))
        if not self.disable_adapters:
            h = self._adapt(h, input_tensor, base.LayerNorm)
        return base.LayerNorm(h + input_tensor)  # original_ln_after

    def _adapt(self, h: torch.Tensor, x: torch.Tensor | None, ln: nn.Module | None) -> torch.Tensor:
        rows = self._row_names
        if rows is not None:
            return self._mixed(h, x, ln, rows)
        return self._chain(h, x, ln, self._active())

    def _chain(self, h: torch.Tensor, x: torch.Tensor | None, ln: nn.Module | None, names) -> torch.Tensor:
        """The adapters `names` in turn (AdapterHub's Stack), each with its pre-step (pre_forward)."""
        for name in names:
            adapter = self.bottleneck_adapters[name]
            if not adapter.original_ln_before:  # residual = input = h
                h = adapter(h)
                continue
            if x is None:
                raise RuntimeError(f"{self.name or 'BottleneckWrapper'}: adapter {name!r} has original_ln_before="
                                   f"True but the block's residual input was not seen (no norm hook ran)")
            s = h + x
            if ln is not None:
                s = ln(s)
            # residual_before_ln=True: the adapter's residual is the block output h; False: its input s
            h = adapter.delta(s) + h if adapter.residual_before_ln else adapter(s)
        return h

    # ---------------------------------------------------------------- mixed-adapter batches
    _row_names: list[str] | None = None

    def _mixed(self, h: torch.Tensor, x: torch.Tensor | None, ln: nn.Module | None,
               names: list[str]) -> torch.Tensor:
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
                return self._chain(h, x, ln, [name])
            idx = torch.tensor([i for i, c in enumerate(choice) if c == name], device=h.device)
            rows_x = x.index_select(0, idx) if x is not None else None
            out = out.index_copy(0, idx, self._chain(h.index_select(0, idx), rows_x, ln, [name]))
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


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _post_ln_location(module: nn.Module) -> str | None:
    """mh_adapter / output_adapter for a post-LN encoder's BertSelfOutput / BertOutput-like block."""
    cls = type(module.base_layer if isinstance(module, BottleneckWrapper) else module).__name__
    if not hasattr(module.base_layer if isinstance(module, BottleneckWrapper) else module, "LayerNorm"):
        return None
    if cls.endswith("SelfOutput"):
        return "mh_adapter"
    if cls.endswith("Output"):
        return "output_adapter"
    return None


def resolve_bottleneck_placement(model: nn.Module, config) -> list[tuple[str, str | None]]:
    """(name, location) of each sub-block that gets an adapter after it; location is AdapterHub's
    "mh_adapter" / "output_adapter", None for a target_modules name outside fastpeft's placement table."""
    mtype = _model_type(model)
    if config.target_modules is None and mtype not in PLACEMENT:
        raise ValueError(f"fastpeft has no bottleneck-adapter placement for model type {mtype!r}; set "
                         f"target_modules (the attention / feed-forward module names) in BottleneckConfig")
    if not (config.mh_adapter or config.output_adapter) and config.target_modules is None:
        raise ValueError("BottleneckConfig places no adapter: set mh_adapter and/or output_adapter")
    found = []
    if config.target_modules is None and mtype in POST_LN:  # both blocks are named "output": match classes
        wanted_locs = [loc for loc, on in zip(LOCATIONS, (config.mh_adapter, config.output_adapter)) if on]
        for n, m in model.named_modules():
            if not n or ".bottleneck_adapters" in n or ".base_layer" in n or "crossattention" in n:
                continue
            loc = _post_ln_location(m)
            if loc in wanted_locs:
                found.append((n, loc))
        wanted = [PLACEMENT[mtype][LOCATIONS.index(loc)] for loc in wanted_locs]
    else:
        if config.target_modules is not None:
            t = config.target_modules
            wanted = [t] if isinstance(t, str) else list(t)
        else:
            attn, ffn = PLACEMENT[mtype]
            wanted = ([attn] if config.mh_adapter else []) + ([ffn] if config.output_adapter else [])
        if not wanted:
            raise ValueError("BottleneckConfig places no adapter: set mh_adapter and/or output_adapter")
        table = PLACEMENT.get(mtype, ()) if mtype not in POST_LN else ()
        for n, m in model.named_modules():
            if not n or ".bottleneck_adapters" in n or ".base_layer" in n:
                continue
            last = n.rsplit(".", 1)[-1]
            if last in wanted:
                found.append((n, LOCATIONS[table.index(last)] if last in table else None))
    if not found:
        raise ValueError(f"bottleneck target modules {wanted} matched no module of {type(model).__name__}")
    return found


def resolve_bottleneck_targets(model: nn.Module, config) -> list[str]:
    """Names of the sub-blocks that get an adapter after them."""
    return [n for n, _ in resolve_bottleneck_placement(model, config)]


def _residual_norm(model: nn.Module, name: str, location: str | None) -> nn.Module:
    """The norm whose input is the residual x of the pre-LN block `name` (original_ln_before=True)."""
    mtype = _model_type(model)
    if mtype not in RESIDUAL_NORM or location is None:
        known = sorted(RESIDUAL_NORM) + list(POST_LN)
        raise ValueError(f"BottleneckConfig(original_ln_before=True) needs the residual input of {name!r}; fastpeft "
                         f"knows where it is for the default placement of model types {known}, not for "
                         f"{mtype!r}" + ("" if location else " with a custom target_modules name"))
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    norm = getattr(parent, RESIDUAL_NORM[mtype][LOCATIONS.index(location)], None)
    if not isinstance(norm, nn.Module):
        raise ValueError(f"BottleneckConfig(original_ln_before=True): {parent_name!r} has no "
                         f"{RESIDUAL_NORM[mtype][LOCATIONS.index(location)]!r} norm to read the residual from")
    return norm


def inject_bottleneck(model: nn.Module, config, adapter_name: str) -> list[str]:
    hidden = _hidden_size(model)
    bottleneck = config.bottleneck_size or max(1, hidden // config.reduction_factor)
    placement = resolve_bottleneck_placement(model, config)
    post_ln = _model_type(model) in POST_LN
    norms = {}
    for name, location in placement:  # every check before the model changes
        module = model.get_submodule(name)
        if isinstance(module, BottleneckWrapper) and adapter_name in module.adapters():
            raise ValueError(f"module {name!r} already holds an adapter named {adapter_name!r}")
        if getattr(config, "original_ln_before", False) and not (post_ln and location):
            norms[name] = _residual_norm(model, name, location)
    for name, location in placement:
        module = model.get_submodule(name)
        if not isinstance(module, BottleneckWrapper):
            if isinstance(module, AdapterLayer):
                raise ValueError(f"module {name!r} already holds a {type(module).__name__}; one method per model")
            wrapper = BottleneckWrapper(module, hidden, name, post_ln=post_ln and location is not None,
                                        location=location)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
            module = wrapper
        module.update_layer(adapter_name, bottleneck, config.non_linearity, config.init_weights,
                            original_ln_before=getattr(config, "original_ln_before", False),
                            residual_before_ln=getattr(config, "residual_before_ln", True))
        if name in norms:
            module.attach_residual(norms[name])
    return [n for n, _ in placement]


__all__ = ["BottleneckAdapter", "BottleneckWrapper", "inject_bottleneck", "PLACEMENT", "POST_LN",
           "resolve_bottleneck_placement"]
