"""Prompt tuning as Lester et al. describe it, beside PEFT's defaults: class-label init (multi-token labels
averaged), uniform [-0.5, 0.5] random init, sampling from the most common (first) k vocabulary ids; and
reading a prompt through its nearest vocabulary tokens (cosine similarity), P-tuning through its encoder."""

import json

import peft
import pytest
import torch
import torch.nn.functional as F

import fastpeft
from tests.models import tiny_llama, tiny_t5

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning")]
V = 97
WORDS = ["classify", "the", "sentiment", "of", "this", "review", "positive", "or", "negative", "very", "great"]
ID = {w: 3 + 7 * i for i, w in enumerate(WORDS)}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny word-level tokenizer saved locally (inits load it offline from a path)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, **ID}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return str(path)


def labels_config(tokenizer_dir, labels, P, **kw):
    return fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prompt_tuning_init="CLASS_LABELS",
                                       prompt_tuning_class_labels=labels, tokenizer_name_or_path=tokenizer_dir, **kw)


def test_class_label_init_reproduces_the_labels_embeddings(tokenizer_dir):
    model = fastpeft.get_peft_model(tiny_llama(seed=0), labels_config(tokenizer_dir, ["positive", "very negative"], 5,
                                                                       prompt_tuning_vocab_top_k=20))
    words = model.base_model.get_input_embeddings().weight.detach()
    table = model.prompt_encoder["default"].embedding.weight.detach()
    assert table.shape == (5, 32) and table.dtype == torch.float32
    assert torch.equal(table[0], words[ID["positive"]])
    assert torch.allclose(table[1], (words[ID["very"]] + words[ID["negative"]]) / 2, rtol=0, atol=1e-7)
    # the rows past the labels are sampled vocabulary embeddings, from the first 20 ids
    for row in table[2:]:
        match = (words == row).all(-1).nonzero().flatten()
        assert match.numel() >= 1 and int(match[0]) < 20
    with pytest.raises(ValueError, match="2 labels but the prompt has 1 tokens"):
        fastpeft.get_peft_model(tiny_llama(seed=0), labels_config(tokenizer_dir, ["positive", "negative"], 1))
    with pytest.raises(ValueError, match="needs prompt_tuning_class_labels"):
        fastpeft.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="CLASS_LABELS")
    with pytest.raises(ValueError, match="applies with prompt_tuning_init='CLASS_LABELS' only"):
        fastpeft.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_class_labels=["a"])


def test_class_labels_on_seq2seq_fill_the_peft_table(tokenizer_dir):
    cfg = fastpeft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, prompt_tuning_init="CLASS_LABELS",
                                      prompt_tuning_class_labels=["great", "review"], tokenizer_name_or_path=tokenizer_dir)
    model = fastpeft.get_peft_model(tiny_t5(seed=0), cfg)
    table = model.prompt_encoder["default"].embedding.weight.detach()
    words = model.base_model.get_input_embeddings().weight.detach()
    assert table.shape == (6, 32)  # PEFT's seq2seq layout: 2 × num_virtual_tokens
    assert torch.equal(table[0], words[ID["great"]]) and torch.equal(table[1], words[ID["review"]])


def test_uniform_random_init_range():
    torch.manual_seed(0)
    cfg = fastpeft.PromptTuningConfig(num_virtual_tokens=64, prompt_tuning_init_range=0.5)
    table = fastpeft.get_peft_model(tiny_llama(seed=0), cfg).prompt_encoder["default"].embedding.weight.detach()
    assert table.abs().max() <= 0.5 and table.abs().max() > 0.45
    assert abs(table.std().item() - 0.5 / 3 ** 0.5) < 0.02  # U[-a, a] has std a/√3; PEFT's N(0, 1) has 1
    with pytest.raises(ValueError, match="prompt_tuning_init_range"):
        fastpeft.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init_range=-1.0)
    with pytest.raises(ValueError, match="applies with prompt_tuning_init='RANDOM' only"):
        fastpeft.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="SAMPLE_VOCAB", prompt_tuning_init_range=0.5)


def test_sample_vocab_top_k():
    torch.manual_seed(1)
    cfg = fastpeft.PromptTuningConfig(num_virtual_tokens=40, prompt_tuning_init="SAMPLE_VOCAB", prompt_tuning_vocab_top_k=10)
    model = fastpeft.get_peft_model(tiny_llama(seed=0), cfg)
    words = model.base_model.get_input_embeddings().weight.detach()
    ids = [int((words == row).all(-1).nonzero()[0]) for row in model.prompt_encoder["default"].embedding.weight]
    assert max(ids) < 10 and len(set(ids)) > 3


def test_files_stay_peft_unless_a_paper_option_is_set(tmp_path):
    plain = fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    data = plain.to_dict()
    assert not [k for k in data if k.startswith("prompt_tuning_") and k not in ("prompt_tuning_init",
                                                                               "prompt_tuning_init_text")]
    model = fastpeft.get_peft_model(tiny_llama(seed=0), plain)
    model.save_pretrained(tmp_path / "plain")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "plain")  # PEFT reads it as its own
    assert torch.equal(loaded.prompt_encoder["default"].embedding.weight, model.prompt_encoder["default"].embedding.weight)
    paper = fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_tuning_init_range=0.5)
    model = fastpeft.get_peft_model(tiny_llama(seed=0), paper)
    model.save_pretrained(tmp_path / "paper")
    saved = json.loads((tmp_path / "paper" / "adapter_config.json").read_text())
    assert saved["prompt_tuning_init_range"] == 0.5 and "prompt_tuning_vocab_top_k" not in saved
    again = fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "paper")
    assert again.peft_config["default"].prompt_tuning_init_range == 0.5
    assert torch.equal(again.prompt_encoder["default"].embedding.weight, model.prompt_encoder["default"].embedding.weight)


