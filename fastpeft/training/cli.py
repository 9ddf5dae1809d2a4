"""`fastpeft train` and `fastpeft generate`.

    fastpeft train                                  # LoRA on the tiny preset + the shipped tiny.jsonl
    fastpeft train --config run.yaml --steps 50     # every flag from a YAML/JSON file; flags given win
    fastpeft train --data chat.jsonl --report-to tensorboard   # {"messages": [...]}: loss on assistant turns
    fastpeft train --method ia3 --model ./my-llama --data train.jsonl --out run1 --steps 500
    torchrun --nproc-per-node 8 -m fastpeft train --model bench --data d.jsonl --out run2   # DDP
    fastpeft train ... --out run1 --resume          # continue from the newest checkpoint in run1
    fastpeft train --adapter-data math=m.jsonl --adapter-data code=c.jsonl --out run3   # run3/math, run3/code
    fastpeft generate --adapter run1 --prompt "3 + 4 ="

Exit codes of `fastpeft train`: 0 done; 1 a failure while running (full disk, unwritable folder, the
folder in use by another run, a non-finite loss); 2 a usage error (bad flag value, bad data, a folder
that already holds a run); 128 + N stopped by signal N after writing a checkpoint (130 SIGINT,
138 SIGUSR1, 143 SIGTERM; the resume command is printed).  Errors are one line; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import warnings

import torch

from .. import __version__
from ..config import (BottleneckConfig, IA3Config, LoraConfig, PeftConfig, PrefixTuningConfig, PromptEncoderConfig,
                      PromptTuningConfig)
from .data import DEFAULT_DATA, DataError
from .models import DTYPES, PRESETS, load_model

INFO_NAME = "train_info.json"
METHODS = ("lora", "ia3", "prefix", "prompt", "ptuning", "bottleneck")
# learning rates that suit pretrained models; the random-weight presets take 1e-2
DEFAULT_LR = {"lora": 2e-4, "ia3": 3e-3, "prefix": 1e-2, "prompt": 3e-2, "ptuning": 1e-3, "bottleneck": 1e-4}
# the random-weight presets: chosen so that each method's default run lowers the eval loss clearly
PRESET_LR = {"lora": 1e-2, "ia3": 3e-1, "prefix": 3e-2, "prompt": 3e-1, "ptuning": 1e-2, "bottleneck": 1e-2}
DEFAULT_DATA_STEPS = 200
DEFAULT_EVAL_FRACTION = 0.1  # of the shipped data, when no --eval / --eval-fraction is given
REPORTERS = ("none", "tensorboard", "wandb")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `PROG: error: argument --flag: what is wrong` (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help lines end with "(default: X)" where a flag has a default its text does not already state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default == argparse.SUPPRESS
                or not action.option_strings
                or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def _int(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int(text, 1, "a positive integer")


def _non_negative_int(text: str) -> int:
    return _int(text, 0, "an integer >= 0")


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {value}")
    return value


def _probability(text: str) -> float:
    value = _non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {value}")
    return value


def _seq_len(text: str) -> int:
    return _int(text, 3, "an integer >= 3 (BOS, one token, EOS)")


def train_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastpeft train", formatter_class=_HelpFormatter, description=(
        "Fine-tune a causal LM with a PEFT method and save the adapter (PEFT's file format) in --out.\n\n"
        "Data: JSONL, CSV, Parquet, a folder written by `datasets` save_to_disk, or the name of a dataset in the\n"
        "local Hugging Face cache. Each record has a 'text' field (loss on all of it), 'prompt' and 'completion'\n"
        "fields (loss on the completion only), or a 'messages' list of {role, content} (rendered by the\n"
        "tokenizer's chat template; loss on the assistant turns only). Under torchrun it trains with DDP;\n"
        "rank 0 writes."))
    p.add_argument("--config", metavar="FILE", default=None,
                   help="YAML or JSON file holding any of these flags by name (e.g. 'batch_size: 16'); flags given "
                   "on the command line override it")
    p.add_argument("--print-config", action="store_true",
                   help="print every flag's value (these flags, the file's, the defaults) as YAML and exit: a "
                   "starting point for --config")
    p.add_argument("--method", choices=METHODS, default="lora", help="PEFT method")
    p.add_argument("--model", default="tiny", help=f"local model folder, a model in the local Hugging Face cache, "
                   f"or a preset: {', '.join(PRESETS)} (random weights, the shipped byte-level tokenizer)")
    p.add_argument("--data", default=None, help="training data: a file, a datasets folder, or a cached dataset name "
                   "(default: the tiny dataset shipped with fastpeft, 10%% of it held out for eval)")
    p.add_argument("--adapter-data", action="append", default=None, metavar="NAME=DATA",
                   help="train several LoRA adapters in one run, one per dataset: repeat NAME=DATA (the same kinds "
                   "as --data); batches mix the datasets and each example trains only its adapter (mixed-adapter "
                   "batches); each adapter is written to OUT/NAME (instead of --data)")
    p.add_argument("--out", default="fastpeft-out", help="output folder: adapter, checkpoints (default: fastpeft-out)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps")
    g.add_argument("--epochs", type=_positive_int, default=None,
                   help="passes over the data (default: 1; without --data: 200 steps)")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="peak learning rate (default: on presets " +
                   ", ".join(f"{m} {lr}" for m, lr in PRESET_LR.items()) + "; else " +
                   ", ".join(f"{m} {lr}" for m, lr in DEFAULT_LR.items()) + ")")
    p.add_argument("--weight-decay", type=_non_negative_float, default=0.0, help="weight decay")
    p.add_argument("--optimizer", choices=("adamw", "lomo", "adalomo"), default="adamw",
                   help="adamw, or LoMo / AdaLomo: each parameter updated during the backward as soon as its "
                   "gradient is complete (at most one gradient alive; one process, --grad-accum 1, fp32 or bf16)")
    p.add_argument("--warmup-steps", type=_non_negative_int, default=None,
                   help="linear warm-up steps (default: 5%% of the steps)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="examples per micro-batch per process")
    p.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=_seq_len, default=512, help="max tokens per example (longer: truncated)")
    p.add_argument("--max-grad-norm", type=_non_negative_float, default=1.0, help="gradient clipping (0: off)")
    p.add_argument("--r", type=_positive_int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=_positive_float, default=16.0, help="LoRA alpha")
    p.add_argument("--dropout", type=_probability, default=0.0, help="LoRA dropout")
    p.add_argument("--target-modules", default=None,
                   help="comma-separated module names, or all-linear (default: PEFT's defaults for the model; "
                   "all-linear for LoRA and IA3 on a preset)")
    p.add_argument("--reduction-factor", type=_positive_int, default=16,
                   help="bottleneck adapters: hidden size / bottleneck size")
    p.add_argument("--num-virtual-tokens", type=_positive_int, default=20, help="prefix / prompt / P-tuning tokens")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="base weights and autocast dtype; adapters stay fp32 (auto: bf16 on CUDA, else fp32)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (not with prefix)")
    p.add_argument("--quantize", choices=("none", "nf4", "fp4"), default="none",
                   help="QLoRA: a frozen 4-bit base (bitsandbytes' format, double quantisation; the output layer "
                        "stays 16-bit) under the adapter")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the base with FSDP2 (one unit per "
                   "decoder layer) instead of replicating it with DDP; lora and ia3")
    p.add_argument("--eval", dest="eval_data", default=None, help="evaluation data (same kinds as --data)")
    p.add_argument("--eval-fraction", type=_fraction, default=None, help="hold out this share of --data for eval")
    p.add_argument("--eval-every", type=_positive_int, default=None, help="steps between evaluations")
    p.add_argument("--save-every", type=_positive_int, default=None, help="steps between checkpoints")
    p.add_argument("--keep", type=_positive_int, default=None, help="keep only the newest N checkpoints")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest intact checkpoint in --out, or from the checkpoint folder given")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its adapter and checkpoints are deleted)")
    p.add_argument("--log-every", type=_positive_int, default=10, help="steps between progress lines")
    p.add_argument("--report-to", choices=REPORTERS, default="none",
                   help="also log loss, eval loss and learning rate to TensorBoard (event files in OUT/runs; needs "
                   "`pip install tensorboard`) or to Weights & Biases (needs `pip install wandb`; offline unless "
                   "WANDB_MODE says otherwise, files in OUT/wandb)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="data order, adapter init, and preset weights")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.epilog = ("SIGTERM, SIGINT or SIGUSR1 stop after the current step with a checkpoint (exit code 128 + "
                "signal number); a second signal stops at once. One run per --out at a time (lock file "
                ".fastpeft.lock).")
    return p


class ConfigFileError(ValueError):
    """A --config file that cannot be read or holds a key or value no flag accepts."""


def read_config_file(path: str) -> dict:
    """The mapping in a YAML (.yaml / .yml) or JSON file; YAML is read with `yaml.safe_load` (no code)."""
    if not os.path.isfile(path):
        raise ConfigFileError(f"--config {path} does not exist")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if path.lower().endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ConfigFileError(f"--config {path}: reading YAML needs `pip install pyyaml` (or use JSON)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigFileError(f"--config {path}: not valid YAML ({' '.join(str(err).split())})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigFileError(f"--config {path}: not valid JSON ({err.msg} at line {err.lineno}) "
                                  f"(YAML files need a .yaml or .yml name)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    return data


def _config_value(action: argparse.Action, key: str, value, path: str):
    """A config-file value checked and converted exactly as the flag's command-line text would be."""
    where = f"--config {path}: {key}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigFileError(f"{where}: expected true or false, got {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if value is None:
        return None
    if action.nargs == "?" and value is True:
        return action.const
    if isinstance(value, (list, tuple)) and key.replace("-", "_") == "target_modules":
        value = ",".join(str(v) for v in value)
    if isinstance(action, argparse._AppendAction):  # a list in the file (or one value) for a repeatable flag
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if not items or any(isinstance(v, (dict, list, tuple, bool)) or v is None for v in items):
            raise ConfigFileError(f"{where}: expected a list of values, got {value!r}")
        return [action.type(str(v)) if action.type is not None else str(v) for v in items]
    if isinstance(value, (dict, list, tuple)) or isinstance(value, bool):
        raise ConfigFileError(f"{where}: expected a single value, got {value!r}")
    text = str(value)
    try:
        converted = action.type(text) if action.type is not None else text
    except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
        raise ConfigFileError(f"{where}: {err}") from None
    if action.choices is not None and converted not in action.choices:
        raise ConfigFileError(f"{where}: {converted!r} is not one of {', '.join(map(str, action.choices))}")
    return converted


def parse_train_args(argv: list[str], parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse `fastpeft train` flags; with --config FILE the file's keys (flag names, '-' or '_') become the
    defaults, so the command line overrides the file.  Unknown keys and bad values exit with code 2."""
    parser = parser or train_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is None:
        return parser.parse_args(argv)
    try:
        data = read_config_file(known.config)
    except ConfigFileError as err:
        parser.error(str(err))
    by_name: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "config", "print_config"):
            continue
        by_name[action.dest] = action
        for opt in action.option_strings:
            by_name[opt.lstrip("-").replace("-", "_")] = action
    given = {a.dest for a in parser._actions for opt in a.option_strings
             if any(tok == opt or tok.startswith(opt + "=") for tok in argv)}
    defaults = {}
    for key, value in data.items():
        action = by_name.get(str(key).replace("-", "_"))
        if action is None:
            names = sorted({a.dest for a in by_name.values()})
            parser.error(f"--config {known.config}: unknown key {key!r} (keys are the flags' names: "
                         f"{', '.join(names)})")
        try:
            defaults[action.dest] = _config_value(action, str(key), value, known.config)
        except ConfigFileError as err:
            parser.error(str(err))
    for group in parser._mutually_exclusive_groups:  # a flag given on the command line wins over its rivals
        dests = [a.dest for a in group._group_actions]
        in_file = [d for d in dests if defaults.get(d) not in (None, False)]
        if any(d in given for d in dests):
            for d in dests:
                if d not in given:
                    defaults.pop(d, None)
        elif len(in_file) > 1:
            parser.error(f"--config {known.config}: {' and '.join(in_file)} cannot both be set")
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def config_text(args: argparse.Namespace) -> str:
    """Every flag's value as YAML that --config reads back to the same arguments."""
    import yaml

    values = {k: v for k, v in vars(args).items() if k not in ("config", "print_config")}
    return yaml.safe_dump(values, sort_keys=False, default_flow_style=False)


def _dtype(name: str, device: str | None) -> str:
    if name != "auto":
        return name
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"


def _targets(text: str | None):
    if text is None:
        return None
    if text == "all-linear":
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def make_config(args: argparse.Namespace) -> PeftConfig:
    targets = _targets(args.target_modules)
    if args.method == "lora":
        return LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets,
                          task_type="CAUSAL_LM")
    if args.method == "ia3":
        ff = None
        if isinstance(targets, list):
            ff = [t for t in targets if t in ("down_proj", "mlp.c_proj", "fc2", "w2")]
        return IA3Config(target_modules=targets, feedforward_modules=ff, task_type="CAUSAL_LM")
    if args.method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=args.num_virtual_tokens, task_type="CAUSAL_LM")
    if args.method == "prompt":
        return PromptTuningConfig(num_virtual_tokens=args.num_virtual_tokens, task_type="CAUSAL_LM")
    if args.method == "bottleneck":  # AdapterHub's Pfeiffer placement: after each feed-forward block
        return BottleneckConfig(reduction_factor=args.reduction_factor, task_type="CAUSAL_LM")
    return PromptEncoderConfig(num_virtual_tokens=args.num_virtual_tokens, task_type="CAUSAL_LM")


