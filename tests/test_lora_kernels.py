"""The Triton LoRA kernels (kernels/lora.py) against the torch reference and float64 math.

Without a GPU these run the very same kernels under TRITON_INTERPRET=1 at small, ragged shapes
(the interpreter's bf16 dot is done in fp32 and its fp32->bf16 casts truncate: the bf16
tolerances below hold either way)."""

import pytest
import torch

import fastpeft
from fastpeft.backend import last_backend
from fastpeft.ops import lora_linear
from fastpeft.ops import lora as lora_op
from tests.utils import assert_close, linear_inputs, triton_device

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def make_case(device, m, k, n, r, dtype, adapter_dtype, bias=True, w_t=False, x_nc=False, lead=()):
    """Random layer inputs; w_t: weight a transposed (non-contiguous) view; x_nc: x a strided view."""
    x, weight, b = linear_inputs(device, m, k, n, dtype, bias, w_t, x_nc, lead)
    lora_A = torch.randn(r, k, device=device, dtype=adapter_dtype) / k ** 0.5
    lora_B = torch.randn(n, r, device=device, dtype=adapter_dtype) / r ** 0.5
    return x, weight, b, lora_A, lora_B


def run(backend_name, x, weight, b, lora_A, lora_B, dy, scaling, p, seed):
    """Forward + autograd backward through the public op; returns (y, dx, dA, dB)."""
    x = x.detach().requires_grad_(True)
    a = lora_A.detach().requires_grad_(True)
    bb = lora_B.detach().requires_grad_(True)
    with fastpeft.use_backend(backend_name):
        y = lora_linear(x, weight, b, a, bb, scaling, dropout_p=p, training=True, seed=seed)
        if backend_name == "triton":
            assert last_backend("lora_linear") == "triton", "the Triton forward did not run"
        y.backward(dy)
        if backend_name == "triton":
            assert last_backend("lora_linear") == "triton", "the Triton backward did not run"
    return y.detach(), x.grad, a.grad, bb.grad


