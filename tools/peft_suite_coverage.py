"""How much of HF PEFT's own test suite runs on fastpeft's fused ops under `fastpeft.accelerate()`.

Runs PEFT's tests/test_custom_models.py (from PEFT's source distribution) twice in subprocesses, on its LoRA
and IA3 cases: once as it is (baseline) and once with `fastpeft.accelerate()` applied to every model PEFT
builds (each tuner's inject_adapter: get_peft_model, add_adapter, load_adapter, from_pretrained), counting
every forward of an accelerated LoRA / IA3 layer as

  fused     fastpeft's fused ops ran (lora_linear / ia3_linear / grouped_lora_linear: several adapters,
            mixed batches included)
  base      the frozen layer alone, as PEFT does too (adapters disabled, merged weights, no adapter here)
  fallback  deferred to PEFT's own forward (DoRA and other variants, extra forward arguments, ...)

and compares the failing tests of both runs (fastpeft must add none).  Both runs seed torch, random and numpy
before every test (SEED), so that each test builds the same random adapters in both.  Get the sources first:

    pip download --no-binary :all: --no-deps peft==0.21.2 -d /tmp/p && tar xzf /tmp/p/peft-0.21.2.tar.gz -C /tmp/p
    python tools/peft_suite_coverage.py --peft-src /tmp/p/peft-0.21.2 --out coverage.json [-k EXPR] [--max-tests N]

Both runs take about 10 minutes on two CPU cores (3956 tests); --baseline-json reuses a baseline run.
A run needs no network (PEFT's one Hub-reading test, TestDynamicDispatch::test_override_lora_linear, fails
in both runs offline); diffusers is stubbed when absent (only PEFT's Stable Diffusion tests use it).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import threading
import time

import pytest

SEED = 0  # torch, random and numpy are seeded with it before every test, in both runs
_SKIP_METHODS = ("adalora", "randlora", "tinylora", "unilora", "bdlora", "lora_ga", "loraga", "vblora", "xlora")


def _is_lora_or_ia3(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    cls = params.get("config_cls")
    if cls is not None:
        return getattr(cls, "__name__", "") in ("LoraConfig", "IA3Config")
    name = item.nodeid.lower()
    return ("lora" in name or "ia3" in name) and not any(m in name for m in _SKIP_METHODS)


class _Plugin:
    def __init__(self, accelerated: bool, max_tests: int | None) -> None:
        self.accelerated, self.max_tests = accelerated, max_tests
        self.outcomes: dict[str, str] = {}
        self.counts: dict[str, collections.Counter] = {"lora": collections.Counter(), "ia3": collections.Counter()}
        self.fallback_reasons: collections.Counter = collections.Counter()
        self._state = threading.local()

    # -------------------------------------------------------------------------- pytest hooks
    def pytest_configure(self, config):
        if self.accelerated:
            self._install()

    @pytest.hookimpl(trylast=True)  # after -k / -m deselection
    def pytest_collection_modifyitems(self, session, config, items):
        keep = [i for i in items if _is_lora_or_ia3(i)]
        if self.max_tests:
            keep = keep[: self.max_tests]
        items[:] = keep

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item):
        # every test starts from the same RNG state in both runs: PEFT's tests draw their adapters' random
        # init from torch's global generator, whose state otherwise depends on what earlier tests consumed
        # (fastpeft's dropout draws its seeds differently from PEFT's Bernoulli masks), so the two runs would
        # compare the same test on different weights
        import random

        import torch

        random.seed(SEED)
        torch.manual_seed(SEED)
        try:
            import numpy as np
        except ImportError:
            return
        np.random.seed(SEED)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            prev = self.outcomes.get(report.nodeid)
            if prev in (None, "passed", "skipped") or report.outcome == "failed":
                self.outcomes[report.nodeid] = report.outcome

    # -------------------------------------------------------------------------- accelerate + counting
    def _install(self) -> None:
        import importlib

        from peft.tuners import tuners_utils

        accel = importlib.import_module("fastpeft.accelerate")
        import fastpeft

        original_inject = tuners_utils.BaseTuner.inject_adapter

        def inject_adapter(tuner, *args, **kwargs):
            out = original_inject(tuner, *args, **kwargs)
            try:
                fastpeft.accelerate(tuner.model)
            except ValueError:  # no LoRA / IA3 linear layer in this model
                pass
            return out
        tuners_utils.BaseTuner.inject_adapter = inject_adapter

        state = self._state

        def marking(kind, fn):
            def wrapped(*a, **k):
                if getattr(state, "path", None) is not None and state.path != "fallback":
                    state.path = kind if state.path != "fused" else "fused"
                return fn(*a, **k)
            return wrapped

        real_fallback = accel._fallback

        def fallback(layer, x, *args, **kwargs):
            if getattr(state, "path", None) is not None:
                state.path = "fallback"
                reason = _reason(layer, args, kwargs)
                if x.dtype != layer.get_base_layer().weight.dtype:
                    reason = f"input {x.dtype} into a {layer.get_base_layer().weight.dtype} layer"
                self.fallback_reasons[reason] += 1
            return real_fallback(layer, x, *args, **kwargs)

        accel._fallback = fallback
        accel._base_only = marking("base", accel._base_only)
        accel.lora_linear = marking("fused", accel.lora_linear)
        accel.ia3_linear = marking("fused", accel.ia3_linear)
        accel.grouped_lora_linear = marking("fused", accel.grouped_lora_linear)

        def counted(kind, fn):
            def forward(layer, x, *args, **kwargs):
                outer = getattr(state, "path", None)
                state.path = "none"
                try:
                    return fn(layer, x, *args, **kwargs)
                finally:
                    self.counts[kind][state.path] += 1
                    state.path = outer
            return forward

        accel._lora_forward = counted("lora", accel._lora_forward)
        accel._ia3_forward = counted("ia3", accel._ia3_forward)


def _reason(layer, args, kwargs) -> str:
    if args or any(v is not None for k, v in kwargs.items() if k != "adapter_names"):
        return "extra forward arguments"
    if getattr(layer, "lora_variant", None) and any(a in layer.lora_variant for a in layer.active_adapters):
        return "LoRA variant (DoRA, aLoRA, ...)"
    if any(getattr(layer, "lora_bias", {}).get(a, False) for a in layer.active_adapters):
        return "lora_bias"
    try:
        base = layer.get_base_layer()
        if type(base).__name__ not in ("Linear", "Conv1D"):
            return f"base layer {type(base).__name__}"
    except Exception:  # noqa: BLE001
        pass
    if layer.disable_adapters and layer.merged:
        return "disabled while merged (PEFT unmerges)"
    if kwargs.get("adapter_names") is not None:
        if hasattr(layer, "ia3_l"):
            return "IA3 with adapter_names (PEFT's error)"
        return "adapter_names on merged weights or a wrong row count (PEFT's error)"
    weight = layer.get_base_layer().weight
    adapters = getattr(layer, "ia3_l", None) if hasattr(layer, "ia3_l") else getattr(layer, "lora_A", {})
    active = [a for a in layer.active_adapters if a in adapters]
    if not active:
        return "no active adapter in this layer (IA3: PEFT's own forward)"
    dtypes = {adapters[a].dtype if hasattr(layer, "ia3_l") else adapters[a].weight.dtype for a in active}
    if dtypes != {weight.dtype}:
        return f"adapter dtype {sorted(map(str, dtypes))} differs from the base weight's {weight.dtype}"
    return "other (input dtype differs from the weight's, dropout differing between active adapters in training)"


def _stub_diffusers() -> None:
    """PEFT's testing_common imports diffusers' StableDiffusionPipeline at the top, for its Stable Diffusion
    tests only (not among the cases run here): a stand-in module when diffusers is not installed."""
    import importlib.util
    import types

    if importlib.util.find_spec("diffusers") is None:
        stub = types.ModuleType("diffusers")

        class StableDiffusionPipeline:  # noqa: D401 - placeholder
            def __init__(self, *a, **k):
                raise RuntimeError("diffusers is not installed (stub from tools/peft_suite_coverage.py)")
        stub.StableDiffusionPipeline = StableDiffusionPipeline
        sys.modules["diffusers"] = stub


def _run_one(args) -> int:
    _stub_diffusers()

    plugin = _Plugin(args.mode == "accelerated", args.max_tests)
    test_file = os.path.join(args.peft_src, "tests", "test_custom_models.py")
    pytest_args = [test_file, "-q", "-p", "no:cacheprovider", "-x" if args.exitfirst else "-q",
                   "--rootdir", args.peft_src, "-W", "ignore", "-o", "addopts="]
    if args.k:
        pytest_args += ["-k", args.k]
    start = time.time()
    code = pytest.main(pytest_args, plugins=[plugin])
    result = {"mode": args.mode, "exit_code": int(code), "seconds": round(time.time() - start, 1),
              "outcomes": plugin.outcomes, "counts": {k: dict(v) for k, v in plugin.counts.items()},
              "fallback_reasons": dict(plugin.fallback_reasons)}
    with open(args.out, "w") as fh:
        json.dump(result, fh)
    return 0


def _share(counts: dict) -> dict:
    total = sum(counts.values())
    fused, base, fallback = (counts.get(k, 0) for k in ("fused", "base", "fallback"))
    return {"forwards": total, "fused": fused, "base": base, "fallback": fallback,
            "fused_or_base_share": round((fused + base) / total, 4) if total else None,
            "fused_share_of_adapter_forwards": round(fused / (fused + fallback), 4) if fused + fallback else None}


def _vanilla(run: dict) -> dict:
    counts = dict(run["counts"]["lora"])
    variants = sum(n for r, n in run["fallback_reasons"].items() if r.startswith("LoRA variant"))
    counts["fallback"] = counts.get("fallback", 0) - variants
    return counts


def _versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "peft", "fastpeft")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peft-src", required=True, help="PEFT's extracted source distribution (holds tests/)")
    parser.add_argument("--out", default="peft_suite_coverage.json")
    parser.add_argument("-k", default=None, help="pytest -k expression on top of the LoRA/IA3 selection")
    parser.add_argument("--max-tests", type=int, default=None, help="only the first N selected tests")
    parser.add_argument("--baseline-json", default=None, help="reuse the baseline run's JSON (OUT.baseline.json of an "
                        "earlier run with the same selection) instead of running it again")
    parser.add_argument("--mode", choices=["baseline", "accelerated"], help=argparse.SUPPRESS)
    parser.add_argument("--exitfirst", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.peft_src, "tests", "test_custom_models.py")):
        parser.error(f"{args.peft_src}/tests/test_custom_models.py not found (see the module docstring)")
    if args.mode:
        return _run_one(args)
    if not os.path.isfile(os.path.join(args.peft_src, "tests", "__init__.py")):
        # the sdist leaves out tests/__init__.py, which the tests' relative imports need: run a copy that has it
        import shutil
        import tempfile

        copy = os.path.join(tempfile.mkdtemp(prefix="peft-src-"), "peft")
        shutil.copytree(os.path.join(args.peft_src, "tests"), os.path.join(copy, "tests"))
        open(os.path.join(copy, "tests", "__init__.py"), "w").close()
        args.peft_src = copy
    runs = {}
    if args.baseline_json:
        with open(args.baseline_json) as fh:
            runs["baseline"] = json.load(fh)
    for mode in [m for m in ("baseline", "accelerated") if m not in runs]:
        out = f"{args.out}.{mode}.json"
        cmd = [sys.executable, os.path.abspath(__file__), "--peft-src", args.peft_src, "--out", out, "--mode", mode]
        if args.k:
            cmd += ["-k", args.k]
        if args.max_tests:
            cmd += ["--max-tests", str(args.max_tests)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([args.peft_src, os.path.dirname(os.path.dirname(
            os.path.abspath(__file__)))] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        print(f"[{mode}] {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, env=env, cwd=args.peft_src, check=False)
        with open(out) as fh:
            runs[mode] = json.load(fh)
    base, acc = runs["baseline"]["outcomes"], runs["accelerated"]["outcomes"]
    failed = lambda o: {t for t, r in o.items() if r == "failed"}  # noqa: E731
    added = sorted(failed(acc) - failed(base))
    summary = {
        "tests": len(acc), "passed": sum(r == "passed" for r in acc.values()),
        "failed_baseline": len(failed(base)), "failed_accelerated": len(failed(acc)),
        "added_failures": added, "fixed_failures": sorted(failed(base) - failed(acc)),
        "lora": _share(runs["accelerated"]["counts"]["lora"]), "ia3": _share(runs["accelerated"]["counts"]["ia3"]),
        # LoRA variants (DoRA, aLoRA, ...) are not vanilla LoRA: PEFT's forward serves them on purpose
        "lora_vanilla": _share(_vanilla(runs["accelerated"])),
        "fallback_reasons": runs["accelerated"]["fallback_reasons"],
        "seconds": {m: r["seconds"] for m, r in runs.items()},
        "versions": _versions(),
    }
    with open(args.out, "w") as fh:
        json.dump(summary, fh, indent=2)
    print(json.dumps(summary, indent=2))
    return 1 if added else 0


if __name__ == "__main__":
    sys.exit(main())
