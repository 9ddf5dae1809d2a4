"""Base models for `fastpeft train` / `generate`: a local Hugging Face folder (with its tokenizer
when it has one) or a preset Llama shape with seeded random weights and the shipped byte-level
tokenizer (a transformers `PreTrainedTokenizerFast`, see tokenizer.py).

Presets (vocabulary 259 = the byte-level tokenizer's, except `bench`):
  tiny   hidden 64,   2 layers,  4 heads (2 KV),  MLP 176   (~0.1 M params, CPU in seconds; weights
         drawn with std 0.1, not 0.02, so that logits through the unit-norm final RMSNorm can move far
         enough for an adapter to visibly learn)
  small  hidden 256,  4 layers,  8 heads (4 KV),  MLP 688   (~3 M params, CPU)
  bench  hidden 2048, 8 layers, 16 heads (16 KV), MLP 5632, vocabulary 32000: the end-to-end model of
         `fastpeft bench` (~412 M params, for a GPU); the byte tokenizer uses its first 259 ids
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, preset_tokenizer

PRESETS: dict[str, dict[str, float]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=176, initializer_range=0.1),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=688),
    "bench": dict(hidden_size=2048, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16,
                  intermediate_size=5632, vocab_size=32000),
}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def preset_config(name: str, max_position_embeddings: int = 2048):
    """The transformers LlamaConfig of preset `name`."""
    from transformers import LlamaConfig

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets are {', '.join(PRESETS)}")
    shape = {"vocab_size": VOCAB_SIZE, **PRESETS[name]}
    return LlamaConfig(max_position_embeddings=max_position_embeddings, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                       pad_token_id=PAD_ID, tie_word_embeddings=False, **shape)


def build_preset(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Preset `name` with random weights drawn on the CPU from `seed` (the same weights every time)."""
    from transformers import LlamaForCausalLM

    config = preset_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.config.name_or_path = f"fastpeft-preset:{name}"
    model.generation_config.pad_token_id = PAD_ID
    return model.to(dtype)


def load_model(name_or_path: str, seed: int = 0, dtype: torch.dtype = torch.float32,
               quantize: str | None = None) -> tuple[torch.nn.Module, Any, dict]:
    """(model, tokenizer, source): `source` is what `generate` needs to rebuild the base model.  `quantize`
    ("nf4" / "fp4") loads a model folder's linear layers straight into 4 bits, one at a time
    (`fastpeft.quant.load_quantized`: the model never exists in 16 bits); a preset is built, then quantised."""
    if name_or_path in PRESETS:
        model = build_preset(name_or_path, seed, dtype)
        return model, preset_tokenizer(), {"preset": name_or_path, "seed": seed}
    from transformers import AutoModelForCausalLM

    folder = name_or_path if os.path.isdir(name_or_path) else _cached_snapshot(name_or_path)
    if folder is None:
        raise ValueError(f"model {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a local model folder "
                         f"nor a model in the Hugging Face cache (fastpeft train does not download models)")
    try:
        if quantize is not None and any(f.endswith(".safetensors") for f in os.listdir(folder)):
            from ..quant import load_quantized

            model = load_quantized(folder, quantize, double_quant=True, compute_dtype=dtype, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load a causal LM from {folder}: {err}") from None
    tokenizer = None
    if any(os.path.isfile(os.path.join(folder, f)) for f in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer is None:
        vocab = model.get_input_embeddings().weight.shape[0]
        if vocab < VOCAB_SIZE:
            raise ValueError(f"{name_or_path} has no tokenizer and its vocabulary ({vocab}) is smaller than the byte "
                             f"tokenizer's ({VOCAB_SIZE}); add a tokenizer to the folder")
        tokenizer = preset_tokenizer()
    elif getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, {"path": os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path}


def _cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot folder of a hub model already in the Hugging Face cache, else None (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "config.json")
    except (ImportError, ValueError):
        return None
    return os.path.dirname(path) if isinstance(path, str) else None
