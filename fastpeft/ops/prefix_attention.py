"""prefix_attention: attention over a learned prefix followed by the sequence's own keys.

q: (B, Hq, T, D); k, v: (B, Hkv, S, D) with Hq a multiple of Hkv (GQA); prefix_k, prefix_v:
(Hkv, P, D) shared by every row, or (N, Hkv, P, D) with prefix_index (B,) choosing each row's
prefix (mixed-task batches).  Query t sees every prefix key and, when causal, the sequence keys
j ≤ t + S − T (lower-right alignment, so decoding with a KV cache works); attention_mask (B, S)
(1 = attend) hides padded sequence keys.  Returns (out (B, Hq, T, D), lse (B, Hq, T) fp32).

The reference concatenates; kernels never do: the prefix is read in place, never expanded over
the batch, and its gradient is reduced into the single (or per-task) prefix tensor.
"""

from __future__ import annotations

import math
import os

import torch

from .. import backend
from ._common import (check, check_float, check_same_device, dense, functorch_active, gpu_kernel_supports, raw_apply,
                      remember_checked, traced_as_aten, value_checks)

OP = "prefix_attention"


def _gather_prefix(prefix, prefix_index, batch):
    if prefix_index is None:
        return prefix.unsqueeze(0).expand(batch, *prefix.shape)
    return prefix[prefix_index]


def _visible(q, k, attention_mask, causal, P):
    """Boolean (B or 1, 1, T, P + S) mask of the keys each query sees."""
    T, S = q.shape[2], k.shape[2]
    seq = torch.ones(T, S, dtype=torch.bool, device=q.device)
    if causal:
        t = torch.arange(T, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        seq = j <= t + (S - T)
    seq = seq[None, None]
    if attention_mask is not None:
        seq = seq & attention_mask.bool()[:, None, None, :]
    pre = torch.ones(*seq.shape[:3], P, dtype=torch.bool, device=q.device)
    return torch.cat([pre, seq], dim=-1)


def _keys(q, k, v, prefix_k, prefix_v, prefix_index):
    B, Hq = q.shape[:2]
    group = Hq // k.shape[1]
    kk = torch.cat([_gather_prefix(prefix_k, prefix_index, B), k], dim=2).float()
    vv = torch.cat([_gather_prefix(prefix_v, prefix_index, B), v], dim=2).float()
    return kk.repeat_interleave(group, dim=1), vv.repeat_interleave(group, dim=1)


def reference_forward(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, causal, scale):
    P = prefix_k.shape[-2]
    kk, vv = _keys(q, k, v, prefix_k, prefix_v, prefix_index)
    scores = (q.float() @ kk.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~_visible(q, k, attention_mask, causal, P), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # zero only rows with nothing to attend (lse = -inf); NaN from NaN inputs propagates, as in SDPA
    probs = torch.where(torch.isneginf(lse)[..., None], 0.0, torch.exp(scores - lse[..., None]))
    return (probs @ vv).to(q.dtype), lse


def reference_backward(dout, q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, out, lse, causal, scale):
    B, Hq, T, D = q.shape
    Hkv, P = k.shape[1], prefix_k.shape[-2]
    group = Hq // Hkv
    kk, vv = _keys(q, k, v, prefix_k, prefix_v, prefix_index)
    scores = (q.float() @ kk.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~_visible(q, k, attention_mask, causal, P), float("-inf"))
    # zero only rows with nothing to attend (lse = -inf); NaN from NaN inputs propagates, as in SDPA
    probs = torch.where(torch.isneginf(lse)[..., None], 0.0, torch.exp(scores - lse[..., None]))
    do = dout.float()
    dv_all = probs.transpose(-1, -2) @ do  # (B, Hq, P+S, D)
    dp = do @ vv.transpose(-1, -2)
    delta = (do * out.float()).sum(-1, keepdim=True)
    ds = probs * (dp - delta) * scale
    dq = ds @ kk
    dk_all = ds.transpose(-1, -2) @ q.float()
    # fold the query-head groups back onto their key/value head
    dk_all = dk_all.reshape(B, Hkv, group, P + k.shape[2], D).sum(2)
    dv_all = dv_all.reshape(B, Hkv, group, P + k.shape[2], D).sum(2)
    dpk_rows, dk = dk_all[:, :, :P], dk_all[:, :, P:]
    dpv_rows, dv = dv_all[:, :, :P], dv_all[:, :, P:]
    if prefix_index is None:
        dpk, dpv = dpk_rows.sum(0), dpv_rows.sum(0)
    else:
        dpk = torch.zeros(prefix_k.shape, dtype=torch.float32, device=q.device).index_add_(0, prefix_index, dpk_rows)
        dpv = torch.zeros(prefix_v.shape, dtype=torch.float32, device=q.device).index_add_(0, prefix_index, dpv_rows)
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype))


