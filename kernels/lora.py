"""Launch wrappers for the fused LoRA linear (kernels in `adapted_linear.py`).

Forward:  S = dropout(X)·Aᵀ (shrink kernel, reads X once), then Y = X·Wᵀ + S·(s·B)ᵀ + b (one GEMM
          with an extra rank-r K-step and the bias in its epilogue, Y written once).
Backward (W frozen, no dW):  one pass over dY gives dS = s·dY·B and dB = s·dYᵀ·S;
          dX = dY·W + dropout(dS·A) (the low-rank step first, dropout re-drawn from the seed on
          its (M, K) output elements); dA = dSᵀ·dropout(X) (one pass over X).
Saved between them: X, S (M×r) and the seed — nothing M×N, no mask.
"""

from __future__ import annotations

import torch

from .adapted_linear import MAX_RANK, gemm, reduce_rows, shrink


def lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """(y, s) as `fastpeft.ops.lora.reference_forward`, for 2-D x."""
    r = lora_A.shape[0]
    p = float(dropout_p)
    keep_scale = 1.0 / (1.0 - p) if p > 0.0 else 1.0
    s32 = shrink(x, (lora_A, lora_A.stride(1), lora_A.stride(0)), r, keep_scale, lora_A.dtype, p=p, seed=seed)
    # Y = X·Wᵀ (+ b) + (scaling·S)·Bᵀ: B as the (r, N) operand Bᵀ
    y = gemm(x, (weight, weight.shape[0], weight.stride(1), weight.stride(0)), x.dtype, bias=bias,
             lowrank=(s32, lora_B, lora_B.stride(1), lora_B.stride(0), scaling, lora_B.dtype))
    return y, (s32 if s32.dtype == lora_A.dtype else s32.to(lora_A.dtype))


def lora_backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed):
    """(dx, dA, dB) as `fastpeft.ops.lora.reference_backward`, for 2-D x and dy."""
    r = lora_A.shape[0]
    n, k = weight.shape
    p = float(dropout_p)
    d_b = torch.zeros((n, r), device=dy.device, dtype=torch.float32)
    # one pass over dY: dS = scaling·dY·B, dB = scaling·dYᵀ·S
    ds = shrink(dy, (lora_B, lora_B.stride(0), lora_B.stride(1)), r, scaling, lora_B.dtype, dual=(s, d_b, scaling))
    # dX = dY·W + dropout(dS·A): W (N, K) is already the (K=N, N=K) operand
    dx = gemm(dy, (weight, k, weight.stride(0), weight.stride(1)), x.dtype,
              lowrank=(ds, lora_A, lora_A.stride(0), lora_A.stride(1), 1.0, lora_A.dtype),
              dropout=(p, seed) if p > 0.0 else None)
    keep_scale = 1.0 / (1.0 - p) if p > 0.0 else 1.0
    d_a = reduce_rows(ds, x, keep_scale, lora_A.dtype, p=p, seed=seed)
    return (dx, d_a if d_a.dtype == lora_A.dtype else d_a.to(lora_A.dtype),
            d_b if d_b.dtype == lora_B.dtype else d_b.to(lora_B.dtype))


__all__ = ["lora_forward", "lora_backward", "MAX_RANK"]
