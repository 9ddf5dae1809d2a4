"""Launch wrappers for the fused IA3 linear (kernels in `adapted_linear.py`).

Output scaling:  Y = (X·Wᵀ + b) ∘ l in the GEMM epilogue.  Backward: dX = (dY ∘ l)·W with l
    applied as each dY tile is loaded; dl = Σ_m dY∘Z accumulated from those same dY tiles, Z
    recovered as Y / l — recomputing Z = X·Wᵀ + b would cost a third GEMM, and Y is saved anyway.
    Y / l carries one bf16 rounding of Y, the same as the reference's bf16 Z.  Where l is exactly
    0, Y holds no trace of Z: those columns (if any) are recomputed from X.
Feed-forward input scaling:  Y = ((X ∘ l) in X's dtype)·Wᵀ + b, l applied as each X tile is loaded.
    Backward: G = dY·W; dX = G ∘ l and dl = Σ_m G∘X, both in the GEMM epilogue (G never stored).
Saved: X and Y (the op's contract) — nothing else.
"""

from __future__ import annotations

import torch

from .adapted_linear import gemm


def ia3_forward(x, weight, bias, ia3_l, feedforward):
    """y as `fastpeft.ops.ia3.reference_forward`, for 2-D x."""
    l = ia3_l.reshape(-1)
    b_kn = (weight, weight.shape[0], weight.stride(1), weight.stride(0))
    if feedforward:
        return gemm(x, b_kn, x.dtype, bias=bias, in_scale=l)
    return gemm(x, b_kn, x.dtype, bias=bias, out_scale=l)


def ia3_backward(dy, x, y, weight, bias, ia3_l, feedforward):
    """(dx, dl) as `fastpeft.ops.ia3.reference_backward`, for 2-D x, dy and y."""
    l = ia3_l.reshape(-1)
    n, k = weight.shape
    b_kn = (weight, k, weight.stride(0), weight.stride(1))  # dX = (·)·W: W (N, K) is the (K=N, N=K) operand
    grad = torch.zeros(k if feedforward else n, device=dy.device, dtype=torch.float32)
    if feedforward:
        dx = gemm(dy, b_kn, x.dtype, out_scale=l, grad=(2, x, grad))
        return dx, grad.reshape(ia3_l.shape).to(ia3_l.dtype)
    dx = gemm(dy, b_kn, x.dtype, in_scale=l, grad=(1, y, grad))
    l32 = l.to(torch.float32)
    zero = l32 == 0
    dl = grad / torch.where(zero, torch.ones_like(l32), l32)
    if bool(zero.any()):  # rare (l starts at 1): Z of those columns is not in Y
        cols = zero.nonzero().flatten()
        z = x @ weight[cols].t()
        if bias is not None:
            z = z + bias[cols]
        dl[cols] = (dy[:, cols].to(torch.float32) * z.to(torch.float32)).sum(0)
    return dx, dl.reshape(ia3_l.shape).to(ia3_l.dtype)


__all__ = ["ia3_forward", "ia3_backward"]
