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


# ---- the torch path's dropout: a counter-based hash of (seed, element index) --------------------------
# keep(i) = mix(mix(i ^ s) ^ mix(s + K)) < round((1 - p)·2³²) with s the 31-bit seed and mix a 32-bit
# avalanche (xorshift-multiply, lowbias32-style constants below 2³¹, so that every product fits in int64
# and aten, inductor's generated code and the C++ in fastpeft._C compute the same bits).  A mask is a
# pure function of (seed, shape): the backward re-draws it, a compiled graph draws the same one (its
# pointwise ops fuse, and its backward recomputes it), and nothing but the seed is kept.
HASH_C1, HASH_C2, HASH_K = 0x7FEB352D, 0x2C1B3C6D, 0x3C6EF372
_M32 = 0xFFFFFFFF
MAX_HASH_ELEMENTS = 2**31  # element indices must fit in 31 bits


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * HASH_C1) & _M32
    x = x ^ (x >> 15)
    x = (x * HASH_C2) & _M32
    return x ^ (x >> 16)


def keep_threshold(p: float) -> int:
    """Hashes below this are kept: round((1 - p)·2³²) (p on a 2⁻³² grid)."""
    return int(round((1.0 - p) * 2**32))


def hash_keep_reference(seed: int | torch.Tensor, m: int, k: int, p: float,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """The (m, k) uint8 keep-mask (1 = kept) of `seed` in aten ops (a CPU int, or an int64 tensor whose
    first element is the seed: traceable, no host read)."""
    if m * k >= MAX_HASH_ELEMENTS:
        raise ValueError(f"a dropout mask of {m} x {k} elements needs indices past 31 bits; split the batch")
    idx = torch.arange(m * k, device=device, dtype=torch.int64).view(m, k)
    if isinstance(seed, torch.Tensor):
        s = seed.reshape(-1)[:1].to(device=device, dtype=torch.int64) & 0x7FFFFFFF
    else:
        s = int(seed) & 0x7FFFFFFF
    x = _mix(_mix(idx ^ s) ^ _mix(torch.as_tensor(s, dtype=torch.int64, device=device) + HASH_K))
    return (x < keep_threshold(p)).to(torch.uint8)
