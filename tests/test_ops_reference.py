"""The reference ops against float64 math written independently here, forward and gradients."""

import copy
import math

import pytest
import torch

import fastpeft
from fastpeft.ops import ia3_linear, lora_linear, prefix_attention, soft_prompt_embed
from fastpeft.ops import lora as lora_op
from fastpeft.ops._random import dropout_keep, hash_keep_reference, keep_threshold, new_seed
from tests.utils import assert_close


def _grads(out, inputs, seed_grad):
    return torch.autograd.grad(out, inputs, seed_grad)


def _torch_keep(seed, shape, p):
    """The production torch path's mask for an explicit seed: the hash of (seed, element index)."""
    if p == 0.0:
        return torch.ones(shape, dtype=torch.bool)
    return hash_keep_reference(seed, *shape, p).bool()


@pytest.mark.parametrize("M,K,N,r", [(1, 3, 5, 1), (7, 33, 17, 4), (16, 64, 48, 16)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("backend_name", ["torch", "torch_philox"])
def test_lora_linear_matches_float64(M, K, N, r, bias, dropout, backend_name):
    x = torch.randn(2, M, K, requires_grad=True)
    w = torch.randn(N, K) / math.sqrt(K)
    b = torch.randn(N) if bias else None
    a = torch.randn(r, K, requires_grad=True)
    bb = torch.randn(N, r, requires_grad=True)
    scaling, seed = 1.7, 1234
    with fastpeft.use_backend(backend_name):
        y = lora_linear(x, w, b, a, bb, scaling, dropout, training=True, seed=seed)
        g = torch.randn_like(y)
        gx, ga, gb = _grads(y, (x, a, bb), g)
    draw = dropout_keep if backend_name == "torch_philox" else _torch_keep
    keep = draw(seed, (2 * M, K), dropout).reshape(2, M, K).double() / (1 - dropout)
    xd = x.double()
    y64 = xd @ w.double().t() + (0 if b is None else b.double()) + scaling * ((xd * keep) @ a.double().t()) @ bb.double().t()
    assert_close(y, y64, torch.float32)
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, bb))
    y64 = x64 @ w.double().t() + scaling * ((x64 * keep) @ a64.t()) @ b64.t()
    rx, ra, rb = _grads(y64, (x64, a64, b64), g.double())
    for name, got, want in (("dx", gx, rx), ("dA", ga, ra), ("dB", gb, rb)):
        assert_close(got, want, torch.float32, what=name)


class _FixedMask(torch.nn.Module):
    """PEFT's lora_dropout replaced by a given multiplier: PEFT's math under a known mask."""

    def __init__(self, mult):
        super().__init__()
        self.mult = mult

    def forward(self, x):
        return x * self.mult


def test_lora_torch_dropout_matches_peft_given_the_same_mask():
    """With no seed the torch path draws a seed from the default generator and its mask is that seed's
    hash; given that mask, output and gradients equal PEFT's layer (and torch.manual_seed reproduces
    the draw)."""
    import peft

    base = torch.nn.Sequential(torch.nn.Linear(24, 20))
    ours = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=4, lora_dropout=0.3, target_modules=["0"]))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_dropout=0.3, target_modules=["0"]))
    a = torch.randn(4, 24)
    with torch.no_grad():
        for m in (ours, theirs):
            m.base_model.model[0].lora_A["default"].weight.copy_(a)
            m.base_model.model[0].lora_B["default"].weight.copy_(torch.linspace(-1, 1, 80).reshape(20, 4))
    ours.train()
    theirs.train()
    x = torch.randn(2, 7, 24)
    torch.manual_seed(99)
    keep = hash_keep_reference(new_seed(), 14, 24, 0.3).float()
    assert 0.5 < keep.mean().item() < 0.9 and set(keep.unique().tolist()) == {0.0, 1.0}
    theirs.base_model.model[0].lora_dropout["default"] = _FixedMask(keep.reshape(2, 7, 24) / 0.7)
    got = []
    for model in (ours, theirs):
        torch.manual_seed(99)
        xi = x.clone().requires_grad_()
        y = model(xi)
        y.square().sum().backward()
        layer = model.base_model.model[0]
        got.append((y, xi.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad))
    for name, a, b in zip(("y", "dx", "dA", "dB"), *got):
        assert_close(a, b, torch.float32, what=name)
    torch.manual_seed(99)
    first = ours(x)
    assert not torch.equal(first, ours(x))  # a fresh mask each call
    torch.manual_seed(99)
    assert torch.equal(first, ours(x))  # governed by torch.manual_seed


