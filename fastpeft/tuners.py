"""Injection of adapter layers into a model: target matching (names, regex, "all-linear"),
LoRA/IA3 layer creation, modules_to_save, and which parameters train."""

from __future__ import annotations

import re
import warnings
from typing import Iterable

from torch import nn

from .config import (IA3_DEFAULT_FEEDFORWARD, IA3_DEFAULT_TARGETS, LORA_DEFAULT_TARGETS, IA3Config, LoraConfig,
                     PeftConfig)
from .nn import IA3Linear, LoraLinear, ModulesToSaveWrapper
from .nn._base import AdapterLayer, linear_geometry
from .nn.linear4bit import Linear4bit, is_4bit_linear
from .nn.lora4bit import LoraLinear4bit


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Linear4bit)) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def _matches(name: str, spec: str | list[str] | None) -> str | None:
    """The target entry `name` matches (PEFT rules: a string is a full regex match, a list entry
    matches the module name or its dotted suffix), or None."""
    if spec is None:
        return None
    if isinstance(spec, str):
        return spec if re.fullmatch(spec, name) else None
    for key in spec:
        if name == key or name.endswith("." + key):
            return key
    return None


def pattern_value(name: str, pattern: dict, default):
    """rank_pattern / alpha_pattern lookup with PEFT's rule: the key matches a dotted suffix (regex)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _output_layer_names(model: nn.Module) -> set[str]:
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if out is not None and module is out:
            names.add(name)
    return names or {"lm_head"}


def resolve_targets(model: nn.Module, config: PeftConfig) -> list[str]:
    """Names of the modules `config` adapts; errors name what did not match."""
    targets = config.target_modules
    if targets is None:
        table = LORA_DEFAULT_TARGETS if isinstance(config, LoraConfig) else IA3_DEFAULT_TARGETS
        targets = table.get(_model_type(model))
        if targets is None:
            raise ValueError(f"target_modules is not set and fastpeft has no default for model type "
                             f"{_model_type(model)!r}; set target_modules in the config")
    exclude_out = set()
    if targets == "all-linear":
        exclude_out = _output_layer_names(model)
    candidates = [(n, m) for n, m in model.named_modules() if n and not isinstance(m, ModulesToSaveWrapper)]
    chosen, used = [], set()
    for name, module in candidates:
        if any(name.startswith(p + ".") for p in chosen):
            continue  # inside a module already chosen (e.g. a wrapped base_layer)
        if isinstance(module, AdapterLayer):
            hit = _matches(name, targets) if targets != "all-linear" else name
        elif targets == "all-linear":
            hit = name if _is_linear(module) and name not in exclude_out else None
        else:
            hit = _matches(name, targets)
        if hit is None or _matches(name, config.exclude_modules):
            continue
        if not isinstance(module, AdapterLayer):
            linear_geometry(module, name)  # raises for an unsupported layer type, naming it
        chosen.append(name)
        used.add(hit)
    if not chosen:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in candidates if _is_linear(m)})
        raise ValueError(f"target_modules {targets!r} matched no module of {type(model).__name__}; "
                         f"its linear layers are named {linear_names}")
    if isinstance(targets, list):
        missing = [t for t in targets if t not in used]
        if missing:
            warnings.warn(f"target_modules {missing} matched no module of {type(model).__name__}", stacklevel=3)
    return chosen


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject_adapter(model: nn.Module, config: PeftConfig, adapter_name: str) -> list[str]:
    """Add adapter `adapter_name` to `model` in place; returns the adapted module names."""
    if type(config).__name__ == "BottleneckConfig":  # wraps whole sub-blocks, not linears
        from .nn.bottleneck import inject_bottleneck

        return inject_bottleneck(model, config, adapter_name)
    names = resolve_targets(model, config)
    for name in names:  # checked for all targets before any is touched
        module = model.get_submodule(name)
        if isinstance(module, AdapterLayer) and adapter_name in module.adapters():
            raise ValueError(f"module {name!r} already holds an adapter named {adapter_name!r}; adding it again "
                             "would re-initialise its trained weights")
    for name in names:
        module = model.get_submodule(name)
        if isinstance(config, LoraConfig):
            r = pattern_value(name, config.rank_pattern or {}, config.r)
            alpha = pattern_value(name, config.alpha_pattern or {}, config.lora_alpha)
            kwargs = dict(r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                          init_lora_weights=config.init_lora_weights)
            if isinstance(module, LoraLinear):
                module.update_layer(adapter_name, **kwargs)
            elif isinstance(module, AdapterLayer):
                raise ValueError(f"module {name!r} already holds a {type(module).__name__}; one method per model")
            elif is_4bit_linear(module):  # QLoRA: bitsandbytes' layers are taken over, their kernels left out
                base = module if isinstance(module, Linear4bit) else Linear4bit.from_bnb(module)
                _set_submodule(model, name, LoraLinear4bit(base, adapter_name, name=name, **kwargs))
            else:
                _set_submodule(model, name, LoraLinear(module, adapter_name, fan_in_fan_out=config.fan_in_fan_out,
                                                       name=name, **kwargs))
        elif isinstance(config, IA3Config):
            ff_spec = config.feedforward_modules
            if ff_spec is None and config.target_modules is None:
                ff_spec = IA3_DEFAULT_FEEDFORWARD.get(_model_type(model), [])
            is_ff = _matches(name, ff_spec) is not None
            if is_4bit_linear(module):
                raise NotImplementedError(f"module {name!r} is a 4-bit linear; fastpeft's IA3 adapts 16/32-bit "
                                          "linears only (use LoRA for a 4-bit base)")
            if isinstance(module, IA3Linear):
                if module.is_feedforward != is_ff:
                    raise ValueError(f"module {name!r} is adapted as feedforward={module.is_feedforward} already")
                module.update_layer(adapter_name, config.init_ia3_weights)
            elif isinstance(module, AdapterLayer):
                raise ValueError(f"module {name!r} already holds a {type(module).__name__}; one method per model")
            else:
                _set_submodule(model, name, IA3Linear(module, adapter_name, is_feedforward=is_ff,
                                                      fan_in_fan_out=config.fan_in_fan_out,
                                                      init_ia3_weights=config.init_ia3_weights, name=name))
        else:
            raise TypeError(f"{type(config).__name__} is not an injected (LoRA/IA3) config")
    return names


def wrap_modules_to_save(model: nn.Module, modules: Iterable[str] | None, adapter_name: str) -> list[str]:
    """Wrap each module whose name ends with an entry of `modules` in a ModulesToSaveWrapper."""
    wrapped = []
    if not modules:
        return wrapped
    modules = list(modules)
    for name, module in list(model.named_modules()):
        if not name or any(name.startswith(w + ".") for w in wrapped):
            continue
        if any(name == m or name.endswith("." + m) for m in modules):
            if isinstance(module, ModulesToSaveWrapper):
                if adapter_name in module.modules_to_save:
                    raise ValueError(f"module {name!r} already holds a modules_to_save copy for adapter "
                                     f"{adapter_name!r}; adding it again would overwrite its trained weights")
                module.update(adapter_name)
            elif ".modules_to_save." in name or name.endswith(".original_module"):
                continue
            else:
                _set_submodule(model, name, ModulesToSaveWrapper(module, adapter_name))
            wrapped.append(name)
    missing = [m for m in modules if not any(w == m or w.endswith("." + m) for w in wrapped)]
    if missing and not wrapped:  # as PEFT, one match suffices (SEQ_CLS adds both "classifier" and "score")
        raise ValueError(f"modules_to_save {missing} matched no module of {type(model).__name__}")
    return wrapped


def mark_trainable(model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
    """Freeze everything but the adapter (and the biases the LoRA `bias` option names)."""
    for name, p in model.named_parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            module.set_adapter(adapter_name)
            if isinstance(config, LoraConfig) and config.bias == "lora_only" and module.base_layer.bias is not None:
                module.base_layer.bias.requires_grad_(True)
        elif isinstance(module, ModulesToSaveWrapper):
            module.set_adapter(adapter_name)
    if isinstance(config, LoraConfig) and config.bias == "all":
        for name, p in model.named_parameters():
            if "bias" in name.rsplit(".", 1)[-1]:
                p.requires_grad_(True)
