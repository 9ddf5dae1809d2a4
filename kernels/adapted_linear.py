"""The "adapted linear" kernel family shared by LoRA and IA3.

* `adapted_linear_kernel`: C = epilogue(prologue(A)·B [+ lr_scale·S·L]) — one GEMM whose optional
  pieces (low-rank extra K-step, input-column scaling, bias, output-column scaling, scaling-vector
  gradient) are `tl.constexpr` flags.  It is the LoRA/IA3 forward, and the dX GEMM of both backwards.
* `lowrank_shrink_kernel`: S = scale·op(X)·W for a thin W (K×r), optionally also OUT += op(X)ᵀ·T
  in the same pass over X (LoRA: S = dropout(X)·Aᵀ forward; dS = s·dY·B with dB = s·dYᵀ·S backward).
* `lowrank_reduce_kernel`: OUT = scale·Tᵀ·op(X), reduced over the rows (LoRA: dA = dSᵀ·dropout(X)).

Dropout is never stored: element (m, k) of the logical (M, K) input is kept iff
`tl.rand(seed, m*K + k) > p` (int32 offsets), the mask of `fastpeft.ops._random`.  The big GEMM
runs in the activations' dtype; the low-rank products run in fp32 (TF32 tensor cores) when the
adapter is fp32 — PEFT runs them in the adapter's dtype — else in the 16-bit dtype; every
accumulator is fp32.  Under TRITON_INTERPRET=1 each kernel has one small fixed config, since
autotuning in the interpreter would take minutes.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_RANK = 256
# The interpreter's tl.dot mishandles bf16/fp16 operands (numpy has no bf16 matmul): there the
# operands are widened to fp32 first (the interpreter also truncates fp32 -> bf16 casts instead
# of rounding them, so its bf16 results are a little less exact than the GPU's).  Compiled
# kernels use the tensor cores' native dtypes.
_WIDEN_DOT = tl.constexpr(INTERPRET)


def _config(num_warps: int, num_stages: int, **meta: int) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# Shared memory per stage with bf16 operands: (BM·BK + BK·BN)·2 bytes; 3 stages of 128×256×64
# (144 KiB) fit both sm_80 (164 KiB) and sm_90 (227 KiB).  fp32 operands double it: configs that
# do not fit fail to compile during tuning and are skipped by the autotuner.
if INTERPRET:
    GEMM_CONFIGS = [_config(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)]
    SHRINK_CONFIGS = [_config(4, 1, BLOCK_M=32, BLOCK_K=32)]
    REDUCE_CONFIGS = [_config(4, 1, BLOCK_M=32, BLOCK_K=32)]
else:
    GEMM_CONFIGS = [
        _config(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
        _config(8, 3, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _config(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _config(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        _config(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _config(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        _config(4, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
    ]
    SHRINK_CONFIGS = [
        _config(4, 3, BLOCK_M=64, BLOCK_K=64),
        _config(4, 4, BLOCK_M=64, BLOCK_K=128),
        _config(8, 3, BLOCK_M=128, BLOCK_K=64),
        _config(8, 3, BLOCK_M=128, BLOCK_K=128),
        _config(4, 4, BLOCK_M=32, BLOCK_K=128),
        _config(4, 4, BLOCK_M=32, BLOCK_K=32),
    ]
    REDUCE_CONFIGS = [
        _config(4, 3, BLOCK_M=64, BLOCK_K=64),
        _config(4, 4, BLOCK_M=64, BLOCK_K=128),
        _config(8, 3, BLOCK_M=128, BLOCK_K=128),
        _config(4, 4, BLOCK_M=128, BLOCK_K=64),
        _config(4, 4, BLOCK_M=128, BLOCK_K=32),
        _config(4, 4, BLOCK_M=32, BLOCK_K=32),
    ]


def _prune_wide_rank(*sides: str):
    """A wide rank keeps (side × R_PAD) fp32 tiles live: cap those sides so they stay in registers."""

    def prune(configs, named_args, **kwargs):
        r_pad = kwargs.get("R_PAD", named_args.get("R_PAD", 16))
        kept = [c for c in configs if all(c.kwargs[d] * r_pad <= 128 * 64 or c.kwargs[d] <= 32 for d in sides)]
        return kept or configs[-1:]

    return prune


@triton.jit
def _mma(a, b, acc, FP32: tl.constexpr, PRECISION: tl.constexpr):
    # FP32: operands widened to fp32 and multiplied at PRECISION ("tf32" or "ieee"); the low-rank
    # products of an fp32 adapter use this (bf16/fp16 activations are exact in TF32).
    if FP32 or _WIDEN_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _seed(seed, SEED_PTR: tl.constexpr):
    """The dropout seed: a scalar argument, or (SEED_PTR) read from a one-element int64 tensor, so
    the seed can live on the device (drawn there without a host sync; a CUDA graph replays it)."""
    if SEED_PTR:
        return tl.load(seed)
    else:
        return seed


# --------------------------------------------------------------------------------------- GEMM
# C[M, N] = (A ∘ in_scale)[M, K] · B[K, N]  (+ lr_scale · S[M, R] · L[R, N], dropout on that term)
#           (+ bias[N]), then ∘ out_scale[N]; the low-rank term is one extra rank-R K-step done
#           first, so a single fp32 accumulator is live and Y is written once.
# GRAD_MODE 1: grad[k] += Σ_m A[m, k]·aux[m, k] on the raw A tiles (program column 0 only);
# GRAD_MODE 2: grad[n] += Σ_m C'[m, n]·aux[m, n] on the accumulator before out_scale.
# STORE_PRE: also write the accumulator before out_scale to pre (IA3 keeps Z = X·Wᵀ + b, M×N).
# Saves nothing else: the callers keep X and S (LoRA) or Z (IA3) for the backward.
@triton.autotune(configs=GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "R_PAD", "HAS_LR", "IN_SCALE", "OUT_SCALE",
                                            "GRAD_MODE", "STORE_PRE"], reset_to_zero=["grad_ptr"])
@triton.jit
def adapted_linear_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, in_scale_ptr, out_scale_ptr, s_ptr, l_ptr, aux_ptr, grad_ptr, pre_ptr,
    M, N, K, R, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_sm, stride_sr, stride_lr, stride_ln, stride_xm, stride_xn, stride_pm, stride_pn,
    lr_scale, seed, p_drop, drop_scale,
    HAS_BIAS: tl.constexpr, IN_SCALE: tl.constexpr, OUT_SCALE: tl.constexpr, HAS_LR: tl.constexpr,
    STORE_PRE: tl.constexpr,
    LR_DROPOUT: tl.constexpr, GRAD_MODE: tl.constexpr, R_PAD: tl.constexpr, R_BLOCK: tl.constexpr, SEED_PTR: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    LR_FP32: tl.constexpr, LR_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped launch order: GROUP_M row blocks share the B columns they read while those are in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    first_m = (pid // num_in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % group_size
    pid_n = (pid % num_in_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    dot_dtype = a_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LR:
        # the rank in chunks of R_BLOCK (≤ 32), unrolled: a runtime loop here would be software-
        # pipelined, multiplying the shared memory of these one-off tiles by num_stages
        for r0 in tl.static_range(0, R_PAD, R_BLOCK):
            offs_r = r0 + tl.arange(0, R_BLOCK)
            mask_r = offs_r < R
            s = tl.load(s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            lo = tl.load(l_ptr + offs_r[:, None] * stride_lr + cols[None, :] * stride_ln,
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            s = s.to(tl.float32) * lr_scale
            if not LR_FP32:
                s = s.to(dot_dtype)
                lo = lo.to(dot_dtype)
            acc = _mma(s, lo, acc, LR_FP32, LR_PRECISION)
        if LR_DROPOUT:
            # the mask of the (M, N) output elements: the dropout of x seen from dX = ... + drop(dS·A)
            keep = tl.rand(_seed(seed, SEED_PTR), offs_m[:, None] * N + offs_n[None, :]) > p_drop
            acc = tl.where(keep, acc * drop_scale, 0.0)

    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if GRAD_MODE == 1:
            if pid_n == 0:
                aux = tl.load(aux_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xn,
                              mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                part = tl.sum(a.to(tl.float32) * aux.to(tl.float32), axis=0)
                tl.atomic_add(grad_ptr + kk, part, mask=mask_k)
        if IN_SCALE:
            # as the reference, a ∘ scale rounded back to a's dtype (the fp32 product of two 16-bit
            # values is exact, so this equals the reference's multiply in the scale's dtype)
            sc = tl.load(in_scale_ptr + kk, mask=mask_k, other=0.0)
            a = (a.to(tl.float32) * sc.to(tl.float32)[None, :]).to(dot_dtype)
        acc = _mma(a, b, acc, False, DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if GRAD_MODE == 2:
        aux = tl.load(aux_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn,
                      mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        tl.atomic_add(grad_ptr + offs_n, tl.sum(acc * aux.to(tl.float32), axis=0), mask=mask_n)
    if STORE_PRE:
        tl.store(pre_ptr + rows[:, None] * stride_pm + cols[None, :] * stride_pn, acc.to(pre_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])
    if OUT_SCALE:
        sc = tl.load(out_scale_ptr + offs_n, mask=mask_n, other=0.0)
        acc = acc * sc.to(tl.float32)[None, :]
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ------------------------------------------------------------------------------------- shrink
# S[M, R] += scale · op(X)[M, K] · W[K, R], op = dropout from the seed (never a stored mask);
# HAS_DUAL: OUT[K, R] += dual_scale · op(X)ᵀ · T[M, R] from the same X tiles (one pass over X).
# Grid (row blocks, splits of K); both outputs are fp32 and accumulated with atomics.
# Saves S (M×r) for the LoRA backward; nothing else.
@triton.autotune(configs=SHRINK_CONFIGS, key=["M_BUCKET", "K", "R_PAD", "HAS_DUAL", "DROPOUT"],
                 prune_configs_by={"early_config_prune": _prune_wide_rank("BLOCK_M", "BLOCK_K")},
                 reset_to_zero=["s_ptr", "out_ptr"])
@triton.jit
def lowrank_shrink_kernel(
    x_ptr, w_ptr, s_ptr, t_ptr, out_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wk, stride_wr, stride_sm, stride_sr,
    stride_tm, stride_tr, stride_ok, stride_or,
    scale, dual_scale, seed, p_drop,
    DROPOUT: tl.constexpr, HAS_DUAL: tl.constexpr, R_PAD: tl.constexpr, SEED_PTR: tl.constexpr, LR_FP32: tl.constexpr,
    LR_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_r = offs_r < R
    rows = offs_m.to(tl.int64)
    dot_dtype = x_ptr.dtype.element_ty

    if HAS_DUAL:
        t = tl.load(t_ptr + rows[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        t = t.to(tl.float32) * dual_scale
        if not LR_FP32:
            t = t.to(dot_dtype)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for kb in range(pid_s, tl.cdiv(K, BLOCK_K), n_split):
        kk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = kk < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if DROPOUT:
            keep = tl.rand(_seed(seed, SEED_PTR), offs_m[:, None] * K + kk[None, :]) > p_drop
            x = tl.where(keep, x, 0.0).to(dot_dtype)
        w = tl.load(w_ptr + kk[:, None] * stride_wk + offs_r[None, :] * stride_wr,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if not LR_FP32:
            w = w.to(dot_dtype)
        acc = _mma(x, w, acc, LR_FP32, LR_PRECISION)
        if HAS_DUAL:
            part = _mma(tl.trans(x), t, tl.zeros((BLOCK_K, R_PAD), dtype=tl.float32), LR_FP32, LR_PRECISION)
            tl.atomic_add(out_ptr + kk[:, None] * stride_ok + offs_r[None, :] * stride_or, part,
                          mask=mask_k[:, None] & mask_r[None, :])
    tl.atomic_add(s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr, acc * scale,
                  mask=mask_m[:, None] & mask_r[None, :])


# ------------------------------------------------------------------------------------- reduce
# OUT[R, K] += scale · T[M, R]ᵀ · op(X)[M, K], op = dropout from the seed; grid (column blocks,
# splits of M), fp32 atomics.  LoRA backward: dA = dSᵀ·dropout(X), the one extra read of X.
@triton.autotune(configs=REDUCE_CONFIGS, key=["M_BUCKET", "K", "R_PAD", "DROPOUT"],
                 prune_configs_by={"early_config_prune": _prune_wide_rank("BLOCK_M", "BLOCK_K")},
                 reset_to_zero=["out_ptr"])
@triton.jit
def lowrank_reduce_kernel(
    t_ptr, x_ptr, out_ptr,
    M, K, R, M_BUCKET,
    stride_tm, stride_tr, stride_xm, stride_xk, stride_or, stride_ok,
    scale, seed, p_drop,
    DROPOUT: tl.constexpr, R_PAD: tl.constexpr, SEED_PTR: tl.constexpr, LR_FP32: tl.constexpr,
    LR_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_k = offs_k < K
    mask_r = offs_r < R
    dot_dtype = x_ptr.dtype.element_ty

    acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    for mb in range(pid_s, tl.cdiv(M, BLOCK_M), n_split):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        rows = offs_m.to(tl.int64)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if DROPOUT:
            keep = tl.rand(_seed(seed, SEED_PTR), offs_m[:, None] * K + offs_k[None, :]) > p_drop
            x = tl.where(keep, x, 0.0).to(dot_dtype)
        t = tl.load(t_ptr + rows[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        if not LR_FP32:
            t = t.to(dot_dtype)
        acc = _mma(tl.trans(t), x, acc, LR_FP32, LR_PRECISION)
    tl.atomic_add(out_ptr + offs_r[:, None] * stride_or + offs_k[None, :] * stride_ok, acc * scale,
                  mask=mask_r[:, None] & mask_k[None, :])


# ------------------------------------------------------------------------------ launch helpers
# Host cost matters as much as the kernels at decode sizes: grid arithmetic is plain Python ints,
# the small per-device objects are made once, and each launch goes through a plan cached per
# (kernel, shapes, dtypes, flags): the first call autotunes through the Autotuner; later ones call
# the chosen compiled kernel directly with its precomputed grid and meta-parameters (the
# Autotuner rebuilds a ~40-entry key on every call).  No launch reads anything back to the host.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def rank_pad(r: int) -> int:
    """tl.dot needs every tile side ≥ 16 and a power of two: the rank is padded (and masked)."""
    return max(16, _pow2(r))


def m_bucket(m: int) -> int:
    """Autotune key for the token count: its power-of-two bucket, so each new M does not re-tune."""
    return _pow2(max(m, 1))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs follow torch's matmul precision setting (full fp32 unless TF32 is allowed)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def lowrank_mode(x_dtype: torch.dtype, adapter_dtype: torch.dtype) -> dict:
    """How the low-rank products run: in fp32 (TF32 tensor cores, or full fp32 for fp32 layers under
    torch's "highest" precision) when the adapter or the layer is fp32 — PEFT runs them in the
    adapter's dtype — else in the activations' 16-bit dtype; fp32 accumulation either way."""
    fp32 = torch.float32 in (x_dtype, adapter_dtype)
    return {"LR_FP32": fp32, "LR_PRECISION": dot_precision(x_dtype) if fp32 else "tf32"}


_TARGETS: dict[torch.device, int] = {}
_DUMMIES: dict[torch.device, torch.Tensor] = {}
_PLANS: dict[tuple, tuple] = {}


def target_programs(device: torch.device) -> int:
    """How many programs keep every SM busy (split-K/split-M for the thin kernels aims at this)."""
    n = _TARGETS.get(device)
    if n is None:
        n = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        _TARGETS[device] = n
    return n


def _splits(blocks_out: int, blocks_loop: int, device: torch.device) -> int:
    return max(1, min(blocks_loop, _cdiv(target_programs(device), max(blocks_out, 1))))


def _dummy(device: torch.device) -> torch.Tensor:
    # stands in for the pointer of an absent optional operand (never read: its flag is off)
    t = _DUMMIES.get(device)
    if t is None:
        t = _DUMMIES[device] = torch.empty(1, device=device, dtype=torch.float32)
    return t


def _launch_planned(key: tuple, args: tuple) -> bool:
    """Launch the kernel planned for `key` (the chosen compiled kernel, its grid and meta-parameters), if
    there is a plan: the hot path of every later call, before any meta dict is built."""
    plan = _PLANS.get(key)
    if plan is None:
        return False
    fn, grid_now, kwargs = plan
    fn[grid_now](*args, **kwargs)
    return True


def launch(kernel, grid, key: tuple, args: tuple, meta: dict) -> None:
    """`kernel[grid](*args, **meta)` for an autotuned kernel, planned once per `key` (which must
    determine the autotuner's choice and the grid): the first call tunes, later calls launch the
    chosen compiled kernel directly."""
    plan = _PLANS.get(key)
    if plan is None:
        kernel[grid](*args, **meta)
        config = getattr(kernel, "best_config", None)
        if config is None or "run" in vars(kernel):  # its launch is wrapped (a recorder, a mock): no plan
            return
        plan = _PLANS[key] = (kernel.fn, grid({**meta, **config.kwargs}), {**meta, **config.all_kwargs()})
        return
    fn, grid_now, kwargs = plan
    fn[grid_now](*args, **kwargs)


# torch's own binding behind torch.get_float32_matmul_precision (part of every plan key: half the cost)
_precision = getattr(torch._C, "_get_float32_matmul_precision", torch.get_float32_matmul_precision)


def _seed_arg(seed):
    """A seed as the kernels take it: a Python int, or a one-element int64 tensor on the device."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"a dropout seed tensor must be one int64 element, got {seed.dtype} {tuple(seed.shape)}")
        return seed
    return int(seed)


def gemm(a: torch.Tensor, b_kn: tuple[torch.Tensor, int, int, int], out_dtype: torch.dtype, *,
         bias: torch.Tensor | None = None, in_scale: torch.Tensor | None = None,
         out_scale: torch.Tensor | None = None, lowrank: tuple | None = None, dropout: tuple | None = None,
         grad: tuple | None = None, pre: torch.Tensor | None = None) -> torch.Tensor:
    """C = epilogue((a ∘ in_scale) · B [+ lr_scale·S·L]) with the adapted-linear kernel.

    b_kn: (tensor, N, stride_k, stride_n) describing B as a (K, N) matrix; lowrank: (s (M, r),
    l tensor, stride_r, stride_n, lr_scale, adapter dtype); dropout: (p, seed) on the low-rank term;
    grad: (mode, aux, grad_fp32) — see the kernel's comment; pre: an (M, N) tensor that receives
    the result before out_scale."""
    m, k = a.shape
    b, n, stride_bk, stride_bn = b_kn
    device = a.device
    c = torch.empty((m, n), device=device, dtype=out_dtype)
    dummy = _dummy(device)
    if lowrank is not None:
        s, l_t, stride_lr, stride_ln, lr_scale, adapter_dtype = lowrank
        r = s.shape[1]
        s_strides = s.stride()
    else:
        s, l_t, stride_lr, stride_ln, lr_scale, adapter_dtype, r = dummy, dummy, 0, 0, 1.0, a.dtype, 1
        s_strides = (0, 0)
    p, seed = dropout if dropout is not None else (0.0, 0)
    mode, aux, grad_buf = grad if grad is not None else (0, dummy, dummy)
    aux_strides = aux.stride() if mode else (0, 0)
    bias_t = bias if bias is not None else dummy
    in_t = in_scale if in_scale is not None else dummy
    out_t = out_scale if out_scale is not None else dummy
    pre_t = pre if pre is not None else dummy
    args = (a, b, c, bias_t, in_t, out_t, s, l_t, aux, grad_buf, pre_t, m, n, k, r, m_bucket(m),
            *a.stride(), stride_bk, stride_bn, *c.stride(), *s_strides,
            stride_lr, stride_ln, *aux_strides, *(pre.stride() if pre is not None else (0, 0)),
            float(lr_scale), _seed_arg(seed), float(p), 1.0 / (1.0 - p))
    # the plan's key from what decides the meta-parameters and the grid, before building them: a planned
    # launch skips that work
    seed_ptr = isinstance(seed, torch.Tensor)
    key = ("gemm", m, n, k, r, device, a.dtype, b.dtype, out_dtype, adapter_dtype, mode, p > 0.0, seed_ptr,
           None if bias is None else bias.dtype, None if in_scale is None else in_scale.dtype,
           None if out_scale is None else out_scale.dtype, None if lowrank is None else (s.dtype, l_t.dtype),
           (aux.dtype, grad_buf.dtype) if mode else None, None if pre is None else pre.dtype,
           _precision() if torch.float32 in (a.dtype, adapter_dtype) else None)
    if _launch_planned(key, args):
        return c
    r_pad = rank_pad(r)
    meta = dict(HAS_BIAS=bias is not None, IN_SCALE=in_scale is not None, OUT_SCALE=out_scale is not None,
                HAS_LR=lowrank is not None, STORE_PRE=pre is not None, LR_DROPOUT=lowrank is not None and p > 0.0,
                GRAD_MODE=mode, R_PAD=r_pad, R_BLOCK=min(r_pad, 32), SEED_PTR=seed_ptr,
                DOT_PRECISION=dot_precision(a.dtype),
                **lowrank_mode(a.dtype, adapter_dtype))

    def grid(meta):
        return (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]),)

    launch(adapted_linear_kernel, grid, key, args, meta)
    return c


