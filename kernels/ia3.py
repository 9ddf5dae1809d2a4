"""Launch wrappers for the fused IA3 linear (kernels in `adapted_linear.py`).

Output scaling:  Y = (X·Wᵀ + b) ∘ l in the GEMM epilogue, which also writes Z = X·Wᵀ + b when l
    is trained (the one M×N tensor the backward keeps, as PEFT does).  Backward: dX = (dY ∘ l)·W
    with l applied as each dY tile is loaded; dl = Σ_m dY∘Z accumulated from those same dY tiles.
    No GEMM is recomputed and nothing is read back to the host.
Feed-forward input scaling:  Y = ((X ∘ l) in X's dtype)·Wᵀ + b, l applied as each X tile is loaded.
    Backward: G = dY·W; dX = G ∘ l and dl = Σ_m G∘X, both in the GEMM epilogue (G never stored).
Saved: Z (output scaling) or X (input scaling), each only when l is trained.
"""

from __future__ import annotations

import torch

from .adapted_linear import gemm


def ia3_forward(x, weight, bias, ia3_l, feedforward, keep_z=False):
    """(y, z) for 2-D x: y as `fastpeft.ops.ia3.reference_forward`; z the pre-scale output when
    `keep_z` and output scaling, else None."""
    l = ia3_l.reshape(-1)
    b_kn = (weight, weight.shape[0], weight.stride(1), weight.stride(0))
    if feedforward:
        return gemm(x, b_kn, x.dtype, bias=bias, in_scale=l), None
    z = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype) if keep_z else None
    return gemm(x, b_kn, x.dtype, bias=bias, out_scale=l, pre=z), z


def ia3_backward(dy, x, z, weight, ia3_l, feedforward, needs=(True, True)):
    """(dx, dl) as `fastpeft.ops.ia3.reference_backward` for 2-D dy; x (input scaling) or z (output
    scaling) as saved by the forward; each result None unless `needs` = (need_x, need_l) asks."""
    need_x, need_l = needs
    l = ia3_l.reshape(-1)
    n, k = weight.shape
    b_kn = (weight, k, weight.stride(0), weight.stride(1))  # dX = (·)·W: W (N, K) is the (K=N, N=K) operand
    grad = torch.zeros(k if feedforward else n, device=dy.device, dtype=torch.float32) if need_l else None
    dx = None
    if feedforward:
        if need_x or need_l:  # G = dY·W is needed for dl even when dX is not
            dx = gemm(dy, b_kn, dy.dtype, out_scale=l, grad=(2, x, grad) if need_l else None)
    elif need_x:
        dx = gemm(dy, b_kn, dy.dtype, in_scale=l, grad=(1, z, grad) if need_l else None)
    elif need_l:
        grad = (dy.to(torch.float32) * z.to(torch.float32)).sum(0)
    dl = grad.reshape(ia3_l.shape).to(ia3_l.dtype) if need_l else None
    return (dx if need_x else None), dl


__all__ = ["ia3_forward", "ia3_backward"]
