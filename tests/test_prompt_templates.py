"""Templates for prompt tuning and P-tuning (issue 19): pseudo-token positions anywhere in the input,
marked by a token id in input_ids or a `prompt_positions` mask, any number of segments, written inside
the embedding gather.  Everything is checked against a hand-built embedding sequence: the op (reference,
the torch path, Triton under TRITON_INTERPRET=1, torch.compile), and the model (forward and gradients,
mixed-task batches, training, generate, save/load, encoder-decoder models)."""

import json
import os

import pytest
import torch

import fastpeft
from fastpeft import backend
from fastpeft.ops import soft_prompt_embed
from fastpeft.ops.soft_prompt import (prompt_positions_of, reference_backward, reference_embedding_backward,
                                      reference_forward, template_slots)
from tests.models import left_padded, tiny_bart, tiny_llama, tiny_t5, twin
from tests.peft_parity import assert_mixed_batch_equals_each_task_alone
from tests.utils import assert_close

OP = "soft_prompt_embed"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
V = 97
MARK = 150  # a marker id outside the tiny models' vocabulary: never gathered
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning")]


# ---- helpers ----------------------------------------------------------------------------------

def random_template(B, T, P, vocab, marker, segments=None, generator=None):
    """(input_ids, mask): each row holds P prompt positions (marker ids) in random places among random words;
    `segments` forces that many contiguous segments per row (P-tuning's [P][P][P] Britain [P][P][P])."""
    ids = torch.randint(0, vocab, (B, T), generator=generator)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        if segments is None:
            where = torch.randperm(T, generator=generator)[:P]
        else:
            sizes = [P // segments + (1 if k < P % segments else 0) for k in range(segments)]
            gaps = T - P
            starts, pos = [], 0
            cuts = sorted(torch.randint(0, gaps + 1, (segments,), generator=generator).tolist())
            for k, size in enumerate(sizes):
                pos = max(pos, cuts[k] + sum(sizes[:k]))
                starts.append(pos)
                pos += size
            where = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, sizes)])
        mask[b, where] = True
    ids[mask] = marker
    return ids, mask


def hand_built(ids, mask, weight, table, index):
    """The embedding sequence written out row by row: the prompt's k-th token at the k-th masked position."""
    rows = []
    for b in range(ids.shape[0]):
        prompt = table if index is None else table[int(index[b])]
        k, row = 0, []
        for t in range(ids.shape[1]):
            if mask[b, t]:
                row.append(prompt[k].to(weight.dtype))
                k += 1
            else:
                row.append(weight[int(ids[b, t])])
        rows.append(torch.stack(row))
    return torch.stack(rows)


def hand_grads(ids, mask, weight, table, index, dout):
    """(d_table, d_weight) of sum(hand_built * dout), by autograd in float64."""
    w = weight.detach().double().requires_grad_(True)
    t = table.detach().double().requires_grad_(True)
    (hand_built(ids, mask, w, t, index) * dout.double()).sum().backward()
    return t.grad, (w.grad if w.grad is not None else torch.zeros_like(w))  # (no word at all: a zero gradient)


SHAPES = [(3, 11, 5, 37, 29, 3), (1, 7, 1, 8, 5, 2), (5, 13, 6, 20, 40, 4), (2, 4, 4, 16, 9, 2)]


# ---- the slot map -----------------------------------------------------------------------------

def test_template_slots_marker_and_mask():
    # P-tuning's example: [P]x3 Britain [P]x3 [MASK]
    britain, mask_id = 11, 12
    ids = torch.tensor([[MARK] * 3 + [britain] + [MARK] * 3 + [mask_id]])
    slots = template_slots(6, ids, prompt_token_id=MARK)
    assert slots.tolist() == [[0, 1, 2, -1, 3, 4, 5, -1]]
    assert torch.equal(template_slots(6, ids, prompt_positions=ids == MARK), slots)
    assert torch.equal(template_slots(6, prompt_positions=(ids == MARK).int()), slots)  # 0/1 integers work too
    assert prompt_positions_of(slots, 6).tolist() == [[0, 1, 2, 4, 5, 6]]