def adapter_datasets(entries: list[str]) -> dict[str, str]:
    """--adapter-data NAME=DATA entries as {name: data}, in order; a name given twice, an entry without
    '=' or a name that cannot be an adapter's folder name is a ValueError naming it."""
    from ..peft_model import check_adapter_name

    out: dict[str, str] = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"--adapter-data {entry!r}: expected NAME=DATA (an adapter name, '=', a data file, "
                             f"folder or cached dataset name)")
        if name in out:
            raise ValueError(f"--adapter-data: adapter {name!r} is given twice")
        if name in ("default", "__base__"):
            raise ValueError(f"--adapter-data: adapter name {name!r} is reserved; name each adapter after its data")
        try:
            check_adapter_name(name)
        except ValueError as err:
            raise ValueError(f"--adapter-data: {err}") from None
        out[name] = path
    if len(out) < 2:
        raise ValueError("--adapter-data trains several adapters: give two or more NAME=DATA (one adapter: --data)")
    return out


def _fail(prog: str, message: str, code: int = 2) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


# files that mark a folder as holding a run (train_info.json alone is written before the first step)
RUN_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_config.json", "trainer_state.json")


def _existing_run(out: str) -> str | None:
    """What in `out` shows a run was there (a checkpoint or a final adapter file), or None."""
    from .trainer import find_checkpoint

    ckpt = find_checkpoint(out)
    if ckpt:
        return f"checkpoints ({os.path.basename(ckpt)})"
    for name in RUN_FILES:
        if os.path.isfile(os.path.join(out, name)):
            return f"a finished run ({name})"
    return None