def shrink(x: torch.Tensor, w_kr: tuple[torch.Tensor, int, int], r: int, scale: float, adapter_dtype: torch.dtype,
           *, p: float = 0.0, seed: int | torch.Tensor = 0, dual: tuple | None = None) -> torch.Tensor:
    """fp32 S = scale·dropout(x)·W for W (K, r) given as (tensor, stride_k, stride_r); dual =
    (t (M, r), out fp32 (K, r) zero-filled, dual_scale) also accumulates out += dual_scale·xᵀ·t."""
    m, k = x.shape
    w, stride_wk, stride_wr = w_kr
    device = x.device
    s = torch.zeros((m, r), device=device, dtype=torch.float32)
    dummy = _dummy(device)
    t, out, dual_scale = dual if dual is not None else (dummy, dummy, 0.0)
    t_strides = t.stride() if dual is not None else (0, 0)
    o_strides = out.stride() if dual is not None else (0, 0)
    args = (x, w, s, t, out, m, k, r, m_bucket(m), *x.stride(), stride_wk, stride_wr,
            *s.stride(), *t_strides, *o_strides, float(scale), float(dual_scale), _seed_arg(seed), float(p))
    seed_ptr = isinstance(seed, torch.Tensor)
    key = ("shrink", m, k, r, device, x.dtype, w.dtype, adapter_dtype, p > 0.0, seed_ptr,
           None if dual is None else (t.dtype, out.dtype),
           _precision() if torch.float32 in (x.dtype, adapter_dtype) else None)
    if _launch_planned(key, args):
        return s
    meta = dict(DROPOUT=p > 0.0, HAS_DUAL=dual is not None, R_PAD=rank_pad(r), SEED_PTR=seed_ptr,
                **lowrank_mode(x.dtype, adapter_dtype))

    def grid(meta):
        blocks_m = _cdiv(m, meta["BLOCK_M"])
        return (blocks_m, _splits(blocks_m, _cdiv(k, meta["BLOCK_K"]), device))

    launch(lowrank_shrink_kernel, grid, key, args, meta)
    return s


