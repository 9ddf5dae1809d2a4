"""Mixed-adapter batches (issue 15): the grouping plan, the grouped LoRA op through the torch path, the
Triton kernels (interpreter) and fastpeft._C (CPU-emulated kernels, argument checks), forward and
gradients equal to running each adapter alone; multi-adapter training equal to separate training;
mixed decode through generate(adapter_names=...)."""

import copy
import os

import pytest
import torch

import fastpeft
from fastpeft import _cext, backend
from fastpeft.nn import LoraLinear
from fastpeft.ops import grouped_lora as gl
from fastpeft.ops.grouped_lora import grouped_lora_linear, plan_groups, reference_forward, reference_grouped_lora
from tests.models import tiny_llama
from tests.utils import assert_close, build_emulated_cext, triton_device
from tests.utils import cext_on_cpu as _cext_on_cpu

FP32 = 0.5  # fp32 comparisons at 1e-5 relative (TOL[fp32] = 2e-5)


def make_adapters(k, n, spec, dtype=torch.float32, device="cpu", seed=0):
    """{name: (A, B, scaling)} with A (r, k), B (n, r) random (B nonzero, so the low-rank term is seen)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, r, s in spec:
        a = (torch.randn(r, k, generator=g) / k ** 0.5).to(device=device, dtype=dtype).requires_grad_()
        b = torch.randn(n, r, generator=g).to(device=device, dtype=dtype).requires_grad_()
        out[name] = (a, b, s)
    return out


SPEC = [("a", 4, 0.5), ("b", 2, 2.0), ("c", 7, 1.25)]
NAME_CASES = {
    "scattered+base": ["a", "b", "__base__", "a", "c", "b"],
    "contiguous": ["b", "b", "a", "c", "c", "c"],
    "one adapter": ["c"] * 6,
    "all base": ["__base__"] * 6,
}


def run_grouped(x, w, bias, names, ads, tokens, **kw):
    plan = plan_groups(names, tokens, x.device)
    return grouped_lora_linear(x, w, bias, plan, [ads[n][0] for n in plan.names], [ads[n][1] for n in plan.names],
                               [ads[n][2] for n in plan.names], **kw)


def check_against_reference(x, w, bias, names, ads, tokens, dtype=torch.float32, scale=FP32):
    y = run_grouped(x, w, bias, names, ads, tokens)
    want = reference_grouped_lora(x, w, bias, names, ads)
    assert_close(y, want, dtype, scale=scale, what="output")
    gy = torch.randn_like(want)
    params = [x] + [t for n in ads for t in ads[n][:2]]
    got = torch.autograd.grad(y, params, gy, allow_unused=True)
    ref = torch.autograd.grad(want, params, gy, allow_unused=True)
    for i, (g1, g2) in enumerate(zip(got, ref)):
        if g2 is None:  # an adapter with no rows in the batch: no gradient at all
            assert g1 is None or not g1.any(), f"param {i} got a gradient without rows"
            continue
        assert g1 is not None, f"param {i} got no gradient"
        assert_close(g1, g2, dtype, scale=scale, what=f"grad {i}")
    return y


# ---------------------------------------------------------------------------------------------- plan
def test_plan_sorts_tokens_by_adapter_and_skips_base_rows():
    names = ["a", "b", "__base__", "a", "c"]
    plan = plan_groups(names, 3)
    assert plan.names == ("a", "b", "c") and plan.tokens == 15
    assert plan.starts == (0, 6, 9, 12) and plan.max_len == 6
    assert plan.order.tolist() == [0, 1, 2, 9, 10, 11, 3, 4, 5, 12, 13, 14]  # row 2 (base) absent
    assert plan.spans is None  # "a" holds rows 0 and 3: not one range
    assert plan.slot.tolist() == [0] * 3 + [1] * 3 + [-1] * 3 + [0] * 3 + [2] * 3
    assert plan.offsets.tolist() == list(plan.starts)
    contiguous = plan_groups(["b", "b", "__base__", "a"], 2)
    assert contiguous.spans == ((0, 4), (6, 8)) and contiguous.names == ("b", "a")
    assert plan_groups(names, 3) is plan  # one plan per batch, shared by every layer
    assert plan_groups(["__base__"] * 2, 4).num_lora_tokens == 0


def test_new_adapter_set_replans_without_recompiling():
    """Plans are data: the kernels' constexprs never name adapters (a new name needs no new kernel)."""
    p1, p2 = plan_groups(["a", "b"], 2), plan_groups(["zz", "a"], 2)
    assert p1 is not p2 and p2.names == ("zz", "a")
    assert p1.order.dtype == p2.order.dtype == torch.int64 and p1.slot.dtype == torch.int32


