"""Prefix tuning through transformers' attention registry.

PEFT puts the prefix into `past_key_values`; fastpeft keeps it out of the KV cache and hands it to
`fastpeft.ops.prefix_attention` instead.  `install(model)` switches the model to the attention
implementation registered here under `NAME`; `prefix_context(...)` makes one prefix visible to that
model's attention layers for the duration of a forward (or a whole `generate`).  Outside such a
block the implementation is plain SDPA, so the base model behaves as without the adapter.

The registered mask function hands the attention the 2-D padding mask over the real keys
(B, kv_len) instead of a 4-D mask: the prefix is always visible and `prefix_attention` applies the
causal rule itself (lower-right aligned, so KV-cache decoding works).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..ops import prefix_attention

NAME = "fastpeft_prefix"


@dataclass(frozen=True)
class PrefixState:
    """kv: (L, 2, Hkv, P, D), or (L, 2, N, Hkv, P, D) with index (B,) choosing each row's prefix."""

    kv: torch.Tensor
    index: torch.Tensor | None
    configs: tuple  # the model's config (and text sub-config): whose attention layers this prefix is for


# The prefix in force: a ContextVar in eager mode (thread- and task-safe); inside a torch.compile
# trace, which cannot trace ContextVar.set, a plain stack that the compiled graph sets and reads.
_STATE: contextvars.ContextVar[PrefixState | None] = contextvars.ContextVar("fastpeft_prefix_state", default=None)
_TRACED: list[PrefixState] = []
# the eager contexts' states, for a compiled forward called inside one (generate with a compiled model): read
# by the graph as a guarded constant; more than one different state at once is refused by name
_EAGER: list[PrefixState] = []


def _active(config: Any) -> PrefixState | None:
    if torch.compiler.is_compiling():
        # a prefix set inside the traced region, else one set in eager around a compiled forward (generate
        # with a compiled model: the state is a constant of the graph, guarded)
        if _TRACED:
            state = _TRACED[-1]
        elif _EAGER:
            state = _EAGER[-1]
            if any(other is not state for other in _EAGER):  # another thread's (or an outer) prefix as well
                raise RuntimeError("several different prefixes are active around a compiled forward (prefix "
                                   "contexts in two threads, or nested); a compiled graph cannot tell whose it is: "
                                   "run one prefix context at a time, or call the compiled model inside it")
        else:
            state = None
    else:
        state = _STATE.get()
    if state is None or (config is not None and not any(c is config for c in state.configs)):
        return None
    return state


