"""The prompt encoders, with PEFT's module and parameter names (so state dicts are interchangeable).

Each encoder's `table()` is what the method feeds the model, computed once per step (never per row):
  PromptEmbedding (prompt tuning)   (P, H)            embedding.weight
  PromptEncoder   (P-tuning)        (P, H)            mlp_head(embedding.weight) or mlp_head(lstm(...))
  PrefixEncoder   (prefix tuning)   (P, L·2·Hkv·D)    embedding.weight or transform(embedding.weight)
In inference mode (a loaded adapter) PEFT keeps only `embedding`, holding the saved table itself.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig


class PromptEmbedding(nn.Module):
    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(total, config.token_dim)
        if config.inference_mode or config.prompt_tuning_init == "RANDOM":
            return
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, word_embeddings.num_embeddings, (total,), dtype=torch.long)
        else:
            ids = _text_token_ids(config, total)
        ids = ids.to(word_embeddings.weight.device)
        with torch.no_grad():
            rows = word_embeddings(ids).detach().clone().to(torch.float32)
        self.embedding.weight = nn.Parameter(rows)

    def table(self) -> torch.Tensor:
        return self.embedding.weight


def _text_token_ids(config: PromptTuningConfig, total: int) -> torch.Tensor:
    """The init text's token ids, cut or repeated to `total` (PEFT's TEXT init)."""
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # a checkpoint must not be able to run code
    if not config.tokenizer_name_or_path:
        raise ValueError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path")
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise ValueError(f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} tokenizes to no tokens")
    ids = (ids * math.ceil(total / len(ids)))[:total]
    return torch.tensor(ids, dtype=torch.long)


class PromptEncoder(nn.Module):
    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        self.encoder_type = config.encoder_reparameterization_type
        total = config.num_virtual_tokens * config.num_transformer_submodules
        token_dim, hidden = config.token_dim, config.encoder_hidden_size
        self.embedding = nn.Embedding(total, token_dim)
        self.inference_mode = config.inference_mode
        if config.inference_mode:
            return
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(input_size=token_dim, hidden_size=hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(),
                                          nn.Linear(2 * hidden, token_dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, token_dim))

    def table(self) -> torch.Tensor:
        x = self.embedding.weight
        if self.inference_mode:
            return x
        if self.encoder_type == "LSTM":
            return self.mlp_head(self.lstm_head(x.unsqueeze(0))[0])[0]
        return self.mlp_head(x)


class PrefixEncoder(nn.Module):
    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        self.prefix_projection = config.prefix_projection and not config.inference_mode
        width = config.num_layers * 2 * config.token_dim
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(nn.Linear(config.token_dim, config.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, width))
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)

    def table(self) -> torch.Tensor:
        if self.prefix_projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight


def build_encoder(config, word_embeddings: nn.Embedding) -> nn.Module:
    if isinstance(config, PromptTuningConfig):
        return PromptEmbedding(config, word_embeddings)
    if isinstance(config, PromptEncoderConfig):
        return PromptEncoder(config)
    if isinstance(config, PrefixTuningConfig):
        return PrefixEncoder(config)
    raise TypeError(f"{type(config).__name__} is not a prompt-learning config")
