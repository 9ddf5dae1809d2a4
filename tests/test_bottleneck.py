"""Bottleneck adapters: the fused op (torch / Triton interpreter / custom op) and the Llama integration."""

import copy
import os

import pytest
import torch

import fastpeft
from fastpeft import backend
from fastpeft.bench.saved_bytes import saved_bytes
from fastpeft.nn.bottleneck import BottleneckWrapper
from fastpeft.ops.bottleneck import bottleneck_adapter, reference_forward
from tests.models import tiny_llama

ACTS = ["relu", "silu", "gelu", "gelu_tanh"]


def _inputs(M, H, R, dtype, lead=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, M, H, generator=g).to(dtype).requires_grad_()
    ws = [(torch.randn(s, generator=g) * 0.3).to(dtype).requires_grad_() for s in [(R, H), (R,), (H, R), (H,)]]
    return h, ws


def _run(be, h, ws, act, dy):
    with backend.use_backend(be):
        y = bottleneck_adapter(h, *ws, act=act)
    assert backend._LAST["bottleneck_adapter"] == be
    return y, torch.autograd.grad(y, [h, *ws], dy)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 45, 7), (5, 33, 17)])
def test_op_backends_match_fp64_reference(monkeypatch, act, dtype, shape):
    """Each backend's error vs the fp64 reference ≤ 2x PyTorch's own error at the same precision (+ a floor)."""
    M, H, R = shape
    lead = (2,) if M == 5 else ()
    h, ws = _inputs(M, H, R, dtype, lead)
    dy = torch.randn(h.shape).to(dtype)
    y64 = reference_forward(h.double(), *[w.double() for w in ws], act)
    g64 = torch.autograd.grad(y64, [h, *ws], dy.double())
    y_pt = reference_forward(h, *ws, act)
    g_pt = torch.autograd.grad(y_pt, [h, *ws], dy)
    floor = 1e-5 if dtype == torch.float32 else 2e-2
    backends = ["torch"]
    if os.environ.get("TRITON_INTERPRET") == "1":
        backends.append("triton")
    for be in backends:
        y, g = _run(be, h, ws, act, dy)
        assert y.dtype == dtype and y.shape == h.shape
        assert _err(y, y64) <= 2 * _err(y_pt, y64) + floor * y64.abs().max().item(), (be, "y")
        for name, a, b, c in zip(["h", "W_d", "b_d", "W_u", "b_u"], g, g64, g_pt):
            assert a.shape == b.shape
            assert _err(a, b) <= 2 * _err(c, b) + floor * (1 + b.abs().max().item()), (be, name, _err(a, b))


def test_saved_bytes_is_one_input():
    M, H, R = 64, 96, 8
    h, ws = _inputs(M, H, R, torch.float32)
    n, y = saved_bytes(lambda: bottleneck_adapter(h, *ws, act="silu"), exclude=ws)
    y.sum().backward()
    one = M * H * 4
    assert n <= 1.1 * one, (n, one)
    h2 = h.detach().clone().requires_grad_()
    n_ref, y_ref = saved_bytes(lambda: reference_forward(h2, *ws, "silu"), exclude=ws)
    y_ref.sum().backward()
    assert n_ref > n  # the unfused module keeps the M×R intermediates too


def test_custom_op_opcheck_and_compile():
    h, ws = _inputs(9, 24, 5, torch.float32, lead=(2,))
    x2 = h.detach().reshape(-1, 24).requires_grad_()
    torch.library.opcheck(torch.ops.fastpeft.bottleneck_adapter_fwd.default, (x2, *ws, "gelu"))
    dy2 = torch.randn_like(x2)
    torch.library.opcheck(torch.ops.fastpeft.bottleneck_adapter_bwd.default,
                          (dy2, x2.detach(), *[w.detach() for w in ws[:3]], "gelu"))
    fn = torch.compile(lambda h, *w: bottleneck_adapter(h, *w, act="gelu"), fullgraph=True, backend="aot_eager")
    y = fn(h, *ws)
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, [h, *ws], dy)
    y_ref = reference_forward(h, *ws, "gelu")
    g_ref = torch.autograd.grad(y_ref, [h, *ws], dy)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_op_errors_name_the_problem():
    h, (wd, bd, wu, bu) = _inputs(4, 16, 3, torch.float32)
    with pytest.raises(ValueError, match="w_down"):
        bottleneck_adapter(h, wd[:, :8], bd, wu, bu)
    with pytest.raises(ValueError, match="w_up"):
        bottleneck_adapter(h, wd, bd, wu.t(), bu)
    with pytest.raises(ValueError, match="non-linearity"):
        bottleneck_adapter(h, wd, bd, wu, bu, act="softplus")
    with pytest.raises(ValueError, match="dtype"):
        bottleneck_adapter(h, wd.double(), bd, wu, bu)