def reduce_rows(t: torch.Tensor, x: torch.Tensor, scale: float, adapter_dtype: torch.dtype, *, p: float = 0.0,
                seed: int | torch.Tensor = 0) -> torch.Tensor:
    """fp32 (r, K) = scale·tᵀ·dropout(x) for t (M, r), x (M, K)."""
    m, k = x.shape
    r = t.shape[1]
    device = x.device
    out = torch.zeros((r, k), device=device, dtype=torch.float32)
    args = (t, x, out, m, k, r, m_bucket(m), *t.stride(), *x.stride(), *out.stride(), float(scale),
            _seed_arg(seed), float(p))
    seed_ptr = isinstance(seed, torch.Tensor)
    key = ("reduce", m, k, r, device, t.dtype, x.dtype, adapter_dtype, p > 0.0, seed_ptr,
           _precision() if torch.float32 in (x.dtype, adapter_dtype) else None)
    if _launch_planned(key, args):
        return out
    meta = dict(DROPOUT=p > 0.0, R_PAD=rank_pad(r), SEED_PTR=seed_ptr, **lowrank_mode(x.dtype, adapter_dtype))

    def grid(meta):
        blocks_k = _cdiv(k, meta["BLOCK_K"])
        return (blocks_k, _splits(blocks_k, _cdiv(m, meta["BLOCK_M"]), device))

    launch(lowrank_reduce_kernel, grid, key, args, meta)
    return out
