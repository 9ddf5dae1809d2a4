"""Prompt tuning as Lester et al. describe it, on a tiny random T5 (nothing downloads; runs in seconds on a CPU):
class-label init, a few training steps, reading the prompt through its nearest vocabulary tokens, and three
prompts evaluated in one batch (mixed-task `prompt_index`) combined by majority vote.

    python examples/prompt_papers.py
"""

import tempfile

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

import fastpeft

WORDS = ["[PAD]", "[UNK]", "</s>", "positive", "negative", "great", "awful", "movie", "plot", "was"]


def tokenizer_dir() -> str:
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tempfile.mkdtemp()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)
    return path


def main() -> None:
    torch.manual_seed(0)
    path = tokenizer_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    base = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0,
        pad_token_id=0, eos_token_id=2, decoder_start_token_id=0))
    labels = ["positive", "negative"]

    def config():
        return fastpeft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4,
                                           prompt_tuning_init="CLASS_LABELS", prompt_tuning_class_labels=labels,
                                           tokenizer_name_or_path=path)

    model = fastpeft.get_peft_model(base, config(), adapter_name="p0")
    for name in ("p1", "p2"):
        model.add_adapter(name, config())
    print("prompt p0 at init reads as:", [row[0][0] for row in model.nearest_tokens(k=1, tokenizer=tok)])

    texts = ["great movie", "awful plot", "plot was great", "movie was awful"]
    answers = ["positive", "negative", "positive", "negative"]
    enc = tok(texts, return_tensors="pt", padding=True)
    target = tok(answers, return_tensors="pt")["input_ids"]
    for name in ("p0", "p1", "p2"):  # each prompt trained alone, from its own sampled fill
        model.set_adapter(name)
        model.train()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for _ in range(20):
            loss = model(**enc, labels=target).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"prompt {name}: loss {loss.item():.3f}; nearest tokens",
              [[t for t, _ in row[:2]] for row in model.nearest_tokens(k=2, tokenizer=tok)])

    # an ensemble in one batch: each example once per prompt, rows routed by prompt_index, then a vote
    model.eval()
    n, B = 3, len(texts)
    ids = enc["input_ids"].repeat(n, 1)
    mask = enc["attention_mask"].repeat(n, 1)
    index = torch.arange(n).repeat_interleave(B)
    start = torch.zeros(n * B, 1, dtype=torch.long)
    label_ids = torch.tensor([WORDS.index(w) for w in labels])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=start, prompt_index=index,
                       adapters=["p0", "p1", "p2"]).logits[:, 0, label_ids]
    votes = logits.argmax(-1).view(n, B)
    majority = votes.mode(dim=0).values
    print("votes per prompt:", votes.tolist(), "-> majority:", [labels[i] for i in majority])


if __name__ == "__main__":
    main()
