"""ia3_linear: IA3's learned scaling inside a projection.

Output scaling (feedforward=False): y = (x·Wᵀ + b) ∘ l, computed in l's dtype and cast back to
the base output dtype, as HF PEFT's `ia3.Linear` does.
Input scaling (feedforward=True):   y = ((x ∘ l) cast to x.dtype)·Wᵀ + b.
l has PEFT's shape: (out_features, 1) for output scaling, (1, in_features) for input scaling;
any shape with that many elements is accepted.

Saved for the backward, decided from `ctx.needs_input_grad` (a frozen W never saves its input):
output scaling keeps the pre-scale output Z = x·Wᵀ + b (M×N, what PEFT keeps) when l is trained,
and no second GEMM runs in the backward; input scaling keeps x when l is trained; x is kept for
either mode only when W itself is trained.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import backend
from ._common import (FAST_DTYPES, cast_for_autocast, check_projection, functorch_active, gpu_kernel_supports,
                      raw_apply, remember_checked, traced_as_aten)

OP = "ia3_linear"


# ----------------------------------------------------------------------------- reference (spec)
def reference_forward(x, weight, bias, ia3_l, feedforward):
    l = ia3_l.reshape(-1)
    if feedforward:
        return F.linear((x.to(l.dtype) * l).to(x.dtype), weight, bias)
    z = F.linear(x, weight, bias)
    return (z * l).to(z.dtype)


def reference_backward(dy, x, y, weight, bias, ia3_l, feedforward):
    """(dx, dl) for a 2-D x; dl has ia3_l's shape.  `y` is the forward output (unused here)."""
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


# ----------------------------------------------------------------------------- production torch path
def torch_forward(x, weight, bias, ia3_l, feedforward, keep_z):
    """(y, z) for a 2-D x: z the pre-scale output (output scaling, when `keep_z`) else None."""
    l = ia3_l.reshape(-1)
    if feedforward:
        xs = x * l if x.dtype == l.dtype else (x.to(l.dtype) * l).to(x.dtype)
        return F.linear(xs, weight, bias), None
    z = F.linear(x, weight, bias)
    y = z * l if z.dtype == l.dtype else (z * l).to(z.dtype)
    return y, (z if keep_z else None)


def torch_backward(dy, x, z, weight, bias, ia3_l, feedforward, needs):
    """(dx, dl) for a 2-D dy, each None unless `needs` = (need_x, need_l) asks for it.
    Output scaling reads z (the saved pre-scale output), input scaling reads x."""
    need_x, need_l = needs
    l = ia3_l.reshape(-1)
    dx = dl = None
    if feedforward:
        g = torch.mm(dy, weight)  # gradient w.r.t. the scaled input
        if g.dtype != l.dtype:
            g = g.to(l.dtype)
        if need_x:
            dx = g * l
        if need_l:
            dl = (g * (x if x.dtype == l.dtype else x.to(l.dtype))).sum(0)
    else:
        dyl = dy if dy.dtype == l.dtype else dy.to(l.dtype)
        if need_l:
            dl = (dyl * (z if z.dtype == l.dtype else z.to(l.dtype))).sum(0)
        if need_x:
            g = dyl * l
            dx = torch.mm(g if g.dtype == dy.dtype else g.to(dy.dtype), weight)
    if dl is not None:
        dl = dl.view(ia3_l.shape).to(ia3_l.dtype)
    return dx, dl


backend.register(OP, "torch", priority=0, forward=torch_forward, backward=torch_backward)
# IA3 draws no random numbers: the reference backend is the production one
backend.register(OP, "torch_philox", priority=-1, forward=torch_forward, backward=torch_backward)


