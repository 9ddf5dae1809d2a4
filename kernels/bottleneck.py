"""Triton kernels for the fused bottleneck adapter  y = h + act(h·W_dᵀ + b_d)·W_uᵀ + b_u.

Forward (one program per BLOCK_M rows): z = h·W_dᵀ + b_d accumulated over hidden in BLOCK_K chunks
    (fp32), a = act(z) kept in registers (BLOCK_M × BLOCK_R, R = bottleneck ≤ 256), then each
    BLOCK_N slice of y = h + a·W_uᵀ + b_u written.  HBM: read h twice, write y; nothing M×R stored.
Backward (same tiling): recompute z from h, da = dy·W_u over hidden chunks, dz = da ∘ act'(z),
    dh = dy + dz·W_d per BLOCK_N slice; a and dz (M×R, transient, not saved by the forward) are
    written for the two weight-gradient GEMMs dW_u = dyᵀ·a, dW_d = dzᵀ·h, which cuBLAS does best.
Saved for the backward by the op: h only (one M×hidden tensor).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ACTS = {"relu": 0, "silu": 1, "gelu": 2, "gelu_tanh": 3}
# the interpreter's tl.dot mishandles 16-bit operands (see adapted_linear.py): widened there only
_WIDEN_DOT = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    if _WIDEN_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), out_dtype=tl.float32, input_precision=PREC)
    else:
        return tl.dot(a, b, out_dtype=tl.float32, input_precision=PREC)


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:
        return tl.maximum(z, 0.0)
    elif ACT == 1:
        return z * tl.sigmoid(z)
    elif ACT == 2:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    else:
        t = 2.0 * tl.sigmoid(2.0 * (0.7978845608028654 * (z + 0.044715 * z * z * z))) - 1.0
        return 0.5 * z * (1.0 + t)


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        return (z > 0).to(tl.float32)
    elif ACT == 1:
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        return cdf + z * pdf
    else:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du


@triton.jit
def _down(h_ptr, wd_ptr, bd_ptr, rows, M, H, R, stride_hm, stride_wr,
          BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """z = h[rows]·W_dᵀ + b_d in fp32, (BLOCK_M, BLOCK_R)."""
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_hm + k[None, :],
                    mask=(rows[:, None] < M) & (k[None, :] < H), other=0.0)
        wd = tl.load(wd_ptr + r[None, :] * stride_wr + k[:, None], mask=(r[None, :] < R) & (k[:, None] < H),
                     other=0.0)  # (BLOCK_K, BLOCK_R) = W_dᵀ slice
        acc += _dot(h, wd.to(h.dtype), PREC)
    bd = tl.load(bd_ptr + r, mask=r < R, other=0.0).to(tl.float32)
    return acc + bd[None, :]


@triton.jit
def bottleneck_fwd_kernel(h_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, y_ptr, M, H, R,
                          stride_hm, stride_wr, stride_wu, stride_ym,
                          ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    r = tl.arange(0, BLOCK_R)
    z = _down(h_ptr, wd_ptr, bd_ptr, rows, M, H, R, stride_hm, stride_wr, BLOCK_M, BLOCK_R, BLOCK_K, PREC)
    a = _act(z, ACT)
    a = tl.where(r[None, :] < R, a, 0.0).to(h_ptr.dtype.element_ty)
    for n0 in range(0, H, BLOCK_K):
        n = n0 + tl.arange(0, BLOCK_K)
        wu = tl.load(wu_ptr + n[None, :] * stride_wu + r[:, None], mask=(n[None, :] < H) & (r[:, None] < R),
                     other=0.0)  # (BLOCK_R, BLOCK_N) = W_uᵀ slice
        out = _dot(a, wu.to(a.dtype), PREC)
        bu = tl.load(bu_ptr + n, mask=n < H, other=0.0).to(tl.float32)
        mask = (rows[:, None] < M) & (n[None, :] < H)
        h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_hm + n[None, :], mask=mask, other=0.0)
        y = h.to(tl.float32) + out + bu[None, :]
        tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + n[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def bottleneck_bwd_kernel(h_ptr, dy_ptr, wd_ptr, bd_ptr, wu_ptr, dh_ptr, a_ptr, dz_ptr, M, H, R,
                          stride_hm, stride_dym, stride_wr, stride_wu, stride_dhm,
                          ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    r = tl.arange(0, BLOCK_R)
    z = _down(h_ptr, wd_ptr, bd_ptr, rows, M, H, R, stride_hm, stride_wr, BLOCK_M, BLOCK_R, BLOCK_K, PREC)
    da = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, H, BLOCK_K):
        n = n0 + tl.arange(0, BLOCK_K)
        dy = tl.load(dy_ptr + rows[:, None].to(tl.int64) * stride_dym + n[None, :],
                     mask=(rows[:, None] < M) & (n[None, :] < H), other=0.0)
        wu = tl.load(wu_ptr + n[:, None] * stride_wu + r[None, :], mask=(n[:, None] < H) & (r[None, :] < R),
                     other=0.0)  # (BLOCK_N, BLOCK_R) = W_u slice
        da += _dot(dy, wu.to(dy.dtype), PREC)
    rmask = (rows[:, None] < M) & (r[None, :] < R)
    dz = tl.where(r[None, :] < R, da * _act_grad(z, ACT), 0.0)
    a = _act(z, ACT)
    ar = a_ptr + rows[:, None].to(tl.int64) * R + r[None, :]
    tl.store(ar, a.to(a_ptr.dtype.element_ty), mask=rmask)
    tl.store(dz_ptr + rows[:, None].to(tl.int64) * R + r[None, :], dz.to(dz_ptr.dtype.element_ty), mask=rmask)
    dzc = dz.to(dh_ptr.dtype.element_ty)
    for n0 in range(0, H, BLOCK_K):
        n = n0 + tl.arange(0, BLOCK_K)
        wd = tl.load(wd_ptr + r[:, None] * stride_wr + n[None, :], mask=(r[:, None] < R) & (n[None, :] < H),
                     other=0.0)  # (BLOCK_R, BLOCK_N) = W_d slice
        mask = (rows[:, None] < M) & (n[None, :] < H)
        dy = tl.load(dy_ptr + rows[:, None].to(tl.int64) * stride_dym + n[None, :], mask=mask, other=0.0)
        dh = dy.to(tl.float32) + _dot(dzc, wd.to(dzc.dtype), PREC)
        tl.store(dh_ptr + rows[:, None].to(tl.int64) * stride_dhm + n[None, :], dh.to(dh_ptr.dtype.element_ty),
                 mask=mask)


def _blocks(M, R, dtype):
    """(BLOCK_M, BLOCK_R, BLOCK_K, num_warps): the M×R tiles (z, a, dz) live in registers, so the row
    block shrinks as the bottleneck and the element size grow (sized so sm_90 compiles without spills)."""
    block_r = max(16, triton.next_power_of_2(R))
    if block_r > 256:
        raise ValueError(f"the fused bottleneck kernel keeps the bottleneck on chip: at most 256, got {R}")
    wide = dtype == torch.float32
    if block_r <= 64:
        block_m, block_k, warps = (32, 32, 4) if wide else (64, 64, 4)
    else:
        block_m, block_k, warps = (16, 32, 8) if wide else (32, 64, 8)
    return min(block_m, max(16, triton.next_power_of_2(M))), block_r, block_k, warps


def _prec(dtype):
    # fp32 adapters match torch's fp32 GEMMs (no TF32 rounding); 16-bit inputs use the tensor cores as is
    return "ieee" if dtype == torch.float32 else "tf32"


def _prep(*ts):
    return tuple(t.contiguous() for t in ts)


def bottleneck_forward(h, w_down, b_down, w_up, b_up, act: str):
    """y (M, H) for 2-D h, as `fastpeft.ops.bottleneck.reference_forward`."""
    h, w_down, b_down, w_up, b_up = _prep(h, w_down, b_down, w_up, b_up)
    M, H = h.shape
    R = w_down.shape[0]
    y = torch.empty_like(h)
    BM, BR, BK, warps = _blocks(M, R, h.dtype)
    bottleneck_fwd_kernel[(triton.cdiv(M, BM),)](
        h, w_down, b_down, w_up, b_up, y, M, H, R, h.stride(0), w_down.stride(0), w_up.stride(0), y.stride(0),
        ACT=ACTS[act], BLOCK_M=BM, BLOCK_R=BR, BLOCK_K=BK, PREC=_prec(h.dtype), num_warps=warps)
    return y


def bottleneck_backward(dy, h, w_down, b_down, w_up, act: str):
    """(dh, a, dz) for 2-D dy: dh = dy + dz·W_d, a = act(z) and dz = (dy·W_u) ∘ act'(z) (M×R, for the
    weight gradients), z recomputed from h."""
    dy, h, w_down, b_down, w_up = _prep(dy, h, w_down, b_down, w_up)
    M, H = h.shape
    R = w_down.shape[0]
    dh = torch.empty_like(h)
    a = torch.empty((M, R), device=h.device, dtype=h.dtype)
    dz = torch.empty((M, R), device=h.device, dtype=h.dtype)
    BM, BR, BK, warps = _blocks(M, R, h.dtype)
    bottleneck_bwd_kernel[(triton.cdiv(M, BM),)](
        h, dy, w_down, b_down, w_up, dh, a, dz, M, H, R, h.stride(0), dy.stride(0), w_down.stride(0),
        w_up.stride(0), dh.stride(0), ACT=ACTS[act], BLOCK_M=BM, BLOCK_R=BR, BLOCK_K=BK, PREC=_prec(h.dtype),
        num_warps=warps)
    return dh, a, dz


__all__ = ["bottleneck_forward", "bottleneck_backward", "ACTS"]
