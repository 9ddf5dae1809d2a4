"""`fastpeft` CLI basics and `fastpeft train`'s inputs: --version and help, --config YAML/JSON files,
data kinds (CSV, Parquet, a `datasets` folder), chat `messages` with loss on assistant turns only,
--report-to tensorboard, the overwrite refusal, and the presets' transformers tokenizer."""

import json
import os
import random

import pytest

from fastpeft.cli import main
from fastpeft.training.cli import train_main
from fastpeft.training.data import IGNORE_INDEX, DataError, chat_example, load_examples, read_records
from fastpeft.training.tokenizer import (BOS_ID, EOS_ID, TOKENIZER_DIR, ByteTokenizer, build_preset_tokenizer,
                                         preset_tokenizer)

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(out, *extra):
    return train_main(["--out", str(out), "--batch-size", "4", "--quiet", *extra])


def _state(out):
    return json.loads((out / "trainer_state.json").read_text())


# ----------------------------------------------------------------------------- fastpeft itself
def test_bare_command_prints_help_and_version(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fastpeft <command>") and "train" in out and "bench" in out
    assert main(["--version"]) == 0
    import fastpeft

    assert capsys.readouterr().out.startswith(f"fastpeft {fastpeft.__version__} (torch ")
    assert main(["--quick"]) == 2
    assert "fastpeft bench --quick" in capsys.readouterr().err


def test_train_help_states_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        train_main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("--batch-size BATCH_SIZE examples per micro-batch per process (default: 8)",
                     "(default: lora)", "(default: tiny)", "--config FILE", "--report-to", "messages"):
        assert expected in text, expected


# ----------------------------------------------------------------------------- --config
def test_yaml_config_holds_flags_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: ia3\nsteps: 5\nbatch_size: 4\nseed: 3\nlog-every: 1\n"
                   "target_modules: [k_proj, v_proj, down_proj]\neval_fraction: 0.1\nquiet: true\n")
    out = tmp_path / "run"
    assert train_main(["--config", str(cfg), "--out", str(out), "--steps", "2"]) == 0
    state = _state(out)
    assert state["step"] == 2 and state["eval_loss"] > 0  # --steps 2 overrides the file's 5
    info = json.loads((out / "train_info.json").read_text())
    assert info["method"] == "ia3" and info["seed"] == 3
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"k_proj", "v_proj", "down_proj"}
    assert adapter["feedforward_modules"] == ["down_proj"]
    # --epochs on the command line replaces the file's --steps instead of clashing with it
    assert train_main(["--config", str(cfg), "--out", str(tmp_path / "ep"), "--epochs", "1",
                       "--batch-size", "128"]) == 0
    assert _state(tmp_path / "ep")["total_steps"] in (2, 3)  # one epoch of 270 examples, not the file's 5 steps


def test_print_config_round_trips_every_flag(tmp_path, capsys):
    from fastpeft.training.cli import parse_train_args, train_parser

    argv = ["--method", "prefix", "--steps", "7", "--lr", "0.02", "--num-virtual-tokens", "5", "--quiet",
            "--target-modules", "q_proj,v_proj", "--resume"]
    assert train_main([*argv, "--print-config"]) == 0
    text = capsys.readouterr().out
    cfg = tmp_path / "all.yaml"
    cfg.write_text(text)
    flags = {a.dest for a in train_parser()._actions if a.option_strings} - {"help", "config", "print_config"}
    import yaml

    assert set(yaml.safe_load(text)) == flags  # every flag is in the file
    assert vars(parse_train_args(["--config", str(cfg)])) == {**vars(parse_train_args(argv)), "config": str(cfg)}


@pytest.mark.parametrize("content, message", [
    ({"method": "lora", "stpes": 3}, "unknown key 'stpes'"),
    ({"steps": 0}, "steps: expected a positive integer, got 0"),
    ({"method": "bitfit"}, "method: 'bitfit' is not one of lora"),
    ({"quiet": "yes"}, "quiet: expected true or false"),
    ({"steps": [1, 2]}, "steps: expected a single value"),
    ([1, 2], "expected a mapping"),
])
def test_config_errors_name_the_key(tmp_path, capsys, content, message):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps(content))
    with pytest.raises(SystemExit) as exc:
        train_main(["--config", str(cfg), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and str(cfg) in err, err


def test_config_file_missing_or_unparsable(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_main(["--config", str(tmp_path / "none.yaml")])
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1\n")
    with pytest.raises(SystemExit):
        train_main(["--config", str(bad)])
    assert "not valid YAML" in capsys.readouterr().err


# ----------------------------------------------------------------------------- data kinds
def test_datasets_folder_run(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [f"{a} + {b} = {a + b}" for a in range(8) for b in range(8)]
    folder = tmp_path / "ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": rows})}).save_to_disk(str(folder))
    out = tmp_path / "run"
    assert _train(out, "--data", str(folder), "--steps", "3", "--eval-fraction", "0.1") == 0
    assert _state(out)["step"] == 3
    tok = preset_tokenizer()
    examples = load_examples(str(folder), tok, 64)
    assert [e.input_ids for e in examples] == [[BOS_ID, *r.encode(), EOS_ID] for r in rows]