def test_template_slots_errors():
    ids = torch.tensor([[MARK, 3, MARK], [MARK, 4, 5]])
    with pytest.raises(ValueError, match=r"row 1 of the batch has 1 prompt positions .*exactly num_virtual_tokens=2"):
        template_slots(2, ids, prompt_token_id=MARK)
    with pytest.raises(ValueError, match="row 0 .* 2 prompt positions"):
        template_slots(3, ids, prompt_token_id=MARK)
    with pytest.raises(ValueError, match="exactly one of prompt_token_id"):
        template_slots(2, ids)
    with pytest.raises(ValueError, match="exactly one of prompt_token_id"):
        template_slots(2, ids, prompt_token_id=MARK, prompt_positions=ids == MARK)
    with pytest.raises(ValueError, match="bool mask"):
        template_slots(2, ids, prompt_positions=torch.ones(2, 3) * 0.5)
    with pytest.raises(ValueError, match="shape"):
        template_slots(2, ids, prompt_positions=torch.ones(2, 4, dtype=torch.bool))


def test_op_validates_slots():
    w, table = torch.randn(10, 8), torch.randn(2, 8)
    ids = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="each virtual token 0..1 exactly once"):
        soft_prompt_embed(ids, w, table, slots=torch.tensor([[0, 0, -1, -1]]))
    with pytest.raises(ValueError, match=r"slots values must lie in \[-1, 2\)"):
        soft_prompt_embed(ids, w, table, slots=torch.tensor([[0, 2, -1, -1]]))
    with pytest.raises(ValueError, match="slots must be an integer tensor of input_ids' shape"):
        soft_prompt_embed(ids, w, table, slots=torch.tensor([[0, 1, -1]]))
    with pytest.raises(ValueError, match="cannot hold"):
        soft_prompt_embed(ids[:, :1], w, table, slots=torch.tensor([[0]]))
    # a word id outside the vocabulary is named; a marker id outside it is never read
    with pytest.raises(ValueError, match="input_ids at word positions must lie in"):
        soft_prompt_embed(torch.tensor([[99, 1, 2, 3]]), w, table, slots=torch.tensor([[-1, 0, 1, -1]]))
    out = soft_prompt_embed(torch.tensor([[99, 1, 2, 3]]), w, table, slots=torch.tensor([[0, -1, 1, -1]]))
    assert torch.equal(out[0], torch.stack([table[0], w[1], table[1], w[3]]))


# ---- the op against the hand-built sequence ---------------------------------------------------

def _run(path, ids, weight, table, index, slots):
    """The forward through `path` ('reference': plain autograd over reference_forward; 'torch': the op's eager
    path; 'triton': the op with the Triton backend forced, run by the interpreter)."""
    if path == "reference":
        return reference_forward(ids, weight, table, index, slots)
    if path == "torch":
        with backend.use_backend("torch"):
            out = soft_prompt_embed(ids, weight, table, index, slots=slots)
        assert backend.last_backend(OP) == "torch"
        return out
    with backend.use_backend("triton"):
        out = soft_prompt_embed(ids, weight, table, index, slots=slots)
    assert backend.last_backend(OP) == "triton", "the Triton kernel did not run"
    return out


def _triton_ok():
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
    pytest.importorskip("triton")


