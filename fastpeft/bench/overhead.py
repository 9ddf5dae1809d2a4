"""Host overhead: microseconds of Python per layer call (forward, forward+backward) on the CPU, one
thread, at a size where the arithmetic is negligible (8 tokens, 64→64, r8), for each op and
backend side by side with PEFT eager and the frozen nn.Linear, in one process.

The Triton rows run the real launch wrappers and launch plans with every kernel launch replaced by
a no-op (`stub_triton_launches`), so the Python cost of the GPU path is measured on any machine;
Triton's own launcher (its argument binder and the driver call) is not in them.  Figures are
medians over interleaved rounds, so that a busy machine slows every provider alike.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
from typing import Callable, Iterator

import torch
from torch import nn

TOKENS, FEATURES, RANK = 8, 64, 8


class _NoLaunch:
    """Stands for a compiled kernel: `fn[grid](*args, **meta)` does nothing."""

    def __getitem__(self, grid):
        return _no_op


def _no_op(*args, **kwargs) -> None:
    return None


class _StubAutotuner:
    """Stands for a `triton.autotune`d kernel: picks the first config, evaluates the grid as the real
    launch does, and launches nothing."""

    def __init__(self, real) -> None:
        self.configs = real.configs
        self.best_config = real.configs[0]
        self.fn = _NoLaunch()

    def __getitem__(self, grid):
        def run(*args, **meta):
            grid({**meta, **self.best_config.kwargs})

        return run


@contextlib.contextmanager
def stub_triton_launches() -> Iterator[None]:
    """Replace the adapted-linear kernels by no-op launches, and let the forced Triton backend take
    CPU tensors (as under TRITON_INTERPRET=1), for the duration."""
    from ..kernels import adapted_linear as al

    names = ("adapted_linear_kernel", "lowrank_shrink_kernel", "lowrank_reduce_kernel")
    saved = {n: getattr(al, n) for n in names}
    env = os.environ.get("TRITON_INTERPRET")
    plans = dict(al._PLANS)
    try:
        for n in names:
            setattr(al, n, _StubAutotuner(saved[n]))
        al._PLANS.clear()
        os.environ["TRITON_INTERPRET"] = "1"
        yield
    finally:
        for n, k in saved.items():
            setattr(al, n, k)
        al._PLANS.clear()
        al._PLANS.update(plans)
        if env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = env


def _time_us(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def interleaved_medians(fns: list[Callable[[], object]], rounds: int = 9, calls: int = 100,
                        warmup: int = 20) -> list[float]:
    """Median µs per call of each fn, timed in interleaved rounds."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            times[i].append(_time_us(fn, calls))
    return [statistics.median(t) for t in times]


class _One(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(FEATURES, FEATURES)

    def forward(self, x):
        return self.proj(x)


def _configs(lib, case: str):
    if case.startswith("lora"):
        return lib.LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.05 if case == "lora_dropout" else 0.0,
                              target_modules=["proj"])
    return lib.IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if case == "ia3_input" else [])


CASES = {
    "lora": f"LoRA r{RANK}, {TOKENS}x{FEATURES}->{FEATURES}",
    "lora_dropout": f"LoRA r{RANK}, {TOKENS}x{FEATURES}->{FEATURES}, dropout 0.05",
    "ia3": f"IA3 output scaling, {TOKENS}x{FEATURES}->{FEATURES}",
    "ia3_input": f"IA3 input scaling, {TOKENS}x{FEATURES}->{FEATURES}",
}


def _layers(case: str):
    import fastpeft

    try:
        import peft
    except ImportError:
        peft = None
    torch.manual_seed(0)
    base = _One()
    ours = fastpeft.get_peft_model(copy.deepcopy(base), _configs(fastpeft, case)).base_model.model.proj.train()
    theirs = None
    if peft is not None:
        theirs = peft.get_peft_model(copy.deepcopy(base), _configs(peft, case)).base_model.model.proj.train()
    return base.proj, ours, theirs


def measure(cases: tuple[str, ...] = tuple(CASES), rounds: int = 9, calls: int = 100) -> list[dict]:
    """One row per (case, provider): fwd_us, fwd_bwd_us, and the ratios to PEFT eager."""
    import fastpeft

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        x = torch.randn(TOKENS, FEATURES)
        xg = torch.randn(TOKENS, FEATURES, requires_grad=True)
        for case in cases:
            frozen, ours, theirs = _layers(case)
            frozen.requires_grad_(False)
            providers: list[tuple[str, nn.Module, str | None, bool]] = [("frozen nn.Linear", frozen, None, False)]
            if theirs is not None:
                providers.append(("PEFT eager", theirs, None, False))
            providers.append(("fastpeft torch", ours, "torch", False))
            if case == "lora_dropout":
                providers.append(("fastpeft torch_philox (kernel reference)", ours, "torch_philox", False))
            providers.append(("fastpeft triton, launches stubbed", ours, "triton", True))
            fwd_fns, fwd_bwd_fns = [], []
            for _, layer, backend_name, _ in providers:
                # every provider sets the backend before each call, so that all are timed in one
                # interleaved loop (a busy machine then slows all of them alike)
                fwd_fns.append(lambda layer=layer, b=backend_name: (fastpeft.set_backend(b), layer(x)))
                fwd_bwd_fns.append(lambda layer=layer, b=backend_name: (fastpeft.set_backend(b),
                                                                         layer(xg).sum().backward()))
            try:
                with stub_triton_launches():
                    fwd = interleaved_medians(fwd_fns, rounds, calls)
                    fwd_bwd = interleaved_medians(fwd_bwd_fns, rounds, calls)
            finally:
                fastpeft.set_backend(None)
            results = {p[0]: (f, fb) for p, f, fb in zip(providers, fwd, fwd_bwd)}
            peft_times = results.get("PEFT eager")
            for name, (fwd, fwd_bwd) in results.items():
                rows.append({"case": case, "description": CASES[case], "provider": name,
                             "fwd_us": round(fwd, 1), "fwd_bwd_us": round(fwd_bwd, 1),
                             "fwd_vs_peft": round(fwd / peft_times[0], 2) if peft_times else None,
                             "fwd_bwd_vs_peft": round(fwd_bwd / peft_times[1], 2) if peft_times else None})
    finally:
        torch.set_num_threads(threads)
    return rows


def table(rows: list[dict]) -> str:
    """The rows as an aligned text table."""
    head = ("case", "provider", "fwd µs", "fwd+bwd µs", "fwd / PEFT", "fwd+bwd / PEFT")
    body = [(r["description"], r["provider"], f"{r['fwd_us']:.1f}", f"{r['fwd_bwd_us']:.1f}",
             "" if r["fwd_vs_peft"] is None else f"{r['fwd_vs_peft']:.2f}x",
             "" if r["fwd_bwd_vs_peft"] is None else f"{r['fwd_bwd_vs_peft']:.2f}x") for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(b) for b in body])
