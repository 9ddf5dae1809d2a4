"""AdapterHub (`adapters`) bottleneck-adapter files, both ways.

AdapterHub's `model.save_adapter(folder, name)` writes

* `adapter_config.json`: {"config": <BnConfig fields>, "hidden_size", "model_class", "model_name",
  "model_type", "name", "version"} (json, indent 2, sorted keys), and
* `pytorch_adapter.bin` (a torch-saved dict of tensors; `adapter.safetensors` with `use_safetensors=True`),
  keys `<layer path>.adapters.<name>.adapter_down.0.{weight,bias}` / `.adapter_up.{weight,bias}`, the
  layer path being `model.layers.<i>.attention_adapters` / `.output_adapters` on Llama / Mistral and
  `bert.encoder.layer.<i>.attention.output` / `.output` on BERT (RoBERTa, XLM-R: `roberta.` ...).

`load_adapterhub_adapter` reads such a folder into a fastpeft bottleneck adapter (SeqBnConfig = Pfeiffer:
`BottleneckConfig(original_ln_before=True)`; DoubleSeqBnConfig = Houlsby: `mh_adapter=True`), and
`save_adapterhub_adapter` writes one that `adapters`' `model.load_adapter(folder)` reads.  The `.bin` file
is read with `torch.load(weights_only=True)`: tensors only, never arbitrary pickled objects.  What fastpeft
cannot run (PHM / Compacter layers, parallel adapters, extra layer norms, gating, scaling, leave_out,
invertible adapters, per-layer bottleneck sizes, ...) is refused with an error naming the field.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import torch
from torch import nn

from . import io
from .config import BottleneckConfig
from .nn.bottleneck import LOCATIONS, POST_LN, BottleneckWrapper
from .ops.bottleneck import canonical_activation

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "pytorch_adapter.bin"
SAFE_WEIGHTS_NAME = "adapter.safetensors"
HEAD_CONFIG_NAME = "head_config.json"
FORMAT_VERSION = "adapters.1.3.0"  # the `adapters` release whose file layout this module writes

# model types whose AdapterHub module layout fastpeft maps: pre-LN decoders keep the adapters on the decoder
# layer (`attention_adapters` / `output_adapters`), post-LN encoders on the output blocks themselves
PRE_LN_TYPES = ("llama", "mistral")
SUPPORTED_TYPES = PRE_LN_TYPES + POST_LN
_AH_LAYER = {"mh_adapter": "attention_adapters", "output_adapter": "output_adapters"}
_PARAMS = {"adapter_down.0.weight": ("down", "weight"), "adapter_down.0.bias": ("down", "bias"),
           "adapter_up.weight": ("up", "weight"), "adapter_up.bias": ("up", "bias")}

# BnConfig's fields with its defaults (`adapters` 1.3), as written in adapter_config.json
_BN_DEFAULTS: dict[str, Any] = {
    "adapter_residual_before_ln": False, "cross_adapter": False, "dropout": 0.0, "factorized_phm_W": True,
    "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform", "init_weights": "bert",
    "init_weights_seed": None, "inv_adapter": None, "inv_adapter_reduction_factor": None, "is_parallel": False,
    "learn_phm": True, "leave_out": [], "ln_after": False, "ln_before": False, "mh_adapter": False,
    "non_linearity": "relu", "original_ln_after": True, "original_ln_before": False, "output_adapter": True,
    "phm_bias": True, "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001, "phm_layer": False,
    "phm_rank": 1, "reduction_factor": 16, "residual_before_ln": True, "scaling": 1.0, "shared_W_phm": False,
    "shared_phm_rule": True, "stochastic_depth": 0.0, "use_gating": False,
}
# fastpeft's activation -> the name `adapters` (transformers' get_activation) knows it by
_AH_ACTIVATION = {"relu": "relu", "silu": "swish", "gelu": "gelu", "gelu_tanh": "gelu_new"}


# ----------------------------------------------------------------------------- config
def read_adapterhub_config(path: str | os.PathLike) -> dict:
    """The parsed adapter_config.json of an AdapterHub adapter folder (errors name the file)."""
    file = os.path.join(os.fspath(path), CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{os.fspath(path)} is not an AdapterHub adapter folder: it has no {CONFIG_NAME}")
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{file}: not a readable JSON file ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict) or "name" not in data:
        raise ValueError(f"{file}: not an AdapterHub adapter config (expected an object with 'config' and 'name')")
    return data


def bottleneck_config_from_adapterhub(data: dict, source: str = CONFIG_NAME) -> BottleneckConfig:
    """A BottleneckConfig for AdapterHub's adapter config `data["config"]` (BnConfig: SeqBnConfig,
    DoubleSeqBnConfig, ...); every field fastpeft cannot honour is an error naming it.  The bottleneck size
    is taken from the weights by the loader (reduction_factor may be a float or a per-layer mapping)."""
    c = dict(data["config"])
    arch = c.get("architecture", "bottleneck")
    if arch not in (None, "bottleneck"):
        raise ValueError(f"{source}: AdapterHub adapter {data.get('name')!r} is a {arch!r} adapter; fastpeft reads "
                         f"AdapterHub bottleneck adapters (SeqBnConfig, DoubleSeqBnConfig, BnConfig) only")

    def refuse(field: str, why: str) -> None:
        raise ValueError(f"{source}: AdapterHub config field {field}={c.get(field)!r} is not supported by fastpeft "
                         f"({why})")

    for field, why in (("phm_layer", "PHM / Compacter layers"), ("is_parallel", "parallel adapters"),
                       ("ln_before", "an extra layer norm before the bottleneck"),
                       ("ln_after", "an extra layer norm after the bottleneck"), ("use_gating", "gated adapters"),
                       ("cross_adapter", "cross-attention adapters")):
        if c.get(field):
            refuse(field, why)
    if c.get("inv_adapter"):
        refuse("inv_adapter", "invertible adapters")
    if not c.get("original_ln_after", True):
        refuse("original_ln_after", "the block's own residual and layer norm always follow the adapter")
    if c.get("leave_out"):
        refuse("leave_out", "fastpeft places adapters in every layer")
    scaling = c.get("scaling", 1.0)
    if isinstance(scaling, str) or float(scaling) != 1.0:
        refuse("scaling", "only scaling 1.0")
    if float(c.get("stochastic_depth") or 0.0) > 0.0:
        refuse("stochastic_depth", "no stochastic depth")
    rbl = c.get("residual_before_ln", True)
    if not isinstance(rbl, bool):
        refuse("residual_before_ln", "True or False; 'post_add' is not implemented")
    act = c.get("non_linearity", "relu")
    try:
        canonical_activation(act)
    except ValueError as exc:
        raise ValueError(f"{source}: AdapterHub config field non_linearity={act!r}: {exc}") from None
    if float(c.get("dropout") or 0.0) > 0.0:
        warnings.warn(f"{source}: the adapter's dropout {c['dropout']} is not applied by fastpeft (inference is "
                      f"unaffected; training runs without adapter dropout)", stacklevel=3)
    mh, out = bool(c.get("mh_adapter", False)), bool(c.get("output_adapter", True))
    if not (mh or out):
        refuse("output_adapter", "an adapter with neither mh_adapter nor output_adapter places nothing")
    rf = c.get("reduction_factor", 16)
    init = {"bert": "bert", "mam_adapter": "identity"}.get(c.get("init_weights"), "random")
    return BottleneckConfig(reduction_factor=int(rf) if isinstance(rf, (int, float)) and rf >= 1 and
                            float(rf).is_integer() else 16,
                            non_linearity=act, mh_adapter=mh, output_adapter=out, residual_before_ln=rbl,
                            original_ln_before=bool(c.get("original_ln_before", False)), init_weights=init)


def adapterhub_config_from_bottleneck(config: BottleneckConfig, hidden: int, bottleneck: int) -> dict:
    """The `config` block of adapter_config.json for a fastpeft BottleneckConfig."""
    if config.target_modules is not None:
        raise ValueError("an adapter with custom target_modules has no AdapterHub equivalent; AdapterHub places "
                         "adapters by mh_adapter / output_adapter only")
    rf: float | int = hidden // bottleneck if hidden % bottleneck == 0 else hidden / bottleneck
    if int(hidden // rf) != bottleneck:  # adapters computes int(hidden // reduction_factor)
        raise ValueError(f"bottleneck size {bottleneck} on hidden size {hidden} has no AdapterHub reduction_factor")
    act = canonical_activation(config.non_linearity)
    c = dict(_BN_DEFAULTS)
    c.update(mh_adapter=bool(config.mh_adapter), output_adapter=bool(config.output_adapter), reduction_factor=rf,
             non_linearity=config.non_linearity.lower() if config.non_linearity.lower() in
             ("relu", "swish", "silu", "gelu", "gelu_new", "gelu_pytorch_tanh") else _AH_ACTIVATION[act],
             original_ln_before=bool(config.original_ln_before), residual_before_ln=bool(config.residual_before_ln),
             init_weights={"identity": "mam_adapter"}.get(config.init_weights, "bert"))
    return c


# ----------------------------------------------------------------------------- module paths
def _inner(model: nn.Module) -> nn.Module:
    """The transformers model inside a fastpeft PeftModel (or the model itself)."""
    from .peft_model import PeftModel

    if isinstance(model, PeftModel):
        return model.base_model.model
    return model


def _check_type(model: nn.Module, what: str) -> str:
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype not in SUPPORTED_TYPES:
        raise ValueError(f"{what}: fastpeft maps AdapterHub adapter files for model types {list(SUPPORTED_TYPES)}, "
                         f"not {mtype!r}")
    return mtype


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else key


def _wrapper_paths(inner: nn.Module, adapter_name: str) -> dict[str, BottleneckWrapper]:
    """AdapterHub layer path (without the model's base_model_prefix) -> the wrapper holding `adapter_name`."""
    mtype = _check_type(inner, "AdapterHub files")
    prefix = getattr(inner, "base_model_prefix", "") or ""
    out = {}
    for name, module in inner.named_modules():
        if not isinstance(module, BottleneckWrapper) or adapter_name not in module.adapters():
            continue
        if module.location not in LOCATIONS:
            raise ValueError(f"{name!r}: a bottleneck adapter outside the attention / feed-forward placement has no "
                             f"AdapterHub equivalent")
        if mtype in PRE_LN_TYPES:
            path = name.rpartition(".")[0] + "." + _AH_LAYER[module.location]
        else:
            path = name
        out[_strip(path, prefix)] = module
    return out


# ----------------------------------------------------------------------------- weights
def _read_weights(path: str) -> tuple[dict[str, torch.Tensor], str]:
    safe = os.path.join(path, SAFE_WEIGHTS_NAME)
    binary = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(safe):
        from safetensors.torch import load_file

        return load_file(safe, device="cpu"), safe
    if os.path.isfile(binary):
        try:  # tensors only: weights_only refuses any other pickled object
            state = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{binary}: not a readable tensor file ({type(exc).__name__}: {exc})") from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{binary}: expected a dict of tensors")
        return state, binary
    raise FileNotFoundError(f"{path}: no AdapterHub weights file ({WEIGHTS_NAME} or {SAFE_WEIGHTS_NAME})")


