"""NF4 / FP4 (bitsandbytes layout) Triton kernels: a standalone dequantise, and the GEMMs of a frozen
4-bit linear with the weight decoded in the prologue (tiles read as 4-bit codes, decoded in registers
with their absmax), for the forward Y = X·Wᵀ (+ bias, + scaling·S·Bᵀ for LoRA) and for the dX GEMM of
the backward dX = dY·W (+ scaling·dS·A).

The format (fastpeft/quant/nf4.py is its reference): W (N, K) flattened row-major; element f = n·K + k
has code (packed[f // 2] >> 4 if f even else packed[f // 2] & 15) and block f // BLOCKSIZE; its value
is code4[q] · absmax[f // BLOCKSIZE] in fp32, absmax itself code8[q8] · absmax2[b // 256] + offset when
double-quantised (NESTED). Kernels run with fp-contraction off so that this decode is bit-identical to
the reference (a fused multiply-add would round differently).

The GEMM kernels follow the adapted-linear pattern of kernels/adapted_linear.py (grouped tile order,
fp32 accumulator, masks on every ragged edge, int64 flat offsets); that file is not imported so the
two can change independently.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# per-dtype rounding applied to the decoded weight before it meets the activations
_ROUND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _decode(packed_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, code4_ptr, flat, mask,
            BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
    """fp32 value of flattened weight elements `flat` (int64)."""
    byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    q = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
    v = tl.load(code4_ptr + q, mask=mask, other=0.0)
    blk = flat // BLOCKSIZE
    if NESTED:
        q8 = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        a = tl.load(code8_ptr + q8, mask=mask, other=0.0) * tl.load(absmax2_ptr + blk // 256, mask=mask, other=0.0)
        a = a + tl.load(offset_ptr)
    else:
        a = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return v * a


@triton.jit
def _block_absmax(absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, blk, mask, NESTED: tl.constexpr):
    """fp32 absmax of the 4-bit blocks `blk` (int64)."""
    if NESTED:
        q8 = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        a = tl.load(code8_ptr + q8, mask=mask, other=0.0) * tl.load(absmax2_ptr + blk // 256, mask=mask, other=0.0)
        a = a + tl.load(offset_ptr)
    else:
        a = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return a


@triton.jit
def _codes(packed_ptr, code4_ptr, flat, mask):
    """fp32 code value (before its absmax) of flattened weight elements `flat` (int64)."""
    byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    q = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
    return tl.load(code4_ptr + q, mask=mask, other=0.0)


@triton.jit
def _round(w, ROUND: tl.constexpr):
    if ROUND == 1:
        w = w.to(tl.float16).to(tl.float32)
    elif ROUND == 2:
        # round-to-nearest-even by hand: the interpreter's fp32 -> bf16 cast truncates
        bits = w.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        w = bits.to(tl.float32, bitcast=True)
    return w


# out[f] = code4[q[f]] · absmax[f // BLOCKSIZE]  (one rounding to out's dtype)
# HBM: n/2 bytes of codes + n/BLOCKSIZE absmax read, n · sizeof(out) written.
@triton.jit
def nf4_dequantize_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, code4_ptr, out_ptr, n,
                          BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, ROUND: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = _decode(packed_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, code4_ptr, offs, mask, BLOCKSIZE, NESTED)
    tl.store(out_ptr + offs, _round(w, ROUND).to(out_ptr.dtype.element_ty), mask=mask)


# Y[M, N] = X[M, K] · W[N, K]ᵀ (+ bias[N]) (+ scaling · S[M, R] · B[N, R]ᵀ), W decoded per tile.
# Saves nothing. HBM: X once per N tile column, W as 4-bit codes (N·K/2 bytes) once per M tile row,
# Y written once.
@triton.jit
def nf4_matmul_kernel(x_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, code4_ptr, bias_ptr,
                      s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_xk, stride_ym, stride_yn, stride_sm, stride_sr,
                      stride_bn, stride_br, scaling, R,
                      BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
                      HAS_LORA: tl.constexpr, ROUND: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                      ALIGNED: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                      GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    x_row = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_row = rn.to(tl.int64)[None, :] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        xt = tl.load(x_row + kk[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wmask = k_ok[:, None] & n_ok[None, :]
        if ALIGNED:  # the tile's k range lies in one 4-bit block of each row: one absmax per row
            wt = _codes(packed_ptr, code4_ptr, w_row + kk.to(tl.int64)[:, None], wmask)
            blk = (rn.to(tl.int64) * K + k0) // BLOCKSIZE
            wt = wt * _block_absmax(absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, blk, n_ok, NESTED)[None, :]
        else:
            wt = _decode(packed_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, code4_ptr,
                         w_row + kk.to(tl.int64)[:, None], wmask, BLOCKSIZE, NESTED)
        wt = _round(wt, ROUND).to(xt.dtype)  # one rounding to x's dtype
        if UPCAST:  # the interpreter multiplies bf16 as raw integers: exact fp32 products instead
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        if IEEE:
            acc += tl.dot(xt, wt, input_precision="ieee")
        else:
            acc += tl.dot(xt, wt)
    if HAS_LORA:
        rr = tl.arange(0, BLOCK_R)
        r_ok = rr < R
        st = tl.load(s_ptr + rm.to(tl.int64)[:, None] * stride_sm + rr[None, :] * stride_sr,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        bt = tl.load(b_ptr + rn.to(tl.int64)[None, :] * stride_bn + rr[:, None] * stride_br,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(st.to(tl.float32), bt.to(tl.float32), input_precision="ieee") * scaling
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# dX[M, K] = dY[M, N] · W[N, K] (+ scaling · dS[M, R] · A[R, K]), W decoded per tile (the backward's
# dX GEMM; dA, dB are small GEMMs left to cuBLAS). HBM: dY once per K tile column, W as codes.
@triton.jit
def nf4_matmul_dx_kernel(dy_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, code4_ptr,
                         ds_ptr, a_ptr, dx_ptr, M, N, K, stride_dym, stride_dyn, stride_dxm, stride_dxk,
                         stride_dsm, stride_dsr, stride_ar, stride_ak, scaling, R,
                         BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_LORA: tl.constexpr,
                         ROUND: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_k = tl.cdiv(K, BLOCK_K)
    width = GROUP_M * grid_k
    group = pid // width
    first_m = group * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_k = (pid % width) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.arange(0, BLOCK_N)
    m_ok = rm < M
    k_ok = rk < K
    dy_row = dy_ptr + rm.to(tl.int64)[:, None] * stride_dym
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nn = n0 + rn
        n_ok = nn < N
        dyt = tl.load(dy_row + nn[None, :] * stride_dyn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        wmask = n_ok[:, None] & k_ok[None, :]
        flat = nn.to(tl.int64)[:, None] * K + rk.to(tl.int64)[None, :]
        if ALIGNED:  # this program's k range lies in one 4-bit block of each row
            wt = _codes(packed_ptr, code4_ptr, flat, wmask)
            blk = (nn.to(tl.int64) * K + pid_k * BLOCK_K) // BLOCKSIZE
            wt = wt * _block_absmax(absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, blk, n_ok, NESTED)[:, None]
        else:
            wt = _decode(packed_ptr, absmax_ptr, absmax2_ptr, code8_ptr, offset_ptr, code4_ptr, flat, wmask,
                         BLOCKSIZE, NESTED)
        wt = _round(wt, ROUND).to(dyt.dtype)
        if UPCAST:
            dyt = dyt.to(tl.float32)
            wt = wt.to(tl.float32)
        if IEEE:
            acc += tl.dot(dyt, wt, input_precision="ieee")
        else:
            acc += tl.dot(dyt, wt)
    if HAS_LORA:
        rr = tl.arange(0, BLOCK_R)
        r_ok = rr < R
        dst = tl.load(ds_ptr + rm.to(tl.int64)[:, None] * stride_dsm + rr[None, :] * stride_dsr,
                      mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        at = tl.load(a_ptr + rr[:, None] * stride_ar + rk.to(tl.int64)[None, :] * stride_ak,
                     mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(dst.to(tl.float32), at.to(tl.float32), input_precision="ieee") * scaling
    tl.store(dx_ptr + rm.to(tl.int64)[:, None] * stride_dxm + rk[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


# ---- launch wrappers ------------------------------------------------------------------------------

def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _options() -> dict:
    # fp-contraction off: the nested absmax code8·absmax2 + offset must not become one FMA
    return {} if _interpreting() else {"enable_fp_fusion": False}


def _state_args(packed: torch.Tensor, state):
    dev = packed.device
    p = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    code4 = state.code.to(dev, torch.float32)
    if state.nested:
        if state.nested_blocksize != 256:
            raise ValueError(f"the NF4 kernels decode double quantisation in blocks of 256, got "
                             f"{state.nested_blocksize}")
        offset = state.offset.reshape(1).to(dev, torch.float32)
        return p, state.absmax.to(dev), state.nested_absmax.to(dev, torch.float32), \
            state.nested_code.to(dev, torch.float32), offset, code4
    absmax = state.absmax.to(dev, torch.float32)
    return p, absmax, absmax, code4, absmax, code4  # unused pointers: any valid tensor


def nf4_dequantize(packed: torch.Tensor, state, dtype: torch.dtype | None = None, block: int = 1024) -> torch.Tensor:
    """W (state.shape) in `dtype` (default state.dtype): kernels' equivalent of quant.nf4.dequantize_4bit."""
    dtype = state.dtype if dtype is None else dtype
    n = 1
    for s in state.shape:
        n *= s
    out = torch.empty(tuple(state.shape), dtype=dtype, device=packed.device)
    args = _state_args(packed, state)
    nf4_dequantize_kernel[(triton.cdiv(n, block),)](*args, out, n, BLOCKSIZE=state.blocksize, NESTED=state.nested,
                                                     ROUND=_ROUND[dtype], BLOCK=block, **_options())
    return out


