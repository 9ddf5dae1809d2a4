"""Training data: JSONL reading with errors that name file and line, tokenisation into
(input_ids, labels) with the prompt masked out, padding, and the seeded per-epoch order.

A record is `{"text": ...}` (loss on every token) or `{"prompt": ..., "completion": ...}` (loss on the
completion only: labels are -100 on BOS and the prompt).  Every sequence is BOS + tokens + EOS.
Sequences longer than `max_seq_len` are truncated (counted, with one warning); a prompt/completion
pair whose completion is cut off entirely is skipped (counted in the same warning).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import torch

IGNORE_INDEX = -100
DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "data", "tiny.jsonl")  # the dataset shipped with fastpeft


class DataError(ValueError):
    """Bad training data; the message names the file (or dataset) and line (or index)."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_targets(self) -> int:
        # labels are shifted by one inside the model: position 0 is never a target
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


def read_jsonl(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """The records of a JSONL file, each with its location `"FILE:LINE"`; blank lines are skipped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"data file {path} does not exist")
    records = []
    try:
        fh = open(path, "rb")
    except OSError as err:
        raise DataError(f"data file {path} cannot be read: {err.strerror}") from None
    with fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                                f"re-encode the file as UTF-8") from None
            if lineno == 1 and line.startswith("\ufeff"):  # a UTF-8 byte-order mark
                line = line[1:]
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object with a 'text' field or 'prompt'/'completion' "
                                f"fields, got {type(record).__name__}")
            records.append((where, record))
    if not records:
        raise DataError(f"data file {path} holds no records (it is empty or only blank lines)")
    return records


def _text_field(record: dict[str, Any], key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return list(ids)


def tokenize_records(records: Iterable[tuple[str, Any]], tokenizer: Any, max_seq_len: int,
                     source: str = "dataset") -> list[Example]:
    """Turn located records into Examples (see the module docstring for the rules)."""
    if max_seq_len < 3:
        raise ValueError(f"max_seq_len must be at least 3 (BOS, one token, EOS), got {max_seq_len}")
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    out: list[Example] = []
    truncated = skipped = 0
    for where, record in records:
        if isinstance(record, Example):
            out.append(record)
            continue
        if isinstance(record, str):
            record = {"text": record}
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a str or a dict with 'text' or 'prompt'/'completion', "
                            f"got {type(record).__name__}")
        if "input_ids" in record:
            ids = [int(t) for t in record["input_ids"]]
            labels = [int(t) for t in record.get("labels", ids)]
            if len(labels) != len(ids):
                raise DataError(f"{where}: 'labels' has {len(labels)} entries but 'input_ids' has {len(ids)}")
            prompt_len = 0
        elif "text" in record:
            text = _text_field(record, "text", where)
            if not text:
                raise DataError(f"{where}: field 'text' is empty")
            ids = head + _encode(tokenizer, text) + tail
            labels = [IGNORE_INDEX] * len(head) + ids[len(head):]
            prompt_len = len(head)
        elif "prompt" in record or "completion" in record:
            for key in ("prompt", "completion"):
                if key not in record:
                    raise DataError(f"{where}: has {'completion' if key == 'prompt' else 'prompt'!r} but no {key!r} "
                                    f"field (a record needs 'text', or both 'prompt' and 'completion')")
            prompt = head + _encode(tokenizer, _text_field(record, "prompt", where))
            completion_text = _text_field(record, "completion", where)
            if not completion_text:
                raise DataError(f"{where}: field 'completion' is empty")
            completion = _encode(tokenizer, completion_text) + tail
            ids = prompt + completion
            labels = [IGNORE_INDEX] * len(prompt) + completion
            prompt_len = len(prompt)
        else:
            fields = ", ".join(repr(k) for k in list(record)[:5]) or "none"
            raise DataError(f"{where}: no 'text' field and no 'prompt'/'completion' fields (fields: {fields})")
        if len(ids) > max_seq_len:
            truncated += 1
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        example = Example(ids, labels)
        if example.num_targets == 0:
            if prompt_len >= max_seq_len:
                skipped += 1
                continue
            raise DataError(f"{where}: no tokens to train on")
        out.append(example)
    if truncated or skipped:
        skip_note = f"; {skipped} of them were skipped because the prompt alone fills max_seq_len" if skipped else ""
        warnings.warn(f"{source}: {truncated} sequence(s) longer than max_seq_len={max_seq_len} tokens were "
                      f"truncated{skip_note}", stacklevel=2)
    if not out:
        raise DataError(f"{source}: no usable examples")
    return out


def load_examples(data: Any, tokenizer: Any, max_seq_len: int, name: str = "dataset") -> list[Example]:
    """Examples from a JSONL path, or from a list of str / dict records / Examples."""
    if isinstance(data, (str, os.PathLike)):
        return tokenize_records(read_jsonl(data), tokenizer, max_seq_len, source=os.fspath(data))
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        records = [(f"{name}[{i}]", data[i]) for i in range(len(data))]
        if not records:
            raise DataError(f"{name} is empty")
        return tokenize_records(records, tokenizer, max_seq_len, source=name)
    raise TypeError(f"{name} must be a JSONL path or a sequence of records, got {type(data).__name__}")


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random `fraction` of the examples held out for evaluation (at least one)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"eval fraction must be in (0, 1), got {fraction}")
    n_eval = max(1, int(round(len(examples) * fraction)))
    if n_eval >= len(examples):
        raise DataError(f"eval fraction {fraction} of {len(examples)} examples leaves nothing to train on")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation fixed by (seed, epoch), so resume reproduces it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: input_ids (pad_id), attention_mask (0), labels (-100)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
