"""Per-rank memory of adapter training on a Llama-shaped model: DDP (every rank holds everything) and
FSDP2 (`Trainer(fsdp=True)`: frozen weights, adapters, gradients and optimizer state split over ranks).

    python -m fastpeft.training.memory_plan            # bench preset, 7B and 70B shapes at 1 / 2 / 8 ranks

Counted per rank, in bytes (a plan from the shapes, not a measurement):
  frozen       the base weights in their storage dtype, / ranks under FSDP
  gathered     FSDP only: parameters all-gathered for compute, i.e. the root unit (embeddings, LM head,
               final norm: kept gathered from forward to backward) plus two decoder layers (the one
               computing and the one prefetched), in the compute dtype
  adapters     trainable parameters (fp32) plus their fp32 gradients, / ranks under FSDP
  optimizer    AdamW's two fp32 moments, / ranks under FSDP
  activations  what the backward keeps for one rank's micro-batch (the same at any rank count):
               per decoder layer and token, in the compute dtype, the RMSNorm inputs and outputs (4h),
               q, k, v and the attention output SDPA saves (2h + 2·kv), the MLP's gate, up, SiLU and
               product (4·i), i.e. 6h + 2·kv + 4·i values; with activation checkpointing only each layer's
               input (h) plus one layer's full set; plus the logits (bf16) and their fp32 copy for the
               loss (6·vocab bytes a token).  LoRA's S = X·Aᵀ (r values a projection) is added; fastpeft
               keeps no dropout mask.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads


SHAPES = {
    # the end-to-end model of `fastpeft bench` (ANCHORS.md) and the `bench` training preset
    "bench": ModelShape("bench", 2048, 8, 16, 16, 5632, 32000),
    "7b": ModelShape("llama-2-7b", 4096, 32, 32, 32, 11008, 32000),
    "70b": ModelShape("llama-2-70b", 8192, 80, 64, 8, 28672, 32000),
}
_LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _projections(s: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection of one decoder layer."""
    h, kv, i = s.hidden, s.kv_dim, s.intermediate
    return {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, i), "up": (h, i), "down": (i, h)}


def layer_params(s: ModelShape) -> int:
    return sum(a * b for a, b in _projections(s).values()) + 2 * s.hidden  # + two RMSNorm weights


def root_params(s: ModelShape) -> int:
    """Embeddings, LM head (unless tied) and the final norm: the FSDP root unit."""
    return s.vocab * s.hidden * (1 if s.tied else 2) + s.hidden


def frozen_params(s: ModelShape) -> int:
    return s.layers * layer_params(s) + root_params(s)


def adapter_params(s: ModelShape, method: str = "lora", r: int = 16) -> int:
    """LoRA r on all seven projections, or IA3 on k, v (output scaling) and down (input scaling)."""
    proj = _projections(s)
    if method == "lora":
        return s.layers * sum(r * (a + b) for name, (a, b) in proj.items() if name in _LORA_TARGETS)
    if method == "ia3":
        return s.layers * (proj["k"][1] + proj["v"][1] + proj["down"][0])
    raise ValueError(f"method must be 'lora' or 'ia3', got {method!r}")


def activation_bytes(s: ModelShape, tokens: int, checkpointing: bool = False, method: str = "lora", r: int = 16,
                     dtype_bytes: int = 2) -> int:
    """Bytes the backward keeps for `tokens` tokens of one micro-batch (see the module docstring)."""
    per_layer = 6 * s.hidden + 2 * s.kv_dim + 4 * s.intermediate
    if method == "lora":
        per_layer += r * len(_LORA_TARGETS)
    logits = 6 * s.vocab
    if checkpointing:
        kept = s.layers * s.hidden + per_layer
    else:
        kept = s.layers * per_layer
    return tokens * (kept * dtype_bytes + logits)


def plan(s: ModelShape, ranks: int, fsdp: bool = True, tokens: int = 8 * 1024, method: str = "lora", r: int = 16,
         weight_bytes: int = 2, checkpointing: bool = False) -> dict[str, int | str | bool]:
    """Per-rank bytes of one training configuration (`ranks` processes, `tokens` per rank's micro-batch)."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    split = ranks if fsdp else 1
    n_adapter = adapter_params(s, method, r)
    row = {
        "model": s.name, "method": method, "ranks": ranks, "mode": "fsdp" if fsdp and ranks > 1 else "ddp",
        "frozen": -(-frozen_params(s) * weight_bytes // split),
        "gathered": (root_params(s) + 2 * layer_params(s)) * weight_bytes if fsdp and ranks > 1 else 0,
        "adapters": -(-n_adapter * 8 // split),          # fp32 weights + fp32 gradients
        "optimizer": -(-n_adapter * 8 // split),         # AdamW exp_avg + exp_avg_sq, fp32
        "activations": activation_bytes(s, tokens, checkpointing, method, r, weight_bytes),
    }
    row["total"] = sum(row[k] for k in ("frozen", "gathered", "adapters", "optimizer", "activations"))
    return row


def memory_table(shapes: list[str] | None = None, ranks: tuple[int, ...] = (1, 2, 8), tokens: int = 8 * 1024,
                 method: str = "lora", r: int = 16, checkpointing: bool = False) -> list[dict]:
    """Rows of `plan` for each shape (SHAPES keys) and rank count, FSDP past one rank."""
    rows = []
    for name in shapes or list(SHAPES):
        if name not in SHAPES:
            raise ValueError(f"unknown shape {name!r}; shapes are {', '.join(SHAPES)}")
        for n in ranks:
            rows.append(plan(SHAPES[name], n, fsdp=True, tokens=tokens, method=method, r=r,
                             checkpointing=checkpointing))
    return rows


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def format_table(rows: list[dict]) -> str:
    """A markdown table of `memory_table` rows, GiB per rank."""
    cols = ("frozen", "gathered", "adapters", "optimizer", "activations", "total")
    lines = ["| model | method | ranks | " + " | ".join(f"{c} GiB" for c in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for row in rows:
        lines.append(f"| {row['model']} | {row['method']} | {row['ranks']} ({row['mode']}) | "
                     + " | ".join(_gib(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastpeft.training.memory_plan",
                                description="Per-rank training memory under DDP (1 rank) and FSDP2 (more).")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated: {', '.join(SHAPES)}")
    p.add_argument("--ranks", default="1,2,8")
    p.add_argument("--tokens", type=int, default=8 * 1024, help="tokens in one rank's micro-batch (default 8×1024)")
    p.add_argument("--method", choices=("lora", "ia3"), default="lora")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer")
    a = p.parse_args(argv)
    rows = memory_table([x for x in a.shapes.split(",") if x], tuple(int(x) for x in a.ranks.split(",")),
                        a.tokens, a.method, a.r, a.checkpointing)
    print(format_table(rows))
    return 0


__all__ = ["ModelShape", "SHAPES", "plan", "memory_table", "format_table", "frozen_params", "adapter_params",
           "activation_bytes"]

if __name__ == "__main__":
    raise SystemExit(main())