# ---------------------------------------------------------------------------------------------- torch path
@pytest.mark.parametrize("case", list(NAME_CASES))
@pytest.mark.parametrize("bias", [True, False])
def test_torch_path_equals_reference(case, bias):
    torch.manual_seed(1)
    K, N, T = 24, 19, 5
    x = torch.randn(6, T, K, requires_grad=True)
    w = torch.randn(N, K) / K ** 0.5
    b = torch.randn(N) if bias else None
    ads = make_adapters(K, N, SPEC)
    with backend.use_backend("torch"):
        check_against_reference(x, w, b, NAME_CASES[case], ads, T)
    assert backend.last_backend("grouped_lora") in ("torch", None) or case == "all base"


def test_torch_path_conv1d_layout_2d_input_and_bf16():
    torch.manual_seed(2)
    K, N = 16, 12
    ads = make_adapters(K, N, SPEC)
    names = ["c", "a", "__base__", "a"]
    w_t = torch.randn(K, N) / K ** 0.5  # GPT-2 Conv1D stores (in, out): the op gets the transposed view
    x = torch.randn(4, K, requires_grad=True)  # (B, K): one token per row
    check_against_reference(x, w_t.t(), None, names, ads, 1)
    xb = torch.randn(4, 3, K, dtype=torch.bfloat16, requires_grad=True)
    check_against_reference(xb, torch.randn(N, K, dtype=torch.bfloat16), None, names, ads, 3, dtype=torch.bfloat16,
                            scale=1.0)


