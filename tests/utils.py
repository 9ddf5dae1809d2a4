"""Shared test helpers: dtype-scaled comparison and kernel-availability skips."""

import os

import pytest
import torch

# relative-norm tolerances by the dtype the computation runs in
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 4e-3}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), "non-finite values in result"
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0,
                 what: str = "") -> None:
    """‖actual − expected‖ / ‖expected‖ within the tolerance of `dtype` (default: actual's dtype) × scale."""
    tol = TOL[dtype or actual.dtype] * scale
    err = rel_err(actual, expected)
    assert err <= tol, f"{what} relative error {err:.3e} > {tol:.1e}"


def triton_device() -> str:
    """'cuda' when a GPU is present, 'cpu' under TRITON_INTERPRET=1; skips the test otherwise."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        try:
            import triton  # noqa: F401
        except ImportError:
            pytest.skip("triton is not installed")
        return "cpu"
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")


def linear_inputs(device, m: int, k: int, n: int, dtype: torch.dtype, bias: bool = True, w_t: bool = False,
                  x_nc: bool = False, lead: tuple[int, ...] = ()):
    """(x, weight, bias) of a frozen linear layer; w_t: weight a transposed (non-contiguous) view of a
    (k, n) tensor; x_nc: x a strided (non-contiguous) view; lead: extra leading dims of x."""
    if x_nc:
        x = torch.randn(*lead, m, 2 * k, device=device, dtype=dtype)[..., ::2]
    else:
        x = torch.randn(*lead, m, k, device=device, dtype=dtype)
    if w_t:
        weight = (torch.randn(k, n, device=device, dtype=dtype) / k ** 0.5).t()
    else:
        weight = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5
    b = torch.randn(n, device=device, dtype=dtype) if bias else None
    return x, weight, b
