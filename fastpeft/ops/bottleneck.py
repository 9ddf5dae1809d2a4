"""bottleneck_adapter: the Houlsby/Pfeiffer adapter block  y = h + act(h·W_dᵀ + b_d)·W_uᵀ + b_u.

h: (..., H); W_d: (R, H), b_d: (R,) (the down projection, nn.Linear(H, R)); W_u: (H, R), b_u: (H,).
Saved for the backward: h only (one M×H tensor).  The M×R intermediate z = h·W_dᵀ + b_d is recomputed
in the backward (an M·H·R GEMM, ~R/H of a projection's cost), never stored: with autograd's
`nn.Sequential(Linear, act, Linear)` + residual, z, act(z) and often a second M×H tensor stay alive.
Backends: "torch" (the production path on any device) and "triton" (one fused kernel each way, the
intermediate in registers; CUDA, or the interpreter when forced with TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backend
from ._common import check_same_device, functorch_active, gpu_kernel_supports, raw_apply

OP = "bottleneck_adapter"
ACTIVATIONS = ("relu", "silu", "gelu", "gelu_tanh")
_ALIASES = {"swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def canonical_activation(name: str) -> str:
    """The op's name for an activation ('swish' -> 'silu', 'gelu_new' -> 'gelu_tanh'); errors name the
    accepted ones."""
    act = _ALIASES.get(str(name).lower(), str(name).lower())
    if act not in ACTIVATIONS:
        raise ValueError(f"bottleneck adapter non-linearity {name!r} is not supported; use one of "
                         f"{sorted(ACTIVATIONS + tuple(_ALIASES))}")
    return act


def _act(z: torch.Tensor, act: str) -> torch.Tensor:
    if act == "relu":
        return F.relu(z)
    if act == "silu":
        return F.silu(z)
    if act == "gelu":
        return F.gelu(z)
    return F.gelu(z, approximate="tanh")


# ----------------------------------------------------------------------------- reference (spec)
def reference_forward(h, w_down, b_down, w_up, b_up, act):
    return h + F.linear(_act(F.linear(h, w_down, b_down), act), w_up, b_up)


# ----------------------------------------------------------------------------- production torch path
def torch_forward(h, w_down, b_down, w_up, b_up, act):
    """y for a 2-D h; the intermediate is freed on return (nothing here is saved)."""
    a = _act(torch.addmm(b_down, h, w_down.t()), act)
    return torch.addmm(b_up, a, w_up.t()).add_(h)


def _act_backward(da: torch.Tensor, z: torch.Tensor, a: torch.Tensor, act: str) -> torch.Tensor:
    """dz = da ∘ act'(z) with aten's fused activation backwards (no autograd inside the op)."""
    if act == "relu":
        return torch.ops.aten.threshold_backward(da, a, 0)
    if act == "silu":
        return torch.ops.aten.silu_backward(da, z)
    return torch.ops.aten.gelu_backward(da, z, approximate="none" if act == "gelu" else "tanh")


def torch_backward(dy, h, w_down, b_down, w_up, act):
    """(dh, a, dz) for 2-D dy, recomputing z = h·W_dᵀ + b_d: dz = (dy·W_u) ∘ act'(z), dh = dy + dz·W_d."""
    z = torch.addmm(b_down, h, w_down.t())
    a = _act(z, act)
    dz = _act_backward(torch.mm(dy, w_up), z, a, act)
    dh = torch.addmm(dy, dz, w_down)
    return dh, a, dz


backend.register(OP, "torch", priority=0, forward=torch_forward, backward=torch_backward)
backend.register(OP, "torch_philox", priority=-1, forward=torch_forward, backward=torch_backward)


def _triton_supports(h, w_down, b_down, w_up, b_up, act, *, forced: bool) -> str | None:
    import importlib.util

    reason = gpu_kernel_supports(h, w_down, b_down, w_up, b_up, forced=forced)
    if reason:
        return reason
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if h.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {h.dtype} not supported by the kernel"
    if w_down.shape[0] > 256:
        return f"bottleneck {w_down.shape[0]} > 256 does not fit on chip"
    return None


def _triton_forward(h, w_down, b_down, w_up, b_up, act):
    from ..kernels.bottleneck import bottleneck_forward

    return bottleneck_forward(h, w_down, b_down, w_up, b_up, act)


def _triton_backward(dy, h, w_down, b_down, w_up, act):
    from ..kernels.bottleneck import bottleneck_backward

    return bottleneck_backward(dy, h, w_down, b_down, w_up, act)


backend.register(OP, "triton", priority=10, supports=_triton_supports, forward=_triton_forward,
                 backward=_triton_backward)


def _weight_grads(dy, h, a, dz, needs):
    """(dW_d, db_d, dW_u, db_u) from the recomputed a and dz, each None unless `needs` asks."""
    dwd = torch.mm(dz.t(), h) if needs[0] else None
    dbd = dz.sum(0) if needs[1] else None
    dwu = torch.mm(dy.t(), a) if needs[2] else None
    dbu = dy.sum(0) if needs[3] else None
    return dwd, dbd, dwu, dbu


