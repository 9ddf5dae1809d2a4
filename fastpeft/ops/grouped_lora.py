"""grouped_lora_linear: a mixed-adapter batch through one projection, the low-rank work grouped by adapter.

    y[t] = x[t]·Wᵀ + b + scaling[g(t)] · (dropout_{g(t)}(x[t])·A[g(t)]ᵀ)·B[g(t)]ᵀ

for every token t whose batch row names adapter g(t); rows naming "__base__" get x[t]·Wᵀ + b only.
The base projection runs once for the whole batch; the low-rank terms run per adapter segment.

The grouping is a `GroupPlan`, made once per batch from the per-row adapter names (host data: no
device synchronisation) and cached, so every layer of one forward shares it: the token indices
sorted by adapter (stable), the segment offsets, the adapter of each segment, and whether each
segment is a single contiguous range of tokens (then the torch path works on views, no gather).
Adding or deleting an adapter only changes which plans get made: nothing is compiled per adapter
set (the kernels are specialised by the padded maximum rank and the dtypes only).

Backends (fastpeft.backend, op "grouped_lora"):
* "torch" — the production path (CPU, and wherever no kernel applies): one F.linear, then per
  segment an mm for S and an in-place addmm into y (views when the segment is contiguous, else one
  gather of x and one index_add_ of the deltas); dropout from torch's generator, re-drawn in the
  backward from the seed (never stored);
* "triton" — SGMV-style shrink/expand over a stacked adapter table (kernels/grouped_lora.py) for
  prefill and training, a fused BGMV-style kernel for decode (M ≤ 64 tokens); no dropout;
* "cuda" — the same shrink/expand in fastpeft._C (csrc/grouped_lora.cu); no dropout.
`reference_forward` is the specification: a plain per-token-row loop through each row's adapter.
Forward and backward are one plain autograd.Function, so each row's loss reaches only its
adapter's parameters (multi-adapter training in one batch).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import backend
from ._common import cast_for_autocast, check_projection, gpu_kernel_supports
from ._random import new_seed

OP = "grouped_lora"
BASE = "__base__"
DECODE_MAX_TOKENS = 64  # at or below this many tokens the kernels use the fused BGMV-style decode kernel


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True, eq=False)
class GroupPlan:
    """Tokens grouped by adapter, once per batch.

    names: the adapter of each segment (first-appearance order, "__base__" excluded);
    tokens: tokens in the batch (rows × tokens_per_row); starts: segment g is sorted tokens
    starts[g]:starts[g+1]; order: (starts[-1],) int64 token indices sorted by adapter (stable) on
    the batch's device; spans: per segment the (first, end) token range when every segment is one
    contiguous range of the original order, else None; offsets: `starts` as an int64 tensor and
    slot: (tokens,) int32 segment of each token (-1: base) for the kernels; max_len: the longest segment."""

    names: tuple[str, ...]
    tokens: int
    starts: tuple[int, ...]
    order: torch.Tensor
    spans: tuple[tuple[int, int], ...] | None
    offsets: torch.Tensor
    slot: torch.Tensor
    max_len: int

    @property
    def num_lora_tokens(self) -> int:
        return self.starts[-1]


_PLANS: OrderedDict = OrderedDict()
_PLAN_CACHE_SIZE = 64


def plan_groups(adapter_names: Sequence[str], tokens_per_row: int = 1,
                device: torch.device | str = "cpu") -> GroupPlan:
    """The GroupPlan of a batch whose row b (tokens_per_row consecutive tokens) uses adapter_names[b];
    cached per (names, tokens_per_row, device), so all layers of a forward share one."""
    device = torch.device(device)
    key = (tuple(adapter_names), int(tokens_per_row), device)
    plan = _PLANS.get(key)
    if plan is not None:
        _PLANS.move_to_end(key)
        return plan
    names, t = key[0], key[1]
    if t < 0:
        raise ValueError(f"tokens_per_row must be >= 0, got {t}")
    rows_of: dict[str, list[int]] = {}
    for b, name in enumerate(names):
        if name != BASE:
            rows_of.setdefault(name, []).append(b)
    groups = tuple(rows_of)
    starts, spans, row_order = [0], [], []
    for g in groups:
        rows = rows_of[g]
        row_order.extend(rows)
        starts.append(starts[-1] + len(rows) * t)
        spans.append((rows[0] * t, (rows[-1] + 1) * t) if rows[-1] - rows[0] + 1 == len(rows) else None)
    rows_t = torch.tensor(row_order, dtype=torch.int64)
    order = (rows_t[:, None] * t + torch.arange(t, dtype=torch.int64)[None, :]).reshape(-1)
    slot = torch.full((len(names) * t,), -1, dtype=torch.int32)
    for g, name in enumerate(groups):
        slot[order[starts[g]:starts[g + 1]]] = g
    lens = [starts[g + 1] - starts[g] for g in range(len(groups))]
    plan = GroupPlan(names=groups, tokens=len(names) * t, starts=tuple(starts), order=order.to(device),
                     spans=None if any(s is None for s in spans) else tuple(spans),
                     offsets=torch.tensor(starts, dtype=torch.int64).to(device), slot=slot.to(device),
                     max_len=max(lens, default=0))
    _PLANS[key] = plan
    if len(_PLANS) > _PLAN_CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plan


def stack_table(lora_A: Sequence[torch.Tensor], lora_B: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked adapter table the kernels read: A (G, R, K) and B (G, N, R), R the largest rank,
    each adapter's rank zero-padded (the padding contributes exact zeros)."""
    r_max = max(a.shape[0] for a in lora_A)
    a_t = torch.stack([F.pad(a, (0, 0, 0, r_max - a.shape[0])) for a in lora_A])
    b_t = torch.stack([F.pad(b, (0, r_max - b.shape[1])) for b in lora_B])
    return a_t.contiguous(), b_t.contiguous()


