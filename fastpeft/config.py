"""Adapter configs with HF PEFT's class names, field names, defaults and JSON form.

`adapter_config.json` written here loads in PEFT and PEFT's loads here.  Fields of PEFT that
fastpeft does not implement are accepted when they hold their inert default and rejected with an
error naming the field otherwise: a config is never silently half-applied.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from . import io

CONFIG_NAME = "adapter_config.json"
PEFT_VERSION_COMPAT = "0.21.0"


class PeftType(str, enum.Enum):
    LORA = "LORA"
    IA3 = "IA3"
    PREFIX_TUNING = "PREFIX_TUNING"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    BOTTLENECK = "BOTTLENECK"


class TaskType(str, enum.Enum):
    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"  # prompt learning only (PeftModelForSeq2SeqLM)


class PromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"
    CLASS_LABELS = "CLASS_LABELS"  # fastpeft: one prompt token per label string (Lester et al.)


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"
    PAPER_LSTM = "PAPER_LSTM"  # fastpeft only: the P-tuning paper's encoder (THUDM/P-tuning), not PEFT's


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
# PEFT's task types; fastpeft builds the task head (modules_to_save) for the first three only
_SUPPORTED_TASKS = ("CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION")
_PEFT_ONLY_TASKS = ("SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS")


# ---------------------------------------------------------------------------------------------- validation
# One checker per kind of field: it returns the (normalised) value or raises _Bad(what was expected).
# Every config's __post_init__ runs its class's table (`_checks`), so a config built in code, read from
# adapter_config.json or converted from an HF PEFT config is validated by the same rules.
class _Bad(Exception):
    """`expected`; optionally the sub-item that is wrong (`where`, `value`) and a did-you-mean `hint`."""

    def __init__(self, expected: str, where: str = "", value: Any = None, hint: str = "") -> None:
        super().__init__(expected)
        self.expected, self.where, self.value, self.hint = expected, where, value, hint


Check = Callable[[Any], Any]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(v: Any) -> int:
    if not _is_int(v) or v <= 0:
        raise _Bad("a positive integer")
    return v


def _number(low: float = -math.inf, high: float = math.inf, low_open: bool = False, high_open: bool = False,
            what: str = "a finite number") -> Check:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _Bad(what)
        if v < low or v > high or (low_open and v == low) or (high_open and v == high):
            raise _Bad(what)
        return v
    return check


_positive_number = _number(0.0, low_open=True, what="a positive finite number")
_probability = _number(0.0, 1.0, high_open=True, what="a number in [0, 1)")


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad("true or false")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad("a string")
    return v


def _optional(check: Check) -> Check:
    def optional(v: Any) -> Any:
        if v is None:
            return None
        try:
            return check(v)
        except _Bad as err:
            raise _Bad(f"{err.expected} or null", err.where, err.value, err.hint) from None
    return optional


def _names(v: Any) -> Any:
    """A module-name spec: None, a string (a regex, or "all-linear") or a list of strings."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (list, tuple, set, frozenset)) and all(isinstance(s, str) for s in v):
        return sorted(v) if isinstance(v, (set, frozenset, tuple)) else list(v)
    raise _Bad("a string or a list of strings (or null)")


def _name_list(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, (list, tuple, set, frozenset)) and all(isinstance(s, str) for s in v):
        return list(v)
    raise _Bad("a list of strings (or null)")


def _pattern(value_check: Check, what: str) -> Check:
    def pattern(v: Any) -> dict:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise _Bad(f"a mapping from module-name pattern to {what}")
        for key, item in v.items():
            if not isinstance(key, str):
                raise _Bad(f"a mapping from module-name pattern (string) to {what}; key {key!r} is not a string")
            try:
                value_check(item)
            except _Bad:
                raise _Bad(what, where=f"[{key!r}]", value=item) from None
        return dict(v)
    return pattern


def _choice(*values: Any) -> Check:
    def choice(v: Any) -> Any:
        plain = _plain(v)
        if isinstance(plain, bool) or plain not in values:
            raise _Bad("one of " + ", ".join(repr(x) for x in values))
        return plain
    return choice