@contextlib.contextmanager
def prefix_context(kv: torch.Tensor, index: torch.Tensor | None, config: Any) -> Iterator[None]:
    """Make `kv` the prefix read by the attention layers of the model with `config` inside the block."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    state = PrefixState(kv, index, (config, text))
    if torch.compiler.is_compiling():
        _TRACED.append(state)
        try:
            yield
        finally:
            _TRACED.pop()
        return
    token = _STATE.set(state)
    _EAGER.append(state)
    try:
        yield
    finally:
        for i in range(len(_EAGER) - 1, -1, -1):  # by identity (a state's == would compare its tensors)
            if _EAGER[i] is state:
                del _EAGER[i]
                break
        _STATE.reset(token)


def _rows(index: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    # generate() with num_return_sequences / num_beams repeats each row
    if index is None or index.shape[0] == batch:
        return index
    if batch % index.shape[0]:
        raise ValueError(f"prompt_index has {index.shape[0]} rows but the attention sees a batch of {batch}")
    return index.repeat_interleave(batch // index.shape[0])


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any):
    """transformers attention function: prefix_attention while a prefix is active, SDPA otherwise."""
    state = _active(getattr(module, "config", None))
    if state is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    if args:
        raise TypeError("fastpeft prefix attention expects keyword arguments after attention_mask")
    if kwargs.get("dropout", 0.0):
        raise NotImplementedError("attention dropout is not supported with prefix tuning; set attention_dropout=0")
    layer = getattr(module, "layer_idx", None)
    num_layers = state.kv.shape[0]
    if layer is None or not 0 <= layer < num_layers:
        raise ValueError(f"attention layer index {layer} has no prefix: the adapter has {num_layers} layers "
                         f"(PrefixTuningConfig.num_layers)")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise NotImplementedError(f"prefix tuning needs a 2-D padding mask, got a {attention_mask.dim()}-D attention "
                                  "mask (custom 4-D masks are not supported)")
    if attention_mask is not None and attention_mask.shape[1] < key.shape[2]:
        # a preallocated (static) cache: its slots past the tokens written so far hold nothing yet; the padding
        # mask covers exactly the written ones (a shape, not a value: no host read, traceable)
        written = attention_mask.shape[1]
        key, value = key[:, :, :written], value[:, :, :written]
    window = kwargs.get("sliding_window")
    P = state.kv.shape[-2]
    if window is not None and key.shape[2] + P > window:
        raise NotImplementedError(f"sequence ({key.shape[2]} tokens + {P} prefix) exceeds the sliding window "
                                  f"({window}); prefix tuning with sliding-window attention is not supported")
    prefix_k, prefix_v = state.kv[layer, 0].to(query.dtype), state.kv[layer, 1].to(query.dtype)
    out = prefix_attention(query, key, value, prefix_k, prefix_v, causal=bool(getattr(module, "is_causal", True)),
                           attention_mask=attention_mask, prefix_index=_rows(state.index, query.shape[0]),
                           scale=kwargs.get("scaling"))
    return out.transpose(1, 2).contiguous(), None


def mask_function(*args: Any, **kwargs: Any):
    """transformers mask function: the (B, kv_len) padding mask while a prefix is active (None when
    nothing is padded), SDPA's mask otherwise.  Arguments are passed through untouched because their
    names differ across transformers versions (q_length vs cache_position)."""
    if _active(kwargs.get("config")) is None:
        from transformers.masking_utils import sdpa_mask

        return sdpa_mask(*args, **kwargs)
    attention_mask = kwargs.get("attention_mask")
    if attention_mask is None:
        return None
    kv_length = kwargs["kv_length"] if "kv_length" in kwargs else args[2]
    # a static cache's kv_length is its size: the mask then covers the written tokens only (attention_forward
    # reads its length to leave the unwritten slots out)
    attention_mask = attention_mask[:, -kv_length:].bool()
    if not torch.compiler.is_compiling() and attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None  # nothing padded: the kernel skips the mask (a data-dependent shortcut, eager only)
    return attention_mask


_registered = False


def register() -> None:
    """Register `NAME` with transformers' attention and mask registries (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_function)
    _registered = True


def install(model: torch.nn.Module) -> None:
    """Switch `model` to the prefix-aware attention implementation."""
    register()
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"prefix tuning needs a transformers model, got {type(model).__name__}")
    if getattr(config, "is_encoder_decoder", False):
        # one prefix per layer index would be read by encoder, decoder and cross attention alike
        raise NotImplementedError(f"prefix tuning on encoder-decoder models ({type(model).__name__}) is not supported "
                                  "by fastpeft")
    if not getattr(model, "_supports_attention_backend", False):
        raise NotImplementedError(f"{type(model).__name__} does not route its attention through transformers' "
                                  "AttentionInterface, so fastpeft cannot apply a prefix to it")
    previous = getattr(config, "_attn_implementation", None)
    if previous == NAME:
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)
        model._fastpeft_previous_attn = previous  # restored by uninstall()
    if getattr(config, "_attn_implementation", None) != NAME:
        raise NotImplementedError(f"{type(model).__name__} does not use transformers' AttentionInterface, so fastpeft "
                                  "cannot route prefix tuning through prefix_attention for it")


def uninstall(model: torch.nn.Module) -> None:
    """Give `model` back the attention implementation it had before `install`."""
    previous = model.__dict__.pop("_fastpeft_previous_attn", None)
    if previous is not None and getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME:
        model.set_attn_implementation(previous)
