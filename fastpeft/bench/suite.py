"""Runs the cases: builds each provider, checks its outputs against the reference, then times it.

A provider whose check fails is not timed and fails the run; fastpeft methods that are not
implemented yet (NotImplementedError / ImportError) show as "not available"; a torch.compile
failure shows its error and the run goes on.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .. import backend
from .check import CheckResult, compare, tolerance
from .common import COMPILED, METHODS, PROVIDER_NAMES, Case, NotAvailable, compile_error, peft_module
from .e2e import e2e_case
from .layers import LAYER_CASES
from .multi import multi_cases
from .qlora import qlora_e2e_case, qlora_layer_case
from .presets import Preset
from .timing import measure, measure_interleaved_cpu, memory_allocated, release_memory

SCHEMA = "fastpeft-bench/1"
CPU_NOTE = ("no GPU here: fastpeft's kernels need a CUDA GPU, so these are CPU reference figures "
            "(PyTorch reference ops), not kernel performance")
PEFT_MISSING_NOTE = ("PEFT is not installed: fastpeft columns only, checked against fastpeft's own torch "
                     "reference; `pip install peft` adds the PEFT and torch.compile(PEFT) reference columns")


@dataclass
class Settings:
    preset: Preset
    dtype_name: str
    dtype: torch.dtype
    device: str
    methods: tuple[str, ...] = METHODS
    layers: bool = True
    e2e: bool = True
    compile: bool = True
    compile_note: str = ""
    quick: bool = False
    warmup: int = 5
    repeats: int = 20

    def to_json(self) -> dict:
        p = self.preset
        return {"preset": p.name, "dtype": self.dtype_name, "device": self.device, "batch": p.batch, "seq": p.seq,
                "methods": list(self.methods), "layers": self.layers, "e2e": self.e2e, "compile": self.compile,
                "quick": self.quick, "warmup": self.warmup, "repeats": self.repeats, "rank": p.rank,
                "alpha": p.alpha, "virtual_tokens": p.virtual_tokens,
                "model": {"hidden": p.model.hidden, "mlp": p.model.mlp, "heads": p.model.heads,
                          "kv_heads": p.model.kv_heads, "layers": p.model.layers, "vocab": p.model.vocab},
                "layer_shapes": {"hidden": p.layer_hidden, "mlp": p.layer_mlp, "heads": p.layer_heads}}


def build_cases(s: Settings) -> list[Case]:
    cases: list[Case] = []
    if s.layers:
        for method in s.methods:
            if method in LAYER_CASES:
                cases += LAYER_CASES[method](s.preset, s.dtype, s.device, s.quick)
            elif method == "qlora":
                cases.append(qlora_layer_case(s.preset, s.dtype, s.device))
    if s.e2e:
        cases += [e2e_case(method, s.preset, s.dtype, s.device) for method in s.methods
                  if method not in ("multi", "qlora")]
        if "qlora" in s.methods:
            cases.append(qlora_e2e_case(s.preset, s.dtype, s.device))
        if "multi" in s.methods:
            cases += multi_cases(s.preset, s.dtype, s.device, s.quick)
    return cases


# ----------------------------------------------------------------------------- environment
def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def environment(device: str) -> dict:
    import fastpeft

    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        dev = {"kind": "cuda", "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
               "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    else:
        dev = {"kind": "cpu", "name": platform.processor() or platform.machine() or "CPU",
               "threads": torch.get_num_threads(), "cores": os.cpu_count()}
    versions = {"python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
                "transformers": _version("transformers"), "peft": _version("peft") if peft_module() else None,
                "fastpeft": fastpeft.__version__}
    return {"device": dev, "versions": versions, "git": git_revision(),
            "backend": {"forced": backend.get_backend() or "auto",
                        "available": {op: backend.available(op) for op in
                                      ("lora_linear", "ia3_linear", "prefix_attention", "soft_prompt_embed")}}}


def write_results(path: str, bench: str, device: str = "cpu", **payload) -> None:
    """A benchmark script's JSON file: {"meta": {bench, device, versions, git, threads}, **payload}, the
    environment as `fastpeft bench` records it."""
    env = environment(device)
    meta = {"bench": bench, "device": env["device"], "versions": env["versions"], "git": env["git"],
            "threads": torch.get_num_threads()}
    with open(path, "w") as f:
        json.dump({"meta": meta, **payload}, f, indent=1)
    print(f"wrote {path}")


def git_revision() -> dict | None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------- running
@dataclass
class _Progress:
    total: int
    write: Callable[[str], None]
    done: int = 0

    def start(self, case: Case, provider: str) -> None:
        self.done += 1
        self.write(f"[{self.done:>3}/{self.total}] {case.id} · {PROVIDER_NAMES[provider]} ... ")

    def end(self, text: str) -> None:
        self.write(text + "\n")


def _stderr(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def _providers(s: Settings, have_peft: bool) -> list[str]:
    out = ["floor"]
    if have_peft:
        out.append("peft")
        if s.compile:
            out.append("compile")
    out.append("fastpeft")
    if s.compile:
        out.append("fastpeft_compile")
    return out


def _record(case: Case, provider: str) -> dict:
    return {"id": f"{case.id}/{provider}", "case": case.id, "kind": case.kind, "method": case.method,
            "provider": provider, "provider_name": PROVIDER_NAMES[provider], "description": case.description,
            "tokens": case.tokens, "status": "ok", "error": None, "median_ms": None, "q20_ms": None,
            "q80_ms": None, "timer": None, "peak_mib": None,
            "repeats": None, "tokens_per_s": None, "vs_floor": None, "vs_peft": None, "vs_compile": None,
            "check": CheckResult("not run").to_json(), "backend": None}


def run_case(case: Case, s: Settings, have_peft: bool, progress: _Progress) -> list[dict]:
    providers = _providers(s, have_peft)
    records = [_record(case, p) for p in providers]
    tol = tolerance(s.dtype, case.kind)
    reference: dict | None = None
    try:
        builders = case.setup()
    except Exception as exc:  # the case's inputs or model could not be built
        for rec in records:
            rec.update(status="error", error=compile_error(exc))
        progress.done += len(providers)
        progress.write(f"{case.id}: could not set up ({compile_error(exc)})\n")
        return records
    # columns a case has no builder for (mixed-adapter inference has no torch.compile column) are left out
    absent = [p for p in providers if p not in builders]
    if absent:
        progress.done += len(absent)
        kept = [(p, r) for p, r in zip(providers, records) if p in builders]
        providers, records = [p for p, _ in kept], [r for _, r in kept]
    # torch.compile last: on a CPU its compiled kernels leave OpenMP worker threads spinning, which
    # slows whatever is timed next on the same cores (seen: 25.9 ms -> 564 ms for a 2-core IA3 step).
    # On a CPU the eager columns are timed together, in interleaved rounds, once all are checked: a
    # busy or drifting machine then slows each alike and their ratios hold (timed one after the
    # other, the same case moved by ±10 % between columns).
    interleave = s.device != "cuda" or not torch.cuda.is_available()
    pending: list[tuple[str, dict, object]] = []

    def time_pending() -> None:
        if not pending:
            return
        try:
            ms = measure_interleaved_cpu([runner.step for _, _, runner in pending], warmup=s.warmup,
                                         repeats=s.repeats)
            for (_, rec, _), m in zip(pending, ms):
                _timed(rec, m, case)
                progress.write(f"    {PROVIDER_NAMES.get(rec['provider'], rec['provider'])}: {m.median_ms:.3f} ms\n")
        except Exception as exc:
            for _, rec, _ in pending:
                rec.update(status="error", error=compile_error(exc))
        finally:
            pending.clear()
            release_memory(s.device)

    for provider, rec in sorted(zip(providers, records), key=lambda pair: pair[0] in COMPILED):
        if provider in COMPILED:
            time_pending()
        progress.start(case, provider)
        runner = None
        try:
            baseline = memory_allocated(s.device)
            runner = builders[provider]()
            if provider == "floor":
                check = CheckResult("floor", detail=case.floor_note)
            elif provider == "peft":
                reference = runner.outputs()
                check = CheckResult("reference", detail="the reference the other columns are checked against")
            else:
                against = "PEFT"
                if provider.startswith("fastpeft"):
                    if not have_peft:
                        if reference is None:
                            with backend.use_backend("torch"):
                                reference = runner.outputs()
                        against = "fastpeft's torch reference"
                    for op in case.ops:
                        backend._LAST.pop(op, None)  # so that the record names the backend this case used
                outputs = runner.outputs()
                if provider.startswith("fastpeft"):
                    rec["backend"] = {op: backend.last_backend(op) or "not used" for op in case.ops}
                check = (compare(outputs, reference, tol, against) if reference is not None else
                         CheckResult("not run", detail="no reference: the PEFT column failed"))
            rec["check"] = check.to_json()
            if check.status == "fail":
                rec["status"] = "fail"
                progress.end(f"CHECK FAILED: {check.detail}")
                continue
            if interleave and provider not in COMPILED:
                pending.append((provider, rec, runner))
                runner = None
                progress.end("checked" + (f" ({check.status}, {check.max_rel_err:.1e})"
                                           if check.max_rel_err is not None else "") + "; timed with the others")
                continue
            m = measure(runner.step, warmup=s.warmup, repeats=s.repeats, device=s.device,
                        memory_baseline=baseline if case.kind == "e2e" else None)
            _timed(rec, m, case)
            progress.end(f"{m.median_ms:.3f} ms" + (f", check {check.status} ({check.max_rel_err:.1e})"
                                                     if check.max_rel_err is not None else ""))
        except (NotImplementedError, ImportError, NotAvailable) as exc:
            status = "not available" if provider.startswith("fastpeft") else "error"
            rec.update(status=status, error=compile_error(exc))
            progress.end(f"{status}: {rec['error']}")
        except Exception as exc:
            rec.update(status="error", error=compile_error(exc))
            progress.end(f"error: {rec['error']}")
        finally:
            del runner
            if provider in COMPILED:
                torch._dynamo.reset()  # compiled graphs hold on to the model and its activations' sizes
                if interleave:
                    time.sleep(0.5)  # the compiled kernels' OpenMP threads stop spinning before the next timing
            release_memory(s.device)
    time_pending()
    del builders
    release_memory(s.device)
    _ratios(records)
    return records


def _timed(rec: dict, m, case: Case) -> None:
    rec.update(median_ms=m.median_ms, q20_ms=m.q20_ms, q80_ms=m.q80_ms, timer=m.timer, peak_mib=m.peak_mib,
               repeats=m.repeats, tokens_per_s=case.tokens / (m.median_ms / 1e3) if m.median_ms > 0 else None)


def _ratios(records: list[dict]) -> None:
    ms = {r["provider"]: r["median_ms"] for r in records if r["median_ms"]}
    for r in records:
        if r["median_ms"] is None:
            continue
        if ms.get("floor"):
            r["vs_floor"] = r["median_ms"] / ms["floor"]
        if ms.get("peft"):
            r["vs_peft"] = r["median_ms"] / ms["peft"]
        if r["provider"] == "fastpeft_compile" and ms.get("compile"):
            r["vs_compile"] = r["median_ms"] / ms["compile"]  # the bar compiled fastpeft must clear


def failures(cases: list[dict]) -> list[str]:
    """What makes the run fail: a fastpeft result that differs from the reference, or a fastpeft
    column that raised an error (a method not implemented yet only shows as "not available")."""
    out = []
    for r in cases:
        if not r["provider"].startswith("fastpeft"):
            continue  # a torch.compile(PEFT) mismatch is shown in the table, it is not fastpeft's failure
        if r["status"] == "fail":
            out.append(f"{r['id']}: {r['check']['detail']}")
        elif r["status"] == "error" and r["provider"] == "fastpeft":
            # compile(fastpeft) raising is shown, not failed on: torch.compile may be unusable here (no C++
            # compiler for inductor); a compiled fastpeft result that differs does fail the run
            out.append(f"{r['id']}: fastpeft raised {r['error']}")
    return out


def run_suite(s: Settings, progress: Callable[[str], None] = _stderr) -> dict:
    """Run every case; returns the results document (what is written as JSON)."""
    have_peft = peft_module() is not None
    cases = build_cases(s)
    notes = []
    if s.device != "cuda":
        notes.append(CPU_NOTE)
    if not have_peft:
        notes.append(PEFT_MISSING_NOTE)
    elif not s.compile:
        notes.append(f"torch.compile columns (PEFT, fastpeft) skipped: {s.compile_note}")
    started = datetime.datetime.now(datetime.timezone.utc)
    records: list[dict] = []
    prog = _Progress(sum(len(_providers(s, have_peft)) for _ in cases), progress)
    for note in notes:
        progress(f"note: {note}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in cases:
            records += run_case(case, s, have_peft, prog)
    fails = failures(records)
    overhead = None
    if s.layers and have_peft:
        from .overhead import measure as measure_overhead

        progress("host overhead per layer call (one CPU thread) ...\n")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            overhead = measure_overhead(rounds=3 if s.quick else 7, calls=30 if s.quick else 100)
    memory = None
    if have_peft:  # saved-for-backward bytes: measured on any machine, no allocator needed
        from .saved_bytes import memory_rows

        progress("saved-for-backward bytes per method (tiny Llama, 2x64 tokens) ...\n")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            memory = memory_rows()
    return {"overhead": overhead, "memory": memory, "schema": SCHEMA, "created": started.isoformat(timespec="seconds"),
            "seconds": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1),
            **environment(s.device), "cpu_reference": s.device != "cuda", "peft_available": have_peft,
            "notes": notes, "settings": s.to_json(), "cases": records, "ok": not fails, "failures": fails}
