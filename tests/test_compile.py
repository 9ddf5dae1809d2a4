"""torch.compile(fullgraph=True) traces a whole fastpeft model for every method and every option
that changes the code path (no graph break: fullgraph raises on one), the compiled forward and
backward equal eager — dropout included, for the same torch.manual_seed — and steps of the same
shape, or of varying sequence length under dynamic shapes, never recompile."""

import pytest
import torch

import fastpeft
from tests.models import tiny_gpt2, tiny_llama
from tests.peft_parity import trainable
from tests.utils import assert_close, triton_device

LORA = dict(r=4, target_modules="all-linear", init_lora_weights=False)
CONFIGS = {
    "lora": lambda: fastpeft.LoraConfig(**LORA),
    "lora-dropout": lambda: fastpeft.LoraConfig(**LORA, lora_dropout=0.1),
    "lora-rslora-bias": lambda: fastpeft.LoraConfig(**LORA, use_rslora=True, bias="lora_only", lora_dropout=0.1),
    "ia3": lambda: fastpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "prefix": lambda: fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prefix-projection": lambda: fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                             prefix_projection=True, encoder_hidden_size=16),
    "prompt": lambda: fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "ptuning-mlp": lambda: fastpeft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                         encoder_hidden_size=16),
    "ptuning-lstm": lambda: fastpeft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                          encoder_hidden_size=16, encoder_reparameterization_type="LSTM"),
}


def _grads(model):
    out = {n: p.grad.clone() for n, p in trainable(model).items() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _compare_train(model, step, inputs, backend="aot_eager", seed=1234, **compile_kw):
    """Eager and compiled training steps from the same torch.manual_seed: equal loss and grads."""
    torch.manual_seed(seed)
    want = step(*inputs)
    want.backward()
    want_grads = _grads(model)
    compiled = torch.compile(step, fullgraph=True, backend=backend, **compile_kw)  # raises on any graph break
    torch.manual_seed(seed)
    got = compiled(*inputs)
    got.backward()
    got_grads = _grads(model)
    assert_close(got.reshape(1), want.reshape(1), torch.float32, what="loss")
    assert got_grads.keys() == want_grads.keys() and got_grads
    for n in want_grads:
        assert_close(got_grads[n], want_grads[n], torch.float32, scale=5, what=f"grad of {n}")
    return compiled


def _no_recompile(compiled, calls):
    """Run `calls` (callables taking the compiled step) with recompilation turned into an error."""
    with torch._dynamo.config.patch(error_on_recompile=True):
        for call in calls:
            call(compiled)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_whole_model_compiles_fullgraph_training(method, one_thread):
    torch._dynamo.reset()
    model = fastpeft.get_peft_model(tiny_llama(seed=0), CONFIGS[method]())
    model.train()
    ids = torch.randint(0, 97, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0

    def step(ids, mask):
        return model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss

    compiled = _compare_train(model, step, (ids, mask))
    losses = []

    def again(c):
        loss = c(ids, mask)
        loss.backward()
        losses.append(loss.item())
        model.zero_grad(set_to_none=True)

    _no_recompile(compiled, [again] * 3)
    if "dropout" in method or "rslora" in method:
        assert len(set(losses)) == 3, "each run of the compiled graph must draw a fresh dropout mask"


@pytest.mark.parametrize("method", ["lora-dropout", "ia3", "prefix", "prompt"])
def test_compiled_inference_fullgraph(method, one_thread):
    torch._dynamo.reset()
    model = fastpeft.get_peft_model(tiny_llama(seed=0), CONFIGS[method]())
    model.eval()
    ids = torch.randint(0, 97, (2, 5))

    def fwd(ids):
        return model(input_ids=ids, use_cache=False).logits

    with torch.no_grad():
        want = fwd(ids)
        compiled = torch.compile(fwd, fullgraph=True, backend="aot_eager")
        assert_close(compiled(ids), want, torch.float32, what="logits")
        _no_recompile(compiled, [lambda c: c(ids)] * 2)


def test_conv1d_fan_in_fan_out_compiles(one_thread):
    torch._dynamo.reset()
    cfg = fastpeft.LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, init_lora_weights=False,
                              lora_dropout=0.1)
    model = fastpeft.get_peft_model(tiny_gpt2(seed=0), cfg)
    model.get_base_model().loss_type = "ForCausalLM"  # else transformers logs a warning dynamo cannot trace
    model.train()
    ids = torch.randint(0, 97, (2, 6))

    def step(ids):
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    _compare_train(model, step, (ids,))


def test_two_adapters_and_set_adapter_compile(one_thread):
    torch._dynamo.reset()
    model = fastpeft.get_peft_model(tiny_llama(seed=0), fastpeft.LoraConfig(**LORA))
    model.add_adapter("other", fastpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                                   lora_dropout=0.1))
    model.set_adapter("other")
    model.train()
    ids = torch.randint(0, 97, (2, 6))

    def step(ids):
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    _compare_train(model, step, (ids,))


