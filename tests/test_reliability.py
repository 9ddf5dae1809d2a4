"""Nothing silently wrong, nothing lost, nothing executed (issue 16): configs, mixed-batch arguments,
merging, wrapping twice, saving under a kill, adapter names as paths, unpickling.  Where HF PEFT is
silent or unsafe on the same input, the test says so (and checks it, when that is cheap)."""

import ast
import json
import math
import os
import pathlib
import shutil
import warnings

import peft
import pytest
import torch

import fastpeft
from fastpeft import io
from fastpeft.nn import LoraLinear, ModulesToSaveWrapper
from fastpeft.nn._base import AdapterLayer
from tests.models import tiny_llama, tiny_llama_cls
from tests.peft_parity import build_pair
from tests.utils import assert_close

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _lora(**kw):
    return fastpeft.LoraConfig(**{"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **kw})


def _write_config(folder, **changes):
    data = {**_lora().to_dict(), **changes}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(data))
    return folder


def _adapter_weights(pm, name="default"):
    return {k: v.detach().clone() for k, v in pm.adapter_state_dict(name).items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("field, value, match", [
    ("lora_alpha", "16", r"LoraConfig\.lora_alpha must be a positive finite number, got str '16'"),
    ("lora_alpha", -16, r"lora_alpha must be a positive finite number, got int -16"),
    ("lora_alpha", math.nan, r"lora_alpha must be a positive finite number, got float nan"),
    ("r", "8", r"LoraConfig\.r must be a positive integer, got str '8'"),
    ("r", -4, r"LoraConfig\.r must be a positive integer, got int -4"),
    ("r", True, r"LoraConfig\.r must be a positive integer, got bool True"),
    ("lora_dropout", "0.1", r"lora_dropout must be a number in \[0, 1\), got str"),
    ("fan_in_fan_out", "false", r"fan_in_fan_out must be true or false, got str 'false'"),
    ("inference_mode", 1, r"inference_mode must be true or false, got int 1"),
    ("target_modules", ["q_proj", 3], r"target_modules must be a string or a list of strings"),
    ("rank_pattern", {"q_proj": 0}, r"rank_pattern\['q_proj'\] must be a positive integer rank, got int 0"),
    ("alpha_pattern", {"q_proj": "2"}, r"alpha_pattern\['q_proj'\] must be a positive finite alpha, got str"),
    ("modules_to_save", "lm_head", r"modules_to_save must be a list of strings"),
    ("bias", "some", r"bias must be one of 'none', 'all', 'lora_only'"),
])
def test_wrongly_typed_or_ranged_config_value_in_a_file_is_named(tmp_path, field, value, match):
    # was: "lora_alpha": "16" loaded, then an unrelated TypeError deep in layer creation
    _write_config(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=match) as err:
        fastpeft.PeftConfig.from_pretrained(tmp_path)
    assert "adapter_config.json" in str(err.value)  # the file is named too
    with pytest.raises(ValueError, match=match):
        fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path)


@pytest.mark.parametrize("cls, kw, match", [
    (fastpeft.PrefixTuningConfig, dict(num_virtual_tokens=4, num_layers="2"), r"num_layers must be a positive integer"),
    (fastpeft.PrefixTuningConfig, dict(num_virtual_tokens=4, prefix_projection="yes"), r"prefix_projection must be"),
    (fastpeft.PromptEncoderConfig, dict(num_virtual_tokens=4, encoder_dropout=1.5), r"encoder_dropout must be"),
    (fastpeft.PromptEncoderConfig, dict(num_virtual_tokens=4, encoder_num_layers=0), r"encoder_num_layers must be"),
    (fastpeft.PromptTuningConfig, dict(num_virtual_tokens=4.0), r"num_virtual_tokens must be a positive integer"),
    (fastpeft.PromptTuningConfig, dict(num_virtual_tokens=4, prompt_tuning_init="text"), r"prompt_tuning_init must"),
    (fastpeft.IA3Config, dict(target_modules=["k_proj"], feedforward_modules=[], init_ia3_weights=0),
     r"init_ia3_weights must be true or false"),
])
def test_other_methods_fields_are_typed_too(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(**kw)


@pytest.mark.parametrize("task, hint", [("SEQ_CLASSIFICATION", "SEQ_CLS"), ("CASUAL_LM", "CAUSAL_LM"),
                                        ("causal_lm", "CAUSAL_LM"), ("LM", None)])
def test_task_type_typos_are_refused_naming_the_valid_values(tmp_path, task, hint):
    # was accepted: the SEQ_CLS head was then neither trained nor saved.  PEFT refuses these too.
    match = r"task_type must be one of CAUSAL_LM, SEQ_CLS, FEATURE_EXTRACTION"
    with pytest.raises(ValueError, match=match) as err:
        fastpeft.LoraConfig(task_type=task)
    if hint:
        assert f"did you mean '{hint}'" in str(err.value)
    _write_config(tmp_path, task_type=task)
    with pytest.raises(ValueError, match=match):
        fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path)
    with pytest.raises(ValueError, match="Invalid task type"):
        peft.LoraConfig(task_type=task)


def test_peft_task_types_fastpeft_has_no_head_for_are_refused():
    for task in ("TOKEN_CLS", "QUESTION_ANS", "SEQ_2_SEQ_LM"):
        with pytest.raises(NotImplementedError, match=f"task_type '{task}' is a PEFT task type fastpeft does not"):
            fastpeft.LoraConfig(task_type=task)
    assert fastpeft.LoraConfig(task_type=fastpeft.TaskType.SEQ_CLS).task_type == "SEQ_CLS"


def test_unknown_fields_of_a_newer_peft_warn_and_are_kept(tmp_path):
    pm = fastpeft.get_peft_model(tiny_llama(seed=0), _lora())
    pm.save_pretrained(tmp_path / "a")
    data = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    data["lora_alpah"] = 3  # a typo gets a did-you-mean
    data["some_new_peft_option"] = {"x": 1}
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"'lora_alpah' \(did you mean 'lora_alpha'\?\), 'some_new_peft_option'"):
        loaded = fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")
    again = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert again["some_new_peft_option"] == {"x": 1} and again["lora_alpah"] == 3


