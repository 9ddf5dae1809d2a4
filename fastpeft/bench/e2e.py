"""End-to-end training steps of a Llama-style model built from a config (random weights, no
downloads): forward + backward + AdamW step, for each method, side by side with the frozen model
floor (no adapter, gradients to the input embeddings only).

Every provider trains its own copy of one seeded base model.  PEFT's adapters are perturbed from
their initialisation (LoRA's B is zero, IA3's scales are one) and copied into torch.compile(PEFT)
and fastpeft, whose model comes from `fastpeft.get_peft_model` with the same config, so the
first-step loss and adapter gradients are comparable before anything is timed.
"""

from __future__ import annotations

import copy

import torch

from .common import (LLAMA_LINEARS, Case, Runner, clear_grads, copy_adapters, grads_named, peft_module,
                     perturb_adapters, trainable)
from .presets import Preset


def method_config(lib, method: str, preset: Preset):
    """The adapter config of `method` in `lib` (the `peft` or the `fastpeft` module): ANCHORS' settings."""
    if method == "lora":
        return lib.LoraConfig(task_type="CAUSAL_LM", r=preset.rank, lora_alpha=preset.alpha, lora_dropout=0.05,
                              target_modules=list(LLAMA_LINEARS))
    if method == "ia3":
        return lib.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                             feedforward_modules=["down_proj"])
    if method == "prefix":
        return lib.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=preset.virtual_tokens)
    if method == "prompt":
        return lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=preset.virtual_tokens)
    raise ValueError(f"unknown method {method!r}")


METHOD_DESCRIPTIONS = {
    "lora": "LoRA r={r} on q,k,v,o,gate,up,down, dropout 0.05",
    "ia3": "IA3 on k,v,down",
    "prefix": "prefix tuning, {p} virtual tokens",
    "prompt": "prompt tuning, {p} virtual tokens",
}


def build_model(preset: Preset, dtype: torch.dtype, device: str, seed: int = 0) -> torch.nn.Module:
    """A Llama-style causal LM with the preset's shapes and seeded random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = preset.model
    config = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.mlp, num_attention_heads=s.heads,
                         num_key_value_heads=s.kv_heads, num_hidden_layers=s.layers, vocab_size=s.vocab,
                         max_position_embeddings=max(2048, preset.seq + 4 * preset.virtual_tokens),
                         use_cache=False, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.train()


def _train_runner(forward, named: torch.nn.Module, ids: torch.Tensor,
                  rename: dict[str, str] | None = None) -> Runner:
    """One AdamW training step per call; `forward` may be torch.compile's wrapper of `named`."""
    optimizer = torch.optim.AdamW([p for _, p in trainable(named)], lr=1e-4)

    def step():
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def outputs():
        named.eval()  # dropout off for the check
        try:
            loss = forward(input_ids=ids, labels=ids).loss
            loss.backward()
            out = {"loss": loss.detach().float().reshape(1), **grads_named(named)}
        finally:
            clear_grads(named)
            named.train()
        if rename is not None:
            out = {("grad " + rename[k[5:]] if k.startswith("grad ") else k): v
                   for k, v in out.items() if not k.startswith("grad ") or k[5:] in rename}
        return out

    return Runner(step, outputs, keep=[named, optimizer])


def _by_position(mine: list[tuple[str, torch.Tensor]], theirs: dict[str, torch.Tensor]) -> dict[str, str] | None:
    """fastpeft name -> PEFT name when the trainable parameters line up one to one (prompt methods
    may name them differently); None when they do not, and only the loss is compared."""
    if len(mine) != len(theirs):
        return None
    pairs = list(zip(mine, theirs.items()))
    if any(p.numel() != t.numel() for (_, p), (_, t) in pairs):
        return None
    return {m: t for (m, _), (t, _) in pairs}


def e2e_case(method: str, preset: Preset, dtype: torch.dtype, device: str) -> Case:
    b, t = preset.batch, preset.seq
    s = preset.model
    desc = METHOD_DESCRIPTIONS[method].format(r=preset.rank, p=preset.virtual_tokens)
    model_desc = (f"{s.layers} layers, hidden {s.hidden}, MLP {s.mlp}, {s.heads} heads, vocab {s.vocab}, "
                  f"batch {b} x {t}")

    def setup():
        base = build_model(preset, dtype, device)
        ids = torch.randint(0, s.vocab, (b, t), generator=torch.Generator().manual_seed(500)).to(device)
        shared: dict = {"base": base}

        def floor():
            model = copy.deepcopy(base).requires_grad_(False)
            embed = model.get_input_embeddings()

            def loss_of():
                emb = embed(ids).detach().requires_grad_()
                return model(inputs_embeds=emb, labels=ids).loss

            def step():
                loss_of().backward()

            return Runner(step, lambda: {"loss": loss_of().detach().float().reshape(1)}, keep=[model])

        def peft_model(compiled: bool):
            peft = peft_module()
            model = peft.get_peft_model(copy.deepcopy(base), method_config(peft, method, preset))
            model.train()
            if "adapters" in shared:
                copy_adapters(model, shared["adapters"])
            else:
                perturb_adapters(model, seed=600)
                shared["adapters"] = {n: p.detach().clone() for n, p in trainable(model)}
                shared["file"] = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
            return _train_runner(torch.compile(model) if compiled else model, model, ids)

        def fastpeft_model(compiled: bool = False):
            import fastpeft

            model = fastpeft.get_peft_model(copy.deepcopy(base), method_config(fastpeft, method, preset))
            model.train()
            rename = None
            if "adapters" in shared:
                if not copy_adapters(model, shared["adapters"]):
                    # names differ (prompt methods): load PEFT's adapter file contents the way a user would
                    model._load_tensors(model.active_adapter, dict(shared["file"]), "PEFT's adapter weights")
                    rename = _by_position(trainable(model), shared["adapters"]) or {}
            else:
                perturb_adapters(model, seed=600)
            return _train_runner(torch.compile(model) if compiled else model, model, ids, rename)

        return {"floor": floor, "peft": lambda: peft_model(False), "compile": lambda: peft_model(True),
                "fastpeft": fastpeft_model, "fastpeft_compile": lambda: fastpeft_model(True)}

    ops = {"lora": ("lora_linear",), "ia3": ("ia3_linear",), "prefix": ("prefix_attention",),
           "prompt": ("soft_prompt_embed",)}[method]
    return Case(f"e2e/{method}", "e2e", method, f"{desc}; {model_desc}; fwd+bwd+AdamW", b * t, ops, setup,
                floor_note="frozen model, no adapter, gradients to the input embeddings only")
