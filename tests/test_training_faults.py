"""Training under faults: crafted checkpoints, bad flags, non-finite losses, full disks, unwritable and
busy folders, preemption signals, corrupt checkpoints.  Each test names the fault it injects."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest
import torch

import fastpeft
from fastpeft.training import DEFAULT_DATA, TrainArgs, Trainer, build_preset, find_checkpoint, load_examples
from fastpeft.training import checkpoints as ckpts
from fastpeft.training.checkpoints import CheckpointError, CheckpointWriteError, read_state
from fastpeft.training.cli import resume_command, train_main
from fastpeft.training.data import DataError
from fastpeft.training.preemption import TrainingPreempted
from fastpeft.training.runlock import LOCK_NAME, RunLockedError, acquire_run_lock, release_run_lock
from fastpeft.training.tokenizer import ByteTokenizer
from fastpeft.training.trainer import NonFiniteLossError
from tests.utils import launch_ranks

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(n=32):
    with open(DEFAULT_DATA, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh][:n]


def _lora(dropout=0.1):
    return fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                               task_type="CAUSAL_LM")


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=6, batch_size=4, learning_rate=1e-2, save_every=2, warmup_steps=1,
                progress=False, seed=3)
    base.update(kw)
    return TrainArgs(**base)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _cli(out, *extra):
    return train_main(["--out", str(out), "--batch-size", "4", "--quiet", *extra])


def _one_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The adapter of an uninterrupted Trainer run with `_args` (6 steps, dropout, checkpoints every 2)."""
    out = tmp_path_factory.mktemp("reference")
    trainer = Trainer(build_preset("tiny"), _args(out), _records(), peft_config=_lora())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    return _params(trainer.model)