def test_dynamic_sequence_lengths_do_not_recompile(one_thread):
    """10 training steps of varying sequence length: one graph (dynamic shapes), no recompilation."""
    torch._dynamo.reset()
    model = fastpeft.get_peft_model(tiny_llama(seed=0), CONFIGS["lora-dropout"]())
    model.train()

    def step(ids):
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    lengths = [5, 9, 6, 12, 7, 8, 11, 10, 13, 6]
    compiled(torch.randint(0, 97, (2, 4))).backward()  # the first call compiles
    model.zero_grad(set_to_none=True)

    def run(length):
        def call(c):
            torch.manual_seed(length)
            ids = torch.randint(0, 97, (2, length))
            got = c(ids)
            got.backward()
            got_grads = _grads(model)
            torch.manual_seed(length)
            ids = torch.randint(0, 97, (2, length))
            want = step(ids)
            want.backward()
            want_grads = _grads(model)
            assert_close(got.reshape(1), want.reshape(1), torch.float32, what=f"loss at length {length}")
            for n in want_grads:
                assert_close(got_grads[n], want_grads[n], torch.float32, scale=5, what=f"grad of {n}")
        return call

    _no_recompile(compiled, [run(n) for n in lengths])


def _skip_unless_base_compiles_with_checkpointing() -> None:
    """transformers 5.25's hub-kernel layer wrapper sets a context variable in every attention forward, which
    dynamo refuses inside activation checkpointing: the bare model does not compile (fullgraph) there either."""
    base = tiny_llama(seed=0)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.disable_input_require_grads()
    base.train()
    ids = torch.randint(0, 97, (1, 4))

    def step(ids):
        return base(input_ids=ids, labels=ids, use_cache=False).loss

    try:
        torch.compile(step, fullgraph=True, backend="aot_eager")(ids).backward()
    except torch._dynamo.exc.Unsupported as err:
        pytest.skip(f"this transformers release's own model does not compile under checkpointing: {str(err)[:120]}")
    finally:
        torch._dynamo.reset()


def test_compiled_under_gradient_checkpointing_equals_eager(one_thread):
    """Activation checkpointing inside the compiled graph recomputes the LoRA forward in the
    backward: the ops are pure functions of their seed tensor, so the mask is the forward's."""
    torch._dynamo.reset()
    _skip_unless_base_compiles_with_checkpointing()
    model = fastpeft.get_peft_model(tiny_llama(seed=0), CONFIGS["lora-dropout"]())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers' input-grad hook (`requires_grad_()` on the embeddings) is for reentrant
    # checkpointing only, and dynamo refuses it
    model.get_base_model().disable_input_require_grads()
    model.train()
    ids = torch.randint(0, 97, (2, 6))

    def step(ids):
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    _compare_train(model, step, (ids,))


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_inductor_dropout_step_equals_eager(backend_name, one_thread):
    """The real compiler (inductor) on the LoRA dropout step: with `fallback_random` (inductor's
    switch for drawing random numbers as eager does) the compiled step equals eager bit for bit in
    its masks; the Triton kernels run through the interpreter on the CPU."""
    if backend_name == "triton":
        if triton_device() != "cpu":
            pytest.skip("the GPU run of this case is in the gpu tests")
        fastpeft.set_backend("triton")
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    model = fastpeft.get_peft_model(tiny_llama(seed=0), fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                            init_lora_weights=False, lora_dropout=0.1))
    model.train()
    ids = torch.randint(0, 97, (2, 6))

    def step(ids):
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    with inductor_config.patch(fallback_random=True):
        _compare_train(model, step, (ids,), backend="inductor")


def test_traceable_lstm_equals_nn_lstm():
    """P-tuning's LSTM encoder under compile runs in plain ops: same outputs and grads as nn.LSTM,
    same parameter names (PEFT's files), same repr."""
    from fastpeft.prompt_learning.encoders import LSTM, traceable_lstm

    for batch_first, shape in ((True, (3, 5, 12)), (False, (5, 3, 12)), (True, (5, 12))):
        ref = torch.nn.LSTM(12, 7, num_layers=2, bidirectional=True, batch_first=batch_first)
        ours = LSTM(12, 7, num_layers=2, bidirectional=True, batch_first=batch_first)
        ours.load_state_dict(ref.state_dict())
        assert repr(ours) == repr(ref) and list(ours.state_dict()) == list(ref.state_dict())
        x = torch.randn(*shape, requires_grad=True)
        want = ref(x)[0]
        want_grads = torch.autograd.grad(want.square().sum(), [x, *ref.parameters()])
        assert torch.equal(ours(x)[0], want)  # eager: nn.LSTM's own kernel
        got = traceable_lstm(ours, x)
        got_grads = torch.autograd.grad(got.square().sum(), [x, *ours.parameters()])
        assert_close(got, want, torch.float32, what="lstm output")
        for g, w in zip(got_grads, want_grads):
            assert_close(g, w, torch.float32, scale=5, what="lstm grad")


