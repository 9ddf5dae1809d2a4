"""PeftModel: the user-facing wrapper with HF PEFT's API (get_peft_model, save_pretrained,
from_pretrained, merge_and_unload, unload, disable_adapter, set_adapter, ...).

LoRA and IA3 are injected into the model (`base_model` is a tuner holding `.model`, as in PEFT,
so parameter names and adapter-file keys are PEFT's).  Prefix tuning, prompt tuning and P-tuning
keep the model as `base_model` and add `prompt_encoder`; their forward and generate live in
`fastpeft.prompt_learning`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
from torch import nn

from . import hub, io
from .config import CONFIG_NAME, LoraConfig, PeftConfig, PeftType, PrefixTuningConfig, TaskType
from .nn import ModulesToSaveWrapper
from .nn._base import AdapterLayer, rows_names as _rows_names
from .nn.lora import LoraLinear
from .tuners import inject_adapter, mark_trainable, wrap_modules_to_save

_ADAPTER_CONTAINERS = ("lora_A", "lora_B", "ia3_l", "bottleneck_adapters")
_SEQ_CLS_HEADS = ["classifier", "score"]


_BASE = "__base__"  # in adapter_names: this row runs the base model
_RESERVED_NAMES = (_BASE, CONFIG_NAME, io.WEIGHTS_NAME, io.LEGACY_WEIGHTS_NAME, io.PENDING_NAME)


def check_adapter_name(name: Any) -> None:
    """An adapter name is also a sub-folder name in save_pretrained and a key of the layers' ModuleDicts:
    a non-empty string without path separators, dots, NUL or other control characters."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"an adapter name must be a non-empty string, got {name!r}")
    bad = sorted({c for c in name if c in "/\\." or ord(c) < 32 or c in (os.sep, os.altsep or "/")})
    if bad or os.path.isabs(name) or os.path.splitdrive(name)[0]:
        raise ValueError(f"adapter name {name!r} cannot be used: it names the adapter's folder inside the save "
                         f"directory (and a module key), so it may not contain {bad or 'a drive or root'}")
    if name in _RESERVED_NAMES:
        raise ValueError(f"adapter name {name!r} is reserved")


class TunerModel(nn.Module):
    """Holds the adapted model as `.model` (PEFT's LoraModel / IA3Model role)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)  # as PEFT's tuner (LoraModel) does

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        batch = _batch_rows(args, kwargs)
        with _batch_adapters(self.model, adapter_names, batch, expand=False):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        batch = _batch_rows(args, kwargs)
        with _batch_adapters(self.model, adapter_names, batch, expand=True):
            return self.model.generate(*args, **kwargs)


def _batch_rows(args: tuple, kwargs: dict) -> int | None:
    for x in (kwargs.get("input_ids"), args[0] if args else None, kwargs.get("inputs_embeds")):
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            return x.shape[0]
    return None


def check_adapter_names(model: nn.Module, adapter_names: Any, batch: int | None) -> list[str]:
    """PEFT's checks on a mixed-adapter batch, made before anything runs: a list of adapter names (or
    "__base__"), one per batch row, each held by some LoRA layer of `model`."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(f"adapter_names must be a list of adapter names, one per batch row, got "
                        f"{type(adapter_names).__name__}")
    names = list(adapter_names)
    if not names:
        raise ValueError("adapter_names is empty: pass one adapter name per batch row "
                         "(\"__base__\" for the base model)")
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"adapter_names must hold strings, got {[type(n).__name__ for n in names]}")
    if batch is not None and len(names) != batch:
        raise ValueError(f"adapter_names has {len(names)} entries but the batch has {batch} rows; pass one adapter "
                         f"name per row (it is not repeated over the rows)")
    held: set[str] = set()
    for module in model.modules():
        if isinstance(module, LoraLinear) or type(module).__name__ == "BottleneckWrapper":
            held.update(module.adapters())
        elif isinstance(module, AdapterLayer):
            raise ValueError(f"adapter_names (mixed-adapter batches) is supported for LoRA only, not for "
                             f"{type(module).__name__} layers")
    unknown = sorted({n for n in names if n != _BASE} - held)
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown} in adapter_names; this model has {sorted(held)}")
    return names


