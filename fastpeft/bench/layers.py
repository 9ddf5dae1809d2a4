"""Per-layer cases: LoRA and IA3 projections, attention with a prefix, soft-prompt embedding.

Each is timed forward + backward with a fixed upstream gradient.  Providers: the frozen layer
(gradient w.r.t. the input only), PEFT's layer (or, for attention and embeddings, what PEFT and
transformers do: the prefix expanded over the batch and concatenated under an explicit mask, the
prompt looked up per row and concatenated), torch.compile of that, and fastpeft.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .common import (Case, Runner, clear_grads, copy_adapters, grads_named, peft_module,
                     perturb_adapters, randn, trainable)
from .presets import Preset


class _Proj(nn.Module):
    """A model that is one frozen projection named `proj` (what the adapters target)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.proj.weight = nn.Parameter(weight, requires_grad=False)  # shared, never copied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _layer_runner(model: nn.Module, x: torch.Tensor, dy: torch.Tensor, named: nn.Module | None = None) -> Runner:
    """`model` may be torch.compile's wrapper; `named` is the module whose parameter names to report."""
    named = model if named is None else named
    params = [p for _, p in trainable(named)]

    def step():
        y = model(x)
        y.backward(dy)
        x.grad = None
        for p in params:
            p.grad = None

    def outputs():
        was = model.training
        model.eval()  # dropout off: the check compares deterministic results
        try:
            y = model(x)
            y.backward(dy)
            out = {"output": y.detach().clone(), "grad x": x.grad.detach().clone(), **grads_named(named)}
        finally:
            x.grad = None
            clear_grads(named)
            model.train(was)
        return out

    return Runner(step, outputs, keep=[model])


def _adapter_case(case_id: str, method: str, description: str, m: int, k: int, n: int, dtype: torch.dtype,
                  device: str, config_kwargs: dict, seed: int) -> Case:
    op = "lora_linear" if method == "lora" else "ia3_linear"

    def setup():
        weight = randn((n, k), seed=seed, dtype=dtype, device=device, scale=1 / math.sqrt(k))
        x = randn((m, k), seed=seed + 1, dtype=dtype, device=device, requires_grad=True)
        dy = randn((m, n), seed=seed + 2, dtype=dtype, device=device)
        shared: dict = {}

        def floor():
            return _layer_runner(_Proj(weight), x, dy)

        def peft_model(compiled: bool):
            peft = peft_module()
            cls = peft.LoraConfig if method == "lora" else peft.IA3Config
            model = peft.get_peft_model(_Proj(weight), cls(**config_kwargs))
            if "adapters" in shared:
                copy_adapters(model, shared["adapters"])
            else:
                perturb_adapters(model, seed + 3)
                shared["adapters"] = {name: p.detach().clone() for name, p in trainable(model)}
            if compiled:
                return _layer_runner(torch.compile(model), x, dy, named=model)
            return _layer_runner(model, x, dy)

        def fastpeft_model(compiled: bool = False):
            import fastpeft

            cls = fastpeft.LoraConfig if method == "lora" else fastpeft.IA3Config
            model = fastpeft.get_peft_model(_Proj(weight), cls(**config_kwargs))
            if "adapters" in shared:
                if not copy_adapters(model, shared["adapters"]):
                    raise RuntimeError(f"fastpeft's adapter parameters {[n for n, _ in trainable(model)]} do not "
                                       f"match PEFT's {list(shared['adapters'])}")
            else:
                perturb_adapters(model, seed + 3)
            if compiled:
                return _layer_runner(torch.compile(model), x, dy, named=model)
            return _layer_runner(model, x, dy)

        return {"floor": floor, "peft": lambda: peft_model(False), "compile": lambda: peft_model(True),
                "fastpeft": fastpeft_model, "fastpeft_compile": lambda: fastpeft_model(True)}

    return Case(case_id, "layer", method, description, m, (op,), setup,
                floor_note="frozen nn.Linear, gradient w.r.t. the input only")