def _clear_run(out: str) -> None:
    """--overwrite: delete the previous run's adapter, summaries and checkpoints (nothing else)."""
    from .checkpoints import CHECKPOINT_PREFIX

    for name in _train_info(out).get("adapters") or []:  # a multi-adapter run's OUT/NAME folders
        folder = os.path.join(out, os.path.basename(str(name)))
        if os.path.isdir(folder):
            for fname in RUN_FILES + ("README.md",):
                if os.path.isfile(os.path.join(folder, fname)):
                    os.remove(os.path.join(folder, fname))
            if not os.listdir(folder):
                os.rmdir(folder)
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if name.startswith(CHECKPOINT_PREFIX) and os.path.isdir(path):
            shutil.rmtree(path)
        elif name in RUN_FILES + (INFO_NAME,) and os.path.isfile(path):
            os.remove(path)


def resume_command(argv: list[str]) -> str:
    """The `fastpeft train` command line that continues the run started with `argv`."""
    kept, skip = [], False
    for i, tok in enumerate(argv):
        if skip:
            skip = False
            continue
        if tok == "--resume":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            continue
        if tok.startswith("--resume=") or tok == "--overwrite":
            continue
        kept.append(tok)
    return shlex.join(["fastpeft", "train", *kept, "--resume"])


