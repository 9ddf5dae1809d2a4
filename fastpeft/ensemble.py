"""Ensembles of prompts or adapters evaluated in one batch.

`fastpeft.ensemble(model, adapters=[...], combine=...)` runs n adapters of one model (prompts of a
prompt-tuning / P-tuning / prefix model, or LoRA / IA3 / bottleneck adapters) over the same inputs as
ONE batch of n × B rows: each row picks its member through the per-row machinery the model already has
(`prompt_index` for the prompt methods, `adapter_names` — mixed-adapter batches — for the others), so
an ensemble costs one forward of n × B rows, not n forwards.

    ens = fastpeft.ensemble(model, adapters=["p0", "p1", "p2"], combine="mean_logprob")
    out = ens.classify(input_ids, attention_mask, labels=[[tok_great], [tok_terrible]])
    out.prediction            # (B,) the combined choice; out.member_scores (n, B, L), out.scores (B, L)
    ids = ens.generate(input_ids, attention_mask, max_new_tokens=8)   # greedy, combined per step

Classification scores a label by the log-probability of its token sequence after the input (multi-token
labels: the sum over their tokens, teacher-forced).  `combine="mean_logprob"` averages the members'
log-probabilities and takes the best; `"vote"` takes each member's best and the majority, ties broken by
the mean log-probability.  Generation combines the members' next-token log-probabilities the same way at
every step (greedy; the whole sequence is recomputed each step, no KV cache).  Inputs are right-padded
(attention_mask 1 on real tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

COMBINE = ("mean_logprob", "vote")


@dataclass
class EnsembleOutput:
    scores: torch.Tensor          # (B, L) combined: the mean log-probability, or the vote count
    prediction: torch.Tensor      # (B,) the index of the chosen label
    member_scores: torch.Tensor   # (n, B, L) each member's log-probability of each label
    member_prediction: torch.Tensor  # (n, B)


def _combine(member: torch.Tensor, combine: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (B, C), choice (B,)) from member log-probabilities (n, B, C)."""
    mean = member.mean(0)
    if combine == "mean_logprob":
        return mean, mean.argmax(-1)
    votes = torch.zeros_like(mean).scatter_add_(-1, member.argmax(-1).t(), torch.ones_like(member[..., 0]).t())
    # the majority; among tied labels the one with the higher mean log-probability
    best = votes.max(-1, keepdim=True).values
    return votes, torch.where(votes == best, mean, torch.full_like(mean, float("-inf"))).argmax(-1)


