"""The benchmark suite's cases under pytest-benchmark, for people who prefer

    pytest benchmarks/ --benchmark-json out.json

Tiny shapes on the CPU (the GPU shapes are `fastpeft bench`'s job).  Each fastpeft case is
checked against PEFT's result on the same weights before it is timed, as in `fastpeft bench`.
"""

import pytest
import torch

from fastpeft.bench.check import compare, tolerance
from fastpeft.bench.common import peft_module
from fastpeft.bench.e2e import e2e_case
from fastpeft.bench.layers import ia3_cases, lora_cases, prefix_cases, prompt_cases
from fastpeft.bench.presets import get_preset

PRESET = get_preset("tiny")
DTYPE = torch.float32
CASES = {case.id: case for case in [
    *lora_cases(PRESET, DTYPE, "cpu", quick=True),
    *ia3_cases(PRESET, DTYPE, "cpu", quick=True),
    *prefix_cases(PRESET, DTYPE, "cpu", quick=True),
    *prompt_cases(PRESET, DTYPE, "cpu", quick=True),
    e2e_case("lora", PRESET, DTYPE, "cpu"),
]}


@pytest.mark.parametrize("provider", ["floor", "peft", "fastpeft"])
@pytest.mark.parametrize("case_id", list(CASES))
def test_case(benchmark, case_id, provider):
    if peft_module() is None and provider == "peft":
        pytest.skip("PEFT is not installed (`pip install peft` adds the reference)")
    case = CASES[case_id]
    builders = case.setup()
    reference = builders["peft"]().outputs() if peft_module() is not None else None
    try:
        runner = builders[provider]()
    except (NotImplementedError, ImportError) as exc:
        pytest.skip(f"not available in fastpeft yet: {exc}")
    if provider == "fastpeft" and reference is not None:
        result = compare(runner.outputs(), reference, tolerance(DTYPE, case.kind))
        assert result.status == "pass", f"{case_id}: {result.detail}"
    benchmark.group = case_id
    benchmark.extra_info.update(tokens=case.tokens, provider=provider, description=case.description)
    rounds = 3 if case.kind == "e2e" else 10
    benchmark.pedantic(runner.step, rounds=rounds, warmup_rounds=1)