def test_hash_keep_mask_rate_independence_and_c_extension():
    """The torch path's dropout mask (a hash of seed and element index): the rate 1 - p, neighbours,
    rows, and masks of different seeds independent; fastpeft._C's C++ loop gives the aten bits."""
    from fastpeft import _cext

    for p in (0.05, 0.5, 0.9):
        keep = hash_keep_reference(1234, 257, 129, p).float()
        assert keep.shape == (257, 129) and set(keep.unique().tolist()) <= {0.0, 1.0}
        assert abs(keep.mean().item() - (1 - p)) < 0.01, p
    a, b = hash_keep_reference(7, 128, 128, 0.5).float(), hash_keep_reference(8, 128, 128, 0.5).float()
    assert abs((a * b).mean().item() - 0.25) < 0.02  # seeds 7 and 8: independent masks
    assert abs((a[:, 1:] * a[:, :-1]).mean().item() - 0.25) < 0.02  # neighbours independent
    assert abs((a[1:] * a[:-1]).mean().item() - 0.25) < 0.02  # rows independent
    shifted = hash_keep_reference(7 ^ 1, 128, 128, 0.5).float().reshape(-1)
    assert abs((a.reshape(-1) * shifted.roll(1)).mean().item() - 0.25) < 0.02  # no xor-shift copy of another seed
    for seed, m, k, p in ((0, 1, 1, 0.3), (2**31 - 2, 7, 33, 0.05), (99, 64, 177, 0.5)):
        for dtype in (torch.uint8, torch.float32, torch.bfloat16, torch.float16, torch.float64):
            fast = _cext.dropout_keep(seed, m, k, keep_threshold(p), dtype)
            if fast is None:
                pytest.skip(f"fastpeft._C is not built: {_cext.why_unavailable()}")
            assert fast.dtype == dtype and torch.equal(fast, hash_keep_reference(seed, m, k, p).to(dtype)), \
                (seed, m, k, p, dtype)
    with pytest.raises(ValueError, match="31 bits"):
        lora_op.dropout_keep_mask(1, 2**16, 2**15, 0.1, torch.device("cpu"))


def test_c_extension_dropout_mul_and_addcmul_equal_the_aten_composition():
    """fastpeft._C's one-pass dropout loops (what the CPU LoRA layer runs): x ∘ keep and dst += v·src ∘ keep,
    bit for bit the mask times x and aten's addcmul_, fp32 and bf16, odd sizes, infinities and NaN kept."""
    from fastpeft import _cext

    if _cext.dropout_mul(torch.zeros(1), 1, keep_threshold(0.5)) is None:
        pytest.skip(f"fastpeft._C is not built or predates the loops: {_cext.why_unavailable()}")
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        for seed, m, k, p in ((0, 1, 1, 0.3), (2**31 - 2, 7, 33, 0.05), (99, 64, 177, 0.5)):
            x = (torch.randn(m, k, generator=g) * 3).to(dtype)
            x.view(-1)[0] = float("inf")
            if x.numel() > 2:
                x.view(-1)[1] = float("nan")
            keep = hash_keep_reference(seed, m, k, p).to(dtype)
            got = _cext.dropout_mul(x, seed, keep_threshold(p))
            assert got.dtype == dtype  # the same values bit for bit, NaN where aten has NaN (its payload aside)
            torch.testing.assert_close(got, keep * x, rtol=0, atol=0, equal_nan=True)
            assert torch.equal(torch.signbit(got[~got.isnan()]), torch.signbit((keep * x)[~got.isnan()]))
            dst = torch.randn(m, k, generator=g).to(dtype)
            src = torch.randn(m, k, generator=g).to(dtype)
            want = dst.clone().addcmul_(src, keep, value=1.0 / (1.0 - p))
            assert _cext.dropout_addcmul_(dst, src, seed, keep_threshold(p), 1.0 / (1.0 - p))
            torch.testing.assert_close(dst, want, rtol=0, atol=0)
    # what the loops do not take comes back None / False, for the caller's aten path
    assert _cext.dropout_mul(torch.zeros(4, dtype=torch.float16), 1, 5) is None
    assert _cext.dropout_mul(torch.zeros(4, 6).t(), 1, 5) is None
    assert not _cext.dropout_addcmul_(torch.zeros(4), torch.zeros(4, dtype=torch.float64), 1, 5, 1.0)


