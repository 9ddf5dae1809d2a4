"""Generation across transformers releases.

transformers up to 5.23 passes the KV cache to `forward` and `prepare_inputs_for_generation` as
`past_key_values` and returns it in `outputs.past_key_values`; 5.24 renamed both to `cache` (the old
keyword is accepted, with a deprecation warning, until 5.40) and stopped passing `cache_position`.
Code that tells the prefill step from the decode steps must look under both names, and must never
take "no cache found" to mean "first step".
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator, Mapping

CACHE_NAMES = ("cache", "past_key_values")  # newest first


def find_cache(inputs: Mapping[str, Any]) -> Any | None:
    """The KV cache in a forward's / prepare_inputs_for_generation's keyword arguments, under
    whichever name this transformers release uses (None when there is none)."""
    for name in CACHE_NAMES:
        value = inputs.get(name)
        if value is not None:
            return value
    return None


def cache_length(cache: Any) -> int:
    """Tokens already in `cache` (0 for None or an empty cache); legacy tuple caches included."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0


def output_cache(outputs: Any) -> Any | None:
    """The cache a model output carries (`outputs.cache` from 5.24, `outputs.past_key_values` before)."""
    for name in CACHE_NAMES:
        value = getattr(outputs, name, None)
        if value is not None:
            return value
    return None


def cache_argument(model: Any) -> str:
    """The keyword `model.forward` takes its cache under on this transformers release."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@contextlib.contextmanager
def patched_prepare(model: Any, make: Callable[[Callable], Callable]) -> Iterator[None]:
    """For the duration: `model.prepare_inputs_for_generation` = make(the current one), then put back
    exactly as it was (an instance attribute restored, the class's method uncovered)."""
    had = "prepare_inputs_for_generation" in model.__dict__
    previous = model.__dict__.get("prepare_inputs_for_generation")
    model.prepare_inputs_for_generation = make(model.prepare_inputs_for_generation)
    try:
        yield
    finally:
        if had:
            model.prepare_inputs_for_generation = previous
        else:
            del model.prepare_inputs_for_generation
