"""The `fastpeft` command: `fastpeft bench`, `fastpeft train`, `fastpeft generate`, `fastpeft info`."""

from __future__ import annotations

import sys

USAGE = """usage: fastpeft <command> [options]

commands:
  bench      speed and peak memory of fastpeft vs PEFT eager and torch.compile(PEFT) (default command)
  train      fine-tune a model with LoRA, IA3, prefix, prompt or P-tuning
  generate   generate text with a model and a saved adapter
  info       which backends (torch, triton, cuda) are usable here and why not

`fastpeft <command> --help` for a command's options."""


def console() -> int:
    """The installed `fastpeft` script: as `main`, but `fastpeft bench` runs as its own process entry."""
    argv = sys.argv[1:]
    if not argv or argv[0] == "bench" or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        from .bench.cli import entry

        return int(entry(argv[1:] if argv and argv[0] == "bench" else argv) or 0)
    return main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "bench"
    if command == "bench":
        from .bench.cli import main as run
    elif command == "train":
        from .training.cli import train_main as run
    elif command == "generate":
        from .training.cli import generate_main as run
    elif command == "info":
        from .info import main as run
    else:
        print(f"fastpeft: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return int(run(argv) or 0)


if __name__ == "__main__":
    sys.exit(console())