# ----------------------------------------------------------------------------- reference (spec)
def _keep(gen: torch.Generator | None, m: int, k: int, p: float, device, dtype) -> torch.Tensor:
    from .lora import keep_mask  # the production LoRA path's mask: 16 random bits per element

    return keep_mask(m, k, p, gen, device, dtype)


def reference_forward(x, weight, bias, plan, lora_A, lora_B, scaling, dropout_p, seed=0):
    """y for a 2-D x (tokens, K): each token through its segment's adapter, one sorted segment at a
    time in plan order; segment g's dropout mask is drawn (rows of the segment in sorted order × K)
    from a torch generator seeded with `seed`, after the masks of segments 0..g-1."""
    y = F.linear(x, weight, bias)
    gen = None
    if any(p > 0 for p in dropout_p):
        gen = torch.Generator(x.device)
        gen.manual_seed(int(seed))
    out = y.clone()
    for g in range(len(plan.names)):
        idx = plan.order[plan.starts[g]:plan.starts[g + 1]]
        a, b, p = lora_A[g], lora_B[g], dropout_p[g]
        xs = x[idx].to(a.dtype)
        if p > 0:
            xs = xs * _keep(gen, xs.shape[0], xs.shape[1], p, x.device, a.dtype) / (1.0 - p)
        delta = (xs @ a.t()) @ b.t() * scaling[g]
        out = out.index_put((idx,), (y[idx] + delta).to(y.dtype))
    return out


# ----------------------------------------------------------------------------- production torch path
_GENERATORS: dict[torch.device, torch.Generator] = {}


def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen = _GENERATORS.get(device)
    if gen is None:
        gen = _GENERATORS[device] = torch.Generator(device)
    gen.manual_seed(seed)
    return gen


