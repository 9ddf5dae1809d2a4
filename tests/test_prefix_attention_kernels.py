"""The Triton prefix-attention kernels against the torch reference and float64 math.

CPU runs them under TRITON_INTERPRET=1 at small ragged shapes (T, P not multiples of the block,
head dims that need padding); `-m gpu` runs real shapes on a CUDA device."""

import math
import warnings

import pytest
import torch

import fastpeft
from fastpeft.backend import last_backend
from fastpeft.ops import prefix_attention
from tests.utils import assert_close, triton_device

OP = "prefix_attention"
GRAD_NAMES = ("dq", "dk", "dv", "dprefix_k", "dprefix_v")


def make_inputs(B, Hq, Hkv, T, S, P, D, dtype, device, *, pad=False, tasks=0, layout="bhtd"):
    """Random inputs; `pad` left-pads every other row, `tasks` > 0 gives an (N, Hkv, P, D) prefix
    with a mixed prefix_index, layout "bthd" makes q/k/v transposed views of (B, T, H, D) tensors."""

    def seq(H, L):
        if layout == "bthd":
            return torch.randn(B, L, H, D, device=device).to(dtype).transpose(1, 2)
        return torch.randn(B, H, L, D, device=device).to(dtype)

    q, k, v = seq(Hq, T), seq(Hkv, S), seq(Hkv, S)
    lead = (tasks,) if tasks else ()
    prefix_k = torch.randn(*lead, Hkv, P, D, device=device).to(dtype)
    prefix_v = torch.randn(*lead, Hkv, P, D, device=device).to(dtype)
    prefix_index = torch.randint(0, tasks, (B,), device=device) if tasks else None
    if tasks and B > 1:
        prefix_index[:2] = torch.tensor([tasks - 1, 0], device=device)  # at least two distinct tasks
    mask = None
    if pad:
        mask = torch.ones(B, S, dtype=torch.bool, device=device)
        for b in range(0, B, 2):
            mask[b, : min(S - 1, 1 + S // 3 + b)] = False  # left padding, at least one key kept
    return q, k, v, prefix_k, prefix_v, mask, prefix_index


def math64(q, k, v, prefix_k, prefix_v, mask, prefix_index, causal, scale):
    """Prefix attention in float64 by concatenation: the ground truth (differentiable)."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P = prefix_k.shape[-2]
    pk = prefix_k[prefix_index] if prefix_index is not None else prefix_k.expand(B, *prefix_k.shape)
    pv = prefix_v[prefix_index] if prefix_index is not None else prefix_v.expand(B, *prefix_v.shape)
    kk = torch.cat([pk, k], 2).repeat_interleave(Hq // Hkv, 1)
    vv = torch.cat([pv, v], 2).repeat_interleave(Hq // Hkv, 1)
    visible = torch.ones(B, 1, T, P + S, dtype=torch.bool, device=q.device)
    if causal:
        t = torch.arange(T, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        visible[..., P:] &= j <= t + S - T
    if mask is not None:
        visible[..., P:] &= mask[:, None, None, :]
    scores = (q @ kk.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return torch.softmax(scores, -1) @ vv, lse


def run_op(backend_name, inputs, causal, dout, scale=None):
    q, k, v, prefix_k, prefix_v, mask, prefix_index = inputs
    leaves = [t.detach().requires_grad_() for t in (q, k, v, prefix_k, prefix_v)]
    with fastpeft.use_backend(backend_name):
        out, lse = prefix_attention(*leaves, causal=causal, attention_mask=mask, prefix_index=prefix_index,
                                    scale=scale, return_lse=True)
        assert last_backend(OP) == backend_name
        grads = torch.autograd.grad(out, leaves, dout)
        assert last_backend(OP) == backend_name
    return out, lse, grads


def check_against_reference_and_float64(inputs, causal, dtype, scale=None):
    q = inputs[0]
    dout = torch.randn(q.shape, device=q.device).to(dtype)
    out, lse, grads = run_op("triton", inputs, causal, dout, scale)
    ref_out, ref_lse, ref_grads = run_op("torch", inputs, causal, dout, scale)

    leaves64 = [t.detach().double().requires_grad_() for t in inputs[:5]]
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out64, lse64 = math64(*leaves64, inputs[5], inputs[6], causal, s)
    grads64 = torch.autograd.grad(out64, leaves64, dout.double())

    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert_close(out, ref_out, dtype, what="out vs torch")
    assert_close(out, out64, dtype, what="out vs float64")
    assert_close(lse, ref_lse, torch.float32, what="lse vs torch")
    assert_close(lse, lse64, torch.float32, what="lse vs float64")
    for name, g, g_ref, g64, leaf in zip(GRAD_NAMES, grads, ref_grads, grads64, inputs[:5]):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        assert_close(g, g_ref, dtype, what=f"{name} vs torch")
        assert_close(g, g64, dtype, what=f"{name} vs float64")


# (B, Hq, Hkv, T, S, P, D, causal, pad, tasks, layout): ragged T and P against the interpreter's
# 16 × 16 blocks, head dims 16 and 24 (padded to 32), GQA groups 1, 2, 4, decode T = 1 and 3.
CASES = {
    "causal-P1": (2, 4, 2, 7, 7, 1, 16, True, False, 0, "bhtd"),
    "causal-pad-tasks-D24": (2, 4, 2, 37, 37, 17, 24, True, True, 3, "bthd"),
    "noncausal-pad-mha": (2, 4, 4, 20, 20, 5, 16, False, True, 0, "bhtd"),
    "chunk-T<S-gqa4": (2, 4, 1, 13, 29, 5, 24, True, False, 2, "bthd"),
    "noncausal-T>S": (2, 4, 2, 19, 11, 17, 16, False, False, 0, "bhtd"),
    "decode-T1": (2, 4, 2, 1, 40, 17, 16, True, True, 0, "bhtd"),
    "decode-T3-tasks": (3, 4, 2, 3, 45, 5, 24, True, True, 2, "bhtd"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_matches_reference(case, dtype):
    device = triton_device()
    B, Hq, Hkv, T, S, P, D, causal, pad, tasks, layout = CASES[case]
    inputs = make_inputs(B, Hq, Hkv, T, S, P, D, dtype, device, pad=pad, tasks=tasks, layout=layout)
    check_against_reference_and_float64(inputs, causal, dtype)


@pytest.mark.parametrize("case", ["causal-pad-tasks-D24", "decode-T3-tasks"])
def test_kernel_fp16_and_custom_scale(case):
    device = triton_device()
    B, Hq, Hkv, T, S, P, D, causal, pad, tasks, layout = CASES[case]
    inputs = make_inputs(B, Hq, Hkv, T, S, P, D, torch.float16, device, pad=pad, tasks=tasks, layout=layout)
    check_against_reference_and_float64(inputs, causal, torch.float16, scale=0.3)


def test_rows_that_see_nothing_give_zero():
    # P = 0 and left padding under a causal mask: the first queries of row 0 see no key at all
    device = triton_device()
    inputs = make_inputs(2, 4, 2, 9, 9, 0, 16, torch.float32, device, pad=True)
    dout = torch.randn(inputs[0].shape, device=device)
    out, lse, grads = run_op("triton", inputs, True, dout)
    ref_out, ref_lse, ref_grads = run_op("torch", inputs, True, dout)
    blind = torch.isinf(ref_lse)
    assert blind.any()
    assert torch.equal(torch.isinf(lse), blind) and (lse[blind] < 0).all()
    assert (out[blind] == 0).all()
    assert_close(out, ref_out, what="out")
    assert_close(lse[~blind], ref_lse[~blind], what="lse")
    for name, g, g_ref in zip(GRAD_NAMES[:3], grads, ref_grads):
        assert_close(g, g_ref, what=name)
    for g in grads[3:]:
        assert g.shape[-2] == 0


def test_prefix_gradient_stays_in_the_prefix_shape():
    # shared prefix: (Hkv, P, D) gradient; per-task prefix: rows of unused tasks get exactly 0
    device = triton_device()
    inputs = make_inputs(3, 4, 2, 11, 11, 5, 16, torch.float32, device, tasks=4)
    q, k, v, prefix_k, prefix_v, mask, _ = inputs
    prefix_index = torch.tensor([2, 0, 2], device=device)
    dout = torch.randn(q.shape, device=device)
    _, _, grads = run_op("triton", (q, k, v, prefix_k, prefix_v, mask, prefix_index), True, dout)
    _, _, ref = run_op("torch", (q, k, v, prefix_k, prefix_v, mask, prefix_index), True, dout)
    for g, g_ref in zip(grads[3:], ref[3:]):
        assert g.shape == prefix_k.shape
        assert (g[[1, 3]] == 0).all()
        assert_close(g, g_ref)


@pytest.mark.parametrize("dtype, D, reason", [(torch.float64, 16, "float64"), (torch.float32, 160, "head dim")])
def test_supports_rejects_what_the_kernel_cannot_do(dtype, D, reason):
    device = triton_device()
    q, k, v, prefix_k, prefix_v, _, _ = make_inputs(1, 2, 1, 3, 3, 2, D, dtype, device)
    assert reason in fastpeft.backend.why_not(OP, "triton", q, k, v, prefix_k, prefix_v, None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "backend 'triton' does not apply ...", once per process
        with fastpeft.use_backend("triton"):
            out = prefix_attention(q, k, v, prefix_k, prefix_v)
    assert last_backend(OP) == "torch"
    assert out.dtype == dtype


# ----------------------------------------------------------------------------- GPU, real shapes
def _gpu_case(B, Hq, Hkv, T, S, P, D, *, causal=True, pad=False, tasks=0, layout="bthd", dtype=torch.bfloat16):
    inputs = make_inputs(B, Hq, Hkv, T, S, P, D, dtype, "cuda", pad=pad, tasks=tasks, layout=layout)
    dout = torch.randn(inputs[0].shape, device="cuda").to(dtype)
    out, lse, grads = run_op("triton", inputs, causal, dout)
    ref_out, ref_lse, ref_grads = run_op("torch", inputs, causal, dout)
    assert_close(out, ref_out, dtype, what="out")
    assert_close(lse, ref_lse, torch.float32, scale=10, what="lse")
    for name, g, g_ref in zip(GRAD_NAMES, grads, ref_grads):
        assert_close(g, g_ref, dtype, what=name)


@pytest.mark.gpu
def test_gpu_llama_shape_prefix32():
    _gpu_case(8, 32, 32, 1024, 1024, 32, 128)


@pytest.mark.gpu
def test_gpu_gqa_padding_tasks():
    _gpu_case(4, 32, 8, 1024, 1024, 128, 128, pad=True, tasks=3)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 80, 96, 128])
def test_gpu_head_dims(D):
    _gpu_case(2, 16, 4, 777, 777, 33, D)
    _gpu_case(2, 16, 4, 512, 512, 32, D, causal=False, pad=True)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 3])
def test_gpu_decode(T):
    _gpu_case(8, 32, 8, T, 4096, 32, 128, pad=True, layout="bhtd")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_other_dtypes(dtype):
    _gpu_case(2, 8, 8, 300, 300, 17, 128, dtype=dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_input_propagates_as_in_sdpa(backend):
    if backend == "triton" and triton_device() is None:
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    device = "cpu" if backend == "torch" else triton_device()
    q, k, v, pk, pv, _, _ = make_inputs(1, 2, 2, 5, 5, 3, 16, torch.float32, device)
    q[0, 1, 2, 0] = float("nan")  # one query row of head 1
    with fastpeft.use_backend(backend):
        out = prefix_attention(q, k, v, pk, pv)
    # SDPA on the concatenated keys: NaN exactly in that row, finite elsewhere
    assert torch.isnan(out[0, 1, 2]).all(), "a NaN query row came out finite (NaNs turned into zeros)"
    rest = torch.ones_like(out, dtype=torch.bool)
    rest[0, 1, 2] = False
    assert torch.isfinite(out[rest]).all()


def test_additive_float_mask_is_refused_not_inverted():
    q, k, v, pk, pv, _, _ = make_inputs(2, 2, 2, 4, 4, 3, 16, torch.float32, "cpu")
    additive = torch.zeros(2, 4)
    additive[0, 0] = float("-inf")  # "mask key 0 of row 0" in the additive convention; .bool() would read it as keep
    with pytest.raises(ValueError, match="boolean or integer padding mask"):
        prefix_attention(q, k, v, pk, pv, attention_mask=additive)
    prefix_attention(q, k, v, pk, pv, attention_mask=additive == 0)  # the boolean form is accepted
