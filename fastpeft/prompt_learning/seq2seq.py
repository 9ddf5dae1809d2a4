"""Prompt learning on encoder-decoder models (T5, BART and those built like them), as PEFT's
`PeftModelForSeq2SeqLM` does it, with PEFT's table layout and files.

* prompt tuning / P-tuning: the table has num_virtual_tokens × num_transformer_submodules rows
  (2P for seq2seq, PEFT's layout; P-tuning's LSTM runs over all 2P); the first P rows go in front of
  the encoder's input embeddings and the encoder's attention mask is prefixed with ones.  As in PEFT
  the decoder gets no prompt (the other P rows are saved, and train to zero gradient).
* prefix tuning: PEFT builds (L, 4) key/value blocks (decoder self-attention and cross-attention,
  from the table concatenated with itself: see `peft_block` for which block each layer reads), then
  empties the cross-attention cache, so only the decoder's self-attention sees the prefix: its keys/values are the first P entries of the self-attention cache (T5 gives them
  relative positions 0..P-1, BART's decoder positions start at P).  fastpeft puts the same prefix in
  the same place (a fresh cache per forward; at the prefill step of `generate`), which is correct for
  any attention (T5's relative-bias attention included).  The encoder and the cross-attention get no
  prefix; that is PEFT's layout, and its files are what fastpeft reads and writes.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import nn

from ..integrations.generation import CACHE_NAMES, cache_length, find_cache, patched_prepare
from ..ops import soft_prompt_embed

__all__ = ["is_encoder_decoder", "check_model", "forward", "generate"]


def is_encoder_decoder(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_encoder_decoder", False))


def _task(config: Any) -> Any:
    t = getattr(config, "task_type", None)
    return getattr(t, "value", t)


def _decoder_layers(text: Any) -> int | None:
    for name in ("num_decoder_layers", "decoder_layers"):
        value = getattr(text, name, None)
        if isinstance(value, int):
            return value
    return None


def check_model(model: nn.Module, config: Any) -> None:
    """An encoder-decoder model takes task_type SEQ_2_SEQ_LM (and only such a model does); a prefix
    needs PEFT's seq2seq layout (num_transformer_submodules=2, one block per decoder layer)."""
    seq2seq = is_encoder_decoder(model)
    task = _task(config)
    if seq2seq and task != "SEQ_2_SEQ_LM":
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model: prompt learning on it needs "
                         f"task_type='SEQ_2_SEQ_LM' (got {task!r}): PEFT's seq2seq layout (num_transformer_submodules=2), "
                         "the prompt going to the encoder and labels to the decoder, as in PEFT's PeftModelForSeq2SeqLM")
    if not seq2seq and task == "SEQ_2_SEQ_LM":
        raise ValueError(f"task_type='SEQ_2_SEQ_LM' needs an encoder-decoder model (config.is_encoder_decoder), "
                         f"got {type(model).__name__}")
    if not seq2seq:
        return
    kind = getattr(config.peft_type, "value", config.peft_type)
    if kind == "PREFIX_TUNING":
        if config.num_transformer_submodules != 2:
            raise ValueError("prefix tuning on an encoder-decoder model needs num_transformer_submodules=2 (PEFT's "
                             f"seq2seq layout), got {config.num_transformer_submodules}")
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        decoder = _decoder_layers(text)
        if decoder is not None and decoder != config.num_layers:
            raise ValueError(f"the prefix has num_layers={config.num_layers} blocks but {type(model).__name__}'s decoder "
                             f"has {decoder} layers (PEFT reads num_layers from the encoder; set num_layers={decoder})")
    elif config.num_transformer_submodules not in (1, 2):
        raise ValueError(f"num_transformer_submodules must be 1 or 2 on an encoder-decoder model, got "
                         f"{config.num_transformer_submodules}")


