"""Prompt-tuning initialisations from Lester et al. ("The Power of Scale for Parameter-Efficient Prompt
Tuning", §3.2) beside PEFT's: class-label init.  (The paper's uniform [-0.5, 0.5] random init and its
sampling from the 5,000 most common tokens are options of RANDOM / SAMPLE_VOCAB: `prompt_tuning_init_range`,
`prompt_tuning_vocab_top_k`.)"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["class_label_rows", "label_token_ids"]


def label_token_ids(tokenizer, labels: list[str]) -> list[list[int]]:
    """Each label's token ids, without special tokens (a label is a word or a few, not a sentence)."""
    out = []
    for label in labels:
        ids = tokenizer(label, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"class label {label!r} tokenizes to no tokens")
        out.append(list(ids))
    return out


def class_label_rows(config, word_embeddings: nn.Embedding, total: int) -> torch.Tensor:
    """(total, H) float32: row i < len(labels) is the mean embedding of label i's tokens (the paper averages
    multi-token labels); the remaining rows are sampled vocabulary embeddings (the paper's fallback when the
    prompt is longer than the label set), from ids [0, prompt_tuning_vocab_top_k) when that is set."""
    from .encoders import load_tokenizer

    labels = list(config.prompt_tuning_class_labels)
    if len(labels) > total:
        raise ValueError(f"prompt_tuning_init='CLASS_LABELS' has {len(labels)} labels but the prompt has {total} "
                         f"tokens (num_virtual_tokens × num_transformer_submodules); use at least one token per label")
    groups = label_token_ids(load_tokenizer(config), labels)
    vocab = word_embeddings.num_embeddings
    bad = [(label, i) for label, ids in zip(labels, groups) for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"class label token ids {bad[:3]} lie outside the model's vocabulary of {vocab}")
    weight = word_embeddings.weight
    with torch.no_grad():
        rows = [weight[torch.tensor(ids, device=weight.device)].float().mean(0) for ids in groups]
        rest = total - len(rows)
        if rest:
            top_k = config.prompt_tuning_vocab_top_k
            high = vocab if top_k is None else min(top_k, vocab)
            fill = torch.randint(0, high, (rest,), dtype=torch.long).to(weight.device)
            rows.extend(weight[fill].float().unbind(0))
        return torch.stack(rows).detach().clone()
