"""LoraLinear: a drop-in LoRA layer with HF PEFT's structure (`base_layer`, `lora_A.<name>`,
`lora_B.<name>`), so state dicts and key names match PEFT's, whose hot path is `ops.lora_linear`."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import lora_linear
from ..ops.grouped_lora import grouped_lora_linear, plan_groups
from ._base import AdapterLayer, adapter_dtype, base_params, merge_dtype


class LoraLinear(AdapterLayer):
    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, use_rslora: bool = False,
                 init_lora_weights: bool | str = True, name: str = "") -> None:
        super().__init__(base_layer, fan_in_fan_out, name)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)
        self.set_adapter(adapter_name)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     use_rslora: bool = False, init_lora_weights: bool | str = True) -> None:
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {r!r}")
        weight = self.base_layer.weight
        dtype = adapter_dtype(weight)
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, device=weight.device, dtype=dtype)
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.reset_lora_parameters(adapter_name, init_lora_weights)

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool | str) -> None:
        if init_lora_weights is False:
            return
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        with torch.no_grad():
            if init_lora_weights == "gaussian":
                nn.init.normal_(a, std=1 / self.r[adapter_name])
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for d in (self.lora_dropout, ):
            if name in d:
                del d[name]
        for d in (self.r, self.lora_alpha, self.scaling):
            d.pop(name, None)

    def _dropout_p(self, name: str) -> float:
        drop = self.lora_dropout[name]
        return drop.p if isinstance(drop, nn.Dropout) else 0.0

    def _lora_op(self, x: torch.Tensor, name: str, bias: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
        return lora_linear(x, self.base_weight_nk() if weight is None else weight, bias,
                           self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                           self._dropout_p(name), self.training)

    def forward(self, x: torch.Tensor, *args, adapter_names: list[str] | None = None, **kwargs) -> torch.Tensor:
        # the common case first, read straight from the containers (no nn.Module.__getattr__): one active,
        # unmerged adapter, no mixed batch
        if adapter_names is None and self._row_names is None and len(self.active_adapters) == 1 \
                and not (self.disable_adapters or self.merged_adapters or args or kwargs):
            name = self.active_adapters[0]
            mods = self._modules
            a_mod = mods["lora_A"]._modules.get(name)
            if a_mod is not None:
                weight, bias = base_params(mods["base_layer"])
                drop = mods["lora_dropout"]._modules[name]
                return lora_linear(x, weight.t() if self.fan_in_fan_out else weight, bias,
                                   a_mod._parameters["weight"], mods["lora_B"]._modules[name]._parameters["weight"],
                                   self.scaling[name], drop.p if type(drop) is nn.Dropout else 0.0, self.training)
        adapter_names = self._row_adapters(x, adapter_names)  # a mixed-adapter batch of the whole model
        if self.disable_adapters or adapter_names is not None:
            return self._disabled_or_mixed(x, args, kwargs, adapter_names)
        active = [a for a in self._active() if a not in self.merged_adapters]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        y = self._lora_op(x, active[0], self.base_layer.bias)
        for name in active[1:]:  # several active adapters: extra low-rank terms on top
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            xd = self.lora_dropout[name](x.to(a.dtype))
            y = (y + (xd @ a.t() @ b.t()) * self.scaling[name]).to(y.dtype)
        return y

    def _disabled_or_mixed(self, x: torch.Tensor, args: tuple, kwargs: dict,
                           adapter_names: list[str] | None) -> torch.Tensor:
        """Disabled adapters (the frozen layer alone, unmerged first, as PEFT) or a mixed-adapter batch."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            raise ValueError("a mixed-adapter batch (adapter_names) cannot run on merged weights; unmerge first")
        return self._mixed_batch_forward(x, adapter_names)

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """Each batch row through its own adapter ("__base__": none): the base projection once for the
        whole batch, the low-rank terms grouped by adapter (`ops.grouped_lora_linear`).  Works in training
        mode too: each row's loss reaches only its adapter's parameters."""
        if x.dim() < 2 or len(adapter_names) != x.shape[0]:
            rows = x.shape[0] if x.dim() >= 2 else "no"
            raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {rows} rows")
        tokens_per_row = x.numel() // (x.shape[0] * x.shape[-1]) if x.numel() else 0
        plan = plan_groups(adapter_names, tokens_per_row, x.device)
        mods_a, mods_b = self.lora_A._modules, self.lora_B._modules
        unknown = [n for n in plan.names if n not in mods_a]
        if unknown:
            known = sorted(set(self.adapters()) | {"__base__"})
            raise ValueError(f"unknown adapter(s) {sorted(unknown)} in adapter_names; this layer has {known}")
        drops = self.lora_dropout._modules
        ps = [d.p if type(d) is nn.Dropout else 0.0 for d in map(drops.__getitem__, plan.names)] if self.training \
            else 0.0
        xc, weight, bias, out_dtype = self._mixed_base(x)
        y = grouped_lora_linear(
            xc, weight, bias, plan,
            [mods_a[n]._parameters["weight"] for n in plan.names], [mods_b[n]._parameters["weight"] for n in plan.names],
            [self.scaling[n] for n in plan.names], ps, self.training,
            table_cache=self.__dict__.setdefault("_grouped_table", {}))
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def _mixed_base(self, x: torch.Tensor):
        """(x, weight (N, K), bias, output dtype) of the frozen projection for the mixed-batch op."""
        base = self.base_layer
        return x, base.weight.t() if self.fan_in_fan_out else base.weight, base.bias, x.dtype

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """scaling · B·A in the base weight's layout (transposed for Conv1D) and dtype."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        acc = merge_dtype(self.base_layer.weight)
        delta = (b.to(acc) @ a.to(acc)) * self.scaling[name]
        if self.fan_in_fan_out:
            delta = delta.t()
        return delta.to(self.base_layer.weight.dtype)

    def _merge_one(self, name: str) -> None:
        w = self.base_layer.weight
        with torch.no_grad():
            acc = merge_dtype(w)
            w.data = (w.data.to(acc) + self.get_delta_weight(name).to(acc)).to(w.dtype)

    def _unmerge_one(self, name: str) -> None:
        w = self.base_layer.weight
        with torch.no_grad():
            acc = merge_dtype(w)
            w.data = (w.data.to(acc) - self.get_delta_weight(name).to(acc)).to(w.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling}, fan_in_fan_out={self.fan_in_fan_out}"
