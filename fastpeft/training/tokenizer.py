"""Byte-level tokenizers: ids 0-255 are the UTF-8 bytes, then BOS, EOS and PAD.

The presets (`tiny`, `small`, `bench`) use `preset_tokenizer()`: a transformers
`PreTrainedTokenizerFast` (a `tokenizers` byte-level BPE model with no merges, so one token per
byte) with a chat template, shipped inside the package (`data/tokenizer/`), so they train and generate
with no download.  `build_preset_tokenizer()` builds the same tokenizer from scratch (a test checks
the shipped files against it).  `ByteTokenizer` is the dependency-free equivalent (same ids) that
`fastpeft.training.Trainer` falls back to when given no tokenizer.
"""

from __future__ import annotations

import os
from typing import Any

import torch

BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 259
TOKENIZER_DIR = os.path.join(os.path.dirname(__file__), "data", "tokenizer")  # shipped with fastpeft
# "<s>user: ...\nassistant: ...</s>\n": the {% generation %} block marks each assistant turn's content
# and its EOS, what the loss covers (transformers' `return_assistant_tokens_mask`)
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['role'] }}: "
                 "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{{ eos_token }}"
                 "{% endgeneration %}{% else %}{{ message['content'] }}{% endif %}{{ '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the `tokenizers` ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_preset_tokenizer():
    """The presets' tokenizer built from nothing: byte-level BPE, byte b -> id b; <s>, </s>, <pad> -> 256, 257, 258."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    vocab.update({"<s>": BOS_ID, "</s>": EOS_ID, "<pad>": PAD_ID})
    model = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    model.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  model_max_length=2048, padding_side="right")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def preset_tokenizer():
    """The shipped tokenizer of the presets (a transformers `PreTrainedTokenizerFast`; no download)."""
    from transformers import PreTrainedTokenizerFast

    if not os.path.isfile(os.path.join(TOKENIZER_DIR, "tokenizer.json")):
        return build_preset_tokenizer()  # a source tree without the package data
    return PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR, local_files_only=True)


class ByteTokenizer:
    """UTF-8 bytes as token ids (0-255) plus `bos_token_id`=256, `eos_token_id`=257, `pad_token_id`=258."""

    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    pad_token_id = PAD_ID
    vocab_size = VOCAB_SIZE
    bos_token, eos_token, pad_token = "<s>", "</s>", "<pad>"
    padding_side = "right"
    name_or_path = "fastpeft-byte"

    def __len__(self) -> int:
        return VOCAB_SIZE

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`text` as byte ids, with BOS in front when `add_special_tokens`."""
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode expects a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return [BOS_ID] + ids if add_special_tokens else ids

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """Byte ids back to text (invalid UTF-8 becomes U+FFFD); BOS/EOS/PAD dropped or shown by name."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = bytearray()
        pieces: list[str] = []
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
                continue
            if not skip_special_tokens:
                pieces.append(out.decode("utf-8", errors="replace"))
                out.clear()
                pieces.append({BOS_ID: self.bos_token, EOS_ID: self.eos_token, PAD_ID: self.pad_token}.get(i, f"<{i}>"))
        pieces.append(out.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]

    def __call__(self, text: str | list[str], add_special_tokens: bool = True, padding: bool | str = False,
                 truncation: bool = False, max_length: int | None = None,
                 return_tensors: str | None = None) -> dict[str, Any]:
        """HF-style call: {'input_ids', 'attention_mask'}; `padding` pads right with PAD to the longest
        (or to `max_length` with padding='max_length'); `return_tensors='pt'` gives tensors."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        ids = [self.encode(t, add_special_tokens) for t in texts]
        if truncation and max_length is not None:
            ids = [x[:max_length] for x in ids]
        masks = [[1] * len(x) for x in ids]
        if padding:
            width = max_length if padding == "max_length" and max_length else max((len(x) for x in ids), default=0)
            masks = [m + [0] * (width - len(m)) for m in masks]
            ids = [x + [PAD_ID] * (width - len(x)) for x in ids]
        if return_tensors == "pt":
            if len({len(x) for x in ids}) > 1:
                raise ValueError("sequences have different lengths; pass padding=True to return tensors")
            return {"input_ids": torch.tensor(ids, dtype=torch.long),
                    "attention_mask": torch.tensor(masks, dtype=torch.long)}
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r} is not supported (use 'pt' or None)")
        if single:
            return {"input_ids": ids[0], "attention_mask": masks[0]}
        return {"input_ids": ids, "attention_mask": masks}
