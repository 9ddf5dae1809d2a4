"""Grouped low-rank kernels for mixed-adapter batches (fastpeft/ops/grouped_lora.py is the caller).

Tokens are grouped by adapter once per batch (a GroupPlan: `order`, the token indices sorted by
adapter, and `offsets`, the G+1 segment bounds into it); the adapters sit in a stacked table
(G, R, ·) with each rank zero-padded to R.  The base projection is not here: the caller runs it once
for the whole batch (cuBLAS) and these kernels add the low-rank terms in place.

* `sgmv_shrink_kernel`  S[m, :] = scale_g · X[order[m], :] · W_gᵀ      (SGMV shrink, prefill/training)
* `sgmv_expand_kernel`  OUT[order[m], :] += scale_g · S[m, :] · L_g     (SGMV expand)
* `sgmv_reduce_kernel`  D_g = scale_g · Σ_{m ∈ g} T[m, :]ᵀ X[order[m], :]  (dA, dB of the backward)
* `bgmv_kernel`         Y[t, :] += scale_g · (X[t, :]·A_gᵀ)·B_gᵀ, g = slot[t]  (decode, M ≤ 64, fused)

Every product accumulates in fp32 with fp32 operands (the low-rank work is r/N of the layer's FLOPs);
a token's rows are written by exactly one program, so there are no atomics and the results are
deterministic.  Grids are (blocks of the longest segment, ..., G): a program past its segment's end
does nothing, so a plan with new adapters re-uses the compiled kernels (they are specialised by the
padded rank, block sizes and dtypes only).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# the host-side helpers the adapted-linear kernels use (16-bit products as TF32, fp32 per torch's setting)
from .adapted_linear import _cdiv, dot_precision, rank_pad

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_RANK = 256


# S[m, r] = scale_g · Σ_k X[order[m], k] · W[g, r, k] for m in segment g; grid (m blocks, G).
# HBM: reads the segment's X rows once and W_g once per m block; writes S (M_l × R, fp32).
@triton.jit
def sgmv_shrink_kernel(
    x_ptr, order_ptr, off_ptr, w_ptr, scale_ptr, s_ptr, K, R,
    stride_xm, stride_xk, stride_wg, stride_wr, stride_wk, stride_sm, stride_sr,
    HAS_SCALE: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    start = tl.load(off_ptr + g)
    end = tl.load(off_ptr + g + 1)
    m0 = start + pid_m * BLOCK_M
    if m0 < end:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        tok = tl.load(order_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        offs_r = tl.arange(0, R_PAD)
        mask_r = offs_r < R
        w_base = w_ptr + g.to(tl.int64) * stride_wg
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            mask_k = kk < K
            x = tl.load(x_ptr + tok[:, None] * stride_xm + kk[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_base + offs_r[None, :] * stride_wr + kk[:, None] * stride_wk,
                        mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision=PRECISION)
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + g)
        rows = offs_m.to(tl.int64)
        tl.store(s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr, acc,
                 mask=mask_m[:, None] & mask_r[None, :])


# OUT[order[m], n] += scale_g · Σ_r S[m, r] · L[g, r, n]; grid (m blocks, n blocks, G).
# HBM: reads S and L_g, reads and writes the segment's OUT rows once (each row owned by one program).
@triton.jit
def sgmv_expand_kernel(
    s_ptr, order_ptr, off_ptr, l_ptr, scale_ptr, out_ptr, N, R,
    stride_sm, stride_sr, stride_lg, stride_lr, stride_ln, stride_om, stride_on,
    HAS_SCALE: tl.constexpr, R_PAD: tl.constexpr, R_BLOCK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    start = tl.load(off_ptr + g)
    end = tl.load(off_ptr + g + 1)
    m0 = start + pid_m * BLOCK_M
    if m0 < end:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        tok = tl.load(order_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        rows = offs_m.to(tl.int64)
        l_base = l_ptr + g.to(tl.int64) * stride_lg
        delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # the rank in chunks of R_BLOCK, unrolled: only (BLOCK_M + BLOCK_N) × R_BLOCK operands live at once
        for r0 in tl.static_range(0, R_PAD, R_BLOCK):
            offs_r = r0 + tl.arange(0, R_BLOCK)
            mask_r = offs_r < R
            s = tl.load(s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
            lo = tl.load(l_base + offs_r[:, None] * stride_lr + offs_n[None, :] * stride_ln,
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            delta = tl.dot(s, lo, delta, input_precision=PRECISION)
        if HAS_SCALE:
            delta = delta * tl.load(scale_ptr + g)
        o_ptrs = out_ptr + tok[:, None] * stride_om + offs_n[None, :] * stride_on
        mask = mask_m[:, None] & mask_n[None, :]
        y = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_ptrs, (y + delta).to(out_ptr.dtype.element_ty), mask=mask)


# D[g, r, k] = scale_g · Σ_{m ∈ g} T[m, r] · X[order[m], k]; grid (k blocks, G), fp32 out, no atomics.
# Backward: dA_g = dS_gᵀ·X_g (T = dS, X = x) and dB_gᵀ = scaling_g · S_gᵀ·dY_g (T = S, X = dy).
@triton.jit
def sgmv_reduce_kernel(
    t_ptr, x_ptr, order_ptr, off_ptr, scale_ptr, d_ptr, K, R,
    stride_tm, stride_tr, stride_xm, stride_xk, stride_dg, stride_dr, stride_dk,
    HAS_SCALE: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(0)
    g = tl.program_id(1)
    start = tl.load(off_ptr + g)
    end = tl.load(off_ptr + g + 1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        tok = tl.load(order_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        rows = offs_m.to(tl.int64)
        t = tl.load(t_ptr + rows[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(tl.trans(t), x, acc, input_precision=PRECISION)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + g)
    tl.store(d_ptr + g.to(tl.int64) * stride_dg + offs_r[:, None] * stride_dr + offs_k[None, :] * stride_dk, acc,
             mask=mask_r[:, None] & mask_k[None, :])


# Decode (M ≤ 64 tokens): Y[t, n] += scale_g · Σ_r (Σ_k X[t, k]·A[g, r, k]) · L[g, r, n], g = slot[t]
# (-1: a base row, skipped).  Grid (tokens, n blocks): shrink and expand fused, no S in HBM; each
# program recomputes its token's r-vector (K·r MACs), which at decode sizes costs less than a
# second launch.  HBM: X row, A_g and an N-block of L_g per program; Y read and written once.
@triton.jit
def bgmv_kernel(
    x_ptr, slot_ptr, a_ptr, l_ptr, scale_ptr, y_ptr, K, N, R,
    stride_xm, stride_xk, stride_ag, stride_ar, stride_ak, stride_lg, stride_lr, stride_ln, stride_ym, stride_yn,
    R_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    g = tl.load(slot_ptr + t)
    if g >= 0:
        g64 = g.to(tl.int64)
        offs_r = tl.arange(0, R_PAD)
        mask_r = offs_r < R
        s = tl.zeros((R_PAD,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            mask_k = kk < K
            x = tl.load(x_ptr + t * stride_xm + kk * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + g64 * stride_ag + offs_r[:, None] * stride_ar + kk[None, :] * stride_ak,
                        mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            s += tl.sum(a * x[None, :], axis=1)
        s = s * tl.load(scale_ptr + g64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        lo = tl.load(l_ptr + g64 * stride_lg + offs_r[:, None] * stride_lr + offs_n[None, :] * stride_ln,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        delta = tl.sum(s[:, None] * lo, axis=0)
        y_ptrs = y_ptr + t * stride_ym + offs_n * stride_yn
        y = tl.load(y_ptrs, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=mask_n)


# ------------------------------------------------------------------------------ launch wrappers
# Tile sizes by the padded rank, so the fp32 tiles stay in registers (checked with ptxas for sm_80 and
# sm_90 at r 16/64/256: no spills); the interpreter takes the smallest tiles.
def _block_m(max_len: int, r_pad: int) -> int:
    if INTERPRET or max_len <= 16 or r_pad > 64:
        return 16
    return 32 if max_len <= 32 or r_pad > 32 else 64


def _block_k(r_pad: int) -> int:
    return 32 if INTERPRET else (64 if r_pad <= 32 else (32 if r_pad <= 64 else 16))


def _scale_arg(scale_t, like):
    return (scale_t, True) if scale_t is not None else (like, False)


def sgmv_shrink(x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, max_len: int, w: torch.Tensor,
                scale_t: torch.Tensor | None) -> torch.Tensor:
    """fp32 S (len(order), R) with S[m] = scale_g · x[order[m]] · w[g]ᵀ; w (G, R, K) any strides."""
    groups, r, k = w.shape
    m_l = order.shape[0]
    s = torch.empty((m_l, r), device=x.device, dtype=torch.float32)
    if m_l == 0:
        return s
    r_pad = rank_pad(r)
    bm = _block_m(max_len, r_pad)
    scale, has_scale = _scale_arg(scale_t, s)
    sgmv_shrink_kernel[(_cdiv(max_len, bm), groups)](
        x, order, offsets, w, scale, s, k, r, x.stride(0), x.stride(1), *w.stride(), s.stride(0), s.stride(1),
        HAS_SCALE=has_scale, R_PAD=r_pad, PRECISION=dot_precision(x.dtype), BLOCK_M=bm, BLOCK_K=_block_k(r_pad))
    return s


def sgmv_expand(s: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, max_len: int, lo: torch.Tensor,
                scale_t: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out[order[m]] += scale_g · s[m] · lo[g] in place; lo (G, R, N) any strides; returns out."""
    groups, r, n = lo.shape
    if order.shape[0] == 0:
        return out
    r_pad = rank_pad(r)
    widest = 64 if r_pad <= 32 or out.dtype != torch.float32 else (32 if r_pad <= 64 else 16)
    bm = 16 if INTERPRET or max_len <= 16 else min(widest, 32 if max_len <= 32 else 64)
    bn = 32 if INTERPRET else 64
    scale, has_scale = _scale_arg(scale_t, s)
    sgmv_expand_kernel[(_cdiv(max_len, bm), _cdiv(n, bn), groups)](
        s, order, offsets, lo, scale, out, n, r, s.stride(0), s.stride(1), *lo.stride(), out.stride(0), out.stride(1),
        HAS_SCALE=has_scale, R_PAD=r_pad, R_BLOCK=min(r_pad, 32), PRECISION=dot_precision(out.dtype), BLOCK_M=bm,
        BLOCK_N=bn)
    return out


