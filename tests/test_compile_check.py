"""Ahead-of-time compile check of the Triton kernels for sm_90 (H100), on the CPU.

Runs `tools/compile_check.py --arch 90 --quick` (Triton's real pipeline down to ptxas, no GPU
needed) and asserts that every kernel compiled with shared memory within the sm_90 per-program limit and
that every launch keeps at least one candidate config that does not spill registers (spilling
candidates are printed: the autotuner measures and can skip them).  Skipped only where Triton's NVIDIA backend or its ptxas is missing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "compile_check.py"


def _nvidia_backend_reason():
    try:
        from triton import knobs
        from triton.backends import backends
    except Exception as e:  # noqa: BLE001
        return f"triton is not importable: {e}"
    if "nvidia" not in backends:
        return f"triton has no NVIDIA backend (has {sorted(backends)})"
    try:
        ptxas = knobs.nvidia.ptxas.path
    except Exception as e:  # noqa: BLE001
        return f"triton cannot locate ptxas: {e}"
    if not ptxas or not os.access(ptxas, os.X_OK):
        return f"ptxas not found or not executable: {ptxas!r}"
    return None


def test_kernels_compile_for_sm90(tmp_path):
    reason = _nvidia_backend_reason()
    if reason:
        pytest.skip(f"cannot compile for NVIDIA without a device: {reason}")
    out = tmp_path / "compile_check.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real configs, not the interpreter's
    proc = subprocess.run([sys.executable, str(TOOL), "--arch", "90", "--quick", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    report = f"\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr[-6000:]}"
    assert proc.returncode in (0, 1), f"compile_check could not run (exit {proc.returncode}){report}"
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert not result["uncovered"], f"kernels never launched by any scenario: {result['uncovered']}{report}"
    kernels = {r["kernel"] for r in rows}
    assert {"adapted_linear_kernel", "lowrank_shrink_kernel", "lowrank_reduce_kernel", "_fwd_tuned", "_dq_tuned",
            "_dkdv_tuned", "_prefix_attn_bwd_delta"} <= kernels, f"kernels missing from the check: {kernels}{report}"
    assert all(r["arch"] == 90 for r in rows)
    bad, spilling = [], []
    for r in rows:
        where = f"{r['kernel']} [{r['variant']}] {r['config']} warps={r['num_warps']} stages={r['num_stages']}"
        if r["smem"] is None or r["regs"] is None:
            bad.append(f"{where}: did not compile: {r['problems']}")
            continue
        if r["smem"] > r["smem_limit"]:
            bad.append(f"{where}: shared memory {r['smem']} B > {r['smem_limit']} B")
        if r["spill_stores"] or r["spill_loads"]:
            spilling.append(f"{where}: spills {r['spill_stores']} B stores at {r['regs']} regs")
    groups = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["variant"]), []).append(bool(r["spill_stores"] or r["spill_loads"]))
    bad += [f"{k} [{v}]: every compiled candidate spills" for (k, v), s in groups.items() if len(s) > 1 and all(s)]
    if spilling:
        print("spilling candidates (the autotuner can skip them):\n  " + "\n  ".join(spilling))
    assert not bad, "sm_90 compile problems:\n  " + "\n  ".join(bad) + report
    assert proc.returncode == 0, f"compile_check failed{report}"
