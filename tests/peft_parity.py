"""Helpers to compare a fastpeft model with an HF PEFT model built on identical weights."""

import peft
import torch

import fastpeft
from tests.utils import assert_close


def peft_config(cfg: fastpeft.PeftConfig) -> peft.PeftConfig:
    """The HF PEFT config with the same fields (via the shared JSON form)."""
    data = cfg.to_dict()
    return peft.PeftConfig.from_peft_type(**{k: v for k, v in data.items() if k not in ("auto_mapping", "peft_version")})


def build_pair(builder, cfg: fastpeft.PeftConfig, **kw):
    """(ours, theirs) with identical base weights and identical adapter weights (copied from PEFT)."""
    from tests.models import twin

    base_a, base_b = twin(builder, **kw)
    theirs = peft.get_peft_model(base_b, peft_config(cfg))
    ours = fastpeft.get_peft_model(base_a, cfg)
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert not unexpected, f"PEFT has parameters fastpeft lacks: {unexpected[:5]}"
    assert not [m for m in missing if "prompt_encoder" not in m], f"fastpeft has parameters PEFT lacks: {missing[:5]}"
    return ours, theirs


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def assert_same_outputs_and_grads(ours, theirs, batch, dtype=torch.float32):
    ours.train(theirs.training)
    out_a, out_b = ours(**batch), theirs(**batch)
    assert_close(out_a.logits, out_b.logits, dtype, what="logits")
    if "labels" in batch:
        assert_close(out_a.loss.reshape(1), out_b.loss.reshape(1), dtype, what="loss")
        out_a.loss.backward()
        out_b.loss.backward()
    else:
        g = torch.randn_like(out_b.logits)
        out_a.logits.backward(g)
        out_b.logits.backward(g)
    pa, pb = trainable(ours), trainable(theirs)
    assert set(pa) == set(pb), f"trainable sets differ: {sorted(set(pa) ^ set(pb))[:6]}"
    for name in pb:
        assert pb[name].grad is not None and pa[name].grad is not None, f"{name} got no gradient"
        assert_close(pa[name].grad, pb[name].grad, dtype, scale=5, what=f"grad of {name}")


def assert_mixed_batch_equals_each_task_alone(model, ids, mask, index, names, **mixed_kw):
    """Prompt-learning mixed-task batch (row b uses adapter names[index[b]]): its logits equal each
    task run alone on its rows, and its prompt-encoder gradients equal the alone runs' summed.
    Returns the mixed output (for further checks)."""
    mixed = model(input_ids=ids, attention_mask=mask, prompt_index=index, **mixed_kw)
    g = torch.randn_like(mixed.logits)
    mixed.logits.backward(g)
    grads_mixed = {n: p.grad.clone() for n, p in model.prompt_encoder.named_parameters()}
    model.zero_grad()
    for k, name in enumerate(names):
        rows = index == k
        model.set_adapter(name)
        model.prompt_encoder.requires_grad_(True)
        alone = model(input_ids=ids[rows], attention_mask=mask[rows])
        assert_close(mixed.logits[rows], alone.logits, what=f"rows of adapter {name}")
        alone.logits.backward(g[rows])
    for n, p in model.prompt_encoder.named_parameters():
        assert_close(grads_mixed[n], p.grad, scale=5, what=f"grad of {n}")
    return mixed
