"""Saved-for-backward bytes: what autograd keeps alive between a training forward and its backward.

Counted with `torch.autograd.graph.saved_tensors_hooks`, each storage once, parameters and buffers
left out (they exist whether or not anything is trained).  Measured on any machine (no allocator
needed), for fastpeft and HF PEFT on one seeded tiny Llama, against the frozen floor: the base model
with gradients flowing only to its input embeddings.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch


def saved_bytes(run: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, Any]:
    """(bytes of the distinct storages autograd saves while `run()` executes, run's result).
    Storages of the tensors in `exclude` (parameters, buffers) are not counted."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in skip and key not in seen:
            seen.add(key)
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return total, out


def model_saved_bytes(model: torch.nn.Module, batch: dict) -> int:
    """Saved bytes of one training forward of `model` on `batch` (labels given: the loss included)."""
    exclude = [*model.parameters(), *model.buffers()]
    n, out = saved_bytes(lambda: model(**batch), exclude)
    out.loss.backward()  # the graph was real: it must run
    return n


def compiled_saved_bytes(model: torch.nn.Module, batch: dict, backend: str = "aot_eager") -> int:
    """Saved bytes of one training forward of `torch.compile(model, fullgraph=True)` (compiled by a first
    step, then counted): what the compiled graph's partitioner keeps for the backward."""
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    compiled(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    exclude = [*model.parameters(), *model.buffers()]
    n, out = saved_bytes(lambda: compiled(**batch), exclude)
    out.loss.backward()
    return n


def floor_saved_bytes(base: torch.nn.Module, batch: dict) -> int:
    """The frozen floor: no adapter, every weight frozen, gradients to the input embeddings only."""
    base = copy.deepcopy(base)
    for p in base.parameters():
        p.requires_grad_(False)
    embeds = base.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    rest = {k: v for k, v in batch.items() if k != "input_ids"}
    exclude = [*base.parameters(), *base.buffers(), embeds]
    n, out = saved_bytes(lambda: base(inputs_embeds=embeds, **rest), exclude)
    out.loss.backward()
    return n


@dataclass(frozen=True)
class MemoryCase:
    name: str
    description: str
    config: Callable[[Any], Any]  # lib (peft or fastpeft) -> config


LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = [
    MemoryCase("lora", "LoRA r16 all-linear",
               lambda lib: lib.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules=LINEARS)),
    MemoryCase("lora_dropout", "LoRA r16 all-linear, dropout 0.05",
               lambda lib: lib.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05,
                                          target_modules=LINEARS)),
    MemoryCase("ia3", "IA3 (k, v, down)",
               lambda lib: lib.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                         feedforward_modules=["down_proj"])),
    MemoryCase("ia3_output", "IA3 output scaling (k, v)",
               lambda lib: lib.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj"],
                                         feedforward_modules=[])),
    MemoryCase("ia3_input", "IA3 input scaling (down)",
               lambda lib: lib.IA3Config(task_type="CAUSAL_LM", target_modules=["down_proj"],
                                         feedforward_modules=["down_proj"])),
    MemoryCase("prefix", "prefix tuning, 16 virtual tokens",
               lambda lib: lib.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16)),
    MemoryCase("prompt", "prompt tuning, 16 virtual tokens",
               lambda lib: lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16)),
    MemoryCase("ptuning", "P-tuning (MLP), 16 virtual tokens",
               lambda lib: lib.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=16,
                                                   encoder_hidden_size=128)),
]


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The issue's model: 2 layers, hidden 128, MLP 352, 4 heads (2 KV heads), vocab 256."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, use_cache=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.train()


def batch(B: int = 2, T: int = 64, vocab: int = 256, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def memory_rows(cases: Iterable[str] | None = None, B: int = 2, T: int = 64) -> list[dict]:
    """One row per case: saved bytes of the frozen floor, HF PEFT (None where peft is absent) and
    fastpeft, on the same seeded model and batch."""
    import fastpeft

    try:
        import peft
    except ImportError:
        peft = None
    wanted = [c for c in CASES if cases is None or c.name in set(cases)]
    base = tiny_llama()
    data = batch(B, T)
    floor = floor_saved_bytes(base, data)
    rows = []
    for case in wanted:
        ours = fastpeft.get_peft_model(copy.deepcopy(base), case.config(fastpeft))
        row = {"case": case.name, "description": case.description, "floor": floor,
               "fastpeft": model_saved_bytes(ours, data), "peft": None}
        if peft is not None:
            theirs = peft.get_peft_model(copy.deepcopy(base), case.config(peft))
            row["peft"] = model_saved_bytes(theirs, data)
        rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    """A plain-text table: KiB over the floor and the fastpeft / PEFT ratio of the totals."""
    def kib(n: int | None) -> str:
        return "-" if n is None else f"{n / 1024:.0f}"

    lines = [f"saved for backward (KiB; frozen floor {kib(rows[0]['floor']) if rows else '-'} KiB)",
             f"{'case':<36} {'PEFT over floor':>16} {'fastpeft over floor':>20} {'fastpeft / PEFT':>16}"]
    for r in rows:
        peft_over = None if r["peft"] is None else r["peft"] - r["floor"]
        ratio = "-" if not r["peft"] else f"{r['fastpeft'] / r['peft']:.2f}x"
        lines.append(f"{r['description']:<36} {kib(peft_over):>16} {kib(r['fastpeft'] - r['floor']):>20} {ratio:>16}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_rows(memory_rows()))