@pytest.mark.parametrize("path", ["reference", "torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_forward_and_grads_equal_hand_built(path, dtype):
    if path == "triton":
        _triton_ok()
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    for shape_no, (B, T, P, H, Vw, N) in enumerate(SHAPES):
        for shared in (True, False):
            segments = None if shape_no % 2 else min(P, 2 + shape_no)
            ids, mask = random_template(B, T, P, Vw, Vw + 7, segments, g)
            weight = torch.randn(Vw, H, generator=g).to(dtype).requires_grad_(True)
            table_dtype = torch.float32 if shape_no % 2 else dtype  # an fp32 table under a low-precision model too
            table = torch.randn((P, H) if shared else (N, P, H), generator=g).to(table_dtype).requires_grad_(True)
            index = None if shared else torch.randint(0, N, (B,), generator=g)
            slots = template_slots(P, ids, prompt_token_id=Vw + 7)
            out = _run(path, ids, weight, table, index, slots)
            want = hand_built(ids, mask, weight.detach(), table.detach(), index)
            assert out.dtype == dtype and out.shape == (B, T, H)
            assert torch.equal(out, want), f"forward {B, T, P, H} shared={shared}"  # a gather and a cast: exact
            dout = torch.randn(out.shape, generator=g).to(dtype)
            out.backward(dout)
            want_table, want_weight = hand_grads(ids, mask, weight, table, index, dout)
            assert table.grad.dtype == table_dtype and weight.grad.dtype == dtype
            assert_close(table.grad, want_table, table_dtype, what=f"d_table {B, T, P, H} shared={shared}")
            assert_close(weight.grad, want_weight, dtype, what=f"d_weight {B, T, P, H} shared={shared}")


def test_op_frozen_embeddings_and_mask_templates():
    """Only the table trains (the usual case); a mask template whose prompt positions hold arbitrary ids."""
    B, T, P, H, Vw = 4, 10, 3, 12, 20
    ids, mask = random_template(B, T, P, Vw, 0)
    ids[mask] = torch.randint(-5, 10**6, (int(mask.sum()),))  # anything at a prompt position: never read
    weight = torch.randn(Vw, H)
    table = torch.randn(P, H, requires_grad=True)
    slots = template_slots(P, prompt_positions=mask)
    out = soft_prompt_embed(ids, weight, table, slots=slots)
    assert torch.equal(out, hand_built(ids, mask, weight, table.detach(), None))
    dout = torch.randn_like(out)
    out.backward(dout)
    assert_close(table.grad, hand_grads(ids, mask, weight, table, None, dout)[0], torch.float32)


@pytest.mark.parametrize("deterministic", [True, False])
def test_triton_kernels_match_reference(deterministic):
    """The Triton twin's three kernels called directly (both word-gradient modes), templated and prepended."""
    _triton_ok()
    from fastpeft.kernels import soft_prompt as K

    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, T, P, H, Vw, N = 3, 12, 4, 40, 15, 3
    ids, _ = random_template(B, T, P, Vw, Vw + 1, 2)
    slots = template_slots(P, ids, prompt_token_id=Vw + 1)
    ids, slots = ids.to(device), slots.to(device)
    weight = torch.randn(Vw, H, dtype=torch.bfloat16, device=device)
    table = torch.randn(N, P, H, device=device)
    index = torch.randint(0, N, (B,), device=device)
    for sl, word_ids in ((slots, ids), (None, torch.randint(0, Vw, (B, T), device=device))):
        out = K.soft_prompt_forward(word_ids, weight, table, index, sl)
        assert torch.equal(out, reference_forward(word_ids, weight, table, index, sl))
        dout = torch.randn_like(out)
        pos = None if sl is None else prompt_positions_of(sl, P)
        assert_close(K.soft_prompt_table_backward(dout, word_ids, index, N, torch.float32, pos),
                     reference_backward(dout, word_ids, index, N, torch.float32, pos), torch.float32)
        assert_close(K.soft_prompt_embedding_backward(dout, word_ids, Vw, torch.bfloat16, deterministic, slots=sl),
                     reference_embedding_backward(dout, word_ids, Vw, torch.bfloat16, sl), torch.bfloat16)


def test_triton_forward_flags_an_index_out_of_range():
    """The Triton twin raises (a device-side assert; at once on a CPU) on a word id or prompt index out of
    range, as the _C kernels do, instead of writing zeros; a marker id at a prompt position is never read."""
    _triton_ok()
    from fastpeft.kernels import soft_prompt as K

    device = "cuda" if torch.cuda.is_available() else "cpu"
    weight = torch.randn(10, 8, device=device)
    table = torch.randn(2, 3, 8, device=device)
    with pytest.raises(RuntimeError, match="out of range"):
        K.soft_prompt_forward(torch.tensor([[1, 10, 2]], device=device), weight, table[0])
    with pytest.raises(RuntimeError, match="out of range"):
        K.soft_prompt_forward(torch.tensor([[1]], device=device), weight, table, torch.tensor([2], device=device))
    slots = torch.tensor([[0, -1, 1, 2]], device=device)
    out = K.soft_prompt_forward(torch.tensor([[999, 3, -7, 4]], device=device), weight, table[0], None, slots)
    assert torch.equal(out, reference_forward(torch.tensor([[0, 3, 0, 4]], device=device), weight, table[0], None,
                                              slots))
    with pytest.raises(RuntimeError, match="out of range"):
        K.soft_prompt_forward(torch.tensor([[999, 30, 1, 4]], device=device), weight, table[0], None, slots)


@pytest.mark.parametrize("forced", [None, "triton"], ids=["aten", "custom_op"])
def test_templated_op_compiles_fullgraph(forced):
    """torch.compile(fullgraph=True) of the slot map and the templated gather: the aten reference on a CPU,
    the custom op (its fake and autograd) where a kernel backend is forced; equal outputs and gradients."""
    if forced == "triton":
        _triton_ok()
    torch._dynamo.reset()
    B, T, P, H, Vw, N = 3, 9, 4, 16, 21, 2
    ids, mask = random_template(B, T, P, Vw, MARK, 2)
    weight = torch.randn(Vw, H, requires_grad=True)
    table = torch.randn(N, P, H, requires_grad=True)
    index = torch.tensor([1, 0, 1])

    def f(ids, index):
        slots = template_slots(P, ids, prompt_token_id=MARK)
        return soft_prompt_embed(ids, weight, table, index, slots=slots)

    dout = torch.randn(B, T, H)
    with backend.use_backend(forced):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        got = compiled(ids, index)
        got.backward(dout)
    if forced:
        assert backend.last_backend(OP) == "triton", "the custom op did not run the forced kernel"
    grads = (table.grad.clone(), weight.grad.clone())
    assert torch.equal(got, hand_built(ids, mask, weight.detach(), table.detach(), index))
    want_table, want_weight = hand_grads(ids, mask, weight, table, index, dout)
    assert_close(grads[0], want_table, torch.float32, what="d_table")
    assert_close(grads[1], want_weight, torch.float32, what="d_weight")


# ---- models ----------------------------------------------------------------------------------

def _config(kind, P=4, marker=MARK, task="CAUSAL_LM"):
    if kind == "prompt":
        return fastpeft.PromptTuningConfig(task_type=task, num_virtual_tokens=P, prompt_token_id=marker)
    return fastpeft.PromptEncoderConfig(task_type=task, num_virtual_tokens=P, encoder_hidden_size=24,
                                        prompt_token_id=marker,
                                        encoder_reparameterization_type=kind.split("_")[1].upper())


KINDS = ["prompt", "ptuning_mlp", "ptuning_lstm"]


def _template_batch(B=3, T=10, P=4, pad=(2, 0, 1)):
    ids, mask = left_padded(B, T, pad)
    for b in range(B):
        start = pad[b]
        free = torch.arange(start, T)
        where = free[torch.randperm(len(free))[:P]]
        ids[b, where] = MARK
    return ids, mask


def _hand_embeds(model, ids, table, index=None):
    weight = model.base_model.get_input_embeddings().weight
    return hand_built(ids, ids == MARK, weight, table, index)


def _table(model, name="default"):
    return model.prompt_encoder[name].table()


@pytest.mark.parametrize("kind", KINDS)
def test_model_forward_and_grads_equal_hand_built(kind):
    model = fastpeft.get_peft_model(tiny_llama(seed=int(torch.randint(0, 1000, (1,)))), _config(kind))
    model.train()
    ids, mask = _template_batch()
    labels = ids.masked_fill(ids == MARK, 5)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape[:2] == ids.shape  # nothing prepended
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in model.prompt_encoder.named_parameters()}
    model.zero_grad()
    hand = model.base_model(inputs_embeds=_hand_embeds(model, ids, _table(model)), attention_mask=mask,
                            labels=labels.masked_fill(ids == MARK, -100))
    hand.loss.backward()
    assert_close(out.logits, hand.logits, what="logits")
    assert_close(out.loss.reshape(1), hand.loss.reshape(1), what="loss")
    for n, p in model.prompt_encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
        assert_close(ours[n], p.grad, scale=5, what=f"grad of {n}")


def test_templated_model_training_step_compiles_fullgraph():
    """A whole templated P-tuning training step under torch.compile(fullgraph=True): the loss and the
    encoder's gradients equal the eager step's."""
    torch._dynamo.reset()
    model = fastpeft.get_peft_model(tiny_llama(seed=9), _config("ptuning_mlp"))
    model.train()
    ids, mask = _template_batch(B=2, pad=(1, 0, 0))

    def step(ids, mask):
        return model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(ids == MARK, 3), use_cache=False).loss

    want = step(ids, mask)
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.prompt_encoder.named_parameters()}
    model.zero_grad(set_to_none=True)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(ids, mask)
    got.backward()
    assert_close(got.reshape(1), want.reshape(1), torch.float32, what="loss")
    for n, p in model.prompt_encoder.named_parameters():
        assert_close(p.grad, want_grads[n], torch.float32, scale=5, what=f"grad of {n}")


