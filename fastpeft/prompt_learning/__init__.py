"""Prefix tuning, prompt tuning and P-tuning for `fastpeft.PeftModel` (PEFT's numbers, fused ops).

Each step runs the adapter's encoder once, giving a table (encoders.py), and routes it through an op:

* prompt tuning / P-tuning: the (P, H) table goes in front of the word embeddings via
  `ops.soft_prompt_embed`; the attention mask is prefixed with ones and causal-LM labels with -100.
* prefix tuning: the table, viewed as (L, 2, Hkv, P, D), reaches every attention layer through
  `ops.prefix_attention` (integrations/transformers_attention.py), never through the KV cache.
  As in PEFT, where the prefix sits in the cache, real tokens take positions P, P+1, ...

Templates (prompt tuning / P-tuning): P-tuning's pseudo tokens anywhere among the real tokens, any number
of segments (``[P][P][P] Britain [P][P][P] [MASK]``).  The positions are the occurrences of the config's
`prompt_token_id` in input_ids, or a `prompt_positions` bool mask (B, T) passed to `forward` / `generate`
(it wins over the marker); each row holds exactly num_virtual_tokens of them, filled with the prompt's
tokens 0..P-1 left to right inside the same gather (`soft_prompt_embed(..., slots=...)`).  Nothing is
prepended: attention_mask, position_ids and token_type_ids keep their length, and causal-LM labels get
-100 at the prompt positions.  `generate` embeds the template at the prefill step only.

Mixed-task batches: pass `prompt_index` (B,) to `forward` / `generate`; row b uses adapter
`adapters[prompt_index[b]]`, where `adapters` (a keyword argument, list of adapter names) defaults to
every adapter of the model in the order added (`list(peft_model.peft_config)`).  The adapters must
share num_virtual_tokens and shapes; each encoder still runs once per step.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any

import torch
from torch import nn

from ..config import PeftConfig, PrefixTuningConfig, PromptEncoderConfig
from ..integrations import transformers_attention as attn
from ..integrations.generation import cache_argument, cache_length, find_cache, patched_prepare
from ..ops import soft_prompt_embed
from ..ops._common import value_checks
from ..ops.soft_prompt import template_slots
from . import seq2seq
from .encoders import PrefixEncoder, PromptEmbedding, PromptEncoder, build_encoder

__all__ = ["setup_adapter", "forward", "generate", "state_dict_to_save", "load_state", "PromptEmbedding",
           "PromptEncoder", "PrefixEncoder", "template_slots"]


# ---------------------------------------------------------------------------------------------- setup
def prepare_config(config: PeftConfig, model_config: Any) -> None:
    """Fill num_layers / token_dim / num_attention_heads / num_transformer_submodules / encoder_hidden_size
    from the base model's config, as PEFT's `_prepare_prompt_learning_config` does."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config

    def first(*names: str, what: str):
        for n in names:
            value = getattr(text, n, None)
            if value is not None:
                return value
        raise ValueError(f"cannot read {what} from the base model's config ({type(text).__name__}); "
                         f"set it in {type(config).__name__}")

    enc_dec = bool(getattr(text, "is_encoder_decoder", False) or getattr(model_config, "is_encoder_decoder", False))
    task = getattr(config.task_type, "value", config.task_type)
    if config.num_transformer_submodules is None:  # PEFT's rule: 2 (encoder and decoder) for SEQ_2_SEQ_LM
        config.num_transformer_submodules = 2 if task == "SEQ_2_SEQ_LM" else 1
    if config.num_transformer_submodules != 1 and not enc_dec and task != "SEQ_2_SEQ_LM":  # that: check_model
        raise ValueError(f"num_transformer_submodules={config.num_transformer_submodules} is for encoder-decoder "
                         f"models; {type(model_config).__name__} is not one (use 1)")
    if config.num_layers is None:
        config.num_layers = first("num_hidden_layers", "num_layers", "n_layer", what="num_layers")
    if config.token_dim is None:
        config.token_dim = first("hidden_size", "n_embd", "d_model", what="token_dim")
    if config.num_attention_heads is None:
        config.num_attention_heads = first("num_attention_heads", "n_head", "num_heads", what="num_attention_heads")
    kv_heads = getattr(text, "num_key_value_heads", None)
    if isinstance(config, PrefixTuningConfig) and kv_heads is not None:
        head_dim = getattr(text, "head_dim", None) or config.token_dim // config.num_attention_heads
        config.token_dim = head_dim * kv_heads
        config.num_attention_heads = kv_heads
    if getattr(config, "encoder_hidden_size", None) is None and hasattr(config, "encoder_hidden_size"):
        config.encoder_hidden_size = config.token_dim