@contextlib.contextmanager
def _batch_adapters(model: nn.Module, adapter_names: list[str] | None, batch: int | None,
                    expand: bool) -> Iterator[None]:
    """Route each batch row through its own LoRA adapter (PEFT's `adapter_names` forward argument).  As in
    PEFT, a row whose adapter does not adapt a layer gets that layer's base output; modules_to_save copies
    are chosen per row too.  `expand`: generate() may repeat each row (num_beams, num_return_sequences)."""
    if adapter_names is None:
        yield
        return
    names = check_adapter_names(model, adapter_names, batch)
    handles, routed = [], []
    for module in model.modules():
        if isinstance(module, LoraLinear):
            # the layer reads its rows' adapters from this attribute (no hook: torch.compile traces it)
            present = set(module.adapters())
            module._row_names = ([n if n in present else _BASE for n in names], expand)
            routed.append(module)
        elif type(module).__name__ == "BottleneckWrapper":  # fastpeft.nn.bottleneck: rows routed in the layer
            handles.append(module.route_rows(names, expand))
        elif isinstance(module, ModulesToSaveWrapper):
            def mts_hook(mod, args, kwargs, output):
                return _modules_to_save_rows(mod, args, kwargs, output, _rows_names(names, args[0].shape[0], expand))
            handles.append(module.register_forward_hook(mts_hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for module in routed:
            module._row_names = None


def _modules_to_save_rows(module: ModulesToSaveWrapper, args: tuple, kwargs: dict, output: Any,
                          names: list[str]) -> Any:
    """Recompute a modules_to_save wrapper's output row by row with each row's own copy (PEFT's mixed batch)."""
    if module.disable_adapters or not args or not isinstance(output, torch.Tensor):
        return None
    x = args[0]
    if x.shape[0] != len(names):
        raise ValueError(f"adapter_names has {len(names)} entries but the batch has {x.shape[0]} rows")
    choice = [n if n in module.modules_to_save else _BASE for n in names]
    if all(n == module.active_adapter for n in choice):
        return None
    out = None
    for name in dict.fromkeys(choice):
        rows = torch.tensor([i for i, n in enumerate(choice) if n == name], device=x.device)
        sub = module.original_module if name == _BASE else module.modules_to_save[name]
        ys = sub(x.index_select(0, rows), *args[1:], **kwargs)
        out = ys.new_empty((x.shape[0], *ys.shape[1:])) if out is None else out
        out = out.index_copy(0, rows, ys)
    return out


def _fastpeft_parts(model: nn.Module) -> list[str]:
    """Names of the fastpeft adapter modules `model` already holds (a model some PeftModel wraps)."""
    parts = [n for n, m in model.named_modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))]
    if "_fastpeft_previous_attn" in model.__dict__:
        parts.append("(prefix-tuning attention)")
    return parts


