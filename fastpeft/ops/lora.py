"""lora_linear: y = x·Wᵀ + b + scaling · (dropout(x)·Aᵀ)·Bᵀ, the LoRA-adapted projection.

Semantics follow HF PEFT's `lora.Linear`: the low-rank path runs in the adapter's dtype
(`x` cast to `lora_A.dtype`), is added to the base output and the sum is cast back to the base
output dtype.  Forward keeps S = dropout(x)·Aᵀ (M×r) for the backward; nothing M×N, no mask:
the backward re-draws the mask.  Two ways of drawing it:

* the kernels and the "torch_philox" reference (the kernels' specification): a counter-based
  Philox stream from an integer seed (`fastpeft.ops._random`), identical bit for bit;
* the production "torch" path: a counter-based hash of (seed, element index) (`dropout_keep_mask`:
  `fastpeft.ops._random`'s 32-bit mix, Bernoulli(1-p) with p on a 2⁻³² grid), computed by the C++
  loop of fastpeft._C on a CPU (aten ops where _C is not built) and by aten ops a compiled graph
  fuses; the backward computes it again from the seed.
The seed is the call's `seed`, or one drawn from torch's default generator: torch.manual_seed
governs it, gradient checkpointing (which restores the RNG state) re-draws the same mask, and a
compiled graph draws the same seed as a tensor (no `.item()`): eager and compiled runs agree bit for
bit (the mask is a function of the seed, so even without inductor's `fallback_random`).

Eager calls run one plain `torch.autograd.Function` that calls the chosen backend directly;
the `torch.library` custom ops are what `torch.compile` traces.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import _cext, backend
from ._common import (FAST_DTYPES, cast_for_autocast, check_projection, dense, functorch_active, gpu_kernel_supports,
                      raw_apply, remember_checked, traced_as_aten)
from ._random import MAX_HASH_ELEMENTS, dropout_keep, hash_keep_reference, keep_threshold, new_seed

OP = "lora_linear"


# ----------------------------------------------------------------------------- reference (spec)
def _dropped(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """dropout(x) for a 2-D x, the mask drawn from `seed` at row-major offsets."""
    if p <= 0.0:
        return x
    keep = dropout_keep(seed, tuple(x.shape), p, x.device)
    return x * keep.to(x.dtype) / (1.0 - p)


def reference_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """(y, s) for a 2-D x: the plain-PyTorch definition of the op (Philox dropout)."""
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


backend.register(OP, "torch_philox", priority=-1, forward=reference_forward, backward=reference_backward)


# ----------------------------------------------------------------------------- production torch path
_ZEROS: dict[tuple, torch.Tensor] = {}


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A 0-d zero to stand as addmm's ignored input (beta=0): `mm` with an alpha, one op."""
    key = (like.device, like.dtype)
    z = _ZEROS.get(key)
    if z is None:
        z = _ZEROS[key] = torch.zeros((), device=like.device, dtype=like.dtype)
    return z


_THRESHOLDS: dict[tuple, torch.Tensor] = {}
_SMALL_MASK = 2048  # elements: below this `bernoulli_` (exact p) is cheaper than the 16-bit draw