def test_autocast_runs_as_nn_linear_does():
    torch.manual_seed(9)
    K, N = 16, 12
    ads = make_adapters(K, N, SPEC)
    names = ["a", "__base__", "c"]
    x, w = torch.randn(3, 2, K), torch.randn(N, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run_grouped(x, w, None, names, ads, 2)
        want = reference_grouped_lora(x.bfloat16(), w.bfloat16(), None, names,
                                      {n: (a.bfloat16(), b.bfloat16(), s) for n, (a, b, s) in ads.items()})
    assert y.dtype == torch.bfloat16
    assert_close(y, want, torch.bfloat16)


def test_reference_forward_is_the_row_definition():
    torch.manual_seed(3)
    K, N, T = 10, 9, 2
    x, w, b = torch.randn(5, T, K), torch.randn(N, K), torch.randn(N)
    ads = make_adapters(K, N, SPEC)
    names = ["b", "a", "__base__", "c", "a"]
    plan = plan_groups(names, T)
    got = reference_forward(x.reshape(-1, K), w, b, plan, [ads[n][0] for n in plan.names],
                            [ads[n][1] for n in plan.names], [ads[n][2] for n in plan.names], (0.0,) * 3)
    assert_close(got.view(5, T, N), reference_grouped_lora(x, w, b, names, ads), torch.float32, scale=FP32)


def test_dropout_masks_are_redrawn_in_backward():
    """Training with lora_dropout: output and gradients equal autograd through the reference, which
    draws the same per-segment masks from the same seed; the masks really drop ~p of the inputs."""
    torch.manual_seed(4)
    K, N, T = 64, 20, 8
    ads = make_adapters(K, N, SPEC)
    names = ["a", "c", "b", "a", "__base__", "c"]
    ps = {"a": 0.25, "b": 0.0, "c": 0.5}
    plan = plan_groups(names, T)
    x = torch.randn(6, T, K, requires_grad=True)
    w, b = torch.randn(N, K) / 8, torch.randn(N)
    lists = ([ads[n][0] for n in plan.names], [ads[n][1] for n in plan.names], [ads[n][2] for n in plan.names],
             [ps[n] for n in plan.names])
    y = grouped_lora_linear(x, w, b, plan, *lists, training=True, seed=1234)
    want = reference_forward(x.reshape(-1, K), w, b, plan, *lists, seed=1234).view(6, T, N)
    assert_close(y, want, torch.float32, scale=FP32, what="dropout forward")
    no_drop = grouped_lora_linear(x, w, b, plan, *lists, training=False)
    assert (y - no_drop).abs().max() > 1e-3, "dropout changed nothing"
    assert torch.equal(y, grouped_lora_linear(x, w, b, plan, *lists, training=True, seed=1234))
    assert not torch.equal(y, grouped_lora_linear(x, w, b, plan, *lists, training=True, seed=99))
    gy = torch.randn_like(y)
    params = [x] + [t for n in plan.names for t in ads[n][:2]]
    for g1, g2 in zip(torch.autograd.grad(y, params, gy), torch.autograd.grad(want, params, gy)):
        assert_close(g1, g2, torch.float32, scale=FP32, what="dropout grad")
    keep = gl._keep(torch.Generator().manual_seed(0), 200, 100, 0.25, "cpu", torch.float32)
    assert abs(keep.mean().item() - 0.75) < 0.02


def test_bad_arguments_are_named():
    K, N = 8, 6
    ads = make_adapters(K, N, SPEC)
    plan = plan_groups(["a", "b"], 2)
    x, w = torch.randn(2, 2, K), torch.randn(N, K)
    A, B, S = [ads["a"][0], ads["b"][0]], [ads["a"][1], ads["b"][1]], [0.5, 2.0]
    with pytest.raises(ValueError, match=r"lora_A has 1 entries but the plan has 2 adapter segments"):
        grouped_lora_linear(x, w, None, plan, A[:1], B[:1], S[:1])
    with pytest.raises(ValueError, match=r"lora_B\[1\] \('b'\) has shape \(6, 4\); expected \(6, 2\)"):
        grouped_lora_linear(x, w, None, plan, A, [B[0], B[0]], S)
    with pytest.raises(ValueError, match="x holds 6 tokens but the plan was made for 4"):
        grouped_lora_linear(torch.randn(3, 2, K), w, None, plan, A, B, S)
    with pytest.raises(ValueError, match="one adapter dtype"):
        grouped_lora_linear(x, w, None, plan, [A[0], A[1].double()], [B[0], B[1].double()], S)


# ---------------------------------------------------------------------------------------------- Triton
@pytest.mark.parametrize("tokens", [3, 23], ids=["decode_bgmv", "prefill_sgmv"])
@pytest.mark.parametrize("case", ["scattered+base", "contiguous", "all base"])
def test_triton_kernels_equal_reference(tokens, case):
    device = triton_device()
    torch.manual_seed(5)
    K, N = 40, 33  # ragged against the 32-wide blocks
    x = torch.randn(6, tokens, K, device=device, requires_grad=True)
    w, b = torch.randn(N, K, device=device) / 6, torch.randn(N, device=device)
    ads = make_adapters(K, N, SPEC + [("d", 17, 0.75)], device=device)  # rank 17: padded to 32
    names = [n if n != "c" else "d" for n in NAME_CASES[case]]
    with backend.use_backend("triton"):
        check_against_reference(x, w, b, names, ads, tokens)
        if case != "all base":
            assert backend.last_backend("grouped_lora") == "triton"


def test_triton_wrappers_directly():
    """The kernels one by one against torch on odd shapes, fp32 and bf16 activations."""
    device = triton_device()
    from fastpeft.kernels import grouped_lora as k

    torch.manual_seed(6)
    plan = plan_groups(["q", "__base__", "p", "q", "p"], 7, device)
    G, R, K, N = 2, 5, 37, 29
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(35, K, device=device).to(dtype)
        a, lo = torch.randn(G, R, K, device=device), torch.randn(G, R, N, device=device)
        scale = torch.tensor([0.5, 3.0], device=device)
        s = k.sgmv_shrink(x, plan.order, plan.offsets, plan.max_len, a, scale)
        want_s = torch.cat([x[plan.order[plan.starts[g]:plan.starts[g + 1]]].float() @ a[g].t() * scale[g]
                            for g in range(G)])
        assert_close(s, want_s, torch.float32, scale=FP32, what=f"shrink {dtype}")
        y = torch.randn(35, N, device=device).to(dtype)
        want_y = y.float().clone()
        for g in range(G):
            idx = plan.order[plan.starts[g]:plan.starts[g + 1]]
            want_y[idx] += s[plan.starts[g]:plan.starts[g + 1]] @ lo[g] * scale[g]
        got_y = k.sgmv_expand(s, plan.order, plan.offsets, plan.max_len, lo, scale, y.clone())
        assert_close(got_y, want_y, dtype, scale=FP32 if dtype == torch.float32 else 1.0, what=f"expand {dtype}")
        d = k.sgmv_reduce(s, x, plan.order, plan.offsets, plan.max_len, scale, G)
        for g in range(G):
            idx = plan.order[plan.starts[g]:plan.starts[g + 1]]
            want_d = s[plan.starts[g]:plan.starts[g + 1]].t() @ x[idx].float() * scale[g]
            assert_close(d[g], want_d, torch.float32, scale=FP32, what=f"reduce {dtype}")
        got = k.bgmv(x, plan.slot, a, lo, scale, y.clone())
        want = y.float().clone()
        for t in range(35):
            g = int(plan.slot[t])
            if g >= 0:
                want[t] += (x[t].float() @ a[g].t()) @ lo[g] * scale[g]
        assert_close(got, want, dtype, scale=FP32 if dtype == torch.float32 else 1.0, what=f"bgmv {dtype}")


def test_kernels_decline_dropout_and_say_why():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    reason = gl._kernel_supports(x, w, None, (a,), (b,), (0.1,), forced=True)
    if os.environ.get("TRITON_INTERPRET") == "1":  # CPU tensors are allowed then: dropout is what declines
        assert reason and "lora_dropout" in reason, reason
        assert gl._kernel_supports(x, w, None, (a,), (b,), (0.0,), forced=True) is None
    else:
        assert reason and "CUDA" in reason, reason
    reason = backend.why_not("grouped_lora", "cuda", x, w, None, (a,), (b,), (0.0,))
    assert reason and ("CUDA" in reason or "not built" in reason or "rebuild" in reason)


# ---------------------------------------------------------------------------------------------- layers / model
def test_lora_layer_mixed_rows_equal_each_adapter_alone():
    torch.manual_seed(7)
    layer = LoraLinear(torch.nn.Linear(20, 14), "a", r=4, lora_alpha=8, init_lora_weights=False)
    layer.update_layer("b", 2, 5, init_lora_weights=False)
    layer.update_layer("c", 6, 6, use_rslora=True, init_lora_weights=False)
    for p in layer.parameters():
        p.requires_grad_(not p is layer.base_layer.weight and not p is layer.base_layer.bias)
    names = ["c", "a", "__base__", "b", "a"]
    x = torch.randn(5, 3, 20, requires_grad=True)
    mixed = layer(x, adapter_names=names)
    gy = torch.randn_like(mixed)
    mixed.backward(gy)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    dx_mixed = x.grad.clone()
    layer.zero_grad()
    x.grad = None
    for row, name in enumerate(names):
        if name == "__base__":
            alone = layer.base_layer(x[row:row + 1])
        else:
            layer.set_adapter(name)
            alone = layer(x[row:row + 1])
        assert_close(mixed[row:row + 1], alone, torch.float32, scale=FP32, what=f"row {row} ({name})")
        alone.backward(gy[row:row + 1])
    for n, p in layer.named_parameters():
        if n in grads:
            assert_close(grads[n], p.grad, torch.float32, scale=FP32, what=f"grad {n}")
    assert_close(dx_mixed, x.grad, torch.float32, scale=FP32, what="dx")


def _three_adapters():
    base = tiny_llama(seed=0)
    pm = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False), adapter_name="a")
    # adapters on different modules and of different ranks, one with rsLoRA
    pm.add_adapter("b", fastpeft.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "down_proj"],
                                            init_lora_weights=False))
    pm.add_adapter("c", fastpeft.LoraConfig(r=8, lora_alpha=4, use_rslora=True, init_lora_weights=False,
                                            target_modules=["q_proj", "o_proj", "up_proj"]))
    return pm