def test_torch_keep_mask_rate_and_independence():
    gen = torch.Generator().manual_seed(5)
    for p in (0.05, 0.5, 0.9):
        keep = lora_op.keep_mask(257, 129, p, gen, torch.device("cpu"), torch.float32)  # odd numel: a partial draw
        assert keep.shape == (257, 129)
        assert abs(keep.mean().item() - (1 - p)) < 0.01, p
    for p in (0.05, 0.5):  # small masks (one bernoulli_ draw): same rate, fresh draws
        small = torch.stack([lora_op.keep_mask(7, 33, p, gen, torch.device("cpu"), torch.float32) for _ in range(60)])
        assert 7 * 33 <= lora_op._SMALL_MASK and set(small.unique().tolist()) <= {0.0, 1.0}
        assert abs(small.mean().item() - (1 - p)) < 0.015, p
        assert not torch.equal(small[0], small[1])
    a = lora_op.keep_mask(64, 64, 0.5, gen, torch.device("cpu"), torch.float32)
    b = lora_op.keep_mask(64, 64, 0.5, gen, torch.device("cpu"), torch.float32)
    assert abs((a * b).mean().item() - 0.25) < 0.03  # successive draws independent
    assert abs((a[:, 1:] * a[:, :-1]).mean().item() - 0.25) < 0.03  # neighbours independent


def test_lora_dropout_only_in_training_and_mask_rate():
    x = torch.randn(64, 128)
    w, a, b = torch.randn(8, 128), torch.randn(4, 128), torch.randn(8, 4)
    assert torch.equal(lora_linear(x, w, None, a, b, 1.0, 0.5, training=False),
                       lora_linear(x, w, None, a, b, 1.0, 0.0, training=True))
    keep = dropout_keep(7, (64, 128), 0.25)
    assert abs(keep.float().mean().item() - 0.75) < 0.02
    assert not torch.equal(dropout_keep(7, (64, 128), 0.25), dropout_keep(8, (64, 128), 0.25))


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_ia3_linear_matches_float64(feedforward, bias):
    M, K, N = 11, 19, 13
    x = torch.randn(M, K, requires_grad=True)
    w = torch.randn(N, K)
    b = torch.randn(N) if bias else None
    l = (1 + 0.3 * torch.randn((1, K) if feedforward else (N, 1))).requires_grad_()
    y = ia3_linear(x, w, b, l, feedforward)
    x64, l64 = x.detach().double().requires_grad_(), l.detach().double().requires_grad_()
    bd = 0 if b is None else b.double()
    if feedforward:
        y64 = (x64 * l64.reshape(-1)) @ w.double().t() + bd
    else:
        y64 = (x64 @ w.double().t() + bd) * l64.reshape(-1)
    assert_close(y, y64, torch.float32)
    g = torch.randn_like(y)
    gx, gl = _grads(y, (x, l), g)
    rx, rl = _grads(y64, (x64, l64), g.double())
    assert gl.shape == l.shape
    assert_close(gx, rx, torch.float32, what="dx")
    assert_close(gl, rl, torch.float32, what="dl")