def test_prompt_positions_mask_and_inputs_embeds():
    """A per-call prompt_positions mask (the ids there are anything), with input_ids or inputs_embeds."""
    model = fastpeft.get_peft_model(tiny_llama(seed=3), fastpeft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                       num_virtual_tokens=3))
    ids, mask = left_padded(2, 8, (1, 0))
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[0, [2, 3, 6]] = True
    positions[1, [0, 4, 7]] = True
    weight = model.base_model.get_input_embeddings().weight
    want = model.base_model(inputs_embeds=hand_built(ids, positions, weight, _table(model), None),
                            attention_mask=mask).logits
    got = model(input_ids=ids, attention_mask=mask, prompt_positions=positions).logits
    assert_close(got, want, what="mask template")
    got = model(inputs_embeds=weight[ids], attention_mask=mask, prompt_positions=positions).logits
    assert_close(got, want, what="mask template over inputs_embeds")
    # without a template the same model prepends (PEFT's layout)
    assert model(input_ids=ids, attention_mask=mask).logits.shape[1] == 8 + 3


def test_mixed_task_batch_equals_each_task_alone():
    model = fastpeft.get_peft_model(tiny_llama(seed=5), _config("ptuning_mlp"), adapter_name="a")
    model.add_adapter("b", _config("ptuning_lstm"))
    model.train()
    model.prompt_encoder.requires_grad_(True)
    ids, mask = _template_batch(B=4, pad=(0, 2, 1, 0))
    index = torch.tensor([1, 0, 0, 1])
    mixed = assert_mixed_batch_equals_each_task_alone(model, ids, mask, index, ["a", "b"])
    table = torch.stack([_table(model, "a"), _table(model, "b")])
    hand = model.base_model(inputs_embeds=_hand_embeds(model, ids, table, index), attention_mask=mask)
    assert_close(mixed.logits, hand.logits, what="mixed batch vs hand-built")