# ---------------------------------------------------------------------------- issue 16: nothing executed
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_checkpoint_state_is_plain_data(tmp_path):
    Trainer(build_preset("tiny"), _args(tmp_path, max_steps=2), _records(), peft_config=_lora()).train()
    state = torch.load(tmp_path / "checkpoint-000002" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2 and isinstance(state["rng"][0]["torch"], torch.Tensor)
    assert isinstance(state["rng"][0]["python"], torch.Tensor)


def test_resume_refuses_a_pickle_that_runs_code(tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(out, "--steps", "4", "--save-every", "2") == 0
    marker = tmp_path / "pwned"
    newest = out / "checkpoint-000004"
    torch.save({"step": 4, "trainable": {}, "payload": _Evil(str(marker))}, newest / "trainer_state.pt")
    capsys.readouterr()
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        read_state(str(newest))
    assert _cli(out, "--steps", "4", "--save-every", "2", "--resume", str(newest)) == 2
    err = capsys.readouterr().err
    assert "refusing to unpickle" in _one_line(err) and not marker.exists()
    # --resume (latest) skips it with a warning and continues from the previous checkpoint
    assert _cli(out, "--steps", "4", "--save-every", "2", "--resume") == 0
    err = capsys.readouterr().err
    assert "refusing to unpickle" in err and "falling back to" in err and "checkpoint-000002" in err
    assert not marker.exists()


# ---------------------------------------------------------------------------- issue 16: flags
@pytest.mark.parametrize("flag, value", [
    ("--max-grad-norm", "-1"), ("--max-grad-norm", "nan"), ("--max-grad-norm", "inf"),
    ("--lr", "inf"), ("--lr", "nan"), ("--lr", "0"), ("--lr", "-1e-3"), ("--lr", "1e999"),
    ("--steps", "-3"), ("--epochs", "0"), ("--batch-size", "0"), ("--grad-accum", "-1"),
    ("--weight-decay", "-0.1"), ("--weight-decay", "nan"), ("--warmup-steps", "-1"), ("--dropout", "1.5"),
    ("--dropout", "nan"), ("--seq-len", "2"), ("--seed", "-1"), ("--alpha", "nan"), ("--r", "0"),
    ("--eval-fraction", "nan"), ("--save-every", "0"), ("--keep", "-2"), ("--log-every", "0"),
])
def test_bad_numeric_flag_is_refused_naming_it(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        train_main(["--out", str(tmp_path / "o"), flag, value])
    assert exc.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("fastpeft train: error:") and f"argument {flag}" in line, line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("field, value", [
    ("max_grad_norm", -1.0), ("max_grad_norm", float("nan")), ("learning_rate", float("inf")),
    ("learning_rate", float("nan")), ("weight_decay", -1.0), ("warmup_steps", -1), ("betas", (0.9, 1.5)),
    ("min_lr_ratio", 2.0), ("eval_fraction", 1.0), ("batch_size", 2.5), ("max_steps", True),
])
def test_bad_train_args_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        TrainArgs(**{field: value})


# ---------------------------------------------------------------------------- issue 16: non-finite loss
def _poison_at(step):
    def cb(trainer, logs):
        if logs["step"] == step:
            with torch.no_grad():
                next(iter(p for p in trainer.model.parameters() if p.requires_grad)).fill_(float("nan"))
    return cb


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(build_preset("tiny"), _args(tmp_path), _records(), peft_config=_lora(),
                      callbacks=[_poison_at(3)])
    with pytest.raises(NonFiniteLossError, match=r"step 4: the loss is nan.*checkpoint-000002") as exc:
        trainer.train()
    assert exc.value.step == 4 and exc.value.checkpoint.endswith("checkpoint-000002")
    assert find_checkpoint(str(tmp_path)).endswith("checkpoint-000002")
    assert not (tmp_path / "checkpoint-000004").exists() and not (tmp_path / "adapter_model.safetensors").exists()
    state = read_state(str(tmp_path / "checkpoint-000002"))
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())


def test_non_finite_weights_are_never_saved(tmp_path):
    """Weights poisoned after the last step (its checkpoint already written): the final adapter is refused;
    a checkpoint asked for with poisoned weights is refused too."""
    trainer = Trainer(build_preset("tiny"), _args(tmp_path), _records(), peft_config=_lora(),
                      callbacks=[_poison_at(6)])
    with pytest.raises(NonFiniteLossError, match="the final adapter was not written"):
        trainer.train()
    assert not (tmp_path / "adapter_model.safetensors").exists()
    assert find_checkpoint(str(tmp_path)).endswith("checkpoint-000006")
    assert all(torch.isfinite(t).all() for t in read_state(find_checkpoint(str(tmp_path)))["trainable"].values())
    with pytest.raises(NonFiniteLossError, match="checkpoint .*checkpoint-000007 was not written"):
        trainer.global_step = 7
        trainer.save_checkpoint()
    assert not (tmp_path / "checkpoint-000007").exists()


def test_cli_diverging_lr_exits_non_zero_without_a_nan_adapter(tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(out, "--steps", "6", "--lr", "1e30", "--warmup-steps", "0") == 1
    line = _one_line(capsys.readouterr().err)
    assert "training stopped at step" in line and ("nan" in line or "not finite" in line), line
    assert not (out / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------------------- issue 16: folders and files
def test_train_refuses_a_folder_holding_a_finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(out, "--steps", "2") == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert _cli(out, "--steps", "2", "--seed", "5") == 2
    assert "already holds a finished run" in _one_line(capsys.readouterr().err)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert _cli(out, "--steps", "2", "--resume") == 2  # nothing to continue from
    assert "no checkpoint to continue from" in _one_line(capsys.readouterr().err)
    assert _cli(out, "--steps", "2", "--resume", "--overwrite") == 2
    assert _cli(out, "--steps", "2", "--seed", "5", "--overwrite") == 0
    assert (out / "adapter_model.safetensors").read_bytes() != before


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    file = tmp_path / "file.txt"
    file.write_text("x")
    assert _cli(file, "--steps", "2") == 2
    assert "is a file, not a folder" in _one_line(capsys.readouterr().err)
    assert _cli(file / "sub", "--steps", "2") in (1, 2)  # a path through a file
    _one_line(capsys.readouterr().err)


def test_non_utf8_data_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"{data}:2: not UTF-8"):
        load_examples(str(data), ByteTokenizer(), 64)
    assert _cli(tmp_path / "o", "--data", str(data)) == 2
    assert f"{data}:2: not UTF-8" in _one_line(capsys.readouterr().err)
    bom = tmp_path / "bom.jsonl"  # a UTF-8 byte-order mark is fine
    bom.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n')
    assert len(load_examples(str(bom), ByteTokenizer(), 64)) == 1


@pytest.mark.parametrize("damage", ["truncate-state", "truncate-adapter", "garbage-state"])
def test_resume_falls_back_from_a_corrupt_newest_checkpoint(tmp_path, capsys, reference, damage):
    out = tmp_path / "run"
    first = Trainer(build_preset("tiny"), _args(out), _records(), peft_config=_lora())
    first.train()
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json"):
        os.remove(out / name)  # as if killed before the end
    newest = out / "checkpoint-000006"
    target = newest / ("adapter_model.safetensors" if damage == "truncate-adapter" else "trainer_state.pt")
    data = target.read_bytes()
    target.write_bytes(os.urandom(200) if damage == "garbage-state" else data[:len(data) // 2])
    resumed = Trainer(build_preset("tiny"), _args(out, resume="latest", progress=True), _records(),
                      peft_config=_lora())
    resumed.train()
    err = capsys.readouterr().err
    assert "warning:" in err and "corrupt or truncated" in err and "falling back to" in err
    assert "checkpoint-000004" in err and "resumed from" in err
    _assert_same(_params(resumed.model), reference)
    assert (out / "checkpoint-000006.corrupt").is_dir()  # moved aside, not deleted
    read_state(str(newest))  # rewritten by the resumed run


def test_resume_with_every_checkpoint_corrupt_is_an_error(tmp_path):
    Trainer(build_preset("tiny"), _args(tmp_path, max_steps=2), _records(), peft_config=_lora()).train()
    (tmp_path / "checkpoint-000002" / "trainer_state.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        Trainer(build_preset("tiny"), _args(tmp_path, max_steps=2, resume="latest"), _records(),
                peft_config=_lora()).train()


# ---------------------------------------------------------------------------- issue 27: full disk
def _fail_writes_into(monkeypatch, fragment, code=errno.ENOSPC):
    real = ckpts._write_bytes

    def write(path, data):
        if fragment in path:
            raise OSError(code, os.strerror(code), path)
        real(path, data)
    monkeypatch.setattr(ckpts, "_write_bytes", write)


def test_disk_full_during_a_checkpoint(tmp_path, monkeypatch, reference):
    out = tmp_path / "run"
    _fail_writes_into(monkeypatch, "checkpoint-000004")
    trainer = Trainer(build_preset("tiny"), _args(out), _records(), peft_config=_lora())
    with pytest.raises(CheckpointWriteError) as exc:
        trainer.train()
    msg = str(exc.value)
    assert "checkpoint-000004" in msg and "no space left" in msg and "needed" in msg and "free" in msg
    assert exc.value.errno == errno.ENOSPC and exc.value.needed > 0
    assert sorted(os.listdir(out)) == [LOCK_NAME, "checkpoint-000002"]  # no partial folder left
    read_state(str(out / "checkpoint-000002"))
    monkeypatch.undo()  # space freed: resume continues bit-exact from the intact checkpoint
    resumed = Trainer(build_preset("tiny"), _args(out, resume="latest"), _records(), peft_config=_lora())
    resumed.train()
    _assert_same(_params(resumed.model), reference)


def test_cli_disk_full_is_one_line_and_non_zero(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _fail_writes_into(monkeypatch, "checkpoint-000004")
    assert _cli(out, "--steps", "6", "--save-every", "2") == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("fastpeft train: error: could not write checkpoint") and "no space left" in line
    assert not (out / "checkpoint-000004.tmp").exists() and (out / "checkpoint-000002").is_dir()
    with pytest.raises(CheckpointWriteError):  # --debug: the exception itself
        _cli(out, "--steps", "6", "--save-every", "2", "--resume", "--debug")


def test_disk_full_writing_the_final_adapter(tmp_path, monkeypatch, capsys):
    def full(self, *a, **k):
        raise RuntimeError("failed to write: No space left on device (os error 28)")  # as safetensors reports it
    monkeypatch.setattr(fastpeft.PeftModel, "save_pretrained", full)
    out = tmp_path / "run"
    assert _cli(out, "--steps", "2") == 1
    line = _one_line(capsys.readouterr().err)
    assert f"could not write the adapter into {out}" in line and "no space left" in line


def test_permission_denied_during_a_checkpoint(tmp_path, monkeypatch):
    _fail_writes_into(monkeypatch, "checkpoint-000002", errno.EACCES)
    with pytest.raises(CheckpointWriteError, match="no permission to write"):
        Trainer(build_preset("tiny"), _args(tmp_path), _records(), peft_config=_lora()).train()
    assert not any(n.startswith("checkpoint-") for n in os.listdir(tmp_path))


# ---------------------------------------------------------------------------- issue 27: unwritable folder
def test_unwritable_output_folder_fails_before_training(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() != 0:  # a real read-only folder where permission bits bind
        out.chmod(0o500)
    else:  # root ignores permission bits: make creating a file there fail as a read-only file system does
        real = tempfile.mkstemp

        def mkstemp(*a, dir=None, **k):
            if dir is not None and os.path.abspath(dir).startswith(str(out)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(dir, "x"))
            return real(*a, dir=dir, **k)
        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    try:
        assert train_main(["--out", str(out), "--steps", "2", "--batch-size", "4"]) == 1
    finally:
        out.chmod(0o700)
    err = capsys.readouterr().err
    line = _one_line(err)
    assert f"the output folder {out} is not writable" in line and "training" not in err


# ---------------------------------------------------------------------------- issue 27: one run per folder
HOLDER = textwrap.dedent('''
    import fcntl, json, os, socket, sys, time
    fd = os.open(os.path.join(sys.argv[1], ".fastpeft.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode())
    print("locked", flush=True)
    time.sleep(60)
''')


def test_a_second_run_on_a_locked_folder_exits_at_once_then_a_stale_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        assert _cli(out, "--steps", "2") == 1
        line = _one_line(capsys.readouterr().err)
        assert f"is in use by pid {holder.pid} on host {socket.gethostname()}" in line
        assert time.perf_counter() - start < 2.0  # before any model is loaded
        with pytest.raises(RunLockedError):  # the Python API too
            Trainer(build_preset("tiny"), _args(out, max_steps=2), _records(), peft_config=_lora()).train()
    finally:
        holder.kill()  # SIGKILL: the holder leaves its pid in the lock file
        holder.wait()
    assert str(holder.pid) in (out / LOCK_NAME).read_text()
    assert _cli(out, "--steps", "2") == 0
    err = capsys.readouterr().err
    assert f"taking over the stale lock of {out} left by pid {holder.pid}" in err
    assert (out / LOCK_NAME).read_text() == ""  # released at exit


def test_lock_is_reentrant_in_one_process_and_exclusive_across(tmp_path):
    a = acquire_run_lock(str(tmp_path), print)
    b = acquire_run_lock(str(tmp_path), print)
    assert a is b
    probe = subprocess.run([sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
                            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(tmp_path / LOCK_NAME)],
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "BlockingIOError" in probe.stderr
    release_run_lock(b)
    release_run_lock(a)
    probe = subprocess.run(probe.args, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr


# ---------------------------------------------------------------------------- issue 27: preemption
def _signal_at(step, *signums):
    def cb(trainer, logs):
        if logs["step"] == step:
            for s in signums:
                os.kill(os.getpid(), s)
                time.sleep(0.01)  # let the handler run before the next one arrives
    return cb


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_signal_finishes_the_step_checkpoints_and_resumes_bit_exact(tmp_path, reference, signum):
    before = signal.getsignal(signum)
    trainer = Trainer(build_preset("tiny"), _args(tmp_path), _records(), peft_config=_lora(),
                      callbacks=[_signal_at(3, signum)])
    with pytest.raises(TrainingPreempted) as exc:
        trainer.train()
    assert signal.getsignal(signum) == before  # handlers restored
    err = exc.value
    assert (err.signum, err.step, err.exit_code) == (signum, 3, 128 + signum)
    assert err.checkpoint == str(tmp_path / "checkpoint-000003") and trainer.global_step == 3
    assert not (tmp_path / "adapter_model.safetensors").exists()  # an unfinished run has no final adapter
    resumed = Trainer(build_preset("tiny"), _args(tmp_path, resume="latest"), _records(), peft_config=_lora())
    assert resumed.train().global_step == 6
    _assert_same(_params(resumed.model), reference)


def test_signal_on_a_checkpoint_step_writes_it_once(tmp_path):
    trainer = Trainer(build_preset("tiny"), _args(tmp_path), _records(), peft_config=_lora(),
                      callbacks=[_signal_at(2, signal.SIGTERM)])
    with pytest.raises(TrainingPreempted) as exc:
        trainer.train()
    assert exc.value.checkpoint == str(tmp_path / "checkpoint-000002")
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint-")) == ["checkpoint-000002"]


def test_a_second_signal_stops_at_once(tmp_path):
    trainer = Trainer(build_preset("tiny"), _args(tmp_path, save_every=None), _records(), peft_config=_lora(),
                      callbacks=[_signal_at(1, signal.SIGINT, signal.SIGINT)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.global_step == 1 and not any(n.startswith("checkpoint-") for n in os.listdir(tmp_path))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_resume_command_drops_resume_and_overwrite():
    assert resume_command(["--out", "a b", "--overwrite", "--steps", "5"]) == \
        "fastpeft train --out 'a b' --steps 5 --resume"
    assert resume_command(["--resume", "run/checkpoint-000005", "--out", "run"]) == \
        "fastpeft train --out run --resume"
    assert resume_command(["--resume", "--out", "run"]) == "fastpeft train --out run --resume"


CHILD_ARGS = ["--steps", "150", "--batch-size", "2", "--seq-len", "32", "--dropout", "0.1", "--seed", "1",
              "--save-every", "100", "--log-every", "1"]


def test_sigterm_to_a_child_process_then_resume_is_bit_exact(tmp_path, capsys):
    """A real `python -m fastpeft train` gets SIGTERM after logging two steps: it finishes its step,
    checkpoints, prints the resume command, exits 143; while it runs, a second run on its folder is
    refused; resuming ends with the adapter of an uninterrupted run, bit for bit."""
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    child = subprocess.Popen([sys.executable, "-m", "fastpeft", "train", "--out", str(out), *CHILD_ARGS],
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    watchdog = threading.Timer(120, child.kill)
    watchdog.start()
    try:
        lines = []
        for line in child.stderr:
            lines.append(line)
            if line.startswith("step 2/150"):
                break
        assert _cli(out, *CHILD_ARGS) == 1  # the folder is busy
        assert f"in use by pid {child.pid}" in capsys.readouterr().err
        child.send_signal(signal.SIGTERM)
        rest = child.stderr.read()
        code = child.wait()
    finally:
        watchdog.cancel()
        child.kill()
    log = "".join(lines) + rest
    assert code == 128 + signal.SIGTERM, log
    assert "received SIGTERM: finishing the current step" in log
    stop = [line for line in log.splitlines() if "stopped by SIGTERM after step" in line]
    assert len(stop) == 1 and "resume with: fastpeft train --out" in stop[0] and stop[0].endswith("--resume"), log
    step = int(stop[0].split("after step ")[1].split("/")[0])
    assert 2 <= step < 150 and find_checkpoint(str(out)).endswith(f"checkpoint-{step:06d}")

    assert _cli(out, *CHILD_ARGS, "--resume") == 0
    assert _cli(tmp_path / "full", *CHILD_ARGS) == 0
    from fastpeft.io import load_tensors

    full, resumed = load_tensors(str(tmp_path / "full")), load_tensors(str(out))
    _assert_same(full, resumed)


def test_preflight_warns_when_two_checkpoints_do_not_fit(tmp_path, monkeypatch, capsys):
    import fastpeft.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "free_bytes", lambda folder: 1000)
    Trainer(build_preset("tiny"), _args(tmp_path, max_steps=2, save_every=None), _records(),
            peft_config=_lora()).train()
    err = capsys.readouterr().err
    assert f"warning: {tmp_path} has 1000 B free, less than two checkpoints need" in err


def test_fault_exceptions_are_exported():
    from fastpeft import training

    for name in ("CheckpointError", "CheckpointWriteError", "NonFiniteLossError", "RunLockedError",
                 "TrainingPreempted"):
        assert name in training.__all__ and hasattr(training, name)
    assert issubclass(training.CheckpointWriteError, OSError) and issubclass(training.CheckpointError, ValueError)


DDP_WORKER = textwrap.dedent('''
    import json, os, signal, sys, torch
    torch.set_num_threads(1)
    import fastpeft
    from fastpeft.training import DEFAULT_DATA, TrainArgs, Trainer, TrainingPreempted, build_preset

    out = sys.argv[1]
    with open(DEFAULT_DATA) as fh:
        records = [json.loads(line) for line in fh][:32]
    config = fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")

    def sigterm_rank1(trainer, logs):  # only rank 1 is told to stop
        if trainer.rank == 1 and logs["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    args = TrainArgs(output_dir=out, max_steps=6, batch_size=2, learning_rate=1e-2, log_every=1, seed=0)
    trainer = Trainer(build_preset("tiny"), args, records, peft_config=config, callbacks=[sigterm_rank1])
    try:
        trainer.train()
        print("finished", trainer.global_step)
    except TrainingPreempted as err:
        print("preempted", err.step, err.checkpoint)
''')


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    out = tmp_path / "ddp"
    results = [stdout.strip().splitlines()[-1] for stdout, _ in launch_ranks(script, [out], world=2)]
    checkpoint = str(out / "checkpoint-000002")
    assert results == [f"preempted 2 {checkpoint}"] * 2
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-000002"]
    assert read_state(checkpoint)["world_size"] == 2


# ---------------------------------------------------------------------------- a kill at any file operation
class _Kill(BaseException):
    """Stands for SIGKILL: raised at the k-th file operation, and again at every later one, so no
    cleanup code gets to run either (a killed process runs none)."""


def test_a_kill_after_any_file_operation_of_a_checkpoint_leaves_a_resumable_folder(tmp_path, monkeypatch,
                                                                                   reference):
    import shutil

    ops = {"os.replace": (os, "replace"), "os.makedirs": (os, "makedirs"), "os.rename": (os, "rename"),
           "shutil.rmtree": (shutil, "rmtree"), "write_bytes": (ckpts, "_write_bytes")}
    real = {name: getattr(mod, attr) for name, (mod, attr) in ops.items()}
    k = 0
    while True:
        k += 1
        out = tmp_path / f"run{k}"
        calls = [0]

        def make(name):
            def op(*args, **kwargs):
                if any(str(out) in str(a) for a in args):  # only this run's files count
                    calls[0] += 1
                    if calls[0] >= k:
                        raise _Kill(name)
                return real[name](*args, **kwargs)
            return op

        for name, (mod, attr) in ops.items():
            monkeypatch.setattr(mod, attr, make(name))
        try:
            Trainer(build_preset("tiny"), _args(out), _records(), peft_config=_lora()).train()
            killed = False
        except _Kill:
            killed = True
        finally:
            monkeypatch.undo()
        if not killed:
            break  # k passed the number of file operations a whole run performs
        resume = "latest" if ckpts.list_checkpoints(str(out)) else None
        resumed = Trainer(build_preset("tiny"), _args(out, resume=resume), _records(), peft_config=_lora())
        resumed.train()
        _assert_same(_params(resumed.model), reference)
    print(f"killed at each of {k - 1} file operations")
    assert k > 10, f"only {k - 1} file operations were seen: the patching missed the checkpoint writes"
