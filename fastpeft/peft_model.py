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

from . import io
from .config import LoraConfig, PeftConfig, PeftType, TaskType
from .nn import ModulesToSaveWrapper
from .nn._base import AdapterLayer
from .nn.lora import LoraLinear
from .tuners import inject_adapter, mark_trainable, wrap_modules_to_save

_ADAPTER_CONTAINERS = ("lora_A", "lora_B", "ia3_l")
_SEQ_CLS_HEADS = ["classifier", "score"]


class TunerModel(nn.Module):
    """Holds the adapted model as `.model` (PEFT's LoraModel / IA3Model role)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        with _batch_adapters(self.model, adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        with _batch_adapters(self.model, adapter_names):
            return self.model.generate(*args, **kwargs)


@contextlib.contextmanager
def _batch_adapters(model: nn.Module, adapter_names: list[str] | None) -> Iterator[None]:
    """Route each batch row through its own LoRA adapter (PEFT's `adapter_names` forward argument)."""
    if adapter_names is None:
        yield
        return
    handles = []
    for module in model.modules():
        if isinstance(module, LoraLinear):
            def hook(mod, args, kwargs):
                kwargs["adapter_names"] = _expand_adapter_names(adapter_names, args[0].shape[0])
                return args, kwargs
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        elif isinstance(module, AdapterLayer):
            raise ValueError("adapter_names (mixed-adapter batches) is supported for LoRA only")
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _expand_adapter_names(names: list[str], rows: int) -> list[str]:
    # generate() with num_beams / num_return_sequences repeats each row
    if rows == len(names) or rows % len(names):
        return list(names)
    k = rows // len(names)
    return [n for n in names for _ in range(k)]


class PeftModel(nn.Module):
    """A model with one or more named adapters of one PEFT method."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"peft_config must be a fastpeft config (LoraConfig, IA3Config, ...), "
                            f"got {type(peft_config).__name__}")
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter = adapter_name
        self.peft_type = peft_config.peft_type
        self._adapters_disabled = False
        if peft_config.is_prompt_learning:
            self.base_model = model
            self.prompt_encoder = nn.ModuleDict()
        else:
            self.base_model = TunerModel(model)
        self.add_adapter(adapter_name, peft_config)
        if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
            self.config = model.config

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
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        if peft_config.peft_type != self.peft_type:
            raise ValueError(f"this model holds {self.peft_type.value} adapters; cannot add a "
                             f"{peft_config.peft_type.value} adapter (one method per model)")
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
    def forward(self, *args, **kwargs):
        if self.is_prompt_learning:
            from . import prompt_learning

            if self._adapters_disabled:
                kwargs.pop("prompt_index", None)
                return self.base_model(*args, **kwargs)
            return prompt_learning.forward(self, *args, **kwargs)
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        if self.is_prompt_learning:
            from . import prompt_learning

            if self._adapters_disabled:
                kwargs.pop("prompt_index", None)
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

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ merging
    def _adapter_layers(self) -> list[AdapterLayer]:
        if self.is_prompt_learning:
            raise ValueError(f"{self.peft_type.value} adapters have no weights to merge")
        return [m for m in self.base_model.model.modules() if isinstance(m, AdapterLayer)]

    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        for layer in self._adapter_layers():
            layer.merge(adapter_names or [self.active_adapter])

    def unmerge_adapter(self) -> None:
        for layer in self._adapter_layers():
            layer.unmerge()

    def _unwrap(self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        layers = self._adapter_layers()
        model = self.base_model.model
        for name, module in list(model.named_modules()):
            if isinstance(module, AdapterLayer):
                if merge:
                    module.merge(adapter_names or [self.active_adapter], safe_merge=safe_merge)
                else:
                    module.unmerge()
                _replace(model, name, module.base_layer)
            elif isinstance(module, ModulesToSaveWrapper):
                _replace(model, name, module._current() if merge else module.original_module)
        del layers
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
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's file keys (adapter name removed)."""
        adapter_name = adapter_name or self.active_adapter
        config = self.peft_config[adapter_name]
        out: dict[str, torch.Tensor] = {}
        if self.is_prompt_learning:
            from . import prompt_learning

            out.update(prompt_learning.state_dict_to_save(self, adapter_name))
        state = self.state_dict()
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
                        **_: Any) -> None:
        """Write each adapter as PEFT does: adapter_config.json + adapter_model.safetensors
        (the "default" adapter at the top, others in sub-folders named after them)."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory} is a file, not a folder")
        names = selected_adapters or list(self.peft_config)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(self.peft_config)}")
        for name in names:
            directory = save_directory if name == "default" else os.path.join(save_directory, name)
            os.makedirs(directory, exist_ok=True)
            io.save_tensors(os.path.join(directory, io.WEIGHTS_NAME), self.adapter_state_dict(name))
            config = self.peft_config[name]
            inference_mode = config.inference_mode
            config.inference_mode = True
            try:
                if config.base_model_name_or_path is None:
                    config.base_model_name_or_path = getattr(getattr(self.get_base_model(), "config", None),
                                                             "_name_or_path", None) or None
                config.save_pretrained(directory)
            finally:
                config.inference_mode = inference_mode

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     config: PeftConfig | None = None) -> None:
        """Load the adapter saved in `model_id` under the name `adapter_name`."""
        model_id = str(model_id)
        if not os.path.isdir(model_id):
            raise FileNotFoundError(f"adapter folder {model_id} does not exist (fastpeft loads from local folders)")
        config = config or PeftConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        tensors = io.load_tensors(model_id, device="cpu")
        self.add_adapter(adapter_name, config)
        try:
            self._load_tensors(adapter_name, tensors, os.path.join(model_id, io.WEIGHTS_NAME))
        except Exception:
            if len(self.peft_config) > 1:
                self.delete_adapter(adapter_name)
            raise

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
                        is_trainable: bool = False, config: PeftConfig | None = None, **_: Any) -> "PeftModel":
        """Wrap `model` with the adapter saved in `model_id` (a PEFT or fastpeft adapter folder)."""
        model_id = str(model_id)
        if not os.path.isdir(model_id):
            raise FileNotFoundError(f"adapter folder {model_id} does not exist (fastpeft loads from local folders)")
        config = config or PeftConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        tensors = io.load_tensors(model_id, device="cpu")
        peft_cls = MODEL_TYPE_TO_PEFT_MODEL.get(_task(config), PeftModel)
        peft_model = peft_cls(model, config, adapter_name)
        peft_model._load_tensors(adapter_name, tensors, os.path.join(model_id, io.WEIGHTS_NAME))
        return peft_model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
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


MODEL_TYPE_TO_PEFT_MODEL = {"CAUSAL_LM": PeftModelForCausalLM, "SEQ_CLS": PeftModelForSequenceClassification}


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
