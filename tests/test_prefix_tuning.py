"""Prefix tuning against HF PEFT: logits, loss, gradients, generate, adapter files, mixed-task batches.

The prefix reaches attention through fastpeft.ops.prefix_attention (never the KV cache); PEFT puts it
in past_key_values.  Both must give the same numbers on tiny random-weight models."""

import peft
import pytest
import torch

import fastpeft
from fastpeft import backend
from fastpeft.integrations import transformers_attention as attn
from fastpeft.integrations.generation import output_cache
from tests.models import greedy, left_padded, tiny_gpt2, tiny_llama, tiny_mistral, tiny_qwen2, twin, uncached_greedy
from tests.peft_parity import (assert_mixed_batch_equals_each_task_alone, assert_same_outputs_and_grads,
                               build_pair)
from tests.utils import assert_close

V = 97
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # PEFT's own deprecation warnings


def tiny_llama_mha(seed=None):
    return tiny_llama(seed=seed, num_key_value_heads=4)


MODELS = {"llama_gqa": tiny_llama, "llama_mha": tiny_llama_mha, "qwen2": tiny_qwen2, "mistral": tiny_mistral,
          "gpt2": tiny_gpt2}


def prefix_config(projection, P=3):
    return fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection,
                                       encoder_hidden_size=24 if projection else None)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("projection", [False, True])
def test_forward_loss_grads_match_peft(model, projection):
    ours, theirs = build_pair(MODELS[model], prefix_config(projection))
    cfg = ours.active_peft_config
    if model in ("llama_gqa", "mistral", "qwen2"):  # GQA: the prefix has the key/value heads only
        assert cfg.num_attention_heads == ours.base_model.config.num_key_value_heads
    ids, mask = left_padded()
    backend._LAST.pop("prefix_attention", None)
    assert_same_outputs_and_grads(ours, theirs, dict(input_ids=ids, attention_mask=mask, labels=ids))
    assert backend.last_backend("prefix_attention") == "torch", "prefix_attention did not run"
    assert attn._STATE.get() is None, "prefix state lingers after the forward"


@pytest.mark.parametrize("model", ["llama_gqa", "qwen2", "gpt2"])
def test_generate_equals_peft_forward_decoded_without_cache(model):
    # the oracle is PEFT's forward decoded greedily with no cache, not PEFT's generate (wrong on 5.24)
    ours, theirs = build_pair(MODELS[model], prefix_config(False))
    ids, mask = left_padded(pad=(3, 0))
    seq_a, scores_a = greedy(ours, ids, mask)
    seq_b, scores_b = uncached_greedy(theirs, ids, mask)
    assert torch.equal(seq_a, seq_b)
    assert_close(scores_a, scores_b, what="generate scores")
    assert attn._STATE.get() is None
    assert "prepare_inputs_for_generation" not in ours.base_model.__dict__


def test_forward_without_mask_and_with_position_ids():
    ours, theirs = build_pair(tiny_llama, prefix_config(True))
    ids = torch.randint(0, V, (3, 5))
    assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    pos = torch.arange(5).unsqueeze(0) + 2
    assert_close(ours(input_ids=ids, position_ids=pos).logits, theirs(input_ids=ids, position_ids=pos).logits)


def test_kv_cache_holds_only_real_tokens_and_base_model_is_unchanged_outside():
    ours, _ = build_pair(tiny_llama, prefix_config(False))
    plain, _ = twin(tiny_llama)
    plain.load_state_dict(ours.base_model.state_dict())
    ids, mask = left_padded()
    out = ours(input_ids=ids, attention_mask=mask, use_cache=True)
    assert output_cache(out).get_seq_length() == ids.shape[1]
    with ours.disable_adapter():
        off = ours(input_ids=ids, attention_mask=mask).logits
    assert_close(off, plain(input_ids=ids, attention_mask=mask).logits)
    assert (off - out.logits).abs().max() > 1e-3  # the prefix really changes the output


