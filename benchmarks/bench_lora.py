"""LoRA layer benchmark: fastpeft's fused kernels vs the frozen base layer, PEFT's eager LoRA layer
and torch.compile(PEFT layer), forward + backward and forward alone, with peak memory.

    python benchmarks/bench_lora.py                 # the full grid (GPU)
    python benchmarks/bench_lora.py --quick         # the ANCHORS subset (GPU) / one tiny case (CPU)
    python benchmarks/bench_lora.py --out lora.json

Each provider's output and gradients are checked before it is timed: fastpeft against its own
torch reference backend at the same dropout seed, PEFT (dropout off) against fastpeft (dropout
off).  "fwd" is the training-mode forward (autograd graph built, dropout on); "fwd+bwd" adds the
backward with a fixed upstream gradient, weight frozen (gradient to the input and the adapter).
On a machine without CUDA the tiny case runs the torch reference: CPU figures, not kernel figures.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

import fastpeft
from fastpeft.backend import last_backend
from fastpeft.bench.timing import measure
from fastpeft.ops import lora_linear

REL_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


# ------------------------------------------------------------------------- shared helpers
@dataclass
class Row:
    case: dict
    ms: dict = field(default_factory=dict)        # provider -> fwd+bwd median ms
    fwd_ms: dict = field(default_factory=dict)    # provider -> forward median ms
    peak_mib: dict = field(default_factory=dict)  # provider -> fwd+bwd peak MiB above inputs
    notes: list = field(default_factory=list)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(what: str, got: dict, want: dict, dtype: torch.dtype) -> None:
    """Fail loudly (before any timing) when a provider's results differ from the reference."""
    for name, w in want.items():
        g = got[name]
        err = rel_err(g, w)
        if not math.isfinite(err) or err > REL_TOL[dtype]:
            raise AssertionError(f"{what}: {name} relative error {err:.2e} > {REL_TOL[dtype]:.0e}")


def fwd_bwd(fn: Callable[[], torch.Tensor], dy: torch.Tensor, params: list[torch.Tensor]) -> Callable[[], None]:
    def step():
        fn().backward(dy)
        for p in params:
            p.grad = None
    return step


def time_provider(row: Row, name: str, fn: Callable[[], torch.Tensor], dy: torch.Tensor,
                  params: list[torch.Tensor], device: str, repeats: int) -> None:
    m = measure(fwd_bwd(fn, dy, params), device=device, repeats=repeats)
    f = measure(fn, device=device, repeats=repeats)
    row.ms[name], row.fwd_ms[name], row.peak_mib[name] = m.median_ms, f.median_ms, m.peak_mib


def print_table(rows: list[Row], providers: list[str], label: Callable[[dict], str]) -> None:
    def cell(row, d, p):
        if p not in d:
            return "n/a"
        base = d.get("base")
        return f"{d[p]:.3f} ({d[p] / base:.2f}x)" if base and p != "base" else f"{d[p]:.3f}"

    for title, attr in (("fwd+bwd ms (x base)", "ms"), ("fwd ms (x base)", "fwd_ms")):
        print(f"\n{title}")
        head = ["case", *providers, "fastpeft/peft"]
        lines = [head]
        for r in rows:
            d = getattr(r, attr)
            ratio = f"{d['fastpeft'] / d['peft']:.2f}x" if "fastpeft" in d and "peft" in d else "n/a"
            lines.append([label(r.case), *[cell(r, d, p) for p in providers], ratio])
        widths = [max(len(str(x[i])) for x in lines) for i in range(len(head))]
        for x in lines:
            print("  ".join(str(v).ljust(w) for v, w in zip(x, widths)))
    if any(v is not None for r in rows for v in r.peak_mib.values()):
        print("\npeak memory MiB, fwd+bwd (x base)")
        for r in rows:
            base = r.peak_mib.get("base") or float("nan")
            cells = [f"{p} {v:.0f} ({v / base:.2f}x)" for p, v in r.peak_mib.items() if v is not None]
            print(f"{label(r.case)}: " + ", ".join(cells))
    for r in rows:
        for note in r.notes:
            print(f"note [{label(r.case)}]: {note}")


def write_json(path: str, bench: str, rows: list[Row], device: str) -> None:
    meta = {"bench": bench, "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
            "torch": torch.__version__, "fastpeft": fastpeft.__version__,
            "figures": "kernel" if device == "cuda" else "CPU reference (torch backend), not kernel figures"}
    try:
        import peft
        meta["peft"] = peft.__version__
    except ImportError:
        pass
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    print(f"\nwrote {path}")