# ----------------------------------------------------------------------------- eager autograd
class IA3LinearFn(torch.autograd.Function):
    """The eager path: x (..., K) -> y (..., N) in one node; cfg = (feedforward, impl)."""

    @staticmethod
    def forward(ctx, x, weight, bias, ia3_l, cfg):
        feedforward, impl = cfg
        shape = x.shape
        x2 = x if len(shape) == 2 else x.reshape(-1, shape[-1])
        needs = ctx.needs_input_grad
        y, z = impl.fns["forward"](x2, weight, bias, ia3_l, feedforward, needs[3])
        # input scaling: x for dl (or a trained W); output scaling: z for dl, x only for a trained W
        keep_x = needs[1] or (feedforward and needs[3])
        ctx.save_for_backward(x2 if keep_x else None, z, weight, ia3_l)
        ctx.cfg = (feedforward, impl, shape, x.dtype, bias is not None)
        return y if len(shape) == 2 else y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, z, weight, ia3_l = ctx.saved_tensors
        feedforward, impl, shape, x_dtype, has_bias = ctx.cfg
        needs = ctx.needs_input_grad
        dy2 = dy if dy.dim() == 2 else dy.reshape(-1, dy.shape[-1])
        dx, dl = impl.fns["backward"](dy2, x, z, weight, None, ia3_l, feedforward, (needs[0], needs[3]))
        if dx is not None:
            dx = dx.to(x_dtype)
            if len(shape) != 2:
                dx = dx.view(shape)
        d_w = d_b = None
        if needs[1] or needs[2]:
            l = ia3_l.reshape(-1)
            if feedforward:
                dz, xin = dy2, (x.to(l.dtype) * l).to(x.dtype)
            else:
                dz = (dy2.to(l.dtype) * l).to(dy2.dtype)
                xin = x
            d_w = (dz.t() @ xin).to(weight.dtype) if needs[1] else None
            d_b = dz.sum(0) if has_bias and needs[2] else None
        return dx, d_w, d_b, dl, None


_ia3_apply = raw_apply(IA3LinearFn)


# ----------------------------------------------------------------------------- custom ops (torch.compile)
@torch.library.custom_op("fastpeft::ia3_linear_fwd", mutates_args=())
def _ia3_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ia3_l: torch.Tensor,
             feedforward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    impl = backend.select(OP, x, weight, bias, ia3_l, feedforward)
    y, z = impl.fns["forward"](x, weight, bias, ia3_l, feedforward, True)
    return y.contiguous(), (x.new_empty(0) if z is None else z.contiguous())


@_ia3_fwd.register_fake
def _(x, weight, bias, ia3_l, feedforward):
    z = x.new_empty(0) if feedforward else x.new_empty((x.shape[0], weight.shape[0]))
    return x.new_empty((x.shape[0], weight.shape[0])), z


