"""AdapterHub (`adapters`) bottleneck-adapter files, both ways.

The fixtures in tests/fixtures/adapterhub were written by `adapters` 1.3 (transformers 4.57) in a side
environment with tools/make_adapterhub_fixtures.py (its docstring says how to rerun it): a tiny Llama and a
tiny BERT, Pfeiffer (SeqBnConfig), Houlsby (DoubleSeqBnConfig) and Pfeiffer with residual_before_ln=False,
random non-zero adapter weights, and the fp32 logits `adapters` computed.  The reverse direction (files
fastpeft writes, read by `adapters`) runs live when `adapters` imports here, or when
FASTPEFT_ADAPTERHUB_PYTHON names the side environment's python; otherwise it is skipped.
"""

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import fastpeft
from fastpeft import adapterhub
from fastpeft.nn.bottleneck import BottleneckWrapper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "adapterhub")
SCRIPT = os.path.join(ROOT, "tools", "make_adapterhub_fixtures.py")
sys.path.insert(0, os.path.join(ROOT, "tools"))
import make_adapterhub_fixtures as mk  # noqa: E402

CASES = sorted(d for d in os.listdir(FIXTURES) if os.path.isfile(os.path.join(FIXTURES, d, "case.json")))
TOL = 1e-5


def _case(case):
    case_dir = os.path.join(FIXTURES, case)
    with open(os.path.join(case_dir, "case.json")) as fh:
        meta = json.load(fh)
    base_dir = os.path.normpath(os.path.join(case_dir, meta["base"]))
    return meta, load_file(os.path.join(case_dir, "expected.safetensors")), base_dir, os.path.join(case_dir, "adapter")


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_fixtures_cover_both_families_and_methods():
    assert {"llama-pfeiffer", "llama-houlsby", "bert-pfeiffer", "bert-houlsby"} <= set(CASES)
    for case in CASES:
        with open(os.path.join(FIXTURES, case, "adapter", "adapter_config.json")) as fh:
            assert json.load(fh)["version"].startswith("adapters.")  # written by AdapterHub's library


@pytest.mark.parametrize("case", CASES)
def test_adapterhub_file_loads_with_its_logits(case):
    meta, exp, base_dir, adapter_dir = _case(case)
    base = mk.load_base(meta["family"], base_dir)
    ids = exp["input_ids"]
    assert _err(mk.logits(base, ids), exp["base_logits"]) <= TOL  # the same base model under transformers 5
    model = fastpeft.load_adapterhub_adapter(copy.deepcopy(base), adapter_dir)
    out = mk.logits(model, ids)
    assert _err(out, exp["logits"]) <= TOL, case
    assert _err(out, exp["base_logits"]) > 1e-2  # the adapter does change the output: the check can fail
    assert model.peft_config["default"].inference_mode  # loaded frozen, as from_pretrained
    assert not any(p.requires_grad for p in model.parameters())


def test_config_mapping_and_residual_before_ln_matters():
    cfgs = {case: adapterhub.bottleneck_config_from_adapterhub(adapterhub.read_adapterhub_config(_case(case)[3]))
            for case in CASES}
    p, h, f = cfgs["llama-pfeiffer"], cfgs["llama-houlsby"], cfgs["llama-pfeiffer-rbl-false"]
    assert (p.original_ln_before, p.mh_adapter, p.output_adapter, p.residual_before_ln) == (True, False, True, True)
    assert (h.original_ln_before, h.mh_adapter, h.output_adapter) == (False, True, True)
    assert h.non_linearity == "swish" and p.non_linearity == "relu" and f.residual_before_ln is False
    # the rbl=False file read as rbl=True (and the Pfeiffer one as Houlsby's placement) misses the logits
    for case, flip in (("llama-pfeiffer-rbl-false", "residual_before_ln"), ("bert-pfeiffer-rbl-false",
                       "residual_before_ln"), ("bert-pfeiffer", "original_ln_before")):
        meta, exp, base_dir, adapter_dir = _case(case)
        model = fastpeft.load_adapterhub_adapter(mk.load_base(meta["family"], base_dir), adapter_dir)
        for m in model.modules():
            if isinstance(m, BottleneckWrapper):
                a = m.bottleneck_adapters["default"]
                setattr(a, flip, not getattr(a, flip))
        assert _err(mk.logits(model, exp["input_ids"]), exp["logits"]) > 1e-3, (case, flip)


def _saved(directory):
    with open(os.path.join(directory, "adapter_config.json")) as fh:
        cfg = json.load(fh)
    if os.path.isfile(os.path.join(directory, "adapter.safetensors")):
        return cfg, load_file(os.path.join(directory, "adapter.safetensors"))
    return cfg, torch.load(os.path.join(directory, "pytorch_adapter.bin"), weights_only=True)


