"""Which fastpeft backends can run here, and why not: `fastpeft.info()` or `python -m fastpeft.info`."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, TextIO

import torch

from . import backend

# fastpeft/__init__ imports this module, so `python -m fastpeft.info` finds it in sys.modules;
# runpy warns about that unless the module has a __path__ (it then runs this file as usual).
__path__: list[str] = []


def _gpu() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"present": False, "reason": "torch.cuda.is_available() is False (no GPU, no driver, or a CPU build "
                                            f"of torch: torch.version.cuda={torch.version.cuda})"}
    cap = torch.cuda.get_device_capability()
    return {"present": True, "name": torch.cuda.get_device_name(), "capability": f"{cap[0]}.{cap[1]}",
            "count": torch.cuda.device_count(), "torch_cuda": torch.version.cuda}


def _triton(gpu: dict[str, Any]) -> dict[str, Any]:
    try:
        triton = importlib.import_module("triton")
    except ImportError as exc:
        return {"usable": False, "installed": False, "reason": f"triton is not installed ({exc})"}
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    entry = {"installed": True, "version": getattr(triton, "__version__", "?"), "interpret": interpret}
    if gpu["present"]:
        return {**entry, "usable": True, "reason": None}
    if interpret:
        return {**entry, "usable": True, "reason": None,
                "note": "no GPU: kernels run in the Triton interpreter on CPU tensors when forced (slow; for tests)"}
    return {**entry, "usable": False, "reason": "no GPU (set TRITON_INTERPRET=1 to run the kernels in the interpreter)"}


def _cuda(gpu: dict[str, Any]) -> dict[str, Any]:
    from . import _cext

    if not _cext.available():
        return {"usable": False, "built": False, "reason": _cext.why_unavailable()}
    C = _cext._C
    count, why_none = C.device_count()
    runtime = C.CUDA_RUNTIME_VERSION
    entry = {"built": True, "archs": [f"sm_{a}" for a in _cext.archs()],
             "ptx": [f"compute_{a}" for a in _cext.ptx_archs()],
             "cuda_runtime": f"{runtime // 1000}.{runtime % 1000 // 10} (static)", "devices_seen": count,
             "path": getattr(C, "__file__", None)}
    if not gpu["present"]:
        return {**entry, "usable": False, "reason": f"no GPU (CUDA runtime: {why_none or 'torch sees none'})"}
    why = _cext.why_not_device(torch.device("cuda", torch.cuda.current_device()))
    return {**entry, "usable": why is None, "reason": why}


def _ops() -> dict[str, list[str]]:
    names = ("lora", "ia3", "prefix_attention", "soft_prompt")
    mods = [importlib.import_module(f"fastpeft.ops.{name}") for name in names]
    return {m.OP: backend.available(m.OP) for m in mods}


def info(file: TextIO | None = sys.stdout) -> dict[str, Any]:
    """Report which backends (torch, triton, cuda) are usable here and why not; print it to `file`
    (None: print nothing) and return it as a dict."""
    gpu = _gpu()
    report: dict[str, Any] = {
        "fastpeft": importlib.import_module("fastpeft").__version__,
        "python": sys.version.split()[0],
        "gpu": gpu,
        "backends": {
            "torch": {"usable": True, "version": torch.__version__, "reason": None},
            "triton": _triton(gpu),
            "cuda": _cuda(gpu),
        },
        "forced_backend": backend.get_backend(),
        "ops": _ops(),
    }
    if file is not None:
        print(format_info(report), file=file)
    return report


def format_info(report: dict[str, Any]) -> str:
    gpu = report["gpu"]
    lines = [f"fastpeft {report['fastpeft']}  (python {report['python']})",
             "gpu:     " + (f"{gpu['name']} (sm {gpu['capability']}, {gpu['count']} device(s), torch CUDA "
                            f"{gpu['torch_cuda']})" if gpu["present"] else f"none — {gpu['reason']}")]
    for name, b in report["backends"].items():
        facts = {k: v for k, v in b.items() if k not in ("usable", "reason", "note") and v not in (None, [], "")}
        detail = ", ".join(f"{k}={'/'.join(v) if isinstance(v, list) else v}" for k, v in facts.items())
        status = "usable" if b["usable"] else "not usable"
        line = f"{name + ':':8} {status}" + (f" ({detail})" if detail else "")
        if b.get("reason"):
            line += f"\n         why not: {b['reason']}"
        if b.get("note"):
            line += f"\n         note: {b['note']}"
        lines.append(line)
    lines.append(f"forced:  {report['forced_backend'] or 'none (each call picks the best backend that applies)'}")
    lines.append("ops:     " + "; ".join(f"{op}: {' > '.join(bs)}" for op, bs in report["ops"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`fastpeft info [--json]` / `python -m fastpeft.info [--json]`."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="fastpeft info",
                                     description="which backends (torch, triton, cuda) are usable here and why not")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.json:
        print(json.dumps(info(file=None), indent=2, default=str))
    else:
        info()
    return 0


if __name__ == "__main__":
    sys.exit(main())