# ---------------------------------------------------------------------------------------------- mixed batches
@pytest.fixture
def two_adapters():
    pm = fastpeft.get_peft_model(tiny_llama(seed=0), _lora())
    pm.add_adapter("other", _lora(r=2))
    return pm.eval()


def test_adapter_names_must_have_one_entry_per_row(two_adapters):
    ids = torch.randint(0, 97, (4, 5))
    # was: ["default", "other"] silently repeated over the 4 rows as default, default, other, other
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 4 rows"):
        two_adapters(input_ids=ids, adapter_names=["default", "other"])
    with pytest.raises(ValueError, match="adapter_names has 5 entries but the batch has 4 rows"):
        two_adapters(input_ids=ids, adapter_names=["default"] * 5)
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 4 rows"):
        two_adapters.generate(input_ids=ids, adapter_names=["default", "other"], max_new_tokens=1, pad_token_id=0)


def test_adapter_names_empty_or_not_a_list_is_refused(two_adapters):
    ids = torch.randint(0, 97, (2, 5))
    with pytest.raises(ValueError, match="adapter_names is empty"):  # was: ZeroDivisionError
        two_adapters(input_ids=ids, adapter_names=[])
    with pytest.raises(TypeError, match="adapter_names must be a list"):  # a string would be read letter by letter
        two_adapters(input_ids=ids, adapter_names="de")
    with pytest.raises(TypeError, match="must hold strings"):
        two_adapters(input_ids=ids, adapter_names=[0, 1])
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        two_adapters(input_ids=ids, adapter_names=["default", "nope"])


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_adapter_names_on_a_prompt_learning_model_is_refused(kind):
    cls = fastpeft.PrefixTuningConfig if kind == "prefix" else fastpeft.PromptTuningConfig
    pm = fastpeft.get_peft_model(tiny_llama(seed=0), cls(task_type="CAUSAL_LM", num_virtual_tokens=3))
    ids = torch.randint(0, 97, (2, 5))
    with pytest.raises(ValueError, match="adapter_names .* does not apply .* pass prompt_index"):
        pm(input_ids=ids, adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="pass prompt_index"):
        pm.generate(input_ids=ids, adapter_names=["default", "default"], max_new_tokens=1, pad_token_id=0)
    # PEFT drops the argument without a word: every row gets the active adapter
    theirs = peft.get_peft_model(tiny_llama(seed=0),
                                 peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    theirs(input_ids=ids, adapter_names=["x", "y"])


def test_adapter_names_on_ia3_is_refused():
    pm = fastpeft.get_peft_model(tiny_llama(seed=0),
                                 fastpeft.IA3Config(target_modules=["v_proj"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="supported for LoRA only"):  # PEFT ignores it silently for IA3
        pm(input_ids=torch.randint(0, 97, (2, 5)), adapter_names=["default", "default"])


def test_mixed_batch_with_adapters_on_different_modules_runs_as_peft():
    # was refused ("unknown adapter ... in adapter_names" from the first layer lacking "other")
    cfg_a = _lora(target_modules=["q_proj", "v_proj"])
    ours, theirs = build_pair(tiny_llama, cfg_a)
    ours.add_adapter("other", _lora(r=2, target_modules=["k_proj", "down_proj"]))
    theirs.add_adapter("other", peft.LoraConfig(r=2, target_modules=["k_proj", "down_proj"], init_lora_weights=False))
    ours.load_state_dict(theirs.state_dict())
    ours.eval(), theirs.eval()
    ids = torch.randint(0, 97, (4, 6))
    names = ["default", "other", "__base__", "other"]
    with torch.no_grad():
        mixed = ours(input_ids=ids, adapter_names=names).logits
        assert_close(mixed, theirs(input_ids=ids, adapter_names=names).logits, torch.float32)
        ours.set_adapter("other")
        assert_close(mixed[1:2], ours(input_ids=ids[1:2]).logits, torch.float32, what="row of 'other' alone")


def test_mixed_batch_chooses_each_rows_modules_to_save_copy_as_peft():
    # a SEQ_CLS model: the classifier head is a modules_to_save copy per adapter; was: the active one for all rows
    cfg = fastpeft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj"], init_lora_weights=False)
    ours, theirs = build_pair(tiny_llama_cls, cfg)
    ours.add_adapter("other", fastpeft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["v_proj"],
                                                  init_lora_weights=False))
    theirs.add_adapter("other", peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["v_proj"],
                                                init_lora_weights=False))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "modules_to_save.other" in name:
                p.add_(torch.randn_like(p))
    ours.load_state_dict(theirs.state_dict())
    ours.eval(), theirs.eval()
    ids = torch.randint(1, 97, (3, 6))
    names = ["other", "default", "__base__"]
    with torch.no_grad():
        assert_close(ours(input_ids=ids, adapter_names=names).logits,
                     theirs(input_ids=ids, adapter_names=names).logits, torch.float32)


# ---------------------------------------------------------------------------------------------- prefix depth
def test_prefix_adapter_for_another_depth_is_refused(tmp_path):
    cfg = fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    fastpeft.get_peft_model(tiny_llama(seed=0, num_hidden_layers=3), cfg).save_pretrained(tmp_path)
    # was: loaded and ran on a 2-layer model (the prefix of layer 3 was never used)
    with pytest.raises(ValueError, match=r"num_layers=3.* LlamaForCausalLM has 2 layers"):
        fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path)
    with pytest.raises(ValueError, match=r"num_layers=3"):
        fastpeft.get_peft_model(tiny_llama(seed=0), fastpeft.PrefixTuningConfig(num_virtual_tokens=3, num_layers=3))
    fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0, num_hidden_layers=3), tmp_path)  # the right depth loads