def _blocks(m: int, n: int, k: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): tiles for the device, small ones when
    interpreting (the CPU interpreter's cost grows with the tile)."""
    if _interpreting():
        return 16, 16, 32, 1, 1
    if dtype == torch.float32:
        return 64, 64, 32, 8, 2
    return (128, 128, 64, 8, 3) if m >= 128 else (32, 128, 64, 4, 3)


def _aligned(k: int, block_k: int, blocksize: int) -> bool:
    """Every BLOCK_K-wide k range starting at a multiple of BLOCK_K lies in one 4-bit block of its row."""
    return k % blocksize == 0 and blocksize % block_k == 0


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None = None,
               lora_s: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
               scaling: float = 1.0) -> torch.Tensor:
    """x (M, K) · Wᵀ (+ bias) (+ scaling · lora_s (M, R) · lora_bᵀ (N, R)) with W the 4-bit weight
    (N, K), decoded to fp32, rounded once to x's dtype (bitsandbytes' forward)."""
    if x.dim() != 2:
        raise ValueError(f"nf4_matmul takes a 2-D input, got shape {tuple(x.shape)}")
    n_out, k = state.shape
    m = x.shape[0]
    if x.shape[1] != k:
        raise ValueError(f"input has {x.shape[1]} features, the 4-bit weight {tuple(state.shape)} expects {k}")
    y = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    has_lora = lora_s is not None
    r = lora_s.shape[1] if has_lora else 1
    s = lora_s if has_lora else y
    b = lora_b if has_lora else y
    bm, bn, bk, warps, stages = _blocks(m, n_out, k, x.dtype)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n_out, bn),)
    nf4_matmul_kernel[grid](
        x, *_state_args(packed, state), bias if bias is not None else y, s, b, y, m, n_out, k,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), s.stride(0), s.stride(1), b.stride(0), b.stride(1),
        float(scaling), r, BLOCKSIZE=state.blocksize, NESTED=state.nested, HAS_BIAS=bias is not None,
        HAS_LORA=has_lora, ROUND=_ROUND[x.dtype], IEEE=x.dtype == torch.float32 or _interpreting(),
        UPCAST=_interpreting() and x.dtype == torch.bfloat16, ALIGNED=_aligned(k, bk, state.blocksize),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        BLOCK_R=max(16, triton.next_power_of_2(r)), GROUP_M=8, num_warps=warps, num_stages=stages, **_options())
    return y