def train_main(argv: list[str] | None = None) -> int:
    from .checkpoints import CheckpointWriteError
    from .preemption import TrainingPreempted, signal_name
    from .runlock import RunLockedError
    from .trainer import NonFiniteLossError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_train_args(argv)
    prog = "fastpeft train"
    if args.print_config:
        print(config_text(args), end="")
        return 0
    try:
        return _train_main(args, prog)
    except TrainingPreempted as err:
        if err.checkpoint:
            print(f"{prog}: {err}; resume with: {resume_command(argv)}", file=sys.stderr, flush=True)
        else:
            print(f"{prog}: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once
        if args.debug:
            raise
        print(f"{prog}: interrupted by {signal_name(2)}", file=sys.stderr, flush=True)
        return 130
    except (CheckpointWriteError, RunLockedError, NonFiniteLossError, OSError) as err:
        if args.debug:
            raise
        if isinstance(err, OSError) and err.strerror:
            text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
        else:
            text = str(err)
        return _fail(prog, " ".join(text.split()), 1)


def _train_main(args: argparse.Namespace, prog: str) -> int:
    from .checkpoints import check_writable
    from .runlock import acquire_run_lock, release_run_lock
    from .trainer import TrainArgs, Trainer, _write_json, find_checkpoint

    from .data import looks_like_hub_name

    data = args.data or DEFAULT_DATA
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return _fail(prog, f"--out {args.out} is a file, not a folder")
    sources = [("--data", data), ("--eval", args.eval_data)]
    if args.adapter_data:
        try:
            data = adapter_datasets(args.adapter_data)
        except ValueError as err:
            return _fail(prog, str(err))
        if args.data:
            return _fail(prog, "pass --data or --adapter-data, not both")
        if args.method != "lora":
            return _fail(prog, f"--adapter-data trains several LoRA adapters (mixed-adapter batches); not {args.method}")
        if args.eval_data:
            return _fail(prog, "--eval takes one dataset; with --adapter-data hold out a share of each with "
                         "--eval-fraction")
        if args.fsdp:
            return _fail(prog, "--adapter-data does not work with --fsdp yet; train the adapters with DDP")
        sources = [(f"--adapter-data {name}=", path) for name, path in data.items()]
    for flag, value in sources:
        if value and not os.path.exists(value) and not looks_like_hub_name(value):
            return _fail(prog, f"{flag}{'' if flag.endswith('=') else ' '}{value} does not exist")
    if args.eval_data and args.eval_fraction:
        return _fail(prog, "pass --eval or --eval-fraction, not both")
    if args.gradient_checkpointing and args.method == "prefix":
        return _fail(prog, "--gradient-checkpointing does not work with --method prefix")
    if args.quantize != "none" and args.method == "ia3":
        return _fail(prog, "--quantize applies to lora and the prompt methods; IA3 on a 4-bit base is not supported")
    if args.method not in ("lora", "ia3") and args.target_modules:
        return _fail(prog, f"--target-modules applies to lora and ia3, not {args.method}")
    if args.resume and args.overwrite:
        return _fail(prog, "pass --resume or --overwrite, not both")
    if args.resume and args.resume != "latest" and not os.path.isdir(args.resume):
        return _fail(prog, f"--resume {args.resume}: no such checkpoint folder")
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes, so only it checks
    lock = None
    try:
        if rank0:
            check_writable(args.out)
            lock = acquire_run_lock(args.out, lambda m: print(f"{prog}: warning: {m}", file=sys.stderr, flush=True))
            existing = _existing_run(args.out)
            if existing and not args.resume and not args.overwrite:
                return _fail(prog, f"{args.out} already holds {existing}; pass --resume to continue that run, "
                             "--overwrite to replace it, or choose another --out")
            if args.resume == "latest" and existing and not find_checkpoint(args.out):
                return _fail(prog, f"--resume: {args.out} holds {existing} but no checkpoint to continue from; "
                             "pass --overwrite to train again")
            if args.overwrite:
                _clear_run(args.out)
        dtype = _dtype(args.dtype, args.device)
        if dtype != "fp32" and (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu"):
            warnings.warn(f"--dtype {dtype} on the CPU is slow; fp32 is the usual choice there", stacklevel=1)
        lr = args.lr or (PRESET_LR[args.method] if args.model in PRESETS else DEFAULT_LR[args.method])
        if args.data is None and not args.adapter_data and args.steps is None and args.epochs is None:
            args.steps = DEFAULT_DATA_STEPS
        if args.data is None and not args.adapter_data and args.eval_data is None and args.eval_fraction is None:
            args.eval_fraction = DEFAULT_EVAL_FRACTION
        if args.target_modules is None and args.model in PRESETS and args.method in ("lora", "ia3"):
            args.target_modules = "all-linear"
        try:
            config = make_config(args)
            model, tokenizer, source = load_model(args.model, seed=args.seed, dtype=DTYPES[dtype],
                                                  quantize=None if args.quantize == "none" else args.quantize)
            if args.quantize != "none":  # a folder came in 4 bits already (layer by layer); a preset is quantised
                model = _quantize(model, args.quantize, DTYPES[dtype], args.gradient_checkpointing)
            targs = TrainArgs(
                output_dir=args.out, max_steps=args.steps, epochs=args.epochs or 1, batch_size=args.batch_size,
                grad_accum=args.grad_accum, max_seq_len=args.seq_len, learning_rate=lr, optimizer=args.optimizer,
                weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                max_grad_norm=args.max_grad_norm or None, mixed_precision="no" if dtype == "fp32" else dtype,
                gradient_checkpointing=args.gradient_checkpointing, fsdp=args.fsdp, eval_every=args.eval_every,
                eval_fraction=args.eval_fraction, save_every=args.save_every, keep_checkpoints=args.keep,
                resume=args.resume, log_every=args.log_every, seed=args.seed, device=args.device,
                progress=not args.quiet)
            reporter = make_reporter(args.report_to, args.out, vars(args)) if rank0 else None
            trainer = Trainer(model, targs, data, eval_dataset=args.eval_data, peft_config=config,
                              tokenizer=tokenizer, callbacks=[reporter] if reporter else None)
        except (DataError, ValueError, FileNotFoundError, NotImplementedError, ImportError) as err:
            if args.debug:
                raise
            return _fail(prog, str(err))
        if trainer.rank == 0:
            info = {"model": args.model, "source": source, "method": args.method, "dtype": dtype, "seed": args.seed,
                    "seq_len": args.seq_len, "quantize": args.quantize, "fastpeft_version": __version__}
            if args.adapter_data:
                info["adapters"] = list(data)
            _write_json(os.path.join(args.out, INFO_NAME), info)
        start_eval = trainer.evaluate() if trainer.eval_examples and not args.resume else None
        if start_eval is not None and trainer.rank == 0 and not args.quiet:
            print(f"step 0: eval loss {start_eval:.4f}", file=sys.stderr, flush=True)
            if reporter is not None:
                reporter(trainer, {"step": 0, "eval_loss": start_eval})
        try:
            result = trainer.train()
        except (ValueError, FileNotFoundError) as err:  # CheckpointError (a bad --resume) is a ValueError
            if args.debug:
                raise
            return _fail(prog, str(err))
        finally:
            if reporter is not None:
                reporter.close()
        if start_eval is not None and result.eval_loss is not None and trainer.rank == 0 and not args.quiet:
            change = "lower" if result.eval_loss < start_eval else "NOT lower"
            print(f"eval loss {start_eval:.4f} at the start -> {result.eval_loss:.4f} at the end ({change}, "
                  f"{result.eval_loss - start_eval:+.4f})", file=sys.stderr, flush=True)
        return 0
    finally:
        release_run_lock(lock)


def _quantize(model, quant_type: str, dtype: torch.dtype, checkpointing: bool):
    """The base as QLoRA trains it: 4-bit linear layers computing in `dtype`, prepared for k-bit training."""
    from ..quant import prepare_model_for_kbit_training, quantize

    model = quantize(model, quant_type, double_quant=True, compute_dtype=dtype)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)


class _Reporter:
    """A Trainer callback that writes each step's logs (loss, eval_loss, lr, tokens_per_s) to a tracker."""

    def __init__(self, log, close) -> None:
        self._log, self._close = log, close

    def __call__(self, trainer, logs: dict) -> None:
        step = int(logs.get("step", 0))
        scalars = {k: float(v) for k, v in logs.items() if k != "step" and isinstance(v, (int, float))}
        if scalars:
            self._log(step, scalars)

    def close(self) -> None:
        self._close()


def make_reporter(kind: str, out: str, hparams: dict) -> _Reporter | None:
    """--report-to: TensorBoard event files in OUT/runs, or a wandb run (offline unless WANDB_MODE is set)."""
    if kind == "none":
        return None
    names = {"loss": "train/loss", "eval_loss": "eval/loss", "lr": "train/learning_rate",
             "tokens_per_s": "train/tokens_per_s"}
    if kind == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("--report-to tensorboard needs the tensorboard package (pip install tensorboard)") \
                from None
        writer = SummaryWriter(log_dir=os.path.join(out, "runs"))
        writer.add_text("args", json.dumps({k: v for k, v in hparams.items()}, default=str, indent=1))

        def log(step: int, scalars: dict) -> None:
            for k, v in scalars.items():
                writer.add_scalar(names.get(k, k), v, step)

        def close() -> None:
            writer.flush()
            writer.close()

        return _Reporter(log, close)
    try:
        import wandb
    except ImportError:
        raise ImportError("--report-to wandb needs the wandb package (pip install wandb)") from None
    os.environ.setdefault("WANDB_MODE", "offline")
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fastpeft"), dir=out,
                     config={k: v for k, v in hparams.items() if isinstance(v, (str, int, float, bool, type(None)))})
    return _Reporter(lambda step, scalars: run.log({names.get(k, k): v for k, v in scalars.items()}, step=step),
                     run.finish)