@pytest.mark.parametrize("cls", [fastpeft.PromptTuningConfig, fastpeft.PromptEncoderConfig])
def test_soft_prompt_for_another_hidden_size_is_refused_at_load(tmp_path, cls):
    wide = tiny_llama(seed=0, hidden_size=48, intermediate_size=64)
    fastpeft.get_peft_model(wide, cls(task_type="CAUSAL_LM", num_virtual_tokens=3)).save_pretrained(tmp_path)
    # was: loaded, then the first forward failed with a message naming neither the file nor the cause
    with pytest.raises(ValueError, match=r"made for a model with token_dim=48.* has hidden size 32"):
        fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path)


# ---------------------------------------------------------------------------------------------- merging
def test_merge_with_an_unknown_adapter_name_is_named():
    pm = fastpeft.get_peft_model(tiny_llama(seed=0), _lora())
    # was (and is in PEFT): the plain base model returned, nothing merged, no error
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['defualt'\]"):
        pm.merge_and_unload(adapter_names=["defualt"])
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        pm.merge_adapter(adapter_names=["nope"])
    with pytest.raises(TypeError, match="list of adapter names"):
        pm.merge_adapter(adapter_names="default")
    assert any(isinstance(m, LoraLinear) for m in pm.modules())  # nothing unwrapped by the refusals
    theirs = peft.get_peft_model(tiny_llama(seed=0), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert type(theirs.merge_and_unload(adapter_names=["defualt"])).__name__ == "LlamaForCausalLM"


def _poison_last_layer(pm, kind):
    layers = [(n, m) for n, m in pm.named_modules() if isinstance(m, AdapterLayer)]
    name, layer = layers[-1]
    with torch.no_grad():
        if kind == "lora":
            layer.lora_B["default"].weight.fill_(math.inf)
        else:
            layer.ia3_l["default"].fill_(math.inf)
    return name.split("base_model.model.", 1)[-1]


@pytest.mark.parametrize("kind", ["lora", "ia3"])
@pytest.mark.parametrize("how", ["merge_and_unload", "merge_adapter"])
def test_safe_merge_that_meets_non_finite_weights_merges_no_layer(kind, how):
    cfg = _lora() if kind == "lora" else fastpeft.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[])
    pm = fastpeft.get_peft_model(tiny_llama(seed=0), cfg)
    bad = _poison_last_layer(pm, kind)
    before = {n: p.detach().clone() for n, p in pm.get_base_model().named_parameters() if "base_layer" in n}
    # was: layers before the bad one stayed merged (and, from merge_and_unload, unwrapped) while the error said "undone"
    with pytest.raises(ValueError, match=rf"non-finite weights in 1 layer\(s\): \['{bad}'\]; no layer was merged"):
        getattr(pm, how)(safe_merge=True)
    after = {n: p.detach() for n, p in pm.get_base_model().named_parameters() if "base_layer" in n}
    assert _same(before, after)
    layers = [m for m in pm.modules() if isinstance(m, AdapterLayer)]
    assert len(layers) == 4 and not any(m.merged for m in layers)