def _file_weights(state: dict[str, torch.Tensor], ah_name: str, prefix: str, source: str):
    """{(layer path, param): tensor} from AdapterHub's keys; anything else in the file is an error."""
    out, marker = {}, f".adapters.{ah_name}."
    for key, value in state.items():
        path, sep, param = key.partition(marker)
        if not sep or param not in _PARAMS:
            raise ValueError(f"{source}: tensor {key!r} is not a bottleneck adapter tensor of {ah_name!r} that "
                             f"fastpeft can load (expected <layer>.adapters.{ah_name}.{{{', '.join(_PARAMS)}}})")
        out[(_strip(path, prefix), param)] = value
    return out


def load_adapterhub_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                            is_trainable: bool = False, task_type: str | None = None):
    """Load the AdapterHub adapter saved in the folder `path` (by `adapters`' `model.save_adapter`) as the
    fastpeft bottleneck adapter `adapter_name`.  `model` is a transformers model (a PeftModel is returned,
    as `PeftModel.from_pretrained`) or a fastpeft PeftModel with bottleneck adapters (the adapter is added;
    the model is returned).  Supported: Llama / Mistral and BERT / RoBERTa / XLM-R models, SeqBnConfig
    (Pfeiffer), DoubleSeqBnConfig (Houlsby) and BnConfig variants that only change the placement,
    residual_before_ln, reduction factor or (relu / swish / gelu / gelu_new) non-linearity."""
    from .peft_model import MODEL_TYPE_TO_PEFT_MODEL, PeftModel, _task, check_adapter_name

    path = os.fspath(path)
    data = read_adapterhub_config(path)
    source = os.path.join(path, CONFIG_NAME)
    config = bottleneck_config_from_adapterhub(data, source)
    config.task_type = task_type
    config.inference_mode = not is_trainable
    inner = _inner(model)
    mtype = _check_type(inner, source)
    hidden = getattr(inner.config, "hidden_size", None)
    if data.get("hidden_size") not in (None, hidden):
        raise ValueError(f"{source}: the adapter was saved for hidden size {data['hidden_size']}, the model has "
                         f"{hidden}")
    if data.get("model_type") not in (None, mtype):
        warnings.warn(f"{source}: the adapter was saved for a {data['model_type']!r} model; loading it into a "
                      f"{mtype!r} one", stacklevel=2)
    if os.path.isfile(os.path.join(path, HEAD_CONFIG_NAME)):
        warnings.warn(f"{path}: the adapter's prediction head ({HEAD_CONFIG_NAME}) is not loaded; the model's own "
                      f"head is used", stacklevel=2)
    state, wsource = _read_weights(path)
    prefix = getattr(inner, "base_model_prefix", "") or ""
    tensors = _file_weights(state, data["name"], prefix, wsource)
    sizes = {v.shape[0] for (p, param), v in tensors.items() if param == "adapter_down.0.weight"}
    if len(sizes) != 1:
        raise ValueError(f"{wsource}: " + ("no adapter_down weights" if not sizes else
                                           f"per-layer bottleneck sizes {sorted(sizes)} are not supported"))
    config.bottleneck_size = sizes.pop()

    check_adapter_name(adapter_name)
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        peft_model, fresh = model, False
    else:
        peft_model = MODEL_TYPE_TO_PEFT_MODEL.get(_task(config), PeftModel)(model, config, adapter_name)
        fresh = True
    try:
        _copy_in(peft_model, adapter_name, data["name"], tensors, wsource)
    except Exception:
        if fresh:
            peft_model._drop_adapter_parts(adapter_name)  # give `model` back as it came
        else:
            peft_model.delete_adapter(adapter_name)  # the model held another adapter before
        raise
    return peft_model


