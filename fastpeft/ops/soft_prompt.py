"""soft_prompt_embed: input embeddings with a soft prompt, built in one pass (one gather).

Prepended (PEFT's layout, `slots` None):
    out[b] = [prompt_table[prompt_index[b]] ; embedding_weight[input_ids[b]]], shape (B, P + T, H).
Templated (`slots` (B, T), P-tuning's pseudo tokens anywhere among the real tokens):
    out[b, t] = prompt_table[prompt_index[b]][slots[b, t]] if slots[b, t] >= 0 else embedding_weight[input_ids[b, t]],
    shape (B, T, H): nothing is prepended.  Every row holds each virtual token 0..P-1 exactly once and -1
    at its word positions; the ids at prompt positions (marker ids) are never gathered, so they may lie
    outside the vocabulary.  `template_slots` builds `slots` from a marker id or a position mask.
The output is in embedding_weight's dtype (the prompt is cast, as PEFT casts its prompts to the
embeddings' dtype).  prompt_table is (P, H) for one prompt shared by every row, or (N, P, H) with
prompt_index (B,) choosing each row's prompt.  The backward scatters into the prompt table (from the
prompt positions), and into the word embeddings (from the word positions) only when they require a
gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backend
from ._common import (check, check_same_device, functorch_active, raw_apply, remember_checked, traced_as_aten,
                      value_checks)

OP = "soft_prompt_embed"


def _prompts(prompt_table, prompt_index, batch):
    if prompt_index is None:
        return prompt_table.expand(batch, prompt_table.shape[0], prompt_table.shape[1])
    return prompt_table.index_select(0, prompt_index)  # a negative index raises (indexing would wrap it)


def reference_forward(input_ids, embedding_weight, prompt_table, prompt_index, slots=None):
    prompts = _prompts(prompt_table, prompt_index, input_ids.shape[0])
    if prompts.dtype != embedding_weight.dtype:
        prompts = prompts.to(embedding_weight.dtype)
    if slots is None:
        return torch.cat([prompts, F.embedding(input_ids, embedding_weight)], dim=1)
    is_prompt = slots >= 0
    words = F.embedding(torch.where(is_prompt, 0, input_ids), embedding_weight)  # marker ids are never read
    picked = prompts.gather(1, slots.clamp(min=0).unsqueeze(-1).expand(-1, -1, prompts.shape[-1]))
    return torch.where(is_prompt.unsqueeze(-1), picked, words)


def prompt_positions_of(slots: torch.Tensor, num_virtual_tokens: int) -> torch.Tensor:
    """(B, P) int64: positions[b, p] = the t with slots[b, t] == p (each row holds every p once).
    No host synchronisation: one scatter, word positions landing in a discarded column P."""
    B, T = slots.shape
    P = num_virtual_tokens
    out = torch.zeros((B, P + 1), dtype=torch.long, device=slots.device)
    where = torch.where(slots >= 0, slots, P).long()
    out.scatter_(1, where, torch.arange(T, device=slots.device).expand(B, T))
    return out[:, :P]


def reference_backward(dout, input_ids, prompt_index, num_prompts, prompt_dtype, positions=None):
    """Gradient of the prompt table: (P, H) summed over rows, or (N, P, H) scattered by prompt_index.
    Prepended: the first S - T positions of dout (input_ids is read for its shape only); templated:
    the positions (B, P) of `prompt_positions_of(slots)`."""
    if positions is None:
        dp = dout[:, : dout.shape[1] - input_ids.shape[1]]
    else:
        dp = dout.gather(1, positions.unsqueeze(-1).expand(-1, -1, dout.shape[2]))
    P = dp.shape[1]
    if prompt_index is None:
        return dp.sum(0, dtype=torch.float32).to(prompt_dtype)
    dp = dp.float()
    out = torch.zeros((num_prompts, P, dout.shape[2]), dtype=torch.float32, device=dout.device)
    return out.index_add_(0, prompt_index, dp).to(prompt_dtype)


def reference_embedding_backward(dout, input_ids, num_words, weight_dtype, slots=None):
    """Gradient of the word embeddings (V, H) from the word positions of dout (prepended: the last T;
    templated: those with slots < 0, whose ids only are read)."""
    H = dout.shape[2]
    dw = torch.zeros((num_words, H), dtype=torch.float32, device=dout.device)
    if slots is None:
        P = dout.shape[1] - input_ids.shape[1]
        return dw.index_add_(0, input_ids.reshape(-1), dout[:, P:].reshape(-1, H).float()).to(weight_dtype)
    word = slots < 0
    ids = torch.where(word, input_ids, 0).reshape(-1)
    rows = torch.where(word.unsqueeze(-1), dout.float(), 0.0).reshape(-1, H)  # a where, not a product: NaN-safe
    return dw.index_add_(0, ids, rows).to(weight_dtype)


backend.register(OP, "torch", priority=0, forward=reference_forward, backward=reference_backward,
                 embedding_backward=reference_embedding_backward)
_TORCH_IMPL = backend._REGISTRY[OP]["torch"]
_CHECKED: set[tuple] = set()  # argument shapes the CPU fast path has validated


@torch.library.custom_op("fastpeft::soft_prompt_embed_fwd", mutates_args=())
def _sp_fwd(input_ids: torch.Tensor, embedding_weight: torch.Tensor, prompt_table: torch.Tensor,
            prompt_index: torch.Tensor | None, slots: torch.Tensor | None = None) -> torch.Tensor:
    impl = backend.select(OP, input_ids, embedding_weight, prompt_table, prompt_index)
    if slots is None:
        return impl.fns["forward"](input_ids, embedding_weight, prompt_table, prompt_index)
    return impl.fns["forward"](input_ids, embedding_weight, prompt_table, prompt_index, slots=slots)


@_sp_fwd.register_fake
def _(input_ids, embedding_weight, prompt_table, prompt_index, slots=None):
    B, T = input_ids.shape
    S = T if slots is not None else prompt_table.shape[-2] + T
    return embedding_weight.new_empty((B, S, embedding_weight.shape[1]))


@torch.library.custom_op("fastpeft::soft_prompt_embed_bwd", mutates_args=())
def _sp_bwd(dout: torch.Tensor, input_ids: torch.Tensor, prompt_index: torch.Tensor | None, num_prompts: int,
            prompt_dtype: torch.dtype, positions: torch.Tensor | None = None) -> torch.Tensor:
    impl = backend.select(OP, input_ids, dout, dout, prompt_index)
    if positions is None:
        return impl.fns["backward"](dout, input_ids, prompt_index, num_prompts, prompt_dtype)
    return impl.fns["backward"](dout, input_ids, prompt_index, num_prompts, prompt_dtype, positions=positions)


@_sp_bwd.register_fake
def _(dout, input_ids, prompt_index, num_prompts, prompt_dtype, positions=None):
    P = dout.shape[1] - input_ids.shape[1] if positions is None else positions.shape[1]
    shape = (P, dout.shape[2]) if prompt_index is None else (num_prompts, P, dout.shape[2])
    return dout.new_empty(shape, dtype=prompt_dtype)


@torch.library.custom_op("fastpeft::soft_prompt_embed_wbwd", mutates_args=())
def _sp_wbwd(dout: torch.Tensor, input_ids: torch.Tensor, num_words: int, weight_dtype: torch.dtype,
             slots: torch.Tensor | None = None) -> torch.Tensor:
    impl = backend.select(OP, input_ids, dout, dout, None)
    if slots is None:
        return impl.fns["embedding_backward"](dout, input_ids, num_words, weight_dtype)
    return impl.fns["embedding_backward"](dout, input_ids, num_words, weight_dtype, slots=slots)


@_sp_wbwd.register_fake
def _(dout, input_ids, num_words, weight_dtype, slots=None):
    return dout.new_empty((num_words, dout.shape[2]), dtype=weight_dtype)


def _setup(ctx, inputs, output):
    input_ids, embedding_weight, prompt_table, prompt_index, *rest = inputs
    slots = rest[0] if rest else None
    if not embedding_weight.requires_grad:
        # the table's gradient needs only the ids' shape: keep a one-element stand-in, not B×T ids
        input_ids = input_ids.new_zeros(()).expand(input_ids.shape)
    ctx.save_for_backward(input_ids, prompt_index, slots)
    ctx.num_prompts = prompt_table.shape[0] if prompt_table.dim() == 3 else 1
    ctx.num_virtual_tokens = prompt_table.shape[-2]
    ctx.prompt_dtype, ctx.weight_dtype = prompt_table.dtype, embedding_weight.dtype
    ctx.num_words = embedding_weight.shape[0]


def _backward(ctx, dout):
    input_ids, prompt_index, slots = ctx.saved_tensors
    dout = dout.contiguous()
    d_table = d_weight = None
    if ctx.needs_input_grad[2]:
        positions = None if slots is None else prompt_positions_of(slots, ctx.num_virtual_tokens)
        d_table = _sp_bwd(dout, input_ids, prompt_index, ctx.num_prompts, ctx.prompt_dtype, positions)
    if ctx.needs_input_grad[1]:
        d_weight = _sp_wbwd(dout, input_ids, ctx.num_words, ctx.weight_dtype, slots)
    return None, d_weight, d_table, None, None


_sp_fwd.register_autograd(_backward, setup_context=_setup)


def _call(fn, *args, **optional):
    """fn(*args) with the keyword arguments that are not None (the prepended calls stay as they were)."""
    return fn(*args, **{k: v for k, v in optional.items() if v is not None})


class SoftPromptFn(torch.autograd.Function):
    """The eager path: one autograd node calling the chosen backend directly (the custom ops above
    are what torch.compile traces).  Saves prompt_index, the slots of a template and, only when the
    word embeddings are trained, the ids (else nothing B×T: the table's gradient needs only their
    shape, or the template's prompt positions)."""

    @staticmethod
    def forward(ctx, input_ids, embedding_weight, prompt_table, prompt_index, impl, slots=None):
        out = _call(impl.fns["forward"], input_ids, embedding_weight, prompt_table, prompt_index, slots=slots)
        needs = ctx.needs_input_grad
        ctx.save_for_backward(input_ids if needs[1] else None, prompt_index, slots)
        ctx.cfg = (impl, input_ids.shape, prompt_table.shape[0] if prompt_table.dim() == 3 else 1,
                   prompt_table.dtype, embedding_weight.shape[0], embedding_weight.dtype, prompt_table.shape[-2])
        return out

    @staticmethod
    def backward(ctx, dout):
        input_ids, prompt_index, slots = ctx.saved_tensors
        impl, ids_shape, num_prompts, prompt_dtype, num_words, weight_dtype, P = ctx.cfg
        needs = ctx.needs_input_grad
        dout = dout.contiguous()
        d_table = d_weight = None
        if needs[2]:
            shape_ids = input_ids if input_ids is not None else _shape_only(dout, ids_shape)
            positions = None if slots is None else prompt_positions_of(slots, P)
            d_table = _call(impl.fns["backward"], dout, shape_ids, prompt_index, num_prompts, prompt_dtype,
                            positions=positions)
        if needs[1]:
            d_weight = _call(impl.fns["embedding_backward"], dout, input_ids, num_words, weight_dtype, slots=slots)
        return None, d_weight, d_table, None, None, None


_STAND_INS: dict[tuple, torch.Tensor] = {}


def _shape_only(like: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A zero-stride stand-in of `shape` (the backends read the ids' shape only for the table)."""
    key = (like.device, shape)
    t = _STAND_INS.get(key)
    if t is None:
        if len(_STAND_INS) > 256:
            _STAND_INS.clear()
        t = _STAND_INS[key] = torch.zeros((), dtype=torch.long, device=like.device).expand(shape)
    return t


_sp_apply = raw_apply(SoftPromptFn)


def _validate(input_ids, embedding_weight, prompt_table, prompt_index, slots=None) -> None:
    """The checks that read only shapes, dtypes and devices (once per signature)."""
    check(input_ids.dim() == 2, f"input_ids must be 2-D (batch, seq), got shape {tuple(input_ids.shape)}")
    check(not input_ids.is_floating_point(), f"input_ids must be an integer tensor, got {input_ids.dtype}")
    check(embedding_weight.dim() == 2, "embedding_weight must be 2-D (vocab, hidden)")
    check_same_device(input_ids=input_ids, embedding_weight=embedding_weight, prompt_table=prompt_table,
                      prompt_index=prompt_index, slots=slots)
    H = embedding_weight.shape[1]
    B = input_ids.shape[0]
    if prompt_index is None:
        check(prompt_table.dim() == 2 and prompt_table.shape[1] == H,
              f"prompt_table has shape {tuple(prompt_table.shape)}; expected (num_virtual_tokens, {H})")
    else:
        check(prompt_table.dim() == 3 and prompt_table.shape[2] == H,
              f"with prompt_index, prompt_table must have shape (num_prompts, num_virtual_tokens, {H}), "
              f"got {tuple(prompt_table.shape)}")
        check(tuple(prompt_index.shape) == (B,) and not prompt_index.is_floating_point(),
              f"prompt_index must be an integer tensor of shape ({B},)")
    if slots is not None:
        P = prompt_table.shape[-2]
        check(tuple(slots.shape) == tuple(input_ids.shape) and not slots.is_floating_point()
              and slots.dtype != torch.bool,
              f"slots must be an integer tensor of input_ids' shape {tuple(input_ids.shape)} (-1 at a word, the "
              f"virtual token 0..P-1 at a prompt position), got {slots.dtype} of shape {tuple(slots.shape)}")
        check(input_ids.shape[1] >= P, f"a template of {input_ids.shape[1]} positions cannot hold the {P} virtual "
                                       f"tokens of the prompt table")


def _check_slot_values(slots: torch.Tensor, P: int) -> None:
    """Each row holds every virtual token 0..P-1 exactly once and -1 elsewhere (on a CPU; a CUDA
    tensor's values are not read back, as for the ids)."""
    if not value_checks(slots):
        return
    lo, hi = torch.aminmax(slots)
    check(int(lo) >= -1 and int(hi) < P, f"slots values must lie in [-1, {P}) (-1 at a word, else the virtual "
                                         f"token 0..{P - 1}), got values in [{int(lo)}, {int(hi)}]")
    counts = torch.zeros((slots.shape[0], P + 1), dtype=torch.long).scatter_add_(
        1, torch.where(slots >= 0, slots, P).long(), torch.ones_like(slots, dtype=torch.long))[:, :P]
    bad = (counts != 1).any(1).nonzero()
    if bad.numel():
        b = int(bad[0])
        raise ValueError(f"slots row {b} must hold each virtual token 0..{P - 1} exactly once; its counts per "
                         f"token are {counts[b].tolist()}")


def template_slots(num_virtual_tokens: int, input_ids: torch.Tensor | None = None, *,
                   prompt_token_id: int | None = None,
                   prompt_positions: torch.Tensor | None = None) -> torch.Tensor:
    """The (B, T) int64 slot map of a template: -1 at a word, k at the k-th prompt position of the row
    (k = 0..P-1, left to right).  The prompt positions are where input_ids == prompt_token_id, or the
    True entries of the bool mask `prompt_positions` (B, T) (give one of the two).  Every row must hold
    exactly num_virtual_tokens of them: P-tuning's segments (``[P][P][P] Britain [P][P][P] [MASK]``)
    are just positions, any number of segments, anywhere.  A wrong count raises ValueError naming the
    row (checked on CPU tensors; on a GPU the count is not read back)."""
    P = int(num_virtual_tokens)
    if (prompt_token_id is None) == (prompt_positions is None):
        raise ValueError("a template takes exactly one of prompt_token_id (a marker id in input_ids) and "
                         "prompt_positions (a bool mask)")
    if prompt_positions is not None:
        if not isinstance(prompt_positions, torch.Tensor):
            prompt_positions = torch.as_tensor(prompt_positions)
        if prompt_positions.dim() != 2 or (input_ids is not None and prompt_positions.shape != input_ids.shape):
            want = "" if input_ids is None else f" {tuple(input_ids.shape)} (input_ids' shape)"
            raise ValueError(f"prompt_positions must be a 2-D (batch, seq) bool mask{want}, got shape "
                             f"{tuple(prompt_positions.shape)}")
        if prompt_positions.dtype != torch.bool:
            not_01 = prompt_positions.is_floating_point() or (
                value_checks(prompt_positions) and bool(((prompt_positions != 0) & (prompt_positions != 1)).any()))
            if not_01:
                raise ValueError(f"prompt_positions must be a bool mask (True at a virtual token), got "
                                 f"{prompt_positions.dtype}")
            prompt_positions = prompt_positions != 0
        mask = prompt_positions
        what = "prompt_positions"
    else:
        if input_ids is None:
            raise ValueError("a template marked by prompt_token_id needs input_ids")
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids must be a 2-D integer tensor, got {input_ids.dtype} of shape "
                             f"{tuple(input_ids.shape)}")
        mask = input_ids == int(prompt_token_id)
        what = f"prompt_token_id={int(prompt_token_id)}"
    if value_checks(mask):
        counts = mask.sum(1)
        bad = (counts != P).nonzero()
        if bad.numel():
            b = int(bad[0])
            listing = counts.tolist()
            raise ValueError(f"row {b} of the batch has {listing[b]} prompt positions ({what}) but the template needs "
                             f"exactly num_virtual_tokens={P} per row (counts per row: {listing})")
    return torch.where(mask, mask.long().cumsum(1) - 1, -1)


def _check_range(t: torch.Tensor, high: int, msg: str) -> None:
    if value_checks(t):
        lo, hi = torch.aminmax(t)
        check(int(lo) >= 0 and int(hi) < high, msg)


_PLANS: dict[tuple, backend.Impl] = {}


def soft_prompt_embed(input_ids: torch.Tensor, embedding_weight: torch.Tensor, prompt_table: torch.Tensor,
                      prompt_index: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
    """[prompt ; embedding(input_ids)] per row, or with `slots` (see `template_slots`) the prompt's
    tokens at the template's positions and the words elsewhere; see the module docstring for shapes."""
    if slots is not None:
        return _templated(input_ids, embedding_weight, prompt_table, prompt_index, slots)
    if torch.compiler.is_compiling():
        _validate(input_ids, embedding_weight, prompt_table, prompt_index)
        if traced_as_aten(embedding_weight):  # CPU: the gather and concatenation as aten ops inductor fuses
            return reference_forward(input_ids.long(), embedding_weight, prompt_table,
                                     None if prompt_index is None else prompt_index.long())
        return _sp_fwd(input_ids.long(), embedding_weight, prompt_table,
                       None if prompt_index is None else prompt_index.long(), None)
    if embedding_weight.is_cpu and backend.torch_or_auto():
        # the CPU fast path: the torch backend (the only automatic choice here); the named checks once per set
        # of shapes and dtypes
        shapes = (input_ids.shape, input_ids.dtype, embedding_weight.shape, embedding_weight.dtype, prompt_table.shape,
                  prompt_table.dtype, None if prompt_index is None else (prompt_index.shape, prompt_index.dtype),
                  input_ids.is_cpu and prompt_table.is_cpu and (prompt_index is None or prompt_index.is_cpu))
        if shapes not in _CHECKED:
            remember_checked(_CHECKED, shapes, lambda: _validate(input_ids, embedding_weight, prompt_table, prompt_index))
        impl = _TORCH_IMPL
        backend._LAST[OP] = "torch"
        key = None
    else:
        key = (backend.get_backend(), input_ids.shape, input_ids.dtype, input_ids.device, embedding_weight.shape,
               embedding_weight.dtype, embedding_weight.device, prompt_table.shape, prompt_table.dtype,
               prompt_table.device, None if prompt_index is None else (prompt_index.shape, prompt_index.dtype,
                                                                       prompt_index.device))
        impl = _PLANS.get(key)
    if impl is None:
        _validate(input_ids, embedding_weight, prompt_table, prompt_index)
        ids = input_ids.long()
        index = None if prompt_index is None else prompt_index.long()
        impl = _PLANS[key] = backend.select(OP, ids, embedding_weight, prompt_table, index)
    else:
        backend._LAST[OP] = impl.backend
    if prompt_index is not None and prompt_index.dtype != torch.long:
        prompt_index = prompt_index.long()
    if input_ids.dtype != torch.long:
        input_ids = input_ids.long()
    # the values are not read on the way in (a pass over the ids and a host read per call): an index out of
    # range makes the gather raise, and that error is then named here (on a CPU; the kernels guard their own)
    try:
        if functorch_active():
            return SoftPromptFn.apply(input_ids, embedding_weight, prompt_table, prompt_index, impl, None)
        return _sp_apply(input_ids, embedding_weight, prompt_table, prompt_index, impl, None)
    except (IndexError, RuntimeError):
        try:
            if prompt_index is not None:
                _check_range(prompt_index, prompt_table.shape[0],
                             f"prompt_index values must lie in [0, {prompt_table.shape[0]})")
            _check_range(input_ids, embedding_weight.shape[0],
                         f"input_ids must lie in [0, {embedding_weight.shape[0]}) (the vocabulary size)")
        except ValueError as named:
            raise named from None
        raise


def _templated(input_ids, embedding_weight, prompt_table, prompt_index, slots):
    """The templated call: shapes checked on every call (the slot map is data), values on a CPU."""
    _validate(input_ids, embedding_weight, prompt_table, prompt_index, slots)
    ids = input_ids.long()
    index = None if prompt_index is None else prompt_index.long()
    slots = slots.long()
    if torch.compiler.is_compiling():
        if traced_as_aten(embedding_weight):
            return reference_forward(ids, embedding_weight, prompt_table, index, slots)
        return _sp_fwd(ids, embedding_weight, prompt_table, index, slots)
    P = prompt_table.shape[-2]
    _check_slot_values(slots, P)
    if index is not None:
        _check_range(index, prompt_table.shape[0], f"prompt_index values must lie in [0, {prompt_table.shape[0]})")
    if value_checks(ids):  # only the word positions' ids are gathered: a marker id may lie outside the vocabulary
        words = ids[slots < 0]
        if words.numel():
            _check_range(words, embedding_weight.shape[0],
                         f"input_ids at word positions must lie in [0, {embedding_weight.shape[0]}) (the vocabulary "
                         f"size)")
    if embedding_weight.is_cpu and backend.torch_or_auto():
        impl = _TORCH_IMPL
        backend._LAST[OP] = "torch"
    else:
        impl = backend.select(OP, ids, embedding_weight, prompt_table, index)
    if functorch_active():
        return SoftPromptFn.apply(ids, embedding_weight, prompt_table, index, impl, slots)
    return _sp_apply(ids, embedding_weight, prompt_table, index, impl, slots)


# ---- CUDA C++ backend (fastpeft._C, csrc/soft_prompt.cu) ----------------------------------------

def _cuda_supports(input_ids, embedding_weight, prompt_table, prompt_index, *, forced=False):
    """None when fastpeft._C can run this call, else why not (the reference then runs)."""
    from .. import _cext

    if not _cext.available():
        return _cext.why_unavailable()
    if not all(t.is_cuda for t in (input_ids, embedding_weight, prompt_table, prompt_index) if t is not None):
        return "tensors are not on a CUDA device"
    for name, t in (("embedding_weight", embedding_weight), ("prompt_table", prompt_table)):
        if t.dtype not in _cext.DTYPE_CODES:
            return f"{name} is {t.dtype}; the CUDA kernels take float32, bfloat16 or float16"
    return _cext.why_not_device(embedding_weight.device)


def _register_cuda() -> None:
    from .. import _cext

    backend.register(OP, "cuda", priority=20, supports=_cuda_supports, forward=_cext.soft_prompt_forward,
                     backward=_cext.soft_prompt_backward, embedding_backward=_cext.soft_prompt_embedding_backward)


_register_cuda()


# ---- Triton backend (fastpeft.kernels.soft_prompt) ---------------------------------------------

def _triton_supports(input_ids, embedding_weight, prompt_table, prompt_index, *, forced=False):
    import importlib.util

    from ._common import gpu_kernel_supports

    reason = gpu_kernel_supports(input_ids, embedding_weight, prompt_table, prompt_index, forced=forced)
    if reason:
        return reason
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    for name, t in (("embedding_weight", embedding_weight), ("prompt_table", prompt_table)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"{name} is {t.dtype}; the Triton kernels take float32, bfloat16 or float16"
    return None


def _triton_forward(input_ids, embedding_weight, prompt_table, prompt_index, slots=None):
    from ..kernels.soft_prompt import soft_prompt_forward

    return soft_prompt_forward(input_ids, embedding_weight, prompt_table, prompt_index, slots)


def _triton_backward(dout, input_ids, prompt_index, num_prompts, prompt_dtype, positions=None):
    from ..kernels.soft_prompt import soft_prompt_table_backward

    return soft_prompt_table_backward(dout, input_ids, prompt_index, num_prompts, prompt_dtype, positions)


def _triton_embedding_backward(dout, input_ids, num_words, weight_dtype, slots=None):
    from ..kernels.soft_prompt import soft_prompt_embedding_backward

    return soft_prompt_embedding_backward(dout, input_ids, num_words, weight_dtype, slots=slots)


backend.register(OP, "triton", priority=10, supports=_triton_supports, forward=_triton_forward,
                 backward=_triton_backward, embedding_backward=_triton_embedding_backward)