class PeftModel(nn.Module):
    """A model with one or more named adapters of one PEFT method."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"peft_config must be a fastpeft config (LoraConfig, IA3Config, ...), "
                            f"got {type(peft_config).__name__}")
        if isinstance(model, PeftModel):
            raise ValueError("model is already a PeftModel; add another adapter with add_adapter / load_adapter")
        held = _fastpeft_parts(model)
        if held:
            # PEFT only warns here ("modify a model with PEFT for a second time") and re-initialises same-named
            # adapters: the trained weights are lost.  fastpeft refuses before touching the model.
            raise ValueError(f"{type(model).__name__} already carries fastpeft adapters ({len(held)} module(s), e.g. "
                             f"{held[0]!r}): wrapping it again would re-initialise them.  Use add_adapter / "
                             f"load_adapter on the PeftModel that holds it, or its unload() / merge_and_unload() first")
        check_adapter_name(adapter_name)
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter = adapter_name
        self.peft_type = peft_config.peft_type
        self._adapters_disabled = False
        if peft_config.is_prompt_learning:
            self.base_model = model
            self.prompt_encoder = nn.ModuleDict()
        else:
            self.base_model = TunerModel(model)
        self.add_adapter(adapter_name, peft_config)  # on failure it gives `model` back as it came
        if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
            self.config = model.config
        from .integrations import hf_trainer

        self.__class__ = hf_trainer.peft_compatible_class(type(self))  # transformers / TRL see a peft.PeftModel

    # ------------------------------------------------------------------ PEFT's properties
    # Properties, not plain attributes: when `peft` is installed the model's class also derives from
    # peft.PeftModel (see fastpeft.integrations.hf_trainer), whose properties of these names would win.
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        try:
            return self.__dict__["_peft_config"]
        except KeyError:
            raise AttributeError("peft_config") from None

    @peft_config.setter
    def peft_config(self, value: dict[str, PeftConfig]) -> None:
        self.__dict__["_peft_config"] = value

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    @property
    def has_active_enabled_adapter(self) -> bool:
        return not self._adapters_disabled

    @property
    def modules_to_save(self) -> set[str] | None:
        names = {m for c in self.peft_config.values() for m in (c.modules_to_save or [])}
        return names or None

    @property
    def base_model_torch_dtype(self) -> torch.dtype | None:
        return getattr(self.get_base_model(), "dtype", None)

    # ------------------------------------------------------------------ adapters
    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    @property
    def is_prompt_learning(self) -> bool:
        return self.peft_type in (PeftType.PREFIX_TUNING, PeftType.PROMPT_TUNING, PeftType.P_TUNING)

    def get_base_model(self) -> nn.Module:
        return self.base_model if self.is_prompt_learning else self.base_model.model

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Add a new adapter of the same method; it becomes trainable only after `set_adapter`."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"peft_config must be a fastpeft config, got {type(peft_config).__name__}")
        if peft_config.peft_type != self.peft_type:
            raise ValueError(f"this model holds {self.peft_type.value} adapters; cannot add a "
                             f"{peft_config.peft_type.value} adapter (one method per model)")
        if peft_config.is_prompt_learning:
            _check_prompt_geometry(self.base_model, peft_config)
        config = _with_task_defaults(peft_config)
        self.peft_config[adapter_name] = config
        try:
            if self.is_prompt_learning:
                from . import prompt_learning

                prompt_learning.setup_adapter(self, adapter_name, config)
                model = self.base_model
            else:
                model = self.base_model.model
                inject_adapter(model, config, adapter_name)
            wrap_modules_to_save(model, config.modules_to_save, adapter_name)
        except Exception:
            del self.peft_config[adapter_name]
            self._drop_adapter_parts(adapter_name)
            raise
        # re-apply the active adapter: this freezes the new one (its layers were created trainable)
        self.set_adapter(self.active_adapter if self.active_adapter in self.peft_config else adapter_name)
        if config.inference_mode:
            for p in self.parameters():
                p.requires_grad_(False)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the active (and only trainable) adapter."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; this model has {sorted(self.peft_config)}")
        self.active_adapter = adapter_name
        config = self.peft_config[adapter_name]
        if self.is_prompt_learning:
            for p in self.base_model.parameters():
                p.requires_grad_(False)
            for name, enc in self.prompt_encoder.items():
                enc.requires_grad_(name == adapter_name and not config.inference_mode)
            for module in self.base_model.modules():
                if isinstance(module, ModulesToSaveWrapper):
                    module.set_adapter(adapter_name)
        else:
            mark_trainable(self.base_model.model, config, adapter_name)
            if config.inference_mode:
                for p in self.parameters():
                    p.requires_grad_(False)

    def _drop_adapter_parts(self, adapter_name: str) -> None:
        """Remove whatever a failed add_adapter had already built for `adapter_name`; a layer or wrapper
        left with no adapter is replaced by the module it wrapped."""
        model = self.get_base_model()
        if self.is_prompt_learning and adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]
        for name, module in list(model.named_modules()):
            if isinstance(module, AdapterLayer) and adapter_name in module.adapters():
                module.delete_adapter(adapter_name)
                if not module.adapters():
                    module.unmerge()
                    _replace(model, name, module.base_layer)
            elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                del module.modules_to_save[adapter_name]
                if not len(module.modules_to_save):
                    _replace(model, name, module.original_module)
        if self.is_prompt_learning and not len(self.prompt_encoder):
            from .integrations import transformers_attention

            transformers_attention.uninstall(model)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}")
        if len(self.peft_config) == 1:
            raise ValueError("cannot delete the only adapter; use unload() to get the base model back")
        del self.peft_config[adapter_name]
        if self.is_prompt_learning:
            del self.prompt_encoder[adapter_name]
        else:
            for module in self.base_model.model.modules():
                if isinstance(module, AdapterLayer):
                    module.delete_adapter(adapter_name)
        for module in self.modules():
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                del module.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.set_adapter(next(iter(self.peft_config)))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model with every adapter switched off inside the block."""
        layers = [m for m in self.modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))]
        previous = [m.disable_adapters for m in layers]
        was = self._adapters_disabled
        try:
            for m in layers:
                m.disable_adapters = True
            self._adapters_disabled = True
            yield
        finally:
            for m, flag in zip(layers, previous):
                m.disable_adapters = flag
            self._adapters_disabled = was

    # ------------------------------------------------------------------ forward
    def _no_adapter_names(self, kwargs: dict) -> None:
        # PEFT drops adapter_names silently on a prompt-learning model (every row gets the active adapter)
        if kwargs.get("adapter_names") is not None:
            raise ValueError(f"adapter_names (per-row LoRA adapters) does not apply to {self.peft_type.value} "
                             "adapters; for a mixed-task batch pass prompt_index (one index per row into `adapters`)")

    def forward(self, *args, **kwargs):
        if self.is_prompt_learning:
            from . import prompt_learning

            self._no_adapter_names(kwargs)

            if self._adapters_disabled:
                kwargs.pop("prompt_index", None)
                kwargs.pop("prompt_positions", None)  # the base model alone: no virtual tokens to place
                return self.base_model(*args, **kwargs)
            return prompt_learning.forward(self, *args, **kwargs)
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        if self.is_prompt_learning:
            from . import prompt_learning

            self._no_adapter_names(kwargs)

            if self._adapters_disabled:
                kwargs.pop("prompt_index", None)
                kwargs.pop("prompt_positions", None)  # the base model alone: no virtual tokens to place
                return self.base_model.generate(*args, **kwargs)
            return prompt_learning.generate(self, *args, **kwargs)
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "prompt_encoder"):
                raise
            return getattr(self.get_base_model(), name)

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            n = p.numel()
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def nearest_tokens(self, k: int = 5, tokenizer: Any = None, adapter_name: str | None = None):
        """Per virtual token, its k nearest vocabulary tokens by cosine similarity, as (token, similarity)
        (decoded with `tokenizer` when given, ids otherwise); prompt tuning and P-tuning
        (fastpeft.prompt_learning.interpret)."""
        if not self.is_prompt_learning:
            raise ValueError(f"nearest_tokens reads soft prompts; this model holds {self.peft_type.value} adapters")
        from .prompt_learning.interpret import nearest_tokens

        return nearest_tokens(self, k=k, tokenizer=tokenizer, adapter_name=adapter_name)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ merging
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", **kwargs: Any) -> None:
        """A new LoRA adapter combining `adapters` (linear, cat or svd; PEFT's method and numbers,
        see fastpeft.weighted_adapter)."""
        from .weighted_adapter import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, **kwargs)

    def _adapter_layers(self) -> list[AdapterLayer]:
        if self.is_prompt_learning:
            raise ValueError(f"{self.peft_type.value} adapters have no weights to merge")
        return [m for m in self.base_model.model.modules() if isinstance(m, AdapterLayer)]

    def _merge_names(self, adapter_names: list[str] | None) -> list[str]:
        if adapter_names is None:
            return [self.active_adapter]
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"adapter_names must be a list of adapter names, got {type(adapter_names).__name__}")
        unknown = [n for n in adapter_names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown} in adapter_names; this model has "
                             f"{sorted(self.peft_config)}")
        return list(adapter_names)  # [] merges nothing, as in PEFT

    def _merge(self, adapter_names: list[str] | None, safe_merge: bool) -> None:
        """Merge into every adapter layer, or (safe_merge) into none when any layer would turn non-finite."""
        names = self._merge_names(adapter_names)
        layers = [(n, m) for n, m in self.base_model.model.named_modules() if isinstance(m, AdapterLayer)]
        if not names:
            return
        if safe_merge:
            bad = [n for n, m in layers if not _merge_stays_finite(m, names)]
            if bad:
                raise ValueError(f"safe_merge: merging adapter(s) {names} gives non-finite weights in {len(bad)} "
                                 f"layer(s): {bad[:3]}{' ...' if len(bad) > 3 else ''}; no layer was merged")
        for _, layer in layers:
            layer.merge(names)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._adapter_layers()
        self._merge(adapter_names, safe_merge)

    def unmerge_adapter(self) -> None:
        for layer in self._adapter_layers():
            layer.unmerge()

    def _unwrap(self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        self._adapter_layers()
        if merge:
            self._merge(adapter_names, safe_merge)  # all checks first: a refused merge leaves the model as it was
        model = self.base_model.model
        for name, module in list(model.named_modules()):
            if isinstance(module, AdapterLayer):
                if not merge:
                    module.unmerge()
                _replace(model, name, module.base_layer)
            elif isinstance(module, ModulesToSaveWrapper):
                _replace(model, name, module._current() if merge else module.original_module)
        return model

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Fold the active adapter into the base weights and return the plain model."""
        return self._unwrap(True, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter (unmerging first) and return the plain model."""
        if self.is_prompt_learning:
            from .integrations import transformers_attention

            transformers_attention.uninstall(self.base_model)
            return self.base_model
        return self._unwrap(False)

    # ------------------------------------------------------------------ saving / loading
    def adapter_state_dict(self, adapter_name: str | None = None,
                           state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's file keys (adapter name removed); read from `state_dict`
        (this model's full state dict, e.g. gathered by accelerate/FSDP) when given."""
        adapter_name = adapter_name or self.active_adapter
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; this model has {sorted(self.peft_config)}")
        config = self.peft_config[adapter_name]
        out: dict[str, torch.Tensor] = {}
        if self.is_prompt_learning:
            from . import prompt_learning

            out.update(prompt_learning.state_dict_to_save(self, adapter_name))
        state = self.state_dict() if state_dict is None else state_dict
        for live, saved in self._adapter_key_map(adapter_name, state).items():
            out[saved] = state[live] if live not in out else out[live]
        if isinstance(config, LoraConfig) and config.bias != "none":
            lora_parents = {k.split(".lora_A.", 1)[0] for k in state if ".lora_A." in k}
            for key, value in state.items():
                if key.endswith(".bias") and ".lora_" not in key and ".modules_to_save." not in key:
                    parent = key.rsplit(".", 2)[0] if key.endswith("base_layer.bias") else None
                    if config.bias == "all" or parent in lora_parents:
                        out[key] = value
        return out

    def _adapter_key_map(self, adapter_name: str, state: dict[str, torch.Tensor] | None = None) -> dict[str, str]:
        """live state-dict key -> adapter-file key, for the adapter's own tensors."""
        mapping = {}
        for key in (self.state_dict() if state is None else state):
            parts = key.split(".")
            for i in range(len(parts) - 1):
                if parts[i] in _ADAPTER_CONTAINERS and parts[i + 1] == adapter_name:
                    mapping[key] = ".".join(parts[: i + 1] + parts[i + 2:])
                    break
                if parts[i] == "modules_to_save" and parts[i + 1] == adapter_name:
                    mapping[key] = ".".join(parts[:i] + parts[i + 2:])
                    break
        return mapping

    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
                        is_main_process: bool = True, push_to_hub: bool = False,
                        state_dict: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> None:
        """Write each adapter as PEFT does: adapter_config.json + adapter_model.safetensors
        (the "default" adapter at the top, others in sub-folders named after them).  transformers'
        Trainer calls this with `is_main_process` (other ranks write nothing) and maybe a gathered
        `state_dict`; `push_to_hub=True` also uploads the folder (with a model card) to the repo named
        `repo_id` (default: the folder's name), as PEFT.  A README.md model card is written (or updated) beside
        them, as PEFT does."""
        if not is_main_process:
            return
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory} is a file, not a folder")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(self.peft_config)}")
        if not names:
            raise ValueError(f"selected_adapters is empty: nothing to save (this model has {sorted(self.peft_config)})")
        for name in names:
            check_adapter_name(name)
        for name in names:
            config = self.peft_config[name]
            if config.base_model_name_or_path is None:
                config.base_model_name_or_path = getattr(getattr(self.get_base_model(), "config", None),
                                                         "_name_or_path", None) or None
        card = {hub.MODEL_CARD_NAME: io.text_writer(self._model_card(save_directory))}  # PEFT writes one on every save
        for name in names:
            directory = save_directory if name == "default" else os.path.join(save_directory, name)
            config = self.peft_config[name]
            inference_mode = config.inference_mode
            config.inference_mode = True
            try:
                text = config.to_json_string()
            finally:
                config.inference_mode = inference_mode
            # the pair is replaced as a set: a kill at any point leaves the old adapter or the new one
            tensors = self.adapter_state_dict(name, state_dict)
            files = {io.WEIGHTS_NAME: io.tensors_writer(tensors), CONFIG_NAME: io.text_writer(text)}
            if directory == save_directory:  # the model card goes in with the top-level adapter's set
                files.update(card)
                card = {}
            io.write_file_set(directory, files)
        if card:  # only named adapters (in sub-folders) were saved: the card is a set of its own
            io.write_file_set(save_directory, card)
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", None) or os.path.basename(os.path.abspath(save_directory))
            hub_args = {k: kwargs[k] for k in ("commit_message", "private", "token", "revision", "create_pr")
                        if k in kwargs}
            self.push_to_hub(repo_id, selected_adapters=names, **hub_args)

    def create_or_update_model_card(self, output_dir: str | os.PathLike) -> None:
        """Write (or update, keeping its text) README.md in `output_dir` as PEFT does: library_name "peft",
        the base model, the method's tags (transformers' Trainer calls this when it writes a card)."""
        io.atomic_write_text(os.path.join(os.fspath(output_dir), hub.MODEL_CARD_NAME), self._model_card(output_dir))

    def _model_card(self, output_dir: str | os.PathLike) -> str:
        """The text of README.md for `output_dir`: the card there updated (its text kept), or a new one."""
        path = os.path.join(os.fspath(output_dir), hub.MODEL_CARD_NAME)
        existing = None
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                existing = fh.read()
        return hub.model_card_text(self, existing)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: bool | str | None = None, revision: str | None = None, create_pr: bool = False,
                    selected_adapters: list[str] | None = None, commit_description: str | None = None,
                    **_: Any) -> Any:
        """Upload the adapter folder (save_pretrained's files plus a model card, README.md) to the Hub
        repo `repo_id` in one commit, through huggingface_hub's HfApi; returns its CommitInfo."""

        return hub.push_to_hub(self, repo_id, commit_message=commit_message, private=private, token=token,
                               revision=revision, create_pr=create_pr, selected_adapters=selected_adapters,
                               commit_description=commit_description)

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False,
                     config: PeftConfig | None = None, **kwargs: Any) -> None:
        """Load the adapter saved in `model_id` (a folder or a Hub repo id; `revision`, `subfolder`,
        `token`, `cache_dir`, `local_files_only`) under the name `adapter_name`.  With is_trainable=True an
        adapter of that name that already exists gets the file's weights (PEFT's behaviour, which
        transformers' Trainer relies on to resume from a checkpoint); otherwise an existing name is refused,
        so that a load never silently replaces trained weights."""

        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config and not is_trainable:
            raise ValueError(f"adapter {adapter_name!r} already exists; load under another name or delete it first "
                             "(is_trainable=True loads the file's weights into it, as a resumed training run does)")
        model_id = hub.resolve_adapter(model_id, **hub.hub_kwargs(kwargs))
        if adapter_name in self.peft_config:
            self._reload_adapter(model_id, adapter_name, config)
            return
        config = config or PeftConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        tensors = io.load_tensors(model_id, device="cpu")
        self.add_adapter(adapter_name, config)
        try:
            self._load_tensors(adapter_name, tensors, io.adapter_file(model_id, io.WEIGHTS_NAME))
        except Exception:
            if len(self.peft_config) > 1:
                self.delete_adapter(adapter_name)
            raise

    def _reload_adapter(self, model_id: str, adapter_name: str, config: PeftConfig | None) -> None:
        """Copy the weights saved in `model_id` into the existing adapter `adapter_name` (same method and
        shapes, checked before anything is copied)."""
        saved = config or PeftConfig.from_pretrained(model_id)
        if saved.peft_type != self.peft_type:
            raise ValueError(f"{model_id} holds a {saved.peft_type.value} adapter; adapter {adapter_name!r} of this "
                             f"model is {self.peft_type.value}")
        self._load_tensors(adapter_name, io.load_tensors(model_id, device="cpu"),
                           io.adapter_file(model_id, io.WEIGHTS_NAME))

    def _load_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
        tensors = dict(tensors)
        if self.is_prompt_learning:
            from . import prompt_learning

            prompt_learning.load_state(self, adapter_name, tensors, source)
        config = self.peft_config[adapter_name]
        state = self.state_dict()
        expected = {saved: live for live, saved in self._adapter_key_map(adapter_name, state).items()}
        if isinstance(config, LoraConfig) and config.bias != "none":
            for key in list(tensors):
                if key.endswith(".bias") and key in state:
                    expected[key] = key
        missing = sorted(k for k in expected if k not in tensors)
        unexpected = sorted(k for k in tensors if k not in expected)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} key(s), e.g. {missing[:3]}")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} key(s), e.g. {unexpected[:3]}")
            raise ValueError(f"{source} does not fit this model: " + "; ".join(parts))
        with torch.no_grad():
            for saved, live in expected.items():
                target, value = state[live], tensors[saved]
                if target.shape != value.shape:
                    raise ValueError(f"{source}: tensor {saved!r} has shape {tuple(value.shape)} but the model "
                                     f"expects {tuple(target.shape)} (was it saved for another base model or rank?)")
                target.copy_(value.to(target.dtype))

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None, **kwargs: Any) -> "PeftModel":
        """Wrap `model` with the adapter saved in `model_id`: a PEFT or fastpeft adapter folder, or a Hub
        repo id (keywords `revision`, `subfolder`, `token`, `cache_dir`, `local_files_only`; the local
        cache serves, HF_HUB_OFFLINE=1 is honoured)."""

        if isinstance(model, PeftModel):
            raise ValueError("model is already a PeftModel: load another adapter into it with "
                             "model.load_adapter(model_id, adapter_name=...) (its adapters are left untouched)")
        check_adapter_name(adapter_name)
        model_id = hub.resolve_adapter(model_id, **hub.hub_kwargs(kwargs))
        config = config or PeftConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        tensors = io.load_tensors(model_id, device="cpu")
        peft_cls = MODEL_TYPE_TO_PEFT_MODEL.get(_task(config), PeftModel)
        peft_model = peft_cls(model, config, adapter_name)
        try:
            peft_model._load_tensors(adapter_name, tensors, io.adapter_file(model_id, io.WEIGHTS_NAME))
        except Exception:
            peft_model._drop_adapter_parts(adapter_name)  # the file does not fit: give `model` back as it came
            raise
        return peft_model