def test_mixed_adapter_batch_compiles(one_thread):
    """`adapter_names` (each row its own adapter, "__base__" none) traces whole, training and inference."""
    torch._dynamo.reset()
    model = fastpeft.get_peft_model(tiny_llama(seed=0), fastpeft.LoraConfig(**LORA), adapter_name="a")
    model.add_adapter("b", fastpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    for n, p in model.named_parameters():
        p.requires_grad_(".a." in n or ".b." in n)
    model.train()
    ids = torch.randint(0, 97, (3, 6))
    names = ["a", "__base__", "b"]

    def step(ids):
        return model(input_ids=ids, labels=ids, adapter_names=names, use_cache=False).loss

    compiled = _compare_train(model, step, (ids,))
    _no_recompile(compiled, [lambda c: c(ids).backward()] * 2)


def test_qlora_compiles(one_thread):
    """LoRA on a 4-bit base (the NF4 weight dequantised inside the graph on a CPU) traces whole."""
    torch._dynamo.reset()
    base = fastpeft.quantize(tiny_llama(seed=0), "nf4", compute_dtype=torch.float32)
    model = fastpeft.get_peft_model(base, fastpeft.LoraConfig(**LORA, lora_dropout=0.1))
    model.train()
    ids = torch.randint(0, 97, (2, 6))

    def step(ids):
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    compiled = _compare_train(model, step, (ids,))
    _no_recompile(compiled, [lambda c: c(ids).backward()] * 2)


@pytest.mark.parametrize("method", ["lora", "ia3", "prefix", "prompt", "ptuning-mlp", "template"])
def test_compiled_generate_with_a_static_cache(method, one_thread):
    """generate() with a static cache and a compiled forward (transformers' compile_config, fullgraph), a
    left-padded row in the batch: token for token the eager dynamic-cache result for every method: LoRA,
    IA3, prefix tuning (the attention leaves the cache's unwritten slots out), prompt tuning and P-tuning
    (the preallocated cache sized for the prompt too) and a template."""
    transformers = pytest.importorskip("transformers")
    torch._dynamo.reset()
    cfg = {"template": lambda: fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                           prompt_token_id=96), **CONFIGS}
    model = fastpeft.get_peft_model(tiny_llama(seed=0), cfg[method]()).eval()
    if model.is_prompt_learning:  # a prompt far from the fresh init, so that a misplaced one shows
        with torch.no_grad():
            for p in model.prompt_encoder.parameters():
                p.normal_(0, 1, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(1, 90, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    if method == "template":
        ids[:, 2] = ids[:, 4:6] = 96  # three pseudo tokens in two segments
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    compile_config = transformers.CompileConfig(backend="aot_eager", fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    torch._dynamo.utils.counters.clear()  # the assertion below counts this test's compilation only
    with torch.no_grad():
        want = model.generate(input_ids=ids, **kw)
        eager = model.generate(input_ids=ids, cache_implementation="static", **kw)
        got = model.generate(input_ids=ids, cache_implementation="static", compile_config=compile_config, **kw)
    assert torch.equal(eager, want)
    assert torch.equal(got, want)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the forward really was compiled
    if model.is_prompt_learning:  # the prompt matters to these tokens: the check above can fail
        with torch.no_grad(), model.disable_adapter():
            plain = model.generate(input_ids=ids, **kw)
        assert not torch.equal(plain, want)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_lora_ops_pass_opcheck(dropout_p):
    """torch.library.opcheck on the ops torch.compile traces (schema, fake kernel, autograd registration)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 12, generator=g, requires_grad=True)
    w, b = torch.randn(10, 12, generator=g), torch.randn(10, generator=g)
    a = torch.randn(4, 12, generator=g, requires_grad=True)
    bb = torch.randn(10, 4, generator=g, requires_grad=True)
    seed = torch.tensor([7]) if dropout_p else None
    torch.library.opcheck(torch.ops.fastpeft.lora_linear_fwd.default, (x, w, b, a, bb, 2.0, dropout_p, seed))
    y, s = torch.ops.fastpeft.lora_linear_fwd.default(x, w, b, a, bb, 2.0, dropout_p, seed)
    torch.library.opcheck(torch.ops.fastpeft.lora_linear_bwd.default,
                          (torch.randn_like(y), x.detach(), w, a.detach(), bb.detach(), s.detach(), 2.0, dropout_p, seed))