def _encoder_embeds(model: nn.Module, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                    table: torch.Tensor, index: torch.Tensor | None, slots: torch.Tensor | None = None) -> torch.Tensor:
    """[prompt ; word embeddings] for the encoder (or, a template's `slots` given, the prompt's tokens at
    the template's positions): one gather where the embedding is a plain lookup, otherwise the embedding
    module's own output (e.g. BART's scaled embedding) with the prompt in front / in place."""
    embedding = model.get_input_embeddings()
    if inputs_embeds is None and type(embedding).forward is nn.Embedding.forward:
        return soft_prompt_embed(input_ids, embedding.weight, table, index, slots=slots)
    if inputs_embeds is None:
        # a marker id need not be a word: the embedding module never sees one
        inputs_embeds = embedding(input_ids if slots is None else input_ids.masked_fill(slots >= 0, 0))
    batch = inputs_embeds.shape[0]
    prompts = table.unsqueeze(0).expand(batch, -1, -1) if index is None else table[index]
    if slots is not None:
        picked = prompts.gather(1, slots.clamp(min=0).unsqueeze(-1).expand(-1, -1, prompts.shape[-1]))
        return torch.where((slots >= 0).unsqueeze(-1), picked.to(inputs_embeds.dtype), inputs_embeds)
    return torch.cat([prompts.to(inputs_embeds.dtype), inputs_embeds], dim=1)


def _prefix_kv(table: torch.Tensor, index: torch.Tensor | None, config: Any, batch: int,
               dtype: torch.dtype | None) -> torch.Tensor:
    """(L, 2, B, H, P, D): each row's decoder self-attention prefix, PEFT's flat layout (layer, k/v, head, dim)."""
    L, H = config.num_layers, config.num_attention_heads
    D = config.token_dim // H
    rows = table.unsqueeze(0).expand(batch, -1, -1) if index is None else table[index]
    kv = rows.reshape(batch, rows.shape[1], L, 2, H, D).permute(2, 3, 0, 4, 1, 5)
    return kv if dtype is None else kv.to(dtype)


def _prefix_cache(kv: torch.Tensor, cache: Any = None) -> Any:
    """An EncoderDecoderCache whose self-attention part holds the prefix (a new one, or `cache` filled
    in place when it is an empty EncoderDecoderCache, as generate's is at its prefill step)."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    if cache is None:
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    if not isinstance(cache, EncoderDecoderCache):
        raise NotImplementedError(f"prefix tuning on an encoder-decoder model needs an EncoderDecoderCache, got "
                                  f"{type(cache).__name__}")
    L = kv.shape[0]
    for layer in range(L):
        block = peft_block(layer, L)
        cache.self_attention_cache.update(kv[block, 0], kv[block, 1], layer)
    return cache


def peft_block(layer: int, num_layers: int) -> int:
    """The (k, v) block of the saved prefix that decoder layer `layer` reads in PEFT's seq2seq layout.
    PEFT views the table as (P, 2L, H, D), concatenates it with itself to (P, 4L, H, D) and splits that
    into L groups of four [self k, self v, cross k, cross v]; so layer i's self-attention takes block
    (2i mod L) and its cross-attention block (2i+1 mod L), which PEFT then drops (it empties the
    cross-attention cache).  With L layers, blocks 2i mod L are read and the others train to zero."""
    return (2 * layer) % num_layers


def _cache_name(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return next((n for n in CACHE_NAMES if n in params), CACHE_NAMES[-1])


def forward(peft_model: nn.Module, table: torch.Tensor, index: torch.Tensor | None, is_prefix: bool,
            input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
            inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
            decoder_attention_mask: torch.Tensor | None = None, slots: torch.Tensor | None = None, **kwargs: Any):
    """PEFT's seq2seq forward; `table` / `index` from `prompt_learning._tables`; `slots` a template's slot
    map over the encoder's input (the prompt in place, the encoder's mask unchanged)."""
    config = peft_model.active_peft_config
    model = peft_model.base_model
    P = config.num_virtual_tokens
    batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
    for name in ("position_ids", "token_type_ids"):
        if kwargs.get(name) is not None:
            warnings.warn(f"{name} are not supported for parameter efficient tuning on encoder-decoder models. "
                          f"Ignoring {name}.")
            kwargs[name] = None
    if is_prefix:
        if find_cache(kwargs) is not None:
            raise NotImplementedError("prefix tuning on an encoder-decoder model builds its own cache; do not pass one "
                                      "to forward (generate() handles decoding)")
        kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
        if decoder_attention_mask is not None:
            decoder_attention_mask = torch.cat([decoder_attention_mask.new_ones(batch, P), decoder_attention_mask], 1)
        kv = _prefix_kv(table, index, config, batch, getattr(model, "dtype", None))
        kwargs[_cache_name(model)] = _prefix_cache(kv)
        return model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
                     decoder_attention_mask=decoder_attention_mask, **kwargs)
    prompt = table[..., :P, :]
    inputs_embeds = _encoder_embeds(model, input_ids, inputs_embeds, prompt, index, slots)
    if attention_mask is not None and slots is None:
        attention_mask = torch.cat([attention_mask.new_ones(batch, P), attention_mask], dim=1)
    return model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                 decoder_attention_mask=decoder_attention_mask, **kwargs)


def generate(peft_model: nn.Module, table: torch.Tensor, index: torch.Tensor | None, is_prefix: bool,
             *args: Any, slots: torch.Tensor | None = None, **kwargs: Any):
    """PEFT's seq2seq generate: prompt tuning / P-tuning encode [prompt ; input] once; prefix tuning
    puts the prefix into the decoder's self-attention cache at the prefill step."""
    config = peft_model.active_peft_config
    model = peft_model.base_model
    if args:
        kwargs["input_ids"] = args[0]
        if len(args) > 1:
            raise TypeError("pass generate's arguments other than input_ids by keyword")
    input_ids = kwargs.get("input_ids")
    if input_ids is None:
        raise ValueError("prompt-learning generate needs input_ids")
    P = config.num_virtual_tokens
    if not is_prefix:
        if kwargs.pop("encoder_outputs", None) is not None:
            warnings.warn("`encoder_outputs` should not be passed to `generate` when using prompt tuning. Ignoring it.")
        ids = kwargs.pop("input_ids")
        with torch.no_grad():
            kwargs["inputs_embeds"] = _encoder_embeds(model, ids, None, table[..., :P, :], index, slots)
        if kwargs.get("attention_mask") is not None and slots is None:
            mask = kwargs["attention_mask"]
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], P), mask], dim=1)
        return model.generate(**kwargs)
    if kwargs.get("decoder_attention_mask") is not None:
        raise NotImplementedError("prefix-tuning generate on an encoder-decoder model does not take a "
                                  "decoder_attention_mask (the decoder's cache starts with the prefix)")
    uncached = kwargs.get("use_cache") is False or (kwargs.get("use_cache") is None and
                                                     getattr(model.generation_config, "use_cache", True) is False)
    with patched_prepare(model, _prefill_prefix(model, table, index, config, uncached)):
        return model.generate(**kwargs)