class Ensemble:
    """n adapters of `model` evaluated together; see the module docstring."""

    def __init__(self, model: torch.nn.Module, members: list[str], combine: str) -> None:
        from .peft_model import PeftModel

        if not isinstance(model, PeftModel):
            raise TypeError(f"fastpeft.ensemble takes a fastpeft PeftModel, got {type(model).__name__}")
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {', '.join(COMBINE)}, got {combine!r}")
        if not members:
            raise ValueError("an ensemble needs members")
        if len(set(members)) != len(members):
            raise ValueError(f"ensemble members must be distinct, got {members}")
        unknown = [m for m in members if m not in model.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(model.peft_config)}")
        self.model, self.members, self.combine = model, list(members), combine
        self.prompt = bool(model.is_prompt_learning)

    # ------------------------------------------------------------------ one batch of n × B rows
    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits (n, B, T, V): row m·B + b is input b through member m."""
        n, (b, t) = len(self.members), input_ids.shape
        ids = input_ids.repeat(n, 1)
        mask = None if attention_mask is None else attention_mask.repeat(n, 1)
        if self.prompt:
            index = torch.arange(n, device=input_ids.device).repeat_interleave(b)
            out = self.model(input_ids=ids, attention_mask=mask, prompt_index=index, adapters=self.members)
        else:
            names = [m for m in self.members for _ in range(b)]
            out = self.model(input_ids=ids, attention_mask=mask, adapter_names=names)
        logits = out.logits
        if logits.shape[1] != t:  # prompt tuning / P-tuning: the virtual tokens' positions come first
            logits = logits[:, logits.shape[1] - t:]
        return logits.reshape(n, b, t, -1)

    @torch.no_grad()
    def next_token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(n, B, V): each member's log-probabilities of the token after each (right-padded) input."""
        logits = self._forward(input_ids, attention_mask)
        last = _last_positions(input_ids, attention_mask)
        picked = logits[:, torch.arange(input_ids.shape[0], device=logits.device), last]
        return torch.log_softmax(picked.float(), dim=-1)

    @torch.no_grad()
    def classify(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 labels: Sequence[Sequence[int] | int]) -> EnsembleOutput:
        """Score each label (a token id or a sequence of them) after each input; combine the members."""
        label_ids = [[int(x)] if isinstance(x, int) else [int(v) for v in x] for x in labels]
        if len(label_ids) < 2 or any(not x for x in label_ids):
            raise ValueError(f"labels must be two or more non-empty token sequences, got {labels!r}")
        b = input_ids.shape[0]
        real = (torch.full((b,), input_ids.shape[1], device=input_ids.device) if attention_mask is None
                else attention_mask.sum(-1))
        if all(len(x) == 1 for x in label_ids):  # one forward: the next-token distribution
            lp = self.next_token_logprobs(input_ids, attention_mask)
            member = lp[..., [x[0] for x in label_ids]]
        else:  # each input followed by each label, teacher-forced, in one batch of L × B rows per member
            width = int(real.max()) + max(len(x) for x in label_ids)
            rows, masks, spans = [], [], []
            for lab in label_ids:
                for i in range(b):
                    n_real = int(real[i])
                    seq = input_ids[i, :n_real].tolist() + lab
                    rows.append(seq + [0] * (width - len(seq)))
                    masks.append([1] * len(seq) + [0] * (width - len(seq)))
                    spans.append((n_real, len(lab)))
            ids = torch.tensor(rows, device=input_ids.device)
            logits = self._forward(ids, torch.tensor(masks, device=input_ids.device))  # (n, L·B, W, V)
            lp = torch.log_softmax(logits.float(), dim=-1)
            scores = torch.zeros(lp.shape[:2], device=lp.device)
            for r, (start, k) in enumerate(spans):
                pos = torch.arange(start - 1, start - 1 + k, device=lp.device)
                tok = ids[r, start:start + k]
                scores[:, r] = lp[:, r, pos, tok].sum(-1)
            member = scores.reshape(len(self.members), len(label_ids), b).transpose(1, 2)
        combined, choice = _combine(member, self.combine)
        return EnsembleOutput(combined, choice, member, member.argmax(-1))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 16, eos_token_id: int | None = None, pad_token_id: int = 0) -> torch.Tensor:
        """Greedy generation with the members' next-token log-probabilities combined at every step:
        (B, T + new) with right padding kept where the inputs had it (new tokens follow each row's end)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        b = input_ids.shape[0]
        ids = input_ids
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        done = torch.zeros(b, dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            lp = self.next_token_logprobs(ids, mask)
            _, token = _combine(lp, self.combine)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            ends = mask.sum(-1)
            ids = torch.cat([ids, torch.full((b, 1), pad_token_id, dtype=ids.dtype, device=ids.device)], dim=1)
            mask = torch.cat([mask, torch.zeros((b, 1), dtype=mask.dtype, device=mask.device)], dim=1)
            rows = torch.arange(b, device=ids.device)
            ids[rows, ends] = token
            mask[rows, ends] = (~done).to(mask.dtype)
            if eos_token_id is not None:
                done |= token == eos_token_id
                if bool(done.all()):
                    break
        return ids


def _last_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
    last = attention_mask.sum(-1) - 1
    if bool((last < 0).any()):
        raise ValueError("every row needs at least one real token (attention_mask has an all-zero row)")
    return last


def ensemble(model: torch.nn.Module, prompts: list[str] | None = None, adapters: list[str] | None = None,
             combine: str = "mean_logprob") -> Ensemble:
    """An `Ensemble` of the named prompts (a prompt-learning model's adapters) or adapters of `model`."""
    if (prompts is None) == (adapters is None):
        raise ValueError("pass prompts=[...] (a prompt-learning model's adapters) or adapters=[...], not both")
    members = list(prompts if prompts is not None else adapters)
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least two members, got {members}")
    if prompts is not None and not getattr(model, "is_prompt_learning", False):
        raise ValueError("prompts=[...] names the prompts of a prompt-tuning / P-tuning / prefix model; use "
                         "adapters=[...] for LoRA, IA3 and bottleneck adapters")
    return Ensemble(model, members, combine)


__all__ = ["Ensemble", "EnsembleOutput", "ensemble", "COMBINE"]