def setup_adapter(peft_model: nn.Module, adapter_name: str, config: PeftConfig) -> None:
    """Build `peft_model.prompt_encoder[adapter_name]` for `config`; freeze the base model; for prefix
    tuning, switch the base model's attention to the prefix-aware implementation."""
    model = peft_model.base_model
    if getattr(model, "config", None) is None:
        raise TypeError(f"prompt learning needs a transformers model with a config, got {type(model).__name__}")
    prepare_config(config, model.config)
    seq2seq.check_model(model, config)
    if isinstance(config, PrefixTuningConfig) and not seq2seq.is_encoder_decoder(model):
        if config.token_dim % config.num_attention_heads:
            raise ValueError(f"token_dim ({config.token_dim}) must be a multiple of num_attention_heads "
                             f"({config.num_attention_heads})")
        attn.install(model)
    for p in model.parameters():
        p.requires_grad_(False)
    word_embeddings = model.get_input_embeddings()
    if "word_embeddings" not in peft_model._modules:
        peft_model.word_embeddings = word_embeddings  # PEFT exposes it (and so has it in its state dict)
    encoder = build_encoder(config, word_embeddings).to(word_embeddings.weight.device)
    peft_model.prompt_encoder[adapter_name] = encoder


# ---------------------------------------------------------------------------------------------- tables
def _table(peft_model: nn.Module, name: str) -> torch.Tensor:
    encoder = peft_model.prompt_encoder[name]
    if hasattr(encoder, "table"):
        return encoder.table()
    # an HF PEFT encoder (a PEFT model accelerated in place): PEFT's own `get_prompt` rule
    config = peft_model.peft_config[name]
    if config.inference_mode:
        return encoder.embedding.weight
    tokens = peft_model.prompt_tokens[name][: config.num_virtual_tokens].unsqueeze(0)
    return encoder(tokens.to(encoder.embedding.weight.device))[0]


def _is_prefix(config: Any) -> bool:
    """Prefix tuning, for fastpeft's config or HF PEFT's (accelerated PEFT models)."""
    kind = getattr(config, "peft_type", None)
    return isinstance(config, PrefixTuningConfig) or getattr(kind, "value", kind) == "PREFIX_TUNING"