def torch_forward(x, weight, bias, plan, lora_A, lora_B, scaling, dropout_p, seed, table=None):
    """(y, saved) for a 2-D x: the base projection once, then each segment's S = dropout(x_g)·A_gᵀ and
    y_g += scaling_g·S·B_gᵀ in place; saved = the S of each segment (for dB)."""
    y = F.linear(x, weight, bias)
    gen = _generator(x.device, seed) if any(p > 0 for p in dropout_p) else None
    adt = lora_A[0].dtype
    xa = x if x.dtype == adt else x.to(adt)
    spans = plan.spans
    in_place = y.dtype == adt
    xs_all = None if spans is not None else xa.index_select(0, plan.order)
    delta = None
    if spans is None and not in_place:
        delta = torch.empty((plan.num_lora_tokens, y.shape[1]), device=y.device, dtype=adt)
    saved = []
    for g in range(len(plan.names)):
        a, b, scale, p = lora_A[g], lora_B[g], scaling[g], dropout_p[g]
        lo, hi = (plan.starts[g], plan.starts[g + 1]) if spans is None else spans[g]
        xs = xs_all[plan.starts[g]:plan.starts[g + 1]] if spans is None else xa[lo:hi]
        if p > 0:
            xs = _keep(gen, xs.shape[0], xs.shape[1], p, xs.device, adt).mul_(xs)
            s = torch.mm(xs, a.t()).mul_(1.0 / (1.0 - p))
        else:
            s = torch.mm(xs, a.t())
        saved.append(s)
        if spans is None and in_place:
            # the segment's rows of y gathered, y_g += scaling·S·Bᵀ in one addmm and written back: the
            # single-adapter op's own arithmetic (one rounding of y + scaling·S·Bᵀ), so that a row of a mixed
            # batch differs from the same row run alone by no more than the GEMM's dependence on the row count
            rows = plan.order[lo:hi]
            y.index_copy_(0, rows, y.index_select(0, rows).addmm_(s, b.t(), alpha=scale))
        elif spans is None:  # beta=0: delta's old contents are ignored, the scaling rides on the mm
            part = delta[lo:hi]
            torch.addmm(part, s, b.t(), beta=0, alpha=scale, out=part)
        elif in_place:
            y[lo:hi].addmm_(s, b.t(), alpha=scale)
        else:
            y[lo:hi] += torch.mm(s, b.t()).mul_(scale)
    if spans is None and not in_place:  # y + delta in the adapter dtype, rounded once to y's dtype (as the single-adapter op)
        y.index_copy_(0, plan.order, (y.index_select(0, plan.order) + delta).to(y.dtype))
    return y, saved


def torch_backward(dy, x, weight, plan, lora_A, lora_B, saved, scaling, dropout_p, seed, needs):
    """(dx, dA list, dB list) given dy (tokens, N) and the segments' S; the forward's masks re-drawn."""
    need_x, need_a, need_b = needs
    adt = lora_A[0].dtype
    dya = dy if dy.dtype == adt else dy.to(adt)
    gen = _generator(dy.device, seed) if any(p > 0 for p in dropout_p) else None
    spans = plan.spans
    dx = torch.mm(dy, weight) if need_x else None
    if need_a:
        xa = x if x.dtype == adt else x.to(adt)
        xs_all = None if spans is not None else xa.index_select(0, plan.order)
    dys_all = None if spans is not None else dya.index_select(0, plan.order)
    dxl = None
    if need_x and (spans is None or dx.dtype != adt):
        dxl = torch.empty((plan.num_lora_tokens, x.shape[1] if x is not None else weight.shape[1]),
                          device=dy.device, dtype=adt)
    d_as, d_bs = [], []
    for g in range(len(plan.names)):
        a, b, scale, p = lora_A[g], lora_B[g], scaling[g], dropout_p[g]
        lo, hi = (plan.starts[g], plan.starts[g + 1]) if spans is None else spans[g]
        so, eo = plan.starts[g], plan.starts[g + 1]
        dys = dys_all[so:eo] if spans is None else dya[lo:hi]
        ds = torch.mm(dys, b).mul_(scale)  # (rows_g, r)
        d_bs.append(torch.mm(dys.t(), saved[g]).mul_(scale) if need_b else None)
        keep = None
        if p > 0:
            keep = _keep(gen, eo - so, a.shape[1], p, dy.device, adt).mul_(1.0 / (1.0 - p))
        if need_a:
            xs = xs_all[so:eo] if spans is None else xa[lo:hi]
            d_as.append(torch.mm(ds.t(), xs * keep if keep is not None else xs))
        else:
            d_as.append(None)
        if need_x:
            if dxl is None:  # contiguous segments, one dtype: straight into dx
                if keep is None:
                    dx[lo:hi].addmm_(ds, a)
                else:
                    dx[lo:hi].addcmul_(torch.mm(ds, a), keep)
            else:
                part = dxl[so:eo]
                torch.mm(ds, a, out=part)
                if keep is not None:
                    part.mul_(keep)
    if dxl is not None:
        if spans is None:
            dx.index_add_(0, plan.order, dxl.to(dx.dtype))
        else:
            for g, (lo, hi) in enumerate(spans):
                dx[lo:hi] += dxl[plan.starts[g]:plan.starts[g + 1]].to(dx.dtype)
    return dx, d_as, d_bs