def generate_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastpeft generate", description="Generate text with a base model and a "
                                "saved adapter (a `fastpeft train` output folder, a checkpoint, or any PEFT adapter).")
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--model", default=None, help=f"base model: local folder or preset ({', '.join(PRESETS)}); "
                   f"default: the one recorded in ADAPTER/{INFO_NAME}")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=_positive_int, default=None)
    p.add_argument("--seed", type=_non_negative_int, default=None,
                   help="preset weights seed (default: the recorded one, else 0); also the sampling seed")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="default: the recorded one")
    p.add_argument("--device", default=None)
    p.add_argument("--no-adapter", action="store_true", help="generate with the base model only (for comparison)")
    return p


def _train_info(adapter: str) -> dict:
    for folder in (adapter, os.path.dirname(os.path.abspath(adapter))):
        path = os.path.join(folder, INFO_NAME)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
    return {}


def _adapter_base(adapter: str, model: str | None) -> tuple[dict, str]:
    """(the run's train_info, the base model's name) for an adapter folder; ValueError naming what is missing."""
    if not os.path.isdir(adapter):
        raise ValueError(f"adapter {adapter}: no such folder")
    info = _train_info(adapter)
    model_name = model or info.get("model")
    if model_name is None:
        raise ValueError(f"--model is required ({adapter} has no {INFO_NAME} naming the base model)")
    return info, model_name


