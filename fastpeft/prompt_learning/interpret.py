"""Reading a learned prompt through its nearest vocabulary tokens (Lester et al. §7): per virtual token,
the k word embeddings of highest cosine similarity.

Defined for prompt tuning (the prompt rows live in the word-embedding space) and for P-tuning (its
encoder's output rows are what the model reads, in that same space).  Not defined for prefix tuning:
its rows are per-layer attention keys and values (and, with prefix_projection, the projection's input
is never fed to the model as a token), so no vocabulary embedding is comparable to them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["nearest_tokens", "prompt_rows"]


def prompt_rows(peft_model: Any, adapter_name: str | None = None) -> torch.Tensor:
    """(P', H): the rows the model reads as virtual tokens (P' = num_virtual_tokens × submodules on a
    decoder-only model; the encoder's num_virtual_tokens rows on an encoder-decoder model)."""
    from . import _is_prefix, _table
    from .seq2seq import is_encoder_decoder

    name = adapter_name or peft_model.active_adapter
    if name not in peft_model.peft_config:
        raise ValueError(f"unknown adapter {name!r}; this model has {sorted(peft_model.peft_config)}")
    config = peft_model.peft_config[name]
    if _is_prefix(config):
        raise ValueError("nearest_tokens is not defined for prefix tuning: a prefix holds per-layer attention keys "
                         "and values, not vectors of the word-embedding space (defined: prompt tuning, and P-tuning "
                         "through its encoder's output)")
    with torch.no_grad():
        table = _table(peft_model, name).detach()
    if is_encoder_decoder(peft_model.base_model):
        table = table[: config.num_virtual_tokens]
    return table


def nearest_tokens(peft_model: Any, k: int = 5, tokenizer: Any = None,
                   adapter_name: str | None = None) -> list[list[tuple[Any, float]]]:
    """For each virtual token, its `k` nearest vocabulary tokens by cosine similarity
    cos(p, e_v) = p·e_v / (‖p‖‖e_v‖), best first, as (token, similarity): the token decoded with
    `tokenizer` when given, its id otherwise."""
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    rows = prompt_rows(peft_model, adapter_name).float()
    vocab = peft_model.base_model.get_input_embeddings().weight.detach()
    k = min(k, vocab.shape[0])
    sims = F.normalize(rows, dim=-1) @ F.normalize(vocab.to(rows.device, torch.float32), dim=-1).t()
    scores, ids = sims.topk(k, dim=-1)
    out = []
    for row_ids, row_scores in zip(ids.tolist(), scores.tolist()):
        tokens = row_ids if tokenizer is None else _decode(tokenizer, row_ids)
        out.append(list(zip(tokens, row_scores)))
    return out


def _decode(tokenizer: Any, ids: list[int]) -> list[str]:
    if hasattr(tokenizer, "convert_ids_to_tokens"):  # an id the tokenizer does not know stays an id
        return [t if t is not None else i for i, t in zip(ids, tokenizer.convert_ids_to_tokens(ids))]
    return [tokenizer.decode([i]) for i in ids]
