"""Adapter configs with HF PEFT's class names, field names, defaults and JSON form.

`adapter_config.json` written here loads in PEFT and PEFT's loads here.  Fields of PEFT that
fastpeft does not implement are accepted when they hold their inert default and rejected with an
error naming the field otherwise: a config is never silently half-applied.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .io import atomic_write_text

CONFIG_NAME = "adapter_config.json"
PEFT_VERSION_COMPAT = "0.21.0"


class PeftType(str, enum.Enum):
    LORA = "LORA"
    IA3 = "IA3"
    PREFIX_TUNING = "PREFIX_TUNING"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"


class TaskType(str, enum.Enum):
    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"


# PEFT fields fastpeft does not implement, with the values that leave them inert.
_INERT = {
    "layers_to_transform": (None,), "layers_pattern": (None,), "megatron_config": (None,),
    "megatron_core": ("megatron.core", None), "trainable_token_indices": (None,), "loftq_config": ({}, None),
    "eva_config": (None,), "corda_config": (None,), "lora_ga_config": (None,), "use_dora": (False,),
    "velora_config": (None,), "alora_invocation_tokens": (None,), "use_qalora": (False,),
    "monteclora_config": (None,), "layer_replication": (None,), "lora_bias": (False,), "target_parameters": (None,),
    "use_bdlora": (None, False), "arrow_config": (None,), "kasa_config": (None,), "ensure_weight_tying": (False,),
    "init_weights": (None, True), "runtime_config": None, "qalora_group_size": None,
}
_METADATA = {"auto_mapping", "peft_version"}


@dataclass
class PeftConfig:
    peft_type: ClassVar[PeftType]
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    modules_to_save: list[str] | None = None

    @property
    def is_prompt_learning(self) -> bool:
        return self.peft_type in (PeftType.PREFIX_TUNING, PeftType.PROMPT_TUNING, PeftType.P_TUNING)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task_type": _plain(self.task_type), "peft_type": self.peft_type.value,
                               "auto_mapping": None, "peft_version": PEFT_VERSION_COMPAT}
        for f in dataclasses.fields(self):
            if f.name != "task_type":
                out[f.name] = _plain(getattr(self, f.name))
        return out

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        atomic_write_text(os.path.join(directory, CONFIG_NAME), json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "PeftConfig":
        data = dict(data)
        peft_type = data.pop("peft_type", None)
        target = cls
        if cls is PeftConfig:
            if peft_type is None:
                raise ValueError(f"{source} has no 'peft_type'")
            if peft_type not in CONFIG_MAPPING:
                raise ValueError(f"{source}: peft_type {peft_type!r} is not supported by fastpeft "
                                 f"(supported: {', '.join(CONFIG_MAPPING)})")
            target = CONFIG_MAPPING[peft_type]
        elif peft_type is not None and peft_type != cls.peft_type.value:
            raise ValueError(f"{source} is a {peft_type} config, not {cls.peft_type.value}")
        names = {f.name for f in dataclasses.fields(target)}
        kwargs = {}
        for key, value in data.items():
            if key in names:
                kwargs[key] = value
            elif key in _METADATA:
                continue
            elif key in _INERT:
                allowed = _INERT[key]
                if allowed is not None and value not in allowed:
                    raise NotImplementedError(f"{source}: PEFT option {key}={value!r} is not supported by fastpeft")
            else:
                raise ValueError(f"{source}: unknown field {key!r} for {target.__name__}")
        return target(**kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "PeftConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object")
        return cls.from_dict(data, source=path)


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return value


def _as_list(value):
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value)
    return value


@dataclass
class LoraConfig(PeftConfig):
    peft_type: ClassVar[PeftType] = PeftType.LORA
    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.target_modules = _as_list(self.target_modules)
        self.exclude_modules = _as_list(self.exclude_modules)
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        for key, rank in (self.rank_pattern or {}).items():
            if not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {rank!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise NotImplementedError(f"init_lora_weights={self.init_lora_weights!r} is not supported by fastpeft "
                                      "(supported: True, False, 'gaussian')")


@dataclass
class IA3Config(PeftConfig):
    peft_type: ClassVar[PeftType] = PeftType.IA3
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self):
        self.target_modules = _as_list(self.target_modules)
        self.exclude_modules = _as_list(self.exclude_modules)
        self.feedforward_modules = _as_list(self.feedforward_modules)
        if (isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list)
                and not set(self.feedforward_modules) <= set(self.target_modules)):
            raise ValueError("IA3Config.feedforward_modules must be a subset of target_modules")


@dataclass
class PromptLearningConfig(PeftConfig):
    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    def __post_init__(self):
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ValueError(f"{type(self).__name__}.num_virtual_tokens must be a positive integer, "
                             f"got {self.num_virtual_tokens!r}")


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    peft_type: ClassVar[PeftType] = PeftType.PREFIX_TUNING
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    peft_type: ClassVar[PeftType] = PeftType.PROMPT_TUNING
    prompt_tuning_init: str = PromptTuningInit.RANDOM.value
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self):
        super().__post_init__()
        self.prompt_tuning_init = _plain(self.prompt_tuning_init)
        if self.prompt_tuning_init not in {m.value for m in PromptTuningInit}:
            raise ValueError(f"prompt_tuning_init must be one of TEXT, SAMPLE_VOCAB, RANDOM, got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    peft_type: ClassVar[PeftType] = PeftType.P_TUNING
    encoder_reparameterization_type: str = PromptEncoderReparameterizationType.MLP.value
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.encoder_reparameterization_type = _plain(self.encoder_reparameterization_type)
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            raise ValueError(f"encoder_reparameterization_type must be 'MLP' or 'LSTM', "
                             f"got {self.encoder_reparameterization_type!r}")


CONFIG_MAPPING: dict[str, type[PeftConfig]] = {
    "LORA": LoraConfig, "IA3": IA3Config, "PREFIX_TUNING": PrefixTuningConfig,
    "PROMPT_TUNING": PromptTuningConfig, "P_TUNING": PromptEncoderConfig,
}

# Default targets when target_modules is None (PEFT's tables, for the families fastpeft supports).
LORA_DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
                        "qwen3": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
IA3_DEFAULT_TARGETS = {"llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
                       "qwen2": ["k_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"]}
IA3_DEFAULT_FEEDFORWARD = {"llama": ["down_proj"], "mistral": ["down_proj"], "qwen2": ["down_proj"],
                           "gpt2": ["mlp.c_proj"]}
