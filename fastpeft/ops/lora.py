"""lora_linear: y = x·Wᵀ + b + scaling · (dropout(x)·Aᵀ)·Bᵀ, the LoRA-adapted projection.

Semantics follow HF PEFT's `lora.Linear`: the low-rank path runs in the adapter's dtype
(`x` cast to `lora_A.dtype`), is added to the base output and the sum is cast back to the base
output dtype.  Dropout draws its mask from a Philox seed (`fastpeft.ops._random`), so the
backward re-draws it instead of storing it.  Forward returns S = dropout(x)·Aᵀ (M×r) for the
backward; nothing M×N is saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backend
from ._common import cast_for_autocast, check, check_float, check_same_device, dense, gpu_kernel_supports
from ._random import dropout_keep, new_seed

OP = "lora_linear"


# ----------------------------------------------------------------------------- reference
def _dropped(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """dropout(x) for a 2-D x, the mask drawn from `seed` at row-major offsets."""
    if p <= 0.0:
        return x
    keep = dropout_keep(seed, tuple(x.shape), p, x.device)
    return x * keep.to(x.dtype) / (1.0 - p)


def reference_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """(y, s) for a 2-D x: the plain-PyTorch definition of the op."""
    y = F.linear(x, weight, bias)
    s = _dropped(x.to(lora_A.dtype), dropout_p, seed) @ lora_A.t()
    y = (y + (s @ lora_B.t()) * scaling).to(y.dtype)
    return y, s


def reference_backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed):
    """(dx, dA, dB) for a 2-D x given dy and the saved s."""
    dy_a = dy.to(lora_B.dtype) * scaling
    ds = dy_a @ lora_B  # (M, r)
    d_b = dy_a.t() @ s
    xd = _dropped(x.to(lora_A.dtype), dropout_p, seed)
    d_a = ds.t() @ xd
    dxd = ds @ lora_A
    if dropout_p > 0.0:
        dxd = _dropped(dxd, dropout_p, seed)
    dx = (dy @ weight).to(x.dtype) + dxd.to(x.dtype)
    return dx, d_a.to(lora_A.dtype), d_b.to(lora_B.dtype)


backend.register(OP, "torch", priority=0, forward=reference_forward, backward=reference_backward)


def kernel_supports(x, weight, bias, lora_A, lora_B, *rest, forced: bool) -> str | None:
    """Common applicability test for the GPU kernels of this op."""
    reason = gpu_kernel_supports(x, weight, bias, lora_A, lora_B, forced=forced)
    if reason:
        return reason
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {x.dtype} not supported by the kernel"
    return None


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fastpeft::lora_linear_fwd", mutates_args=())
def _lora_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
              lora_B: torch.Tensor, scaling: float, dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    impl = backend.select(OP, x, weight, bias, lora_A, lora_B, dropout_p)
    return dense(*impl.fns["forward"](x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed))


@_lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]), dtype=lora_A.dtype)


@torch.library.custom_op("fastpeft::lora_linear_bwd", mutates_args=())
def _lora_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
              s: torch.Tensor, scaling: float, dropout_p: float, seed: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = backend.select(OP, x, weight, None, lora_A, lora_B, dropout_p)
    return dense(*impl.fns["backward"](dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed))


@_lora_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed):
    return x.new_empty(x.shape), lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


def _setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1])
    ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _ds):
    x, weight, lora_A, lora_B, s = ctx.saved_tensors
    dx, d_a, d_b = _lora_bwd(dy.contiguous(), x, weight, lora_A, lora_B, s, ctx.scaling, ctx.dropout_p, ctx.seed)
    d_w = (dy.t() @ x).to(weight.dtype) if ctx.needs_input_grad[1] else None
    d_bias = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, d_w, d_bias, d_a, d_b, None, None, None


_lora_fwd.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------- public API
def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, dropout_p: float = 0.0, training: bool = False,
                seed: int | None = None) -> torch.Tensor:
    """LoRA projection `x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ`.

    x: (..., K); weight: (N, K) (pass `weight.t()` for GPT-2 Conv1D); bias: (N,) or None;
    lora_A: (r, K); lora_B: (N, r).  Dropout applies only when `training` and dropout_p > 0; its
    mask comes from `seed` (drawn from torch's CPU generator when None).
    """
    check(x.dim() >= 1, "x must have at least one dimension")
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        check_float(name, t)
    check_same_device(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    check(weight.dim() == 2, f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    check(x.shape[-1] == k, f"x has {x.shape[-1]} features but the layer's in_features is {k}")
    check(lora_A.dim() == 2 and lora_A.shape[1] == k,
          f"lora_A has shape {tuple(lora_A.shape)} but the layer's in_features is {k}; expected (r, {k})")
    r = lora_A.shape[0]
    check(r >= 1, "LoRA rank must be >= 1")
    check(tuple(lora_B.shape) == (n, r),
          f"lora_B has shape {tuple(lora_B.shape)}; expected (out_features, r) = ({n}, {r})")
    check(bias is None or tuple(bias.shape) == (n,), f"bias has shape {tuple(bias.shape) if bias is not None else None}; expected ({n},)")
    check(0.0 <= dropout_p < 1.0, f"dropout_p must be in [0, 1), got {dropout_p}")
    x, weight, bias, lora_A, lora_B = cast_for_autocast(x.device.type, x, weight, bias, lora_A, lora_B)
    check(x.dtype == weight.dtype, f"x is {x.dtype} but the frozen weight is {weight.dtype}")
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = new_seed()
    lead = x.shape[:-1]
    y, _ = _lora_fwd(x.reshape(-1, k), weight, bias, lora_A, lora_B, float(scaling), p, int(seed or 0))
    return y.reshape(*lead, n)


# ----------------------------------------------------------------------------- triton backend
def _have_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _triton_supports(x, weight, bias, lora_A, lora_B, dropout_p=0.0, *, forced: bool) -> str | None:
    reason = kernel_supports(x, weight, bias, lora_A, lora_B, forced=forced)
    if reason:
        return reason
    if not _have_triton():
        return "triton is not installed"
    if lora_A.dtype not in (torch.float16, torch.bfloat16, torch.float32) or lora_B.dtype != lora_A.dtype:
        return f"adapter dtypes {lora_A.dtype}/{lora_B.dtype} not supported by the kernel (fp16/bf16/fp32, equal)"
    if lora_A.shape[0] > 256:
        return f"rank {lora_A.shape[0]} above the kernel's maximum 256"
    if dropout_p > 0.0 and x.numel() > 2**31 - 1:
        return "input too large for 32-bit dropout offsets"
    return None


def _triton_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    from ..kernels.lora import lora_forward

    return lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def _triton_backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed):
    from ..kernels.lora import lora_backward

    return lora_backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed)


backend.register(OP, "triton", priority=10, supports=_triton_supports, forward=_triton_forward,
                 backward=_triton_backward)
