"""Bytes autograd keeps for the backward of one training forward (each storage once, parameters
left out), fastpeft vs HF PEFT on the same tiny model and batch: fastpeft must not keep more."""

import copy

import peft
import pytest
import torch

import fastpeft
from tests.models import tiny_llama

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "ia3": lambda lib: lib.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "ia3_output": lambda lib: lib.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=[]),
    "lora": lambda lib: lib.LoraConfig(r=8, target_modules=LINEARS),
    "lora_dropout": lambda lib: lib.LoraConfig(r=8, lora_dropout=0.1, target_modules=LINEARS),
}


def saved_bytes(model, ids) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize("method", list(CONFIGS))
def test_saved_for_backward_at_most_pefts(method):
    base = tiny_llama(seed=0, hidden_size=64, intermediate_size=176).train()
    ids = torch.randint(0, 97, (2, 32))
    theirs = peft.get_peft_model(copy.deepcopy(base), CONFIGS[method](peft)).train()
    ours = fastpeft.get_peft_model(copy.deepcopy(base), CONFIGS[method](fastpeft)).train()
    a, b = saved_bytes(ours, ids), saved_bytes(theirs, ids)
    assert a <= b, f"{method}: fastpeft keeps {a} bytes for the backward, PEFT {b}"
    if method == "lora_dropout":  # no mask kept: well below PEFT's mask + dropped copy
        assert a <= 0.8 * b, f"{method}: fastpeft keeps {a} bytes, more than 0.8x PEFT's {b}"


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_op_saves_only_what_its_backward_needs(feedforward):
    """Output scaling keeps one M×N tensor (the pre-scale output), input scaling keeps x: only
    when l is trained; a frozen W never makes its input be kept beyond that."""
    m, k, n = 16, 24, 40
    x = torch.randn(m, k, requires_grad=True)
    w = torch.randn(n, k)
    l = torch.nn.Parameter(torch.rand(k if feedforward else n) + 0.5)
    kept = []

    def pack(t):
        kept.append(t)
        return t

    for l_trained in (True, False):
        kept.clear()
        l.requires_grad_(l_trained)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = fastpeft.ops.ia3_linear(x, w, None, l, feedforward)
        activations = [t for t in kept if t is not None and t.dim() == 2 and t.shape[0] == m]
        if l_trained:
            assert [tuple(t.shape) for t in activations] == [(m, k) if feedforward else (m, n)]
        else:
            assert activations == []
        y.sum().backward()
    assert x.grad is not None