class _Unfused(torch.nn.Module):
    """The plain torch adapter block: a wrapped sub-block followed by h + Sequential(down, act, up)(h)."""

    def __init__(self, base, adapter):
        super().__init__()
        self.base = base
        act = {"relu": torch.nn.ReLU(), "silu": torch.nn.SiLU()}[adapter.non_linearity]
        self.seq = torch.nn.Sequential(copy.deepcopy(adapter.down), act, copy.deepcopy(adapter.up))

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        h = h + self.seq(h)
        return (h, *out[1:]) if isinstance(out, tuple) else h


def _unfused_twin(peft_model):
    """A copy of peft_model's inner model with each BottleneckWrapper replaced by an _Unfused block
    holding the same weights (its active adapter): everything but the adapter op is the same code."""
    twin = copy.deepcopy(peft_model.base_model.model)
    for name, mod in list(twin.named_modules()):
        if isinstance(mod, BottleneckWrapper):
            parent, _, child = name.rpartition(".")
            unfused = _Unfused(mod.base_layer, mod.bottleneck_adapters[mod.active_adapters[0]])
            setattr(twin.get_submodule(parent), child, unfused)
    for n, p in twin.named_parameters():
        p.requires_grad_(".seq." in n)
    return twin


def _train_both(model, twin, make_batch, steps=50):
    """AdamW on both; per-step losses equal within 1e-5; returns fastpeft's losses."""
    model.train(), twin.train()
    opt_a = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt_b = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2)
    assert sum(p.numel() for g in opt_a.param_groups for p in g["params"]) == \
        sum(p.numel() for g in opt_b.param_groups for p in g["params"]) > 0
    losses = []
    for step in range(steps):
        batch = make_batch(step)
        la = model(**batch).loss
        lb = twin(**batch).loss
        assert abs(la.item() - lb.item()) <= 1e-5, (step, la.item(), lb.item())
        losses.append(la.item())
        la.backward()
        lb.backward()
        opt_a.step(), opt_b.step(), opt_a.zero_grad(), opt_b.zero_grad()
    assert losses[-2] < losses[0] - 0.1  # it trained (the same batch as step 0)
    ours = [p for p in model.parameters() if p.requires_grad]
    theirs = [p for p in twin.parameters() if p.requires_grad]
    for a, b in zip(ours, theirs):  # same module order: down.weight, down.bias, up.weight, up.bias
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    return losses


def test_fresh_adapter_is_identity_and_trains_like_unfused_module():
    base = tiny_llama(seed=3)
    ids = torch.randint(0, 97, (2, 11))
    ref_logits = base(input_ids=ids).logits
    cfg = fastpeft.BottleneckConfig(reduction_factor=4, mh_adapter=True, output_adapter=True, non_linearity="swish")
    model = fastpeft.get_peft_model(copy.deepcopy(base), cfg)
    torch.testing.assert_close(model(input_ids=ids).logits, ref_logits, atol=0, rtol=0)  # identity init
    wrappers = [m for m in model.modules() if isinstance(m, BottleneckWrapper)]
    assert len(wrappers) == 4
    g = torch.Generator().manual_seed(4)
    data = [torch.randint(0, 97, (2, 9), generator=g) for _ in range(2)]
    _train_both(model, _unfused_twin(model), lambda step: {"input_ids": data[step % 2], "labels": data[step % 2]})
    for n, p in base.named_parameters():  # frozen base untouched
        live = dict(model.base_model.model.named_parameters())
        key = n.replace("self_attn.", "self_attn.base_layer.").replace("mlp.", "mlp.base_layer.")
        torch.testing.assert_close(live[key], p, atol=0, rtol=0)


