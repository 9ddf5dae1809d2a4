"""TRL's SFTTrainer with fastpeft adapters.

`trl.SFTTrainer(model=fastpeft_model, ...)` works as it is (a fastpeft model is a `peft.PeftModel`
instance when peft is installed, see `hf_trainer`).  TRL itself wraps a model with *peft's*
`get_peft_model` when given `peft_config`, and accepts only peft config objects there; this subclass
takes a fastpeft config (or an HF PEFT one) as `peft_config` and wraps the model with fastpeft instead:

    from fastpeft.integrations.trl import SFTTrainer
    trainer = SFTTrainer(model=base_model, peft_config=fastpeft.LoraConfig(...), args=..., train_dataset=...)
"""

from __future__ import annotations

from typing import Any

import trl
from torch import nn

from ..peft_model import PeftModel, as_fastpeft_config, get_peft_model


class SFTTrainer(trl.SFTTrainer):
    """trl.SFTTrainer whose `peft_config` (fastpeft or HF PEFT config) is applied by fastpeft."""

    def __init__(self, model: str | nn.Module, *args: Any, peft_config: Any = None, **kwargs: Any) -> None:
        if peft_config is not None:
            config = as_fastpeft_config(peft_config)
            if isinstance(model, PeftModel):
                raise ValueError("model is already a PeftModel and peft_config was given too: pass one of them")
            if isinstance(model, str):
                import transformers

                sft_args = kwargs.get("args", args[0] if args else None)
                init = dict(getattr(sft_args, "model_init_kwargs", None) or {})
                model = transformers.AutoModelForCausalLM.from_pretrained(model, **init)
            if config.task_type is None:
                config.task_type = "CAUSAL_LM"  # SFTTrainer trains causal LMs only
            model = get_peft_model(model, config)
        super().__init__(model, *args, **kwargs)