def test_unload_gives_back_the_base_model_and_its_attention():
    base = tiny_llama(seed=4)
    before = base.config._attn_implementation
    ids, mask = left_padded()
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask).logits
    model = fastpeft.get_peft_model(base, prefix_config(False))
    assert base.config._attn_implementation == attn.NAME
    plain = model.unload()
    assert plain is base and plain.config._attn_implementation == before
    with torch.no_grad():
        assert_close(plain(input_ids=ids, attention_mask=mask).logits, want, torch.float32)


def test_save_in_fastpeft_load_in_peft_and_back(tmp_path):
    for projection in (False, True):
        ours, theirs = build_pair(tiny_llama, prefix_config(projection))
        ids, mask = left_padded()
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        ours.save_pretrained(tmp_path / f"ours{projection}")
        theirs.save_pretrained(tmp_path / f"theirs{projection}")
        base_a, base_b = twin(tiny_llama)
        base_a.load_state_dict(ours.base_model.state_dict())
        base_b.load_state_dict(ours.base_model.state_dict())
        loaded_peft = peft.PeftModel.from_pretrained(base_b, tmp_path / f"ours{projection}")
        loaded_ours = fastpeft.PeftModel.from_pretrained(base_a, tmp_path / f"theirs{projection}")
        assert_close(loaded_peft(input_ids=ids, attention_mask=mask).logits, expected, what="PEFT loading fastpeft")
        assert_close(loaded_ours(input_ids=ids, attention_mask=mask).logits, expected, what="fastpeft loading PEFT")
        seq_a, _ = greedy(loaded_ours, ids, mask)
        seq_b, _ = uncached_greedy(loaded_peft, ids, mask)
        assert torch.equal(seq_a, seq_b)


def _two_adapter_model(builder=tiny_llama, projection=(False, True)):
    base, _ = twin(builder)
    model = fastpeft.get_peft_model(base, prefix_config(projection[0]), adapter_name="a")
    model.add_adapter("b", prefix_config(projection[1]))
    for enc in model.prompt_encoder.values():
        enc.requires_grad_(True)
    return model


def test_mixed_task_batch_equals_each_task_alone():
    model = _two_adapter_model()
    ids, mask = left_padded(B=4, pad=(2, 0, 1, 0))
    index = torch.tensor([1, 0, 0, 1])
    mixed = assert_mixed_batch_equals_each_task_alone(model, ids, mask, index, ["a", "b"])
    # an explicit adapter list picks the order
    swapped = model(input_ids=ids, attention_mask=mask, prompt_index=1 - index, adapters=["b", "a"])
    assert_close(swapped.logits, mixed.logits.detach())


def test_mixed_task_generate_equals_each_task_alone():
    model = _two_adapter_model(tiny_qwen2)
    model.eval()
    ids, mask = left_padded(B=3, pad=(2, 0, 1))
    index = torch.tensor([1, 0, 1])
    seq, scores = greedy(model, ids, mask, prompt_index=index)
    for k, name in enumerate(["a", "b"]):
        rows = index == k
        model.set_adapter(name)
        seq_alone, scores_alone = greedy(model, ids[rows], mask[rows])
        assert torch.equal(seq[rows], seq_alone)
        assert_close(scores[:, rows], scores_alone)


def test_bad_inputs(tmp_path):
    model = _two_adapter_model(projection=(False, False))
    ids = torch.randint(0, V, (2, 4))
    with pytest.raises(ValueError, match=r"prompt_index values must lie in \[0, 2\)"):
        model(input_ids=ids, prompt_index=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="shape"):
        model(input_ids=ids, prompt_index=torch.tensor([0]))
    with pytest.raises(ValueError, match="unknown adapter"):
        model(input_ids=ids, prompt_index=torch.tensor([0, 0]), adapters=["zz"])
    with pytest.raises(Exception):  # fails inside the model: the prefix must not outlive the call
        model(input_ids=ids, labels=torch.zeros(2, 9, dtype=torch.long))
    assert attn._STATE.get() is None
    # an adapter file whose prompt table does not fit: the error names the file
    model.save_pretrained(tmp_path)
    other = prefix_config(False, P=5)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*prompt_embeddings.*\(3, 64\).*\(5, 64\)"):
        fastpeft.PeftModel.from_pretrained(twin(tiny_llama)[0], str(tmp_path / "b"), config=other)


