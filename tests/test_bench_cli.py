"""`fastpeft bench`: argument errors, the results files of a tiny CPU run, --compare, and the
correctness gate (a wrong fastpeft result fails the run)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastpeft.bench.cli import main as bench_main
from fastpeft.cli import main as fastpeft_main

TINY = ["--quick", "--preset", "tiny", "--device", "cpu", "--warmup", "1", "--repeats", "1"]


def _exit_code(argv, capsys):
    with pytest.raises(SystemExit) as info:
        fastpeft_main(["bench", *argv])
    return info.value.code, capsys.readouterr().err


# ----------------------------------------------------------------------------- argument errors
@pytest.mark.parametrize("argv, names", [
    (["--methods", "lora,dora"], "'dora'"),
    (["--methods", ""], "no method"),
    (["--preset", "huge"], "'huge'"),
    (["--dtype", "int8"], "'int8'"),
    (["--batch", "0"], "positive integer"),
    (["--layers-only", "--e2e-only"], "not allowed with"),
    (["--unknown-flag"], "--unknown-flag"),
])
def test_argument_errors_exit_2_and_name_the_problem(argv, names, capsys):
    code, err = _exit_code(argv, capsys)
    assert code == 2
    assert names in err
    assert "usage: fastpeft bench" in err
    assert "Traceback" not in err


def test_compare_file_errors(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"cases": []}))
    code, err = _exit_code(["--compare", str(tmp_path / "missing.json"), str(good)], capsys)
    assert code == 2 and "missing.json does not exist" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, err = _exit_code(["--compare", str(good), str(bad)], capsys)
    assert code == 2 and "bad.json is not valid JSON" in err
    other = tmp_path / "other.json"
    other.write_text(json.dumps([1, 2, 3]))
    code, err = _exit_code(["--compare", str(good), str(other)], capsys)
    assert code == 2 and "not a fastpeft bench results file" in err


def test_out_must_be_a_folder(tmp_path, capsys):
    path = tmp_path / "file.txt"
    path.write_text("x")
    code, err = _exit_code(["--out", str(path)], capsys)
    assert code == 2 and "is not a folder" in err


def test_console_usage_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "fastpeft.bench", "--methods", "lora,bogus"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown method 'bogus'" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- a tiny run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = bench_main([*TINY, "--out", str(out)])
    with open(out / "results.json") as f:
        return code, json.load(f), out


def test_tiny_run_json_schema(tiny_run):
    code, doc, _ = tiny_run
    assert code == 0, doc["failures"]
    assert doc["ok"] is True and doc["failures"] == []
    for key in ("schema", "created", "device", "versions", "git", "backend", "cpu_reference", "notes", "settings",
                "cases", "peft_available"):
        assert key in doc
    assert doc["cpu_reference"] is True and any("need a CUDA GPU" in n for n in doc["notes"])
    assert set(doc["versions"]) >= {"torch", "triton", "transformers", "peft", "fastpeft"}
    assert doc["settings"]["preset"] == "tiny" and doc["settings"]["quick"] is True
    assert isinstance(doc["device"]["name"], str)
    kinds = {(c["kind"], c["method"]) for c in doc["cases"]}
    for method in ("lora", "ia3", "prefix", "prompt"):
        assert ("layer", method) in kinds and ("e2e", method) in kinds
    for c in doc["cases"]:
        assert c["status"] in ("ok", "not available", "error", "fail")
        assert c["check"]["status"] in ("pass", "fail", "reference", "floor", "not run")
        assert c["provider"] in ("floor", "peft", "compile", "fastpeft")
        assert c["provider"] != "compile"  # --quick on a CPU leaves torch.compile out
        if c["status"] == "ok":
            assert isinstance(c["median_ms"], float) and c["median_ms"] > 0
            assert isinstance(c["tokens_per_s"], float) and isinstance(c["repeats"], int)
            assert c["peak_mib"] is None  # no allocator statistics on the CPU
            assert isinstance(c["vs_floor"], float) and isinstance(c["vs_peft"], float)
        if c["provider"] == "fastpeft" and c["status"] == "ok":
            assert c["check"]["status"] == "pass" and c["check"]["max_rel_err"] <= c["check"]["tol"]
            assert set(c["backend"]) and all(isinstance(v, str) for v in c["backend"].values())
        if c["provider"] == "peft":
            assert c["check"]["status"] == "reference" and c["vs_peft"] == 1.0
    by_case = {}
    for c in doc["cases"]:
        by_case.setdefault(c["case"], set()).add(c["provider"])
    assert all(p == {"floor", "peft", "fastpeft"} for p in by_case.values())


def test_tiny_run_writes_markdown_and_plots(tiny_run):
    _, doc, out = tiny_run
    md = (out / "results.md").read_text()
    assert "CPU reference figures" in md and "| case | provider | ms | ms 20%-80% |" in md
    assert "e2e" not in md.split("##")[0]
    data = (out / "speed.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert not (out / "memory.png").exists()  # no allocator statistics on a CPU: no empty memory plot


def test_tiny_run_records_quantiles(tiny_run):
    _, doc, _ = tiny_run
    timed = [c for c in doc["cases"] if c["status"] == "ok"]
    assert timed
    for c in timed:
        # the CPU's eager columns side by side in interleaved rounds, compiled ones by torch's timer
        want = ("torch.utils.benchmark" if c["provider"] in ("compile", "fastpeft_compile")
                else "interleaved rounds (time.perf_counter)")
        assert c["timer"] == want and c["repeats"] >= 1
        assert 0 < c["q20_ms"] <= c["median_ms"] <= c["q80_ms"], c


def test_quantiles_match_numpy_and_cpu_timer_spread():
    import numpy as np

    from fastpeft.bench.timing import measure, quantiles

    values = list(np.random.default_rng().random(17) * 10)
    assert np.allclose(quantiles(values), np.quantile(values, [0.2, 0.5, 0.8]))
    x = torch.randn(128, 128)
    m = measure(lambda: x @ x, device="cpu", warmup=1, repeats=8)
    assert m.timer == "torch.utils.benchmark" and m.peak_mib is None and m.repeats == len(m.times_ms) >= 2
    assert m.q20_ms <= m.median_ms <= m.q80_ms and np.isclose(m.median_ms, np.median(m.times_ms))


def _fake_doc(peak):
    def rec(case, provider, ms, status="ok"):
        return {"case": case, "kind": case.split("/")[0], "method": case.split("/")[1], "provider": provider,
                "provider_name": provider, "median_ms": ms, "q20_ms": ms and ms * 0.9, "q80_ms": ms and ms * 1.2,
                "peak_mib": peak if ms else None, "status": status}
    cases = [rec("layer/lora/M64 64->176 d0.05", "floor", 1.0), rec("layer/lora/M64 64->176 d0.05", "peft", 2.0),
             rec("layer/lora/M64 64->176 d0.05", "fastpeft", None, "not available"),
             rec("e2e/lora", "floor", 3.0), rec("e2e/lora", "peft", 4.0), rec("e2e/lora", "fastpeft", 3.5)]
    return {"settings": {"methods": ["lora"], "dtype": "bf16"}, "device": {"name": "GPU"}, "cpu_reference": False,
            "cases": cases}


def test_plots_show_absolute_times_and_missing_values(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    from fastpeft.bench.report import plain_label, write_plots

    assert plain_label("layer/lora/M64 64->176 d0.05") == "64 tokens, 64 to 176\ndropout 0.05"
    assert plain_label("layer/ia3/M64 64->64 ff") == "64 tokens, 64 to 64\nfeed-forward input scaling"
    assert plain_label("layer/prefix/B2 H4 T32 D16 P8") == "8-token prefix\nbatch 2 x 32 tokens"
    bars, texts = [], []
    real_bar, real_text = matplotlib.axes.Axes.bar, matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "bar",
                        lambda self, x, h, *a, **k: bars.append((list(x), list(h))) or real_bar(self, x, h, *a, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "text",
                        lambda self, x, y, s, *a, **k: texts.append(s) or real_text(self, x, y, s, *a, **k))
    written = write_plots(_fake_doc(peak=12.0), str(tmp_path))
    assert [os.path.basename(p) for p in written] == ["speed.png", "memory.png"]
    heights = [h for _, hs in bars[:3] for h in hs]  # the speed plot: floor, PEFT, fastpeft
    assert sorted(heights) == [1.0, 2.0, 3.0, 3.5, 4.0]  # absolute ms, the missing value drawn as no bar
    assert texts.count("missing") == 2  # one per plot
    (tmp_path / "cpu").mkdir()
    assert [os.path.basename(p) for p in write_plots(_fake_doc(peak=None), str(tmp_path / "cpu"))] == ["speed.png"]


def test_default_run_states_its_expected_length(capsys, monkeypatch):
    from fastpeft.bench import cli

    monkeypatch.setattr("fastpeft.bench.suite.run_suite", lambda s: (_ for _ in ()).throw(SystemExit(9)))
    with pytest.raises(SystemExit):
        cli.main(["--device", "cpu", "--methods", "lora"])
    err = capsys.readouterr().err
    assert "expected to take about" in err and "--quick" in err
    seconds, cases, columns = cli.estimate_seconds(cli.settings_from_args(
        cli.build_parser().parse_args(["--device", "cpu", "--quick"]), cli.build_parser()), True)
    assert 10 < seconds < 600 and cases > 4 and columns == 3


def test_table_first_line_says_cpu_reference(capsys):
    code = bench_main([*TINY, "--methods", "ia3", "--layers-only"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[0].startswith("NOTE: no GPU here") and "CPU reference figures" in out.splitlines()[0]
    assert "PEFT" in out and "fastpeft" in out and "frozen" in out


# ----------------------------------------------------------------------------- compare
def _doc(cases):
    return {"schema": "fastpeft-bench/1", "device": {"name": "dev"}, "settings": {"preset": "tiny", "dtype": "fp32"},
            "cases": [{"id": i, "median_ms": ms, "peak_mib": mib, "status": "ok"} for i, ms, mib in cases]}


def test_compare_reports_ratios_and_one_sided_cases(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_doc([("e2e/lora/fastpeft", 100.0, 1000.0), ("e2e/ia3/fastpeft", 50.0, 500.0)])))
    b.write_text(json.dumps(_doc([("e2e/lora/fastpeft", 80.0, 900.0), ("e2e/prefix/fastpeft", 10.0, 100.0)])))
    assert fastpeft_main(["bench", "--compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    lora = next(line for line in out.splitlines() if line.startswith("e2e/lora/fastpeft"))
    assert "100.0" in lora and "80.0" in lora and "0.80x" in lora and "0.90x" in lora
    assert "only in " + str(a) in next(line for line in out.splitlines() if line.startswith("e2e/ia3/"))
    assert "only in " + str(b) in next(line for line in out.splitlines() if line.startswith("e2e/prefix/"))


def test_compare_two_real_runs(tiny_run, tmp_path, capsys):
    _, doc, out = tiny_run
    doc2 = json.loads(json.dumps(doc))
    doc2["cases"] = doc2["cases"][1:]
    path2 = tmp_path / "b.json"
    path2.write_text(json.dumps(doc2))
    assert bench_main(["--compare", str(out / "results.json"), str(path2)]) == 0
    text = capsys.readouterr().out
    assert doc["cases"][0]["id"] in text and "only in" in text


# ----------------------------------------------------------------------------- degraded environments
def test_peft_missing_shows_fastpeft_alone(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    code = bench_main([*TINY, "--methods", "lora", "--layers-only", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0
    assert "pip install peft" in captured.out
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["peft_available"] is False and doc["versions"]["peft"] is None
    assert {c["provider"] for c in doc["cases"]} == {"floor", "fastpeft"}
    fast = [c for c in doc["cases"] if c["provider"] == "fastpeft"]
    assert all(c["check"]["status"] == "pass" and "torch reference" in c["check"]["detail"] for c in fast)
    assert all(c["vs_peft"] is None for c in doc["cases"])


def test_compile_failure_shows_error_and_run_continues(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("inductor needs a C++ compiler\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    argv = ["--preset", "tiny", "--device", "cpu", "--methods", "prompt", "--layers-only", "--warmup", "1",
            "--repeats", "1", "--out", str(tmp_path)]
    assert bench_main(argv) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    compiled = [c for c in doc["cases"] if c["provider"] in ("compile", "fastpeft_compile")]
    assert {c["provider"] for c in compiled} == {"compile", "fastpeft_compile"}
    assert all(c["status"] == "error" for c in compiled)
    assert compiled[0]["error"] == "RuntimeError: inductor needs a C++ compiler"
    assert all(c["status"] == "ok" for c in doc["cases"] if c not in compiled)


def test_method_not_implemented_is_not_available(monkeypatch, tmp_path):
    import fastpeft.ops

    def missing(*args, **kwargs):
        raise NotImplementedError("soft prompts are being written")

    monkeypatch.setattr(fastpeft.ops, "soft_prompt_embed", missing)
    assert bench_main([*TINY, "--methods", "prompt", "--layers-only", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    fast = next(c for c in doc["cases"] if c["provider"] == "fastpeft")
    assert fast["status"] == "not available" and "being written" in fast["error"]
    assert "not available" in (tmp_path / "results.md").read_text()


# ----------------------------------------------------------------------------- the correctness gate
def test_wrong_fastpeft_result_fails_the_run(monkeypatch, tmp_path, capsys):
    import fastpeft.ops.lora as lora_op

    # the CPU paths the checks (dropout off) run: scaling 1 and any other scaling
    for name in ("_native_forward", "_cpu_apply"):
        def wrong(*args, right=getattr(lora_op, name), **kwargs):
            return right(*args, **kwargs) * 1.5  # fast but wrong

        monkeypatch.setattr(lora_op, name, wrong)
    code = bench_main([*TINY, "--methods", "lora", "--layers-only", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 1
    assert "FAILED" in captured.err and "FAIL" in captured.out and "differs from PEFT" in captured.out
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["ok"] is False and doc["failures"]
    fast = [c for c in doc["cases"] if c["provider"] == "fastpeft"]
    assert all(c["status"] == "fail" and c["check"]["status"] == "fail" for c in fast)
    assert all(c["median_ms"] is None for c in fast)  # a wrong result is never timed


def test_tiny_run_reports_saved_for_backward_memory(tiny_run):
    _, doc, out = tiny_run
    rows = {r["case"]: r for r in doc["memory"]}
    for case in ("lora", "lora_dropout", "ia3", "prefix", "prompt", "ptuning"):
        r = rows[case]
        assert r["fastpeft"] > 0 and r["peft"] > 0 and r["floor"] > 0
    text = "\n".join(p.read_text() for p in out.iterdir() if p.suffix in (".txt", ".md"))
    assert "saved for backward" in text and "LoRA r16 all-linear, dropout 0.05" in text


def test_mixed_adapter_rows_run_checked_beside_peft(tmp_path):
    """`--methods multi`: prefill and decode with 1 and 8 adapters mixed (quick), fastpeft checked against PEFT
    and timed beside the bare model; no torch.compile columns for these cases."""
    assert bench_main([*TINY, "--quick", "--methods", "multi", "--e2e-only", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    multi = [c for c in doc["cases"] if c["kind"] == "multi"]
    assert {c["case"] for c in multi} == {"multi/prefill 1", "multi/prefill 8", "multi/decode 1", "multi/decode 8"}
    assert {c["provider"] for c in multi} == {"floor", "peft", "fastpeft"}
    ours = [c for c in multi if c["provider"] == "fastpeft"]
    assert all(c["check"]["status"] == "pass" and c["median_ms"] > 0 and c["vs_peft"] for c in ours)
    mixed = next(c for c in ours if c["case"] == "multi/prefill 8")
    assert mixed["backend"]["grouped_lora"] == "torch"  # the grouped path really ran
    assert "mixed-adapter inference" in (tmp_path / "results.md").read_text()


def test_interleaved_cpu_timer_gives_each_function_its_own_median():
    import time

    from fastpeft.bench.timing import measure_interleaved_cpu

    def busy(seconds):
        def fn():
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                pass
        return fn

    a, b = measure_interleaved_cpu([busy(0.0004), busy(0.0012)], warmup=1, repeats=5, min_run_time=0.05)
    assert a.repeats >= 5 and b.repeats == a.repeats
    assert 0.35 < a.median_ms < 0.8 and 2.0 < b.median_ms / a.median_ms < 4.0, (a, b)
    assert a.q20_ms <= a.median_ms <= a.q80_ms


def test_qlora_rows_beside_peft_and_bitsandbytes(tmp_path):
    """`--methods qlora`: a layer and a training-step row, LoRA on an NF4 base beside PEFT on bitsandbytes'
    Linear4bit; fastpeft's outputs and gradients checked against PEFT's (the same NF4 codes) before timing."""
    pytest.importorskip("bitsandbytes")
    assert bench_main([*TINY, "--methods", "qlora", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    cases = {(c["case"], c["provider"]): c for c in doc["cases"]}
    for case in ("layer/qlora/M64 64->64", "e2e/qlora"):
        fast, ref = cases[(case, "fastpeft")], cases[(case, "peft")]
        assert ref["status"] == "ok" and ref["median_ms"] > 0
        assert fast["status"] == "ok" and fast["check"]["status"] == "pass" and fast["median_ms"] > 0
        assert fast["backend"] == {"qlora_linear": "torch"}
    assert "qlora/M64 64->64" in (tmp_path / "results.md").read_text()