def test_safe_merge_with_finite_weights_merges_all():
    pm = fastpeft.get_peft_model(tiny_llama(seed=0), _lora())
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        merged = pm.merge_and_unload(safe_merge=True)
        assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
        assert_close(merged(input_ids=ids).logits, want, torch.float32)


# ---------------------------------------------------------------------------------------------- nothing lost
def test_get_peft_model_on_a_model_that_carries_an_adapter_refuses():
    base = tiny_llama(seed=0)
    pm = fastpeft.get_peft_model(base, _lora())
    trained = _adapter_weights(pm)
    # was: the "default" adapter re-initialised in place without a word (PEFT warns, then does the same)
    for cfg, name in [(_lora(), "default"), (_lora(), "second"), (fastpeft.IA3Config(target_modules=["k_proj"],
                                                                                      feedforward_modules=[]), "x")]:
        with pytest.raises(ValueError, match="already carries fastpeft adapters"):
            fastpeft.get_peft_model(base, cfg, adapter_name=name)
    assert _same(trained, _adapter_weights(pm))
    pm.add_adapter("second", _lora())  # the way to add one
    with pytest.raises(ValueError, match="already exists"):
        pm.add_adapter("second", _lora())
    base2 = tiny_llama(seed=0)
    theirs = peft.get_peft_model(base2, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    before = theirs.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.clone()
    with pytest.warns(UserWarning, match="second time"):
        peft.get_peft_model(base2, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert not torch.equal(before, base2.model.layers[0].self_attn.q_proj.lora_B["default"].weight)  # PEFT: lost


def test_get_peft_model_twice_on_a_prefix_base_refuses():
    base = tiny_llama(seed=0)
    fastpeft.get_peft_model(base, fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="already carries fastpeft adapters"):
        fastpeft.get_peft_model(base, _lora())


def test_tuner_refuses_to_re_initialise_an_adapter_it_holds():
    from fastpeft.tuners import inject_adapter

    pm = fastpeft.get_peft_model(tiny_llama(seed=0), _lora())
    trained = _adapter_weights(pm)
    with pytest.raises(ValueError, match="already holds an adapter named 'default'"):
        inject_adapter(pm.get_base_model(), _lora(), "default")
    assert _same(trained, _adapter_weights(pm))


def test_from_pretrained_on_a_peft_model_refuses_before_touching_it(tmp_path):
    pm = fastpeft.get_peft_model(tiny_llama(seed=0), _lora())
    pm.save_pretrained(tmp_path)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(1.0)  # "trained" since the save
    trained = _adapter_weights(pm)
    # was: the model's adapter wiped (re-initialised) before the load failed
    with pytest.raises(ValueError, match="already a PeftModel: load another adapter into it with"):
        fastpeft.PeftModel.from_pretrained(pm, tmp_path)
    assert _same(trained, _adapter_weights(pm))
    pm.load_adapter(tmp_path, adapter_name="loaded")
    assert _same(trained, _adapter_weights(pm))
    with pytest.raises(ValueError, match="already exists"):
        pm.load_adapter(tmp_path, adapter_name="loaded")


def test_a_failed_load_gives_the_base_model_back(tmp_path):
    fastpeft.get_peft_model(tiny_llama(seed=0), _lora()).save_pretrained(tmp_path / "ok")
    shutil.copytree(tmp_path / "ok", tmp_path / "bad")
    data = json.loads((tmp_path / "bad" / "adapter_config.json").read_text())
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps({**data, "r": 8}))
    base = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="has shape"):
        fastpeft.PeftModel.from_pretrained(base, tmp_path / "bad")
    # was: the LoRA layers stayed injected into `base`
    assert not any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in base.modules())
    fastpeft.PeftModel.from_pretrained(base, tmp_path / "ok")


