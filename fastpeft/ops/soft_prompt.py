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
from ._common import check, check_same_device, value_checks

OP = "soft_prompt_embed"


def _prompts(prompt_table, prompt_index, batch):
    if prompt_index is None:
        return prompt_table.unsqueeze(0).expand(batch, *prompt_table.shape)
    return prompt_table[prompt_index]


def reference_forward(input_ids, embedding_weight, prompt_table, prompt_index):
    words = F.embedding(input_ids, embedding_weight)
    prompts = _prompts(prompt_table, prompt_index, input_ids.shape[0]).to(embedding_weight.dtype)
    return torch.cat([prompts, words], dim=1)


def reference_backward(dout, input_ids, prompt_index, num_prompts, prompt_dtype):
    """Gradient of the prompt table: (P, H) summed over rows, or (N, P, H) scattered by prompt_index."""
    P = dout.shape[1] - input_ids.shape[1]
    dp = dout[:, :P].float()
    if prompt_index is None:
        return dp.sum(0).to(prompt_dtype)
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


def soft_prompt_embed(input_ids: torch.Tensor, embedding_weight: torch.Tensor, prompt_table: torch.Tensor,
                      prompt_index: torch.Tensor | None = None) -> torch.Tensor:
    """[prompt ; embedding(input_ids)] per row; see the module docstring for shapes."""
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
        if value_checks(prompt_index):
            check(int(prompt_index.min()) >= 0 and int(prompt_index.max()) < prompt_table.shape[0],
                  f"prompt_index values must lie in [0, {prompt_table.shape[0]})")
        prompt_index = prompt_index.long()
    if value_checks(input_ids):
        V = embedding_weight.shape[0]
        check(int(input_ids.min()) >= 0 and int(input_ids.max()) < V, f"input_ids must lie in [0, {V}) (the vocabulary size)")
    return _sp_fwd(input_ids.long(), embedding_weight, prompt_table, prompt_index)


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