def nf4_matmul_dx(dy: torch.Tensor, packed: torch.Tensor, state, lora_ds: torch.Tensor | None = None,
                  lora_a: torch.Tensor | None = None, scaling: float = 1.0) -> torch.Tensor:
    """dy (M, N) · W (+ scaling · lora_ds (M, R) · lora_a (R, K)); W decoded to fp32, rounded to the dtype
    it was quantised from, then to dy's dtype (bitsandbytes' backward)."""
    if dy.dim() != 2:
        raise ValueError(f"nf4_matmul_dx takes a 2-D gradient, got shape {tuple(dy.shape)}")
    n_out, k = state.shape
    m = dy.shape[0]
    if dy.shape[1] != n_out:
        raise ValueError(f"gradient has {dy.shape[1]} features, the 4-bit weight {tuple(state.shape)} has {n_out}")
    dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    has_lora = lora_ds is not None
    r = lora_ds.shape[1] if has_lora else 1
    ds = lora_ds if has_lora else dx
    a = lora_a if has_lora else dx
    bm, bn, bk, warps, stages = _blocks(m, k, n_out, dy.dtype)
    bn, bk = bk, bn  # the reduction runs over N here
    if not _interpreting() and k % state.blocksize == 0 and bk > state.blocksize:
        bk, warps = state.blocksize, 4  # output tiles within one 4-bit block per row: one absmax per row
    grid = (triton.cdiv(m, bm) * triton.cdiv(k, bk),)
    rnd = _ROUND[state.dtype]  # via the quantised dtype, as bitsandbytes' backward reads W
    nf4_matmul_dx_kernel[grid](
        dy, *_state_args(packed, state), ds, a, dx, m, n_out, k, dy.stride(0), dy.stride(1), dx.stride(0),
        dx.stride(1), ds.stride(0), ds.stride(1), a.stride(0), a.stride(1), float(scaling), r,
        BLOCKSIZE=state.blocksize, NESTED=state.nested, HAS_LORA=has_lora, ROUND=rnd,
        IEEE=dy.dtype == torch.float32 or _interpreting(),
        UPCAST=_interpreting() and dy.dtype == torch.bfloat16, ALIGNED=_aligned(k, bk, state.blocksize),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=max(16, triton.next_power_of_2(r)), GROUP_M=8, num_warps=warps,
        num_stages=stages, **_options())
    return dx
