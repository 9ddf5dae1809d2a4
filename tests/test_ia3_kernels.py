"""The Triton IA3 kernels (kernels/ia3.py) against the torch reference and float64 math, both
modes (output scaling, feed-forward input scaling).  Without a GPU: TRITON_INTERPRET=1."""

import pytest
import torch

import fastpeft
from fastpeft.backend import last_backend
from fastpeft.ops import ia3 as ia3_op
from fastpeft.ops import ia3_linear
from tests.utils import assert_close, linear_inputs, triton_device

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def make_case(device, m, k, n, dtype, l_dtype, feedforward, bias=True, w_t=False, x_nc=False, lead=()):
    x, weight, b = linear_inputs(device, m, k, n, dtype, bias, w_t, x_nc, lead)
    # PEFT's shapes: (1, in_features) for feed-forward, (out_features, 1) for output scaling;
    # values away from 1 so that a missing or doubled scaling cannot pass
    shape = (1, k) if feedforward else (n, 1)
    ia3_l = (1.0 + 0.5 * torch.randn(shape, device=device)).to(l_dtype)
    return x, weight, b, ia3_l


def run(backend_name, x, weight, b, ia3_l, feedforward, dy):
    x = x.detach().requires_grad_(True)
    l = ia3_l.detach().requires_grad_(True)
    with fastpeft.use_backend(backend_name):
        y = ia3_linear(x, weight, b, l, feedforward)
        if backend_name == "triton":
            assert last_backend("ia3_linear") == "triton", "the Triton forward did not run"
        y.backward(dy)
        if backend_name == "triton":
            assert last_backend("ia3_linear") == "triton", "the Triton backward did not run"
    return y.detach(), x.grad, l.grad


def float64_truth(x, weight, b, ia3_l, feedforward, dy):
    k, n = x.shape[-1], dy.shape[-1]
    d = lambda t: None if t is None else t.double()  # noqa: E731
    x2, dy2 = x.reshape(-1, k).double(), dy.reshape(-1, n).double()
    y = ia3_op.reference_forward(x2, d(weight), d(b), d(ia3_l), feedforward)
    dx, dl = ia3_op.reference_backward(dy2, x2, y, d(weight), d(b), d(ia3_l), feedforward)
    return y.reshape(dy.shape), dx.reshape(x.shape), dl


def check_against_references(device, m, k, n, dtype, l_dtype, feedforward, bias, w_t, x_nc, lead=(), zero_cols=()):
    x, weight, b, ia3_l = make_case(device, m, k, n, dtype, l_dtype, feedforward, bias, w_t, x_nc, lead)
    for c in zero_cols:
        ia3_l.view(-1)[c] = 0.0
    dy = torch.randn(*lead, m, n, device=device, dtype=dtype)
    got = run("triton", x, weight, b, ia3_l, feedforward, dy)
    ref = run("torch", x, weight, b, ia3_l, feedforward, dy)
    truth = float64_truth(x, weight, b, ia3_l, feedforward, dy)
    tol_dtype = dtype if dtype != F32 else l_dtype
    for name, g, rf, t in zip(("y", "dx", "dl"), got, ref, truth):
        assert g.dtype == rf.dtype and g.shape == rf.shape, \
            f"{name}: {g.dtype}{tuple(g.shape)} vs reference {rf.dtype}{tuple(rf.shape)}"
        assert_close(g, t, tol_dtype, what=f"{name} vs float64")
        assert_close(g, rf, tol_dtype, scale=2.0, what=f"{name} vs torch backend")


SHAPES = [(37, 45, 53), (33, 70, 29), (20, 48, 64)]
DTYPES = [(F32, F32), (BF16, F32), (BF16, BF16)]


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
@pytest.mark.parametrize("dtype,l_dtype", DTYPES, ids=["fp32", "bf16-fp32l", "bf16-bf16l"])
@pytest.mark.parametrize("m,k,n", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
def test_ia3_matches_references(m, k, n, dtype, l_dtype, feedforward):
    i = SHAPES.index((m, k, n))
    bias, w_t, x_nc = [(True, False, False), (False, True, True), (True, True, False)][i]
    check_against_references(triton_device(), m, k, n, dtype, l_dtype, feedforward, bias, w_t, x_nc)


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("w_t,x_nc", [(False, False), (True, True)], ids=["contiguous", "strided"])
def test_ia3_layouts(feedforward, bias, w_t, x_nc):
    check_against_references(triton_device(), 19, 40, 35, BF16, F32, feedforward, bias, w_t, x_nc, lead=(2,))


def test_ia3_output_scaling_zero_entries():
    """Where l is exactly 0 the output holds no trace of Z: dl of those columns is recomputed."""
    check_against_references(triton_device(), 25, 33, 40, F32, F32, False, True, False, False, zero_cols=(0, 17, 39))


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
def test_ia3_fp16(feedforward):
    check_against_references(triton_device(), 17, 24, 30, F16, F32, feedforward, True, False, True)


# ------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
@pytest.mark.parametrize("k,n", [(4096, 11008), (11008, 4096)])
def test_ia3_real_shapes(k, n, feedforward):
    check_against_references("cuda", 4096, k, n, BF16, F32, feedforward, False, False, False)


@pytest.mark.gpu
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])
def test_ia3_real_shapes_bias_transposed(feedforward):
    check_against_references("cuda", 1000, 2048, 3000, BF16, BF16, feedforward, True, True, True, lead=(3,))


@pytest.mark.gpu
def test_ia3_torch_compile_fullgraph():
    weight = torch.randn(512, 256, device="cuda", dtype=BF16) / 16
    ia3_l = torch.nn.Parameter(1 + 0.1 * torch.randn(512, 1, device="cuda"))

    def layer(x):
        return ia3_linear(x, weight, None, ia3_l, False)

    x = torch.randn(4, 100, 256, device="cuda", dtype=BF16, requires_grad=True)
    with fastpeft.use_backend("triton"):
        y = torch.compile(layer, fullgraph=True)(x)
        assert last_backend("ia3_linear") == "triton"
        y.float().square().sum().backward()
    grads = (x.grad.clone(), ia3_l.grad.clone())
    x.grad = ia3_l.grad = None
    with fastpeft.use_backend("torch"):
        y_ref = layer(x)
        y_ref.float().square().sum().backward()
    assert_close(y, y_ref, BF16, scale=2.0, what="compiled y")
    for name, g, g_ref in zip(("dx", "dl"), grads, (x.grad, ia3_l.grad)):
        assert_close(g, g_ref, BF16, scale=2.0, what=f"compiled {name}")