def _prefill_prefix(model: nn.Module, table: torch.Tensor, index: torch.Tensor | None, config: Any,
                    uncached: bool):
    """A `prepare_inputs_for_generation` wrapper (for `patched_prepare`) by which the prefill step's (empty)
    cache gets the prefix; `uncached` (generate with use_cache=False): every step gets a fresh cache holding
    only the prefix."""
    def make(base_prepare):
        def prepare(*args, **kwargs):
            return _with_prefix(base_prepare(*args, **kwargs), model, table, index, config, uncached)
        return prepare
    return make


def _with_prefix(inputs: dict, model: nn.Module, table: torch.Tensor, index: torch.Tensor | None, config: Any,
                 uncached: bool) -> dict:
    """`inputs` of one generation step, the prefix put into the decoder's self-attention cache where it starts."""
    cache = find_cache(inputs)
    # the prefix goes in at the prefill step (empty cache), or at every step of a generate without
    # a cache (use_cache=False recomputes the whole decoder sequence each step)
    if uncached or cache_length(cache) == 0:
        decoder_ids = inputs["decoder_input_ids"]
        batch = decoder_ids.shape[0]
        rows = None
        if index is not None:
            from ..integrations.transformers_attention import _rows

            rows = _rows(index, batch)
        with torch.no_grad():
            kv = _prefix_kv(table, rows, config, batch, getattr(model, "dtype", None))
        name = next((n for n in CACHE_NAMES if inputs.get(n) is not None), _cache_name(model))
        if cache is not None and cache_length(cache) == 0 and not uncached:
            _prefix_cache(kv, cache)
        else:
            inputs[name] = _prefix_cache(kv)
    return inputs