def tiny_t5(seed):
    import transformers

    cfg = transformers.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    return transformers.T5ForConditionalGeneration(cfg).eval()


def test_t5_encoder_decoder_trains_like_unfused_module():
    base = tiny_t5(seed=7)
    cfg = fastpeft.BottleneckConfig(reduction_factor=4, mh_adapter=True, non_linearity="relu")
    model = fastpeft.get_peft_model(copy.deepcopy(base), cfg)
    assert sum(isinstance(m, BottleneckWrapper) for m in model.modules()) == 8  # 2 enc + 2 dec layers, x2
    g = torch.Generator().manual_seed(8)
    data = [(torch.randint(1, 97, (2, 8), generator=g), torch.randint(1, 97, (2, 5), generator=g)) for _ in range(2)]
    _train_both(model, _unfused_twin(model),
                lambda step: {"input_ids": data[step % 2][0], "labels": data[step % 2][1]})


def test_save_load_multiple_adapters_and_set_adapter(tmp_path):
    base = tiny_llama(seed=5)
    ids = torch.randint(0, 97, (2, 7))
    model = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.BottleneckConfig(bottleneck_size=5,
                                                                                    init_weights="random"))
    model.add_adapter("other", fastpeft.BottleneckConfig(reduction_factor=8, non_linearity="gelu",
                                                         init_weights="random", mh_adapter=True))
    out_default = model(input_ids=ids).logits
    model.set_adapter("other")
    out_other = model(input_ids=ids).logits
    assert _err(out_default, out_other) > 1e-3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other." in n for n in trainable)
    model.save_pretrained(tmp_path)
    loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "other", adapter_name="other")
    torch.testing.assert_close(loaded(input_ids=ids).logits, out_other, atol=0, rtol=0)
    loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids).logits, out_default, atol=0, rtol=0)
    assert fastpeft.PeftConfig.from_pretrained(tmp_path).bottleneck_size == 5
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=0, rtol=0)


def test_config_errors():
    with pytest.raises(ValueError, match="non-linearity"):
        fastpeft.BottleneckConfig(non_linearity="softplus")
    with pytest.raises(ValueError):
        fastpeft.BottleneckConfig(init_weights="xavier")
    with pytest.raises(ValueError, match="no adapter"):
        fastpeft.get_peft_model(tiny_llama(seed=0), fastpeft.BottleneckConfig(output_adapter=False))


def _mixed_rows_equal_each_alone(model, base, ids, names):
    """A mixed-adapter batch (`adapter_names`, "__base__" rows through `base`) equals each row run with its
    adapter alone; returns {name: logits of the whole batch through that adapter alone}."""
    mixed = model(input_ids=ids, adapter_names=names).logits
    per = {}
    for name in dict.fromkeys(n for n in names if n != "__base__"):
        model.set_adapter(name)
        per[name] = model(input_ids=ids).logits
    per["__base__"] = base(input_ids=ids).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], per[name][row], atol=1e-6, rtol=1e-6)
    return per


def test_mixed_adapter_batch_routes_each_row():
    base = tiny_llama(seed=9)
    model = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.BottleneckConfig(bottleneck_size=6,
                                                                                    init_weights="random"))
    model.add_adapter("b", fastpeft.BottleneckConfig(bottleneck_size=4, init_weights="random", mh_adapter=True))
    model.eval()
    ids = torch.randint(0, 97, (4, 7))
    names = ["b", "default", "__base__", "b"]
    with torch.no_grad():
        per = _mixed_rows_equal_each_alone(model, base, ids, names)
    assert _err(per["b"], per["default"]) > 1e-3
    with pytest.raises(ValueError, match="unknown adapter"):
        model(input_ids=ids, adapter_names=["b", "c", "b", "b"])
    gen = model.generate(input_ids=ids[:2], attention_mask=torch.ones(2, 7, dtype=torch.long), max_new_tokens=3,
                         do_sample=False, adapter_names=["b", "__base__"], pad_token_id=0)
    model.set_adapter("b")
    alone = model.generate(input_ids=ids[:1], attention_mask=torch.ones(1, 7, dtype=torch.long), max_new_tokens=3,
                           do_sample=False, pad_token_id=0)
    assert torch.equal(gen[0], alone[0])