backend.register(OP, "torch", priority=0, forward=torch_forward, backward=torch_backward)


# ----------------------------------------------------------------------------- kernel backends
_SCALES: dict[tuple, torch.Tensor] = {}


def _scale_tensor(scaling: tuple[float, ...], device: torch.device) -> torch.Tensor:
    key = (scaling, device)
    t = _SCALES.get(key)
    if t is None:
        if len(_SCALES) > 256:
            _SCALES.clear()
        t = _SCALES[key] = torch.tensor(scaling, dtype=torch.float32).to(device)
    return t


def _kernel_forward(kern):
    def forward(x, weight, bias, plan, lora_A, lora_B, scaling, dropout_p, seed, table=None):
        a_t, b_t = table if table is not None else stack_table(lora_A, lora_B)
        scale_t = _scale_tensor(scaling, x.device)
        y = F.linear(x, weight, bias)
        if plan.num_lora_tokens == 0:
            return y, (None, a_t, b_t, scale_t)
        if x.shape[0] <= DECODE_MAX_TOKENS and kern.decode is not None:
            kern.decode(x, plan.slot, a_t, b_t.transpose(1, 2), scale_t, y)
            return y, (None, a_t, b_t, scale_t)
        s = kern.shrink(x, plan, a_t, None)
        kern.expand(s, plan, b_t.transpose(1, 2), scale_t, y)
        return y, (s, a_t, b_t, scale_t)
    return forward


def _kernel_backward(kern):
    def backward(dy, x, weight, plan, lora_A, lora_B, saved, scaling, dropout_p, seed, needs):
        s, a_t, b_t, scale_t = saved
        need_x, need_a, need_b = needs
        dx = torch.mm(dy, weight) if need_x else None
        groups = len(lora_A)
        if plan.num_lora_tokens == 0:
            return dx, [torch.zeros_like(a) for a in lora_A], [torch.zeros_like(b) for b in lora_B]
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        if s is None:  # the forward ran the decode kernel, which keeps no S
            s = kern.shrink(x, plan, a_t, None)
        # dS = scaling_g · dy_g · B_g: the B table (G, N, R) read as (G, R, N)
        ds = kern.shrink(dy, plan, b_t.transpose(1, 2), scale_t)
        if need_x:  # dx[order] += dS · A_g
            kern.expand(ds, plan, a_t, None, dx)
        d_as, d_bs = [None] * groups, [None] * groups
        if need_a:  # dA_g = dS_gᵀ · x_g
            d_a_t = kern.reduce(ds, x, plan, None, groups)
            d_as = [d_a_t[g, :a.shape[0]].to(a.dtype) for g, a in enumerate(lora_A)]
        if need_b:  # dB_gᵀ = scaling_g · S_gᵀ · dy_g
            d_bt = kern.reduce(s, dy, plan, scale_t, groups)
            d_bs = [d_bt[g, :b.shape[1]].t().to(b.dtype) for g, b in enumerate(lora_B)]
        return dx, d_as, d_bs
    return backward


