#!/usr/bin/env python
"""Ahead-of-time compile check of every Triton kernel in fastpeft.kernels, without a GPU.

For NVIDIA sm_90 (H100) and sm_80 (A100) this compiles each kernel with the autotune configs its
launch wrapper would actually try, and reports per kernel / variant / config the registers per
thread and spills (from `ptxas -v`), the shared memory Triton allocates, num_warps and num_stages.

How the compile jobs are found (nothing here restates a kernel's signature by hand):
  1. each scenario calls the real launch wrappers (`kernels.lora`, `kernels.ia3`,
     `kernels.prefix_attention`) on CPU tensors of realistic shapes, with the kernels' `run`
     replaced by a recorder, so the arguments, dtypes, strides and constexpr flags are exactly
     the ones the wrappers pass;
  2. for an autotuned kernel, the configs are the autotuner's own, after its own
     `early_config_prune` — what it would benchmark on a device;
  3. the signature, specialisation (``tt.divisibility``, stride-1 constants) and options are built
     by Triton's own JIT binder for the target, then `triton.compile` runs the full pipeline
     (ttir → ttgir → llir → ptx → cubin, ptxas included).

A row fails when the compile raises or the kernel's shared memory exceeds what one program may
use on the arch (and, under --strict, when ptxas reports spill stores/loads).  A spilling
candidate otherwise is listed, not failed — the autotuner measures it and can skip it — but a
launch whose every compiled candidate spills (of two or more compiled) fails.  The shared-memory limit is the per-block opt-in maximum Triton checks
at launch (`cudaDevAttrMaxSharedMemoryPerBlockOptin`) — 227 KiB (232448 B) of the 228 KiB per SM on
sm_90, 163 KiB (166912 B) of the 164 KiB per SM on sm_80.  Exits 1 when any row fails, 2 on a
usage / environment error (no Triton NVIDIA backend, no ptxas).  Every kernel defined in the
kernel modules must be launched by some scenario, else that is a failure too.

    python tools/compile_check.py                     # sm_90 and sm_80, all scenarios
    python tools/compile_check.py --arch 90 --quick   # the CI subset
    python tools/compile_check.py --json out.json     # also write the rows as JSON
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field

# the interpreter swaps in one small config per kernel: the compiled configs are the point here
os.environ.pop("TRITON_INTERPRET", None)

KERNEL_MODULES = ("fastpeft.kernels.adapted_linear", "fastpeft.kernels.prefix_attention",
                  "fastpeft.kernels.soft_prompt")
# largest dynamic shared memory one program (CTA) may use: cudaDevAttrMaxSharedMemoryPerBlockOptin
SMEM_LIMIT = {90: 232448, 80: 166912}
ARCH_NAME = {90: "sm_90a (H100)", 80: "sm_80 (A100)"}


class SetupError(RuntimeError):
    """The environment cannot run the check at all (exit status 2)."""


# ----------------------------------------------------------------------------- environment
def check_environment() -> str:
    """Path of the ptxas Triton uses; SetupError when Triton's NVIDIA backend is unusable."""
    try:
        import triton  # noqa: F401
        from triton import knobs
        from triton.backends import backends
    except Exception as e:  # pragma: no cover - depends on the installation
        raise SetupError(f"cannot import triton: {e}") from e
    if "nvidia" not in backends:
        raise SetupError(f"triton has no NVIDIA backend (backends: {sorted(backends)})")
    try:
        ptxas = knobs.nvidia.ptxas.path
    except Exception as e:
        raise SetupError(f"triton cannot locate ptxas: {e}") from e
    if not ptxas or not os.path.isfile(ptxas) or not os.access(ptxas, os.X_OK):
        raise SetupError(f"ptxas not found or not executable: {ptxas!r}")
    try:
        subprocess.run([ptxas, "--version"], check=True, capture_output=True, timeout=60)
    except Exception as e:
        raise SetupError(f"ptxas at {ptxas} does not run: {e}") from e
    return ptxas