def test_csv_and_parquet_records(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('prompt,completion\n"1 + 1 =", 2\n"a, b",c\n')
    assert read_records(csv_path) == [(f"{csv_path}:2", {"prompt": "1 + 1 =", "completion": " 2"}),
                                      (f"{csv_path}:3", {"prompt": "a, b", "completion": "c"})]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq_path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["hello", "world"]}), str(pq_path))
    assert read_records(pq_path) == [(f"{pq_path}[0]", {"text": "hello"}), (f"{pq_path}[1]", {"text": "world"})]
    out = tmp_path / "run"
    assert _train(out, "--data", str(csv_path), "--steps", "1", "--batch-size", "2") == 0


def test_missing_data_and_unknown_dataset_name(tmp_path, capsys):
    assert _train(tmp_path / "o", "--data", str(tmp_path / "nope.csv")) == 2
    assert "does not exist" in capsys.readouterr().err
    pytest.importorskip("datasets")
    assert _train(tmp_path / "o", "--data", "no-such-owner/no-such-dataset-h18") == 2
    assert "not a file, a folder, nor a dataset in the local Hugging Face cache" in capsys.readouterr().err


# ----------------------------------------------------------------------------- chat messages
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"}, {"role": "user", "content": "2+2"},
        {"role": "assistant", "content": "4"}]


def _expected(pieces):
    """(ids, labels) from (text, trained) pieces: BOS, bytes of each piece, EOS where the piece says."""
    ids, labels = [BOS_ID], [IGNORE_INDEX]
    for text, trained in pieces:
        chunks = text.split("</s>")
        for i, chunk in enumerate(chunks):
            b = list(chunk.encode())
            ids += b
            labels += b if trained else [IGNORE_INDEX] * len(b)
            if i < len(chunks) - 1:
                ids.append(EOS_ID)
                labels.append(EOS_ID if trained else IGNORE_INDEX)
    return ids, labels


def test_messages_labels_mask_everything_but_assistant_turns():
    tok = preset_tokenizer()
    ids, labels = chat_example(tok, CHAT, "x")
    want = _expected([("system: be brief\nuser: hi\nassistant: ", False), ("yo</s>", True),
                      ("\nuser: 2+2\nassistant: ", False), ("4</s>", True), ("\n", False)])
    assert (ids, labels) == want
    # a template without {% generation %} marks: each assistant turn is found between two renderings
    plain = build_preset_tokenizer()
    plain.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                           "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
                           "{% if add_generation_prompt %}assistant: {% endif %}")
    ids2, labels2 = chat_example(plain, CHAT, "x")
    assert ids2 == ids
    assert labels2 == _expected([("system: be brief\nuser: hi\nassistant: ", False), ("yo</s>\n", True),
                                 ("user: 2+2\nassistant: ", False), ("4</s>\n", True)])[1]


def test_messages_run_and_errors(tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"{a} + {b} ="},
                          {"role": "assistant", "content": str(a + b)}]} for a in range(5) for b in range(5)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    assert _train(out, "--data", str(data), "--steps", "2") == 0
    examples = load_examples(str(data), preset_tokenizer(), 64)
    assert all(sum(t != IGNORE_INDEX for t in e.labels) == len(str(a + b)) + 1  # the answer and its EOS
               for e, (a, b) in zip(examples, [(a, b) for a in range(5) for b in range(5)]))
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert _train(tmp_path / "o2", "--data", str(data)) == 2
    assert f"{data}:1: no 'assistant' message" in capsys.readouterr().err
    with pytest.raises(DataError, match="need a tokenizer with a chat template"):
        load_examples([{"messages": CHAT}], ByteTokenizer(), 64)


# ----------------------------------------------------------------------------- --report-to
def test_report_to_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert _train(out, "--steps", "4", "--log-every", "2", "--report-to", "tensorboard") == 0
    runs = out / "runs"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(runs))
    acc = EventAccumulator(str(runs))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "eval/loss"} <= set(scalars)
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4]
    assert [e.step for e in acc.Scalars("eval/loss")][-1] == 4


def test_report_to_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert _train(out, "--steps", "2", "--report-to", "wandb") == 0
    assert any(name.startswith("offline-run") for name in os.listdir(out / "wandb"))


# ----------------------------------------------------------------------------- runs and tokenizer
def test_finished_run_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--steps", "1") == 0
    assert _train(out, "--steps", "1") == 2
    err = capsys.readouterr().err
    assert "already holds a finished run" in err and "--overwrite" in err
    before = (out / "adapter_model.safetensors").read_bytes()
    assert _train(out, "--steps", "1", "--seed", "7", "--overwrite") == 0
    assert (out / "adapter_model.safetensors").read_bytes() != before


def test_presets_use_a_transformers_tokenizer_with_byte_ids():
    from transformers import PreTrainedTokenizerFast

    tok = preset_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast) and os.path.isfile(os.path.join(TOKENIZER_DIR, "tokenizer.json"))
    assert (len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (259, 256, 257, 258)
    built = build_preset_tokenizer()
    assert json.loads(tok.backend_tokenizer.to_str()) == json.loads(built.backend_tokenizer.to_str())
    assert tok.chat_template == built.chat_template
    rng = random.Random(os.urandom(4))
    byte = ByteTokenizer()
    for _ in range(20):
        text = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(160, 0x3000)])) for _ in range(20))
        assert tok.encode(text, add_special_tokens=False) == byte.encode(text, add_special_tokens=False)
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