# ---------------------------------------------------------------------------------------------- saving as a set
class _Killed(BaseException):
    """The process died here: nothing after it runs (no clean-up either)."""


def _kill_after(monkeypatch, k, torn=False):
    """Let the save's first `k` file operations (renames, removals, file writes) happen and kill the
    process at the next one.  torn: if that one is a write, it leaves half a file behind first."""
    import safetensors.torch

    count = [0]

    def halve(path):
        if os.path.exists(path):
            with open(path, "r+b") as fh:
                fh.truncate(os.path.getsize(path) // 2)

    def wrap(fn, written=None):
        def op(*args, **kwargs):
            if count[0] >= k:
                if torn and written is not None:
                    fn(*args, **kwargs)
                    halve(args[written])
                raise _Killed(k)
            count[0] += 1
            return fn(*args, **kwargs)
        return op

    for name in ("replace", "rename", "remove", "unlink"):
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))
    monkeypatch.setattr(safetensors.torch, "save_file", wrap(safetensors.torch.save_file, written=1))  # if used

    def fake_open(path, mode="r", *args, **kwargs):
        if "w" not in mode:
            return open(path, mode, *args, **kwargs)
        if count[0] >= k and not torn:
            raise _Killed(k)
        fh = open(path, mode, *args, **kwargs)
        if count[0] >= k:  # torn: the text goes in, then half of it is lost with the process
            close = fh.close

            def close_torn():
                close()
                halve(path)
                raise _Killed(k)
            fh.close = close_torn
        else:
            count[0] += 1
        return fh
    monkeypatch.setattr(io, "open", fake_open, raising=False)