def _merge_stays_finite(layer: AdapterLayer, names: list[str]) -> bool:
    """Merge `names` into `layer` on trial, put its weights back exactly, and say whether they stayed finite
    (one layer's copy at a time, as PEFT's safe_merge)."""
    params = [p for p in (layer.base_layer.weight, getattr(layer.base_layer, "bias", None)) if p is not None]
    originals = [p.data for p in params]
    saved = [p.detach().clone() for p in params]
    merged_before = list(layer.merged_adapters)
    try:
        layer.merge(names)
        return all(bool(torch.isfinite(p).all()) for p in params)
    finally:
        with torch.no_grad():
            for p, original, copy in zip(params, originals, saved):
                original.copy_(copy)
                p.data = original
        layer.merged_adapters[:] = merged_before


def _check_prompt_geometry(model: nn.Module, config: PeftConfig) -> None:
    """A prompt-learning config read from a file names the geometry it was made for: a prefix holds one
    key/value block per layer (num_layers), a soft prompt one vector of the hidden size (token_dim) per token.
    Made for another model, it must not load (a prefix would run with layers missing)."""
    model_config = getattr(model, "config", None)
    if model_config is None:
        return
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config

    def first(*names: str) -> int | None:
        return next((getattr(text, n) for n in names if isinstance(getattr(text, n, None), int)), None)

    made_for = f" ({config.base_model_name_or_path})" if config.base_model_name_or_path else ""
    if isinstance(config, PrefixTuningConfig):
        layers = first("num_hidden_layers", "num_layers", "n_layer")
        if config.num_layers is not None and layers is not None and layers != config.num_layers:
            raise ValueError(f"this prefix-tuning adapter was made for a model with num_layers={config.num_layers}"
                             f"{made_for}, but {type(model).__name__} has {layers} layers")
    else:  # the prompt goes in front of the word embeddings: their width is what must match
        get = getattr(model, "get_input_embeddings", None)
        embeddings = get() if callable(get) else None
        weight = getattr(embeddings, "weight", None)
        hidden = weight.shape[-1] if isinstance(weight, torch.Tensor) else first("hidden_size", "n_embd", "d_model")
        if config.token_dim is not None and hidden is not None and hidden != config.token_dim:
            raise ValueError(f"this {config.peft_type.value} adapter was made for a model with token_dim="
                             f"{config.token_dim}{made_for}, but {type(model).__name__} has hidden size {hidden}")


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    release = getattr(getattr(parent, child, None), "_fastpeft_release", None)
    if callable(release):  # e.g. a BottleneckWrapper's hook on its layer's norm
        release()
    setattr(parent, child, module)