@torch.library.custom_op("fastpeft::ia3_linear_bwd", mutates_args=())
def _ia3_bwd(dy: torch.Tensor, x: torch.Tensor | None, z: torch.Tensor, weight: torch.Tensor,
             ia3_l: torch.Tensor, feedforward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    impl = backend.select(OP, dy, weight, None, ia3_l, feedforward)
    dx, dl = impl.fns["backward"](dy, x, z, weight, None, ia3_l, feedforward, (True, True))
    return dx.to(dy.dtype).contiguous(), dl.contiguous()


@_ia3_bwd.register_fake
def _(dy, x, z, weight, ia3_l, feedforward):
    return dy.new_empty((dy.shape[0], weight.shape[1])), ia3_l.new_empty(ia3_l.shape)


def _setup(ctx, inputs, output):
    x, weight, bias, ia3_l, feedforward = inputs
    # as the eager path: input scaling keeps x (for dl), output scaling keeps z only (one M×N
    # tensor, no second GEMM in the backward); x also, and only, for a trained W
    needs = ctx.needs_input_grad
    keep_x = needs[1] or (feedforward and needs[3])
    ctx.save_for_backward(x if keep_x else None, output[1], weight, bias, ia3_l)
    ctx.feedforward = feedforward


def _backward(ctx, dy, _dz):
    x, z, weight, bias, ia3_l = ctx.saved_tensors
    dx, dl = _ia3_bwd(dy.contiguous(), x, z, weight, ia3_l, ctx.feedforward)
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


# ----------------------------------------------------------------------------- public API
def _validate(x, weight, bias, ia3_l, feedforward) -> None:
    n, k = check_projection(x, weight, bias, ia3_l=ia3_l)
    want = k if feedforward else n
    if ia3_l.numel() != want:
        what = "in_features (feed-forward input scaling)" if feedforward else "out_features (output scaling)"
        raise ValueError(f"ia3_l has {ia3_l.numel()} elements but the layer's {what} is {want}")


_PLANS: dict[tuple, backend.Impl] = {}
_CHECKED: set[tuple] = set()  # argument shapes the fast path has validated


def ia3_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ia3_l: torch.Tensor,
               feedforward: bool) -> torch.Tensor:
    """IA3-scaled projection; see the module docstring for the math.

    x: (..., K); weight: (N, K); bias: (N,) or None; ia3_l: N elements (output scaling) or
    K elements (feedforward input scaling)."""
    feedforward = bool(feedforward)
    # the CPU fast path: the torch backend (automatic or forced), one floating dtype: two aten ops that
    # autograd differentiates in C++ (no Python backward).  It keeps what IA3LinearFn keeps: z = x·Wᵀ + b
    # for output scaling, x for input scaling (each only when l is trained), x for the frozen W never.
    # The named checks run once per distinct set of shapes.
    dt = x.dtype
    if x.is_cpu and dt is weight.dtype and dt is ia3_l.dtype and dt in FAST_DTYPES and weight.is_cpu \
            and ia3_l.is_cpu and (bias is None or bias.is_cpu) and backend.torch_or_auto() \
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu"):
        shapes = (x.shape[-1:], weight.shape, ia3_l.shape, None if bias is None else bias.shape, feedforward)
        if shapes not in _CHECKED:
            remember_checked(_CHECKED, shapes, lambda: _validate(x, weight, bias, ia3_l, feedforward))
        backend._LAST[OP] = "torch"
        l = ia3_l.view(-1)
        return F.linear(x * l, weight, bias) if feedforward else F.linear(x, weight, bias) * l
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
        return _ia3_linear_slow(x, weight, bias, ia3_l, feedforward)
    forced = backend.get_backend()
    key = (forced, x.shape[-1:], x.dtype, x.device, weight.shape, weight.dtype, weight.device, ia3_l.shape,
           ia3_l.dtype, ia3_l.device, None if bias is None else (bias.shape, bias.dtype, bias.device), feedforward,
           None if forced is None else os.environ.get("TRITON_INTERPRET"))
    plan = _PLANS.get(key)
    if plan is None:
        _validate(x, weight, bias, ia3_l, feedforward)
        if x.dtype != weight.dtype:
            raise ValueError(f"x is {x.dtype} but the frozen weight is {weight.dtype}")
        impl = backend.select(OP, x, weight, bias, ia3_l, feedforward)
        plan = _PLANS[key] = (impl, impl.backend in ("torch", "torch_philox") and x.dtype == ia3_l.dtype)
    else:
        backend._LAST[OP] = plan[0].backend
    impl, native = plan
    if native:
        # one dtype on the torch path: two aten ops autograd differentiates in C++ (no Python backward).
        # It keeps what IA3LinearFn keeps: z = x·Wᵀ + b for output scaling, x for input scaling (each only
        # when l is trained), x for the frozen W never.
        l = ia3_l.view(-1)
        return F.linear(x * l, weight, bias) if feedforward else F.linear(x, weight, bias) * l
    if functorch_active():
        return IA3LinearFn.apply(x, weight, bias, ia3_l, (feedforward, impl))
    return _ia3_apply(x, weight, bias, ia3_l, (feedforward, impl))


def _ia3_linear_slow(x, weight, bias, ia3_l, feedforward):
    """Under torch.compile (the custom ops) or autocast (inputs cast as nn.Linear casts them)."""
    _validate(x, weight, bias, ia3_l, feedforward)
    x, weight, bias = cast_for_autocast(x.device.type, x, weight, bias)
    if x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but the frozen weight is {weight.dtype}")
    if not torch.compiler.is_compiling():
        impl = backend.select(OP, x, weight, bias, ia3_l, feedforward)
        return IA3LinearFn.apply(x, weight, bias, ia3_l, (feedforward, impl))
    if traced_as_aten(x):  # the CPU path: aten ops inductor fuses, and the partitioner saves what PEFT's graph saves
        return reference_forward(x, weight, bias, ia3_l, feedforward)
    n, k = weight.shape
    lead = x.shape[:-1]
    y, _ = _ia3_fwd(x.reshape(-1, k), weight, bias, ia3_l, feedforward)
    return y.reshape(*lead, n)


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


def _triton_forward(x, weight, bias, ia3_l, feedforward, keep_z):
    from ..kernels.ia3 import ia3_forward

    return ia3_forward(x, weight, bias, ia3_l, feedforward, keep_z)


def _triton_backward(dy, x, z, weight, bias, ia3_l, feedforward, needs):
    from ..kernels.ia3 import ia3_backward

    return ia3_backward(dy.contiguous(), x, z, weight, ia3_l, feedforward, needs)


backend.register(OP, "triton", priority=10, supports=_triton_supports, forward=_triton_forward,
                 backward=_triton_backward)