def _tables(peft_model: nn.Module, prompt_index: torch.Tensor | None, adapters: list[str] | None,
            batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The active adapter's table, or all `adapters`' tables stacked (N, ...) with the checked index."""
    if prompt_index is None:
        if adapters is not None:
            raise ValueError("`adapters` only applies together with `prompt_index` (mixed-task batches)")
        return _table(peft_model, peft_model.active_adapter), None
    names = list(peft_model.peft_config) if adapters is None else list(adapters)
    unknown = [n for n in names if n not in peft_model.peft_config]
    if unknown or not names:
        raise ValueError(f"unknown adapter(s) {unknown} in `adapters`; this model has {list(peft_model.peft_config)}")
    if not isinstance(prompt_index, torch.Tensor):
        prompt_index = torch.as_tensor(prompt_index)
    if prompt_index.is_floating_point() or prompt_index.dtype == torch.bool or tuple(prompt_index.shape) != (batch,):
        raise ValueError(f"prompt_index must be an integer tensor of shape ({batch},) (one adapter per row), "
                         f"got {prompt_index.dtype} of shape {tuple(prompt_index.shape)}")
    if value_checks(prompt_index):
        lo, hi = int(prompt_index.min()), int(prompt_index.max())
        if lo < 0 or hi >= len(names):
            raise ValueError(f"prompt_index values must lie in [0, {len(names)}) (adapters {names}), got values "
                             f"in [{lo}, {hi}]")
    tables = [_table(peft_model, n) for n in names]
    shapes = {tuple(t.shape) for t in tables}
    if len(shapes) > 1:
        listing = ", ".join(f"{n}: {tuple(t.shape)}" for n, t in zip(names, tables))
        raise ValueError(f"adapters in a mixed-task batch need prompt tables of one shape, got {listing}")
    device = tables[0].device
    return torch.stack(tables), prompt_index.to(device=device, dtype=torch.long)


def _prefix_kv(table: torch.Tensor, config: PrefixTuningConfig) -> torch.Tensor:
    """(P, L·2·Hkv·D) -> (L, 2, Hkv, P, D); (N, P, ...) -> (L, 2, N, Hkv, P, D).  PEFT's layout: the
    flat row is (layer, k/v, head, head_dim)."""
    L, H = config.num_layers, config.num_attention_heads
    D = config.token_dim // H
    if table.dim() == 2:
        return table.view(table.shape[0], L, 2, H, D).permute(1, 2, 3, 0, 4).contiguous()
    return table.view(table.shape[0], table.shape[1], L, 2, H, D).permute(2, 3, 0, 4, 1, 5).contiguous()


def _batch_size(input_ids, inputs_embeds) -> int:
    if input_ids is not None:
        return input_ids.shape[0]
    if inputs_embeds is not None:
        return inputs_embeds.shape[0]
    raise ValueError("pass input_ids or inputs_embeds")


def _template(config: Any, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
              prompt_positions: Any) -> torch.Tensor | None:
    """The (B, T) slot map of a templated call (see `ops.soft_prompt.template_slots`), or None when the
    prompt is prepended (no `prompt_positions` and no `prompt_token_id` in the config)."""
    token = getattr(config, "prompt_token_id", None)
    if prompt_positions is None and token is None:
        return None
    if _is_prefix(config):
        raise ValueError("templates (prompt_positions / prompt_token_id) place prompt tuning's and P-tuning's virtual "
                         "tokens among the input's; prefix tuning's prefix has no input positions")
    P = config.num_virtual_tokens
    if prompt_positions is not None:
        if not isinstance(prompt_positions, torch.Tensor):
            prompt_positions = torch.as_tensor(prompt_positions)
        like = input_ids if input_ids is not None else inputs_embeds
        if like is not None:
            if tuple(prompt_positions.shape) != tuple(like.shape[:2]):
                raise ValueError(f"prompt_positions must be a (batch, seq) bool mask of shape {tuple(like.shape[:2])}, "
                                 f"got shape {tuple(prompt_positions.shape)}")
            prompt_positions = prompt_positions.to(like.device)
        return template_slots(P, prompt_positions=prompt_positions)
    if input_ids is None:
        raise ValueError(f"the template is marked by prompt_token_id={token} in input_ids; with inputs_embeds pass "
                         "prompt_positions (a bool mask) instead")
    return template_slots(P, input_ids, prompt_token_id=token)


def _place_prompt(inputs_embeds: torch.Tensor, table: torch.Tensor, index: torch.Tensor | None,
                  slots: torch.Tensor) -> torch.Tensor:
    """Caller-made embeddings with the prompt's tokens written at the template's positions."""
    batch = inputs_embeds.shape[0]
    prompts = table.unsqueeze(0).expand(batch, -1, -1) if index is None else table[index]
    picked = prompts.gather(1, slots.clamp(min=0).unsqueeze(-1).expand(-1, -1, prompts.shape[-1]))
    return torch.where((slots >= 0).unsqueeze(-1), picked.to(inputs_embeds.dtype), inputs_embeds)


def _is_seq_cls(config: PeftConfig) -> bool:
    t = config.task_type
    return (t.value if hasattr(t, "value") else t) == "SEQ_CLS"


# ---------------------------------------------------------------------------------------------- forward
def forward(peft_model: nn.Module, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
            inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
            prompt_index: torch.Tensor | None = None, adapters: list[str] | None = None,
            prompt_positions: torch.Tensor | None = None, **kwargs: Any):
    """The base model's output with the active adapter's prompt (or, with `prompt_index`, each row's),
    prepended or (a template: `prompt_positions`, or the config's `prompt_token_id`) in place."""
    config = peft_model.active_peft_config
    model = peft_model.base_model
    batch = _batch_size(input_ids, inputs_embeds)
    table, index = _tables(peft_model, prompt_index, adapters, batch)
    P = table.shape[-2]
    slots = _template(config, input_ids, inputs_embeds, prompt_positions)
    if seq2seq.is_encoder_decoder(model):
        return seq2seq.forward(peft_model, table, index, _is_prefix(config), input_ids=input_ids,
                               attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
                               slots=slots, **kwargs)
    seq_cls = _is_seq_cls(config)
    if kwargs.get("token_type_ids") is not None and not seq_cls:
        warnings.warn("Token type ids are not supported for parameter efficient tuning. Ignoring token type ids")
        kwargs["token_type_ids"] = None
    if slots is not None:  # a template: the prompt in place of the markers, every length unchanged
        if inputs_embeds is None:
            inputs_embeds = soft_prompt_embed(input_ids, model.get_input_embeddings().weight, table, index, slots=slots)
        else:
            inputs_embeds = _place_prompt(inputs_embeds, table, index, slots)
        if labels is not None and not seq_cls and tuple(labels.shape) == tuple(slots.shape):
            labels = labels.masked_fill(slots >= 0, -100)  # a virtual token is no target
        return model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    if _is_prefix(config):
        if model.training and torch.is_grad_enabled() and _checkpointing(model):
            raise ValueError("PREFIX_TUNING does not work with gradient checkpointing (as in PEFT)")
        kwargs["position_ids"] = _prefix_positions(kwargs.get("position_ids"), find_cache(kwargs),
                                                   input_ids if input_ids is not None else inputs_embeds, P,
                                                   _device(input_ids, inputs_embeds))
        with attn.prefix_context(_prefix_kv(table, config), index, model.config):
            return model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                         labels=labels, **kwargs)

    if kwargs.get("position_ids") is not None:
        warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.")
        kwargs["position_ids"] = None
    if kwargs.get("token_type_ids") is not None:
        zeros = kwargs["token_type_ids"].new_zeros(batch, P)
        kwargs["token_type_ids"] = torch.cat([zeros, kwargs["token_type_ids"]], dim=1)
    word_weight = model.get_input_embeddings().weight
    if inputs_embeds is None:
        inputs_embeds = soft_prompt_embed(input_ids, word_weight, table, index)
    else:
        # caller-made embeddings: nothing to gather, so the prompt is prepended directly
        prompts = table.unsqueeze(0).expand(batch, -1, -1) if index is None else table[index]
        inputs_embeds = torch.cat([prompts.to(inputs_embeds.dtype), inputs_embeds], dim=1)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.new_ones(batch, P), attention_mask], dim=1)
    if labels is not None and not seq_cls:
        labels = torch.cat([labels.new_full((batch, P), -100), labels], dim=1)
    return model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)


