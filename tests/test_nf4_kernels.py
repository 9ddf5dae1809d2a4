"""Interpreter tests of the NF4 Triton kernels (kernels/nf4.py) against the plain-PyTorch reference
(fastpeft/quant/nf4.py) at odd shapes: the dequantise kernel bit for bit, the fused NF4-prologue
GEMMs (forward, and the backward's dX GEMM, each with and without the LoRA term) by the tolerance
rule: error vs a float64 reference ≤ 2x the error of torch's own matmul at the same precision."""

import os

import pytest
import torch

from fastpeft.quant import nf4

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def k():
    pytest.importorskip("triton")
    from fastpeft.kernels import nf4 as kernels

    return kernels


def _close(out, ref64, torch_out, what):
    """flash-attention's rule: |kernel - fp64| ≤ 2 |torch - fp64| (plus one ulp of the output scale)."""
    err = (out.double() - ref64).abs().max().item()
    base = (torch_out.double() - ref64).abs().max().item()
    ulp = torch.finfo(out.dtype).eps * ref64.abs().max().item()
    assert err <= 2 * base + ulp, f"{what}: kernel error {err:.3g} vs torch's {base:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_kernel_bit_identical(k, dtype, double_quant):
    torch.manual_seed(0)
    cases = [((37, 70), 64, "nf4", torch.uint8), ((5, 300), 32, "nf4", torch.uint8),
             ((130, 9), 256, "fp4", torch.uint8), ((24, 40), 64, "nf4", torch.bfloat16)]
    for shape, blocksize, quant_type, storage in cases:
        w = (torch.randn(shape) * 2).to(dtype).to(DEV)
        p, s = nf4.quantize_4bit(w, blocksize, quant_type, double_quant, storage)
        for out_dtype in (dtype, torch.float32):
            got = k.nf4_dequantize(p, s, out_dtype)
            assert torch.equal(got, nf4.dequantize_4bit(p, s, out_dtype)), (shape, blocksize, quant_type, out_dtype)


def _setup(m, n, kdim, dtype, double_quant, blocksize=64, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(n, kdim).to(dtype)
    p, s = nf4.quantize_4bit(w.to(DEV), blocksize, double_quant=double_quant)
    x = torch.randn(m, kdim, dtype=dtype, device=DEV)
    return p, s, x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,kdim,lora", [(19, 37, 70, False), (33, 20, 129, True), (1, 48, 64, True),
                                           (17, 21, 192, False)])  # the last two: K % blocksize == 0 (ALIGNED)
def test_fused_forward_matches_reference(k, dtype, m, n, kdim, lora):
    p, s, x = _setup(m, n, kdim, dtype, double_quant=(n % 2 == 1))
    bias = torch.randn(n, dtype=dtype, device=DEV)
    w = nf4.dequantize_4bit(p, s, dtype)  # bitsandbytes' forward: code·absmax rounded once to x's dtype
    r, scaling = 5, 0.7
    lora_s = torch.randn(m, r, device=DEV) if lora else None
    lora_b = torch.randn(n, r, device=DEV) if lora else None
    y = k.nf4_matmul(x, p, s, bias=bias, lora_s=lora_s, lora_b=lora_b, scaling=scaling)
    assert y.dtype == dtype and y.shape == (m, n)
    ref64 = x.double() @ w.double().t() + bias.double()
    torch_out = (x @ w.t() + bias)
    if lora:
        ref64 = ref64 + scaling * lora_s.double() @ lora_b.double().t()
        torch_out = torch_out + (scaling * lora_s @ lora_b.t()).to(dtype)
    _close(y, ref64, torch_out, f"forward {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,kdim,lora", [(19, 37, 70, True), (40, 65, 33, False), (21, 30, 96, True)])
def test_fused_dx_matches_reference(k, dtype, m, n, kdim, lora):
    p, s, _ = _setup(m, n, kdim, dtype, double_quant=True, blocksize=32)
    dy = torch.randn(m, n, dtype=dtype, device=DEV)
    w = nf4.dequantize_4bit(p, s, dtype)
    r, scaling = 3, 2.0
    ds = torch.randn(m, r, device=DEV) if lora else None
    a = torch.randn(r, kdim, device=DEV) if lora else None
    dx = k.nf4_matmul_dx(dy, p, s, lora_ds=ds, lora_a=a, scaling=scaling)
    assert dx.dtype == dtype and dx.shape == (m, kdim)
    ref64 = dy.double() @ w.double()
    torch_out = dy @ w
    if lora:
        ref64 = ref64 + scaling * ds.double() @ a.double()
        torch_out = torch_out + (scaling * ds @ a).to(dtype)
    _close(dx, ref64, torch_out, f"dx {dtype}")