# ----------------------------------------------------------------------------- capture launches
@dataclass
class Launch:
    kernel: str      # "<module>:<attribute>" of the launched object (Autotuner or JITFunction)
    variant: str     # scenario / phase
    args: tuple
    kwargs: dict


class Recorder:
    """Replaces `run` of every kernel object in the kernel modules with a recorder."""

    def __init__(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        self.launches: list[Launch] = []
        self.phase = "?"
        self.objects: dict[str, object] = {}
        self.kernels: set[str] = set()  # launchable objects: the coverage check wants each launched
        wrapped, helpers, jits, jit_sources = set(), set(), {}, []
        for mod_name in KERNEL_MODULES:
            mod = importlib.import_module(mod_name)
            if getattr(mod, "INTERPRET", False):
                raise SetupError(f"{mod_name} was imported under TRITON_INTERPRET=1 (interpreter configs)")
            for attr, obj in vars(mod).items():
                if isinstance(obj, Autotuner):
                    key = f"{mod_name}:{attr}"
                    self.objects[key] = obj
                    self.kernels.add(key)
                    wrapped.add(id(obj.fn))
                    jit_sources.append(obj.fn.src)
                elif isinstance(obj, JITFunction) and obj.__module__ == mod_name:
                    jits[f"{mod_name}:{attr}"] = obj
        sources = "\n".join(jit_sources + [j.src for j in jits.values()])
        for key, obj in jits.items():
            name = key.split(":")[1]
            # a @triton.jit function called from another one is a device helper, not a kernel
            if re.search(rf"(?<![\w.]){re.escape(name)}\s*\(", sources.replace(obj.src, "")):
                helpers.add(key)
            self.objects[key] = obj
            if id(obj) not in wrapped and key not in helpers:
                self.kernels.add(key)
        for key, obj in self.objects.items():
            obj.run = self._recorder(key)

    def _recorder(self, key):
        def run(*args, grid=None, warmup=False, **kwargs):
            same = sum(1 for L in self.launches if L.kernel == key and L.variant.split("#")[0] == self.phase)
            variant = self.phase if same == 0 else f"{self.phase}#{same + 1}"
            self.launches.append(Launch(key, variant, args, dict(kwargs)))
            return None

        return run


# ----------------------------------------------------------------------------- scenarios
# (name, selection under --quick (None: not in the quick subset), selection by default, callable(rec)).
# Selections of the autotune configs that survive the kernel's own pruning: "all"; "extremes": the
# largest-footprint ones (most shared memory, most accumulator elements per thread); "heaviest":
# the latter only; "lightest": the smallest one (the fp32 FMA paths: their big configs take minutes
# of ptxas each).  --thorough compiles every config of every scenario (~35 CPU-minutes).
def _dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _t(*shape, dtype):
    import torch

    return torch.empty(*shape, dtype=_dtype(dtype))  # never initialised: no kernel runs


def _lora(rec, dtype, adapter_dtype, r, p, bias, m=2048, k=4096, n=4096):
    import torch

    from fastpeft.kernels import lora

    x, w = _t(m, k, dtype=dtype), _t(n, k, dtype=dtype)
    a, b = _t(r, k, dtype=adapter_dtype), _t(n, r, dtype=adapter_dtype)
    bias_t = _t(n, dtype=dtype) if bias else None
    base = rec.phase
    rec.phase = f"{base}/fwd"
    _, s = lora.lora_forward(x, w, bias_t, a, b, 2.0, p, 1234)
    rec.phase = f"{base}/bwd"
    lora.lora_backward(_t(m, n, dtype=dtype), x, w, a, b, s.to(torch.float32), 2.0, p, 1234)


def _ia3(rec, dtype, l_dtype, feedforward, m=2048, k=4096, n=4096):
    import torch

    from fastpeft.kernels import ia3

    x, w, bias = _t(m, k, dtype=dtype), _t(n, k, dtype=dtype), _t(n, dtype=dtype)
    l = torch.ones(k if feedforward else n, dtype=_dtype(l_dtype))
    base = rec.phase
    rec.phase = f"{base}/fwd"
    _, z = ia3.ia3_forward(x, w, bias, l, feedforward, keep_z=True)  # training: Z kept for dl
    rec.phase = f"{base}/bwd"
    ia3.ia3_backward(_t(m, n, dtype=dtype), x, z, w, l, feedforward, (True, True))


def _prefix(rec, dtype, d, *, causal=True, mask=True, index=False, t=512, s=None, p=20, b=2, hq=32, hkv=8,
            backward=True):
    import torch

    from fastpeft.kernels import prefix_attention as pa

    s = t if s is None else s
    q = _t(b, hq, t, d, dtype=dtype)
    k, v = _t(b, hkv, s, d, dtype=dtype), _t(b, hkv, s, d, dtype=dtype)
    shape = (3, hkv, p, d) if index else (hkv, p, d)
    pk, pv = _t(*shape, dtype=dtype), _t(*shape, dtype=dtype)
    am = torch.ones(b, s, dtype=torch.bool) if mask else None
    pidx = torch.zeros(b, dtype=torch.long) if index else None
    scale = d ** -0.5
    base = rec.phase
    rec.phase = f"{base}/fwd"
    out, lse = pa.forward(q, k, v, pk, pv, am, pidx, causal, scale)
    if backward:
        rec.phase = f"{base}/bwd"
        pa.backward(torch.empty_like(out), q, k, v, pk, pv, am, pidx, out, lse, causal, scale)


def _soft_prompt(rec, dtype, *, templated=False, index=False, b=8, t=512, p=20, h=4096, v=32000):
    import torch

    from fastpeft.kernels import soft_prompt as sp

    ids = torch.zeros(b, t, dtype=torch.long)
    w = _t(v, h, dtype=dtype)
    table = _t(*((3, p, h) if index else (p, h)), dtype="fp32")
    pidx = torch.zeros(b, dtype=torch.long) if index else None
    slots = None
    positions = None
    if templated:  # the virtual tokens in two segments among the words
        slots = torch.full((b, t), -1, dtype=torch.long)
        slots[:, 1:1 + p // 2] = torch.arange(p // 2)
        slots[:, 7:7 + p - p // 2] = torch.arange(p // 2, p)
        positions = torch.cat([torch.arange(1, 1 + p // 2), torch.arange(7, 7 + p - p // 2)]).expand(b, p)
    base = rec.phase
    rec.phase = f"{base}/fwd"
    out = sp.soft_prompt_forward(ids, w, table, pidx, slots)
    rec.phase = f"{base}/bwd table"
    sp.soft_prompt_table_backward(torch.empty_like(out), ids, pidx, 3 if index else 1, table.dtype, positions)
    for det in (False, True):
        rec.phase = f"{base}/bwd words {'sorted' if det else 'atomic'}"
        sp.soft_prompt_embedding_backward(torch.empty_like(out), ids, v, w.dtype, deterministic=det, slots=slots)


@contextlib.contextmanager
def _fp32_precision(mode):
    import torch

    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(mode)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _fp32(fn, mode):
    def run(rec):
        with _fp32_precision(mode):
            fn(rec)

    return run


SCENARIOS = [
    # LoRA: shrink (S = drop(X)·Aᵀ / dS, dB), the adapted GEMM (Y, dX), reduce (dA)
    ("lora bf16 r16", "extremes", "all", lambda rec: _lora(rec, "bf16", "bf16", 16, 0.0, False)),
    ("lora bf16+fp32A r16 p.1 bias", None, "heaviest", lambda rec: _lora(rec, "bf16", "fp32", 16, 0.1, True)),
    ("lora bf16 r256", None, "heaviest", lambda rec: _lora(rec, "bf16", "bf16", 256, 0.0, False)),
    ("lora fp16 r64 p.1 M=2000", None, "heaviest", lambda rec: _lora(rec, "fp16", "fp16", 64, 0.1, True, m=2000)),
    ("lora fp32 r8 ieee", None, "lightest", _fp32(lambda rec: _lora(rec, "fp32", "fp32", 8, 0.1, True), "highest")),
    ("lora fp32 r8 tf32", None, "lightest", _fp32(lambda rec: _lora(rec, "fp32", "fp32", 8, 0.0, False), "high")),
    # IA3: output scaling (OUT_SCALE / IN_SCALE + GRAD_MODE 1) and feed-forward input scaling
    ("ia3 bf16 l=fp32 out", "extremes", "extremes", lambda rec: _ia3(rec, "bf16", "fp32", False)),
    ("ia3 bf16 l=fp32 ff", None, "extremes", lambda rec: _ia3(rec, "bf16", "fp32", True)),
    ("ia3 fp16 l=fp16 ff", None, "heaviest", lambda rec: _ia3(rec, "fp16", "fp16", True)),
    ("ia3 fp32 out ieee", None, "lightest", _fp32(lambda rec: _ia3(rec, "fp32", "fp32", False), "highest")),
    # prefix attention: head dims 64/80/96/128 (80, 96 pad to BLOCK_D 128), GQA, mask, index
    ("prefix bf16 d128 causal mask", "extremes", "all", lambda rec: _prefix(rec, "bf16", 128)),
    ("prefix bf16 d64 idx", None, "heaviest", lambda rec: _prefix(rec, "bf16", 64, causal=False, index=True)),
    ("prefix fp16 d80 causal", None, "heaviest", lambda rec: _prefix(rec, "fp16", 80, mask=False)),
    ("prefix bf16 d96 causal mask idx", None, "heaviest", lambda rec: _prefix(rec, "bf16", 96, index=True)),
    ("prefix fp32 d128 causal mask", None, "lightest", lambda rec: _prefix(rec, "fp32", 128)),
    ("prefix bf16 d128 decode T=1", None, "all",
     lambda rec: _prefix(rec, "bf16", 128, causal=False, t=1, s=512, backward=False)),
    # soft prompts in the embedding gather: prepended (PEFT's layout) and templated (P-tuning), mixed tasks
    ("soft prompt bf16 prepend", "all", "all", lambda rec: _soft_prompt(rec, "bf16")),
    ("soft prompt fp16 template idx", None, "all", lambda rec: _soft_prompt(rec, "fp16", templated=True, index=True)),
    ("soft prompt fp32 template", None, "all", lambda rec: _soft_prompt(rec, "fp32", templated=True)),
]


def capture(quick: bool, thorough: bool = False) -> tuple[Recorder, list[tuple[Launch, str]]]:
    rec = Recorder()
    chosen = []
    for name, quick_selection, selection, fn in SCENARIOS:
        if quick:
            if quick_selection is None:
                continue
            selection = quick_selection
        if thorough:
            selection = "all"
        start = len(rec.launches)
        rec.phase = name
        try:
            fn(rec)
        except Exception as e:
            raise RuntimeError(f"scenario {name!r}: the launch wrapper raised before launching: {e}") from e
        if len(rec.launches) == start:
            raise RuntimeError(f"scenario {name!r} launched no kernel")
        chosen += [(L, selection) for L in rec.launches[start:]]
    return rec, chosen


# ----------------------------------------------------------------------------- compile jobs
@dataclass
class Job:
    kernel: str
    variant: str
    arch: int
    config: str
    num_warps: int
    num_stages: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict


@dataclass
class Row:
    kernel: str
    variant: str
    arch: int
    config: str
    num_warps: int
    num_stages: int
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    smem: int | None = None
    smem_limit: int = 0
    seconds: float = 0.0
    status: str = "?"
    problems: list = field(default_factory=list)

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)

    @property
    def ok(self) -> bool:
        """Compiled, fits in shared memory, usage readable (spills are judged separately)."""
        return not [p for p in self.problems if not p.startswith("register spills")]


def _footprint(meta: dict, num_warps: int, num_stages: int) -> tuple[int, int]:
    """(shared memory proxy, accumulator elements per thread proxy) of a config's block sizes."""
    blocks = [v for k, v in meta.items() if k.startswith("BLOCK_")]
    prod = 1
    for v in blocks:
        prod *= v
    tiles = sorted(blocks)
    acc = tiles[-1] * tiles[-2] if len(tiles) >= 2 else prod
    return prod * num_stages, acc // num_warps


def select_configs(configs, selection: str):
    fp = lambda c: _footprint(c.kwargs, c.num_warps, c.num_stages)  # noqa: E731
    if selection == "all" or len(configs) <= 1:
        return list(configs)
    if selection == "lightest":
        return [min(configs, key=lambda c: (fp(c)[1], fp(c)[0]))]
    by_regs = max(configs, key=lambda c: (fp(c)[1], fp(c)[0]))
    if selection == "heaviest":
        return [by_regs]
    if selection == "extremes":  # the most shared memory, the two most accumulator elements per thread, the lightest
        by_smem = max(configs, key=lambda c: (fp(c)[0], fp(c)[1]))
        runner_up = max((c for c in configs if c is not by_regs), key=lambda c: (fp(c)[1], fp(c)[0]))
        lightest = min(configs, key=lambda c: (fp(c)[1], fp(c)[0]))
        return [c for c in configs if any(c is x for x in (by_smem, by_regs, runner_up, lightest))]
    raise ValueError(f"unknown config selection {selection!r}")


def make_jobs(rec: Recorder, launches, archs) -> list[Job]:
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import MockTensor, create_function_from_signature

    jobs, seen = [], set()
    for arch in archs:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        binders = {}
        for launch, selection in launches:
            obj = rec.objects[launch.kernel]
            if isinstance(obj, Autotuner):
                fn = obj.fn
                obj.nargs = dict(zip(obj.arg_names, launch.args))
                try:
                    configs = obj.prune_configs(dict(launch.kwargs))  # the autotuner's own pruning
                finally:
                    obj.nargs = None
                configs = select_configs(configs, selection)
                metas = [c.all_kwargs() for c in configs]
            else:
                fn = obj
                metas = [{}]
            if fn not in binders:
                binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
            args = tuple(MockTensor.wrap_dtype(a) for a in launch.args)
            for meta in metas:
                kwargs = {**launch.kwargs, **meta}
                # as JITFunction.run adds them
                kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
                kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
                bound, spec, opts = binders[fn](*args, **kwargs)
                options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
                block = {k: v for k, v in meta.items() if k.isupper()}
                config = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in block.items()) or "-"
                key = (launch.kernel, arch, repr(signature), repr(sorted(constexprs.items())),
                       repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
                if key in seen:  # an identical specialisation from another scenario
                    continue
                seen.add(key)
                jobs.append(Job(launch.kernel.split(":")[1], launch.variant, arch, config, options.num_warps,
                                options.num_stages, signature, constexprs, attrs, dict(options.__dict__)))
    return jobs


# ----------------------------------------------------------------------------- compile + ptxas
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_usage(log: str):
    regs = _PTXAS_REGS.search(log)
    spill = _PTXAS_SPILL.search(log)
    if not regs or not spill:
        return None
    return int(regs.group(1)), int(spill.group(1)), int(spill.group(2)), int(spill.group(3))


def _rerun_ptxas(ptx: str, arch: int) -> str:
    from triton import knobs
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [knobs.nvidia.ptxas.path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.cubin")]
        res = subprocess.run(cmd, capture_output=True, text=True)
        return res.stdout + res.stderr


def _kernel_fn(name: str):
    from triton.runtime.autotuner import Autotuner

    for mod_name in KERNEL_MODULES:
        obj = getattr(importlib.import_module(mod_name), name, None)
        if obj is not None:
            return obj.fn if isinstance(obj, Autotuner) else obj
    raise LookupError(f"kernel {name} not found in {KERNEL_MODULES}")


def compile_job(job: Job) -> Row:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    row = Row(job.kernel, job.variant, job.arch, job.config, job.num_warps, job.num_stages,
              smem_limit=SMEM_LIMIT[job.arch])
    start = time.perf_counter()
    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v output: captured below
    log = io.StringIO()
    try:
        src = ASTSource(_kernel_fn(job.kernel), job.signature, job.constexprs, job.attrs)
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=job.options)
    except Exception as e:
        row.seconds = time.perf_counter() - start
        msg = str(e).strip().splitlines()
        first = next((ln for ln in msg if ln.strip()), type(e).__name__)
        row.status = "COMPILE FAILED"
        row.problems.append(f"compile failed: {type(e).__name__}: {first[:300]}")
        row.problems.append("".join(traceback.format_exception_only(type(e), e))[-2000:])
        return row
    row.seconds = time.perf_counter() - start
    row.smem = int(compiled.metadata.shared)
    usage = _ptxas_usage(log.getvalue())
    if usage is None:  # cache hit or no log: run ptxas on the PTX ourselves
        usage = _ptxas_usage(_rerun_ptxas(compiled.asm["ptx"], job.arch))
    if usage is None:
        row.problems.append("could not read register/spill usage from ptxas -v")
    else:
        row.regs, row.stack, row.spill_stores, row.spill_loads = usage
        if row.spill_stores or row.spill_loads:
            row.problems.append(f"register spills: {row.spill_stores} B stores, {row.spill_loads} B loads "
                                f"({row.regs} registers)")
    if row.smem > row.smem_limit:
        row.problems.append(f"shared memory {row.smem} B > {row.smem_limit} B allowed per program on sm_{job.arch}")
    if compiled.metadata.num_warps != job.num_warps:
        row.problems.append(f"compiled with {compiled.metadata.num_warps} warps, asked {job.num_warps}")
    if not row.problems:
        row.status = "ok"
    else:
        row.status = " + ".join(p.split(":")[0].upper() if p.startswith("register") else
                                ("SMEM" if p.startswith("shared") else "ERROR") for p in row.problems)
    return row


def _worker_init(cache_dir: str):
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.pop("TRITON_INTERPRET", None)


# ----------------------------------------------------------------------------- report
def _spill_text(row: Row) -> str:
    if row.spill_stores is None:
        return "?"
    if not (row.spill_stores or row.spill_loads):
        return "0"
    return f"{row.spill_stores}st/{row.spill_loads}ld"


def print_table(rows: list[Row], out=sys.stdout):
    head = ["kernel", "variant", "arch", "config", "warps", "stages", "regs", "spills", "smem B", "status"]
    body = [[r.kernel, r.variant, f"sm_{r.arch}", r.config, str(r.num_warps), str(r.num_stages),
             "?" if r.regs is None else str(r.regs), _spill_text(r),
             "?" if r.smem is None else str(r.smem), r.status] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    right = {4, 5, 6, 8}
    fmt = lambda cells: "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    print(fmt(head), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for cells in body:
        print(fmt(cells), file=out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, action="append", choices=sorted(SMEM_LIMIT),
                    help="compute capability to compile for (repeatable; default: 90 and 80)")
    ap.add_argument("--quick", action="store_true", help="the CI subset: fewer scenarios, every kernel still covered")
    ap.add_argument("--strict", action="store_true", help="a spilling candidate config fails the check too")
    ap.add_argument("--thorough", action="store_true", help="every autotune config of every scenario (slow)")
    ap.add_argument("--json", metavar="PATH", help="also write every row (and the totals) as JSON")
    ap.add_argument("--jobs", type=int, default=0, help="parallel compile processes (default: CPUs available)")
    ap.add_argument("--cache-dir", help="Triton cache dir to use (default: a fresh temporary one, so "
                                        "everything really compiles)")
    args = ap.parse_args(argv)
    archs = list(dict.fromkeys(args.arch or [90, 80]))
    t0 = time.perf_counter()
    try:
        ptxas = check_environment()
    except SetupError as e:
        print(f"compile_check: cannot run: {e}", file=sys.stderr)
        return 2

    tmp = None
    cache_dir = args.cache_dir
    if cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fastpeft-compile-check-")
        cache_dir = tmp.name
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    try:
        import triton

        rec, launches = capture(args.quick, args.thorough)
        jobs = make_jobs(rec, launches, archs)
    except SetupError as e:
        print(f"compile_check: cannot run: {e}", file=sys.stderr)
        return 2
    launched = {L.kernel for L in rec.launches}
    uncovered = sorted(k.split(":")[1] for k in rec.kernels - launched)
    n_proc = args.jobs or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    n_proc = max(1, min(n_proc or 1, len(jobs)))
    print(f"triton {triton.__version__}, ptxas {ptxas}; {len(jobs)} compile jobs for "
          f"{', '.join(ARCH_NAME[a] for a in archs)} on {n_proc} process(es)"
          f"{' (quick subset)' if args.quick else ''}", flush=True)

    rows: list[Row] = []
    if n_proc == 1:
        _worker_init(cache_dir)
        rows = [compile_job(j) for j in jobs]
    else:
        ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch/triton state
        with cf.ProcessPoolExecutor(n_proc, mp_context=ctx, initializer=_worker_init,
                                    initargs=(cache_dir,)) as pool:
            futures = [pool.submit(compile_job, j) for j in jobs]
            for job, fut in zip(jobs, futures):
                try:
                    rows.append(fut.result())
                except Exception as e:  # the worker itself died (e.g. a crash inside the compiler)
                    r = Row(job.kernel, job.variant, job.arch, job.config, job.num_warps, job.num_stages,
                            smem_limit=SMEM_LIMIT[job.arch], status="COMPILE FAILED")
                    r.problems.append(f"compile process failed: {type(e).__name__}: {e}")
                    rows.append(r)
    if tmp is not None:
        tmp.cleanup()

    rows.sort(key=lambda r: (-r.arch, r.kernel, r.variant))
    print()
    print_table(rows)
    failed = [r for r in rows if not r.ok or (args.strict and r.spills)]
    spilling = [r for r in rows if r.ok and r.spills]
    # every launch must keep at least one candidate the autotuner can pick without spilling
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.kernel, r.variant, r.arch), []).append(r)
    # (only launches with several candidates compiled: "heaviest"/"lightest" selections compile one)
    no_clean = sorted(k for k, rs in groups.items() if len(rs) > 1 and all(r.ok and r.spills for r in rs))
    elapsed = time.perf_counter() - t0
    print(f"\n{len(rows)} kernel compiles, {len(failed)} failing, {len(spilling)} spilling "
          f"({'failures under --strict' if args.strict else 'candidates the autotuner can skip'}), "
          f"{len(no_clean)} launch(es) with no spill-free candidate, {elapsed:.0f} s "
          f"(compile CPU time {sum(r.seconds for r in rows):.0f} s)")
    for kernel, variant, arch in no_clean:
        print(f"\nNO SPILL-FREE CONFIG: {kernel} [{variant}] sm_{arch}: every compiled candidate spills",
              file=sys.stderr)
    if uncovered:
        print(f"\nNOT COVERED: kernels no scenario launched: {', '.join(uncovered)}", file=sys.stderr)
    for r in failed:
        print(f"\nFAIL {r.kernel} [{r.variant}] sm_{r.arch} {r.config} warps={r.num_warps} "
              f"stages={r.num_stages}:", file=sys.stderr)
        for p in r.problems:
            print("    " + p.replace("\n", "\n    "), file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"archs": archs, "quick": args.quick, "triton": triton.__version__, "seconds": elapsed,
                       "uncovered": uncovered, "no_spill_free_config": [list(k) for k in no_clean],
                       "rows": [dict(asdict(r), ok=r.ok, spills=r.spills) for r in rows]}, f, indent=1)
    return 1 if failed or uncovered or no_clean else 0


if __name__ == "__main__":
    sys.exit(main())