def _checkpointing(model: nn.Module) -> bool:
    # recomputation in the backward would run outside the prefix context, so it is refused (PEFT refuses too).
    # transformers' gradient_checkpointing_enable sets the flag on the instances; reading the instance dicts
    # spares a getattr that fails through nn.Module.__getattr__ on every other module (~0.1 ms a step)
    return any(m.__dict__.get("gradient_checkpointing") is True or type(m).__dict__.get("gradient_checkpointing") is True
               for m in model.modules())


def _device(input_ids, inputs_embeds) -> torch.device:
    return (input_ids if input_ids is not None else inputs_embeds).device


def _prefix_positions(position_ids, cache, tokens, P: int, device) -> torch.Tensor:
    """Position ids of the real tokens, shifted by P (PEFT's prefix occupies positions 0..P-1)."""
    if position_ids is not None:
        return position_ids + P
    past = cache_length(cache)
    return torch.arange(past + P, past + P + tokens.shape[1], device=device).unsqueeze(0)


# ---------------------------------------------------------------------------------------------- generate
def generate(peft_model: nn.Module, *args: Any, prompt_index: torch.Tensor | None = None,
             adapters: list[str] | None = None, prompt_positions: torch.Tensor | None = None, **kwargs: Any):
    """`base_model.generate` with the prompt: prefix tuning reads the prefix in every attention call
    (prefill and each T=1 decode step; the KV cache holds only real tokens); prompt tuning / P-tuning
    prepend the soft prompt at the first step, then decode normally; a template (`prompt_positions` or
    the config's `prompt_token_id`) is embedded in place at the first step (later steps hold no markers)."""
    config = peft_model.active_peft_config
    model = peft_model.base_model
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is None:
        raise ValueError("prompt-learning generate needs input_ids")
    with torch.no_grad():
        table, index = _tables(peft_model, prompt_index, adapters, input_ids.shape[0])
    P = table.shape[-2]
    slots = _template(config, input_ids, None, prompt_positions)
    if seq2seq.is_encoder_decoder(model):
        return seq2seq.generate(peft_model, table, index, _is_prefix(config), *args, slots=slots, **kwargs)
    if _is_prefix(config):
        prepare = _prefix_prepare(model, P)
        ctx = attn.prefix_context(_prefix_kv(table, config), index, model.config)
    elif slots is not None:
        prepare = _template_prepare(model, table, index, slots)
        ctx = contextlib.nullcontext()
    else:
        prepare = _prompt_prepare(model, table, index, P)
        ctx = contextlib.nullcontext()
        if _static_requested(model, kwargs):
            # a preallocated cache sized for the prompt too: transformers sizes it for the real tokens only
            kwargs = _with_static_cache(model, kwargs, input_ids.shape[1], P)
    with ctx, patched_prepare(model, prepare):
        return model.generate(*args, **kwargs)


