"""Generation for every method and model family, against an oracle that cannot share a cache bug.

The ground truth is greedy decoding by full forwards with no cache (`tests.models.uncached_greedy`):
it never touches `prepare_inputs_for_generation`, the KV cache or its name (`past_key_values` up to
transformers 5.23, `cache` from 5.24).  A cached `generate` must give the same tokens and scores.
Beam search and sampling are checked cached against `use_cache=False`.  HF PEFT's `generate` is a
second oracle only where PEFT agrees with the ground truth itself (on 5.24 its prompt-learning
generation does not)."""

import warnings

import peft
import pytest
import torch

import fastpeft
from tests.models import greedy, left_padded, tiny_gpt2, tiny_llama, tiny_mistral, tiny_qwen2, twin, uncached_greedy
from tests.peft_parity import build_pair
from tests.utils import assert_close

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:Position ids are not supported")]

MODELS = {"llama_gqa": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral, "gpt2": tiny_gpt2}


def method_config(method: str) -> fastpeft.PeftConfig:
    if method == "lora":
        return fastpeft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.1,
                                   target_modules="all-linear")
    if method == "ia3":
        return fastpeft.IA3Config(task_type="CAUSAL_LM")
    if method == "prompt":
        return fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    if method.startswith("ptuning"):
        return fastpeft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=24,
                                            encoder_reparameterization_type=method.split("_")[1].upper())
    if method.startswith("prefix"):
        projection = method == "prefix_projection"
        return fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=projection,
                                           encoder_hidden_size=24 if projection else None)
    raise KeyError(method)


METHODS = ["lora", "ia3", "prompt", "ptuning_mlp", "ptuning_lstm", "prefix", "prefix_projection"]


def takes_positions(method: str) -> bool:
    # prompt tuning / P-tuning forwards take no position ids (PEFT's rule); the others do
    return method in ("lora", "ia3") or method.startswith("prefix")


ADAPTER_PARAMS = ("lora_", "ia3_", "prompt_encoder")


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every adapter parameter (of every adapter, trainable or not) off its identity init (LoRA B = 0,
    IA3 = 1), so the adapters really change the tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad or any(k in n for k in ADAPTER_PARAMS):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def build(model: str, method: str) -> torch.nn.Module:
    base, _ = twin(MODELS[model])
    ours = fastpeft.get_peft_model(base, method_config(method))
    perturb(ours)
    return ours.eval()


def assert_generate_equals_uncached(model, ids, mask, positions, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seq, scores = greedy(model, ids, mask, **kw)
    want_seq, want_scores = uncached_greedy(model, ids, mask, positions=positions, **kw)
    assert torch.equal(seq, want_seq), f"cached generate {seq.tolist()} != uncached greedy {want_seq.tolist()}"
    assert_close(scores, want_scores, what="generate scores vs uncached logits")
    stale = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert not stale, f"deprecation warnings from fastpeft's generate: {stale[:2]}"
    return seq


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_cached_generate_equals_uncached_greedy(model, method):
    ours = build(model, method)
    ids, mask = left_padded(B=3, pad=(3, 0, 1))
    assert_generate_equals_uncached(ours, ids, mask, takes_positions(method))
    _, scores = greedy(ours, ids, mask)
    with ours.disable_adapter():  # the adapter really changed the logits (else the test proves little)
        _, plain = greedy(ours, ids, mask)
    assert (scores[0] - plain[0]).abs().max() > 1e-3, "the adapter did not change the first step's logits"


@pytest.mark.parametrize("method", ["lora", "prompt", "ptuning_lstm", "prefix"])
@pytest.mark.parametrize("mode", ["beam", "sample"])
def test_beam_search_and_sampling_cached_equal_uncached(method, mode):
    ours = build("llama_gqa", method)
    ids, mask = left_padded(B=2, pad=(2, 0))
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0)
    kw.update(num_beams=3, do_sample=False) if mode == "beam" else kw.update(do_sample=True, top_k=0, temperature=0.7)
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        outs.append(ours.generate(use_cache=use_cache, **kw))
    assert torch.equal(outs[0], outs[1]), f"{mode}: cached {outs[0].tolist()} != uncached {outs[1].tolist()}"


def test_mixed_adapter_lora_generate_equals_uncached():
    base, _ = twin(tiny_llama)
    model = fastpeft.get_peft_model(base, method_config("lora"), adapter_name="a")
    model.add_adapter("b", method_config("lora"))
    perturb(model.eval(), seed=1)
    ids, mask = left_padded(B=3, pad=(2, 0, 1))
    names = ["a", "b", "a"]
    assert_generate_equals_uncached(model, ids, mask, True, adapter_names=names)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_mixed_task_generate_equals_uncached(method):
    base, _ = twin(tiny_qwen2)
    model = fastpeft.get_peft_model(base, method_config(method), adapter_name="a")
    model.add_adapter("b", method_config(method))
    model.eval()
    index = torch.tensor([1, 0, 1])
    ids, mask = left_padded(B=3, pad=(2, 0, 1))
    assert_generate_equals_uncached(model, ids, mask, takes_positions(method), prompt_index=index)


@pytest.mark.parametrize("method", ["lora", "prompt", "ptuning_mlp", "prefix"])
def test_peft_as_second_oracle_where_it_is_self_consistent(method):
    """Where HF PEFT's own cached generate equals the uncached ground truth, fastpeft's equals PEFT's."""
    ours, theirs = build_pair(tiny_llama, method_config(method))
    perturb(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=False)
    ours.eval(), theirs.eval()
    ids, mask = left_padded(B=2, pad=(3, 0))
    truth, truth_scores = uncached_greedy(theirs, ids, mask, positions=takes_positions(method))
    seq_b, scores_b = greedy(theirs, ids, mask)
    seq_a, scores_a = greedy(ours, ids, mask)
    assert torch.equal(seq_a, truth), "fastpeft's generate differs from the uncached ground truth"
    assert_close(scores_a, truth_scores, what="fastpeft generate scores vs uncached logits")
    peft_consistent = torch.equal(seq_b, truth) and torch.allclose(scores_b, truth_scores, rtol=1e-4, atol=1e-4)
    if peft_consistent:
        assert_close(scores_a, scores_b, what="generate scores vs PEFT")
    else:
        import transformers
        assert method != "lora", f"PEFT LoRA generate is wrong on transformers {transformers.__version__}"


@pytest.mark.parametrize("method", ["prefix", "prompt", "ptuning_mlp"])
def test_accelerated_peft_prompt_learning_generates_the_uncached_tokens(method):
    """fastpeft.accelerate on a PEFT prompt-learning model: its generate is right even where PEFT's is not."""
    base, _ = twin(tiny_llama)
    theirs = peft.get_peft_model(base, _peft_config(method_config(method)))
    perturb(theirs)
    theirs.eval()
    ids, mask = left_padded(B=2, pad=(3, 0))
    truth, truth_scores = uncached_greedy(theirs, ids, mask, positions=takes_positions(method))
    fastpeft.accelerate(theirs)
    # the forward is fastpeft's now and must still equal PEFT's forward (the ground truth's model)
    again, _ = uncached_greedy(theirs, ids, mask, positions=takes_positions(method))
    assert torch.equal(again, truth)
    seq, scores = greedy(theirs, ids, mask)
    assert torch.equal(seq, truth), f"accelerated PEFT generate {seq.tolist()} != uncached {truth.tolist()}"
    assert_close(scores, truth_scores, what="accelerated generate scores")


def _peft_config(cfg):
    from tests.peft_parity import peft_config
    return peft_config(cfg)
