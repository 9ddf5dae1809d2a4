"""`fastpeft train` / `fastpeft generate`: the embedded default, outputs, resume, and errors."""

import json
import os
import re
import shutil

import pytest
import torch

from fastpeft.cli import main
from fastpeft.io import load_tensors
import fastpeft.training.cli as cli_module
from fastpeft.training.cli import generate_main, train_main


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(out, *extra):
    return train_main(["--out", str(out), "--batch-size", "8", "--quiet", *extra])


def _start_end(err: str) -> tuple[float, float]:
    """The eval losses of the line `eval loss A at the start -> B at the end (...)`."""
    line = next(line for line in err.splitlines() if "at the start ->" in line)
    head, tail = line.split(" at the start -> ")
    return float(head.split()[-1]), float(tail.split()[0])


@pytest.mark.parametrize("method", ["lora", "ia3", "prefix", "prompt", "ptuning", "bottleneck"])
def test_default_run_of_each_method_lowers_the_eval_loss(method, tmp_path, capsys):
    """`fastpeft train --method M --model tiny` as it is (200 steps, 10 % of the shipped data held out):
    the eval loss printed at the end is clearly below the one printed before the first step."""
    assert main(["train", "--method", method, "--model", "tiny", "--out", str(tmp_path / "run"),
                 "--log-every", "1000"]) == 0
    start, end = _start_end(capsys.readouterr().err)
    assert end < start - 0.75, (start, end)
    if method == "lora":  # the README's generate example: the adapter visibly writes the data's sentences
        assert main(["generate", "--adapter", str(tmp_path / "run"), "--prompt", "the red"]) == 0
        tuned = capsys.readouterr().out.strip()
        assert main(["generate", "--adapter", str(tmp_path / "run"), "--prompt", "the red", "--no-adapter"]) == 0
        base = capsys.readouterr().out.strip()
        sentence = r"the red [a-z]+ sat on the [a-z]+\."
        assert re.fullmatch(sentence, tuned), tuned
        assert not re.fullmatch(sentence, base), base


def test_embedded_default_trains_and_generates(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--steps", "30", "--batch-size", "16", "--log-every", "10",
                 "--save-every", "15", "--eval-fraction", "0.1"]) == 0
    err = capsys.readouterr().err
    losses = [float(line.split("loss ")[1].split()[0]) for line in err.splitlines() if line.startswith("step ")
              and "| loss" in line]
    assert len(losses) == 3 and losses[-1] < losses[0], err
    assert "eval loss" in err and "done: 30 steps" in err
    start, end = _start_end(err)
    assert end < start, err
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "train_info.json", "checkpoint-000015",
            "checkpoint-000030"} <= files
    info = json.loads((out / "train_info.json").read_text())
    assert info["model"] == "tiny" and info["method"] == "lora" and info["source"] == {"preset": "tiny", "seed": 0}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"

    assert main(["generate", "--adapter", str(out), "--prompt", "3 + 4 =", "--max-new-tokens", "8"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("3 + 4 =")
    # a checkpoint folder works as the adapter too (train_info.json is found in its parent)
    assert generate_main(["--adapter", str(out / "checkpoint-000015"), "--prompt", "the", "--max-new-tokens", "4",
                          "--temperature", "0.8", "--seed", "0"]) == 0


def test_prompt_completion_data_with_eval_file(tmp_path, capsys):
    rows = [{"prompt": f"{a} + {b} =", "completion": f" {a + b}"} for a in range(6) for b in range(6)]
    data, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows[:30]) + "\n")
    evals.write_text("\n".join(json.dumps(r) for r in rows[30:]) + "\n")
    assert _train(tmp_path / "run", "--data", str(data), "--eval", str(evals), "--steps", "4", "--method", "ia3") == 0
    assert json.loads((tmp_path / "run" / "trainer_state.json").read_text())["eval_loss"] > 0


