"""Counter-based dropout shared by every backend.

The mask of element i (its row-major index in the logical (M, K) input) is
`philox_uniform(seed, i) > p`, where philox_uniform is exactly Triton's `tl.rand(seed, i)`
(Philox4x32-10 with 32-bit offsets).  A kernel can therefore re-draw the forward mask in the
backward from the seed alone, and the torch reference draws the very same mask.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
MAX_OFFSET = 2**31 - 1


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # int64 product of two 32-bit values wraps modulo 2**64, which keeps bits 0..63 exact.
    prod = b * a
    return (prod >> 32) & _MASK32, prod & _MASK32


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Uniform floats in [0, 1) equal to Triton's `tl.rand(seed, offsets)` for int32 offsets."""
    if offsets.numel() and int(offsets.max()) > MAX_OFFSET:
        raise ValueError(f"dropout offsets exceed 2**31 - 1 ({int(offsets.max())}); split the input")
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    c0 = offsets.to(torch.int64) & _MASK32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c2 = hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1
        c1, c3 = lo_b, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x).to(torch.int32)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def dropout_keep(seed: int, shape: tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean keep-mask of `shape` for dropout probability p, row-major offsets from 0."""
    numel = 1
    for d in shape:
        numel *= d
    offsets = torch.arange(numel, device=device, dtype=torch.int64)
    return (philox_uniform(seed, offsets) > p).reshape(shape)


def new_seed() -> int:
    """A fresh dropout seed drawn from torch's default CPU generator (so torch.manual_seed governs it)."""
    return int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).item())
