"""GPU rows of issue 14 (QLoRA on an NF4 base), for the lent H100: one script, one process.

1. Correctness at real sizes first: the NF4 dequantise kernel bit for bit against the reference
   (fastpeft/quant/nf4.py), and (when bitsandbytes is installed) against bitsandbytes' CUDA dequantise;
   the fused QLoRA layer (NF4-prologue GEMM, LoRA in the epilogues) forward and gradients against
   dequantise + PEFT-style LoRA in the same dtype (relative error of the fp32 reference ≤ 2x torch's).
2. The layer rows (ANCHORS' shape: M8192, 4096 → 4096, r16, alpha 32, bf16 activations, fp32 adapters):
   fwd+bwd of the frozen bf16 nn.Linear (gradient to the input only), fastpeft's QLoRA layer, the
   "dequantise + cuBLAS" QLoRA path (fastpeft's dequant kernel then torch matmuls, what bitsandbytes and
   Unsloth do), and PEFT + bitsandbytes when installed; forward alone too. Median of CUDA events after
   warm-up (do_bench, 20/50/80 %), peak memory.
3. Base-weight memory: bytes of the packed codes + absmax (+ nested absmax) against the bf16 weight.
4. End to end (--e2e): ANCHORS' 8-layer Llama (hidden 2048, MLP 5632, vocab 32000, batch 8 × 1024),
   LoRA r16 on all linears: fastpeft bf16 LoRA step vs fastpeft QLoRA step (AdamW included).

Targets (reported, not enforced): QLoRA layer fwd+bwd ≤ 1.08x the bf16 frozen layer; QLoRA step
≤ 1.05x the bf16 LoRA step; base-weight memory ≤ 0.3x bf16.

    python benchmarks/device_qlora.py --out device_out/qlora.json          # layer rows + memory
    python benchmarks/device_qlora.py --e2e --out device_out/qlora.json    # and the end-to-end step
    python benchmarks/device_qlora.py --quick                              # M2048 layer only
Exit status 1 when a correctness check fails (timings still print).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from torch import nn

import fastpeft
from fastpeft.bench.timing import measure
from fastpeft.nn.linear4bit import Linear4bit
from fastpeft.nn.lora4bit import LoraLinear4bit
from fastpeft.quant import nf4

FAILED: list[str] = []


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(what: str, ok: bool, detail: str = "") -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {what} {detail}")
    if not ok:
        FAILED.append(what)


def correctness(dev: str) -> None:
    from fastpeft.kernels.nf4 import nf4_dequantize

    print("correctness")
    torch.manual_seed(0)
    for shape, dq, dtype in [((4096, 4096), True, torch.bfloat16), ((11008, 4096), False, torch.float16),
                             ((4095, 333), True, torch.float32)]:
        w = torch.randn(shape, dtype=dtype, device=dev)
        p, s = nf4.quantize_4bit(w, 64, double_quant=dq)
        got = nf4_dequantize(p, s)
        check(f"dequant kernel == reference {shape} dq={dq} {dtype}", torch.equal(got, nf4.dequantize_4bit(p, s)))
        try:
            import bitsandbytes.functional as bf

            p_ref, s_ref = bf.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
            d_ref = bf.dequantize_4bit(p_ref, s_ref)
            ours = nf4_dequantize(p_ref, nf4.state_from_bnb(s_ref))
            check(f"dequant kernel == bitsandbytes CUDA {shape}", torch.equal(ours, d_ref),
                  f"(codes equal to ours: {torch.equal(p_ref, p)})")
        except ImportError:
            pass
    for m, k, n in [(8192, 4096, 4096), (333, 4096, 11008), (17, 1000, 333)]:
        layer, x = qlora_layer(m, k, n, dev)
        dy = torch.randn(m, n, dtype=torch.bfloat16, device=dev)
        outs = {}
        for name, fn in (("fused", lambda xi: layer(xi)), ("reference", lambda xi: reference_forward(layer, xi)),
                         ("fp32", lambda xi: reference_forward(layer, xi, torch.float32))):
            xi = x.clone().requires_grad_(True)
            y = fn(xi if name != "fp32" else xi)
            g = torch.autograd.grad(y, (xi, layer.lora_A["default"].weight, layer.lora_B["default"].weight),
                                    dy.to(y.dtype))
            outs[name] = (y, *g)
        for i, what in enumerate(("y", "dx", "dA", "dB")):
            e_fused = rel(outs["fused"][i], outs["fp32"][i])
            e_torch = rel(outs["reference"][i], outs["fp32"][i])
            check(f"QLoRA layer {what} M{m} {k}->{n}", e_fused <= 2 * e_torch + 1e-6,
                  f"rel err {e_fused:.2e} vs torch bf16 {e_torch:.2e}")


def qlora_layer(m: int, k: int, n: int, dev: str, r: int = 16):
    torch.manual_seed(1)
    lin = nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device=dev)
    base = Linear4bit.from_linear(lin, "nf4", 64, True, torch.bfloat16)
    layer = LoraLinear4bit(base, r=r, lora_alpha=2 * r).to(dev)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.02)
    return layer, torch.randn(m, k, dtype=torch.bfloat16, device=dev)


def reference_forward(layer: LoraLinear4bit, x: torch.Tensor, dtype: torch.dtype | None = None):
    """Dequantise + cuBLAS: W to 16 bit every call, then the PEFT-style LoRA ops."""
    dtype = dtype or x.dtype
    w = layer.base_layer.dequantize(dtype)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    y = x.to(dtype) @ w.t()
    return y + ((x.to(a.dtype) @ a.t() @ b.t()) * layer.scaling["default"]).to(y.dtype)


def layer_rows(dev: str, quick: bool) -> list[dict]:
    rows = []
    shapes = [(2048, 4096, 4096)] if quick else [(8192, 4096, 4096), (8192, 4096, 11008), (2048, 4096, 4096)]
    for m, k, n in shapes:
        layer, x = qlora_layer(m, k, n, dev)
        frozen = nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device=dev).requires_grad_(False)
        dy = torch.randn(m, n, dtype=torch.bfloat16, device=dev)
        xg = x.clone().requires_grad_(True)

        def fb(f):
            def run():
                y = f(xg)
                y.backward(dy)
                xg.grad = None
            return run

        providers = {
            "bf16 frozen": frozen,
            "fastpeft QLoRA": layer,
            "dequant+cuBLAS QLoRA": lambda xi: reference_forward(layer, xi),
        }
        try:
            providers["PEFT+bitsandbytes QLoRA"] = peft_bnb_layer(layer, k, n, dev)
        except Exception as e:  # bitsandbytes / peft missing or failing
            print(f"  PEFT+bitsandbytes skipped: {type(e).__name__}: {e}")
        row = {"case": f"M{m} {k}->{n} r16", "fwd_bwd_ms": {}, "fwd_ms": {}, "peak_mib": {}}
        for name, f in providers.items():
            meas = measure(fb(f), device="cuda")
            row["fwd_bwd_ms"][name] = meas.median_ms
            row["peak_mib"][name] = meas.peak_mib
            with torch.no_grad():
                row["fwd_ms"][name] = measure(lambda: f(x), device="cuda").median_ms
        base = row["fwd_bwd_ms"]["bf16 frozen"]
        row["ratio_vs_bf16_frozen"] = {k_: v / base for k_, v in row["fwd_bwd_ms"].items()}
        print(f"  {row['case']}: " + ", ".join(f"{k_} {v:.3f} ms ({row['ratio_vs_bf16_frozen'][k_]:.2f}x)"
                                              for k_, v in row["fwd_bwd_ms"].items()))
        rows.append(row)
    return rows


def peft_bnb_layer(layer: LoraLinear4bit, k: int, n: int, dev: str):
    import bitsandbytes as bnb
    import peft

    ref = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                            quant_type="nf4")
    ref.weight = bnb.nn.Params4bit(layer.base_layer.dequantize(torch.bfloat16).cpu(), requires_grad=False,
                                   quant_type="nf4", compress_statistics=True)
    holder = nn.Module()
    holder.proj = ref.to(dev)
    cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["proj"])
    model = peft.get_peft_model(holder, cfg)
    return lambda xi: model.base_model.model.proj(xi)


def memory_rows(dev: str) -> dict:
    out = {}
    for dq in (False, True):
        w = torch.randn(4096, 4096, dtype=torch.bfloat16, device=dev)
        p, s = nf4.quantize_4bit(w, 64, double_quant=dq)
        nbytes = p.numel() * p.element_size() + s.absmax.numel() * s.absmax.element_size()
        if dq:
            nbytes += s.nested_absmax.numel() * 4 + 4 + 256 * 4
        ratio = nbytes / (w.numel() * 2)
        out[f"double_quant={dq}"] = {"bytes": nbytes, "bf16_bytes": w.numel() * 2, "ratio": ratio}
        print(f"  base weight 4096x4096 double_quant={dq}: {nbytes} B = {ratio:.3f}x bf16")
    return out


def e2e_rows(dev: str) -> dict:
    import transformers

    res = {}
    cfg = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
               num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)
    ids = torch.randint(0, 32000, (8, 1024), device=dev)
    for name in ("bf16 LoRA", "QLoRA nf4"):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).to(dev, torch.bfloat16)
        if name.startswith("QLoRA"):
            fastpeft.quantize(model, "nf4", double_quant=True, compute_dtype=torch.bfloat16)
        pm = fastpeft.get_peft_model(model, fastpeft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                                target_modules="all-linear"))
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)

        def step():
            loss = pm(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        meas = measure(step, warmup=3, repeats=10, device="cuda", memory_baseline=0)
        res[name] = {"step_ms": meas.median_ms, "peak_mib": meas.peak_mib}
        print(f"  e2e {name}: {meas.median_ms:.1f} ms, peak {meas.peak_mib:.0f} MiB")
        del pm, model, opt
        torch.cuda.empty_cache()
    res["ratio"] = res["QLoRA nf4"]["step_ms"] / res["bf16 LoRA"]["step_ms"]
    print(f"  QLoRA / bf16 LoRA step: {res['ratio']:.3f}x (target ≤ 1.05x)")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--e2e", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("device_qlora.py needs a CUDA device", file=sys.stderr)
        return 2
    dev = "cuda"
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "git": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()}
    correctness(dev)
    result["layer"] = layer_rows(dev, args.quick)
    result["memory"] = memory_rows(dev)
    if args.e2e:
        result["e2e"] = e2e_rows(dev)
    l0 = result["layer"][0]["ratio_vs_bf16_frozen"]["fastpeft QLoRA"]
    mem = result["memory"]["double_quant=True"]["ratio"]
    print(f"targets: layer {l0:.3f}x (≤ 1.08x), memory {mem:.3f}x (≤ 0.3x)")
    result["failed"] = FAILED
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
