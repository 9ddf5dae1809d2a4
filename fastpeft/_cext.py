"""Tensor-level wrappers over the CUDA C++ extension fastpeft._C (csrc/).

The extension links no libtorch: its entry points take device pointers, sizes, strides (in
elements), dtype codes and the caller's CUDA stream as integers, and check them all before any
launch.  This module owns the tensors: it allocates outputs, passes pointers on the current
stream of the tensors' device, and turns out-of-range indices the kernels flag into an
asynchronous device assertion (FASTPEFT_CHECK_INDICES=0 skips that check).
"""

from __future__ import annotations

import os

import torch

try:
    from . import _C
except ImportError as exc:  # not built (no nvcc at install time) or built for another Python
    _C = None
    _IMPORT_ERROR: str | None = (f"the CUDA extension fastpeft._C is not built or does not load ({exc}); "
                                 f"reinstall fastpeft where nvcc is found (FASTPEFT_FORCE_CUDA=1 makes that an error)")
else:
    _IMPORT_ERROR = None

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


_KEEP_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3, torch.uint8: 4}


def dropout_keep(seed: int, m: int, k: int, threshold: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor | None:
    """The torch path's (m, k) dropout keep-mask (1 kept, 0 dropped) in `dtype` on the CPU from fastpeft._C's
    C++ loop (the bits of `fastpeft.ops._random.hash_keep_reference`), or None where _C is not built or
    predates the function, or for a dtype it does not write."""
    fn = getattr(_C, "dropout_keep", None) if _C is not None else None
    code = _KEEP_CODES.get(dtype)
    if fn is None or code is None:
        return None
    out = torch.empty((m, k), dtype=dtype)
    fn(out.data_ptr(), code, m * k, seed, threshold)
    return out


_APPLY_CODES = {torch.float32: 0, torch.bfloat16: 2}
_DROPOUT_MUL = getattr(_C, "dropout_mul", None) if _C is not None else None
_DROPOUT_ADDCMUL = getattr(_C, "dropout_addcmul", None) if _C is not None else None


def dropout_mul(x: torch.Tensor, seed: int, threshold: int, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """x ∘ keep (`dropout_keep`'s mask of `seed`) in one pass on the CPU, into `out` (a new tensor by default),
    or None where _C lacks the loop or for a dtype / layout it does not take (float32, bfloat16, contiguous)."""
    code = _APPLY_CODES.get(x.dtype)
    if _DROPOUT_MUL is None or code is None or not x.is_contiguous():
        return None
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _DROPOUT_MUL(out.data_ptr(), x.data_ptr(), code, x.numel(), seed, threshold)
    return out


def dropout_addcmul_(dst: torch.Tensor, src: torch.Tensor, seed: int, threshold: int, value: float) -> bool:
    """dst += value · src ∘ keep in place (one pass, CPU); False (nothing done) where _C cannot take it."""
    code = _APPLY_CODES.get(dst.dtype)
    if _DROPOUT_ADDCMUL is None or code is None or src.dtype != dst.dtype or not dst.is_contiguous() \
            or not src.is_contiguous() or src.shape != dst.shape:
        return False
    _DROPOUT_ADDCMUL(dst.data_ptr(), src.data_ptr(), code, dst.numel(), seed, threshold, value)
    return True


_DEQUANT_4BIT = getattr(_C, "dequant_4bit", None) if _C is not None else None


def dequant_4bit(packed: torch.Tensor, state, n: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The first n weights of 4-bit `packed` (uint8 bytes, bitsandbytes' nibble order) as code[q]·absmax[block]
    in `dtype` (float32 or bfloat16), one pass on the CPU, the double quantisation's absmax decoded in the same
    loop; None where _C lacks the loop or cannot take the arguments (the caller's aten path then runs, with the
    same bits).  `state` is a fastpeft.quant.nf4.QuantState4bit."""
    out_code = _APPLY_CODES.get(dtype)
    if _DEQUANT_4BIT is None or out_code is None or state.blocksize % 2 or packed.dtype != torch.uint8:
        return None
    code, absmax = state.code, state.absmax
    nested = state.nested_absmax is not None
    tensors = (packed, code, absmax) + ((state.nested_code, state.nested_absmax, state.offset) if nested else ())
    if not all(t.is_cpu and t.is_contiguous() for t in tensors) or code.dtype != torch.float32 or code.numel() < 16 \
            or packed.numel() * 2 < n or absmax.numel() * state.blocksize < n:
        return None
    if nested:
        if absmax.dtype != torch.uint8 or state.nested_code.dtype != torch.float32 or state.nested_code.numel() < 256 \
                or state.nested_absmax.dtype != torch.float32 or state.offset.dtype != torch.float32 \
                or state.nested_absmax.numel() * state.nested_blocksize < absmax.numel():
            return None
    elif absmax.dtype != torch.float32:
        return None
    out = torch.empty(n, dtype=dtype)
    if nested:
        _DEQUANT_4BIT(out.data_ptr(), out_code, packed.data_ptr(), code.data_ptr(), 0, n, state.blocksize,
                      absmax.data_ptr(), state.nested_code.data_ptr(), state.nested_absmax.data_ptr(),
                      state.nested_blocksize, float(state.offset))
    else:
        _DEQUANT_4BIT(out.data_ptr(), out_code, packed.data_ptr(), code.data_ptr(), absmax.data_ptr(), n,
                      state.blocksize)
    return out


def available() -> bool:
    """Whether fastpeft._C was built and imports here (a GPU may still be missing)."""
    return _C is not None


def why_unavailable() -> str | None:
    """Why fastpeft._C cannot be used here, or None when it imports."""
    return _IMPORT_ERROR


def archs() -> list[int]:
    """Compute capabilities fastpeft._C holds SASS for, e.g. [80, 86, 89, 90] ([] when not built)."""
    return list(_C.CUDA_ARCHS) if _C is not None else []


def ptx_archs() -> list[int]:
    """Compute capabilities whose PTX is embedded too (JIT-compiled on newer GPUs)."""
    return list(_C.PTX_ARCHS) if _C is not None else []


def why_not_device(device: torch.device) -> str | None:
    """Why fastpeft._C has no kernel for this CUDA device, or None when it has one.

    SASS for sm_XY runs on compute capability X.Z with Z >= Y; PTX for compute_XY on anything
    newer than XY."""
    if _C is None:
        return _IMPORT_ERROR
    major, minor = torch.cuda.get_device_capability(device)
    cap = major * 10 + minor
    if any(a // 10 == major and a <= cap for a in _C.CUDA_ARCHS) or any(a <= cap for a in _C.PTX_ARCHS):
        return None
    built = ", ".join(f"sm_{a}" for a in _C.CUDA_ARCHS) + "".join(f", compute_{a} (PTX)" for a in _C.PTX_ARCHS)
    return (f"fastpeft._C has no kernels for this GPU (sm_{cap}); it was built for {built} — rebuild with "
            f"FASTPEFT_CUDA_ARCH_LIST={major}.{minor}")


def _code(t: torch.Tensor | torch.dtype, what: str) -> int:
    dtype = t if isinstance(t, torch.dtype) else t.dtype
    code = DTYPE_CODES.get(dtype)
    if code is None:
        raise ValueError(f"{what} has dtype {dtype}; the CUDA kernels take float32, float16 or bfloat16")
    return code


def _lib():
    if _C is None:
        raise RuntimeError(_IMPORT_ERROR)
    return _C


def _on_cuda(**tensors: torch.Tensor | None) -> torch.device:
    device = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not t.is_cuda:
            raise ValueError(f"{name} is on {t.device}; the CUDA kernels need CUDA tensors")
        if device is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but other arguments are on {device}")
        device = t.device
    return device


def _hidden_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels read rows of contiguous elements; other strides are passed as they are."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _index_flag(device: torch.device) -> torch.Tensor | None:
    if os.environ.get("FASTPEFT_CHECK_INDICES", "1") == "0":
        return None
    return torch.zeros(1, dtype=torch.int32, device=device)


def _assert_indices(flag: torch.Tensor | None, what: str) -> None:
    if flag is not None:
        torch._assert_async(flag[0] == 0, f"{what}: an input_id or prompt_index is out of range")


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled() or os.environ.get("FASTPEFT_DETERMINISTIC") == "1"


# ---- soft_prompt_embed -------------------------------------------------------------------------

def soft_prompt_forward(input_ids: torch.Tensor, embedding_weight: torch.Tensor, prompt_table: torch.Tensor,
                        prompt_index: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
    """out[b] = [prompt_table[prompt_index[b]] (or the shared (P, H) table) ; embedding_weight[input_ids[b]]];
    with `slots` (B, T) (a template): out[b, t] = the prompt's token slots[b, t] where >= 0, else the word."""
    C = _lib()
    device = _on_cuda(input_ids=input_ids, embedding_weight=embedding_weight, prompt_table=prompt_table,
                      prompt_index=prompt_index, slots=slots)
    B, T = input_ids.shape
    V, H = embedding_weight.shape
    P = prompt_table.shape[-2]
    shared = prompt_index is None
    out = torch.empty((B, T if slots is not None else P + T, H), dtype=embedding_weight.dtype, device=device)
    if out.numel() == 0 or P == 0:
        from .ops.soft_prompt import reference_forward
        return reference_forward(input_ids, embedding_weight, prompt_table, prompt_index, slots)
    sl = None if slots is None else slots.long()
    ids = input_ids.long()
    weight = _hidden_contiguous(embedding_weight)
    table = _hidden_contiguous(prompt_table)
    pidx = None if shared else prompt_index.long()
    flag = _index_flag(device)
    with torch.cuda.device(device):
        C.soft_prompt_fwd(
            out=out.data_ptr(), out_dtype=_code(weight, "embedding_weight"), weight=weight.data_ptr(),
            input_ids=ids.data_ptr(), table=table.data_ptr(), table_dtype=_code(table, "prompt_table"),
            prompt_index=_ptr(pidx), bad_index=_ptr(flag), B=B, T=T, P=P, H=H, V=V,
            N=1 if shared else table.shape[0], ids_stride_b=ids.stride(0), ids_stride_t=ids.stride(1),
            weight_stride_v=weight.stride(0), weight_stride_h=weight.stride(1),
            table_stride_n=0 if shared else table.stride(0), table_stride_p=table.stride(-2),
            table_stride_h=table.stride(-1), pidx_stride=0 if shared else pidx.stride(0),
            stream=torch.cuda.current_stream(device).cuda_stream, **_slot_args(sl))
    _assert_indices(flag, "soft_prompt_embed")
    return out


def _slot_args(slots: torch.Tensor | None) -> dict:
    """The templated kernels' slot-map arguments (none for the prepended layout: the bindings' defaults)."""
    if slots is None:
        return {}
    return dict(slots=slots.data_ptr(), slots_stride_b=slots.stride(0), slots_stride_t=slots.stride(1))


def soft_prompt_backward(dout: torch.Tensor, input_ids: torch.Tensor, prompt_index: torch.Tensor | None,
                         num_prompts: int, prompt_dtype: torch.dtype,
                         positions: torch.Tensor | None = None) -> torch.Tensor:
    """Prompt-table gradient: (P, H) summed over rows, or (N, P, H) scattered by prompt_index (fp32 sums);
    templated: virtual token p of row b read from dout position positions[b, p] ((B, P), see
    `fastpeft.ops.soft_prompt.prompt_positions_of`)."""
    C = _lib()
    device = _on_cuda(dout=dout, input_ids=input_ids, prompt_index=prompt_index, positions=positions)
    B, S, H = dout.shape
    P = S - input_ids.shape[1] if positions is None else positions.shape[1]
    shape = (P, H) if prompt_index is None else (num_prompts, P, H)
    if B == 0 or P == 0 or num_prompts == 0:
        return torch.zeros(shape, dtype=prompt_dtype, device=device)
    dout = _hidden_contiguous(dout)
    out_dtype = prompt_dtype if prompt_dtype in DTYPE_CODES else torch.float32
    d_table = torch.empty(shape, dtype=out_dtype, device=device)
    pidx = None if prompt_index is None else prompt_index.long()
    extra, flag = {}, None
    if positions is not None:
        pos = positions.long()
        flag = _index_flag(device)
        extra = dict(positions=pos.data_ptr(), bad_index=_ptr(flag), pos_stride_b=pos.stride(0),
                     pos_stride_p=pos.stride(1))
    with torch.cuda.device(device):
        C.soft_prompt_table_bwd(
            d_table=d_table.data_ptr(), table_dtype=_code(out_dtype, "prompt_table"), dout=dout.data_ptr(),
            dout_dtype=_code(dout, "dout"), prompt_index=_ptr(pidx), B=B, S=S, P=P, H=H,
            N=1 if pidx is None else num_prompts, dout_stride_b=dout.stride(0), dout_stride_s=dout.stride(1),
            dout_stride_h=dout.stride(2), pidx_stride=0 if pidx is None else pidx.stride(0),
            stream=torch.cuda.current_stream(device).cuda_stream, **extra)
    _assert_indices(flag, "soft_prompt_embed backward")
    return d_table.to(prompt_dtype)


def soft_prompt_embedding_backward(dout: torch.Tensor, input_ids: torch.Tensor, num_words: int,
                                   weight_dtype: torch.dtype, deterministic: bool | None = None,
                                   slots: torch.Tensor | None = None) -> torch.Tensor:
    """Word-embedding gradient (V, H) from the word part of dout (templated, `slots` given: dout has T
    positions and those with slots >= 0 are virtual tokens, skipped).

    deterministic (default: torch.are_deterministic_algorithms_enabled() or
    FASTPEFT_DETERMINISTIC=1) sorts the ids and sums each id's rows in a fixed order; otherwise
    fp32 atomics scatter the rows (faster, not bitwise reproducible)."""
    C = _lib()
    device = _on_cuda(dout=dout, input_ids=input_ids, slots=slots)
    B, S, H = dout.shape
    T = input_ids.shape[1]
    sl = None if slots is None else slots.long()
    if B == 0 or T == 0:
        return torch.zeros((num_words, H), dtype=weight_dtype, device=device)
    dout = _hidden_contiguous(dout)
    ids = input_ids.long()
    flag = _index_flag(device)
    stream = torch.cuda.current_stream(device).cuda_stream
    sizes = dict(B=B, S=S, T=T, P=S - T, H=H, V=num_words, dout_stride_b=dout.stride(0),
                 dout_stride_s=dout.stride(1), dout_stride_h=dout.stride(2), **_slot_args(sl))
    with torch.cuda.device(device):
        if deterministic if deterministic is not None else _deterministic():
            out_dtype = weight_dtype if weight_dtype in DTYPE_CODES else torch.float32
            d_weight = torch.zeros((num_words, H), dtype=out_dtype, device=device)
            sorted_ids, order = torch.sort(ids.reshape(-1), stable=True)
            C.soft_prompt_weight_bwd_sorted(
                d_weight=d_weight.data_ptr(), weight_dtype=_code(out_dtype, "embedding_weight"),
                dout=dout.data_ptr(), dout_dtype=_code(dout, "dout"), sorted_ids=sorted_ids.data_ptr(),
                order=order.data_ptr(), bad_index=_ptr(flag), stream=stream, **sizes)
        else:
            d_weight = torch.zeros((num_words, H), dtype=torch.float32, device=device)
            C.soft_prompt_weight_bwd(
                d_weight=d_weight.data_ptr(), dout=dout.data_ptr(), dout_dtype=_code(dout, "dout"),
                input_ids=ids.data_ptr(), bad_index=_ptr(flag), ids_stride_b=ids.stride(0),
                ids_stride_t=ids.stride(1), stream=stream, **sizes)
    _assert_indices(flag, "soft_prompt_embed backward")
    return d_weight.to(weight_dtype)


# ---- IA3 ---------------------------------------------------------------------------------------

def ia3_scale_grad(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dl[n] = Σ_m a[m, n]·b[m, n], accumulated in fp32 (deterministic), returned in out_dtype."""
    C = _lib()
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must be 2-D of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"a and b must share a dtype, got {a.dtype} and {b.dtype}")
    device = _on_cuda(a=a, b=b)
    M, N = a.shape
    if M == 0 or N == 0:
        return torch.zeros(N, dtype=out_dtype, device=device)
    out = torch.empty(N, dtype=out_dtype, device=device)
    with torch.cuda.device(device):
        C.ia3_scale_grad(out=out.data_ptr(), out_dtype=_code(out_dtype, "out_dtype"), a=a.data_ptr(),
                         b=b.data_ptr(), in_dtype=_code(a, "a"), M=M, N=N, a_stride_m=a.stride(0),
                         a_stride_n=a.stride(1), b_stride_m=b.stride(0), b_stride_n=b.stride(1),
                         stream=torch.cuda.current_stream(device).cuda_stream)
    return out


# ---- grouped LoRA (mixed-adapter batches) ------------------------------------------------------

def _grouped_flag_check(flag: torch.Tensor | None, what: str) -> None:
    if flag is not None:
        torch._assert_async(flag[0] == 0, f"{what}: a plan index (order, offsets or slot) is out of range")


def grouped_lora_shrink(x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, max_len: int, w: torch.Tensor,
                        scale: torch.Tensor | None) -> torch.Tensor:
    """fp32 s (len(order), R): s[m] = scale[g]·x[order[m]]·w[g]ᵀ for m in segment g; w (G, R, K), any strides."""
    C = _lib()
    device = _on_cuda(x=x, order=order, offsets=offsets, w=w, scale=scale)
    G, R, K = w.shape
    s = torch.empty((order.shape[0], R), dtype=torch.float32, device=device)
    flag = _index_flag(device)
    with torch.cuda.device(device):
        C.grouped_lora_shrink(
            s=s.data_ptr(), x=x.data_ptr(), x_dtype=_code(x, "x"), w=w.data_ptr(), w_dtype=_code(w, "the adapter table"),
            order=order.data_ptr(), offsets=offsets.data_ptr(), scale=_ptr(scale), bad_index=_ptr(flag),
            T=x.shape[0], L=order.shape[0], G=G, R=R, K=K, stride_xm=x.stride(0), stride_xk=x.stride(1),
            stride_wg=w.stride(0), stride_wr=w.stride(1), stride_wk=w.stride(2), stride_sm=s.stride(0),
            stream=torch.cuda.current_stream(device).cuda_stream)
    _grouped_flag_check(flag, "grouped_lora_shrink")
    return s


def grouped_lora_expand(s: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, max_len: int, lo: torch.Tensor,
                        scale: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out[order[m]] += scale[g]·s[m]·lo[g] in place; s fp32 (L, R) rows contiguous, lo (G, R, N) any strides."""
    C = _lib()
    device = _on_cuda(s=s, order=order, offsets=offsets, lo=lo, scale=scale, out=out)
    G, R, N = lo.shape
    if s.dtype != torch.float32 or s.stride(1) != 1:
        raise ValueError(f"s must be float32 with contiguous rows, got {s.dtype} strides {s.stride()}")
    flag = _index_flag(device)
    with torch.cuda.device(device):
        C.grouped_lora_expand(
            out=out.data_ptr(), out_dtype=_code(out, "out"), s=s.data_ptr(), l=lo.data_ptr(),
            l_dtype=_code(lo, "the adapter table"), order=order.data_ptr(), offsets=offsets.data_ptr(),
            scale=_ptr(scale), bad_index=_ptr(flag), T=out.shape[0], L=order.shape[0], G=G, R=R, N=N,
            stride_sm=s.stride(0), stride_lg=lo.stride(0), stride_lr=lo.stride(1), stride_ln=lo.stride(2),
            stride_om=out.stride(0), stride_on=out.stride(1), stream=torch.cuda.current_stream(device).cuda_stream)
    _grouped_flag_check(flag, "grouped_lora_expand")
    return out


def grouped_lora_decode(x: torch.Tensor, slot: torch.Tensor, a: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor,
                        y: torch.Tensor) -> torch.Tensor:
    """y[t] += scale[g]·(x[t]·a[g]ᵀ)·lo[g] in place for g = slot[t] ≥ 0 (int32); a (G, R, K), lo (G, R, N)."""
    C = _lib()
    device = _on_cuda(x=x, slot=slot, a=a, lo=lo, scale=scale, y=y)
    G, R, K = a.shape
    N = lo.shape[2]
    if a.dtype != lo.dtype:
        raise ValueError(f"the table's A and B must share a dtype, got {a.dtype} and {lo.dtype}")
    if x.dtype != y.dtype:
        raise ValueError(f"x and y must share a dtype, got {x.dtype} and {y.dtype}")
    flag = _index_flag(device)
    with torch.cuda.device(device):
        C.grouped_lora_decode(
            y=y.data_ptr(), x=x.data_ptr(), x_dtype=_code(x, "x"), a=a.data_ptr(), l=lo.data_ptr(),
            w_dtype=_code(a, "the adapter table"), slot=slot.data_ptr(), scale=scale.data_ptr(), bad_index=_ptr(flag),
            T=x.shape[0], G=G, R=R, K=K, N=N, stride_xm=x.stride(0), stride_xk=x.stride(1), stride_ag=a.stride(0),
            stride_ar=a.stride(1), stride_ak=a.stride(2), stride_lg=lo.stride(0), stride_lr=lo.stride(1),
            stride_ln=lo.stride(2), stride_ym=y.stride(0), stride_yn=y.stride(1),
            stream=torch.cuda.current_stream(device).cuda_stream)
    _grouped_flag_check(flag, "grouped_lora_decode")
    return y