def _load(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), folder)
    return pm.peft_config["default"].r, _adapter_weights(pm)


@pytest.mark.parametrize("torn", [False, True])
def test_a_kill_at_any_point_of_save_pretrained_leaves_the_old_or_the_new_adapter(tmp_path, monkeypatch, torn):
    old = fastpeft.get_peft_model(tiny_llama(seed=0), _lora(r=4))
    new = fastpeft.get_peft_model(tiny_llama(seed=0), _lora(r=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    old.save_pretrained(tmp_path / "old")
    new.save_pretrained(tmp_path / "new")
    want = {"old": _load(tmp_path / "old"), "new": _load(tmp_path / "new")}
    seen, k = set(), 0
    while True:
        folder = tmp_path / f"k{k}"
        shutil.copytree(tmp_path / "old", folder)
        with monkeypatch.context() as m:
            _kill_after(m, k, torn)
            try:
                new.save_pretrained(folder)
                done = True
            except _Killed:
                done = False
        r, weights = _load(folder)  # was: after the weights' rename, a shape mismatch: neither adapter
        state = "new" if r == 8 else "old"
        assert want[state][0] == r and _same(want[state][1], weights), f"kill after {k} operations"
        if done:
            assert state == "new"
            break
        seen.add(state)
        k += 1
        assert k < 40, "save_pretrained never finished"
    assert seen == {"old", "new"} and k >= 4, (seen, k)  # kills before and after the commit point were tried
    # the next save into a folder left by a kill finishes or discards the interrupted one, leaving no staged files
    for folder in tmp_path.glob("k*"):
        old.save_pretrained(folder)
        assert _load(folder)[0] == 4
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], folder


def test_every_adapter_folder_of_a_multi_adapter_save_is_old_or_new(tmp_path, monkeypatch):
    pm = fastpeft.get_peft_model(tiny_llama(seed=0), _lora(r=4))
    pm.add_adapter("other", _lora(r=2))
    pm.save_pretrained(tmp_path / "base")
    pm2 = fastpeft.get_peft_model(tiny_llama(seed=1), _lora(r=8))
    pm2.add_adapter("other", _lora(r=6))
    for k in range(0, 30, 3):
        folder = tmp_path / f"k{k}"
        shutil.copytree(tmp_path / "base", folder)
        with monkeypatch.context() as m:
            _kill_after(m, k)
            try:
                pm2.save_pretrained(folder)
            except _Killed:
                pass
        assert fastpeft.PeftConfig.from_pretrained(folder).r in (4, 8)
        loaded = fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), folder)
        loaded.load_adapter(folder / "other", adapter_name="other")
        assert loaded.peft_config["other"].r in (2, 6)


def test_saved_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        fastpeft.get_peft_model(tiny_llama(seed=0), _lora()).save_pretrained(tmp_path)
    finally:
        os.umask(old)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


# ---------------------------------------------------------------------------------------------- names as paths
@pytest.mark.parametrize("name", ["ABSOLUTE", "../up", "a/b", "a\\b", "..", ".", "", "   ", "a\x00b", "tab\tname",
                                  "x.y", "__base__", "adapter_config.json", 3, None])
def test_an_adapter_name_cannot_write_outside_the_save_directory(tmp_path, name):
    name = str(tmp_path / "outside") if name == "ABSOLUTE" else name
    pm = fastpeft.get_peft_model(tiny_llama(seed=0), _lora())
    with pytest.raises(ValueError, match="adapter name"):
        pm.add_adapter(name, _lora())
    with pytest.raises(ValueError, match="adapter name"):
        fastpeft.get_peft_model(tiny_llama(seed=0), _lora(), adapter_name=name)
    pm.save_pretrained(tmp_path / "save")
    with pytest.raises(ValueError, match="adapter name"):
        pm.load_adapter(tmp_path / "save", adapter_name=name)
    with pytest.raises(ValueError, match="adapter name"):
        fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "save", adapter_name=name)
    pm.peft_config[name] = pm.peft_config["default"]  # even a name forced past add_adapter is not written
    with pytest.raises(ValueError, match="adapter name"):
        pm.save_pretrained(tmp_path / "save2")
    assert not (tmp_path / "outside").exists() and not (tmp_path / "up").exists()


