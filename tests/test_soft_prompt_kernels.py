"""soft_prompt_embed: the reference against float64 math (CPU), and the CUDA C++ kernels of
fastpeft._C against the reference, forward and backward (GPU)."""

import pytest
import torch

from fastpeft import _cext, backend
from fastpeft.ops import soft_prompt_embed
from fastpeft.ops.soft_prompt import (prompt_positions_of, reference_backward, reference_embedding_backward,
                                      reference_forward, template_slots)

from tests.utils import assert_close, build_emulated_cext
from tests.utils import cext_on_cpu as _cext_on_cpu

OP = "soft_prompt_embed"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def math_forward(input_ids, weight, table, prompt_index):
    """Row by row in float64: [table[prompt_index[b]] ; weight[input_ids[b]]]."""
    rows = []
    for b in range(input_ids.shape[0]):
        prompt = table if prompt_index is None else table[int(prompt_index[b])]
        words = torch.stack([weight[int(i)] for i in input_ids[b]]) if input_ids.shape[1] else weight[:0]
        rows.append(torch.cat([prompt.double(), words.double()]))
    return torch.stack(rows)


def math_backward(dout, input_ids, prompt_index, num_prompts, num_words):
    """(d_table, d_weight) by explicit float64 loops."""
    B, S, H = dout.shape
    P = S - input_ids.shape[1]
    d_table = torch.zeros((num_prompts, P, H), dtype=torch.float64)
    d_weight = torch.zeros((num_words, H), dtype=torch.float64)
    for b in range(B):
        n = 0 if prompt_index is None else int(prompt_index[b])
        d_table[n] += dout[b, :P].double()
        for t, i in enumerate(input_ids[b]):
            d_weight[int(i)] += dout[b, P + t].double()
    return (d_table[0] if prompt_index is None else d_table), d_weight