def _kernel_supports(x, weight, bias, lora_A, lora_B, dropout_p, *, forced: bool) -> str | None:
    reason = gpu_kernel_supports(x, weight, bias, *lora_A, *lora_B, forced=forced)
    if reason:
        return reason
    if any(p > 0 for p in dropout_p):
        return "lora_dropout > 0 is not supported by the grouped kernels (the torch path draws it)"
    dtypes = {t.dtype for t in (*lora_A, *lora_B)}
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or len(dtypes) != 1 or \
            not dtypes <= {torch.float16, torch.bfloat16, torch.float32}:
        return (f"dtypes x {x.dtype} / adapters {sorted(map(str, dtypes))} not supported "
                f"(fp16/bf16/fp32, one adapter dtype)")
    if max(a.shape[0] for a in lora_A) > 256:
        return "rank above the kernels' maximum 256"
    return None


class _Kern:
    """A backend's grouped kernels, called with the plan (the wrappers take its tensors)."""

    def __init__(self, shrink, expand, reduce, decode, reduce_takes_starts=False):
        self._shrink, self._expand, self._reduce, self.decode = shrink, expand, reduce, decode
        self._starts = reduce_takes_starts

    def shrink(self, x, plan, w, scale_t):
        return self._shrink(x, plan.order, plan.offsets, plan.max_len, w, scale_t)

    def expand(self, s, plan, lo, scale_t, out):
        return self._expand(s, plan.order, plan.offsets, plan.max_len, lo, scale_t, out)

    def reduce(self, t, x, plan, scale_t, groups):
        if self._starts:
            return self._reduce(t, x, plan.order, plan.offsets, plan.max_len, scale_t, groups, plan.starts)
        return self._reduce(t, x, plan.order, plan.offsets, plan.max_len, scale_t, groups)


def _triton_kern() -> _Kern:
    from ..kernels import grouped_lora as k

    return _Kern(k.sgmv_shrink, k.sgmv_expand, k.sgmv_reduce, k.bgmv)


def _cuda_kern() -> _Kern:
    from .. import _cext

    return _Kern(_cext.grouped_lora_shrink, _cext.grouped_lora_expand, _cuda_reduce, _cext.grouped_lora_decode, True)


def _cuda_reduce(t, x, order, offsets, max_len, scale_t, groups, starts=None):
    # OUT[g] = scale_g · T_gᵀ · X[order_g]: G small GEMMs (cuBLAS) over the plan's host-side offsets
    starts = offsets.tolist() if starts is None else starts
    out = t.new_zeros((groups, t.shape[1], x.shape[1]), dtype=torch.float32)
    xs = x.index_select(0, order).float()
    for g in range(groups):
        torch.mm(t[starts[g]:starts[g + 1]].t().float(), xs[starts[g]:starts[g + 1]], out=out[g])
    if scale_t is not None:
        out *= scale_t[:, None, None]
    return out


class _Lazy:
    """Backend functions that import their kernel module on first use (triton / _C may be missing)."""

    def __init__(self, factory, which):
        self.factory, self.which, self.fn = factory, which, None

    def __call__(self, *args):
        if self.fn is None:
            self.fn = (_kernel_forward if self.which == "forward" else _kernel_backward)(self.factory())
        return self.fn(*args)


def _triton_supports(x, weight, bias, lora_A, lora_B, dropout_p, *, forced: bool) -> str | None:
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return _kernel_supports(x, weight, bias, lora_A, lora_B, dropout_p, forced=forced)


def _cuda_supports(x, weight, bias, lora_A, lora_B, dropout_p, *, forced: bool) -> str | None:
    from .. import _cext

    if not _cext.available():
        return _cext.why_unavailable()
    if not hasattr(_cext._C, "grouped_lora_shrink"):
        return "fastpeft._C was built without the grouped LoRA kernels; rebuild it"
    if not x.is_cuda:
        return "tensors are not on a CUDA device"
    return _kernel_supports(x, weight, bias, lora_A, lora_B, dropout_p, forced=False) or _cext.why_not_device(x.device)


backend.register(OP, "triton", priority=10, supports=_triton_supports, forward=_Lazy(_triton_kern, "forward"),
                 backward=_Lazy(_triton_kern, "backward"))
backend.register(OP, "cuda", priority=5, supports=_cuda_supports, forward=_Lazy(_cuda_kern, "forward"),
                 backward=_Lazy(_cuda_kern, "backward"))


