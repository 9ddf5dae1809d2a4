"""The host-overhead bench: the Triton path's launch wrappers run with launches stubbed out, go
through one cached launch plan per shape after the first call, and every row comes back."""

import torch

import fastpeft
from fastpeft.backend import last_backend
from fastpeft.bench import overhead
from fastpeft.kernels import adapted_linear as al


def test_stubbed_triton_path_plans_each_launch_once():
    x = torch.randn(5, 16, requires_grad=True)
    w = torch.randn(12, 16)
    a = torch.randn(4, 16, requires_grad=True)
    b = torch.randn(12, 4, requires_grad=True)
    with overhead.stub_triton_launches(), fastpeft.use_backend("triton"):
        for _ in range(3):
            y = fastpeft.ops.lora_linear(x, w, None, a, b, 2.0, 0.1, training=True)
            assert last_backend("lora_linear") == "triton"
            y.sum().backward()
        # forward: shrink + gemm; backward: shrink (dual) + gemm + reduce — one plan each
        assert len(al._PLANS) == 5
        assert all(plan[1] and all(isinstance(g, int) for g in plan[1]) for plan in al._PLANS.values())
    assert not isinstance(al.adapted_linear_kernel, overhead._StubAutotuner)  # restored


def test_measure_rows():
    rows = overhead.measure(("lora", "ia3_input"), rounds=1, calls=2)
    providers = {(r["case"], r["provider"]) for r in rows}
    for case in ("lora", "ia3_input"):
        for p in ("frozen nn.Linear", "PEFT eager", "fastpeft torch", "fastpeft triton, launches stubbed"):
            assert (case, p) in providers
    assert all(r["fwd_us"] > 0 and r["fwd_bwd_us"] > 0 for r in rows)
    assert "fwd+bwd / PEFT" in overhead.table(rows)


def _grads_of(fn, tensors):
    for t in tensors:
        t.grad = None
    torch.manual_seed(123)  # the dropout seed is drawn from torch's default generator
    y = fn()
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    return y.detach(), [None if t.grad is None else t.grad.clone() for t in tensors]


import pytest  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("lead, p, scaling, train_w", [((7,), 0.0, 2.0, False), ((2, 5), 0.0, 1.0, False),
                                                       ((3, 3), 0.2, 0.5, False), ((9,), 0.1, 1.0, True),
                                                       ((2, 1, 3), 0.0, 3.0, True)])
def test_cpu_fast_path_equals_the_general_torch_path(dtype, lead, p, scaling, train_w):
    """The eager CPU fast path (`_CpuLoraFn`; plain aten ops at scaling 1 without dropout) gives the
    general torch path's (LoraLinearFn's) output and all five gradients: bit for bit from `_CpuLoraFn`
    (fp32/fp64), dropout masks included (both draw the seed from torch's default generator); within
    the dtype's default tolerance from the aten graph (it sums dx's two terms in another order) and
    in bf16."""
    from fastpeft.ops import lora as lora_op

    g = torch.Generator().manual_seed(0)
    k, n, r = 11, 13, 3
    x = torch.randn(*lead, k, generator=g).to(dtype).requires_grad_()
    w = torch.randn(n, k, generator=g).to(dtype).requires_grad_(train_w)
    bias = torch.randn(n, generator=g).to(dtype).requires_grad_(train_w)
    a = torch.randn(r, k, generator=g).to(dtype).requires_grad_()
    b = torch.randn(n, r, generator=g).to(dtype).requires_grad_()
    ts = [x, w, bias, a, b]
    impl = fastpeft.backend._REGISTRY["lora_linear"]["torch"]
    y0, g0 = _grads_of(lambda: lora_op.LoraLinearFn.apply(x, w, bias, a, b, (scaling, p, None, impl)), ts)
    y1, g1 = _grads_of(lambda: fastpeft.ops.lora_linear(x, w, bias, a, b, scaling, p, training=True), ts)
    assert last_backend("lora_linear") == "torch"
    exact = dtype != torch.bfloat16 and not (p == 0.0 and scaling == 1.0)

    def tol(want):  # bf16: sums of two rounded terms, so the error scales with the terms, not the sum
        if exact:
            return dict(rtol=0, atol=0)
        return dict(rtol=1.6e-2, atol=1.6e-2 * float(want.abs().max())) if dtype == torch.bfloat16 else {}

    torch.testing.assert_close(y1, y0, **tol(y0))
    for name, want, got in zip(("x", "weight", "bias", "lora_A", "lora_B"), g0, g1):
        assert (want is None) == (got is None), name
        if want is not None:
            torch.testing.assert_close(got, want, **tol(want), msg=lambda m: f"d{name}: {m}")
    if p:  # the mask really dropped something and differs from the no-dropout result
        _, g2 = _grads_of(lambda: fastpeft.ops.lora_linear(x, w, bias, a, b, scaling, 0.0, training=True), ts)
        assert not torch.equal(g2[3], g1[3])


def test_cpu_fast_path_checks_once_per_shape_and_names_bad_arguments():
    from fastpeft.ops import lora as lora_op

    x, w, a, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    lora_op._CHECKED.clear()
    fastpeft.ops.lora_linear(x, w, None, a, b, 2.0)
    fastpeft.ops.lora_linear(torch.randn(3, 8), w, None, a, b, 2.0)  # same feature count: no new entry
    assert len(lora_op._CHECKED) == 1
    with pytest.raises(ValueError, match="bias has shape"):
        fastpeft.ops.lora_linear(x, w, torch.randn(1), a, b, 2.0)  # aten would broadcast it silently
    with pytest.raises(ValueError, match="one device"):
        fastpeft.ops.lora_linear(x, w, None, a.to("meta"), b, 2.0)