def lora_cases(preset: Preset, dtype: torch.dtype, device: str, quick: bool) -> list[Case]:
    m, h, f, r, alpha = preset.tokens, preset.layer_hidden, preset.layer_mlp, preset.rank, preset.alpha
    shapes = [(m, h, h, 0.0), (m, h, h, 0.05), (m, h, f, 0.0), (max(1, m // 4), h, h, 0.0)]
    if quick:
        shapes = shapes[:2]
    cases = []
    for i, (mm, k, n, p) in enumerate(shapes):
        kwargs = dict(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["proj"])
        cid = f"layer/lora/M{mm} {k}->{n} d{p:g}"
        desc = f"LoRA r={r} alpha={alpha} M{mm} {k}->{n}, dropout {p:g}, fwd+bwd"
        cases.append(_adapter_case(cid, "lora", desc, mm, k, n, dtype, device, kwargs, seed=100 + 10 * i))
    return cases


def ia3_cases(preset: Preset, dtype: torch.dtype, device: str, quick: bool) -> list[Case]:
    m, h = preset.tokens, preset.layer_hidden
    cases = [_adapter_case(f"layer/ia3/M{m} {h}->{h} out", "ia3", f"IA3 M{m} {h}->{h} output scaling, fwd+bwd",
                           m, h, h, dtype, device, dict(target_modules=["proj"], feedforward_modules=[]), seed=200)]
    if not quick:
        cases.append(_adapter_case(f"layer/ia3/M{m} {h}->{h} ff", "ia3",
                                   f"IA3 M{m} {h}->{h} feed-forward input scaling, fwd+bwd", m, h, h, dtype, device,
                                   dict(target_modules=["proj"], feedforward_modules=["proj"]), seed=210))
    return cases


# ----------------------------------------------------------------------------- attention with a prefix
def _peft_style_attention(q, k, v, prefix_k, prefix_v):
    """What PEFT + transformers do: the prefix expanded over the batch, concatenated, explicit mask."""
    b, t, p = q.shape[0], q.shape[2], prefix_k.shape[1]
    kk = torch.cat([prefix_k.unsqueeze(0).expand(b, -1, -1, -1), k], dim=2)
    vv = torch.cat([prefix_v.unsqueeze(0).expand(b, -1, -1, -1), v], dim=2)
    seq = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    mask = torch.cat([torch.ones(t, p, dtype=torch.bool, device=q.device), seq], dim=1)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)


def _fn_runner(fn, inputs: dict[str, torch.Tensor], dout: torch.Tensor) -> Runner:
    grads = [name for name, t in inputs.items() if t.requires_grad]

    def step():
        out = fn(**inputs)
        out.backward(dout)
        for name in grads:
            inputs[name].grad = None

    def outputs():
        out = fn(**inputs)
        out.backward(dout)
        result = {"output": out.detach().clone()}
        for name in grads:
            result[f"grad {name}"] = inputs[name].grad.detach().clone()
            inputs[name].grad = None
        return result

    return Runner(step, outputs)


def prefix_cases(preset: Preset, dtype: torch.dtype, device: str, quick: bool) -> list[Case]:
    b, t, h = preset.batch, preset.seq, preset.layer_heads
    d = preset.layer_hidden // h
    lengths = [preset.virtual_tokens] if quick else [preset.virtual_tokens, 4 * preset.virtual_tokens]
    cases = []
    for i, p in enumerate(lengths):
        seed = 300 + 10 * i

        def setup(p=p, seed=seed):
            q, k, v = (randn((b, h, t, d), seed=seed + j, dtype=dtype, device=device, requires_grad=True)
                       for j in range(3))
            pk, pv = (randn((h, p, d), seed=seed + 3 + j, dtype=dtype, device=device, requires_grad=True)
                      for j in range(2))
            dout = randn((b, h, t, d), seed=seed + 5, dtype=dtype, device=device)
            full = dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv)

            def floor():
                return _fn_runner(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                  dict(q=q, k=k, v=v), dout)

            def fastpeft_fn(compiled: bool = False):
                from fastpeft.ops import prefix_attention

                fn = lambda **a: prefix_attention(**a, causal=True)  # noqa: E731
                return _fn_runner(torch.compile(fn) if compiled else fn, full, dout)

            return {"floor": floor, "peft": lambda: _fn_runner(_peft_style_attention, full, dout),
                    "compile": lambda: _fn_runner(torch.compile(_peft_style_attention), full, dout),
                    "fastpeft": fastpeft_fn, "fastpeft_compile": lambda: fastpeft_fn(True)}

        cases.append(Case(f"layer/prefix/B{b} H{h} T{t} D{d} P{p}", "layer", "prefix",
                          f"attention with a {p}-token prefix, B{b} H{h} T{t} D{d}, causal, fwd+bwd",
                          b * t, ("prefix_attention",), setup,
                          floor_note="causal SDPA with no prefix"))
    return cases


# ----------------------------------------------------------------------------- soft prompt
def _peft_style_prompt(input_ids, embedding_weight, prompt_table):
    """PEFT's prompt tuning: the prompt looked up for every row, cast, concatenated in front."""
    b, p = input_ids.shape[0], prompt_table.shape[0]
    idx = torch.arange(p, device=input_ids.device).unsqueeze(0).expand(b, -1)
    prompts = F.embedding(idx, prompt_table).to(embedding_weight.dtype)
    return torch.cat([prompts, F.embedding(input_ids, embedding_weight)], dim=1)


def prompt_cases(preset: Preset, dtype: torch.dtype, device: str, quick: bool) -> list[Case]:
    b, t, p = preset.batch, preset.seq, preset.virtual_tokens
    hidden, vocab = preset.model.hidden, preset.model.vocab

    def setup():
        ids = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(400)).to(device)
        weight = randn((vocab, hidden), seed=401, dtype=dtype, device=device)
        table = randn((p, hidden), seed=402, dtype=torch.float32, device=device, requires_grad=True)
        dout = randn((b, p + t, hidden), seed=403, dtype=dtype, device=device)
        inputs = dict(input_ids=ids, embedding_weight=weight, prompt_table=table)
        floor_ids = torch.cat([ids, ids[:, :p]], dim=1)  # the same number of rows, nothing to train

        def floor():
            def step():
                return F.embedding(floor_ids, weight)

            return Runner(step, lambda: {"output": step()})

        def fastpeft_fn(compiled: bool = False):
            from fastpeft.ops import soft_prompt_embed

            return _fn_runner(torch.compile(soft_prompt_embed) if compiled else soft_prompt_embed, inputs, dout)

        return {"floor": floor, "peft": lambda: _fn_runner(_peft_style_prompt, inputs, dout),
                "compile": lambda: _fn_runner(torch.compile(_peft_style_prompt), inputs, dout),
                "fastpeft": fastpeft_fn, "fastpeft_compile": lambda: fastpeft_fn(True)}

    return [Case(f"layer/prompt/B{b} T{t} P{p} H{hidden}", "layer", "prompt",
                 f"soft prompt of {p} tokens in front of B{b} x T{t} embeddings (H{hidden}, V{vocab}), fwd+bwd",
                 b * t, ("soft_prompt_embed",), setup, floor_note="embedding lookup of as many rows, forward only")]


LAYER_CASES = {"lora": lora_cases, "ia3": ia3_cases, "prefix": prefix_cases, "prompt": prompt_cases}
