"""Activation memory: what fastpeft keeps for backward, per op and per method, never more than HF PEFT.

Saved bytes are counted with saved_tensors_hooks (fastpeft.bench.saved_bytes), each storage once,
parameters left out.  The per-op tests pin the exact minimum each backward needs, so a change that
saves one tensor more fails; the per-method tests compare whole models with PEFT on the same batch."""

import copy
import os

import pytest
import torch

import fastpeft
from fastpeft.bench import saved_bytes as sb
from fastpeft.ops import ia3_linear, lora_linear

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not INTERPRETER, reason="TRITON_INTERPRET=1"))]

M, K, N, R = 24, 40, 56, 8
F32 = 4


def _frozen_layer():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, K, generator=g), torch.randn(N, generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_op_saves_x_once_and_the_rank_r_intermediate(backend, dropout):
    w, b = _frozen_layer()
    a = torch.randn(R, K, requires_grad=True)
    bb = torch.randn(N, R, requires_grad=True)
    x = torch.randn(M, K, requires_grad=True)
    with fastpeft.use_backend(backend):
        n, y = sb.saved_bytes(lambda: lora_linear(x, w, b, a, bb, 2.0, dropout, training=True), [w, b, a, bb])
        y.sum().backward()
    assert n <= (M * K + M * R) * F32, f"lora_linear saved {n} bytes; x and s need {(M * K + M * R) * F32}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_op_q_k_v_share_one_saved_input(backend):
    w, b = _frozen_layer()
    x = torch.randn(M, K, requires_grad=True)
    adapters = [(torch.randn(R, K, requires_grad=True), torch.randn(N, R, requires_grad=True)) for _ in range(3)]
    params = [w, b] + [t for pair in adapters for t in pair]
    with fastpeft.use_backend(backend):
        n, ys = sb.saved_bytes(lambda: [lora_linear(x, w, b, a, bb, 1.0) for a, bb in adapters], params)
        sum(y.sum() for y in ys).backward()
    assert n <= (M * K + 3 * M * R) * F32, f"three projections of one x saved {n} bytes"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_op_saves_one_tensor(backend, feedforward):
    w, b = _frozen_layer()
    scale = (torch.rand(K if feedforward else N) + 0.5).requires_grad_(True)
    x = torch.randn(M, K, requires_grad=True)
    with fastpeft.use_backend(backend):
        n, y = sb.saved_bytes(lambda: ia3_linear(x, w, b, scale, feedforward), [w, b, scale])
        y.sum().backward()
    need = M * K if feedforward else M * N  # input scaling keeps x; output scaling the pre-scale output
    assert n <= need * F32, f"ia3_linear (feedforward={feedforward}) saved {n} bytes; its backward needs {need * F32}"


@pytest.fixture(scope="module")
def torch_rows():
    return {r["case"]: r for r in sb.memory_rows()}


@pytest.mark.parametrize("case", [c.name for c in sb.CASES])
def test_method_saves_no_more_than_peft(torch_rows, case):
    row = torch_rows[case]
    assert row["peft"] is not None
    assert row["fastpeft"] <= row["peft"], (f"{case}: fastpeft saves {row['fastpeft']} bytes for backward, "
                                            f"PEFT {row['peft']}")
    assert row["fastpeft"] >= row["floor"] * 0.5  # the counter really saw the model's activations


def test_lora_dropout_keeps_no_mask(torch_rows):
    row = torch_rows["lora_dropout"]
    assert row["fastpeft"] <= 0.70 * row["peft"], f"LoRA dropout: {row['fastpeft'] / row['peft']:.2f}x PEFT's bytes"
    assert row["fastpeft"] == torch_rows["lora"]["fastpeft"], "dropout made fastpeft save more"


@pytest.mark.parametrize("case", sb.CASES, ids=lambda c: c.name)
def test_compiled_model_saves_no_more_than_compiled_peft(case, one_thread):
    """Under torch.compile(fullgraph=True) too: the partitioner of fastpeft's graph keeps no more than that
    of PEFT's (on the CPU the adapted projections trace as aten ops, so it may recompute cheap inputs)."""
    peft = pytest.importorskip("peft")
    base, data = sb.tiny_llama(), sb.batch(B=1, T=16)
    got = {}
    for name, lib in (("peft", peft), ("fastpeft", fastpeft)):
        torch._dynamo.reset()
        got[name] = sb.compiled_saved_bytes(lib.get_peft_model(copy.deepcopy(base), case.config(lib)), data)
    assert 0 < got["fastpeft"] <= got["peft"], f"compiled {case.name}: fastpeft {got['fastpeft']} > PEFT {got['peft']}"
    if case.name == "lora_dropout":  # no mask kept in the compiled graph either
        assert got["fastpeft"] <= 0.8 * got["peft"]


@pytest.mark.skipif(not INTERPRETER, reason="the Triton kernels run on the CPU only under TRITON_INTERPRET=1")
def test_triton_path_saves_no_more_than_peft_for_every_method():
    names = [c.name for c in sb.CASES]
    with fastpeft.use_backend("triton"):
        rows = sb.memory_rows(names, B=1, T=16)
        assert fastpeft.backend.last_backend("prefix_attention") == "triton"
    with fastpeft.use_backend("torch"):
        same = {r["case"]: r for r in sb.memory_rows(names, B=1, T=16)}
    for r in rows:
        assert r["fastpeft"] <= r["peft"], f"triton {r['case']}: {r['fastpeft']} > PEFT {r['peft']}"
        if r["case"].startswith(("lora", "ia3")):  # the fused GEMMs keep exactly what the torch path keeps
            assert r["fastpeft"] == same[r["case"]]["fastpeft"], f"triton and torch paths save differently: {r['case']}"


def test_format_rows_names_every_case(torch_rows):
    text = sb.format_rows(list(torch_rows.values()))
    for case in sb.CASES:
        assert case.description in text


# ------------------------------------------------------------------ gradient checkpointing
def _lora_model(dropout):
    base = sb.tiny_llama(seed=3)
    model = fastpeft.get_peft_model(base, fastpeft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                             lora_dropout=dropout, target_modules=sb.LINEARS))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.train()


def _grads(model, data, seed):
    model.zero_grad()
    torch.manual_seed(seed)
    model(**data).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_plain_gradients_with_dropout(backend, reentrant):
    data = sb.batch(B=1, T=16)
    with fastpeft.use_backend(backend):
        model = _lora_model(0.1)
        plain = _grads(model, data, seed=11)
        other = _grads(model, data, seed=12)
        checked = copy.deepcopy(model)
        base = checked.get_base_model()
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            base.enable_input_require_grads()
        assert base.is_gradient_checkpointing
        again = _grads(checked, data, seed=11)
    assert any(not torch.equal(plain[n], other[n]) for n in plain), "dropout drew the same mask for two seeds"
    for n in plain:
        torch.testing.assert_close(again[n], plain[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
