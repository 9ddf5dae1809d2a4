"""The 4-bit NormalFloat (NF4) and FP4 formats exactly as bitsandbytes stores them: the plain-PyTorch
reference that defines the format (kernels/nf4.py is tested against it).

A weight W of shape (N, K) is flattened row-major and split into blocks of `blocksize` elements
(64 by default; 32 ... 4096 accepted). Each block b keeps absmax[b] = max |W| in float32, and each
element the index of the nearest code value of W / absmax[b] among the 16 values of `NF4_CODE`
(ties go to the lower code: bitsandbytes' bucketize over the midpoints). Two codes share a byte:
flattened element 2i in the high nibble, 2i+1 in the low one; an odd count is padded with code 7
(0.0). The packed bytes have shape (ceil(N*K/2), 1), optionally viewed as another `quant_storage`
dtype. Dequantisation is code[q] * absmax[block] in float32, rounded once to the target dtype.

Double quantisation ("compress_statistics"): offset = mean(absmax); absmax - offset is quantised
again in blocks of 256 with bitsandbytes' signed dynamic 8-bit code (`dynamic_code()`), keeping a
float32 absmax per 256 block; absmax is recovered as code8[q8] * absmax2[b // 256] + offset.
The 8-bit quantiser reproduces bitsandbytes' CPU kernel (a 65536-entry lookup of the nearest code,
csrc/cpu_ops.cpp `quantize_cpu_impl`), which can differ from its CUDA kernel's exact nearest code by
one step on values within 2**-16 of a midpoint; dequantisation is the same on every backend.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

import torch

NF4_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
# FP4 (1 sign, 2 exponent, 1 mantissa bit; bias 2) in bit-pattern order, normalised by its max (12)
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
QUANT_TYPES = ("nf4", "fp4")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LUT_SIZE = 65536


def code_4bit(quant_type: str = "nf4", device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 float32 code values of `quant_type` ("nf4" sorted ascending; "fp4" in bit order)."""
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)
    if quant_type == "fp4":
        data = torch.tensor(_FP4_RAW, dtype=torch.float32, device=device)
        return data.div_(data.abs().max())
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def dynamic_code(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit code (`create_dynamic_map(signed=True, 7, 8)`): 256 sorted
    float32 values in [-1, 1] with a dynamic exponent (10**-6 ... 1) and the fraction bits left over."""
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    data.sort()
    return torch.tensor(data, dtype=torch.float32, device=device)


@dataclass
class QuantState4bit:
    """What a packed 4-bit weight needs to be read back: bitsandbytes' QuantState, field for field.
    `absmax` is float32 per block, or uint8 codes when `nested` (double quantisation)."""

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    code: torch.Tensor = field(default=None)  # type: ignore[assignment]
    offset: torch.Tensor | None = None  # float32 scalar: mean of the absmax (nested only)
    nested_absmax: torch.Tensor | None = None  # float32, one per 256 absmax
    nested_code: torch.Tensor | None = None  # the 256-value dynamic code
    nested_blocksize: int = NESTED_BLOCKSIZE
    nested_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.code is None:
            self.code = code_4bit(self.quant_type, self.absmax.device)
        self.shape = torch.Size(self.shape)

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def to(self, device: torch.device | str) -> "QuantState4bit":
        mv = (lambda t: None if t is None else t.to(device))
        return replace(self, absmax=mv(self.absmax), code=mv(self.code), offset=mv(self.offset),
                       nested_absmax=mv(self.nested_absmax), nested_code=mv(self.nested_code))

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of every 4-bit block (decoding the double quantisation if any)."""
        if not self.nested:
            return self.absmax.float()
        return dequantize_blockwise_8bit(self.absmax, self.nested_absmax, self.nested_code,
                                         self.nested_blocksize) + self.offset


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES} (bitsandbytes' 4-bit block sizes), got {blocksize!r}")


def _scaled_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block, flat / absmax clamped to [-1, 1]) with bitsandbytes' arithmetic: full blocks
    multiply by the float32 reciprocal, the ragged last block divides."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    com = flat[:full].reshape(full // blocksize, blocksize)
    absmax = com.abs().max(dim=-1)[0]
    scaled = torch.clamp(com * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    return absmax, scaled


def quantize_4bit(weight: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = False,
                  quant_storage: torch.dtype = torch.uint8) -> tuple[torch.Tensor, QuantState4bit]:
    """Pack `weight` (fp16/bf16/fp32, any shape) into 4-bit codes: (packed (ceil(n/2), 1), state).
    Bit-identical to `bitsandbytes.functional.quantize_4bit(weight, blocksize=..., quant_type=...,
    compress_statistics=double_quant, quant_storage=...)`."""
    _check_blocksize(blocksize)
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"4-bit quantisation takes a float16/bfloat16/float32 weight, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError("cannot quantise an empty weight")
    code = code_4bit(quant_type, weight.device)
    flat = weight.detach().reshape(-1).float()
    absmax, scaled = _scaled_blocks(flat, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    order = torch.argsort(code)
    sorted_code = code[order]
    bounds = (sorted_code[:-1] + sorted_code[1:]) / 2
    q = torch.bucketize(scaled, bounds, out_int32=True)
    if quant_type != "nf4":
        q = order[q]
    q8 = q.to(torch.uint8)
    packed = ((q8[::2] << 4) | q8[1::2]).unsqueeze(1)
    packed = as_storage(packed, quant_storage)
    state = QuantState4bit(absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
                           quant_type=quant_type, code=code)
    if double_quant:
        state = _double_quantize(state)
    return packed, state


def as_storage(packed: torch.Tensor, quant_storage: torch.dtype) -> torch.Tensor:
    """The packed bytes viewed as `quant_storage` (bitsandbytes' layout: (bytes / itemsize, 1))."""
    if quant_storage == torch.uint8:
        return packed.reshape(-1, 1)
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    if packed.numel() % itemsize:
        raise ValueError(f"{packed.numel()} packed bytes cannot be viewed as {quant_storage} "
                         f"({itemsize} bytes each)")
    return packed.reshape(-1).view(quant_storage).unsqueeze(1)


def packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed codes as a flat uint8 tensor, whatever `quant_storage` they are viewed as."""
    return packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)


def _double_quantize(state: QuantState4bit) -> QuantState4bit:
    absmax = state.absmax
    offset = absmax.mean()
    q8, absmax2 = quantize_blockwise_8bit(absmax - offset, dynamic_code(absmax.device), NESTED_BLOCKSIZE)
    return replace(state, absmax=q8, offset=offset, nested_absmax=absmax2, nested_code=dynamic_code(absmax.device))


def _quantize_lut(code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU lookup: for each of 65536 points of [-1, 1], the index of the nearest code."""
    mid = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(_LUT_SIZE, dtype=torch.float32, device=code.device)
    val = -1.0 + (2.0 * i) / float(_LUT_SIZE - 1)
    return torch.searchsorted(mid, val, side="left").to(torch.uint8)


def quantize_blockwise_8bit(a: torch.Tensor, code: torch.Tensor,
                            blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantisation of a float32 vector against the sorted 256-value `code`:
    (uint8 codes, float32 absmax per block), as bitsandbytes' CPU `quantize_blockwise`."""
    flat = a.reshape(-1).float()
    n = flat.numel()
    blocks = -(n // -blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    inv = 1.0 / absmax
    v = torch.clamp(padded * inv.view(-1, 1), -1.0, 1.0)
    # (v + 1) * 0.5 * 65535 + 0.5 in float32, truncated to an integer index
    t = (v + 1.0) * 0.5
    idx = (t * float(_LUT_SIZE - 1) + 0.5).to(torch.int64).clamp_(0, _LUT_SIZE - 1)
    q = _quantize_lut(code)[idx]
    q = torch.where((absmax == 0).view(-1, 1), torch.zeros_like(q), q)
    return q.reshape(-1)[:n].reshape(a.shape), absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                              blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """code[q] * absmax[i // blocksize] in float32."""
    flat = code[q.reshape(-1).long()]
    n = flat.numel()
    blocks = -(n // -blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    return (padded * absmax.view(-1, 1)).reshape(-1)[:n]


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first n 4-bit codes (int64) of the packed bytes, element 2i from the high nibble."""
    b = packed_bytes(packed)
    q = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)
    return q[:n].long()


def dequantize_4bit(packed: torch.Tensor, state: QuantState4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight back: code[q] * absmax[block] in float32, rounded once to `dtype` (default: the
    quantised weight's dtype). Bit-identical to `bitsandbytes.functional.dequantize_4bit`."""
    _check_blocksize(state.blocksize)
    dtype = state.dtype if dtype is None else dtype
    n = math.prod(state.shape)
    if packed_bytes(packed).numel() * 2 < n:
        raise ValueError(f"packed weight holds {packed_bytes(packed).numel() * 2} codes, the state's shape "
                         f"{tuple(state.shape)} needs {n}")
    if state.absmax.numel() != -(n // -state.blocksize):
        raise ValueError(f"quant state has {state.absmax.numel()} absmax values, shape {tuple(state.shape)} with "
                         f"blocksize {state.blocksize} needs {-(n // -state.blocksize)}")
    if packed.is_cpu and not torch.compiler.is_compiling():  # one pass in fastpeft._C (same bits), where it runs
        from .. import _cext

        fast = _cext.dequant_4bit(packed_bytes(packed), state, n, dtype)
        if fast is not None:
            return fast.view(state.shape)
    absmax = state.block_absmax()
    values = state.code.to(packed.device)[unpack_codes(packed, n)]
    blocks = absmax.numel()
    padded = torch.nn.functional.pad(values, (0, blocks * state.blocksize - n)).view(blocks, state.blocksize)
    out = (padded * absmax.view(-1, 1)).reshape(-1)[:n]
    return out.reshape(state.shape).to(dtype)


# ---- bitsandbytes state-dict keys -------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).strip("torch.")


def state_to_dict(state: QuantState4bit) -> dict[str, torch.Tensor]:
    """The quant state as bitsandbytes serialises it (`QuantState.as_dict(packed=True)`): keys
    absmax, quant_map, [nested_absmax, nested_quant_map,] quant_state.bitsandbytes__<type> (JSON bytes)."""
    out = {"absmax": state.absmax, "quant_map": state.code}
    meta = {"quant_type": state.quant_type, "blocksize": state.blocksize, "dtype": _dtype_name(state.dtype),
            "shape": tuple(state.shape)}
    if state.nested:
        out["nested_absmax"] = state.nested_absmax
        out["nested_quant_map"] = state.nested_code.clone()
        meta.update({"nested_blocksize": state.nested_blocksize, "nested_dtype": _dtype_name(state.nested_dtype),
                     "nested_offset": float(state.offset)})
    out["quant_state.bitsandbytes__" + state.quant_type] = torch.tensor(list(json.dumps(meta).encode("utf-8")),
                                                                        dtype=torch.uint8)
    return out


def _torch_dtype(name: str, key: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"quant state field {key!r} names no torch dtype: {name!r}")
    return dtype


def state_from_dict(items: dict[str, torch.Tensor], device: torch.device | str | None = None) -> QuantState4bit:
    """Inverse of `state_to_dict` (bitsandbytes' `QuantState.from_dict`); keys may carry any prefix."""
    items = {k.split("quant_state.")[-1] if "quant_state." in k else k.rsplit(".", 1)[-1]: v
             for k, v in items.items()}
    meta_keys = [k for k in items if k.startswith("bitsandbytes__")]
    if len(meta_keys) != 1 or meta_keys[0].split("__", 1)[1] not in QUANT_TYPES:
        raise ValueError(f"expected exactly one quant_state.bitsandbytes__nf4/fp4 entry, found {meta_keys}")
    raw = items.pop(meta_keys[0])
    try:
        meta = json.loads(bytes(raw.cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"quant_state.{meta_keys[0]} is not bitsandbytes' JSON metadata: {e}") from None
    for key in ("absmax", "quant_map"):
        if key not in items:
            raise ValueError(f"4-bit quant state lacks {key!r}")
    nested = "nested_absmax" in items
    dev = items["absmax"].device if device is None else device
    kw = {}
    if nested:
        for key in ("nested_quant_map", ):
            if key not in items:
                raise ValueError(f"double-quantised state lacks {key!r}")
        kw = dict(offset=torch.tensor(float(meta["nested_offset"]), device=dev),
                  nested_absmax=items["nested_absmax"].to(dev), nested_code=items["nested_quant_map"].to(dev),
                  nested_blocksize=int(meta["nested_blocksize"]),
                  nested_dtype=_torch_dtype(meta["nested_dtype"], "nested_dtype"))
    state = QuantState4bit(absmax=items["absmax"].to(dev), shape=torch.Size(meta["shape"]),
                           dtype=_torch_dtype(meta["dtype"], "dtype"), blocksize=int(meta["blocksize"]),
                           quant_type=meta["quant_type"], code=items["quant_map"].to(dev), **kw)
    _check_blocksize(state.blocksize)
    return state


def state_from_bnb(qs) -> QuantState4bit:
    """A fastpeft QuantState4bit from a `bitsandbytes.functional.QuantState` (duck-typed; bitsandbytes
    itself is not imported)."""
    kw = {}
    if getattr(qs, "nested", False):
        kw = dict(offset=qs.offset.float().reshape(()), nested_absmax=qs.state2.absmax, nested_code=qs.state2.code,
                  nested_blocksize=qs.state2.blocksize, nested_dtype=qs.state2.dtype or torch.float32)
    return QuantState4bit(absmax=qs.absmax, shape=qs.shape, dtype=qs.dtype, blocksize=qs.blocksize,
                          quant_type=qs.quant_type, code=qs.code, **kw)