def _copy_in(peft_model, adapter_name: str, ah_name: str, tensors: dict, source: str) -> None:
    wrappers = _wrapper_paths(peft_model.base_model.model, adapter_name)
    expected = {(path, param) for path in wrappers for param in _PARAMS}
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. "
                         f"{[f'{p}.adapters.{ah_name}.{q}' for p, q in missing[:3]]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. "
                         f"{[f'{p}.adapters.{ah_name}.{q}' for p, q in unexpected[:3]]}")
        raise ValueError(f"{source} does not fit this model: " + "; ".join(parts))
    with torch.no_grad():
        for (path, param), value in tensors.items():
            lin, attr = _PARAMS[param]
            target = getattr(getattr(wrappers[path].bottleneck_adapters[adapter_name], lin), attr)
            if target.shape != value.shape:
                raise ValueError(f"{source}: tensor {path}.adapters.{ah_name}.{param} has shape "
                                 f"{tuple(value.shape)}, the model expects {tuple(target.shape)}")
            target.copy_(value.to(target.dtype))


def save_adapterhub_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None,
                            adapterhub_name: str | None = None, use_safetensors: bool = False) -> None:
    """Write the fastpeft bottleneck adapter `adapter_name` (default: the active one) of the PeftModel
    `model` into the folder `path` as AdapterHub does (`adapter_config.json` + `pytorch_adapter.bin`, or
    `adapter.safetensors` with use_safetensors=True), under the AdapterHub name `adapterhub_name`
    (default: `adapter_name`); `adapters`' `model.load_adapter(path)` reads it."""
    from .peft_model import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"save_adapterhub_adapter takes a fastpeft PeftModel, got {type(model).__name__}")
    adapter_name = adapter_name or model.active_adapter
    if adapter_name not in model.peft_config:
        raise ValueError(f"unknown adapter {adapter_name!r}; this model has {sorted(model.peft_config)}")
    config = model.peft_config[adapter_name]
    if not isinstance(config, BottleneckConfig):
        raise ValueError(f"adapter {adapter_name!r} is a {type(config).__name__} adapter; AdapterHub files hold "
                         f"bottleneck adapters (BottleneckConfig)")
    ah_name = adapterhub_name or adapter_name
    if not ah_name or "." in ah_name or "/" in ah_name:
        raise ValueError(f"AdapterHub adapter name {ah_name!r} may not be empty or contain '.' or '/'")
    inner = model.base_model.model
    mtype = _check_type(inner, "save_adapterhub_adapter")
    wrappers = _wrapper_paths(inner, adapter_name)
    n_layers = getattr(inner.config, "num_hidden_layers", None)
    per_loc = {loc: sum(w.location == loc for w in wrappers.values()) for loc in LOCATIONS}
    for loc, on in zip(LOCATIONS, (config.mh_adapter, config.output_adapter)):
        if on and n_layers is not None and per_loc[loc] != n_layers:
            raise ValueError(f"adapter {adapter_name!r} has {per_loc[loc]} {loc} adapters for {n_layers} layers; "
                             f"AdapterHub files describe one per layer")
    prefix = getattr(inner, "base_model_prefix", "") or ""
    # keys as `adapters` writes them: from the model's top (a head model holds the base model under prefix)
    keep_prefix = bool(prefix) and isinstance(getattr(inner, prefix, None), nn.Module)
    tensors: dict[str, torch.Tensor] = {}
    bottleneck = None
    for path_, wrapper in wrappers.items():
        adapter = wrapper.bottleneck_adapters[adapter_name]
        bottleneck = adapter.down.out_features
        full = f"{prefix}.{path_}" if keep_prefix else path_
        for param, (lin, attr) in _PARAMS.items():
            tensors[f"{full}.adapters.{ah_name}.{param}"] = \
                getattr(getattr(adapter, lin), attr).detach().to("cpu").clone().contiguous()
    hidden = int(inner.config.hidden_size)
    data = {"config": adapterhub_config_from_bottleneck(config, hidden, bottleneck), "hidden_size": hidden,
            "model_class": type(inner).__name__, "model_name": getattr(inner.config, "_name_or_path", "") or "",
            "model_type": mtype, "name": ah_name, "version": FORMAT_VERSION}
    text = json.dumps(data, indent=2, sort_keys=True)
    if use_safetensors:
        files = {SAFE_WEIGHTS_NAME: io.tensors_writer(tensors)}
    else:
        files = {WEIGHTS_NAME: lambda p: torch.save(tensors, p)}
    files[CONFIG_NAME] = io.text_writer(text)
    io.write_file_set(os.fspath(path), files)


__all__ = ["load_adapterhub_adapter", "save_adapterhub_adapter", "read_adapterhub_config",
           "bottleneck_config_from_adapterhub", "adapterhub_config_from_bottleneck"]
