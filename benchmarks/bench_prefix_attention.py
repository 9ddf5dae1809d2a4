"""Attention with a learned prefix: fastpeft's kernel against the ways PEFT-style code does it.

Providers, side by side at B8 H32 T1024 D128 bf16, causal, for P in {32, 128}:
  floor        SDPA causal with no prefix at all (what attention costs without prefix tuning)
  peft         prefix expanded over the batch, concatenated, explicit (T, P+T) mask, SDPA
  concat_lr    prefix expanded and concatenated, SDPA with `causal_lower_right`
  fastpeft     fastpeft.ops.prefix_attention (prefix read in place)
Modes: fwd+bwd (gradients to q, k, v and the prefix) and forward (no grad).  Every provider's output
(and gradients) is checked against the reference before it is timed; ratios are to the floor.

    python benchmarks/bench_prefix_attention.py [--quick] [--out results.json]

Without a CUDA device it runs tiny shapes, and fastpeft runs its torch reference: a smoke test of
the script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys

import torch
import torch.nn.functional as F

from fastpeft.backend import last_backend
from fastpeft.bench.timing import measure
from fastpeft.ops import prefix_attention
from fastpeft.ops.prefix_attention import reference_backward, reference_forward

try:
    from torch.nn.attention.bias import causal_lower_right
except ImportError:  # older torch
    causal_lower_right = None

TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- providers
# each returns (call(), leaves): call() gives the attention output (B, H, T, D)
def floor_sdpa(q, k, v, pk, pv):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _concat(k, v, pk, pv):
    B = k.shape[0]
    kk = torch.cat([pk.unsqueeze(0).expand(B, *pk.shape), k], dim=2)
    vv = torch.cat([pv.unsqueeze(0).expand(B, *pv.shape), v], dim=2)
    return kk, vv


def peft_style(q, k, v, pk, pv):
    # what PEFT's prefix tuning does in a HF model: past_key_values of shape (B, H, P, D), a
    # (T, P+T) mask that lets every query see the prefix, then SDPA with an explicit mask
    T, P = q.shape[2], pk.shape[1]
    kk, vv = _concat(k, v, pk, pv)
    mask = torch.ones(T, P + T, dtype=torch.bool, device=q.device).tril(diagonal=P)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)


def concat_lower_right(q, k, v, pk, pv):
    kk, vv = _concat(k, v, pk, pv)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=causal_lower_right(q.shape[2], kk.shape[2]))


def fastpeft_op(q, k, v, pk, pv):
    return prefix_attention(q, k, v, pk, pv, causal=True)


PROVIDERS = {"floor": floor_sdpa, "peft": peft_style, "concat_lr": concat_lower_right, "fastpeft": fastpeft_op}


# ----------------------------------------------------------------------------- one case
def make_inputs(B, H, T, P, D, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    return rnd(B, H, T, D), rnd(B, H, T, D), rnd(B, H, T, D), rnd(H, P, D), rnd(H, P, D)


def check(name, fn, inputs, dout, scale):
    """Output (and gradients, through autograd) of one provider against the reference."""
    q, k, v, pk, pv = inputs
    uses_prefix = name != "floor"
    pk_ref, pv_ref = (pk, pv) if uses_prefix else (pk[:, :0], pv[:, :0])
    ref_out, lse = reference_forward(q, k, v, pk_ref, pv_ref, None, None, True, scale)
    ref_grads = reference_backward(dout, q, k, v, pk_ref, pv_ref, None, None, ref_out, lse, True, scale)
    leaves = [t.detach().requires_grad_() for t in (inputs if uses_prefix else inputs[:3])]
    args = leaves if uses_prefix else [*leaves, pk, pv]
    out = fn(*args)
    grads = torch.autograd.grad(out, leaves, dout)
    tol = TOL[q.dtype]
    errors = {"out": rel_err(out, ref_out)}
    for gname, g, g_ref in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, ref_grads):
        errors[gname] = rel_err(g, g_ref)
    bad = {n: e for n, e in errors.items() if not e <= tol}
    if bad:
        raise AssertionError(f"{name}: relative error above {tol:g} against the reference: {bad}")
    del ref_out, ref_grads, out, grads
    return max(errors.values())


def run_case(name, fn, inputs, dout, mode, device, repeats):
    q, k, v, pk, pv = inputs
    uses_prefix = name != "floor"
    if mode == "fwd+bwd":
        leaves = [t.detach().requires_grad_() for t in (inputs if uses_prefix else inputs[:3])]
        args = leaves if uses_prefix else [*leaves, pk, pv]

        def call():
            out = fn(*args)
            return torch.autograd.grad(out, leaves, dout)
    else:
        def call():
            with torch.no_grad():
                return fn(q, k, v, pk, pv)
    m = measure(call, device=device, repeats=repeats, warmup=5 if device == "cuda" else 2)
    backend = last_backend("prefix_attention") if name == "fastpeft" else None
    return m, backend


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and only P = 32")
    ap.add_argument("--out", help="write the results as JSON to this path")
    ap.add_argument("--prefix", type=int, nargs="*", help="prefix lengths (default 32 128)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        B, H, T, D, dtype = 8, 32, 1024, 128, torch.bfloat16
        repeats = 10 if args.quick else 30
    else:
        B, H, T, D, dtype = 2, 4, 64, 32, torch.float32
        repeats = 4
        print("no CUDA device: tiny shapes on the CPU, and fastpeft runs its torch reference (not the Triton "
              "kernel); the timings below only prove the script runs", file=sys.stderr)
    prefixes = args.prefix or ([32] if args.quick else [32, 128])
    scale = 1.0 / math.sqrt(D)
    providers = dict(PROVIDERS)
    if causal_lower_right is None:
        del providers["concat_lr"]

    env = {"torch": torch.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    results = {"env": env, "shape": {"B": B, "H": H, "T": T, "D": D, "dtype": str(dtype).replace("torch.", "")},
               "kernel_ran": cuda, "cases": []}

    print(f"prefix attention, B{B} H{H} T{T} D{D} {str(dtype).replace('torch.', '')}, causal, on {env['device']}")
    header = f"{'P':>4} {'mode':<8} {'provider':<10} {'ms':>9} {'vs floor':>9} {'peak MiB':>9} {'max rel err':>12}  backend"
    print(header)
    print("-" * len(header))
    for P in prefixes:
        inputs = make_inputs(B, H, T, P, D, dtype, device)
        dout = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
        errors = {name: check(name, fn, inputs, dout, scale) for name, fn in providers.items()}
        if cuda:
            torch.cuda.empty_cache()
        for mode in ("fwd+bwd", "forward"):
            floor_ms = None
            for name, fn in providers.items():
                m, backend = run_case(name, fn, inputs, dout, mode, device, repeats)
                floor_ms = m.median_ms if name == "floor" else floor_ms
                ratio = m.median_ms / floor_ms
                peak = f"{m.peak_mib:.0f}" if m.peak_mib is not None else "-"
                print(f"{P:>4} {mode:<8} {name:<10} {m.median_ms:>9.3f} {ratio:>8.2f}x {peak:>9} "
                      f"{errors[name]:>12.2e}  {backend or ''}")
                results["cases"].append({"P": P, "mode": mode, "provider": name, "median_ms": m.median_ms,
                                         "ratio_to_floor": ratio, "peak_mib": m.peak_mib, "repeats": m.repeats,
                                         "max_rel_err": errors[name], "backend": backend})
        del inputs, dout
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