def keep_mask(m: int, k: int, p: float, gen: torch.Generator | None, device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
    """The mixed-adapter torch path's (m, k) 0/1 dropout keep-mask in `dtype` (fastpeft.ops.grouped_lora):
    16 random bits per element (row-major) from torch's generator `gen` (None: the default one), kept when
    below (1-p)·2¹⁶, i.e. Bernoulli(1-p) with p rounded to a multiple of 2⁻¹⁶.  Four elements per 64-bit
    draw: several times cheaper on a CPU than `bernoulli_`, which matters because the backward draws the
    mask a second time instead of keeping it.  Masks of at most `_SMALL_MASK` elements are one
    `bernoulli_(1-p)` draw instead (exact p), where a single op costs less than five.  (The single-adapter
    path's mask is `dropout_keep_mask`, a hash of the seed.)"""
    n = m * k
    if n <= _SMALL_MASK:  # a small mask: one op beats five (per-op cost dominates at this size)
        return torch.empty((m, k), dtype=dtype, device=device).bernoulli_(1.0 - p, generator=gen)
    key = (device, p)
    thresh = _THRESHOLDS.get(key)
    if thresh is None:  # a 0-d int16 tensor: comparing with a Python int takes a slow path
        level = min(32767, round((1.0 - p) * 65536) - 32768)
        thresh = _THRESHOLDS[key] = torch.tensor(level, dtype=torch.int16, device=device)
    bits = torch.empty(((n + 3) // 4,), dtype=torch.int64, device=device).random_(-2**63, None, generator=gen)
    r = bits.view(torch.int16)
    if r.shape[0] != n:
        r = r[:n]
    return torch.lt(r.view(m, k), thresh).to(dtype)


def dropout_keep_mask(seed: int | torch.Tensor, m: int, k: int, p: float, device: torch.device,
                      dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """The torch path's (m, k) keep-mask of `seed` (1 kept, 0 dropped) in `dtype`: fastpeft._C's C++ loop
    for an int seed on the CPU, else the same bits in aten ops (any device; a tensor seed stays there)."""
    if m * k >= MAX_HASH_ELEMENTS:
        raise ValueError(f"a dropout mask of {m} x {k} elements needs indices past 31 bits; split the batch")
    if device.type == "cpu" and not isinstance(seed, torch.Tensor) and not torch.compiler.is_compiling():
        out = _cext.dropout_keep(int(seed), m, k, keep_threshold(p), dtype)
        if out is not None:
            return out
    keep = hash_keep_reference(seed, m, k, p, device)
    return keep if dtype == torch.uint8 else keep.to(dtype)


def torch_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """(y, s) for a 2-D x with torch's fused primitives; dropout's mask from `seed` (`dropout_keep_mask`)."""
    xa = x if x.dtype == lora_A.dtype else x.to(lora_A.dtype)
    if dropout_p > 0.0:
        xd = dropout_keep_mask(seed, xa.shape[0], xa.shape[1], dropout_p, xa.device, xa.dtype).mul_(xa)
        s = torch.addmm(_zero(xd), xd, lora_A.t(), beta=0, alpha=1.0 / (1.0 - dropout_p))
    else:
        s = torch.mm(xa, lora_A.t())
    y = F.linear(x, weight, bias)
    if y.dtype == lora_B.dtype:
        y.addmm_(s, lora_B.t(), alpha=scaling)
    else:
        y = (y + (s @ lora_B.t()) * scaling).to(y.dtype)
    return y, s


def torch_backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, needs=(True, True, True)):
    """(dx, dA, dB) for a 2-D x given dy and s; `seed` re-draws the forward's mask; `needs` says
    which of the three are wanted (the others come back None and cost nothing)."""
    need_x, need_a, need_b = needs
    dya = dy if dy.dtype == lora_B.dtype else dy.to(lora_B.dtype)
    zero = _zero(dya)
    ds = torch.addmm(zero, dya, lora_B, beta=0, alpha=scaling)  # scaling·dy·B (M, r)
    d_b = d_a = dx = None
    if need_b:
        d_b = torch.addmm(zero, dya.t(), s if s.dtype == dya.dtype else s.to(dya.dtype), beta=0, alpha=scaling)
    if dropout_p > 0.0:
        inv_q = 1.0 / (1.0 - dropout_p)
        keep = dropout_keep_mask(seed, dy.shape[0], lora_A.shape[1], dropout_p, dy.device, lora_A.dtype)
        if need_x:  # dx = dy·W + (ds·A ∘ keep) / (1-p)
            dx = torch.mm(dy, weight)
            dxd = torch.mm(ds, lora_A)
            if dx.dtype == dxd.dtype:
                dx.addcmul_(dxd, keep, value=inv_q)
            else:
                dx = dx.add_((dxd * keep * inv_q).to(dx.dtype))
        if need_a:  # dA = dsᵀ·(x ∘ keep) / (1-p)
            xd = (x if x.dtype == lora_A.dtype else x.to(lora_A.dtype)) * keep
            d_a = torch.addmm(_zero(ds), ds.t(), xd, beta=0, alpha=inv_q)
        return dx, d_a, d_b
    if need_a:
        d_a = torch.mm(ds.t(), x if x.dtype == lora_A.dtype else x.to(lora_A.dtype))
    if need_x:
        if x.dtype == lora_A.dtype == dy.dtype:
            dx = torch.mm(dy, weight).addmm_(ds, lora_A)
        else:
            dx = torch.mm(dy, weight).to(x.dtype).add_(torch.mm(ds, lora_A).to(x.dtype))
    return dx, d_a, d_b


backend.register(OP, "torch", priority=0, forward=torch_forward, backward=torch_backward)


# ----------------------------------------------------------------------------- dropout RNG
def rng_token(impl: backend.Impl, p: float, seed: int | None, device: torch.device):
    """(seed, None): what the backward needs to re-draw the forward's dropout mask.  Always a seed
    (given, or drawn from torch's default generator, so torch.manual_seed governs it and gradient
    checkpointing, which restores that generator, re-draws it); the kernels take a CUDA tensor one
    (drawn on the device: no host sync, replayable in a CUDA graph).  The compiled path draws the
    same seed inside the graph (`compiled_seed`), so eager and compiled runs draw the same masks."""
    if p <= 0.0:
        return 0, None
    if seed is not None:
        return int(seed), None
    if impl.backend != "torch" and device.type == "cuda":
        return compiled_seed(device), None
    return new_seed(), None


def kernel_supports(x, weight, bias, lora_A, lora_B, *rest, forced: bool) -> str | None:
    """Common applicability test for the GPU kernels of this op."""
    reason = gpu_kernel_supports(x, weight, bias, lora_A, lora_B, forced=forced)
    if reason:
        return reason
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {x.dtype} not supported by the kernel"
    return None


# ----------------------------------------------------------------------------- eager autograd
class LoraLinearFn(torch.autograd.Function):
    """The eager path: x (..., K) -> y (..., N) in one node.  cfg = (scaling, p, seed, impl).
    Saves what the backward needs (torch path: x only for dA or a trained W, S only for dB) and the
    mask's seed or generator state, never the mask."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, cfg):
        scaling, p, seed, impl = cfg
        shape = x.shape
        x2 = x if len(shape) == 2 else x.reshape(-1, shape[-1])
        token = rng_token(impl, p, seed, x.device)[0] if p > 0.0 else 0
        torch_path = impl.backend == "torch"
        y, s = impl.fns["forward"](x2, weight, bias, lora_A, lora_B, scaling, p, token)
        if torch_path:
            needs = ctx.needs_input_grad
            ctx.save_for_backward(x2 if (needs[3] or needs[1]) else None, weight, lora_A, lora_B,
                                  s if needs[4] else None)
        else:  # the fused kernels produce dx, dA and dB together from all of them
            ctx.save_for_backward(x2, weight, lora_A, lora_B, s)
        ctx.cfg = (impl, token, scaling, p, shape, bias is not None, torch_path)
        return y if len(shape) == 2 else y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, s = ctx.saved_tensors
        impl, token, scaling, p, shape, has_bias, torch_path = ctx.cfg
        needs = ctx.needs_input_grad
        dy2 = dy if dy.dim() == 2 else dy.reshape(-1, dy.shape[-1])
        rng = token
        if torch_path:
            dx, d_a, d_b = impl.fns["backward"](dy2, x, weight, lora_A, lora_B, s, scaling, p, rng,
                                                (needs[0], needs[3], needs[4]))
        else:
            dx, d_a, d_b = impl.fns["backward"](dy2.contiguous(), x, weight, lora_A, lora_B, s, scaling, p, rng)
        d_w = (dy2.t() @ x).to(weight.dtype) if needs[1] else None
        d_bias = dy2.sum(0) if has_bias and needs[2] else None
        if dx is not None and len(shape) != 2:
            dx = dx.view(shape)
        return dx, d_w, d_bias, d_a, d_b, None


_lora_apply = raw_apply(LoraLinearFn)  # Function.apply minus its per-call functorch bookkeeping


# ----------------------------------------------------------------------------- custom ops (torch.compile)
# Under torch.compile the dropout seed is a tensor drawn by `torch.randint` inside the traced graph
# (so no `.item()`, no graph break, no host synchronisation, and a fresh seed on every run of the
# graph), and the ops are pure functions of their inputs: the compiler may recompute, reorder or
# deduplicate them (activation checkpointing) and always gets the same mask for the same seed.
def compiled_seed(device: torch.device) -> torch.Tensor:
    """A dropout seed for a traced graph: an int64 (1,) tensor from torch's generator for `device`
    (the CPU's default generator for CPU inputs, the same draw eager makes: identical masks for
    the Philox backends when inductor's `fallback_random` is set; on CUDA the device generator,
    which a CUDA graph replays with a fresh value each step)."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)


def _seed_value(seed: torch.Tensor | None):
    """The seed a backend takes from the ops' tensor: a Python int from a CPU tensor (no device
    synchronisation), the device tensor itself for the kernels (they load it)."""
    if seed is None:
        return 0
    return seed if seed.is_cuda else int(seed[0])


def _compiled_rng(impl, p, seed, device):
    if p <= 0.0:
        return 0
    value = _seed_value(seed)
    if impl.backend == "torch_philox" and isinstance(value, torch.Tensor):  # the reference takes an int
        return int(value.reshape(-1)[0])
    return value


# Defined with torch.library's low-level API rather than `torch.library.custom_op`: a compiled graph calls
# them once per layer and step, and custom_op's Python wrapper costs 15-30 µs more per call on a CPU
# (a tenth of a compiled LoRA-with-dropout step of a small model).
_LIB = torch.library.Library("fastpeft", "FRAGMENT")
_LIB.define("lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
            "float dropout_p, Tensor? seed) -> (Tensor, Tensor)")
_LIB.define("lora_linear_bwd(Tensor dy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor s, "
            "float scaling, float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor)")


def _lora_fwd_impl(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    impl = _plan(x, weight, bias, lora_A, lora_B, dropout_p, dropout_p)
    rng = _compiled_rng(impl, dropout_p, seed, x.device)
    return dense(*impl.fns["forward"](x, weight, bias, lora_A, lora_B, scaling, dropout_p, rng))


def _lora_bwd_impl(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed):
    impl = _plan(x, weight, None, lora_A, lora_B, dropout_p, dropout_p)
    rng = _compiled_rng(impl, dropout_p, seed, x.device)
    return dense(*impl.fns["backward"](dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, rng))


_LIB.impl("lora_linear_fwd", _lora_fwd_impl, "CompositeExplicitAutograd")
_LIB.impl("lora_linear_bwd", _lora_bwd_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("fastpeft::lora_linear_fwd", lib=_LIB)
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]), dtype=lora_A.dtype)


@torch.library.register_fake("fastpeft::lora_linear_bwd", lib=_LIB)
def _(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed):
    return x.new_empty(x.shape), lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


_lora_fwd = torch.ops.fastpeft.lora_linear_fwd.default
_lora_bwd = torch.ops.fastpeft.lora_linear_bwd.default


def _setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _ds):
    x, weight, lora_A, lora_B, s, seed = ctx.saved_tensors
    dx, d_a, d_b = _lora_bwd(dy.contiguous(), x, weight, lora_A, lora_B, s, ctx.scaling, ctx.dropout_p, seed)
    d_w = (dy.t() @ x).to(weight.dtype) if ctx.needs_input_grad[1] else None
    d_bias = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, d_w, d_bias, d_a, d_b, None, None, None


torch.library.register_autograd("fastpeft::lora_linear_fwd", _backward, setup_context=_setup, lib=_LIB)


# ----------------------------------------------------------------------------- public API
def _validate(x, weight, bias, lora_A, lora_B, dropout_p) -> None:
    """The argument checks, each message naming what is wrong; run once per distinct signature."""
    n, k = check_projection(x, weight, bias, lora_A=lora_A, lora_B=lora_B)
    if lora_A.dim() != 2 or lora_A.shape[1] != k:
        raise ValueError(f"lora_A has shape {tuple(lora_A.shape)} but the layer's in_features is {k}; expected (r, {k})")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError("LoRA rank must be >= 1")
    if tuple(lora_B.shape) != (n, r):
        raise ValueError(f"lora_B has shape {tuple(lora_B.shape)}; expected (out_features, r) = ({n}, {r})")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


_PLANS: dict[tuple, backend.Impl] = {}


def _plan(x, weight, bias, lora_A, lora_B, dropout_p, p) -> backend.Impl:
    """The backend for a call off the CPU fast path: the checks and the choice once per signature (what
    they read cannot change between calls).  Eager calls and the custom ops' real-tensor bodies
    (torch.compile) share it."""
    forced = backend.get_backend()
    key = (forced, x.shape[-1:], x.dtype, x.device, weight.shape, weight.dtype, weight.device, lora_A.shape,
           lora_A.dtype, lora_A.device, lora_B.shape, lora_B.dtype, lora_B.device,
           None if bias is None else (bias.shape, bias.dtype, bias.device), dropout_p, p > 0.0,
           p > 0.0 and x.numel() > 2**31 - 1, None if forced is None else os.environ.get("TRITON_INTERPRET"))
    plan = _PLANS.get(key)
    if plan is None:
        _validate(x, weight, bias, lora_A, lora_B, dropout_p)
        if x.dtype != weight.dtype:
            raise ValueError(f"x is {x.dtype} but the frozen weight is {weight.dtype}")
        impl = backend.select(OP, x, weight, bias, lora_A, lora_B, p)
        if len(_PLANS) > 4096:
            _PLANS.clear()
        plan = _PLANS[key] = impl
    else:
        backend._LAST[OP] = plan.backend
    return plan


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, dropout_p: float = 0.0, training: bool = False,
                seed: int | None = None) -> torch.Tensor:
    """LoRA projection `x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ`.

    x: (..., K); weight: (N, K) (pass `weight.t()` for GPT-2 Conv1D); bias: (N,) or None;
    lora_A: (r, K); lora_B: (N, r).  Dropout applies only when `training` and dropout_p > 0; its
    mask comes from `seed` when given, else from torch's default generator (the kernels: a seed
    drawn from it), so torch.manual_seed governs it either way.
    """
    p = float(dropout_p) if training else 0.0
    # the CPU fast path: the torch backend (automatic or forced), one floating dtype, no explicit seed; the
    # named checks once per distinct set of shapes
    dt = x.dtype
    if x.is_cpu and dt is weight.dtype and dt is lora_A.dtype and dt is lora_B.dtype and seed is None \
            and dt in FAST_DTYPES and weight.is_cpu and lora_A.is_cpu and lora_B.is_cpu \
            and (bias is None or bias.is_cpu) and backend.torch_or_auto() \
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu"):
        shapes = (x.shape[-1:], weight.shape, lora_A.shape, lora_B.shape, None if bias is None else bias.shape,
                  dropout_p)
        if shapes not in _CHECKED:
            remember_checked(_CHECKED, shapes, lambda: _validate(x, weight, bias, lora_A, lora_B, dropout_p))
        backend._LAST[OP] = "torch"
        if p == 0.0 and scaling == 1.0:  # no alpha: aten's own graph is the cheapest (no Python backward)
            return _native_forward(x, weight, bias, lora_A, lora_B)
        if functorch_active():
            return _CpuLoraFn.apply(x, weight, bias, lora_A, lora_B, float(scaling), p)
        return _cpu_apply(x, weight, bias, lora_A, lora_B, float(scaling), p)
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
        return _lora_linear_slow(x, weight, bias, lora_A, lora_B, float(scaling), dropout_p, p, seed)
    impl = _plan(x, weight, bias, lora_A, lora_B, dropout_p, p)
    if impl is _TRITON and not functorch_active():  # the kernels' lean node: launch wrappers called directly
        token = rng_token(impl, p, seed, x.device)[0] if p > 0.0 else 0
        return _kernel_apply(x, weight, bias, lora_A, lora_B, float(scaling), p, token)
    cfg = (float(scaling), p, seed, impl)
    if functorch_active():
        return LoraLinearFn.apply(x, weight, bias, lora_A, lora_B, cfg)
    return _lora_apply(x, weight, bias, lora_A, lora_B, cfg)