def test_resume_continues_to_the_same_adapter(tmp_path):
    args = ["--steps", "6", "--save-every", "3", "--dropout", "0.1", "--seed", "3"]
    assert _train(tmp_path / "full", *args) == 0
    killed = tmp_path / "killed"
    assert _train(killed, *args) == 0
    # simulate a kill after the step-3 checkpoint: drop everything written later
    shutil.rmtree(killed / "checkpoint-000006")
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json"):
        os.remove(killed / name)
    assert _train(killed, *args) == 2  # refuses to overwrite a run without --resume
    assert _train(killed, *args, "--resume") == 0
    a, b = load_tensors(str(tmp_path / "full")), load_tensors(str(killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_local_model_folder(tmp_path, capsys):
    from fastpeft.training import build_preset

    folder = tmp_path / "model"
    build_preset("tiny", seed=5).save_pretrained(folder)  # no tokenizer files: the byte tokenizer is used
    out = tmp_path / "run"
    assert _train(out, "--model", str(folder), "--steps", "2", "--lr", "1e-3") == 0
    assert json.loads((out / "train_info.json").read_text())["source"] == {"path": str(folder)}
    capsys.readouterr()
    assert generate_main(["--adapter", str(out), "--prompt", "ab", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("ab")


@pytest.mark.parametrize("argv, message", [
    (["--method", "bitfit"], "invalid choice: 'bitfit'"),
    (["--steps", "0"], "expected a positive integer"),
    (["--steps", "3", "--epochs", "1"], "not allowed with argument"),
    (["--eval-fraction", "1.5"], "expected a fraction"),
    (["--dtype", "fp8"], "invalid choice: 'fp8'"),
])
def test_argument_errors_exit_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        train_main(["--out", str(tmp_path), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--data", "missing.jsonl"], "--data missing.jsonl does not exist"),
    (["--method", "prefix", "--gradient-checkpointing"], "does not work with --method prefix"),
    (["--method", "prompt", "--target-modules", "q_proj"], "applies to lora and ia3"),
    (["--model", "no-such-model"], "neither a preset"),
    (["--resume", "nowhere"], "no such checkpoint folder"),
    (["--batch-size", "512"], "fewer than one global batch"),
])
def test_usage_errors_return_2(tmp_path, capsys, argv, message):
    assert train_main(["--out", str(tmp_path / "o"), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastpeft train: error:") and message in err


def test_bad_data_error_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "fine"}\n{"prompt": "only a prompt"}\n')
    assert _train(tmp_path / "o", "--data", str(data)) == 2
    assert f"{data}:3: has 'prompt' but no 'completion'" in capsys.readouterr().err
    data.write_text('{"text": "fine"}\nnot json\n')
    assert _train(tmp_path / "o", "--data", str(data)) == 2
    assert f"{data}:2: not valid JSON" in capsys.readouterr().err


def test_generate_errors(tmp_path, capsys):
    assert generate_main(["--adapter", str(tmp_path / "none"), "--prompt", "x"]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "adapter").mkdir()
    assert generate_main(["--adapter", str(tmp_path / "adapter"), "--prompt", "x"]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert generate_main(["--adapter", str(tmp_path / "adapter"), "--model", "tiny", "--prompt", "x"]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        generate_main(["--adapter", str(tmp_path)])
    assert exc.value.code == 2


def test_qlora_run_lowers_the_eval_loss_and_generates_on_a_4bit_base(tmp_path, capsys, monkeypatch):
    """`fastpeft train --quantize nf4`: LoRA over a frozen 4-bit base learns (eval loss printed before and
    after), writes PEFT's adapter files, and `generate` rebuilds the 4-bit base the adapter was trained on."""
    from fastpeft.nn.linear4bit import Linear4bit

    out = tmp_path / "qlora"
    assert main(["train", "--method", "lora", "--model", "tiny", "--quantize", "nf4", "--steps", "60",
                 "--out", str(out), "--log-every", "1000"]) == 0
    start, end = _start_end(capsys.readouterr().err)
    assert end < start - 0.75, (start, end)
    assert json.loads((out / "train_info.json").read_text())["quantize"] == "nf4"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    built = []
    real = cli_module._quantize
    monkeypatch.setattr(cli_module, "_quantize", lambda *a: built.append(real(*a)) or built[-1])
    assert main(["generate", "--adapter", str(out), "--prompt", "the red", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("the red")
    assert built and any(isinstance(m, Linear4bit) for m in built[0].modules())
    assert main(["train", "--method", "ia3", "--model", "tiny", "--quantize", "nf4", "--out", str(tmp_path / "x")]) == 2
    assert "IA3 on a 4-bit base" in capsys.readouterr().err


def test_interpret_lists_each_virtual_tokens_nearest_vocabulary(tmp_path, capsys):
    """`fastpeft interpret ADAPTER --top-k K`: one line per virtual token with its K nearest tokens (the base
    model from the run's train_info.json); a prefix adapter, whose rows are not embeddings, is refused."""
    out = tmp_path / "prompt"
    assert main(["train", "--method", "prompt", "--model", "tiny", "--steps", "2", "--num-virtual-tokens", "4",
                 "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["interpret", str(out), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"virtual token {i:>3}" for i in range(4)]
    assert all(len(re.findall(r" -?\d\.\d{3}", line)) == 2 for line in lines), lines
    prefix = tmp_path / "prefix"
    assert main(["train", "--method", "prefix", "--model", "tiny", "--steps", "1", "--out", str(prefix), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["interpret", str(prefix)]) == 2
    assert "fastpeft interpret:" in capsys.readouterr().err


def test_adapter_data_trains_one_adapter_per_dataset_that_peft_loads(tmp_path, capsys):
    """`--adapter-data NAME=DATA` twice: one run, two LoRA adapters in OUT/NAME, each loading in HF PEFT
    with fastpeft's logits; each learned its own data (its eval loss on it is the lower one)."""
    peft = pytest.importorskip("peft")
    from fastpeft import PeftModel
    from fastpeft.training import build_preset

    rows = [json.loads(line) for line in open(cli_module.DEFAULT_DATA, encoding="utf-8")]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": "the red fox sat on the mat."}) + "\n" for _ in rows[:40]))
    b.write_text("".join(json.dumps({"text": "one two three four five six."}) + "\n" for _ in rows[:40]))
    out = tmp_path / "run"
    assert _train(out, "--adapter-data", f"red={a}", "--adapter-data", f"count={b}", "--steps", "30",
                  "--eval-fraction", "0.1", "--r", "4") == 0
    info = json.loads((out / "train_info.json").read_text())
    assert info["adapters"] == ["red", "count"]
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    for name in ("red", "count"):
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out / name))
        ours = PeftModel.from_pretrained(build_preset("tiny"), str(out / name)).eval()
        theirs = peft.PeftModel.from_pretrained(build_preset("tiny"), str(out / name)).eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    red = load_tensors(str(out / "red"))
    count = load_tensors(str(out / "count"))
    assert red.keys() == count.keys() and any(not torch.equal(red[k], count[k]) for k in red)
    assert main(["generate", "--adapter", str(out / "red"), "--prompt", "the red", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip().startswith("the red fox")


@pytest.mark.parametrize("extra, message", [
    (["--adapter-data", "a=X"], "two or more"),
    (["--adapter-data", "a=X", "--adapter-data", "a=Y"], "given twice"),
    (["--adapter-data", "aX", "--adapter-data", "b=Y"], "expected NAME=DATA"),
    (["--adapter-data", "a=X", "--adapter-data", "b=Y", "--method", "ia3"], "not ia3"),
    (["--adapter-data", "a=X", "--adapter-data", "b=Y", "--data", "X"], "not both"),
    (["--adapter-data", "a=X", "--adapter-data", "b=missing.jsonl"], "b=missing.jsonl does not exist"),
])
def test_adapter_data_usage_errors(tmp_path, capsys, extra, message):
    x = tmp_path / "x.jsonl"
    x.write_text(json.dumps({"text": "hello"}) + "\n")
    argv = [t.replace("X", str(x)).replace("Y", str(x)) if "missing" not in t else t for t in extra]
    assert _train(tmp_path / "run", *argv) == 2
    assert message in capsys.readouterr().err