def test_nearest_tokens_map_a_prompt_from_known_words_back_to_them(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init="TEXT",
                                      prompt_tuning_init_text="sentiment of this review", tokenizer_name_or_path=tokenizer_dir)
    model = fastpeft.get_peft_model(tiny_llama(seed=0), cfg)
    near = model.nearest_tokens(k=5, tokenizer=tokenizer)
    assert [row[0][0] for row in near] == ["sentiment", "of", "this", "review"]
    assert all(len(row) == 5 and abs(row[0][1] - 1.0) < 1e-5 for row in near)
    assert all(row[i][1] >= row[i + 1][1] for row in near for i in range(4))
    ids = model.nearest_tokens(k=2)  # no tokenizer: ids
    assert [row[0][0] for row in ids] == [ID[w] for w in ("sentiment", "of", "this", "review")]
    # after a little noise, still the nearest
    with torch.no_grad():
        weight = model.prompt_encoder["default"].embedding.weight
        weight.add_(0.2 * weight.std() * torch.randn(4, 32))
    assert [row[0][0] for row in model.nearest_tokens(k=1, tokenizer=tokenizer)] == ["sentiment", "of", "this", "review"]
    # class-label init reads back as the labels
    model = fastpeft.get_peft_model(tiny_llama(seed=0), labels_config(tokenizer_dir, ["positive", "negative"], 2))
    assert [row[0][0] for row in model.nearest_tokens(k=3, tokenizer=tokenizer)] == ["positive", "negative"]


def test_nearest_tokens_for_ptuning_read_the_encoder_output():
    cfg = fastpeft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16)
    model = fastpeft.get_peft_model(tiny_llama(seed=0), cfg)
    encoder = model.prompt_encoder["default"]
    words = model.base_model.get_input_embeddings().weight.detach()
    with torch.no_grad():
        out = encoder.mlp_head(encoder.embedding.weight)
    expected = (F.normalize(out, dim=-1) @ F.normalize(words, dim=-1).t()).topk(4, dim=-1)
    near = model.nearest_tokens(k=4)
    assert [[t for t, _ in row] for row in near] == expected.indices.tolist()
    assert torch.allclose(torch.tensor([[s for _, s in row] for row in near]), expected.values, atol=1e-6)
    # not the raw embedding's neighbours (the encoder's output is what the model reads)
    raw = (F.normalize(encoder.embedding.weight.detach(), dim=-1) @ F.normalize(words, dim=-1).t()).topk(4, dim=-1)
    assert raw.indices.tolist() != expected.indices.tolist()


def test_nearest_tokens_refusals():
    prefix = fastpeft.get_peft_model(tiny_llama(seed=0), fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                                     num_virtual_tokens=2))
    with pytest.raises(ValueError, match="not defined for prefix tuning"):
        prefix.nearest_tokens()
    lora = fastpeft.get_peft_model(tiny_llama(seed=0), fastpeft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="reads soft prompts"):
        lora.nearest_tokens()
    prompt = fastpeft.get_peft_model(tiny_llama(seed=0), fastpeft.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="positive integer"):
        prompt.nearest_tokens(k=0)
    seq2seq = fastpeft.get_peft_model(tiny_t5(seed=0), fastpeft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                                                   num_virtual_tokens=3))
    assert len(seq2seq.nearest_tokens(k=2)) == 3  # the encoder's rows (PEFT's table holds 2 × 3)


def test_paper_ptuning_encoder_has_the_papers_shapes_and_math(tmp_path):
    """encoder_reparameterization_type='PAPER_LSTM': the encoder of the P-tuning paper's code (THUDM/P-tuning
    PromptEncoder: a 2-layer bidirectional LSTM of hidden // 2 units a direction, then Linear(hidden, hidden),
    ReLU, Linear(hidden, hidden)); the same parameter shapes and, with its weights, the same prompt table;
    it trains and survives save/load."""
    cfg = fastpeft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                       encoder_reparameterization_type="PAPER_LSTM")
    model = fastpeft.get_peft_model(tiny_llama(seed=0), cfg)
    enc = model.prompt_encoder["default"]
    hidden = model.base_model.config.hidden_size
    # the paper's modules, as its code builds them
    lstm = torch.nn.LSTM(input_size=hidden, hidden_size=hidden // 2, num_layers=2, dropout=0.0, bidirectional=True,
                         batch_first=True)
    mlp = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden))
    ours_shapes = {k: tuple(v.shape) for k, v in enc.lstm_head.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in lstm.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in enc.mlp_head.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in mlp.state_dict().items()}
    lstm.load_state_dict(enc.lstm_head.state_dict())
    mlp.load_state_dict(enc.mlp_head.state_dict())
    with torch.no_grad():
        paper = mlp(lstm(enc.embedding.weight.unsqueeze(0))[0]).squeeze(0)  # the paper's forward()
        torch.testing.assert_close(enc.table(), paper)
    ids = torch.randint(1, 97, (2, 6))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(float(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["encoder_reparameterization_type"] == "PAPER_LSTM"
    back = fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path)).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits)
    from fastpeft.prompt_learning.encoders import PromptEncoder

    with pytest.raises(ValueError, match="even token_dim"):
        PromptEncoder(fastpeft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, token_dim=33,
                                                   num_transformer_submodules=1,
                                                   encoder_reparameterization_type="PAPER_LSTM"))