# ----------------------------------------------------------------------------- eager autograd
class BottleneckAdapterFn(torch.autograd.Function):
    """h (..., H) -> y (..., H) in one node; cfg = (act, impl).  Saves h (and the weights) only."""

    @staticmethod
    def forward(ctx, h, w_down, b_down, w_up, b_up, cfg):
        act, impl = cfg
        shape = h.shape
        h2 = h if h.dim() == 2 else h.reshape(-1, shape[-1])
        y = impl.fns["forward"](h2, w_down, b_down, w_up, b_up, act)
        ctx.save_for_backward(h2, w_down, b_down, w_up)
        ctx.cfg = (act, impl, shape)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        h, w_down, b_down, w_up = ctx.saved_tensors
        act, impl, shape = ctx.cfg
        dy2 = dy.reshape(-1, dy.shape[-1])
        dh, a, dz = impl.fns["backward"](dy2, h, w_down, b_down, w_up, act)
        dwd, dbd, dwu, dbu = _weight_grads(dy2, h, a, dz, ctx.needs_input_grad[1:5])
        return (dh.view(shape) if ctx.needs_input_grad[0] else None), dwd, dbd, dwu, dbu, None


_apply = raw_apply(BottleneckAdapterFn)


# ----------------------------------------------------------------------------- custom ops (torch.compile)
@torch.library.custom_op("fastpeft::bottleneck_adapter_fwd", mutates_args=())
def _bn_fwd(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor,
            b_up: torch.Tensor, act: str) -> torch.Tensor:
    impl = backend.select(OP, h, w_down, b_down, w_up, b_up, act)
    return impl.fns["forward"](h, w_down, b_down, w_up, b_up, act).contiguous()


@_bn_fwd.register_fake
def _(h, w_down, b_down, w_up, b_up, act):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastpeft::bottleneck_adapter_bwd", mutates_args=())
def _bn_bwd(dy: torch.Tensor, h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor,
            act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = backend.select(OP, h, w_down, b_down, w_up, _no_bias(w_up), act)
    dh, a, dz = impl.fns["backward"](dy, h, w_down, b_down, w_up, act)
    dwd, dbd, dwu, dbu = _weight_grads(dy, h, a, dz, (True, True, True, True))
    return dh.contiguous(), dwd.contiguous(), dbd.contiguous(), dwu.contiguous(), dbu.contiguous()


def _no_bias(w_up: torch.Tensor) -> torch.Tensor:
    return w_up.new_empty(0)  # backend predicates only read the bias' device


@_bn_bwd.register_fake
def _(dy, h, w_down, b_down, w_up, act):
    return (torch.empty_like(h, memory_format=torch.contiguous_format), w_down.new_empty(w_down.shape),
            b_down.new_empty(b_down.shape), w_up.new_empty(w_up.shape), w_up.new_empty((w_up.shape[0],)))


def _setup(ctx, inputs, output):
    h, w_down, b_down, w_up, _b_up, act = inputs
    ctx.save_for_backward(h, w_down, b_down, w_up)
    ctx.act = act


def _backward(ctx, dy):
    h, w_down, b_down, w_up = ctx.saved_tensors
    return (*_bn_bwd(dy.contiguous(), h, w_down, b_down, w_up, ctx.act), None)


_bn_fwd.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------- public API
def _validate(h, w_down, b_down, w_up, b_up) -> None:
    for name, t in (("h", h), ("w_down", w_down), ("b_down", b_down), ("w_up", w_up), ("b_up", b_up)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    check_same_device(h=h, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up)
    H = h.shape[-1]
    if w_down.dim() != 2 or w_down.shape[1] != H:
        raise ValueError(f"w_down must be (bottleneck, hidden={H}), got {tuple(w_down.shape)}")
    R = w_down.shape[0]
    if tuple(w_up.shape) != (H, R):
        raise ValueError(f"w_up must be (hidden={H}, bottleneck={R}), got {tuple(w_up.shape)}")
    if tuple(b_down.shape) != (R,):
        raise ValueError(f"b_down must be ({R},), got {tuple(b_down.shape)}")
    if tuple(b_up.shape) != (H,):
        raise ValueError(f"b_up must be ({H},), got {tuple(b_up.shape)}")
    dtypes = {t.dtype for t in (h, w_down, b_down, w_up, b_up)}
    if len(dtypes) != 1:
        raise ValueError(f"h and the adapter weights must share one dtype, got h {h.dtype}, w_down "
                         f"{w_down.dtype}, b_down {b_down.dtype}, w_up {w_up.dtype}, b_up {b_up.dtype}")


_PLANS: dict[tuple, backend.Impl] = {}


def bottleneck_adapter(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor,
                       b_up: torch.Tensor, act: str = "relu") -> torch.Tensor:
    """y = h + act(h·W_dᵀ + b_d)·W_uᵀ + b_u, saving only h for the backward (see the module docstring)."""
    act = canonical_activation(act)
    if torch.compiler.is_compiling():
        _validate(h, w_down, b_down, w_up, b_up)
        H = h.shape[-1]
        return _bn_fwd(h.reshape(-1, H), w_down, b_down, w_up, b_up, act).view(h.shape)
    forced = backend.get_backend()
    key = (forced, h.shape[-1], h.dtype, h.device, w_down.shape, w_down.dtype, w_down.device, w_up.shape,
           w_up.dtype, b_down.shape, b_up.shape, b_down.dtype, b_up.dtype, act,
           None if forced is None else __import__("os").environ.get("TRITON_INTERPRET"))
    impl = _PLANS.get(key)
    if impl is None:
        _validate(h, w_down, b_down, w_up, b_up)
        impl = _PLANS[key] = backend.select(OP, h, w_down, b_down, w_up, b_up, act)
    else:
        backend._LAST[OP] = impl.backend
    if h.numel() == 0:
        return h.clone()
    if functorch_active():
        return BottleneckAdapterFn.apply(h, w_down, b_down, w_up, b_up, (act, impl))
    return _apply(h, w_down, b_down, w_up, b_up, (act, impl))


__all__ = ["bottleneck_adapter", "reference_forward", "canonical_activation", "ACTIVATIONS"]