def _static_requested(model: nn.Module, kwargs: dict) -> bool:
    """Whether this generate asks for transformers' preallocated ("static") KV cache."""
    if "cache_implementation" in kwargs:
        return kwargs["cache_implementation"] == "static"
    gen = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return getattr(gen, "cache_implementation", None) == "static"


def _with_static_cache(model: nn.Module, kwargs: dict, tokens: int, P: int) -> dict:
    """kwargs with a `StaticCache` of P + tokens + new tokens slots passed as the generate's own cache (and
    cache_implementation cleared, which transformers refuses beside a user cache)."""
    from transformers import StaticCache

    gen = kwargs.get("generation_config") or model.generation_config
    new = kwargs.get("max_new_tokens", getattr(gen, "max_new_tokens", None))
    if new is None:
        max_length = kwargs.get("max_length", getattr(gen, "max_length", None))
        if max_length is None:
            raise ValueError("generate with a static cache needs max_new_tokens (or max_length)")
        new = max(0, int(max_length) - int(tokens))
    kwargs = dict(kwargs)
    kwargs["cache_implementation"] = None
    cache = StaticCache(config=model.config, max_cache_len=int(P) + int(tokens) + int(new))
    cache._fastpeft_sized = True  # holds the prompt's slots: _prompt_prepare takes it
    kwargs[cache_argument(model)] = cache
    return kwargs


