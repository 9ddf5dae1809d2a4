"""Prompt tuning (RANDOM, SAMPLE_VOCAB, TEXT) and P-tuning (MLP, LSTM) against HF PEFT: logits, loss,
gradients, generate, adapter files both ways, sequence classification, mixed-task batches."""

import peft
import pytest
import torch

import fastpeft
from fastpeft import backend
from tests.models import greedy, left_padded, tiny_llama, tiny_llama_cls, twin, uncached_greedy
from tests.peft_parity import (assert_mixed_batch_equals_each_task_alone, assert_same_outputs_and_grads, build_pair,
                               peft_config)
from tests.utils import assert_close

V = 97
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:Position ids are not supported")]  # PEFT's warnings
WORDS = ["classify", "the", "sentiment", "of", "this", "review", "positive", "or", "negative"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny word-level tokenizer saved locally (TEXT init must load offline from a path)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: 3 + 7 * i for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return str(path)


def config(kind, tokenizer_dir=None, task="CAUSAL_LM", P=4):
    if kind == "random":
        return fastpeft.PromptTuningConfig(task_type=task, num_virtual_tokens=P)
    if kind == "sample_vocab":
        return fastpeft.PromptTuningConfig(task_type=task, num_virtual_tokens=P, prompt_tuning_init="SAMPLE_VOCAB")
    if kind == "text":
        return fastpeft.PromptTuningConfig(task_type=task, num_virtual_tokens=P, prompt_tuning_init="TEXT",
                                           prompt_tuning_init_text="classify the sentiment",
                                           tokenizer_name_or_path=tokenizer_dir)
    return fastpeft.PromptEncoderConfig(task_type=task, num_virtual_tokens=P, encoder_hidden_size=24,
                                        encoder_reparameterization_type=kind.split("_")[1].upper())


KINDS = ["random", "sample_vocab", "text", "ptuning_mlp", "ptuning_lstm"]


@pytest.mark.parametrize("kind", KINDS)
def test_forward_loss_grads_generate_match_peft(kind, tokenizer_dir):
    ours, theirs = build_pair(tiny_llama, config(kind, tokenizer_dir))
    ids, mask = left_padded()
    backend._LAST.pop("soft_prompt_embed", None)
    assert_same_outputs_and_grads(ours, theirs, dict(input_ids=ids, attention_mask=mask, labels=ids))
    assert backend.last_backend("soft_prompt_embed") == "torch", "soft_prompt_embed did not run"
    ours.eval(), theirs.eval()
    seq_a, scores_a = greedy(ours, ids, mask)
    seq_b, scores_b = uncached_greedy(theirs, ids, mask, positions=False)  # PEFT's forward, no cache: the oracle
    assert torch.equal(seq_a, seq_b)
    assert_close(scores_a, scores_b, what="generate scores")
    assert "prepare_inputs_for_generation" not in ours.base_model.__dict__


def test_initialisations_match_peft(tokenizer_dir):
    for kind in ("text", "sample_vocab"):
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
        base_a, base_b = twin(tiny_llama)
        torch.manual_seed(seed)
        ours = fastpeft.get_peft_model(base_a, config(kind, tokenizer_dir))
        torch.manual_seed(seed)
        theirs = peft.get_peft_model(base_b, peft_config(config(kind, tokenizer_dir)))
        table = ours.prompt_encoder["default"].embedding.weight
        assert table.dtype == torch.float32
        assert torch.equal(table, theirs.prompt_encoder["default"].embedding.weight), kind
    # TEXT: the init text's tokens, repeated to num_virtual_tokens
    token_ids = [3 + 7 * WORDS.index(w) for w in ("classify", "the", "sentiment", "classify")]
    ours = fastpeft.get_peft_model(twin(tiny_llama)[0], config("text", tokenizer_dir))
    words = ours.base_model.get_input_embeddings().weight
    assert torch.equal(ours.prompt_encoder["default"].embedding.weight, words[token_ids])


def test_inputs_embeds_equals_input_ids():
    ours, theirs = build_pair(tiny_llama, config("ptuning_mlp"))
    ids, mask = left_padded()
    embeds = ours.base_model.get_input_embeddings()(ids)
    expected = theirs(inputs_embeds=embeds, attention_mask=mask).logits
    assert_close(ours(inputs_embeds=embeds, attention_mask=mask).logits, expected)
    assert_close(ours(input_ids=ids, attention_mask=mask).logits, expected)


@pytest.mark.parametrize("kind", ["random", "ptuning_mlp", "ptuning_lstm"])
def test_save_in_fastpeft_load_in_peft_and_back(kind, tmp_path):
    ours, theirs = build_pair(tiny_llama, config(kind))
    ids, mask = left_padded()
    expected = theirs(input_ids=ids, attention_mask=mask).logits
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    base_a, base_b = twin(tiny_llama)
    base_a.load_state_dict(ours.base_model.state_dict())
    base_b.load_state_dict(ours.base_model.state_dict())
    loaded_peft = peft.PeftModel.from_pretrained(base_b, tmp_path / "ours")
    loaded_ours = fastpeft.PeftModel.from_pretrained(base_a, tmp_path / "theirs")
    assert_close(loaded_peft(input_ids=ids, attention_mask=mask).logits, expected, what="PEFT loading fastpeft")
    assert_close(loaded_ours(input_ids=ids, attention_mask=mask).logits, expected, what="fastpeft loading PEFT")
    seq_a, _ = greedy(loaded_ours, ids, mask)
    seq_b, _ = uncached_greedy(loaded_peft, ids, mask, positions=False)
    assert torch.equal(seq_a, seq_b)


def test_sequence_classification_matches_peft(tmp_path):
    cfg = config("random", task="SEQ_CLS")
    ours, theirs = build_pair(tiny_llama_cls, cfg)
    ids = torch.randint(1, V, (3, 5))
    labels = torch.tensor([0, 2, 1])
    assert_same_outputs_and_grads(ours, theirs, dict(input_ids=ids, labels=labels))
    assert any("score" in n for n, p in ours.named_parameters() if p.requires_grad), "score head is not trainable"
    ours.eval(), theirs.eval()
    with torch.no_grad():
        ours.base_model.score.modules_to_save["default"].weight.add_(0.1)  # a trained head, saved with the prompt
        theirs.base_model.score.modules_to_save["default"].weight.add_(0.1)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    expected = theirs(input_ids=ids).logits
    base_a, base_b = twin(tiny_llama_cls)
    base_a.load_state_dict(ours.base_model.state_dict(), strict=False)
    base_b.load_state_dict(ours.base_model.state_dict(), strict=False)
    with torch.no_grad():
        base_a.score.weight.copy_(ours.base_model.score.original_module.weight)
        base_b.score.weight.copy_(ours.base_model.score.original_module.weight)
    loaded_peft = peft.PeftModel.from_pretrained(base_b, tmp_path / "ours")
    loaded_ours = fastpeft.PeftModel.from_pretrained(base_a, tmp_path / "theirs")
    assert_close(loaded_peft(input_ids=ids).logits, expected, what="PEFT loading fastpeft")
    assert_close(loaded_ours(input_ids=ids).logits, expected, what="fastpeft loading PEFT")


def test_mixed_task_batch_equals_each_task_alone():
    base, _ = twin(tiny_llama)
    model = fastpeft.get_peft_model(base, config("ptuning_mlp"), adapter_name="a")
    model.add_adapter("b", config("ptuning_lstm"))
    model.prompt_encoder.requires_grad_(True)
    ids, mask = left_padded(B=4, pad=(2, 0, 1, 0))
    index = torch.tensor([0, 1, 1, 0])
    assert_mixed_batch_equals_each_task_alone(model, ids, mask, index, ["a", "b"], labels=ids)
    model.eval()
    seq, scores = greedy(model, ids, mask, prompt_index=index)
    for k, name in enumerate(["a", "b"]):
        rows = index == k
        model.set_adapter(name)
        seq_alone, scores_alone = greedy(model, ids[rows], mask[rows])
        assert torch.equal(seq[rows], seq_alone)
        assert_close(scores[:, rows], scores_alone)


def test_bad_inputs(tmp_path):
    model = fastpeft.get_peft_model(twin(tiny_llama)[0], config("random"), adapter_name="a")
    model.add_adapter("b", config("random"))
    ids = torch.randint(0, V, (2, 4))
    with pytest.raises(ValueError, match=r"prompt_index values must lie in \[0, 2\)"):
        model(input_ids=ids, prompt_index=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="integer tensor"):
        model(input_ids=ids, prompt_index=torch.tensor([0.0, 1.0]))
    model.add_adapter("c", config("random", P=6))
    with pytest.raises(ValueError, match="one shape"):
        model(input_ids=ids, prompt_index=torch.tensor([0, 2]))
    model.save_pretrained(tmp_path, selected_adapters=["c"])
    with pytest.raises(ValueError, match=r"c/adapter_model\.safetensors.*prompt_embeddings.*\(6, 32\).*\(4, 32\)"):
        fastpeft.PeftModel.from_pretrained(twin(tiny_llama)[0], str(tmp_path / "c"), config=config("random"))
    from safetensors.torch import save_file

    save_file({"something_else": torch.zeros(2)}, str(tmp_path / "c" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"c/adapter_model\.safetensors has no 'prompt_embeddings'"):
        fastpeft.PeftModel.from_pretrained(twin(tiny_llama)[0], str(tmp_path / "c"))


@pytest.mark.parametrize("kind", ["random", "ptuning_mlp"])
def test_bf16_model_with_fp32_encoder_matches_peft(kind):
    ours, theirs = build_pair(lambda seed=None: tiny_llama(seed=seed).to(torch.bfloat16), config(kind))
    ids, mask = left_padded()
    out = ours(input_ids=ids, attention_mask=mask).logits
    assert out.dtype == torch.bfloat16
    assert_close(out, theirs(input_ids=ids, attention_mask=mask).logits, scale=2)
