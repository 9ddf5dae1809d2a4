"""Backend registry: which implementation (torch reference, Triton, CUDA C++) runs each op.

Each op registers implementations under a backend name with a `supports(*args)` predicate that
returns None when the implementation applies or a short reason when it does not.  Selection:

* `FASTPEFT_BACKEND` / `set_backend(name)` forces a backend for every op that has it; where the
  forced backend does not apply to a call (CPU tensors for a GPU kernel, say) the reference runs
  and a warning says why, once per (op, reason).
* otherwise the highest-priority backend that applies wins; the torch reference always applies.

`last_backend(op)` tells which backend ran an op last: tests use it to prove a kernel really ran.

"torch" is the production path where no kernel applies (torch's fused primitives and RNG);
"torch_philox" is the specification the kernels are tested against (the same math, dropout drawn
from the kernels' counter-based Philox stream, bit for bit).  It is only ever used when forced.

`select_cached(op, key, *args)` is what the eager hot path calls: the choice is remembered per
(op, forced backend, `key`), where `key` must cover everything the ops' `supports` predicates read.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

BACKENDS = ("torch", "triton", "cuda")
# backends that exist only to be forced (by tests, or to reproduce the kernels on a CPU)
REFERENCE_BACKENDS = ("torch_philox",)


@dataclass(frozen=True)
class Impl:
    backend: str
    priority: int
    supports: Callable[..., str | None]
    fns: dict[str, Callable[..., Any]]


_REGISTRY: dict[str, dict[str, Impl]] = {}
_LAST: dict[str, str] = {}
_WARNED: set[tuple[str, str]] = set()
_forced: str | None = None
_CHOICE: dict[tuple, Impl] = {}


def _check_name(name: str | None) -> str | None:
    if name in (None, "", "auto"):
        return None
    if name not in BACKENDS and name not in REFERENCE_BACKENDS:
        raise ValueError(f"unknown fastpeft backend {name!r}; expected one of {BACKENDS + REFERENCE_BACKENDS} "
                         f"or 'auto'")
    return name


def register(op: str, backend: str, *, priority: int, supports: Callable[..., str | None] | None = None,
             **fns: Callable[..., Any]) -> None:
    """Register `fns` (e.g. forward=..., backward=...) as `backend`'s implementation of `op`."""
    _check_name(backend)
    _REGISTRY.setdefault(op, {})[backend] = Impl(backend, priority, supports or (lambda *a, **k: None), fns)
    _CHOICE.clear()


def set_backend(name: str | None) -> None:
    """Force one backend for every op ("torch", "triton", "cuda"); None or "auto" restores automatic choice."""
    global _forced
    _forced = _check_name(name)


def get_backend() -> str | None:
    """The forced backend, or None when each call picks automatically."""
    if _forced is not None:
        return _forced
    try:
        return _check_name(os.environ.get("FASTPEFT_BACKEND"))
    except ValueError as err:
        raise ValueError(f"environment variable FASTPEFT_BACKEND: {err}") from None


# os.environ's own dict (encoded keys): reading it directly costs a twentieth of os.environ.get, which
# matters on the eager hot path; os.environ[...] = / pytest's monkeypatch.setenv write through to it
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("FASTPEFT_BACKEND") if _ENV_DATA is not None else None


def torch_or_auto() -> bool:
    """Whether the backend is chosen automatically or "torch" is forced: the eager CPU fast paths' test
    (on a CPU both give the torch path), cheaper than `get_backend()`, which validates the variable."""
    if _forced is not None:
        return _forced == "torch"
    if _ENV_DATA is not None and not _ENV_DATA.get(_ENV_KEY):
        return True
    return get_backend() in (None, "torch")


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager form of `set_backend`."""
    global _forced
    previous = _forced
    _forced = _check_name(name)
    try:
        yield
    finally:
        _forced = previous


def available(op: str) -> list[str]:
    """Backends registered for `op`, best first."""
    impls = sorted(_REGISTRY.get(op, {}).values(), key=lambda i: -i.priority)
    return [i.backend for i in impls]


def select(op: str, *args: Any) -> Impl:
    """The implementation of `op` to run for these arguments."""
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    forced = get_backend()
    chosen: Impl | None = None
    if forced is not None:
        impl = impls.get(forced)
        reason = "not built for this op" if impl is None else impl.supports(*args, forced=True)
        if reason is None:
            chosen = impl
        elif (op, reason) not in _WARNED:
            _WARNED.add((op, reason))
            warnings.warn(f"fastpeft: backend {forced!r} does not apply to {op} here ({reason}); "
                          f"using the torch reference", stacklevel=3)
    if chosen is None and forced is None:
        for impl in sorted(impls.values(), key=lambda i: -i.priority):
            if impl.supports(*args, forced=False) is None:
                chosen = impl
                break
    if chosen is None:
        chosen = impls["torch"]
    _LAST[op] = chosen.backend
    return chosen


def select_cached(op: str, key: tuple, *args: Any) -> Impl:
    """`select(op, *args)`, remembered per (op, forced backend, key): the eager hot path's choice.

    `key` must hold every property of the arguments that a `supports` predicate of `op` reads
    (device type, dtypes, size limits); the forced backend and TRITON_INTERPRET are added here."""
    forced = get_backend()
    full = (op, forced, os.environ.get("TRITON_INTERPRET") if forced is not None else None, key)
    impl = _CHOICE.get(full)
    if impl is None:
        impl = select(op, *args)
        _CHOICE[full] = impl
    _LAST[op] = impl.backend
    return impl


def last_backend(op: str) -> str | None:
    """Which backend ran `op` most recently in this process."""
    return _LAST.get(op)


def why_not(op: str, backend: str, *args: Any) -> str | None:
    """Why `backend` would not run `op` for these arguments (None if it would)."""
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        return "not registered"
    return impl.supports(*args, forced=True)
