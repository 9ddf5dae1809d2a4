"""fastpeft: fused-kernel parameter-efficient fine-tuning, drop-in compatible with HF PEFT."""

__version__ = "0.1.0"

from . import backend, ops
from .accelerate import accelerate
from .backend import get_backend, set_backend, use_backend
from .config import (IA3Config, LoraConfig, PeftConfig, PeftType, PrefixTuningConfig, PromptEncoderConfig,
                     PromptEncoderReparameterizationType, PromptTuningConfig, PromptTuningInit, TaskType)
from .config import BottleneckConfig
from .info import info
from .peft_model import (PeftModel, PeftModelForCausalLM, PeftModelForSequenceClassification, get_peft_model,
                         get_peft_model_state_dict, set_peft_model_state_dict)
from .peft_model import PeftModelForSeq2SeqLM
from .auto import AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
from .training import Trainer, train
from .quant import prepare_model_for_kbit_training, quantize
from . import optim
from .ensemble import Ensemble, ensemble
from .adapterhub import load_adapterhub_adapter, save_adapterhub_adapter

__all__ = [
    "LoraConfig", "IA3Config", "PrefixTuningConfig", "PromptTuningConfig", "PromptEncoderConfig", "PeftConfig",
    "PeftType", "TaskType", "PromptTuningInit", "PromptEncoderReparameterizationType", "PeftModel",
    "PeftModelForCausalLM", "PeftModelForSequenceClassification", "get_peft_model", "accelerate", "backend", "ops",
    "set_backend", "get_backend", "use_backend", "info", "train", "Trainer",
    "get_peft_model_state_dict", "set_peft_model_state_dict", "AutoPeftModel", "AutoPeftModelForCausalLM",
    "AutoPeftModelForSequenceClassification", "quantize", "prepare_model_for_kbit_training",
    "BottleneckConfig", "optim", "PeftModelForSeq2SeqLM", "ensemble", "Ensemble",
    "load_adapterhub_adapter", "save_adapterhub_adapter",
]
