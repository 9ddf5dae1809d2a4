"""Training data: reading (JSONL, CSV, Parquet, a `datasets.save_to_disk` folder, or a dataset name
already in the local Hugging Face cache) with errors that name file and line, tokenisation into
(input_ids, labels) with the prompt masked out, padding, and the seeded per-epoch order.

A record is `{"text": ...}` (loss on every token), `{"prompt": ..., "completion": ...}` (loss on the
completion only: labels are -100 on BOS and the prompt), or `{"messages": [{"role", "content"}, ...]}`
(a chat rendered by the tokenizer's chat template; loss on the assistant turns only, labels -100
everywhere else).  Text and prompt/completion sequences are BOS + tokens + EOS; a chat is what its
template writes.
Sequences longer than `max_seq_len` are truncated (counted, with one warning); a prompt/completion
pair whose completion is cut off entirely is skipped (counted in the same warning).
"""

from __future__ import annotations

import csv
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
    adapter: str | None = None  # multi-adapter training: the adapter this example trains

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


DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".pq", ".txt", ".arrow")
DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


def read_csv(path: str) -> list[tuple[str, dict[str, Any]]]:
    """The rows of a CSV file with a header line, each located `"FILE:LINE"`; empty cells are dropped."""
    try:
        fh = open(path, newline="", encoding="utf-8-sig")
    except OSError as err:
        raise DataError(f"data file {path} cannot be read: {err.strerror}") from None
    records = []
    with fh:
        try:
            reader = csv.DictReader(fh)
            for row in reader:
                record = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
                if record:
                    records.append((f"{path}:{reader.line_num}", record))
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason}); re-encode the file as UTF-8") from None
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None
    if not records:
        raise DataError(f"data file {path} holds no rows (a CSV needs a header line, e.g. 'text')")
    return records


def read_parquet(path: str) -> list[tuple[str, dict[str, Any]]]:
    """The rows of a Parquet file (needs pyarrow), each located `"FILE[row]"`."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises its own ArrowInvalid / OSError kinds
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    if not rows:
        raise DataError(f"data file {path} holds no rows")
    return [(f"{path}[{i}]", row) for i, row in enumerate(rows)]


def _dataset_rows(ds: Any, name: str) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a `datasets.Dataset`, or of the 'train' (else the only) split of a `DatasetDict`."""
    if isinstance(ds, dict):  # DatasetDict (a dict of splits)
        splits = list(ds.keys())
        if "train" in splits:
            ds, name = ds["train"], f"{name}[train]"
        elif len(splits) == 1:
            ds, name = ds[splits[0]], f"{name}[{splits[0]}]"
        else:
            raise DataError(f"{name} has splits {', '.join(splits)} and none is called 'train'; save one split")
    if len(ds) == 0:
        raise DataError(f"{name} holds no rows")
    return [(f"{name}[{i}]", row) for i, row in enumerate(ds)]


def read_dataset_folder(path: str) -> list[tuple[str, dict[str, Any]]]:
    """The rows of a folder written by `datasets`' `save_to_disk` (needs `datasets`)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a datasets folder; reading it needs `pip install datasets`") from None
    try:
        ds = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"{path}: not a dataset folder written by save_to_disk ({err})") from None
    return _dataset_rows(ds, path)


def read_cached_dataset(name: str) -> list[tuple[str, dict[str, Any]]]:
    """The 'train' split of hub dataset `name` as already held by the local Hugging Face cache (offline:
    nothing is downloaded)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"--data {name} is neither a file nor a folder (a hub dataset name needs "
                        f"`pip install datasets`)") from None
    from unittest import mock

    try:
        with mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True), \
                mock.patch.object(datasets.config, "HF_DATASETS_OFFLINE", True, create=True):
            ds = datasets.load_dataset(name, split="train")
    except Exception as err:  # datasets raises many kinds (ConnectionError, FileNotFoundError, ValueError)
        first = " ".join(str(err).split())[:200]
        raise DataError(f"--data {name} is not a file, a folder, nor a dataset in the local Hugging Face cache "
                        f"(fastpeft train does not download data): {first}") from None
    return _dataset_rows(ds, name)