def _prefix_prepare(model: nn.Module, P: int):
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters

    def make(base_prepare):
        def prepare(*args, **kwargs):
            inputs = base_prepare(*args, **kwargs)
            cache = find_cache(inputs)
            if cache is not None and getattr(cache, "is_compileable", False):
                # a preallocated cache: the attention needs the 2-D padding mask over the tokens written so far
                # (its length tells the cache's unwritten slots apart, see transformers_attention)
                mask = inputs.get("attention_mask")
                if isinstance(mask, dict) or mask is None or mask.dim() != 2:
                    mask = kwargs.get("attention_mask")
                if mask is None or mask.dim() != 2:
                    raise NotImplementedError("prefix tuning generate with a static cache needs a 2-D attention mask")
                inputs["attention_mask"] = mask
            if not takes_positions:
                return inputs
            tokens = inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs.get("inputs_embeds")
            if inputs.get("position_ids") is not None:
                inputs["position_ids"] = inputs["position_ids"] + P
            elif inputs.get("cache_position") is not None:
                inputs["position_ids"] = (inputs["cache_position"] + P).unsqueeze(0)
            else:
                inputs["position_ids"] = _prefix_positions(None, find_cache(inputs), tokens, P,
                                                           tokens.device)
            return inputs
        return prepare
    return make


def _refuse_static_cache(cache: Any, method: str) -> None:
    """A preallocated (static, compileable) KV cache holds max_cache_len key slots whatever has been
    written, which the prompt methods' position and visibility arithmetic does not account for: refused by
    name rather than decoded wrong."""
    if cache is not None and getattr(cache, "is_compileable", False):
        raise NotImplementedError(f"{method} generate needs a dynamic KV cache; {type(cache).__name__} "
                                  "(cache_implementation='static' and other preallocated caches) is not supported")


def _prompt_prepare(model: nn.Module, table: torch.Tensor, index: torch.Tensor | None, P: int):
    word_weight = model.get_input_embeddings().weight

    def make(base_prepare):
        def prepare(*args, **kwargs):
            inputs = base_prepare(*args, **kwargs)
            # the soft prompt goes in exactly once: at the step whose cache is still empty (every step
            # when there is no cache at all, since each then recomputes the whole sequence)
            cache = find_cache(inputs)
            if cache is not None and getattr(cache, "is_compileable", False) \
                    and not getattr(cache, "_fastpeft_sized", False):
                _refuse_static_cache(cache, "prompt tuning / P-tuning")
            ids = inputs.get("input_ids")
            if ids is None:
                raise NotImplementedError("prompt-learning generate needs input_ids (not inputs_embeds)")
            seen = cache_length(cache)
            if cache is not None and seen >= ids.shape[1]:
                ids = inputs["input_ids"] = ids[:, -1:]
            mask = inputs.get("attention_mask")
            if isinstance(mask, dict) or (mask is not None and mask.dim() != 2):
                # a mask transformers prepared for a preallocated cache lacks the prompt: the step's 2-D padding
                # mask instead, from which the model builds its own (prompt included)
                mask = kwargs.get("attention_mask")
                if mask is None or mask.dim() != 2:
                    raise NotImplementedError("prompt-learning generate needs a 2-D attention mask")
            if mask is not None:
                inputs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], P), mask], dim=1)
            inputs["position_ids"] = None  # as PEFT: positions come from the cache length
            if inputs.get("token_type_ids") is not None:
                inputs["token_type_ids"] = None
            if seen == 0:
                inputs["inputs_embeds"] = soft_prompt_embed(ids, word_weight, table, attn._rows(index, ids.shape[0]))
                inputs["input_ids"] = None
            inputs.pop("cache_position", None)
            return inputs
        return prepare
    return make