def _attention64(q, k, v, pk, pv, mask, causal, scale):
    B, Hq, T, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], pk.shape[-2]
    out = torch.zeros(B, Hq, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kv = h // (Hq // Hkv)
            pkb = pk[b, kv] if pk.dim() == 4 else pk[kv]
            pvb = pv[b, kv] if pv.dim() == 4 else pv[kv]
            keys = torch.cat([pkb, k[b, kv]]).double()
            vals = torch.cat([pvb, v[b, kv]]).double()
            for t in range(T):
                vis = [True] * P + [(not causal or j <= t + S - T) and (mask is None or bool(mask[b, j])) for j in range(S)]
                vis = torch.tensor(vis)
                s = (keys @ q[b, h, t].double()) * scale
                s = s.masked_fill(~vis, float("-inf"))
                out[b, h, t] = torch.softmax(s, 0) @ vals
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T,S,P", [(5, 5, 3), (1, 6, 2), (4, 9, 1)])
def test_prefix_attention_matches_float64(causal, T, S, P):
    B, Hq, Hkv, D = 2, 4, 2, 8
    q = torch.randn(B, Hq, T, D, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, requires_grad=True)
    pk = torch.randn(Hkv, P, D, requires_grad=True)
    pv = torch.randn(Hkv, P, D, requires_grad=True)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :2] = 0  # left padding on row 1
    out = prefix_attention(q, k, v, pk, pv, causal=causal, attention_mask=mask)
    ins64 = [t.detach().double().requires_grad_() for t in (q, k, v, pk, pv)]
    ref = _attention64(*ins64, mask, causal, 1 / math.sqrt(D))
    assert_close(out, ref, torch.float32)
    g = torch.randn_like(out)
    got = _grads(out, (q, k, v, pk, pv), g)
    want = _grads(ref, ins64, g.double())
    for name, a, b in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), got, want):
        assert_close(a, b, torch.float32, what=name)


def test_prefix_attention_prefix_index_equals_per_row_prefix():
    B, Hq, Hkv, T, D, P, N = 3, 2, 1, 4, 8, 3, 2
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    table_k = torch.randn(N, Hkv, P, D, requires_grad=True)
    table_v = torch.randn(N, Hkv, P, D, requires_grad=True)
    idx = torch.tensor([1, 0, 1])
    out = prefix_attention(q, k, v, table_k, table_v, prefix_index=idx)
    for b in range(B):
        alone = prefix_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], table_k[idx[b]], table_v[idx[b]])
        assert_close(out[b:b + 1], alone, torch.float32)
    out.sum().backward()
    ref64 = _attention64(q.double(), k.double(), v.double(), table_k.detach()[idx].double(),
                         table_v.detach()[idx].double(), None, True, 1 / math.sqrt(D))
    assert_close(out, ref64, torch.float32)
    assert table_k.grad.shape == table_k.shape


@pytest.mark.parametrize("indexed", [False, True])
def test_soft_prompt_embed_matches_float64(indexed):
    B, T, V, H, P, N = 3, 5, 11, 6, 4, 2
    ids = torch.randint(0, V, (B, T))
    w = torch.randn(V, H, requires_grad=True)
    table = torch.randn((N, P, H) if indexed else (P, H), requires_grad=True)
    idx = torch.tensor([1, 0, 1]) if indexed else None
    out = soft_prompt_embed(ids, w, table, idx)
    prompts = table.detach()[idx] if indexed else table.detach().expand(B, P, H)
    ref = torch.cat([prompts.double(), w.detach().double()[ids]], 1)
    assert_close(out, ref, torch.float32)
    g = torch.randn_like(out)
    gw, gt = _grads(out, (w, table), g)
    w64, t64 = w.detach().double().requires_grad_(), table.detach().double().requires_grad_()
    p64 = t64[idx] if indexed else t64.expand(B, P, H)
    ref = torch.cat([p64, w64[ids]], 1)
    rw, rt = _grads(ref, (w64, t64), g.double())
    assert_close(gw, rw, torch.float32, what="d_embedding")
    assert_close(gt, rt, torch.float32, what="d_prompt_table")