def _task_type(v: Any) -> Any:
    if v is None:
        return None
    plain = _plain(v)
    if plain in _SUPPORTED_TASKS:
        return v
    if plain in _PEFT_ONLY_TASKS:
        raise NotImplementedError(f"task_type {plain!r} is a PEFT task type fastpeft does not support "
                                  f"(supported: {', '.join(_SUPPORTED_TASKS)}, or null)")
    hint = difflib.get_close_matches(str(plain).upper(), _SUPPORTED_TASKS + _PEFT_ONLY_TASKS, n=1, cutoff=0.5)
    raise _Bad(f"one of {', '.join(_SUPPORTED_TASKS)} (or null)", hint=f"did you mean {hint[0]!r}?" if hint else "")


def _prompt_task_type(v: Any) -> Any:
    # prompt learning runs on encoder-decoder models too (fastpeft.prompt_learning.seq2seq)
    return v if _plain(v) == "SEQ_2_SEQ_LM" else _task_type(v)


def _validate(config: "PeftConfig") -> None:
    """Check and normalise every field in the tables of `config`'s class and its bases."""
    checks: dict[str, Check] = {}
    for klass in reversed(type(config).__mro__):
        checks.update(klass.__dict__.get("_checks", {}))
    for name, check in checks.items():
        value = getattr(config, name)
        try:
            object.__setattr__(config, name, check(value))
        except _Bad as err:
            bad = err.value if err.where else value
            hint = f"; {err.hint}" if err.hint else ""
            raise ValueError(f"{type(config).__name__}.{name}{err.where} must be {err.expected}, got "
                             f"{type(bad).__name__} {bad!r}{hint}") from None


def _describe_unknown(unknown: dict[str, Any], known: set[str]) -> str:
    parts = []
    for key in sorted(unknown):
        hint = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
        parts.append(f"{key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    return ", ".join(parts)


@dataclass
class PeftConfig:
    peft_type: ClassVar[PeftType]
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    modules_to_save: list[str] | None = None

    _checks: ClassVar[dict[str, Check]] = {
        "task_type": _task_type, "base_model_name_or_path": _optional(_str), "revision": _optional(_str),
        "inference_mode": _bool, "modules_to_save": _name_list,
    }

    def __post_init__(self):
        _validate(self)

    @property
    def is_prompt_learning(self) -> bool:
        return self.peft_type in (PeftType.PREFIX_TUNING, PeftType.PROMPT_TUNING, PeftType.P_TUNING)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task_type": _plain(self.task_type), "peft_type": self.peft_type.value,
                               "auto_mapping": None, "peft_version": PEFT_VERSION_COMPAT}
        own = getattr(self, "_fastpeft_fields", ())
        for f in dataclasses.fields(self):
            if f.name in own and getattr(self, f.name) == f.default:
                continue  # a fastpeft-only option left at its default: the file stays PEFT's
            if f.name != "task_type":
                out[f.name] = _plain(getattr(self, f.name))
        for key, value in getattr(self, "_unknown_fields", {}).items():
            out.setdefault(key, value)  # fields of a newer PEFT, kept so that a save round-trips them
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        io.write_file_set(directory, {CONFIG_NAME: io.text_writer(self.to_json_string())})

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
        kwargs, unknown = {}, {}
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
                unknown[key] = value
        try:
            config = target(**kwargs)
        except (ValueError, TypeError) as err:
            raise type(err)(f"{source}: {err}") from None
        except NotImplementedError as err:
            raise NotImplementedError(f"{source}: {err}") from None
        if unknown:
            # as PEFT: a field of a newer PEFT version is not fatal; unlike PEFT it is kept (and saved again)
            warnings.warn(f"{source}: field(s) {_describe_unknown(unknown, names)} unknown to {target.__name__} "
                          f"(written by a newer PEFT?) are kept in the config but not applied", stacklevel=2)
            object.__setattr__(config, "_unknown_fields", unknown)
        return config

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "PeftConfig":
        path = io.adapter_file(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
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

    _checks: ClassVar[dict[str, Check]] = {
        "r": _positive_int, "target_modules": _names, "exclude_modules": _names, "lora_alpha": _positive_number,
        "lora_dropout": _probability, "fan_in_fan_out": _bool, "bias": _choice("none", "all", "lora_only"),
        "use_rslora": _bool, "rank_pattern": _pattern(_positive_int, "a positive integer rank"),
        "alpha_pattern": _pattern(_positive_number, "a positive finite alpha"),
    }

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.init_lora_weights, (bool, str)):
            raise ValueError(f"LoraConfig.init_lora_weights must be true, false or a string, got "
                             f"{type(self.init_lora_weights).__name__} {self.init_lora_weights!r}")
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

    _checks: ClassVar[dict[str, Check]] = {
        "target_modules": _names, "exclude_modules": _names, "feedforward_modules": _names,
        "fan_in_fan_out": _bool, "init_ia3_weights": _bool,
    }

    def __post_init__(self):
        super().__post_init__()
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

    _checks: ClassVar[dict[str, Check]] = {
        "num_virtual_tokens": _positive_int, "token_dim": _optional(_positive_int),
        "num_transformer_submodules": _optional(_positive_int), "num_attention_heads": _optional(_positive_int),
        "num_layers": _optional(_positive_int), "task_type": _prompt_task_type,
    }


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    peft_type: ClassVar[PeftType] = PeftType.PREFIX_TUNING
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    _checks: ClassVar[dict[str, Check]] = {"encoder_hidden_size": _optional(_positive_int),
                                           "prefix_projection": _bool}