@pytest.mark.parametrize("case", CASES)
def test_fastpeft_writes_adapterhub_layout(case, tmp_path):
    """Re-saved by fastpeft: the same config (every BnConfig key), tensor names, shapes and values as the
    file `adapters` wrote; and it loads back with the same logits."""
    meta, exp, base_dir, adapter_dir = _case(case)
    base = mk.load_base(meta["family"], base_dir)
    model = fastpeft.load_adapterhub_adapter(copy.deepcopy(base), adapter_dir, adapter_name="mine")
    out = tmp_path / "out"
    fastpeft.save_adapterhub_adapter(model, out, adapterhub_name=meta["adapter_name"])
    assert sorted(os.listdir(out)) == ["adapter_config.json", "pytorch_adapter.bin"]
    theirs_cfg, theirs = _saved(adapter_dir)
    ours_cfg, ours = _saved(out)
    assert set(ours_cfg) == set(theirs_cfg)
    for key in ("hidden_size", "model_class", "model_type", "name"):
        assert ours_cfg[key] == theirs_cfg[key], key
    assert ours_cfg["config"] == theirs_cfg["config"]
    assert list(ours) == list(theirs)  # same names, same order
    for key in theirs:
        assert ours[key].shape == theirs[key].shape and ours[key].dtype == theirs[key].dtype
        torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0)
    again = fastpeft.load_adapterhub_adapter(copy.deepcopy(base), out)
    torch.testing.assert_close(mk.logits(again, exp["input_ids"]), mk.logits(model, exp["input_ids"]),
                               atol=0, rtol=0)
    safe = tmp_path / "safe"
    fastpeft.save_adapterhub_adapter(model, safe, adapterhub_name=meta["adapter_name"], use_safetensors=True)
    assert sorted(os.listdir(safe)) == ["adapter.safetensors", "adapter_config.json"]
    again = fastpeft.load_adapterhub_adapter(copy.deepcopy(base), safe)
    torch.testing.assert_close(mk.logits(again, exp["input_ids"]), exp["logits"], atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_fastpeft_trained_adapter_round_trip(family, tmp_path):
    """An adapter made and trained in fastpeft, saved in AdapterHub's format, loads back exactly; also as a
    second adapter of an existing PeftModel."""
    base = mk.load_base(family, os.path.join(FIXTURES, f"base-{family}"))
    ids = mk.input_ids(seed=7)
    cfg = fastpeft.BottleneckConfig(reduction_factor=4, original_ln_before=True, residual_before_ln=False,
                                    init_weights="random", mh_adapter=True)
    model = fastpeft.get_peft_model(copy.deepcopy(base), cfg).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    want = mk.logits(model, ids)
    assert _err(want, mk.logits(base, ids)) > 1e-3
    fastpeft.save_adapterhub_adapter(model, tmp_path / "a")
    cfg_saved, _ = _saved(tmp_path / "a")
    assert cfg_saved["config"]["residual_before_ln"] is False and cfg_saved["config"]["original_ln_before"] is True
    assert cfg_saved["config"]["reduction_factor"] == 4 and cfg_saved["name"] == "default"
    loaded = fastpeft.load_adapterhub_adapter(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(mk.logits(loaded, ids), want, atol=0, rtol=0)
    # into a PeftModel that already has a (different) bottleneck adapter
    other = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.BottleneckConfig(init_weights="random"))
    assert fastpeft.load_adapterhub_adapter(other, tmp_path / "a", adapter_name="ah") is other
    other.set_adapter("ah")
    torch.testing.assert_close(mk.logits(other, ids), want, atol=0, rtol=0)


def _adapters_importable():
    try:
        import adapters  # noqa: F401
        return True
    except Exception:
        return False


def test_live_round_trip_with_adapters(tmp_path):
    """fastpeft -> files -> `adapters` (and the fixtures -> `adapters`) with logits within 1e-5."""
    side = os.environ.get("FASTPEFT_ADAPTERHUB_PYTHON")
    live = _adapters_importable()
    if not live and not side:
        pytest.skip("`adapters` (needs transformers 4.57) does not import beside fastpeft's transformers 5; set "
                    "FASTPEFT_ADAPTERHUB_PYTHON to a side environment's python to run this check "
                    "(see tools/make_adapterhub_fixtures.py)")
    mk.export_fastpeft(str(tmp_path), FIXTURES)
    # a negative control: one case with a perturbed weight must fail the check
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "bert-pfeiffer", bad / "bert-pfeiffer")
    shutil.copytree(tmp_path / "base-bert", bad / "base-bert")
    weights = torch.load(bad / "bert-pfeiffer" / "adapter" / "pytorch_adapter.bin", weights_only=True)
    key = next(k for k in weights if k.endswith("adapter_up.weight"))
    weights[key] = weights[key] + 0.05 * torch.randn(weights[key].shape)
    torch.save(weights, bad / "bert-pfeiffer" / "adapter" / "pytorch_adapter.bin")
    if live:
        assert mk.check(str(tmp_path)) == 0
        assert mk.check(FIXTURES) == 0
        assert mk.check(str(bad)) == 1
        return
    for directory, rc in ((tmp_path, 0), (FIXTURES, 0), (bad, 1)):
        run = subprocess.run([side, SCRIPT, "--check", str(directory)], capture_output=True, text=True, timeout=600)
        assert run.returncode == rc, run.stdout + run.stderr
        if rc == 0:
            assert run.stdout.count("ok  ") == len(CASES) and "FAIL" not in run.stdout, run.stdout


