"""Triton kernels for `fastpeft.ops.soft_prompt_embed` (the twin of csrc/soft_prompt.cu).

Forward: one program per (output row, hidden block) picks the row's source, a prompt-table row
or a word-embedding row, and copies it: prepended (row s < P is the
prompt's token s) or templated (`slots[b, t]` >= 0 names the virtual token, -1 a word).  A marker id
at a prompt position is never read; an out-of-range word id or prompt index writes zeros instead of
reading outside the table (the op checks values on a CPU; on a GPU nothing is read back).
Table backward: one program per (prompt n, virtual token p, hidden block) sums dout over the rows
using prompt n, in a fixed order in fp32 (deterministic, no atomics); the template's positions
(B, P) say where token p sits in each row.
Word-embedding backward: fp32 atomics per word row, or (deterministic) a pass over the stably
sorted ids where the first of each run sums the run in order.
The prompt table is cast to the embeddings' dtype on the host (it is small), as the reference casts.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _block_h(H: int) -> int:
    return min(1024, triton.next_power_of_2(max(int(H), 1)))


@triton.jit
def _row_mask(in_h, cond):
    """in_h & a scalar condition, the scalar broadcast by arithmetic (the interpreter rejects a bool
    block & a bool scalar as a load mask)."""
    return in_h & ((in_h.to(tl.int32) * 0 + cond.to(tl.int32)) != 0)


@triton.jit
def _soft_prompt_fwd_kernel(out_ptr, weight_ptr, table_ptr, ids_ptr, pidx_ptr, slots_ptr, bad_ptr,
                            S, T, P, H, V, N,
                            ids_sb, ids_st, w_sv, t_sn, t_sp, pidx_s, sl_sb, sl_st,
                            HAS_INDEX: tl.constexpr, TEMPLATED: tl.constexpr, CHECK: tl.constexpr,
                            BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = offs < H
    b = row // S
    s = row - b * S
    if TEMPLATED:
        slot = tl.load(slots_ptr + b * sl_sb + s * sl_st).to(tl.int64)
        t = s
    else:
        slot = tl.where(s < P, s, -1).to(tl.int64)
        t = tl.maximum(s - P, 0)
    is_prompt = slot >= 0
    if HAS_INDEX:
        n = tl.load(pidx_ptr + b * pidx_s).to(tl.int64)
    else:
        n = tl.zeros((), dtype=tl.int64)
    prompt_ok = is_prompt & (slot < P) & (n >= 0) & (n < N)
    tid = tl.load(ids_ptr + b * ids_sb + t * ids_st, mask=(~is_prompt) & (t < T), other=0).to(tl.int64)
    word_ok = (~is_prompt) & (tid >= 0) & (tid < V)
    pval = tl.load(table_ptr + n * t_sn + slot * t_sp + offs, mask=_row_mask(in_h, prompt_ok), other=0.0)
    wval = tl.load(weight_ptr + tid * w_sv + offs, mask=_row_mask(in_h, word_ok), other=0.0)
    val = tl.where(_row_mask(in_h, is_prompt), pval.to(out_ptr.dtype.element_ty), wval)
    tl.store(out_ptr + row * H + offs, val, mask=in_h)
    if CHECK:  # an index out of range reads nothing (zeros are written) and raises the caller's flag
        bad = (is_prompt & (prompt_ok == 0)) | ((is_prompt == 0) & (word_ok == 0))
        if bad:
            tl.store(bad_ptr, 1)


@triton.jit
def _soft_prompt_table_bwd_kernel(dtab_ptr, dout_ptr, pidx_ptr, pos_ptr,
                                  B, P, H,
                                  d_sb, d_ss, pidx_s, pos_sb, pos_sp,
                                  HAS_INDEX: tl.constexpr, TEMPLATED: tl.constexpr, BLOCK_H: tl.constexpr):
    np_ = tl.program_id(0).to(tl.int64)  # n * P + p
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = offs < H
    n = np_ // P
    p = np_ - n * P
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for b in range(0, B):
        b64 = tl.cast(b, tl.int64)
        if HAS_INDEX:
            take = tl.load(pidx_ptr + b64 * pidx_s).to(tl.int64) == n
        else:
            take = b64 >= 0
        if TEMPLATED:
            pos = tl.load(pos_ptr + b64 * pos_sb + p * pos_sp).to(tl.int64)
        else:
            pos = p
        x = tl.load(dout_ptr + b64 * d_sb + pos * d_ss + offs, mask=_row_mask(in_h, take), other=0.0)
        acc += x.to(tl.float32)
    tl.store(dtab_ptr + np_ * H + offs, acc, mask=in_h)


@triton.jit
def _soft_prompt_weight_bwd_atomic_kernel(dw_ptr, dout_ptr, ids_ptr, slots_ptr,
                                          T, P, H, V,
                                          ids_sb, ids_st, d_sb, d_ss, sl_sb, sl_st,
                                          TEMPLATED: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = offs < H
    b = row // T
    t = row - b * T
    tid = tl.load(ids_ptr + b * ids_sb + t * ids_st).to(tl.int64)
    ok = (tid >= 0) & (tid < V)
    if TEMPLATED:
        ok = ok & (tl.load(slots_ptr + b * sl_sb + t * sl_st) < 0)
    x = tl.load(dout_ptr + b * d_sb + (P + t) * d_ss + offs, mask=_row_mask(in_h, ok), other=0.0)
    tl.atomic_add(dw_ptr + tid * H + offs, x.to(tl.float32), mask=_row_mask(in_h, ok))


@triton.jit
def _soft_prompt_weight_bwd_sorted_kernel(dw_ptr, dout_ptr, sorted_ptr, order_ptr,
                                          R, T, P, H, V,
                                          d_sb, d_ss,
                                          BLOCK_H: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = offs < H
    tid = tl.load(sorted_ptr + i).to(tl.int64)
    prev = tl.load(sorted_ptr + i - 1, mask=i > 0, other=-1).to(tl.int64)
    first = (i == 0) | (prev != tid)
    go = first & (tid >= 0) & (tid < V)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    r = i
    while go:
        pos = tl.load(order_ptr + r).to(tl.int64)
        b = pos // T
        t = pos - b * T
        acc += tl.load(dout_ptr + b * d_sb + (P + t) * d_ss + offs, mask=in_h, other=0.0).to(tl.float32)
        r += 1
        nxt = tl.load(sorted_ptr + r, mask=r < R, other=-1).to(tl.int64)
        go = (r < R) & (nxt == tid)
    do_store = first & (tid >= 0) & (tid < V)
    tl.store(dw_ptr + tid * H + offs, acc, mask=_row_mask(in_h, do_store))


def _index_flag(device: torch.device) -> torch.Tensor | None:
    """A one-int flag the forward kernel raises on an out-of-range index (FASTPEFT_CHECK_INDICES=0: none)."""
    if os.environ.get("FASTPEFT_CHECK_INDICES", "1") == "0":
        return None
    return torch.zeros(1, dtype=torch.int32, device=device)


def _hidden_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def soft_prompt_forward(input_ids: torch.Tensor, embedding_weight: torch.Tensor, prompt_table: torch.Tensor,
                        prompt_index: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
    """As `fastpeft.ops.soft_prompt.reference_forward`: (B, P+T, H) prepended, or (B, T, H) with `slots`."""
    B, T = input_ids.shape
    V, H = embedding_weight.shape
    P = prompt_table.shape[-2]
    S = T if slots is not None else P + T
    out = torch.empty((B, S, H), dtype=embedding_weight.dtype, device=embedding_weight.device)
    if out.numel() == 0:
        return out
    ids = input_ids.long()
    weight = _hidden_contiguous(embedding_weight)
    # the (N, P, H) table is small: cast once here, rounding exactly as the reference's .to() does
    table = _hidden_contiguous(prompt_table.to(embedding_weight.dtype))
    pidx = None if prompt_index is None else prompt_index.long()
    sl = None if slots is None else slots.long()
    block = _block_h(H)
    grid = (B * S, triton.cdiv(H, block))
    flag = _index_flag(out.device)
    _soft_prompt_fwd_kernel[grid](
        out, weight, table, ids, pidx if pidx is not None else ids, sl if sl is not None else ids,
        flag if flag is not None else ids,
        S, T, P, H, V, 1 if pidx is None else table.shape[0],
        ids.stride(0), ids.stride(1), weight.stride(0), 0 if pidx is None else table.stride(0), table.stride(-2),
        0 if pidx is None else pidx.stride(0), 0 if sl is None else sl.stride(0), 0 if sl is None else sl.stride(1),
        HAS_INDEX=pidx is not None, TEMPLATED=sl is not None, CHECK=flag is not None, BLOCK_H=block)
    if flag is not None:  # no host read: a device-side assert (raised here at once on a CPU)
        torch._assert_async(flag[0] == 0, "soft_prompt_embed: an input_id or prompt_index is out of range")
    return out


def soft_prompt_table_backward(dout: torch.Tensor, input_ids: torch.Tensor, prompt_index: torch.Tensor | None,
                               num_prompts: int, prompt_dtype: torch.dtype,
                               positions: torch.Tensor | None = None) -> torch.Tensor:
    """As `fastpeft.ops.soft_prompt.reference_backward` (fp32 sums in a fixed order)."""
    B, S, H = dout.shape
    P = S - input_ids.shape[1] if positions is None else positions.shape[1]
    N = 1 if prompt_index is None else num_prompts
    d_table = torch.zeros((N, P, H), dtype=torch.float32, device=dout.device)
    if B and P and N and H:
        dout = _hidden_contiguous(dout)
        pidx = None if prompt_index is None else prompt_index.long()
        pos = None if positions is None else positions.long()
        block = _block_h(H)
        _soft_prompt_table_bwd_kernel[(N * P, triton.cdiv(H, block))](
            d_table, dout, pidx if pidx is not None else dout, pos if pos is not None else dout,
            B, P, H, dout.stride(0), dout.stride(1), 0 if pidx is None else pidx.stride(0),
            0 if pos is None else pos.stride(0), 0 if pos is None else pos.stride(1),
            HAS_INDEX=pidx is not None, TEMPLATED=pos is not None, BLOCK_H=block)
    if prompt_index is None:
        d_table = d_table[0]
    return d_table.to(prompt_dtype)


def _deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled() or os.environ.get("FASTPEFT_DETERMINISTIC") == "1"


def soft_prompt_embedding_backward(dout: torch.Tensor, input_ids: torch.Tensor, num_words: int,
                                   weight_dtype: torch.dtype, deterministic: bool | None = None,
                                   slots: torch.Tensor | None = None) -> torch.Tensor:
    """As `fastpeft.ops.soft_prompt.reference_embedding_backward`: fp32 atomics, or (deterministic, the
    default under torch.use_deterministic_algorithms / FASTPEFT_DETERMINISTIC=1) sorted runs."""
    B, S, H = dout.shape
    T = input_ids.shape[1]
    P = 0 if slots is not None else S - T  # templated: word t sits at dout position t
    d_weight = torch.zeros((num_words, H), dtype=torch.float32, device=dout.device)
    if B == 0 or T == 0 or H == 0 or num_words == 0:
        return d_weight.to(weight_dtype)
    dout = _hidden_contiguous(dout)
    ids = input_ids.long()
    block = _block_h(H)
    if deterministic if deterministic is not None else _deterministic():
        flat = ids if slots is None else torch.where(slots < 0, ids, num_words)  # a prompt position: past the end
        sorted_ids, order = torch.sort(flat.reshape(-1), stable=True)
        _soft_prompt_weight_bwd_sorted_kernel[(B * T, triton.cdiv(H, block))](
            d_weight, dout, sorted_ids, order, B * T, T, P, H, num_words, dout.stride(0), dout.stride(1),
            BLOCK_H=block)
    else:
        sl = None if slots is None else slots.long()
        _soft_prompt_weight_bwd_atomic_kernel[(B * T, triton.cdiv(H, block))](
            d_weight, dout, ids, sl if sl is not None else ids, T, P, H, num_words, ids.stride(0), ids.stride(1),
            dout.stride(0), dout.stride(1), 0 if sl is None else sl.stride(0), 0 if sl is None else sl.stride(1),
            TEMPLATED=sl is not None, BLOCK_H=block)
    return d_weight.to(weight_dtype)


__all__ = ["soft_prompt_forward", "soft_prompt_table_backward", "soft_prompt_embedding_backward"]
