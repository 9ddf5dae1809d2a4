"""Mixed-adapter LoRA inference: 1, 2, 4 and 8 adapters (r = preset rank, all linear layers) mixed in one
batch (rows assigned round-robin, so no adapter's rows are contiguous), prefill (one forward, no grad) and
greedy decode, on the end-to-end preset's Llama-style model.  Providers: the bare model (floor), PEFT with
`adapter_names` and fastpeft with `adapter_names`; one adapter is the single-adapter row (no
`adapter_names`).  ANCHORS' GPU case is B32 x 256 prefill and 64-token decode; on a CPU B8 x the preset's
sequence and 8 tokens.
"""

from __future__ import annotations

import copy

import torch

from .common import LLAMA_LINEARS, Case, Runner, peft_module
from .e2e import build_model
from .presets import Preset

ADAPTER_COUNTS = (1, 2, 4, 8)


def _shape(preset: Preset, device: str) -> tuple[int, int, int]:
    """(batch, prompt tokens, new tokens)."""
    return (32, 256, 64) if device == "cuda" else (8, preset.seq, 8)


def _adapted(lib, base: torch.nn.Module, preset: Preset, n: int, seed: int = 700) -> torch.nn.Module:
    """`base` (copied) with n LoRA adapters "a0".."a{n-1}" of distinct seeded weights, in eval mode."""
    def config():
        return lib.LoraConfig(r=preset.rank, lora_alpha=preset.alpha, target_modules=list(LLAMA_LINEARS),
                              init_lora_weights=False)

    model = lib.get_peft_model(copy.deepcopy(base), config(), adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", config())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:  # the same values in both libraries: parameters visited in name order
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    return model.eval()


def multi_cases(preset: Preset, dtype: torch.dtype, device: str, quick: bool) -> list[Case]:
    b, t, new = _shape(preset, device)
    counts = (1, 8) if quick else ADAPTER_COUNTS
    cases = []
    for phase in ("prefill", "decode"):
        for n in counts:
            cases.append(_case(phase, n, preset, dtype, device, b, t, new))
    return cases


def _case(phase: str, n: int, preset: Preset, dtype: torch.dtype, device: str, b: int, t: int, new: int) -> Case:
    names = [f"a{i % n}" for i in range(b)]
    mixed = n > 1

    def setup():
        base = build_model(preset, dtype, device).eval()
        ids = torch.randint(0, preset.model.vocab, (b, t), generator=torch.Generator().manual_seed(701)).to(device)
        kwargs = {"adapter_names": names} if mixed else {}

        def runner(model, extra):
            if phase == "prefill":
                def call():
                    with torch.no_grad():
                        return model(input_ids=ids, **extra).logits
                return Runner(call, lambda: {"logits": call().float()}, keep=[model])

            def generate():
                with torch.no_grad():
                    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                          min_new_tokens=new, do_sample=False, pad_token_id=0, **extra)
            return Runner(generate, lambda: {"tokens": generate()[:, t:].float()}, keep=[model])

        def peft_model():
            peft = peft_module()
            return runner(_adapted(peft, base, preset, n), kwargs)

        def fastpeft_model():
            import fastpeft

            return runner(_adapted(fastpeft, base, preset, n), kwargs)

        return {"floor": lambda: runner(base, {}), "peft": peft_model, "fastpeft": fastpeft_model}

    what = f"{n} adapters mixed" if mixed else "one adapter"
    work = f"prefill B{b} x {t}" if phase == "prefill" else f"greedy decode of {new} tokens after B{b} x {t}"
    return Case(f"multi/{phase} {n}", "multi", "multi", f"LoRA r={preset.rank} on all linears, {what}, {work}",
                b * (t if phase == "prefill" else new), ("lora_linear", "grouped_lora") if mixed else
                ("lora_linear",), setup, floor_note="the bare model, no adapter")
