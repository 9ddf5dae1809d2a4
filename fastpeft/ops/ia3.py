"""ia3_linear: IA3's learned scaling inside a projection.

Output scaling (feedforward=False): y = (x·Wᵀ + b) ∘ l, computed in l's dtype and cast back to
the base output dtype, as HF PEFT's `ia3.Linear` does.
Input scaling (feedforward=True):   y = ((x ∘ l) cast to x.dtype)·Wᵀ + b.
l has PEFT's shape: (out_features, 1) for output scaling, (1, in_features) for input scaling;
any shape with that many elements is accepted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backend
from ._common import cast_for_autocast, check, check_float, check_same_device, dense, gpu_kernel_supports

OP = "ia3_linear"


def reference_forward(x, weight, bias, ia3_l, feedforward):
    l = ia3_l.reshape(-1)
    if feedforward:
        return F.linear((x.to(l.dtype) * l).to(x.dtype), weight, bias)
    z = F.linear(x, weight, bias)
    return (z * l).to(z.dtype)


def reference_backward(dy, x, y, weight, bias, ia3_l, feedforward):
    """(dx, dl) for a 2-D x; dl has ia3_l's shape.  `y` is the forward output (kernels may use it)."""
    l = ia3_l.reshape(-1)
    if feedforward:
        g = (dy @ weight).to(l.dtype)  # gradient w.r.t. the scaled input
        dx = (g * l).to(x.dtype)
        dl = (g * x.to(l.dtype)).sum(0)
    else:
        z = F.linear(x, weight, bias)
        dyl = dy.to(l.dtype)
        dl = (dyl * z.to(l.dtype)).sum(0)
        dx = ((dyl * l).to(dy.dtype) @ weight).to(x.dtype)
    return dx, dl.reshape(ia3_l.shape).to(ia3_l.dtype)


backend.register(OP, "torch", priority=0, forward=reference_forward, backward=reference_backward)


@torch.library.custom_op("fastpeft::ia3_linear_fwd", mutates_args=())
def _ia3_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ia3_l: torch.Tensor,
             feedforward: bool) -> torch.Tensor:
    impl = backend.select(OP, x, weight, bias, ia3_l, feedforward)
    return impl.fns["forward"](x, weight, bias, ia3_l, feedforward).contiguous()


@_ia3_fwd.register_fake
def _(x, weight, bias, ia3_l, feedforward):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("fastpeft::ia3_linear_bwd", mutates_args=())
def _ia3_bwd(dy: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             ia3_l: torch.Tensor, feedforward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    impl = backend.select(OP, x, weight, bias, ia3_l, feedforward)
    return dense(*impl.fns["backward"](dy, x, y, weight, bias, ia3_l, feedforward))


@_ia3_bwd.register_fake
def _(dy, x, y, weight, bias, ia3_l, feedforward):
    return x.new_empty(x.shape), ia3_l.new_empty(ia3_l.shape)


def _setup(ctx, inputs, output):
    x, weight, bias, ia3_l, feedforward = inputs
    ctx.save_for_backward(x, output, weight, bias, ia3_l)
    ctx.feedforward = feedforward


def _backward(ctx, dy):
    x, y, weight, bias, ia3_l = ctx.saved_tensors
    dx, dl = _ia3_bwd(dy.contiguous(), x, y, weight, bias, ia3_l, ctx.feedforward)
    d_w = d_b = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        l = ia3_l.reshape(-1)
        if ctx.feedforward:
            dz, xin = dy, (x.to(l.dtype) * l).to(x.dtype)
        else:
            dz, xin = (dy.to(l.dtype) * l).to(dy.dtype), x
        d_w = (dz.t() @ xin).to(weight.dtype) if ctx.needs_input_grad[1] else None
        d_b = dz.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
    return dx, d_w, d_b, dl, None


_ia3_fwd.register_autograd(_backward, setup_context=_setup)


def ia3_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ia3_l: torch.Tensor,
               feedforward: bool) -> torch.Tensor:
    """IA3-scaled projection; see the module docstring for the math.

    x: (..., K); weight: (N, K); bias: (N,) or None; ia3_l: N elements (output scaling) or
    K elements (feedforward input scaling)."""
    for name, t in (("x", x), ("weight", weight), ("ia3_l", ia3_l)):
        check_float(name, t)
    check_same_device(x=x, weight=weight, bias=bias, ia3_l=ia3_l)
    check(weight.dim() == 2, f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    check(x.shape[-1] == k, f"x has {x.shape[-1]} features but the layer's in_features is {k}")
    want = k if feedforward else n
    what = "in_features (feed-forward input scaling)" if feedforward else "out_features (output scaling)"
    check(ia3_l.numel() == want, f"ia3_l has {ia3_l.numel()} elements but the layer's {what} is {want}")
    check(bias is None or tuple(bias.shape) == (n,), f"bias must have shape ({n},)")
    x, weight, bias = cast_for_autocast(x.device.type, x, weight, bias)
    check(x.dtype == weight.dtype, f"x is {x.dtype} but the frozen weight is {weight.dtype}")
    lead = x.shape[:-1]
    return _ia3_fwd(x.reshape(-1, k), weight, bias, ia3_l, bool(feedforward)).reshape(*lead, n)


# ----------------------------------------------------------------------------- triton backend
def _triton_supports(x, weight, bias, ia3_l, feedforward, *, forced: bool) -> str | None:
    import importlib.util

    reason = gpu_kernel_supports(x, weight, bias, ia3_l, forced=forced)
    if reason:
        return reason
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {x.dtype} not supported by the kernel"
    if ia3_l.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"ia3_l dtype {ia3_l.dtype} not supported by the kernel"
    return None


def _triton_forward(x, weight, bias, ia3_l, feedforward):
    from ..kernels.ia3 import ia3_forward

    return ia3_forward(x, weight, bias, ia3_l, feedforward)


def _triton_backward(dy, x, y, weight, bias, ia3_l, feedforward):
    from ..kernels.ia3 import ia3_backward

    return ia3_backward(dy, x, y, weight, bias, ia3_l, feedforward)


backend.register(OP, "triton", priority=10, supports=_triton_supports, forward=_triton_forward,
                 backward=_triton_backward)