def sgmv_reduce(t: torch.Tensor, x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, max_len: int,
                scale_t: torch.Tensor | None, groups: int) -> torch.Tensor:
    """fp32 D (G, R, K) with D[g] = scale_g · Σ_{m ∈ g} t[m]ᵀ x[order[m]]; t (len(order), R)."""
    r, k = t.shape[1], x.shape[1]
    d = torch.empty((groups, r, k), device=x.device, dtype=torch.float32)
    r_pad = rank_pad(r)
    bk = 32 if INTERPRET else (64 if r_pad <= 32 else (32 if r_pad <= 64 else 16))
    scale, has_scale = _scale_arg(scale_t, d)
    sgmv_reduce_kernel[(_cdiv(k, bk), groups)](
        t, x, order, offsets, scale, d, k, r, t.stride(0), t.stride(1), x.stride(0), x.stride(1), *d.stride(),
        HAS_SCALE=has_scale, R_PAD=r_pad, PRECISION=dot_precision(x.dtype),
        BLOCK_M=16 if INTERPRET or r_pad > 64 else 32, BLOCK_K=bk)
    return d


def bgmv(x: torch.Tensor, slot: torch.Tensor, a: torch.Tensor, lo: torch.Tensor, scale_t: torch.Tensor,
         y: torch.Tensor) -> torch.Tensor:
    """y[t] += scale_g · (x[t]·a[g]ᵀ)·lo[g] in place for g = slot[t] ≥ 0; a (G, R, K), lo (G, R, N)."""
    m, k = x.shape
    _, r, n = lo.shape
    r_pad = rank_pad(r)
    tile = 32 if INTERPRET else max(16, 4096 // r_pad)  # (R_PAD × tile) fp32 operands: 32 per thread at 4 warps
    bgmv_kernel[(m, _cdiv(n, tile))](
        x, slot, a, lo, scale_t, y, k, n, r, x.stride(0), x.stride(1), *a.stride(), *lo.stride(),
        y.stride(0), y.stride(1), R_PAD=r_pad, BLOCK_K=tile, BLOCK_N=tile)
    return y


__all__ = ["sgmv_shrink", "sgmv_expand", "sgmv_reduce", "bgmv", "MAX_RANK"]