def _greedy(fn, **kw):
    out = fn(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True, pad_token_id=0,
             **kw)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("kind", ["prompt", "ptuning_mlp"])
def test_generate_equals_hand_built_inputs_embeds(kind, use_cache):
    model = fastpeft.get_peft_model(tiny_llama(seed=int(torch.randint(0, 1000, (1,)))), _config(kind)).eval()
    ids, mask = _template_batch()
    with torch.no_grad():
        embeds = _hand_embeds(model, ids, _table(model))
    seq, scores = _greedy(model.generate, input_ids=ids, attention_mask=mask, use_cache=use_cache)
    want_seq, want_scores = _greedy(model.base_model.generate, inputs_embeds=embeds, attention_mask=mask,
                                    use_cache=use_cache)
    assert torch.equal(seq[:, : ids.shape[1]], ids)
    assert torch.equal(seq[:, ids.shape[1]:], want_seq), "generated tokens differ from the hand-built generate"
    assert_close(scores, want_scores, what="generate scores")
    assert "prepare_inputs_for_generation" not in model.base_model.__dict__
    # a mixed-task generate: each row as its own adapter alone
    model.add_adapter("other", _config(kind))
    index = torch.tensor([1, 0, 1])
    mixed, _ = _greedy(model.generate, input_ids=ids, attention_mask=mask, prompt_index=index, use_cache=use_cache)
    for k, name in enumerate(["default", "other"]):
        model.set_adapter(name)
        rows = index == k
        alone, _ = _greedy(model.generate, input_ids=ids[rows], attention_mask=mask[rows], use_cache=use_cache)
        n = min(alone.shape[1], mixed.shape[1])
        assert torch.equal(mixed[rows][:, :n], alone[:, :n]), name


