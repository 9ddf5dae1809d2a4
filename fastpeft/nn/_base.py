"""What the adapter layers share: the wrapped base layer's geometry and adapter bookkeeping."""

from __future__ import annotations

import torch
from torch import nn


def linear_geometry(base: nn.Module, name: str = "") -> tuple[int, int, bool]:
    """(in_features, out_features, is_conv1d) of an nn.Linear or a GPT-2 style Conv1D."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, False
    if type(base).__name__ == "Conv1D" and hasattr(base, "nf"):
        in_features, out_features = base.weight.shape
        return in_features, out_features, True
    if type(base).__name__ == "Linear4bit" and hasattr(base, "in_features"):  # fastpeft.nn.Linear4bit (4-bit base)
        return base.in_features, base.out_features, False
    where = f" {name!r}" if name else ""
    raise TypeError(f"module{where} is a {type(base).__name__}; fastpeft adapts nn.Linear and transformers' Conv1D "
                    "layers only")


def rows_names(names: list[str], rows: int, expand: bool) -> list[str]:
    """The adapter of each of `rows` batch rows from one name per input row: generate() with num_beams /
    num_return_sequences repeats each row k times (repeat_interleave) when `expand`."""
    if not expand or rows == len(names) or rows % len(names):
        return names  # a wrong row count is refused by the layer, naming both counts
    k = rows // len(names)
    return [n for n in names for _ in range(k)]


def base_params(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a base layer read from its parameter dict, a twentieth of the cost of
    `base.weight` (nn.Module.__getattr__) on the hot path; attributes where they are not plain
    parameters (a parametrization, a property)."""
    params = base._parameters
    weight = params.get("weight")
    if weight is None:
        weight = base.weight
    bias = params["bias"] if "bias" in params else getattr(base, "bias", None)
    return weight, bias


class AdapterLayer(nn.Module):
    """Base of LoraLinear / IA3Linear: holds `base_layer` and the active/merged adapter state."""

    adapter_layer_names: tuple[str, ...] = ()
    _row_names: tuple[list[str], bool] | None = None  # set while a mixed-adapter batch runs (PeftModel.forward)

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool, name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features, is_conv1d = linear_geometry(base_layer, name)
        # Conv1D stores (in, out): PEFT users set fan_in_fan_out=True for it; the layout, not the flag, decides
        self.fan_in_fan_out = is_conv1d or fan_in_fan_out
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    def _row_adapters(self, x: torch.Tensor, adapter_names: list[str] | None) -> list[str] | None:
        """The call's `adapter_names`, or the rows' adapters a whole-model mixed batch set on this layer
        (`_row_names`, by PeftModel.forward / generate)."""
        if adapter_names is None and self._row_names is not None:
            names, expand = self._row_names
            return rows_names(names, x.shape[0], expand)
        return adapter_names

    def base_weight_nk(self) -> torch.Tensor:
        """The frozen weight as (out_features, in_features), a view for Conv1D."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def set_adapter(self, names: str | list[str]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        self.active_adapters = names
        for layer_name in self.adapter_layer_names:
            container = getattr(self, layer_name)
            for key, module in container.items():
                trainable = key in names
                params = [module] if isinstance(module, nn.Parameter) else module.parameters()
                for p in params:
                    p.requires_grad_(trainable)

    def adapters(self) -> list[str]:
        return list(getattr(self, self.adapter_layer_names[0]).keys())

    def delete_adapter(self, name: str) -> None:
        for layer_name in self.adapter_layer_names:
            container = getattr(self, layer_name)
            if name in container:
                del container[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def _active(self) -> list[str]:
        present = set(self.adapters())
        return [a for a in self.active_adapters if a in present]

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._unmerge_one(self.merged_adapters.pop())

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        for name in adapter_names or self._active():
            if name in self.merged_adapters or name not in self.adapters():
                continue
            if safe_merge:
                before = self.base_layer.weight.detach().clone()
                self._merge_one(name)
                if not torch.isfinite(self.base_layer.weight).all():
                    with torch.no_grad():
                        self.base_layer.weight.copy_(before)
                    raise ValueError(f"merging adapter {name!r} produced non-finite weights; the merge was undone")
            else:
                self._merge_one(name)
            self.merged_adapters.append(name)

    def _merge_one(self, name: str) -> None:
        raise NotImplementedError

    def _unmerge_one(self, name: str) -> None:
        raise NotImplementedError


class ModulesToSaveWrapper(nn.Module):
    """A trainable copy of a module (PEFT's `modules_to_save`), the original kept for other adapters."""

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        import copy

        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.update(adapter_name)
        self._copy = copy

    def update(self, adapter_name: str) -> None:
        import copy

        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[adapter_name] = clone
        self.original_module.requires_grad_(False)
        self.active_adapter = adapter_name

    def set_adapter(self, adapter_name: str) -> None:
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == adapter_name)
        self.active_adapter = adapter_name if adapter_name in self.modules_to_save else None

    @property
    def weight(self):
        return self._current().weight

    def _current(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self._current()(*args, **kwargs)


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype PEFT gives a new adapter: float64 on a float64 base, float32 otherwise (fp16/bf16 bases
    keep fp32 adapters, PEFT's autocast_adapter_dtype; quantised / integer bases too)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def merge_dtype(weight: torch.Tensor) -> torch.dtype:
    """Merging arithmetic: at least float32, float64 for a float64 base (no rounding through fp32)."""
    return torch.promote_types(weight.dtype, torch.float32) if weight.is_floating_point() else torch.float32