# ----------------------------------------------------------------------------- production torch path
# On a CPU: torch's fused flash-attention kernel for CPUs over [prefix; sequence] keys with the
# visibility as an additive mask (what the model's own SDPA call costs), its logsumexp kept for a
# backward through the matching fused kernel.  The concatenation is a temporary of each pass: only
# q, k, v, the prefix itself, out and lse are kept for the backward, never the prefix expanded over
# the batch.  Elsewhere (and for an empty prefix) the reference runs.
# torch's own Python binding of the forward where it has one: 15-20 µs less per call than the op overload
_FLASH_CPU = (getattr(torch, "_scaled_dot_product_flash_attention_for_cpu", None)
              or getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None))
_FLASH_CPU_BWD = getattr(getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None),
                         "default", None)
_MASKS: dict[tuple, torch.Tensor] = {}


def _fast(q, prefix_k) -> bool:
    return (_FLASH_CPU is not None and _FLASH_CPU_BWD is not None and q.device.type == "cpu"
            and prefix_k.shape[-2] > 0 and q.dtype in (torch.float32, torch.bfloat16, torch.float16))


def _additive_mask(q, k, attention_mask, causal, P):
    """(B or 1, 1, T, P + S) additive mask in q's dtype: 0 where a key is seen, -inf elsewhere."""
    T, S = q.shape[2], k.shape[2]
    key = (T, S, P, causal, q.dtype)
    base = _MASKS.get(key) if attention_mask is None else None
    if base is not None:
        return base
    visible = _visible(q, k, attention_mask, causal, P)
    mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
    if attention_mask is None:
        if len(_MASKS) > 64:
            _MASKS.clear()
        _MASKS[key] = mask
    return mask


def _keys_cat(q, k, v, prefix_k, prefix_v, prefix_index):
    """[prefix; k] and [prefix; v] with the key/value heads repeated for the query groups."""
    B, Hq = q.shape[:2]
    Hkv = k.shape[1]
    group = Hq // Hkv
    kk = torch.cat([_gather_prefix(prefix_k, prefix_index, B), k], dim=2)
    vv = torch.cat([_gather_prefix(prefix_v, prefix_index, B), v], dim=2)
    if group > 1:  # GQA: an expanded view copied once (repeat_interleave costs twice as much on small shapes)
        L, D = kk.shape[2], kk.shape[3]
        kk = kk.unsqueeze(2).expand(B, Hkv, group, L, D).reshape(B, Hq, L, D)
        vv = vv.unsqueeze(2).expand(B, Hkv, group, L, D).reshape(B, Hq, L, D)
    return kk, vv


def torch_forward(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, causal, scale):
    if not _fast(q, prefix_k):
        return reference_forward(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, causal, scale)
    kk, vv = _keys_cat(q, k, v, prefix_k, prefix_v, prefix_index)
    mask = _additive_mask(q, k, attention_mask, causal, prefix_k.shape[-2])
    out, lse = _FLASH_CPU(q, kk, vv, 0.0, False, attn_mask=mask, scale=scale)
    return out, lse


def torch_backward(dout, q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, out, lse, causal, scale):
    if not _fast(q, prefix_k):
        return reference_backward(dout, q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, out, lse,
                                  causal, scale)
    B, Hq, T, D = q.shape
    Hkv, P, S = k.shape[1], prefix_k.shape[-2], k.shape[2]
    group = Hq // Hkv
    kk, vv = _keys_cat(q, k, v, prefix_k, prefix_v, prefix_index)
    mask = _additive_mask(q, k, attention_mask, causal, P)
    dq, dk_all, dv_all = _FLASH_CPU_BWD(dout.contiguous(), q, kk, vv, out, lse, 0.0, False, attn_mask=mask,
                                        scale=scale)
    if group > 1:  # fold the query-head groups back onto their key/value head
        dk_all = dk_all.reshape(B, Hkv, group, P + S, D).sum(2)
        dv_all = dv_all.reshape(B, Hkv, group, P + S, D).sum(2)
    dk, dv = dk_all[:, :, P:], dv_all[:, :, P:]
    if prefix_index is None:
        dpk = dk_all[:, :, :P].sum(0, dtype=torch.float32)
        dpv = dv_all[:, :, :P].sum(0, dtype=torch.float32)
    else:
        dpk = torch.zeros(prefix_k.shape, dtype=torch.float32, device=q.device).index_add_(
            0, prefix_index, dk_all[:, :, :P].float())
        dpv = torch.zeros(prefix_v.shape, dtype=torch.float32, device=q.device).index_add_(
            0, prefix_index, dv_all[:, :, :P].float())
    return dq, dk, dv, dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)


