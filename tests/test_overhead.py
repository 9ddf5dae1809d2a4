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
