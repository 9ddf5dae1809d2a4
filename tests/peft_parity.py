"""Helpers to compare a fastpeft model with an HF PEFT model built on identical weights."""

import peft
import torch

import fastpeft
from tests.utils import TOL, assert_close, rel_err


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
    g = None
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
    exact = None
    for name in pb:
        assert pb[name].grad is not None and pa[name].grad is not None, f"{name} got no gradient"
        tol = TOL[dtype] * 5
        if rel_err(pa[name].grad, pb[name].grad) <= tol:
            continue
        # an ill-conditioned draw (fresh random inputs every run): two fp32 gradients can differ by more than
        # the tolerance while both are that far from the exact one (PEFT's own fp32 gradient was seen 1e-3 from
        # fp64 with LoRA r=1).  Then the oracle is PEFT's model in float64: fastpeft's gradient must be no
        # further from it than the tolerance or twice PEFT's own distance, whichever is larger.
        if exact is None:
            exact = _float64_grads(theirs, batch, g)
        ours_err, peft_err = rel_err(pa[name].grad, exact[name]), rel_err(pb[name].grad, exact[name])
        assert ours_err <= max(tol, 2 * peft_err), (
            f"grad of {name}: relative error {ours_err:.3e} from the float64 oracle, PEFT's {peft_err:.3e} "
            f"(tolerance {tol:.1e})")


def _float64_grads(model, batch, g) -> dict[str, torch.Tensor]:
    """Gradients of a float64 copy of `model` (same mode) on `batch`: the loss's, or those of the logits
    against the cotangent `g` when the batch has no labels."""
    import copy

    ref = copy.deepcopy(model).double()
    ref.zero_grad(set_to_none=True)
    batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    out = ref(**batch)
    if g is None:
        out.loss.backward()
    else:
        out.logits.backward(g.double())
    return {n: p.grad for n, p in trainable(ref).items()}


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
