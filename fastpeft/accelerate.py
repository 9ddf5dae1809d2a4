"""fastpeft.accelerate(peft_model): swap a live HF PEFT model's LoRA/IA3 layers for fastpeft's."""

from __future__ import annotations

from torch import nn


def accelerate(peft_model: nn.Module) -> nn.Module:
    """Replace, in place, every PEFT LoRA / IA3 linear layer of `peft_model` with fastpeft's fused
    layer, keeping the same parameter objects, names and values; returns `peft_model`."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ImportError("fastpeft.accelerate() converts a Hugging Face PEFT model and needs the `peft` package "
                          "(pip install peft); to use fastpeft alone, call fastpeft.get_peft_model") from None
    raise NotImplementedError