def test_gradient_checkpointing_is_refused():
    ours, _ = build_pair(tiny_llama, prefix_config(False))
    ours.base_model.gradient_checkpointing_enable()
    ours.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        ours(input_ids=torch.randint(0, V, (1, 4)))


@pytest.mark.parametrize("projection", [False, True])
def test_bf16_model_with_fp32_encoder_matches_peft(projection):
    ours, theirs = build_pair(lambda seed=None: tiny_llama(seed=seed).to(torch.bfloat16), prefix_config(projection))
    assert ours.prompt_encoder["default"].embedding.weight.dtype == torch.float32
    ids, mask = left_padded()
    out = ours(input_ids=ids, attention_mask=mask).logits
    assert out.dtype == torch.bfloat16
    assert_close(out, theirs(input_ids=ids, attention_mask=mask).logits, scale=2)


def _tiny_t5():
    import transformers
    cfg = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
    return transformers.T5ForConditionalGeneration(cfg)


@pytest.mark.parametrize("config", [prefix_config(False), fastpeft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                      num_virtual_tokens=3)])
def test_prompt_learning_on_an_encoder_decoder_is_refused_not_silently_wrong(config):
    # an encoder-decoder model needs PEFT's seq2seq layout (task_type SEQ_2_SEQ_LM: 2 submodules' worth of
    # prompt); any other task type would apply the prefix nowhere, so it is refused by name
    with pytest.raises(ValueError, match="SEQ_2_SEQ_LM"):
        fastpeft.get_peft_model(_tiny_t5(), config)


def test_prefix_on_a_model_whose_attention_bypasses_the_registry_is_refused():
    base = tiny_llama()
    base._supports_attention_backend = False  # as models with hand-written attention declare
    with pytest.raises(NotImplementedError, match="AttentionInterface"):
        fastpeft.get_peft_model(base, prefix_config(False))
    assert base.config._attn_implementation != attn.NAME


def test_nested_prefix_contexts_around_a_compiled_forward_are_refused_not_mixed():
    """Two different prefixes active at once (nested here; two threads alike): eager reads the innermost,
    a compiled forward (which reads the eager contexts as a guarded constant) refuses rather than pick one,
    and leaving the contexts leaves none behind."""
    from fastpeft.integrations import transformers_attention as attn

    torch._dynamo.reset()
    model = fastpeft.get_peft_model(tiny_llama(seed=0), fastpeft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    base = model.base_model
    layers, heads, dim = 2, base.config.num_key_value_heads, base.config.hidden_size // base.config.num_attention_heads
    outer, inner = torch.zeros(layers, 2, heads, 3, dim), torch.randn(layers, 2, heads, 3, dim)
    ids = torch.randint(1, 90, (2, 5))
    with torch.no_grad():
        with attn.prefix_context(inner, None, base.config):
            want = base(input_ids=ids).logits
        compiled = torch.compile(base.forward, fullgraph=True, backend="eager")
        with attn.prefix_context(outer, None, base.config), attn.prefix_context(inner, None, base.config):
            torch.testing.assert_close(base(input_ids=ids).logits, want, rtol=0, atol=0)
            with pytest.raises(Exception, match="Observed exception|several different prefixes"):
                compiled(input_ids=ids)
        assert not attn._EAGER
        with attn.prefix_context(inner, None, base.config):  # one prefix: the compiled forward reads it
            torch.testing.assert_close(compiled(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