backend.register(OP, "torch", priority=0, forward=torch_forward, backward=torch_backward)
_TORCH_IMPL = backend._REGISTRY[OP]["torch"]
_CHECKED: set[tuple] = set()  # argument shapes the CPU fast path has validated


@torch.library.custom_op("fastpeft::prefix_attention_fwd", mutates_args=())
def _pa_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
            attention_mask: torch.Tensor | None, prefix_index: torch.Tensor | None, causal: bool, scale: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    impl = backend.select(OP, q, k, v, prefix_k, prefix_v, attention_mask, prefix_index)
    return dense(*impl.fns["forward"](q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, causal, scale))


@_pa_fwd.register_fake
def _(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, causal, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fastpeft::prefix_attention_bwd", mutates_args=())
def _pa_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
            prefix_v: torch.Tensor, attention_mask: torch.Tensor | None, prefix_index: torch.Tensor | None,
            out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = backend.select(OP, q, k, v, prefix_k, prefix_v, attention_mask, prefix_index)
    return dense(*impl.fns["backward"](dout, q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, out, lse,
                                       causal, scale))


@_pa_bwd.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, out, lse, causal, scale):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, prefix_k, prefix_v))


def _setup(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, causal, scale = inputs
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, *output)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, dout, _dlse):
    q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, out, lse = ctx.saved_tensors
    grads = _pa_bwd(dout.contiguous(), q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, out, lse,
                    ctx.causal, ctx.scale)
    return (*grads, None, None, None, None)


_pa_fwd.register_autograd(_backward, setup_context=_setup)