# ----------------------------------------------------------------------------- autograd
class GroupedLoraFn(torch.autograd.Function):
    """x (..., K) -> y (..., N) in one node; params = (A_0, B_0, A_1, B_1, ...) in plan order."""

    @staticmethod
    def forward(ctx, x, weight, bias, cfg, *params):
        plan, scaling, dropout_p, seed, impl, table = cfg
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        lora_A, lora_B = params[0::2], params[1::2]
        y, saved = impl.fns["forward"](x2, weight, bias, plan, lora_A, lora_B, scaling, dropout_p, seed, table)
        needs = ctx.needs_input_grad
        need_a = any(needs[4::2])
        ctx.save_for_backward(x2 if (need_a or needs[1] or impl.backend != "torch") else None, weight, *params)
        ctx.saved_s = saved
        ctx.cfg = (plan, scaling, dropout_p, seed, impl, shape, bias is not None)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, weight, *params = ctx.saved_tensors
        plan, scaling, dropout_p, seed, impl, shape, has_bias = ctx.cfg
        needs = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        lora_A, lora_B = params[0::2], params[1::2]
        dx, d_as, d_bs = impl.fns["backward"](dy2, x, weight, plan, lora_A, lora_B, ctx.saved_s, scaling, dropout_p,
                                              seed, (needs[0], any(needs[4::2]), any(needs[5::2])))
        d_w = (dy2.t() @ x).to(weight.dtype) if needs[1] else None
        d_bias = dy2.sum(0) if has_bias and needs[2] else None
        grads = []
        for g in range(len(lora_A)):
            grads.append(d_as[g] if needs[4 + 2 * g] else None)
            grads.append(d_bs[g] if needs[5 + 2 * g] else None)
        return (dx.view(shape) if dx is not None else None, d_w, d_bias, None, *grads)


# ----------------------------------------------------------------------------- public API
def _validate(x, weight, bias, plan, lora_A, lora_B, scaling, dropout_p) -> None:
    n, k = check_projection(x, weight, bias, **{f"lora_A[{g}]": a for g, a in enumerate(lora_A)},
                            **{f"lora_B[{g}]": b for g, b in enumerate(lora_B)})
    g = len(plan.names)
    for what, seq in (("lora_A", lora_A), ("lora_B", lora_B), ("scaling", scaling), ("dropout_p", dropout_p)):
        if len(seq) != g:
            raise ValueError(f"{what} has {len(seq)} entries but the plan has {g} adapter segments {list(plan.names)}")
    for i, (a, b) in enumerate(zip(lora_A, lora_B)):
        if a.dim() != 2 or a.shape[1] != k or a.shape[0] < 1:
            raise ValueError(f"lora_A[{i}] ({plan.names[i]!r}) has shape {tuple(a.shape)}; expected (r, {k})")
        if tuple(b.shape) != (n, a.shape[0]):
            raise ValueError(f"lora_B[{i}] ({plan.names[i]!r}) has shape {tuple(b.shape)}; "
                             f"expected ({n}, {a.shape[0]})")
        if a.dtype != lora_A[0].dtype or b.dtype != lora_A[0].dtype:
            raise ValueError(f"adapter {plan.names[i]!r} is {a.dtype}/{b.dtype} but {plan.names[0]!r} is "
                             f"{lora_A[0].dtype}: a mixed batch needs one adapter dtype")
    for i, p in enumerate(dropout_p):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout_p[{i}] must be in [0, 1), got {p}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but the frozen weight is {weight.dtype}")
    tokens = x.numel() // max(k, 1)
    if tokens != plan.tokens:
        raise ValueError(f"x holds {tokens} tokens but the plan was made for {plan.tokens}")


_CHECKED: dict[tuple, backend.Impl] = {}