def _task(config: PeftConfig) -> str | None:
    t = config.task_type
    return t.value if isinstance(t, TaskType) else t


def _with_task_defaults(config: PeftConfig) -> PeftConfig:
    if _task(config) == "SEQ_CLS":
        extra = [h for h in _SEQ_CLS_HEADS if h not in (config.modules_to_save or [])]
        config.modules_to_save = list(config.modules_to_save or []) + extra
    return config


class _NamedInputs:
    """forward() that names the model inputs, as PEFT's task classes do: HF Trainer reads the
    signature to decide which dataset columns to keep (remove_unused_columns=True)."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        named = {"input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": inputs_embeds,
                 "labels": labels}
        return PeftModel.forward(self, **{k: v for k, v in named.items() if v is not None}, **kwargs)


class PeftModelForCausalLM(_NamedInputs, PeftModel):
    pass


class PeftModelForSequenceClassification(_NamedInputs, PeftModel):
    pass


class PeftModelForSeq2SeqLM(PeftModel):
    """Encoder-decoder models (T5, BART); forward names the inputs as PEFT's class does (HF Trainer reads
    the signature).  Prompt learning on them: fastpeft.prompt_learning.seq2seq."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, **kwargs):
        named = {"input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": inputs_embeds,
                 "decoder_input_ids": decoder_input_ids, "decoder_attention_mask": decoder_attention_mask,
                 "decoder_inputs_embeds": decoder_inputs_embeds, "labels": labels}
        return PeftModel.forward(self, **{k: v for k, v in named.items() if v is not None}, **kwargs)