def make_inputs(B, T, P, H, V, N, dtype, table_dtype, device, shared):
    input_ids = torch.randint(0, V, (B, T), device=device)
    input_ids[:, : T // 2] = input_ids[0, : T // 2].clone()  # repeated ids: the scatter must add them
    weight = torch.randn(V, H, dtype=dtype, device=device)
    table = torch.randn((P, H) if shared else (N, P, H), dtype=table_dtype, device=device)
    prompt_index = None if shared else torch.randint(0, N, (B,), device=device)
    return input_ids, weight, table, prompt_index


# ---- the reference is the specification: check it against float64 math (CPU) ------------------

@pytest.mark.parametrize("shared", [True, False], ids=["shared", "prompt_index"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_float64_math(shared, dtype):
    B, T, P, H, V, N = 3, 7, 4, 10, 20, 3
    input_ids, weight, table, prompt_index = make_inputs(B, T, P, H, V, N, dtype, torch.float32, "cpu", shared)
    out = reference_forward(input_ids, weight, table, prompt_index)
    assert out.dtype == dtype and out.shape == (B, P + T, H)
    expected = math_forward(input_ids, weight, table.to(dtype), prompt_index)
    assert torch.equal(out.double(), expected)  # a gather and a cast: exact

    dout = torch.randn(B, P + T, H, dtype=dtype)
    d_table = reference_backward(dout, input_ids, prompt_index, 1 if shared else N, torch.float32)
    d_weight = reference_embedding_backward(dout, input_ids, V, dtype)
    want_table, want_weight = math_backward(dout, input_ids, prompt_index, 1 if shared else N, V)
    assert d_table.dtype == torch.float32 and d_weight.dtype == dtype
    assert_close(d_table, want_table, torch.float32, what="d_table")
    assert_close(d_weight, want_weight, dtype, what="d_weight")


def test_reference_autograd_matches_float64_math():
    B, T, P, H, V, N = 4, 5, 3, 6, 12, 2
    input_ids, weight, table, prompt_index = make_inputs(B, T, P, H, V, N, torch.float32, torch.float32, "cpu", False)
    weight.requires_grad_(True)
    table.requires_grad_(True)
    out = soft_prompt_embed(input_ids, weight, table, prompt_index)
    assert backend.last_backend(OP) == "torch"
    dout = torch.randn_like(out)
    out.backward(dout)
    want_table, want_weight = math_backward(dout, input_ids, prompt_index, N, V)
    assert_close(table.grad, want_table, what="d_table")
    assert_close(weight.grad, want_weight, what="d_weight")


# ---- CUDA kernels against the reference (GPU) ---------------------------------------------------

def _require_cuda_backend():
    if not _cext.available():
        pytest.skip(f"fastpeft._C not built: {_cext.why_unavailable()}")
    why = _cext.why_not_device(torch.device("cuda"))
    if why:
        pytest.skip(why)


# H=128: 16-byte vectors for every dtype; H=100: vectors for fp32 only (100 % 4 == 0), scalar for
# fp16/bf16; H=37: scalar for all.
SHAPES = [(2, 9, 4, 128, 50, 3), (3, 16, 8, 100, 64, 4), (1, 5, 3, 37, 11, 2), (4, 0, 6, 64, 10, 3)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}P{}H{}".format(*s[:4]))
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "prompt_index"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("table_fp32", [False, True], ids=["table_same", "table_fp32"])
def test_cuda_forward_backward_match_reference(shape, shared, dtype, table_fp32):
    _require_cuda_backend()
    B, T, P, H, V, N = shape
    table_dtype = torch.float32 if table_fp32 else dtype
    input_ids, weight, table, prompt_index = make_inputs(B, T, P, H, V, N, dtype, table_dtype, "cuda", shared)
    weight.requires_grad_(True)
    table.requires_grad_(True)

    out = soft_prompt_embed(input_ids, weight, table, prompt_index)
    assert backend.last_backend(OP) == "cuda"
    expected = reference_forward(input_ids, weight.detach(), table.detach(), prompt_index)
    assert out.dtype == dtype and torch.equal(out, expected)  # gather + cast: bitwise equal

    dout = torch.randn_like(out)
    out.backward(dout)
    assert backend.last_backend(OP) == "cuda"
    num_prompts = 1 if shared else N
    want_table = reference_backward(dout, input_ids, prompt_index, num_prompts, table_dtype)
    want_weight = reference_embedding_backward(dout, input_ids, V, dtype)
    assert table.grad.dtype == table_dtype and weight.grad.dtype == dtype
    assert_close(table.grad, want_table, table_dtype, what="d_table vs reference")
    assert_close(weight.grad, want_weight, dtype, what="d_weight vs reference")
    math_table, math_weight = math_backward(dout.cpu(), input_ids.cpu(), None if shared else prompt_index.cpu(),
                                            num_prompts, V)
    assert_close(table.grad.cpu(), math_table, table_dtype, what="d_table vs float64")
    assert_close(weight.grad.cpu(), math_weight, dtype, what="d_weight vs float64")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_frozen_embeddings_and_strided_inputs(dtype):
    """Only the prompt trains (PEFT's usual case); weight rows strided and misaligned (scalar path)."""
    _require_cuda_backend()
    B, T, P, H, V = 3, 12, 5, 64, 40
    wide = torch.randn(V, H + 3, dtype=dtype, device="cuda")
    weight = wide[:, 1 : H + 1]  # row stride H+3, base offset by one element: not 16-byte aligned
    input_ids = torch.randint(0, V, (T, B), device="cuda").t()  # non-contiguous ids
    table = torch.randn(P, H, dtype=torch.float32, device="cuda", requires_grad=True)
    out = soft_prompt_embed(input_ids, weight, table)
    assert backend.last_backend(OP) == "cuda"
    assert torch.equal(out, reference_forward(input_ids, weight, table.detach(), None))
    dout = torch.randn_like(out)
    out.backward(dout)
    assert_close(table.grad, reference_backward(dout, input_ids, None, 1, torch.float32), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "prompt_index"])
def test_cuda_backward_is_deterministic(dtype, shared):
    """The table backward never uses atomics; the word-embedding backward in deterministic mode
    sorts ids: both give bitwise-identical results run after run."""
    _require_cuda_backend()
    B, T, P, H, V, N = 8, 256, 16, 256, 32, 3  # few words: many repeated ids
    input_ids, _, _, prompt_index = make_inputs(B, T, P, H, V, N, dtype, dtype, "cuda", shared)
    dout = torch.randn(B, P + T, H, dtype=dtype, device="cuda")
    num_prompts = 1 if shared else N
    tables = [_cext.soft_prompt_backward(dout, input_ids, prompt_index, num_prompts, torch.float32) for _ in range(5)]
    assert all(torch.equal(tables[0], t) for t in tables[1:])
    words = [_cext.soft_prompt_embedding_backward(dout, input_ids, V, dtype, deterministic=True) for _ in range(5)]
    assert all(torch.equal(words[0], w) for w in words[1:])
    want = reference_embedding_backward(dout, input_ids, V, dtype)
    assert_close(words[0], want, dtype, what="deterministic d_weight")
    fast = _cext.soft_prompt_embedding_backward(dout, input_ids, V, dtype, deterministic=False)
    assert_close(fast, want, dtype, what="atomic d_weight")


@pytest.mark.gpu
def test_cuda_deterministic_mode_follows_torch_setting():
    _require_cuda_backend()
    B, T, P, H, V = 4, 64, 4, 32, 8
    input_ids, weight, table, _ = make_inputs(B, T, P, H, V, 1, torch.bfloat16, torch.float32, "cuda", True)
    weight.requires_grad_(True)
    grads = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(3):
            weight.grad = None
            soft_prompt_embed(input_ids, weight, table).float().pow(2).sum().backward()
            grads.append(weight.grad.clone())
    finally:
        torch.use_deterministic_algorithms(False)
    assert backend.last_backend(OP) == "cuda"
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.mark.gpu
def test_cuda_unused_prompts_get_zero_gradient():
    _require_cuda_backend()
    B, T, P, H, N = 4, 3, 2, 16, 5
    input_ids = torch.randint(0, 9, (B, T), device="cuda")
    prompt_index = torch.tensor([0, 2, 2, 0], device="cuda")
    dout = torch.randn(B, P + T, H, device="cuda")
    d = _cext.soft_prompt_backward(dout, input_ids, prompt_index, N, torch.float32)
    assert torch.equal(d[[1, 3, 4]], torch.zeros_like(d[[1, 3, 4]]))
    assert_close(d, reference_backward(dout, input_ids, prompt_index, N, torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N", [(1, 1), (333, 77), (2048, 512)])
def test_cuda_ia3_scale_grad(dtype, M, N):
    _require_cuda_backend()
    a = torch.randn(M, N, dtype=dtype, device="cuda")
    b = torch.randn(N, M, dtype=dtype, device="cuda").t()  # column-major operand
    want = (a.double() * b.double()).sum(0)
    got = _cext.ia3_scale_grad(a, b)
    assert got.dtype == torch.float32
    assert_close(got, want, torch.float32, scale=max(1.0, M / 100))
    assert torch.equal(got, _cext.ia3_scale_grad(a, b))  # fixed summation order
    assert_close(_cext.ia3_scale_grad(a, b, out_dtype=dtype), want, dtype)


# ---- the same kernels on CPU threads (csrc/emulate.h): their logic, tested without a GPU -------

@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """fastpeft._C's soft-prompt and IA3 sources built with the host compiler and -DFASTPEFT_EMULATE."""
    return build_emulated_cext(tmp_path_factory.mktemp("emu"), "_C_emu", ["soft_prompt.cu", "ia3.cu"])


@pytest.fixture
def cext_on_cpu(emulated, monkeypatch):
    """fastpeft._cext's wrappers driving the CPU-emulated kernels on CPU tensors."""
    return _cext_on_cpu(emulated, monkeypatch)


EMU_SHAPES = [(2, 9, 4, 128, 50, 3), (3, 16, 8, 100, 64, 4), (1, 5, 3, 37, 11, 2), (4, 0, 6, 64, 10, 3),
              (9, 40, 2, 8, 7, 5)]


@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: "B{}T{}P{}H{}".format(*s[:4]))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("table_fp32", [False, True], ids=["table_same", "table_fp32"])
def test_emulated_kernels_match_reference(cext_on_cpu, shape, dtype, table_fp32):
    B, T, P, H, V, N = shape
    table_dtype = torch.float32 if table_fp32 else dtype
    for shared in (True, False):
        input_ids, weight, table, prompt_index = make_inputs(B, T, P, H, V, N, dtype, table_dtype, "cpu", shared)
        out = cext_on_cpu.soft_prompt_forward(input_ids, weight, table, prompt_index)
        assert torch.equal(out, reference_forward(input_ids, weight, table, prompt_index))
        dout = torch.randn_like(out)
        num_prompts = 1 if shared else N
        d_table = cext_on_cpu.soft_prompt_backward(dout, input_ids, prompt_index, num_prompts, table_dtype)
        want = reference_backward(dout, input_ids, prompt_index, num_prompts, table_dtype)
        assert d_table.dtype == table_dtype
        assert_close(d_table, want, table_dtype, what=f"d_table shared={shared}")
        want = reference_embedding_backward(dout, input_ids, V, dtype)
        for deterministic in (True, False):
            d_weight = cext_on_cpu.soft_prompt_embedding_backward(dout, input_ids, V, dtype, deterministic)
            assert d_weight.dtype == dtype
            assert_close(d_weight, want, dtype, what=f"d_weight deterministic={deterministic}")


def test_emulated_kernels_strided_inputs(cext_on_cpu):
    wide = torch.randn(40, 67, dtype=torch.bfloat16)
    weight = wide[:, 1:65]  # row stride 67, base one element off 16-byte alignment: scalar path
    input_ids = torch.randint(0, 40, (12, 3)).t()
    table = torch.randn(5, 64)
    out = cext_on_cpu.soft_prompt_forward(input_ids, weight, table)
    assert torch.equal(out, reference_forward(input_ids, weight, table, None))
    dout = torch.randn(3, 15, 80, dtype=torch.bfloat16)[:, :, :64]  # sequence stride 80
    d_table = cext_on_cpu.soft_prompt_backward(dout, input_ids, None, 1, torch.float64)  # computed in fp32, cast
    assert d_table.dtype == torch.float64
    assert_close(d_table, reference_backward(dout, input_ids, None, 1, torch.float64), torch.float32)
    d_weight = cext_on_cpu.soft_prompt_embedding_backward(dout, input_ids, 40, torch.bfloat16, True)
    assert_close(d_weight, reference_embedding_backward(dout, input_ids, 40, torch.bfloat16), torch.bfloat16)


def test_emulated_kernels_flag_bad_indices(cext_on_cpu):
    """An out-of-range id or prompt_index is never read: it is flagged and the wrapper's
    asynchronous assertion (synchronous on CPU) raises."""
    weight, table = torch.randn(10, 16), torch.randn(2, 3, 16)
    with pytest.raises(RuntimeError, match="out of range"):
        cext_on_cpu.soft_prompt_forward(torch.tensor([[1, 99, 2]]), weight, table[0])
    with pytest.raises(RuntimeError, match="out of range"):
        cext_on_cpu.soft_prompt_forward(torch.tensor([[1]]), weight, table, torch.tensor([2]))
    for deterministic in (True, False):
        with pytest.raises(RuntimeError, match="out of range"):
            cext_on_cpu.soft_prompt_embedding_backward(torch.randn(1, 5, 16), torch.tensor([[1, -1, 2]]), 10,
                                                       torch.float32, deterministic)


def make_template(B, T, P, V, device, marker=None):
    """(input_ids, slots): P prompt positions per row in random places (marker ids there, by default
    outside the vocabulary: the kernels must never read them), random words elsewhere."""
    marker = V + 3 if marker is None else marker
    input_ids = torch.randint(0, V, (B, T))
    for b in range(B):
        input_ids[b, torch.randperm(T)[:P]] = marker
    slots = template_slots(P, input_ids, prompt_token_id=marker)
    return input_ids.to(device), slots.to(device)


def check_templated(fwd, table_bwd, weight_bwd, shape, dtype, table_dtype, device, shared, deterministic_modes):
    """A backend's templated kernels (forward, table backward, word backward) against the reference."""
    B, T, P, H, V, N = shape
    input_ids, slots = make_template(B, T, P, V, device)
    _, weight, table, prompt_index = make_inputs(B, T, P, H, V, N, dtype, table_dtype, device, shared)
    out = fwd(input_ids, weight, table, prompt_index, slots)
    assert out.shape == (B, T, H) and torch.equal(out, reference_forward(input_ids, weight, table, prompt_index, slots))
    dout = torch.randn_like(out)
    num_prompts = 1 if shared else N
    positions = prompt_positions_of(slots, P)
    d_table = table_bwd(dout, input_ids, prompt_index, num_prompts, table_dtype, positions)
    want = reference_backward(dout, input_ids, prompt_index, num_prompts, table_dtype, positions)
    assert d_table.dtype == table_dtype
    assert_close(d_table, want, table_dtype, what=f"templated d_table shared={shared}")
    want = reference_embedding_backward(dout, input_ids, V, dtype, slots)
    for deterministic in deterministic_modes:
        d_weight = weight_bwd(dout, input_ids, V, dtype, deterministic, slots)
        assert_close(d_weight, want, dtype, what=f"templated d_weight deterministic={deterministic}")
    # the reference against float64 math: the hand-written row-by-row meaning
    rows = []
    for b in range(B):
        prompt = table if prompt_index is None else table[int(prompt_index[b])]
        rows.append(torch.stack([prompt[int(s)].to(dtype) if s >= 0 else weight[int(i)]
                                 for i, s in zip(input_ids[b], slots[b])]))
    assert torch.equal(out, torch.stack(rows))


TEMPLATE_SHAPES = [(2, 9, 4, 128, 50, 3), (3, 16, 8, 100, 64, 4), (1, 5, 3, 37, 11, 2), (4, 6, 6, 64, 10, 3),
                   (9, 40, 2, 8, 7, 5)]


@pytest.mark.parametrize("shape", TEMPLATE_SHAPES, ids=lambda s: "B{}T{}P{}H{}".format(*s[:4]))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_templated_kernels_match_reference(cext_on_cpu, shape, dtype):
    """Templates (the prompt's tokens at slot positions, marker ids never read) in the CUDA kernels' logic."""
    for shared in (True, False):
        for table_dtype in (dtype, torch.float32):
            check_templated(cext_on_cpu.soft_prompt_forward,
                            lambda *a: cext_on_cpu.soft_prompt_backward(*a[:5], positions=a[5]),
                            lambda *a: cext_on_cpu.soft_prompt_embedding_backward(*a[:5], slots=a[5]),
                            shape, dtype, table_dtype, "cpu", shared, (True, False))


def test_emulated_templated_kernels_flag_bad_indices(cext_on_cpu):
    """A word id out of range is flagged; a marker id out of range at a prompt position is not an error."""
    weight, table = torch.randn(10, 16), torch.randn(2, 16)
    slots = torch.tensor([[0, -1, 1, -1]])
    out = cext_on_cpu.soft_prompt_forward(torch.tensor([[999, 3, -7, 4]]), weight, table, None, slots)
    assert torch.equal(out, reference_forward(torch.tensor([[0, 3, 0, 4]]), weight, table, None, slots))
    with pytest.raises(RuntimeError, match="out of range"):
        cext_on_cpu.soft_prompt_forward(torch.tensor([[999, 30, 1, 4]]), weight, table, None, slots)
    dout = torch.randn(1, 4, 16)
    for deterministic in (True, False):
        d = cext_on_cpu.soft_prompt_embedding_backward(dout, torch.tensor([[999, 3, -7, 4]]), 10, torch.float32,
                                                       deterministic, slots=slots)
        assert_close(d, reference_embedding_backward(dout, torch.tensor([[0, 3, 0, 4]]), 10, torch.float32, slots))
        with pytest.raises(RuntimeError, match="out of range"):
            cext_on_cpu.soft_prompt_embedding_backward(dout, torch.tensor([[999, 30, -7, 4]]), 10, torch.float32,
                                                       deterministic, slots=slots)
    with pytest.raises(RuntimeError, match="out of range"):
        cext_on_cpu.soft_prompt_backward(dout, torch.tensor([[1, 2, 3, 4]]), None, 1, torch.float32,
                                         positions=torch.tensor([[0, 4]]))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", TEMPLATE_SHAPES[:3], ids=lambda s: "B{}T{}P{}H{}".format(*s[:4]))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_templated_kernels_match_reference(shape, dtype):
    _require_cuda_backend()
    for shared in (True, False):
        check_templated(_cext.soft_prompt_forward,
                        lambda *a: _cext.soft_prompt_backward(*a[:5], positions=a[5]),
                        lambda *a: _cext.soft_prompt_embedding_backward(*a[:5], slots=a[5]),
                        shape, dtype, torch.float32, "cuda", shared, (True, False))
    # through the op: the cuda backend chosen, templated gradients into the table and the embeddings
    B, T, P, H, V, N = shape
    input_ids, slots = make_template(B, T, P, V, "cuda")
    _, weight, table, prompt_index = make_inputs(B, T, P, H, V, N, dtype, torch.float32, "cuda", False)
    weight.requires_grad_(True)
    table.requires_grad_(True)
    out = soft_prompt_embed(input_ids, weight, table, prompt_index, slots=slots)
    assert backend.last_backend(OP) == "cuda"
    dout = torch.randn_like(out)
    out.backward(dout)
    positions = prompt_positions_of(slots, P)
    assert_close(table.grad, reference_backward(dout, input_ids, prompt_index, N, torch.float32, positions),
                 torch.float32)
    assert_close(weight.grad, reference_embedding_backward(dout, input_ids, V, dtype, slots), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_ia3_scale_grad(cext_on_cpu, dtype):
    for M, N in [(1, 1), (333, 77), (64, 300)]:
        a = torch.randn(M, N, dtype=dtype)
        b = torch.randn(N, M, dtype=dtype).t()
        want = (a.double() * b.double()).sum(0)
        assert_close(cext_on_cpu.ia3_scale_grad(a, b), want, torch.float32)
        assert_close(cext_on_cpu.ia3_scale_grad(a, b, out_dtype=dtype), want, dtype)