def test_generate_with_prompt_positions_and_beams():
    model = fastpeft.get_peft_model(tiny_llama(seed=7), fastpeft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                       num_virtual_tokens=2)).eval()
    ids, mask = left_padded(2, 6, (0, 1))
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[0, [1, 4]] = True
    positions[1, [2, 3]] = True
    weight = model.base_model.get_input_embeddings().weight
    with torch.no_grad():
        embeds = hand_built(ids, positions, weight, _table(model), None)
    seq, _ = _greedy(model.generate, input_ids=ids, attention_mask=mask, prompt_positions=positions)
    want, _ = _greedy(model.base_model.generate, inputs_embeds=embeds, attention_mask=mask)
    assert torch.equal(seq[:, 6:], want)
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2, pad_token_id=0)
    beams = model.generate(input_ids=ids, attention_mask=mask, prompt_positions=positions, **kw)
    want = model.base_model.generate(inputs_embeds=embeds, attention_mask=mask, **kw)
    assert torch.equal(beams[:, 6:], want)


@pytest.mark.parametrize("kind", ["prompt", "ptuning_lstm"])
def test_templated_training_lowers_loss_and_generates(kind):
    torch.manual_seed(0)
    model = fastpeft.get_peft_model(tiny_llama(seed=11), _config(kind))
    model.train()
    ids, mask = _template_batch(B=4, T=10, pad=(0, 1, 2, 0))
    labels = torch.full_like(ids, 7).masked_fill(mask == 0, -100)  # a target the prompt alone can learn
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.3)
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1, losses  # a tiny frozen random model: the prompt moves it a little
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (4, ids.shape[1] + 5) and torch.equal(out[:, : ids.shape[1]], ids)
    assert bool((out[:, ids.shape[1]:] < V).all())


@pytest.mark.parametrize("kind", ["prompt", "ptuning_mlp"])
def test_save_load_round_trip(kind, tmp_path):
    base_a, base_b = twin(tiny_llama)
    model = fastpeft.get_peft_model(base_a, _config(kind))
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    ids, mask = _template_batch()
    want = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["prompt_token_id"] == MARK
    loaded = fastpeft.PeftModel.from_pretrained(base_b, tmp_path)
    assert loaded.peft_config["default"].prompt_token_id == MARK
    assert_close(loaded(input_ids=ids, attention_mask=mask).logits, want, what="reloaded template")
    seq, _ = _greedy(loaded.generate, input_ids=ids, attention_mask=mask)
    want_seq, _ = _greedy(model.generate, input_ids=ids, attention_mask=mask)
    assert torch.equal(seq, want_seq)


