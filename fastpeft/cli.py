"""The `fastpeft` command: `fastpeft bench`, `train`, `generate`, `interpret`, `info`."""

from __future__ import annotations

import sys

USAGE = """usage: fastpeft <command> [options]

commands:
  train      fine-tune a model with LoRA, IA3, prefix tuning, prompt tuning or P-tuning, and save the adapter
  generate   generate text with a base model and a saved adapter
  eval       evaluate saved adapters on a dataset (loss, or label accuracy; --ensemble: several adapters as one)
  interpret  list each virtual token of a prompt-tuning / P-tuning adapter's nearest vocabulary tokens
  bench      time fastpeft against PEFT (eager and torch.compile) per layer and per training step
  info       say which backends (torch, triton, cuda) can run on this machine, and why not

options:
  -h, --help     show this help
  --version      print fastpeft's version (and torch's) and exit

`fastpeft <command> --help` shows a command's options and their defaults.
examples:
  fastpeft train --method lora --model tiny --out run1      # seconds on a CPU
  fastpeft generate --adapter run1 --prompt "the red"
  fastpeft bench --quick"""


def version_text() -> str:
    from . import __version__

    try:
        import torch

        torch_text = f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda else ", CPU")
    except ImportError:  # pragma: no cover - torch is a dependency
        torch_text = "torch missing"
    return f"fastpeft {__version__} ({torch_text}; Python {sys.version.split()[0]})"


def console() -> int:
    """The installed `fastpeft` script: as `main`, but `fastpeft bench` runs as its own process entry."""
    argv = sys.argv[1:]
    if argv and argv[0] == "bench":
        from .bench.cli import entry

        return int(entry(argv[1:]) or 0)
    return main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("--version", "-V", "version"):
        print(version_text())
        return 0
    command = argv.pop(0)
    if command == "bench":
        from .bench.cli import main as run
    elif command == "train":
        from .training.cli import train_main as run
    elif command == "generate":
        from .training.cli import generate_main as run
    elif command == "interpret":
        from .training.cli import interpret_main as run
    elif command == "eval":
        from .training.cli import eval_main as run
    elif command == "info":
        from .info import main as run
    else:
        hint = f" (bench options go after the command: fastpeft bench {command})" if command.startswith("-") else ""
        print(f"fastpeft: unknown command {command!r}{hint}\n\n{USAGE}", file=sys.stderr)
        return 2
    return int(run(argv) or 0)


if __name__ == "__main__":
    sys.exit(console())
