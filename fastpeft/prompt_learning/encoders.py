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
        if config.inference_mode:
            return
        init = config.prompt_tuning_init
        if init == "RANDOM":
            bound = getattr(config, "prompt_tuning_init_range", None)
            if bound is not None:  # Lester et al.'s random init: uniform in [-0.5, 0.5]
                with torch.no_grad():
                    self.embedding.weight.uniform_(-bound, bound)
            return
        if init == "CLASS_LABELS":
            from .init import class_label_rows

            rows = class_label_rows(config, word_embeddings, total)
            self.embedding.weight = nn.Parameter(rows)
            return
        if init == "SAMPLE_VOCAB":
            top_k = getattr(config, "prompt_tuning_vocab_top_k", None)
            high = word_embeddings.num_embeddings if top_k is None else min(top_k, word_embeddings.num_embeddings)
            ids = torch.randint(0, high, (total,), dtype=torch.long)
        else:
            ids = _text_token_ids(config, total)
        ids = ids.to(word_embeddings.weight.device)
        with torch.no_grad():
            rows = word_embeddings(ids).detach().clone().to(torch.float32)
        self.embedding.weight = nn.Parameter(rows)

    def table(self) -> torch.Tensor:
        return self.embedding.weight


def load_tokenizer(config: PromptTuningConfig):
    """The config's tokenizer (tokenizer_name_or_path; never with remote code)."""
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # a checkpoint must not be able to run code
    if not config.tokenizer_name_or_path:
        raise ValueError(f"prompt_tuning_init={config.prompt_tuning_init!r} needs tokenizer_name_or_path")
    return AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)


def _text_token_ids(config: PromptTuningConfig, total: int) -> torch.Tensor:
    """The init text's token ids, cut or repeated to `total` (PEFT's TEXT init)."""
    tokenizer = load_tokenizer(config)
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
            self.lstm_head = LSTM(input_size=token_dim, hidden_size=hidden, num_layers=config.encoder_num_layers,
                                  dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(),
                                          nn.Linear(2 * hidden, token_dim))
        elif self.encoder_type == "PAPER_LSTM":
            # the paper's encoder (Liu et al. 2021, THUDM/P-tuning PromptEncoder): a bidirectional LSTM of
            # token_dim // 2 units a direction (its output is token_dim wide again), then token_dim -> token_dim
            # -> token_dim; encoder_hidden_size does not apply
            if token_dim % 2:
                raise ValueError(f"encoder_reparameterization_type='PAPER_LSTM' needs an even token_dim (the LSTM "
                                 f"has token_dim // 2 units a direction), got {token_dim}")
            self.lstm_head = LSTM(input_size=token_dim, hidden_size=token_dim // 2,
                                  num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                  bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, token_dim), nn.ReLU(), nn.Linear(token_dim, token_dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, token_dim))

    def table(self) -> torch.Tensor:
        x = self.embedding.weight
        if self.inference_mode:
            return x
        if self.encoder_type in ("LSTM", "PAPER_LSTM"):
            return self.mlp_head(self.lstm_head(x.unsqueeze(0))[0])[0]
        return self.mlp_head(x)


class LSTM(nn.RNNBase):
    """`nn.LSTM` (same parameters, names, state dict, repr and eager kernel) that torch.compile can
    trace: dynamo refuses any `nn.LSTM` instance, so under compile this one runs the same math in
    matmuls and pointwise ops (`traceable_lstm`).  P-tuning's encoder uses it."""

    def __init__(self, *args, **kwargs) -> None:
        nn.RNNBase.__init__(self, "LSTM", *args, **kwargs)

    # nn.LSTM's own eager forward and its helpers
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def forward(self, input, hx=None):
        if torch.compiler.is_compiling() and hx is None and self.proj_size == 0:
            return traceable_lstm(self, input), None
        return nn.LSTM.forward(self, input, hx)


def traceable_lstm(lstm: nn.RNNBase, x: torch.Tensor) -> torch.Tensor:
    """The output sequence of `lstm(x)[0]` (zero initial state, no projection) in plain ops: gate
    order i, f, g, o; dropout between layers as nn.LSTM applies it."""
    batched = x.dim() == 3
    if not batched:
        x = x.unsqueeze(0)
    elif not lstm.batch_first:
        x = x.transpose(0, 1)
    hidden, steps_n = lstm.hidden_size, x.shape[1]
    out = x
    for layer in range(lstm.num_layers):
        directions = []
        for suffix in ("", "_reverse")[: 2 if lstm.bidirectional else 1]:
            w_ih = getattr(lstm, f"weight_ih_l{layer}{suffix}")
            w_hh = getattr(lstm, f"weight_hh_l{layer}{suffix}")
            gates_x = out @ w_ih.t()
            if lstm.bias:
                gates_x = gates_x + getattr(lstm, f"bias_ih_l{layer}{suffix}") + getattr(lstm, f"bias_hh_l{layer}{suffix}")
            h = out.new_zeros(out.shape[0], hidden)
            c = out.new_zeros(out.shape[0], hidden)
            hs = [None] * steps_n
            for t in (range(steps_n - 1, -1, -1) if suffix else range(steps_n)):
                i, f, g, o = (gates_x[:, t] + h @ w_hh.t()).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                hs[t] = h
            directions.append(torch.stack(hs, dim=1))
        out = torch.cat(directions, dim=-1)
        if lstm.dropout and lstm.training and layer < lstm.num_layers - 1:
            out = torch.nn.functional.dropout(out, lstm.dropout, True)
    if not batched:
        return out[0]
    return out if lstm.batch_first else out.transpose(0, 1)


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
