"""The NF4/FP4 reference (fastpeft.quant.nf4) against bitsandbytes, bit for bit, on the CPU."""

import logging

import pytest
import torch

from fastpeft.quant import nf4

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(7, 13), (33, 65), (5, 48), (3, 1000), (11, 96), (130, 257)]


@pytest.fixture(scope="module")
def bnbf():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.functional


def _bnb_generic_dequant(packed, absmax, blocksize, shape, dtype, quant_type="nf4"):
    """bitsandbytes' portable dequantise (its default backend): its AVX-512 CPU kernel reads absmax by
    (row, column // blocksize) and so is wrong when in_features % 16 == 0 but in_features % blocksize != 0."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    code = _get_4bit_code(quant_type, packed.device)
    return _dequantize_4bit_compute(packed.reshape(-1).view(torch.uint8), absmax, code, blocksize, shape, dtype)


def _bnb_cpu_kernel_ok(shape, blocksize):
    n = shape[-1]
    return not (n % 16 == 0 and n % blocksize != 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_dequantize_bit_identical_to_bitsandbytes(bnbf, dtype, double_quant, quant_type):
    torch.manual_seed(hash((str(dtype), double_quant, quant_type)) % 2**31)
    for shape in SHAPES:
        for blocksize in (32, 64, 4096):
            w = (torch.randn(shape) * torch.rand(shape[0], 1) * 3).to(dtype)
            p_ref, s_ref = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                              quant_type=quant_type)
            p, s = nf4.quantize_4bit(w, blocksize, quant_type, double_quant)
            where = f"{shape} blocksize {blocksize}"
            assert p.shape == p_ref.shape and torch.equal(p, p_ref), where
            assert torch.equal(s.absmax, s_ref.absmax), where
            assert torch.equal(s.code, s_ref.code)
            if double_quant:
                assert s_ref.nested and s.nested
                assert torch.equal(s.nested_absmax, s_ref.state2.absmax), where
                assert torch.equal(s.offset, s_ref.offset), where
                assert torch.equal(s.nested_code, s_ref.state2.code)
            out = nf4.dequantize_4bit(p, s)
            assert out.dtype == dtype and out.shape == w.shape
            generic = _bnb_generic_dequant(p_ref, s.block_absmax(), blocksize, w.shape, dtype, quant_type)
            assert torch.equal(out, generic), where
            if _bnb_cpu_kernel_ok(shape, blocksize):
                assert torch.equal(out, bnbf.dequantize_4bit(p_ref, s_ref)), where
            # dequantise of bitsandbytes' own packing and state, read through state_from_bnb
            assert torch.equal(nf4.dequantize_4bit(p_ref, nf4.state_from_bnb(s_ref)), out), where


def test_quantization_error_is_bounded():
    """Every dequantised value is within half the largest NF4 gap (0.16) of the block absmax."""
    w = torch.randn(37, 129, dtype=torch.float64).float()
    p, s = nf4.quantize_4bit(w, 64)
    err = (nf4.dequantize_4bit(p, s) - w).abs().reshape(-1)
    n = w.numel()
    absmax = s.block_absmax().repeat_interleave(64)[:n]
    assert (err <= absmax * 0.1523 + 1e-7).all()  # max midpoint gap of the NF4 code / 2
    assert err.max() > 0


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float16, torch.float32, torch.int8])
def test_quant_storage_views(bnbf, storage):
    w = torch.randn(24, 40)
    p_ref, _ = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=storage)
    p, s = nf4.quantize_4bit(w, 64, quant_storage=storage)
    assert p.dtype == storage and p.shape == p_ref.shape
    assert torch.equal(nf4.packed_bytes(p), nf4.packed_bytes(p_ref))
    as_bytes = nf4.as_storage(nf4.packed_bytes(p), torch.uint8)
    assert torch.equal(nf4.dequantize_4bit(p, s), nf4.dequantize_4bit(as_bytes, s))


def test_dynamic_code_and_nested_quantizer_match_bitsandbytes(bnbf):
    assert torch.equal(nf4.dynamic_code(), bnbf.create_dynamic_map())
    for n in (1, 255, 256, 700):
        a = torch.randn(n) * 0.01
        q_ref, s_ref = bnbf.quantize_blockwise(a, blocksize=256)
        q, am = nf4.quantize_blockwise_8bit(a, nf4.dynamic_code(), 256)
        assert torch.equal(q, q_ref) and torch.equal(am, s_ref.absmax)
        back = nf4.dequantize_blockwise_8bit(q, am, nf4.dynamic_code(), 256)
        assert torch.equal(back, bnbf.dequantize_blockwise(q_ref, s_ref))


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trip_with_bitsandbytes(bnbf, double_quant):
    w = torch.randn(48, 72, dtype=torch.bfloat16)
    p, s = nf4.quantize_4bit(w, 64, double_quant=double_quant)
    d = nf4.state_to_dict(s)
    _, s_ref = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    d_ref = s_ref.as_dict(packed=True)
    assert sorted(d) == sorted(d_ref)
    for k in d:
        assert torch.equal(d[k], d_ref[k]), k  # the JSON metadata bytes too
    back = nf4.state_from_dict({"weight." + k: v for k, v in d.items()})
    assert torch.equal(nf4.dequantize_4bit(p, back), nf4.dequantize_4bit(p, s))
    bnb_back = bnbf.QuantState.from_dict(dict(d), device=torch.device("cpu"))
    assert torch.equal(bnbf.dequantize_4bit(p, bnb_back), nf4.dequantize_4bit(p, s))


def test_bad_input_errors_name_the_problem():
    with pytest.raises(ValueError, match="blocksize"):
        nf4.quantize_4bit(torch.randn(4, 4), blocksize=48)
    with pytest.raises(ValueError, match="quant_type"):
        nf4.quantize_4bit(torch.randn(4, 4), quant_type="int4")
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        nf4.quantize_4bit(torch.randn(4, 4, dtype=torch.float64))
    p, s = nf4.quantize_4bit(torch.randn(8, 8), 32)
    with pytest.raises(ValueError, match="codes"):
        nf4.dequantize_4bit(p[:3], s)
    with pytest.raises(ValueError, match="bitsandbytes__nf4"):
        nf4.state_from_dict({"absmax": s.absmax, "quant_map": s.code})


@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("double_quant", [False, True])
def test_c_extension_dequantize_equals_the_aten_path(monkeypatch, blocksize, double_quant):
    """fastpeft._C's one-pass CPU dequantisation (what the QLoRA layer runs on a CPU) gives the aten
    path's bits: fp32 and bf16 out, nf4 and fp4, a ragged last block, a bf16 quant_storage view."""
    from fastpeft import _cext

    probe, probe_state = nf4.quantize_4bit(torch.ones(4, 64), 64, "nf4", double_quant)
    if _cext.dequant_4bit(nf4.packed_bytes(probe), probe_state, 256, torch.float32) is None:
        pytest.skip(f"fastpeft._C is not built or predates the loop: {_cext.why_unavailable()}")
    g = torch.Generator().manual_seed(blocksize + double_quant)
    for quant_type in ("nf4", "fp4"):
        for shape, storage in (((48, 70), torch.uint8), ((130, 33), torch.uint8), ((64, 64), torch.bfloat16)):
            w = torch.randn(*shape, generator=g) * 0.1
            packed, state = nf4.quantize_4bit(w, blocksize, quant_type, double_quant, storage)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                fast = nf4.dequantize_4bit(packed, state, dtype)
                with monkeypatch.context() as mp:
                    mp.setattr(_cext, "dequant_4bit", lambda *a, **k: None)
                    slow = nf4.dequantize_4bit(packed, state, dtype)
                assert fast.dtype == slow.dtype == dtype and fast.shape == slow.shape == w.shape
                assert torch.equal(fast, slow), (quant_type, shape, dtype)