def generate_main(argv: list[str] | None = None) -> int:
    from ..peft_model import PeftModel

    args = generate_parser().parse_args(argv)
    prog = "fastpeft generate"
    try:
        info, model_name = _adapter_base(args.adapter, args.model)
    except ValueError as err:
        return _fail(prog, str(err))
    if model_name in PRESETS and info.get("model") not in (None, model_name):
        warnings.warn(f"the adapter was trained on {info.get('model')!r}, not {model_name!r}", stacklevel=1)
    seed = args.seed if args.seed is not None else int(info.get("seed", 0))
    dtype = args.dtype or info.get("dtype", "fp32")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, tokenizer, _ = load_model(model_name, seed=seed, dtype=DTYPES[dtype])
        if info.get("quantize", "none") != "none":  # the adapter was trained on a 4-bit base: generate on one too
            model = _quantize(model, info["quantize"], DTYPES[dtype], False)
        model = model.to(device)
        if not args.no_adapter:
            model = PeftModel.from_pretrained(model, args.adapter).to(device)
    except (ValueError, OSError, NotImplementedError, ImportError) as err:
        return _fail(prog, str(err))
    model.eval()
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = ([bos] if bos is not None else []) + list(tokenizer.encode(args.prompt, add_special_tokens=False))
    input_ids = torch.tensor([ids], device=device)
    pad = getattr(tokenizer, "pad_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    kwargs = dict(max_new_tokens=args.max_new_tokens, pad_token_id=pad if pad is not None else eos,
                  eos_token_id=eos)
    if args.temperature > 0:
        torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=args.temperature, top_k=args.top_k)
    else:
        kwargs.update(do_sample=False)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    new = out[0, len(ids):].tolist()
    if eos is not None and eos in new:
        new = new[:new.index(eos)]
    print(args.prompt + tokenizer.decode(new, skip_special_tokens=True))
    return 0


