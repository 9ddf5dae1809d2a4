"""LoraLinear4bit: LoRA on a frozen 4-bit base (QLoRA). Same structure and adapter keys as PEFT's
`lora.Linear4bit`; the base is dequantised inside its own op, never stored in 16 bits, never trained.

y = base4(x) + Σ_adapters scaling · B·A·dropout(x), the LoRA terms in the adapter dtype (PEFT's order of
operations, so logits equal PEFT + bitsandbytes' on the same weights)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import backend
from ..quant.linear import _use_triton, qlora_layer
from ..quant.nf4 import quantize_4bit
from .linear4bit import Linear4bit
from .lora import LoraLinear


class LoraLinear4bit(LoraLinear):
    def forward(self, x: torch.Tensor, *args, adapter_names: list[str] | None = None, **kwargs) -> torch.Tensor:
        adapter_names = self._row_adapters(x, adapter_names)  # a mixed-adapter batch of the whole model
        base = self.base_layer
        if _use_triton(x) and isinstance(base, Linear4bit) and not (self.disable_adapters or adapter_names is not None
                                                                    or self.merged_adapters or args or kwargs) \
                and len(self.active_adapters) == 1 and self.active_adapters[0] in self.lora_A:
            # one active adapter on the GPU: the fused NF4-prologue GEMM with the LoRA term in its epilogue
            name = self.active_adapters[0]
            backend._LAST["qlora_linear"] = "triton"
            return qlora_layer(x, base.weight, base.state(), base.bias, base.compute_dtype,
                               self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                               self._dropout_p(name), self.training)
        if self.disable_adapters or adapter_names is not None:
            return self._disabled_or_mixed(x, args, kwargs, adapter_names)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        backend._LAST["qlora_linear"] = "torch"  # PEFT's sequence of ops on the 4-bit base's output
        for name in self._active():
            a, b = self.lora_A[name], self.lora_B[name]
            xa = x.to(a.weight.dtype) if x.dtype != a.weight.dtype else x
            out = b(a(self.lora_dropout[name](xa))) * self.scaling[name]
            result = result + out.to(result.dtype)
        return result

    def _mixed_base(self, x: torch.Tensor):
        """A mixed-adapter batch on a 4-bit base: the base weight dequantised for this call (never stored),
        x in the layer's compute dtype, the output back in x's dtype (as Linear4bit.forward)."""
        base = self.base_layer
        if not isinstance(base, Linear4bit):  # a base turned 16-bit by fastpeft.quant.dequantize_model
            return super()._mixed_base(x)
        xc = x.to(base.compute_dtype) if base.compute_dtype is not None else x
        bias = base.bias if base.bias is None or base.bias.dtype == xc.dtype else base.bias.to(xc.dtype)
        return xc, base.dequantize(xc.dtype), bias, x.dtype

    def get_delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return (b.float() @ a.float()) * self.scaling[name]

    def _shift(self, name: str, sign: float) -> None:
        base = self.base_layer
        if isinstance(base, Linear4bit):
            if base.__dict__.get("_layout") is not None:
                raise ValueError("merging into a 4-bit base laid out for FSDP is not supported; merge the "
                                 "adapter into an unsharded model")
            qs = base.quant_state
            w = base.dequantize(torch.float32) + sign * self.get_delta_weight(name).to(base.weight.device)
            if not torch.isfinite(w).all():
                raise ValueError(f"merging adapter {name!r} produced non-finite weights; the merge was refused")
            packed, state = quantize_4bit(w.to(qs.dtype), qs.blocksize, qs.quant_type, qs.nested,
                                          base.weight.dtype)
            base.weight = nn.Parameter(packed, requires_grad=False)
            base.quant_state = state
            if sign < 0:
                warnings.warn("unmerging from a 4-bit base re-quantises it: the weights are not exactly those "
                              "before the merge", stacklevel=3)
        else:  # a base turned 16-bit by fastpeft.quant.dequantize_model
            w = base.weight
            with torch.no_grad():
                w.data = (w.data.float() + sign * self.get_delta_weight(name).to(w.device)).to(w.dtype)

    def _merge_one(self, name: str) -> None:
        self._shift(name, 1.0)

    def _unmerge_one(self, name: str) -> None:
        self._shift(name, -1.0)