def test_ops_trace_under_torch_compile_fullgraph():
    lin = torch.nn.Linear(16, 8)
    a = torch.nn.Parameter(torch.randn(4, 16))
    b = torch.nn.Parameter(torch.randn(8, 4))

    def f(x):
        return lora_linear(x, lin.weight, lin.bias, a, b, 2.0).sum()

    x = torch.randn(5, 16, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.backward()
    assert_close(out.detach().reshape(1), f(x.detach()).reshape(1), torch.float32)
    assert a.grad is not None and b.grad is not None


@pytest.mark.parametrize("needs", ["all", "x_and_B", "A_only"])
def test_lora_torch_path_gradcheck_with_dropout(needs):
    """The production backward (mask re-drawn from the seed, only the wanted gradients) is the
    exact derivative of its forward, whichever inputs want gradients."""
    d = torch.float64
    x = torch.randn(2, 3, 8, dtype=d, requires_grad=needs != "A_only")
    w = torch.randn(5, 8, dtype=d)
    a = torch.randn(3, 8, dtype=d, requires_grad=needs != "x_and_B")
    b = torch.randn(5, 3, dtype=d, requires_grad=needs != "A_only")
    inputs = tuple(t for t in (x, a, b) if t.requires_grad)

    def f(*ts):
        it = iter(ts)
        xi, ai, bi = (next(it) if t.requires_grad else t for t in (x, a, b))
        return lora_linear(xi, w, None, ai, bi, 1.5, 0.4, training=True, seed=7)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_gradcheck_with_trained_weight(feedforward):
    d = torch.float64
    x = torch.randn(6, 8, dtype=d, requires_grad=True)
    w = torch.randn(5, 8, dtype=d, requires_grad=True)
    b = torch.randn(5, dtype=d, requires_grad=True)
    l = (torch.rand((1, 8) if feedforward else (5, 1), dtype=d) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: ia3_linear(*t, feedforward), (x, w, b, l))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain", "gqa-mask", "index-decode"])
def test_prefix_attention_cpu_fused_path_equals_reference(dtype, case):
    """The CPU production path (torch's fused CPU flash attention over [prefix; keys]) against the
    reference that defines the op: forward, lse and every gradient, odd shapes."""
    import importlib

    pa = importlib.import_module("fastpeft.ops.prefix_attention")

    B, Hq, Hkv, T, S, D, P = 3, 4, (2 if case == "gqa-mask" else 4), 5, 5, 12, 3
    if case == "index-decode":
        T, S = 1, 7
    q = torch.randn(B, Hq, T, D, dtype=dtype)
    k, v = torch.randn(B, Hkv, S, D, dtype=dtype), torch.randn(B, Hkv, S, D, dtype=dtype)
    index = torch.tensor([1, 0, 1]) if case == "index-decode" else None
    shape = (2, Hkv, P, D) if index is not None else (Hkv, P, D)
    pk, pv = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    mask = None
    if case == "gqa-mask":
        mask = torch.ones(B, S, dtype=torch.bool)
        mask[1, :2] = False
    scale = D ** -0.5
    assert pa._fast(q, pk)
    out, lse = pa.torch_forward(q, k, v, pk, pv, mask, index, True, scale)
    want_out, want_lse = pa.reference_forward(q, k, v, pk, pv, mask, index, True, scale)
    assert lse.dtype == torch.float32 and out.dtype == dtype
    assert_close(out, want_out, dtype, what="out")
    assert_close(lse, want_lse, dtype, what="lse")
    dout = torch.randn_like(out)
    got = pa.torch_backward(dout, q, k, v, pk, pv, mask, index, out, lse, True, scale)
    want = pa.reference_backward(dout, q, k, v, pk, pv, mask, index, want_out, want_lse, True, scale)
    for name, g, w in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert_close(g, w, dtype, scale=4, what=name)
