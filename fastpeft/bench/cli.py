"""`fastpeft bench` (also `python -m fastpeft.bench`): fastpeft vs PEFT eager vs torch.compile(PEFT)
vs the frozen floor, per layer and end to end, with every output checked before it is timed."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .common import DTYPES, METHODS
from .presets import PRESETS, get_preset

EPILOG = """examples:
  fastpeft bench                              the full suite (the project's target shapes on a GPU, tiny
                                              ones on a CPU); it says how long it expects to take first
  fastpeft bench --quick --methods lora,ia3   fewer cases and repeats: the fast path
  fastpeft bench --preset 7b --e2e-only --out results/
  fastpeft bench --compare old/results.json new/results.json

Times are medians with their 20 % and 80 % quantiles (triton.testing.do_bench on a GPU,
torch.utils.benchmark on a CPU); peak memory only where the CUDA allocator reports it.

exit status: 0 when every fastpeft result matches the reference, 1 when one does not (or fastpeft
raised), 2 for a usage error."""


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _methods(text: str) -> tuple[str, ...]:
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)} "
                                         f"(comma-separated)")
    if not names:
        raise argparse.ArgumentTypeError(f"no method given; choose from {', '.join(METHODS)}")
    return tuple(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastpeft bench", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    preset_help = ", ".join(f"{name} ({preset.description})" for name, preset in PRESETS.items())
    p.add_argument("--methods", type=_methods, default=METHODS, metavar="LIST",
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help=f"shapes: {preset_help}; default: anchors on a GPU, tiny on a CPU")
    p.add_argument("--batch", type=_positive, help="batch size (default: the preset's)")
    p.add_argument("--seq", type=_positive, help="sequence length (default: the preset's)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="bf16 (GPU default), fp16, fp32 (CPU default)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when there is a GPU")
    p.add_argument("--quick", action="store_true", help="fewer cases and repeats")
    p.add_argument("--repeats", type=_positive, help="timed repeats per case (default 20, quick 10)")
    p.add_argument("--warmup", type=_positive, help="untimed calls before timing (default 5, quick 2)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile columns (PEFT and fastpeft)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--layers-only", action="store_true", help="per-layer cases only")
    scope.add_argument("--e2e-only", action="store_true", help="end-to-end training steps only")
    p.add_argument("--out", metavar="DIR", help="write results.json, results.md, speed.png (and memory.png on a "
                   "GPU) here")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="print what changed between two results files and exit")
    return p


def settings_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from .suite import Settings

    has_gpu = torch.cuda.is_available()
    device = args.device or ("cuda" if has_gpu else "cpu")
    if device == "cuda" and not has_gpu:
        parser.error("--device cuda: no CUDA device is visible here (use --device cpu)")
    preset = get_preset(args.preset or ("anchors" if device == "cuda" else "tiny"), args.batch, args.seq)
    dtype_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    compile_on, note = True, ""
    if args.no_compile:
        compile_on, note = False, "--no-compile"
    elif args.quick and device == "cpu":
        compile_on, note = False, ("--quick on a CPU (compiling each case takes tens of seconds here; "
                                   "drop --quick to include it)")
    warmup = args.warmup or (2 if args.quick else 5)
    repeats = args.repeats or (10 if args.quick else 20)
    return Settings(preset=preset, dtype_name=dtype_name, dtype=DTYPES[dtype_name], device=device,
                    methods=args.methods, layers=not args.e2e_only, e2e=not args.layers_only, compile=compile_on,
                    compile_note=note, quick=args.quick, warmup=warmup, repeats=repeats)


def estimate_seconds(settings, have_peft: bool) -> tuple[float, int, int]:
    """(seconds, cases, timed columns): a rough expected length of a run, from what it will do.

    Per timed column about 1 s (a layer case) or 2-4 s (a training step) with the default repeats,
    torch.compile about 3-6 s a column on a CPU (20-60 s on a GPU), plus the host-overhead and
    saved-bytes tables; the real figure depends on the machine and its load."""
    from .suite import build_cases

    cases = build_cases(settings)
    gpu = settings.device == "cuda"
    columns = 1 + (1 if have_peft else 0) + 1  # frozen floor, PEFT, fastpeft
    scale = (settings.repeats + settings.warmup) / 25.0
    seconds = 8.0  # imports and model building
    for case in cases:
        per = (1.0 if case.kind == "layer" else (4.0 if gpu else 2.0)) * max(scale, 0.4)
        if case.kind == "multi" or case.method == "qlora":  # no compile columns
            seconds += columns * per
            continue
        seconds += columns * per
        if settings.compile:  # compile(fastpeft), and compile(PEFT) where PEFT is installed
            seconds += ((20.0 if case.kind == "layer" else 60.0) if gpu else (3.0 if case.kind == "layer" else 6.0)) \
                * (2 if have_peft else 1)
    if settings.layers and have_peft:
        seconds += 10.0 if settings.quick else 30.0
    if have_peft:
        seconds += 15.0
    return seconds, len(cases), columns + ((2 if have_peft else 1) if settings.compile else 0)


def _fmt_duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def entry(argv: list[str]) -> int:
    """Process entry point (`fastpeft bench`, `python -m fastpeft.bench`).

    OpenMP keeps its default wait policy (threads spin briefly, then sleep), as in a user's own run:
    OMP_WAIT_POLICY=PASSIVE, which this once set against torch.compile's spinning CPU threads, makes
    every parallel region wake its threads and turned a 0.13 ms LoRA layer step into 1.0 ms (each
    column alike, but the figures then measured the wake-ups).  The compiled columns are timed last
    in each case and followed by a pause in which their threads fall asleep (see `suite.run_case`)."""
    return main(argv)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.compare:
        from .compare import CompareError, compare, load

        try:
            a, b = (load(path) for path in args.compare)
        except CompareError as exc:
            parser.error(f"--compare: {exc}")
        print(compare(a, b, *args.compare))
        return 0
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out: {args.out} exists and is not a folder")
    settings = settings_from_args(args, parser)

    from .common import peft_module
    from .report import text_table, write_all
    from .suite import run_suite

    seconds, n_cases, n_columns = estimate_seconds(settings, peft_module() is not None)
    print(f"fastpeft bench: {n_cases} cases x {n_columns} columns on {settings.device}, preset "
          f"{settings.preset.name}; expected to take about {_fmt_duration(seconds)}"
          + ("" if settings.quick else " (--quick: fewer cases and repeats)"), file=sys.stderr, flush=True)
    doc = run_suite(settings)
    print(text_table(doc), flush=True)
    if args.out:
        write_all(doc, args.out, log=lambda line: print(line, file=sys.stderr))
    else:
        print("(add --out DIR to keep the results as JSON, Markdown and plots)", file=sys.stderr)
    if doc["failures"]:
        print(f"fastpeft bench: FAILED: {len(doc['failures'])} fastpeft result(s) differ from the reference "
              f"or raised; see the table", file=sys.stderr)
        return 1
    return 0