def float64_truth(x, weight, b, lora_A, lora_B, dy, scaling, p, seed):
    """(y, dx, dA, dB) of the reference math in float64 on the same (rounded) inputs and mask."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).double()
    d = lambda t: None if t is None else t.double()  # noqa: E731
    y, s = lora_op.reference_forward(x2, d(weight), d(b), d(lora_A), d(lora_B), scaling, p, seed)
    dx, da, db = lora_op.reference_backward(dy.reshape(-1, dy.shape[-1]).double(), x2, d(weight), d(lora_A),
                                            d(lora_B), s, scaling, p, seed)
    return y.reshape(dy.shape), dx.reshape(x.shape), da, db


def check_against_references(device, m, k, n, r, dtype, adapter_dtype, bias, w_t, x_nc, p, lead=()):
    x, weight, b, lora_A, lora_B = make_case(device, m, k, n, r, dtype, adapter_dtype, bias, w_t, x_nc, lead)
    dy = torch.randn(*lead, m, n, device=device, dtype=dtype)
    scaling, seed = 1.75, 20240611
    got = run("triton", x, weight, b, lora_A, lora_B, dy, scaling, p, seed)
    ref = run("torch_philox", x, weight, b, lora_A, lora_B, dy, scaling, p, seed)  # the kernels' own mask
    truth = float64_truth(x, weight, b, lora_A, lora_B, dy, scaling, p, seed)
    # everything that touches the 16-bit activations carries their rounding
    tol_dtype = dtype if dtype != F32 else adapter_dtype
    for name, g, rf, t in zip(("y", "dx", "dA", "dB"), got, ref, truth):
        assert g.dtype == rf.dtype, f"{name}: dtype {g.dtype} != reference {rf.dtype}"
        assert_close(g, t, tol_dtype, what=f"{name} vs float64")
        assert_close(g, rf, tol_dtype, scale=2.0, what=f"{name} vs torch_philox reference")


SHAPES = [(37, 45, 53, 1), (33, 70, 29, 5), (20, 48, 64, 16)]
DTYPES = [(F32, F32), (BF16, F32), (BF16, BF16)]


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES, ids=["fp32", "bf16-fp32adapter", "bf16-bf16adapter"])
@pytest.mark.parametrize("m,k,n,r", SHAPES, ids=[f"{m}x{k}x{n}r{r}" for m, k, n, r in SHAPES])
def test_lora_matches_references(m, k, n, r, dtype, adapter_dtype, p):
    device = triton_device()
    i = SHAPES.index((m, k, n, r))
    # layouts rotate over the shapes; test_lora_layouts covers every combination at one shape
    bias, w_t, x_nc = [(True, False, False), (False, True, True), (True, True, False)][i]
    check_against_references(device, m, k, n, r, dtype, adapter_dtype, bias, w_t, x_nc, p)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("w_t", [False, True], ids=["w", "wT"])
@pytest.mark.parametrize("x_nc", [False, True], ids=["x", "xstrided"])
def test_lora_layouts(bias, w_t, x_nc):
    check_against_references(triton_device(), 19, 40, 35, 5, BF16, F32, bias, w_t, x_nc, 0.1)


@pytest.mark.parametrize("r", [40, 130])
def test_lora_wide_rank(r):
    """Ranks past 16 pad to 64 and 256 (the kernel's maximum)."""
    check_against_references(triton_device(), 21, 36, 30, r, F32, F32, True, False, False, 0.2)


def test_lora_3d_input_fp16():
    check_against_references(triton_device(), 9, 34, 18, 3, F16, F32, True, True, False, 0.3, lead=(2,))


def test_lora_forward_s_is_dropped_shrink():
    """The S the forward saves is dropout(x)·Aᵀ with the reference's mask, in the adapter dtype."""
    device = triton_device()
    x, weight, b, lora_A, lora_B = make_case(device, 30, 50, 20, 5, BF16, F32)
    from fastpeft.kernels.lora import lora_forward

    y, s = lora_forward(x, weight, b, lora_A, lora_B, 2.0, 0.4, 7)
    y_ref, s_ref = lora_op.reference_forward(x, weight, b, lora_A, lora_B, 2.0, 0.4, 7)
    assert s.dtype == s_ref.dtype == F32
    assert_close(s, s_ref, BF16, what="s")
    assert_close(y, y_ref, BF16, scale=2.0, what="y")


def test_triton_backend_refused_without_interpreter(monkeypatch):
    """Automatic selection never picks the kernels for CPU tensors."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, weight, b, lora_A, lora_B = make_case("cpu", 4, 8, 6, 2, F32, F32)
    lora_linear(x, weight, b, lora_A, lora_B, 1.0)
    assert last_backend("lora_linear") == "torch"


# ------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("r", [16, 64])
@pytest.mark.parametrize("p", [0.0, 0.05])
@pytest.mark.parametrize("k,n", [(4096, 11008), (11008, 4096)])
def test_lora_real_shapes(k, n, r, p):
    check_against_references("cuda", 4096, k, n, r, BF16, F32, False, False, False, p)


@pytest.mark.gpu
def test_lora_real_shapes_bias_transposed_fp16():
    check_against_references("cuda", 1000, 2048, 3000, 16, F16, F16, True, True, True, 0.1, lead=(3,))


@pytest.mark.gpu
def test_lora_fp32_is_full_precision():
    check_against_references("cuda", 777, 1024, 513, 8, F32, F32, True, False, False, 0.1)


@pytest.mark.gpu
def test_lora_torch_compile_fullgraph():
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(512, 256, device="cuda", dtype=BF16) / 16,
                                             requires_grad=False)
            self.lora_A = torch.nn.Parameter(torch.randn(16, 256, device="cuda") / 16)
            self.lora_B = torch.nn.Parameter(torch.randn(512, 16, device="cuda") / 4)

        def forward(self, x):
            return lora_linear(x, self.weight, None, self.lora_A, self.lora_B, 2.0, 0.1, self.training, seed=11)

    layer = Layer()
    x = torch.randn(4, 100, 256, device="cuda", dtype=BF16, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    with fastpeft.use_backend("triton"):
        y = compiled(x)
        assert last_backend("lora_linear") == "triton"
        y.float().square().sum().backward()
    grads = (x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    with fastpeft.use_backend("torch_philox"):  # the kernels' dropout mask
        y_ref = layer(x)
        y_ref.float().square().sum().backward()
    assert_close(y, y_ref, BF16, scale=2.0, what="compiled y")
    for name, g, g_ref in zip(("dx", "dA", "dB"), grads, (x.grad, layer.lora_A.grad, layer.lora_B.grad)):
        assert_close(g, g_ref, BF16, scale=2.0, what=f"compiled {name}")



def test_lora_kernels_take_a_device_seed_tensor():
    """A seed living in a one-element int64 tensor (drawn on the device: no host sync, replayable in a
    CUDA graph) draws the very mask of the same integer seed, forward and backward."""
    from fastpeft.kernels.lora import lora_backward, lora_forward

    device = triton_device()
    x, w, b = linear_inputs(device, 37, 24, 20, torch.float32)[:3]
    a = torch.randn(4, 24, device=device) * 0.3
    bb = torch.randn(20, 4, device=device) * 0.3
    seed = 123457
    y_int, s_int = lora_forward(x, w, b, a, bb, 0.5, 0.3, seed)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    y_t, s_t = lora_forward(x, w, b, a, bb, 0.5, 0.3, seed_t)
    assert torch.equal(y_int, y_t) and torch.equal(s_int, s_t)
    dy = torch.randn_like(y_int)
    for g_int, g_t in zip(lora_backward(dy, x, w, a, bb, s_int, 0.5, 0.3, seed),
                          lora_backward(dy, x, w, a, bb, s_t, 0.5, 0.3, seed_t)):
        assert torch.equal(g_int, g_t)
    want_y, _ = lora_op.reference_forward(x, w, b, a, bb, 0.5, 0.3, seed)
    assert_close(y_t, want_y, torch.float32, what="y with a tensor seed")
    with pytest.raises(ValueError, match="one int64 element"):
        lora_forward(x, w, b, a, bb, 0.5, 0.3, seed_t.to(torch.int32))