def test_dx_reads_weight_via_its_quantised_dtype(k):
    """A bf16-quantised weight under an fp32 gradient is read as bitsandbytes' backward reads it."""
    p, s, _ = _setup(7, 24, 40, torch.bfloat16, double_quant=False)
    dy = torch.randn(7, 24, device=DEV)
    dx = k.nf4_matmul_dx(dy, p, s)
    w = nf4.dequantize_4bit(p, s).float()  # bf16 first, then fp32
    torch.testing.assert_close(dx, dy @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_op_through_kernels(k, monkeypatch, dtype):
    """fastpeft's 4-bit linear (autograd op) with the kernels on agrees with its reference path."""
    from fastpeft.quant.linear import linear_4bit

    p, s, x = _setup(2 * 9, 37, 70, dtype, double_quant=True)
    x = x.reshape(2, 9, 70).requires_grad_(True)
    bias = torch.randn(37, dtype=dtype, device=DEV, requires_grad=True)
    monkeypatch.setenv("FASTPEFT_NF4_TRITON", "0")
    y_ref = linear_4bit(x, p, s, bias)
    gx_ref, gb_ref = torch.autograd.grad(y_ref.sum(), (x, bias))
    monkeypatch.setenv("FASTPEFT_NF4_TRITON", "force")
    y = linear_4bit(x, p, s, bias)
    gx, gb = torch.autograd.grad(y.sum(), (x, bias))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)
    torch.testing.assert_close(gb, gb_ref, **tol)


def test_kernel_input_errors(k):
    p, s, x = _setup(4, 8, 16, torch.float32, double_quant=False)
    with pytest.raises(ValueError, match="features"):
        k.nf4_matmul(x[:, :15], p, s)
    with pytest.raises(ValueError, match="features"):
        k.nf4_matmul_dx(torch.randn(4, 9, device=DEV), p, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_layer_fused_path_matches_reference_path(k, monkeypatch, dtype):
    """LoraLinear4bit: the fused NF4 GEMM with the LoRA term in its epilogues (forward, dX) against the
    layer's reference path (dequantise + PEFT's LoRA ops), outputs and gradients of x, A, B."""
    from torch import nn

    from fastpeft.nn.linear4bit import Linear4bit
    from fastpeft.nn.lora4bit import LoraLinear4bit

    torch.manual_seed(3)
    base = Linear4bit.from_linear(nn.Linear(70, 37).to(dtype), double_quant=True).to(DEV)
    layer = LoraLinear4bit(base, r=5, lora_alpha=10).to(DEV)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.3)
    x = torch.randn(3, 7, 70, dtype=dtype, device=DEV)
    out = {}
    for mode in ("0", "force"):
        monkeypatch.setenv("FASTPEFT_NF4_TRITON", mode)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        g = torch.randn_like(y, generator=torch.Generator(DEV).manual_seed(1))
        grads = torch.autograd.grad(y, (xi, layer.lora_A["default"].weight, layer.lora_B["default"].weight), g)
        out[mode] = (y, *grads)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for ref, got, what in zip(out["0"], out["force"], ("y", "dx", "dA", "dB")):
        assert got.dtype == ref.dtype, what
        torch.testing.assert_close(got, ref, **tol, msg=what)


def test_qlora_layer_fused_dropout(k, monkeypatch):
    """With dropout the fused path drops out x for the LoRA term only: in eval it equals the reference;
    in training output and gradients equal the math with the mask it drew."""
    from torch import nn

    from fastpeft.nn.linear4bit import Linear4bit
    from fastpeft.nn.lora4bit import LoraLinear4bit

    torch.manual_seed(4)
    layer = LoraLinear4bit(Linear4bit.from_linear(nn.Linear(40, 24)), r=4, lora_alpha=4, lora_dropout=0.5).to(DEV)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.3)
    x = torch.randn(9, 40, device=DEV)
    monkeypatch.setenv("FASTPEFT_NF4_TRITON", "force")
    layer.eval()
    y_fused = layer(x)
    monkeypatch.setenv("FASTPEFT_NF4_TRITON", "0")
    torch.testing.assert_close(y_fused, layer(x), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("FASTPEFT_NF4_TRITON", "force")
    layer.train()
    xg = x.clone().requires_grad_(True)
    torch.manual_seed(11)
    y = layer(xg)
    torch.manual_seed(11)  # the same draw: the mask the op used
    mask = torch.empty(x.shape, dtype=torch.bool, device=DEV).bernoulli_(0.5)
    assert 0 < mask.sum() < mask.numel()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    w = layer.base_layer.dequantize(torch.float32)
    xr = x.clone().requires_grad_(True)
    ar, br = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    y_ref = xr @ w.t() + layer.base_layer.bias + ((xr * mask / 0.5) @ ar.t() @ br.t())
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (xg, a, b), g)
    want = torch.autograd.grad(y_ref, (xr, ar, br), g)
    for u, v, what in zip(got, want, ("dx", "dA", "dB")):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5, msg=what)
