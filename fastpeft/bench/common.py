"""What every benchmark case is made of: a set of providers (frozen floor, PEFT eager,
torch.compile(PEFT), fastpeft), each built into a Runner with a timed `step` and an untimed
`outputs` used by the correctness check."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

PROVIDERS = ("floor", "peft", "compile", "fastpeft", "fastpeft_compile")
PROVIDER_NAMES = {"floor": "frozen", "peft": "PEFT", "compile": "compile(PEFT)", "fastpeft": "fastpeft",
                  "fastpeft_compile": "compile(fastpeft)"}
COMPILED = ("compile", "fastpeft_compile")  # torch.compile'd providers: timed last, dynamo reset after each
# multi: mixed-adapter LoRA inference (fastpeft/bench/multi.py); qlora: LoRA on an NF4 base beside PEFT + bitsandbytes
METHODS = ("lora", "ia3", "prefix", "prompt", "qlora", "multi")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_NOISE = 0.05  # added to every adapter weight so that the adapters change the outputs


class NotAvailable(Exception):
    """The provider cannot run here; the message says why (shown in the table, not a failure)."""


@dataclass
class Runner:
    step: Callable[[], Any]  # one timed call: fwd+bwd of a layer, or a full training step
    outputs: Callable[[], dict[str, torch.Tensor | None]]  # untimed, deterministic (eval / dropout 0)
    keep: list[Any] = field(default_factory=list)  # objects that must live as long as the runner


@dataclass
class Case:
    id: str
    kind: str  # "layer" | "e2e" | "multi"
    method: str  # "lora" | "ia3" | "prefix" | "prompt" | "qlora" | "multi"
    description: str
    tokens: int
    ops: tuple[str, ...]
    setup: Callable[[], dict[str, Callable[[], Runner]]]  # allocates the inputs; provider -> builder
    floor_note: str = ""


def peft_module():
    """The installed `peft`, or None (tests monkeypatch this to simulate its absence)."""
    try:
        return importlib.import_module("peft")
    except ImportError:
        return None


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(shape, *, seed: int, dtype: torch.dtype, device: str, scale: float = 1.0,
          requires_grad: bool = False) -> torch.Tensor:
    """Seeded normal values drawn on the CPU (the same numbers on every device)."""
    t = (torch.randn(tuple(shape), generator=generator(seed)) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def perturb_adapters(model: torch.nn.Module, seed: int) -> None:
    """Add seeded noise to every trainable weight (LoRA's B starts at zero and IA3's scales at one:
    unperturbed they would hide a wrong adapter path from the check)."""
    for i, (_, p) in enumerate(trainable(model)):
        p.add_((torch.randn(tuple(p.shape), generator=generator(seed + i)) * ADAPTER_NOISE).to(p.device, p.dtype))


@torch.no_grad()
def copy_adapters(model: torch.nn.Module, named: dict[str, torch.Tensor]) -> bool:
    """Copy adapter weights by parameter name; False (nothing copied) when the names differ."""
    mine = dict(trainable(model))
    if set(mine) != set(named) or any(mine[n].numel() != named[n].numel() for n in named):
        return False
    for n, p in mine.items():
        p.copy_(named[n].reshape(p.shape).to(p.dtype))
    return True


def grads_named(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {f"grad {n}": (p.grad.detach().clone() if p.grad is not None else None) for n, p in trainable(model)}


def clear_grads(model: torch.nn.Module) -> None:
    for _, p in trainable(model):
        p.grad = None


def compile_error(exc: BaseException) -> str:
    """One short line for a torch.compile failure."""
    text = str(exc).strip().splitlines()
    first = next((line for line in text if line.strip()), "") if text else ""
    return f"{type(exc).__name__}: {first[:120]}"