MODEL_TYPE_TO_PEFT_MODEL = {"CAUSAL_LM": PeftModelForCausalLM, "SEQ_CLS": PeftModelForSequenceClassification,
                            "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM}


def as_fastpeft_config(config: Any) -> PeftConfig:
    """`config` itself, or the fastpeft twin of an HF PEFT config (through their shared JSON form)."""
    if isinstance(config, PeftConfig):
        return config
    if type(config).__module__.startswith("peft.") and hasattr(config, "to_dict"):
        data = {k: v for k, v in config.to_dict().items() if k not in ("auto_mapping", "peft_version")}
        return PeftConfig.from_dict(data, source=f"peft.{type(config).__name__}")
    raise TypeError(f"peft_config must be a fastpeft (or HF PEFT) config such as LoraConfig or IA3Config, "
                    f"got {type(config).__name__}")


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap `model` with a new adapter described by `peft_config` (PEFT's get_peft_model)."""
    if isinstance(model, PeftModel):
        raise ValueError("model is already a PeftModel; use add_adapter to add another adapter")
    peft_config = as_fastpeft_config(peft_config)
    cls = MODEL_TYPE_TO_PEFT_MODEL.get(_task(peft_config), PeftModel)
    return cls(model, peft_config, adapter_name)


def get_peft_model_state_dict(model: PeftModel, state_dict: dict[str, torch.Tensor] | None = None,
                              adapter_name: str = "default", **_: Any) -> dict[str, torch.Tensor]:
    """The tensors save_pretrained writes for `adapter_name`, under PEFT's file keys (PEFT's function of the
    same name); read from `state_dict` (the model's full state dict) when given."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"get_peft_model_state_dict takes a fastpeft PeftModel, got {type(model).__name__}")
    return model.adapter_state_dict(adapter_name, state_dict)


def set_peft_model_state_dict(model: PeftModel, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", **_: Any):
    """Copy adapter tensors under PEFT's file keys into the existing adapter `adapter_name` (PEFT's function
    of the same name).  Every key and shape is checked before anything is copied; unlike PEFT a key that
    does not fit is an error, so the returned (missing, unexpected) keys are always empty."""
    from torch.nn.modules.module import _IncompatibleKeys

    if not isinstance(model, PeftModel):
        raise TypeError(f"set_peft_model_state_dict takes a fastpeft PeftModel, got {type(model).__name__}")
    if adapter_name not in model.peft_config:
        raise ValueError(f"unknown adapter {adapter_name!r}; this model has {sorted(model.peft_config)}")
    model._load_tensors(adapter_name, peft_model_state_dict, "the given state dict")
    return _IncompatibleKeys([], [])