def eval_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastpeft eval", formatter_class=_HelpFormatter, description=(
        "Evaluate one or more saved adapters of one base model on a dataset, in one batch per step.\n\n"
        "Without --labels: the mean token loss of each adapter (the data as `fastpeft train` reads it).\n"
        "With --labels: classification: each record's 'prompt' is scored against every label string (the\n"
        "log-probability of its tokens after the prompt) and its 'label' field is the answer; prints each\n"
        "adapter's accuracy and, with --ensemble, the ensemble's (all adapters as one batch, combined)."))
    p.add_argument("--adapter", action="append", required=True, metavar="DIR",
                   help="adapter folder; repeat for several (an ensemble); named after the folder")
    p.add_argument("--data", required=True, help="evaluation data (JSONL, CSV, Parquet, a datasets folder)")
    p.add_argument("--labels", default=None, help="comma-separated label strings (classification)")
    p.add_argument("--ensemble", choices=("mean_logprob", "vote"), default=None,
                   help="also score the adapters as one ensemble (needs --labels and two or more --adapter)")
    p.add_argument("--model", default=None, help=f"base model: local folder or preset ({', '.join(PRESETS)}); "
                   f"default: the one recorded with the first adapter")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="records per batch")
    p.add_argument("--seq-len", type=_seq_len, default=512, help="max tokens per record")
    p.add_argument("--device", default=None)
    return p