# ----------------------------------------------------------------------------- errors
def _copy_case(tmp_path, case="llama-pfeiffer"):
    meta, exp, base_dir, adapter_dir = _case(case)
    dst = tmp_path / "adapter"
    shutil.copytree(adapter_dir, dst)
    return meta, base_dir, dst


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    data = json.loads(path.read_text())
    data["config"].update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("field,value,match", [
    ("phm_layer", True, "phm_layer"), ("is_parallel", True, "is_parallel"), ("ln_before", True, "ln_before"),
    ("ln_after", True, "ln_after"), ("use_gating", True, "use_gating"), ("scaling", 2.0, "scaling"),
    ("scaling", "learned", "scaling"), ("leave_out", [0], "leave_out"), ("non_linearity", "tanh", "non_linearity"),
    ("residual_before_ln", "post_add", "post_add"), ("original_ln_after", False, "original_ln_after"),
    ("inv_adapter", "nice", "inv_adapter"), ("architecture", "lora", "'lora' adapter"),
])
def test_unsupported_adapterhub_configs_are_refused(tmp_path, field, value, match):
    meta, base_dir, adapter_dir = _copy_case(tmp_path)
    _edit_config(adapter_dir, **{field: value})
    base = mk.load_base(meta["family"], base_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        fastpeft.load_adapterhub_adapter(base, adapter_dir)
    assert not any(isinstance(m, BottleneckWrapper) for m in base.modules())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


class _NotATensor:
    """Any pickled object but tensors: torch.load(weights_only=True) refuses to build it."""


def test_bad_weight_files_are_refused(tmp_path):
    meta, base_dir, adapter_dir = _copy_case(tmp_path)
    base = mk.load_base(meta["family"], base_dir)
    weights = torch.load(adapter_dir / "pytorch_adapter.bin", weights_only=True)
    missing = {k: v for k, v in weights.items() if "layers.1." not in k}
    torch.save(missing, adapter_dir / "pytorch_adapter.bin")
    with pytest.raises(ValueError, match="missing 4 tensor"):
        fastpeft.load_adapterhub_adapter(base, adapter_dir)
    assert not any(isinstance(m, BottleneckWrapper) for m in base.modules())  # the model is given back as it came
    torch.save({**weights, "model.layers.0.output_adapters.adapters.pfeiffer_llama.gate.weight": torch.zeros(1, 32)},
               adapter_dir / "pytorch_adapter.bin")
    with pytest.raises(ValueError, match="gate.weight"):
        fastpeft.load_adapterhub_adapter(base, adapter_dir)
    odd = dict(weights)
    key = "model.layers.1.output_adapters.adapters.pfeiffer_llama.adapter_down.0.weight"
    odd[key] = torch.zeros(4, 32)
    torch.save(odd, adapter_dir / "pytorch_adapter.bin")
    with pytest.raises(ValueError, match="per-layer bottleneck sizes"):
        fastpeft.load_adapterhub_adapter(base, adapter_dir)

    torch.save({"x": _NotATensor()}, adapter_dir / "pytorch_adapter.bin")  # weights_only refuses to unpickle it
    with pytest.raises(ValueError, match="not a readable tensor file"):
        fastpeft.load_adapterhub_adapter(base, adapter_dir)
    os.remove(adapter_dir / "pytorch_adapter.bin")
    with pytest.raises(FileNotFoundError, match="pytorch_adapter.bin"):
        fastpeft.load_adapterhub_adapter(base, adapter_dir)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fastpeft.load_adapterhub_adapter(base, tmp_path)


def test_unsupported_models_and_adapters_for_saving(tmp_path):
    from tests.models import tiny_gpt2, tiny_llama

    meta, base_dir, adapter_dir = _copy_case(tmp_path)
    with pytest.raises(ValueError, match="model types"):
        fastpeft.load_adapterhub_adapter(tiny_gpt2(seed=0), adapter_dir)
    with pytest.raises(ValueError, match="hidden size"):
        fastpeft.load_adapterhub_adapter(tiny_llama(seed=0, hidden_size=64), adapter_dir)
    lora = fastpeft.get_peft_model(tiny_llama(seed=0), fastpeft.LoraConfig(r=2))
    with pytest.raises(ValueError, match="bottleneck"):
        fastpeft.save_adapterhub_adapter(lora, tmp_path / "x")
    custom = fastpeft.get_peft_model(tiny_llama(seed=0), fastpeft.BottleneckConfig(target_modules=["o_proj"]))
    with pytest.raises(ValueError, match="AdapterHub"):
        fastpeft.save_adapterhub_adapter(custom, tmp_path / "y")
    with pytest.raises(TypeError, match="PeftModel"):
        fastpeft.save_adapterhub_adapter(tiny_llama(seed=0), tmp_path / "z")
