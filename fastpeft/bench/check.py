"""Correctness gate run before every timing: a provider's outputs against the reference's.

Errors are relative norms ‖a − b‖ / ‖b‖ per tensor, computed in float64; the tolerance scales
with the dtype the case runs in (the Triton kernels may use TF32 for fp32, hence the fp32 slack)
and is wider end to end, where rounding differences add up over the layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LAYER_TOL = {torch.float32: 2e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float64: 1e-8}
E2E_TOL = {torch.float32: 1e-2, torch.bfloat16: 8e-2, torch.float16: 4e-2, torch.float64: 1e-6}


class CheckFailed(AssertionError):
    """A provider's output differs from the reference by more than the tolerance."""


@dataclass
class CheckResult:
    status: str  # "pass" | "fail" | "reference" | "floor" | "not run"
    max_rel_err: float | None = None
    tol: float | None = None
    detail: str = ""
    errors: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"status": self.status, "max_rel_err": self.max_rel_err, "tol": self.tol, "detail": self.detail}


def tolerance(dtype: torch.dtype, kind: str) -> float:
    return (E2E_TOL if kind in ("e2e", "multi") else LAYER_TOL)[dtype]  # whole models: rounding adds up


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def compare(actual: dict[str, torch.Tensor | None], expected: dict[str, torch.Tensor | None], tol: float,
            against: str = "PEFT") -> CheckResult:
    """Compare the tensors two providers returned under the same names.

    A name present on one side only is a failure (a missing gradient is a wrong result)."""
    errors: dict[str, float] = {}
    problems: list[str] = []
    for name, exp in expected.items():
        act = actual.get(name)
        if exp is None and act is None:
            continue
        if exp is None or act is None:
            problems.append(f"{name}: {'missing' if act is None else 'unexpected'} in fastpeft's result")
            continue
        if tuple(act.shape) != tuple(exp.shape):
            if act.numel() == exp.numel():
                act = act.reshape(exp.shape)
            else:
                problems.append(f"{name}: shape {tuple(act.shape)} but {against} gives {tuple(exp.shape)}")
                continue
        errors[name] = rel_err(act, exp)
    worst = max(errors.values(), default=0.0)
    bad = {n: e for n, e in errors.items() if not e <= tol}
    if bad or problems:
        parts = problems + [f"{n} rel. error {e:.2e}" for n, e in sorted(bad.items(), key=lambda kv: -kv[1])[:3]]
        return CheckResult("fail", worst, tol, f"differs from {against} (tol {tol:.0e}): " + "; ".join(parts), errors)
    return CheckResult("pass", worst, tol, f"matches {against} on {', '.join(errors) or 'nothing'}"
                       if len(errors) <= 4 else f"matches {against} on {len(errors)} tensors", errors)