_CHECKED: set[tuple] = set()  # argument shapes the fast path has validated


class _CpuLoraFn(torch.autograd.Function):
    """The CPU fast path in one node (`torch_forward` / `torch_backward` specialised to one dtype, no
    explicit seed, with their Python cut to the bone): scaling and 1/(1-p) ride in the GEMMs' alpha;
    dropout's mask is the hash of a seed drawn from torch's default generator (as LoraLinearFn and the
    compiled graph do: the same masks), re-drawn in the backward rather than kept.  Saves x (for dA, or a trained W), S (for dB) and the frozen operands."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, p):
        shape = x.shape
        x2 = x if len(shape) == 2 else x.reshape(-1, shape[-1])
        y = F.linear(x2, weight, bias)
        if p > 0.0:
            seed = new_seed()
            xd = _dropped_cpu(x2, seed, p)
            s = torch.addmm(_zero(xd), xd, lora_A.t(), beta=0, alpha=1.0 / (1.0 - p))
            ctx.seed = seed
        else:
            s = torch.mm(x2, lora_A.t())
        y.addmm_(s, lora_B.t(), alpha=scaling)
        needs = ctx.needs_input_grad
        ctx.save_for_backward(x2 if (needs[3] or needs[1]) else None, weight, lora_A, lora_B, s if needs[4] else None)
        ctx.cfg = (scaling, p, shape, bias is not None)
        return y if len(shape) == 2 else y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, s = ctx.saved_tensors
        scaling, p, shape, has_bias = ctx.cfg
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dy2 = dy if dy.dim() == 2 else dy.reshape(-1, dy.shape[-1])
        zero = _zero(dy2)
        ds = torch.addmm(zero, dy2, lora_B, beta=0, alpha=scaling)  # scaling·dy·B (M, r)
        d_b = torch.addmm(zero, dy2.t(), s, beta=0, alpha=scaling) if need_b else None
        dx = d_a = None
        if p > 0.0:
            inv_q = 1.0 / (1.0 - p)
            seed = ctx.seed
            if need_x:  # dx = dy·W + (ds·A ∘ keep) / (1-p)
                dx = torch.mm(dy2, weight)
                dxd = torch.mm(ds, lora_A)
                if not _cext.dropout_addcmul_(dx, dxd, seed, keep_threshold(p), inv_q):
                    dx.addcmul_(dxd, dropout_keep_mask(seed, dy2.shape[0], lora_A.shape[1], p, dy2.device, dy2.dtype),
                                value=inv_q)
            if need_a:  # dA = dsᵀ·(x ∘ keep) / (1-p)
                d_a = torch.addmm(zero, ds.t(), _dropped_cpu(x, seed, p), beta=0, alpha=inv_q)
        else:
            if need_x:
                dx = torch.mm(dy2, weight).addmm_(ds, lora_A)
            if need_a:
                d_a = torch.mm(ds.t(), x)
        d_w = dy2.t() @ x if need_w else None
        d_bias = dy2.sum(0) if has_bias and need_bias else None
        if dx is not None and len(shape) != 2:
            dx = dx.view(shape)
        return dx, d_w, d_bias, d_a, d_b, None, None


_cpu_apply = raw_apply(_CpuLoraFn)


def _dropped_cpu(x2: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """x2 ∘ keep (the hash mask of `seed`), a new tensor: fastpeft._C's one pass where it takes x2, else the
    mask times x2 (the same bits)."""
    out = _cext.dropout_mul(x2, seed, keep_threshold(p)) if x2.numel() < MAX_HASH_ELEMENTS else None
    if out is not None:
        return out
    return dropout_keep_mask(seed, x2.shape[0], x2.shape[1], p, x2.device, x2.dtype).mul_(x2)


def _native_forward(x, weight, bias, lora_A, lora_B):
    """The dropout-free path at scaling 1, all tensors of one dtype: three aten ops that autograd
    differentiates in C++ (no Python backward, the cheapest eager call on a CPU; with another scaling
    addmm's alpha costs two multiplies in aten's backward, and LoraLinearFn, which folds it into its
    GEMMs, is cheaper), the same math as `torch_forward`: y = x·Wᵀ + b + S·Bᵀ with S = x·Aᵀ.
    Autograd keeps what LoraLinearFn keeps: x (for dA; one storage shared by every projection of
    the same input) and S (for dB), never x for the frozen W."""
    if x.dim() == 2:
        return torch.addmm(F.linear(x, weight, bias), torch.mm(x, lora_A.t()), lora_B.t())
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.addmm(F.linear(x2, weight, bias), torch.mm(x2, lora_A.t()), lora_B.t())
    return y.view(*x.shape[:-1], y.shape[-1])


def _lora_linear_slow(x, weight, bias, lora_A, lora_B, scaling, dropout_p, p, seed):
    """Under torch.compile (the custom ops) or autocast (inputs cast as nn.Linear casts them)."""
    _validate(x, weight, bias, lora_A, lora_B, dropout_p)
    x, weight, bias, lora_A, lora_B = cast_for_autocast(x.device.type, x, weight, bias, lora_A, lora_B)
    if x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but the frozen weight is {weight.dtype}")
    if not torch.compiler.is_compiling():
        impl = backend.select(OP, x, weight, bias, lora_A, lora_B, p)
        return LoraLinearFn.apply(x, weight, bias, lora_A, lora_B, (scaling, p, seed, impl))
    if p <= 0.0 and traced_as_aten(x):  # the CPU path without dropout: aten ops inductor fuses
        y = F.linear(x, weight, bias)
        return (y + ((x.to(lora_A.dtype) @ lora_A.t()) @ lora_B.t()) * scaling).to(y.dtype)
    if traced_as_aten(x) and seed is None and x.dtype == lora_A.dtype == lora_B.dtype:
        # the CPU path with dropout: the hash mask in aten ops inductor fuses, one traced autograd node that
        # keeps x, S and the seed and recomputes the mask in its backward (as eager does: the same bits)
        n, k = weight.shape
        lead = x.shape[:-1]
        y = _TracedDropoutLoraFn.apply(x.reshape(-1, k), weight, bias, lora_A, lora_B,
                                       compiled_seed(x.device), scaling, p)
        return y.reshape(*lead, n)
    if p <= 0.0:
        seed_t = None
    elif seed is None:
        seed_t = compiled_seed(x.device)
    elif isinstance(seed, torch.Tensor):
        seed_t = seed.reshape(1).to(torch.int64)
    else:
        seed_t = torch.tensor([int(seed)], dtype=torch.int64)
    n, k = weight.shape
    lead = x.shape[:-1]
    y, _ = _lora_fwd(x.reshape(-1, k), weight, bias, lora_A, lora_B, scaling, p, seed_t)
    return y.reshape(*lead, n)


class _TracedDropoutLoraFn(torch.autograd.Function):
    """LoRA with dropout under torch.compile on CPU tensors: `torch_forward` / `torch_backward`'s math in
    aten ops that dynamo traces (forward and backward), the mask the seed tensor's hash (no host read).
    Saves x, the frozen operands, S and the seed: no mask, no dropped input."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, seed, scaling, p):
        keep = hash_keep_reference(seed, x.shape[0], x.shape[1], p, x.device)
        s = ((x * keep) @ lora_A.t()) * (1.0 / (1.0 - p))
        y = F.linear(x, weight, bias) + (s @ lora_B.t()) * scaling
        ctx.save_for_backward(x, weight, lora_A, lora_B, s, seed)
        ctx.scaling, ctx.p, ctx.has_bias = scaling, p, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, s, seed = ctx.saved_tensors
        scaling, p = ctx.scaling, ctx.p
        needs = ctx.needs_input_grad
        inv_q = 1.0 / (1.0 - p)
        # the mask recomputed from a copy of the seed: the same bits, but not the forward's expression, which
        # the compiler's common-subexpression pass would otherwise merge with it and then keep for here
        keep = hash_keep_reference(seed.clone(), x.shape[0], x.shape[1], p, x.device)
        ds = (dy @ lora_B) * scaling
        d_b = (dy.t() @ s) * scaling if needs[4] else None
        d_a = (ds.t() @ (x * keep)) * inv_q if needs[3] else None
        dx = dy @ weight + (ds @ lora_A) * keep * inv_q if needs[0] else None
        d_w = dy.t() @ x if needs[1] else None
        d_bias = dy.sum(0) if ctx.has_bias and needs[2] else None
        return dx, d_w, d_bias, d_a, d_b, None, None, None


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
_TRITON = backend._REGISTRY[OP]["triton"]
_KERNELS: list = []  # [lora_forward, lora_backward] of kernels/lora.py, imported at the first kernel call