def _row_loss(logits, labels):
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             reduction="sum")


def test_multi_adapter_training_equals_training_each_alone():
    """One batch, one optimizer over three adapters (different ranks and target modules) and a base row,
    4 AdamW steps: every adapter parameter equals training that adapter alone on its own rows."""
    joint = _three_adapters().train()
    alone = copy.deepcopy(joint)
    names = ["a", "b", "c", "b", "__base__", "a"]
    g = torch.Generator().manual_seed(11)
    batches = [torch.randint(1, 97, (6, 7), generator=g) for _ in range(4)]

    lora = [p for n, p in joint.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(lora, lr=1e-2)
    for ids in batches:
        opt.zero_grad()
        _row_loss(joint(input_ids=ids, adapter_names=names).logits, ids).backward()
        opt.step()
    assert backend.last_backend("grouped_lora") == "torch"

    for adapter in ("a", "b", "c"):
        alone.set_adapter(adapter)
        params = [p for p in alone.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        rows = [i for i, n in enumerate(names) if n == adapter]
        for ids in batches:
            opt.zero_grad()
            _row_loss(alone(input_ids=ids[rows]).logits, ids[rows]).backward()
            opt.step()
    theirs = dict(alone.named_parameters())
    moved = 0
    for n, p in joint.named_parameters():
        if "lora_" in n:
            assert_close(p, theirs[n], torch.float32, scale=FP32, what=n)
            moved += 1
    start = dict(_three_adapters().named_parameters())
    assert moved and all(not torch.equal(p, start[n]) for n, p in joint.named_parameters() if "lora_" in n)


def test_mixed_batch_equals_peft():
    peft = pytest.importorskip("peft")
    from tests.peft_parity import peft_config

    ours = _three_adapters().eval()
    theirs = peft.get_peft_model(tiny_llama(seed=0), peft_config(ours.peft_config["a"]), adapter_name="a")
    for name in ("b", "c"):
        theirs.add_adapter(name, peft_config(ours.peft_config[name]))
    theirs.load_state_dict(ours.state_dict())
    theirs.eval()
    ids = torch.randint(1, 97, (5, 6))
    names = ["c", "__base__", "a", "b", "c"]
    with torch.no_grad():
        assert_close(ours(input_ids=ids, adapter_names=names).logits,
                     theirs(input_ids=ids, adapter_names=names).logits, torch.float32, scale=FP32)


def test_mixed_generate_equals_each_row_alone_and_refuses_misuse():
    pm = _three_adapters().eval()
    ids = torch.randint(1, 97, (4, 5))
    names = ["b", "c", "__base__", "a"]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = pm.generate(input_ids=ids, adapter_names=names, **kw)
        for row, name in enumerate(names):
            if name == "__base__":
                with pm.disable_adapter():
                    alone = pm.generate(input_ids=ids[row:row + 1], **kw)
            else:
                pm.set_adapter(name)
                alone = pm.generate(input_ids=ids[row:row + 1], **kw)
            assert torch.equal(mixed[row:row + 1], alone), f"row {row} ({name})"
        with pytest.raises(ValueError, match="adapter_names has 3 entries but the batch has 4 rows"):
            pm.generate(input_ids=ids, adapter_names=names[:3], **kw)
        with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zz'\]"):
            pm.generate(input_ids=ids, adapter_names=["a", "zz", "b", "c"], **kw)


# ---------------------------------------------------------------------------------------------- fastpeft._C
@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """fastpeft._C's sources (bindings included) built with the host compiler and -DFASTPEFT_EMULATE."""
    return build_emulated_cext(tmp_path_factory.mktemp("emu_grouped"), "_C_emu_grouped")


@pytest.fixture
def cext_on_cpu(emulated, monkeypatch):
    return _cext_on_cpu(emulated, monkeypatch)


@pytest.mark.parametrize("dtype,token_counts", [(torch.float32, (2, 12)), (torch.bfloat16, (2,))], ids=str)
def test_emulated_cuda_kernels_equal_reference(cext_on_cpu, dtype, token_counts):
    """The _C kernels (run on CPU threads) give the op's outputs and gradients, prefill and decode."""
    torch.manual_seed(8)
    K, N = 21, 13
    for tokens in token_counts:  # 6 rows × 2 = 12 tokens: the decode kernel; × 12 = 72: shrink + expand
        x = torch.randn(6, tokens, K, dtype=dtype, requires_grad=True)
        w, b = (torch.randn(N, K) / 5).to(dtype), torch.randn(N).to(dtype)
        ads = make_adapters(K, N, SPEC)
        names = NAME_CASES["scattered+base"]
        kern = gl._Kern(cext_on_cpu.grouped_lora_shrink, cext_on_cpu.grouped_lora_expand, gl._cuda_reduce,
                        cext_on_cpu.grouped_lora_decode, True)
        impl = backend.Impl("cuda", 5, lambda *a, **k: None,
                            {"forward": gl._kernel_forward(kern), "backward": gl._kernel_backward(kern)})
        plan = plan_groups(names, tokens)
        params = [t for n in plan.names for t in ads[n][:2]]
        cfg = (plan, tuple(ads[n][2] for n in plan.names), (0.0,) * 3, 0, impl, None)
        y = gl.GroupedLoraFn.apply(x, w, b, cfg, *params)
        want = reference_grouped_lora(x, w, b, names, ads)
        tol = dict(scale=FP32) if dtype == torch.float32 else {}
        assert_close(y, want, dtype, what=f"_C forward, {tokens} tokens/row", **tol)
        gy = torch.randn_like(want)
        for g1, g2 in zip(torch.autograd.grad(y, [x, *params], gy), torch.autograd.grad(want, [x, *params], gy)):
            assert_close(g1, g2, dtype, what=f"_C grad, {tokens} tokens/row", **tol)


def test_emulated_cuda_kernels_flag_bad_plan_indices(cext_on_cpu):
    x, a = torch.randn(4, 8), torch.randn(1, 2, 8)
    with pytest.raises(RuntimeError, match="out of range"):
        cext_on_cpu.grouped_lora_shrink(x, torch.tensor([0, 9]), torch.tensor([0, 2]), 2, a, None)
    with pytest.raises(RuntimeError, match="out of range"):
        cext_on_cpu.grouped_lora_decode(x, torch.tensor([0, 3, -1, 0], dtype=torch.int32), a, torch.randn(1, 2, 5),
                                        torch.ones(1), torch.zeros(4, 5))


PTR = 1 << 20  # fake 16-byte-aligned addresses: only invalid calls reach the extension


def shrink_args(**over):
    args = dict(s=PTR, x=PTR * 2, x_dtype=2, w=PTR * 3, w_dtype=0, order=PTR * 4, offsets=PTR * 5, scale=0,
                bad_index=0, T=64, L=48, G=3, R=16, K=32, stride_xm=32, stride_xk=1, stride_wg=16 * 32, stride_wr=32,
                stride_wk=1, stride_sm=16, stream=0)
    args.update(over)
    return args


def expand_args(**over):
    args = dict(out=PTR, out_dtype=2, s=PTR * 2, l=PTR * 3, l_dtype=0, order=PTR * 4, offsets=PTR * 5, scale=PTR * 6,
                bad_index=0, T=64, L=48, G=3, R=16, N=24, stride_sm=16, stride_lg=16 * 24, stride_lr=24, stride_ln=1,
                stride_om=24, stride_on=1, stream=0)
    args.update(over)
    return args


def decode_args(**over):
    args = dict(y=PTR, x=PTR * 2, x_dtype=1, a=PTR * 3, l=PTR * 4, w_dtype=0, slot=PTR * 5, scale=PTR * 6,
                bad_index=0, T=8, G=2, R=16, K=32, N=24, stride_xm=32, stride_xk=1, stride_ag=16 * 32, stride_ar=32,
                stride_ak=1, stride_lg=16 * 24, stride_lr=24, stride_ln=1, stride_ym=24, stride_yn=1, stream=0)
    args.update(over)
    return args


BAD_CALLS = [
    ("grouped_lora_shrink", shrink_args, dict(x_dtype=5), "dtype code 5 for x"),
    ("grouped_lora_shrink", shrink_args, dict(R=300),
     r"R \(the table's padded rank\) is 300; the kernels take at most 256"),
    ("grouped_lora_shrink", shrink_args, dict(G=0), r"G \(adapters in the table\) must be positive"),
    ("grouped_lora_shrink", shrink_args, dict(L=65), "inconsistent sizes: L = 65 sorted positions but the batch has "
                                                      "only T = 64"),
    ("grouped_lora_shrink", shrink_args, dict(order=0), "null pointer for order"),
    ("grouped_lora_shrink", shrink_args, dict(offsets=PTR + 4), "pointer for offsets is not aligned"),
    ("grouped_lora_shrink", shrink_args, dict(stride_sm=8), "s's row stride is 8 but must be at least 16"),
    ("grouped_lora_shrink", shrink_args, dict(stride_xk=-1), "negative strides"),
    ("grouped_lora_shrink", shrink_args, dict(stride_wg=1 << 62), "w's adapter stride .* out of range"),
    ("grouped_lora_expand", expand_args, dict(l_dtype=9), "dtype code 9 for the adapter table"),
    ("grouped_lora_expand", expand_args, dict(s=PTR + 2), "pointer for s is not aligned to its 4-byte"),
    ("grouped_lora_expand", expand_args, dict(N=0), r"N \(out_features\) must be positive"),
    ("grouped_lora_expand", expand_args, dict(stride_om=10), "out's token stride is 10 but must be at least 24"),
    ("grouped_lora_expand", expand_args, dict(scale=PTR + 1), "pointer for scale is not aligned"),
    ("grouped_lora_decode", decode_args, dict(scale=0), "null pointer for scale"),
    ("grouped_lora_decode", decode_args, dict(slot=0), "null pointer for slot"),
    ("grouped_lora_decode", decode_args, dict(T=-1), r"T \(tokens in the batch\) must be >= 0"),
    ("grouped_lora_decode", decode_args, dict(stride_ym=4), "y's token stride is 4 but must be at least 24"),
    ("grouped_lora_decode", decode_args, dict(bad_index=PTR + 2), "bad_index is not aligned"),
]


def _modules_with_grouped(emulated):
    mods = [emulated]
    if _cext.available() and hasattr(_cext._C, "grouped_lora_shrink"):
        mods.append(_cext._C)  # the real extension, when it was rebuilt with these kernels
    return mods


@pytest.mark.parametrize("fn,args,over,message", BAD_CALLS, ids=[f"{c[0][13:]}-{i}" for i, c in enumerate(BAD_CALLS)])
def test_cext_argument_checks(emulated, fn, args, over, message):
    for mod in _modules_with_grouped(emulated):
        with pytest.raises(ValueError, match=message) as err:
            getattr(mod, fn)(**args(**over))
        assert str(err.value).startswith(f"{fn}: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a valid call with fake pointers would really launch on a GPU")
def test_cext_valid_call_fails_only_at_launch():
    if not (_cext.available() and hasattr(_cext._C, "grouped_lora_shrink")):
        pytest.skip("fastpeft._C was not rebuilt with the grouped LoRA kernels")
    for fn, args in (("grouped_lora_shrink", shrink_args), ("grouped_lora_expand", expand_args),
                     ("grouped_lora_decode", decode_args)):
        with pytest.raises(RuntimeError, match=f"{fn}: kernel launch failed"):
            getattr(_cext._C, fn)(**args())
