"""soft_prompt_embed: input embeddings with a soft prompt in front, built in one pass.

out[b] = [prompt_table[prompt_index[b]] ; embedding_weight[input_ids[b]]], shape (B, P + T, H),
in embedding_weight's dtype (the prompt is cast, as PEFT casts its prompts to the embeddings'
dtype).  prompt_table is (P, H) for one prompt shared by every row, or (N, P, H) with
prompt_index (B,) choosing each row's prompt.  The backward scatters into the prompt table, and
into the word embeddings only when they require a gradient.
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


def reference_forward(input_ids, embedding_weight, prompt_table, prompt_index):
    words = F.embedding(input_ids, embedding_weight)
    prompts = _prompts(prompt_table, prompt_index, input_ids.shape[0])
    if prompts.dtype != embedding_weight.dtype:
        prompts = prompts.to(embedding_weight.dtype)
    return torch.cat([prompts, words], dim=1)


def reference_backward(dout, input_ids, prompt_index, num_prompts, prompt_dtype):
    """Gradient of the prompt table: (P, H) summed over rows, or (N, P, H) scattered by prompt_index.
    input_ids is read for its shape only."""
    P = dout.shape[1] - input_ids.shape[1]
    dp = dout[:, :P]
    if prompt_index is None:
        return dp.sum(0, dtype=torch.float32).to(prompt_dtype)
    dp = dp.float()
    out = torch.zeros((num_prompts, P, dout.shape[2]), dtype=torch.float32, device=dout.device)
    return out.index_add_(0, prompt_index, dp).to(prompt_dtype)


def reference_embedding_backward(dout, input_ids, num_words, weight_dtype):
    """Gradient of the word embeddings (V, H) from the word part of dout."""
    P = dout.shape[1] - input_ids.shape[1]
    dw = torch.zeros((num_words, dout.shape[2]), dtype=torch.float32, device=dout.device)
    dw.index_add_(0, input_ids.reshape(-1), dout[:, P:].reshape(-1, dout.shape[2]).float())
    return dw.to(weight_dtype)


backend.register(OP, "torch", priority=0, forward=reference_forward, backward=reference_backward,
                 embedding_backward=reference_embedding_backward)
_TORCH_IMPL = backend._REGISTRY[OP]["torch"]
_CHECKED: set[tuple] = set()  # argument shapes the CPU fast path has validated


@torch.library.custom_op("fastpeft::soft_prompt_embed_fwd", mutates_args=())
def _sp_fwd(input_ids: torch.Tensor, embedding_weight: torch.Tensor, prompt_table: torch.Tensor,
            prompt_index: torch.Tensor | None) -> torch.Tensor:
    impl = backend.select(OP, input_ids, embedding_weight, prompt_table, prompt_index)
    return impl.fns["forward"](input_ids, embedding_weight, prompt_table, prompt_index)


@_sp_fwd.register_fake
def _(input_ids, embedding_weight, prompt_table, prompt_index):
    B, T = input_ids.shape
    return embedding_weight.new_empty((B, prompt_table.shape[-2] + T, embedding_weight.shape[1]))


@torch.library.custom_op("fastpeft::soft_prompt_embed_bwd", mutates_args=())
def _sp_bwd(dout: torch.Tensor, input_ids: torch.Tensor, prompt_index: torch.Tensor | None, num_prompts: int,
            prompt_dtype: torch.dtype) -> torch.Tensor:
    impl = backend.select(OP, input_ids, dout, dout, prompt_index)
    return impl.fns["backward"](dout, input_ids, prompt_index, num_prompts, prompt_dtype)


@_sp_bwd.register_fake
def _(dout, input_ids, prompt_index, num_prompts, prompt_dtype):
    P = dout.shape[1] - input_ids.shape[1]
    shape = (P, dout.shape[2]) if prompt_index is None else (num_prompts, P, dout.shape[2])
    return dout.new_empty(shape, dtype=prompt_dtype)


@torch.library.custom_op("fastpeft::soft_prompt_embed_wbwd", mutates_args=())
def _sp_wbwd(dout: torch.Tensor, input_ids: torch.Tensor, num_words: int, weight_dtype: torch.dtype) -> torch.Tensor:
    impl = backend.select(OP, input_ids, dout, dout, None)
    return impl.fns["embedding_backward"](dout, input_ids, num_words, weight_dtype)


@_sp_wbwd.register_fake
def _(dout, input_ids, num_words, weight_dtype):
    return dout.new_empty((num_words, dout.shape[2]), dtype=weight_dtype)


def _setup(ctx, inputs, output):
    input_ids, embedding_weight, prompt_table, prompt_index = inputs
    if not embedding_weight.requires_grad:
        # the table's gradient needs only the ids' shape: keep a one-element stand-in, not B×T ids
        input_ids = input_ids.new_zeros(()).expand(input_ids.shape)
    ctx.save_for_backward(input_ids, prompt_index)
    ctx.num_prompts = prompt_table.shape[0] if prompt_table.dim() == 3 else 1
    ctx.prompt_dtype, ctx.weight_dtype = prompt_table.dtype, embedding_weight.dtype
    ctx.num_words = embedding_weight.shape[0]


def _backward(ctx, dout):
    input_ids, prompt_index = ctx.saved_tensors
    dout = dout.contiguous()
    d_table = _sp_bwd(dout, input_ids, prompt_index, ctx.num_prompts, ctx.prompt_dtype) if ctx.needs_input_grad[2] else None
    d_weight = _sp_wbwd(dout, input_ids, ctx.num_words, ctx.weight_dtype) if ctx.needs_input_grad[1] else None
    return None, d_weight, d_table, None


_sp_fwd.register_autograd(_backward, setup_context=_setup)


class SoftPromptFn(torch.autograd.Function):
    """The eager path: one autograd node calling the chosen backend directly (the custom ops above
    are what torch.compile traces).  Saves prompt_index and, only when the word embeddings are
    trained, the ids (else nothing B×T: the table's gradient needs only their shape)."""

    @staticmethod
    def forward(ctx, input_ids, embedding_weight, prompt_table, prompt_index, impl):
        out = impl.fns["forward"](input_ids, embedding_weight, prompt_table, prompt_index)
        needs = ctx.needs_input_grad
        ctx.save_for_backward(input_ids if needs[1] else None, prompt_index)
        ctx.cfg = (impl, input_ids.shape, prompt_table.shape[0] if prompt_table.dim() == 3 else 1,
                   prompt_table.dtype, embedding_weight.shape[0], embedding_weight.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        input_ids, prompt_index = ctx.saved_tensors
        impl, ids_shape, num_prompts, prompt_dtype, num_words, weight_dtype = ctx.cfg
        needs = ctx.needs_input_grad
        dout = dout.contiguous()
        shape_ids = input_ids if input_ids is not None else _shape_only(dout, ids_shape)
        d_table = impl.fns["backward"](dout, shape_ids, prompt_index, num_prompts, prompt_dtype) if needs[2] else None
        d_weight = impl.fns["embedding_backward"](dout, input_ids, num_words, weight_dtype) if needs[1] else None
        return None, d_weight, d_table, None, None


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


def _validate(input_ids, embedding_weight, prompt_table, prompt_index) -> None:
    """The checks that read only shapes, dtypes and devices (once per signature)."""
    check(input_ids.dim() == 2, f"input_ids must be 2-D (batch, seq), got shape {tuple(input_ids.shape)}")
    check(not input_ids.is_floating_point(), f"input_ids must be an integer tensor, got {input_ids.dtype}")
    check(embedding_weight.dim() == 2, "embedding_weight must be 2-D (vocab, hidden)")
    check_same_device(input_ids=input_ids, embedding_weight=embedding_weight, prompt_table=prompt_table,
                      prompt_index=prompt_index)
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


def _check_range(t: torch.Tensor, high: int, msg: str) -> None:
    if value_checks(t):
        lo, hi = torch.aminmax(t)
        check(int(lo) >= 0 and int(hi) < high, msg)


_PLANS: dict[tuple, backend.Impl] = {}


def soft_prompt_embed(input_ids: torch.Tensor, embedding_weight: torch.Tensor, prompt_table: torch.Tensor,
                      prompt_index: torch.Tensor | None = None) -> torch.Tensor:
    """[prompt ; embedding(input_ids)] per row; see the module docstring for shapes."""
    if torch.compiler.is_compiling():
        _validate(input_ids, embedding_weight, prompt_table, prompt_index)
        if traced_as_aten(embedding_weight):  # CPU: the gather and concatenation as aten ops inductor fuses
            return reference_forward(input_ids.long(), embedding_weight, prompt_table,
                                     None if prompt_index is None else prompt_index.long())
        return _sp_fwd(input_ids.long(), embedding_weight, prompt_table,
                       None if prompt_index is None else prompt_index.long())
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
            return SoftPromptFn.apply(input_ids, embedding_weight, prompt_table, prompt_index, impl)
        return _sp_apply(input_ids, embedding_weight, prompt_table, prompt_index, impl)
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