class _KernelLoraFn(torch.autograd.Function):
    """The Triton path in one node with the least Python between autograd and the launch wrappers:
    LoraLinearFn's kernel branch without the backend indirection.  Saves x, S and the seed (no mask)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, p, seed):
        if not _KERNELS:
            from ..kernels.lora import lora_backward, lora_forward

            _KERNELS[:] = [lora_forward, lora_backward]
        shape = x.shape
        x2 = x if len(shape) == 2 else x.reshape(-1, shape[-1])
        y, s = _KERNELS[0](x2, weight, bias, lora_A, lora_B, scaling, p, seed)
        ctx.save_for_backward(x2, weight, lora_A, lora_B, s)
        ctx.cfg = (scaling, p, seed, shape, bias is not None)
        return y if len(shape) == 2 else y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, s = ctx.saved_tensors
        scaling, p, seed, shape, has_bias = ctx.cfg
        dy2 = (dy if dy.dim() == 2 else dy.reshape(-1, dy.shape[-1])).contiguous()
        dx, d_a, d_b = _KERNELS[1](dy2, x, weight, lora_A, lora_B, s, scaling, p, seed)
        needs = ctx.needs_input_grad
        d_w = (dy2.t() @ x).to(weight.dtype) if needs[1] else None
        d_bias = dy2.sum(0) if has_bias and needs[2] else None
        if len(shape) != 2:
            dx = dx.view(shape)
        return dx, d_w, d_bias, d_a, d_b, None, None, None


_kernel_apply = raw_apply(_KernelLoraFn)