class Proj(nn.Module):
    """A one-projection model for get_peft_model to target (`proj`)."""

    def __init__(self, k: int, n: int, device: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.proj = nn.Linear(k, n, bias=False, device=device, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


def try_compile(layer: nn.Module, x: torch.Tensor, row: Row) -> nn.Module | None:
    try:
        compiled = torch.compile(layer)
        compiled(x).sum().backward()  # compile now, not inside the timing warm-up
        return compiled
    except Exception as exc:  # noqa: BLE001 - reported, the other providers still run
        row.notes.append(f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        return None


# ------------------------------------------------------------------------------ LoRA cases
def lora_case(m: int, k: int, n: int, r: int, p: float, dtype: torch.dtype, device: str, repeats: int,
              with_compile: bool) -> Row:
    from peft import LoraConfig, get_peft_model

    row = Row({"M": m, "K": k, "N": n, "r": r, "dropout": p, "dtype": str(dtype).split(".")[-1], "alpha": 2 * r})
    torch.manual_seed(0)
    model = Proj(k, n, device, dtype)
    nn.init.normal_(model.proj.weight, std=k ** -0.5)
    base = model.proj
    base.weight.requires_grad_(False)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["proj"]))
    layer = peft_model.base_model.model.proj  # peft.tuners.lora.Linear, adapters in fp32 (PEFT's default)
    layer.train()
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        lora_B.normal_(std=r ** -0.5)  # PEFT starts B at 0, which would hide the low-rank path
    scaling = layer.scaling["default"]
    weight = base.weight

    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, n, device=device, dtype=dtype)
    a = lora_A.detach().clone().requires_grad_(True)
    b = lora_B.detach().clone().requires_grad_(True)

    def fast(training=True, seed=None):
        return lora_linear(x, weight, None, a, b, scaling, p, training=training, seed=seed)

    # --- checks, before any timing
    def results(fn):
        y = fn()
        y.backward(dy)
        out = {"y": y.detach(), "dx": x.grad.clone(), "dA": a.grad.clone(), "dB": b.grad.clone()}
        x.grad = a.grad = b.grad = None
        return out

    got = results(lambda: fast(seed=1234))
    ran = last_backend("lora_linear")
    if device == "cuda" and ran == "torch":
        raise AssertionError("fastpeft ran its torch reference on CUDA: the kernels did not apply")
    row.notes.append(f"fastpeft backend: {ran}")
    with fastpeft.use_backend("torch"):
        want = results(lambda: fast(seed=1234))
    check("fastpeft vs its torch reference", got, want, dtype)
    layer.eval()
    y_peft, y_fast = layer(x).detach(), fast(training=False).detach()
    layer.train()
    check("PEFT vs fastpeft (dropout off)", {"y": y_fast}, {"y": y_peft}, dtype)

    # --- timing
    peft_params = [x, lora_A, lora_B]
    time_provider(row, "base", lambda: base(x), dy, [x], device, repeats)
    time_provider(row, "peft", lambda: layer(x), dy, peft_params, device, repeats)
    if with_compile:
        compiled = try_compile(layer, x, row)
        if compiled is not None:
            time_provider(row, "compile", lambda: compiled(x), dy, peft_params, device, repeats)
    time_provider(row, "fastpeft", fast, dy, [x, a, b], device, repeats)
    return row


def lora_grid(quick: bool, device: str) -> list[tuple]:
    if device != "cuda":
        return [(64, 96, 80, 8, 0.05)]
    if quick:  # the ANCHORS rows
        return [(8192, 4096, 4096, 16, 0.0), (8192, 4096, 4096, 16, 0.05), (8192, 4096, 11008, 16, 0.0),
                (2048, 4096, 4096, 16, 0.0)]
    return [(m, k, n, r, p) for m in (2048, 8192) for k, n in ((4096, 4096), (4096, 11008), (11008, 4096))
            for r in (8, 16, 64) for p in (0.0, 0.05)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the ANCHORS subset (one tiny case on a CPU)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile(PEFT) provider")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    if device != "cuda":
        print("No CUDA device: one tiny case through the torch reference backend; these are CPU "
              "reference figures, not kernel figures (torch.compile skipped).")
    warnings.filterwarnings("ignore", module="peft")
    rows = []
    for m, k, n, r, p in lora_grid(args.quick, device):
        rows.append(lora_case(m, k, n, r, p, dtype, device, args.repeats, with_compile=device == "cuda"
                              and not args.no_compile))
        print(f"done M{m} {k}->{n} r{r} p{p}", file=sys.stderr)
    print_table(rows, ["base", "fastpeft", "peft", "compile"],
                lambda c: f"M{c['M']} {c['K']}->{c['N']} r{c['r']} p{c['dropout']}")
    if args.out:
        write_json(args.out, "lora", rows, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