def grouped_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: GroupPlan,
                        lora_A: Sequence[torch.Tensor], lora_B: Sequence[torch.Tensor], scaling: Sequence[float],
                        dropout_p: Sequence[float] | float = 0.0, training: bool = False, seed: int | None = None,
                        table_cache: dict | None = None) -> torch.Tensor:
    """Mixed-adapter LoRA projection: token t through adapter plan.names[g] of its segment (see the module doc).

    x: (..., K) holding plan.tokens tokens (row-major: batch row b is tokens b·T .. b·T+T-1); weight (N, K);
    lora_A[g] (r_g, K), lora_B[g] (N, r_g), scaling[g], dropout_p[g] for the g-th segment of `plan`.
    table_cache: a dict the caller keeps (one per layer) where the kernels' stacked table is reused while
    the adapters' tensors are unchanged."""
    g = len(plan.names)
    if isinstance(dropout_p, (int, float)):
        dropout_p = (float(dropout_p),) * g
    ps = tuple(dropout_p) if training else (0.0,) * g
    lora_A, lora_B = tuple(lora_A), tuple(lora_B)
    scaling = tuple(scaling)
    if torch.is_autocast_enabled(x.device.type):  # inputs cast as nn.Linear casts them under autocast
        x, weight, bias, *ab = cast_for_autocast(x.device.type, x, weight, bias, *lora_A, *lora_B)
        lora_A, lora_B = tuple(ab[:g]), tuple(ab[g:])
    if g == 0:  # every row is "__base__"
        return F.linear(x, weight, bias)
    # checks and the backend choice, once per signature (what they read cannot change between calls)
    key = (backend.get_backend(), plan, x.shape[-1], x.numel(), x.dtype, x.device, weight.shape, weight.dtype,
           None if bias is None else (bias.shape, bias.dtype), tuple(a.shape for a in lora_A),
           tuple(b.shape for b in lora_B), tuple(a.dtype for a in lora_A), tuple(b.dtype for b in lora_B),
           tuple(a.device for a in lora_A), tuple(b.device for b in lora_B), len(scaling),
           tuple(dropout_p), ps)
    impl = _CHECKED.get(key)
    if impl is None:
        _validate(x, weight, bias, plan, lora_A, lora_B, scaling, dropout_p)
        impl = backend.select(OP, x, weight, bias, lora_A, lora_B, ps)
        if len(_CHECKED) > 1024:
            _CHECKED.clear()
        _CHECKED[key] = impl
    else:
        backend._LAST[OP] = impl.backend
    seed = (new_seed() if seed is None else int(seed)) if any(p > 0 for p in ps) else 0
    table = None
    if impl.backend != "torch" and table_cache is not None:
        tkey = tuple((t.data_ptr(), t._version) for t in (*lora_A, *lora_B))
        hit = table_cache.get("table")
        if hit is not None and hit[0] == tkey:
            table = hit[1]
        else:
            table = stack_table(lora_A, lora_B)
            table_cache["table"] = (tkey, table)
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad or
                                           any(t.requires_grad for t in lora_A) or any(t.requires_grad for t in lora_B)
                                           or (bias is not None and bias.requires_grad)):
        # inference (prefill, decode): no autograd node, nothing saved
        x2 = x.reshape(-1, x.shape[-1])
        y, _ = impl.fns["forward"](x2, weight, bias, plan, lora_A, lora_B, scaling, ps, seed, table)
        return y.view(*x.shape[:-1], y.shape[-1])
    params = [t for pair in zip(lora_A, lora_B) for t in pair]
    return GroupedLoraFn.apply(x, weight, bias, (plan, scaling, ps, seed, impl, table), *params)


def reference_grouped_lora(x, weight, bias, adapter_names, adapters) -> torch.Tensor:
    """The plainest definition, for tests: row b of x (B, ..., K) through adapters[adapter_names[b]] =
    (lora_A, lora_B, scaling), "__base__" through the base layer alone; no dropout."""
    rows = []
    for b, name in enumerate(adapter_names):
        y = F.linear(x[b], weight, bias)
        if name != BASE:
            a, bb, s = adapters[name]
            y = (y + (x[b].to(a.dtype) @ a.t() @ bb.t()) * s).to(y.dtype)
        rows.append(y)
    return torch.stack(rows)


__all__ = ["GroupPlan", "plan_groups", "stack_table", "grouped_lora_linear", "reference_forward",
           "reference_grouped_lora", "DECODE_MAX_TOKENS"]