def test_peft_writes_an_absolute_adapter_name_outside_the_save_directory(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(seed=0), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    theirs.add_adapter(str(tmp_path / "outside"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path / "save")
    assert (tmp_path / "outside" / "adapter_model.safetensors").exists()  # fastpeft refuses the name (above)


# ---------------------------------------------------------------------------------------------- no code runs
class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_a_legacy_bin_that_would_run_code_is_refused(tmp_path):
    fastpeft.get_peft_model(tiny_llama(seed=0), _lora()).save_pretrained(tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")
    marker = tmp_path / "code_ran"
    torch.save({"x": _Payload(str(marker))}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model\.bin .*weights_only=True"):
        fastpeft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path)
    assert not marker.exists()


def _unsafe_loads(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        fn = ast.unparse(node.func)
        safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                   for k in node.keywords)
        if fn in ("torch.load", "torch.serialization.load") and not safe:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {fn} without weights_only=True")
        if fn.split(".")[0] in ("pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal") and \
                fn.rsplit(".", 1)[-1] in ("load", "loads", "Unpickler"):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {fn}")
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "fastpeft").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_load_in_the_package_can_run_code_from_a_file(path):
    assert not _unsafe_loads(path)


@pytest.mark.parametrize("failure", ["enospc", "safetensors"])
def test_save_pretrained_into_a_full_disk_names_the_path_and_keeps_the_old_adapter(tmp_path, monkeypatch, failure):
    import errno as errno_mod

    from fastpeft import io as fio
    from tests.models import tiny_llama

    model = fastpeft.get_peft_model(tiny_llama(seed=0), fastpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}

    def full(path):
        with open(path, "wb") as f:
            f.write(b"partial")
        if failure == "enospc":
            raise OSError(errno_mod.ENOSPC, "No space left on device")
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: ... }) os error 28")

    monkeypatch.setattr(fio, "tensors_writer", lambda tensors: full)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(1.0)
    with pytest.raises(OSError, match=r"cannot write adapter file .*adapter_model\.safetensors.*bytes free") as info:
        model.save_pretrained(tmp_path)
    assert info.value.errno == errno_mod.ENOSPC
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before, "a failed save left partial files or changed the old adapter"


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_adapters_on_a_float64_model_are_float64_as_in_peft(method):
    import peft as hf_peft

    from tests.models import tiny_llama
    from tests.peft_parity import peft_config

    cfg = (fastpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]) if method == "lora"
           else fastpeft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ours = fastpeft.get_peft_model(tiny_llama(seed=0).double(), cfg)
    theirs = hf_peft.get_peft_model(tiny_llama(seed=0).double(), peft_config(cfg))
    key = "lora_" if method == "lora" else "ia3_l"
    dt_ours = {p.dtype for n, p in ours.named_parameters() if key in n}
    dt_theirs = {p.dtype for n, p in theirs.named_parameters() if key in n}
    assert dt_ours == dt_theirs == {torch.float64}
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if key in n:
                p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(1, 97, (2, 5))
    before = ours(input_ids=ids).logits
    base = ours.get_base_model()
    weights = {n: p.clone() for n, p in base.named_parameters() if "base_layer" in n}
    ours.merge_adapter()
    torch.testing.assert_close(ours(input_ids=ids).logits, before, rtol=1e-10, atol=1e-10)  # fp64 end to end
    ours.unmerge_adapter()
    tol = 1e-12 if method == "lora" else 2e-8  # IA3 unmerges by 1 / (l + 1e-8), as PEFT does
    for n, p in base.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=tol, atol=tol)