def read_records(data: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """Located records from a JSONL / CSV / Parquet file, a `save_to_disk` folder, or a cached hub dataset."""
    path = os.fspath(data)
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, m)) for m in DATASET_MARKERS):
            raise DataError(f"data folder {path} is not a dataset written by `datasets` save_to_disk "
                            f"(no {' / '.join(DATASET_MARKERS)})")
        return read_dataset_folder(path)
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext == ".csv":
            return read_csv(path)
        if ext in (".parquet", ".pq"):
            return read_parquet(path)
        return read_jsonl(path)
    if not looks_like_hub_name(path):
        raise DataError(f"data file {path} does not exist")
    return read_cached_dataset(path)


def looks_like_hub_name(text: str) -> bool:
    """'name' or 'owner/name' with no file extension: what may be a dataset in the Hugging Face cache."""
    if os.path.splitext(text)[1].lower() in DATA_EXTENSIONS or text.startswith((".", "/", "~")):
        return False
    return text.count("/") <= 1 and all(part and part.replace("-", "").replace("_", "").replace(".", "").isalnum()
                                        for part in text.split("/"))


def _messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    messages = record["messages"]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content', got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no 'assistant' message, so nothing to train on")
    return out


def _template_ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(t) for t in out]


def chat_example(tokenizer: Any, messages: list[dict[str, str]], where: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a chat: labels are the ids on assistant turns, -100 elsewhere.

    With a template that marks assistant turns (`{% generation %}`) the tokenizer's own
    assistant mask is used; otherwise each assistant turn is the token span between the chat rendered
    up to it (with the generation prompt) and the chat rendered through it."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise DataError(f"{where}: 'messages' records need a tokenizer with a chat template, and {name} has none")
    if "generation" in tokenizer.chat_template and "endgeneration" in tokenizer.chat_template:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids = [int(t) for t in out["input_ids"]]
        return ids, [t if keep else IGNORE_INDEX for t, keep in zip(ids, out["assistant_masks"])]
    ids = _template_ids(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _template_ids(tokenizer, messages[:i], generation_prompt=True) if i else []
        through = _template_ids(tokenizer, messages[:i + 1])
        if ids[:len(before)] != before or ids[:len(through)] != through:
            raise DataError(f"{where}: the chat template does not render a conversation as the concatenation of its "
                            f"turns, so the assistant turns cannot be located; add {{% generation %}} tags to it")
        labels[len(before):len(through)] = ids[len(before):len(through)]
    return ids, labels


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
            raise DataError(f"{where}: expected a str or a dict with 'text', 'prompt'/'completion' or 'messages', "
                            f"got {type(record).__name__}")
        if "input_ids" in record:
            ids = [int(t) for t in record["input_ids"]]
            labels = [int(t) for t in record.get("labels", ids)]
            if len(labels) != len(ids):
                raise DataError(f"{where}: 'labels' has {len(labels)} entries but 'input_ids' has {len(ids)}")
            prompt_len = 0
        elif "messages" in record:
            ids, labels = chat_example(tokenizer, _messages(record, where), where)
            prompt_len = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
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
            raise DataError(f"{where}: no 'text' field, no 'prompt'/'completion' fields and no 'messages' field "
                            f"(fields: {fields})")
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
    """Examples from a path (JSONL, CSV, Parquet, a `save_to_disk` folder) or a cached hub dataset name, a
    `datasets.Dataset`, or a list of str / dict records / Examples."""
    if isinstance(data, (str, os.PathLike)):
        return tokenize_records(read_records(data), tokenizer, max_seq_len, source=os.fspath(data))
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        records = [(f"{name}[{i}]", data[i]) for i in range(len(data))]
        if not records:
            raise DataError(f"{name} is empty")
        return tokenize_records(records, tokenizer, max_seq_len, source=name)
    raise TypeError(f"{name} must be a data path or a sequence of records, got {type(data).__name__}")


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


def pad_token_id(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def collate(examples: list[Example], pad_id: int) -> dict[str, Any]:
    """Right-pad to the longest sequence: input_ids (pad_id), attention_mask (0), labels (-100); examples
    tagged with an adapter (multi-adapter training) add `adapter_names`, one per row."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(e.adapter is not None for e in examples):
        batch["adapter_names"] = [e.adapter if e.adapter is not None else "__base__" for e in examples]
    return batch