def eval_main(argv: list[str] | None = None) -> int:
    from ..ensemble import Ensemble
    from ..peft_model import PeftModel
    from .data import collate, pad_token_id, read_records, tokenize_records

    args = eval_parser().parse_args(argv)
    prog = "fastpeft eval"
    if args.ensemble and (not args.labels or len(args.adapter) < 2):
        return _fail(prog, "--ensemble needs --labels and two or more --adapter")
    names = [os.path.basename(os.path.normpath(a)) for a in args.adapter]
    if len(set(names)) != len(names):
        return _fail(prog, f"the adapters' folder names must differ (they name the adapters): {names}")
    try:
        info, model_name = _adapter_base(args.adapter[0], args.model)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer, _ = load_model(model_name, seed=int(info.get("seed", 0)),
                                         dtype=DTYPES[info.get("dtype", "fp32")])
        if info.get("quantize", "none") != "none":
            model = _quantize(model, info["quantize"], DTYPES[info.get("dtype", "fp32")], False)
        model = PeftModel.from_pretrained(model.to(device), args.adapter[0], adapter_name=names[0])
        for name, folder in zip(names[1:], args.adapter[1:]):
            model.load_adapter(folder, adapter_name=name)
        model = model.to(device).eval()
        records = read_records(args.data)
    except (ValueError, OSError, NotImplementedError, ImportError) as err:
        return _fail(prog, str(err))
    if args.labels is None:
        try:
            examples = tokenize_records(records, tokenizer, args.seq_len, source=args.data)
        except ValueError as err:
            return _fail(prog, str(err))
        for name in names:
            model.set_adapter(name)
            total = count = 0.0
            with torch.no_grad():
                for i in range(0, len(examples), args.batch_size):
                    chunk = examples[i:i + args.batch_size]
                    batch = {k: v.to(device) for k, v in collate(chunk, pad_token_id(tokenizer)).items()}
                    n = int((batch["labels"][:, 1:] != -100).sum())
                    total += float(model(**batch).loss) * n
                    count += n
            print(f"{name}: eval loss {total / max(count, 1):.4f} ({len(examples)} records)")
        return 0
    labels = [t.strip() for t in args.labels.split(",") if t.strip()]
    if len(labels) < 2:
        return _fail(prog, f"--labels needs two or more label strings, got {args.labels!r}")
    label_ids = [list(tokenizer.encode(" " + t if not t.startswith(" ") else t, add_special_tokens=False))
                 for t in labels]
    bos = getattr(tokenizer, "bos_token_id", None)
    rows, answers = [], []
    for where, rec in records:
        if not isinstance(rec.get("prompt"), str) or rec.get("label") not in labels:
            return _fail(prog, f"{where}: a classification record needs a 'prompt' string and a 'label' among "
                         f"{labels}, got {sorted(rec)}")
        ids = ([bos] if bos is not None else []) + list(tokenizer.encode(rec["prompt"], add_special_tokens=False))
        rows.append(ids[-args.seq_len:])
        answers.append(labels.index(rec["label"]))
    answers_t = torch.tensor(answers)
    pad = pad_token_id(tokenizer)
    ens = Ensemble(model, names, args.ensemble or "mean_logprob")  # one member: that adapter's own scores
    member_pred, ens_pred = [], []
    with torch.no_grad():
        for i in range(0, len(rows), args.batch_size):
            chunk = rows[i:i + args.batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in chunk], device=device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk], device=device)
            out = ens.classify(ids, mask, labels=label_ids)
            member_pred.append(out.member_prediction.cpu())
            ens_pred.append(out.prediction.cpu())
    members = torch.cat(member_pred, dim=1)
    for k, name in enumerate(names):
        acc = float((members[k] == answers_t).float().mean())
        print(f"{name}: accuracy {acc:.4f} ({len(rows)} records)")
    if args.ensemble:
        acc = float((torch.cat(ens_pred) == answers_t).float().mean())
        print(f"ensemble ({args.ensemble}, {len(names)} adapters in one batch): accuracy {acc:.4f}")
    return 0


def interpret_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastpeft interpret", formatter_class=_HelpFormatter,
                                description="Read a prompt-tuning or P-tuning adapter (Lester et al. §7): for each "
                                            "virtual token, its nearest vocabulary tokens by cosine similarity.")
    p.add_argument("adapter", help="adapter folder (prompt tuning or P-tuning)")
    p.add_argument("--model", default=None, help=f"base model: local folder or preset ({', '.join(PRESETS)}); "
                                                  f"default: the one recorded in ADAPTER/{INFO_NAME}")
    p.add_argument("--top-k", type=_positive_int, default=5, help="neighbours per virtual token")
    return p


def interpret_main(argv: list[str] | None = None) -> int:
    from ..peft_model import PeftModel

    args = interpret_parser().parse_args(argv)
    prog = "fastpeft interpret"
    try:
        info, model_name = _adapter_base(args.adapter, args.model)
        model, tokenizer, _ = load_model(model_name, seed=int(info.get("seed", 0)), dtype=torch.float32)
        model = PeftModel.from_pretrained(model, args.adapter)
        rows = model.nearest_tokens(k=args.top_k, tokenizer=tokenizer)
    except (ValueError, OSError, NotImplementedError, ImportError) as err:
        return _fail(prog, str(err))
    for i, row in enumerate(rows):
        print(f"virtual token {i:>3}: " + "  ".join(f"{tok!r} {sim:.3f}" for tok, sim in row))
    return 0
