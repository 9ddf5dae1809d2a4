"""torch.compile(fullgraph=True) traces a whole fastpeft model of each method (no graph break),
and the compiled forward and backward equal eager."""

import pytest
import torch

import fastpeft
from tests.models import tiny_llama
from tests.peft_parity import trainable
from tests.utils import assert_close

CONFIGS = {
    "lora": lambda: fastpeft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    "ia3": lambda: fastpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "prefix": lambda: fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prompt": lambda: fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "ptuning": lambda: fastpeft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16),
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_whole_model_compiles_fullgraph(method):
    torch._dynamo.reset()
    model = fastpeft.get_peft_model(tiny_llama(seed=0), CONFIGS[method]())
    ids = torch.randint(0, 97, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0

    def step(ids, mask):
        return model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss

    def grads():
        out = {n: p.grad.clone() for n, p in trainable(model).items()}
        model.zero_grad(set_to_none=True)
        return out

    want = step(ids, mask)
    want.backward()
    want_grads = grads()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(ids, mask)  # raises on any graph break
    got.backward()
    got_grads = grads()
    assert_close(got.reshape(1), want.reshape(1), torch.float32, what="loss")
    assert got_grads.keys() == want_grads.keys() and got_grads
    for n in want_grads:
        assert_close(got_grads[n], want_grads[n], torch.float32, scale=5, what=f"grad of {n}")
