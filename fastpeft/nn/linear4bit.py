"""Linear4bit: a frozen nn.Linear stored as 4-bit NF4/FP4 codes in bitsandbytes' exact layout, so its
state dict (`weight`, `weight.absmax`, `weight.quant_map`, `weight.nested_absmax`,
`weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`) is bitsandbytes' Linear4bit's."""

from __future__ import annotations

import torch
from torch import nn

from ..quant.linear import dense_weight, linear_4bit
from dataclasses import replace

from ..quant.nf4 import QuantState4bit, quantize_4bit, state_from_bnb, state_from_dict, state_to_dict

_STATE_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_SHARDED = ("absmax", "nested_absmax")  # the quantisation state's per-block tensors, parameters under FSDP
_INT_OF = {4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _as_int(t: torch.Tensor) -> torch.Tensor:
    """`t`'s bytes as an integer tensor of the same shape (float32 → int32, bf16/fp16 → int16): FSDP2's
    mixed precision casts floating parameters only, so integer views cross it bit for bit."""
    return t if not t.is_floating_point() else t.view(_INT_OF[t.element_size()])


class Linear4bit(nn.Module):
    """y = x·Wᵀ + b with W (out_features, in_features) held as packed 4-bit codes (frozen).
    The input is cast to `compute_dtype` (default: the input's dtype) and the output back."""

    def __init__(self, packed: torch.Tensor, quant_state: QuantState4bit, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if len(quant_state.shape) != 2:
            raise ValueError(f"a 4-bit linear weight is 2-D (out, in), got shape {tuple(quant_state.shape)}")
        self.out_features, self.in_features = quant_state.shape
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = quant_state
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self.compute_dtype = compute_dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None, quant_storage: torch.dtype = torch.uint8) -> "Linear4bit":
        """Quantise an nn.Linear (bitsandbytes' rounding: `quantize_4bit`)."""
        packed, state = quantize_4bit(linear.weight.detach(), blocksize, quant_type, double_quant, quant_storage)
        bias = None if linear.bias is None else linear.bias.detach().requires_grad_(linear.bias.requires_grad)
        return cls(packed, state, bias, compute_dtype)

    @classmethod
    def from_bnb(cls, layer: nn.Module) -> "Linear4bit":
        """Take over a bitsandbytes `Linear4bit` (its packed data and quant state, no copy of the codes)."""
        qs = getattr(layer.weight, "quant_state", None)
        if qs is None:
            raise ValueError(f"{type(layer).__name__} has no quant_state: its weight is not quantised yet "
                             "(move it to a device first, as bitsandbytes quantises on .to())")
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError("this bitsandbytes layer was repacked for its AVX-512 CPU kernel (an inference-only "
                             "layout); set layer.support_avx512bf16_for_cpu = False before its first forward")
        bias = None if layer.bias is None else layer.bias.detach().requires_grad_(layer.bias.requires_grad)
        return cls(layer.weight.data, state_from_bnb(qs), bias, getattr(layer, "compute_dtype", None))

    # ------------------------------------------------------------------ FSDP2 layout
    def shard_layout(self) -> None:
        """Lay the layer out for FSDP2 (`fully_shard`), in place: the packed codes and the quantisation
        state's per-block tensors (absmax, and with double quantisation the nested absmax) become frozen
        integer parameters, so that FSDP shards every one of them on dim 0 (each rank keeping 1/world of
        the 4-bit base, the state included) and all-gathers them for the unit's forward and backward.
        Integer, because FSDP2's mixed precision casts floating parameters: the codes of a floating
        `quant_storage` (bf16, as FSDP-QLoRA recipes choose) and the float32 absmax travel as int16 /
        int32 views of the same bytes.  The 16- and 256-value code books and the offset stay plain
        attributes (a few hundred bytes a layer).  The state dict is unchanged (bitsandbytes' keys)."""
        if self.__dict__.get("_layout") is not None:
            return
        qs = self.quant_state
        w = self._parameters["weight"]
        layout = {"weight": w.dtype}
        self._parameters["weight"] = nn.Parameter(_as_int(w.data), requires_grad=False)
        for name in _SHARDED:
            t = getattr(qs, name)
            if t is not None:
                layout[name] = t.dtype
                self.register_parameter(name, nn.Parameter(_as_int(t.reshape(-1)), requires_grad=False))
        # the state keeps empty stand-ins: the full tensors would otherwise stay alive on every rank
        self.quant_state = replace(qs, absmax=qs.absmax.new_empty(0), nested_absmax=None if qs.nested_absmax is None
                                   else qs.nested_absmax.new_empty(0))
        self.__dict__["_layout"] = layout

    def state(self) -> QuantState4bit:
        """The quantisation state to compute with (under FSDP: built from the gathered parameters)."""
        layout = self.__dict__.get("_layout")
        if layout is None:
            return self.quant_state
        params = self._parameters
        absmax = params["absmax"].view(layout["absmax"])
        nested = params.get("nested_absmax")
        return replace(self.quant_state, absmax=absmax,
                       nested_absmax=None if nested is None else nested.view(layout["nested_absmax"]))

    def codes(self) -> torch.Tensor:
        """The packed codes in their quant-storage dtype (bitsandbytes' layout)."""
        layout = self.__dict__.get("_layout")
        w = self._parameters["weight"]
        return w if layout is None or w.dtype == layout["weight"] else w.view(layout["weight"])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W (out_features, in_features) in `dtype` (default: the dtype it was quantised from)."""
        state = self.state()
        return dense_weight(self.codes(), state, state.dtype if dtype is None else dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear holding the dequantised weight."""
        w = self.dequantize(dtype)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        lin.weight.requires_grad_(False)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return linear_4bit(x, self._parameters["weight"], self.state(), bias).to(inp_dtype)

    def _apply(self, fn, recurse=True):
        # the codes move with the module but are never cast (model.half() must not convert a
        # bf16 quant_storage view as if it held numbers): fn sees them as bytes
        w = self._parameters.pop("weight")
        try:
            super()._apply(fn, recurse)
            codes = fn(w.data.view(torch.uint8))
        finally:
            self._parameters["weight"] = w
        if codes.data_ptr() != w.data.data_ptr():
            self._parameters["weight"] = nn.Parameter(codes.view(w.dtype), requires_grad=False)
        if self.quant_state.absmax.device != self.weight.device:
            self.quant_state = self.quant_state.to(self.weight.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.__dict__.get("_layout") is not None:  # FSDP's parameters, written under bitsandbytes' keys
            for name in _SHARDED:
                destination.pop(prefix + name, None)
            destination[prefix + "weight"] = self.codes() if keep_vars else self.codes().detach()
        for key, value in state_to_dict(self.state()).items():
            destination[prefix + "weight." + key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        quant = {k: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix + "weight.")
                 and k[len(prefix) + 7:].split(".")[0] in _STATE_KEYS + ("quant_state",)}
        wkey = prefix + "weight"
        if self.__dict__.get("_layout") is not None:
            if quant or wkey in state_dict:
                error_msgs.append(f"{wkey}: this 4-bit layer is laid out for FSDP (shard_layout); load its weights "
                                  f"before sharding the model")
            for name in _SHARDED:  # adapter-only loads (strict=False) pass by
                if name in self._parameters and prefix + name not in state_dict:
                    missing_keys.append(prefix + name)
            return
        if quant:
            if wkey not in state_dict:
                missing_keys.append(wkey)
                return
            state = state_from_dict(quant, device=self.weight.device)
            if tuple(state.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{wkey}: 4-bit weight of shape {tuple(state.shape)}, this layer is "
                                  f"({self.out_features}, {self.in_features})")
                return
            self.weight = nn.Parameter(torch.empty_like(state_dict[wkey], device=self.weight.device),
                                       requires_grad=False)  # filled by the default load below
            self.quant_state = state
        elif wkey in state_dict and state_dict[wkey].is_floating_point() and \
                tuple(state_dict[wkey].shape) == (self.out_features, self.in_features):
            # a 16-bit checkpoint: quantise it with this layer's settings
            qs = self.quant_state
            packed, state = quantize_4bit(state_dict[wkey].to(self.weight.device), qs.blocksize, qs.quant_type,
                                          qs.nested)
            state_dict[wkey] = packed
            self.weight = nn.Parameter(torch.empty_like(packed), requires_grad=False)
            self.quant_state = state
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        qs = self.quant_state
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={qs.quant_type}, blocksize={qs.blocksize}, double_quant={qs.nested}, "
                f"compute_dtype={self.compute_dtype}")


def is_4bit_linear(module: nn.Module) -> bool:
    """fastpeft's Linear4bit or bitsandbytes' (duck-typed: bitsandbytes is never imported here)."""
    return isinstance(module, Linear4bit) or (type(module).__name__ == "Linear4bit" and
                                              type(module).__module__.startswith("bitsandbytes"))
