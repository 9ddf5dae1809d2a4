"""y = x·Wᵀ + b for a 4-bit frozen W: the autograd op of the 4-bit linear layer.

The weight is never kept in 16 bits between calls: the forward dequantises it (CPU: the reference
`dequantize_4bit`; CUDA: the NF4-prologue GEMM of kernels/nf4.py, tiles decoded in registers) and the
backward decodes it again for dX = dY·W. Nothing is saved for the backward but the packed weight.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .nf4 import QuantState4bit, dequantize_4bit


def _use_triton(x: torch.Tensor) -> bool:
    """CUDA tensors take the kernels; FASTPEFT_NF4_TRITON=0 turns them off, =force runs them on any
    device (with TRITON_INTERPRET=1: the interpreter tests of the op)."""
    return _triton_for(x.dtype, x.is_cuda)


def _triton_for(dtype: torch.dtype, is_cuda: bool) -> bool:
    mode = os.environ.get("FASTPEFT_NF4_TRITON", "1")
    if mode == "0" or dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return is_cuda or mode == "force"


def dense_weight(packed: torch.Tensor, state: QuantState4bit, dtype: torch.dtype, via_state_dtype: bool = False):
    """W in `dtype`: code·absmax rounded once to `dtype` (bitsandbytes' forward, `gemm_4bit`), or first
    to the dtype it was quantised from and then cast (`via_state_dtype`: bitsandbytes' backward)."""
    first = state.dtype if via_state_dtype else dtype
    if _triton_for(dtype, packed.is_cuda):
        from fastpeft.kernels.nf4 import nf4_dequantize

        return nf4_dequantize(packed, state, first).to(dtype)
    return dequantize_4bit(packed, state, first).to(dtype)


def _forward(x2: torch.Tensor, packed: torch.Tensor, state: QuantState4bit, bias: torch.Tensor | None):
    if _use_triton(x2):
        from fastpeft.kernels.nf4 import nf4_matmul

        return nf4_matmul(x2, packed, state, bias=bias)
    return F.linear(x2, dense_weight(packed, state, x2.dtype), bias)


def _grad_input(dy2: torch.Tensor, packed: torch.Tensor, state: QuantState4bit) -> torch.Tensor:
    if _use_triton(dy2):
        from fastpeft.kernels.nf4 import nf4_matmul_dx

        return nf4_matmul_dx(dy2, packed, state)
    return dy2 @ dense_weight(packed, state, dy2.dtype, via_state_dtype=True)


class _Linear4bitFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, state, bias):
        x2 = x.reshape(-1, x.shape[-1])
        y = _forward(x2, packed, state, bias)
        ctx.state = state
        ctx.save_for_backward(packed)
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        (packed,) = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = db = None
        if ctx.needs_input_grad[0]:
            dx = _grad_input(dy2, packed, ctx.state).reshape(*dy.shape[:-1], -1)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = dy2.sum(0)
        return dx, None, None, db


def linear_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState4bit,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x·Wᵀ + b with W = dequantize_4bit(packed, state) (read in x's dtype); W is frozen."""
    if x.shape[-1] != state.shape[-1] or len(state.shape) != 2:
        raise ValueError(f"4-bit weight of shape {tuple(state.shape)} cannot multiply an input with "
                         f"{x.shape[-1]} features")
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _Linear4bitFn.apply(x, packed, state, bias)
    return _forward(x.reshape(-1, x.shape[-1]), packed, state, bias).reshape(*x.shape[:-1], state.shape[0])


class _QLoraFn(torch.autograd.Function):
    """y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ, W 4-bit and frozen: one NF4-prologue GEMM with the
    LoRA term in its epilogue; backward dX = dY·W + scaling·(dY·B)·A in the NF4 dX GEMM (the LoRA term
    in its epilogue when there is no dropout mask to apply), dA, dB as small GEMMs. Saves x, S =
    dropout(x)·Aᵀ and the dropout mask (bool); never a 16-bit W."""

    @staticmethod
    def forward(ctx, x, packed, state, bias, a, b, scaling, p, training):
        from fastpeft.kernels.nf4 import nf4_matmul

        x2 = x.reshape(-1, x.shape[-1])
        mask = None
        xd = x2.to(a.dtype)
        if p > 0 and training:
            mask = torch.empty(x2.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p)  # 1 byte a value
            xd = xd * mask / (1 - p)
        s = xd @ a.t()
        y = nf4_matmul(x2, packed, state, bias=bias, lora_s=s, lora_b=b, scaling=scaling)
        ctx.state, ctx.scaling, ctx.p, ctx.has_bias = state, scaling, p, bias is not None
        ctx.save_for_backward(packed, x2, s, a, b, mask)  # x in its own dtype, not the adapter's copy
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        from fastpeft.kernels.nf4 import nf4_matmul_dx

        packed, x2, s, a, b, mask = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dyf = dy2.to(b.dtype)
        ds = (dyf @ b) * ctx.scaling
        da = None
        if ctx.needs_input_grad[4]:
            xd = x2.to(a.dtype) if mask is None else x2.to(a.dtype) * mask / (1 - ctx.p)
            da = ds.t() @ xd
        db = (dyf.t() @ s) * ctx.scaling if ctx.needs_input_grad[5] else None
        dx = None
        if ctx.needs_input_grad[0]:
            if mask is None:
                dx = nf4_matmul_dx(dy2, packed, ctx.state, lora_ds=ds, lora_a=a, scaling=1.0)
            else:
                dx = nf4_matmul_dx(dy2, packed, ctx.state)
                dx = (dx + ((ds @ a) * mask / (1 - ctx.p)).to(dx.dtype))
            dx = dx.reshape(*dy.shape[:-1], -1)
        dbias = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return dx, None, None, dbias, da, db, None, None, None


def qlora_linear(x: torch.Tensor, packed: torch.Tensor, state: QuantState4bit, bias: torch.Tensor | None,
                 lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, dropout_p: float = 0.0,
                 training: bool = False) -> torch.Tensor:
    """The fused QLoRA layer (the Triton path; `LoraLinear4bit` takes it on CUDA): x in the compute dtype,
    A (r, K) and B (N, r) in the adapter dtype."""
    return _QLoraFn.apply(x, packed, state, bias, lora_a, lora_b, float(scaling), float(dropout_p), bool(training))


def qlora_layer(x: torch.Tensor, packed: torch.Tensor, state: QuantState4bit, bias: torch.Tensor | None,
                compute_dtype: torch.dtype | None, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """`qlora_linear` as a 4-bit layer runs it (fastpeft's and bitsandbytes' Linear4bit alike): x and the bias
    in the layer's compute dtype (default: x's), the output back in x's dtype."""
    dtype = compute_dtype or x.dtype
    xc = x if x.dtype == dtype else x.to(dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    y = qlora_linear(xc, packed, state, bias, lora_a, lora_b, scaling, dropout_p, training)
    return y if y.dtype == x.dtype else y.to(x.dtype)