class PrefixAttentionFn(torch.autograd.Function):
    """The eager path: one autograd node calling the chosen backend directly (the custom ops above
    are what torch.compile traces).  Saves q, k, v, the prefix, the masks, out and lse."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, cfg):
        causal, scale, impl = cfg
        out, lse = impl.fns["forward"](q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, causal, scale)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, out, lse)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, out, lse = ctx.saved_tensors
        causal, scale, impl = ctx.cfg
        grads = impl.fns["backward"](dout.contiguous(), q, k, v, prefix_k, prefix_v, attention_mask, prefix_index,
                                     out, lse, causal, scale)
        return (*grads, None, None, None)


_pa_apply = raw_apply(PrefixAttentionFn)


def _validate(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, causal) -> None:
    """The checks that read shapes, dtypes and devices only (once per signature)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        check_float(name, t)
    check_same_device(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, attention_mask=attention_mask,
                      prefix_index=prefix_index)
    check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, "q, k, v must be 4-D (batch, heads, seq, head_dim)")
    B, Hq, T, D = q.shape
    check(k.shape == v.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    check(k.shape[0] == B and k.shape[3] == D, f"k has shape {tuple(k.shape)}; expected ({B}, Hkv, S, {D})")
    Hkv = k.shape[1]
    check(Hkv >= 1 and Hq % Hkv == 0, f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    check(k.dtype == q.dtype and v.dtype == q.dtype, f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check(prefix_k.shape == prefix_v.shape, f"prefix_k {tuple(prefix_k.shape)} and prefix_v {tuple(prefix_v.shape)} differ")
    check(prefix_k.dtype == q.dtype and prefix_v.dtype == q.dtype,
          f"prefix_k/prefix_v are {prefix_k.dtype}/{prefix_v.dtype}; cast them to the attention dtype {q.dtype}")
    if prefix_index is None:
        check(prefix_k.dim() == 3 and prefix_k.shape[0] == Hkv and prefix_k.shape[2] == D,
              f"prefix_k has shape {tuple(prefix_k.shape)}; expected ({Hkv}, P, {D})")
    else:
        check(prefix_k.dim() == 4 and prefix_k.shape[1] == Hkv and prefix_k.shape[3] == D,
              f"with prefix_index, prefix_k must have shape (num_prefixes, {Hkv}, P, {D}), got {tuple(prefix_k.shape)}")
        check(prefix_index.dtype in (torch.int32, torch.int64) and tuple(prefix_index.shape) == (B,),
              f"prefix_index must be an integer tensor of shape ({B},)")
    if attention_mask is not None:
        check(tuple(attention_mask.shape) == (B, k.shape[2]),
              f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, kv_len) = ({B}, {k.shape[2]})")
        check(not attention_mask.is_floating_point(),
              f"attention_mask must be a boolean or integer padding mask (1 = attend), got {attention_mask.dtype}; "
              "an additive float mask would be read inverted")
    check(T <= k.shape[2] or not causal, f"causal attention needs kv_len ({k.shape[2]}) >= query length ({T})")


_PLANS: dict[tuple, backend.Impl] = {}


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                     prefix_v: torch.Tensor, *, causal: bool = True, attention_mask: torch.Tensor | None = None,
                     prefix_index: torch.Tensor | None = None, scale: float | None = None,
                     return_lse: bool = False):
    """softmax(q·[prefix_k; k]ᵀ·scale + mask)·[prefix_v; v]; see the module docstring for shapes."""
    causal = bool(causal)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    compiling = torch.compiler.is_compiling()
    key = None
    impl = None
    if not compiling and q.is_cpu and backend.torch_or_auto():
        # the CPU fast path: the torch backend (the only automatic choice here); the named checks once per
        # set of shapes and dtypes (a set lookup, not the kernels' plan key with strides and devices)
        shapes = (q.shape, q.dtype, k.shape, k.dtype, v.shape, v.dtype, prefix_k.shape, prefix_k.dtype, prefix_v.shape,
                  prefix_v.dtype, None if attention_mask is None else (attention_mask.shape, attention_mask.dtype),
                  None if prefix_index is None else (prefix_index.shape, prefix_index.dtype), causal,
                  k.is_cpu and v.is_cpu and prefix_k.is_cpu and prefix_v.is_cpu)
        if shapes not in _CHECKED:
            remember_checked(_CHECKED, shapes, lambda: _validate(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, causal))
        impl = _TORCH_IMPL
        backend._LAST[OP] = "torch"
    elif not compiling:
        key = (backend.get_backend(), q.shape, q.dtype, q.device, q.stride(), k.shape, k.dtype, k.stride(), v.shape,
               v.dtype, v.stride(), prefix_k.shape, prefix_k.dtype, prefix_k.device, prefix_v.shape, prefix_v.dtype,
               None if attention_mask is None else (attention_mask.shape, attention_mask.dtype, attention_mask.device),
               None if prefix_index is None else (prefix_index.shape, prefix_index.dtype, prefix_index.device),
               causal, k.device, v.device, None if backend.get_backend() is None else os.environ.get("TRITON_INTERPRET"))
        impl = _PLANS.get(key)
    if impl is None:
        _validate(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, causal)
    if prefix_index is not None:
        n = prefix_k.shape[0]
        if value_checks(prefix_index):
            lo, hi = torch.aminmax(prefix_index)
            check(int(lo) >= 0 and int(hi) < n, f"prefix_index values must lie in [0, {n})")
        if prefix_index.dtype != torch.long:
            prefix_index = prefix_index.long()
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.bool()
    if compiling and not return_lse and prefix_k.shape[-2] > 0 and traced_as_aten(q):
        # CPU tensors: PEFT's own math as aten ops (the prefix gathered and concatenated in front of the keys,
        # the visibility as a boolean mask, SDPA), which inductor fuses and whose concatenation the partitioner
        # may recompute in the backward; a non-empty prefix leaves no query without a key to attend to
        kk, vv = _keys_cat(q, k, v, prefix_k, prefix_v, prefix_index)
        visible = _visible(q, k, attention_mask, causal, prefix_k.shape[-2])
        return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=visible, scale=scale)
    if compiling:
        out, lse = _pa_fwd(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, causal, scale)
        return (out, lse) if return_lse else out
    if impl is None:
        impl = _PLANS[key] = backend.select(OP, q, k, v, prefix_k, prefix_v, attention_mask, prefix_index)
        if len(_PLANS) > 4096:
            _PLANS.clear()
    else:
        backend._LAST[OP] = impl.backend
    args = (q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, (causal, scale, impl))
    out, lse = PrefixAttentionFn.apply(*args) if functorch_active() else _pa_apply(*args)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- triton backend
def _triton_supports(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, *, forced: bool) -> str | None:
    reason = gpu_kernel_supports(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, forced=forced)
    if reason is not None:
        return reason
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not fp16/bf16/fp32"
    if q.shape[-1] > _pa_kernels.MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} is above the kernel's {_pa_kernels.MAX_HEAD_DIM}"
    if q.shape[0] * q.shape[1] > 65535:
        return f"batch × query heads = {q.shape[0] * q.shape[1]} is above the grid limit 65535"
    return None


try:  # the Triton kernels are optional: without triton the reference serves
    from fastpeft.kernels import prefix_attention as _pa_kernels
except ImportError:
    _pa_kernels = None

if _pa_kernels is not None:
    backend.register(OP, "triton", priority=10, supports=_triton_supports,
                     forward=_pa_kernels.forward, backward=_pa_kernels.backward)