def test_bf16_autocast_trains_fp32_adapter():
    model = fastpeft.get_peft_model(tiny_llama(seed=10), fastpeft.BottleneckConfig(init_weights="random")).train()
    ids = torch.randint(0, 97, (2, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------- AdapterHub's placements
# original_ln_before / residual_before_ln (AdapterHub's Adapter.pre_forward), on a pre-LN decoder (Llama)
# and a post-LN encoder (BERT), against plain torch written out by hand.
def tiny_bert(seed):
    import transformers

    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    model = transformers.BertForMaskedLM(cfg).eval()
    with torch.no_grad():  # norms away from weight 1 / bias 0: where an LN sits must matter
        for n, p in model.named_parameters():
            if "norm" in n.lower():
                p.add_(torch.randn_like(p) * 0.2)
    return model


def _hand_adapter(h, x, weights, act, original_ln_before, residual_before_ln, ln=None):
    """AdapterHub's pre_forward + forward: s = [LN](h + x) with original_ln_before, else h; the residual is
    h (residual_before_ln) or s; out = up(act(down(s))) + residual."""
    wd, bd, wu, bu = weights
    s = h
    if original_ln_before:
        s = h + x
        if ln is not None:
            s = ln(s)
    r = h if residual_before_ln else s
    f = {"relu": torch.relu, "silu": torch.nn.functional.silu}[act]
    return torch.nn.functional.linear(f(torch.nn.functional.linear(s, wd, bd)), wu, bu) + r


def _cloned_weights(model):
    """{wrapper name: (W_d, b_d, W_u, b_u)} copies (leaf tensors) of each wrapper's active adapter."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, BottleneckWrapper):
            a = m.bottleneck_adapters[m.active_adapters[0]]
            out[name] = [t.detach().clone().requires_grad_() for t in (a.down.weight, a.down.bias, a.up.weight,
                                                                       a.up.bias)]
    return out


def _hand_llama(base, weights, act, olnb, rbl):
    import types

    twin = copy.deepcopy(base)
    for i, layer in enumerate(twin.model.layers):
        w_attn = weights.get(f"model.layers.{i}.self_attn")
        w_mlp = weights[f"model.layers.{i}.mlp"]

        def forward(self, hidden_states, *args, _wa=w_attn, _wm=w_mlp, **kwargs):
            residual = hidden_states  # AdapterHub's LlamaDecoderLayerWithAdapters.forward
            h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), *args, **kwargs)
            if _wa is not None:
                h = _hand_adapter(h, residual, _wa, act, olnb, rbl)
            hidden_states = h + residual
            residual = hidden_states
            h = self.mlp(self.post_attention_layernorm(hidden_states))
            return _hand_adapter(h, residual, _wm, act, olnb, rbl) + residual

        layer.forward = types.MethodType(forward, layer)
    return twin


def _hand_bert(base, weights, act, olnb, rbl):
    import types

    twin = copy.deepcopy(base)
    for i, layer in enumerate(twin.bert.encoder.layer):
        for block, key in ((layer.attention.output, f"bert.encoder.layer.{i}.attention.output"),
                           (layer.output, f"bert.encoder.layer.{i}.output")):
            w = weights.get(key)

            def forward(self, hidden_states, input_tensor, _w=w):
                h = self.dropout(self.dense(hidden_states))  # AdapterHub's BertOutputWithAdapters
                if _w is not None:
                    h = _hand_adapter(h, input_tensor, _w, act, olnb, rbl, ln=self.LayerNorm)
                return self.LayerNorm(h + input_tensor)

            block.forward = types.MethodType(forward, block)
    return twin


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("olnb,rbl", [(True, False), (True, True), (False, False)])
def test_adapterhub_placement_matches_hand_written_torch(family, olnb, rbl):
    base = tiny_llama(seed=21) if family == "llama" else tiny_bert(seed=21)
    act = "relu" if olnb else "silu"
    cfg = fastpeft.BottleneckConfig(bottleneck_size=6, mh_adapter=True, non_linearity=act, init_weights="random",
                                    original_ln_before=olnb, residual_before_ln=rbl)
    torch.manual_seed(22)
    model = fastpeft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.3)
    n_wrappers = sum(isinstance(m, BottleneckWrapper) for m in model.modules())
    assert n_wrappers == 4
    weights = _cloned_weights(model.base_model.model)
    twin = (_hand_llama if family == "llama" else _hand_bert)(base, weights, act, olnb, rbl)
    ids = torch.randint(1, 97, (2, 9))
    ours = model(input_ids=ids, labels=ids)
    ref = twin(input_ids=ids, labels=ids)
    assert _err(ours.logits, ref.logits) <= 1e-5
    assert _err(ours.logits, base(input_ids=ids).logits) > 1e-2
    ours.loss.backward()
    ref.loss.backward()
    for name, ws in weights.items():  # gradients too (the residual != input path is plain torch)
        a = model.base_model.model.get_submodule(name).bottleneck_adapters["default"]
        for p, q in zip((a.down.weight, a.down.bias, a.up.weight, a.up.bias), ws):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)
    # residual_before_ln only matters with original_ln_before, as in AdapterHub
    flipped = copy.deepcopy(model)
    for m in flipped.modules():
        if isinstance(m, BottleneckWrapper):
            m.bottleneck_adapters["default"].residual_before_ln = not rbl
    diff = _err(flipped(input_ids=ids).logits, ours.logits)
    assert (diff > 1e-3) if olnb else (diff == 0.0)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_adapterhub_placements_mixed_batches_unload_and_copy(family):
    base = tiny_llama(seed=23) if family == "llama" else tiny_bert(seed=23)
    model = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.BottleneckConfig(
        bottleneck_size=5, init_weights="random", original_ln_before=True))
    model.add_adapter("b", fastpeft.BottleneckConfig(bottleneck_size=4, init_weights="random", mh_adapter=True,
                                                     original_ln_before=True, residual_before_ln=False))
    model.add_adapter("c", fastpeft.BottleneckConfig(bottleneck_size=3, init_weights="random"))
    model.eval()
    ids = torch.randint(1, 97, (4, 7))
    names = ["b", "default", "__base__", "c"]
    with torch.no_grad():
        per = _mixed_rows_equal_each_alone(model, base, ids, names)
        assert min(_err(per[a], per[b]) for a, b in (("b", "default"), ("default", "c"), ("c", "__base__"))) > 1e-3
        twin = copy.deepcopy(model)  # the norm hooks follow the copy (bound to the copied wrappers)
        torch.testing.assert_close(twin(input_ids=ids).logits, per["c"], atol=0, rtol=0)
        twin.set_adapter("b")
        torch.testing.assert_close(twin(input_ids=ids).logits, per["b"], atol=0, rtol=0)
    plain = model.unload()
    assert not any(isinstance(m, BottleneckWrapper) for m in plain.modules())
    assert all(not m._forward_pre_hooks for m in plain.modules())  # no hook left on the norms
    torch.testing.assert_close(plain(input_ids=ids).logits, per["__base__"], atol=0, rtol=0)


def test_original_ln_before_needs_a_known_residual():
    with pytest.raises(ValueError, match="original_ln_before"):
        fastpeft.get_peft_model(tiny_t5(seed=0), fastpeft.BottleneckConfig(original_ln_before=True))
    with pytest.raises(ValueError, match="original_ln_before"):
        fastpeft.get_peft_model(tiny_llama(seed=0), fastpeft.BottleneckConfig(original_ln_before=True,
                                                                                target_modules=["o_proj"]))


def test_original_ln_before_saves_and_loads_in_fastpeft_format(tmp_path):
    base = tiny_bert(seed=24)
    cfg = fastpeft.BottleneckConfig(bottleneck_size=4, init_weights="random", original_ln_before=True,
                                    residual_before_ln=False, mh_adapter=True)
    model = fastpeft.get_peft_model(copy.deepcopy(base), cfg).eval()
    ids = torch.randint(1, 97, (2, 6))
    want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    saved = fastpeft.PeftConfig.from_pretrained(tmp_path)
    assert saved.original_ln_before is True and saved.residual_before_ln is False
    loaded = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=0, rtol=0)