@pytest.mark.parametrize("kind", ["prompt", "ptuning_mlp"])
def test_prepend_only_config_files_stay_peft(kind, tmp_path):
    """A config without a template writes PEFT's file (no new key; PEFT loads it); a templated one adds
    only prompt_token_id."""
    import peft

    plain = _config(kind, marker=None)
    fastpeft.get_peft_model(tiny_llama(seed=1), plain).save_pretrained(tmp_path / "plain")
    fastpeft.get_peft_model(tiny_llama(seed=1), _config(kind)).save_pretrained(tmp_path / "templated")
    a = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    b = json.loads((tmp_path / "templated" / "adapter_config.json").read_text())
    assert "prompt_token_id" not in a
    assert set(b) - set(a) == {"prompt_token_id"} and {k: v for k, v in b.items() if k != "prompt_token_id"} == a
    loaded = peft.PeftConfig.from_pretrained(tmp_path / "plain")
    assert loaded.num_virtual_tokens == 4 and not hasattr(loaded, "prompt_token_id")
    with pytest.raises(ValueError, match="prompt_token_id must be a token id"):
        _config(kind, marker=-3)


def test_model_errors():
    model = fastpeft.get_peft_model(tiny_llama(seed=2), _config("prompt", P=3))
    ids, mask = _template_batch(B=2, P=3, pad=(0, 0))
    ids[1, (ids[1] == MARK).nonzero()[0]] = 7  # row 1 loses a marker
    with pytest.raises(ValueError, match=r"row 1 of the batch has 2 prompt positions \(prompt_token_id=150\).*"
                                         r"num_virtual_tokens=3"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="row 1 of the batch has 2"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="with inputs_embeds pass prompt_positions"):
        model(inputs_embeds=torch.randn(2, 10, 32), attention_mask=mask)
    with pytest.raises(ValueError, match="prompt_positions must be a \\(batch, seq\\) bool mask"):
        model(input_ids=ids, prompt_positions=torch.ones(2, 3, dtype=torch.bool))
    prefix = fastpeft.get_peft_model(tiny_llama(seed=2), fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                                        num_virtual_tokens=3))
    with pytest.raises(ValueError, match="prefix tuning's prefix has no input positions"):
        prefix(input_ids=ids, prompt_positions=ids == MARK)


# ---- encoder-decoder models: the template in the encoder's input --------------------------------

@pytest.mark.parametrize("builder", [tiny_t5, tiny_bart], ids=["t5", "bart"])
def test_seq2seq_template_equals_hand_built(builder):
    model = fastpeft.get_peft_model(builder(seed=4), _config("prompt", P=3, task="SEQ_2_SEQ_LM"))
    model.train()
    ids, mask = _template_batch(B=2, T=8, P=3, pad=(0, 0))
    ids[ids == 0] = 5
    labels = torch.randint(3, V, (2, 4))
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grad = model.prompt_encoder["default"].embedding.weight.grad.clone()
    model.zero_grad()
    base = model.base_model
    embedding = base.get_input_embeddings()
    table = _table(model)[:3]
    words = embedding(ids.masked_fill(ids == MARK, 0))  # BART scales its embeddings; the prompt is not scaled
    positions = (ids == MARK).unsqueeze(-1)
    slots = template_slots(3, ids, prompt_token_id=MARK)
    embeds = torch.where(positions, table[slots.clamp(min=0)], words)
    hand = base(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    hand.loss.backward()
    assert_close(out.logits, hand.logits, what="logits")
    assert_close(grad, model.prompt_encoder["default"].embedding.weight.grad, scale=5, what="grad")
    model.eval()
    with torch.no_grad():
        kw = dict(max_new_tokens=5, do_sample=False)
        got = model.generate(input_ids=ids, attention_mask=mask, **kw)
        want = base.generate(inputs_embeds=embeds.detach(), attention_mask=mask, **kw)
    assert torch.equal(got, want)
