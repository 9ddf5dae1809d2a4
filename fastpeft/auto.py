"""AutoPeftModel*: load the base model an adapter names (`base_model_name_or_path`, `revision`) and the
adapter on top, in one call, as PEFT's classes of the same names do:

    model = fastpeft.AutoPeftModelForCausalLM.from_pretrained("org/adapter-or-folder", torch_dtype=...)
"""

from __future__ import annotations

import os
from typing import Any

from . import hub
from .config import PeftConfig
from .peft_model import PeftModel, PeftModelForCausalLM, PeftModelForSequenceClassification

_ADAPTER_KWARGS = ("adapter_name", "is_trainable", "config")


class _AutoPeftModel:
    _auto_class: str = ""
    _peft_class: type[PeftModel] = PeftModel
    _task: str | None = None

    def __init__(self, *_: Any, **__: Any) -> None:
        raise OSError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(adapter)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None, **kwargs: Any) -> PeftModel:
        """The base model named by the adapter's config (extra keywords go to transformers'
        from_pretrained, e.g. torch_dtype, device_map) with the adapter loaded on it.  Hub keywords
        (revision, subfolder, token, cache_dir, local_files_only) locate the adapter."""
        import transformers

        hub_args = {k: kwargs.pop(k) for k in ("revision", "subfolder", "token", "cache_dir", "local_files_only",
                                               "force_download") if k in kwargs}
        folder = hub.resolve_adapter(pretrained_model_name_or_path, **hub.hub_kwargs(hub_args))
        config = config or PeftConfig.from_pretrained(folder)
        task = getattr(config.task_type, "value", config.task_type)
        if cls._task is not None and task not in (None, cls._task):
            raise ValueError(f"{folder}: the adapter's task_type is {task!r}; {cls.__name__} loads {cls._task!r} "
                             "adapters")
        base_name = config.base_model_name_or_path
        if not base_name:
            raise ValueError(f"{folder}: adapter_config.json names no base_model_name_or_path; load the base model "
                             f"yourself and call fastpeft.PeftModel.from_pretrained(base_model, adapter)")
        base_kwargs = dict(kwargs)
        if config.revision is not None:
            base_kwargs.setdefault("revision", config.revision)
        for key in ("token", "cache_dir", "local_files_only"):
            if key in hub_args:
                base_kwargs.setdefault(key, hub_args[key])
        base = getattr(transformers, cls._auto_class).from_pretrained(base_name, **base_kwargs)
        return cls._peft_class.from_pretrained(base, folder, adapter_name=adapter_name, is_trainable=is_trainable,
                                               config=config)


class AutoPeftModel(_AutoPeftModel):
    _auto_class = "AutoModel"


class AutoPeftModelForCausalLM(_AutoPeftModel):
    _auto_class = "AutoModelForCausalLM"
    _peft_class = PeftModelForCausalLM
    _task = "CAUSAL_LM"


class AutoPeftModelForSequenceClassification(_AutoPeftModel):
    _auto_class = "AutoModelForSequenceClassification"
    _peft_class = PeftModelForSequenceClassification
    _task = "SEQ_CLS"