def _token_id(v: Any) -> int:
    if not _is_int(v) or v < 0:
        raise _Bad("a token id (an integer >= 0)")
    return v


# Templates (P-tuning's pseudo tokens anywhere in the input, e.g. [P][P][P] Britain [P][P][P] [MASK]): with
# prompt_token_id set, every occurrence of that id in input_ids is a virtual-token position (exactly
# num_virtual_tokens per row, filled in order) and nothing is prepended; a forward's `prompt_positions` mask
# does the same per call.  A fastpeft option: written to adapter_config.json only when set.
_TEMPLATE_CHECKS: dict[str, Check] = {"prompt_token_id": _optional(_token_id)}


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    peft_type: ClassVar[PeftType] = PeftType.PROMPT_TUNING
    prompt_tuning_init: str = PromptTuningInit.RANDOM.value
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    # fastpeft options from Lester et al. (not PEFT's; written to adapter_config.json only when set):
    # CLASS_LABELS init: one prompt token per label string (multi-token labels averaged), the rest sampled
    prompt_tuning_class_labels: list[str] | None = None
    # RANDOM init uniform in [-r, r] (the paper: 0.5) instead of PEFT's N(0, 1)
    prompt_tuning_init_range: float | None = None
    # SAMPLE_VOCAB (and CLASS_LABELS' fill) from token ids [0, k) (the paper: the 5,000 most common
    # tokens, i.e. the first ids of a frequency-ordered SentencePiece vocabulary) instead of the whole vocabulary
    prompt_tuning_vocab_top_k: int | None = None
    # templates: the marker id of the virtual-token positions (see _TEMPLATE_CHECKS)
    prompt_token_id: int | None = None

    _checks: ClassVar[dict[str, Check]] = {**_TEMPLATE_CHECKS,
        "prompt_tuning_init": _choice(*(m.value for m in PromptTuningInit)),
        "prompt_tuning_init_text": _optional(_str), "tokenizer_name_or_path": _optional(_str),
        "tokenizer_kwargs": _optional(_pattern(lambda v: v, "any value")),
        "prompt_tuning_class_labels": _name_list,
        "prompt_tuning_init_range": _optional(_number(0.0, math.inf, low_open=True, what="a positive number")),
        "prompt_tuning_vocab_top_k": _optional(_positive_int),
    }
    _fastpeft_fields: ClassVar[tuple[str, ...]] = ("prompt_tuning_class_labels", "prompt_tuning_init_range",
                                                   "prompt_tuning_vocab_top_k", "prompt_token_id")

    def __post_init__(self):
        super().__post_init__()
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
        if self.prompt_tuning_init == "CLASS_LABELS" and not self.prompt_tuning_class_labels:
            raise ValueError("prompt_tuning_init='CLASS_LABELS' needs prompt_tuning_class_labels (the label strings)")
        if self.prompt_tuning_class_labels and self.prompt_tuning_init != "CLASS_LABELS":
            raise ValueError("prompt_tuning_class_labels applies with prompt_tuning_init='CLASS_LABELS' only")
        if self.prompt_tuning_init_range is not None and self.prompt_tuning_init != "RANDOM":
            raise ValueError("prompt_tuning_init_range applies with prompt_tuning_init='RANDOM' only")
        if self.prompt_tuning_vocab_top_k is not None and self.prompt_tuning_init not in ("SAMPLE_VOCAB", "CLASS_LABELS"):
            raise ValueError("prompt_tuning_vocab_top_k applies with prompt_tuning_init='SAMPLE_VOCAB' or "
                             "'CLASS_LABELS' only")


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    peft_type: ClassVar[PeftType] = PeftType.P_TUNING
    encoder_reparameterization_type: str = PromptEncoderReparameterizationType.MLP.value
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    # templates: the marker id of the virtual-token positions (see _TEMPLATE_CHECKS)
    prompt_token_id: int | None = None

    _checks: ClassVar[dict[str, Check]] = {**_TEMPLATE_CHECKS,
        "encoder_reparameterization_type": _choice("MLP", "LSTM", "PAPER_LSTM"),
        "encoder_hidden_size": _optional(_positive_int),
        "encoder_num_layers": _positive_int, "encoder_dropout": _probability,
    }
    _fastpeft_fields: ClassVar[tuple[str, ...]] = ("prompt_token_id",)