def _template_prepare(model: nn.Module, table: torch.Tensor, index: torch.Tensor | None, slots: torch.Tensor):
    """A template changes no length: transformers' own mask, position and cache handling stay as they are;
    the step whose cache is empty (the prefill, or every step of a generate without a cache) gets the
    templated embeddings in place of its ids.  Later steps hold generated tokens only: plain ids."""
    word_weight = model.get_input_embeddings().weight

    def make(base_prepare):
        def prepare(*args, **kwargs):
            inputs = base_prepare(*args, **kwargs)
            cache = find_cache(inputs)  # any cache, preallocated ones too: a template changes no length
            if cache_length(cache) > 0:
                return inputs
            ids = inputs.get("input_ids")
            if ids is None:
                raise NotImplementedError("prompt-learning generate needs input_ids (not inputs_embeds)")
            step = slots
            if ids.shape[0] != step.shape[0]:  # num_return_sequences / num_beams repeat each row
                if ids.shape[0] % step.shape[0]:
                    raise ValueError(f"the template has {step.shape[0]} rows but generate runs {ids.shape[0]}")
                step = step.repeat_interleave(ids.shape[0] // step.shape[0], dim=0)
            if ids.shape[1] > step.shape[1]:  # no cache: the generated tail is words
                step = torch.cat([step, step.new_full((step.shape[0], ids.shape[1] - step.shape[1]), -1)], dim=1)
            elif ids.shape[1] < step.shape[1]:
                raise NotImplementedError(f"the prefill step holds {ids.shape[1]} of the template's {step.shape[1]} "
                                          "positions")
            rows = attn._rows(index, ids.shape[0])
            inputs["inputs_embeds"] = soft_prompt_embed(ids, word_weight, table, rows, slots=step.to(ids.device))
            inputs["input_ids"] = None
            return inputs
        return prepare
    return make


# ---------------------------------------------------------------------------------------------- save / load
def state_dict_to_save(peft_model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """{"prompt_embeddings": the encoder's output table}, as PEFT saves it (for prefix projection and
    P-tuning that is the encoded table, not the encoder's parameters)."""
    with torch.no_grad():
        table = peft_model.prompt_encoder[adapter_name].table()
    return {"prompt_embeddings": table.detach().cpu()}


def load_state(peft_model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Pop "prompt_embeddings" from `tensors` into the adapter's `embedding` (PEFT's loading: in inference
    mode the encoder is just an embedding holding the saved table)."""
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"{source} has no 'prompt_embeddings' tensor (it holds {sorted(tensors)[:5]}); "
                         f"it is not a prompt-learning adapter file")
    value = tensors.pop("prompt_embeddings")
    config = peft_model.peft_config[adapter_name]
    encoder = peft_model.prompt_encoder[adapter_name]
    weight = encoder.embedding.weight
    if tuple(value.shape) != tuple(weight.shape):
        hint = ""
        if isinstance(encoder, PrefixEncoder) and encoder.prefix_projection:
            hint = " (a prefix_projection adapter holds the projected prefix: load it with is_trainable=False)"
        raise ValueError(f"{source}: 'prompt_embeddings' has shape {tuple(value.shape)} but the "
                         f"{config.peft_type.value} adapter {adapter_name!r} expects {tuple(weight.shape)} "
                         f"(num_virtual_tokens={config.num_virtual_tokens}, token_dim={config.token_dim}, "
                         f"num_layers={config.num_layers}){hint}")
    if isinstance(config, PromptEncoderConfig) and not config.inference_mode:
        warnings.warn(f"{source} holds the encoded P-tuning prompt; loading it as trainable puts it through a fresh "
                      "prompt-encoder MLP again (PEFT does the same); load with is_trainable=False to use it as saved")
    with torch.no_grad():
        weight.copy_(value.to(device=weight.device, dtype=weight.dtype))
