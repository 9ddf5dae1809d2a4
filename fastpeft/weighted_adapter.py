"""add_weighted_adapter: a new LoRA adapter from a weighted combination of existing ones, as PEFT computes it.

For adapters i with weights w_i and scalings s_i (the new adapter has lora_alpha = r, so its own scaling is
1, or sqrt(r) with rsLoRA, exactly as PEFT sets it):
  linear: A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i,  B = sum_i sqrt|w_i s_i| B_i   (all ranks equal)
  cat:    A = [w_i s_i A_i] stacked over the rank,     B = [B_i] side by side       (rank = sum of ranks)
  svd:    delta = sum_i w_i s_i B_i A_i; B, A = U·S, Vh of its truncated SVD (rank svd_rank or the largest)
PEFT's ties / dare / magnitude_prune variants are refused with an error naming them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .config import LoraConfig, PeftType
from .nn.lora import LoraLinear

SUPPORTED = ("linear", "cat", "svd")
_PEFT_ONLY = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd", "magnitude_prune",
              "magnitude_prune_svd")


def _new_target_modules(configs: list[LoraConfig]) -> Any:
    kinds = {type(c.target_modules) for c in configs}
    if len(kinds) > 1:
        raise ValueError("add_weighted_adapter: the adapters' target_modules mix a string (regex) and a list; "
                         "PEFT refuses to combine those too")
    if kinds == {str}:
        return "|".join(f"({c.target_modules})" for c in configs)
    if kinds == {list}:
        return sorted({m for c in configs for m in c.target_modules})
    raise ValueError("add_weighted_adapter: every adapter must have target_modules (a list or a regex string)")


def add_weighted_adapter(model: Any, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None,
                         density: float | None = None, majority_sign_method: str = "total") -> None:
    """Add `adapter_name` = the `weights`-weighted combination of LoRA `adapters` (PEFT's method of the same name;
    see the module docstring for the math).  The new adapter is added frozen and not made active."""
    if model.peft_type != PeftType.LORA:
        raise ValueError(f"add_weighted_adapter combines LoRA adapters; this model holds {model.peft_type.value} ones")
    if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
        raise TypeError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    adapters = list(adapters)
    unknown = [a for a in adapters if a not in model.peft_config]
    if unknown:
        raise ValueError(f"add_weighted_adapter: unknown adapter(s) {unknown}; this model has "
                         f"{sorted(model.peft_config)}")
    if not isinstance(weights, (list, tuple)) or len(weights) != len(adapters):
        raise ValueError(f"weights must hold one number per adapter ({len(adapters)}), got {weights!r}")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights!r}")
    if adapter_name in model.peft_config:  # PEFT returns without a word here; the caller would not know
        raise ValueError(f"adapter {adapter_name!r} already exists")
    if combination_type in _PEFT_ONLY:
        raise NotImplementedError(f"combination_type={combination_type!r} is not supported by fastpeft "
                                  f"(supported: {', '.join(SUPPORTED)})")
    if combination_type not in SUPPORTED:
        raise ValueError(f"combination_type must be one of {', '.join(SUPPORTED)}, got {combination_type!r}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(f"svd_rank must be a positive integer or None, got {svd_rank!r}")
    del density, majority_sign_method  # only the ties / dare variants use them
    configs = [model.peft_config[a] for a in adapters]
    combination = "linear" if len(adapters) == 1 else combination_type
    ranks = [c.r if not c.rank_pattern else max(c.r, *c.rank_pattern.values()) for c in configs]
    if combination == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type 'linear' needs adapters of one rank, got ranks {ranks}; use 'cat' "
                             "or 'svd'")
        new_rank = ranks[0]
    elif combination == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
    config = dataclasses.replace(configs[0], r=new_rank, lora_alpha=new_rank,
                                 target_modules=_new_target_modules(configs), alpha_pattern={}, rank_pattern={})
    model.add_adapter(adapter_name, config)
    try:
        with torch.no_grad():
            for name, layer in model.get_base_model().named_modules():
                if isinstance(layer, LoraLinear) and adapter_name in layer.lora_A:
                    _combine(layer, adapters, weights, adapter_name, combination, new_rank, svd_clamp,
                             svd_full_matrices, svd_driver, name)
    except Exception:
        model.delete_adapter(adapter_name)
        raise


def _combine(layer: LoraLinear, adapters: list[str], weights: list[float], new: str, combination: str,
             new_rank: int, clamp: float | None, full_matrices: bool, driver: str | None, where: str) -> None:
    a_new, b_new = layer.lora_A[new].weight, layer.lora_B[new].weight
    a_new.data = a_new.data * 0.0
    b_new.data = b_new.data * 0.0
    present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
    if not present:  # a layer only the new adapter's target list reaches: it stays zero, as in PEFT
        return
    if combination == "cat":
        a_parts = [layer.lora_A[a].weight.data * w * layer.scaling[a] for a, w in present]
        b_parts = [layer.lora_B[a].weight.data for a, _ in present]
        cat_a, cat_b = torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)
        a_new.data[: cat_a.shape[0], :] = cat_a
        b_new.data[:, : cat_b.shape[1]] = cat_b
    elif combination == "linear":
        wa, wb = [], []
        for a, w in present:
            ws = w * layer.scaling[a]
            wa.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))  # the sign on one side only
            wb.append(math.sqrt(abs(ws)))
        dtype = layer.lora_A[present[0][0]].weight.dtype
        a_new.data = _weighted_sum([layer.lora_A[a].weight.data for a, _ in present], wa).to(dtype)
        b_new.data = _weighted_sum([layer.lora_B[a].weight.data for a, _ in present], wb).to(dtype)
    else:
        deltas = [layer.get_delta_weight(a) for a, _ in present]
        delta = _weighted_sum(deltas, [w for _, w in present])
        if layer.fan_in_fan_out:
            delta = delta.T
        u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
        u = u[:, :new_rank] @ torch.diag(s[:new_rank])
        vh = vh[:new_rank, :]
        if clamp is not None:
            dist = torch.cat([u.flatten(), vh.flatten()])
            hi = torch.quantile(dist, clamp)
            u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
        if vh.shape != a_new.shape or u.shape != b_new.shape:
            raise ValueError(f"add_weighted_adapter: layer {where!r} has rank {min(delta.shape)} at most; svd_rank "
                             f"{new_rank} does not fit (A {tuple(a_new.shape)}, B {tuple(b_new.shape)})")
        a_new.data, b_new.data = vh, u


def _weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """PEFT's task_arithmetic: sum_i w_i t_i with the weights as a float32 tensor (its dtype promotion)."""
    stacked = torch.stack(tensors, dim=0)
    w = torch.tensor(weights).to(stacked.device)
    return (stacked * w.view(-1, *([1] * (stacked.dim() - 1)))).sum(dim=0)
