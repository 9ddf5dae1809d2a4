"""IA3Linear: a drop-in IA3 layer with HF PEFT's structure (`base_layer`, `ia3_l.<name>`) whose hot
path is `ops.ia3_linear`."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import ia3_linear
from ._base import AdapterLayer, adapter_dtype, base_params, merge_dtype


class IA3Linear(AdapterLayer):
    adapter_layer_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", is_feedforward: bool = False,
                 fan_in_fan_out: bool = False, init_ia3_weights: bool = True, name: str = "") -> None:
        super().__init__(base_layer, fan_in_fan_out, name)
        self.is_feedforward = is_feedforward
        self.ia3_l = nn.ParameterDict()
        self.update_layer(adapter_name, init_ia3_weights)
        self.set_adapter(adapter_name)

    def update_layer(self, adapter_name: str, init_ia3_weights: bool = True) -> None:
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        device = self.base_layer.weight.device
        dtype = adapter_dtype(self.base_layer.weight)
        value = (torch.ones(shape, device=device, dtype=dtype) if init_ia3_weights
                 else torch.randn(shape, device=device, dtype=dtype))
        self.ia3_l[adapter_name] = nn.Parameter(value)

    def _scale(self, names: list[str]) -> torch.Tensor:
        scale = self.ia3_l[names[0]]
        for name in names[1:]:
            scale = scale * self.ia3_l[name]
        return scale

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # the common case first, read straight from the containers: one active, unmerged adapter
        if not (self.disable_adapters or self.merged_adapters or args or kwargs) and len(self.active_adapters) == 1:
            scale = self._modules["ia3_l"]._parameters.get(self.active_adapters[0])
            if scale is not None:
                weight, bias = base_params(self._modules["base_layer"])
                return ia3_linear(x, weight.t() if self.fan_in_fan_out else weight, bias, scale, self.is_feedforward)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self._active() if a not in self.merged_adapters]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        return ia3_linear(x, self.base_weight_nk(), self.base_layer.bias, self._scale(active), self.is_feedforward)

    def _apply_scale(self, name: str, inverse: bool) -> None:
        acc = merge_dtype(self.base_layer.weight)
        l = self.ia3_l[name].detach().to(acc).reshape(-1)
        if inverse:
            l = 1.0 / (l + 1e-8)
        w = self.base_layer.weight
        with torch.no_grad():
            wn = w.data.to(acc).t() if self.fan_in_fan_out else w.data.to(acc)  # (out, in)
            wn = wn * (l[None, :] if self.is_feedforward else l[:, None])
            w.data = (wn.t() if self.fan_in_fan_out else wn).contiguous().to(w.dtype)
            b = self.base_layer.bias
            if b is not None and not self.is_feedforward:
                b.data = (b.data.to(acc) * l).to(b.dtype)

    def _merge_one(self, name: str) -> None:
        self._apply_scale(name, inverse=False)

    def _unmerge_one(self, name: str) -> None:
        self._apply_scale(name, inverse=True)