@dataclass
class BottleneckConfig(PeftConfig):
    """Bottleneck adapters (Houlsby: mh_adapter and output_adapter; Pfeiffer: output_adapter only):
    y = r + up(act(down(s))) after the attention and/or feed-forward block.  Not a PEFT method: the
    fields follow AdapterHub's BnConfig names and meaning.  init_weights 'identity' makes a fresh adapter
    y = h.

    With h the sub-block's output and x its residual input (AdapterHub's `pre_forward`):
    original_ln_before=False (AdapterHub's DoubleSeqBnConfig, Houlsby): s = r = h.
    original_ln_before=True (AdapterHub's SeqBnConfig, Pfeiffer): s = LN(h + x) on post-LN models
    (BERT / RoBERTa: LN is the block's own LayerNorm), s = h + x on pre-LN ones (Llama, ...); the
    adapter's residual r is h with residual_before_ln=True, s with residual_before_ln=False.
    residual_before_ln only matters with original_ln_before=True.  The block's own residual and
    LayerNorm follow (original_ln_after: LN(y + x) on post-LN models, x + y on pre-LN ones)."""
    peft_type: ClassVar[PeftType] = PeftType.BOTTLENECK
    reduction_factor: int = 16
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    mh_adapter: bool = False
    output_adapter: bool = True
    residual_before_ln: bool = True
    original_ln_before: bool = False
    init_weights: str = "identity"
    target_modules: list[str] | str | None = None

    _checks: ClassVar[dict[str, Check]] = {
        "reduction_factor": _positive_int, "bottleneck_size": _optional(_positive_int), "non_linearity": _str,
        "mh_adapter": _bool, "output_adapter": _bool, "residual_before_ln": _bool, "original_ln_before": _bool,
        "init_weights": _choice("identity", "bert", "random"), "target_modules": _names,
    }

    def __post_init__(self):
        super().__post_init__()
        from .ops.bottleneck import canonical_activation

        canonical_activation(self.non_linearity)  # raises, naming the supported ones


CONFIG_MAPPING: dict[str, type[PeftConfig]] = {
    "LORA": LoraConfig, "IA3": IA3Config, "PREFIX_TUNING": PrefixTuningConfig,
    "PROMPT_TUNING": PromptTuningConfig, "P_TUNING": PromptEncoderConfig, "BOTTLENECK": BottleneckConfig,
}

# Default targets when target_modules is None (PEFT's tables, for the families fastpeft supports).
LORA_DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
                        "qwen3": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
IA3_DEFAULT_TARGETS = {"llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
                       "qwen2": ["k_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"]}
IA3_DEFAULT_FEEDFORWARD = {"llama": ["down_proj"], "mistral": ["down_proj"], "qwen2": ["down_proj"],
                           "gpt2": ["mlp.c_proj"]}
